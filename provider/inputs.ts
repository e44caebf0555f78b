// Input schemas (zod): every field is validated before any host or bucket is touched, and
// every error names the field and says what is accepted. Values that reach a shell on a
// host are limited to characters that need no interpretation, and are quoted as well.
import { z } from "zod";
import { parseHostKey } from "./remote/ssh";

const MiB = 1024 * 1024;
/** LVM's default extent size: sizes are whole multiples of it. */
export const EXTENT = 4 * MiB;
const MIN_SIZE: Record<Filesystem, number> = { ext4: 32 * MiB, xfs: 320 * MiB };

const UNITS: Record<string, number> = {
  "": 1, b: 1,
  k: 1024, kb: 1000, kib: 1024,
  m: MiB, mb: 1e6, mib: MiB,
  g: 1024 * MiB, gb: 1e9, gib: 1024 * MiB,
  t: 1024 * 1024 * MiB, tb: 1e12, tib: 1024 * 1024 * MiB,
};

/** "1GiB", "512MiB", "1.5G" (binary), "2GB" (decimal) or a number of bytes -> bytes. */
export function parseSize(value: string | number): number {
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value) || value <= 0) throw new Error(`${value} is not a positive whole number of bytes`);
    return value;
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(value);
  const unit = m ? UNITS[m[2].toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    throw new Error(`"${value}" is not a size: use a number of bytes or a number with a unit (MiB, GiB, TiB, MB, GB), e.g. "10GiB"`);
  }
  const bytes = Math.round(parseFloat(m[1]) * unit);
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new Error(`"${value}" is not a positive size`);
  return bytes;
}

export function formatSize(bytes: number): string {
  for (const [u, n] of [["TiB", 1024 ** 4], ["GiB", 1024 ** 3], ["MiB", MiB]] as const) {
    if (bytes % n === 0) return `${bytes / n}${u}`;
  }
  return `${bytes}B`;
}

export type Filesystem = "ext4" | "xfs";

const safeId = /^[a-z0-9][a-z0-9-]{0,39}$/;
const reservedMounts = ["/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/opt",
  "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib", "/var/log", "/mnt", "/media"];

export const volumeIdSchema = z.string().regex(safeId,
  "must be 1-40 characters of a-z, 0-9 and '-', starting with a letter or digit (it names LVM volumes and systemd units)");

export const mountPathSchema = z.string()
  .regex(/^(\/[A-Za-z0-9._-]+)+$/, "must be an absolute path of letters, digits, '.', '_', '-' and '/', e.g. /srv/pgdata")
  .refine((p) => !p.split("/").some((c) => c === "." || c === ".."), "must not contain '.' or '..' components")
  .refine((p) => !reservedMounts.includes(p), "must not be a system directory; use a directory below it, e.g. /srv/pgdata");

const calendarShorthands = ["minutely", "hourly", "daily", "monthly", "weekly", "yearly", "annually", "quarterly", "semiannually"];
/** A light check of systemd's OnCalendar syntax here; the host's systemd-analyze checks it fully. */
export const scheduleSchema = z.string().min(1).max(100)
  .regex(/^[A-Za-z0-9 *:,./~-]+$/, "must be a systemd OnCalendar expression such as \"*:0/5\" (every 5 minutes) or \"hourly\"")
  .refine((s) => {
    const tokens = s.trim().split(/\s+/);
    if (tokens.length === 1 && calendarShorthands.includes(tokens[0].toLowerCase())) return true;
    const days = /^(Mon|Tue|Wed|Thu|Fri|Sat|Sun)([.,-]{1,2}(Mon|Tue|Wed|Thu|Fri|Sat|Sun))*$/i;
    let i = 0;
    if (days.test(tokens[i] ?? "")) i++;
    if (/^[\d*]+([-~][\d*./,]+){1,2}$/.test(tokens[i] ?? "") && tokens.length - i > 1) i++;
    if (/^[\d*][\d*,./]*(:[\d*][\d*,./]*){1,2}$/.test(tokens[i] ?? "")) i++;
    if (tokens[i] === "UTC") i++;
    return i === tokens.length && i > 0;
  }, "must be a systemd OnCalendar expression such as \"*:0/5\" (every 5 minutes), \"hourly\" or \"Mon..Fri 02:00\"");

