// Helpers for lab-backed tests: the running lab, SSH to its hosts, and the real pulumi CLI
// run on a program in a scratch directory against the lab's local file backend.
import { execFile } from "child_process";
import * as fs from "fs";
import * as path from "path";
import type { LabHost, LabJson } from "../../lab/lab";
import { hostTarget, REPO } from "../../lab/lab";
import { withRemote } from "../../provider/remote/ssh";
import { readLease } from "../../provider/storage/lease";

let current: LabJson | undefined;
export function setLab(lab: LabJson) { current = lab; }
export function lab(): LabJson {
  if (!current) throw new Error("the lab is not running: the root hook in test/lab/hooks.ts failed to start it (see its error above)");
  return current;
}

export { hostTarget };

/** A volume's lease in the lab's S3 server, as the provider reads it. */
export function labLease(prefix: string, volumeId: string) {
  const s = lab().s3;
  return readLease({ endpoint: s.endpoint, region: s.region, bucket: s.bucket, prefix, forcePathStyle: true,
    accessKeyId: s.accessKeyId, secretAccessKey: s.secretAccessKey }, volumeId);
}

/** Installs (not starts) an application unit on h that rewrites <mountPath>/heartbeat every second while it runs. */
export async function installHeartbeat(h: LabHost, unit: string, mountPath: string) {
  await onHost(h, `cat > /etc/systemd/system/${unit} <<UNIT
[Unit]
RequiresMountsFor=${mountPath}
[Service]
ExecStart=/bin/bash -c 'while true; do date +%%s.%%N > ${mountPath}/heartbeat; sleep 1; done'
UNIT
systemctl daemon-reload`);
}

/**
 * A shell loop that waits until a unit is neither active nor activating: a oneshot service that
 * runs is "activating", which `systemctl is-active` does not count as active.
 */
export function untilInactive(unit: string): string {
  return `while systemctl is-active -q ${unit} || [ "$(systemctl show -p ActiveState --value ${unit})" = activating ]; do sleep 1; done`;
}

/**
 * Runs a script as root on a lab host, over the provider's own connection pool: a login costs
 * about a second on the emulated guests, and tests poll hosts often. A connection that died (a
 * rebooted or stopped guest) leaves the pool; the next call dials anew.
 */
export async function onHost(h: LabHost, script: string, opts: { allowFailure?: boolean; timeoutMs?: number } = {}) {
  return withRemote(hostTarget(h), (r) => r.run(script, opts), { attempts: 3 });
}

/** Reboots a lab host (a real guest restart) and waits until systemd is up again; sets its clock. */
export async function rebootHost(h: LabHost): Promise<void> {
  await onHost(h, "systemctl reboot", { allowFailure: true }).catch(() => undefined);
  await new Promise((r) => setTimeout(r, 5000));
  for (let i = 0; i < 60; i++) {
    try {
      const r = await onHost(h, "systemctl is-system-running --wait", { allowFailure: true, timeoutMs: 120_000 });
      if (/running|degraded/.test(r.stdout)) {
        await onHost(h, `date -s @${Math.floor(Date.now() / 1000)} >/dev/null`);
        return;
      }
    } catch {
      await new Promise((r) => setTimeout(r, 3000));
    }
  }
  throw new Error(`host ${h.name} did not come back after a reboot`);
}

/**
 * For suites whose tests are steps of one story: after a failed step the rest fail at once,
 * naming it (mocha's own bail would also skip unrelated suites after any earlier failure).
 */
export function stepByStep(suite: Mocha.Suite, onFailure?: () => Promise<unknown>): void {
  let failed: string | undefined;
  suite.afterEach(function () {
    if (this.currentTest?.state === "failed") failed ??= this.currentTest.title;
  });
  suite.beforeEach(function () {
    if (failed) throw new Error(`not run: the earlier step "${failed}" failed`);
  });
  // A story cut short leaves its volumes behind, and their timers would disturb later suites.
  suite.afterAll(async function () {
    if (failed && onFailure) await onFailure();
  });
}

export interface PulumiResult { code: number; stdout: string; stderr: string }

/** A Pulumi project in a scratch directory, run with the real CLI. */
export class Stack {
  readonly dir: string;
  constructor(public name: string, fixture: string, readonly extraEnv: Record<string, string> = {}) {
    this.dir = path.join(lab().dir, "programs", name);
    fs.rmSync(this.dir, { recursive: true, force: true });
    fs.mkdirSync(this.dir, { recursive: true });
    fs.cpSync(path.join(REPO, "test", "fixtures", fixture), this.dir, { recursive: true });
    const modules = process.env.DBOXED_TEST_PROGRAM_MODULES;
    if (modules) {
      // A user's program (test/sdk-newest.sh): the packed package installed next to the user's SDK.
      fs.symlinkSync(modules, path.join(this.dir, "node_modules"));
    } else {
      // The program loads this checkout as the installed package, and the one @pulumi/pulumi.
      fs.mkdirSync(path.join(this.dir, "node_modules"));
      fs.symlinkSync(REPO, path.join(this.dir, "node_modules", "pulumi-dboxed-volumes"));
      fs.symlinkSync(path.join(REPO, "node_modules", "@pulumi"), path.join(this.dir, "node_modules", "@pulumi"));
    }
  }

  env(): NodeJS.ProcessEnv {
    return { ...process.env, ...lab().env, ...this.extraEnv, LAB_JSON: path.join(lab().dir, "lab.json") };
  }

