// Where a volume lives and what may happen to it next: one pure decision from the three records
// of it (the Pulumi state, the lease in S3, what the hosts show) and what the user asks for.
// create, update, delete, read (refresh) and diff (preview) all ask `decide`; they then carry out
// the one action it returns, and ask again when what they saw changes (a host that cannot be
// reached). docs/placement.md has the table of situations and actions this code implements.
//
// The move's phases, in the lease, each written before the step it names takes effect:
//   warm          the new host is prepared and restores the latest snapshot into a staging mount
//   final-backup  the old host is fenced (read-only, no timer, no users) and its final snapshot
//                 taken; the lease's token is the new host's (the old one can no longer back up)
//   restored      the final snapshot is restored on the new host and verified
//   switching     the new host is about to mount read-write and start the users: from here it
//                 may have served, so it is never discarded (an undo is refused)
//   switched      the new host holds the lease; only the old host's cleanup is left
// Invariants (test/unit/placement.test.ts checks each over every situation):
//   1. never two read-write hosts: a host goes read-write only when every other host that may
//      be read-write is fenced (phase >= final-backup) or was given up by force;
//   2. a host that may have served is never discarded without its final backup: no undo from
//      `switching` on; a forced takeover says how much time of writes it gives up;
//   3. every refusal names its way out (a host to set, force, or a retry), and that way out leads
//      to an action;
//   4. the state ends where the volume is: a refresh never drops a volume that lives on another
//      host of this resource; it records where it lives.
import { HostRef, hostName, MovePhase, sameHost } from "../storage/lease";

export const PHASES: readonly MovePhase[] = ["warm", "final-backup", "restored", "switching", "switched"];

export function reached(p: MovePhase | undefined, q: MovePhase): boolean {
  return !!p && PHASES.indexOf(p) >= PHASES.indexOf(q);
}

/** From `switching` on, the new host may have mounted the volume read-write and served it. */
export const newHostMayHaveServed = (p: MovePhase) => reached(p, "switching");
/** From `final-backup` on, the old host is fenced and its final snapshot is recorded. */
export const oldHostFenced = (p: MovePhase) => reached(p, "final-backup");

export interface MoveView { from: HostRef; to: HostRef; phase: MovePhase; undoing?: boolean }

export interface LeaseView {
  holder: HostRef;
  /** The lease names this resource: its owner, or this very resource instance (a renamed stack, an alias). */
  ours: boolean;
  move?: MoveView;
  /** A delete or rebuild started on the holder and was cut off: the volume is read-only there. */
  interrupted?: "delete" | "rebuild";
  /** The holder renewed it lately (judged on the S3 server's clock). */
  live: boolean;
}

export interface StateView {
  /** Where the Pulumi state has the volume (its host input as last applied). */
  host: HostRef;
  /** A move the state recorded as unfinished (outputs unfinishedMove + moveOrigin). */
  move?: MoveView;
  /** The old host of a switched move, not cleaned yet (outputs pendingCleanup + moveOrigin). */
  pendingCleanup?: HostRef;
}

export interface Desired { host: HostRef; force: boolean; forceDespiteLiveLease: boolean }

export interface Situation {
  op: "create" | "update" | "delete" | "read";
  /** Absent for a create. */
  state?: StateView;
  /** What the program declares (update, create). */
  desired?: Desired;
  /** The lease as read from S3 (undefined: there is none). */
  lease?: LeaseView;
  /** Hosts that could not be reached in this run. */
  unreachable?: HostRef[];
  /** read: whether the state's host shows the volume (storage or configuration). */
  presentOnStateHost?: boolean;
}

/** How to get out of a refusal: what to set, or to run again later. */
export interface WayOut { setHost?: HostRef; force?: boolean; forceDespiteLiveLease?: boolean; retry?: boolean; otherVolumeId?: boolean }

