// The Volume lifecycle with the real pulumi CLI on lab hosts: create, scheduled backups, grow,
// S3 outage, reboot; data compared by manifest every time. Rebuilds, deletes and restores on
// create are in final.test.ts.
import { expect } from "chai";
import * as crypto from "crypto";
import { lab, labLease, onHost, Stack, stepByStep } from "./harness";
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

/** The volume's backup metrics as node-exporter serves them over HTTP on the host. */
async function scrape(h: LabHost, volumeId: string) {
  const r = await onHost(h, "curl -fsS http://127.0.0.1:9100/metrics");
  const one = (name: string) => {
    const line = r.stdout.split("\n").find((l) => l.startsWith(`${name}{volume="${volumeId}"} `));
    return line === undefined ? undefined : Number(line.split(" ")[1]);
  };
  const err = r.stdout.split("\n").find((l) => l.startsWith("node_textfile_scrape_error "));
  return {
    textfileErrors: err === undefined ? undefined : Number(err.split(" ")[1]),
    values: {
      success: one("dboxed_volume_backup_success"),
      lastRun: one("dboxed_volume_backup_last_run_timestamp_seconds"),
      lastSuccess: one("dboxed_volume_backup_last_success_timestamp_seconds"),
      duration: one("dboxed_volume_backup_duration_seconds"),
    },
  };
}

