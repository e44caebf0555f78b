// Who may act on a volume (real pulumi, lab hosts):
// 1. `force` from another stack while a move's final backup runs longer than the lease lasts:
//    refused (nothing renews the lease mid-move, so its expiry says nothing); the move finishes.
// 2. A renamed stack keeps its volume: the same resource instance re-owns the lease.
import { expect } from "chai";
import * as crypto from "crypto";
import { lab, labLease, onHost, Stack, stepByStep } from "./harness";
import type { LabHost } from "../../lab/lab";

const prefix = `ow-${crypto.randomBytes(3).toString("hex")}`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("force from another stack while a long final backup runs is refused (real pulumi, lab hosts)", function () {
  const volumeId = `of-${crypto.randomBytes(3).toString("hex")}`;
  const mountPath = "/srv/long-final";
  let orig: Stack, rescue: Stack;
  let h1: LabHost, h2: LabHost, h3: LabHost;
  const slow = () => `/etc/systemd/system/dboxed-volume-${volumeId}-backup.service.d`;
  stepByStep(this);
  const input = (host: number, force = false) => ({
    provider: { s3: { prefix } },
    volumes: [{ name: "f", host, args: { volumeId, size: "64MiB", mountPath, backupSchedule: "hourly", leaseDuration: 60, force } }],
  });

  before(async () => {
    [h1, h2, h3] = lab().hosts;
    orig = new Stack("long-final", "volumes");
    rescue = new Stack("long-final-rescue", "volumes");
    await orig.init();
    await rescue.init();
  });

  it("a move whose final backup outlasts the lease: force from another stack meanwhile is refused, nothing made; the move finishes", async () => {
    const res = await orig.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    await onHost(h1, `mkdir -p ${mountPath}/d && head -c 200000 /dev/urandom > ${mountPath}/d/blob && sync`);
    // Every backup on host-1 now takes 80 s longer than rustic: a final backup of a busy volume.
    await onHost(h1, `mkdir -p ${slow()} && printf '[Service]\\nExecStartPost=/bin/sleep 80\\n' > ${slow()}/slow.conf && systemctl daemon-reload`);
    const move = orig.start(["up", "--yes", "--skip-preview"], { input: input(1) });
    const seen = await onHost(h1, `for i in $(seq 1 6000); do [ -e /var/lib/dboxed-volumes/${volumeId}/final-request ] && { echo seen; exit 0; }; sleep 0.1; done; echo never`,
      { timeoutMs: 900_000 });
    expect(seen.stdout.trim()).to.equal("seen");
    // The lease's expiry passes while the final backup runs (60 s, and no renewal mid-move).
    let expired = false;
    for (let i = 0; i < 120 && !expired; i++) {
      const l = (await labLease(prefix, volumeId))!.lease;
      expect(l.move, "the move is in the lease").to.not.equal(undefined);
      expired = l.expiresAt! * 1000 < Date.now() - 2000;
      if (!expired) await sleep(1000);
    }
    expect(expired, "the lease expired during the final backup").to.equal(true);
    expect(move.running(), "the move still runs").to.equal(true);
    const forced = await rescue.up(input(2, true));
    expect(forced.code, forced.stdout + forced.stderr).to.not.equal(0);
    expect(forced.stdout + forced.stderr).to.match(/force: volume .* is in the middle of a move .*forceDespiteLiveLease/);
    const h3has = await onHost(h3, `ls -d /etc/dboxed-volumes/${volumeId} 2>/dev/null | wc -l`);
    expect(h3has.stdout.trim(), "nothing made on host-3").to.equal("0");
    const moved = await move.done;
    expect(moved.code, moved.stdout + moved.stderr).to.equal(0);
    const l = (await labLease(prefix, volumeId))!.lease;
    expect(l.holder.port).to.equal(h2.port);
    expect(l.owner?.stack).to.equal("long-final");
    expect((await onHost(h2, `cat ${mountPath}/d/blob | wc -c`)).stdout.trim()).to.equal("200000");
  });

  after(async () => {
    await onHost(h1, `rm -rf ${slow()}; systemctl daemon-reload`).catch(() => undefined);
    if (rescue) await rescue.run(["destroy", "--yes", "--skip-preview"]);
    if (orig) await orig.run(["destroy", "--yes", "--skip-preview"]);
  });
});

describe("a renamed stack keeps its volume (real pulumi, lab hosts)", function () {
  const volumeId = `or-${crypto.randomBytes(3).toString("hex")}`;
  const mountPath = "/srv/renamed";
  let stack: Stack;
  stepByStep(this, () => stack.run(["destroy", "--yes", "--skip-preview"]));
  const input = (schedule: string) => ({
    provider: { s3: { prefix } },
    volumes: [{ name: "r", host: 2, args: { volumeId, size: "64MiB", mountPath, backupSchedule: schedule } }],
  });

  it("after pulumi stack rename, the preview shows the new owner and an update re-owns the lease under the new name", async () => {
    stack = new Stack("before-rename", "volumes");
    await stack.init();
    const res = await stack.up(input("hourly"));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const instance = (await labLease(prefix, volumeId))!.lease.instance;
    await stack.rename("after-rename");
    const preview = await stack.preview(input("hourly"));
    expect(preview.code, preview.stdout + preview.stderr).to.equal(0);
    expect(preview.stdout).to.match(/1 to update/);
    // A change of its own with it: the new owner must be able to change the volume.
    const up = await stack.up(input("*:0/20"));
    expect(up.code, up.stdout + up.stderr).to.equal(0);
    const l = (await labLease(prefix, volumeId))!.lease;
    expect(l.owner?.stack).to.equal("after-rename");
    expect(l.instance).to.equal(instance);
    expect((await onHost(lab().hosts[2], `systemctl show -p TimersCalendar --value dboxed-volume-${volumeId}-backup.timer`)).stdout).to.match(/0\/20/);
    const again = await stack.run(["preview", "--expect-no-changes"], { input: input("*:0/20") });
    expect(again.code, again.stdout + again.stderr).to.equal(0);
  });

  after(async () => {
    if (stack) await stack.run(["destroy", "--yes", "--skip-preview"]);
  });
});
