// A move killed at each of its steps (the provider process dies, as with a killed pulumi or a
// lost connection), then `pulumi up` again: the move completes with an identical manifest, the
// old host is clean, and at no moment were both hosts mounted read-write. Killed after the final
// backup, the old host is also rebooted: it comes back fenced (read-only, no timer, no backups).
// Killed before the old host's cleanup, the old host is then lost (frozen): the next update
// completes and flags the pending cleanup; with the host back, the one after cleans it.
import { expect } from "chai";
import * as crypto from "crypto";
import { lab, onHost, rebootHost, Stack, stepByStep } from "./harness";
import { manifest, Manifest } from "./manifest";
import { freezeHost } from "../../lab/lab";
import type { LabHost } from "../../lab/lab";

const prefix = `mvf-${crypto.randomBytes(3).toString("hex")}`;
const volumeId = `mvf-${crypto.randomBytes(3).toString("hex")}`;
const mountPath = "/srv/faulty";

/** Polls both hosts while fn runs; returns how often both had the volume mounted read-write. */
async function watchDoubleMount<T>(a: LabHost, b: LabHost, fn: () => Promise<T>): Promise<{ result: T; both: number; samples: number }> {
  let stop = false;
  let both = 0, samples = 0;
  const rw = async (h: LabHost) => (await onHost(h, `findmnt -n -o OPTIONS ${mountPath} 2>/dev/null | cut -d, -f1 || true`, { allowFailure: true })).stdout.trim() === "rw";
  const poller = (async () => {
    while (!stop) {
      try {
        const [x, y] = await Promise.all([rw(a), rw(b)]);
        samples++;
        if (x && y) both++;
      } catch { /* a host busy or a connection cut: skip the sample */ }
      await new Promise((r) => setTimeout(r, 1000));
    }
  })();
  try {
    const result = await fn();
    return { result, both, samples };
  } finally {
    stop = true;
    await poller;
  }
}

describe("a move killed at each step resumes (real pulumi, lab hosts)", function () {
  stepByStep(this);
  let stack: Stack;
  let reference: Manifest;
  let frozen: string | undefined;
  const input = (host: number) => ({
    provider: { s3: { prefix } },
    // Cold moves: the warm phase is covered by move.test.ts and final.test.ts; here the fault points matter.
    volumes: [{ name: "f", host, args: { volumeId, size: "128MiB", mountPath, backupSchedule: "hourly", warmMove: false } }],
  });

  it("creates the volume with data on host-1", async () => {
    stack = new Stack("move-faults", "volumes");
    await stack.init();
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const h = lab().hosts[0];
    await onHost(h, `set -e; cd ${mountPath}; mkdir -p a/b; for i in $(seq 1 300); do head -c $((i * 100)) /dev/urandom > a/f-$i; done
head -c 15000000 /dev/urandom > a/b/big; echo x > hl && ln hl a/hl2; ln -s a/b/big sym; setfattr -n user.t -v 1 a/f-1; sync`);
    reference = await manifest(h, mountPath);
  });

  const plan: [string, number, number][] = [
    ["after-final-backup", 0, 1], ["during-final-restore", 1, 2], ["after-final-restore", 2, 0], ["before-old-cleanup", 0, 1],
  ];
  for (const [fault, from, to] of plan) {
    it(`killed ${fault} (host-${from + 1} -> host-${to + 1}), then pulumi up again: the move completes`, async () => {
      const [a, b] = [lab().hosts[from], lab().hosts[to]];
      const watched = await watchDoubleMount(a, b, async () => {
        const killed = await stack.run(["up", "--yes", "--skip-preview"], { input: input(to), env: { DBOXED_VOLUMES_FAULT: fault } });
        expect(killed.code, "the faulty run should fail").to.not.equal(0);
        if (fault === "after-final-backup") {
          // The old host reboots while fenced: it must come back read-only, unscheduled, unable to back up.
          await rebootHost(a);
          const state = await onHost(a, `findmnt -n -o OPTIONS --mountpoint ${mountPath} | cut -d, -f1
systemctl is-active dboxed-volume-${volumeId}-backup.timer || true
systemctl start dboxed-volume-${volumeId}-backup.service 2>/dev/null && echo BACKED-UP || echo refused
cat /var/lib/dboxed-volumes/${volumeId}/last-error 2>/dev/null || true`);
          const [mode, timer, backup, why] = state.stdout.trim().split("\n");
          expect([mode, timer, backup]).to.deep.equal(["ro", "inactive", "refused"]);
          expect(why).to.match(/fenced for a move|no longer holds/);
          const write = await onHost(a, `echo x > ${mountPath}/after-reboot 2>&1 && echo WROTE || echo refused`);
          expect(write.stdout.trim()).to.match(/refused$/);
        }
        if (fault === "before-old-cleanup") {
          // The old host is gone (frozen) after the switch: the update completes and flags the cleanup.
          await freezeHost(lab().dir, a.name, true);
          frozen = a.name;
          const dead = await stack.up(input(to));
          expect(dead.code, dead.stdout + dead.stderr).to.equal(0);
          expect(dead.stdout).to.match(/cannot be reached/);
          const o = (await stack.outputs()).volumes.f;
          expect(o.pendingCleanup.host).to.equal(`127.0.0.1:${a.port}`);
          expect(o.unfinishedMove).to.deep.equal({});
          const preview = await stack.preview(input(to));
          expect(preview.stdout, "the pending cleanup is work for the next up").to.match(/1 to update/);
          await freezeHost(lab().dir, a.name, false);
          frozen = undefined;
          await onHost(a, `date -s @${Math.floor(Date.now() / 1000)} >/dev/null`);
          const fenced = await onHost(a, `findmnt -n -o OPTIONS --mountpoint ${mountPath} | cut -d, -f1; systemctl is-active dboxed-volume-${volumeId}-backup.timer || true`);
          expect(fenced.stdout.trim().split("\n"), "the old host, back, is still fenced").to.deep.equal(["ro", "inactive"]);
        }
        const again = await stack.up(input(to));
        expect(again.code, again.stdout + again.stderr).to.equal(0);
        expect(again.stdout).to.match(/resuming the move/);
        expect((await stack.outputs()).volumes.f.pendingCleanup).to.deep.equal({});
        return again;
      });
      expect(watched.samples).to.be.greaterThan(5);
      expect(watched.both, "both hosts had the volume mounted read-write").to.equal(0);
      const after = await manifest(b, mountPath);
      expect(after.entries).to.deep.equal(reference.entries);
      expect(after.xattrs).to.equal(reference.xattrs);
      const left = await onHost(a, `vgs dbv-${volumeId} >/dev/null 2>&1 && echo VG || echo no-vg; mountpoint -q ${mountPath} && echo MOUNTED || echo unmounted`);
      expect(left.stdout.trim().split("\n")).to.deep.equal(["no-vg", "unmounted"]);
    });
  }

  after(async () => {
    if (frozen) await freezeHost(lab().dir, frozen, false);
    if (stack) await stack.run(["destroy", "--yes", "--skip-preview"]);
  });
});
