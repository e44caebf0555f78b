// Undoing a move that stopped before the switch (its `host` set back to the old host): the new
// host's staging and storage go, the lease goes back to the old host and its token, and the old
// host is given back: read-write, scheduled, its users started. Each step is idempotent, so a
// run cut off anywhere is finished by the next one.
import { UserError } from "../errors";
import { VolumeInputs } from "../inputs";
import { VolumeLayout } from "../host/layout";
import { quote as q } from "../host/shell";
import { Remote, withRemote } from "../remote/ssh";
import { hostName, readLease, sameHost, updateLease } from "../storage/lease";
import { hostRef, leaseS3, ownsLease } from "./lease";
import * as steps from "./steps";

type Lock = <T>(r: Remote, l: VolumeLayout, fn: () => Promise<T>) => Promise<T>;

/** Puts a volume back in service on r: fence lifted, mounted read-write, timer, users started. */
export async function giveBack(r: Remote, l: VolumeLayout, users: string[]): Promise<void> {
  await steps.unfence(r, l).catch(() => undefined);
  await r.run(`systemctl enable --now --quiet ${q(l.units.device)} ${q(l.units.mount)} 2>/dev/null || true`, { allowFailure: true });
  await steps.unquiesce(r, l).catch(() => undefined);
  await r.run(`systemctl enable --now --quiet ${q(l.units.timer)} 2>/dev/null || true`, { allowFailure: true });
  if (users.length) await r.runArgv(["systemctl", "start", "--", ...users], { allowFailure: true });
}

/**
 * Undoes the move of `back` (the old host, where the volume goes back to) to `target` (the new
 * host, cleaned). Returns a warning when the new host could not be cleaned (unreachable): what
 * is left there cannot serve the volume (never switched, its token never valid).
 */
export async function undoMove(back: VolumeInputs, target: VolumeInputs, log: (m: string) => void, lock: Lock): Promise<string | undefined> {
  const lBack = steps.layout(back), lTarget = steps.layout(target);
  return withRemote(back.host, (r) => lock(r, lBack, async () => {
    const cur = await readLease(leaseS3(back), back.volumeId);
    const m = cur?.lease.move;
    if (cur && !ownsLease(cur.lease, back)) {
      throw new UserError(`volume ${back.volumeId} belongs to another resource now: not undoing anything`);
    }
    if (m && m.phase === "switched") {
      throw new UserError(`host: the move of volume ${back.volumeId} from ${hostName(m.from)} to ${hostName(m.to)} already switched: ` +
        `the volume lives on ${hostName(m.to)}. Keep host at ${hostName(m.to)} (the next pulumi up cleans the old host), then move it back if you want`);
    }
    if (m && !sameHost(m.from, hostRef(back))) {
      throw new UserError(`host: volume ${back.volumeId} is moving from ${hostName(m.from)} to ${hostName(m.to)}, not from ${r.name}: ` +
        `set host to one of those`);
    }
    if (!m && cur && !sameHost(cur.lease.holder, hostRef(back))) {
      throw new UserError(`host: volume ${back.volumeId} is held by ${hostName(cur.lease.holder)}, not by ${r.name}: nothing to undo here`);
    }
    log(`undoing the move to ${hostName(hostRef(target))}: ${back.volumeId} goes back to ${r.name}`);
    // 1. Nothing of the volume stays on the new host (it never switched: no read-write copy there).
    let warning: string | undefined;
    try {
      await withRemote(target.host, (t) => lock(t, lTarget, async () => {
        await t.run(`d=/run/dboxed-volumes/${lTarget.volumeId}/staging; mountpoint -q "$d" && umount "$d"; rmdir "$d" 2>/dev/null; true`);
        await steps.teardown(t, lTarget);
        log(`removed the volume's staging and storage from ${t.name}`);
      }), { log });
    } catch (e) {
      warning = `the new host ${hostName(hostRef(target))} could not be cleaned (${(e as Error).message.split("\n")[0]}); ` +
        `what is left there is not in service (never switched, no valid lease token): remove /etc/dboxed-volumes/${lTarget.volumeId}, ` +
        `its units and its storage by hand, or move the volume there again later`;
      log(warning);
    }
    // 2. The lease: the old host holds it again with its own token (its backups pass again).
    if (m) {
      await updateLease(leaseS3(back), back.volumeId, (c) => {
        if (!c || !sameHost(c.holder, hostRef(back)) || c.move?.newToken !== m.newToken) {
          throw new UserError(`volume ${back.volumeId}: the lease changed during the undo (a forced takeover or another run?): stopping`);
        }
        const next = { ...c, token: m.oldToken ?? c.token };
        delete next.move;
        return next;
      });
    }
    // 3. The old host in service again.
    const users = [...new Set([...await steps.fencedUsers(r, lBack), ...back.stopUnits])];
    await giveBack(r, lBack, users);
    log(`${back.volumeId} is back in service on ${r.name}: read-write, scheduled${users.length ? `, ${users.join(", ")} started` : ""}`);
    return warning;
  }), { log });
}
