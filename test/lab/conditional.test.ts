// VolumeProvider refuses an S3 server that ignores conditional writes (volume leases would not
// be safe there). Such a server is played by a proxy in front of the lab's S3 server that drops
// If-None-Match / If-Match, or only If-Match, or honours them one request at a time but not
// atomically (checks, then writes); the same proxy passing them through is the control.
import { expect } from "chai";
import * as crypto from "crypto";
import { lab, Stack } from "./harness";
import { S3Proxy } from "./s3proxy";

describe("VolumeProvider checks conditional writes (real pulumi, lab S3 server behind a proxy)", () => {
  let dropping: S3Proxy;
  let droppingIfMatch: S3Proxy;
  let passing: S3Proxy;
  let nonAtomic: S3Proxy;
  let n = 0;

  before(async () => {
    const l = lab();
    const opts = { upstream: l.s3.endpoint, accessKeyId: l.s3.accessKeyId, secretAccessKey: l.s3.secretAccessKey, region: l.s3.region };
    dropping = new S3Proxy({ ...opts, dropConditionals: true });
    droppingIfMatch = new S3Proxy({ ...opts, dropConditionals: ["if-match"] });
    passing = new S3Proxy({ ...opts, dropConditionals: false });
    nonAtomic = new S3Proxy({ ...opts, dropConditionals: false, checkThenWrite: true });
    await nonAtomic.start();
    await dropping.start();
    await droppingIfMatch.start();
    await passing.start();
  });

  after(async () => {
    await dropping?.stop();
    await droppingIfMatch?.stop();
    await passing?.stop();
    await nonAtomic?.stop();
  });

  async function upProvider(endpoint: string) {
    const prefix = `cond-${crypto.randomBytes(3).toString("hex")}`;
    const stack = new Stack(`conditional-${++n}`, "volumes");
    await stack.init();
    const res = await stack.up({ provider: { s3: { prefix, endpoint } }, volumes: [] });
    return { res, text: res.stdout + res.stderr, stack, prefix };
  }

  it("a server that ignores If-None-Match/If-Match fails naming s3.endpoint and the header", async () => {
    const r = await upProvider(dropping.url);
    expect(r.res.code, r.text).to.not.equal(0);
    expect(r.text).to.match(/s3\.endpoint: the S3 server at http:\/\/127\.0\.0\.1:\d+ ignores If-None-Match/);
    expect(dropping.dropped, "the proxy dropped conditional headers").to.be.greaterThan(0);
  });

  it("a server that honours If-None-Match but ignores If-Match (no compare-and-swap) is refused too", async () => {
    const r = await upProvider(droppingIfMatch.url);
    expect(r.res.code, r.text).to.not.equal(0);
    expect(r.text).to.match(/s3\.endpoint: the S3 server at http:\/\/127\.0\.0\.1:\d+ ignores If-Match on PutObject/);
    expect(droppingIfMatch.dropped, "the proxy dropped If-Match").to.be.greaterThan(0);
  });

  it("a server that honours them one at a time but not atomically (concurrent writers of one version all win) is refused", async () => {
    const r = await upProvider(nonAtomic.url);
    expect(r.res.code, r.text).to.not.equal(0);
    expect(r.text).to.match(/s3\.endpoint: the S3 server at http:\/\/127\.0\.0\.1:\d+ let \d+ of 32 concurrent writes with one If-None-Match: \* succeed \(exactly one must\): its conditional writes are not atomic/);
    expect(nonAtomic.dropped, "the proxy checked, then wrote").to.be.greaterThan(0);
  });

  it("control: the same proxy passing the headers through is accepted; moving that VolumeProvider to a server that ignores them is refused", async () => {
    const r = await upProvider(passing.url);
    expect(r.res.code, r.text).to.equal(0);
    expect(r.text).to.match(/initialising the rustic repository/);
    // The probe runs again when the S3 settings change (here the endpoint: the same server seen through the dropping proxy).
    const before = dropping.dropped;
    const res = await r.stack.up({ provider: { s3: { prefix: r.prefix, endpoint: dropping.url } }, volumes: [] });
    expect(res.code, res.stdout + res.stderr).to.not.equal(0);
    expect(res.stdout + res.stderr).to.match(/s3\.endpoint: the S3 server at http:\/\/127\.0\.0\.1:\d+ ignores If-None-Match/);
    expect(dropping.dropped).to.be.greaterThan(before);
  });
});
