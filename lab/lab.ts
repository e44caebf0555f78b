// The lab: a real S3 server on 127.0.0.1 and disposable Debian test hosts (qemu guests with
// systemd, lvm2 and sshd), for the tests and the demo.
//   npm run lab -- up [--hosts N] [--dir D]   start, write D/lab.json (default D = .lab)
//   npm run lab -- status [--dir D]           what runs
//   npm run lab -- down [--dir D]             stop everything this lab started, remove D
// Why qemu: this machine's kernel has no device-mapper, so lvm2 runs only inside a guest.
// Hosts boot in seconds from a saved "golden" guest state, built once and cached.
import { spawn, spawnSync, execFileSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import { Remote, sleep } from "../provider/remote/ssh";

export const REPO = path.resolve(__dirname, "..");
// The AWS SDK warns that its 2027 releases need Node 22; the versions pinned here run on 20.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
export const CACHE = process.env.DBOXED_LAB_CACHE ?? path.join(os.homedir(), ".cache", "pulumi-dboxed-volumes");
const IMAGE = path.join(CACHE, "image");
const GOLDEN = path.join(CACHE, "golden");
const BIN = path.join(CACHE, "bin");
/** The S3 server as the hosts see it: qemu forwards this guest address to the host's server. */
const GUEST_S3 = { ip: "10.0.2.100", port: 9000 };
const GUEST_MEM_MB = 1024;
const GUEST_CPUS = Number(process.env.DBOXED_LAB_GUEST_CPUS ?? "1");
const LVM_DISK_SIZE = "4G";

export interface LabHost {
  name: string; address: string; port: number; user: string; privateKeyPath: string; hostKey: string;
  /** Where the other hosts reach this one's sshd (port 22): a private address the machine running pulumi cannot reach. */
  peerAddress?: string;
}

/** The private address (port 22) at which guest i (0-based) is reachable from the other guests. */
export const peerAddress = (i: number) => `10.0.2.${11 + i}`;
export interface LabJson {
  dir: string;
  s3: { endpoint: string; hostEndpoint: string; region: string; bucket: string; accessKeyId: string; secretAccessKey: string };
  hosts: LabHost[];
  tools: { pulumi: string; rustic: string; node: string };
  env: Record<string, string>;
}
interface LabState {
  s3: { pid: number; port: number };
  hosts: { name: string; pid: number; dir: string; sshPort: number }[];
}

function log(msg: string) {
  process.stderr.write(`[lab] ${msg}\n`);
}

function timed<T>(what: string, fn: () => Promise<T>): Promise<T> {
  const t0 = Date.now();
  return fn().then((v) => {
    log(`${what}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    return v;
  });
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

function alive(pid: number): boolean {
  try { process.kill(pid, 0); return true; } catch { return false; }
}

function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv } = {}) {
  const r = spawnSync(cmd, args, { stdio: ["ignore", "inherit", "inherit"], env: opts.env ?? process.env });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed with ${r.status ?? r.signal}`);
}

/** The qemu command line: the same for the golden guest and every clone (migration needs that). */
function qemuArgs(o: { dir: string; root: string; lvm: string; sshPort: number; s3Port: number; incoming?: string; peers?: number[] }): string[] {
  // Guests are isolated (restrict=on); each reaches the others' sshd only through these forwards
  // (a private network for bastion tests), and the S3 server.
  const peers = (o.peers ?? []).map((port, j) => `,guestfwd=tcp:${peerAddress(j)}:22-cmd:socat - TCP:127.0.0.1:${port}`).join("");
  const args = [
    "-accel", "tcg,thread=multi", "-cpu", "max", "-m", String(GUEST_MEM_MB), "-smp", String(GUEST_CPUS),
    "-nographic", "-nodefaults", "-no-user-config",
    "-serial", `file:${path.join(o.dir, "console.log")}`,
    "-kernel", path.join(IMAGE, "vmlinuz"), "-initrd", path.join(IMAGE, "initrd.img"),
    // Disposable guests: no zeroing of every page allocated, no Spectre mitigations (6% less
    // emulation CPU for the same work, measured side by side), and no address-space
    // randomization (norandmaps): qemu's translated code is keyed by virtual address, so with
    // ASLR every new process (bash, sed, lvm ... the agent starts hundreds) is translated anew;
    // without it, 43% less emulation CPU for the same host work (measured side by side, swapped).
    "-append", "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0 net.ifnames=0 init_on_alloc=0 mitigations=off norandmaps",
    "-drive", `file=${o.root},format=qcow2,if=virtio,cache=unsafe,discard=unmap`,
    "-drive", `file=${o.lvm},format=qcow2,if=virtio,cache=unsafe,discard=unmap`,
    "-netdev", `user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:${o.sshPort}-:22,` +
      `guestfwd=tcp:${GUEST_S3.ip}:${GUEST_S3.port}-cmd:socat - TCP:127.0.0.1:${o.s3Port}${peers}`,
    "-device", "virtio-net-pci,netdev=n0,romfile=", "-device", "virtio-rng-pci",
    "-monitor", `unix:${path.join(o.dir, "mon.sock")},server=on,wait=off`,
    "-pidfile", path.join(o.dir, "qemu.pid"), "-daemonize",
  ];
  if (o.incoming) args.push("-incoming", o.incoming);
  return args;
}

/** Sends one HMP command to a guest's monitor and returns its output. */
async function hmp(dir: string, cmd: string): Promise<string> {
  const sock = path.join(dir, "mon.sock");
  return new Promise((resolve, reject) => {
    const c = net.createConnection(sock);
    let buf = "";
    let sent = false;
    const timer = setTimeout(() => { c.destroy(); reject(new Error(`qemu monitor: no answer to ${cmd}`)); }, 120000);
    c.on("data", (d) => {
      buf += d.toString();
      if (!sent && buf.includes("(qemu) ")) {
        sent = true;
        buf = "";
        c.write(cmd + "\n");
      } else if (sent && (buf.includes("(qemu) ") || cmd === "quit")) {
        clearTimeout(timer);
        c.end();
        resolve(buf.replace(/\x1b\[[0-9;]*[A-Za-z]/g, "").replace("(qemu) ", ""));
      }
    });
    c.on("close", () => { clearTimeout(timer); if (cmd === "quit") resolve(buf); });
    c.on("error", (e) => { clearTimeout(timer); if (cmd === "quit") resolve(buf); else reject(e); });
  });
}

async function waitFor(what: string, timeoutMs: number, probe: () => Promise<boolean>): Promise<void> {
  const t0 = Date.now();
  while (Date.now() - t0 < timeoutMs) {
    if (await probe().catch(() => false)) return;
    await sleep(500);
  }
  throw new Error(`lab: timed out after ${timeoutMs / 1000} s waiting for ${what}`);
}

export function ensureTools(image = true): void {
  if (process.env.DBOXED_LAB_SKIP_TOOLCHAIN === "1") return; // development: tools built elsewhere
  run("bash", [path.join(REPO, "lab", "toolchain.sh"), "all"]);
  if (image) run("bash", [path.join(REPO, "lab", "image.sh")]);
}

function adminTarget(sshPort: number) {
  return {
    address: "127.0.0.1", port: sshPort, user: "root",
    privateKey: fs.readFileSync(path.join(IMAGE, "admin_ed25519"), "utf8"),
    hostKey: fs.readFileSync(path.join(IMAGE, "host_ed25519.pub"), "utf8").trim(),
  };
}

function goldenKey(): string {
  const probe = qemuArgs({ dir: "D", root: "R", lvm: "L", sshPort: 1, s3Port: 2 }).join(" ");
  const qemuVersion = execFileSync("qemu-system-x86_64", ["--version"]).toString();
  const image = fs.readFileSync(path.join(IMAGE, "done"), "utf8") + fs.statSync(path.join(IMAGE, "base.raw")).mtimeMs;
  return crypto.createHash("sha256").update(probe + qemuVersion + image + LVM_DISK_SIZE).digest("hex").slice(0, 16);
}

/** Cold-boots one guest, waits until systemd is up, saves its state; cached by goldenKey(). */
export async function ensureGolden(): Promise<void> {
  const key = goldenKey();
  const stamp = path.join(GOLDEN, "key");
  if (fs.existsSync(stamp) && fs.readFileSync(stamp, "utf8") === key) return;
  // Labs started side by side (the test shards) build it once: the others wait for the lock.
  const lock = `${GOLDEN}.lock`;
  for (;;) {
    try { fs.mkdirSync(lock); fs.writeFileSync(path.join(lock, "pid"), String(process.pid)); break; } catch { /* held */ }
    let holder = 0, age = 0;
    try { age = Date.now() - fs.statSync(lock).mtimeMs; holder = Number(fs.readFileSync(path.join(lock, "pid"), "utf8")) || 0; } catch { /* being made, or gone */ }
    // A holder that died (or never wrote its pid) leaves the lock behind.
    if ((holder && !alive(holder)) || (!holder && age > 60_000)) { fs.rmSync(lock, { recursive: true, force: true }); continue; }
    await sleep(2000);
  }
  try {
    if (!(fs.existsSync(stamp) && fs.readFileSync(stamp, "utf8") === key)) await buildGolden(key, stamp);
  } finally {
    fs.rmSync(lock, { recursive: true, force: true });
  }
}

async function buildGolden(key: string, stamp: string): Promise<void> {
  await timed("golden guest built (cold boot + saved state)", async () => {
    fs.rmSync(GOLDEN, { recursive: true, force: true });
    fs.mkdirSync(GOLDEN, { recursive: true });
    const root = path.join(GOLDEN, "root.qcow2");
    const lvm = path.join(GOLDEN, "lvm.qcow2");
    run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", path.join(IMAGE, "base.raw"), "-F", "raw", root]);
    run("qemu-img", ["create", "-q", "-f", "qcow2", lvm, LVM_DISK_SIZE]);
    const sshPort = await freePort();
    run("qemu-system-x86_64", qemuArgs({ dir: GOLDEN, root, lvm, sshPort, s3Port: 1 }));
    const pid = Number(fs.readFileSync(path.join(GOLDEN, "qemu.pid"), "utf8"));
    try {
      let remote: Remote | undefined;
      await waitFor("the golden guest's sshd (cold boot)", 300000, async () => {
        remote = await Remote.connect(adminTarget(sshPort), { attempts: 1, dialTimeoutMs: 10000 });
        return true;
      });
      const state = await remote!.run("systemctl is-system-running --wait; sync", { allowFailure: true, timeoutMs: 300000 });
      log(`golden guest: systemd is ${state.stdout.trim()}`);
      remote!.dispose();
      await hmp(GOLDEN, "stop");
      await hmp(GOLDEN, `migrate "exec:zstd -1 -T2 -q > ${path.join(GOLDEN, "state.zst")}"`);
      await waitFor("the golden guest's state to be saved", 300000, async () =>
        /Migration status: completed/.test(await hmp(GOLDEN, "info migrate")));
      await hmp(GOLDEN, "quit");
      await waitFor("the golden guest to exit", 30000, async () => !alive(pid));
    } finally {
      if (alive(pid)) process.kill(pid, "SIGKILL");
    }
    fs.chmodSync(root, 0o444);
    fs.chmodSync(lvm, 0o444);
    fs.writeFileSync(stamp, key);
  });
}

/**
 * A guest command that makes a clone's random state its own. Every clone resumes with the golden
 * guest's, and this kernel has no vmgenid to notice: 64 bytes from here are written into the
 * guest's pool and the pool is reseeded at once (RNDRESEEDCRNG), or hosts restored alike draw the
 * same bytes (with one vCPU each, identical SSH host keys were seen).
 */
function reseedGuestRandom(): string {
  const RNDRESEEDCRNG = "0x5207";
  return `perl -e 'open(my $f, ">", "/dev/urandom") or die "urandom: $!"; print $f pack("H*", $ARGV[0]); close $f or die "urandom: $!"; ` +
    `open($f, "<", "/dev/urandom") or die "urandom: $!"; ioctl($f, ${RNDRESEEDCRNG}, 0) or die "RNDRESEEDCRNG: $!"' ${crypto.randomBytes(64).toString("hex")}`;
}

/** Starts one clone of the golden guest and makes it a distinct host (clock, ids, keys). */
async function startHost(labDir: string, index: number, s3Port: number, labKeyPub: string, ports: number[]): Promise<{ host: LabHost; state: LabState["hosts"][0] }> {
  const name = `host-${index + 1}`;
  const dir = path.join(labDir, "hosts", name);
  fs.mkdirSync(dir, { recursive: true });
  const root = path.join(dir, "root.qcow2");
  const lvm = path.join(dir, "lvm.qcow2");
  run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", path.join(GOLDEN, "root.qcow2"), "-F", "qcow2", root]);
  run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", path.join(GOLDEN, "lvm.qcow2"), "-F", "qcow2", lvm]);
  const sshPort = ports[index];
  run("qemu-system-x86_64", qemuArgs({ dir, root, lvm, sshPort, s3Port, peers: ports, incoming: `exec:zstd -dc ${path.join(GOLDEN, "state.zst")}` }));
  const pid = Number(fs.readFileSync(path.join(dir, "qemu.pid"), "utf8"));
  await waitFor(`${name}: restore of the saved state`, 120000, async () =>
    /Migration status: completed/.test(await hmp(dir, "info migrate")));
  await hmp(dir, "cont");
  const remote = await Remote.connect(adminTarget(sshPort), { attempts: 10, retryDelayMs: 1000 });
  try {
    const res = await remote.run(
      [
        `date -s @${Math.floor(Date.now() / 1000)} >/dev/null`,
        reseedGuestRandom(),
        "rm -f /etc/machine-id && systemd-machine-id-setup >/dev/null 2>&1",
        `echo ${name} > /etc/hostname && hostname ${name}`,
        `sed -i 's/lab-host/${name}/' /etc/hosts`,
        "rm -f /etc/ssh/ssh_host_* && ssh-keygen -A >/dev/null",
        "cat > /root/.ssh/authorized_keys",
        "chmod 600 /root/.ssh/authorized_keys",
        "systemctl restart ssh",
        "cat /etc/ssh/ssh_host_ed25519_key.pub",
      ].join(" && "),
      { stdin: labKeyPub },
    );
    const hostKey = res.stdout.trim().split(/\s+/).slice(0, 2).join(" ");
    return {
      host: { name, address: "127.0.0.1", port: sshPort, user: "root", privateKeyPath: path.join(labDir, "id_ed25519"), hostKey, peerAddress: peerAddress(index) },
      state: { name, pid, dir, sshPort },
    };
  } finally {
    remote.dispose();
  }
}

async function startS3(labDir: string): Promise<{ s3: LabJson["s3"]; state: LabState["s3"] }> {
  const dir = path.join(labDir, "s3");
  fs.mkdirSync(path.join(dir, "data"), { recursive: true });
  fs.mkdirSync(path.join(dir, "meta"), { recursive: true });
  const port = await freePort();
  const accessKeyId = "lab" + crypto.randomBytes(6).toString("hex");
  const secretAccessKey = crypto.randomBytes(24).toString("base64url");
  const pid = spawnS3(labDir, port, accessKeyId, secretAccessKey);
  const endpoint = `http://127.0.0.1:${port}`;
  await waitFor("the S3 server (versitygw)", 30000, async () => (await fetch(`${endpoint}/health`)).ok);
  const s3 = { endpoint, hostEndpoint: `http://${GUEST_S3.ip}:${GUEST_S3.port}`, region: "us-east-1", bucket: "lab-volumes", accessKeyId, secretAccessKey };
  const { S3Client, CreateBucketCommand } = await import("@aws-sdk/client-s3");
  const client = new S3Client({ endpoint, region: s3.region, forcePathStyle: true, credentials: { accessKeyId, secretAccessKey } });
  await client.send(new CreateBucketCommand({ Bucket: s3.bucket }));
  client.destroy();
  return { s3, state: { pid, port } };
}

function spawnS3(labDir: string, port: number, accessKeyId: string, secretAccessKey: string): number {
  const dir = path.join(labDir, "s3");
  const out = fs.openSync(path.join(dir, "versitygw.log"), "a");
  // Credentials reach versitygw through its environment, not its command line.
  // --iam-dir: S3 users besides the root one (the rotation test creates and deletes them).
  fs.mkdirSync(path.join(dir, "iam"), { recursive: true });
  const child = spawn(path.join(BIN, "versitygw"),
    ["--port", `127.0.0.1:${port}`, "--health", "/health", "--iam-dir", path.join(dir, "iam"),
      "posix", "--sidecar", path.join(dir, "meta"), path.join(dir, "data")],
    { detached: true, stdio: ["ignore", out, out], env: { ...process.env, ROOT_ACCESS_KEY: accessKeyId, ROOT_SECRET_KEY: secretAccessKey } });
  child.unref();
  fs.closeSync(out);
  return child.pid!;
}

export function labEnv(labDir: string): Record<string, string> {
  return {
    PATH: [BIN, path.dirname(process.execPath), process.env.PATH ?? "/usr/bin:/bin"].join(":"),
    PULUMI_HOME: path.join(labDir, "pulumi-home"),
    PULUMI_BACKEND_URL: `file://${path.join(labDir, "pulumi-state")}`,
    PULUMI_CONFIG_PASSPHRASE: "lab-passphrase-not-a-secret",
    PULUMI_SKIP_UPDATE_CHECK: "true",
    PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION: "true",
    PULUMI_AUTOMATION_API_SKIP_VERSION_CHECK: "true",
    AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: "true",
  };
}

export async function up(labDir: string, hosts: number): Promise<LabJson> {
  if (fs.existsSync(path.join(labDir, "state.json"))) {
    throw new Error(`a lab already runs in ${labDir}: run 'npm run lab -- down --dir ${labDir}' first`);
  }
  fs.mkdirSync(labDir, { recursive: true });
  const state: LabState = { s3: { pid: 0, port: 0 }, hosts: [] };
  const saveState = () => fs.writeFileSync(path.join(labDir, "state.json"), JSON.stringify(state, null, 2));
  saveState();
  try {
    // A lab without hosts (S3 only) needs no guest image nor golden state.
    await timed("toolchain and image checked", async () => ensureTools(hosts > 0));
    if (hosts > 0) await ensureGolden();
    const keyPath = path.join(labDir, "id_ed25519");
    run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "lab", "-f", keyPath]);
    const s3 = await timed("S3 server started", () => startS3(labDir));
    state.s3 = s3.state;
    saveState();
    const labKeyPub = fs.readFileSync(keyPath + ".pub", "utf8");
    // Every host's port first: each guest forwards to all of them (peerAddress).
    const ports: number[] = [];
    while (ports.length < hosts) { const p = await freePort(); if (!ports.includes(p)) ports.push(p); }
    const started = await timed(`${hosts} host(s) started`, async () => {
      const res = [];
      // Restores run two at a time: the machine has two cores.
      for (let i = 1; i <= hosts; i += 2) {
        const batch = [startHost(labDir, i - 1, s3.state.port, labKeyPub, ports)];
        if (i + 1 <= hosts) batch.push(startHost(labDir, i, s3.state.port, labKeyPub, ports));
        for (const r of await Promise.all(batch)) {
          res.push(r);
          state.hosts.push(r.state);
          saveState();
        }
      }
      return res;
    });
    const keys = new Set(started.map((s) => s.host.hostKey));
    if (keys.size !== started.length) throw new Error("lab hosts came up with the same SSH host key: their random state was not reseeded");
    const lab: LabJson = {
      dir: labDir,
      s3: s3.s3,
      hosts: started.map((s) => s.host),
      tools: { pulumi: path.join(BIN, "pulumi"), rustic: path.join(BIN, "rustic"), node: process.execPath },
      env: labEnv(labDir),
    };
    fs.mkdirSync(path.join(labDir, "pulumi-state"), { recursive: true });
    fs.mkdirSync(path.join(labDir, "pulumi-home"), { recursive: true });
    fs.writeFileSync(path.join(labDir, "lab.json"), JSON.stringify(lab, null, 2), { mode: 0o600 });
    return lab;
  } catch (e) {
    await down(labDir);
    throw e;
  }
}

export async function down(labDir: string): Promise<void> {
  const file = path.join(labDir, "state.json");
  if (!fs.existsSync(file)) {
    log(`no lab in ${labDir}`);
    return;
  }
  const state = JSON.parse(fs.readFileSync(file, "utf8")) as LabState;
  const pids = [state.s3.pid, ...state.hosts.map((h) => h.pid)].filter((p) => p > 0);
  for (const pid of pids) {
    try { process.kill(pid, "SIGKILL"); } catch { /* already gone */ }
  }
  await waitFor("the lab's processes to exit", 20000, async () => pids.every((p) => !alive(p)));
  fs.rmSync(labDir, { recursive: true, force: true });
  log(`stopped ${pids.length} process(es) and removed ${labDir}`);
}

export function status(labDir: string): string {
  const file = path.join(labDir, "state.json");
  if (!fs.existsSync(file)) return `no lab in ${labDir}`;
  const state = JSON.parse(fs.readFileSync(file, "utf8")) as LabState;
  const lines = [`lab in ${labDir}`, `  s3      pid ${state.s3.pid} port ${state.s3.port} ${alive(state.s3.pid) ? "running" : "STOPPED"}`];
  for (const h of state.hosts) lines.push(`  ${h.name}  pid ${h.pid} ssh 127.0.0.1:${h.sshPort} ${alive(h.pid) ? "running" : "STOPPED"}`);
  return lines.join("\n");
}

/** The SSH target of a lab host (its key read from the lab's key file). */
export function hostTarget(h: LabHost) {
  return { address: h.address, port: h.port, user: h.user, privateKey: fs.readFileSync(h.privateKeyPath, "utf8"), hostKey: h.hostKey };
}

/** Runs a script as root on a lab host; returns stdout, throws on a non-zero exit. */
export async function runOnHost(h: LabHost, script: string, timeoutMs = 3600_000): Promise<string> {
  const r = await Remote.connect(hostTarget(h), { attempts: 3 });
  try {
    return (await r.run(script, { timeoutMs })).stdout;
  } finally {
    r.dispose();
  }
}

/** Freezes (or thaws) a host: to the world it is gone, as a crashed or cut-off machine would be. */
export async function freezeHost(labDir: string, name: string, frozen: boolean): Promise<void> {
  const state = JSON.parse(fs.readFileSync(path.join(labDir, "state.json"), "utf8")) as LabState;
  const h = state.hosts.find((x) => x.name === name);
  if (!h) throw new Error(`no host ${name} in ${labDir}`);
  await hmp(h.dir, frozen ? "stop" : "cont");
}

/** Stops the lab's S3 server: for outage tests. */
export async function stopS3(labDir: string): Promise<void> {
  const state = JSON.parse(fs.readFileSync(path.join(labDir, "state.json"), "utf8")) as LabState;
  try { process.kill(state.s3.pid, "SIGKILL"); } catch { /* gone */ }
  await waitFor("the S3 server to stop", 10000, async () => !alive(state.s3.pid));
}

/** Starts the lab's S3 server again with the same port, credentials and data. */
export async function restartS3(labDir: string): Promise<void> {
  const file = path.join(labDir, "state.json");
  const state = JSON.parse(fs.readFileSync(file, "utf8")) as LabState;
  const lab = JSON.parse(fs.readFileSync(path.join(labDir, "lab.json"), "utf8")) as LabJson;
  if (alive(state.s3.pid)) return;
  state.s3.pid = spawnS3(labDir, state.s3.port, lab.s3.accessKeyId, lab.s3.secretAccessKey);
  fs.writeFileSync(file, JSON.stringify(state, null, 2));
  await waitFor("the S3 server (versitygw)", 30000, async () => (await fetch(`${lab.s3.endpoint}/health`)).ok);
}

async function main(argv: string[]) {
  const cmd = argv[0];
  const opt = (name: string, dflt: string) => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 && argv[i + 1] ? argv[i + 1] : dflt;
  };
  const labDir = path.resolve(opt("dir", path.join(REPO, ".lab")));
  if (cmd === "up") {
    const lab = await up(labDir, Number(opt("hosts", "2")));
    log(`ready: ${path.join(labDir, "lab.json")}`);
    console.log(status(labDir));
    void lab;
  } else if (cmd === "down") {
    await down(labDir);
  } else if (cmd === "status") {
    console.log(status(labDir));
  } else if (cmd === "tools") {
    ensureTools();
  } else {
    console.error("usage: npm run lab -- up [--hosts N] [--dir D] | status [--dir D] | down [--dir D] | tools");
    process.exit(2);
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).catch((e) => {
    console.error(`[lab] error: ${e.message ?? e}`);
    process.exit(1);
  });
}
