// Moving a volume to another host (its `host` input changed). A persisted state machine, its
// progress kept in the volume's lease in S3; each phase is recorded before the step it names
// takes effect (lifecycle/placement.ts has the phases and the invariants):
//   warm          new host prepared, latest periodic snapshot restored (staging mount)
//   final-backup  old host stopped, read-only, final snapshot taken: the lease names it
//   restored      final snapshot restored on the new host, verified against the old tree
//   switching     the new host is about to mount read-write and start the users
//   switched      new host mounted, scheduled, its units started; the lease names it holder
//   (done)        old host cleaned, move removed from the lease
// A run cut off anywhere resumes from the phase in the lease. Only one host ever has the
// volume mounted read-write: the new host mounts it only after the old one is read-only.
import { DialError, HostUnreachable, UserError } from "../errors";
import { formatSize, VolumeInputs } from "../inputs";
import { diffManifests, filesToHash, hashScript, Manifest, manifestScript, parseManifest, parseSums, pathsInput, withHashes } from "../host/manifest";
import { VolumeLayout } from "../host/layout";
import { quote as q } from "../host/shell";
import { acquireRemote, Remote, withRemote } from "../remote/ssh";
import { HostRef, hostName, Lease, MovePhase, MoveState, newToken, ownerName, readLease, sameHost, updateLease } from "../storage/lease";
import { holderLayout, hostRef, leaseLive, leaseS3, ownsLease, VolumeRef } from "./lease";
import * as steps from "./steps";
import { faultPoint, pausePoint } from "./faults";
import { oldHostFenced, reached as phaseReached } from "./placement";

const reached = (m: MoveState | undefined, p: MovePhase) => !!m && phaseReached(m.phase, p);

/** The lease is not what the decision that started this step saw (another run acted meanwhile): decide again. */
export class Redecide extends UserError {}

export interface MoveReport {
  from: string; to: string; snapshotId: string; downtimeSeconds: number; warm: boolean;
  phases: Record<string, number>;
  /** Files hashed after the stop by the verification, on the old and the new host (of how many). */
  hashedAfterStop?: { old: number; new: number; files: number };
  /** Set when the volume switched but its old host could not be cleaned: why (a later run retries). */
  pendingCleanup?: string;
  /** Finished without its old host, by force: from which snapshot, and how much time of writes that gave up. */
  forced?: { snapshot: "final" | "latest"; snapshotTime: string; dataLossWindowSeconds: number };
  /** The phase a cut-off run had reached, when this run resumed it. */
  resumedFrom?: MovePhase;
}

export interface MoveOptions {
  /** The old host is gone for good (force): finish from its final snapshot, or before one, from the latest. */
  withoutOld?: boolean;
}

function staging(l: VolumeLayout): string {
  return `/run/dboxed-volumes/${l.volumeId}/staging`;
}

/**
 * Checks the new host before anything on the old one stops: reachable, pinned key, room, free
 * mount path, commands. `readOnly` (a preview): changes nothing on the host.
 */
async function preflightNew(r: Remote, v: VolumeInputs, l: VolumeLayout, opts: { readOnly?: boolean } = {}): Promise<void> {
  await steps.preflight(r, v, l, opts);
  await steps.checkRoom(r, v, l, "The volume stays where it is.");
}

/**
 * What a preview of a move checks on the new host, read-only: the pre-flight that the move runs
 * first (so a reviewer sees at preview that it would fail, and why).
 */
export async function checkMoveTarget(news: VolumeInputs): Promise<void> {
  const l = steps.layout(news);
  await withRemote(news.host, (r) => preflightNew(r, news, l, { readOnly: true }));
}

/**
 * A "move" onto the machine the volume already lives on (the same host under another key or
 * address) would restore over the live volume. Refused when a random probe written to /run on
 * the old host is there on the new one (one machine; machine-ids are no proof, clones share
 * them), or when the new host has the volume mounted at mountPath already.
 */
