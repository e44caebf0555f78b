// The placement decision (provider/lifecycle/placement.ts), over every combination of the three
// records (Pulumi state, lease, what the hosts show) and what the user asks for, each case
// checked against the invariants; then the rows of docs/placement.md, one by one.
import { expect } from "chai";
import { Action, decide, Desired, LeaseView, newHostMayHaveServed, PHASES, Situation, StateView, WayOut } from "../../provider/lifecycle/placement";
import { HostRef, hostName, MovePhase, sameHost } from "../../provider/storage/lease";

const host = (i: number): HostRef => ({ address: `10.0.0.${i}`, port: 22, hostKey: `ssh-ed25519 KEY${i}` });
const [A, B, C] = [host(1), host(2), host(3)];
const HOSTS = [A, B, C];
const name = (h: HostRef) => ["A", "B", "C"][HOSTS.findIndex((x) => sameHost(x, h))] ?? hostName(h);
const has = (list: HostRef[], h: HostRef) => list.some((x) => sameHost(x, h));

function subsets<T>(xs: T[]): T[][] {
  return xs.reduce<T[][]>((acc, x) => acc.concat(acc.map((s) => [...s, x])), [[]]);
}

/** Every lease: none, or held (ours or not), each move between two hosts at each phase, cut-off delete/rebuild, live or expired. */
function leases(): (LeaseView | undefined)[] {
  const out: (LeaseView | undefined)[] = [undefined];
  for (const ours of [true, false]) {
    for (const live of [true, false]) {
      for (const holder of HOSTS) {
        for (const interrupted of [undefined, "delete", "rebuild"] as const) out.push({ holder, ours, live, interrupted });
      }
      for (const from of HOSTS) {
        for (const to of HOSTS) {
          if (from === to) continue;
          for (const phase of PHASES) {
            out.push({ holder: phase === "switched" ? to : from, ours, live, move: { from, to, phase } });
            // An undo begun (only ever before the switch).
            if (!newHostMayHaveServed(phase)) out.push({ holder: from, ours, live, move: { from, to, phase, undoing: true } });
          }
        }
      }
    }
  }
  return out;
}

/** Every state: on each host, with nothing recorded, an unfinished move to it at each phase, or an old host to clean. */
function states(): StateView[] {
  const out: StateView[] = [];
  for (const S of HOSTS) {
    out.push({ host: S });
    for (const F of HOSTS) {
      if (F === S) continue;
      out.push({ host: S, pendingCleanup: F });
      for (const phase of PHASES.filter((p) => p !== "switched")) out.push({ host: S, move: { from: F, to: S, phase } });
    }
  }
  return out;
}

function desires(): Desired[] {
  const out: Desired[] = [];
  for (const h of HOSTS) for (const force of [false, true]) for (const forceDespiteLiveLease of [false, true]) out.push({ host: h, force, forceDespiteLiveLease });
  return out;
}

/** Hosts that may have the volume mounted read-write in situation s. */
function serving(s: Situation): HostRef[] {
  const L = s.lease;
  if (L?.move) {
    const p = L.move.phase;
    if (L.move.undoing) return [L.move.from]; // being given back
    if (p === "warm") return [L.move.from];
    return newHostMayHaveServed(p) ? [L.move.to] : [];
  }
  if (L) return [L.holder];
  if (s.state?.move) return newHostMayHaveServed(s.state.move.phase) ? [s.state.move.to] : [s.state.move.from];
  return s.state ? [s.state.host] : [];
}

/** The hosts an action leaves read-write at its end (the ones it may mount). */
function makesServe(a: Action): HostRef[] {
  switch (a.kind) {
    case "converge": case "repair": return [a.host];
    case "cleanup": return [a.host];
    case "move": case "finishWithoutOld": case "take": return [a.to];
    case "undo": return [a.back];
    default: return [];
  }
}

function phaseOfMove(s: Situation): MovePhase | undefined {
  return s.lease?.move?.phase ?? s.state?.move?.phase;
}

/** Situations a refusal's way out leads to (the user follows it; "retry": later, the hosts back and the lease expired). */
function followed(s: Situation, w: WayOut): Situation[] {
  const d = s.desired!;
  const base = { ...s, desired: { ...d, host: w.setHost ?? d.host } };
  const out: Situation[] = [base];
  if (w.force) out.push({ ...base, desired: { ...base.desired, force: true } });
  if (w.forceDespiteLiveLease) out.push({ ...base, desired: { ...base.desired, force: true, forceDespiteLiveLease: true } });
  if (w.retry) {
    const later = { ...base, unreachable: [], lease: s.lease ? { ...s.lease, live: false } : undefined };
    out.push(later, { ...later, desired: { ...later.desired, force: !!w.force || d.force } });
  }
  return out;
}