/** Every value that reaches a file or a config line on a host: no newline can start a new directive. */
const oneLine = z.string().regex(/^[^\x00-\x08\x0a-\x1f\x7f]*$/, "must be one line without control characters");

const printable = (what: string) => z.string().min(1, `must not be empty`).max(4096)
  .regex(/^[\x20-\x7e]+$/, `${what} must be printable ASCII on one line`);

export const S3_DEFAULTS = { region: "us-east-1", prefix: "dboxed-volumes", forcePathStyle: true } as const;

export const s3Schema = z.object({
  endpoint: z.string().url("must be a URL such as https://s3.eu-central-1.amazonaws.com").regex(/^https?:\/\/[A-Za-z0-9.:[\]-]+(:\d+)?\/?$/, "must be http(s)://host[:port] without a path"),
  hostEndpoint: z.string().url().regex(/^https?:\/\/[A-Za-z0-9.:[\]-]+(:\d+)?\/?$/, "must be http(s)://host[:port] without a path").optional(),
  region: z.string().regex(/^[a-z0-9-]{1,40}$/, "must be a region name such as us-east-1").default(S3_DEFAULTS.region),
  bucket: z.string().regex(/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/, "must be an S3 bucket name (3-63 of a-z, 0-9, '.', '-')"),
  prefix: z.string().regex(/^([A-Za-z0-9._-]+(\/[A-Za-z0-9._-]+)*)?$/, "must be a relative key prefix such as volumes/prod (no leading '/', no '//')")
    .refine((p) => !p.split("/").includes(".."), "must not contain '..'").default(S3_DEFAULTS.prefix),
  accessKeyId: printable("accessKeyId"),
  secretAccessKey: printable("secretAccessKey"),
  forcePathStyle: z.boolean().default(S3_DEFAULTS.forcePathStyle),
  createBucket: z.boolean().default(false),
}).strict();

/** A duration as seconds, or "90s", "10m", "1h", "1d"; the result in seconds. */
function durationSchema(dflt: number | undefined, min: number, max: number, range: string) {
  const base = z.union([z.number(), z.string()]);
  return (dflt === undefined ? base : base.default(dflt)).transform((x, ctx) => {
    const m = typeof x === "number" ? [String(x), String(x), "s"] : /^(\d+)\s*(s|m|h|d)?$/.exec(x.trim());
    const secs = m ? Number(m[1]) * ({ s: 1, m: 60, h: 3600, d: 86400 } as Record<string, number>)[m[2] ?? "s"] : NaN;
    if (!Number.isInteger(secs) || secs < min || secs > max) {
      ctx.addIssue({ code: "custom", message: `must be ${range}, as seconds or as "90s", "10m", "1h", "1d"` });
      return z.NEVER;
    }
    return secs;
  });
}

/**
 * Repository-wide maintenance, run by whichever host first takes the repository's maintenance
 * lease for the task (a conditional write in S3): prune at most every pruneInterval, a check
 * that reads 1/checkSubsets of the data (a different part each time) every checkInterval.
 */
export const maintenanceSchema = z.object({
  pruneInterval: durationSchema(86400, 0, 365 * 86400, "0 (never) to 365 days"),
  checkInterval: durationSchema(7 * 86400, 0, 365 * 86400, "0 (never) to 365 days"),
  checkSubsets: z.number().int().min(1).max(1000).default(10),
  /** How long prune keeps packs it marked unused before deleting them (protects backups in progress). */
  keepDelete: durationSchema(23 * 3600, 300, 30 * 86400, "5 minutes to 30 days (longer than the longest backup)"),
}).strict();

export const retentionSchema = z.object({
  keepLast: z.number().int().min(1, "must be at least 1: the latest snapshot is what a move or a restore needs").default(2),
  keepHourly: z.number().int().min(0).default(6),
  keepDaily: z.number().int().min(0).default(7),
  keepWeekly: z.number().int().min(0).default(4),
  keepMonthly: z.number().int().min(0).default(6),
  keepYearly: z.number().int().min(0).default(1),
}).strict();

