// The Volume resource's lifecycle: check, diff, create, read, update, delete.
// The dynamic-provider contract rules every step: if create fails, the volume must be able to be
// created again by the next `pulumi up` (every host step is resumable); if delete fails, the
// volume is still there, with its data.
import { adoptionHint, dialing, HostUnreachable, UserError } from "../errors";
import { parseSize, PROXY_ABSENT, volumeSchema, VolumeInputs, formatSize } from "../inputs";
import { legacyDefaultVolumeId } from "../volumeId";
import { VolumeLayout } from "../host/layout";
import { Snapshot } from "../host/rustic";
import { quote as q } from "../host/shell";
import { Remote, withRemote } from "../remote/ssh";
import { checkInputs } from "./check";
import { progress } from "./progress";
import * as steps from "./steps";
import { claim, holderLayout, hostRef, leaseS3, leaseView, otherInstance, ownsLease, release, setDeleting, setRebuild, VolumeRef } from "./lease";
import { checkMoveTarget, move, MoveOptions, MoveReport, Redecide } from "./move";
import { Action, decide, describe as describeAction, Desired, isWork, newHostMayHaveServed, oldHostFenced, reached as phaseReached, StateView } from "./placement";
import { containsUnknown } from "./unknowns";
import { giveBack, undoMove } from "./undo";
import {
  DEFAULT_LEASE_SECONDS, HostRef, Lease, MovePhase, readLease, readLeaseAndClock, RebuildLayout, sameHost, sameOwner, hostName, newToken, updateLease,
} from "../storage/lease";
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
  /** A delete or rebuild cut off on the volume's host (op, since; {} when none): the next update repairs it. */
  interruptedOperation: Record<string, unknown>;
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

/** The placement's view of the Pulumi state: where it has the volume, and any move or cleanup it recorded. */
function stateView(olds: Props, origin: VolumeRef | undefined): StateView {
  const S = hostRef(olds as VolumeInputs);
  const um = olds.unfinishedMove as Props | undefined;
  if (origin && isSet(um)) return { host: S, move: { from: hostRef(origin), to: S, phase: (um!.phase as MovePhase) ?? "warm" } };
  if (origin && isSet(olds.pendingCleanup)) return { host: S, pendingCleanup: hostRef(origin) };
  return { host: S };
}

function desiredOf(v: VolumeInputs): Desired {
  return { host: hostRef(v), force: !!v.force, forceDespiteLiveLease: !!v.forceDespiteLiveLease };
}

/** Where a move came from (the state's moveOrigin on top of its inputs), while one is unfinished or not cleaned. */
function originOfState(olds: Props, o: VolumeRef): VolumeRef | undefined {
  return isSet(olds.moveOrigin) ? { ...o, ...(olds.moveOrigin as MoveOrigin) } : undefined;
}

/** What diff decides, without touching a host: the changes, and whether they move the volume to another machine. */
export async function planDiff(olds: Props, news: Props) {
  // Fields added later: a state without them had their default (no diff for existing stacks).
  const added: Record<string, unknown> = { leaseDuration: DEFAULT_LEASE_SECONDS, forceDespiteLiveLease: false };
  const changes: string[] = INPUT_FIELDS.filter((f) => !same(olds[f] ?? added[f], news[f] ?? added[f]));
  // A renamed stack, project or resource (an alias): the lease is re-owned by the next update.
  if (olds.owner && news.owner && !sameOwner(olds.owner, news.owner)) changes.push("owner");
  // An unfinished move (to finish or undo) or an old host to clean is work for an update too.
  if (isSet(olds.unfinishedMove) || isSet(olds.pendingCleanup)) changes.push("host");
  else if (!changes.length && olds.repository && olds.host && news.host && !containsUnknown(news)) {
    // What only the lease knows (a run cut off mid-move, a move finished elsewhere, a delete or
    // rebuild cut off): the placement decides whether an update has work. One S3 read, no SSH.
    const o: VolumeRef = { ...(olds as VolumeInputs), instanceId: (olds.instanceId as string) || undefined };
    const v: VolumeRef = { ...(news as VolumeInputs), instanceId: o.instanceId };
    const read = await readLeaseAndClock(leaseS3(o), o.volumeId).catch(() => undefined);
    if (read) {
      const action = decide({ op: "update", state: stateView(olds, undefined), desired: desiredOf(v), lease: leaseView(read.found?.lease, v, read.clock) });
      if (isWork(action, hostRef(o))) changes.push("host");
    }
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
    interruptedOperation: prev.interruptedOperation ?? {},
  };
}

/** Everything that makes a volume run on a host; each step skips what is already done. */
async function converge(r: Remote, v: VolumeInputs, leaseToken: string, log: (m: string) => void,
  restore?: string, preflightDone = false, clone?: steps.SourceSnapshot, made?: { storage: boolean }): Promise<{ restoredFrom?: string; snapshots?: Snapshot[]; clonedFrom?: Record<string, string> }> {
  const l = steps.layout(v);
  // A copy left fenced here by a move (a cut-off undo, or an old host never cleaned before the
  // volume came back): given back when it is the repository's latest state, else discarded.
  let users: string[] = [];
  if (await steps.fencedLeftover(r, l)) users = await takeBackFenced(r, l, log);
  if (!preflightDone) await steps.preflight(r, v, l);
  await steps.installTools(r, v, log);
  await steps.writeConfig(r, v, l, leaseToken);
  if (await steps.ensureStorage(r, v, l) && made) made.storage = true;
  await steps.installUnits(r, v, l);
  const init = await steps.initialize(r, l, log, restore, clone);
  await steps.startTimer(r, l);
  if (users.length) await r.runArgv(unitsArgv("start", users), { allowFailure: true });
  const cloned = clone?.snapshot && init.restoredFrom === clone.snapshot.id
    ? { volumeId: clone.volumeId, snapshotId: clone.snapshot.id, snapshotTime: clone.snapshot.time } : undefined;
  return { ...init, clonedFrom: cloned };
}

