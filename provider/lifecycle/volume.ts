// The Volume resource's lifecycle: check, diff, create, read, update, delete.
// The dynamic-provider contract rules every step: if create fails, the volume must be able to be
// created again by the next `pulumi up` (every host step is resumable); if delete fails, the
// volume is still there, with its data.
import { adoptionHint, UserError } from "../errors";
import { parseSize, PROXY_ABSENT, volumeSchema, VolumeInputs, formatSize } from "../inputs";
import { legacyDefaultVolumeId } from "../volumeId";
import { VolumeLayout } from "../host/layout";
import { Snapshot } from "../host/rustic";
import { quote as q } from "../host/shell";
import { Remote, withRemote } from "../remote/ssh";
import { checkInputs } from "./check";
import { progress } from "./progress";
import * as steps from "./steps";
import { claim, hostRef, leaseS3, otherInstance, ownsLease, release, setRebuild } from "./lease";
import { checkMoveTarget, move, MoveReport } from "./move";
import { containsUnknown } from "./unknowns";
import { giveBack, undoMove } from "./undo";
import { DEFAULT_LEASE_SECONDS, Lease, MovePhase, readLease, sameHost, hostName, newToken, ownerName, updateLease } from "../storage/lease";
import { unitsArgv } from "../host/systemd";

type Props = Record<string, any>;

export interface VolumeOutputs {
  device: string;
  sizeBytes: number;
  usedBytes: number;
  mounted: boolean;
  timerActive: boolean;
  lastBackupAt: string;
  lastBackupStatus: string;
  lastBackupMessage: string;
  lastSuccessfulBackupAt: string;
  latestSnapshotId: string;
  snapshotCount: number;
  restoredFrom: string;
  /** A clone's origin: volumeId, snapshotId, snapshotTime ({} when the volume is no clone). */
  clonedFrom: Record<string, unknown>;
  lastMove: Record<string, unknown>;
  /** This resource instance's random id, also in the lease: a replaced instance leaves the volume alone. */
  instanceId: string;
  /** A move stopped before its switch: from, to, phase, reason, since ({} when none). */
  unfinishedMove: Record<string, unknown>;
  /** The old host of a switched move, not cleaned yet: host, reason ({} when none). */
  pendingCleanup: Record<string, unknown>;
  /** Secret: where the volume came from while unfinishedMove or pendingCleanup is set (null otherwise). */
  moveOrigin: MoveOrigin | null;
}

/** What of the old inputs a resumed, undone or cleaned-up move needs: the old host and its layout. */
type MoveOrigin = Pick<VolumeInputs, "host" | "filesystem" | "volumeGroup" | "mountPath" | "size" | "snapshotSpace" | "stopUnits">;

/** Plain data only: the engine's struct encoding fails on undefined (and a failed encoding of an error hangs the run). */
function plain<T>(x: T): T {
  return JSON.parse(JSON.stringify(x));
}

function originOf(v: VolumeInputs): MoveOrigin {
  return plain({ host: v.host, filesystem: v.filesystem, volumeGroup: v.volumeGroup, mountPath: v.mountPath, size: v.size,
    snapshotSpace: v.snapshotSpace, stopUnits: v.stopUnits });
}

const isSet = (x: unknown) => !!x && typeof x === "object" && Object.keys(x as object).length > 0;

/**
 * Fields of the volume's inputs that are compared by diff. No change replaces the resource: a new
 * filesystem or volumeGroup is rebuilt in place (the data carried by a verified final backup and
 * a restore), a new host is a move, and volumeId cannot change (refused by check).
 */
const INPUT_FIELDS = ["volumeId", "host", "size", "filesystem", "mountPath", "volumeGroup", "backupSchedule",
  "finalBackupOnDelete", "forgetSnapshotsOnDelete", "repository", "accessKeyId", "secretAccessKey", "password",
  "retention", "rustic", "stopUnits", "warmMove", "force", "snapshotSpace", "forceDespiteLiveLease", "leaseDuration",
  "backupRandomDelay", "source", "maintenance"] as const;

/** One operation at a time per volume and host, for as long as this connection lives. */
async function exclusive<T>(r: Remote, l: VolumeLayout, log: (m: string) => void, fn: () => Promise<T>): Promise<T> {
  const release = await r.holdLock(`/run/dboxed-volumes/${l.volumeId}.operation.lock`, `volume ${l.volumeId}`, 900, log);
  try {
    return await fn();
  } finally {
    release();
  }
}

function logger(v: { volumeId: string }) {
  return (msg: string) => { void progress(`volume ${v.volumeId}`, msg); };
}

/**
 * A connection given as an Output arrives with its absent fields as null, and without a bastion
 * as a proxy marked PROXY_ABSENT (see resources/volume.ts): no proxy.
 */