/** An assertion whose message is built only when it fails (hundreds of thousands of cases pass). */
function holds(ok: boolean, message: () => string): void {
  if (!ok) expect.fail(message());
}

function checkInvariants(s: Situation, a: Action): void {
  const why = () => `${JSON.stringify(s, (k, v) => (v && typeof v === "object" && "address" in v ? name(v) : v))} -> ${JSON.stringify(a, (k, v) => (v && typeof v === "object" && "address" in v ? name(v) : v))}`;
  const now = serving(s);
  // 1. Never two read-write hosts: a host goes read-write only when every other host that may be
  // read-write is stopped by the same action (a move fences its old host first) or given up by force.
  for (const x of makesServe(a)) {
    for (const y of now) {
      if (sameHost(x, y)) continue;
      if (a.kind === "move" && sameHost(a.from, y)) continue;
      if ((a.kind === "take" || a.kind === "finishWithoutOld") && sameHost(a.from, y)) {
        holds(s.desired!.force, () => `force needed to give up ${name(y)}: ${why()}`);
        holds(!s.lease?.live || s.desired!.forceDespiteLiveLease, () => `a live lease is never forced without forceDespiteLiveLease: ${why()}`);
        continue;
      }
      expect.fail(`${name(x)} would go read-write while ${name(y)} may be: ${why()}`);
    }
  }
  // 2. A host that may have served is never discarded without its final backup: no undo from the switch on.
  if (a.kind === "undo") {
    const p = phaseOfMove(s);
    holds(!p || !newHostMayHaveServed(p), () => `undo after the switch began: ${why()}`);
    holds(!has(now, a.target), () => `undo discards ${name(a.target)}, which may serve: ${why()}`);
  }
  if ((a.kind === "take" || a.kind === "finishWithoutOld")) holds(s.desired!.force, () => `only force gives a host up: ${why()}`);
  if (a.kind === "remove" && a.alsoClean) { const c = a.alsoClean; holds(!has(now, c), () => `cleans ${name(c)}, which may serve: ${why()}`); }
  // Hosts that cannot be reached are not acted on (except by force, which does not need them).
  // (A move that finds the lease at its new host, or past its switch, only has the old host left to clean.)
  // (Records that contradict each other, a state past the switch and a lease without its move, meet the move's own guard.)
  const atTarget = (m: Action & { kind: "move" }) => (!!s.lease && ((s.lease.move && newHostMayHaveServed(s.lease.move.phase)) || sameHost(s.lease.holder, m.to))) ||
    (!!s.state?.move && newHostMayHaveServed(s.state.move.phase));
  if (a.kind === "move") { const f = a.from; holds(!(has(s.unreachable ?? [], f) && !atTarget(a)), () => `move needs ${name(f)}: ${why()}`); }
  if (a.kind === "undo") { const b = a.back; holds(!has(s.unreachable ?? [], b), () => `undo needs ${name(b)}: ${why()}`); }
  // An update works toward the host the program declares: whatever it mounts, moves to, gives back or repairs is that host.
  if (s.op === "update" && s.desired) {
    const target = a.kind === "converge" || a.kind === "repair" || a.kind === "cleanup" ? a.host
      : a.kind === "move" || a.kind === "finishWithoutOld" || a.kind === "take" ? a.to : a.kind === "undo" ? a.back : undefined;
    const d = s.desired.host;
    if (target) holds(sameHost(target, d), () => `acts on ${name(target)}, not on the declared ${name(d)}: ${why()}`);
  }
  // 3. Every refusal names its way out, and following it leads to an action.
  if (a.kind === "refuse") {
    const w = a.wayOut;
    holds(Object.values(w).some(Boolean), () => `a refusal without a way out: ${why()}`);
    if (w.setHost) expect(a.message).to.include(hostName(w.setHost));
    if (w.force) expect(a.message).to.match(/force: true/);
    if (w.forceDespiteLiveLease) expect(a.message).to.match(/forceDespiteLiveLease: true/);
    if (s.op === "update" && !w.otherVolumeId) {
      // Following the ways out, each refusal's in turn, reaches an action within three steps.
      const leadsOut = (t: Situation, depth: number): boolean => {
        const b = decide(t);
        if (b.kind !== "refuse") return true;
        return depth > 0 && followed(t, b.wayOut).some((u) => leadsOut(u, depth - 1));
      };
      const ok = followed(s, w).some((t) => leadsOut(t, 2));
      holds(ok, () => `its way out leads nowhere: ${why()}`);
    }
  }
  // 4. The state ends where the volume is: a refresh never drops a volume that lives on another host of this resource.
  if (s.op === "read") {
    const L = s.lease;
    const at = L?.ours ? (L.move && newHostMayHaveServed(L.move.phase) ? L.move.to : L.holder) : undefined;
    if (!s.state!.move && !s.state!.pendingCleanup && at && !sameHost(at, s.state!.host)) {
      holds(a.kind === "relocate" && sameHost(a.to, at), () => `not relocated to ${name(at)}: ${why()}`);
    }
    if (a.kind === "gone") {
      holds(!s.presentOnStateHost, why);
      holds(!(L?.ours && at && !sameHost(at, s.state!.host)), () => `dropped although it lives elsewhere: ${why()}`);
    }
  }
}

