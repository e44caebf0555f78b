// Claiming and releasing a volume's lease around create, update and delete. A volume id has one
// owner (a resource of one stack) and one holder (the host it lives on) at a time.
import { UserError } from "../errors";
import { VolumeInputs } from "../inputs";
import {
  DEFAULT_LEASE_SECONDS, HolderLayout, HostRef, hostName, Lease, readLease, deleteLease, LeaseConflict, newToken, normalizeHostKey, Owner, ownerName,
  sameHost, sameOwner, ServerClock, serverNow, updateLease,
} from "../storage/lease";
import { LeaseView, newHostMayHaveServed } from "./placement";

/** A volume's inputs, with this resource instance's id where the state has one (an update's, a delete's). */
export type VolumeRef = VolumeInputs & { instanceId?: string };
import { S3Settings } from "../storage/s3";

export function leaseS3(v: VolumeInputs): S3Settings {
  const r = v.repository;
  return { endpoint: r.localEndpoint, region: r.region, bucket: r.bucket, prefix: r.prefix, forcePathStyle: r.forcePathStyle,
    accessKeyId: v.accessKeyId, secretAccessKey: v.secretAccessKey };
}

/** Where the volume is on its host, as the lease records it for a host only the lease names. */
export function holderLayout(v: Pick<VolumeInputs, "mountPath" | "filesystem" | "volumeGroup">): HolderLayout {
  return JSON.parse(JSON.stringify({ mountPath: v.mountPath, filesystem: v.filesystem, volumeGroup: v.volumeGroup }));
}

export function hostRef(v: VolumeInputs): HostRef {
  return { address: v.host.address, port: v.host.port, hostKey: normalizeHostKey(v.host.hostKey) };
}

export function ownerOf(v: VolumeInputs): Owner | undefined {
  return v.owner;
}

/**
 * Whether v's resource may act on a volume whose lease is `cur`: the lease names its owner, or
 * this very resource instance (its random id, only in this resource's state: the stack, project
 * or resource was renamed, with an alias), or (a lease written before owners were recorded,
 * adopted only by a resource that already has the volume in its state) v's host holds it.
 */
export function ownsLease(cur: Lease, v: VolumeRef, adoptLegacy = true): boolean {
  if (v.instanceId && cur.instance === v.instanceId) return true;
  if (cur.owner && v.owner) return sameOwner(cur.owner, v.owner);
  return adoptLegacy && sameHost(cur.holder, hostRef(v));
}

/**
 * Whether the lease's holder renewed it lately, on the S3 server's clock (the earliest time its
 * answer allows: a lease is never judged expired early).
 */
export function leaseLive(cur: Lease, clock: ServerClock | undefined, local = Date.now()): boolean {
  return !!cur.expiresAt && cur.expiresAt * 1000 > serverNow(clock, "low", local);
}

/** The lease as the placement decision sees it. */
export function leaseView(cur: Lease | undefined, v: VolumeRef, clock: ServerClock | undefined): LeaseView | undefined {
  if (!cur) return undefined;
  return {
    holder: cur.holder, ours: ownsLease(cur, v), live: leaseLive(cur, clock),
    move: cur.move ? { from: cur.move.from, to: cur.move.to, phase: cur.move.phase, undoing: cur.move.undoing } : undefined,
    interrupted: cur.deleting ? "delete" : cur.rebuild ? "rebuild" : undefined,
  };
}

/** Whether the lease names another instance of v's resource (v's was replaced). */
export function otherInstance(cur: Lease, instanceId: string | undefined): boolean {
  return !!cur.instance && !!instanceId && cur.instance !== instanceId;
}

export interface ClaimOptions {
  /** The resource instance claiming (its outputs' instanceId); a new one replaces the lease's. */
  instance: string;
  /** Take over a lease without owner on v's host: only for a resource that has the volume in its state. */
  adoptLegacy: boolean;
  /** The S3 server's clock, to judge the lease's expiry by. */
  clock?: ServerClock;
  /** The time on this machine (ms; tests). */
  now?: number;
}

