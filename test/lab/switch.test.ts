// The switch and the undo, cut off where it hurts (real pulumi, lab hosts).
// 1. A move reaches its switch: the new host mounts the volume read-write and its application
//    writes; the machine running pulumi dies before the switch is recorded. A refresh then keeps
//    the volume and says where it lives; setting host back is refused (an undo would throw the new
//    host's writes away), naming the way out; following it finishes the move with every write.
// 2. An undo cut off twice by reboots, of the new host while it is cleaned and of the old host
//    before it is given back: the next pulumi up finishes the undo, the old host read-write,
//    scheduled, its application running, the data intact, the new host clean.
// At every step at most one host has the volume mounted read-write.
import { expect } from "chai";
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { lab, labLease, onHost, rebootHost, Stack, stepByStep } from "./harness";
import { manifest, Manifest } from "./manifest";
import type { LabHost } from "../../lab/lab";

const prefix = `sw-${crypto.randomBytes(3).toString("hex")}`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** "rw", "ro" or "unmounted": how mountPath is mounted on h. */
async function mountState(h: LabHost, mountPath: string): Promise<string> {
  const r = await onHost(h, `findmnt -n -o OPTIONS --mountpoint ${mountPath} | tr ',' '\\n' | grep -x -m1 'r[ow]' || echo unmounted`);
  return r.stdout.trim();
}

async function mounts(hosts: LabHost[], mountPath: string): Promise<string[]> {
  const states = await Promise.all(hosts.map((h) => mountState(h, mountPath)));
  expect(states.filter((s) => s === "rw").length, `two read-write hosts: ${states.join(", ")}`).to.be.at.most(1);
  return states;
}

/** An application that appends "<host> <time>" to <mountPath>/log every half second while it runs. */
async function installWriter(h: LabHost, unit: string, mountPath: string) {
  await onHost(h, `cat > /etc/systemd/system/${unit} <<UNIT
[Unit]
RequiresMountsFor=${mountPath}
[Service]
ExecStart=/bin/bash -c 'while true; do echo "${h.name} \\$(date +%%s.%%N)" >> ${mountPath}/log; sleep 0.5; done'
UNIT
systemctl daemon-reload`);
}

async function clean(h: LabHost, volumeId: string, mountPath: string) {
  const r = await onHost(h, `ls /etc/systemd/system | grep -c dboxed-volume-${volumeId} || true
mountpoint -q ${mountPath} && echo MOUNTED || echo unmounted
vgs dbv-${volumeId} >/dev/null 2>&1 && echo VG || echo no-vg
ls -d /var/lib/dboxed-volumes/${volumeId} /etc/dboxed-volumes/${volumeId} 2>/dev/null | wc -l`);
  expect(r.stdout.trim().split("\n"), `host ${h.name} is not clean`).to.deep.equal(["0", "unmounted", "no-vg", "0"]);
}

/** Waits until the provider stops at a pause point (DBOXED_VOLUMES_PAUSE), or the run ends. */
async function paused(dir: string, ended: () => boolean): Promise<boolean> {
  for (let i = 0; i < 1200 && !fs.existsSync(path.join(dir, "paused")) && !ended(); i++) await sleep(250);
  return fs.existsSync(path.join(dir, "paused"));
}

