// SSH transport: one connection per operation, host key pinned, retries on dial, a timeout
// on every command, and secrets passed on stdin (never on a command line).
import type { NodeSSH } from "node-ssh";
import { command, quote } from "../host/shell";
import { CommandError, DialError, UserError } from "../errors";

/** How to reach a host, as remote.Connection of @pulumi/command describes it. */
export interface SshTarget {
  address: string;
  port: number;
  user: string;
  /** The private key's content; without it the SSH agent is used. */
  privateKey?: string;
  /** Passphrase of an encrypted privateKey. */
  privateKeyPassword?: string;
  /** The SSH agent's socket (default SSH_AUTH_SOCK). */
  agentSocketPath?: string;
  /** Pinned host key, "ssh-ed25519 AAAA..." as in known_hosts (without the host name): ed25519, ecdsa or rsa. */
  hostKey: string;
  /** A bastion the host is reached through. */
  proxy?: Omit<SshTarget, "proxy" | "dialErrorLimit" | "perDialTimeout">;
  /** Dial attempts (default 5). */
  dialErrorLimit?: number;
  /** Seconds per dial (default 20). */
  perDialTimeout?: number;
}

/** The host key algorithms that present a key of this type: the server then offers exactly the pinned key. */
export function hostKeyAlgorithms(type: string): string[] {
  if (type === "ssh-rsa") return ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"];
  return [type];
}

export interface RunResult {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  /** Data for the command's stdin: the way secrets and file contents reach a host. */
  stdin?: string | Buffer;
  /** Default 10 minutes. */
  timeoutMs?: number;
  /** Resolve with the result instead of throwing on a non-zero exit. */
  allowFailure?: boolean;
  /** Said in the error when the command fails. */
  hint?: string;
  /** Called with each line of stdout as it arrives (progress). */
  onLine?: (line: string) => void;
}

export interface ConnectOptions {
  /** Dial attempts before giving up (default 5). */
  attempts?: number;
  /** Per-dial timeout (default 20 s). */
  dialTimeoutMs?: number;
  /** Delay between attempts (default 2 s, doubled each time up to 15 s). */
  retryDelayMs?: number;
  log?: (msg: string) => void;
}

/** Parses "ssh-ed25519 AAAA... [comment]" into its key blob. */
export function parseHostKey(hostKey: string): { type: string; blob: Buffer } {
  const parts = hostKey.trim().split(/\s+/);
  if (parts.length < 2 || !/^(ssh-|ecdsa-)/.test(parts[0]) || !/^[A-Za-z0-9+/]+=*$/.test(parts[1])) {
    throw new UserError(`host key "${hostKey.slice(0, 40)}" is not in "ssh-ed25519 AAAA..." form (the line of the host's /etc/ssh/ssh_host_ed25519_key.pub)`);
  }
  return { type: parts[0], blob: Buffer.from(parts[1], "base64") };
}

export class Remote {
  private constructor(
    private readonly ssh: NodeSSH,
    readonly target: SshTarget,
    readonly name: string,
    /** The bastion's connection the host is reached through, closed with this one. */
    private readonly via?: Remote,
  ) {
    // A connection that fails later (a reset link) must not crash the process with an unhandled
    // 'error': the command it carried fails, and the pool drops it (onClose).
    ssh.connection?.on("error", () => undefined);
    // The host's connection runs inside the bastion's: when that goes, so does this one.
    via?.onClose(() => { try { ssh.connection?.end(); } catch { /* already gone */ } });
  }

