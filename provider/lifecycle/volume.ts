// The Volume resource's lifecycle: check, diff, create, read, update, delete.
// The dynamic-provider contract rules every step: if create fails, the volume must be able to be
// created again by the next `pulumi up` (every host step is resumable); if delete fails, the
// volume is still there, with its data.
import { UserError } from "../errors";
import { parseSize, volumeSchema, VolumeInputs, formatSize } from "../inputs";
import { VolumeLayout } from "../host/layout";
import { Snapshot } from "../host/rustic";
import { quote as q } from "../host/shell";
import { Remote, withRemote } from "../remote/ssh";
import { checkInputs } from "./check";
import { progress } from "./progress";
import * as steps from "./steps";
import { claim, hostRef, leaseS3, release } from "./lease";
import { move } from "./move";
import { readLease, sameHost, hostName } from "../storage/lease";

type Props = Record<string, any>;

export interface VolumeOutputs {
  device: string;
  sizeBytes: number;
  usedBytes: number;
  mounted: boolean;
  timerActive: boolean;
  lastBackupAt: string;
  lastBackupStatus: string;
  lastBackupMessage: string;
  lastSuccessfulBackupAt: string;
  latestSnapshotId: string;
  snapshotCount: number;
  restoredFrom: string;
  lastMove: Record<string, unknown>;
}

/** Fields whose change means a new volume (its data carried over by final backup + restore). */
const REPLACE_FIELDS = ["volumeId", "filesystem", "volumeGroup"] as const;
/** Fields of the volume's inputs that are compared by diff. */
const INPUT_FIELDS = ["volumeId", "host", "size", "filesystem", "mountPath", "volumeGroup", "backupSchedule",
  "finalBackupOnDelete", "forgetSnapshotsOnDelete", "repository", "accessKeyId", "secretAccessKey", "password",
  "retention", "rustic", "stopUnits", "warmMove", "force"] as const;

/** One operation at a time per volume and host, for as long as this connection lives. */
async function exclusive<T>(r: Remote, l: VolumeLayout, log: (m: string) => void, fn: () => Promise<T>): Promise<T> {
  const release = await r.holdLock(`/run/dboxed-volumes/${l.volumeId}.operation.lock`, `volume ${l.volumeId}`, 900, log);
  try {
    return await fn();
  } finally {
    release();
  }
}

function logger(v: { volumeId: string }) {
  return (msg: string) => { void progress(`volume ${v.volumeId}`, msg); };
}

export async function check(olds: Props, news: Props) {
  const res = checkInputs(volumeSchema, news);
  if (res.value && olds && olds.volumeId === res.value.volumeId && typeof olds.size === "number") {
    const bytes = parseSize(res.value.size);
    if (bytes < olds.size) {
      res.failures.push({ property: "size", reason: `size: shrinking a volume is not supported (${formatSize(olds.size)} -> ${formatSize(bytes)}); ` +
        "keep the size, or create a new volume and copy the data" });
    }
  }
  if (res.value && res.failures.length === 0) res.inputs.size = parseSize(res.value.size);
  return { inputs: res.inputs, failures: res.failures };
}

function same(a: unknown, b: unknown): boolean {
  return JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
}

export async function diff(_id: string, olds: Props, news: Props) {
  const changes = INPUT_FIELDS.filter((f) => !same(olds[f], news[f]));
  const replaces: string[] = REPLACE_FIELDS.filter((f) => !same(olds[f], news[f]));
  // A new host is a move (an update): final backup on the old host, verified restore on the new one.
  return { changes: changes.length > 0, replaces, deleteBeforeReplace: true, stables: [] as string[] };
}

function iso(sec?: number): string {
  return sec ? new Date(sec * 1000).toISOString() : "";
}