function withoutNulls(h: unknown): unknown {
  if (!h || typeof h !== "object" || Array.isArray(h)) return h;
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(h)) {
    if (v === null || v === undefined) continue;
    if (k === "proxy" && v && typeof v === "object") {
      const { [PROXY_ABSENT]: absent, ...proxy } = v as Record<string, unknown>;
      if (absent === true) continue;
      out.proxy = withoutNulls(proxy);
      continue;
    }
    out[k] = v;
  }
  return out;
}

export async function check(olds: Props, news: Props) {
  if (news && news.host) news = { ...news, host: withoutNulls(news.host) };
  const res = checkInputs(volumeSchema, news);
  if (res.value && olds && typeof olds.volumeId === "string" && olds.volumeId !== res.value.volumeId) {
    const from = res.value.volumeIdFrom;
    if (from && olds.volumeId === legacyDefaultVolumeId(from.stack, from.name)) {
      // Created before default ids were made collision-free: the volume keeps the id it has.
      res.inputs.volumeId = olds.volumeId;
      res.value.volumeId = olds.volumeId;
    } else {
      res.failures.push({ property: "volumeId", reason: `volumeId: the id of an existing volume cannot change (${olds.volumeId} -> ${res.value.volumeId}): ` +
        `its data and snapshots live under ${olds.volumeId}. Keep volumeId "${olds.volumeId}"; for a volume under another id, ` +
        "declare a new Volume (it starts from that id's own snapshots, or empty) and copy the data into it" });
    }
  }
  if (res.value && olds?.host && olds.repository && !sameHost(hostRef(olds as VolumeInputs), hostRef(res.value as unknown as VolumeInputs))) {
    const repo = (x: Props) => JSON.stringify([x.repository?.endpoint, x.repository?.bucket, x.repository?.prefix, x.password]);
    if (repo(olds) !== repo(res.value as Props)) {
      res.failures.push({ property: "repository", reason: "host and repository: a move and a change of the repository (the VolumeProvider's s3 endpoint, bucket, prefix " +
        "or password) cannot happen in one pulumi up (the final backup goes to the old repository, the restore reads the new one): " +
        "move the volume first, then change the repository in a second pulumi up" });
    }
  }
  if (res.value && olds?.host && olds.volumeId === res.value.volumeId && typeof olds.mountPath === "string" && olds.mountPath !== res.value.mountPath &&
    sameHost(hostRef(olds as VolumeInputs), hostRef(res.value as unknown as VolumeInputs))) {
    // On the same machine, applications and their units name the path: a volume mounted at two
    // paths, or an old mount unit left behind, would be worse than no change. (A move may take a
    // new path on its new host: the old host's layout is removed whole.)
    res.failures.push({ property: "mountPath", reason: `mountPath: the mount path of a volume cannot change on the host it lives on (${olds.mountPath} -> ` +
      `${res.value.mountPath}): keep mountPath "${olds.mountPath}" and bind-mount it where it is also needed, or declare a new Volume ` +
      "at the new path and copy the data into it (moving the volume to another host may change its path)" });
  }
  if (res.value && olds && olds.volumeId === res.value.volumeId && typeof olds.size === "number") {
    const bytes = parseSize(res.value.size);
    if (bytes < olds.size) {
      res.failures.push({ property: "size", reason: `size: shrinking a volume is not supported (${formatSize(olds.size)} -> ${formatSize(bytes)}); ` +
        "keep the size, or create a new volume and copy the data" });
    }
  }
  if (res.value && res.failures.length === 0) {
    res.inputs.size = parseSize(res.value.size);
    if (res.value.snapshotSpace !== undefined) res.inputs.snapshotSpace = parseSize(res.value.snapshotSpace);
  }
  return { inputs: res.inputs, failures: res.failures };
}

function same(a: unknown, b: unknown): boolean {
  return JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
}

