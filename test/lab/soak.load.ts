// Load held for SOAK_MINUTES (default 30): twelve volumes on three hosts back up into one
// repository every 2 minutes while a writer on each rewrites its files, with retention
// forgetting old snapshots and the repository's prune and check (each at most one host at a
// time, by the maintenance lease; never both at once) due every 5 and 2 minutes. Afterwards the repository
// passes `rustic check --read-data`, every volume's latest snapshot restores to its writer's
// data, older ones restore to self-consistent trees, prune runs never overlapped, and the
// repository shrank after prunes. Its own script (npm run soak): about 50 minutes of lab time.
// (On the 2-core machine's emulated guests a prune or a check under this load takes 4 to 6
// minutes at Nice=19, and they never run at once: 20 minutes held one prune and two checks.)
import { expect } from "chai";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { ListObjectsV2Command } from "@aws-sdk/client-s3";
import { lab, onHost, Stack, stepByStep } from "./harness";
import { manifest } from "./manifest";
import { s3Client } from "../../provider/storage/s3";
import { parseSnapshots } from "../../provider/host/rustic";

const prefix = `soak-${crypto.randomBytes(3).toString("hex")}`;
const tag = crypto.randomBytes(2).toString("hex");
const N = 12;
const MINUTES = Number(process.env.SOAK_MINUTES ?? 30);
const ids = Array.from({ length: N }, (_, i) => `sk-${tag}-${i}`);
const mount = (i: number) => `/srv/soak-${i}`;
const host = (i: number) => lab().hosts[i % 3];
const writer = (i: number) => `soak-writer-${i}.service`;
type Run = { host: string; task: string; run: number; start?: number; end?: number; ok?: boolean };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const rustic = (id: string, args: string) => `/usr/local/lib/dboxed-volumes/rustic -P /etc/dboxed-volumes/${id}/rustic --no-progress ${args}`;

// Every file the writer writes carries the sha256 of the lines above its last one in that line,
// and is renamed into place: any crash-consistent snapshot holds only whole, matching files.
const selfCheck = (dir: string) => `bad=0; n=0
for f in ${dir}/f-*; do case "$f" in *.tmp) continue;; esac; n=$((n+1))
  [ "$(head -n -1 "$f" | sha256sum | cut -c1-64)" = "$(tail -n 1 "$f" | cut -d' ' -f2)" ] || { echo "BAD $f"; bad=$((bad+1)); }
done; echo "files=$n bad=$bad"`;

/** The repository's pack files (data/): key -> bytes. */
async function packFiles(): Promise<Map<string, number>> {
  const s = { ...lab().s3, prefix, forcePathStyle: true };
  const c = s3Client(s);
  const out = new Map<string, number>();
  let token: string | undefined;
  do {
    const r = await c.send(new ListObjectsV2Command({ Bucket: s.bucket, Prefix: `${prefix}/data/`, ContinuationToken: token }));
    for (const o of r.Contents ?? []) if (o.Size) out.set(o.Key!, o.Size);
    token = r.IsTruncated ? r.NextContinuationToken : undefined;
  } while (token);
  c.destroy();
  return out;
}
const bytesOf = (m: Map<string, number>) => [...m.values()].reduce((a, b) => a + b, 0);
/** Pack files in a that b no longer has: how many, how many bytes. */
function deletedPacks(a: Map<string, number>, b: Map<string, number>) {
  const gone = [...a.keys()].filter((k) => !b.has(k));
  return { packs: gone.length, bytes: gone.reduce((t, k) => t + a.get(k)!, 0) };
}

async function repositoryBytes(): Promise<number> {
  const s = { ...lab().s3, prefix, forcePathStyle: true };
  const c = s3Client(s);
  let total = 0, token: string | undefined;
  do {
    const r = await c.send(new ListObjectsV2Command({ Bucket: s.bucket, Prefix: `${prefix}/`, ContinuationToken: token }));
    for (const o of r.Contents ?? []) total += o.Size ?? 0;
    token = r.IsTruncated ? r.NextContinuationToken : undefined;
  } while (token);
  c.destroy();
  return total;
}