describe("a switch cut off: the new host's writes are never thrown away (real pulumi, lab hosts)", function () {
  const volumeId = `sw-${crypto.randomBytes(3).toString("hex")}`;
  const mountPath = "/srv/switch";
  const app = `app-${volumeId}.service`;
  let stack: Stack;
  let h1: LabHost, h2: LabHost;
  let written = "";
  stepByStep(this, () => stack.run(["destroy", "--yes", "--skip-preview"]));
  const input = (host: number) => ({
    provider: { s3: { prefix } },
    volumes: [{ name: "s", host, args: { volumeId, size: "64MiB", mountPath, backupSchedule: "hourly", stopUnits: [app] } }],
  });

  before(async () => {
    [h1, h2] = lab().hosts;
    for (const h of [h1, h2]) await installWriter(h, app, mountPath);
    stack = new Stack("switch", "volumes");
    await stack.init();
  });

  it("creates the volume on host-1, its application writing", async () => {
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    await onHost(h1, `mkdir -p ${mountPath}/d && head -c 300000 /dev/urandom > ${mountPath}/d/blob && systemctl start ${app}`);
    await sleep(1500);
    expect(await mounts([h1, h2], mountPath)).to.deep.equal(["rw", "unmounted"]);
  });

  it("the machine running pulumi dies right after the new host switched on: its application writes there", async () => {
    const res = await stack.run(["up", "--yes", "--skip-preview"], { input: input(1), env: { DBOXED_VOLUMES_FAULT: "after-switch-on" } });
    expect(res.code, "the provider was killed").to.not.equal(0);
    stack.clearLocks();
    await sleep(3000);
    expect(await mounts([h1, h2], mountPath)).to.deep.equal(["ro", "rw"]);
    expect((await onHost(h2, `systemctl is-active ${app}`)).stdout.trim()).to.equal("active");
    written = (await onHost(h2, `sync; grep '^${h2.name} ' ${mountPath}/log`)).stdout;
    expect(written.trim().split("\n").length, "writes made on host-2").to.be.greaterThan(2);
    expect((await labLease(prefix, volumeId))!.lease.move?.phase).to.equal("switching");
  });

  it("a refresh keeps the volume and records where it lives (host-2), its old copy to clean", async () => {
    const res = await stack.run(["refresh", "--yes", "--skip-preview"]);
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const o = await stack.resourceOutputs("s");
    expect(o.host.port, "the state follows the volume").to.equal(h2.port);
    expect(o.pendingCleanup.host).to.equal(`127.0.0.1:${h1.port}`);
  });

  it("host set back to host-1: refused (an undo would throw host-2's writes away), naming the way out; nothing changes", async () => {
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.not.equal(0);
    expect(res.stdout + res.stderr).to.match(new RegExp(`cannot be undone any more.*Set host to 127\\.0\\.0\\.1:${h2.port}`));
    expect(await mounts([h1, h2], mountPath)).to.deep.equal(["ro", "rw"]);
    expect((await onHost(h2, `systemctl is-active ${app}`)).stdout.trim()).to.equal("active");
  });

  it("host-2 kept: the move finishes; every write made on host-2 is there; host-1 is clean", async () => {
    const res = await stack.up(input(1));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(await mounts([h1, h2], mountPath)).to.deep.equal(["unmounted", "rw"]);
    const now = (await onHost(h2, `cat ${mountPath}/log`)).stdout;
    for (const line of written.trim().split("\n")) expect(now).to.include(line);
    await clean(h1, volumeId, mountPath);
    const l = (await labLease(prefix, volumeId))!.lease;
    expect(l.move).to.equal(undefined);
    expect(l.holder.port).to.equal(h2.port);
    const o = (await stack.outputs()).volumes.s;
    expect(o.unfinishedMove).to.deep.equal({});
    expect(o.pendingCleanup).to.deep.equal({});
    const again = await stack.run(["preview", "--expect-no-changes"], { input: input(1) });
    expect(again.code, again.stdout + again.stderr).to.equal(0);
  });

  after(async () => {
    if (stack) await stack.run(["destroy", "--yes", "--skip-preview"]);
  });
});

