import * as pulumi from "@pulumi/pulumi";
import { refuseUnknownArgs, shim } from "./shim";

export interface S3Args {
  /** The S3 endpoint as the machine running pulumi reaches it, e.g. https://s3.eu-central-1.amazonaws.com. */
  endpoint: pulumi.Input<string>;
  /** The endpoint as the volume hosts reach it, when it differs (a private network, the lab). */
  hostEndpoint?: pulumi.Input<string>;
  region?: pulumi.Input<string>;
  bucket: pulumi.Input<string>;
  /** Key prefix of the rustic repository in the bucket (default "dboxed-volumes"). */
  prefix?: pulumi.Input<string>;
  accessKeyId: pulumi.Input<string>;
  secretAccessKey: pulumi.Input<string>;
  /** Path-style requests (default true; needed by most S3-compatible servers). */
  forcePathStyle?: pulumi.Input<boolean>;
  /** Create the bucket when it does not exist (default false). */
  createBucket?: pulumi.Input<boolean>;
}

export interface RetentionArgs {
  keepLast?: number; keepHourly?: number; keepDaily?: number; keepWeekly?: number; keepMonthly?: number; keepYearly?: number;
}

/** Repository-wide maintenance (durations as seconds or "90s", "10m", "1h", "1d"; 0 turns a task off). */
export interface MaintenanceArgs {
  /** Prune unused data at most this often, by one host at a time (default 1d). */
  pruneInterval?: number | string;
  /** Check the repository this often, by one host at a time (default 7d). */
  checkInterval?: number | string;
  /** Each check reads this fraction's inverse of the data, a different part each time (default 10: a tenth). */
  checkSubsets?: number;
  /** How long prune keeps unused packs before deleting them, so backups in progress stay safe (default 23h). */
  keepDelete?: number | string;
}

/** How hosts get the rustic binary: copied from this machine, or downloaded and checked. */
export type RusticSourceArgs = { localPath: string } | { url: string; sha256: string };

export interface VolumeProviderArgs {
  s3: pulumi.Input<S3Args>;
  /** The rustic repository password (stored as a secret). */
  password: pulumi.Input<string>;
  retention?: pulumi.Input<RetentionArgs>;
  maintenance?: pulumi.Input<MaintenanceArgs>;
  rustic: pulumi.Input<RusticSourceArgs>;
}

/** An S3 bucket + prefix holding the rustic repository that volumes back up into. */
export class VolumeProvider extends pulumi.dynamic.Resource {
  /** s3://bucket/prefix of the repository. */
  public readonly repository!: pulumi.Output<string>;
  /** The last repository prune ({} before the first): at, result, message, host, durationSeconds, runs. Read by refresh. */
  public readonly lastPrune!: pulumi.Output<Record<string, unknown>>;
  /** The last repository check ({} before the first): at, result, message, host, durationSeconds, runs, subset. Read by refresh. */
  public readonly lastCheck!: pulumi.Output<Record<string, unknown>>;
  /** The settings volumes use (from the arguments, so they are known during a preview). */
  public readonly settings: pulumi.Output<pulumi.Unwrap<VolumeProviderArgs>>;

  constructor(name: string, args: VolumeProviderArgs, opts?: pulumi.CustomResourceOptions) {
    refuseUnknownArgs(`VolumeProvider "${name}"`, args, ["s3", "password", "retention", "maintenance", "rustic"]);
    super(shim("volumeProvider"), name, {
      s3: pulumi.secret(args.s3),
      password: pulumi.secret(args.password),
      retention: args.retention ?? {},
      maintenance: args.maintenance ?? {},
      rustic: args.rustic,
      repository: undefined,
      lastPrune: undefined,
      lastCheck: undefined,
    }, { ...opts, additionalSecretOutputs: ["s3", "password"] }, "dboxed-volumes", "VolumeProvider");
    this.settings = pulumi.secret(pulumi.output(args) as pulumi.Output<pulumi.Unwrap<VolumeProviderArgs>>);
  }
}
