// Claiming and releasing a volume's lease around create and delete.
import { UserError } from "../errors";
import { VolumeInputs } from "../inputs";
import { HostRef, hostName, Lease, readLease, deleteLease, LeaseConflict, newToken, sameHost, updateLease } from "../storage/lease";
import { S3Settings } from "../storage/s3";

export function leaseS3(v: VolumeInputs): S3Settings {
  const r = v.repository;
  return { endpoint: r.localEndpoint, region: r.region, bucket: r.bucket, prefix: r.prefix, forcePathStyle: r.forcePathStyle,
    accessKeyId: v.accessKeyId, secretAccessKey: v.secretAccessKey };
}

export function hostRef(v: VolumeInputs): HostRef {
  return { address: v.host.address, port: v.host.port };
}

/**
 * Claims the volume for v's host. Refused when another host holds it, unless `force`;
 * returns the lease it replaced when it took the volume by force.
 */
export async function claim(v: VolumeInputs): Promise<{ lease: Lease; forcedFrom?: Lease }> {
  const me = hostRef(v);
  let forcedFrom: Lease | undefined;
  const lease = await updateLease(leaseS3(v), v.volumeId, (cur) => {
    if (!cur) return { volumeId: v.volumeId, holder: me, generation: 1, token: newToken(), updatedAt: "" };
    if (sameHost(cur.holder, me) && !cur.move) return { ...cur, token: cur.token || newToken() };
    if (cur.move && sameHost(cur.move.to, me)) {
      throw new UserError(`volume ${v.volumeId} is being moved from ${hostName(cur.move.from)} to ${hostName(cur.move.to)} ` +
        `by another stack or run (phase ${cur.move.phase}); finish that move with the stack that started it`);
    }
    if (!v.force) {
      throw new UserError(`volume ${v.volumeId} is held by host ${hostName(cur.holder)} (since ${cur.updatedAt}, generation ${cur.generation}); ` +
        "a volume lives on one host at a time. To move it, change host in the stack that holds it; " +
        "if that host is gone for good, set force: true to restore the latest snapshot here");
    }
    forcedFrom = cur;
    return { volumeId: v.volumeId, holder: me, generation: cur.generation + 1, token: newToken(), updatedAt: "" };
  });
  return { lease, forcedFrom };
}

/** Releases the lease if v's host holds it. */
export async function release(v: VolumeInputs): Promise<void> {
  const s = leaseS3(v);
  for (let i = 0; i < 5; i++) {
    const cur = await readLease(s, v.volumeId);
    if (!cur || !sameHost(cur.lease.holder, hostRef(v)) || cur.lease.move) return;
    try {
      await deleteLease(s, v.volumeId, cur.etag);
      return;
    } catch (e) {
      if (!(e instanceof LeaseConflict)) throw e;
    }
  }
}
