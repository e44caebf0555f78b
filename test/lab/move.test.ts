// Moving a volume by editing `host` (real pulumi, three lab hosts): tricky data survives
// A -> B -> C -> A with identical manifests, old hosts are left clean, a second stack is
// refused, and a move to a host without room stops in pre-flight.
import { expect } from "chai";
import * as crypto from "crypto";
import { lab, onHost, Stack, stepByStep } from "./harness";
import { manifest, Manifest } from "./manifest";
import type { LabHost } from "../../lab/lab";

const prefix = `move-${crypto.randomBytes(3).toString("hex")}`;
const volumeId = `mv-${crypto.randomBytes(3).toString("hex")}`;
const mountPath = "/srv/moving";

/** Hardlinks, symlinks, a sparse file, xattrs, ACLs, odd names, empty dirs, a big file, other owners, old mtimes. */
async function writeTrickyData(h: LabHost) {
  await onHost(h, `set -e; cd ${mountPath}
mkdir -p "dir with space/sub" "empty dir" "ünïcødé-日本" deep/a/b/c/d
printf 'x' > "dir with space/file with space.txt"
printf 'n' > "$(printf 'new\\nline')"
printf 'tab' > "$(printf 'tab\\there')"
echo data > "ünïcødé-日本/ファイル.txt"
head -c 20971520 /dev/urandom > big.bin
truncate -s 50M sparse.img && echo hello | dd of=sparse.img bs=1 seek=10485760 conv=notrunc status=none
ln -s "dir with space/file with space.txt" link-rel && ln -s /etc/hostname link-abs && ln -s missing dangling
echo a > hl1 && ln hl1 hl2 && ln hl1 "dir with space/hl3"
setfattr -n user.k -v v1 big.bin && setfattr -n user.other -v "with space" "dir with space"
setfacl -m u:1234:rwx "dir with space" && setfacl -d -m g:2345:rx "dir with space" && setfacl -m u:4321:r hl1
echo o > owned && chown 1234:2345 owned && chown -h 4321:4321 link-rel
echo s > setuid-file && chmod 4755 setuid-file && mkdir -p sticky && chmod 1777 sticky
for i in $(seq 1 200); do echo "small $i" > deep/a/b/c/d/f-$i; done
touch -d '2001-02-03 04:05:06.123456789' owned
sync`);
}

async function clean(h: LabHost) {
  const r = await onHost(h, `ls /etc/systemd/system | grep -c ${volumeId} || true
mountpoint -q ${mountPath} && echo MOUNTED || echo unmounted
vgs dbv-${volumeId} >/dev/null 2>&1 && echo VG || echo no-vg
ls -d /var/lib/dboxed-volumes/${volumeId} /etc/dboxed-volumes/${volumeId} 2>/dev/null | wc -l`);
  expect(r.stdout.trim().split("\n"), `host ${h.name} is not clean`).to.deep.equal(["0", "unmounted", "no-vg", "0"]);
}

