import * as pulumi from "@pulumi/pulumi";
import { maintenanceSchema, PROXY_ABSENT, retentionSchema, S3_DEFAULTS } from "../inputs";
import { refuseUnknownArgs, shim } from "./shim";
import { adoptionHint } from "../errors";
import { defaultVolumeId } from "../volumeId";
import { VolumeProvider } from "./volumeProvider";

/** A bastion the host is reached through: its own address, login and pinned key. */
export interface ProxyArgs {
  address: pulumi.Input<string>;
  port?: pulumi.Input<number>;
  user?: pulumi.Input<string>;
  /** The private key's content (stored as a secret); without it, the SSH agent is used. */
  privateKey?: pulumi.Input<string>;
  /** Passphrase of an encrypted privateKey (stored as a secret). */
  privateKeyPassword?: pulumi.Input<string>;
  /** The SSH agent's socket (default: SSH_AUTH_SOCK where pulumi runs). */
  agentSocketPath?: pulumi.Input<string>;
  /** Pins the bastion: its public key ("ssh-ed25519 AAAA...", ecdsa or rsa). */
  hostKey: pulumi.Input<string>;
}

/** How to reach the host, as remote.Connection of @pulumi/command: address, port and user stay plain, keys are secrets. */
export interface HostArgs extends ProxyArgs {
  /** root, or a user with passwordless sudo (default root). */
  user?: pulumi.Input<string>;
  /** Pins the host: its public key as "ssh-ed25519 AAAA..." (or ecdsa, rsa); any other key is refused. */
  hostKey: pulumi.Input<string>;
  /** Reach the host through this bastion. */
  proxy?: pulumi.Input<ProxyArgs>;
  /** Dial attempts before an operation gives up (default 5). */
  dialErrorLimit?: pulumi.Input<number>;
  /** Seconds one dial may take (default 20). */
  perDialTimeout?: pulumi.Input<number>;
}

const CONNECTION_ARGS = ["address", "port", "user", "privateKey", "privateKeyPassword", "agentSocketPath", "hostKey", "proxy", "dialErrorLimit", "perDialTimeout"];

const SECRET_ARGS = new Set(["privateKey", "privateKeyPassword"]);

/**
 * The connection with only its keys and passphrases secret: address, port and user read plainly
 * in diffs, outputs and state. Field by field, so that one secret does not make the whole secret.
 */
function connection(h: pulumi.Input<HostArgs> | pulumi.Input<ProxyArgs>, withProxy: boolean): Record<string, unknown> {
  const known = withProxy ? CONNECTION_ARGS : CONNECTION_ARGS.filter((k) => !["proxy", "dialErrorLimit", "perDialTimeout"].includes(k));
  // Only known fields are copied: a misspelt one (privatekey) must fail, not vanish.
  const refuseUnknown = (x: Record<string, unknown>) => {
    const unknown = Object.keys(x ?? {}).filter((k) => !known.includes(k) && x[k] !== undefined);
    if (unknown.length) {
      throw new Error(`${withProxy ? "host" : "host.proxy"}: unknown field(s) ${unknown.join(", ")}: check the spelling (known: ${known.join(", ")})`);
    }
  };
  if (pulumi.Output.isInstance(h) || h instanceof Promise) {
    // Its shape is known only later: each field lifted, the bastion's too (absent ones arrive
    // as null and check drops them; a missing bastion arrives marked PROXY_ABSENT).
    const o = (pulumi.output(h) as pulumi.Output<any>).apply((x) => { refuseUnknown(x ?? {}); return x ?? {}; });
    const out: Record<string, unknown> = {};
    for (const k of known) {
      if (k === "proxy") {
        // A bastion whose fields all came out empty is an error, not "none".
        out.proxy = { ...connection(o.apply((x) => x.proxy ?? {}), false), [PROXY_ABSENT]: o.apply((x) => (x.proxy == null ? true : undefined)) };
        continue;
      }
      out[k] = SECRET_ARGS.has(k) ? pulumi.secret(o.apply((x) => x[k])) : o.apply((x) => x[k]);
    }
    return out;
  }
  const x = h as Record<string, any>;
  refuseUnknown(x);
  const out: Record<string, unknown> = {};
  for (const k of CONNECTION_ARGS) {
    if (x[k] === undefined || (k === "proxy" && !withProxy)) continue;
    out[k] = SECRET_ARGS.has(k) ? pulumi.secret(x[k]) : k === "proxy" ? connection(x[k], false) : x[k];
  }
  return out;
}

