// A move that stops after the old host went read-only can be undone by setting host back, and
// finished later: a verification mismatch (the staging tree corrupted by the test while the
// provider waits after the final restore) stops the move; the outputs name the unfinished move;
// host set back gives the volume back to the old host (read-write, its service running, data
// intact, the new host clean, the lease without move and with the old host's token); then the
// move forward succeeds. Both hosts' mount options are checked at every step.
import { expect } from "chai";
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { installHeartbeat, lab, labLease, onHost, Stack, stepByStep } from "./harness";
import { manifest, Manifest } from "./manifest";
import type { LabHost } from "../../lab/lab";

const prefix = `undo-${crypto.randomBytes(3).toString("hex")}`;
const volumeId = `un-${crypto.randomBytes(3).toString("hex")}`;
const mountPath = "/srv/undo";
const service = `app-${volumeId}.service`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** "rw", "ro" or "unmounted": how mountPath is mounted on h. */
async function mountState(h: LabHost): Promise<string> {
  const r = await onHost(h, `findmnt -n -o OPTIONS --mountpoint ${mountPath} | tr ',' '\\n' | grep -x -m1 'r[ow]' || echo unmounted`);
  return r.stdout.trim();
}

async function neverTwoWriters(h1: LabHost, h2: LabHost) {
  const states = [await mountState(h1), await mountState(h2)];
  expect(states.filter((s) => s === "rw").length, `mounts: ${states.join(", ")}`).to.be.at.most(1);
  return states;
}

const lease = () => labLease(prefix, volumeId);