/** What diff decides, without touching a host: the changes, and whether they move the volume to another machine. */
export async function planDiff(olds: Props, news: Props) {
  // Fields added later: a state without them had their default (no diff for existing stacks).
  const added: Record<string, unknown> = { leaseDuration: DEFAULT_LEASE_SECONDS, forceDespiteLiveLease: false };
  const changes: string[] = INPUT_FIELDS.filter((f) => !same(olds[f] ?? added[f], news[f] ?? added[f]));
  // An unfinished move (to finish or undo) or an old host to clean is work for an update too.
  if (isSet(olds.unfinishedMove) || isSet(olds.pendingCleanup)) changes.push("host");
  else if (!changes.length && olds.repository && olds.host) {
    // A run killed mid-move left no trace in the state, only in the lease: setting host back to
    // the old host (where the state still has it) must undo that move. One S3 read, no SSH.
    const cur = await readLease(leaseS3(olds as VolumeInputs), olds.volumeId).then((x) => x?.lease, () => undefined);
    const m = cur?.move;
    if (m && m.phase !== "switched" && sameHost(m.from, hostRef(olds as VolumeInputs))) changes.push("host");
    // ... or finished it elsewhere: the update says where the volume is.
    else if (cur && ownsLease(cur, olds as VolumeInputs) && !sameHost(cur.holder, hostRef(olds as VolumeInputs))) changes.push("host");
  }
  const move = changes.includes("host") && !isSet(olds.unfinishedMove) && !isSet(olds.pendingCleanup) && !!olds.host && !!news.host &&
    !containsUnknown(news) && !sameHost(hostRef(olds as VolumeInputs), hostRef(news as VolumeInputs));
  // A new host is a move, a new filesystem or volumeGroup a rebuild: both are updates that carry
  // the data over under the volume's lease, never a delete and create that could lose it.
  return { changes: changes.length > 0, replaces: [] as string[], deleteBeforeReplace: false, stables: [] as string[], move };
}

export async function diff(_id: string, olds: Props, news: Props) {
  const { move, ...result } = await planDiff(olds, news);
  // A move to another machine: its new host's read-only pre-flight runs now, so that a preview
  // fails, naming the reason, when the move would (no connection when nothing moves).
  if (move) await checkMoveTarget(news as VolumeInputs);
  return result;
}

function iso(sec?: number): string {
  return sec ? new Date(sec * 1000).toISOString() : "";
}

function outputs(l: VolumeLayout, obs: steps.Observed, snaps: Snapshot[] | undefined, prev: Props, restoredFrom?: string): VolumeOutputs {
  const latest = snaps?.[snaps.length - 1];
  return {
    device: l.device,
    sizeBytes: obs.sizeBytes ?? 0,
    usedBytes: obs.usedBytes ?? 0,
    mounted: obs.mounted,
    timerActive: obs.timerActive,
    lastBackupAt: iso(obs.status.finishedAt),
    lastBackupStatus: obs.status.status,
    lastBackupMessage: obs.status.message ?? "",
    lastSuccessfulBackupAt: iso(obs.status.lastSuccessAt),
    latestSnapshotId: snaps ? latest?.id ?? "" : prev.latestSnapshotId ?? "",
    snapshotCount: snaps ? snaps.length : prev.snapshotCount ?? 0,
    restoredFrom: restoredFrom ?? prev.restoredFrom ?? "",
    clonedFrom: (prev.clonedFrom as Record<string, unknown>) ?? {},
    lastMove: prev.lastMove ?? {},
    instanceId: prev.instanceId ?? "",
    unfinishedMove: prev.unfinishedMove ?? {},
    pendingCleanup: prev.pendingCleanup ?? {},
    moveOrigin: prev.moveOrigin ?? null,
  };
}

/** Everything that makes a volume run on a host; each step skips what is already done. */
async function converge(r: Remote, v: VolumeInputs, leaseToken: string, log: (m: string) => void,
  restore?: string, preflightDone = false, clone?: steps.SourceSnapshot, made?: { storage: boolean }): Promise<{ restoredFrom?: string; snapshots?: Snapshot[]; clonedFrom?: Record<string, string> }> {
  const l = steps.layout(v);
  if (!preflightDone) await steps.preflight(r, v, l);
  await steps.installTools(r, v, log);
  await steps.writeConfig(r, v, l, leaseToken);
  if (await steps.ensureStorage(r, v, l) && made) made.storage = true;
  await steps.installUnits(r, v, l);
  const init = await steps.initialize(r, l, log, restore, clone);
  await steps.startTimer(r, l);
  const cloned = clone?.snapshot && init.restoredFrom === clone.snapshot.id
    ? { volumeId: clone.volumeId, snapshotId: clone.snapshot.id, snapshotTime: clone.snapshot.time } : undefined;
  return { ...init, clonedFrom: cloned };
}

async function snapshotsOrUndefined(r: Remote, l: VolumeLayout): Promise<Snapshot[] | undefined> {
  try { return await steps.listSnapshots(r, l); } catch { return undefined; }
}