/** Whether a and b are one machine: a random probe written to /run on a shows up on b. Runs `then` on b meanwhile. */
export async function sameMachine(a: Remote, b: Remote, volumeId: string, then = "true"): Promise<{ same: boolean; out: string }> {
  const probe = `/run/dboxed-volumes/${volumeId}.same-machine-probe`;
  const nonce = newToken();
  await a.run(`mkdir -p /run/dboxed-volumes && printf '%s' ${q(nonce)} > ${q(probe)}`);
  try {
    const res = await b.run(`cat ${q(probe)} 2>/dev/null; echo; ${then}`);
    return { same: res.stdout.split("\n")[0].trim() === nonce, out: res.stdout };
  } finally {
    await a.run(`rm -f ${q(probe)}`, { allowFailure: true });
  }
}

async function notSameMachine(oldR: Remote, newR: Remote, v: VolumeInputs, l: VolumeLayout): Promise<void> {
  {
    const b = await sameMachine(oldR, newR, l.volumeId, `if mountpoint -q ${q(l.mountPath)} && ` +
      `[ "$(readlink -f "$(findmnt -n -o SOURCE --mountpoint ${q(l.mountPath)})")" = "$(readlink -f ${q(l.device)} 2>/dev/null)" ]; then echo mounted; fi`);
    const same = b.same;
    if (same || /^mounted$/m.test(b.out)) {
      throw new UserError(`host: ${newR.name} is the machine volume ${v.volumeId} already lives on (${same ? "the same machine as the old host" : `it has the volume mounted at ${v.mountPath}`}), ` +
        "not another host: a move there would restore over the live volume, so nothing was changed. A new address with the same " +
        "hostKey is fine, but pinning another key of the same machine is not supported yet: keep host.hostKey as it was");
    }
  }
}

const HASH_TIMEOUT_MS = 3600_000;

/** A tree's manifest with every file hashed (none when the listing fails: the tree changed under it). */
async function hashedTree(r: Remote, dir: string, opts: { lowPriority?: boolean } = {}): Promise<Manifest | undefined> {
  const res = await r.run(manifestScript(dir, [], { ...opts, forReuse: true }), { allowFailure: true, timeoutMs: HASH_TIMEOUT_MS }).catch(() => undefined);
  try { return res?.code === 0 ? parseManifest(res.stdout) : undefined; } catch { return undefined; }
}

/**
 * A stopped tree's manifest for the verification: every entry listed, and each file hashed unless
 * `before` (hashed before the stop) proves it unchanged since (see manifest.ts).
 */
async function verifiedTree(r: Remote, dir: string, before?: Manifest): Promise<{ manifest: Manifest; hashed: number }> {
  const now = parseManifest((await r.run(manifestScript(dir, [], { hash: !before }), { timeoutMs: HASH_TIMEOUT_MS })).stdout);
  if (!before) return { manifest: now, hashed: Object.values(now.entries).filter((e) => e.type === "f").length };
  const todo = filesToHash(before, now);
  const sums = todo.length
    ? parseSums((await r.run(hashScript(dir), { stdin: pathsInput(todo), timeoutMs: HASH_TIMEOUT_MS })).stdout)
    : new Map<string, string>();
  return { manifest: withHashes(before, now, sums), hashed: todo.length };
}

/** Mounts the new host's filesystem where nobody uses it, for restores before the switch. */
async function mountStaging(r: Remote, l: VolumeLayout) {
  await r.run(`set -e; systemctl start ${q(l.units.device)}; mkdir -p ${q(staging(l))}
mountpoint -q ${q(staging(l))} || mount -t ${q(l.filesystem)} ${q(l.device)} ${q(staging(l))}`);
}

export async function unmountStaging(r: Remote, l: VolumeLayout) {
  await r.run(`mountpoint -q ${q(staging(l))} && umount ${q(staging(l))}; true`);
}

