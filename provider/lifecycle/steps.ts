// The host steps of a volume's life. Each one is safe to run again after being cut off:
// it looks at what is there and does only what is missing.
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { CommandError, UserError } from "../errors";
import { formatSize, VolumeInputs } from "../inputs";
import { repositoryMasterKey, runLocalRustic } from "./localRustic";
import { AGENT_PATH, imageBytes, layoutFor, METRICS_DIR, RUSTIC_PATH, snapshotBytes, VolumeLayout, volumeEnv } from "../host/layout";
import { ensureFilesystemScript } from "../host/fs";
import { ensureStorageScript, growScript, STORAGE_MADE, lvsArgv, parseLvs, removeStorageScript } from "../host/lvm";
import { diffArgs, parseDiff, parseSnapshots, profileToml, restoreArgs, rusticArgv, Snapshot, snapshotsArgs } from "../host/rustic";
import { command, quote as q } from "../host/shell";
import { UNIT_DIR, unitFiles, unitsCommand } from "../host/systemd";
import { Remote } from "../remote/ssh";
import { backupMarksListUrl, leaseUrl, maintenanceUrl, readMaintenance } from "../storage/lease";

export type Log = (msg: string) => void;

export function layout(v: VolumeInputs): VolumeLayout {
  return layoutFor(v);
}

function agentScript(): string {
  // dist/provider/lifecycle -> dist/provider/host/agent.sh (copied by the build), or the source tree.
  for (const p of [path.join(__dirname, "..", "host", "agent.sh"), path.join(__dirname, "..", "..", "..", "provider", "host", "agent.sh")]) {
    if (fs.existsSync(p)) return fs.readFileSync(p, "utf8");
  }
  throw new Error("agent.sh is missing from the installed package");
}

const sha256 = (data: string | Buffer) => crypto.createHash("sha256").update(data).digest("hex");

/** Checks the host can carry the volume before anything is changed on it. */
/** The shortest interval of each host's schedules, as the pre-flight measured it (for the default random delay). */
const scheduleGaps = new Map<string, number | undefined>();

/** backupRandomDelay, or by default 2 minutes, or half the schedule's shortest interval when that is less. */
export function effectiveRandomDelay(delay: number | undefined, gapSeconds: number | undefined): number {
  if (delay !== undefined) return delay;
  return gapSeconds === undefined ? 120 : Math.min(120, Math.floor(gapSeconds / 2));
}

export async function preflight(r: Remote, v: VolumeInputs, l: VolumeLayout, opts: { readOnly?: boolean } = {}): Promise<void> {
  const mkfs = v.filesystem === "xfs" ? "mkfs.xfs" : "mkfs.ext4";
  // attr and acl: the manifests that verify moves read xattrs and ACLs with them.
  const pkgs = v.filesystem === "xfs" ? "lvm2 xfsprogs attr acl" : "lvm2 e2fsprogs attr acl";
  const res = await r.run(`
missing=""
for c in lvcreate losetup blkid systemctl mount flock findmnt getfattr getfacl ${mkfs}; do command -v "$c" >/dev/null 2>&1 || missing="$missing $c"; done
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
${opts.readOnly ? `  missing="" # read-only: apt-get installs them on the real run; the other checks go on` : `  DEBIAN_FRONTEND=noninteractive apt-get install -y -q ${pkgs} >/dev/null 2>&1 || true
  missing=""
  for c in lvcreate losetup blkid systemctl mount flock findmnt getfattr getfacl ${mkfs}; do command -v "$c" >/dev/null 2>&1 || missing="$missing $c"; done`}
fi
[ -z "$missing" ] || { echo "missing commands:$missing (install ${pkgs})"; exit 31; }
# The agent reads bash 5's clocks (EPOCHSECONDS, EPOCHREALTIME).
bv=$(bash -c 'echo "\${BASH_VERSINFO[0]}"' 2>/dev/null) || bv=""
[ "\${bv:-0}" -ge 5 ] 2>/dev/null || { echo "bash \${bv:-(none)}"; exit 37; }
${opts.readOnly ? "" : `modprobe dm_snapshot >/dev/null 2>&1 || true
modprobe loop >/dev/null 2>&1 || true`}
grep -q device-mapper /proc/misc ${opts.readOnly ? "|| modinfo dm_mod >/dev/null 2>&1 " : ""}|| { echo "the kernel has no device-mapper"; exit 32; }
systemd-analyze calendar -- ${q(v.backupSchedule)} >/dev/null 2>&1 || { echo "systemd rejects the schedule"; exit 33; }
# The shortest gap between the next five backups: a random delay must be shorter.
gap=$(TZ=UTC systemd-analyze calendar --iterations=5 -- ${q(v.backupSchedule)} 2>/dev/null | sed -En 's/^ *(Next elapse|Iter[.] #[0-9]+): //p' |
  while read -r t; do date -d "$t" +%s; done | awk 'NR > 1 && (min == "" || $1 - prev < min) { min = $1 - prev } { prev = $1 } END { print min }')
echo "schedule-gap=$gap"
${v.backupRandomDelay ? `if [ -n "$gap" ] && [ "$gap" -le ${v.backupRandomDelay} ]; then exit 36; fi` : ""}
if mountpoint -q ${q(v.mountPath)}; then
  src=$(findmnt -n -o SOURCE --target ${q(v.mountPath)})
  [ "$(readlink -f "$src")" = "$(readlink -f ${q(l.device)} 2>/dev/null || echo none)" ] || { echo "$src"; exit 34; }
elif [ -d ${q(v.mountPath)} ] && [ -n "$(ls -A ${q(v.mountPath)} 2>/dev/null)" ] && [ ! -e ${q(l.stateDir + "/formatted")} ]; then
  exit 35
fi
exit 0`, { allowFailure: true });
  const gapMatch = /schedule-gap=(\d*)/.exec(res.stdout);
  const gap = gapMatch && gapMatch[1] ? Number(gapMatch[1]) : undefined;
  const out = (res.stdout + res.stderr).replace(/schedule-gap=\d*\n?/, "").trim();
  switch (res.code) {
    case 0: scheduleGaps.set(`${r.name}|${v.backupSchedule}`, gap); return;
    case 30: throw new UserError(`host ${r.name}: need root or passwordless sudo (host.user)`);
    case 31: throw new UserError(`host ${r.name}: ${out}`);
    case 32: throw new UserError(`host ${r.name}: the kernel has no device-mapper, which lvm2 snapshots need`);
    case 37: throw new UserError(`host ${r.name}: the volume agent needs bash 5 or later, found ${out}: upgrade bash`);
    case 33: throw new UserError(`backupSchedule: systemd on ${r.name} rejects "${v.backupSchedule}" (check with: systemd-analyze calendar '${v.backupSchedule}')`);
    case 36: throw new UserError(`backupRandomDelay: ${v.backupRandomDelay} s is not shorter than the ${gap} s between backups of ` +
      `backupSchedule "${v.backupSchedule}": set backupRandomDelay below ${gap} (0 for none)`);
    case 34: throw new UserError(`mountPath: ${v.mountPath} on ${r.name} is already a mount point of ${out}: choose another mountPath`);
    case 35: throw new UserError(`mountPath: ${v.mountPath} on ${r.name} is a directory that is not empty: choose another mountPath or empty it`);
    default: throw new CommandError(r.name, "preflight", res.code, res.signal, res.stdout, res.stderr);
  }
}

