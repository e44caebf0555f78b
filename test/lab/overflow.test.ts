// A volume in a shared volume group whose backup snapshot overflows: rewritten by more than its
// copy-on-write space while the backup reads it. The backup must fail loudly, leave no snapshot
// LV, and leave nothing damaged in the repository; the next backup succeeds.
import { expect } from "chai";
import * as crypto from "crypto";
import { lab, labLease, onHost, Stack, stepByStep } from "./harness";
import { manifest } from "./manifest";
import { parseSnapshots, Snapshot } from "../../provider/host/rustic";
import type { LabHost } from "../../lab/lab";

const prefix = `ovf-${crypto.randomBytes(3).toString("hex")}`;
const volumeId = `ovf-${crypto.randomBytes(3).toString("hex")}`;
const vg = "labvg";
const mountPath = "/srv/overflow";
const unit = `dboxed-volume-${volumeId}-backup.service`;

describe("snapshot overflow in a shared volume group (real pulumi, lab host)", function () {
  stepByStep(this);
  let h: LabHost;
  let stack: Stack;

  const rustic = (args: string) => onHost(h, `/usr/local/lib/dboxed-volumes/rustic -P /etc/dboxed-volumes/${volumeId}/rustic --no-progress ${args}`, { timeoutMs: 600_000 });
  const snapshots = async () => parseSnapshots((await rustic(`snapshots --json -g '' --filter-host dboxed-volume-${volumeId}`)).stdout);
  const status = async () => JSON.parse((await onHost(h, `cat /var/lib/dboxed-volumes/${volumeId}/status.json`)).stdout);

  before(async () => {
    h = lab().hosts[2];
    await onHost(h, `vgs ${vg} >/dev/null 2>&1 || { pvcreate -q -y /dev/vdb && vgcreate -q ${vg} /dev/vdb; }`);
    stack = new Stack("overflow", "volumes");
    await stack.init();
  });

  after(async () => {
    if (stack) await stack.run(["destroy", "--yes", "--skip-preview"]);
    await onHost(h, `vgremove -q -f ${vg} >/dev/null 2>&1; pvremove -q /dev/vdb >/dev/null 2>&1
systemctl disable --now --quiet ovf-app.service 2>/dev/null; rm -f /etc/systemd/system/ovf-app.service; systemctl daemon-reload; true`, { allowFailure: true });
  });

  it("a volume in a shared VG with 64MiB of snapshot space is created and filled with 80 MB", async () => {
    const res = await stack.up({ provider: { s3: { prefix } }, volumes: [{ name: "o", host: 2, args: {
      volumeId, size: "128MiB", mountPath, volumeGroup: vg, snapshotSpace: "64MiB", backupSchedule: "hourly" } }] });
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const snap = await onHost(h, `. /etc/dboxed-volumes/${volumeId}/volume.env && echo $SNAPSHOT_BYTES`);
    expect(Number(snap.stdout.trim())).to.equal(64 * 1024 * 1024);
    // Compressible content: cheap to back up; every overwritten block still costs copy-on-write space.
    await onHost(h, `set -e; cd ${mountPath}; for i in $(seq 1 8); do yes "first generation $i" | head -c 10000000 > f-$i; done; sync`);
    await onHost(h, `systemctl start ${unit}`, { timeoutMs: 600_000 });
    expect((await status()).status).to.equal("ok");
  });

  let earlier: Snapshot[] = [];

  it("rewriting 80 MB while a backup reads its snapshot fails that backup with the overflow message and leaves nothing behind", async () => {
    earlier = await snapshots();
    // Catch the run right after it took its snapshot, rewrite more than the snapshot space, let it go on.
    await onHost(h, `systemctl start --no-block ${unit}
for i in $(seq 1 600); do mountpoint -q /run/dboxed-volumes/${volumeId}/snapshot && break; sleep 0.1; done
systemctl kill --signal=SIGSTOP ${unit}
cd ${mountPath}; for i in $(seq 1 8); do yes "second generation $i" | head -c 10000000 | dd of=f-$i conv=notrunc,fsync status=none; done; sync
lvs --noheadings -o lv_attr ${vg}/dbv-${volumeId}-backup
systemctl kill --signal=SIGCONT ${unit}`, { timeoutMs: 300_000 });
    const wait = await onHost(h, `while [ "$(systemctl show -p ActiveState --value ${unit})" = activating ]; do sleep 1; done; systemctl show -p Result --value ${unit}`, { timeoutMs: 600_000 });
    expect(wait.stdout.trim()).to.equal("exit-code");
    const st = await status();
    expect(st.status).to.equal("failed");
    expect(st.message).to.match(/lvm2 snapshot overflowed/);
    expect(st.message).to.match(/Raise snapshotSpace/);
    const metric = await onHost(h, `cat /var/lib/prometheus/node-exporter/dboxed_volume_${volumeId}.prom`);
    expect(metric.stdout).to.contain(`dboxed_volume_backup_success{volume="${volumeId}"} 0`);
    const lvs = await onHost(h, `lvs --noheadings -o lv_name ${vg} | tr -d ' '; mountpoint -q /run/dboxed-volumes/${volumeId}/snapshot && echo MOUNTED || true`);
    expect(lvs.stdout.trim().split("\n")).to.deep.equal([`dbv-${volumeId}`]);
    const after = await snapshots();
    expect(after.map((s) => s.id), "the snapshot read from the overflowed LV was discarded").to.deep.equal(earlier.map((s) => s.id));
  });

  it("the next backup is ok, and every snapshot in the repository holds the whole tree", async () => {
    await onHost(h, `systemctl start ${unit}`, { timeoutMs: 600_000 });
    expect((await status()).status).to.equal("ok");
    const all = await snapshots();
    expect(all.length).to.equal(earlier.length + 1);
    // The first snapshot is the create's, of the empty volume; every later one holds all 8 files.
    for (const [i, s] of all.entries()) {
      const ls = await rustic(`ls ${s.id}`);
      const files = ls.stdout.split("\n").filter((l) => /^\/?f-\d$/.test(l.trim()));
      expect(files.length, `snapshot ${s.id.slice(0, 8)} lists every file`).to.equal(i === 0 ? 0 : 8);
    }
    const latest = all[all.length - 1];
    await onHost(h, "rm -rf /root/ovf-verify && mkdir -p /root/ovf-verify");
    await rustic(`restore --numeric-id ${latest.id} /root/ovf-verify`);
    const live = await manifest(h, mountPath, { exclude: ["lost+found"] });
    const restored = await manifest(h, "/root/ovf-verify", { exclude: ["lost+found"] });
    expect(restored.entries).to.deep.equal(live.entries);
    await onHost(h, "rm -rf /root/ovf-verify");
  });

  const failedId = `ovf-${crypto.randomBytes(3).toString("hex")}`;
  const keptId = `ovf-${crypto.randomBytes(3).toString("hex")}`;
  const main = { name: "o", host: 2, args: { volumeId, size: "128MiB", mountPath, volumeGroup: vg, snapshotSpace: "64MiB", backupSchedule: "hourly" } };
  const other = (host: number) => ({ name: "f", host, args: { volumeId: failedId, size: "64MiB", mountPath: "/srv/failed-create", backupSchedule: "hourly" } });
  // A volume an application starts on as soon as it is mounted (WantedBy its mount unit): what it writes may exist nowhere else.
  const kept = { name: "k", host: 2, args: { volumeId: keptId, size: "64MiB", mountPath: "/srv/failedkeep", backupSchedule: "hourly" } };

  it("a create that fails after making its storage (the host cannot reach S3) removes it and gives back the lease, unless something else used it", async () => {
    await onHost(h, `cat > /etc/systemd/system/ovf-app.service <<'UNIT'
[Unit]
RequiresMountsFor=/srv/failedkeep
[Service]
ExecStart=/bin/sh -c 'echo "written by the app" > /srv/failedkeep/app.txt; exec sleep infinity'
[Install]
WantedBy=srv-failedkeep.mount
UNIT
systemctl daemon-reload && systemctl enable --quiet ovf-app.service`);
    // The guest reaches the lab's S3 server at 10.0.2.100: a prohibit route makes every connection fail at once.
    await onHost(h, "ip route add prohibit 10.0.2.100/32");
    let res;
    try {
      res = await stack.up({ provider: { s3: { prefix } }, volumes: [main, other(2), kept] });
    } finally {
      await onHost(h, "ip route del prohibit 10.0.2.100/32", { allowFailure: true });
    }
    const text = res.stdout + res.stderr;
    expect(res.code, text).to.not.equal(0);
    // Nothing else used the first: removed, its lease given back.
    expect(text).to.match(new RegExp(`volume ${failedId}.*create failed on .*: removing the storage it made there, then giving back the lease`));
    const left = await onHost(h, `ls /etc/systemd/system /etc/dboxed-volumes /var/lib/dboxed-volumes 2>/dev/null | grep -c ${failedId} || true
lvs --noheadings -o lv_name,vg_name 2>/dev/null | grep -c ${failedId} || true
mountpoint -q /srv/failed-create && echo mounted || echo unmounted`);
    expect(left.stdout.trim().split("\n"), left.stdout).to.deep.equal(["0", "0", "unmounted"]);
    expect(await labLease(prefix, failedId), "the failed create's lease").to.equal(undefined);
    // The application ran on the second: it stays, in service, with its lease and the app's file.
    expect(text).to.match(new RegExp(`volume ${keptId}.*left on .*: it may hold data of its own \\(unit ovf-app\\.service ran on it\\)`));
    const k = await onHost(h, `cat /srv/failedkeep/app.txt; findmnt -n -o OPTIONS --mountpoint /srv/failedkeep | cut -d, -f1
systemctl is-active dboxed-volume-${keptId}-backup.timer dboxed-volume-${keptId}-lease.timer`, { allowFailure: true });
    expect(k.stdout.trim().split("\n"), k.stdout).to.deep.equal(["written by the app", "rw", "active", "active"]);
    expect((await labLease(prefix, keptId))?.lease.holder.port, "the kept volume's lease").to.equal(h.port);
    // S3 back: the kept volume's create finishes where it is; the other id is created on another host.
    res = await stack.up({ provider: { s3: { prefix } }, volumes: [main, other(0), kept] });
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect((await labLease(prefix, failedId))?.lease.holder.port).to.equal(lab().hosts[0].port);
    expect((await onHost(h, "cat /srv/failedkeep/app.txt")).stdout.trim()).to.equal("written by the app");
  });

  it("a delete that cannot make the volume read-only (a writer holds it) fails and leaves it as it was", async () => {
    await onHost(h, `systemd-run --quiet --unit=ovf-busy sh -c 'exec 3>>${mountPath}/busy.log; while :; do echo x >&3; sleep 1; done'`);
    try {
      const res = await stack.up({ provider: { s3: { prefix } }, volumes: [] });
      expect(res.code).to.not.equal(0);
      expect(res.stdout + res.stderr).to.match(/is in use, so it cannot be made read-only/);
      // The writer is named (from /proc: the image has no fuser).
      expect(res.stdout + res.stderr).to.match(new RegExp(`process \\d+ \\(sh\\) uses ${mountPath}/busy\\.log`));
      expect(res.stdout + res.stderr).to.match(/left in place .*mounted read-write and scheduled as before/);
      const state = await onHost(h, `findmnt -n -o OPTIONS --mountpoint ${mountPath} | cut -d, -f1; systemctl is-active dboxed-volume-${volumeId}-backup.timer; lvs --noheadings -o lv_name ${vg} | tr -d ' '`);
      expect(state.stdout.trim().split("\n")).to.deep.equal(["rw", "active", `dbv-${volumeId}`]);
    } finally {
      await onHost(h, "systemctl stop ovf-busy; true", { allowFailure: true });
    }
    const res = await stack.up({ provider: { s3: { prefix } }, volumes: [] });
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    // Every delete gives back the lease: the ids are free for any resource.
    expect(await labLease(prefix, volumeId), "lease after the delete").to.equal(undefined);
    expect(await labLease(prefix, failedId), "lease after the delete").to.equal(undefined);
    expect(await labLease(prefix, keptId), "lease after the delete").to.equal(undefined);
  });
});
