// pulumi-dboxed-volumes: portable persistent volumes on any SSH host, backed up to S3.
export { VolumeProvider } from "./resources/volumeProvider";
export type { VolumeProviderArgs, S3Args, RetentionArgs, RusticSourceArgs } from "./resources/volumeProvider";
export { Volume, defaultVolumeId } from "./resources/volume";
export type { VolumeArgs, HostArgs } from "./resources/volume";