/** Installs in progress in this process, by host: volumes created together on one host share one. */
const installing = new Map<string, Promise<void>>();

/**
 * Installs the host agent and the rustic binary when missing or different. Volumes on one host
 * share these files: one install runs at a time per host (a host-wide lock, also across pulumi
 * processes), each file is renamed into place whole, and concurrent callers in this process wait
 * for the same install instead of uploading the binary again.
 */
export async function installTools(r: Remote, v: VolumeInputs, log: Log): Promise<void> {
  const key = `${r.name} ${"localPath" in v.rustic ? v.rustic.localPath : v.rustic.sha256}`;
  let p = installing.get(key);
  if (!p) {
    p = installToolsNow(r, v, log).finally(() => installing.delete(key));
    installing.set(key, p);
  }
  await p;
}

async function installToolsNow(r: Remote, v: VolumeInputs, log: Log): Promise<void> {
  const agent = agentScript();
  let data: Buffer | undefined;
  if ("localPath" in v.rustic) {
    try {
      data = fs.readFileSync(v.rustic.localPath);
    } catch (e) {
      throw new UserError(`rustic.localPath: cannot read ${v.rustic.localPath} (${(e as Error).message})`);
    }
  }
  const wantRustic = data ? sha256(data) : (v.rustic as { sha256: string }).sha256;
  const current = async () => {
    const have = await r.run(`sha256sum ${q(AGENT_PATH)} ${q(RUSTIC_PATH)} 2>/dev/null; true`);
    return new Map(have.stdout.trim().split("\n").filter(Boolean).map((l) => { const [s, p] = l.split(/\s+/); return [p, s]; }));
  };
  let sums = await current();
  if (sums.get(AGENT_PATH) !== sha256(agent) || sums.get(RUSTIC_PATH) !== wantRustic) {
    const release = await r.holdLock("/run/dboxed-volumes/tools.lock", `the host tools on ${r.name}`, 900, log);
    try {
      sums = await current(); // another process may have installed them meanwhile
      if (sums.get(AGENT_PATH) !== sha256(agent)) await r.writeFile(AGENT_PATH, agent, "0755");
      if (data && sums.get(RUSTIC_PATH) !== wantRustic) {
        log(`installing rustic (${formatSize(Math.ceil(data.length / 1048576) * 1048576)}) on ${r.name}`);
        await r.putFile((v.rustic as { localPath: string }).localPath, RUSTIC_PATH, "0755");
      } else if (!data && sums.get(RUSTIC_PATH) !== wantRustic) {
        const src = v.rustic as { url: string; sha256: string };
        log(`downloading rustic on ${r.name}`);
        const tmp = `${RUSTIC_PATH}.download-${crypto.randomBytes(4).toString("hex")}`;
        await r.run(`set -e; mkdir -p "$(dirname ${q(RUSTIC_PATH)})"; curl -fsSL --retry 3 -o ${q(tmp)} ${q(src.url)}
echo ${q(`${src.sha256}  ${tmp}`)} | sha256sum -c --quiet
chmod 0755 ${q(tmp)}; mv -f ${q(tmp)} ${q(RUSTIC_PATH)}`, { hint: "check rustic.url and rustic.sha256, and that the host can download from that URL" });
      }
      await r.run(`${q(RUSTIC_PATH)} --version >/dev/null`, { hint: "the rustic binary does not run on this host (wrong architecture or libc?)" });
    } finally {
      release();
    }
  }
}