/** Pure: the lease after v's resource claims the volume, or an error that says who has it. */
export function claimedLease(cur: Lease | undefined, v: VolumeRef, opts: ClaimOptions = { instance: "", adoptLegacy: true }): { next: Lease; forcedFrom?: Lease } {
  const me = hostRef(v);
  const owner = ownerOf(v);
  const instance = opts.instance || undefined;
  const durationSeconds = v.leaseDuration ?? DEFAULT_LEASE_SECONDS;
  const layout = holderLayout(v);
  if (!cur) return { next: { volumeId: v.volumeId, holder: me, generation: 1, token: newToken(), updatedAt: "", owner, instance, durationSeconds, layout } };
  if (ownsLease(cur, v, opts.adoptLegacy) && sameHost(cur.holder, me) && !cur.move) {
    // (also a renamed stack or resource: the same instance re-owns it under its new name)
    // Same resource, same machine (perhaps at a new address): keep the token, record where it is now.
    return { next: { ...cur, holder: me, token: cur.token || newToken(), owner: owner ?? cur.owner, instance: instance ?? cur.instance, durationSeconds, layout } };
  }
  if (v.force && cur.owner && sameHost(cur.holder, me) && !ownsLease(cur, v)) {
    throw new UserError(`force: volume ${v.volumeId} lives on this very host ${hostName(cur.holder)} for ${ownerName(cur.owner)}; ` +
      "force takes a volume from a host that is gone for good, never from a live one on the same host: give this Volume another volumeId");
  }
  // This resource's move past its switch, whose new host is gone: force takes it (once the lease expired).
  const forcedPastSwitch = !!cur.move && v.force && newHostMayHaveServed(cur.move.phase) && !cur.move.undoing;
  if (cur.move && ownsLease(cur, v) && !forcedPastSwitch) {
    throw new UserError(`volume ${v.volumeId} is in the middle of a move from ${hostName(cur.move.from)} to ${hostName(cur.move.to)} ` +
      `(phase ${cur.move.phase}); set host to ${hostName(cur.move.to)} or back to ${hostName(cur.move.from)} in the stack that started it`);
  }
  if (cur.move && cur.move.phase !== "switched" && !ownsLease(cur, v) && v.force && !v.forceDespiteLiveLease) {
    // Nothing renews a lease while a move's final backup, restore or verification runs (the old
    // host is fenced, the new one not started): its expiry says nothing about whether it is alive.
    throw new UserError(`force: volume ${v.volumeId} is in the middle of a move from ${hostName(cur.move.from)} to ${hostName(cur.move.to)} ` +
      `(phase ${cur.move.phase}) run by ${cur.owner ? ownerName(cur.owner) : "another resource"}: wait until that move is finished or undone; ` +
      "only if both hosts are gone for good, set forceDespiteLiveLease: true");
  }
  if (!v.force) {
    const whose = cur.owner ? ` for ${ownerName(cur.owner)}` : "";
    const sameMachine = sameHost(cur.holder, me) ? " (this very host)" : "";
    throw new UserError(`volume ${v.volumeId} is held by host ${hostName(cur.holder)}${sameMachine}${whose} (since ${cur.updatedAt}, ` +
      `generation ${cur.generation}); a volume id has one owner and lives on one host at a time. Give this Volume another volumeId, ` +
      "or, to move the volume, change host in the stack that holds it; if that host is gone for good, set force: true to restore " +
      "the latest snapshot here");
  }
  const now = serverNow(opts.clock, "low", opts.now ?? Date.now());
  if (cur.expiresAt && cur.expiresAt * 1000 > now && !v.forceDespiteLiveLease) {
    const left = Math.ceil(cur.expiresAt - now / 1000);
    throw new UserError(`force: the lease of volume ${v.volumeId} is live: ${hostName(cur.holder)} renewed it until ` +
      `${new Date(cur.expiresAt * 1000).toISOString()} (${left} s from now). A host that is gone stops renewing it: run again after ` +
      `that time. Only if you know that host is gone for good and cannot wait, set forceDespiteLiveLease: true ` +
      "(anything it writes until it is stopped is lost)");
  }
  return { next: { volumeId: v.volumeId, holder: me, generation: cur.generation + 1, token: newToken(), updatedAt: "", owner, instance, durationSeconds, layout },
    forcedFrom: cur };
}

/**
 * Claims the volume for v's resource and host. Refused when another resource or host has it,
 * unless `force`; returns the lease it replaced when it took the volume by force, and whether
 * the lease is new (so a failed create can give it back).
 */
export async function claim(v: VolumeRef, opts: ClaimOptions): Promise<{ lease: Lease; forcedFrom?: Lease; fresh: boolean }> {
  let forcedFrom: Lease | undefined;
  let fresh = false;
  const lease = await updateLease(leaseS3(v), v.volumeId, (cur, clock) => {
    const r = claimedLease(cur, v, { ...opts, clock });
    forcedFrom = r.forcedFrom;
    fresh = !cur || !!r.forcedFrom;
    return r.next;
  });
  return { lease, forcedFrom, fresh };
}

/** Releases the lease if v's resource and host hold it (and no move is in progress). */
export async function release(v: VolumeRef, instanceId?: string, opts: { withMove?: boolean } = {}): Promise<void> {
  const s = leaseS3(v);
  for (let i = 0; i < 5; i++) {
    const cur = await readLease(s, v.volumeId);
    // A move's record stays unless the caller cleaned (or gave up) both of its hosts.
    if (!cur || !sameHost(cur.lease.holder, hostRef(v)) || !ownsLease(cur.lease, v) || otherInstance(cur.lease, instanceId) ||
      (cur.lease.move && !opts.withMove)) return;
    try {
      await deleteLease(s, v.volumeId, cur.etag);
      return;
    } catch (e) {
      if (!(e instanceof LeaseConflict)) throw e;
    }
  }
}

/** Records (or clears) a rebuild in progress in the lease, if v's resource holds it. */
export async function setRebuild(v: VolumeRef, rebuild: Lease["rebuild"]): Promise<Lease> {
  return setIntent(v, "rebuild", rebuild);
}

/** Records (or clears) a delete in progress in the lease, if v's resource holds it. */
export async function setDeleting(v: VolumeRef, deleting: Lease["deleting"]): Promise<Lease> {
  return setIntent(v, "deleting", deleting);
}

async function setIntent<K extends "rebuild" | "deleting">(v: VolumeRef, key: K, value: Lease[K]): Promise<Lease> {
  return updateLease(leaseS3(v), v.volumeId, (cur) => {
    if (!cur || !ownsLease(cur, v) || !sameHost(cur.holder, hostRef(v))) {
      throw new UserError(`volume ${v.volumeId}: this resource does not hold the lease${cur ? ` (${hostName(cur.holder)} does)` : ""}: ` +
        `refusing to ${key === "rebuild" ? "rebuild" : "delete"} it`);
    }
    const next: Lease = { ...cur, [key]: value, owner: v.owner ?? cur.owner };
    if (!value) delete next[key];
    if (!value && key === "rebuild") next.layout = holderLayout(v);
    return next;
  });
}