  /** Runs `pulumi <args>`; resolves with the exit code (does not throw). */
  run(args: string[], opts: { input?: Record<string, unknown>; timeoutMs?: number; killSignal?: NodeJS.Signals; env?: Record<string, string> } = {}): Promise<PulumiResult> {
    if (opts.input) fs.writeFileSync(path.join(this.dir, "input.json"), JSON.stringify(opts.input, null, 2));
    return new Promise((resolve) => {
      execFile(lab().tools.pulumi, [...args, "--non-interactive", "--cwd", this.dir, "--stack", this.name],
        { env: { ...this.env(), ...(opts.env ?? {}) }, maxBuffer: 64 * 1024 * 1024, timeout: opts.timeoutMs ?? 1_800_000, killSignal: opts.killSignal ?? "SIGTERM" },
        (err, stdout, stderr) => {
          const code = err ? (typeof (err as any).code === "number" ? (err as any).code : 1) : 0;
          if (process.env.DBOXED_TEST_VERBOSE === "1") process.stderr.write(stdout + stderr);
          resolve({ code, stdout, stderr });
        });
    });
  }

  /**
   * Starts `pulumi <args>`: `kill("all")` kills it with its language host and provider, as a
   * lost machine would; `kill("cli")` only the CLI, leaving the provider of the killed run
   * working, as after a killed terminal. `reap()` ends whatever of them still runs.
   */
  start(args: string[], opts: { input?: Record<string, unknown>; env?: Record<string, string> } = {}) {
    if (opts.input) fs.writeFileSync(path.join(this.dir, "input.json"), JSON.stringify(opts.input, null, 2));
    const { spawn } = require("child_process") as typeof import("child_process");
    const child = spawn(lab().tools.pulumi, [...args, "--non-interactive", "--cwd", this.dir, "--stack", this.name],
      { env: { ...this.env(), ...(opts.env ?? {}) }, detached: true, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "", stderr = "";
    child.stdout!.on("data", (d) => { stdout += d; });
    child.stderr!.on("data", (d) => { stderr += d; });
    let exited = false;
    // "exit", not "close": after a CLI-only kill the orphaned provider keeps the pipes open.
    const done = new Promise<PulumiResult>((resolve) => child.on("exit", (code, signal) => {
      exited = true;
      setTimeout(() => resolve({ code: code ?? (signal ? 137 : 1), stdout, stderr }), 200);
    }));
    const pid = child.pid!;
    // pulumi starts its plugins (language host, provider) in process groups of their own: the
    // tree is found by parent pid, recorded before the CLI dies (its children are reparented then).
    let tree: number[] = [];
    const descendants = (root: number): number[] => {
      const { execFileSync } = require("child_process") as typeof import("child_process");
      const rows = execFileSync("ps", ["-eo", "pid=,ppid="]).toString().trim().split("\n").map((l) => l.trim().split(/\s+/).map(Number));
      const out: number[] = [];
      const walk = (p: number) => { for (const [c, pp] of rows) if (pp === p) { out.push(c); walk(c); } };
      walk(root);
      return out;
    };
    const killAll = (pids: number[]) => { for (const p of pids) { try { process.kill(p, "SIGKILL"); } catch { /* gone */ } } };
    return {
      done,
      running: () => !exited,
      kill: (what: "all" | "cli") => {
        tree = descendants(pid);
        killAll(what === "all" ? [pid, ...tree] : [pid]);
      },
      reap: () => killAll([pid, ...tree]),
    };
  }

  async ok(args: string[], opts: { input?: Record<string, unknown>; timeoutMs?: number } = {}): Promise<PulumiResult> {
    const r = await this.run(args, opts);
    if (r.code !== 0) throw new Error(`pulumi ${args.join(" ")} failed (${r.code}):\n${r.stdout}\n${r.stderr}`);
    return r;
  }

  async init(): Promise<void> {
    await this.ok(["stack", "init"]);
  }

  /** `pulumi stack rename`: this object then runs the stack under its new name. */
  async rename(to: string): Promise<void> {
    await this.ok(["stack", "rename", to]);
    this.name = to;
  }

  up(input?: Record<string, unknown>) { return this.run(["up", "--yes", "--skip-preview"], { input }); }
  preview(input?: Record<string, unknown>) { return this.run(["preview"], { input }); }

  async outputs(): Promise<Record<string, any>> {
    const r = await this.ok(["stack", "output", "--json", "--show-secrets"]);
    return JSON.parse(r.stdout);
  }

  /** A resource's outputs as stored in state (what `pulumi refresh` updated), by resource name. */
  async resourceOutputs(name: string): Promise<Record<string, any>> {
    const r = await this.ok(["stack", "export", "--show-secrets"]);
    const res = JSON.parse(r.stdout).deployment.resources.find((x: any) => x.urn.endsWith(`::${name}`));
    if (!res) throw new Error(`no resource named ${name} in stack ${this.name}`);
    return res.outputs;
  }

  /** Deletes this stack's lock files, as pulumi's own message tells a user to after a killed run. */
  clearLocks(): void {
    const root = lab().env.PULUMI_BACKEND_URL.replace(/^file:\/\//, "");
    const walk = (d: string) => {
      if (!fs.existsSync(d)) return;
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        const p = path.join(d, e.name);
        if (e.isDirectory()) walk(p);
        else if (p.includes(`${path.sep}locks${path.sep}`) && path.basename(path.dirname(p)) === this.name) fs.rmSync(p);
      }
    };
    walk(root);
  }

  /** The raw state file of this stack, as stored by the file backend. */
  stateText(): string {
    const root = lab().env.PULUMI_BACKEND_URL.replace(/^file:\/\//, "");
    const found: string[] = [];
    const walk = (d: string) => {
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        const p = path.join(d, e.name);
        if (e.isDirectory()) walk(p);
        else if (e.name === `${this.name}.json`) found.push(p);
      }
    };
    walk(root);
    return found.map((f) => fs.readFileSync(f, "utf8")).join("\n");
  }
}