export type Action =
  /** Create, adopt or update the volume in place on `host` (claim, converge; a rebuild when the layout changed). */
  | { kind: "converge"; host: HostRef }
  /** Start the move from -> to, or resume it from the phase in the lease. */
  | { kind: "move"; from: HostRef; to: HostRef }
  /** Finish a move whose old host is gone, by force: from its final snapshot (nothing lost) or the latest one. */
  | { kind: "finishWithoutOld"; from: HostRef; to: HostRef; snapshot: "final" | "latest" }
  /** Undo a move that has not begun its switch: the new host cleaned, the old one given back. */
  | { kind: "undo"; back: HostRef; target: HostRef }
  /** Clean the old host of a switched move, then carry on in place on `host`. */
  | { kind: "cleanup"; old: HostRef; host: HostRef }
  /** A cut-off delete or rebuild: give the volume back (read-write, scheduled, users started), or finish the rebuild. */
  | { kind: "repair"; op: "delete" | "rebuild"; host: HostRef }
  /** The volume lives on `to`, not where the state says: record that (update: and refuse, naming the way out). */
  | { kind: "relocate"; to: HostRef; message: string; wayOut: WayOut; leftoverOn?: HostRef }
  /**
   * Take the volume from a holder that is gone, by force: its latest snapshot restored on `to`.
   * `ownHost`: `from` was this resource's (left to clean once it is back); else another resource's.
   */
  | { kind: "take"; from: HostRef; to: HostRef; ownHost: boolean }
  /** delete: remove the volume from `host` (final backup when it holds it). */
  | { kind: "remove"; host: HostRef; alsoClean?: HostRef }
  /** delete: the volume is another resource's (or this one's replacement's) now: leave it. */
  | { kind: "leave"; why: string }
  /** read: the volume is on the state's host: observe it there. */
  | { kind: "observe"; host: HostRef }
  /** read: the volume is nowhere this resource holds: drop it from the state. */
  | { kind: "gone" }
  | { kind: "refuse"; message: string; wayOut: WayOut };

const n = hostName;
const isIn = (h: HostRef, list?: HostRef[]) => !!list?.some((x) => sameHost(x, h));

function refuse(message: string, wayOut: WayOut): Action {
  return { kind: "refuse", message, wayOut };
}

/** The one next action for a volume in situation `s`. Pure: no I/O. */
export function decide(s: Situation): Action {
  switch (s.op) {
    case "read": return decideRead(s);
    case "delete": return decideDelete(s);
    case "create": return decideCreate(s);
    default: return decideUpdate(s);
  }
}

function decideRead(s: Situation): Action {
  const S = s.state!.host;
  const L = s.lease;
  if (s.state!.move || s.state!.pendingCleanup) return { kind: "observe", host: S };
  if (L?.ours) {
    // A cut-off run moved it (or switched it): it lives where the lease says, not where the state
    // says, whatever is left on the state's host (then to be cleaned).
    const at = L.move && newHostMayHaveServed(L.move.phase) ? L.move.to : L.holder;
    if (!sameHost(at, S)) {
      return { kind: "relocate", to: at, message: `it lives on ${n(at)}, not on ${n(S)}: a pulumi run that was cut off moved it`,
        wayOut: { setHost: at }, leftoverOn: s.presentOnStateHost ? S : undefined };
    }
  }
  if (s.presentOnStateHost) return { kind: "observe", host: S };
  return { kind: "gone" };
}

function decideCreate(s: Situation): Action {
  const D = s.desired!.host;
  const L = s.lease;
  if (L?.ours && L.move) {
    return refuse(`it is in the middle of a move from ${n(L.move.from)} to ${n(L.move.to)} (phase ${L.move.phase}) of this resource, ` +
      "started from a state that is gone: restore that state (pulumi stack import) and finish or undo the move there",
    { setHost: L.move.to });
  }
  if (L && !L.ours) return ofAnother(s, L, D);
  if (L && !sameHost(L.holder, D)) {
    if (s.desired!.force) return takeOrWait(s, L, L.holder, D);
    return refuse(`it lives on ${n(L.holder)} for this resource (its state was lost?): declare host ${n(L.holder)} to adopt it there, ` +
      "then move it; if that host is gone for good, set force: true to restore its latest snapshot here", { setHost: L.holder, force: true });
  }
  return { kind: "converge", host: D };
}

/** A volume whose lease names another resource. */
function ofAnother(s: Situation, L: LeaseView, D: HostRef): Action {
  const d = s.desired!;
  if (!d.force) {
    return refuse(`it is held by host ${n(L.holder)} for another resource: a volume id has one owner and lives on one host at a time. ` +
      "Give this Volume another volumeId, or change host in the stack that holds it; if that host is gone for good, set force: true",
    { force: true, otherVolumeId: true });
  }
  if (sameHost(L.holder, D)) {
    return refuse(`force: it lives on this very host ${n(D)} for another resource; force takes a volume from a host that is gone for good, ` +
      "never from a live one on the same host: give this Volume another volumeId", { otherVolumeId: true });
  }
  if (L.move && L.move.phase !== "switched" && !d.forceDespiteLiveLease) {
    return refuse(`force: it is in the middle of a move from ${n(L.move.from)} to ${n(L.move.to)} (phase ${L.move.phase}) run by another ` +
      "resource, which renews nothing while it runs: wait until that move is finished or undone; only if both hosts are gone for good, " +
      "set forceDespiteLiveLease: true", { forceDespiteLiveLease: true, retry: true });
  }
  // From its switch on, the host that may serve it is the move's new host.
  return takeOrWait(s, L, L.move && newHostMayHaveServed(L.move.phase) ? L.move.to : L.holder, D);
}