function outputs(l: VolumeLayout, obs: steps.Observed, snaps: Snapshot[] | undefined, prev: Props, restoredFrom?: string): VolumeOutputs {
  const latest = snaps?.[snaps.length - 1];
  return {
    device: l.device,
    sizeBytes: obs.sizeBytes ?? 0,
    usedBytes: obs.usedBytes ?? 0,
    mounted: obs.mounted,
    timerActive: obs.timerActive,
    lastBackupAt: iso(obs.status.finishedAt),
    lastBackupStatus: obs.status.status,
    lastBackupMessage: obs.status.message ?? "",
    lastSuccessfulBackupAt: iso(obs.status.lastSuccessAt),
    latestSnapshotId: snaps ? latest?.id ?? "" : prev.latestSnapshotId ?? "",
    snapshotCount: snaps ? snaps.length : prev.snapshotCount ?? 0,
    restoredFrom: restoredFrom ?? prev.restoredFrom ?? "",
    lastMove: prev.lastMove ?? {},
  };
}

/** Everything that makes a volume run on a host; each step skips what is already done. */
async function converge(r: Remote, v: VolumeInputs, leaseToken: string, log: (m: string) => void): Promise<{ restoredFrom?: string }> {
  const l = steps.layout(v);
  await steps.preflight(r, v, l);
  await steps.installTools(r, v, log);
  await steps.writeConfig(r, v, l, leaseToken);
  await steps.ensureStorage(r, v, l);
  await steps.installUnits(r, v, l);
  const init = await steps.initialize(r, l, log);
  await steps.startTimer(r, l);
  return init;
}

export async function create(inputs: Props) {
  const v = inputs as VolumeInputs;
  const log = logger(v);
  const l = steps.layout(v);
  return withRemote(v.host, async (r) => exclusive(r, l, log, async () => {
    log(`creating on ${r.name}: ${formatSize(v.size)} ${v.filesystem} at ${v.mountPath}`);
    const { lease, forcedFrom } = await claim(v);
    const init = await converge(r, v, lease.token, log);
    let lastMove: Record<string, unknown> = {};
    if (forcedFrom) {
      const snaps = await steps.listSnapshots(r, l);
      const used = snaps.find((s) => s.id === init.restoredFrom);
      const lostSeconds = used ? Math.round((Date.now() - Date.parse(used.time)) / 1000) : null;
      lastMove = { forced: true, from: hostName(forcedFrom.holder), to: r.name, snapshotId: init.restoredFrom ?? "",
        snapshotTime: used?.time ?? "", dataLossWindowSeconds: lostSeconds };
      log(`FORCED takeover from ${hostName(forcedFrom.holder)}: restored snapshot ${init.restoredFrom?.slice(0, 8) ?? "(none)"} ` +
        `of ${used?.time ?? "never"}; anything written on the old host after it (up to ${lostSeconds ?? "?"} s) is lost`);
    }
    await steps.runBackup(r, l, log);
    const obs = await steps.observe(r, l);
    const snaps = await steps.listSnapshots(r, l);
    return { id: v.volumeId, outs: { ...inputs, ...outputs(l, obs, snaps, { lastMove }, init.restoredFrom ?? "") } };
  }), { log });
}

export async function read(id: string, props: Props) {
  const v = props as VolumeInputs;
  const l = steps.layout(v);
  return withRemote(v.host, async (r) => {
    const obs = await steps.observe(r, l);
    if (!obs.present && !obs.configured) return { id: "", props: {} }; // gone from the host
    let snaps: Snapshot[] | undefined;
    try {
      snaps = await steps.listSnapshots(r, l);
    } catch (e) {
      logger(v)(`cannot list snapshots (${(e as Error).message.split("\n")[0]}); keeping the last known values`);
    }
    return { id, props: { ...props, ...outputs(l, obs, snaps, props) } };
  });
}

