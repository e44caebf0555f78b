// Runs cut off the way they are in real life (real pulumi, lab hosts):
// 1. A cancelled CI job: only pulumi's process group is killed during a move's final backup; the
//    provider runs on and finishes the move. The change is reverted; pulumi up says where the
//    volume lives and how to keep it there; following it leaves one host read-write with all the
//    data and the other clean, and a refresh then a preview --expect-no-changes pass.
// 2. A delete cut off (pulumi and its provider killed) after it stopped the volume for its final
//    backup, then the change reverted: the next pulumi up gives the volume back read-write,
//    scheduled, its application running, data intact.
import { expect } from "chai";
import * as crypto from "crypto";
import { installHeartbeat, lab, labLease, onHost, Stack, stepByStep } from "./harness";
import { manifest, Manifest } from "./manifest";
import type { LabHost } from "../../lab/lab";

const prefix = `co-${crypto.randomBytes(3).toString("hex")}`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function mode(h: LabHost, mountPath: string): Promise<string> {
  return (await onHost(h, `findmnt -n -o OPTIONS --mountpoint ${mountPath} | tr ',' '\\n' | grep -x -m1 'r[ow]' || echo unmounted`)).stdout.trim();
}

/** Waits on h until the volume's final backup was asked for (the provider wrote its nonce): the volume is read-only then. */
async function untilFinalBackup(h: LabHost, volumeId: string): Promise<void> {
  const r = await onHost(h, `for i in $(seq 1 6000); do [ -e /var/lib/dboxed-volumes/${volumeId}/final-request ] && { echo seen; exit 0; }; sleep 0.1; done; echo never`,
    { timeoutMs: 900_000 });
  expect(r.stdout.trim(), "the final backup started").to.equal("seen");
}

describe("a cancelled CI job mid-move, then the change reverted (real pulumi, lab hosts)", function () {
  const volumeId = `cc-${crypto.randomBytes(3).toString("hex")}`;
  const mountPath = "/srv/cancelled";
  let stack: Stack;
  let h1: LabHost, h2: LabHost;
  let reference: Manifest;
  stepByStep(this, () => stack.run(["destroy", "--yes", "--skip-preview"]));
  const input = (host: number) => ({
    provider: { s3: { prefix } },
    volumes: [{ name: "c", host, args: { volumeId, size: "64MiB", mountPath, backupSchedule: "hourly" } }],
  });

  before(async () => {
    [h1, h2] = lab().hosts;
    stack = new Stack("cancelled", "volumes");
    await stack.init();
  });

  it("creates the volume on host-1 with data", async () => {
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    await onHost(h1, `set -e; mkdir -p ${mountPath}/d; for i in $(seq 1 50); do head -c $((i * 1500)) /dev/urandom > ${mountPath}/d/f-$i; done; ln -s f-1 ${mountPath}/d/l; sync`);
    reference = await manifest(h1, mountPath);
  });

  it("host-2: the CLI's process group is killed during the final backup; its provider finishes the move", async () => {
    const run = stack.start(["up", "--yes", "--skip-preview"], { input: input(1) });
    await untilFinalBackup(h1, volumeId);
    expect(run.running()).to.equal(true);
    run.kill("cli");
    await run.done;
    let done = false;
    for (let i = 0; i < 600 && !done; i++) {
      const l = (await labLease(prefix, volumeId))?.lease;
      done = !!l && l.holder.port === h2.port && !l.move;
      if (!done) await sleep(1000);
    }
    expect(done, "the orphaned provider finished the move").to.equal(true);
    run.reap();
    stack.clearLocks();
    expect([await mode(h1, mountPath), await mode(h2, mountPath)]).to.deep.equal(["unmounted", "rw"]);
  });

  it("the change reverted (host-1): pulumi up says the volume lives on host-2 and how to keep it there", async () => {
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.not.equal(0);
    expect(res.stdout + res.stderr).to.match(new RegExp(`lives on 127\\.0\\.0\\.1:${h2.port} now.*Set host to 127\\.0\\.0\\.1:${h2.port}`));
    expect([await mode(h1, mountPath), await mode(h2, mountPath)]).to.deep.equal(["unmounted", "rw"]);
  });

  it("following it: one host read-write with all the data, the other clean; refresh, then preview --expect-no-changes", async () => {
    const res = await stack.up(input(1));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect([await mode(h1, mountPath), await mode(h2, mountPath)]).to.deep.equal(["unmounted", "rw"]);
    const now = await manifest(h2, mountPath);
    expect(now.entries).to.deep.equal(reference.entries);
    const left = await onHost(h1, `vgs dbv-${volumeId} >/dev/null 2>&1 && echo VG || echo no-vg; ls -d /etc/dboxed-volumes/${volumeId} 2>/dev/null | wc -l`);
    expect(left.stdout.trim().split("\n")).to.deep.equal(["no-vg", "0"]);
    const refresh = await stack.run(["refresh", "--yes", "--skip-preview"]);
    expect(refresh.code, refresh.stdout + refresh.stderr).to.equal(0);
    const preview = await stack.run(["preview", "--expect-no-changes"], { input: input(1) });
    expect(preview.code, preview.stdout + preview.stderr).to.equal(0);
  });

  after(async () => {
    if (stack) await stack.run(["destroy", "--yes", "--skip-preview"]);
  });
});

