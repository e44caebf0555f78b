// Undoing a move that stopped before the switch (its `host` set back to the old host). Under
// both hosts' operation locks, taken in the order a move takes them (new host, then old host):
// the new host's staging and storage go, then the move leaves the lease (which goes back to the
// old host's token), then the old host is given back: read-write, scheduled, its users started.
// Each step is idempotent, so a run cut off anywhere is finished by the next one.
import { UserError } from "../errors";
import { VolumeInputs } from "../inputs";
import { VolumeLayout } from "../host/layout";
import { quote as q } from "../host/shell";
import { Remote, withRemote } from "../remote/ssh";
import { hostName, Lease, MoveState, readLease, sameHost, updateLease } from "../storage/lease";
import { claim, hostRef, leaseS3, ownsLease, VolumeRef } from "./lease";
import { Redecide, sameMachine, unmountStaging } from "./move";
import { newHostMayHaveServed } from "./placement";
import { pausePoint } from "./faults";
import * as steps from "./steps";
import { unitsArgv } from "../host/systemd";

type Lock = <T>(r: Remote, l: VolumeLayout, fn: () => Promise<T>) => Promise<T>;

/**
 * Puts a volume back in service on r: fence lifted, mounted read-write, timer, users started.
 * `strict`: a fence that cannot be lifted is an error (an undo must not report success then).
 */
export async function giveBack(r: Remote, l: VolumeLayout, users: string[], strict = false): Promise<void> {
  if (strict) await steps.unfence(r, l);
  else await steps.unfence(r, l).catch(() => undefined);
  await r.run(`systemctl enable --now --no-reload --quiet ${q(l.units.device)} ${q(l.units.mount)} 2>/dev/null || true`, { allowFailure: true });
  await steps.unquiesce(r, l).catch(() => undefined);
  await r.run(`systemctl enable --now --no-reload --quiet ${q(l.units.timer)} ${q(l.units.renewTimer)} 2>/dev/null || true`, { allowFailure: true });
  if (users.length) await r.runArgv(unitsArgv("start", users), { allowFailure: true });
}

/**
 * Undoes the move of `back` (the old host, where the volume goes back to) to `target` (the new
 * host, cleaned). Returns a warning when the new host could not be reached and did not need to
 * be (it never served the volume): what is left there holds no valid lease token.
 */