export async function create(inputs: Props) {
  const v = inputs as VolumeInputs;
  const log = logger(v);
  const l = steps.layout(v);
  return withRemote(v.host, async (r) => exclusive(r, l, log, async () => {
    log(`creating on ${r.name}: ${formatSize(v.size)} ${v.filesystem} at ${v.mountPath}`);
    const instanceId = newToken();
    // A clone's snapshot is chosen before anything is claimed or made.
    const clone = await steps.sourceSnapshot(v);
    if (clone && !clone.snapshot) log(`volume ${v.volumeId} has snapshots of its own: source (volume ${clone.volumeId}) is not used`);
    const { lease, forcedFrom, fresh } = await claim(v, { instance: instanceId, adoptLegacy: false });
    let touched = false;
    const made = { storage: false };
    try {
      await steps.preflight(r, v, l);
      touched = true;
      const init = await converge(r, v, lease.token, log, undefined, true, clone, made);
      let lastMove: Record<string, unknown> = {};
      if (forcedFrom) {
        const snaps = init.snapshots ?? await steps.listSnapshots(r, l);
        const used = snaps.find((s) => s.id === init.restoredFrom);
        const lostSeconds = used ? Math.round((Date.now() - Date.parse(used.time)) / 1000) : null;
        lastMove = { forced: true, from: hostName(forcedFrom.holder), to: r.name, snapshotId: init.restoredFrom ?? "",
          snapshotTime: used?.time ?? "", dataLossWindowSeconds: lostSeconds };
        log(`FORCED takeover from ${hostName(forcedFrom.holder)}: restored snapshot ${init.restoredFrom?.slice(0, 8) ?? "(none)"} ` +
          `of ${used?.time ?? "never"}; anything written on the old host after it (up to ${lostSeconds ?? "?"} s) is lost`);
      }
      const status = await steps.runBackup(r, l, log);
      const obs = await steps.observe(r, l);
      // The first backup on a host applies no retention: the list is what initialize saw plus it.
      const snaps = init.snapshots && status.snapshotId && !/\bforget=/.test(status.steps ?? "")
        ? [...init.snapshots, { id: status.snapshotId, time: new Date((status.snapshotAt ?? status.finishedAt ?? 0) * 1000).toISOString(), hostname: l.rusticHost }]
        : await steps.listSnapshots(r, l);
      return { id: v.volumeId, outs: { ...inputs, ...outputs(l, obs, snaps, { lastMove, instanceId, clonedFrom: init.clonedFrom ?? {} }, init.restoredFrom ?? "") } };
    } catch (e) {
      // Not created: the lease this create took must not keep the id from being created
      // elsewhere. Storage this create made holds nothing but what it put there (an empty
      // filesystem, or a snapshot that stays in the repository): it is removed, then the lease
      // given back. Storage that was there before (a resumed create, an adopted volume) is never
      // removed: the lease stays with it, and running `pulumi up` again finishes the create.
      if (fresh && !forcedFrom && (!touched || made.storage)) {
        let tearing = false;
        try {
          if (touched) {
            // Anything else on it (a unit that starts with the mount, a file written since) may
            // exist nowhere else: then the volume and its lease stay.
            const used = await steps.usedSinceCreate(r, v, l);
            if (used) {
              await giveBack(r, l, []);
              throw new Error(`it may hold data of its own (${used})`);
            }
            log(`create failed on ${r.name}: removing the storage it made there, then giving back the lease`);
            tearing = true;
            await steps.teardown(r, l);
          }
          await release(v, instanceId);
        } catch (cleanup) {
          // Half torn down: back in service (mounted, scheduled, the lease renewed) as it was.
          if (tearing) await giveBack(r, l, []).catch(() => undefined);
          log(`after the failed create, the volume was left on ${r.name}: ${(cleanup as Error).message.split("\n")[0]}; ` +
            `the lease stays with ${r.name}: run pulumi up again to finish the create there`);
        }
      }
      throw e;
    }
  }), { log });
}

export async function read(id: string, props: Props) {
  if (!props || !props.host || !props.repository) {
    throw new UserError(adoptionHint("read", id));
  }
  const v = props as VolumeInputs;
  const l = steps.layout(v);
  return withRemote(v.host, async (r) => {
    const obs = await steps.observe(r, l);
    // Gone from the host: gone. Not while a move is unfinished (the data is on the old host).
    if (!obs.present && !obs.configured && !isSet(props.moveOrigin)) return { id: "", props: {} };
    let snaps: Snapshot[] | undefined;
    try {
      snaps = await steps.listSnapshots(r, l);
    } catch (e) {
      logger(v)(`cannot list snapshots (${(e as Error).message.split("\n")[0]}); keeping the last known values`);
    }
    // A move cut off with the CLI (nothing in the state) shows from the lease.
    let unfinishedMove = props.unfinishedMove;
    if (!isSet(props.moveOrigin)) {
      const m = await readLease(leaseS3(v), v.volumeId).then((x) => x?.lease.move, () => undefined);
      unfinishedMove = m && m.phase !== "switched" && sameHost(m.from, hostRef(v))
        ? { from: hostName(m.from), to: hostName(m.to), phase: m.phase, reason: "a pulumi run stopped during the move", since: m.startedAt } : {};
    }
    return { id, props: { ...props, ...outputs(l, obs, snaps, { ...props, unfinishedMove }) } };
  });
}