/**
 * A fenced copy of the volume on r, met where the lease lets this resource run it: if its last
 * backup is the repository's latest snapshot (it was read-only since), it is the volume's latest
 * state and is given back (the users the fence kept are returned, to start); otherwise the volume
 * went on elsewhere since, and the copy is removed (the restore that follows brings the latest).
 */
async function takeBackFenced(r: Remote, l: VolumeLayout, log: (m: string) => void): Promise<string[]> {
  const status = await steps.readStatus(r, l);
  const latest = (await steps.listSnapshots(r, l)).slice(-1)[0];
  if (latest && status.snapshotId === latest.id) {
    const users = await steps.fencedUsers(r, l);
    log(`${r.name} holds a fenced copy of ${l.volumeId} whose last backup ${latest.id.slice(0, 8)} is the latest snapshot: giving it back`);
    await steps.unfence(r, l);
    await steps.unquiesce(r, l);
    return users;
  }
  log(`${r.name} holds an old fenced copy of ${l.volumeId} (its last backup ${status.snapshotId?.slice(0, 8) || "none"} is not the latest ` +
    `snapshot ${latest?.id.slice(0, 8) ?? "(none)"}): removing it; the latest snapshot is restored instead`);
  await steps.teardown(r, l);
  return [];
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
    // Where the id's volume is (a move of this resource in flight, or living elsewhere for it).
    // Another resource's lease is left to the claim, a compare-and-swap that names its owner.
    const { found, clock } = await readLeaseAndClock(leaseS3(v), v.volumeId);
    const view = leaseView(found?.lease, { ...v, instanceId }, clock);
    const a = decide({ op: "create", desired: desiredOf(v), lease: view });
    if (a.kind === "refuse" && view?.ours) throw new UserError(`volume ${v.volumeId}: ${a.message}`);
    const { lease, forcedFrom, fresh } = await claim(v, { instance: instanceId, adoptLegacy: false });
    // Taken by force: what this host holds of the volume from before is kept only if it is the latest.
    if (forcedFrom) await discardIfStale(r, v, l, log);
    let touched = false;
    const made = { storage: false };
    try {
      await steps.preflight(r, v, l);
      await steps.checkRoom(r, v, l);
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
  const v: VolumeRef = { ...(props as VolumeInputs), instanceId: (props.instanceId as string) || undefined };
  const l = steps.layout(v);
  const origin = originOfState(props, v);
  // The lease first. Without it (S3 unreachable) a volume on its state's host is still reported,
  // but none is ever dropped, nor found elsewhere, for want of it: the refresh fails then.
  let leaseError: Error | undefined;
  const read = await readLeaseAndClock(leaseS3(v), v.volumeId).catch((e) => { leaseError = e as Error; return undefined; });
  const cur = read?.found?.lease;
  const lease = read ? leaseView(cur, v, read.clock) : undefined;
  let observed: { obs: steps.Observed; snaps?: Snapshot[] } | undefined;
  try {
    observed = await withRemote(v.host, async (r) => {
      const obs = await steps.observe(r, l);
      return { obs, snaps: obs.present || obs.configured ? await snapshotsOrNote(r, l, v) : undefined };
    });
  } catch (e) {
    // The state's host is unreachable: fine when the volume lives elsewhere (it is recorded there).
    if (leaseError || decide({ op: "read", state: stateView(props, origin), lease, presentOnStateHost: true }).kind !== "relocate") throw e;
  }
  if (leaseError && !(observed!.obs.present || observed!.obs.configured)) throw leaseError;
  const action = leaseError ? { kind: "observe" as const, host: hostRef(v) }
    : decide({ op: "read", state: stateView(props, origin), lease, presentOnStateHost: observed ? observed.obs.present || observed.obs.configured : true });
  // A move cut off with the CLI (nothing in the state) shows from the lease; so does a cut-off delete or rebuild.
  const fromLease = (at: HostRef): Props => {
    const m = cur?.move;
    const unfinishedMove = isSet(props.moveOrigin) ? props.unfinishedMove
      : m && m.phase !== "switched" && ownsLease(cur!, v) && (sameHost(m.from, at) || sameHost(m.to, at))
        ? { from: hostName(m.from), to: hostName(m.to), phase: m.phase, reason: "a pulumi run stopped during the move", since: m.startedAt } : {};
    const interruptedOperation = cur && ownsLease(cur, v) && sameHost(cur.holder, at) && (cur.deleting || cur.rebuild)
      ? { op: cur.deleting ? "delete" : "rebuild", since: (cur.deleting ?? cur.rebuild)!.startedAt } : {};
    return { unfinishedMove, interruptedOperation };
  };
  switch (action.kind) {
    case "observe":
      return { id, props: { ...props, ...outputs(l, observed!.obs, observed!.snaps, { ...props, ...fromLease(hostRef(v)) }) } };
    case "relocate": {
      // Never dropped: the volume lives on another host of this resource (a cut-off run moved it).
      const at = inputsAt(action.to, v, v, origin, cur);
      const lAt = steps.layout(at);
      logger(v)(`${action.message}`);
      const there = await withRemote(at.host, async (r) => {
        const obs = await steps.observe(r, lAt);
        return { obs, snaps: await snapshotsOrNote(r, lAt, v) };
      }, { attempts: 1, dialTimeoutMs: 15_000 }).catch(() => undefined);
      // What is left on the state's host (a move switched, its cleanup cut off) is cleaned by the next up.
      const leftover = action.leftoverOn
        ? { pendingCleanup: { host: hostName(action.leftoverOn), reason: "a pulumi run that was cut off moved the volume; its old copy is still there" },
          moveOrigin: originOf(v) }
        : { pendingCleanup: {}, moveOrigin: null };
      const base = { ...props, host: at.host, ...(props.hostAddress !== undefined ? { hostAddress: at.host.address } : {}),
        mountPath: at.mountPath, filesystem: at.filesystem, volumeGroup: at.volumeGroup, unfinishedMove: {}, ...leftover };
      // plain: no undefined (a volumeGroup that is none) in the reply, the engine cannot encode it.
      return { id, props: plain(there ? { ...base, ...outputs(lAt, there.obs, there.snaps, { ...base, ...fromLease(action.to) }) } : base) };
    }
    default:
      // Gone from its host, and nowhere else this resource holds it: gone.
      return { id: "", props: {} };
  }
}

async function snapshotsOrNote(r: Remote, l: VolumeLayout, v: VolumeInputs): Promise<Snapshot[] | undefined> {
  try {
    return await steps.listSnapshots(r, l);
  } catch (e) {
    logger(v)(`cannot list snapshots (${(e as Error).message.split("\n")[0]}); keeping the last known values`);
    return undefined;
  }
}

/**
 * The inputs that reach host h: the desired ones, the state's, the move's origin, or (a host only
 * the lease names) the state's connection at h's address with the layout the lease records there.
 */
function inputsAt(h: HostRef, v: VolumeRef, o: VolumeRef, origin?: VolumeRef, lease?: Lease): VolumeRef {
  if (sameHost(h, hostRef(v))) return v;
  if (sameHost(h, hostRef(o))) return o;
  if (origin && sameHost(h, hostRef(origin))) return origin;
  const layout = lease?.move?.toLayout && sameHost(lease.move.to, h) ? lease.move.toLayout
    : lease?.layout && sameHost(lease.holder, h) ? lease.layout : undefined;
  return { ...o, ...(layout ? { mountPath: layout.mountPath, filesystem: layout.filesystem, volumeGroup: layout.volumeGroup } : {}),
    host: { ...o.host, address: h.address, port: h.port, hostKey: h.hostKey ?? o.host.hostKey } };
}

/**
 * Stops the volume's users and schedule, makes it read-only, takes the final backup and verifies
 * it against the read-only tree. On failure the volume is given back: read-write, scheduled, its
 * users started again.
 */
async function finalBackupVerified(r: Remote, v: VolumeInputs, l: VolumeLayout, log: (m: string) => void,
  opts: { users: string[] }): Promise<string> {
  const users = opts.users;
  await steps.waitForPrune(v, log);
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


/** The layout fields a rebuild changes. */
const layoutOf = (v: Pick<VolumeInputs, "filesystem" | "volumeGroup">): RebuildLayout =>
  plain({ filesystem: v.filesystem, ...(v.volumeGroup ? { volumeGroup: v.volumeGroup } : {}) });
const sameLayout = (a: RebuildLayout, b: RebuildLayout) => a.filesystem === b.filesystem && (a.volumeGroup ?? "") === (b.volumeGroup ?? "");

/**
 * A new filesystem or volumeGroup on the same host: final backup of the read-only volume
 * (verified), the old storage removed, the new one created and the final snapshot restored.
 * The rebuild is recorded in the lease before the volume stops, and its snapshot once taken, so
 * a run cut off anywhere is finished by the next, or rolled back when the change was reverted
 * (`v` then has the layout the volume had: see repairRebuild).
 */
async function rebuild(r: Remote, olds: VolumeRef, v: VolumeRef, instanceId: string, log: (m: string) => void) {
  const { lease } = await claim({ ...v, force: false }, { instance: instanceId, adoptLegacy: true });
  const rec = lease.rebuild;
  // The layout the volume is leaving: as the lease recorded it when a cut-off run started it.
  const from: VolumeRef = rec?.from ? { ...olds, ...rec.from, volumeGroup: rec.from.volumeGroup } : olds;
  const lFrom = steps.layout(from), l = steps.layout(v);
  const users = [...new Set([...await steps.usersOf(r, from, lFrom), ...v.stopUnits])];
  let snapshotId = rec?.snapshotId;
  if (await steps.holdsData(r, lFrom)) {
    if (sameLayout(layoutOf(from), layoutOf(v))) {
      // Reverted before the old storage went: it is given back as it was.
      log(`the rebuild was cut off and its change reverted: ${r.name} keeps its ${from.filesystem} storage`);
      await giveBack(r, lFrom, users);
      await setRebuild(v, undefined);
      return;
    }
    log(`rebuilding on ${r.name}: ${from.filesystem}${from.volumeGroup ? ` in ${from.volumeGroup}` : ""} -> ` +
      `${v.filesystem}${v.volumeGroup ? ` in ${v.volumeGroup}` : ""}`);
    const startedAt = rec?.startedAt ?? new Date().toISOString();
    // Intent first: a run cut off from here on is repaired from this record.
    await setRebuild(v, { startedAt, from: layoutOf(from), to: layoutOf(v) });
    await r.run(`systemctl start ${q(lFrom.units.device)} ${q(lFrom.units.mount)}`);
    try {
      snapshotId = await finalBackupVerified(r, from, lFrom, log, { users });
    } catch (e) {
      await setRebuild(v, undefined).catch(() => undefined);
      throw e;
    }
    await setRebuild(v, { snapshotId, startedAt, from: layoutOf(from), to: layoutOf(v) });
    log(`removing the old ${from.filesystem} storage from ${r.name}`);
    await steps.teardown(r, lFrom);
  } else if (snapshotId) {
    log(`resuming the rebuild: restoring final snapshot ${snapshotId.slice(0, 8)}`);
    // What a cut-off run left of the old storage, or of a layout it was building that is not wanted
    // now, goes first (the data is in the recorded, verified snapshot).
    if (!(await steps.holdsData(r, l))) {
      await steps.teardown(r, lFrom);
      if (rec?.to && !sameLayout(rec.to, layoutOf(v))) await steps.teardown(r, steps.layout({ ...v, ...rec.to, volumeGroup: rec.to.volumeGroup }));
    }
  } else if (rec) {
    // Recorded, but the old storage does not hold the data and no snapshot was taken: never guess.
    throw new UserError(`volume ${v.volumeId} on ${r.name}: a rebuild was recorded but neither its ${from.filesystem} storage nor a final ` +
      "snapshot holds the data; nothing was changed: check the host");
  }
  const init = await converge(r, v, lease.token, log, snapshotId);
  // Verified whenever a rebuild is recorded, also when a cut-off run had already restored it.
  const restored = snapshotId ?? init.restoredFrom;
  if (restored) await steps.verifyRestored(r, l, restored, log);
  await setRebuild(v, undefined);
  if (users.length) await r.runArgv(unitsArgv("start", users), { allowFailure: true });
}

/** Drops a switched move's record from the lease (its old host forgotten, left fenced). */
async function forgetMove(v: VolumeRef): Promise<void> {
  await updateLease(leaseS3(v), v.volumeId, (cur) => {
    if (!cur || !sameHost(cur.holder, hostRef(v)) || !ownsLease(cur, v)) {
      throw new UserError(`volume ${v.volumeId}: this resource's host does not hold the lease${cur ? ` (${hostName(cur.holder)} does)` : ""}`);
    }
    const next: Lease = { ...cur, owner: v.owner ?? cur.owner };
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
function unfinished(id: string, olds: Props, news: Props, origin: VolumeInputs, e: Error, phase: MovePhase, since: string): Error {
  const v = news as VolumeInputs;
  const [from, to] = [hostName(hostRef(origin)), hostName(hostRef(v))];
  const way = newHostMayHaveServed(phase) ? "run pulumi up again to finish it (it reached its switch: it can no longer be undone)"
    : `run pulumi up again to finish it, or set host back to ${from} to undo it`;
  return partialFailure(id, `${e.message}\nThe move of ${v.volumeId} from ${from} to ${to} is unfinished (phase ${phase}): ${way}.`,
    { ...olds, ...news, unfinishedMove: { from, to, phase, reason: firstLine(e), since }, pendingCleanup: {}, moveOrigin: originOf(origin) });
}

const firstLine = (e: Error) => e.message.split("\n")[0].slice(0, 500);

/** An error Pulumi records as a partial failure: the run fails, and the state takes `properties`. */
function partialFailure(id: string, message: string, properties: Props): Error {
  // reasons: what the engine prints for a partial failure; plain: no undefined in the reply.
  return Object.assign(new Error(message), { id, reasons: [message], properties: plain(properties) });
}

async function moveTo(id: string, o: VolumeRef, olds: Props, news: Props, v: VolumeRef, log: (m: string) => void, opts: MoveOptions = {}) {
  const l = steps.layout(v);
  let report: MoveReport;
  try {
    report = await move(o, v, log, (r, lay, fn) => exclusive(r, lay, log, fn), opts);
  } catch (e) {
    // Nothing done by this run yet: the caller decides again (a host unreachable, the lease moved on).
    if (e instanceof HostUnreachable || e instanceof Redecide) throw e;
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
  if (report.pendingCleanup && v.force) {
    log(`force: forgetting the old host ${hostName(hostRef(o))} without cleaning it; it stays fenced (read-only, no timer, ` +
      `its lease token revoked): clean it by hand (units dboxed-volume-${v.volumeId}-*, /etc/dboxed-volumes/${v.volumeId}, its storage)`);
    await forgetMove(v);
    Object.assign(pending, { pendingCleanup: {}, moveOrigin: null });
  }
  return withRemote(v.host, async (r) => {
    if (report.resumedFrom && phaseReached(report.resumedFrom, "switching")) {
      // Resumed past its switch, the new host was not prepared in this run: its settings and units
      // are written as this run declares them (keys, schedule, retention changed meanwhile).
      await exclusive(r, l, log, async () => {
        const cur = (await readLease(leaseS3(v), v.volumeId))?.lease;
        if (cur && sameHost(cur.holder, hostRef(v))) {
          await steps.writeConfig(r, v, l, cur.token);
          await steps.writeUnits(r, v, l);
        }
      });
    }
    let obs = await steps.observe(r, l);
    // A larger size declared with the move (or while it was resumed): grown on the new host.
    if (obs.present && obs.mounted && (obs.sizeBytes ?? 0) < v.size) {
      log(`growing to ${formatSize(v.size)} on ${r.name}`);
      await exclusive(r, l, log, () => steps.grow(r, v, l));
      obs = await steps.observe(r, l);
    }
    const snaps = await snapshotsOrUndefined(r, l);
    return { outs: { ...news, ...outputs(l, obs, snaps, { ...olds, instanceId: v.instanceId ?? olds.instanceId, lastMove, unfinishedMove: {},
      interruptedOperation: {}, ...pending }) } };
  });
}

interface UpdateContext { id: string; olds: Props; news: Props; v: VolumeRef; o: VolumeRef; origin?: VolumeRef; log: (m: string) => void; lease?: Lease }

export async function update(id: string, olds: Props, news: Props) {
  const instanceId = (olds.instanceId as string) || undefined;
  const v: VolumeRef = { ...(news as VolumeInputs), instanceId };
  const o: VolumeRef = { ...(olds as VolumeInputs), instanceId };
  const ctx: UpdateContext = { id, olds, news, v, o, origin: originOfState(olds, o), log: logger(v) };
  // Observe, decide, act; again when what an action met differs from what the decision saw (a
  // host that cannot be reached, a lease another run changed while this one waited for its locks).
  const unreachable: HostRef[] = [];
  let last: Error | undefined;
  for (let round = 0; round < 5; round++) {
    const { found, clock } = await readLeaseAndClock(leaseS3(v), v.volumeId);
    const action = decide({ op: "update", state: stateView(olds, ctx.origin), desired: desiredOf(v), lease: leaseView(found?.lease, v, clock), unreachable });
    if (round > 0 || !(action.kind === "converge" || action.kind === "move")) ctx.log(`placement: ${describeAction(action)}`);
    try {
      return await carryOut(action, { ...ctx, lease: found?.lease });
    } catch (e) {
      if (e instanceof HostUnreachable && !unreachable.some((h) => sameHost(h, e.host))) {
        unreachable.push(e.host);
      } else if (e instanceof Redecide) {
        ctx.log(`${e.message}: deciding again`);
      } else {
        throw e;
      }
      last = e as Error;
    }
  }
  throw last!;
}

async function carryOut(a: Action, ctx: UpdateContext) {
  const { id, olds, news, v, o, origin, log } = ctx;
  const at = (h: HostRef) => inputsAt(h, v, o, origin, ctx.lease);
  switch (a.kind) {
    case "refuse":
      throw new UserError(`volume ${v.volumeId}: ${a.message}`);
    case "relocate": {
      // The state follows the volume: it lives on a.to, reached with the state's connection settings.
      const there = at(a.to);
      throw partialFailure(id, `volume ${v.volumeId}: ${a.message}`, { ...olds, host: there.host,
        mountPath: there.mountPath, filesystem: there.filesystem, volumeGroup: there.volumeGroup,
        ...(olds.hostAddress !== undefined ? { hostAddress: there.host.address } : {}), unfinishedMove: {}, pendingCleanup: {}, moveOrigin: null });
    }
    case "move":
      return moveTo(id, at(a.from), olds, news, { ...v, ...(sameHost(a.to, hostRef(v)) ? {} : { host: at(a.to).host }) }, log);
    case "finishWithoutOld":
      return moveTo(id, at(a.from), olds, news, v, log, { withoutOld: true });
    case "undo":
      return undo(ctx, a.back, a.target);
    case "cleanup": {
      // The move switched: this cleans the old host, if it is back (the inputs as applied on the new host).
      const done = await moveTo(id, origin!, olds, { ...olds, __provider: news.__provider }, o, log);
      if (isSet(done.outs.pendingCleanup)) {
        if (!v.force) {
          const changed = INPUT_FIELDS.filter((f) => f !== "host" && !same(olds[f], news[f]));
          if (changed.length) {
            throw new UserError(`volume ${v.volumeId}: its old host ${hostName(hostRef(origin!))} is still not cleaned ` +
              `(${(done.outs.pendingCleanup as Props).reason}); other changes (${changed.join(", ")}) wait until it is, ` +
              "or set force: true to forget it");
          }
          return { outs: { ...done.outs, host: v.host } };
        }
        log(`force: forgetting the old host ${hostName(hostRef(origin!))} without cleaning it; it stays fenced (read-only, no timer, ` +
          `its lease token revoked): clean it by hand (units dboxed-volume-${v.volumeId}-*, /etc/dboxed-volumes/${v.volumeId}, its storage)`);
        await forgetMove(v);
      }
      // Cleaned (or forgotten): the rest is a normal update on the new host (outputs cleared there).
      return inPlace(ctx);
    }
    case "repair":
      return inPlace(ctx, a.op);
    case "take":
      return takeOver(ctx, at(a.from), a.ownHost);
    case "converge":
      return inPlace(ctx);
    default:
      throw new Error(`volume ${v.volumeId}: no update action for ${a.kind}`);
  }
}

/** Undoes a move that has not begun its switch: `back` gets the volume again, `target` is cleaned. */
async function undo(ctx: UpdateContext, backHost: HostRef, targetHost: HostRef) {
  const { news, olds, v, o, origin, log } = ctx;
  const lock = <T>(r: Remote, lay: VolumeLayout, fn: () => Promise<T>) => exclusive(r, lay, log, fn);
  let back: VolumeRef, target: VolumeRef;
  if (origin && sameHost(hostRef(origin), backHost)) {
    // The state recorded the move: the old host keeps its own layout; other changes made together
    // with the move apply in the next update.
    back = { ...v, ...(olds.moveOrigin as MoveOrigin), host: v.host };
    target = o;
  } else {
    // A killed run's move (nothing in the state): the new host is reached with this host's
    // credentials at the address and pinned key the lease names.
    if (!targetHost.hostKey) {
      throw new UserError(`volume ${v.volumeId} is in the middle of a move to ${hostName(targetHost)} started by a run that was cut off; ` +
        `its lease names no host key for that host, so it cannot be undone safely from here: set host to ${hostName(targetHost)} to finish it`);
    }
    back = o;
    target = inputsAt(targetHost, v, o, origin, ctx.lease);
  }
  const warning = await dialing(backHost, () => undoMove(back, target, log, lock));
  const lBack = steps.layout(back);
  return withRemote(back.host, async (r) => {
    const obs = await steps.observe(r, lBack);
    const snaps = await snapshotsOrUndefined(r, lBack);
    const restored = origin && sameHost(hostRef(origin), backHost) ? { ...(olds.moveOrigin as MoveOrigin), host: v.host } : {};
    return { outs: { ...news, ...restored, ...outputs(lBack, obs, snaps, { ...olds,
      unfinishedMove: {}, pendingCleanup: {}, moveOrigin: null, interruptedOperation: {},
      lastMove: { undone: true, from: hostName(targetHost), to: r.name, ...(warning ? { warning } : {}) } }) } };
  });
}

/**
 * The host the volume lives on is gone for good: the volume is taken from it by force (its lease
 * expired, or forceDespiteLiveLease) and its latest snapshot restored on the declared host. A
 * host of this resource's own is left to clean once it is back (the lease records it as a forced
 * move, so that its copy, never fenced, is removed without a backup); another resource's host is
 * that resource's to clean.
 */
async function takeOver(ctx: UpdateContext, from: VolumeRef, ownHost: boolean) {
  const { olds, news, v, log } = ctx;
  const l = steps.layout(v);
  const instanceId = v.instanceId ?? newToken();
  const fromHost = hostRef(from);
  const leftBehind = ownHost && !sameHost(fromHost, hostRef(v));
  if (isSet(olds.pendingCleanup) && ctx.origin && !sameHost(hostRef(ctx.origin), hostRef(v))) {
    log(`force: forgetting the old host ${hostName(hostRef(ctx.origin))} of the last move without cleaning it; it stays fenced: clean it by hand`);
  }
  const lm = ctx.lease?.move;
  if (lm && !lm.forced && oldHostFenced(lm.phase) && !sameHost(lm.from, hostRef(v)) && !sameHost(lm.from, fromHost)) {
    log(`${hostName(lm.from)} keeps a fenced copy from the move to ${hostName(lm.to)}: remove it by hand (a volume declared there again discards it)`);
  }
  return dialing(hostRef(v), () => withRemote(v.host, async (r) => exclusive(r, l, log, async () => {
    await steps.preflight(r, v, l, { readOnly: true });
    const { lease, forcedFrom } = await claim({ ...v, instanceId }, { instance: instanceId, adoptLegacy: false });
    if (leftBehind) {
      await updateLease(leaseS3(v), v.volumeId, (cur) => {
        if (!cur || cur.token !== lease.token) throw new UserError(`volume ${v.volumeId}: the lease changed right after the takeover (another run?)`);
        return { ...cur, move: { from: fromHost, to: hostRef(v), phase: "switched", newToken: lease.token, startedAt: new Date().toISOString(),
          forced: true, toLayout: holderLayout(v) } };
      });
    }
    // What this host holds of the volume from before (it lived here once) is not trusted blindly.
    await discardIfStale(r, v, l, log);
    const init = await converge(r, v, lease.token, log);
    const snaps = init.snapshots ?? await steps.listSnapshots(r, l);
    const used = snaps.find((s) => s.id === init.restoredFrom);
    const lostSeconds = used ? Math.round((Date.now() - Date.parse(used.time)) / 1000) : null;
    log(`FORCED takeover from ${hostName(fromHost)}: restored snapshot ${init.restoredFrom?.slice(0, 8) ?? "(none)"} of ${used?.time ?? "never"}; ` +
      `anything written on ${hostName(fromHost)} after it (up to ${lostSeconds ?? "?"} s) is lost` +
      (leftBehind ? `; ${hostName(fromHost)} is cleaned by a later pulumi up once it is back` : ""));
    await steps.runBackup(r, l, log);
    const obs = await steps.observe(r, l);
    const lastMove = { forced: true, from: hostName(forcedFrom?.holder ?? fromHost), to: r.name, snapshotId: init.restoredFrom ?? "",
      snapshotTime: used?.time ?? "", dataLossWindowSeconds: lostSeconds };
    const pending = leftBehind
      ? { pendingCleanup: { host: hostName(fromHost), reason: "given up by force: it may still hold its old copy" }, moveOrigin: originOf(from) }
      : { pendingCleanup: {}, moveOrigin: null };
    return { outs: { ...news, ...outputs(l, obs, await snapshotsOrUndefined(r, l), { ...olds, instanceId, lastMove, unfinishedMove: {},
      interruptedOperation: {}, ...pending }, init.restoredFrom ?? "") } };
  }), { log }));
}

/**
 * A copy of the volume on r from before a forced takeover (it lived here once, or another
 * resource had it here): kept only when its last backup is the repository's latest snapshot
 * (nothing newer exists elsewhere), else removed (its users stopped first) for the latest to be
 * restored. A fenced copy is converge's (takeBackFenced).
 */
async function discardIfStale(r: Remote, v: VolumeRef, l: VolumeLayout, log: (m: string) => void): Promise<void> {
  const obs = await steps.observe(r, l);
  if (!obs.configured || await steps.fencedLeftover(r, l)) return;
  const latest = (await steps.listSnapshots(r, l)).slice(-1)[0];
  if (obs.status.snapshotId && latest && obs.status.snapshotId === latest.id) return;
  log(`${r.name} holds an old copy of ${v.volumeId} (its last backup ${obs.status.snapshotId?.slice(0, 8) || "none"} is not the latest snapshot ` +
    `${latest?.id.slice(0, 8) ?? "(none)"}): removing it; the latest snapshot is restored instead`);
  const users = await steps.usersOf(r, v, l);
  if (users.length) await r.runArgv(["systemctl", "stop", ...users], { allowFailure: true });
  await steps.teardown(r, l);
}

/** An update on the host the volume lives on: converge, grow, reschedule, rebuild, or repair a cut-off delete or rebuild. */
async function inPlace(ctx: UpdateContext, repair?: "delete" | "rebuild") {
  const { olds, news, v, o, log } = ctx;
  const l = steps.layout(v);
  const instanceId = (olds.instanceId as string) || newToken();
  return dialing(hostRef(v), () => withRemote(v.host, async (r) => exclusive(r, l, log, async () => {
    if (o.host.address !== v.host.address || Number(o.host.port) !== Number(v.host.port)) {
      // Same pinned key at another address: the same machine, unless hosts were cloned with their keys.
      const obs = await steps.observe(r, steps.layout(o));
      if (!obs.present && !obs.configured) {
        throw new UserError(`host: ${r.name} presents the same host key as ${o.host.address}:${o.host.port}, but volume ${v.volumeId} is not there. ` +
          "If it is another machine, it shares its SSH host keys with the old one (a cloned image?): give it keys of its own (ssh-keygen -A) and pin them");
      }
      log(`${o.host.address}:${o.host.port} is now reached as ${r.name} (same host key): not a move`);
    }
    if (repair === "delete") {
      // A delete cut off after it stopped the volume (its change reverted): back in service.
      const users = [...new Set([...await steps.usersOf(r, o, steps.layout(o)), ...o.stopUnits])];
      log(`a delete of ${v.volumeId} was cut off on ${r.name}: giving the volume back (read-write, scheduled${users.length ? `, ${users.join(", ")} started` : ""})`);
      await giveBack(r, steps.layout(o), users, true);
      await setDeleting(v, undefined);
    }
    if (repair === "rebuild" || o.filesystem !== v.filesystem || (o.volumeGroup ?? "") !== (v.volumeGroup ?? "")) {
      await rebuild(r, o, v, instanceId, log);
    } else {
      const { lease } = await claim({ ...v, force: false, instanceId }, { instance: instanceId, adoptLegacy: true });
      await converge(r, v, lease.token, log);
      if (v.size > (o.size ?? 0)) {
        log(`growing to ${formatSize(v.size)}`);
        await steps.grow(r, v, l);
      }
      if (o.backupSchedule !== v.backupSchedule || o.backupRandomDelay !== v.backupRandomDelay) await r.runArgv(["systemctl", "restart", l.units.timer]);
    }
    const obs = await steps.observe(r, l);
    const snaps = await snapshotsOrUndefined(r, l);
    return { outs: { ...news, ...outputs(l, obs, snaps, { ...olds, instanceId, unfinishedMove: {}, pendingCleanup: {}, moveOrigin: null,
      interruptedOperation: {} }) } };
  }), { log }));
}

export async function remove(id: string, props: Props) {
  const instanceId = (props.instanceId as string) || undefined;
  const v: VolumeRef = { ...(props as VolumeInputs), instanceId };
  const log = logger(v);
  const origin = originOfState(props, v);
  const { found, clock } = await readLeaseAndClock(leaseS3(v), v.volumeId);
  const cur = found?.lease;
  if (cur && otherInstance(cur, instanceId) && sameOwner(cur.owner, v.owner) && sameHost(cur.holder, hostRef(v))) {
    // This resource was replaced (pulumi up --replace): the volume is its successor's now.
    log(`volume ${v.volumeId} on ${hostName(cur.holder)} now belongs to this resource's replacement: leaving it in place`);
    return;
  }
  const action = decide({ op: "delete", state: stateView(props, origin), lease: leaseView(cur, v, clock) });
  if (action.kind !== "remove") log(`placement: ${describeAction(action)}`);
  switch (action.kind) {
    case "refuse":
      throw new UserError(`volume ${v.volumeId}: ${action.message}`);
    case "leave":
      log(`volume ${v.volumeId} on ${hostName(hostRef(v))}: ${action.why}: leaving it in place`);
      return;
    case "remove": {
      const here = inputsAt(action.host, v, v, origin, cur);
      if (!sameHost(action.host, hostRef(v))) log(`volume ${v.volumeId} lives on ${hostName(action.host)} (a cut-off run moved it): removing it there`);
      await removeFrom(here, log, instanceId);
      if (action.alsoClean) await cleanLeftover(inputsAt(action.alsoClean, v, v, origin, cur), log);
      await release(here, instanceId, { withMove: true });
      return;
    }
    default:
      throw new Error(`volume ${v.volumeId}: no delete action for ${action.kind}`);
  }
}

/** The old host of a move, cleaned when it can be reached; otherwise it stays fenced, and the log says what to remove by hand. */
async function cleanLeftover(o: VolumeRef, log: (m: string) => void): Promise<void> {
  const l = steps.layout(o);
  try {
    await withRemote(o.host, async (r) => exclusive(r, l, log, async () => {
      const users = await steps.usersOf(r, o, l);
      if (users.length) await r.runArgv(["systemctl", "stop", ...users], { allowFailure: true });
      await steps.teardown(r, l);
      log(`cleaned the old host ${r.name}`);
    }), { attempts: 1, dialTimeoutMs: 15_000 });
  } catch (e) {
    log(`WARNING: the old host ${o.host.address}:${o.host.port} could not be cleaned (${(e as Error).message.split("\n")[0]}); it stays fenced ` +
      `(read-only, no timer, no valid lease token): remove its units dboxed-volume-${o.volumeId}-*, /etc/dboxed-volumes/${o.volumeId} ` +
      `and its storage by hand (a volume declared there again with this id discards it: its data is in the repository)`);
  }
}

async function removeFrom(v: VolumeRef, log: (m: string) => void, instanceId: string | undefined): Promise<void> {
  const l = steps.layout(v);
  await withRemote(v.host, async (r) => exclusive(r, l, log, async () => {
    const obs = await steps.observe(r, l);
    const initialized = (await r.run(`test -e ${q(l.stateDir + "/initialized")}`, { allowFailure: true })).code === 0;
    if (!obs.present && !obs.configured) {
      log(`nothing left on ${r.name}`);
      return;
    }
    let lease = await readLease(leaseS3(v), v.volumeId);
    if (!lease && obs.configured) {
      // The lease object is gone (a bucket lifecycle rule, deleted by hand): claimed again and its
      // token given to the host, or the agent would refuse the final backup forever.
      log(`the lease of volume ${v.volumeId} is gone: claiming it again for the final backup`);
      const { lease: fresh } = await claim({ ...v, force: false }, { instance: instanceId ?? "", adoptLegacy: true });
      await steps.writeConfig(r, v, l, fresh.token);
      lease = await readLease(leaseS3(v), v.volumeId);
    }
    let users: string[] = [];
    const fenced = !!lease && (!sameHost(lease.lease.holder, hostRef(v)) || !ownsLease(lease.lease, v));
    if (fenced) {
      log(`${r.name} no longer holds volume ${v.volumeId} (${hostName(lease!.lease.holder)} does): no final backup from here`);
    } else if (lease && (v.forgetSnapshotsOnDelete || (v.finalBackupOnDelete && initialized && obs.present))) {
      // Intent first: a delete cut off from here on (the volume stopped, read-only) is given back
      // by the next pulumi up that still declares it.
      await setDeleting(v, { startedAt: new Date().toISOString() });
    }
    const failed = async (e: unknown, what: string) => {
      if (!fenced) {
        await giveBack(r, l, users);
        await setDeleting(v, undefined).catch(() => undefined);
      }
      return new UserError(`${(e as Error).message}\nThe volume was left in place on ${r.name}` +
        `${fenced ? "" : `: mounted read-write and scheduled as before${users.length ? `, ${users.join(", ")} started again` : ""}`}; ${what}`);
    };
    if (fenced) {
      // nothing to back up
    } else if (v.forgetSnapshotsOnDelete) {
      await r.runArgv(["systemctl", "stop", l.units.timer], { allowFailure: true });
      try {
        await steps.forgetSnapshots(r, l, log);
      } catch (e) {
        throw await failed(e, "fix the cause and run again.");
      }
    } else if (v.finalBackupOnDelete && initialized && obs.present) {
      // Not mounted (e.g. a failed boot): mount it so the final backup sees its latest data.
      if (!obs.mounted) await r.runArgv(["systemctl", "start", l.units.device, l.units.mount]);
      // The declared users (stopUnits, units that require the mount) stop as in a move: the
      // teardown would stop the latter anyway, and a writer would make the remount fail.
      users = await steps.usersOf(r, v, l);
      try {
        await finalBackupVerified(r, v, l, log, { users });
      } catch (e) {
        await setDeleting(v, undefined).catch(() => undefined);
        throw e;
      }
    } else if (v.finalBackupOnDelete && !initialized && obs.configured) {
      log("the volume never finished its first restore: no final backup (the repository holds its data)");
    }
    log(`removing from ${r.name}`);
    try {
      await steps.teardown(r, l);
    } catch (e) {
      throw await failed(e, "fix the cause and run again.");
    }
  }), { log });
}