describe("Volume lifecycle (real pulumi, lab hosts)", function () {
  let stack: Stack;
  stepByStep(this, () => stack.run(["destroy", "--yes", "--skip-preview"]));
  let h1: LabHost;
  const volumeId = `t-${crypto.randomBytes(3).toString("hex")}`;
  const mountPath = "/srv/vol-a";
  /** The volume's settings as the steps so far left them. */
  let cur: Record<string, unknown> = { volumeId, size: "128MiB", mountPath, backupSchedule: "hourly" };
  const vol = (args: Record<string, unknown> = {}) => ({ name: "a", host: 0, args: { ...cur, ...args } });

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
    // The default spreads backups over two minutes, each volume at a fixed offset, and catches up after downtime.
    const t = await onHost(h1, `systemctl show -p RandomizedDelayUSec -p FixedRandomDelay -p Persistent dboxed-volume-${volumeId}-backup.timer`);
    expect(t.stdout.trim().split("\n").sort()).to.deep.equal(["FixedRandomDelay=yes", "Persistent=yes", "RandomizedDelayUSec=2min"]);
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

  it("the timer fires on its schedule and makes an incremental snapshot that reuses its parent's data", async () => {
    const before = await snapshots(h1, volumeId);
    // A random delay as long as the interval would skip runs: refused, naming the field; nothing changes.
    const refused = await stack.up(volumeInput([vol({ backupSchedule: "*:*:0/20", backupRandomDelay: "2m" })]));
    expect(refused.code).to.not.equal(0);
    expect(refused.stdout + refused.stderr).to.match(/backupRandomDelay: 120 s is not shorter than the 20 s between backups of backupSchedule "\*:\*:0\/20"/);
    expect((await onHost(h1, `systemctl cat dboxed-volume-${volumeId}-backup.timer`)).stdout).to.contain("OnCalendar=hourly");
    // Unset, the delay is half the 20 s interval; set, it is as given.
    const dflt = await stack.up(volumeInput([vol({ backupSchedule: "*:*:0/20" })]));
    expect(dflt.code, dflt.stdout + dflt.stderr).to.equal(0);
    expect((await onHost(h1, `systemctl show -p RandomizedDelayUSec dboxed-volume-${volumeId}-backup.timer`)).stdout.trim()).to.equal("RandomizedDelayUSec=10s");
    cur = { ...cur, backupRandomDelay: 5 };
    const res = await stack.up(volumeInput([vol({ backupSchedule: "*:*:0/20" })]));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const unit = await onHost(h1, `systemctl cat dboxed-volume-${volumeId}-backup.timer; systemctl show -p RandomizedDelayUSec dboxed-volume-${volumeId}-backup.timer`);
    expect(unit.stdout).to.contain("OnCalendar=*:*:0/20");
    expect(unit.stdout).to.contain("RandomizedDelayUSec=5s");
    await onHost(h1, `echo changed > ${mountPath}/data/sub/deeper/tag.txt`);
    const t0 = Math.floor(Date.now() / 1000);
    // The new schedule may fire while `up` still runs (before the change was written): wait
    // for a run that started after the change.
    const startedAfterChange = (s: { time: string }) => Date.parse(s.time) / 1000 >= t0;
    let after = before;
    for (let i = 0; i < 60 && !after.some(startedAfterChange); i++) {
      await new Promise((r) => setTimeout(r, 5000));
      after = await snapshots(h1, volumeId);
    }
    expect(after.length, "no new snapshot from the timer within 5 minutes").to.be.greaterThan(before.length);
    const at = after.findIndex(startedAfterChange);
    expect(at, "no snapshot started by the timer after the change within 5 minutes").to.be.greaterThan(0);
    const newest = after[at];
    expect(newest.parent).to.equal(after[at - 1].id);
    const summary = newest.summary as Record<string, number>;
    expect(summary.files_unmodified, JSON.stringify(summary)).to.be.greaterThan(40);
    expect(summary.data_added).to.be.lessThan(1_000_000);
    const journal = await onHost(h1, `journalctl -u dboxed-volume-${volumeId}-backup.service --no-pager -o cat | grep -c "backup of ${volumeId} done"`);
    expect(Number(journal.stdout.trim())).to.be.greaterThan(0);
    const back = await stack.up(volumeInput([vol()]));
    expect(back.code, back.stdout + back.stderr).to.equal(0);
  });

  it("growing the size extends the LV and the filesystem online and keeps the data, also while a backup runs", async () => {
    const before = await manifest(h1, mountPath);
    // A periodic run in progress holds an lvm2 snapshot of the LV, and lvm2 resizes no origin
    // with a snapshot: the grow waits for it (seen: the timer's run, just before the grow).
    await onHost(h1, `systemctl start --no-block dboxed-volume-${volumeId}-backup.service
for i in $(seq 1 600); do lvs dbv-${volumeId}/data-backup >/dev/null 2>&1 && exit 0; sleep 0.2; done; exit 1`);
    cur = { ...cur, size: "256MiB" };
    const res = await stack.up(volumeInput([vol()]));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const o = (await stack.outputs()).volumes.a;
    expect(o.sizeBytes).to.equal(256 * 1024 * 1024);
    const df = await onHost(h1, `df -B1 --output=size ${mountPath} | tail -n1`);
    expect(Number(df.stdout.trim())).to.be.greaterThan(200 * 1024 * 1024);
    expect((await manifest(h1, mountPath)).entries).to.deep.equal(before.entries);
  });

  it("shrinking is refused at preview with a message that names size", async () => {
    const res = await stack.preview(volumeInput([vol({ size: "128MiB" })]));
    expect(res.code).to.not.equal(0);
    expect(res.stdout + res.stderr).to.match(/size: shrinking a volume is not supported/);
  });

  it("a backup while S3 is down fails visibly and leaves no snapshot LV or mount; the next one succeeds", async () => {
    await stopS3(lab().dir);
    try {
      const run = await onHost(h1, `systemctl start dboxed-volume-${volumeId}-backup.service`, { allowFailure: true });
      expect(run.code).to.not.equal(0);
      const status = JSON.parse((await onHost(h1, `cat /var/lib/dboxed-volumes/${volumeId}/status.json`)).stdout);
      expect(status.status).to.equal("failed");
      expect(status.message).to.match(/cannot read the lease|rustic backup failed/);
      // As Prometheus sees it: scraped from the host's node-exporter (its textfile collector).
      const m = await scrape(h1, volumeId);
      expect(m.textfileErrors).to.equal(0);
      expect(m.values).to.deep.equal({ success: 0, lastRun: status.finishedAt, lastSuccess: status.lastSuccessAt, duration: status.finishedAt - status.startedAt });
      expect(status.lastSuccessAt).to.be.greaterThan(0);
      const leftovers = await onHost(h1, `lvs --noheadings -o lv_name dbv-${volumeId}; mountpoint -q /run/dboxed-volumes/${volumeId}/snapshot && echo MOUNTED || true`);
      expect(leftovers.stdout.trim().split(/\s+/)).to.deep.equal(["data"]);
      const refresh = await stack.run(["refresh", "--yes", "--skip-preview"]);
      expect(refresh.code, refresh.stdout + refresh.stderr).to.equal(0);
      const o = await stack.resourceOutputs("a");
      expect(o.lastBackupStatus).to.equal("failed");
      expect(o.lastBackupMessage).to.match(/cannot read the lease|rustic backup failed/);
    } finally {
      await restartS3(lab().dir);
    }
    await onHost(h1, `systemctl start dboxed-volume-${volumeId}-backup.service`);
    const refresh = await stack.run(["refresh", "--yes", "--skip-preview"]);
    expect(refresh.code, refresh.stdout + refresh.stderr).to.equal(0);
    const o = await stack.resourceOutputs("a");
    expect(o.lastBackupStatus).to.equal("ok");
    const status = JSON.parse((await onHost(h1, `cat /var/lib/dboxed-volumes/${volumeId}/status.json`)).stdout);
    const m = await scrape(h1, volumeId);
    expect(m.values).to.deep.equal({ success: 1, lastRun: status.finishedAt, lastSuccess: status.finishedAt, duration: status.finishedAt - status.startedAt });
  });

  it("after a host reboot the volume is mounted again, the timer is active and catches up once on a missed run", async () => {
    const before = await manifest(h1, mountPath);
    // As if the host had been off for two hours: the hourly timer's last run was before the last full hour.
    const timer = `dboxed-volume-${volumeId}-backup.timer`;
    await onHost(h1, `touch -d '-2 hours' /var/lib/systemd/timers/stamp-${timer}`);
    await onHost(h1, "systemctl reboot", { allowFailure: true });
    await new Promise((r) => setTimeout(r, 5000));
    let up = false;
    for (let i = 0; i < 60 && !up; i++) {
      try {
        const r = await onHost(h1, "systemctl is-system-running --wait", { allowFailure: true, timeoutMs: 120_000 });
        up = /running|degraded/.test(r.stdout);
      } catch {
        await new Promise((r) => setTimeout(r, 3000));
      }
    }
    expect(up, "the host did not come back").to.equal(true);
    await onHost(h1, `date -s @${Math.floor(Date.now() / 1000)} >/dev/null`);
    const state = await onHost(h1, `findmnt -n -o FSTYPE ${mountPath}; systemctl is-active dboxed-volume-${volumeId}-backup.timer`);
    expect(state.stdout.trim().split("\n")).to.deep.equal([cur.filesystem ?? "ext4", "active"]);
    expect((await manifest(h1, mountPath)).entries).to.deep.equal(before.entries);
    // The missed run is made up once, right after boot (within the 5 s random delay), then the hourly schedule resumes.
    const runs = () => onHost(h1, `journalctl -b -u dboxed-volume-${volumeId}-backup.service --no-pager -o cat | grep -c "backup of ${volumeId} done" || true`)
      .then((r) => Number(r.stdout.trim()));
    for (let i = 0; i < 60 && await runs() < 1; i++) await new Promise((r) => setTimeout(r, 2000));
    expect(await runs(), "the missed backup was made up after boot").to.equal(1);
    await new Promise((r) => setTimeout(r, 10000));
    expect(await runs(), "made up once, not again").to.equal(1);
    const next = await onHost(h1, `systemctl show -p NextElapseUSecRealtime --value ${timer} | xargs -I{} date -d {} +%s`);
    expect(Number(next.stdout.trim()) % 3600, "the next run is at the full hour plus the volume's fixed offset").to.be.lessThan(5);
    expect((await manifest(h1, mountPath)).entries).to.deep.equal(before.entries);
  });

  it("the import option fails at preview saying how to adopt the volume; nothing changes", async () => {
    const res = await stack.preview(volumeInput([{ ...vol(), import: volumeId }]));
    expect(res.code).to.not.equal(0);
    expect(res.stdout + res.stderr).to.match(new RegExp(`pulumi import cannot adopt volume "${volumeId}".*declare the Volume without the import option`, "s"));
  });

  it("a volume whose state was lost is adopted by declaring it again: same data and lease token, nothing formatted", async () => {
    // Written after the last backup: only the volume itself holds it (a format and restore would lose it).
    await onHost(h1, `echo "after the last backup $(date +%s%N)" > ${mountPath}/after-last-backup.txt; sync`);
    const uuid = async () => (await onHost(h1, `blkid -s UUID -o value "$(findmnt -n -o SOURCE --mountpoint ${mountPath})"`)).stdout.trim();
    const uuidBefore = await uuid();
    expect(uuidBefore).to.match(/^[0-9a-f-]{36}$/);
    const before = await manifest(h1, mountPath);
    const token = (await labLease(prefix, volumeId))!.lease.token;
    const urn = JSON.parse((await stack.ok(["stack", "export"])).stdout).deployment.resources.find((x: any) => x.urn.endsWith("::a")).urn;
    await stack.ok(["state", "delete", "--yes", "--force", urn]);
    const res = await stack.up(volumeInput([vol()]));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect((await manifest(h1, mountPath)).entries).to.deep.equal(before.entries);
    expect((await labLease(prefix, volumeId))!.lease.token).to.equal(token);
    expect(await uuid(), "the filesystem was not made again").to.equal(uuidBefore);
    const o = (await stack.outputs()).volumes.a;
    expect([o.mounted, o.lastBackupStatus, o.restoredFrom]).to.deep.equal([true, "ok", ""]);
  });
});