/** Records the move's phase (compare-and-swap on the old host holding it); `token` replaces the lease's token. */
async function setPhase(v: VolumeRef, expectFrom: HostRef, move: MoveState, token?: string): Promise<Lease> {
  return updateLease(leaseS3(v), v.volumeId, (cur) => {
    if (cur && (!sameHost(cur.holder, expectFrom) || !ownsLease(cur, v))) {
      throw new UserError(`volume ${v.volumeId}: the lease is held by ${hostName(cur.holder)}${cur.owner ? ` for ${ownerName(cur.owner)}` : ""}, ` +
        `not by ${hostName(expectFrom)} for this resource: refusing to move it`);
    }
    // Compare-and-swap on this very move: a move undone (or replaced) meanwhile is not brought back.
    if (cur?.move ? cur.move.newToken !== move.newToken || cur.move.undoing : move.phase !== "warm") {
      throw new UserError(`volume ${v.volumeId}: the move in the lease changed meanwhile (undone, or another run?): stopping this one`);
    }
    return { ...(cur ?? {}), volumeId: v.volumeId, holder: cur?.holder ?? expectFrom, generation: cur?.generation ?? 1,
      token: token ?? cur?.token ?? newToken(), updatedAt: "", move, owner: v.owner ?? cur?.owner };
  });
}

