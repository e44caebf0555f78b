// The lease of a volume: one JSON object per volume in S3, changed only by compare-and-swap
// (If-None-Match: * to create, If-Match: <etag> to change). It says which host holds the
// volume, and holds the progress of a move, so that a new `pulumi up` can resume it.
import { UserError } from "../errors";
import { explainS3Error, s3Client, S3Settings } from "./s3";

export interface HostRef { address: string; port: number }

export type MovePhase = "warm" | "final-backup" | "restored" | "switched";

export interface MoveState {
  from: HostRef;
  to: HostRef;
  phase: MovePhase;
  /** The final snapshot of the old host, once taken. */
  snapshotId?: string;
  /** The lease token the new host will hold after the switch (its backups check it). */
  newToken: string;
  startedAt: string;
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
}

export class LeaseConflict extends Error {}

export function sameHost(a: HostRef | undefined, b: HostRef | undefined): boolean {
  return !!a && !!b && a.address === b.address && Number(a.port) === Number(b.port);
}

export function hostName(h: HostRef): string {
  return `${h.address}:${h.port}`;
}

export function leaseKey(prefix: string, volumeId: string): string {
  return `${prefix}-meta/volumes/${volumeId}/lease.json`;
}

export async function readLease(s: S3Settings, volumeId: string): Promise<{ lease: Lease; etag: string } | undefined> {
  const { GetObjectCommand } = require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
  const client = s3Client(s);
  try {
    const res = await client.send(new GetObjectCommand({ Bucket: s.bucket, Key: leaseKey(s.prefix, volumeId) }));
    const text = await res.Body!.transformToString();
    return { lease: JSON.parse(text) as Lease, etag: res.ETag! };
  } catch (err) {
    if ((err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode === 404) return undefined;
    throw explainS3Error(err, s, `read the lease of volume ${volumeId}`);
  } finally {
    client.destroy();
  }
}

/** Writes the lease if nobody changed it since `etag` was read (or, without etag, if it does not exist). */
export async function writeLease(s: S3Settings, lease: Lease, etag: string | undefined): Promise<string> {
  const { PutObjectCommand } = require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
  const client = s3Client(s);
  try {
    const res = await client.send(new PutObjectCommand({
      Bucket: s.bucket, Key: leaseKey(s.prefix, lease.volumeId), ContentType: "application/json",
      Body: JSON.stringify({ ...lease, updatedAt: new Date().toISOString() }, null, 2),
      ...(etag ? { IfMatch: etag } : { IfNoneMatch: "*" }),
    }));
    return res.ETag!;
  } catch (err) {
    const status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
    if (status === 412 || status === 409) throw new LeaseConflict(`the lease of volume ${lease.volumeId} changed meanwhile`);
    throw explainS3Error(err, s, `write the lease of volume ${lease.volumeId}`);
  } finally {
    client.destroy();
  }
}

export async function deleteLease(s: S3Settings, volumeId: string, etag: string): Promise<void> {
  const { DeleteObjectCommand } = require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
  const client = s3Client(s);
  try {
    await client.send(new DeleteObjectCommand({ Bucket: s.bucket, Key: leaseKey(s.prefix, volumeId), IfMatch: etag }));
  } catch (err) {
    const status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
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
export async function updateLease(s: S3Settings, volumeId: string, change: (cur: Lease | undefined) => Lease): Promise<Lease> {
  for (let attempt = 0; attempt < 5; attempt++) {
    const cur = await readLease(s, volumeId);
    const next = change(cur?.lease);
    try {
      await writeLease(s, next, cur?.etag);
      return next;
    } catch (e) {
      if (!(e instanceof LeaseConflict)) throw e;
    }
  }
  throw new UserError(`the lease of volume ${volumeId} keeps changing: another stack or pulumi run is working on this volume`);
}

/** Checks once that the server honours conditional writes; leases are only safe where it does. */
export async function probeConditionalWrites(s: S3Settings): Promise<void> {
  const { PutObjectCommand, DeleteObjectCommand } = require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
  const client = s3Client(s);
  const Key = `${s.prefix}-meta/probe-${process.pid}-${Date.now()}`;
  try {
    await client.send(new PutObjectCommand({ Bucket: s.bucket, Key, Body: "1", IfNoneMatch: "*" }));
    let honoured = false;
    try {
      await client.send(new PutObjectCommand({ Bucket: s.bucket, Key, Body: "2", IfNoneMatch: "*" }));
    } catch (err) {
      const status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
      honoured = status === 412 || status === 409;
      if (!honoured) throw explainS3Error(err, s, "probe conditional writes");
    }
    await client.send(new DeleteObjectCommand({ Bucket: s.bucket, Key }));
    if (!honoured) {
      throw new UserError(`s3.endpoint: the S3 server at ${s.endpoint} ignores If-None-Match on PutObject, so volume leases ` +
        "(which keep a volume on one host at a time) would not be safe there; use a server that supports conditional writes");
    }
  } finally {
    client.destroy();
  }
}

export function newToken(): string {
  return require("crypto").randomBytes(16).toString("hex");
}

/** The lease object's URL as the hosts reach S3 (path or virtual-host style). */
export function leaseUrl(endpoint: string, bucket: string, prefix: string, volumeId: string, pathStyle: boolean): string {
  const u = new URL(endpoint);
  const key = leaseKey(prefix, volumeId).split("/").map(encodeURIComponent).join("/");
  return pathStyle ? `${u.protocol}//${u.host}/${bucket}/${key}` : `${u.protocol}//${bucket}.${u.host}/${key}`;
}
