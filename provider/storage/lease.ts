// The lease of a volume: one JSON object per volume in S3, changed only by compare-and-swap
// (If-None-Match: * to create, If-Match: <etag> to change). It says which host holds the
// volume, and holds the progress of a move, so that a new `pulumi up` can resume it.
import { UserError } from "../errors";
import { explainS3Error, s3Client, S3Settings } from "./s3";

/**
 * A host as the lease knows it. A host is who its pinned key says: the same key at another
 * address or port is the same machine (no move); hosts without a recorded key compare by address.
 */
export interface HostRef { address: string; port: number; hostKey?: string }

/** The Pulumi resource that owns a volume: one per volume id, whatever host it lives on. */
export interface Owner { project: string; stack: string; name: string }

/** A move's phases, each recorded before the step it names takes effect (see lifecycle/placement.ts). */
export type MovePhase = "warm" | "final-backup" | "restored" | "switching" | "switched";

export interface MoveState {
  from: HostRef;
  to: HostRef;
  phase: MovePhase;
  /** The final snapshot of the old host, once taken. */
  snapshotId?: string;
  /** The lease token the new host will hold after the switch (its backups check it). */
  newToken: string;
  /**
   * The old host's token, kept while its final backup stands: the lease's token is the new one
   * from the final backup on, so the old host can no longer back up; a retry that needs a new
   * final backup puts this one back.
   */
  oldToken?: string;
  startedAt: string;
  /** An undo of this move began (recorded before the new host is cleaned and the old one given back): it is only ever finished. */
  undoing?: boolean;
  /** Finished, or taken, by force without its old host: that host is cleaned without a backup once it is back. */
  forced?: boolean;
  /** The layout on the new host (mount path, filesystem, volume group): a host only the lease names is reached with it. */
  toLayout?: HolderLayout;
}

export interface Lease {
  volumeId: string;
  holder: HostRef;
  /** Increases with every change of holder. */
  generation: number;
  /** A random token only the holder's host has (in its volume.env): its backups refuse to run without it. */
  token: string;
  updatedAt: string;
  move?: MoveState;
  /** The resource that owns the volume (absent in leases written before owners were recorded). */
  owner?: Owner;
  /**
   * The owner's current resource instance (a random id in its outputs): after a replacement
   * (pulumi up --replace) the old instance's delete must leave the volume to the new one.
   */
  instance?: string;
  /**
   * A rebuild (filesystem or volumeGroup change) in progress, recorded before the volume is
   * stopped: the layout it leaves and the one it builds, and once taken and verified, the final
   * snapshot to restore. A run cut off anywhere is finished, or rolled back, from it.
   */
  rebuild?: { snapshotId?: string; startedAt: string; from?: RebuildLayout; to?: RebuildLayout };
  /** A delete in progress on the holder, recorded before the volume is stopped: a cut-off delete is repaired from it. */
  deleting?: { startedAt: string };
  /** Random per write: tells a writer whose answer was lost that its write landed. */
  writeId?: string;
  /** How long the lease lasts without renewal (the Volume's leaseDuration). */
  durationSeconds?: number;
  /** The holder's layout (mount path, filesystem, volume group), as last applied there. */
  layout?: HolderLayout;
  /**
   * Until when (epoch seconds) the holder is presumed alive: each provider write and each renewal
   * by the holding host (on every backup and on a timer) moves it on. `force` waits for it.
   */
  expiresAt?: number;
}

export interface RebuildLayout { filesystem: "ext4" | "xfs"; volumeGroup?: string }

/** Where the volume is on its holder: what a host that only the lease names needs to be found and cleaned. */
export interface HolderLayout extends RebuildLayout { mountPath: string }

export const DEFAULT_LEASE_SECONDS = 600;

/**
 * The S3 server's clock, as one of its answers told it (the Date header, whole seconds, stamped
 * between the request leaving and the answer arriving): every lease expiry is reckoned on it, so
 * that hosts and the machine running pulumi, whatever their own clocks say, judge alike.
 */
export interface ServerClock { date: number; before: number; after: number }