  /** Connects, verifying the pinned host key; retries dial failures but never a key mismatch. */
  static async connect(target: SshTarget, opts: ConnectOptions = {}): Promise<Remote> {
    const { NodeSSH } = require("node-ssh") as typeof import("node-ssh");
    const name = `${target.user}@${target.address}:${target.port}${target.proxy ? ` (via ${target.proxy.address}:${target.proxy.port})` : ""}`;
    const attempts = opts.attempts ?? target.dialErrorLimit ?? 5;
    const pinned = parseHostKey(target.hostKey);
    let delay = opts.retryDelayMs ?? 2000;
    let lastError: unknown;
    const t0 = Date.now();
    for (let attempt = 1; attempt <= attempts; attempt++) {
      let mismatch: string | undefined;
      const ssh = new NodeSSH();
      let via: Remote | undefined;
      try {
        const auth: Record<string, unknown> = {};
        if (target.privateKey !== undefined) {
          auth.privateKey = target.privateKey;
          if (target.privateKeyPassword !== undefined) auth.passphrase = target.privateKeyPassword;
        }
        const agent = target.agentSocketPath ?? (target.privateKey === undefined ? process.env.SSH_AUTH_SOCK : undefined);
        if (agent) auth.agent = agent;
        let endpoint: Record<string, unknown> = { host: target.address, port: target.port };
        if (target.proxy) {
          // The bastion is verified by its own pinned key; the host's connection runs inside a
          // channel the bastion opens to it.
          via = await Remote.connect({ ...target.proxy, dialErrorLimit: 1, perDialTimeout: target.perDialTimeout }, { attempts: 1, dialTimeoutMs: opts.dialTimeoutMs });
          endpoint = { sock: await via.forwardTo(target.address, target.port) };
        }
        await ssh.connect({
          ...endpoint,
          username: target.user,
          ...auth,
          algorithms: { serverHostKey: hostKeyAlgorithms(pinned.type) as any },
          readyTimeout: opts.dialTimeoutMs ?? (target.perDialTimeout !== undefined ? target.perDialTimeout * 1000 : 20000),
          keepaliveInterval: 10000,
          keepaliveCountMax: 6,
          hostVerifier: (key: Buffer) => {
            if (key.equals(pinned.blob)) return true;
            mismatch = `${keyType(key)} ${key.toString("base64")}`;
            return false;
          },
        });
        trace(name, "connect", t0);
        return new Remote(ssh, target, name, via);
      } catch (err) {
        ssh.dispose();
        via?.dispose();
        if ((err as { noRetry?: boolean }).noRetry) throw err; // the bastion's key or login: no retry (ssh2 sets its own `fatal`)
        if (mismatch !== undefined) {
          throw Object.assign(new UserError(
            `host key of ${name} does not match the pinned hostKey: the host offered "${mismatch}". ` +
              `If the host was reinstalled on purpose, set hostKey to the new key; otherwise do not trust this host.`,
          ), { noRetry: true });
        }
        const pinnedType = /no matching host key/i.test(String(err));
        if (pinnedType) {
          throw Object.assign(new UserError(`${name} offers no ${pinned.type} host key, the type of the pinned hostKey: pin one of the keys it has ` +
            `(ssh-keyscan shows them)`), { noRetry: true });
        }
        if (/authentication methods failed|All configured authentication|Too many authentication failures/i.test(String(err))) {
          throw Object.assign(new UserError(`SSH login to ${name} was refused: check its user, privateKey (and privateKeyPassword) or SSH agent (${String(err)})`), { noRetry: true });
        }
        lastError = err;
        if (attempt < attempts) {
          opts.log?.(`ssh ${name}: ${(err as Error).message}: retrying in ${Math.round(delay / 1000)} s (attempt ${attempt}/${attempts})`);
          await sleep(delay);
          delay = Math.min(delay * 2, 15000);
        }
      }
    }
    throw new DialError(`cannot reach ${name} over SSH after ${attempts} attempts: ${(lastError as Error)?.message ?? lastError}`);
  }

  /** Runs a shell script as root (through `sudo -n` when the user is not root). */
  async run(script: string, opts: RunOptions = {}): Promise<RunResult> {
    const wrapped = this.target.user === "root" ? `sh -c ${quote(script)}` : `sudo -n sh -c ${quote(script)}`;
    const timeoutMs = opts.timeoutMs ?? 600_000;
    let channel: { close(): void; signal?(s: string): void } | undefined;
    let timedOut = false;
    let partial = "";
    const t0 = Date.now();
    const timer = setTimeout(() => {
      timedOut = true;
      try { channel?.signal?.("KILL"); } catch { /* best effort */ }
      try { channel?.close(); } catch { /* best effort */ }
    }, timeoutMs);
    try {
      const res = await this.ssh.execCommand(wrapped, {
        stdin: opts.stdin === undefined ? undefined : toStream(opts.stdin),
        onChannel: (c) => { channel = c; },
        onStdout: opts.onLine
          ? (chunk) => {
              partial += chunk.toString("utf8");
              const lines = partial.split("\n");
              partial = lines.pop() ?? "";
              for (const l of lines) opts.onLine!(l);
            }
          : undefined,
      });
      if (timedOut) {
        throw new CommandError(this.name, script, null, "timeout", res.stdout, res.stderr,
          `the command did not finish within ${Math.round(timeoutMs / 1000)} s`);
      }
      if (res.code !== 0 && !opts.allowFailure) {
        throw new CommandError(this.name, script, res.code, res.signal, res.stdout, res.stderr, opts.hint);
      }
      return res;
    } finally {
      clearTimeout(timer);
      trace(this.name, script, t0);
    }
  }

  /** Runs an argument vector as root. */
  async runArgv(argv: string[], opts: RunOptions = {}): Promise<RunResult> {
    return this.run(command(argv), opts);
  }

