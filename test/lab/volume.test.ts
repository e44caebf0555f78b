// The Volume lifecycle with the real pulumi CLI on lab hosts: create, scheduled backups,
// restore on create, grow, S3 outage, reboot, delete; data compared by manifest every time.
import { expect } from "chai";
import * as crypto from "crypto";
import { lab, onHost, Stack } from "./harness";
import { manifest } from "./manifest";
import { restartS3, stopS3 } from "../../lab/lab";
import { parseSnapshots } from "../../provider/host/rustic";
import type { LabHost } from "../../lab/lab";

const prefix = `vol-${crypto.randomBytes(3).toString("hex")}`;

function volumeInput(volumes: unknown[], extra: Record<string, unknown> = {}) {
  return { provider: { s3: { prefix } , ...extra }, volumes };
}

async function rustic(host: LabHost, id: string, args: string) {
  return onHost(host, `/usr/local/lib/dboxed-volumes/rustic -P /etc/dboxed-volumes/${id}/rustic --no-progress ${args}`, { timeoutMs: 600_000 });
}

async function snapshots(host: LabHost, id: string) {
  return parseSnapshots((await rustic(host, id, `snapshots --json -g '' --filter-host dboxed-volume-${id}`)).stdout);
}

/** Writes a mix of files into dir: random data, nested dirs, a symlink, a hardlink, an xattr, another owner. */
async function writeData(host: LabHost, dir: string, tag: string) {
  await onHost(host, `set -e; cd ${dir}; mkdir -p data/sub/deeper empty-dir
for i in $(seq 1 40); do head -c $((i * 1500)) /dev/urandom > data/file-$i; done
head -c 3000000 /dev/urandom > data/sub/big.bin
echo ${tag} > data/sub/deeper/tag.txt
ln -sf ../file-1 data/sub/link-to-file-1
ln -f data/file-2 data/sub/hardlink-to-file-2
setfattr -n user.origin -v ${tag} data/file-3
chown 1234:2345 data/file-4 && chmod 0640 data/file-4
sync`);
}

describe("Volume lifecycle (real pulumi, lab hosts)", function () {
  this.bail(true); // each step builds on the one before
  let stack: Stack;
  let h1: LabHost;
  const volumeId = `t-${crypto.randomBytes(3).toString("hex")}`;
  const mountPath = "/srv/vol-a";
  const vol = (args: Record<string, unknown> = {}) => ({
    name: "a", host: 0, args: { volumeId, size: "128MiB", mountPath, backupSchedule: "hourly", ...args },
  });

  before(async () => {
    h1 = lab().hosts[0];
    stack = new Stack("volumes-a", "volumes");
    await stack.init();
  });

  it("create mounts the volume, installs the timer and takes a first backup", async () => {
    const res = await stack.up(volumeInput([vol()]));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const o = (await stack.outputs()).volumes.a;
    expect(o.mounted).to.equal(true);
    expect(o.timerActive).to.equal(true);
    expect(o.lastBackupStatus).to.equal("ok");
    expect(o.snapshotCount).to.equal(1);
    expect(o.sizeBytes).to.equal(128 * 1024 * 1024);
    const m = await onHost(h1, `findmnt -n -o SOURCE,FSTYPE ${mountPath}`);
    expect(m.stdout).to.match(/ext4/);
  });

  it("the backup service snapshots the data with a fixed host, label and tags; content and metadata match", async () => {
    await writeData(h1, mountPath, "first");
    const before = await manifest(h1, mountPath);
    await onHost(h1, `systemctl start dboxed-volume-${volumeId}-backup.service`);
    const snaps = await snapshots(h1, volumeId);
    expect(snaps).to.have.length(2);
    const latest = snaps[1];
    expect(latest.hostname).to.equal(`dboxed-volume-${volumeId}`);
    expect(latest.label).to.equal(volumeId);
    expect(latest.tags).to.include.members(["dboxed-volume", `volume-${volumeId}`]);
    expect(latest.paths).to.deep.equal(["/"]);
    expect(latest.parent).to.equal(snaps[0].id);
    await onHost(h1, "rm -rf /root/verify && mkdir -p /root/verify");
    await rustic(h1, volumeId, `restore --numeric-id ${latest.id} /root/verify`);
    const restored = await manifest(h1, "/root/verify");
    expect(restored.entries).to.deep.equal(before.entries);
    expect(restored.xattrs).to.equal(before.xattrs);
    expect(restored.acls).to.equal(before.acls);
    expect(Object.keys(before.entries).length).to.be.greaterThan(45);
  });
});