export async function undoMove(back: VolumeRef, target: VolumeRef, log: (m: string) => void, lock: Lock): Promise<string | undefined> {
  const lBack = steps.layout(back), lTarget = steps.layout(target);
  let t: Remote | undefined;
  let unreachable: Error | undefined;
  try {
    t = await Remote.connect(target.host, { log, attempts: 2, dialTimeoutMs: 15_000 });
  } catch (e) {
    unreachable = e as Error;
  }
  try {
    const underLocks = async (): Promise<string | undefined> => withRemote(back.host, (r) => lock(r, lBack, async () => {
      const cur = await readLease(leaseS3(back), back.volumeId);
      const m = cur?.lease.move;
      check(cur?.lease, m, back, target, r.name);
      log(`undoing the move to ${hostName(hostRef(target))}: ${back.volumeId} goes back to ${r.name}`);
      if (t) {
        // Never tear down the machine the volume lives on (the new host's address now reaching it).
        if ((await sameMachine(r, t, back.volumeId)).same) {
          throw new UserError(`host: ${t.name} is the very machine volume ${back.volumeId} lives on (${r.name}): not removing anything there`);
        }
        // The phase says the new host never served (recorded before its switch): its own marks say so too.
        const served = await steps.servedOn(t, lTarget);
        if (served) {
          throw new UserError(`host: the move of ${back.volumeId} to ${t.name} cannot be undone: ${t.name} shows the volume in service (${served}), ` +
            `so it may hold writes made there. Set host to ${hostName(hostRef(target))} and run pulumi up (finishes the move), then move it back`);
        }
      } else if (m && newHostMayHaveServed(m.phase) && !m.undoing) {
        throw new UserError(`cannot undo the move of ${back.volumeId} to ${hostName(m.to)}: that host cannot be reached ` +
          `(${unreachable!.message.split("\n")[0]}), and at phase ${m.phase} it may have started serving the volume. ` +
          `Run again when it is reachable; ${r.name} stays read-only meanwhile`);
      }
      // Intent first: the undo is recorded (and the old host's own token put back: it is still
      // fenced, so it backs up nothing until given back) before anything is removed or given
      // back; a run cut off from here on is finished by the next, never turned into a finish.
      if (m && !m.undoing) {
        await updateLease(leaseS3(back), back.volumeId, (c) => {
          if (!c || !sameHost(c.holder, hostRef(back)) || c.move?.newToken !== m.newToken || newHostMayHaveServed(c.move.phase)) {
            throw new Redecide(`volume ${back.volumeId}: the lease changed before the undo began (a forced takeover or another run?)`);
          }
          return { ...c, token: m.oldToken ?? c.token, move: { ...c.move, undoing: true }, owner: back.owner ?? c.owner };
        });
      }
      if (t) {
        await pausePoint("undo-before-teardown");
        await unmountStaging(t, lTarget); // teardown removes /run/dboxed-volumes/<id> with it
        await steps.teardown(t, lTarget);
        log(`removed the volume's staging and storage from ${t.name}`);
      }
      await pausePoint("undo-before-give-back");
      // The old host in service again: the units the fence kept, the ones that need the mount, stopUnits.
      const users = [...new Set([...await steps.fencedUsers(r, lBack), ...await steps.usersOf(r, back, lBack)])]
        .filter((u) => u !== lBack.units.renew && u !== lBack.units.renewTimer);
      await giveBack(r, lBack, users, true);
      if (!cur) {
        // The lease was gone (deleted by hand): claimed again, the old host given its token, so
        // that its backups pass (without one they are refused, and nothing would say so).
        const { lease } = await claim({ ...back, force: false }, { instance: back.instanceId ?? "", adoptLegacy: true });
        await steps.writeConfig(r, back, lBack, lease.token);
      }
      // Done: the move leaves the lease.
      if (m) {
        await updateLease(leaseS3(back), back.volumeId, (c) => {
          if (!c || !sameHost(c.holder, hostRef(back)) || c.move?.newToken !== m.newToken) {
            throw new UserError(`volume ${back.volumeId}: the lease changed during the undo (a forced takeover or another run?): stopping`);
          }
          const next: Lease = { ...c, token: m.oldToken ?? c.token };
          delete next.move;
          return next;
        });
      }
      log(`${back.volumeId} is back in service on ${r.name}: read-write, scheduled${users.length ? `, ${users.join(", ")} started` : ""}`);
      if (!t) {
        const warning = `the new host ${hostName(hostRef(target))} could not be reached (${unreachable!.message.split("\n")[0]}); what is ` +
          `left there never served the volume and holds no valid lease token: remove /etc/dboxed-volumes/${lTarget.volumeId}, ` +
          "its units and its storage by hand, or move the volume there again later";
        log(warning);
        return warning;
      }
      return undefined;
    }), { log });
    return t ? await lock(t, lTarget, underLocks) : await underLocks();
  } finally {
    t?.dispose();
  }
}

/**
 * Refuses an undo the lease does not allow (read under the locks, so it may have changed since
 * the decision: then the caller decides again from it): the switch begun, another move, another
 * holder or owner.
 */
function check(cur: Lease | undefined, m: MoveState | undefined, back: VolumeRef, target: VolumeRef, name: string): void {
  if (cur && !ownsLease(cur, back)) {
    throw new Redecide(`volume ${back.volumeId} belongs to another resource now: not undoing anything`);
  }
  if (m && newHostMayHaveServed(m.phase) && !m.undoing) {
    throw new Redecide(`host: the move of volume ${back.volumeId} from ${hostName(m.from)} to ${hostName(m.to)} reached its switch meanwhile`);
  }
  if (m && (!sameHost(m.from, hostRef(back)) || !sameHost(m.to, hostRef(target)))) {
    throw new Redecide(`host: volume ${back.volumeId} is moving from ${hostName(m.from)} to ${hostName(m.to)}, not from ${name} ` +
      `to ${hostName(hostRef(target))}`);
  }
  if (!m && cur && !sameHost(cur.holder, hostRef(back))) {
    throw new Redecide(`volume ${back.volumeId} is held by ${hostName(cur.holder)} now (another run finished the move meanwhile), not by ${name}`);
  }
}
