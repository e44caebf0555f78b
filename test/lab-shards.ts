// Runs the lab-backed test files in parallel shards, each with a lab of its own (S3 server and
// three hosts): the emulated guests leave a core idle while a test waits (on a timer, a lease, a
// pulumi CLI starting), and a second lab fills it. Files go to shards longest first, by the
// wall time each took last (a cache written by test/summary-reporter.js; committed defaults
// in test/lab/file-seconds.json for a fresh machine). Lines are prefixed with their shard.
//   node --import tsx test/lab-shards.ts [test files...]   DBOXED_TEST_SHARDS (default 2; 1 runs one lab)
import { spawn } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { CACHE, down, ensureGolden, ensureTools, REPO } from "../lab/lab";

const LAB_DIR = path.join(REPO, "test", "lab");
const CACHED_SECONDS = path.join(CACHE, "lab-file-seconds.json");

function readJson(file: string): Record<string, number> {
  try { return JSON.parse(fs.readFileSync(file, "utf8")); } catch { return {}; }
}

/** Longest first, each to the shard with the least work so far. */
export function plan(files: string[], seconds: Record<string, number>, shards: number): string[][] {
  const est = (f: string) => seconds[path.basename(f)] ?? 150;
  const out = Array.from({ length: shards }, () => ({ files: [] as string[], load: 0 }));
  for (const f of [...files].sort((a, b) => est(b) - est(a) || a.localeCompare(b))) {
    const s = out.reduce((m, x) => (x.load < m.load ? x : m));
    s.files.push(f); s.load += est(f);
  }
  return out.filter((s) => s.files.length).map((s) => s.files.sort());
}

/** Mocha's options from the lab config, without its spec (positional files would add to it). */
function mochaArgs(): string[] {
  const rc = JSON.parse(fs.readFileSync(path.join(REPO, "test", ".mocharc.lab.json"), "utf8"));
  const args: string[] = [];
  for (const r of rc.require ?? []) args.push("--require", r);
  for (const o of rc["node-option"] ?? []) args.push("--node-option", o);
  args.push("--timeout", String(rc.timeout), "--slow", String(rc.slow), "--reporter", rc.reporter);
  if (rc["forbid-only"]) args.push("--forbid-only");
  if (rc["forbid-pending"]) args.push("--forbid-pending");
  return args;
}

const children = new Set<import("child_process").ChildProcess>();

function runShard(i: number, files: string[], labDir: string, summary: string): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn(path.join(REPO, "node_modules", ".bin", "mocha"), ["--no-config", ...mochaArgs(), ...files], {
      cwd: REPO, stdio: ["ignore", "pipe", "pipe"],
      // Tools and the golden state are made once, here, before the shards start.
      env: { ...process.env, DBOXED_TEST_LAB_DIR: labDir, TEST_FILE_SECONDS: CACHED_SECONDS, TEST_SUMMARY_FILE: summary, DBOXED_LAB_SKIP_TOOLCHAIN: "1" },
    });
    children.add(child);
    const prefix = `[${i}] `;
    for (const stream of [child.stdout!, child.stderr!]) {
      let rest = "";
      stream.on("data", (d: Buffer) => {
        const lines = (rest + d.toString()).split("\n");
        rest = lines.pop()!;
        for (const l of lines) process.stdout.write(prefix + l + "\n");
      });
      stream.on("end", () => { if (rest) process.stdout.write(prefix + rest + "\n"); });
    }
    child.on("close", (code, signal) => { children.delete(child); resolve(code ?? (signal ? 1 : 0)); });
  });
}

async function main(argv: string[]) {
  const files = argv.length ? argv : fs.readdirSync(LAB_DIR).filter((f) => f.endsWith(".test.ts")).map((f) => path.join("test", "lab", f));
  const shards = Math.max(1, Number(process.env.DBOXED_TEST_SHARDS ?? "2"));
  const seconds = { ...readJson(path.join(LAB_DIR, "file-seconds.json")), ...readJson(CACHED_SECONDS) };
  const groups = plan(files, seconds, shards);
  const base = process.env.DBOXED_TEST_LAB_DIR ?? path.join(REPO, ".lab-test");
  const dirs = groups.map((_, i) => (groups.length > 1 ? `${base}-${i + 1}` : base));
  // Labs left by an interrupted run (of any shard count) would hold cores and memory.
  const parent = path.dirname(base), name = path.basename(base);
  for (const d of fs.existsSync(parent) ? fs.readdirSync(parent) : []) {
    if (d === name || /^-\d+$/.test(d.slice(name.length)) && d.startsWith(name)) await down(path.join(parent, d));
  }
  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    process.once(sig, async () => {
      for (const c of children) c.kill("SIGTERM");
      await Promise.all(dirs.map((d) => down(d).catch(() => undefined)));
      process.exit(sig === "SIGINT" ? 130 : 143);
    });
  }
  if (process.env.DBOXED_LAB_SKIP_TOOLCHAIN !== "1") ensureTools(true);
  // The golden guest state is built once, before the labs that clone it start side by side.
  await ensureGolden();
  groups.forEach((g, i) => process.stdout.write(`[${i + 1}] ${g.map((f) => path.basename(f)).join(" ")} (about ${g.reduce((n, f) => n + (seconds[path.basename(f)] ?? 150), 0)} s)\n`));
  const summaries = groups.map((_, i) => path.join(os.tmpdir(), `lab-shard-${process.pid}-${i + 1}.summary`));
  const codes = await Promise.all(groups.map((g, i) => runShard(i + 1, g, dirs[i], summaries[i])));
  // Each shard's counts go to the overall summary; a shard that ended before printing its own
  // (a crash) counts as a failure, never as tests that silently did not run.
  let crashed = false;
  codes.forEach((c, i) => {
    let counts = "";
    try { counts = fs.readFileSync(summaries[i], "utf8"); fs.rmSync(summaries[i]); } catch { /* none written */ }
    if (!counts.trim()) { crashed = true; counts = "0 1 0\n"; process.stdout.write(`[${i + 1}] ended (exit ${c}) before its test summary: counted as a failure\n`); }
    if (process.env.TEST_SUMMARY_FILE) fs.appendFileSync(process.env.TEST_SUMMARY_FILE, counts);
    process.stdout.write(`[${i + 1}] exit ${c}\n`);
  });
  process.exit(crashed || codes.some((c) => c !== 0) ? 1 : 0);
}

if (require.main === module) {
  main(process.argv.slice(2)).catch((e) => { console.error(`[shards] ${e.stack ?? e}`); process.exit(1); });
}