describe(`soak: twelve volumes on three hosts, one repository, ${MINUTES} minutes of backups, prunes and checks`, function () {
  let stack: Stack;
  let t0 = 0;
  const sizes: number[] = [];
  const figures: Record<string, unknown> = {};
  const input = () => ({
    provider: { s3: { prefix }, retention: { keepLast: 3, keepHourly: 0, keepDaily: 0, keepWeekly: 0, keepMonthly: 0, keepYearly: 0 },
      // A prune under this load takes minutes; due every 2 minutes it left no gap for a check
      // (a check gives way to a live prune), so prunes come less often than checks here.
      maintenance: { pruneInterval: 300, checkInterval: 120, checkSubsets: 4, keepDelete: "5m" } },
    volumes: ids.map((volumeId, i) => ({ name: `k${i}`, host: i % 3,
      args: { volumeId, size: "64MiB", mountPath: mount(i), backupSchedule: "*:0/2", backupRandomDelay: 60 } })),
  });
  stepByStep(this, async () => { await stack?.run(["destroy", "--yes", "--skip-preview"]); });

  it("creates the twelve volumes and starts a writer on each", async () => {
    stack = new Stack("soak", "volumes");
    await stack.init();
    const res = await stack.up(input());
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    await Promise.all([0, 1, 2].map((h) => onHost(lab().hosts[h], ids.map((_, i) => i % 3 !== h ? "" : `cat > /etc/systemd/system/${writer(i)} <<'UNIT'
[Unit]
RequiresMountsFor=${mount(i)}
[Service]
ExecStart=/bin/bash -c 'mkdir -p ${mount(i)}/w; n=0; while true; do f=${mount(i)}/w/f-$((n % 25)); head -c $((20000 + RANDOM)) /dev/urandom | base64 > $f.tmp; echo "sum $(sha256sum < $f.tmp | cut -c1-64)" >> $f.tmp; mv $f.tmp $f; n=$((n+1)); sleep 2; done'
UNIT`).filter(Boolean).join("\n") + `\nsystemctl daemon-reload\nsystemctl start ${ids.map((_, i) => i % 3 === h ? writer(i) : "").filter(Boolean).join(" ")}`)));
    t0 = Math.floor(Date.now() / 1000);
  });

  // The load's figures are judged after the read-back checks (the data's integrity comes first).
  let load: { done: number; failed: number; why: string[]; prunes: Run[]; checks: Run[]; runs: Run[] } | undefined;

  it(`holds the load for ${MINUTES} minutes (figures judged in the last step)`, async () => {
    const end = Date.now() + MINUTES * 60_000;
    // Pack files deleted while the writers ran (the total size grows meanwhile and hides them).
    let packs = await packFiles();
    const deletedDuringLoad = { packs: 0, bytes: 0 };
    const sample = async () => {
      sizes.push(await repositoryBytes());
      const now = await packFiles();
      const d = deletedPacks(packs, now);
      deletedDuringLoad.packs += d.packs; deletedDuringLoad.bytes += d.bytes;
      packs = now;
    };
    while (Date.now() < end) {
      await sample();
      await sleep(30_000);
    }
    await sample();
    figures.packsDeletedDuringLoad = deletedDuringLoad;
    const since = `--since=@${t0}`;
    const counts = await Promise.all(lab().hosts.map((h) => onHost(h, `echo "host $(hostname)"

echo "done $(journalctl ${since} -u 'dboxed-volume-sk-${tag}-*-backup.service' -o cat --no-pager | grep -c 'backup of .* done' || true)"
echo "failed $(journalctl ${since} -u 'dboxed-volume-sk-${tag}-*-backup.service' -o cat --no-pager | grep -c '^dboxed-volume: ' || true)"
journalctl ${since} -u 'dboxed-volume-sk-${tag}-*-backup.service' -o cat --no-pager | grep '^dboxed-volume: ' | sort | uniq -c | sort -rn | head -n 5 | sed 's/^/why /'
journalctl ${since} -u 'dboxed-volume-sk-${tag}-*-maintain.service' -o short-unix --no-pager | grep -E 'maintenance (prune|check): run [0-9]+' | sed 's/^/maint /'`)));
    let done = 0, failed = 0;
    const why: string[] = [];
    const runs: Run[] = [];
    for (const c of counts) {
      let hostName = "";
      for (const line of c.stdout.split("\n")) {
        if (line.startsWith("host ")) hostName = line.slice(5);
        if (line.startsWith("done ")) done += Number(line.slice(5));
        if (line.startsWith("failed ")) failed += Number(line.slice(7));
        if (line.startsWith("why ")) why.push(line.slice(4).trim());
        const m = /^maint (\d+\.\d+) .*maintenance (prune|check): run (\d+)(.*)$/.exec(line);
        if (m) {
          const [, at, task, run, rest] = m;
          let r = runs.find((x) => x.host === hostName && x.task === task && x.run === Number(run));
          if (!r) runs.push(r = { host: hostName, task, run: Number(run) });
          if (/started/.test(rest)) r.start = Number(at);
          // A run stopped because its lease was lost ("stopped after") ended too, not ok.
          if (/ ok in | FAILED| stopped after /.test(rest)) { r.end = Number(at); r.ok = / ok in /.test(rest); }
        }
      }
    }
    const prunes = runs.filter((r) => r.task === "prune"), checks = runs.filter((r) => r.task === "check");
    Object.assign(figures, { minutes: MINUTES, backupsDone: done, backupsFailed: failed, failureReasons: why,
      prunes: prunes.length, prunesFailed: prunes.filter((r) => r.ok === false).length, checks: checks.length,
      checksFailed: checks.filter((r) => r.ok === false).length, repositoryBytesMax: Math.max(...sizes), repositoryBytesEnd: sizes[sizes.length - 1] });
    console.log(`      figures: ${JSON.stringify(figures)}`);
    load = { done, failed, why, prunes, checks, runs };
  });

  it("afterwards: check --read-data passes; latest snapshots equal the writers' data; older ones are whole", async () => {
    // The writers stop, then each volume gets a backup of its own: a timer-started run still
    // going is waited for first (`systemctl start` would join it, and its snapshot may predate
    // the writer's stop), and the new run must have started after the stop.
    const stopped = await Promise.all([0, 1, 2].map((h) => onHost(lab().hosts[h], `systemctl stop ${ids.map((_, i) => i % 3 === h ? writer(i) : "").filter(Boolean).join(" ")}
stopped=$(date +%s); echo "stopped $stopped"
for id in ${ids.filter((_, i) => i % 3 === h).join(" ")}; do
  systemctl stop dboxed-volume-$id-backup.timer
  while case "$(systemctl show -p ActiveState --value dboxed-volume-$id-backup.service)" in activating|active|deactivating|reloading) true ;; *) false ;; esac; do sleep 2; done
  systemctl start dboxed-volume-$id-backup.service
  echo "$id $(grep -o '"startedAt":[0-9]*' /var/lib/dboxed-volumes/$id/status.json | cut -d: -f2) $(grep -o '"status":"[a-z]*"' /var/lib/dboxed-volumes/$id/status.json | cut -d'"' -f4)"
done
# The maintenance those backups started finishes before the repository is read whole.
sleep 2; while systemctl list-units --no-legend --state=activating,active 'dboxed-volume-sk-${tag}-*-maintain.service' | grep -q .; do sleep 2; done`, { timeoutMs: 1_800_000 })));
    expect(stopped.map((r) => [...r.stdout.matchAll(/^sk-\S+ /gm)].length).reduce((a, b) => a + b), stopped.map((r) => r.stdout).join("\n")).to.equal(N);
    for (const r of stopped) {
      const at = Number(/^stopped (\d+)$/m.exec(r.stdout)![1]);
      for (const m of r.stdout.matchAll(/^(sk-\S+) (\d*) (\w*)$/gm)) {
        expect(Number(m[2]), `${m[1]}: its last backup started after its writer stopped`).to.be.at.least(at);
        expect(m[3], `${m[1]}: its last backup`).to.equal("ok");
      }
    }
    sizes.push(await repositoryBytes());
    // A prune marks the packs only forgotten snapshots used and deletes them in a later prune, once
    // keepDelete (5 min) has passed: with the writers stopped, one more prune after that shows
    // the space retention freed leave the repository. (Then the read-back below checks the result.)
    const lastPrune = Math.max(...(await Promise.all(lab().hosts.map((h) => onHost(h,
      `journalctl --since=@${t0} -u 'dboxed-volume-sk-${tag}-*-maintain.service' -o short-unix --no-pager | grep -E 'maintenance prune: run [0-9]+ (ok|FAILED)' | tail -n1 | cut -d' ' -f1`))))
      .map((r) => Number(r.stdout.trim() || 0)));
    const wait = lastPrune * 1000 + 310_000 - Date.now();
    if (wait > 0) await sleep(wait);
    const before = await packFiles();
    const bytesBefore = await repositoryBytes();
    const run = await onHost(host(0), `unit=dboxed-volume-${ids[0]}-maintain.service; since=$(date +%s)
systemctl start $unit
journalctl --since=@$since -u $unit -o cat --no-pager | grep -E 'maintenance (prune|check): run [0-9]+ (ok|FAILED)' || true`, { timeoutMs: 1_800_000 });
    expect(run.stdout, "the prune after keepDelete").to.match(/maintenance prune: run \d+ ok/);
    const after = await packFiles();
    const bytesAfter = await repositoryBytes();
    sizes.push(bytesAfter);
    const finalPrune = { ...deletedPacks(before, after), repositoryBytesBefore: bytesBefore, repositoryBytesAfter: bytesAfter, packBytesBefore: bytesOf(before), packBytesAfter: bytesOf(after) };
    figures.finalPrune = finalPrune;
    console.log(`      the prune after keepDelete: ${JSON.stringify(finalPrune)}`);
    expect(finalPrune.packs, "pack files deleted by the prune after keepDelete").to.be.greaterThan(0);
    expect(bytesAfter, "repository bytes after that prune").to.be.lessThan(bytesBefore);
    const check = await onHost(host(0), rustic(ids[0], "check --read-data"), { allowFailure: true, timeoutMs: 1_800_000 });
    expect(check.code, check.stdout + check.stderr).to.equal(0);
    figures.checkReadData = "ok";
    let olderChecked = 0;
    for (let i = 0; i < N; i++) {
      const h = host(i), id = ids[i];
      const snaps = parseSnapshots((await onHost(h, rustic(id, `snapshots --json -g '' --filter-host dboxed-volume-${id}`))).stdout);
      expect(snaps.length, id).to.be.at.least(2);
      // Retention kept at most keepLast (3) plus the one a run may have added since its forget.
      expect(snaps.length, id).to.be.at.most(4);
      const latest = snaps[snaps.length - 1];
      await onHost(h, `rm -rf /root/soak-v && mkdir -p /root/soak-v && ${rustic(id, `restore --numeric-id ${latest.id} /root/soak-v`)}`, { timeoutMs: 600_000 });
      expect((await manifest(h, "/root/soak-v/w")).entries, id).to.deep.equal((await manifest(h, `${mount(i)}/w`)).entries);
      for (const s of snaps.slice(0, -1)) {
        await onHost(h, `rm -rf /root/soak-o && mkdir -p /root/soak-o && ${rustic(id, `restore --numeric-id ${s.id} /root/soak-o`)}`, { timeoutMs: 600_000 });
        const r = await onHost(h, selfCheck("/root/soak-o/w"));
        expect(r.stdout.trim(), `${id} snapshot ${s.id.slice(0, 8)}`).to.match(/files=\d+ bad=0$/);
        olderChecked++;
      }
    }
    await Promise.all(lab().hosts.map((h) => onHost(h, "rm -rf /root/soak-v /root/soak-o")));
    figures.olderSnapshotsChecked = olderChecked;
    const file = path.join(lab().dir, "soak-figures.json");
    fs.writeFileSync(file, JSON.stringify({ ...figures, sizes }, null, 2));
    console.log(`      figures: ${JSON.stringify(figures)} (also in ${file})`);
  });

  it("the load's figures: every volume backed up repeatedly without failure, prune and check ran several times, never two at once, the repository shrank", async () => {
    const { done, failed, why, prunes, checks, runs } = load!;
    expect(done, "backups done").to.be.at.least(N * 3);
    // A backup that fails is reported (journal, status, metric); under this load none should.
    expect(failed, why.join("\n")).to.equal(0);
    expect(prunes.length).to.be.at.least(2);
    expect(checks.length).to.be.at.least(2);
    // Runs still going when the load ended have no result yet.
    expect(runs.filter((r) => r.end !== undefined).every((r) => r.ok === true), JSON.stringify(runs)).to.equal(true);
    // At most one host at a time: each run number once (a number is taken by compare-and-swap),
    // and the runs of a task never overlap (host clocks are set from this machine's at boot).
    for (const list of [prunes, checks]) {
      const sorted = list.filter((r) => r.start !== undefined).sort((a, b) => a.start! - b.start!);
      expect(new Set(list.map((r) => r.run)).size, JSON.stringify(list)).to.equal(list.length);
      for (let k = 1; k < sorted.length; k++) expect(sorted[k].start!, JSON.stringify(sorted)).to.be.at.least(sorted[k - 1].end ?? Infinity);
    }
    // Forgotten snapshots' data was deleted by a prune: the repository shrank at some point.
    const falls = sizes.slice(1).filter((x, k) => x < sizes[k]).length;
    expect(falls, `repository sizes: ${sizes.join(", ")}`).to.be.greaterThan(0);
  });

  it("deletes all twelve in one pulumi up", async () => {
    const res = await stack.up({ provider: input().provider, volumes: [] });
    expect(res.code, res.stdout + res.stderr).to.equal(0);
  });
});
