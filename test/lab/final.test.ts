// Final means final: a volume whose writer service appends an fsynced, ordered log, backed up
// every 20 seconds, with a periodic backup caught in progress (frozen by the test after it took
// its lvm2 snapshot) at the moment a move, a rebuild (ext4 -> xfs, forgetSnapshotsOnDelete set)
// and a delete begin. After each, the volume holds exactly what the writer wrote, byte for byte.
// Also: one owner per volume id, and a host reached at another address is not a move.
import { expect } from "chai";
import * as crypto from "crypto";
import * as fs from "fs";
import { lab, onHost, Stack, stepByStep, untilInactive } from "./harness";
import { manifest } from "./manifest";
import type { LabHost } from "../../lab/lab";
import { parseSnapshots } from "../../provider/host/rustic";
import { runLocalRustic } from "../../provider/lifecycle/localRustic";
import { layoutFor } from "../../provider/host/layout";
import * as steps from "../../provider/lifecycle/steps";
import { Remote } from "../../provider/remote/ssh";

const prefix = `fin-${crypto.randomBytes(3).toString("hex")}`;
const volumeId = `fin-${crypto.randomBytes(3).toString("hex")}`;
const mountPath = "/srv/final";
const writer = `writer-${volumeId}.service`;
const backupUnit = `dboxed-volume-${volumeId}-backup.service`;
const timerUnit = `dboxed-volume-${volumeId}-backup.timer`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The writer: appends numbered lines (fsynced) and now and then a data file; prints each after it is durable. */
async function installWriter(h: LabHost) {
  await onHost(h, `cat > /usr/local/bin/lab-writer <<'SH'
#!/bin/bash
# Stops between iterations only: every line it printed is complete and fsynced on the volume.
set -euo pipefail
stop=""; trap 'stop=1' TERM INT
dir=$1; tag=$2
n=0; [ ! -e "$dir/log.txt" ] || n=$(wc -l < "$dir/log.txt")
while [ -z "$stop" ]; do
  n=$((n + 1))
  line="line $n $tag"
  printf '%s\\n' "$line" | dd of="$dir/log.txt" oflag=append conv=notrunc,fsync status=none
  if [ $((n % 10)) = 0 ]; then head -c 8192 /dev/urandom > "$dir/data-$n.tmp"; sync "$dir/data-$n.tmp"; mv "$dir/data-$n.tmp" "$dir/data-$n.bin"; sync "$dir"; echo "data $n $(sha256sum < "$dir/data-$n.bin" | cut -c1-64)"; fi
  echo "$line"
  sleep 0.2
done
SH
chmod 0755 /usr/local/bin/lab-writer
cat > /etc/systemd/system/${writer} <<UNIT
[Unit]
Description=lab writer on ${mountPath}
RequiresMountsFor=${mountPath}
[Service]
ExecStart=/usr/local/bin/lab-writer ${mountPath} %H
# SIGTERM to the loop only: it finishes the line it is writing (and reports it) before it stops.
KillMode=mixed
UNIT
systemctl daemon-reload`);
}

/** The writer runs and has written lines on h. */
async function expectWriting(h: LabHost) {
  const r = await onHost(h, `systemctl is-active ${writer}; wc -l < ${mountPath}/log.txt`, { allowFailure: true });
  const [state, lines] = r.stdout.trim().split("\n");
  expect(state, "the writer runs").to.equal("active");
  expect(Number(lines)).to.be.greaterThan(3);
}

/** Every line and data file the writer reported on a host (all its runs, oldest first). */
async function writerJournal(h: LabHost): Promise<{ lines: string[]; data: Map<string, string> }> {
  const out = (await onHost(h, `journalctl -u ${writer} -o cat --no-pager | grep -E '^(line|data) ' || true`)).stdout;
  const lines: string[] = [];
  const data = new Map<string, string>();
  for (const l of out.split("\n").filter(Boolean)) {
    if (l.startsWith("line ")) lines.push(l);
    else { const [, n, sum] = l.split(" "); data.set(`data-${n}.bin`, sum); }
  }
  return { lines, data };
}

