// Moves killed at random moments (not only at the named fault points of movefaults.test.ts):
// each move's `pulumi up` is killed with SIGKILL at a random time, and so are the four runs that
// resume it; then `pulumi up` runs until it converges, and again for the next move, until 10
// kills. Some kills take the whole process group (a lost machine), others only the CLI: the
// killed run's provider goes on working while the next `pulumi up` starts at once, and must wait
// for its locks (no staging restore over live data). After each move the data is identical; at
// no moment were two hosts mounted read-write. The seed is printed; DBOXED_TEST_SEED=<n> replays it.
import { expect } from "chai";
import * as crypto from "crypto";
import { lab, onHost, Stack, stepByStep } from "./harness";
import { manifest, Manifest } from "./manifest";
import type { LabHost } from "../../lab/lab";

const prefix = `kill-${crypto.randomBytes(3).toString("hex")}`;
const volumeId = `kl-${crypto.randomBytes(3).toString("hex")}`;
const mountPath = "/srv/killed";
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A small deterministic generator (mulberry32), so a failing run can be replayed from its seed. */
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe("moves killed at random moments converge (real pulumi, lab hosts)", function () {
  let stack: Stack;
  stepByStep(this, () => stack.run(["destroy", "--yes", "--skip-preview"]));
  const seed = Number(process.env.DBOXED_TEST_SEED ?? crypto.randomBytes(4).readUInt32LE(0));
  const rnd = random(seed);
  let reference: Manifest;
  let hosts: LabHost[];
  let kills = 0;
  let doubleMounts = 0;
  let samples = 0;
  let polling = true;
  let poller: Promise<void> | undefined;
  const input = (host: number) => ({
    provider: { s3: { prefix } },
    volumes: [{ name: "k", host, args: { volumeId, size: "64MiB", mountPath, backupSchedule: "hourly" } }],
  });

  before(async () => {
    hosts = lab().hosts;
    process.stderr.write(`[kills] seed ${seed} (DBOXED_TEST_SEED=${seed} replays it)\n`);
    stack = new Stack("kills", "volumes");
    await stack.init();
  });

  it("creates the volume with data on host-1", async () => {
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    await onHost(hosts[0], `set -e; cd ${mountPath}; mkdir -p d/e; for i in $(seq 1 60); do head -c $((i * 700)) /dev/urandom > d/f-$i; done
head -c 2000000 /dev/urandom > d/e/big; ln d/f-1 d/e/hl; ln -s ../f-2 d/e/sym; setfattr -n user.k -v v d/f-3; sync`);
    reference = await manifest(hosts[0], mountPath);
    // Both hosts' mounts, sampled every second for the rest of the story.
    const rw = async (h: LabHost) => (await onHost(h, `findmnt -n -o OPTIONS ${mountPath} 2>/dev/null | cut -d, -f1 || true`, { allowFailure: true })).stdout.trim() === "rw";
    poller = (async () => {
      while (polling) {
        try {
          const states = await Promise.all(hosts.map(rw));
          samples++;
          if (states.filter(Boolean).length > 1) doubleMounts++;
        } catch { /* a host busy or rebooting: skip the sample */ }
        await sleep(1000);
      }
    })();
  });

  it("moves (host-1 -> 2 -> 3 ...) each killed five times at random moments, then converged with the data intact, until 10 kills", async () => {
    const orphans: (() => void)[] = [];
    for (let i = 0, to = 1; kills < 10 && i < 8; i++, to = (to + 1) % hosts.length) {
      for (let k = 0; k < 5; k++) {
        // Some kills leave the killed run's provider working: the next run starts at once and must wait for it.
        const mode: "all" | "cli" = (i + k) % 3 === 1 ? "cli" : "all";
        const at = 3 + rnd() * 20;
        const run = stack.start(["up", "--yes", "--skip-preview"], { input: input(to) });
        const t0 = Date.now();
        while (run.running() && Date.now() - t0 < at * 1000) await sleep(200);
        if (run.running()) {
          run.kill(mode);
          kills++;
          process.stderr.write(`[kills] move ${i + 1}: killed (${mode}) after ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
        }
        await run.done;
        // As pulumi's own message tells a user after a killed run.
        stack.clearLocks();
        if (mode === "all") run.reap();
        else orphans.push(run.reap); // its provider finishes its work meanwhile
      }
      let res = await stack.up(input(to));
      for (let tries = 0; res.code !== 0 && tries < 3; tries++) {
        // A run may fail while a killed run's provider still holds a lock; it names it.
        expect(res.stdout + res.stderr).to.match(/another operation|waiting for|lease|locked|resuming|pending/i);
        stack.clearLocks();
        res = await stack.up(input(to));
      }
      expect(res.code, res.stdout + res.stderr).to.equal(0);
      orphans.splice(0).forEach((reap) => reap()); // their locks were released: their work is over
      const now = await manifest(hosts[to], mountPath);
      expect(now.entries, `the data after move ${i + 1}`).to.deep.equal(reference.entries);
      expect(now.xattrs).to.equal(reference.xattrs);
      for (const [j, h] of hosts.entries()) {
        if (j === to) continue;
        const left = await onHost(h, `mountpoint -q ${mountPath} && echo MOUNTED || echo unmounted; ls -d /etc/dboxed-volumes/${volumeId} 2>/dev/null | wc -l`);
        expect(left.stdout.trim().split("\n"), `${h.name} holds nothing of the volume after move ${i + 1}`).to.deep.equal(["unmounted", "0"]);
      }
      const o = (await stack.outputs()).volumes.k;
      expect(o.unfinishedMove).to.deep.equal({});
      expect(o.pendingCleanup).to.deep.equal({});
    }
  });

  it("at least 10 kills happened, and never were two hosts read-write", async () => {
    polling = false;
    await poller;
    process.stderr.write(`[kills] ${kills} kills, ${samples} mount samples, seed ${seed}\n`);
    expect(kills).to.be.at.least(10);
    expect(samples).to.be.greaterThan(30);
    expect(doubleMounts, "samples with two read-write hosts").to.equal(0);
  });

  it("destroy removes it", async () => {
    const res = await stack.run(["destroy", "--yes", "--skip-preview"]);
    expect(res.code, res.stdout + res.stderr).to.equal(0);
  });

  after(async () => {
    polling = false;
    await poller;
  });
});