/**
 * Stops the volume's users and schedule, makes it read-only, takes the final backup and verifies
 * it against the read-only tree. On failure the volume is given back: read-write, scheduled, its
 * users started again.
 */
async function finalBackupVerified(r: Remote, v: VolumeInputs, l: VolumeLayout, log: (m: string) => void,
  opts: { users: string[] }): Promise<string> {
  const users = opts.users;
  try {
    if (users.length) {
      log(`stopping ${users.join(", ")} on ${r.name}`);
      await r.runArgv(unitsArgv("stop", users));
    }
    await r.runArgv(["systemctl", "stop", l.units.timer]);
    await steps.quiesce(r, l);
    log(`final backup on ${r.name}`);
    const status = await steps.finalBackup(r, l, log);
    await steps.verifySnapshot(r, l, status.snapshotId!, log);
    return status.snapshotId!;
  } catch (e) {
    await giveBack(r, l, users);
    throw new UserError(`${(e as Error).message}\nThe volume was left in place on ${r.name}: mounted read-write and scheduled as before` +
      `${users.length ? `, ${users.join(", ")} started again` : ""}.`);
  }
}


/**
 * A new filesystem or volumeGroup on the same host: final backup of the read-only volume
 * (verified), the old storage removed, the new one created and the final snapshot restored.
 * The snapshot is recorded in the lease first, so a run cut off anywhere resumes without loss.
 */
async function rebuild(r: Remote, olds: VolumeInputs, v: VolumeInputs, instanceId: string, log: (m: string) => void) {
  const lOld = steps.layout(olds), l = steps.layout(v);
  const { lease } = await claim({ ...v, force: false }, { instance: instanceId, adoptLegacy: true });
  let snapshotId = lease.rebuild?.snapshotId;
  const users = [...new Set([...await steps.usersOf(r, olds, lOld), ...v.stopUnits])];
  if (await steps.holdsData(r, lOld)) {
    log(`rebuilding on ${r.name}: ${olds.filesystem}${olds.volumeGroup ? ` in ${olds.volumeGroup}` : ""} -> ` +
      `${v.filesystem}${v.volumeGroup ? ` in ${v.volumeGroup}` : ""}`);
    await r.run(`systemctl start ${q(lOld.units.device)} ${q(lOld.units.mount)}`);
    snapshotId = await finalBackupVerified(r, olds, lOld, log, { users });
    await setRebuild(v, { snapshotId, startedAt: new Date().toISOString() });
    log(`removing the old ${olds.filesystem} storage from ${r.name}`);
    await steps.teardown(r, lOld);
  } else if (snapshotId) {
    log(`resuming the rebuild: restoring final snapshot ${snapshotId.slice(0, 8)}`);
    // A teardown cut off half-way is finished first (the data is in the recorded snapshot).
    if (!(await steps.holdsData(r, l))) await steps.teardown(r, lOld);
  }
  const init = await converge(r, v, lease.token, log, snapshotId);
  // Verified whenever a rebuild is recorded, also when a cut-off run had already restored it.
  const restored = snapshotId ?? init.restoredFrom;
  if (restored) await steps.verifyRestored(r, l, restored, log);
  await setRebuild(v, undefined);
  if (users.length) await r.runArgv(unitsArgv("start", users), { allowFailure: true });
}

/** Drops a switched move's record from the lease (its old host forgotten, left fenced). */
async function forgetMove(v: VolumeInputs): Promise<void> {
  await updateLease(leaseS3(v), v.volumeId, (cur) => {
    if (!cur || !sameHost(cur.holder, hostRef(v)) || !ownsLease(cur, v)) {
      throw new UserError(`volume ${v.volumeId}: this resource's host does not hold the lease${cur ? ` (${hostName(cur.holder)} does)` : ""}`);
    }
    const next: Lease = { ...cur };
    delete next.move;
    return next;
  });
}

/**
 * An update that failed after the move began: the state takes the new inputs (host = the new
 * host) and outputs that name the unfinished move and keep the old host's connection (secret),
 * so that setting host back undoes it and keeping it finishes it. A partial failure to Pulumi:
 * the deployment fails, and the state is written.
 */
function unfinished(id: string, olds: Props, news: Props, origin: VolumeInputs, e: Error, phase: string, since: string): Error {
  const v = news as VolumeInputs;
  const [from, to] = [hostName(hostRef(origin)), hostName(hostRef(v))];
  return partialFailure(id, `${e.message}\nThe move of ${v.volumeId} from ${from} to ${to} is unfinished (phase ${phase}): ` +
    `run pulumi up again to finish it, or set host back to ${from} to undo it.`, { ...olds, ...news,
    unfinishedMove: { from, to, phase, reason: firstLine(e), since }, pendingCleanup: {}, moveOrigin: originOf(origin) });
}