describe("undoing a move by setting host back (real pulumi, lab hosts)", function () {
  let stack: Stack;
  stepByStep(this, () => stack.run(["destroy", "--yes", "--skip-preview"]));
  let h1: LabHost, h2: LabHost;
  let data: Manifest["entries"];
  let firstToken = "";
  const input = (host: number) => ({
    provider: { s3: { prefix } },
    volumes: [{ name: "u", host, args: { volumeId, size: "128MiB", mountPath, backupSchedule: "hourly", stopUnits: [service] } }],
  });
  const dataOnly = async (h: LabHost) => {
    const m = await manifest(h, `${mountPath}/data`);
    return m.entries;
  };

  before(async () => {
    [h1, h2] = lab().hosts;
    // The application: keeps a heartbeat file on the volume while it runs.
    for (const h of [h1, h2]) await installHeartbeat(h, service, mountPath);
    stack = new Stack("undo", "volumes");
    await stack.init();
  });

  it("creates the volume on host-1 with data and its service running", async () => {
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    await onHost(h1, `set -e; mkdir -p ${mountPath}/data/sub; for i in $(seq 1 30); do head -c $((i * 3000)) /dev/urandom > ${mountPath}/data/f-$i; done
echo kept > ${mountPath}/data/sub/kept.txt; systemctl start ${service}; sync`);
    data = await dataOnly(h1);
    expect(Object.keys(data).length).to.be.greaterThan(30);
    firstToken = (await lease())!.lease.token;
    expect(await neverTwoWriters(h1, h2)).to.deep.equal(["rw", "unmounted"]);
  });

  it("a move whose verification fails stops with the old host read-only; the outputs name the unfinished move", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "undo-pause-"));
    let finished = false;
    const run = stack.run(["up", "--yes", "--skip-preview"], { input: input(1), env: { DBOXED_VOLUMES_PAUSE: `after-final-restore:${dir}` } })
      .then((r) => { finished = true; return r; });
    for (let i = 0; i < 600 && !fs.existsSync(path.join(dir, "paused")) && !finished; i++) await sleep(500);
    expect(fs.existsSync(path.join(dir, "paused")), "the provider paused after the final restore").to.equal(true);
    // While paused: the old host is read-only with its service stopped, the new one only has a staging mount.
    expect(await neverTwoWriters(h1, h2)).to.deep.equal(["ro", "unmounted"]);
    // Same size, same mtime, one byte changed ("kept" -> "Kept"): only a hash of the content sees it.
    await onHost(h2, `f=/run/dboxed-volumes/${volumeId}/staging/data/sub/kept.txt; touch -r "$f" /run/kept.ref
printf K | dd of="$f" bs=1 seek=0 conv=notrunc status=none; touch -m -r /run/kept.ref "$f"; rm /run/kept.ref; sync; cat "$f"`);
    fs.writeFileSync(path.join(dir, "resume"), "");
    const res = await run;
    expect(res.code, res.stdout + res.stderr).to.not.equal(0);
    expect(res.stdout + res.stderr).to.match(/differs from the final state/, res.stdout + res.stderr);
    expect(res.stdout + res.stderr).to.match(/kept\.txt: sha256 [0-9a-f]{64} != [0-9a-f]{64}\s/, "only the content differs");
    expect(res.stdout + res.stderr).to.match(/set host back to .* to undo it/, res.stdout + res.stderr);
    // The resource's outputs in state (a failed update does not update the stack's outputs).
    const o = await stack.resourceOutputs("u");
    expect(o.unfinishedMove.phase).to.be.oneOf(["warm", "final-backup"]);
    expect(o.unfinishedMove.from).to.equal(`127.0.0.1:${h1.port}`);
    expect(o.unfinishedMove.to).to.equal(`127.0.0.1:${h2.port}`);
    expect(o.unfinishedMove.reason).to.match(/differs/);
    expect(await neverTwoWriters(h1, h2)).to.deep.equal(["ro", "unmounted"]);
    const active = await onHost(h1, `systemctl is-active ${service} || true`);
    expect(active.stdout.trim()).to.not.equal("active");
    // The state holds the old host's connection as a secret only.
    expect(stack.stateText()).to.not.include(fs.readFileSync(h1.privateKeyPath, "utf8").split("\n")[1]);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("a preview shows the pending work; host set back undoes the move: old host read-write, service running, data intact, new host clean, lease clean", async () => {
    const preview = await stack.preview(input(0));
    expect(preview.code, preview.stdout + preview.stderr).to.equal(0);
    expect(preview.stdout).to.match(/~ .*update|1 to update/);
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(res.stdout).to.match(/undoing the move/);
    expect(await neverTwoWriters(h1, h2)).to.deep.equal(["rw", "unmounted"]);
    expect((await onHost(h1, `systemctl is-active ${service}`)).stdout.trim()).to.equal("active");
    await sleep(2500);
    const beat = await onHost(h1, `echo $(( $(date +%s) - $(stat -c %Y ${mountPath}/heartbeat) ))`);
    expect(Number(beat.stdout.trim()), "the service writes to the volume again").to.be.lessThan(5);
    expect(await dataOnly(h1)).to.deep.equal(data);
    const left = await onHost(h2, `ls /etc/systemd/system | grep -c dboxed-volume-${volumeId} || true
mountpoint -q /run/dboxed-volumes/${volumeId}/staging && echo STAGING || echo no-staging
vgs dbv-${volumeId} >/dev/null 2>&1 && echo VG || echo no-vg
ls -d /var/lib/dboxed-volumes/${volumeId} /etc/dboxed-volumes/${volumeId} 2>/dev/null | wc -l`);
    expect(left.stdout.trim().split("\n")).to.deep.equal(["0", "no-staging", "no-vg", "0"]);
    const l = (await lease())!.lease;
    expect(l.move).to.equal(undefined);
    expect(l.holder.port).to.equal(h1.port);
    expect(l.token).to.equal(firstToken);
    const o = (await stack.outputs()).volumes.u;
    expect(o.unfinishedMove).to.deep.equal({});
    // The old host's backups pass the lease check again.
    const b = await onHost(h1, `systemctl start dboxed-volume-${volumeId}-backup.service && cat /var/lib/dboxed-volumes/${volumeId}/status.json`);
    expect(JSON.parse(b.stdout).status).to.equal("ok");
    const again = await stack.preview(input(0));
    expect(again.stdout).to.not.match(/to update/);
  });

  it("then the move forward succeeds with the data intact", async () => {
    await onHost(h1, `systemctl stop ${service}`);
    data = await dataOnly(h1);
    const res = await stack.up(input(1));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(await neverTwoWriters(h1, h2)).to.deep.equal(["unmounted", "rw"]);
    expect(await dataOnly(h2)).to.deep.equal(data);
    const o = (await stack.outputs()).volumes.u;
    expect(o.unfinishedMove).to.deep.equal({});
    expect(o.pendingCleanup).to.deep.equal({});
    expect((await lease())!.lease.move).to.equal(undefined);
  });

  it("destroy stops the volume's service (a stopUnit, writing every second) for the final backup and removes it", async () => {
    await onHost(h2, `systemctl start ${service}`);
    expect((await onHost(h2, `systemctl is-active ${service}`)).stdout.trim()).to.equal("active");
    const res = await stack.run(["destroy", "--yes", "--skip-preview"]);
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(res.stdout).to.match(new RegExp(`stopping ${service}`));
    expect((await onHost(h2, `systemctl is-active ${service} || true`)).stdout.trim()).to.not.equal("active");
    expect(await neverTwoWriters(h1, h2)).to.deep.equal(["unmounted", "unmounted"]);
  });
});