function takeOrWait(s: Situation, L: LeaseView | undefined, from: HostRef, to: HostRef): Action {
  if (L?.live && !s.desired!.forceDespiteLiveLease) {
    return refuse(`force: the lease is live: ${n(L.holder)} renewed it lately. A host that is gone stops renewing it: run again after it ` +
      "expires. Only if you know that host is gone for good and cannot wait, set forceDespiteLiveLease: true (anything it writes until it " +
      "is stopped is lost)", { retry: true, forceDespiteLiveLease: true });
  }
  return { kind: "take", from, to, ownHost: !L || L.ours };
}

function decideUpdate(s: Situation): Action {
  const st = s.state!;
  const d = s.desired!;
  const S = st.host, D = d.host;
  const L = s.lease;
  const U = s.unreachable;

  if (L && !L.ours) {
    // Taken by another resource (by force): this one's copy, if any, is fenced by its lost token.
    return ofAnother(s, L, D);
  }

  const M = L?.move;
  if (M) return inMove(s, M);

  // The lease has no move, but the state says one is unfinished: the lease moved on (a run that
  // was cut off, or another run, finished or undid it). The lease says where the volume is.
  const H = L?.holder ?? st.move?.from ?? S;
  if (st.move) {
    const { from: F, to: T } = st.move;
    if (!L && newHostMayHaveServed(st.move.phase)) {
      // The lease is gone (deleted by hand?) after the switch began: the new host may serve; it claims the lease again.
      if (sameHost(D, T)) return { kind: "converge", host: T };
      return refuse(`its move from ${n(F)} to ${n(T)} reached its switch and its lease is gone: set host to ${n(T)} (it takes the lease ` +
        `again; ${n(F)} stays fenced), then move it where you want`, { setHost: T });
    }
    if (sameHost(H, F)) {
      // Undone in the lease (or the lease is gone): the old host still has the data, and may serve
      // again (given back): the move is taken up again from its start.
      // (Unless the state saw its switch begin: then the new host may have served too, and stays.)
      const phase = newHostMayHaveServed(st.move.phase) ? st.move.phase : "warm";
      // (Records that disagree, the state past the switch and the lease without its move, are never forced: both hosts may hold writes.)
      if (newHostMayHaveServed(phase)) return inMove({ ...s, desired: { ...d, force: false } }, { from: F, to: T, phase });
      return inMove(s, { from: F, to: T, phase });
    } else if (sameHost(H, T)) {
      if (sameHost(D, T)) return { kind: "move", from: F, to: T }; // finds it switched: cleans F
      return { kind: "relocate", to: T, message: relocated(T, F), wayOut: { setHost: T } };
    }
    return { kind: "relocate", to: H, message: relocated(H, S), wayOut: { setHost: H } };
  }

  if (st.pendingCleanup && (!L || sameHost(H, S))) {
    const O = st.pendingCleanup;
    if (sameHost(D, S)) return isIn(S, U) ? unreachableHere(S) : { kind: "cleanup", old: O, host: S };
    // Moving on with the old host not cleaned: only by force, and only from a host that is gone
    // (its lease expired); the old host stays fenced, forgotten.
    if (d.force) return takeOrWait(s, L, S, D);
    return refuse(`the old host ${n(O)} of its last move is not cleaned yet: keep host at ${n(S)} until a pulumi up has cleaned it ` +
      `(with force: true, that pulumi up forgets it); if ${n(S)} itself is gone for good, set force: true here to restore the latest ` +
      `snapshot on ${n(D)}`, { setHost: S, force: true });
  }

  if (L && !sameHost(H, S)) {
    // The state is behind the lease: a run that was cut off moved the volume to H.
    if (sameHost(D, H)) return { kind: "move", from: S, to: H }; // finds it switched: cleans S
    return { kind: "relocate", to: H, message: relocated(H, S), wayOut: { setHost: H } };
  }

  if (L?.interrupted) {
    if (!sameHost(D, S)) {
      return refuse(`a ${L.interrupted} of it was cut off on ${n(S)}: keep host at ${n(S)} for pulumi up to repair it there first, then move it`,
        { setHost: S });
    }
    return isIn(S, U) ? unreachableHere(S) : { kind: "repair", op: L.interrupted, host: S };
  }
  if (sameHost(D, S)) return isIn(S, U) ? unreachableHere(S) : { kind: "converge", host: S };

  // A new host: a move, unless the old one is gone.
  if (isIn(S, U)) {
    if (!d.force) {
      return refuse(`host ${n(S)}, where it lives, cannot be reached, so it cannot be moved (its final backup is taken there). ` +
        `Run again when ${n(S)} is back; if it is gone for good, set force: true to restore its latest snapshot on ${n(D)} ` +
        "(writes since that snapshot are lost)", { retry: true, force: true });
    }
    return takeOrWait(s, L, S, D);
  }
  return { kind: "move", from: S, to: D };
}

