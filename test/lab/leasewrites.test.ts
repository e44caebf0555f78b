// Lease writes whose answer is lost (a reset connection after the S3 server did the write): the
// SDK sends the conditional request again, which then meets its own write. Played by a proxy in
// front of the lab's S3 server that forwards a request and cuts the connection instead of
// answering. A landed write must count as written, not as another writer's conflict: a move's
// switch that took its own write for a conflict ran its change again, refused, and left the
// volume served nowhere.
import { expect } from "chai";
import * as crypto from "crypto";
import { lab } from "./harness";
import { S3Proxy } from "./s3proxy";
import { deleteLease, Lease, readLease, updateLease, writeLease } from "../../provider/storage/lease";

describe("lease writes whose answer is lost (lab S3 server behind a proxy that cuts the answer)", () => {
  let proxy: S3Proxy;
  let loseNext: string | undefined;   // the method whose next answer is lost
  const prefix = `lost-${crypto.randomBytes(3).toString("hex")}`;
  const s3 = () => ({ ...lab().s3, endpoint: proxy.url, prefix, forcePathStyle: true });
  const host = (n: number) => ({ address: `10.9.9.${n}`, port: 22, hostKey: `ssh-ed25519 AAAAkey${n}` });
  const lease = (volumeId: string, n: number): Lease => ({ volumeId, holder: host(n), generation: n, token: `t${n}`, updatedAt: "" });

  before(async () => {
    const l = lab();
    proxy = new S3Proxy({ upstream: l.s3.endpoint, accessKeyId: l.s3.accessKeyId, secretAccessKey: l.s3.secretAccessKey, region: l.s3.region,
      dropConditionals: false,
      loseAnswer: (method, url) => {
        if (method !== loseNext || !url.includes("/lease.json")) return false;
        loseNext = undefined;
        return true;
      } });
    await proxy.start();
  });
  after(async () => { await proxy?.stop(); });

  it("a create (If-None-Match) that landed, its answer lost, counts as written", async () => {
    const before = proxy.lost;
    loseNext = "PUT";
    const etag = await writeLease(s3(), lease("v-create", 1), undefined);
    expect(proxy.lost, "the proxy lost an answer").to.equal(before + 1);
    const now = await readLease(s3(), "v-create");
    expect(now?.lease.holder.address).to.equal("10.9.9.1");
    expect(now?.etag).to.equal(etag);
  });

  it("a change (If-Match) that landed, its answer lost, is not run again: a switch to a new holder succeeds once", async () => {
    await writeLease(s3(), lease("v-switch", 1), undefined);
    let calls = 0;
    loseNext = "PUT";
    const before = proxy.lost;
    // As a move's switch does: it refuses unless the old host still holds the volume.
    const next = await updateLease(s3(), "v-switch", (cur) => {
      calls++;
      if (cur?.holder.address !== "10.9.9.1") throw new Error(`refused: the holder is ${cur?.holder.address}`);
      return { ...cur, holder: host(2), generation: cur.generation + 1 };
    });
    expect(proxy.lost).to.equal(before + 1);
    expect(calls, "the change ran once").to.equal(1);
    expect(next.holder.address).to.equal("10.9.9.2");
    expect((await readLease(s3(), "v-switch"))?.lease.holder.address).to.equal("10.9.9.2");
  });

  it("a write that did not land still meets a real conflict", async () => {
    await writeLease(s3(), lease("v-conflict", 1), undefined);
    const stale = (await readLease(s3(), "v-conflict"))!.etag;
    await writeLease(s3(), lease("v-conflict", 3), stale);
    let err: Error | undefined;
    await writeLease(s3(), lease("v-conflict", 4), stale).catch((e) => { err = e; });
    expect(err?.constructor.name).to.equal("LeaseConflict");
    expect((await readLease(s3(), "v-conflict"))?.lease.holder.address).to.equal("10.9.9.3");
  });

  it("a release (conditional delete) that landed, its answer lost, counts as released", async () => {
    await writeLease(s3(), lease("v-release", 1), undefined);
    const cur = (await readLease(s3(), "v-release"))!;
    loseNext = "DELETE";
    const before = proxy.lost;
    await deleteLease(s3(), "v-release", cur.etag);
    expect(proxy.lost).to.equal(before + 1);
    expect(await readLease(s3(), "v-release")).to.equal(undefined);
  });
});