  /** Writes a file atomically as root with the given mode; content travels on stdin. */
  async writeFile(path: string, content: string | Buffer, mode = "0644"): Promise<void> {
    await this.writeFiles([{ path, content, mode }]);
  }

  /**
   * Writes several files in one round trip, each atomically (temporary name, then rename),
   * between the scripts `before` and `after` (e.g. a daemon-reload). Contents travel on stdin, one base64 line per file, and
   * reach the files through shell builtins: never on a command line.
   */
  async writeFiles(files: { path: string; content: string | Buffer; mode: string }[], opts: { before?: string; after?: string } = {}): Promise<void> {
    const tag = `${process.pid}-${require("crypto").randomBytes(4).toString("hex")}`;
    const lines = ["set -e", "umask 077", opts.before ?? "true"];
    for (const f of files) {
      const tmp = `${f.path}.tmp-${tag}`;
      lines.push(`mkdir -p "$(dirname ${quote(f.path)})"`, `IFS= read -r line`,
        `printf '%s' "$line" | base64 -d > ${quote(tmp)}`, `chmod ${quote(f.mode)} ${quote(tmp)}`, `mv -f ${quote(tmp)} ${quote(f.path)}`);
    }
    lines.push("line=", opts.after ?? "true");
    const stdin = files.map((f) => (Buffer.isBuffer(f.content) ? f.content : Buffer.from(f.content, "utf8")).toString("base64")).join("\n") + "\n";
    await this.run(lines.join("\n"), { stdin });
  }

  /** Reads a file as root; undefined when it does not exist. */
  async readFile(path: string): Promise<string | undefined> {
    const res = await this.run(`if [ -e ${quote(path)} ]; then cat ${quote(path)}; else exit 3; fi`, { allowFailure: true });
    if (res.code === 3) return undefined;
    if (res.code !== 0) throw new CommandError(this.name, `cat ${path}`, res.code, res.signal, res.stdout, res.stderr);
    return res.stdout;
  }

  /** Uploads a local file through SFTP to a temporary path, then installs it as root. */
  async putFile(localPath: string, remotePath: string, mode = "0755"): Promise<void> {
    const tag = `${process.pid}-${require("crypto").randomBytes(4).toString("hex")}`;
    const tmp = `/tmp/.upload-${tag}`;
    const t0 = Date.now();
    await this.ssh.putFile(localPath, tmp);
    trace(this.name, `sftp ${localPath}`, t0);
    // Installed beside the target, then renamed: a concurrent user never sees a half-written file.
    const beside = `${remotePath}.tmp-${tag}`;
    await this.run(`set -e; install -D -m ${quote(mode)} ${quote(tmp)} ${quote(beside)}; mv -f ${quote(beside)} ${quote(remotePath)}; rm -f ${quote(tmp)}`);
  }

  /**
   * Takes an exclusive lock on the host that lasts as long as this connection (or until
   * release): a second operation on the same volume waits, even when the first one's pulumi
   * was killed and its provider process still runs.
   */
  async holdLock(path: string, what: string, waitSeconds: number, log?: (m: string) => void): Promise<() => void> {
    const { PassThrough } = require("stream") as typeof import("stream");
    const stdin = new PassThrough();
    let locked!: () => void;
    let failed!: (e: Error) => void;
    const ready = new Promise<void>((res, rej) => { locked = res; failed = rej; });
    const notice = setTimeout(() => log?.(`waiting for another operation on ${what} to finish`), 3000);
    const script = `mkdir -p "$(dirname ${quote(path)})" && exec flock -w ${waitSeconds} ${quote(path)} sh -c 'echo locked; exec cat >/dev/null'`;
    const wrapped = this.target.user === "root" ? `sh -c ${quote(script)}` : `sudo -n sh -c ${quote(script)}`;
    const done = this.ssh.execCommand(wrapped, {
      stdin,
      onStdout: (chunk) => { if (chunk.toString().includes("locked")) locked(); },
    }).then((res) => {
      failed(new UserError(`another operation on ${what} has been running on ${this.name} for over ${waitSeconds} s; ` +
        `wait for it (or stop it) and run again${res.stderr ? ` (${res.stderr.trim()})` : ""}`));
    }, (e) => failed(e));
    try {
      await ready;
    } finally {
      clearTimeout(notice);
    }
    return () => { stdin.end(); void done; };
  }

  /** Calls fn once when the connection closes or fails (it is of no use then). */
  onClose(fn: () => void): void {
    let done = false;
    const once = () => { if (!done) { done = true; fn(); } };
    this.ssh.connection?.on("close", once);
    this.ssh.connection?.on("end", once);
    this.ssh.connection?.on("error", once);
  }