const firstLine = (e: Error) => e.message.split("\n")[0].slice(0, 500);

/** An error Pulumi records as a partial failure: the run fails, and the state takes `properties`. */
function partialFailure(id: string, message: string, properties: Props): Error {
  // reasons: what the engine prints for a partial failure; plain: no undefined in the reply.
  return Object.assign(new Error(message), { id, reasons: [message], properties: plain(properties) });
}

async function moveTo(id: string, o: VolumeInputs, olds: Props, news: Props, log: (m: string) => void) {
  const v = news as VolumeInputs;
  const l = steps.layout(v);
  let report: MoveReport;
  try {
    report = await move(o, v, log, (r, lay, fn) => exclusive(r, lay, log, fn));
  } catch (e) {
    // Where the move stands: from the lease, or, if S3 cannot be read now, as move() last knew it.
    const known = e as { movePhase?: MovePhase; moveStartedAt?: string };
    const m = await readLease(leaseS3(v), v.volumeId).then((x) => x?.lease.move,
      () => known.movePhase ? { from: hostRef(o), to: hostRef(v), phase: known.movePhase, startedAt: known.moveStartedAt ?? "" } : undefined);
    if (m && sameHost(m.from, hostRef(o)) && sameHost(m.to, hostRef(v))) {
      if (m.phase !== "switched") throw unfinished(id, olds, news, o, e as Error, m.phase, m.startedAt);
      // Switched: the volume lives on the new host; only the old host's cleanup is left.
      throw partialFailure(id, `${(e as Error).message}\nVolume ${v.volumeId} lives on ${hostName(hostRef(v))} now; ` +
        "the next pulumi up cleans the old host.", { ...olds, ...news, unfinishedMove: {}, moveOrigin: originOf(o),
        pendingCleanup: { host: hostName(hostRef(o)), reason: firstLine(e as Error) } });
    }
    throw e;
  }
  log(`moved from ${report.from} to ${report.to}: downtime ${report.downtimeSeconds} s (${report.warm ? "warm" : "cold"}); ` +
    Object.entries(report.phases).map(([k, t]) => `${k} ${t} s`).join(", "));
  const pending = report.pendingCleanup
    ? { pendingCleanup: { host: hostName(hostRef(o)), reason: report.pendingCleanup }, moveOrigin: originOf(o) }
    : { pendingCleanup: {}, moveOrigin: null };
  const lastMove = { ...report } as Record<string, unknown>;
  delete lastMove.pendingCleanup;
  return withRemote(v.host, async (r) => {
    const obs = await steps.observe(r, l);
    const snaps = await snapshotsOrUndefined(r, l);
    return { outs: { ...news, ...outputs(l, obs, snaps, { ...olds, lastMove, unfinishedMove: {}, ...pending }) } };
  });
}