describe("a delete cut off, then reverted: the volume is given back (real pulumi, lab hosts)", function () {
  const volumeId = `cd-${crypto.randomBytes(3).toString("hex")}`;
  const mountPath = "/srv/undeleted";
  const app = `app-${volumeId}.service`;
  let stack: Stack;
  let h: LabHost;
  let data: Manifest["entries"];
  stepByStep(this, () => stack.run(["destroy", "--yes", "--skip-preview"]));
  const input = (declared: boolean) => ({
    provider: { s3: { prefix } },
    volumes: declared ? [{ name: "d", host: 2, args: { volumeId, size: "64MiB", mountPath, backupSchedule: "hourly", stopUnits: [app] } }] : [],
  });

  before(async () => {
    h = lab().hosts[2];
    await installHeartbeat(h, app, mountPath);
    stack = new Stack("cut-delete", "volumes");
    await stack.init();
  });

  it("creates the volume on host-3 with data and its application running", async () => {
    const res = await stack.up(input(true));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    await onHost(h, `set -e; mkdir -p ${mountPath}/d; for i in $(seq 1 30); do head -c $((i * 2000)) /dev/urandom > ${mountPath}/d/f-$i; done; systemctl start ${app}; sync`);
    data = (await manifest(h, `${mountPath}/d`)).entries;
  });

  it("the Volume removed from the program: the delete is cut off (pulumi and its provider killed) during its final backup", async () => {
    const run = stack.start(["up", "--yes", "--skip-preview"], { input: input(false) });
    await untilFinalBackup(h, volumeId);
    run.kill("all");
    await run.done;
    run.reap();
    stack.clearLocks();
    await sleep(2000);
    expect(await mode(h, mountPath)).to.equal("ro");
    expect((await onHost(h, `systemctl is-active dboxed-volume-${volumeId}-backup.timer ${app} || true`)).stdout.trim().split("\n"))
      .to.deep.equal(["inactive", "inactive"]);
    expect((await labLease(prefix, volumeId))!.lease.deleting, "the delete was recorded before the volume stopped").to.not.equal(undefined);
  });

  it("the change reverted: preview shows the repair; pulumi up gives the volume back read-write, scheduled, its application running", async () => {
    const preview = await stack.preview(input(true));
    expect(preview.stdout).to.match(/1 to update/);
    const res = await stack.up(input(true));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(res.stdout).to.match(/a delete of .* was cut off/);
    expect(await mode(h, mountPath)).to.equal("rw");
    expect((await onHost(h, `systemctl is-active dboxed-volume-${volumeId}-backup.timer ${app}`)).stdout.trim().split("\n")).to.deep.equal(["active", "active"]);
    await sleep(2500);
    const beat = await onHost(h, `echo $(( $(date +%s) - $(stat -c %Y ${mountPath}/heartbeat) ))`);
    expect(Number(beat.stdout.trim()), "the application writes to the volume again").to.be.lessThan(5);
    expect((await manifest(h, `${mountPath}/d`)).entries).to.deep.equal(data);
    expect((await labLease(prefix, volumeId))!.lease.deleting).to.equal(undefined);
    const b = await onHost(h, `systemctl start dboxed-volume-${volumeId}-backup.service && cat /var/lib/dboxed-volumes/${volumeId}/status.json`);
    expect(JSON.parse(b.stdout).status, "periodic backups (not final ones) again").to.equal("ok");
    expect(JSON.parse(b.stdout).finalRequest).to.equal("");
    const again = await stack.run(["preview", "--expect-no-changes"], { input: input(true) });
    expect(again.code, again.stdout + again.stderr).to.equal(0);
  });

  after(async () => {
    if (stack) await stack.run(["destroy", "--yes", "--skip-preview"]);
  });
});