export interface VolumeArgs {
  volumeProvider: VolumeProvider;
  host: pulumi.Input<HostArgs>;
  /** "10GiB", "512MiB", or bytes; a multiple of 4 MiB. Can grow, never shrink. */
  size: pulumi.Input<string | number>;
  filesystem?: pulumi.Input<"ext4" | "xfs">;
  mountPath: pulumi.Input<string>;
  /** An existing volume group to create the LV in; default: a loop-backed image with a VG of its own. */
  volumeGroup?: pulumi.Input<string>;
  /** systemd OnCalendar expression (default "*:0/5": every five minutes). */
  backupSchedule?: pulumi.Input<string>;
  /**
   * Each backup starts up to this long after its scheduled time, a fixed offset per volume and
   * host (seconds or "2m"; 0 for none): volumes on one schedule and repository do not start in
   * the same second. Shorter than the schedule's interval. Default: 2 minutes, or half the
   * schedule's interval if that is shorter.
   */
  backupRandomDelay?: pulumi.Input<number | string>;
  /**
   * Identifies the volume's data in the repository (default "<stack>-<name>"). A new Volume with
   * the id of one whose snapshots exist starts from its latest snapshot.
   */
  volumeId?: pulumi.Input<string>;
  /** Back up one last time before removing the volume from its host (default true). */
  finalBackupOnDelete?: pulumi.Input<boolean>;
  /** Forget and prune the volume's snapshots when it is deleted (default false: they are kept). */
  forgetSnapshotsOnDelete?: pulumi.Input<boolean>;
  /** systemd units that use the volume: stopped on the old host before a move, started on the new one. */
  stopUnits?: pulumi.Input<pulumi.Input<string>[]>;
  /** Restore the latest periodic snapshot on the new host before stopping the old one (default true). */
  warmMove?: pulumi.Input<boolean>;
  /**
   * Copy-on-write space for a backup's lvm2 snapshot of a volume in a shared volumeGroup (default a
   * quarter of size, at least 64MiB). A backup during which the volume changes by more fails.
   */
  snapshotSpace?: pulumi.Input<string | number>;
  /**
   * Take the volume although another host holds it, restoring its latest snapshot: for when that
   * host is gone for good. Data written since that snapshot is lost; the output says how much time.
   */
  force?: pulumi.Input<boolean>;
  /** With force: take the volume even though its lease has not expired (its holder may still be writing). */
  forceDespiteLiveLease?: pulumi.Input<boolean>;
  /** How long the holder's lease lasts without renewal: seconds, or "90s", "10m", "1h" (default 10m). */
  leaseDuration?: pulumi.Input<number | string>;
  /**
   * Start a new volume from another volume's data in the same repository (a clone with its own id
   * and history; the source is untouched). snapshot: "latest" (default), a snapshot id (8+ hex
   * digits), or a time such as "2026-11-28T10:00:00Z" (the newest snapshot at or before it).
   * Used only while this volume has no snapshots of its own; later changes do nothing.
   */
  source?: pulumi.Input<{ volumeId: pulumi.Input<string>; snapshot?: pulumi.Input<string> }>;
}

const VOLUME_ARGS = ["volumeProvider", "host", "size", "filesystem", "mountPath", "volumeGroup", "backupSchedule",
  "volumeId", "finalBackupOnDelete", "forgetSnapshotsOnDelete", "stopUnits", "warmMove", "force", "snapshotSpace",
  "forceDespiteLiveLease", "leaseDuration", "backupRandomDelay", "source"];

export { defaultVolumeId } from "../volumeId";


/** A persistent volume on an SSH host: lvm2 + scheduled crash-consistent rustic backups to S3. */
export class Volume extends pulumi.dynamic.Resource {
  public readonly volumeId!: pulumi.Output<string>;
  public readonly device!: pulumi.Output<string>;
  public readonly mountPath!: pulumi.Output<string>;
  public readonly hostAddress!: pulumi.Output<string>;
  public readonly sizeBytes!: pulumi.Output<number>;
  public readonly usedBytes!: pulumi.Output<number>;
  public readonly mounted!: pulumi.Output<boolean>;
  public readonly timerActive!: pulumi.Output<boolean>;
  public readonly lastBackupAt!: pulumi.Output<string>;
  public readonly lastBackupStatus!: pulumi.Output<string>;
  public readonly lastBackupMessage!: pulumi.Output<string>;
  public readonly lastSuccessfulBackupAt!: pulumi.Output<string>;
  public readonly latestSnapshotId!: pulumi.Output<string>;
  public readonly snapshotCount!: pulumi.Output<number>;
  public readonly restoredFrom!: pulumi.Output<string>;
  /** A clone's origin: volumeId, snapshotId, snapshotTime ({} when the volume is no clone). */
  public readonly clonedFrom!: pulumi.Output<Record<string, unknown>>;
  /** The last move or forced takeover: hosts, final snapshot, downtime, and any data-loss window. */
  public readonly lastMove!: pulumi.Output<Record<string, unknown>>;
  /** A random id of this resource instance, also in the volume's lease (a replaced instance leaves the volume to its successor). */
  public readonly instanceId!: pulumi.Output<string>;
  /**
   * A move that stopped before the switch: `from`, `to`, `phase`, `reason`, `since` (empty when
   * none). Set `host` back to `from` to undo it, keep `to` and run again to finish it.
   */
  public readonly unfinishedMove!: pulumi.Output<Record<string, unknown>>;
  /** The old host of a finished move that could not be cleaned yet (`host`, `reason`; empty when none): the next `pulumi up` retries. */
  public readonly pendingCleanup!: pulumi.Output<Record<string, unknown>>;
  /** A delete or rebuild that was cut off on the volume's host (`op`, `since`; empty when none): the next `pulumi up` repairs it. */
  public readonly interruptedOperation!: pulumi.Output<Record<string, unknown>>;

