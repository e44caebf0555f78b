// VolumeProvider against the lab's S3 server with the real CLI: clear errors that name the
// setting to fix, createBucket, and the repository initialised once.
import { expect } from "chai";
import * as crypto from "crypto";
import { HeadBucketCommand, S3Client } from "@aws-sdk/client-s3";
import { lab, Stack } from "./harness";

describe("VolumeProvider (real pulumi, lab S3 server)", () => {
  const prefix = `prov-${crypto.randomBytes(3).toString("hex")}`;
  let n = 0;
  async function upProvider(provider: Record<string, unknown>) {
    const stack = new Stack(`provider-${++n}`, "volumes");
    await stack.init();
    const res = await stack.up({ provider, volumes: [] });
    return { stack, res, text: res.stdout + res.stderr };
  }

  it("initialises the repository, and a second stack on the same prefix reuses it", async () => {
    const a = await upProvider({ s3: { prefix } });
    expect(a.res.code, a.text).to.equal(0);
    expect(a.text).to.match(/initialising the rustic repository/);
    const b = await upProvider({ s3: { prefix } });
    expect(b.res.code, b.text).to.equal(0);
    expect(b.text).to.not.match(/initialising the rustic repository/);
  });

  it("a wrong password for the existing repository fails naming password", async () => {
    const r = await upProvider({ s3: { prefix }, password: "not-the-password" });
    expect(r.res.code).to.not.equal(0);
    expect(r.text).to.match(/password: cannot open the existing repository/);
  });

  it("an endpoint where no S3 server answers fails naming s3.endpoint", async () => {
    const r = await upProvider({ s3: { prefix, endpoint: "http://127.0.0.1:9" } });
    expect(r.res.code).to.not.equal(0);
    expect(r.text).to.match(/s3\.endpoint: cannot reach http:\/\/127\.0\.0\.1:9/);
  });

  it("bad credentials fail naming the keys", async () => {
    const r = await upProvider({ s3: { prefix, secretAccessKey: "wrong-secret" } });
    expect(r.res.code).to.not.equal(0);
    expect(r.text).to.match(/s3\.accessKeyId\/s3\.secretAccessKey: the S3 server .* refused the credentials/);
  });

  it("a missing bucket fails naming s3.bucket; with createBucket it is created", async () => {
    const bucket = `missing-${crypto.randomBytes(3).toString("hex")}`;
    const r = await upProvider({ s3: { prefix, bucket } });
    expect(r.res.code).to.not.equal(0);
    expect(r.text).to.match(new RegExp(`s3\\.bucket: bucket "${bucket}" does not exist .*createBucket: true`));
    const c = await upProvider({ s3: { prefix, bucket, createBucket: true } });
    expect(c.res.code, c.text).to.equal(0);
    const l = lab();
    const s3 = new S3Client({ endpoint: l.s3.endpoint, region: l.s3.region, forcePathStyle: true,
      credentials: { accessKeyId: l.s3.accessKeyId, secretAccessKey: l.s3.secretAccessKey } });
    await s3.send(new HeadBucketCommand({ Bucket: bucket }));
    s3.destroy();
  });
});
