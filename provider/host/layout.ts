// Where a volume lives on a host: names of the VG/LV, files, units. One place, so that the
// provider, the host agent (through volume.env) and the tests agree.
import { quote } from "./shell";

export const AGENT_PATH = "/usr/local/lib/dboxed-volumes/dboxed-volume";
export const RUSTIC_PATH = "/usr/local/lib/dboxed-volumes/rustic";
export const METRICS_DIR = "/var/lib/prometheus/node-exporter";

export interface VolumeLayout {
  volumeId: string;
  /** true: a sparse image file + loop device + a VG of its own (as Dboxed); false: an LV in the user's VG. */
  ownVg: boolean;
  vg: string;
  lv: string;
  snapshotLv: string;
  /** Where a backup mounts its snapshot (the agent's SNAP_MNT). */
  snapshotMount: string;
  device: string;
  image: string;
  configDir: string;
  stateDir: string;
  envFile: string;
  /** The rustic profile path without its .toml suffix (rustic -P adds it). */
  profile: string;
  mountPath: string;
  filesystem: "ext4" | "xfs";
  rusticHost: string;
  units: { device: string; mount: string; backup: string; timer: string; renew: string; renewTimer: string; maintain: string };
}

export function layoutFor(v: { volumeId: string; volumeGroup?: string; mountPath: string; filesystem: "ext4" | "xfs" }): VolumeLayout {
  const id = v.volumeId;
  const ownVg = !v.volumeGroup;
  const vg = v.volumeGroup ?? `dbv-${id}`;
  const lv = ownVg ? "data" : `dbv-${id}`;
  const configDir = `/etc/dboxed-volumes/${id}`;
  const stateDir = `/var/lib/dboxed-volumes/${id}`;
  return {
    volumeId: id, ownVg, vg, lv, snapshotLv: `${lv}-backup`, snapshotMount: `/run/dboxed-volumes/${id}/snapshot`, device: `/dev/${vg}/${lv}`,
    image: `${stateDir}/disk.img`, configDir, stateDir, envFile: `${configDir}/volume.env`,
    profile: `${configDir}/rustic`, mountPath: v.mountPath, filesystem: v.filesystem,
    rusticHost: `dboxed-volume-${id}`,
    units: {
      device: `dboxed-volume-${id}-device.service`,
      mount: mountUnitName(v.mountPath),
      backup: `dboxed-volume-${id}-backup.service`,
      timer: `dboxed-volume-${id}-backup.timer`,
      renew: `dboxed-volume-${id}-lease.service`,
      renewTimer: `dboxed-volume-${id}-lease.timer`,
      maintain: `dboxed-volume-${id}-maintain.service`,
    },
  };
}

/** systemd-escape --path --suffix=mount, for the characters mountPathSchema admits. */
export function mountUnitName(mountPath: string): string {
  const trimmed = mountPath.replace(/^\/+|\/+$/g, "").replace(/\/+/g, "/");
  let out = "";
  for (let i = 0; i < trimmed.length; i++) {
    const c = trimmed[i];
    if (c === "/") out += "-";
    // As systemd-escape --path: '-' always, '.' only as the very first character.
    else if (c === "-" || (c === "." && i === 0)) out += "\\x" + c.charCodeAt(0).toString(16);
    else if (/[A-Za-z0-9_.]/.test(c)) out += c;
    else out += "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0");
  }
  return `${out}.mount`;
}

export interface EnvSettings {
  sizeBytes: number;
  /** Copy-on-write space of a backup snapshot in a shared VG (default snapshotBytes(sizeBytes)). */
  snapshotSpaceBytes?: number;
  /** The lease token this host holds, and where the lease is: backups check both first. */
  lease: { token: string; url: string; region: string; seconds: number };
  retention: { keepLast: number; keepHourly: number; keepDaily: number; keepWeekly: number; keepMonthly: number; keepYearly: number };
  /** Repository maintenance: where its leases are, the repository's name (a metric label), the intervals in seconds. */
  maintenance: { url: string; listUrl: string; repository: string; pruneInterval: number; checkInterval: number; checkSubsets: number; keepDelete: number };
}

/** The volume.env the host agent sources: every value quoted. */
export function volumeEnv(l: VolumeLayout, s: EnvSettings): string {
  const vars: Record<string, string | number> = {
    VOLUME_ID: l.volumeId, OWN_VG: l.ownVg ? 1 : 0, VG: l.vg, LV: l.lv, SNAP_LV: l.snapshotLv, DEVICE: l.device,
    IMAGE: l.image, FILESYSTEM: l.filesystem, MOUNT_PATH: l.mountPath, STATE_DIR: l.stateDir,
    PROFILE: l.profile, RUSTIC: RUSTIC_PATH, RUSTIC_HOST: l.rusticHost, METRICS_DIR,
    SIZE_BYTES: s.sizeBytes, SNAPSHOT_BYTES: s.snapshotSpaceBytes ?? snapshotBytes(s.sizeBytes),
    KEEP_LAST: s.retention.keepLast, KEEP_HOURLY: s.retention.keepHourly, KEEP_DAILY: s.retention.keepDaily,
    KEEP_WEEKLY: s.retention.keepWeekly, KEEP_MONTHLY: s.retention.keepMonthly, KEEP_YEARLY: s.retention.keepYearly,
    LEASE_TOKEN: s.lease.token, LEASE_URL: s.lease.url, S3_REGION: s.lease.region, CURL_CONFIG: `${l.configDir}/s3.curl`,
    LEASE_SECONDS: s.lease.seconds,
    MAINT_URL: s.maintenance.url, MAINT_LIST_URL: s.maintenance.listUrl, REPOSITORY: s.maintenance.repository, PRUNE_INTERVAL: s.maintenance.pruneInterval,
    CHECK_INTERVAL: s.maintenance.checkInterval, CHECK_SUBSETS: s.maintenance.checkSubsets, KEEP_DELETE: s.maintenance.keepDelete,
  };
  return "# Written by pulumi-dboxed-volumes; changes are overwritten.\n" +
    Object.entries(vars).map(([k, v]) => `${k}=${quote(v)}`).join("\n") + "\n";
}

/** Copy-on-write space for a snapshot in a shared VG: a quarter of the volume, at least 64 MiB, in whole extents. */
export function snapshotBytes(sizeBytes: number): number {
  const extent = 4 * 1024 * 1024;
  return Math.max(16 * extent, Math.ceil(sizeBytes / 4 / extent) * extent);
}

/** The sparse image of an own-VG volume: the filesystem plus as much again for snapshots, plus 4 MiB of LVM metadata. */
export function imageBytes(sizeBytes: number): number {
  return 2 * sizeBytes + 4 * 1024 * 1024;
}