/** The volume holds exactly what the writers reported: the log byte for byte, every data file. */
async function expectWritersState(h: LabHost, journals: { lines: string[]; data: Map<string, string> }[]) {
  const log = (await onHost(h, `cat ${mountPath}/log.txt`)).stdout;
  const expected = journals.flatMap((j) => j.lines).map((l) => l + "\n").join("");
  const got = log.split("\n").filter(Boolean);
  expect(got.length, "lines in log.txt").to.equal(expected.split("\n").filter(Boolean).length);
  // (command output arrives without its final newline: the byte-exact comparison is by hash)
  expect(log.trimEnd(), "log.txt equals what the writers reported, in order").to.equal(expected.trimEnd());
  const sum = (await onHost(h, `sha256sum < ${mountPath}/log.txt | cut -c1-64`)).stdout.trim();
  expect(sum, "log.txt byte for byte").to.equal(crypto.createHash("sha256").update(expected).digest("hex"));
  const sums = (await onHost(h, `cd ${mountPath} && for f in data-*.bin; do [ -e "$f" ] && echo "$f $(sha256sum < "$f" | cut -c1-64)"; done; true`)).stdout;
  const have = new Map(sums.split("\n").filter(Boolean).map((l) => l.split(" ") as [string, string]));
  const want = new Map(journals.flatMap((j) => [...j.data]));
  expect(Object.fromEntries(have)).to.deep.equal(Object.fromEntries(want));
}

/**
 * Starts a periodic backup run and stops it (SIGSTOP to its processes) right after it took and
 * mounted its lvm2 snapshot, so that its data predates whatever comes next. (`systemctl freeze`
 * refuses a oneshot unit that is still starting.) Returns the run's invocation id.
 */
async function freezePeriodicBackup(h: LabHost): Promise<string> {
  const r = await onHost(h, `systemctl start --no-block ${backupUnit}
for i in $(seq 1 600); do mountpoint -q /run/dboxed-volumes/${volumeId}/snapshot && break; sleep 0.1; done
mountpoint -q /run/dboxed-volumes/${volumeId}/snapshot || { echo "the periodic run mounted no snapshot" >&2; exit 1; }
systemctl kill --signal=SIGSTOP ${backupUnit}
systemctl show -p InvocationID --value ${backupUnit}`, { timeoutMs: 120_000 });
  return r.stdout.trim();
}

/**
 * While a pulumi run goes on: waits until the volume is read-only on h, checks that the
 * stopped periodic run is still active at that moment, then lets it go on. Returns
 * true once that was seen.
 */
async function thawWhenReadOnly(h: LabHost, invocation: string, done: () => boolean): Promise<boolean> {
  for (let i = 0; i < 900 && !done(); i++) {
    const r = await onHost(h, `findmnt -n -o OPTIONS --mountpoint ${mountPath} | tr , '\\n' | grep -qx ro && echo RO || echo RW
systemctl show -p ActiveState -p InvocationID --value ${backupUnit} | tr '\\n' ' '; echo
ps -o stat= -p "$(systemctl show -p MainPID --value ${backupUnit})"`, { allowFailure: true });
    const [mode, state, stat] = r.stdout.trim().split("\n");
    if (mode === "RO") {
      const [active, id] = (state ?? "").trim().split(/\s+/);
      expect(id, "the periodic run caught in progress is still the same run").to.equal(invocation);
      expect(active).to.equal("activating");
      expect((stat ?? "").trim(), "the periodic run is still stopped").to.match(/^T/);
      await onHost(h, `systemctl kill --signal=SIGCONT ${backupUnit}`);
      return true;
    }
    await sleep(500);
  }
  await onHost(h, `systemctl kill --signal=SIGCONT ${backupUnit} 2>/dev/null; true`, { allowFailure: true });
  return false;
}