describe("placement: every situation, every invariant", function () {
  this.timeout(120_000);
  const allLeases = leases();
  const allStates = states();

  it("update: every state x lease x desired host x force x unreachable hosts", () => {
    let n = 0;
    const kinds = new Map<string, number>();
    for (const state of allStates) for (const lease of allLeases) for (const desired of desires()) for (const unreachable of subsets(HOSTS)) {
      const s: Situation = { op: "update", state, lease, desired, unreachable };
      const a = decide(s);
      checkInvariants(s, a);
      kinds.set(a.kind, (kinds.get(a.kind) ?? 0) + 1);
      n++;
    }
    expect(n).to.be.greaterThan(700_000);
    // Every action is reached by some situation.
    for (const k of ["converge", "move", "finishWithoutOld", "undo", "cleanup", "repair", "relocate", "take", "refuse"]) expect(kinds.get(k), k).to.be.greaterThan(0);
  });

  it("delete: every state x lease", () => {
    for (const state of allStates) for (const lease of allLeases) {
      const s: Situation = { op: "delete", state, lease };
      const a = decide(s);
      checkInvariants(s, a);
      expect(["remove", "leave", "refuse"]).to.include(a.kind);
      // A delete never removes a volume from the middle of a move.
      if (a.kind === "remove" && lease?.ours && lease.move && lease.move.phase !== "switched") expect.fail(JSON.stringify(s));
    }
  });

  it("read (refresh): every state x lease x whether the state's host shows the volume", () => {
    for (const state of allStates) for (const lease of allLeases) for (const presentOnStateHost of [true, false]) {
      const s: Situation = { op: "read", state, lease, presentOnStateHost };
      checkInvariants(s, decide(s));
    }
  });

  it("create: every lease x desired host x force", () => {
    for (const lease of allLeases) for (const desired of desires()) {
      const s: Situation = { op: "create", lease, desired };
      const a = decide(s);
      checkInvariants(s, a);
      expect(["converge", "take", "refuse"]).to.include(a.kind);
    }
  });
});