export async function update(id: string, olds: Props, news: Props) {
  const v = news as VolumeInputs;
  const log = logger(v);
  const l = steps.layout(v);
  // Where the volume is coming from, while a move is unfinished or its old host not cleaned.
  const origin = isSet(olds.moveOrigin) ? { ...(olds as VolumeInputs), ...(olds.moveOrigin as MoveOrigin) } : undefined;
  const lock = <T>(r: Remote, lay: VolumeLayout, fn: () => Promise<T>) => exclusive(r, lay, log, fn);
  const hostText = (h: VolumeInputs["host"]) => hostName(h);
  if (origin && isSet(olds.unfinishedMove)) {
    if (sameHost(hostRef(origin), hostRef(v))) {
      // host set back to where the volume came from: undo the move. The old host keeps its own
      // layout; other changes made together with the move apply in the next update.
      const back = { ...v, ...(olds.moveOrigin as MoveOrigin), host: v.host };
      const warning = await undoMove(back, olds as VolumeInputs, log, lock);
      const lBack = steps.layout(back);
      return withRemote(v.host, async (r) => {
        const obs = await steps.observe(r, lBack);
        const snaps = await snapshotsOrUndefined(r, lBack);
        return { outs: { ...news, ...(olds.moveOrigin as MoveOrigin), host: v.host, ...outputs(lBack, obs, snaps, { ...olds,
          unfinishedMove: {}, pendingCleanup: {}, moveOrigin: null,
          lastMove: { undone: true, from: hostText(olds.host), to: r.name, ...(warning ? { warning } : {}) } }) } };
      });
    }
    if (!sameHost(hostRef(olds as VolumeInputs), hostRef(v))) {
      throw new UserError(`host: volume ${v.volumeId} is in the middle of a move from ${hostText(origin.host)} to ` +
        `${hostText(olds.host)} (${(olds.unfinishedMove as Props).phase}): set host to ${hostText(olds.host)} ` +
        `to finish it, or back to ${hostText(origin.host)} to undo it, before moving it elsewhere`);
    }
    return moveTo(id, origin, olds, news, log); // finish it
  }
  if (origin && isSet(olds.pendingCleanup)) {
    if (!sameHost(hostRef(olds as VolumeInputs), hostRef(v))) {
      throw new UserError(`host: the old host ${hostText(origin.host)} of volume ${v.volumeId} is not cleaned yet ` +
        `(${(olds.pendingCleanup as Props).reason}): keep host at ${hostText(olds.host)} until a pulumi up has cleaned it ` +
        "(or set force: true to forget it)");
    }
    // The move switched: this cleans the old host, if it is back (the inputs as applied on the new host).
    const done = await moveTo(id, origin, olds, { ...olds, __provider: news.__provider }, log);
    if (isSet(done.outs.pendingCleanup)) {
      if (!v.force) {
        const changed = INPUT_FIELDS.filter((f) => f !== "host" && !same(olds[f], news[f]));
        if (changed.length) {
          throw new UserError(`volume ${v.volumeId}: its old host ${hostText(origin.host)} is still not cleaned ` +
            `(${(done.outs.pendingCleanup as Props).reason}); other changes (${changed.join(", ")}) wait until it is, ` +
            "or set force: true to forget it");
        }
        return { outs: { ...done.outs, host: v.host } };
      }
      log(`force: forgetting the old host ${hostText(origin.host)} without cleaning it; it stays fenced (read-only, no timer, ` +
        `its lease token revoked): clean it by hand (units dboxed-volume-${v.volumeId}-*, /etc/dboxed-volumes/${v.volumeId}, its storage)`);
      await forgetMove(v);
    }
    // Cleaned (or forgotten): the rest is a normal update on the new host (outputs cleared below).
  }
  if (!sameHost(hostRef(olds as VolumeInputs), hostRef(v))) return moveTo(id, olds as VolumeInputs, olds, news, log);
  const o = olds as VolumeInputs;
  const inLease = await readLease(leaseS3(v), v.volumeId).then((x) => x?.lease, () => undefined);
  const pendingInLease = inLease?.move;
  if (pendingInLease && pendingInLease.phase !== "switched" && sameHost(pendingInLease.from, hostRef(o))) {
    // A killed run's move (nothing in the state): undo it. The new host is reached with this
    // host's credentials at the address and pinned key the lease names.
    if (!pendingInLease.to.hostKey) {
      throw new UserError(`volume ${v.volumeId} is in the middle of a move to ${hostName(pendingInLease.to)} started by a run that was cut off; ` +
        `its lease names no host key for that host, so it cannot be undone safely from here: set host to ${hostName(pendingInLease.to)} to finish it`);
    }
    const target = { ...o, host: { ...o.host, address: pendingInLease.to.address, port: pendingInLease.to.port,
      hostKey: pendingInLease.to.hostKey } } as VolumeInputs;
    await undoMove(o, target, log, lock);
  } else if (inLease && ownsLease(inLease, v) && !sameHost(inLease.holder, hostRef(o))) {
    throw new UserError(`volume ${v.volumeId} lives on ${hostName(inLease.holder)} now (a pulumi run that was cut off finished moving it ` +
      `there), not on ${hostText(o.host)}: set host to ${hostName(inLease.holder)}; move it back afterwards if you want`);
  }
  const instanceId = (olds.instanceId as string) || newToken();
  return withRemote(v.host, async (r) => exclusive(r, l, log, async () => {
    if (o.host.address !== v.host.address || Number(o.host.port) !== Number(v.host.port)) {
      // Same pinned key at another address: the same machine, unless hosts were cloned with their keys.
      const obs = await steps.observe(r, steps.layout(o));
      if (!obs.present && !obs.configured) {
        throw new UserError(`host: ${r.name} presents the same host key as ${o.host.address}:${o.host.port}, but volume ${v.volumeId} is not there. ` +
          "If it is another machine, it shares its SSH host keys with the old one (a cloned image?): give it keys of its own (ssh-keygen -A) and pin them");
      }
      log(`${o.host.address}:${o.host.port} is now reached as ${r.name} (same host key): not a move`);
    }
    if (o.filesystem !== v.filesystem || (o.volumeGroup ?? "") !== (v.volumeGroup ?? "")) {
      await rebuild(r, o, v, instanceId, log);
    } else {
      const { lease } = await claim({ ...v, force: false }, { instance: instanceId, adoptLegacy: true });
      await converge(r, v, lease.token, log);
      if (v.size > (o.size ?? 0)) {
        log(`growing to ${formatSize(v.size)}`);
        await steps.grow(r, v, l);
      }
      if (o.backupSchedule !== v.backupSchedule || o.backupRandomDelay !== v.backupRandomDelay) await r.runArgv(["systemctl", "restart", l.units.timer]);
    }
    const obs = await steps.observe(r, l);
    const snaps = await snapshotsOrUndefined(r, l);
    return { outs: { ...news, ...outputs(l, obs, snaps, { ...olds, instanceId, unfinishedMove: {}, pendingCleanup: {}, moveOrigin: null }) } };
  }), { log });
}