    /** A TCP channel from this host to address:port (this host as a bastion). */
  forwardTo(address: string, port: number): Promise<import("stream").Duplex> {
    return new Promise((resolve, reject) => {
      this.ssh.connection!.forwardOut("127.0.0.1", 0, address, port, (err, stream) => {
        if (err) reject(new Error(`the bastion ${this.name} cannot reach ${address}:${port}: ${err.message}`));
        else resolve(stream);
      });
    });
  }

  dispose(): void {
    // A host that goes away while the connection closes must not crash the process with an
    // unhandled socket error: the connection is done with either way.
    this.ssh.connection?.on("error", () => undefined);
    this.ssh.dispose();
    this.via?.dispose();
  }
}

/**
 * Connections shared by the operations of one provider process (one `pulumi up`): one per host
 * while at most OPS_PER_CONNECTION operations use it, since each may hold its lock channel, the
 * host-tools lock and a command at once, and sshd allows 10 sessions per connection by default.
 * An idle connection closes after a while; a dead one is dropped and the next operation dials anew.
 */
const OPS_PER_CONNECTION = 3;
const IDLE_MS = 20_000;
interface Pooled { key: string; ready: Promise<Remote>; ops: number; dead: boolean; idle?: NodeJS.Timeout }
const pool = new Map<string, Pooled[]>();

function poolKey(t: SshTarget): string {
  const { createHash } = require("crypto") as typeof import("crypto");
  return createHash("sha256").update(JSON.stringify([t.address, t.port, t.user, t.hostKey, t.privateKey ?? "", t.privateKeyPassword ?? "",
    t.agentSocketPath ?? "", t.proxy ?? null, t.dialErrorLimit ?? null, t.perDialTimeout ?? null])).digest("hex");
}

function drop(p: Pooled): void {
  p.dead = true;
  const list = (pool.get(p.key) ?? []).filter((x) => x !== p);
  if (list.length) pool.set(p.key, list); else pool.delete(p.key);
}

/** A connection to target from the pool (dialled when none has room); `release` when done with it. */
export async function acquireRemote(target: SshTarget, opts?: ConnectOptions): Promise<{ remote: Remote; release: () => void }> {
  const key = poolKey(target);
  let p = (pool.get(key) ?? []).find((x) => !x.dead && x.ops < OPS_PER_CONNECTION);
  if (!p) {
    const entry: Pooled = { key, ready: Remote.connect(target, opts), ops: 0, dead: false };
    pool.set(key, [...(pool.get(key) ?? []), entry]);
    // A connection that closes (a lost host, a cut link) leaves the pool, its bastion's with it.
    entry.ready.then((r) => r.onClose(() => { drop(entry); r.dispose(); }), () => drop(entry));
    p = entry;
  }
  const entry = p;
  entry.ops++;
  if (entry.idle) { clearTimeout(entry.idle); entry.idle = undefined; }
  let remote: Remote;
  try {
    remote = await entry.ready;
  } catch (e) {
    entry.ops--;
    throw e;
  }
  let released = false;
  return {
    remote,
    release: () => {
      if (released) return;
      released = true;
      entry.ops--;
      if (entry.ops === 0 && !entry.dead) {
        entry.idle = setTimeout(() => { drop(entry); remote.dispose(); }, IDLE_MS);
        entry.idle.unref();
      }
    },
  };
}

/** Runs fn with a (shared) connection to target. */
export async function withRemote<T>(target: SshTarget, fn: (r: Remote) => Promise<T>, opts?: ConnectOptions): Promise<T> {
  const { remote, release } = await acquireRemote(target, opts);
  try {
    return await fn(remote);
  } finally {
    release();
  }
}

function keyType(blob: Buffer): string {
  try {
    const len = blob.readUInt32BE(0);
    return blob.subarray(4, 4 + len).toString("ascii");
  } catch {
    return "unknown";
  }
}

function toStream(data: string | Buffer) {
  const { Readable } = require("stream") as typeof import("stream");
  return Readable.from([Buffer.isBuffer(data) ? data : Buffer.from(data, "utf8")]);
}

/**
 * With DBOXED_VOLUMES_TRACE=<file>, every dial and command appends its duration to that file
 * (scripts only, never stdin: secrets travel there), to see where an operation's time goes.
 */
function trace(name: string, what: string, t0: number): void {
  const file = process.env.DBOXED_VOLUMES_TRACE;
  if (!file) return;
  const line = `${new Date().toISOString()} ${((Date.now() - t0) / 1000).toFixed(2)}s ${name} ${what.replace(/\s+/g, " ").slice(0, 160)}\n`;
  try { require("fs").appendFileSync(file, line); } catch { /* tracing is best effort */ }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
