// When the host that holds a volume is gone for good, `force: true` in another stack restores
// the latest snapshot on a new host and says how much data may be lost, but only once the lost
// host's lease expired (a live holder renews it); the old host, should it come back, cannot
// back up any more.
import { expect } from "chai";
import * as crypto from "crypto";
import { freezeHost } from "../../lab/lab";
import { lab, labLease, onHost, Stack, stepByStep } from "./harness";
import { manifest, Manifest } from "./manifest";

describe("force recovery from a lost host (real pulumi, lab hosts)", function () {
  stepByStep(this);
  const prefix = `force-${crypto.randomBytes(3).toString("hex")}`;
  const volumeId = `fr-${crypto.randomBytes(3).toString("hex")}`;
  const mountPath = "/srv/forced";
  const input = (host: number, force = false) => ({
    provider: { s3: { prefix } },
    volumes: [{ name: "x", host, args: { volumeId, size: "64MiB", mountPath, backupSchedule: "hourly", force, leaseDuration: 60 } }],
  });
  let orig: Stack;
  let rescue: Stack;
  let atSnapshot: Manifest;
  let frozen = false;
  const lease = () => labLease(prefix, volumeId);

  it("a volume on host-2 is backed up, then written to, then its host is lost", async () => {
    const h = lab().hosts[1];
    orig = new Stack("force-orig", "volumes");
    await orig.init();
    const res = await orig.up(input(1));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    await onHost(h, `mkdir -p ${mountPath}/d && head -c 1000000 /dev/urandom > ${mountPath}/d/kept && sync`);
    await onHost(h, `systemctl start dboxed-volume-${volumeId}-backup.service`);
    atSnapshot = await manifest(h, mountPath);
    await onHost(h, `echo "never backed up" > ${mountPath}/d/lost && sync`);
    await freezeHost(lab().dir, h.name, true);
    frozen = true;
  });

  it("another stack without force is refused", async () => {
    rescue = new Stack("force-rescue", "volumes");
    await rescue.init();
    const res = await rescue.up(input(2));
    expect(res.code).to.not.equal(0);
    expect(res.stdout + res.stderr).to.match(/is held by host .*set force: true/);
  });

  it("force is refused while the lost host's lease is live (it renewed it lately)", async () => {
    const l = await lease();
    expect(l!.lease.expiresAt, "the holder renews its lease").to.be.a("number");
    expect(l!.lease.expiresAt! * 1000).to.be.greaterThan(Date.now() + 5000);
    const res = await rescue.up(input(2, true));
    expect(res.code).to.not.equal(0);
    expect(res.stdout + res.stderr).to.match(/force: the lease of volume .* is live: .* renewed it until .*forceDespiteLiveLease/);
    // Nothing was made on host-3.
    const h3 = await onHost(lab().hosts[2], `ls -d /etc/dboxed-volumes/${volumeId} 2>/dev/null | wc -l`);
    expect(h3.stdout.trim()).to.equal("0");
    // The lost host stops renewing: wait for the expiry.
    const wait = l!.lease.expiresAt! * 1000 - Date.now() + 2000;
    expect(wait, "the lease lasts 60 s from its last renewal").to.be.at.most(62_000);
    await new Promise((r) => setTimeout(r, Math.max(0, wait)));
  });

  it("with force: true, once the lease expired, it restores the latest snapshot on host-3 and reports the data-loss window", async () => {
    const t0 = Date.now();
    const res = await rescue.up(input(2, true));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(res.stdout).to.match(/FORCED takeover/);
    const o = (await rescue.outputs()).volumes.x;
    expect(o.lastMove.forced).to.equal(true);
    expect(o.lastMove.dataLossWindowSeconds).to.be.a("number").and.to.be.at.least(1);
    expect(o.lastMove.dataLossWindowSeconds).to.be.at.most((Date.now() - t0) / 1000 + 600);
    const now = await manifest(lab().hosts[2], mountPath);
    expect(now.entries).to.deep.equal(atSnapshot.entries);
  });

  it("the old host, back again, cannot back up the volume any more", async () => {
    const h = lab().hosts[1];
    await freezeHost(lab().dir, h.name, false);
    frozen = false;
    await onHost(h, `date -s @${Math.floor(Date.now() / 1000)} >/dev/null`);
    const r = await onHost(h, `systemctl start dboxed-volume-${volumeId}-backup.service; echo "exit=$?"; cat /var/lib/dboxed-volumes/${volumeId}/status.json`, { allowFailure: true });
    expect(r.stdout).to.match(/exit=[1-9]/);
    expect(r.stdout).to.match(/no longer holds volume/);
  });

  it("destroying the old stack cleans the old host without a final backup; the rescued volume is untouched", async () => {
    const d = await orig.run(["destroy", "--yes", "--skip-preview"]);
    expect(d.code, d.stdout + d.stderr).to.equal(0);
    expect(d.stdout).to.match(/no final backup from here/);
    const left = await onHost(lab().hosts[1], `vgs dbv-${volumeId} >/dev/null 2>&1 && echo VG || echo no-vg`);
    expect(left.stdout.trim()).to.equal("no-vg");
    const state = await onHost(lab().hosts[2], `findmnt -n -o OPTIONS ${mountPath} | cut -d, -f1; /usr/local/lib/dboxed-volumes/dboxed-volume check-lease ${volumeId}`);
    expect(state.stdout).to.match(/^rw\n.*this host holds the lease/);
  });

  after(async () => {
    if (frozen) await freezeHost(lab().dir, lab().hosts[1].name, false);
    if (rescue) await rescue.run(["destroy", "--yes", "--skip-preview"]);
  });
});