export async function update(id: string, olds: Props, news: Props) {
  const v = news as VolumeInputs;
  const log = logger(v);
  const l = steps.layout(v);
  if (!sameHost(hostRef(olds as VolumeInputs), hostRef(v))) {
    const report = await move(olds as VolumeInputs, v, log, (r, lay, fn) => exclusive(r, lay, log, fn));
    log(`moved from ${report.from} to ${report.to}: downtime ${report.downtimeSeconds} s (${report.warm ? "warm" : "cold"}); ` +
      Object.entries(report.phases).map(([k, t]) => `${k} ${t} s`).join(", "));
    return withRemote(v.host, async (r) => {
      const obs = await steps.observe(r, l);
      let snaps: Snapshot[] | undefined;
      try { snaps = await steps.listSnapshots(r, l); } catch { snaps = undefined; }
      return { outs: { ...news, ...outputs(l, obs, snaps, { ...olds, lastMove: report as unknown as Record<string, unknown> }) } };
    });
  }
  return withRemote(v.host, async (r) => exclusive(r, l, log, async () => {
    const { lease } = await claim({ ...v, force: false });
    await converge(r, v, lease.token, log);
    if (v.size > (olds.size ?? 0)) {
      log(`growing to ${formatSize(v.size)}`);
      await steps.grow(r, v, l);
    }
    if (olds.backupSchedule !== v.backupSchedule) await r.runArgv(["systemctl", "restart", l.units.timer]);
    const obs = await steps.observe(r, l);
    let snaps: Snapshot[] | undefined;
    try { snaps = await steps.listSnapshots(r, l); } catch { snaps = undefined; }
    return { outs: { ...news, ...outputs(l, obs, snaps, olds) } };
  }), { log });
}

export async function remove(id: string, props: Props) {
  const v = props as VolumeInputs;
  const log = logger(v);
  const l = steps.layout(v);
  await withRemote(v.host, async (r) => exclusive(r, l, log, async () => {
    const obs = await steps.observe(r, l);
    const initialized = (await r.run(`test -e ${q(l.stateDir + "/initialized")}`, { allowFailure: true })).code === 0;
    if (!obs.present && !obs.configured) {
      log(`nothing left on ${r.name}`);
      return;
    }
    await r.runArgv(["systemctl", "stop", l.units.timer], { allowFailure: true });
    const lease = await readLease(leaseS3(v), v.volumeId);
    const fenced = !!lease && !sameHost(lease.lease.holder, hostRef(v));
    if (fenced) log(`${r.name} no longer holds volume ${v.volumeId} (${hostName(lease!.lease.holder)} does): no final backup from here`);
    let mounted = obs.mounted && !fenced;
    if (!fenced && !mounted && obs.present && initialized && v.finalBackupOnDelete && !v.forgetSnapshotsOnDelete) {
      // Not mounted (e.g. a failed boot): mount it so the final backup sees its latest data.
      await r.runArgv(["systemctl", "start", l.units.device, l.units.mount]);
      mounted = true;
    }
    if (v.forgetSnapshotsOnDelete && fenced) {
      log("not forgetting the snapshots: another host holds the volume and needs them");
    } else if (v.forgetSnapshotsOnDelete) {
      await steps.forgetSnapshots(r, l, log);
    } else if (v.finalBackupOnDelete && mounted && initialized) {
      await steps.quiesce(r, l);
      try {
        log("final backup before removal");
        await steps.runBackup(r, l, log);
      } catch (e) {
        await steps.unquiesce(r, l);
        await r.runArgv(["systemctl", "start", l.units.timer], { allowFailure: true });
        throw new UserError(`${(e as Error).message}\nThe volume was left in place, mounted and scheduled as before. ` +
          "Fix the cause and run again, or set finalBackupOnDelete: false to delete without a final backup.");
      }
    } else if (v.finalBackupOnDelete && !initialized && obs.configured) {
      log("the volume never finished its first restore: no final backup (the repository holds its data)");
    }
    log(`removing from ${r.name}`);
    await steps.teardown(r, l);
    await release(v);
  }), { log });
}