export async function move(olds: VolumeRef, news: VolumeRef, log: (m: string) => void,
  lock: <T>(r: Remote, l: VolumeLayout, fn: () => Promise<T>) => Promise<T>, opts: MoveOptions = {}): Promise<MoveReport> {
  const from = hostRef(olds), to = hostRef(news);
  const lOld = steps.layout(olds), lNew = steps.layout(news);
  const phases: Record<string, number> = {};
  const timed = async <T>(name: string, fn: () => Promise<T>) => {
    const t0 = Date.now();
    try { return await fn(); } finally { phases[name] = (phases[name] ?? 0) + (Date.now() - t0) / 1000; }
  };
  // The phase is read, and the next step chosen, only while the hosts' operation locks are held:
  // a second run, or the provider of a killed run that still works, makes this one wait for the
  // locks instead of acting on a stale phase. Holder and owner are checked here too, before
  // anything is written on the new host: a refused move touches nothing.
  let m: MoveState | undefined;
  let token = "";
  const decide = async () => {
    const existing = await readLease(leaseS3(news), news.volumeId);
    m = existing?.lease.move;
    if (m && !(sameHost(m.from, from) && sameHost(m.to, to))) {
      throw new Redecide(`volume ${news.volumeId} is in the middle of a move from ${hostName(m.from)} to ${hostName(m.to)} now; ` +
        `set host back to ${hostName(m.to)} to finish that move first`);
    }
    if (m?.undoing && !opts.withoutOld) {
      throw new Redecide(`volume ${news.volumeId}: an undo of its move to ${hostName(m.to)} began meanwhile (another run)`);
    }
    if (existing && !ownsLease(existing.lease, news)) {
      throw new Redecide(`volume ${news.volumeId}: the lease is held by ${hostName(existing.lease.holder)} for ` +
        `${existing.lease.owner ? ownerName(existing.lease.owner) : "another resource"}, not for this resource: refusing to move it; nothing was changed`);
    }
    if (!m && existing && sameHost(existing.lease.holder, to)) {
      // The lease already names the new host: a run that finished the switch and cleanup.
      m = { from, to, phase: "switched", startedAt: existing.lease.updatedAt, newToken: existing.lease.token };
    } else if (!m && existing && !sameHost(existing.lease.holder, from)) {
      throw new Redecide(`volume ${news.volumeId} is held by ${hostName(existing.lease.holder)} now, not by ${hostName(from)}: ` +
        "refusing to move it from there; nothing was changed");
    }
    token = m?.newToken ?? newToken();
    if (m) log(`resuming the move from ${hostName(from)} to ${hostName(to)} at phase ${m.phase}`);
    resumedFrom ??= m?.phase;
  };
  let downtimeStart = 0;
  let downtimeEnd = 0;
  // The old tree hashed before the stop (a warm move, in this run): the verification after it
  // hashes only what may have changed since there.
  let oldBefore: Manifest | undefined;
  let pendingCleanup: string | undefined;
  let hashedAfterStop: MoveReport["hashedAfterStop"];
  let forced: MoveReport["forced"];
  let resumedFrom: MovePhase | undefined;

  // The new host first: one that cannot be dialled is left to the caller to decide again without.
  const { remote: newConn, release: releaseNew } = await acquireRemote(news.host, { log }).catch((e) => {
    throw e instanceof DialError ? new HostUnreachable(to, e) : e;
  });
  return lock(newConn, lNew, async () => {
    const newR = newConn;
    const prepareNew = async () => {
      if (reached(m, "switching")) return;
      await timed("preflight", async () => {
        // Before its switch the new host never serves: if it shows the volume in service, the records
        // are wrong (a lease deleted or rewritten by hand), and a restore would go over live data.
        const served = await steps.servedOn(newR, lNew);
        if (served) {
          throw new UserError(`volume ${news.volumeId}: ${newR.name} shows the volume in service (${served}) although the move to it has not ` +
            "begun its switch: nothing was changed. Check the volume's lease and that host");
        }
        await preflightNew(newR, news, lNew);
        await steps.installTools(newR, news, log);
        await steps.writeConfig(newR, news, lNew, token);
        await steps.ensureStorage(newR, news, lNew);
        await steps.writeUnits(newR, news, lNew);
      });
    };
    // Back to the start of the downtime: the next final backup is taken anew, with the old host's token.
    const retakeFinal = async (why: string) => {
      log(why);
      m = { ...m!, phase: "warm", snapshotId: undefined };
      const oldToken = m.oldToken;
      delete m.oldToken;
      await setPhase(news, from, m, oldToken);
    };
    /** Up to the final snapshot, restored and verified: with the old host (its tree) or, forced, without it. */
    const toRestored = async (oldR: Remote | undefined) => {
      if (!m) {
        m = { from, to, phase: "warm", startedAt: new Date().toISOString(), newToken: token, toLayout: holderLayout(news) };
        // A lease that is gone (deleted by hand) is written anew with the token the old host holds.
        const hostToken = oldR && !(await readLease(leaseS3(news), news.volumeId)) ? await steps.leaseTokenOn(oldR, lOld) : undefined;
        await setPhase(news, from, m, hostToken);
      }
      if (!oldR) {
        // Before a final backup, or after an undo began (the old host may have served again once
        // given back): from the latest snapshot.
        if (!reached(m, "final-backup") || m.undoing) {
          // The old host is gone: its latest snapshot stands in for the final one. Recorded with
          // the new token first, so that the old host, should it come back, can no longer back up.
          const latest = (await steps.listSnapshots(newR, lNew)).slice(-1)[0];
          if (!latest) throw new UserError(`volume ${news.volumeId} has no snapshot in the repository: nothing to finish the move from`);
          m = { ...m, phase: "final-backup", snapshotId: latest.id, forced: true, undoing: undefined };
          // The old host's liveness judged again in this very write (a lock wait may have passed
          // since the decision): a host that came back and renewed keeps its volume.
          await updateLease(leaseS3(news), news.volumeId, (cur, clock) => {
            if (!cur || !sameHost(cur.holder, from) || !ownsLease(cur, news) || cur.move?.newToken !== m!.newToken) {
              throw new Redecide(`volume ${news.volumeId}: the lease changed before the forced finish (another run?)`);
            }
            if (leaseLive(cur, clock) && !news.forceDespiteLiveLease && !(cur.move && oldHostFenced(cur.move.phase) && !cur.move.undoing)) {
              throw new UserError(`force: ${hostName(from)} renewed the lease of volume ${news.volumeId} meanwhile: it is alive; nothing was changed`);
            }
            m = { ...m!, oldToken: cur.token };
            return { ...cur, token: m.newToken, move: m, owner: news.owner ?? cur.owner };
          });
          forced = { snapshot: "latest", snapshotTime: latest.time, dataLossWindowSeconds: Math.max(0, Math.round((Date.now() - Date.parse(latest.time)) / 1000)) };
          log(`FORCED: finishing the move to ${newR.name} from the latest snapshot ${latest.id.slice(0, 8)} of ${latest.time}; ` +
            `anything written on ${hostName(from)} after it (up to ${forced.dataLossWindowSeconds} s) is lost`);
        } else if (!reached(m, "restored")) {
          m = { ...m, forced: true };
          await setPhase(news, from, m);
          forced = { snapshot: "final", snapshotTime: "", dataLossWindowSeconds: 0 };
          log(`FORCED: finishing the move to ${newR.name} from its final snapshot ${m.snapshotId!.slice(0, 8)} (the old host was read-only since: nothing is lost)`);
        }
        if (!reached(m, "restored")) {
          if (!downtimeStart) downtimeStart = Date.now();
          await mountStaging(newR, lNew);
          await timed("final restore", () => steps.restoreInto(newR, lNew, m!.snapshotId!, staging(lNew), log));
          await timed("verify", () => steps.verifyRestored(newR, lNew, m!.snapshotId!, log, staging(lNew)));
          m = { ...m!, phase: "restored" };
          await setPhase(news, from, m);
        }
        return;
      }
      if (!reached(m, "final-backup")) {
        await mountStaging(newR, lNew);
        if (news.warmMove) {
          // The running tree is hashed meanwhile (its second host's work: no downtime).
          const oldHashed = hashedTree(oldR, lOld.mountPath, { lowPriority: true });
          const snaps = await timed("warm restore", () => steps.listSnapshots(newR, lNew));
          const latest = snaps[snaps.length - 1];
          if (latest) {
            log(`warm move: restoring the latest periodic snapshot ${latest.id.slice(0, 8)} on ${newR.name} while ${oldR.name} still runs`);
            await timed("warm restore", () => steps.restoreInto(newR, lNew, latest.id, staging(lNew), log));
          }
          // Only the old tree: rustic's restore sets every file's metadata (ctime) anew, so the
          // new host hashes every file after the final restore in any case (bench: 3000 of 3000).
          await timed("warm hash", async () => { oldBefore = await oldHashed; });
        }
        await steps.waitForPrune(news, log);
        downtimeStart = Date.now();
        await timed("stop old", async () => {
          const users = await steps.usersOf(oldR, olds, lOld);
          if (users.length) log(`stopping ${users.join(", ")} on ${oldR.name}`);
          // Read-only and stopped until cleaned or given back, reboots included.
          await steps.fence(oldR, lOld, [...new Set([...users, ...olds.stopUnits])], { stopFirst: users });
          await steps.quiesce(oldR, lOld);
        });
        log(`final backup on ${oldR.name}`);
        const status = await timed("final backup", () => steps.finalBackup(oldR, lOld, log));
        await pausePoint("after-final-backup");
        // From here the old host's token is revoked: it can no longer upload a backup.
        const cur = await readLease(leaseS3(news), news.volumeId);
        m = { ...m!, phase: "final-backup", snapshotId: status.snapshotId, oldToken: m!.oldToken ?? cur?.lease.token };
        await setPhase(news, from, m, m.newToken);
        faultPoint("after-final-backup");
      }
      if (!reached(m, "restored")) {
        if (!downtimeStart) downtimeStart = Date.now();
        await mountStaging(newR, lNew);
        // The old tree is read-only from the fence on: listed (and hashed) while the new host restores.
        const oldTree = verifiedTree(oldR, lOld.mountPath, oldBefore);
        oldTree.catch(() => undefined); // awaited below; a failed restore must not leave it unhandled
        faultPoint("during-final-restore", 1500);
        await timed("final restore", () => steps.restoreInto(newR, lNew, m!.snapshotId!, staging(lNew), log));
        faultPoint("after-final-restore");
        await pausePoint("after-final-restore");
        await timed("verify", async () => {
          const [a, b] = await Promise.all([oldTree, verifiedTree(newR, staging(lNew))]);
          const diff = diffManifests(a.manifest, b.manifest);
          if (diff.length) {
            await retakeFinal("verification failed: the next run takes a new final backup");
            throw new UserError(`volume ${news.volumeId}: the tree restored on ${newR.name} differs from the final state on ${oldR.name}; ` +
              `the move stops here, the old host keeps the data (read-only); run pulumi up again to retry with a new final backup:\n${diff.join("\n")}`);
          }
          hashedAfterStop = { old: a.hashed, new: b.hashed, files: Object.values(b.manifest.entries).filter((e) => e.type === "f").length };
          log(`verified: the restored tree equals the old host's (${Object.keys(b.manifest.entries).length} entries; ` +
            `files hashed after the stop: ${a.hashed} on ${oldR.name}, ${b.hashed} on ${newR.name}${oldBefore ? ` (the others on ${oldR.name} unchanged since hashed before it)` : ""})`);
        });
        m = { ...m!, phase: "restored" };
        await setPhase(news, from, m);
        faultPoint("after-restored");
      }
    };
    /** The switch: recorded first (from here the new host may serve: no undo), then the new host takes over. */
    const toSwitched = async () => {
      if (!reached(m, "switching")) {
        m = { ...m!, phase: "switching" };
        await setPhase(news, from, m);
      }
      if (!reached(m, "switched")) {
        if (!downtimeStart) downtimeStart = Date.now();
        await timed("switch", async () => {
          await steps.switchOn(newR, lNew, staging(lNew), news.stopUnits);
        });
        faultPoint("after-switch-on");
        downtimeEnd = Date.now();
        m = { ...m!, phase: "switched" };
        try {
          await updateLease(leaseS3(news), news.volumeId, (cur) => {
            // Compare-and-swap on what this move expects: the old host holds it, in this very move.
            // If it fails, the new host's volume is stopped again below: no read-write copy without the lease.
            if (!cur || !sameHost(cur.holder, from) || cur.move?.newToken !== m!.newToken) {
              throw new UserError(`volume ${news.volumeId}: the lease changed during the move (${cur ? `held by ${hostName(cur.holder)}` : "gone"}; ` +
                "a forced takeover or another run?): not switching");
            }
            return { ...cur, volumeId: news.volumeId, holder: to, generation: cur.generation + 1, token: m!.newToken, updatedAt: "", move: m,
              owner: news.owner ?? cur.owner, layout: holderLayout(news) };
          });
        } catch (e) {
          // Disabled too: after a reboot the new host must not mount what it does not hold.
          await newR.run(`systemctl disable --now --no-reload -- ${[...news.stopUnits, lNew.units.timer, lNew.units.renewTimer, lNew.units.mount].map(q).join(" ")} 2>/dev/null; true`, { allowFailure: true });
          throw e;
        }
        log(`switched: ${news.volumeId} now lives on ${newR.name}`);
      }
    };
    /**
     * A resumed move's final snapshot stands only while the old host stayed fenced. Unfenced
     * before the switch (remounted by hand, say): a new final backup is taken. Unfenced from the
     * switch on: both hosts may hold writes; nothing is changed, the error says what to do.
     */
    const oldStillFenced = async (oldR: Remote) => {
      if (!reached(m, "final-backup") || reached(m, "switched") || m!.forced) return;
      const f = await steps.isFenced(oldR, lOld);
      if (f.fenced) return;
      if (reached(m, "switching")) {
        throw new UserError(`volume ${news.volumeId}: the old host ${oldR.name} is no longer fenced (${f.why}) although the move reached its ` +
          `switch: both hosts may have been written to since. Nothing was changed. Make ${oldR.name} read-only again (stop what writes ` +
          `to ${lOld.mountPath}, mount -o remount,ro ${lOld.mountPath}, touch ${lOld.configDir}/fenced), copy by hand anything written there ` +
          "since, and run pulumi up again");
      }
      await retakeFinal(`the old host ${oldR.name} is no longer fenced (${f.why}): its final backup no longer stands; taking a new one`);
    };
    const cleanupOld = async (oldR: Remote | undefined) => {
      faultPoint("before-old-cleanup");
      if (!oldR) return;
      if (!m!.forced) {
        // Only a fenced copy is removed without a backup: one unfenced since (by hand) may hold writes.
        const f = await steps.isFenced(oldR, lOld);
        const o = f.fenced ? undefined : await steps.observe(oldR, lOld);
        if (o && (o.present || o.configured)) {
          pendingCleanup = `the old host ${oldR.name} is no longer fenced (${f.why}), so it may hold writes made there since its final backup: ` +
            `nothing was removed there. Copy what you need from ${lOld.mountPath}, then fence it again (mount -o remount,ro ${lOld.mountPath}; ` +
            `touch ${lOld.configDir}/fenced) for the next pulumi up to clean it, or set force: true to forget it`;
          log(pendingCleanup);
          return;
        }
      }
      try {
        await timed("clean old", async () => {
          log(`cleaning ${oldR.name}`);
          // Its users first: after a forced takeover they may still run there (no fence).
          const users = await steps.usersOf(oldR, olds, lOld);
          if (users.length) await oldR.runArgv(["systemctl", "stop", ...users], { allowFailure: true });
          await steps.teardown(oldR, lOld);
        });
      } catch (e) {
        // The volume lives on the new host now; the old one stays fenced (read-only, no timer,
        // its token revoked) until a later run cleans it.
        pendingCleanup = `cleaning ${oldR.name} failed: ${(e as Error).message.split("\n")[0]}`;
        log(`${pendingCleanup}; the next pulumi up retries`);
        return;
      }
      await updateLease(leaseS3(news), news.volumeId, (cur) => {
        if (!cur || !sameHost(cur.holder, to) || cur.token !== m!.newToken) {
          throw new UserError(`volume ${news.volumeId}: the lease changed after the switch (${cur ? `held by ${hostName(cur.holder)}` : "gone"}): ` +
            "not marking the move done");
        }
        const next: Lease = { ...cur, owner: news.owner ?? cur.owner };
        delete next.move;
        return next;
      });
    };
    const report = (): MoveReport => ({
      from: hostName(from), to: hostName(to), snapshotId: m?.snapshotId ?? "", warm: news.warmMove,
      downtimeSeconds: downtimeStart && downtimeEnd ? Math.round((downtimeEnd - downtimeStart) / 100) / 10 : 0,
      phases: Object.fromEntries(Object.entries(phases).map(([k, v]) => [k, Math.round(v * 10) / 10])),
      ...(pendingCleanup ? { pendingCleanup } : {}),
      ...(hashedAfterStop ? { hashedAfterStop } : {}),
      ...(forced ? { forced } : {}),
      ...(resumedFrom ? { resumedFrom } : {}),
    });
    /** Where the move stood, for the caller to record even if the lease cannot be read then. */
    const tagged = (e: unknown) => {
      if (m && e && typeof e === "object") Object.assign(e, { movePhase: m.phase, moveStartedAt: m.startedAt });
      return e;
    };
    /** The rest of the move without the old host: only from the switch on, or by force. */
    const withoutOldHost = async (why: string) => {
      pendingCleanup = why;
      try {
        await prepareNew();
        if (!reached(m, "switching")) await toRestored(undefined);
        await toSwitched();
      } catch (e) {
        throw tagged(e);
      }
      log(`volume ${news.volumeId} lives on ${newR.name}; ${pendingCleanup}: a later pulumi up cleans it`);
      return report();
    };

    if (opts.withoutOld) {
      await decide();
      return withoutOldHost(`the old host ${hostName(from)} was given up by force`);
    }
    let oldR: Remote | undefined;
    let releaseOld = () => undefined as void;
    // Once switched, the old host only needs cleaning: one short dial, and a dead host is no error.
    const peek = await readLease(leaseS3(news), news.volumeId).then((x) => x?.lease, () => undefined);
    const onlyCleanup = !!peek && sameHost(peek.holder, to) && (!peek.move || peek.move.phase === "switched");
    try {
      ({ remote: oldR, release: releaseOld } = await acquireRemote(olds.host, onlyCleanup ? { log, attempts: 1, dialTimeoutMs: 15_000 } : { log, attempts: 4 }));
    } catch (e) {
      await decide();
      if (!(e instanceof DialError)) throw e;
      // From the switch on, a dead old host does not block the stack: it stays fenced, and the
      // resource's pendingCleanup output says a later run must clean it. Before it, the caller
      // decides again knowing the old host is unreachable (refused, or with force finished without it).
      if (!reached(m, "switching")) throw new HostUnreachable(from, e);
      return withoutOldHost(`the old host ${hostName(from)} cannot be reached (${e.message.split("\n")[0]})`);
    }
    try {
      // Before the old host's lock: one machine under two names would wait for its own lock.
      if (!onlyCleanup && !(peek?.move && phaseReached(peek.move.phase, "switching"))) await notSameMachine(oldR, newR, news, lNew);
      await lock(oldR, lOld, async () => {
        await decide();
        await oldStillFenced(oldR!);
        await prepareNew();
        if (!reached(m, "switching")) await toRestored(oldR);
        await toSwitched();
        await cleanupOld(oldR);
      });
    } catch (e) {
      throw tagged(e);
    } finally {
      releaseOld();
    }
    return report();
  }).finally(releaseNew);
}
