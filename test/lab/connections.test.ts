// Connections as @pulumi/command's remote.Connection describes them (real pulumi, lab hosts):
// a host reachable only through a bastion (the bastion's login through an SSH agent the test
// starts), hosts pinned by their ecdsa and rsa keys, an encrypted key with its passphrase, and a
// login that is only a sudo user (the provider's key cannot log in as root). Volumes are
// created, backed up, moved onto and off the bastioned host and deleted; previews show the
// addresses in plain text and run the new host's pre-flight; the state holds no secret in plain.
import { expect } from "chai";
import { execFileSync, spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { lab, onHost, Stack, stepByStep } from "./harness";
import { manifest, Manifest } from "./manifest";
import { peerAddress } from "../../lab/lab";
import { Remote } from "../../provider/remote/ssh";

const prefix = `conn-${crypto.randomBytes(3).toString("hex")}`;
const tag = crypto.randomBytes(2).toString("hex");
const idA = `ca-${tag}`, idB = `cb-${tag}`;
const passphrase = `pass ${crypto.randomBytes(6).toString("hex")}`;

describe("connections: bastion, agent, encrypted key, ecdsa and rsa pins, a sudo user (real pulumi, lab hosts)", function () {
  let stack: Stack;
  let tmp: string;
  let agentPid = 0;
  let sock = "";
  let encKey = "";
  const pins: Record<string, string> = {};
  const refs: Record<string, Manifest> = {};
  stepByStep(this, async () => { await stack?.run(["destroy", "--yes", "--skip-preview"]); });

  // host-3 at its private address (only the other guests reach it), as deploy, through host-1.
  const behindBastion = () => ({
    address: peerAddress(2), port: 22, user: "deploy", privateKey: encKey, privateKeyPassword: passphrase, hostKey: pins.ecdsa3,
    proxy: { address: lab().hosts[0].address, port: lab().hosts[0].port, user: "root", agentSocketPath: sock, hostKey: lab().hosts[0].hostKey },
  });
  // host-2 as deploy, with the encrypted key, pinned by its rsa key.
  const sudoOnHost2 = () => ({ user: "deploy", privateKey: encKey, privateKeyPassword: passphrase, hostKey: pins.rsa2 });
  // bAsOutput: b's whole connection passed as one Output (its fields, the bastion's too, still plain or secret one by one).
  const input = (a: [number, Record<string, unknown>], b: [number, Record<string, unknown>], bAsOutput = false) => ({
    provider: { s3: { prefix } },
    volumes: [
      { name: "a", host: a[0], hostOverride: a[1], args: { volumeId: idA, size: "64MiB", mountPath: "/srv/conn-a", backupSchedule: "hourly" } },
      { name: "b", host: b[0], hostOverride: b[1], hostAsOutput: bAsOutput, args: { volumeId: idB, size: "64MiB", mountPath: "/srv/conn-b", backupSchedule: "hourly" } },
    ],
  });

  before(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), "conn-test-"));
    execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", passphrase, "-C", "deploy", "-f", path.join(tmp, "deploy")]);
    encKey = fs.readFileSync(path.join(tmp, "deploy"), "utf8");
    const pub = fs.readFileSync(path.join(tmp, "deploy.pub"), "utf8");
    // An SSH agent holding the lab key: the bastion's login.
    sock = path.join(tmp, "agent.sock");
    const out = execFileSync("ssh-agent", ["-s", "-a", sock]).toString();
    agentPid = Number(/SSH_AGENT_PID=(\d+)/.exec(out)![1]);
    const add = spawnSync("ssh-add", [lab().hosts[0].privateKeyPath], { env: { ...process.env, SSH_AUTH_SOCK: sock } });
    expect(add.status, add.stderr.toString()).to.equal(0);
    // A sudo user on host-2 and host-3 that only the encrypted key logs in as; root does not take that key.
    for (const h of [lab().hosts[1], lab().hosts[2]]) {
      await onHost(h, `set -e
id deploy >/dev/null 2>&1 || useradd -m -s /bin/bash deploy
echo 'deploy ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/deploy && chmod 0440 /etc/sudoers.d/deploy
install -d -m 0700 -o deploy -g deploy /home/deploy/.ssh
printf '%s\\n' ${JSON.stringify(pub.trim())} > /home/deploy/.ssh/authorized_keys
chown deploy:deploy /home/deploy/.ssh/authorized_keys && chmod 0600 /home/deploy/.ssh/authorized_keys`);
    }
    const key = async (i: number, type: string) => (await onHost(lab().hosts[i], `cut -d' ' -f1,2 /etc/ssh/ssh_host_${type}_key.pub`)).stdout.trim();
    pins.rsa2 = await key(1, "rsa");
    pins.ecdsa3 = await key(2, "ecdsa");
    expect(pins.rsa2).to.match(/^ssh-rsa /);
    expect(pins.ecdsa3).to.match(/^ecdsa-sha2-nistp256 /);
  });

  after(() => {
    if (agentPid) { try { process.kill(agentPid); } catch { /* gone */ } }
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  it("preconditions: host-3's private address is not reachable from here, and the deploy key cannot log in as root", async () => {
    const direct = await Remote.connect({ ...behindBastion(), proxy: undefined }, { attempts: 1, dialTimeoutMs: 5000 }).then((r) => { r.dispose(); return "connected"; }, (e) => String(e));
    expect(direct).to.not.equal("connected");
    const asRoot = await Remote.connect({ ...behindBastion(), user: "root" }, { attempts: 1 }).then((r) => { r.dispose(); return "connected"; }, (e) => String(e));
    expect(asRoot).to.match(/login .* was refused/);
  });

  it("creates a volume behind the bastion and one as a sudo user pinned by rsa, both backed up", async () => {
    stack = new Stack("connections", "volumes");
    await stack.init();
    const res = await stack.up(input([2, behindBastion()], [1, sudoOnHost2()]));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const out = (await stack.outputs()).volumes;
    for (const n of ["a", "b"]) {
      expect(out[n].mounted, n).to.equal(true);
      expect(out[n].lastBackupStatus, n).to.equal("ok");
    }
    // Data in both, and a periodic backup run of each on its host.
    for (const [i, id, dir] of [[2, idA, "/srv/conn-a"], [1, idB, "/srv/conn-b"]] as const) {
      await onHost(lab().hosts[i], `set -e; cd ${dir}; mkdir -p d; for f in $(seq 1 30); do head -c $((f * 1500)) /dev/urandom > d/f$f; done
ln -s d/f1 link; echo x > "with space"; setfattr -n user.k -v ${id} d/f2; sync
systemctl start dboxed-volume-${id}-backup.service`);
      refs[id] = await manifest(lab().hosts[i], dir);
    }
  });

  // The provider appends every SSH dial to DBOXED_VOLUMES_TRACE (its own record, host names only).
  const dials = (file: string) => (fs.existsSync(file) ? fs.readFileSync(file, "utf8") : "").split("\n").filter((l) => / connect$/.test(l));

  it("a preview with nothing changed opens no SSH connection", async () => {
    const trace = path.join(tmp, "trace-unchanged.log");
    const res = await stack.run(["preview", "--diff"], { input: input([2, behindBastion()], [1, sudoOnHost2()]), env: { DBOXED_VOLUMES_TRACE: trace } });
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(res.stdout).to.match(/\d+ unchanged/);
    expect(res.stdout).to.not.match(/to (create|update|delete|replace)/);
    expect(dials(trace), "SSH dials during a preview with no change").to.deep.equal([]);
  });

  it("a preview of both moves shows the addresses in plain text and runs each new host's pre-flight", async () => {
    // --diff: the property-level diff a reviewer reads.
    const trace = path.join(tmp, "trace-moves.log");
    const res = await stack.run(["preview", "--diff"], { input: input([0, {}], [2, behindBastion()], true), env: { DBOXED_VOLUMES_TRACE: trace } });
    const text = res.stdout + res.stderr;
    expect(res.code, text).to.equal(0);
    // The control for the test above: the move's pre-flight dials each new host.
    expect(dials(trace).length, "SSH dials during the move's preview").to.be.at.least(2);
    if (process.env.DBOXED_TEST_VERBOSE) process.stderr.write(text);
    // a: 10.0.2.13:22 (deploy, via host-1) -> 127.0.0.1:<host-1>; b: 127.0.0.1:<host-2> -> 10.0.2.13:22.
    expect(text).to.match(new RegExp(`address\\s*:\\s*"${peerAddress(2).replace(/\./g, "\\.")}"\\s*=>\\s*"127\\.0\\.0\\.1"`));
    expect(text).to.match(new RegExp(`port\\s*:\\s*22\\s*=>\\s*${lab().hosts[0].port}`));
    expect(text).to.match(new RegExp(`port\\s*:\\s*${lab().hosts[1].port}\\s*=>\\s*22`));
    expect(text).to.not.match(/host\s*:\s*\[secret\]/);
    expect(text).to.not.match(/proxy\s*:\s*\[secret\]/);
  });

  it("a preview of a move to a host without room fails, naming the host and the shortfall; nothing changes", async () => {
    const h1 = lab().hosts[0];
    await onHost(h1, "mkdir -p /var/lib/dboxed-volumes && avail=$(df -B1 --output=avail /var/lib/dboxed-volumes | tail -n1) && fallocate -l $((avail - 50000000)) /var/lib/filler");
    try {
      const res = await stack.preview(input([0, {}], [1, sudoOnHost2()]));
      const text = res.stdout + res.stderr;
      expect(res.code, text).to.not.equal(0);
      expect(text).to.match(new RegExp(`host root@127\\.0\\.0\\.1:${h1.port} has no room for volume ${idA}: it needs \\d+MiB .* and \\d+MiB are free`));
    } finally {
      await onHost(h1, "rm -f /var/lib/filler");
    }
    expect((await onHost(lab().hosts[2], "mountpoint -q /srv/conn-a && echo mounted")).stdout.trim()).to.equal("mounted");
  });

  it("a preview of a move to a host that is not who its pinned key says, or whose mount path is taken, fails naming why", async () => {
    // host-1 pinned by host-2's rsa key.
    let res = await stack.preview(input([0, { hostKey: pins.rsa2 }], [1, sudoOnHost2()]));
    expect(res.code, res.stdout + res.stderr).to.not.equal(0);
    expect(res.stdout + res.stderr).to.match(/host key of .* does not match the pinned hostKey: the host offered "ssh-rsa /);
    const h1 = lab().hosts[0];
    await onHost(h1, "mkdir -p /srv/conn-a && mount -t tmpfs lab-taken /srv/conn-a");
    try {
      res = await stack.preview(input([0, {}], [1, sudoOnHost2()]));
      expect(res.code, res.stdout + res.stderr).to.not.equal(0);
      expect(res.stdout + res.stderr).to.match(/mountPath: \/srv\/conn-a on .* is already a mount point of lab-taken: choose another mountPath/);
    } finally {
      await onHost(h1, "umount /srv/conn-a; rmdir /srv/conn-a; true");
    }
  });

  it("moves the bastioned volume off (to host-1) and the sudo user's onto the bastioned host, data intact, old hosts clean", async () => {
    const res = await stack.up(input([0, {}], [2, behindBastion()], true));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(await manifest(lab().hosts[0], "/srv/conn-a")).to.deep.equal(refs[idA]);
    expect(await manifest(lab().hosts[2], "/srv/conn-b")).to.deep.equal(refs[idB]);
    for (const [i, id] of [[2, idA], [1, idB]] as const) {
      const r = await onHost(lab().hosts[i], `vgs dbv-${id} >/dev/null 2>&1 && echo VG || echo no-vg; ls /etc/systemd/system | grep -c ${id} || true`);
      expect(r.stdout.trim().split("\n"), `${id} on ${lab().hosts[i].name}`).to.deep.equal(["no-vg", "0"]);
    }
  });

  it("the state shows addresses and users, and no key, passphrase or password in plain text", async () => {
    const r = await stack.ok(["stack", "export"]);
    const text = r.stdout + stack.stateText();
    const secrets = [passphrase, ...encKey.split("\n").filter((x) => x.length > 40),
      ...fs.readFileSync(lab().hosts[0].privateKeyPath, "utf8").split("\n").filter((x) => x.length > 40), "lab-repository-password-1", lab().s3.secretAccessKey];
    for (const s of secrets) expect(text.includes(s), `plain secret ${s.slice(0, 8)}... in the state`).to.equal(false);
    const state = JSON.parse(r.stdout);
    const hostOf = (n: string) => state.deployment.resources.find((x: any) => x.urn.endsWith(`::${n}`)).inputs.host;
    expect(hostOf("b").address).to.equal(peerAddress(2));
    expect(hostOf("b").user).to.equal("deploy");
    // b's connection was one Output: its bastion is plain where nothing is secret, as a plain object's would be.
    expect(hostOf("b").proxy.port).to.equal(lab().hosts[0].port);
    expect(hostOf("b").proxy.address).to.equal(lab().hosts[0].address);
    expect(hostOf("b").proxy.user).to.equal("root");
    expect(hostOf("a").port).to.equal(lab().hosts[0].port);
  });

  it("deletes both (through the bastion and sudo): the hosts are clean", async () => {
    const res = await stack.run(["destroy", "--yes", "--skip-preview"]);
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    for (const [i, id] of [[0, idA], [2, idB]] as const) {
      const r = await onHost(lab().hosts[i], `vgs dbv-${id} >/dev/null 2>&1 && echo VG || echo no-vg; ls /etc/systemd/system | grep -c ${id} || true`);
      expect(r.stdout.trim().split("\n"), `${id} on ${lab().hosts[i].name}`).to.deep.equal(["no-vg", "0"]);
    }
  });
});
