// Rotating the repository password and the S3 keys are updates (real pulumi, lab hosts, the lab
// S3 server's own users): the repository keeps its data, backups run on both hosts throughout
// each rotation and succeed, the old password's key is removed only after the new one opens the
// repository, a rotation cut off after the key was added is finished by the next run, and after
// the old S3 user is deleted the hosts still back up and renew their leases.
import { expect } from "chai";
import { execFile } from "child_process";
import * as crypto from "crypto";
import * as path from "path";
import { lab, onHost, Stack, stepByStep } from "./harness";
import { manifest } from "./manifest";
import { keyOpenedBy, WRONG_PASSWORD } from "../../provider/lifecycle/volumeProvider";
import { runLocalRustic } from "../../provider/lifecycle/localRustic";
import type { LabHost } from "../../lab/lab";

const hex = () => crypto.randomBytes(3).toString("hex");
const prefix = `rot-${hex()}`;
const ids = [`ra-${hex()}`, `rb-${hex()}`];
const users = [1, 2].map(() => ({ accessKeyId: `rot${crypto.randomBytes(6).toString("hex")}`, secretAccessKey: crypto.randomBytes(24).toString("base64url") }));
const passwords = ["rotation-password-one", "rotation-password-two", "rotation-password-three"];

/** The lab S3 server's admin API, with the root credentials in the environment. */
function admin(args: string[]): Promise<string> {
  const s = lab().s3;
  return new Promise((resolve, reject) => execFile(path.join(path.dirname(lab().tools.rustic), "versitygw"), ["admin", ...args],
    { env: { ...process.env, ADMIN_ACCESS_KEY: s.accessKeyId, ADMIN_SECRET_KEY: s.secretAccessKey, ADMIN_ENDPOINT_URL: s.endpoint } },
    (err, stdout, stderr) => err ? reject(new Error(`versitygw admin ${args[0]}: ${stderr || err.message}`)) : resolve(stdout)));
}

/** Runs rustic on this machine against the test's repository with the given password. */
const local = (password: string, args: string[]) => runLocalRustic({ localPath: lab().tools.rustic },
  { endpoint: lab().s3.endpoint, region: lab().s3.region, bucket: lab().s3.bucket, prefix, forcePathStyle: true,
    accessKeyId: lab().s3.accessKeyId, secretAccessKey: lab().s3.secretAccessKey, password }, args);
/** The key a password opens and how many keys there are; undefined only for rustic's "no key for this password". */
const keysOpenedBy = async (password: string) => local(password, ["key", "list"]).then((out) => ({ key: keyOpenedBy(out), count: (out.match(/^\|\s*\*?[0-9a-f]{8}/gm) ?? []).length }), (e: Error) => {
  if (WRONG_PASSWORD.test(e.message)) return undefined;
  throw e;
});

/** Backs up each of the host's volumes again and again until stopped; each run's status goes to a log. */
async function startBackupLoop(h: LabHost, id: string) {
  await onHost(h, `rm -f /root/rot-stop /root/rot-log; systemd-run --quiet --unit=rot-loop-${id} bash -c 'while [ ! -e /root/rot-stop ]; do
systemctl start dboxed-volume-${id}-backup.service; sed -n "s/.*\\"status\\":\\"\\([a-z]*\\)\\".*/\\1/p" /var/lib/dboxed-volumes/${id}/status.json >> /root/rot-log; sleep 1; done'`);
}
/** Stops the loop once it has recorded two runs at least (a quick pulumi up may end within one run). */
async function stopBackupLoop(h: LabHost, id: string): Promise<string[]> {
  const r = await onHost(h, `while [ "$(cat /root/rot-log 2>/dev/null | wc -l)" -lt 2 ] && systemctl is-active -q rot-loop-${id}; do sleep 1; done
touch /root/rot-stop; while systemctl is-active -q rot-loop-${id}; do sleep 1; done; cat /root/rot-log`, { timeoutMs: 600_000 });
  return r.stdout.trim().split("\n").filter(Boolean);
}