/** The server's time now (ms): at least (`low`) or at most (`high`) what its last answer allows. */
export function serverNow(c: ServerClock | undefined, bound: "low" | "high", local = Date.now()): number {
  if (!c) return local;
  return bound === "low" ? c.date + (local - c.after) : c.date + 1000 + (local - c.before);
}

/** Registers a middleware on `client` that records the Date of each raw answer, errors included. */
function watchServerDate(client: import("@aws-sdk/client-s3").S3Client): { clock?: ServerClock } {
  const seen: { clock?: ServerClock } = {};
  client.middlewareStack.add((next) => async (args) => {
    const before = Date.now();
    const out = await next(args);
    const h = (out.response as { headers?: Record<string, string> } | undefined)?.headers;
    const d = h ? Date.parse(h.date ?? h.Date ?? "") : NaN;
    if (Number.isFinite(d)) seen.clock = { date: d, before, after: Date.now() };
    return out;
  }, { step: "deserialize", priority: "low", name: "dboxedServerDate" });
  return seen;
}

const httpStatus = (err: unknown) => (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;

export class LeaseConflict extends Error {}

/** "type base64" of a host key line, without comment or surrounding space. */
export function normalizeHostKey(k: string | undefined): string | undefined {
  if (!k) return undefined;
  const parts = k.trim().split(/\s+/);
  return parts.length >= 2 ? `${parts[0]} ${parts[1]}` : undefined;
}

export function sameHost(a: HostRef | undefined, b: HostRef | undefined): boolean {
  if (!a || !b) return false;
  const ka = normalizeHostKey(a.hostKey), kb = normalizeHostKey(b.hostKey);
  if (ka && kb) return ka === kb;
  return a.address === b.address && Number(a.port) === Number(b.port);
}

export function sameOwner(a: Owner | undefined, b: Owner | undefined): boolean {
  return !!a && !!b && a.project === b.project && a.stack === b.stack && a.name === b.name;
}

export function ownerName(o: Owner | undefined): string {
  return o ? `resource "${o.name}" of stack ${o.project}/${o.stack}` : "an unknown resource";
}

export function hostName(h: HostRef): string {
  return `${h.address}:${h.port}`;
}

export function leaseKey(prefix: string, volumeId: string): string {
  return `${prefix}-meta/volumes/${volumeId}/lease.json`;
}

export interface ReadLease { lease: Lease; etag: string; clock?: ServerClock }

export async function readLease(s: S3Settings, volumeId: string): Promise<ReadLease | undefined> {
  return (await readLeaseAndClock(s, volumeId)).found;
}

/** The lease (if any) and the server's clock as the answer told it (also when there is no lease). */
export async function readLeaseAndClock(s: S3Settings, volumeId: string): Promise<{ found?: ReadLease; clock?: ServerClock }> {
  const { GetObjectCommand } = require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
  const client = s3Client(s);
  const seen = watchServerDate(client);
  try {
    const res = await client.send(new GetObjectCommand({ Bucket: s.bucket, Key: leaseKey(s.prefix, volumeId) }));
    const text = await res.Body!.transformToString();
    return { found: { lease: JSON.parse(text) as Lease, etag: res.ETag!, clock: seen.clock }, clock: seen.clock };
  } catch (err) {
    if (httpStatus(err) === 404) return { clock: seen.clock };
    throw explainS3Error(err, s, `read the lease of volume ${volumeId}`);
  } finally {
    client.destroy();
  }
}

/** A repository maintenance task's lease and its last run, as the hosts' agents write it. */
export interface MaintenanceRecord {
  holder: string; expiresAt: number; runs: number; lastRunAt: number; lastResult: string; lastMessage: string;
  lastHolder: string; lastDurationSeconds: number; lastSubset: string;
}

export async function readMaintenance(s: S3Settings, task: "prune" | "check"): Promise<MaintenanceRecord | undefined> {
  const { GetObjectCommand } = require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
  const client = s3Client(s);
  try {
    const res = await client.send(new GetObjectCommand({ Bucket: s.bucket, Key: maintenanceKey(s.prefix, task) }));
    return JSON.parse(await res.Body!.transformToString()) as MaintenanceRecord;
  } catch (err) {
    if (httpStatus(err) === 404) return undefined;
    throw explainS3Error(err, s, `read the repository's ${task} record`);
  } finally {
    client.destroy();
  }
}

/**
 * Writes the lease if nobody changed it since `etag` was read (or, without etag, if it does not
 * exist). Each write carries a random `writeId`: the SDK sends a PUT again after a lost answer
 * (a reset connection, a timeout, a 5xx), and when the first one had landed the second meets its
 * own write and gets 412. So a 412, or an error after which the write may have landed, is
 * judged by reading the lease back: our writeId there (a host's renewal keeps it) means written.
 */
export async function writeLease(s: S3Settings, lease: Lease, etag: string | undefined, clock?: ServerClock): Promise<string> {
  const { PutObjectCommand } = require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
  const client = s3Client(s);
  const writeId = newToken();
  try {
    const res = await client.send(new PutObjectCommand({
      Bucket: s.bucket, Key: leaseKey(s.prefix, lease.volumeId), ContentType: "application/json",
      // Pretty-printed: the holding host renews it by rewriting the top-level "expiresAt" line.
      Body: JSON.stringify({ ...lease, writeId, updatedAt: new Date().toISOString(),
        // On the server's clock, at the latest time its last answer allows (an expiry never early).
        expiresAt: Math.floor(serverNow(clock, "high") / 1000) + (lease.durationSeconds ?? DEFAULT_LEASE_SECONDS) }, null, 2),
      ...(etag ? { IfMatch: etag } : { IfNoneMatch: "*" }),
    }));
    return res.ETag!;
  } catch (err) {
    const now = await readLease(s, lease.volumeId).catch(() => undefined);
    if (now && now.lease.writeId === writeId) return now.etag;
    const status = httpStatus(err);
    if (status === 412 || status === 409) throw new LeaseConflict(`the lease of volume ${lease.volumeId} changed meanwhile`);
    throw explainS3Error(err, s, `write the lease of volume ${lease.volumeId}`);
  } finally {
    client.destroy();
  }
}

/** Deletes the lease if it is still the version `etag`; a delete whose answer was lost and sent again finds it gone. */
export async function deleteLease(s: S3Settings, volumeId: string, etag: string): Promise<void> {
  const { DeleteObjectCommand } = require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
  const client = s3Client(s);
  try {
    await client.send(new DeleteObjectCommand({ Bucket: s.bucket, Key: leaseKey(s.prefix, volumeId), IfMatch: etag }));
  } catch (err) {
    // Gone is what was asked (ours deleted, its answer lost; or released by another run meanwhile).
    const now = await readLease(s, volumeId).then((x) => x ?? "gone", () => undefined);
    if (now === "gone") return;
    const status = httpStatus(err);
    if (status === 412 || status === 409) throw new LeaseConflict(`the lease of volume ${volumeId} changed meanwhile`);
    throw explainS3Error(err, s, `release the lease of volume ${volumeId}`);
  } finally {
    client.destroy();
  }
}

/**
 * Reads, changes and writes the lease with compare-and-swap, retrying when another writer
 * came first. `change` sees the current lease (or undefined) and returns the new one, or
 * throws to refuse.
 */
export async function updateLease(s: S3Settings, volumeId: string,
  change: (cur: Lease | undefined, clock: ServerClock | undefined) => Lease): Promise<Lease> {
  for (let attempt = 0; attempt < 5; attempt++) {
    const { found: cur, clock } = await readLeaseAndClock(s, volumeId);
    const next = change(cur?.lease, clock);
    try {
      await writeLease(s, next, cur?.etag, clock);
      return next;
    } catch (e) {
      if (!(e instanceof LeaseConflict)) throw e;
      // Another writer came first (or the server asks to retry a conflicting write): a jittered
      // pause, so that two runs retrying in step do not meet again.
      await new Promise((r) => setTimeout(r, (attempt + 1) * (200 + Math.floor(Math.random() * 300))));
    }
  }
  throw new UserError(`the lease of volume ${volumeId} keeps changing: another stack or pulumi run is working on this volume`);
}

/** Racing writers per round, and rounds: versitygw 1.7.0 let several win in 19 of 20 probes here. */
const PROBE_WRITERS = 32;
const PROBE_ROUNDS = 8;
/** Bodies of some size: a server that checks, then stages the body, then writes has a wider gap to show. */
const PROBE_BYTES = 4096;

/**
 * Checks that the server honours both conditional writes the leases rely on: If-None-Match: *
 * (create only if absent) and If-Match: <etag> (compare-and-swap). Some S3-compatible servers
 * silently ignore them (a 200 where 412 was due), others honour them only one request at a time;
 * a lease there would not be exclusive.
 */
export async function probeConditionalWrites(s: S3Settings): Promise<void> {
  const { PutObjectCommand, DeleteObjectCommand, HeadObjectCommand } = require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
  const client = s3Client(s);
  const Key = `${s.prefix}-meta/probe-${process.pid}-${Date.now()}-${newToken().slice(0, 8)}`;
  const keys = [Key];
  const ignored = (header: string) => new UserError(
    `s3.endpoint: the S3 server at ${s.endpoint} ignores ${header} on PutObject, so volume leases ` +
    "(which keep a volume on one host at a time) would not be safe there; use a server that supports " +
    "conditional writes (AWS S3, MinIO, R2, versitygw ...)");
  const put = (Body: string, cond: { IfNoneMatch?: string; IfMatch?: string }) =>
    client.send(new PutObjectCommand({ Bucket: s.bucket, Key, Body, ...cond }));
  /** True when the server refused the write as a failed precondition; other errors are explained. */
  const refused = async (write: Promise<unknown>): Promise<boolean> => {
    try {
      await write;
      return false;
    } catch (err) {
      const status = httpStatus(err);
      if (status === 412 || status === 409) return true;
      throw explainS3Error(err, s, "probe conditional writes");
    }
  };
  try {
    let etag: string | undefined;
    try {
      etag = (await put("1", { IfNoneMatch: "*" })).ETag;
    } catch (err) {
      // A fresh key: a precondition failure here is as wrong as ignoring the header.
      throw explainS3Error(err, s, "probe conditional writes");
    }
    if (!etag) throw new UserError(`s3.endpoint: the S3 server at ${s.endpoint} returned no ETag on PutObject; volume leases need it`);
    if (!(await refused(put("2", { IfNoneMatch: "*" })))) throw ignored("If-None-Match");
    if (!(await refused(put("3", { IfMatch: '"0000000000000000000000000000000"' })))) throw ignored("If-Match");
    // The real etag must pass, or no lease could ever be changed. After an ignored If-None-Match
    // we threw above, so the object still holds "1" and its etag.
    try {
      await put("4", { IfMatch: etag });
    } catch (err) {
      throw explainS3Error(err, s, "probe conditional writes (If-Match with the current etag)");
    }
    // Honoured one at a time is not enough: two hosts take a lease at the same moment. A server
    // that checks the precondition, then writes (not as one step), lets several concurrent
    // writers of one version win (versitygw before 1.8.0 did). A few rounds of racing writers.
    // The racing writes are sent once each (no SDK retry: a re-sent write that had landed would
    // meet itself and look like a loser). 412 loses; 409 (AWS: a conflicting write in progress),
    // 429/503 (throttled) and lost answers decide nothing: such a round is raced again.
    const racer = s3Client(s, 1);
    try {
      // Connections opened first: writers that each wait for a new connection would not race.
      await Promise.allSettled(Array.from({ length: PROBE_WRITERS }, () => racer.send(new HeadObjectCommand({ Bucket: s.bucket, Key }))));
      for (let round = 0, tries = 0; round < PROBE_ROUNDS; tries++) {
        const key = `${Key}-race-${round}-${tries}`;
        keys.push(key);
        // Every body differs from every other (and from the one in place): a write of the same
        // bytes keeps the etag, and a later writer would rightly win too.
        const race = async (cond: { IfNoneMatch?: string; IfMatch?: string }) => {
          const settled = await Promise.allSettled(Array.from({ length: PROBE_WRITERS }, (_, i) =>
            racer.send(new PutObjectCommand({ Bucket: s.bucket, Key: key, Body: `${cond.IfMatch ? "swap" : "create"} ${i} `.padEnd(PROBE_BYTES, "."), ...cond }))));
          const won = settled.flatMap((r) => (r.status === "fulfilled" ? [r.value.ETag] : []));
          const lost = settled.filter((r) => r.status === "rejected" && httpStatus(r.reason) === 412).length;
          const hard = settled.find((r) => r.status === "rejected" && [400, 401, 403, 404].includes(httpStatus(r.reason) ?? 0));
          if (hard) throw explainS3Error((hard as PromiseRejectedResult).reason, s, "probe conditional writes (concurrent writers)");
          return { won, undecided: PROBE_WRITERS - won.length - lost };
        };
        const judge = (r: { won: (string | undefined)[]; undecided: number }, header: string): "ok" | "again" => {
          if (r.won.length > 1 || (r.won.length === 0 && r.undecided === 0)) throw new UserError(
            `s3.endpoint: the S3 server at ${s.endpoint} let ${r.won.length} of ${PROBE_WRITERS} concurrent writes with one ${header} ` +
            "succeed (exactly one must): its conditional writes are not atomic, so two hosts could take one volume's lease " +
            "at once; use a server whose conditional writes are atomic (AWS S3; versitygw from 1.8.0 on)");
          return r.won.length === 1 ? "ok" : "again";
        };
        if (tries >= PROBE_ROUNDS * 3) {
          throw new UserError(`s3.endpoint: the S3 server at ${s.endpoint} answered too few of ${PROBE_WRITERS} concurrent conditional writes ` +
            "(throttled or conflicting) to show that they are atomic; try again, or use a server that takes them");
        }
        const created = await race({ IfNoneMatch: "*" });
        if (judge(created, "If-None-Match: *") === "again") continue;
        const first = created.won[0];
        if (!first) throw new UserError(`s3.endpoint: the S3 server at ${s.endpoint} returned no ETag on PutObject; volume leases need it`);
        if (judge(await race({ IfMatch: first }), "If-Match etag") === "again") continue;
        round++;
      }
    } finally {
      racer.destroy();
    }
  } finally {
    // The probe objects are not needed afterwards, whatever happened; a leftover is harmless.
    await Promise.all(keys.map((k) => client.send(new DeleteObjectCommand({ Bucket: s.bucket, Key: k })).catch(() => undefined)));
    client.destroy();
  }
}

export function newToken(): string {
  return require("crypto").randomBytes(16).toString("hex");
}

/** The lease object's URL as the hosts reach S3 (path or virtual-host style). */
/** Where the repository's maintenance leases live (one object per task), next to the volumes' leases. */
export function maintenanceKey(prefix: string, task: "prune" | "check"): string {
  return `${prefix}-meta/maintenance/${task}.json`;
}

/** The URL of the maintenance leases' folder (ends with "/": the agent appends "<task>.json"). */
export function maintenanceUrl(endpoint: string, bucket: string, prefix: string, pathStyle: boolean): string {
  return objectUrl(endpoint, bucket, maintenanceKey(prefix, "prune").replace(/prune\.json$/, ""), pathStyle);
}

/**
 * The URL that lists the backups in progress (ListObjectsV2 of the markers "backup-<volume>.json"
 * next to the maintenance leases): a prune runs only when none is live.
 */
export function backupMarksListUrl(endpoint: string, bucket: string, prefix: string, pathStyle: boolean): string {
  const u = new URL(endpoint);
  const base = pathStyle ? `${u.protocol}//${u.host}/${bucket}` : `${u.protocol}//${bucket}.${u.host}`;
  return `${base}/?list-type=2&prefix=${encodeURIComponent(maintenanceKey(prefix, "prune").replace(/prune\.json$/, "backup-"))}`;
}

function objectUrl(endpoint: string, bucket: string, key: string, pathStyle: boolean): string {
  const u = new URL(endpoint);
  const k = key.split("/").map(encodeURIComponent).join("/");
  return pathStyle ? `${u.protocol}//${u.host}/${bucket}/${k}` : `${u.protocol}//${bucket}.${u.host}/${k}`;
}

export function leaseUrl(endpoint: string, bucket: string, prefix: string, volumeId: string, pathStyle: boolean): string {
  return objectUrl(endpoint, bucket, leaseKey(prefix, volumeId), pathStyle);
}
