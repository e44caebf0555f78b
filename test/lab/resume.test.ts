// Resumability: SSH connections cut during `pulumi up`, and the CLI itself killed; the next
// `pulumi up` converges to one healthy volume with nothing left over.
import { expect } from "chai";
import * as crypto from "crypto";
import { lab, onHost, Stack, stepByStep } from "./harness";
import { manifest } from "./manifest";

describe("resuming after interruptions (real pulumi, lab host)", function () {
  stepByStep(this);
  const volumeId = `res-${crypto.randomBytes(3).toString("hex")}`;
  const prefix = `res-${crypto.randomBytes(3).toString("hex")}`;
  const mountPath = "/srv/resume";
  const input = (host = 2) => ({ provider: { s3: { prefix } }, volumes: [{ name: "r", host, args: { volumeId, size: "64MiB", mountPath, backupSchedule: "hourly" } }] });
  let stack: Stack;

  /**
   * Kills every SSH session on the host (not sshd itself) once the volume's loop device appears,
   * then again once it is mounted: keyed to the provider's progress on the host, not to a clock
   * (on a busy machine the CLI may take longer to connect than any fixed delay). The cutter gives
   * up after 10 minutes; stopCuts ends it before the host is examined.
   */
  async function cutSshAtProgress(hostIndex: number) {
    const h = lab().hosts[hostIndex];
    await onHost(h, `systemd-run --quiet --unit=cut-ssh-${volumeId} bash -c '
for probe in "losetup -a | grep -q ${volumeId}" "findmnt -n ${mountPath}"; do
  for i in $(seq 3000); do sh -c "$probe" >/dev/null 2>&1 && break; sleep 0.2; done
  sleep 0.5; pkill -KILL -f "^sshd: root@"
done'`);
  }

  async function stopCuts(hostIndex: number) {
    await onHost(lab().hosts[hostIndex], `systemctl stop cut-ssh-${volumeId} 2>/dev/null; true`);
  }

  async function healthy(hostIndex: number) {
    const h = lab().hosts[hostIndex];
    const r = await onHost(h, `vgs --noheadings -o vg_name | grep -c dbv-${volumeId}; findmnt -n -o FSTYPE ${mountPath}
systemctl is-active dboxed-volume-${volumeId}-backup.timer; ls /usr/local/lib/dboxed-volumes /etc/dboxed-volumes/${volumeId} | grep -c tmp || true
losetup -a | grep -c ${volumeId}`);
    expect(r.stdout.trim().split("\n")).to.deep.equal(["1", "ext4", "active", "0", "1"]);
  }

  it("create cut off twice by lost SSH connections converges on the next pulumi up", async () => {
    stack = new Stack("resume", "volumes");
    await stack.init();
    await cutSshAtProgress(2);
    const first = await stack.up(input());
    expect(first.code, "the first up should have lost its connection").to.not.equal(0);
    let last = first;
    for (let i = 0; i < 3 && last.code !== 0; i++) last = await stack.up(input());
    await stopCuts(2);
    expect(last.code, last.stdout + last.stderr).to.equal(0);
    await healthy(2);
    const o = (await stack.outputs()).volumes.r;
    expect(o.lastBackupStatus).to.equal("ok");
  });

  it("a pulumi CLI killed during a delete-and-recreate converges, data intact", async () => {
    const h = lab().hosts[2];
    await onHost(h, `mkdir -p ${mountPath}/d && head -c 2000000 /dev/urandom > ${mountPath}/d/blob && echo hi > ${mountPath}/d/t`);
    const before = await manifest(h, mountPath);
    // A filesystem change is a rebuild in place: final backup, teardown, new storage, restore (resumable through the lease).
    const run = stack.start(["up", "--yes", "--skip-preview"], { input: { ...input(), volumes: [{ ...input().volumes[0], args: { ...input().volumes[0].args, filesystem: "xfs", size: "320MiB" } }] } });
    // Killed in the middle, keyed to the host (a fixed delay was outrun once the lab got faster):
    // as soon as the old ext4 storage is gone (torn down after the final backup), before the new
    // xfs one holds the data again. Only the CLI: its provider is left working, as after a killed terminal.
    const seen = await onHost(h, `for i in $(seq 1 3000); do t=$(blkid -p -o value -s TYPE /dev/dbv-${volumeId}/data 2>/dev/null || true)
[ "$t" = ext4 ] || { echo "gone"; exit 0; }; sleep 0.1; done; echo "still ext4"`, { timeoutMs: 600_000 });
    expect(seen.stdout.trim()).to.equal("gone");
    expect(run.running(), "pulumi still runs when the old storage is gone").to.equal(true);
    run.kill("cli");
    const killed = await run.done;
    expect(killed.code, "pulumi was killed").to.not.equal(0);
    // What a user does after a killed pulumi: release its lock, drop the creates it left pending.
    stack.clearLocks();
    const refresh = await stack.run(["refresh", "--yes", "--skip-preview", "--clear-pending-creates"]);
    expect(refresh.code, refresh.stdout + refresh.stderr).to.equal(0);
    let last = killed;
    for (let i = 0; i < 3 && last.code !== 0; i++) {
      last = await stack.run(["up", "--yes", "--skip-preview"], { input: { ...input(), volumes: [{ ...input().volumes[0], args: { ...input().volumes[0].args, filesystem: "xfs", size: "320MiB" } }] } });
    }
    expect(last.code, last.stdout + last.stderr).to.equal(0);
    const fs = await onHost(h, `findmnt -n -o FSTYPE ${mountPath}`);
    expect(fs.stdout.trim()).to.equal("xfs");
    expect((await manifest(h, mountPath)).entries).to.deep.equal(before.entries);
    run.reap();
  });

  after(async () => {
    await stopCuts(2);
    if (stack) await stack.run(["destroy", "--yes", "--skip-preview"]);
  });
});