/** The host the volume lives on, and the update wants, cannot be reached. */
function unreachableHere(S: HostRef): Action {
  return refuse(`host ${n(S)}, where it lives, cannot be reached: run again when it is back; if it is gone for good, set host to ` +
    "another host with force: true (its latest snapshot is restored there, once its lease expired)", { retry: true, force: true });
}

function relocated(at: HostRef, stateHost: HostRef): string {
  return `it lives on ${n(at)} now (a pulumi run that was cut off moved it there), not on ${n(stateHost)}; the state now says so. ` +
    `Set host to ${n(at)} to keep it there (move it back afterwards if you want)`;
}

/** An update while the lease records a move. */
function inMove(s: Situation, M: MoveView): Action {
  const d = s.desired!;
  const { from: F, to: T, phase: P } = M;
  const D = d.host;
  const U = s.unreachable;
  if (M.undoing) {
    // An undo began (the new host may be half cleaned, the old one half given back): only finished,
    // or, when the old host is gone for good, the move finished by force from the latest snapshot
    // (the old host may have served again once given back: its lease must have expired).
    if (sameHost(D, F) && !isIn(F, U)) return { kind: "undo", back: F, target: T };
    if (sameHost(D, T) && d.force && !isIn(T, U)) {
      if (s.lease?.live && !d.forceDespiteLiveLease) return takeOrWait(s, s.lease, F, T);
      return { kind: "finishWithoutOld", from: F, to: T, snapshot: "latest" };
    }
    return refuse(`an undo of its move from ${n(F)} to ${n(T)} began and was cut off: set host to ${n(F)} and run pulumi up to finish it` +
      `${isIn(F, U) ? ` when ${n(F)} can be reached again` : ""}; if ${n(F)} is gone for good, set host to ${n(T)} with force: true ` +
      "(the move is finished from the latest snapshot)", { setHost: F, retry: true });
  }
  if (newHostMayHaveServed(P) && isIn(T, U)) {
    // The new host, which may serve it now, is gone: by force, its latest snapshot elsewhere.
    if (d.force && !sameHost(D, T)) return takeOrWait(s, s.lease, T, D);
    return refuse(`${n(T)}, where the volume lives since its move's switch, cannot be reached: run again when it is back; if it is gone ` +
      `for good, set host to another host (${n(F)}, say) with force: true to restore its latest snapshot there once its lease expired`,
    { retry: true, setHost: F, force: true });
  }
  if (sameHost(D, T)) {
    if (isIn(F, U) && !newHostMayHaveServed(P)) {
      if (d.force) {
        if (!oldHostFenced(P) && s.lease?.live && !d.forceDespiteLiveLease) {
          return refuse(`force: ${n(F)} was not fenced yet (phase ${P}) and renewed the lease lately: it may still be serving the volume. ` +
            "Run again after the lease expires, or set forceDespiteLiveLease: true if you know it is gone for good (its writes since " +
            "the latest snapshot are lost)", { retry: true, forceDespiteLiveLease: true });
        }
        return { kind: "finishWithoutOld", from: F, to: T, snapshot: oldHostFenced(P) ? "final" : "latest" };
      }
      return refuse(`the move to ${n(T)} stopped at phase ${P} and its old host ${n(F)} cannot be reached. Run again when ${n(F)} is back ` +
        `(or set host back to ${n(F)} then, to undo it); if ${n(F)} is gone for good, set force: true to finish the move from ` +
        (oldHostFenced(P) ? "its final snapshot (nothing is lost: the old host was read-only since)" : "its latest snapshot (writes since are lost)"),
      { retry: true, force: true });
    }
    return { kind: "move", from: F, to: T };
  }
  if (newHostMayHaveServed(P) && d.force) {
    // The new host may serve; force elsewhere takes it only once it stopped renewing the lease.
    return takeOrWait(s, s.lease, T, D);
  }
  if (sameHost(D, F)) {
    if (newHostMayHaveServed(P)) {
      return refuse(`the move from ${n(F)} to ${n(T)} cannot be undone any more: it reached its switch (phase ${P}), and ${n(T)} may have ` +
        `served the volume since (an undo would throw its writes away). Set host to ${n(T)} and run pulumi up (finishes the move), ` +
        `then set host back to ${n(F)} in another pulumi up to move it back`, { setHost: T });
    }
    if (isIn(F, U)) {
      return refuse(`the move to ${n(T)} cannot be undone while ${n(F)} (which gets the volume back) cannot be reached: run again when it is ` +
        `back; if it is gone for good, set host to ${n(T)} with force: true to finish the move without it`, { retry: true, setHost: T, force: true });
    }
    return { kind: "undo", back: F, target: T };
  }
  return refuse(`it is in the middle of a move from ${n(F)} to ${n(T)} (phase ${P}): set host to ${n(T)} to finish it` +
    `${newHostMayHaveServed(P) ? "" : `, or back to ${n(F)} to undo it`}, before moving it elsewhere`, { setHost: T });
}