export async function remove(id: string, props: Props) {
  const v = props as VolumeInputs;
  const log = logger(v);
  const l = steps.layout(v);
  if (isSet(props.unfinishedMove) && isSet(props.moveOrigin)) {
    const o = props.moveOrigin as MoveOrigin;
    throw new UserError(`volume ${v.volumeId} is in the middle of a move from ${o.host.address}:${o.host.port} to ${v.host.address}:${v.host.port}: ` +
      `its data is on the old host, read-only. Set host back to ${o.host.address}:${o.host.port} and run pulumi up (undoes the move), ` +
      "or keep it and run pulumi up (finishes it), then delete");
  }
  await withRemote(v.host, async (r) => exclusive(r, l, log, async () => {
    const obs = await steps.observe(r, l);
    const initialized = (await r.run(`test -e ${q(l.stateDir + "/initialized")}`, { allowFailure: true })).code === 0;
    const instanceId = props.instanceId as string | undefined;
    if (!obs.present && !obs.configured) {
      log(`nothing left on ${r.name}`);
      await release(v, instanceId);
      return;
    }
    const lease = await readLease(leaseS3(v), v.volumeId);
    const mv = lease?.lease.move;
    if (mv && mv.phase !== "switched" && lease && ownsLease(lease.lease, v) && (sameHost(mv.from, hostRef(v)) || sameHost(mv.to, hostRef(v)))) {
      // A run cut off mid-move (nothing in the state): finish or undo it before deleting.
      throw new UserError(`volume ${v.volumeId} is in the middle of a move from ${hostName(mv.from)} to ${hostName(mv.to)} (phase ${mv.phase}), ` +
        `started by a pulumi run that was cut off: run pulumi up with host ${hostName(mv.from)} (undoes it) or ${hostName(mv.to)} ` +
        "(finishes it), then delete");
    }
    let users: string[] = [];
    const fenced = !!lease && (!sameHost(lease.lease.holder, hostRef(v)) || !ownsLease(lease.lease, v) || otherInstance(lease.lease, instanceId));
    if (fenced && sameHost(lease!.lease.holder, hostRef(v))) {
      // The volume here is held by another resource, or by this one's replacement: not ours to remove.
      log(`volume ${v.volumeId} on ${r.name} now belongs to ${lease!.lease.owner ? ownerName(lease!.lease.owner) : "another resource"}` +
        `${otherInstance(lease!.lease, instanceId) ? " (this resource's replacement)" : ""}: leaving it in place`);
      return;
    }
    if (fenced) {
      log(`${r.name} no longer holds volume ${v.volumeId} (${hostName(lease!.lease.holder)} does): no final backup from here`);
    } else if (v.forgetSnapshotsOnDelete) {
      await r.runArgv(["systemctl", "stop", l.units.timer], { allowFailure: true });
      try {
        await steps.forgetSnapshots(r, l, log);
      } catch (e) {
        await giveBack(r, l, []);
        throw new UserError(`${(e as Error).message}\nThe volume was left in place on ${r.name}, mounted and scheduled as before.`);
      }
    } else if (v.finalBackupOnDelete && initialized && obs.present) {
      // Not mounted (e.g. a failed boot): mount it so the final backup sees its latest data.
      if (!obs.mounted) await r.runArgv(["systemctl", "start", l.units.device, l.units.mount]);
      // The declared users (stopUnits, units that require the mount) stop as in a move: the
      // teardown would stop the latter anyway, and a writer would make the remount fail.
      users = await steps.usersOf(r, v, l);
      await finalBackupVerified(r, v, l, log, { users });
    } else if (v.finalBackupOnDelete && !initialized && obs.configured) {
      log("the volume never finished its first restore: no final backup (the repository holds its data)");
    }
    log(`removing from ${r.name}`);
    try {
      await steps.teardown(r, l);
    } catch (e) {
      if (!fenced) await giveBack(r, l, users);
      throw new UserError(`${(e as Error).message}\nThe volume was left in place on ${r.name}` +
        `${fenced ? "" : `: mounted read-write and scheduled as before${users.length ? `, ${users.join(", ")} started again` : ""}`}; fix the cause and run again.`);
    }
    await release(v, instanceId);
  }), { log });
}
