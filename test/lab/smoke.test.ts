// Proves the lab is real: the real pulumi CLI drives a dynamic resource over SSH with a
// pinned host key; lvm2 snapshots work on a host; rustic backs up to the lab's S3 server.
import { expect } from "chai";
import * as crypto from "crypto";
import { ListObjectsV2Command, S3Client } from "@aws-sdk/client-s3";
import { lab, onHost, Stack, hostTarget } from "./harness";
import { Remote } from "../../provider/remote/ssh";
import { mountUnitName } from "../../provider/host/layout";
import { mountPathSchema } from "../../provider/inputs";
import { quote } from "../../provider/host/shell";

describe("lab smoke", () => {
  it("pulumi up writes a file over SSH with the pinned host key, destroy removes it", async () => {
    const host = lab().hosts[0];
    const stack = new Stack("smoke", "smoke");
    await stack.init();
    const content = `hello ${crypto.randomUUID()}\n`;
    const input = { host, path: "/root/smoke/hello.txt", content };
    const upRes = await stack.up(input);
    expect(upRes.code, upRes.stdout + upRes.stderr).to.equal(0);
    const cat = await onHost(host, "cat /root/smoke/hello.txt");
    expect(cat.stdout).to.equal(content.trimEnd());
    const destroy = await stack.run(["destroy", "--yes", "--skip-preview"]);
    expect(destroy.code, destroy.stdout + destroy.stderr).to.equal(0);
    const gone = await onHost(host, "test -e /root/smoke/hello.txt", { allowFailure: true });
    expect(gone.code).to.equal(1);
  });

  it("pulumi up refuses a host whose key does not match the pinned one", async () => {
    const [a, b] = lab().hosts;
    const stack = new Stack("smoke-wrong-key", "smoke");
    await stack.init();
    const res = await stack.up({ host: { ...a, hostKey: b.hostKey }, path: "/root/smoke/wrong.txt", content: "x" });
    expect(res.code).to.not.equal(0);
    expect(res.stdout + res.stderr).to.match(/does not match the pinned hostKey/);
    const absent = await onHost(a, "test -e /root/smoke/wrong.txt", { allowFailure: true });
    expect(absent.code).to.equal(1);
  });

  it("mount unit names equal systemd-escape --path --suffix=mount on a host, for every kind of path the schema admits", async () => {
    const paths = ["/srv/pgdata", "/srv/my-data/x", "/srv/.hidden", "/.data", "/srv/a_b.c-d", "/srv/A9/b", "/srv/x..y",
      "/srv/-lead", "/srv/_u", "/data.d/.x-y_z", "/srv/1.2.3", "/srv/trailing.", "/srv/a/b/c/d-e.f"];
    for (const p of paths) expect(mountPathSchema.safeParse(p).success, p).to.equal(true);
    const r = await onHost(lab().hosts[0], paths.map((p) => `systemd-escape --path --suffix=mount -- ${quote(p)}`).join("; "));
    expect(paths.map(mountUnitName)).to.deep.equal(r.stdout.trim().split("\n"));
  });

  it("each host has its own host key", () => {
    const keys = new Set(lab().hosts.map((h) => h.hostKey));
    expect(keys.size).to.equal(lab().hosts.length);
  });

  it("a host has lvm2: a logical volume and a snapshot are created and removed", async () => {
    const h = lab().hosts[1];
    const r = await onHost(h, [
      "set -e",
      "pvcreate -q /dev/vdb && vgcreate -q smoke /dev/vdb",
      "lvcreate -q -L 64M -n data smoke && mkfs.ext4 -q /dev/smoke/data",
      "mkdir -p /mnt/smoke && mount /dev/smoke/data /mnt/smoke && echo payload > /mnt/smoke/f",
      "lvcreate -q -s -L 32M -n snap smoke/data",
      "mkdir -p /mnt/snap && mount -o ro /dev/smoke/snap /mnt/snap && cat /mnt/snap/f",
      "echo '<<<'; lvs --reportformat json -o lv_name,origin smoke; echo '>>>'",
      "umount /mnt/snap && lvremove -q -y smoke/snap && umount /mnt/smoke && lvremove -q -y smoke/data",
      "vgremove -q smoke && pvremove -q /dev/vdb && lvs --reportformat json smoke 2>/dev/null || echo removed",
    ].join("\n"));
    expect(r.stdout).to.contain("payload");
    const report = JSON.parse(r.stdout.slice(r.stdout.indexOf("<<<") + 3, r.stdout.indexOf(">>>")));
    const lvs = report.report[0].lv.map((l: any) => `${l.lv_name}<-${l.origin}`);
    expect(lvs).to.have.members(["data<-", "snap<-data"]);
    expect(r.stdout.trim().split("\n").pop()).to.equal("removed");
  });

  it("rustic on a host backs up to the lab's S3 server; the client lists the repository", async () => {
    const l = lab();
    const h = l.hosts[2];
    const prefix = `smoke-${crypto.randomBytes(4).toString("hex")}`;
    const profile = [
      "[repository]", 'repository = "opendal:s3"', 'password = "smoke-password"',
      "[repository.options]", `endpoint = "${l.s3.hostEndpoint}"`, `region = "${l.s3.region}"`, `bucket = "${l.s3.bucket}"`,
      `root = "/${prefix}"`, `access_key_id = "${l.s3.accessKeyId}"`, `secret_access_key = "${l.s3.secretAccessKey}"`, "",
    ].join("\n");
    const r = await Remote.connect(hostTarget(h));
    try {
      await r.putFile(l.tools.rustic, "/usr/local/bin/rustic");
      await r.writeFile("/root/smoke-rustic.toml", profile, "0600");
      await r.run("mkdir -p /root/data && head -c 1000000 /dev/urandom > /root/data/blob && echo text > /root/data/t");
      await r.run("rustic -P /root/smoke-rustic init", { timeoutMs: 300000 });
      await r.run("rustic -P /root/smoke-rustic backup --host smoke /root/data", { timeoutMs: 300000 });
      const snaps = JSON.parse((await r.run("rustic -P /root/smoke-rustic snapshots --json -g ''")).stdout);
      const list = Array.isArray(snaps) ? snaps : snaps.flatMap((g: any) => g[1] ?? g.snapshots ?? []);
      expect(list).to.have.length(1);
      expect(list[0].hostname).to.equal("smoke");
    } finally {
      r.dispose();
    }
    const s3 = new S3Client({ endpoint: l.s3.endpoint, region: l.s3.region, forcePathStyle: true,
      credentials: { accessKeyId: l.s3.accessKeyId, secretAccessKey: l.s3.secretAccessKey } });
    const objects = await s3.send(new ListObjectsV2Command({ Bucket: l.s3.bucket, Prefix: `${prefix}/` }));
    s3.destroy();
    const keys = (objects.Contents ?? []).map((o) => o.Key!);
    expect(keys).to.include(`${prefix}/config`);
    expect(keys.some((k) => k.startsWith(`${prefix}/snapshots/`))).to.equal(true);
    expect(keys.some((k) => k.startsWith(`${prefix}/data/`))).to.equal(true);
  });
});
