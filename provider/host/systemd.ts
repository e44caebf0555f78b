// systemd unit files of a volume: the block device, the mount, the backup service and timer.
import { AGENT_PATH, VolumeLayout } from "./layout";
import { command } from "./shell";

export const UNIT_DIR = "/etc/systemd/system";

export function deviceUnit(l: VolumeLayout): string {
  return `# Written by pulumi-dboxed-volumes.
[Unit]
Description=dboxed volume ${l.volumeId}: block device
DefaultDependencies=no
After=systemd-remount-fs.service systemd-udevd.service
Wants=systemd-udevd.service
# Its image (own volume group), settings and agent may live on filesystems of their own (/var, /etc, /usr).
RequiresMountsFor=${l.ownVg ? `${l.image} ` : ""}${l.envFile} ${AGENT_PATH}
Before=${l.units.mount}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=${AGENT_PATH} attach ${l.volumeId}
ExecStop=${AGENT_PATH} detach ${l.volumeId}

[Install]
WantedBy=multi-user.target
`;
}

export function mountUnit(l: VolumeLayout): string {
  return `# Written by pulumi-dboxed-volumes.
[Unit]
Description=dboxed volume ${l.volumeId}
Requires=${l.units.device}
After=${l.units.device}

[Mount]
What=${l.device}
Where=${l.mountPath}
Type=${l.filesystem}
Options=defaults

[Install]
WantedBy=multi-user.target
`;
}

export function backupService(l: VolumeLayout): string {
  // Requisite, not Requires: a backup never mounts the volume (during a move it must stay unmounted).
  return `# Written by pulumi-dboxed-volumes.
[Unit]
Description=dboxed volume ${l.volumeId}: backup to S3
Requisite=${l.units.mount}
After=${l.units.mount} network-online.target

[Service]
Type=oneshot
ExecStart=${AGENT_PATH} backup ${l.volumeId}
# A stopped run (a move or delete, a shutdown) cleans up and exits 143: not a failed unit.
SuccessExitStatus=143
TimeoutStartSec=6h
Nice=10
`;
}

/**
 * A fixed random delay per volume and host spreads volumes that share a schedule; Persistent
 * makes a host that was off (or a timer that was stopped) catch up once when it starts again.
 */
export function backupTimer(l: VolumeLayout, schedule: string, randomDelaySec: number): string {
  return `# Written by pulumi-dboxed-volumes.
[Unit]
Description=dboxed volume ${l.volumeId}: backup schedule

[Timer]
OnCalendar=${schedule}
AccuracySec=1s
RandomizedDelaySec=${randomDelaySec}s
FixedRandomDelay=true
Persistent=true

[Install]
WantedBy=timers.target
`;
}

/** Repository prune and check, started by a successful backup; runs only when due and this host takes the task's lease. */
export function maintainService(l: VolumeLayout): string {
  return `# Written by pulumi-dboxed-volumes.
[Unit]
Description=dboxed volume ${l.volumeId}: repository maintenance (prune, check) when due
After=network-online.target

[Service]
Type=oneshot
ExecStart=${AGENT_PATH} maintain ${l.volumeId}
TimeoutStartSec=24h
# Not Nice=19 here: the agent keeps the task's lease at normal priority and runs the task
# itself (rustic prune, check) at nice 19 and idle I/O.
`;
}

/** The holder renews the volume's lease (a compare-and-swap from the host) so that force elsewhere waits. */
export function renewService(l: VolumeLayout): string {
  return `# Written by pulumi-dboxed-volumes.
[Unit]
Description=dboxed volume ${l.volumeId}: lease renewal
After=network-online.target

[Service]
Type=oneshot
ExecStart=${AGENT_PATH} renew ${l.volumeId}
TimeoutStartSec=5min
`;
}

export function renewTimer(l: VolumeLayout, leaseSeconds: number): string {
  const every = Math.max(20, Math.floor(leaseSeconds / 3));
  return `# Written by pulumi-dboxed-volumes.
[Unit]
Description=dboxed volume ${l.volumeId}: lease renewal, every third of the lease (${leaseSeconds} s)

[Timer]
OnActiveSec=5s
OnUnitActiveSec=${every}s
AccuracySec=1s

[Install]
WantedBy=timers.target
`;
}

export function unitFiles(l: VolumeLayout, schedule: string, leaseSeconds: number, randomDelaySec: number): Record<string, string> {
  return {
    [l.units.renew]: renewService(l),
    [l.units.renewTimer]: renewTimer(l, leaseSeconds),
    [l.units.device]: deviceUnit(l),
    [l.units.mount]: mountUnit(l),
    [l.units.backup]: backupService(l),
    [l.units.maintain]: maintainService(l),
    [l.units.timer]: backupTimer(l, schedule, randomDelaySec),
  };
}

/** `systemctl VERB -- UNITS...`: after `--` no unit name is read as an option (defence in depth: check refuses a leading `-`). */
export function unitsArgv(verb: "start" | "stop", units: readonly string[]): string[] {
  return ["systemctl", verb, "--", ...units];
}

/** The same as one shell command line, every word quoted. */
export function unitsCommand(verb: "start" | "stop", units: readonly string[]): string {
  return command(unitsArgv(verb, units));
}