function decideDelete(s: Situation): Action {
  const st = s.state!;
  const S = st.host;
  const L = s.lease;
  if (st.move) {
    const { from: F, to: T, phase: P } = st.move;
    if (!L?.move && L?.ours && sameHost(L.holder, T)) return { kind: "remove", host: T, alsoClean: F };
    return refuse(`it is in the middle of a move from ${n(F)} to ${n(T)} (phase ${P}), its data on ${n(newHostMayHaveServed(P) ? T : F)}. ` +
      `${newHostMayHaveServed(P) ? "" : `Set host back to ${n(F)} and run pulumi up (undoes the move), or `}keep host ${n(T)} and run ` +
      "pulumi up (finishes it), then delete", { setHost: T });
  }
  if (L && !L.ours) {
    if (sameHost(L.holder, S)) return { kind: "leave", why: "it belongs to another resource now" };
    return { kind: "remove", host: S }; // this host's copy, fenced by its lost token: no final backup
  }
  if (L?.move) {
    const { from: F, to: T, phase: P } = L.move;
    if (P !== "switched") {
      return refuse(`it is in the middle of a move from ${n(F)} to ${n(T)} (phase ${P}), started by a pulumi run that was cut off: run ` +
        `pulumi up with host ${n(T)} (finishes it)${newHostMayHaveServed(P) ? "" : ` or ${n(F)} (undoes it)`}, then delete`, { setHost: T });
    }
    return { kind: "remove", host: T, alsoClean: F };
  }
  if (L && !sameHost(L.holder, S)) return { kind: "remove", host: L.holder, alsoClean: S };
  return { kind: "remove", host: S, alsoClean: st.pendingCleanup };
}

/** Whether `a` is an action that does work (for diff: an update is due although no input changed). */
export function isWork(a: Action, stateHost: HostRef): boolean {
  return !(a.kind === "converge" && sameHost(a.host, stateHost));
}

export function describe(a: Action): string {
  switch (a.kind) {
    case "converge": return `update in place on ${n(a.host)}`;
    case "move": return `move from ${n(a.from)} to ${n(a.to)}`;
    case "finishWithoutOld": return `finish the move to ${n(a.to)} without ${n(a.from)} (from its ${a.snapshot} snapshot)`;
    case "undo": return `undo the move: back to ${n(a.back)}, ${n(a.target)} cleaned`;
    case "cleanup": return `clean the old host ${n(a.old)}, then update in place on ${n(a.host)}`;
    case "repair": return `repair a cut-off ${a.op} on ${n(a.host)}`;
    case "relocate": return `record that it lives on ${n(a.to)}`;
    case "take": return `take it by force from ${n(a.from)} to ${n(a.to)}`;
    case "remove": return `remove it from ${n(a.host)}${a.alsoClean ? ` (and clean ${n(a.alsoClean)})` : ""}`;
    case "leave": return `leave it in place (${a.why})`;
    case "observe": return `read it on ${n(a.host)}`;
    case "gone": return "drop it from the state";
    case "refuse": return `refuse: ${a.message}`;
  }
}
