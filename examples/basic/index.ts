// Two persistent volumes on SSH hosts, backed up every five minutes to S3.
//
// Configuration (secrets with --secret):
//   pulumi config set s3Endpoint https://s3.eu-central-1.amazonaws.com
//   pulumi config set s3HostEndpoint http://10.0.2.100:9000        # only if hosts reach S3 elsewhere
//   pulumi config set s3Region eu-central-1
//   pulumi config set s3Bucket my-volumes
//   pulumi config set --secret s3AccessKeyId AKIA...
//   pulumi config set --secret s3SecretAccessKey ...
//   pulumi config set --secret repositoryPassword ...
//   pulumi config set rusticPath /usr/local/bin/rustic           # the binary copied to hosts
//   pulumi config set --secret sshPrivateKey < ~/.ssh/id_ed25519
//   pulumi config set --path 'hosts[0].address' 192.0.2.10
//   pulumi config set --path 'hosts[0].hostKey' "$(cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)"   # run on the host
//   (hosts[i].port and hosts[i].user are optional: 22 and root)
//
// Move a volume by changing its host index below and running `pulumi up` again.
import * as pulumi from "@pulumi/pulumi";
import * as volumes from "pulumi-dboxed-volumes";

const cfg = new pulumi.Config();
interface HostConfig { address: string; port?: number; user?: string; hostKey: string }
const hosts = cfg.requireObject<HostConfig[]>("hosts");
const privateKey = cfg.requireSecret("sshPrivateKey");
const host = (i: number) => ({ ...hosts[i % hosts.length], privateKey });

const store = new volumes.VolumeProvider("store", {
  s3: {
    endpoint: cfg.require("s3Endpoint"),
    hostEndpoint: cfg.get("s3HostEndpoint"),
    region: cfg.get("s3Region") ?? "us-east-1",
    bucket: cfg.require("s3Bucket"),
    prefix: "volumes",
    accessKeyId: cfg.requireSecret("s3AccessKeyId"),
    secretAccessKey: cfg.requireSecret("s3SecretAccessKey"),
  },
  password: cfg.requireSecret("repositoryPassword"),
  retention: { keepLast: 3, keepHourly: 24, keepDaily: 7 },
  rustic: { localPath: cfg.require("rusticPath") },
});

const pgdata = new volumes.Volume("pgdata", {
  volumeProvider: store,
  host: host(0),
  size: "256MiB",
  filesystem: "ext4",
  mountPath: "/srv/pgdata",
  backupSchedule: "*:0/5",
});

const media = new volumes.Volume("media", {
  volumeProvider: store,
  host: host(1),
  size: "320MiB",
  filesystem: "xfs",
  mountPath: "/srv/media",
  backupSchedule: "hourly",
});

const summary = (v: volumes.Volume) => ({
  volumeId: v.volumeId, host: v.hostAddress, device: v.device, mountPath: v.mountPath,
  sizeBytes: v.sizeBytes, usedBytes: v.usedBytes, mounted: v.mounted,
  lastBackupAt: v.lastBackupAt, lastBackupStatus: v.lastBackupStatus,
  latestSnapshotId: v.latestSnapshotId, snapshotCount: v.snapshotCount,
});
export const repository = store.repository;
export const volumesSummary = { pgdata: summary(pgdata), media: summary(media) };