describe("moving a volume by editing host (real pulumi, lab hosts)", function () {
  stepByStep(this);
  let stack: Stack;
  let reference: Manifest;
  const input = (host: number, extra: Record<string, unknown> = {}) => ({
    provider: { s3: { prefix } },
    volumes: [{ name: "m", host, args: { volumeId, size: "256MiB", mountPath, backupSchedule: "hourly", ...extra } }],
  });

  it("creates the volume on host-1 and fills it with tricky data", async () => {
    stack = new Stack("move", "volumes");
    await stack.init();
    const res = await stack.up(input(0));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    await writeTrickyData(lab().hosts[0]);
    reference = await manifest(lab().hosts[0], mountPath);
    expect(Object.keys(reference.entries).length).to.be.greaterThan(220);
    await onHost(lab().hosts[0], `systemctl start dboxed-volume-${volumeId}-backup.service`);
  });

  it("a second stack declaring the same volume on another host is refused", async () => {
    const intruder = new Stack("move-intruder", "volumes");
    await intruder.init();
    const res = await intruder.up(input(1));
    expect(res.code).to.not.equal(0);
    expect(res.stdout + res.stderr).to.match(new RegExp(`volume ${volumeId} is held by host 127\\.0\\.0\\.1:${lab().hosts[0].port}`));
    await clean(lab().hosts[1]);
  });

  it("a move to a host without room stops in pre-flight; the volume stays mounted and backed up on the old host", async () => {
    const h2 = lab().hosts[1];
    await onHost(h2, "mkdir -p /var/lib/dboxed-volumes && avail=$(df -B1 --output=avail /var/lib/dboxed-volumes | tail -n1) && fallocate -l $((avail - 200000000)) /var/lib/filler");
    try {
      const res = await stack.up(input(1));
      expect(res.code).to.not.equal(0);
      expect(res.stdout + res.stderr).to.match(/has no room for volume/);
    } finally {
      await onHost(h2, "rm -f /var/lib/filler");
    }
    const h1 = lab().hosts[0];
    const state = await onHost(h1, `findmnt -n -o OPTIONS ${mountPath} | cut -d, -f1; systemctl is-active dboxed-volume-${volumeId}-backup.timer`);
    expect(state.stdout.trim().split("\n")).to.deep.equal(["rw", "active"]);
    await onHost(h1, `systemctl start dboxed-volume-${volumeId}-backup.service`);
    expect((await manifest(h1, mountPath)).entries).to.deep.equal(reference.entries);
  });

  for (const [from, to] of [[0, 1], [1, 2], [2, 0]]) {
    it(`moves host-${from + 1} -> host-${to + 1}: identical manifest, old host clean`, async () => {
      // Keep the old host's settings, to play a stale host that missed the handover afterwards.
      await onHost(lab().hosts[from], `rm -rf /root/stale && cp -a /etc/dboxed-volumes/${volumeId} /root/stale`);
      const res = await stack.up(input(to));
      expect(res.code, res.stdout + res.stderr).to.equal(0);
      expect(res.stdout).to.match(/verified: the restored tree equals/);
      // A warm move hashed both trees before the stop: after it, the old host's unchanged files
      // (all of them: nothing wrote since) are not hashed again.
      const hashed = /files hashed after the stop: (\d+) on [^,]+, (\d+) on /.exec(res.stdout);
      expect(hashed, res.stdout).to.not.equal(null);
      expect(Number(hashed![1]), "files hashed again on the old host after the stop").to.equal(0);
      const h = lab().hosts[to];
      const after = await manifest(h, mountPath);
      expect(after.entries).to.deep.equal(reference.entries);
      expect(after.xattrs).to.equal(reference.xattrs);
      expect(after.acls).to.equal(reference.acls);
      await clean(lab().hosts[from]);
      const o = (await stack.outputs()).volumes.m;
      expect(o.mounted).to.equal(true);
      expect(o.timerActive).to.equal(true);
      expect(o.lastMove.to).to.equal(`127.0.0.1:${h.port}`);
      expect(o.lastMove.downtimeSeconds).to.be.greaterThan(0);
      const state = await onHost(h, `findmnt -n -o OPTIONS ${mountPath} | cut -d, -f1`);
      expect(state.stdout.trim()).to.equal("rw");
      const holds = await onHost(h, `/usr/local/lib/dboxed-volumes/dboxed-volume check-lease ${volumeId}`);
      expect(holds.stdout).to.contain("this host holds the lease");
    });

    it(`after that move, host-${from + 1} (the lease handed over) cannot upload a backup`, async () => {
      const stale = lab().hosts[from];
      const r = await onHost(stale, `cp -a /root/stale /etc/dboxed-volumes/${volumeId}
/usr/local/lib/dboxed-volumes/dboxed-volume backup ${volumeId} 2>&1; echo "exit=$?"
rm -rf /etc/dboxed-volumes/${volumeId} /var/lib/dboxed-volumes/${volumeId} /root/stale /var/lib/prometheus/node-exporter/dboxed_volume_${volumeId}.prom`);
      expect(r.stdout).to.match(/no longer holds volume .* refusing to back up/);
      expect(r.stdout).to.match(/exit=1/);
      await clean(stale);
    });
  }

  after(async () => {
    if (stack) await stack.run(["destroy", "--yes", "--skip-preview"]);
  });
});