describe("an undo cut off by reboots of either host is finished by the next pulumi up (real pulumi, lab hosts)", function () {
  const volumeId = `su-${crypto.randomBytes(3).toString("hex")}`;
  const mountPath = "/srv/undone";
  const app = `app-${volumeId}.service`;
  let stack: Stack;
  let h1: LabHost, h3: LabHost;
  let data: Manifest["entries"];
  let firstToken = "";
  stepByStep(this, () => stack.run(["destroy", "--yes", "--skip-preview"]));
  const input = (host: number) => ({
    provider: { s3: { prefix } },
    volumes: [{ name: "u", host, args: { volumeId, size: "64MiB", mountPath, backupSchedule: "hourly", stopUnits: [app], warmMove: false } }],
  });
  const dataOnly = async (h: LabHost) => (await manifest(h, `${mountPath}/d`)).entries;

  /** `pulumi up` with host-1 (an undo), paused at `point` while `meanwhile` runs; resolves with the run's result. */
  async function undoPausedAt(point: string, meanwhile: () => Promise<void>) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "undo-pause-"));
    let ended = false;
    const run = stack.run(["up", "--yes", "--skip-preview"], { input: input(0), env: { DBOXED_VOLUMES_PAUSE: `${point}:${dir}` } })
      .then((r) => { ended = true; return r; });
    expect(await paused(dir, () => ended), `the undo paused at ${point}`).to.equal(true);
    await meanwhile();
    fs.writeFileSync(path.join(dir, "resume"), "");
    const res = await run;
    fs.rmSync(dir, { recursive: true, force: true });
    stack.clearLocks();
    return res;
  }

  before(async () => {
    h1 = lab().hosts[0];
    h3 = lab().hosts[2];
    for (const h of [h1, h3]) await installWriter(h, app, mountPath);
    stack = new Stack("undo-reboots", "volumes");
    await stack.init();
  });

  it("a move host-1 -> host-3 dies after the final backup (host-1 fenced, read-only)", async () => {
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    await onHost(h1, `mkdir -p ${mountPath}/d && for i in $(seq 1 40); do head -c $((i * 999)) /dev/urandom > ${mountPath}/d/f-$i; done; systemctl start ${app}; sync`);
    firstToken = (await labLease(prefix, volumeId))!.lease.token;
    const killed = await stack.run(["up", "--yes", "--skip-preview"], { input: input(2), env: { DBOXED_VOLUMES_FAULT: "after-final-backup" } });
    expect(killed.code).to.not.equal(0);
    stack.clearLocks();
    expect(await mounts([h1, h3], mountPath)).to.deep.equal(["ro", "unmounted"]);
    data = await dataOnly(h1);
  });

  it("host set back: the undo is cut off by a reboot of host-3 while it is being cleaned", async () => {
    await undoPausedAt("undo-before-teardown", () => rebootHost(h3));
    expect((await labLease(prefix, volumeId))!.lease.move?.undoing, "the undo was recorded before anything was removed").to.equal(true);
    expect(await mounts([h1, h3], mountPath)).to.deep.equal(["ro", "unmounted"]);
  });

  it("again: the undo is cut off by a reboot of host-1 before it is given back (it comes back fenced: read-only)", async () => {
    await undoPausedAt("undo-before-give-back", () => rebootHost(h1));
    expect(await mounts([h1, h3], mountPath)).to.deep.equal(["ro", "unmounted"]);
    expect((await onHost(h1, `systemctl is-active dboxed-volume-${volumeId}-backup.timer ${app} || true`)).stdout.trim().split("\n"))
      .to.deep.equal(["inactive", "inactive"]);
  });

  it("the next pulumi up finishes the undo: host-1 read-write, scheduled, its application running, data intact; host-3 clean", async () => {
    const preview = await stack.preview(input(0));
    expect(preview.stdout, "the unfinished undo is work for the next up").to.match(/1 to update/);
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(await mounts([h1, h3], mountPath)).to.deep.equal(["rw", "unmounted"]);
    expect((await onHost(h1, `systemctl is-active dboxed-volume-${volumeId}-backup.timer ${app}`)).stdout.trim().split("\n")).to.deep.equal(["active", "active"]);
    expect(await dataOnly(h1)).to.deep.equal(data);
    await clean(h3, volumeId, mountPath);
    const l = (await labLease(prefix, volumeId))!.lease;
    expect(l.move).to.equal(undefined);
    expect(l.token).to.equal(firstToken);
    const b = await onHost(h1, `systemctl start dboxed-volume-${volumeId}-backup.service && cat /var/lib/dboxed-volumes/${volumeId}/status.json`);
    expect(JSON.parse(b.stdout).status).to.equal("ok");
    const again = await stack.run(["preview", "--expect-no-changes"], { input: input(0) });
    expect(again.code, again.stdout + again.stderr).to.equal(0);
  });

  it("a move cut off once restored and verified, its old host then unfenced by hand and written to: the next run takes a new final backup, nothing is lost", async () => {
    await onHost(h1, `systemctl stop ${app}`);
    const killed = await stack.run(["up", "--yes", "--skip-preview"], { input: input(2), env: { DBOXED_VOLUMES_FAULT: "after-restored" } });
    expect(killed.code).to.not.equal(0);
    stack.clearLocks();
    expect((await labLease(prefix, volumeId))!.lease.move?.phase).to.equal("restored");
    // What an operator might do by hand: lift the fence and write.
    await onHost(h1, `rm -f /etc/dboxed-volumes/${volumeId}/fenced /etc/systemd/system/*.d/dboxed-fence-${volumeId}.conf
systemctl daemon-reload; mount -o remount,rw ${mountPath}; echo "by hand" > ${mountPath}/d/by-hand; sync`);
    const res = await stack.up(input(2));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(res.stdout).to.match(/no longer fenced .*taking a new one/);
    expect(await mounts([h1, h3], mountPath)).to.deep.equal(["unmounted", "rw"]);
    expect((await onHost(h3, `cat ${mountPath}/d/by-hand`)).stdout.trim(), "the write made by hand moved with the volume").to.equal("by hand");
    await clean(h1, volumeId, mountPath);
  });

  after(async () => {
    if (stack) await stack.run(["destroy", "--yes", "--skip-preview"]);
  });
});