export const rusticSourceSchema = z.union([
  z.object({ localPath: z.string().min(1).regex(/^[^\0\n]+$/, "must be a path to a rustic binary on the machine that runs pulumi") }).strict(),
  z.object({
    url: z.string().url().regex(/^https?:\/\/[A-Za-z0-9._~:/?#[\]@!$&()*+,;=%-]+$/, "must be a plain http(s) URL")
      // It is stored in plain state and reaches the host: credentials must not ride in it.
      .refine((u) => {
        try {
          const x = new URL(u);
          return !x.username && !x.password && ![...x.searchParams.keys()].some((k) => /sig|token|key|secret|pass|cred|auth/i.test(k));
        } catch { return false; }
      }, "must not carry credentials (user:password@, or a query parameter such as a presigned signature or token): serve the binary at a plain URL, or use rustic.localPath"),
    sha256: z.string().regex(/^[a-f0-9]{64}$/, "must be the binary's sha256 as 64 lowercase hex digits"),
  }).strict(),
]);

export const volumeProviderSchema = z.object({
  s3: s3Schema,
  password: z.string().min(8, "must be at least 8 characters").max(1024).regex(/^[^\x00-\x08\x0a-\x1f\x7f]+$/, "must be one line without control characters"),
  retention: retentionSchema.default({}),
  maintenance: maintenanceSchema.default({}),
  rustic: rusticSourceSchema,
}).strict();
export type VolumeProviderInputs = z.infer<typeof volumeProviderSchema>;

const hostKeySchema = z.string().refine((k) => { try { parseHostKey(k); return true; } catch { return false; } },
  "must be the host's public key as \"ssh-ed25519 AAAA...\" (ed25519, ecdsa or rsa: a line of /etc/ssh/ssh_host_*_key.pub or of ssh-keyscan)");
const userSchema = z.string().regex(/^[a-z_][a-z0-9_-]{0,31}$/, "must be a Unix user name (root, or a user with passwordless sudo)");
const addressSchema = z.string().regex(/^[A-Za-z0-9]([A-Za-z0-9.:-]{0,252})$/, "must be a host name or an IP address");
/** How a connection authenticates: a private key (encrypted ones with privateKeyPassword) and/or an SSH agent. */
const authFields = {
  /** The private key's content (a secret). Without it, the SSH agent is used. */
  privateKey: z.string().min(1).max(65536).optional(),
  /** The passphrase of an encrypted privateKey (a secret). */
  privateKeyPassword: z.string().max(1024).optional(),
  /** The SSH agent's socket (default: SSH_AUTH_SOCK of the process that runs pulumi). */
  agentSocketPath: z.string().regex(/^\/[^\0\n]{0,4095}$/, "must be the absolute path of the SSH agent's socket").optional(),
};

/** A private key that parses (with its passphrase); otherwise the message for the field. */
export function keyProblem(key: string, passphrase?: string): string | undefined {
  try {
    const { utils } = require("ssh2") as typeof import("ssh2");
    const parsed = utils.parseKey(key, passphrase);
    if (parsed instanceof Error) {
      if (/encrypted|passphrase/i.test(parsed.message)) {
        return passphrase === undefined ? "is encrypted: set privateKeyPassword to its passphrase" : "cannot be decrypted with privateKeyPassword";
      }
      return "must be an OpenSSH or PEM private key (the content, not a path)";
    }
    if (Array.isArray(parsed) && parsed.length === 0) return "must be an OpenSSH or PEM private key (the content, not a path)";
    return undefined;
  } catch {
    return "must be an OpenSSH or PEM private key (the content, not a path)";
  }
}

function refineAuth(h: { privateKey?: string; privateKeyPassword?: string; agentSocketPath?: string }, ctx: z.RefinementCtx) {
  if (h.privateKey !== undefined) {
    const problem = keyProblem(h.privateKey, h.privateKeyPassword);
    if (problem) ctx.addIssue({ code: "custom", path: [h.privateKeyPassword !== undefined && /decrypted/.test(problem) ? "privateKeyPassword" : "privateKey"], message: problem });
  } else if (h.agentSocketPath === undefined && !process.env.SSH_AUTH_SOCK) {
    ctx.addIssue({ code: "custom", path: ["privateKey"], message: "is required unless an SSH agent is used (agentSocketPath, or SSH_AUTH_SOCK where pulumi runs)" });
  }
}

/** Set on the bastion of a host given as one Output when it has none (dropped before validation). */
export const PROXY_ABSENT = "__absent";

/** A bastion the host is reached through (as remote.Connection's proxy). */
/** What a host and its bastion are both reached with. */
const endpointFields = {
  address: addressSchema,
  port: z.number().int().min(1).max(65535).default(22),
  user: userSchema.default("root"),
  ...authFields,
  hostKey: hostKeySchema,
};

export const proxySchema = z.object(endpointFields).strict().superRefine(refineAuth);

export const hostSchema = z.object({
  ...endpointFields,
  /** Reach the host through this bastion (its own address, user, key and pinned host key). */
  proxy: proxySchema.optional(),
  /** Dial attempts before an operation gives up (default 5). */
  dialErrorLimit: z.number().int().min(1, "must be at least 1").max(20).optional(),
  /** Seconds one dial may take (default 20). */
  perDialTimeout: z.number().int().min(1).max(300).optional(),
}).strict().superRefine(refineAuth);
export type HostInputs = z.infer<typeof hostSchema>;

export const volumeSchema = z.object({
  volumeId: volumeIdSchema,
  host: hostSchema,
  /** Copy of host.address that stays readable in state (host as a whole is secret). */
  hostAddress: z.string().optional(),
  size: z.union([z.string(), z.number()]),
  filesystem: z.enum(["ext4", "xfs"], { errorMap: () => ({ message: "must be ext4 or xfs" }) }).default("ext4"),
  mountPath: mountPathSchema,
  volumeGroup: z.string().regex(/^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,126}$/, "must be the name of an existing LVM volume group").optional(),
  backupSchedule: scheduleSchema.default("*:0/5"),
  finalBackupOnDelete: z.boolean().default(true),
  forgetSnapshotsOnDelete: z.boolean().default(false),
  /** Units that use the volume: stopped on the old host before a move, started on the new one. */
  stopUnits: z.array(z.string().regex(/^[A-Za-z0-9@_:\\][A-Za-z0-9@._:\\-]*\.(service|socket|target|timer|path)$/,
    "must be systemd unit names such as postgresql.service (not starting with '-' or '.')")).default([]),
  /** Restore the latest periodic snapshot on the new host before stopping the old one (default true). */
  warmMove: z.boolean().default(true),
  /** Take the volume although another host holds its lease (that host is gone for good): only once that lease expired. */
  force: z.boolean().default(false),
  /** With force: take the volume even though its holder renewed the lease lately (it may still be writing). */
  forceDespiteLiveLease: z.boolean().default(false),
  /**
   * How long the holder's lease lasts without renewal (seconds, or "90s", "10m", "1h"; 60 s to
   * 7 days, default 10m). The holding host renews it every third of that; force waits for it to run out.
   */
  leaseDuration: durationSchema(600, 60, 7 * 86400, "60 seconds to 7 days"),
  /**
   * Each backup starts up to this long after its scheduled time (seconds or "2m"; 0 to 1 day), a
   * fixed offset per volume and host: volumes sharing a schedule and a repository do not all
   * start in the same second. Must be shorter than the schedule's interval. Unset: 2 minutes,
   * or half the interval if that is shorter (see effectiveRandomDelay).
   */
  backupRandomDelay: durationSchema(undefined, 0, 86400, "0 seconds to 1 day").optional(),
  /**
   * A new volume starts from another volume's snapshot in the same repository: "latest", a
   * snapshot id (at least 8 hex digits) or a time (the newest snapshot at or before it). Used
   * only while the volume has no snapshots of its own.
   */
  source: z.object({
    volumeId: volumeIdSchema,
    snapshot: z.string().default("latest").refine(
      // A time names its zone (Z or an offset): without one, machines in other zones would pick other snapshots.
      (x) => x === "latest" || /^[0-9a-f]{8,64}$/.test(x) ||
        (/^\d{4}-\d\d-\d\d([T ]\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:?\d\d))?$/.test(x) && !isNaN(Date.parse(x))),
      'must be "latest", a snapshot id (8 to 64 hex digits) or a time with its zone such as "2026-11-28T10:00:00Z"'),
  }).strict().optional(),
  /** Copy-on-write space of a backup's lvm2 snapshot in a shared volumeGroup (default: a quarter of size, at least 64MiB). */
  snapshotSpace: z.union([z.string(), z.number()]).optional(),
  /** The resource that declares the volume (set by the Volume class): one owner per volume id. */
  owner: z.object({ project: z.string(), stack: z.string(), name: z.string() }).strict().optional(),
  /** Set by the Volume class when volumeId was not given: the stack and name it was derived from. */
  volumeIdFrom: z.object({ stack: z.string(), name: z.string() }).strict().optional(),
  repository: z.object({
    /** As the hosts reach S3. */
    endpoint: oneLine,
    /** As the machine that runs pulumi reaches S3 (leases, move progress). */
    localEndpoint: oneLine,
    region: oneLine, bucket: oneLine, prefix: oneLine, forcePathStyle: z.boolean(),
  }).strict(),
  accessKeyId: oneLine,
  secretAccessKey: oneLine,
  password: oneLine,
  retention: retentionSchema,
  maintenance: maintenanceSchema.default({}),
  rustic: rusticSourceSchema,
}).strict().superRefine((v, ctx) => {
  let bytes: number;
  try {
    bytes = parseSize(v.size);
  } catch (e) {
    ctx.addIssue({ code: "custom", path: ["size"], message: (e as Error).message });
    return;
  }
  if (bytes % EXTENT !== 0) {
    const down = Math.floor(bytes / EXTENT) * EXTENT, up = down + EXTENT;
    ctx.addIssue({ code: "custom", path: ["size"], message: `${bytes} bytes is not a multiple of 4 MiB (LVM's extent size): use ${formatSize(up)} or ${formatSize(down)}` });
  }
  if (v.source && v.source.volumeId === v.volumeId) {
    ctx.addIssue({ code: "custom", path: ["source", "volumeId"], message: `is this volume's own id (${v.volumeId}): name the volume to clone from, or remove source` });
  }
  const min = MIN_SIZE[v.filesystem];
  if (bytes < min) ctx.addIssue({ code: "custom", path: ["size"], message: `${v.filesystem} needs at least ${formatSize(min)}` });
  if (v.snapshotSpace !== undefined) {
    let space: number;
    try {
      space = parseSize(v.snapshotSpace);
    } catch (e) {
      ctx.addIssue({ code: "custom", path: ["snapshotSpace"], message: (e as Error).message });
      return;
    }
    if (!v.volumeGroup) {
      ctx.addIssue({ code: "custom", path: ["snapshotSpace"], message: "applies only to volumes in a shared volumeGroup (a volume of its own gets as much snapshot space as its size): remove it" });
    } else if (space % EXTENT !== 0 || space < 16 * EXTENT) {
      ctx.addIssue({ code: "custom", path: ["snapshotSpace"], message: `must be a multiple of 4 MiB and at least 64MiB, e.g. "${formatSize(Math.max(16 * EXTENT, Math.ceil(space / EXTENT) * EXTENT))}"` });
    }
  }
});
export type VolumeInputs = Omit<z.infer<typeof volumeSchema>, "size" | "snapshotSpace"> & { size: number; snapshotSpace?: number };

export interface Failure { property: string; reason: string }

/** Validates; returns the parsed value or failures that each name a field. */
export function validate<T>(schema: z.ZodType<T, any, any>, raw: unknown, prefix = ""): { value?: T; failures: Failure[] } {
  const r = schema.safeParse(raw);
  if (r.success) return { value: r.data, failures: [] };
  return {
    failures: r.error.issues.map((i) => {
      const property = [prefix, ...i.path.map(String)].filter(Boolean).join(".");
      const msg = i.code === "unrecognized_keys" ? `unknown field(s) ${i.keys.join(", ")}: check the spelling` : i.message;
      return { property, reason: `${property || "input"}: ${msg}` };
    }),
  };
}