/** A curl config line: the S3 keys for the lease check, never on a command line. */
export function curlConfig(v: Pick<VolumeInputs, "accessKeyId" | "secretAccessKey">): string {
  // A control character (a newline above all) would end the quoted value and start a directive.
  for (const [field, x] of [["accessKeyId", v.accessKeyId], ["secretAccessKey", v.secretAccessKey]]) {
    if (/[\x00-\x1f\x7f]/.test(x)) throw new UserError(`s3.${field}: must be one line without control characters`);
  }
  const esc = (x: string) => x.replace(/\\/g, "\\\\").replace(/"/g, '\\"');
  return `user = "${esc(v.accessKeyId)}:${esc(v.secretAccessKey)}"\n`;
}

/** Writes volume.env and the root-only rustic profile and curl config (secrets travel on stdin). */
export async function writeConfig(r: Remote, v: VolumeInputs, l: VolumeLayout, leaseToken: string): Promise<void> {
  const lease = { token: leaseToken, region: v.repository.region, seconds: v.leaseDuration,
    url: leaseUrl(v.repository.endpoint, v.repository.bucket, v.repository.prefix, v.volumeId, v.repository.forcePathStyle) };
  const repo = { ...v.repository, accessKeyId: v.accessKeyId, secretAccessKey: v.secretAccessKey };
  const masterKey = await repositoryMasterKey(v.rustic, { ...repo, endpoint: v.repository.localEndpoint, password: v.password });
  // The directories first (root-only), then every file in one round trip.
  await r.writeFiles([
    { path: l.envFile, content: volumeEnv(l, { sizeBytes: v.size, snapshotSpaceBytes: v.snapshotSpace, retention: v.retention, lease,
      maintenance: { ...v.maintenance, repository: `s3://${v.repository.bucket}/${v.repository.prefix}`,
        url: maintenanceUrl(v.repository.endpoint, v.repository.bucket, v.repository.prefix, v.repository.forcePathStyle),
        listUrl: backupMarksListUrl(v.repository.endpoint, v.repository.bucket, v.repository.prefix, v.repository.forcePathStyle) } }), mode: "0600" },
    { path: `${l.configDir}/s3.curl`, content: curlConfig(v), mode: "0600" },
    { path: `${l.profile}.toml`, content: profileToml({ ...repo, masterKey }), mode: "0600" },
  ], { before: `install -d -m 0700 ${q(l.configDir)} ${q(l.stateDir)} /var/cache/dboxed-volumes` });
}

/** Creates the LV (or image and VG) if missing, then the filesystem; true if the storage was made now. */
export async function ensureStorage(r: Remote, v: VolumeInputs, l: VolumeLayout): Promise<boolean> {
  const res = await r.run(ensureStorageScript(l, v.size), { allowFailure: true });
  if (res.code === 20) throw new UserError(`volumeGroup: volume group "${l.vg}" does not exist on ${r.name}: create it or leave volumeGroup unset`);
  if (res.code !== 0) throw new CommandError(r.name, "create storage", res.code, res.signal, res.stdout, res.stderr,
    res.code === 21 ? `a volume group named ${l.vg} already exists on ${r.name}: is another volume with id ${v.volumeId} there?` : undefined);
  await r.run(ensureFilesystemScript(l));
  return res.stdout.split("\n").some((x) => x.trim() === STORAGE_MADE);
}

/** Writes the units (nothing started). */
export async function writeUnits(r: Remote, v: VolumeInputs, l: VolumeLayout): Promise<void> {
  const key = `${r.name}|${v.backupSchedule}`;
  if (v.backupRandomDelay === undefined && !scheduleGaps.has(key)) await preflight(r, v, l, { readOnly: true });
  const delay = effectiveRandomDelay(v.backupRandomDelay, scheduleGaps.get(key));
  await r.writeFiles(Object.entries(unitFiles(l, v.backupSchedule, v.leaseDuration, delay))
    .map(([name, text]) => ({ path: `${UNIT_DIR}/${name}`, content: text, mode: "0644" })), { after: "systemctl daemon-reload" });
}

// enable/disable with --no-reload: the unit files were loaded when written (writeUnits), and a
// daemon-reload costs seconds on a busy host; one explicit reload follows where files change.

/** Starts (and enables for boot) the device and the mount. */
export async function startVolume(r: Remote, l: VolumeLayout): Promise<void> {
  await r.runArgv(["systemctl", "enable", "--now", "--no-reload", "--quiet", l.units.device, l.units.mount],
    { hint: `see: journalctl -u ${l.units.device} -u ${l.units.mount}` });
}

/** Writes the units, then starts the device and the mount. */
export async function installUnits(r: Remote, v: VolumeInputs, l: VolumeLayout): Promise<void> {
  await writeUnits(r, v, l);
  await startVolume(r, l);
}

export async function listSnapshots(r: Remote, l: VolumeLayout): Promise<Snapshot[]> {
  const res = await r.runArgv(rusticArgv(RUSTIC_PATH, l.profile, snapshotsArgs(l.rusticHost)),
    { timeoutMs: 300_000, hint: "rustic cannot read the repository: check the S3 settings, hostEndpoint and the password" });
  return parseSnapshots(res.stdout);
}

/**
 * Restores a snapshot into a directory that may hold an older or partial copy (only what differs
 * is fetched). rustic 0.11 fails with "File exists" when it recreates a hardlink over an existing
 * name, so hardlinked files are removed first; should the restore still fail, the directory
 * (never a volume in use) is emptied and restored whole.
 */
export async function restoreInto(r: Remote, l: VolumeLayout, snapshotId: string, dir: string, log: Log): Promise<void> {
  const t0 = Date.now();
  const restore = command(rusticArgv(RUSTIC_PATH, l.profile, restoreArgs(snapshotId, dir)));
  // The lock outlives a lost connection for as long as a restore started by it still runs.
  const res = await r.run(`mkdir -p /run/dboxed-volumes; exec 9>${q(`/run/dboxed-volumes/${l.volumeId}.restore.lock`)}
flock -w 3600 9 || { echo "another restore of ${l.volumeId} is still running" >&2; exit 75; }
find ${q(dir)} -xdev -type f -links +1 -delete
if ! ${restore}; then
  echo "restore into the existing tree failed: restoring whole" >&2
  find ${q(dir)} -xdev -mindepth 1 -delete
  ${restore}
fi`, { timeoutMs: 6 * 3600_000 });
  if (/restoring whole/.test(res.stderr)) log("the restore into the existing tree failed; restored whole instead");
  log(`restored snapshot ${snapshotId.slice(0, 8)} on ${r.name} in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
}

/**
 * Makes a new volume hold its data: restores the latest snapshot of this volume id when the
 * repository has one, else starts empty. Backups are refused until this has finished.
 */
export async function initialize(r: Remote, l: VolumeLayout, log: Log, snapshotId?: string,
  clone?: SourceSnapshot): Promise<{ restoredFrom?: string; snapshots?: Snapshot[] }> {
  const marker = `${l.stateDir}/initialized`;
  if ((await r.run(`test -e ${q(marker)}`, { allowFailure: true })).code === 0) return {};
  const snaps = clone?.own ?? await listSnapshots(r, l);
  // The volume's own history first; a source only for a volume that has none.
  const chosen = snapshotId ? snaps.find((s) => s.id === snapshotId) : snaps[snaps.length - 1] ?? clone?.snapshot;
  if (snapshotId && !chosen) {
    throw new UserError(`volume ${l.volumeId}: snapshot ${snapshotId.slice(0, 8)} (its final backup) is not in the repository any more; ` +
      "nothing was formatted over data: check the repository");
  }
  if (chosen) {
    log(`restoring snapshot ${chosen.id.slice(0, 8)} of ${chosen.time}${chosen === clone?.snapshot ? ` (volume ${clone.volumeId})` : ""} into ${l.mountPath}`);
    await restoreInto(r, l, chosen.id, l.mountPath, log);
  }
  await r.run(`touch ${q(marker)}`);
  return { restoredFrom: chosen?.id, snapshots: snaps };
}

export interface SourceSnapshot { volumeId: string; snapshot?: Snapshot; own: Snapshot[] }

/**
 * The snapshot a new volume with `source` starts from, chosen from the machine that runs pulumi
 * before anything is claimed or made (a bad choice fails with nothing changed). No `snapshot`
 * when the volume has snapshots of its own (a volume recreated under its id keeps its history).
 */
export async function sourceSnapshot(v: VolumeInputs): Promise<SourceSnapshot | undefined> {
  if (!v.source) return undefined;
  const repo = { ...v.repository, endpoint: v.repository.localEndpoint, accessKeyId: v.accessKeyId, secretAccessKey: v.secretAccessKey, password: v.password };
  const list = async (id: string) => parseSnapshots(await runLocalRustic(v.rustic, repo, snapshotsArgs(layoutFor({ ...v, volumeId: id }).rusticHost)));
  const own = await list(v.volumeId);
  if (own.length) return { volumeId: v.source.volumeId, own };
  return { volumeId: v.source.volumeId, own, snapshot: pickSnapshot(await list(v.source.volumeId), v.source.volumeId, v.source.snapshot) };
}

/** "latest", an id or id prefix, or a time (the newest at or before it), from snapshots oldest first. */
export function pickSnapshot(snaps: Snapshot[], volumeId: string, spec: string): Snapshot {
  if (!snaps.length) throw new UserError(`source.volumeId: volume ${volumeId} has no snapshots in this repository (is it the right id and VolumeProvider?)`);
  if (spec === "latest") return snaps[snaps.length - 1];
  if (/^[0-9a-f]{8,64}$/.test(spec)) {
    const hits = snaps.filter((s) => s.id.startsWith(spec));
    if (hits.length === 1) return hits[0];
    throw new UserError(`source.snapshot: ${hits.length ? `${spec} matches ${hits.length} snapshots of ${volumeId}: give more digits`
      : `volume ${volumeId} has no snapshot ${spec}`}`);
  }
  const at = Date.parse(spec);
  const before = snaps.filter((s) => Date.parse(s.time) <= at);
  if (!before.length) {
    throw new UserError(`source.snapshot: volume ${volumeId} has no snapshot at or before ${spec} (its oldest is of ${snaps[0].time})`);
  }
  return before[before.length - 1];
}

/** Whether the host has this layout's storage holding the volume's data (formatted as l says, initialised). */
export async function holdsData(r: Remote, l: VolumeLayout): Promise<boolean> {
  const res = await r.run(`lvs ${q(`${l.vg}/${l.lv}`)} >/dev/null 2>&1 || exit 1
test -e ${q(`${l.stateDir}/initialized`)} || exit 1
[ "$(blkid -p -o value -s TYPE ${q(l.device)} 2>/dev/null)" = ${q(l.filesystem)} ]`, { allowFailure: true });
  return res.code === 0;
}

/** Checks a restored tree's content against its snapshot (every chunk re-hashed). */
export async function verifyRestored(r: Remote, l: VolumeLayout, snapshotId: string, log: Log, dir = l.mountPath): Promise<void> {
  const t0 = Date.now();
  const res = await r.run(command(rusticArgv(RUSTIC_PATH, l.profile, ["diff", "-x", snapshotId, dir])),
    { allowFailure: true, timeoutMs: 6 * 3600_000 });
  // A new ext4 filesystem brings lost+found, which the snapshot of an xfs volume lacks.
  const changes = parseDiff(res.stdout).filter((c) => !/^\+\s+"?\/?lost\+found"?$/.test(c));
  if (res.code !== 0 || changes.length) {
    throw new UserError(`volume ${l.volumeId} on ${r.name}: the restored tree differs from snapshot ${snapshotId.slice(0, 8)}; ` +
      `the snapshot is kept, run pulumi up again:\n${(changes.length ? changes.slice(0, 20).join("\n") : res.stderr.trim().split("\n").slice(-5).join("\n"))}`);
  }
  log(`verified the restored tree against snapshot ${snapshotId.slice(0, 8)} in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
}

export async function startTimer(r: Remote, l: VolumeLayout): Promise<void> {
  await r.runArgv(["systemctl", "enable", "--now", "--no-reload", "--quiet", l.units.timer, l.units.renewTimer]);
}

/**
 * The new host takes over after a move, in one round trip: the staging mount released, the
 * volume mounted and scheduled, the user's units started (their failure is theirs to report).
 */
export async function switchOn(r: Remote, l: VolumeLayout, stagingDir: string, users: string[]): Promise<void> {
  await r.run(`set -e
if mountpoint -q ${q(stagingDir)}; then umount ${q(stagingDir)}; fi
systemctl enable --now --no-reload --quiet ${q(l.units.device)} ${q(l.units.mount)}
touch ${q(`${l.stateDir}/initialized`)}
systemctl enable --now --no-reload --quiet ${q(l.units.timer)} ${q(l.units.renewTimer)}
${users.length ? `${unitsCommand("start", users)} || true` : "true"}`,
  { hint: `see: journalctl -u ${l.units.device} -u ${l.units.mount}` });
}

export interface BackupStatus {
  status: "ok" | "failed" | "never";
  startedAt?: number;
  finishedAt?: number;
  snapshotId?: string;
  lastSuccessAt?: number;
  message?: string;
  /** Set by a final backup: the provider's nonce, proving the run read the read-only volume. */
  finalRequest?: string;
  /** When the data backed up was frozen (lvm2 snapshot, or the read-only volume itself). */
  snapshotAt?: number;
  /** Per-step timings of the run ("lock=0.0 rustic=3.1 ..."). */
  steps?: string;
}

/** Runs the backup service now and waits for it; returns the status it wrote. */
export async function runBackup(r: Remote, l: VolumeLayout, log: Log): Promise<BackupStatus> {
  log("backing up");
  const t0 = Date.now();
  const res = await r.runArgv(["systemctl", "start", l.units.backup], { allowFailure: true, timeoutMs: 6 * 3600_000 });
  const status = await readStatus(r, l);
  if (res.code !== 0 || status.status !== "ok") await backupFailed(r, l, status);
  log(`backup done in ${((Date.now() - t0) / 1000).toFixed(0)} s: snapshot ${status.snapshotId?.slice(0, 8)}`);
  return status;
}

async function backupFailed(r: Remote, l: VolumeLayout, status: BackupStatus): Promise<never> {
  const journal = await r.run(`journalctl -u ${q(l.units.backup)} -n 15 --no-pager -o cat 2>/dev/null; true`);
  throw new UserError(`backup of volume ${l.volumeId} on ${r.name} failed: ${status.message ?? "see below"}\n${journal.stdout.trim()}`);
}

/**
 * The last backup before a move, delete or rebuild, of a filesystem already read-only.
 * `systemctl start` while a timer-started run is active joins that run (whose data predates
 * the remount), so: wait for any run in progress, then start a new one, and accept its result
 * only if it carries the nonce written after the remount (the agent reads it under its lock
 * and only while the filesystem is read-only).
 */
export async function finalBackup(r: Remote, l: VolumeLayout, log: Log): Promise<BackupStatus> {
  const nonce = crypto.randomBytes(12).toString("hex");
  const t0 = Date.now();
  const unit = q(l.units.backup);
  const res = await r.run(`findmnt -n -o OPTIONS --mountpoint ${q(l.mountPath)} | tr ',' '\\n' | grep -qx ro || exit 41
printf '%s\\n' ${nonce} > ${q(`${l.stateDir}/final-request`)}
waited=0
while :; do
  st=$(systemctl show -p ActiveState --value ${unit})
  case "$st" in activating|active|deactivating|reloading) ;; *) break ;; esac
  if [ "$waited" = 0 ]; then echo "waiting for a periodic backup in progress (started $(systemctl show -p ExecMainStartTimestamp --value ${unit}))"; fi
  waited=$((waited + 1)); sleep 1
done
[ "$waited" = 0 ] || echo "the periodic backup ended after $waited s"
systemctl start ${unit}`, { allowFailure: true, timeoutMs: 6 * 3600_000, onLine: (line) => log(`${r.name}: ${line}`) });
  if (res.code === 41) throw new UserError(`volume ${l.volumeId} on ${r.name} is not read-only: refusing to take a final backup of a volume that can still change`);
  const status = await readStatus(r, l);
  if (res.code !== 0 || status.status !== "ok") await backupFailed(r, l, status);
  if (status.finalRequest !== nonce) {
    throw new UserError(`volume ${l.volumeId} on ${r.name}: the backup that ran is not the final one (it did not read the volume after it became ` +
      `read-only; snapshot ${status.snapshotId?.slice(0, 8)} of ${iso(status.snapshotAt)}); nothing was removed, run pulumi up again`);
  }
  log(`final backup done in ${((Date.now() - t0) / 1000).toFixed(0)} s: snapshot ${status.snapshotId?.slice(0, 8)}`);
  return status;
}

function iso(sec?: number): string {
  return sec ? new Date(sec * 1000).toISOString() : "unknown time";
}

/**
 * Checks a snapshot against the read-only tree it was taken from, without restoring it: rustic
 * reads every file, chunks it, and compares contents and metadata with the snapshot's tree.
 */
export async function verifySnapshot(r: Remote, l: VolumeLayout, snapshotId: string, log: Log): Promise<void> {
  const t0 = Date.now();
  const res = await r.run(command(rusticArgv(RUSTIC_PATH, l.profile, diffArgs(snapshotId, l.mountPath))),
    { allowFailure: true, timeoutMs: 6 * 3600_000 });
  const changes = parseDiff(res.stdout);
  if (res.code !== 0 || changes.length) {
    throw new UserError(`volume ${l.volumeId} on ${r.name}: the final snapshot ${snapshotId.slice(0, 8)} does not match the read-only volume; ` +
      `nothing was removed:\n${(changes.length ? changes.slice(0, 20).join("\n") : res.stderr.trim().split("\n").slice(-5).join("\n"))}`);
  }
  log(`verified snapshot ${snapshotId.slice(0, 8)} against the read-only volume in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
}

export async function readStatus(r: Remote, l: VolumeLayout): Promise<BackupStatus> {
  const text = await r.readFile(`${l.stateDir}/status.json`);
  if (!text) return { status: "never" };
  try {
    return JSON.parse(text) as BackupStatus;
  } catch {
    return { status: "failed", message: "status file unreadable" };
  }
}

export async function grow(r: Remote, v: VolumeInputs, l: VolumeLayout): Promise<void> {
  await r.run(growScript(l, v.size), { hint: `the volume group may lack free space for ${formatSize(v.size)}` });
}

export interface Observed {
  present: boolean;
  configured: boolean;
  sizeBytes?: number;
  mounted: boolean;
  timerActive: boolean;
  usedBytes?: number;
  status: BackupStatus;
}

/** What is on the host now: the LV and its size, the mount, the timer, the last backup. */
export async function observe(r: Remote, l: VolumeLayout): Promise<Observed> {
  const res = await r.run(`
echo "==lvs"; ${command(lvsArgv(l.vg))} 2>/dev/null || true
echo "==mounted"; mountpoint -q ${q(l.mountPath)} && [ "$(readlink -f "$(findmnt -n -o SOURCE --target ${q(l.mountPath)})")" = "$(readlink -f ${q(l.device)} 2>/dev/null)" ] && echo yes || echo no
echo "==timer"; systemctl is-active ${q(l.units.timer)} 2>/dev/null || true
echo "==used"; mountpoint -q ${q(l.mountPath)} && df -B1 --output=used ${q(l.mountPath)} | tail -n1 || true
echo "==configured"; test -e ${q(l.envFile)} && echo yes || echo no
echo "==status"; cat ${q(l.stateDir + "/status.json")} 2>/dev/null || true
`);
  const sections = new Map<string, string>();
  for (const part of res.stdout.split(/^==/m).slice(1)) {
    const nl = part.indexOf("\n");
    sections.set(part.slice(0, nl).trim(), part.slice(nl + 1).trim());
  }
  const lv = parseLvs(sections.get("lvs") ?? "").find((x) => x.name === l.lv);
  let status: BackupStatus = { status: "never" };
  const st = sections.get("status");
  if (st) { try { status = JSON.parse(st); } catch { status = { status: "failed", message: "status file unreadable" }; } }
  return {
    present: !!lv,
    configured: sections.get("configured") === "yes",
    sizeBytes: lv?.sizeBytes,
    mounted: sections.get("mounted") === "yes",
    timerActive: sections.get("timer") === "active",
    usedBytes: sections.get("used") ? Number(sections.get("used")) : undefined,
    status,
  };
}

/**
 * Stops writers from changing the volume (remount read-only), for a final backup.
 * A busy filesystem is an error that names the processes: they must be stopped first.
 */
export async function quiesce(r: Remote, l: VolumeLayout): Promise<void> {
  // Who holds it, from /proc (fuser is not on every host): open files, working and root dirs on
  // the volume's device (by device number: a container sees the volume under its own paths).
  const res = await r.run(`mp=${q(l.mountPath)}
mountpoint -q "$mp" || exit 0
mount -o remount,ro "$mp" 2>&1 && exit 0
dev=$(stat -c %d "$mp")
for p in /proc/[0-9]*; do
  for f in "$p"/cwd "$p"/root "$p"/fd/*; do
    [ "$(stat -L -c %d "$f" 2>/dev/null)" = "$dev" ] || continue
    echo "process \${p#/proc/} ($(cat "$p"/comm 2>/dev/null)) uses $(readlink "$f" 2>/dev/null)"; break
  done
done | head -n 10; exit 40`, { allowFailure: true });
  if (res.code === 40) {
    throw new UserError(`volume ${l.volumeId} on ${r.name} is in use, so it cannot be made read-only for its final backup; ` +
      `stop the programs that use ${l.mountPath} first:\n${res.stdout.trim()}`);
  }
  if (res.code !== 0) throw new CommandError(r.name, "remount read-only", res.code, res.signal, res.stdout, res.stderr);
}

const fenceFile = (l: VolumeLayout) => `${l.configDir}/fenced`;
const fenceDropIn = (l: VolumeLayout, unit: string) => `${UNIT_DIR}/${unit}.d/dboxed-fence-${l.volumeId}.conf`;

/**
 * Keeps the volume read-only, its timer and its users stopped, across reboots too, until it is
 * cleaned or given back: a drop-in mounts it read-only, the timer is disabled, each user unit
 * gets a condition on the fence file, and the agent refuses periodic backups while it exists.
 */
export async function fence(r: Remote, l: VolumeLayout, users: string[], opts: { stopFirst?: string[] } = {}): Promise<void> {
  const lines = [`set -e`];
  // The users stopped, then the schedule, in the same round trip (on a move's downtime path).
  if (opts.stopFirst?.length) lines.push(unitsCommand("stop", opts.stopFirst));
  lines.push(`systemctl stop ${q(l.units.timer)}`, `mkdir -p ${q(`${UNIT_DIR}/${l.units.mount}.d`)}`,
    `printf '[Mount]\\nOptions=ro\\n' > ${q(fenceDropIn(l, l.units.mount))}`);
  for (const u of users) {
    lines.push(`mkdir -p ${q(`${UNIT_DIR}/${u}.d`)}`,
      `printf '[Unit]\\nConditionPathExists=!%s\\n' ${q(fenceFile(l))} > ${q(fenceDropIn(l, u))}`);
  }
  lines.push(`touch ${q(fenceFile(l))}`, `systemctl disable --now --no-reload --quiet ${q(l.units.renewTimer)} 2>/dev/null || true`,
    `systemctl disable --no-reload --quiet ${q(l.units.timer)} 2>/dev/null || true`, "systemctl daemon-reload");
  await r.run(lines.join("\n"));
}

/** The units fence() keeps from starting on r (its drop-ins), to start them again when given back. */
export async function fencedUsers(r: Remote, l: VolumeLayout): Promise<string[]> {
  const res = await r.run(`cd ${UNIT_DIR} && ls -d -- *.d/dboxed-fence-${l.volumeId}.conf 2>/dev/null; true`);
  return res.stdout.split("\n").map((x) => x.trim().replace(/\.d\/dboxed-fence-.*$/, ""))
    .filter((u) => u && u !== l.units.mount && /^[A-Za-z0-9@_.:\\-]+$/.test(u));
}

/** Undoes fence(): the volume may be read-write and scheduled again. */
export async function unfence(r: Remote, l: VolumeLayout): Promise<void> {
  await r.run(`rm -f ${UNIT_DIR}/*.d/dboxed-fence-${l.volumeId}.conf ${q(fenceFile(l))}
systemctl daemon-reload`);
}

/** Whether the volume is still fenced on r: fence file, not mounted read-write, timer not active. */
export async function isFenced(r: Remote, l: VolumeLayout): Promise<{ fenced: boolean; why: string }> {
  const res = await r.run(`test -e ${q(fenceFile(l))} || { echo "its fence marker is gone"; exit 1; }
if mountpoint -q ${q(l.mountPath)}; then
  findmnt -n -o OPTIONS --mountpoint ${q(l.mountPath)} | tr ',' '\\n' | grep -qx ro || { echo "it is mounted read-write"; exit 1; }
fi
if systemctl is-active --quiet ${q(l.units.timer)}; then echo "its backup timer runs"; exit 1; fi
exit 0`, { allowFailure: true });
  return { fenced: res.code === 0, why: res.stdout.trim() };
}

/** Lets writers back in after a failed final backup, and restarts the schedule. */
export async function unquiesce(r: Remote, l: VolumeLayout): Promise<void> {
  await r.run(`rm -f ${q(`${l.stateDir}/final-request`)}
mountpoint -q ${q(l.mountPath)} && mount -o remount,rw ${q(l.mountPath)}; true`);
}

/**
 * Runs a script that relies on `set -e` inside a larger one and stops that one when it fails.
 * Not `( ... ) || exit`: on the left of `||` the shell ignores `set -e`, the subshell's too.
 */
export function mustSucceed(script: string): string {
  return `(\n${script}\n)\nrc=$?; [ "$rc" -eq 0 ] || exit "$rc"`;
}

/** Stops and removes units, unmounts, removes the LV/image and the volume's files on the host. */
export async function teardown(r: Remote, l: VolumeLayout): Promise<void> {
  const u = l.units;
  // One round trip. Unmounted for good, the markers go before the storage, so storage that is
  // half removed never counts as formatted or initialised (a later create would refuse to
  // format it, or skip its restore).
  const res = await r.run(`
systemctl disable --now --no-reload --quiet ${q(u.timer)} ${q(u.renewTimer)} 2>/dev/null || true
systemctl stop ${q(u.backup)} ${q(u.renew)} ${q(u.maintain)} 2>/dev/null || true
systemctl disable --now --no-reload --quiet ${q(u.mount)} 2>/dev/null || true
mountpoint -q ${q(l.mountPath)} && umount ${q(l.mountPath)}
systemctl disable --now --no-reload --quiet ${q(u.device)} 2>/dev/null || true
if mountpoint -q ${q(l.mountPath)}; then exit 50; fi
# Unmounted here, but still mounted in another mount namespace (a container's bind mount): the
# markers and the storage stay, or a later create would restore over what is still in use.
if lvs --noheadings -o lv_device_open ${q(`${l.vg}/${l.lv}`)} 2>/dev/null | grep -q open; then exit 52; fi
rm -f ${q(`${l.stateDir}/initialized`)} ${q(`${l.stateDir}/formatted`)} || exit 51
if [ -e ${q(l.envFile)} ]; then ${command([AGENT_PATH, "detach", l.volumeId])} || true; fi
${mustSucceed(removeStorageScript(l))}
rm -f ${Object.values(u).map((n) => q(`${UNIT_DIR}/${n}`)).join(" ")} ${UNIT_DIR}/*.d/dboxed-fence-${l.volumeId}.conf
systemctl daemon-reload
systemctl reset-failed ${Object.values(u).map(q).join(" ")} 2>/dev/null || true
rm -rf ${q(l.configDir)} ${q(l.stateDir)} ${q(`/run/dboxed-volumes/${l.volumeId}`)}
rm -f ${q(`${METRICS_DIR}/dboxed_volume_${l.volumeId}.prom`)} ${q(`/var/lib/systemd/timers/stamp-${u.timer}`)}
rmdir ${q(l.mountPath)} 2>/dev/null || true
exit 0`, { allowFailure: true });
  if (res.code === 50) throw new UserError(`cannot unmount ${l.mountPath} on ${r.name}: it is busy; stop the programs that use it`);
  if (res.code === 52) {
    throw new UserError(`volume ${l.volumeId} on ${r.name}: ${l.device} is still open after ${l.mountPath} was unmounted (mounted in another ` +
      "mount namespace, e.g. a container's bind mount?): stop what holds it; nothing was removed");
  }
  if (res.code !== 0) throw new CommandError(r.name, "remove the volume", res.code, res.signal, res.stdout, res.stderr);
}

/**
 * Why a volume a failed create made on this host may hold more than the create put there, or ""
 * if nothing else used it: it is made read-only first (which fails while a file is open for
 * writing), then no unit other than the volume's own may have been started on it since boot,
 * and no file may have changed since the create's initialisation ended. Read-only stays.
 */
export async function usedSinceCreate(r: Remote, v: VolumeInputs, l: VolumeLayout): Promise<string> {
  const res = await r.run(`mp=${q(l.mountPath)}
if mountpoint -q "$mp"; then
  mount -o remount,ro "$mp" 2>/dev/null || { echo "a file on it is open for writing"; exit 0; }
fi
for u in ${v.stopUnits.map(q).join(" ")} $(systemctl show -p RequiredBy -p BoundBy -p WantedBy --value ${q(l.units.mount)} 2>/dev/null); do
  case "$u" in dboxed-volume-*|*.target) continue ;; esac
  t=$(systemctl show -p ActiveEnterTimestampMonotonic --value "$u" 2>/dev/null)
  [ -z "$t" ] || [ "$t" = 0 ] || { echo "unit $u ran on it"; exit 0; }
done
if mountpoint -q "$mp" && [ -e ${q(`${l.stateDir}/initialized`)} ]; then
  f=$(find "$mp" -xdev -newer ${q(`${l.stateDir}/initialized`)} -print -quit 2>/dev/null)
  [ -z "$f" ] || { echo "$f changed after the create initialised it"; exit 0; }
fi
true`);
  return res.stdout.trim();
}

/**
 * Forgets every snapshot of the volume and prunes (lock-less) what they alone used. The timer is
 * stopped by the caller; a run still in progress is waited for first, or the snapshot it saves
 * after the forget would outlive the volume.
 */
export async function forgetSnapshots(r: Remote, l: VolumeLayout, log: Log): Promise<void> {
  await r.run(`while :; do
  case "$(systemctl show -p ActiveState --value ${q(l.units.backup)})" in activating|active|deactivating|reloading) sleep 1 ;; *) break ;; esac
done`, { timeoutMs: 6 * 3600_000, onLine: log });
  const snaps = await listSnapshots(r, l);
  if (snaps.length === 0) return;
  log(`forgetting ${snaps.length} snapshot(s) of ${l.volumeId}`);
  await r.runArgv(rusticArgv(RUSTIC_PATH, l.profile, ["forget", ...snaps.map((s) => s.id)]), { timeoutMs: 600_000 });
  // The prune under the repository's maintenance lease (never beside another host's prune or
  // check); its outcome is reported, not fatal: the snapshots are forgotten, the space freed by
  // this prune or the next scheduled one.
  const res = await r.runArgv([AGENT_PATH, "prune-now", l.volumeId], { allowFailure: true, timeoutMs: 3 * 3600_000 });
  const said = (res.stdout + res.stderr).trim().split("\n").filter((x) => /^(prune-now|maintenance prune)/.test(x)).slice(-1)[0];
  log(said ? said.replace(/^maintenance /, "") : `prune ended with exit code ${res.code}`);
}

/** Units that use the volume: the ones the user listed and the ones systemd says need the mount. */
export async function usersOf(r: Remote, v: VolumeInputs, l: VolumeLayout): Promise<string[]> {
  const deps = await r.run(`systemctl show -p RequiredBy -p BoundBy --value ${q(l.units.mount)} 2>/dev/null | tr ' ' '\\n' | grep -v '^$' || true`);
  return [...new Set([...v.stopUnits, ...deps.stdout.split("\n").map((x) => x.trim()).filter(Boolean)])]
    .filter((u) => u !== l.units.backup && u !== l.units.timer);
}

/**
 * Why r may have served the volume (it is mounted at its mount path, its timer is enabled, or
 * its restore was finished as the volume's), or "" when it only ever had a staging copy.
 */
export async function servedOn(r: Remote, l: VolumeLayout): Promise<string> {
  const res = await r.run(`test -e ${q(fenceFile(l))} && exit 0 # a fenced copy: read-only since its final backup
if mountpoint -q ${q(l.mountPath)} && [ "$(readlink -f "$(findmnt -n -o SOURCE --mountpoint ${q(l.mountPath)})")" = "$(readlink -f ${q(l.device)} 2>/dev/null)" ]; then
  echo "mounted at ${l.mountPath}"; exit 0
fi
if systemctl is-enabled --quiet ${q(l.units.timer)} 2>/dev/null; then echo "its backup timer is enabled"; exit 0; fi
if [ -e ${q(`${l.stateDir}/initialized`)} ]; then echo "it was switched on"; fi
true`);
  return res.stdout.trim();
}

/** Whether r holds a fenced copy of the volume (a move's old host, left fenced): stale, never to serve again. */
export async function fencedLeftover(r: Remote, l: VolumeLayout): Promise<boolean> {
  const res = await r.run(`test -e ${q(fenceFile(l))}`, { allowFailure: true });
  return res.code === 0;
}

/**
 * Room for the volume on r before anything is made: its sparse image (filesystem and snapshot
 * space) in /var/lib/dboxed-volumes, or the LV and its snapshot space in the volume group. A
 * sparse image on a full filesystem turns into I/O errors inside the volume later.
 */
export async function checkRoom(r: Remote, v: VolumeInputs, l: VolumeLayout, after = "Nothing was made."): Promise<void> {
  const need = l.ownVg ? imageBytes(v.size) : v.size + (v.snapshotSpace ?? snapshotBytes(v.size));
  const res = await r.run(l.ownVg
    ? `test -e ${q(l.image)} && echo have || { d=/var/lib/dboxed-volumes; [ -d "$d" ] || d=/var/lib; df -B1 --output=avail "$d" | tail -n1; }`
    : `lvs ${q(`${l.vg}/${l.lv}`)} >/dev/null 2>&1 && echo have || vgs --noheadings --units b --nosuffix -o vg_free ${q(l.vg)}`, { allowFailure: true });
  const out = res.stdout.trim();
  if (out === "have") return;
  const free = Number(out);
  if (!Number.isFinite(free) || res.code !== 0) {
    if (!l.ownVg) return; // no such volume group: ensureStorage names it
    throw new UserError(`host ${r.name}: cannot tell the free space (${res.stderr.trim()})`);
  }
  if (free < need) {
    throw new UserError(`host ${r.name} has no room for volume ${v.volumeId}: it needs ${formatSize(Math.ceil(need / 1048576) * 1048576)} ` +
      `${l.ownVg ? "in /var/lib/dboxed-volumes" : `in volume group ${l.vg}`}, and ${Math.floor(free / 1048576)}MiB are free. ${after}`);
  }
}

/** The lease token the volume's settings on r hold (its volume.env), or undefined. */
export async function leaseTokenOn(r: Remote, l: VolumeLayout): Promise<string | undefined> {
  const res = await r.run(`sed -n "s/^LEASE_TOKEN=//p" ${q(l.envFile)} 2>/dev/null | head -n1`, { allowFailure: true });
  const raw = res.stdout.trim().replace(/^'(.*)'$/, "$1");
  return /^[0-9a-f]{32}$/.test(raw) ? raw : undefined;
}

/**
 * Waits while the repository's prune runs (its lease held), before a final backup stops the
 * volume's users: the backup would wait for the prune anyway (they never overlap), and this way
 * the wait is not downtime. Best effort: a prune that starts right after is waited for by the
 * backup itself.
 */
export async function waitForPrune(v: VolumeInputs, log: Log, maxMs = 2 * 3600_000): Promise<void> {
  const s = { endpoint: v.repository.localEndpoint, region: v.repository.region, bucket: v.repository.bucket, prefix: v.repository.prefix,
    forcePathStyle: v.repository.forcePathStyle, accessKeyId: v.accessKeyId, secretAccessKey: v.secretAccessKey };
  const t0 = Date.now();
  for (let said = false; Date.now() - t0 < maxMs; said = true) {
    const rec = await readMaintenance(s, "prune").catch(() => undefined);
    if (!rec?.holder || rec.expiresAt * 1000 <= Date.now()) {
      if (said) log(`the repository's prune ended after ${Math.round((Date.now() - t0) / 1000)} s`);
      return;
    }
    if (!said) log(`waiting for the repository's prune on ${rec.holder} to end before stopping the volume (a backup never runs beside a prune)`);
    await new Promise((r) => setTimeout(r, 10_000));
  }
}