describe("final backups are final (real pulumi, lab hosts, a writer and a periodic backup in progress)", function () {
  let stack: Stack;
  stepByStep(this, () => stack.run(["destroy", "--yes", "--skip-preview"]));
  let h1: LabHost, h2: LabHost;
  const base = { volumeId, size: "320MiB", mountPath, backupSchedule: "*:*:0/20", backupRandomDelay: 3, stopUnits: [writer] };
  const input = (host: number, extra: Record<string, unknown> = {}, hostOverride?: Record<string, unknown>) => ({
    provider: { s3: { prefix } },
    volumes: [{ name: "f", host, hostOverride, args: { ...base, ...extra } }],
  });

  /** Runs pulumi up while the frozen periodic run is thawed once the volume went read-only on h. */
  async function upWithPeriodicRunInProgress(h: LabHost, inp: Record<string, unknown>) {
    const invocation = await freezePeriodicBackup(h);
    let finished = false;
    const run = stack.up(inp).then((r) => { finished = true; return r; });
    const seen = await thawWhenReadOnly(h, invocation, () => finished);
    const res = await run;
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(seen, "the periodic run was active when the volume became read-only for the final backup").to.equal(true);
    expect(res.stdout).to.match(/waiting for a periodic backup in progress/);
    return res;
  }

  before(async () => {
    [h1, h2] = lab().hosts;
    await installWriter(h1);
    await installWriter(h2);
    stack = new Stack("final", "volumes");
    await stack.init();
  });

  it("creates the volume on host-1 and starts the writer", async () => {
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    await onHost(h1, `systemctl start ${writer}`);
    await sleep(3000);
    await expectWriting(h1);
  });

  it("the final backup's own checks refuse a snapshot that differs from the volume, and a run that did not read it read-only", async () => {
    // The nets under the wait for a periodic run: each made to catch what it is for, on the live volume.
    const l = layoutFor({ volumeId, mountPath, filesystem: "ext4" });
    const r = await Remote.connect({ address: h1.address, port: h1.port, user: h1.user, hostKey: h1.hostKey, privateKey: fs.readFileSync(h1.privateKeyPath, "utf8") });
    const log = () => undefined;
    try {
      // The writer has appended since the latest snapshot: verification sees the difference.
      const snaps = await steps.listSnapshots(r, l);
      let err = await steps.verifySnapshot(r, l, snaps[snaps.length - 1].id, log).then(() => undefined, (e: Error) => e);
      expect(err?.message).to.match(/does not match the read-only volume; nothing was removed:[\s\S]*log\.txt/);
      // A backup run that ignores the final request (its service made a no-op: the status left is an
      // earlier run's, ok but without the request's nonce) is not taken for the final backup.
      // No real run may be going meanwhile: one started before the no-op that reads the request
      // after the remount is a real final backup (the check rightly takes it), not this case.
      await onHost(h1, `systemctl stop ${timerUnit}
${untilInactive(backupUnit)}
systemctl stop ${writer} && mount -o remount,ro ${mountPath}
mkdir -p /run/systemd/system/${backupUnit}.d
printf '[Service]\\nExecStart=\\nExecStart=/bin/true\\n' > /run/systemd/system/${backupUnit}.d/no-op.conf
systemctl daemon-reload`);
      try {
        err = await steps.finalBackup(r, l, log).then(() => undefined, (e: Error) => e);
        expect(err?.message).to.match(/the backup that ran is not the final one/);
      } finally {
        await onHost(h1, `rm -rf /run/systemd/system/${backupUnit}.d && systemctl daemon-reload
rm -f /var/lib/dboxed-volumes/${volumeId}/final-request
mount -o remount,rw ${mountPath} && systemctl start ${writer} ${timerUnit}`);
      }
    } finally {
      r.dispose();
    }
    await sleep(2000);
    await expectWriting(h1);
  });

  it("a move waits for the periodic backup in progress and carries the writer's last lines", async () => {
    await upWithPeriodicRunInProgress(h1, input(1));
    await sleep(2000); // the writer runs on host-2 now
    await onHost(h2, `systemctl stop ${writer}`);
    await expectWritersState(h2, [await writerJournal(h1), await writerJournal(h2)]);
    const gone = await onHost(h1, `lvs --noheadings -o lv_name 2>/dev/null | grep -c ${volumeId} || true; systemctl is-active ${writer} || true`);
    expect(gone.stdout.trim().split("\n")).to.deep.equal(["0", "inactive"]);
  });

  it("a rebuild (ext4 -> xfs, forgetSnapshotsOnDelete: true) waits for the periodic run and keeps every line", async () => {
    await onHost(h2, `systemctl start ${writer}`);
    await sleep(3000);
    await expectWriting(h2);
    const res = await upWithPeriodicRunInProgress(h2, input(1, { filesystem: "xfs", forgetSnapshotsOnDelete: true }));
    expect(res.stdout).to.match(/verified snapshot \w+ against the read-only volume/);
    expect(res.stdout).to.not.match(/forgetting/);
    expect((await onHost(h2, `findmnt -n -o FSTYPE ${mountPath}`)).stdout.trim()).to.equal("xfs");
    await sleep(2000); // the writer was started again on the new filesystem
    await onHost(h2, `systemctl stop ${writer}`);
    await expectWritersState(h2, [await writerJournal(h1), await writerJournal(h2)]);
  });

  it("the same host reached at another address (localhost) is not a move; its next scheduled backup succeeds", async () => {
    const before = (await stack.outputs()).volumes.f;
    // (forgetSnapshotsOnDelete goes back to false here, for the delete below)
    const res = await stack.up(input(1, { filesystem: "xfs" }, { address: "localhost" }));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(res.stdout).to.match(/is now reached as root@localhost:\d+ \(same host key\): not a move/);
    expect(res.stdout).to.not.match(/final backup on |waiting for a periodic backup/);
    const after = (await stack.outputs()).volumes.f;
    expect(after.lastMove).to.deep.equal(before.lastMove);
    const since = Math.floor(Date.now() / 1000);
    let status: any = {};
    // After the rebuild no backup has run yet until the timer's first one: no status.json then.
    for (let i = 0; i < 30 && !(status.startedAt >= since && status.status !== "running"); i++) {
      await sleep(3000);
      status = JSON.parse((await onHost(h2, `cat /var/lib/dboxed-volumes/${volumeId}/status.json 2>/dev/null || echo '{}'`)).stdout);
    }
    const timer = status.startedAt >= since ? "" : (await onHost(h2, `systemctl list-timers --all --no-pager 'dboxed-volume-${volumeId}*'; journalctl -u 'dboxed-volume-${volumeId}-backup*' -n 20 --no-pager -o short-precise`)).stdout;
    expect(status.startedAt, `a scheduled backup ran\n${timer}`).to.be.at.least(since);
    expect(status.status, status.message).to.equal("ok");
  });

  let lastState: Awaited<ReturnType<typeof manifest>>;
  let journals: Awaited<ReturnType<typeof writerJournal>>[];

  it("a delete waits for the periodic run, verifies its final snapshot and leaves the host clean", async () => {
    await onHost(h2, `systemctl start ${writer}`);
    await sleep(2000);
    const invocation = await freezePeriodicBackup(h2);
    await sleep(2000); // the writer goes on after the periodic snapshot was taken
    await onHost(h2, `systemctl stop ${writer}`);
    journals = [await writerJournal(h1), await writerJournal(h2)];
    lastState = await manifest(h2, mountPath);
    let finished = false;
    const run = stack.up({ provider: { s3: { prefix } }, volumes: [] }).then((r) => { finished = true; return r; });
    const seen = await thawWhenReadOnly(h2, invocation, () => finished);
    const res = await run;
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(seen).to.equal(true);
    expect(res.stdout).to.match(/waiting for a periodic backup in progress/);
    expect(res.stdout).to.match(/verified snapshot \w+ against the read-only volume/);
    const left = await onHost(h2, `ls /etc/systemd/system | grep -c dboxed-volume-${volumeId} || true
mountpoint -q ${mountPath} && echo MOUNTED || echo unmounted
lvs --noheadings 2>/dev/null | grep -c ${volumeId} || true
ls /var/lib/dboxed-volumes/${volumeId} /etc/dboxed-volumes/${volumeId} 2>/dev/null | wc -l
losetup -a | grep -c ${volumeId} || true`);
    expect(left.stdout.trim().split("\n")).to.deep.equal(["0", "unmounted", "0", "0", "0"]);
  });

  it("recreated from the repository, the volume holds the writer's last state byte for byte", async () => {
    // Hourly from here: a timer firing every 20 s would, on a slow machine, let retention
    // (keepLast 2) forget the restored snapshot before the chain is looked at.
    const res = await stack.up(input(0, { filesystem: "xfs", forgetSnapshotsOnDelete: true, backupSchedule: "hourly" }));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(res.stdout).to.match(/restoring snapshot/);
    await expectWritersState(h1, journals);
    const now = await manifest(h1, mountPath);
    expect(now.entries).to.deep.equal(lastState.entries);
    expect(now.root).to.equal(lastState.root);
    const o = (await stack.outputs()).volumes.f;
    const snaps = parseSnapshots((await onHost(h1, `/usr/local/lib/dboxed-volumes/rustic -P /etc/dboxed-volumes/${volumeId}/rustic --no-progress snapshots --json -g '' --filter-host dboxed-volume-${volumeId}`)).stdout);
    // The first snapshot after the restored one (later ones may come from the timer already).
    const at = snaps.findIndex((s) => s.id === o.restoredFrom);
    expect(at, "the restored snapshot is in the repository").to.be.at.least(0);
    expect(snaps[at + 1]?.parent, "the new host continues the same incremental chain").to.equal(o.restoredFrom);
  });

  it("one owner per volume id: another stack declaring it on the same host is refused, naming the owner", async () => {
    const intruder = new Stack("final-intruder", "volumes");
    await intruder.init();
    const res = await intruder.up({ provider: { s3: { prefix } }, volumes: [{ name: "g", host: 0, args: { ...base, mountPath: "/srv/intruder" } }] });
    expect(res.code).to.not.equal(0);
    expect(res.stdout + res.stderr).to.match(new RegExp(`volume ${volumeId} is held by host 127\\.0\\.0\\.1:${h1.port} \\(this very host\\) for resource "f" of stack [\\w-]+/final`));
    const untouched = await onHost(h1, `mountpoint -q /srv/intruder && echo MOUNTED || echo no; findmnt -n -o FSTYPE ${mountPath}`);
    expect(untouched.stdout.trim().split("\n")).to.deep.equal(["no", "xfs"]);
  });

  it("destroy with forgetSnapshotsOnDelete: true forgets the volume's snapshots and releases the id", async () => {
    const destroy = await stack.run(["destroy", "--yes", "--skip-preview"]);
    expect(destroy.code, destroy.stdout + destroy.stderr).to.equal(0);
    expect(destroy.stdout).to.match(/forgetting \d+ snapshot/);
    const l = lab();
    const out = await runLocalRustic({ localPath: l.tools.rustic }, {
      endpoint: l.s3.endpoint, region: l.s3.region, bucket: l.s3.bucket, prefix, forcePathStyle: true,
      accessKeyId: l.s3.accessKeyId, secretAccessKey: l.s3.secretAccessKey, password: "lab-repository-password-1",
    }, ["snapshots", "--json", "-g", "", "--filter-host", `dboxed-volume-${volumeId}`]);
    expect(parseSnapshots(out)).to.have.length(0);
  });
});
