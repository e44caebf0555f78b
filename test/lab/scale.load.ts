// Twelve volumes on three hosts, created, moved and deleted in single `pulumi up` runs (real
// pulumi, lab hosts): volumes on one host share its tools and do not trip over each other, and
// every volume's data arrives whole. Its own script (npm run scale): it needs about ten minutes
// of lab time, beyond the suite's budget.
import { expect } from "chai";
import * as crypto from "crypto";
import { lab, onHost, Stack, stepByStep } from "./harness";
import { manifest, Manifest } from "./manifest";

const prefix = `scale-${crypto.randomBytes(3).toString("hex")}`;
const tag = crypto.randomBytes(2).toString("hex");
const N = 12;
const ids = Array.from({ length: N }, (_, i) => `sc-${tag}-${i}`);
const mount = (i: number) => `/srv/scale-${i}`;

describe("twelve volumes on three hosts in one pulumi up (real pulumi, lab hosts)", function () {
  let stack: Stack;
  const refs: Manifest[] = [];
  const input = (shift: number) => ({
    provider: { s3: { prefix } },
    volumes: ids.map((volumeId, i) => ({ name: `s${i}`, host: (i + shift) % 3,
      args: { volumeId, size: "64MiB", mountPath: mount(i), backupSchedule: "hourly" } })),
  });
  stepByStep(this, async () => { await stack?.run(["destroy", "--yes", "--skip-preview"]); });

  it("creates all twelve in one pulumi up; each is mounted, backed up, and gets its own data", async () => {
    stack = new Stack("scale", "volumes");
    await stack.init();
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const out = (await stack.outputs()).volumes;
    for (let i = 0; i < N; i++) {
      expect(out[`s${i}`].mounted, `s${i}`).to.equal(true);
      expect(out[`s${i}`].lastBackupStatus, `s${i}`).to.equal("ok");
    }
    // Each volume's own content, different from every other's, then a backup of each.
    await Promise.all([0, 1, 2].map((h) => onHost(lab().hosts[h], ids.map((id, i) => i % 3 !== h ? "" : `set -e
cd ${mount(i)}; echo ${id} > id; mkdir -p d; for f in $(seq 1 40); do head -c $((f * 997)) /dev/urandom > d/f$f; done; sync
systemctl start dboxed-volume-${id}-backup.service`).filter(Boolean).join("\n"), { timeoutMs: 900_000 })));
    for (let i = 0; i < N; i++) refs[i] = await manifest(lab().hosts[i % 3], mount(i));
  });

  it("moves all twelve, each to the next host, in one pulumi up: every tree arrives identical", async () => {
    const res = await stack.up(input(1));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const out = (await stack.outputs()).volumes;
    for (let i = 0; i < N; i++) {
      const to = lab().hosts[(i + 1) % 3];
      expect(out[`s${i}`].lastMove.to, `s${i}`).to.equal(`${to.address}:${to.port}`);
      expect(await manifest(to, mount(i)), `s${i} on ${to.name}`).to.deep.equal(refs[i]);
    }
    // The old hosts hold none of the volumes any more.
    for (let h = 0; h < 3; h++) {
      const r = await onHost(lab().hosts[h], `vgs --noheadings -o vg_name 2>/dev/null | grep -c 'dbv-sc-${tag}-' || true`);
      expect(Number(r.stdout.trim()), lab().hosts[h].name).to.equal(4);
    }
  });

  it("deletes all twelve in one pulumi up: every host is clean", async () => {
    const res = await stack.up({ provider: { s3: { prefix } }, volumes: [] });
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    for (const h of lab().hosts) {
      const r = await onHost(h, `vgs --noheadings -o vg_name 2>/dev/null | grep -c 'dbv-sc-${tag}-' || true
ls /etc/systemd/system | grep -c 'sc-${tag}-' || true
ls /etc/dboxed-volumes /var/lib/dboxed-volumes 2>/dev/null | grep -c 'sc-${tag}-' || true
for i in $(seq 0 ${N - 1}); do mountpoint -q /srv/scale-$i && echo mounted; done; true`);
      expect(r.stdout.trim().split("\n"), h.name).to.deep.equal(["0", "0", "0"]);
    }
  });
});