describe("rotating the repository password and the S3 keys (real pulumi, lab hosts)", function () {
  let stack: Stack;
  stepByStep(this, () => stack.run(["destroy", "--yes", "--skip-preview"]));
  let h1: LabHost, h2: LabHost;
  const hosts = () => [h1, h2];
  const input = (password: string, user: { accessKeyId: string; secretAccessKey: string }) => ({
    provider: { s3: { prefix, ...user }, password },
    volumes: ids.map((volumeId, i) => ({ name: `v${i}`, host: i, args: { volumeId, size: "128MiB", mountPath: `/srv/rot-${i}`, backupSchedule: "hourly" } })),
  });
  const urn = async () => JSON.parse((await stack.ok(["stack", "export"])).stdout).deployment.resources.find((x: any) => x.urn.endsWith("::store"));

  before(async () => {
    [h1, h2] = lab().hosts;
    for (const u of users) await admin(["create-user", "--access", u.accessKeyId, "--secret", u.secretAccessKey, "--role", "admin"]);
    stack = new Stack("rotation", "volumes");
    await stack.init();
  });

  it("creates two volumes on two hosts with the first password and the first S3 user", async () => {
    const res = await stack.up(input(passwords[0], users[0]));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    for (const [i, h] of hosts().entries()) {
      await onHost(h, `set -e; mkdir -p /srv/rot-${i}/d; for f in $(seq 1 20); do head -c $((f * 1000)) /dev/urandom > /srv/rot-${i}/d/f$f; done; sync`);
    }
  });

  it("a new password is an update: the new key is added, the old removed, backups on both hosts succeed throughout", async () => {
    const before = await urn();
    const profiles = () => Promise.all(hosts().map((h, i) => onHost(h, `stat -c %Y.%Z /etc/dboxed-volumes/${ids[i]}/rustic.toml`).then((r) => r.stdout.trim())));
    const p0 = await profiles();
    await Promise.all(hosts().map((h, i) => startBackupLoop(h, ids[i])));
    const res = await stack.up(input(passwords[1], users[0]));
    const runs = await Promise.all(hosts().map((h, i) => stopBackupLoop(h, ids[i])));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(res.stdout).to.not.match(/replac/);
    expect(res.stdout).to.match(/adding the new password as a key/);
    expect((await urn()).id).to.equal(before.id);
    for (const r of runs) {
      expect(r.length, "backups ran during the rotation").to.be.at.least(2);
      expect(r.every((s) => s === "ok"), r.join(",")).to.equal(true);
    }
    // One key, the new password's; the old password opens nothing.
    expect((await keysOpenedBy(passwords[1]))?.count).to.equal(1);
    expect(await keysOpenedBy(passwords[0])).to.equal(undefined);
    // Every host's profile was rewritten.
    const p1 = await profiles();
    for (const i of [0, 1]) expect(p1[i]).to.not.equal(p0[i]);
  });

  it("a rotation cut off after its key was added is finished by the next run", async () => {
    // As if a run had added the third password's key and stopped before removing the second's.
    await runLocalRustic({ localPath: lab().tools.rustic }, { endpoint: lab().s3.endpoint, region: lab().s3.region, bucket: lab().s3.bucket, prefix,
      forcePathStyle: true, accessKeyId: lab().s3.accessKeyId, secretAccessKey: lab().s3.secretAccessKey, password: passwords[1] }, ["key", "add"], { newPassword: passwords[2] });
    expect((await keysOpenedBy(passwords[2]))?.count).to.equal(2);
    const res = await stack.up(input(passwords[2], users[0]));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(res.stdout).to.not.match(/adding the new password/);
    expect(res.stdout).to.match(/removing the previous password's key/);
    expect((await keysOpenedBy(passwords[2]))?.count).to.equal(1);
    expect(await keysOpenedBy(passwords[1])).to.equal(undefined);
  });

  it("new S3 keys are an update; backups succeed throughout; with the old user deleted, hosts back up and renew", async () => {
    await Promise.all(hosts().map((h, i) => startBackupLoop(h, ids[i])));
    const res = await stack.up(input(passwords[2], users[1]));
    const runs = await Promise.all(hosts().map((h, i) => stopBackupLoop(h, ids[i])));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(res.stdout).to.not.match(/replac/);
    for (const r of runs) expect(r.every((s) => s === "ok") && r.length >= 2, r.join(",")).to.equal(true);
    await admin(["delete-user", "--access", users[0].accessKeyId]);
    for (const [i, h] of hosts().entries()) {
      const before = await manifest(h, `/srv/rot-${i}/d`);
      const r = await onHost(h, `grep -c ${users[1].accessKeyId} /etc/dboxed-volumes/${ids[i]}/s3.curl
systemctl start dboxed-volume-${ids[i]}-backup.service dboxed-volume-${ids[i]}-lease.service
sed -n 's/.*"status":"\\([a-z]*\\)".*/\\1/p' /var/lib/dboxed-volumes/${ids[i]}/status.json
mkdir -p /root/rot-v && rm -rf /root/rot-v/* && /usr/local/lib/dboxed-volumes/rustic -P /etc/dboxed-volumes/${ids[i]}/rustic --no-progress restore --numeric-id "$(sed -n 's/.*"snapshotId":"\\([0-9a-f]*\\)".*/\\1/p' /var/lib/dboxed-volumes/${ids[i]}/status.json)" /root/rot-v >/dev/null 2>&1 && echo restored`);
      expect(r.stdout.trim().split("\n")).to.deep.equal(["1", "ok", "restored"]);
      expect((await manifest(h, "/root/rot-v/d")).entries).to.deep.equal(before.entries);
      await onHost(h, "rm -rf /root/rot-v");
    }
    const again = await stack.preview(input(passwords[2], users[1]));
    expect(again.stdout).to.not.match(/to update|to replace/);
  });

  it("destroy removes the volumes", async () => {
    const res = await stack.run(["destroy", "--yes", "--skip-preview"]);
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    await admin(["delete-user", "--access", users[1].accessKeyId]).catch(() => undefined);
  });
});