  constructor(name: string, args: VolumeArgs, opts?: pulumi.CustomResourceOptions) {
    refuseUnknownArgs(`Volume "${name}"`, args, VOLUME_ARGS);
    if (opts?.import !== undefined) {
      // An import reads a resource from its id alone; a volume's state needs its host connection
      // and repository, which an id does not carry. Adoption goes through create instead.
      throw new Error(adoptionHint(`Volume "${name}"`, String(opts.import)));
    }
    const settings = args.volumeProvider.settings;
    const s3 = settings.apply((s) => s.s3);
    const retention = settings.apply((s) => {
      const r = retentionSchema.safeParse(s.retention ?? {});
      return r.success ? r.data : s.retention; // invalid retention is reported by the VolumeProvider
    });
    const maintenance = settings.apply((s) => {
      const r = maintenanceSchema.safeParse(s.maintenance ?? {});
      return r.success ? r.data : s.maintenance;
    });
    // The volume needs its provider's checks and repository first.
    const extra: any = opts?.dependsOn;
    const dependsOn: any = extra === undefined ? [args.volumeProvider]
      : Array.isArray(extra) ? [...extra, args.volumeProvider]
      : pulumi.Resource.isInstance(extra) ? [extra, args.volumeProvider]
      : Promise.resolve(extra).then((d: any) => [...(Array.isArray(d) ? d : [d]), args.volumeProvider]);
    super(shim("volume"), name, {
      volumeId: args.volumeId ?? defaultVolumeId(pulumi.getStack(), name),
      volumeIdFrom: args.volumeId === undefined ? { stack: pulumi.getStack(), name } : undefined,
      owner: { project: pulumi.getProject(), stack: pulumi.getStack(), name },
      snapshotSpace: args.snapshotSpace,
      host: connection(args.host, true),
      // Plain even when the connection holds secrets (its key): an address is no secret.
      hostAddress: pulumi.unsecret(pulumi.output(args.host).apply((h) => h.address)),
      size: args.size,
      filesystem: args.filesystem ?? "ext4",
      mountPath: args.mountPath,
      volumeGroup: args.volumeGroup,
      backupSchedule: args.backupSchedule ?? "*:0/5",
      backupRandomDelay: args.backupRandomDelay,
      finalBackupOnDelete: args.finalBackupOnDelete ?? true,
      forgetSnapshotsOnDelete: args.forgetSnapshotsOnDelete ?? false,
      stopUnits: args.stopUnits ?? [],
      warmMove: args.warmMove ?? true,
      force: args.force ?? false,
      forceDespiteLiveLease: args.forceDespiteLiveLease ?? false,
      leaseDuration: args.leaseDuration ?? 600,
      source: args.source,
      repository: pulumi.unsecret(s3.apply((x) => ({
        endpoint: x.hostEndpoint ?? x.endpoint,
        localEndpoint: x.endpoint,
        region: x.region ?? S3_DEFAULTS.region,
        bucket: x.bucket,
        prefix: x.prefix ?? S3_DEFAULTS.prefix,
        forcePathStyle: x.forcePathStyle ?? S3_DEFAULTS.forcePathStyle,
      }))),
      accessKeyId: s3.apply((x) => x.accessKeyId),
      secretAccessKey: s3.apply((x) => x.secretAccessKey),
      password: settings.apply((s) => s.password),
      retention: pulumi.unsecret(retention),
      maintenance: pulumi.unsecret(maintenance),
      rustic: pulumi.unsecret(settings.apply((s) => s.rustic)),
      device: undefined, sizeBytes: undefined, usedBytes: undefined, mounted: undefined, timerActive: undefined,
      lastBackupAt: undefined, lastBackupStatus: undefined, lastBackupMessage: undefined, lastSuccessfulBackupAt: undefined,
      latestSnapshotId: undefined, snapshotCount: undefined, restoredFrom: undefined, clonedFrom: undefined, lastMove: undefined, instanceId: undefined,
      unfinishedMove: undefined, pendingCleanup: undefined, moveOrigin: undefined, interruptedOperation: undefined,
    }, {
      ...opts,
      dependsOn,
      // moveOrigin: the old host's connection while a move is unfinished or its old host not cleaned.
      additionalSecretOutputs: ["accessKeyId", "secretAccessKey", "password", "moveOrigin"],
    }, "dboxed-volumes", "Volume");
  }
}