// The rows of docs/placement.md: a situation a user meets, what pulumi up does.
describe("placement: the documented table", () => {
  const up = (state: StateView, lease: LeaseView | undefined, to: HostRef, extra: Partial<Situation> & { force?: boolean; fdl?: boolean } = {}) =>
    decide({ op: "update", state, lease, desired: { host: to, force: !!extra.force, forceDespiteLiveLease: !!extra.fdl }, unreachable: extra.unreachable });
  const held = (holder: HostRef, more: Partial<LeaseView> = {}): LeaseView => ({ holder, ours: true, live: true, ...more });
  const moving = (phase: MovePhase, more: Partial<LeaseView> = {}): LeaseView =>
    held(phase === "switched" ? B : A, { move: { from: A, to: B, phase }, ...more });

  it("no change: update in place; a new host: a move", () => {
    expect(up({ host: A }, held(A), A)).to.deep.equal({ kind: "converge", host: A });
    expect(up({ host: A }, undefined, A)).to.deep.equal({ kind: "converge", host: A });
    expect(up({ host: A }, held(A), B)).to.deep.equal({ kind: "move", from: A, to: B });
  });

  it("a move cut off before its switch: keep the new host (finish) or set the old one back (undo)", () => {
    for (const p of ["warm", "final-backup", "restored"] as const) {
      expect(up({ host: B, move: { from: A, to: B, phase: p } }, moving(p), B)).to.deep.equal({ kind: "move", from: A, to: B });
      expect(up({ host: B, move: { from: A, to: B, phase: p } }, moving(p), A)).to.deep.equal({ kind: "undo", back: A, target: B });
      // The same from the lease alone (the run was killed: nothing in the state).
      expect(up({ host: A }, moving(p), A)).to.deep.equal({ kind: "undo", back: A, target: B });
      expect(up({ host: A }, moving(p), B)).to.deep.equal({ kind: "move", from: A, to: B });
    }
  });

  it("a move cut off after its switch began: undo is refused, naming the way (finish, then move back)", () => {
    for (const p of ["switching", "switched"] as const) {
      const a = up({ host: A }, moving(p), A);
      expect(a.kind).to.equal("refuse");
      expect((a as { message: string }).message).to.match(/cannot be undone any more.*Set host to 10\.0\.0\.2:22/);
      expect(up({ host: A }, moving(p), B)).to.deep.equal({ kind: "move", from: A, to: B });
    }
  });

  it("a move whose old host is gone: refused, unless force (from the final snapshot once taken)", () => {
    const u = { unreachable: [A] };
    expect(up({ host: B, move: { from: A, to: B, phase: "warm" } }, moving("warm"), B, u).kind).to.equal("refuse");
    expect(up({ host: B, move: { from: A, to: B, phase: "restored" } }, moving("restored"), B, { ...u, force: true }))
      .to.deep.equal({ kind: "finishWithoutOld", from: A, to: B, snapshot: "final" });
    expect(up({ host: B, move: { from: A, to: B, phase: "warm" } }, moving("warm", { live: false }), B, { ...u, force: true }))
      .to.deep.equal({ kind: "finishWithoutOld", from: A, to: B, snapshot: "latest" });
    expect(up({ host: B, move: { from: A, to: B, phase: "warm" } }, moving("warm"), B, { ...u, force: true }).kind).to.equal("refuse");
    // From the switch on, the old host is not needed: the move finishes, its cleanup pending.
    expect(up({ host: B, move: { from: A, to: B, phase: "switching" } }, moving("switching"), B, u)).to.deep.equal({ kind: "move", from: A, to: B });
  });

  it("a host gone for good, no move: force takes the volume to the new host once the lease expired", () => {
    expect(up({ host: A }, held(A), B, { unreachable: [A] }).kind).to.equal("refuse");
    expect(up({ host: A }, held(A), B, { unreachable: [A], force: true }).kind).to.equal("refuse"); // live lease
    expect(up({ host: A }, held(A, { live: false }), B, { unreachable: [A], force: true })).to.deep.equal({ kind: "take", from: A, to: B, ownHost: true });
  });

  it("a run cut off finished the move elsewhere: the state follows the volume", () => {
    expect(up({ host: A }, held(B), B)).to.deep.equal({ kind: "move", from: A, to: B });
    const a = up({ host: A }, held(B), A);
    expect(a.kind).to.equal("relocate");
    expect(decide({ op: "read", state: { host: A }, lease: held(B), presentOnStateHost: false }).kind).to.equal("relocate");
  });

  it("a delete or rebuild cut off, its change reverted: repaired in place", () => {
    expect(up({ host: A }, held(A, { interrupted: "delete" }), A)).to.deep.equal({ kind: "repair", op: "delete", host: A });
    expect(up({ host: A }, held(A, { interrupted: "rebuild" }), A)).to.deep.equal({ kind: "repair", op: "rebuild", host: A });
  });

  it("another resource's volume: refused; force is refused while that resource moves it", () => {
    expect(up({ host: A }, held(B, { ours: false }), C).kind).to.equal("refuse");
    const mid = up({ host: C }, { holder: A, ours: false, live: false, move: { from: A, to: B, phase: "final-backup" } }, C, { force: true });
    expect(mid.kind).to.equal("refuse");
    expect((mid as { message: string }).message).to.match(/in the middle of a move/);
    expect(up({ host: C }, held(A, { ours: false, live: false }), C, { force: true })).to.deep.equal({ kind: "take", from: A, to: C, ownHost: false });
  });

  it("destroy with a pending cleanup cleans the old host and releases the lease", () => {
    expect(decide({ op: "delete", state: { host: B, pendingCleanup: A }, lease: held(B, { move: { from: A, to: B, phase: "switched" } }) }))
      .to.deep.equal({ kind: "remove", host: B, alsoClean: A });
  });
});
