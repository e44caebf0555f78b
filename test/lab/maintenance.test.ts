// Repository maintenance lease: the agent's own functions (sourced from agent.sh, run by bash on
// this machine) against the lab's real S3 server: compare-and-swap, not due, held, expiry and
// takeover, many hosts racing, renewal during a long task, a lease written by another host or
// not renewable (S3 stopped) stops the run, failed tasks (with and without a message). Then on
// a lab host: a backup starts maintenance, refresh shows the last prune and check as outputs of
// the VolumeProvider, and node-exporter serves the host's maintenance metrics.
import { expect } from "chai";
import { execFile } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { lab, onHost, Stack, stepByStep, untilInactive } from "./harness";
import { restartS3, stopS3 } from "../../lab/lab";
import { backupMarksListUrl, maintenanceUrl, readMaintenance } from "../../provider/storage/lease";
import { S3Proxy } from "./s3proxy";

const AGENT = path.join(__dirname, "..", "..", "provider", "host", "agent.sh");
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** The real rustic on this machine, with profile PROFILE(.toml) and no cache; resolves with its stdout. */
const rusticWith = (profile: string, args: string[]) => new Promise<string>((resolve, reject) =>
  execFile(lab().tools.rustic, ["-P", profile, "--no-progress", "--no-cache", ...args], { env: { ...process.env, NO_COLOR: "1" }, maxBuffer: 16 << 20 },
    (err, stdout, stderr) => err ? reject(new Error(`rustic ${args.join(" ")}: ${stderr}`)) : resolve(stdout)));

describe("repository maintenance lease (agent functions against the lab's S3 server)", function () {
  const prefix = `maint-${crypto.randomBytes(3).toString("hex")}`;
  let dir: string;
  let env: NodeJS.ProcessEnv;
  const s3 = () => ({ ...lab().s3, prefix, forcePathStyle: true });
  const record = (task: "prune" | "check" = "prune") => readMaintenance(s3(), task);

  /** Runs `maintain_task TASK INTERVAL work` as host `me`; work logs to the shared log, sleeps, and fails if told to. */
  function runTask(me: string, opts: { task?: "prune" | "check"; interval?: number; ttl?: number; workSeconds?: number; fail?: boolean; quiet?: boolean; hook?: string } = {}) {
    const failure = opts.quiet ? "return 3" : 'echo "pack 1234 is damaged" >&2; return 3';
    const script = `. ${JSON.stringify(AGENT)}
work() { echo "${me} start $(date +%s.%N)" >> "$LOG"; sleep ${opts.workSeconds ?? 0}; echo "${me} end $(date +%s.%N)" >> "$LOG"; ${opts.fail ? failure : "true"}; }
hostname() { echo host-${me}; }
${opts.hook ?? ""}
maintain_task ${opts.task ?? "prune"} ${opts.interval ?? 3600} work`;
    return new Promise<{ code: number; out: string }>((resolve) => {
      execFile("bash", ["-c", script], { env: { ...env, VOLUME_ID: me, MAINT_TTL: String(opts.ttl ?? 300), MAINT_YIELD_WAIT: "6", PRUNE_BACKUP_WAIT: "6" } }, (err, stdout, stderr) =>
        resolve({ code: err ? (err as any).code ?? 1 : 0, out: stdout + stderr }));
    });
  }
  const log = () => fs.existsSync(path.join(dir, "log")) ? fs.readFileSync(path.join(dir, "log"), "utf8").trim().split("\n").filter(Boolean) : [];
  const put = async (body: Record<string, unknown>, task: "prune" | "check" = "prune") => {
    const { PutObjectCommand } = await import("@aws-sdk/client-s3");
    const { s3Client } = await import("../../provider/storage/s3");
    const c = s3Client(s3());
    await c.send(new PutObjectCommand({ Bucket: s3().bucket, Key: `${prefix}-meta/maintenance/${task}.json`, Body: JSON.stringify(body, null, 2) }));
    c.destroy();
  };
  const now = () => Math.floor(Date.now() / 1000);
  /** A lease record as the agent writes it: by default free, its last run two hours ago. */
  const lease = (over: Record<string, unknown> = {}) => ({ holder: "", expiresAt: 0, runs: 0, lastRunAt: now() - 7200, lastResult: "ok",
    lastMessage: "ok", lastHolder: "x", lastDurationSeconds: 0, lastSubset: "", ...over });
  const metricsText = () => fs.readdirSync(path.join(dir, "metrics")).map((f) => fs.readFileSync(path.join(dir, "metrics", f), "utf8")).join();

  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "maint-"));
    fs.writeFileSync(path.join(dir, "s3.curl"), `user = "${lab().s3.accessKeyId}:${lab().s3.secretAccessKey}"\n`, { mode: 0o600 });
    fs.mkdirSync(path.join(dir, "metrics"));
    env = { ...process.env, LOG: path.join(dir, "log"), CURL_CONFIG: path.join(dir, "s3.curl"), S3_REGION: lab().s3.region,
      MAINT_URL: maintenanceUrl(lab().s3.endpoint, lab().s3.bucket, prefix, true), METRICS_DIR: path.join(dir, "metrics"),
      MAINT_LIST_URL: backupMarksListUrl(lab().s3.endpoint, lab().s3.bucket, prefix, true),
      REPOSITORY: `s3://${lab().s3.bucket}/${prefix}`, CHECK_SUBSETS: "10" };
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  it("the first host creates the lease (If-None-Match), runs the task once and records it; the lease is free again", async () => {
    const r = await runTask("a");
    expect(r.code, r.out).to.equal(0);
    expect(log().map((l) => l.split(" ").slice(0, 2).join(" "))).to.deep.equal(["a start", "a end"]);
    const m = (await record())!;
    expect([m.holder, m.expiresAt, m.runs, m.lastResult, m.lastHolder]).to.deep.equal(["", 0, 1, "ok", "a@host-a"]);
    expect(Math.abs(m.lastRunAt - now())).to.be.lessThan(30);
    const metric = metricsText();
    expect(metric).to.contain(`dboxed_repository_maintenance_success{task="prune",repository="s3://${lab().s3.bucket}/${prefix}"} 1`);
  });

  it("a task that is not due does not run", async () => {
    const r = await runTask("b", { interval: 3600 });
    expect(r.code, r.out).to.equal(0);
    expect(log().length).to.equal(2);
    expect((await record())!.runs).to.equal(1);
  });

  it("a host remembers a task's last run as it read it, and skips reading the lease until the interval has passed since then", async () => {
    const cache = path.join(dir, "cache-");
    const r = await runTask("c", { interval: 3600, hook: `MAINT_CACHE=${JSON.stringify(cache)}` });
    expect(r.code, r.out).to.equal(0);
    const m = (await record())!;
    const [at, url, readAt] = fs.readFileSync(`${cache}prune.last`, "utf8").trim().split(" ");
    // lastRunAt on this host's clock, taken as early as the server clock's offset allows.
    expect(Number(at)).to.be.within(m.lastRunAt - 3, m.lastRunAt);
    expect(url).to.equal(`${env.MAINT_URL}prune.json`);
    expect(Number(readAt)).to.be.within(now() - 30, now());
    const notDue = (task: string, interval: number | string, over = "") => new Promise<boolean>((resolve) =>
      execFile("bash", ["-c", `. ${JSON.stringify(AGENT)}; MAINT_CACHE=${JSON.stringify(cache)}; ${over} maint_known_not_due ${task} ${interval}`],
        { env }, (err) => resolve(!err)));
    expect(await notDue("prune", 3600), "run just now, due in an hour").to.equal(true);
    expect(await notDue("prune", 0), "turned off: never due").to.equal(true);
    expect(await notDue("check", 3600), "another task, never read").to.equal(false);
    expect(await notDue("prune", 3600, "MAINT_URL=http://127.0.0.1:1/other/;"), "another repository").to.equal(false);
    expect(await notDue("prune", 3600, "MAINT_CACHE=;"), "no record kept (the functions' own tests)").to.equal(false);
    const rec = (a: string | number, r: string | number) => fs.writeFileSync(`${cache}prune.last`, `${a} ${url} ${r}\n`);
    rec(now() - 100, now());
    expect(await notDue("prune", 50), "the interval since has passed").to.equal(false);
    expect(await notDue("prune", 200), "the interval since has not passed").to.equal(true);
    rec(now() + 600, now());
    expect(await notDue("prune", 3600), "a last run in the future: the clock was set back").to.equal(false);
    // A slow answer rounds the server clock's offset up: a last run seconds ahead (seen in a loaded run).
    rec(now() + 20, now());
    expect(await notDue("prune", 3600), "a last run seconds ahead: the offset rounded up").to.equal(true);
    rec(now() - 10, now() + 600);
    expect(await notDue("prune", 3600), "read in the future: the clock was set back").to.equal(false);
    rec(now() - 10, now() - 3700);
    expect(await notDue("prune", 86400), "read more than an hour ago (the lease may have been reset since)").to.equal(false);
    rec(-5, now());
    expect(await notDue("prune", 3600), "never run (lastRunAt 0)").to.equal(false);
    rec(`0${now() - 10}`, now());
    expect(await notDue("prune", 3600), "a number with a leading zero: not read as octal, not trusted").to.equal(false);
    rec(now() - 10, now());
    expect(await notDue("prune", 3600), "the same record, well formed").to.equal(true);
    expect(await notDue("prune", "09"), "an interval of 09 s is 9 s, long past").to.equal(false);
    fs.rmSync(`${cache}prune.last`);
  });

  it("a lease held by a live holder is respected; an expired one is taken over", async () => {
    const last = now() - 7200;
    await put(lease({ holder: "x@host-x", expiresAt: now() + 120, runs: 7, lastRunAt: last, lastHolder: "x@host-x", lastDurationSeconds: 3 }));
    const held = await runTask("c", { interval: 60 });
    expect(held.out).to.match(/maintenance prune: x@host-x runs it/);
    expect(log().length).to.equal(2);
    expect((await record())!.holder).to.equal("x@host-x");
    await put(lease({ holder: "x@host-x", expiresAt: now() - 1, runs: 7, lastRunAt: last, lastHolder: "x@host-x", lastDurationSeconds: 3 }));
    const taken = await runTask("c", { interval: 60 });
    expect(taken.code, taken.out).to.equal(0);
    expect(log().slice(2).map((l) => l.split(" ").slice(0, 2).join(" "))).to.deep.equal(["c start", "c end"]);
    const m = (await record())!;
    expect([m.holder, m.runs, m.lastHolder, m.lastResult]).to.deep.equal(["", 8, "c@host-c", "ok"]);
  });

  it("of eight hosts racing for a due task exactly one runs it (compare-and-swap)", async () => {
    await put(lease({ runs: 8, lastHolder: "c@host-c" }));
    fs.rmSync(path.join(dir, "log"));
    const rs = await Promise.all([1, 2, 3, 4, 5, 6, 7, 8].map((i) => runTask(`r${i}`, { interval: 60, workSeconds: 3 })));
    for (const r of rs) expect(r.code, r.out).to.equal(0);
    const starts = log().filter((l) => / start /.test(l));
    expect(starts.length, log().join("\n")).to.equal(1);
    expect((await record())!.runs).to.equal(9);
  });

  it("prune waits while a check holds its lease (a prune deletes packs a check reads), and gives its own lease back", async () => {
    await put(lease({ runs: 20 }));
    await put(lease({ holder: "chk@host-chk", expiresAt: now() + 120, runs: 3 }), "check");
    const before = log().length;
    const r = await runTask("p", { interval: 60 });
    expect(r.code, r.out).to.equal(0);
    expect(r.out).to.match(/maintenance prune: check runs on chk@host-chk: not at the same time/);
    expect(log().length).to.equal(before);
    const m = (await record())!;
    expect([m.holder, m.expiresAt, m.runs]).to.deep.equal(["", 0, 20]);
    // Once the check's lease has expired, the prune runs.
    await put(lease({ holder: "chk@host-chk", expiresAt: now() - 1, runs: 3 }), "check");
    const r2 = await runTask("p", { interval: 60 });
    expect(r2.out).to.match(/maintenance prune: run 21 ok/);
    await put(lease({ runs: 3 }), "check");
  });

  // rustic 0.11's prune must never run beside a backup (see agent.sh, backup_gate).
  const mark = async (volume: string, body?: Record<string, unknown>) => {
    const { PutObjectCommand, DeleteObjectCommand } = await import("@aws-sdk/client-s3");
    const { s3Client } = await import("../../provider/storage/s3");
    const c = s3Client(s3());
    const Key = `${prefix}-meta/maintenance/backup-${volume}.json`;
    await c.send(body ? new PutObjectCommand({ Bucket: s3().bucket, Key, Body: JSON.stringify(body, null, 2) }) : new DeleteObjectCommand({ Bucket: s3().bucket, Key }));
    c.destroy();
  };

  it("a prune gives way to a backup that runs (its mark), and runs once the mark is gone or lapsed", async () => {
    await put(lease({ runs: 30 }));
    await mark("vol-a", { holder: "vol-a@host-a", expiresAt: now() + 600 });
    await mark("vol-b", { holder: "vol-b@host-b", expiresAt: now() - 5 }); // a dead host's, lapsed
    const before = log().length;
    const r = await runTask("p", { interval: 60 });
    expect(r.code, r.out).to.equal(0);
    expect(r.out).to.match(/maintenance prune: waiting for a backup to end \(vol-a@host-a\)/);
    expect(r.out).to.match(/maintenance prune: a backup runs \(vol-a@host-a\): a prune never runs beside a backup/);
    expect(log().length, "the prune did not run").to.equal(before);
    expect((await record())!.runs).to.equal(30);
    // The backup ends while the prune waits for it (holding its lease): the prune runs then.
    const r2p = runTask("p", { interval: 60 });
    await sleep(2500);
    expect((await record())!.holder, "the prune holds its lease while it waits").to.equal("p@host-p");
    await mark("vol-a");
    const r2 = await r2p;
    expect(r2.out).to.match(/maintenance prune: run 31 ok/);
    await mark("vol-b");
  });

  it("a backup waits while a prune holds the repository, then marks itself running; its end removes the mark", async () => {
    await put(lease({ holder: "prn@host-prn", expiresAt: now() + 600, runs: 31 }));
    const markedAt = path.join(dir, "marked");
    const gate = new Promise<{ code: number; out: string }>((resolve) => execFile("bash", ["-c", `. ${JSON.stringify(AGENT)}
hostname() { echo host-g; }; HOSTNAME=host-g; die() { echo "died: $*"; exit 1; }
backup_gate; date +%s.%N > ${JSON.stringify(markedAt)}; sleep 2; backup_unmark`],
      { env: { ...env, VOLUME_ID: "vol-g", SRV_OFF: "0" } }, (err, stdout, stderr) => resolve({ code: err ? 1 : 0, out: stdout + stderr })));
    await sleep(8000);
    expect(fs.existsSync(markedAt), "the backup waits for the prune").to.equal(false);
    const freedAt = Date.now() / 1000;
    await put(lease({ runs: 31 }));
    // Marked once the prune's lease is free: what a prune starting now would see.
    let seen = false;
    for (let i = 0; i < 40 && !seen; i++) { seen = fs.existsSync(markedAt); if (!seen) await sleep(250); }
    expect(seen).to.equal(true);
    expect(Number(fs.readFileSync(markedAt, "utf8"))).to.be.greaterThan(freedAt);
    const listed = await new Promise<string>((resolve) => execFile("bash", ["-c", `. ${JSON.stringify(AGENT)}; backups_running 0`], { env }, (_e, out) => resolve(out)));
    expect(listed.trim()).to.equal("vol-g@host-g");
    const r = await gate;
    expect(r.code, r.out).to.equal(0);
    expect(r.out).to.match(/waiting for the repository's prune on prn@host-prn to end/);
    const after = await new Promise<string>((resolve) => execFile("bash", ["-c", `. ${JSON.stringify(AGENT)}; backups_running 0`], { env }, (_e, out) => resolve(out)));
    expect(after.trim(), "the mark is gone").to.equal("");
  });

  it("of hosts racing for a due prune and a due check, the two tasks never run at once; the check gives way", async () => {
    let ran = 0;
    for (let round = 0; round < 3; round++) {
      await put(lease({ runs: 30 + round }));
      await put(lease({ runs: 30 + round }), "check");
      fs.rmSync(path.join(dir, "log"), { force: true });
      const rs = await Promise.all([1, 2, 3, 4].flatMap((i) => [
        runTask(`p${i}`, { task: "prune", interval: 60, workSeconds: 2 }),
        runTask(`k${i}`, { task: "check", interval: 60, workSeconds: 2 })]));
      for (const r of rs) expect(r.code, r.out).to.equal(0);
      const spans = new Map<string, { start: number; end: number }>();
      for (const l of log()) {
        const [who, what, at] = l.split(" ");
        const sp = spans.get(who) ?? { start: 0, end: Infinity };
        if (what === "start") sp.start = Number(at); else sp.end = Number(at);
        spans.set(who, sp);
      }
      const prunes = [...spans].filter(([w]) => w.startsWith("p")), checks = [...spans].filter(([w]) => w.startsWith("k"));
      ran += spans.size;
      // A check gives way to a prune: the prune runs every round.
      expect(prunes.length, log().join("\n")).to.equal(1);
      expect(checks.length, log().join("\n")).to.be.at.most(1);
      for (const [, a] of prunes) for (const [, b] of checks) {
        expect(a.end <= b.start || b.end <= a.start, log().join("\n")).to.equal(true);
      }
    }
    expect(ran).to.be.at.least(3);
  });

  // A host so busy that the agent stalls (seen in the soak: minutes at Nice=19 between reading the
  // lease and starting the task). A stall is injected once, by a marker file, at one point.
  const stallOnce = (fn: string, seconds: number) => `eval "orig_$(declare -f ${fn})"
${fn}() { if [ ! -e "$LOG.stalled-$VOLUME_ID" ]; then touch "$LOG.stalled-$VOLUME_ID"; sleep ${seconds}; fi; orig_${fn} "$@"; }`;

  it("a host that stalls while writing its lease does not start with it nearly expired, so the other task never overlaps it", async () => {
    await put(lease({ runs: 50 }));
    await put(lease({ runs: 50 }), "check");
    fs.rmSync(path.join(dir, "log"), { force: true });
    // The prune's lease (12 s) lands 9 s after its expiry was computed; a check comes at 14 s, when it has expired.
    const prune = runTask("stall", { task: "prune", interval: 60, ttl: 12, workSeconds: 8, hook: stallOnce("s3_put_cas", 9) });
    await sleep(14_000);
    const check = await runTask("chk2", { task: "check", interval: 60, ttl: 12, workSeconds: 1 });
    const p = await prune;
    expect(p.code, p.out).to.equal(0);
    expect(p.out).to.match(/maintenance prune: this host took \d+ s to take its lease and read check's; -?\d+ s of it left is too little to start/);
    expect(check.out).to.match(/maintenance check: run 51 .*started/);
    expect(log().filter((l) => / start /.test(l)).map((l) => l.split(" ")[0]), log().join("\n")).to.deep.equal(["chk2"]);
  });

  it("a host that stalls after writing its lease does not start with too little of it left; the lease is given back", async () => {
    await put(lease({ runs: 60 }));
    await put(lease({ runs: 60 }), "check");
    fs.rmSync(path.join(dir, "log"), { force: true });
    const r = await runTask("late", { task: "prune", interval: 60, ttl: 12, workSeconds: 1, hook: stallOnce("maint_busy", 8) });
    expect(r.code, r.out).to.equal(0);
    expect(r.out).to.match(/maintenance prune: this host took \d+ s to take its lease and read check's; -?\d+ s of it left is too little to start: the next run tries again/);
    expect(log(), "the task did not run").to.deep.equal([]);
    const m = (await record())!;
    expect([m.holder, m.expiresAt, m.runs]).to.deep.equal(["", 0, 60]);
  });

  it("a host too slow to read the S3 server's clock (its offset would be unsure) does not take the lease", async () => {
    await put(lease({ runs: 70 }));
    fs.rmSync(path.join(dir, "log"), { force: true });
    const r = await runTask("slowclock", { task: "prune", interval: 60, ttl: 12, workSeconds: 1, hook: stallOnce("s3_get", 5) });
    expect(r.code, r.out).to.equal(0);
    expect(r.out).to.match(/maintenance prune: this host took \d+ s to read the S3 server's clock: too slow to hold a lease/);
    expect(log(), "the task did not run").to.deep.equal([]);
    expect((await record())!.runs).to.equal(70);
  });

  it("a renewal that lands after the lease lapsed stops the run (another host may have started the other task)", async () => {
    await put(lease({ runs: 80 }));
    fs.rmSync(path.join(dir, "log"), { force: true });
    // Lease of 12 s, renewed at 4 s; that renewal stalls 13 s, then succeeds (nobody wrote the lease).
    const r = await runTask("lapsed", { task: "prune", interval: 60, ttl: 12, workSeconds: 40, hook: stallOnce("maint_renew", 13) });
    expect(r.out).to.match(/maintenance prune: its lease lapsed before the renewal landed .*: stopping the run/);
    expect(log().filter((l) => / end /.test(l)), "the work did not finish").to.deep.equal([]);
  });

  it("a task longer than the lease is renewed while it runs, so no other host starts it meanwhile", async () => {
    await put(lease({ runs: 9 }));
    fs.rmSync(path.join(dir, "log"), { force: true });
    // A 12 s lease renewed every 4 s; the task takes 20 s; others try at 6, 13 and 17 s (past the first expiry).
    const long = runTask("long", { interval: 60, ttl: 12, workSeconds: 20 });
    const tries: Promise<{ code: number; out: string }>[] = [];
    for (const at of [6000, 7000, 4000]) { await sleep(at); tries.push(runTask(`late${at}`, { interval: 60, ttl: 12 })); }
    const l = await long;
    expect(l.code, l.out).to.equal(0);
    for (const t of await Promise.all(tries)) expect(t.out).to.match(/long@host-long runs it/);
    expect(log().filter((x) => / start /.test(x)).length, log().join("\n")).to.equal(1);
    const m = (await record())!;
    expect([m.holder, m.runs, m.lastHolder]).to.deep.equal(["", 10, "long@host-long"]);
    expect(m.lastDurationSeconds).to.be.at.least(20);
  });

  it("a holder whose lease was taken meanwhile does not overwrite the new holder's record", async () => {
    await put(lease({ runs: 10 }));
    const slow = runTask("slow", { interval: 60, workSeconds: 6 });
    await sleep(3000);
    await put(lease({ holder: "thief@host-t", expiresAt: now() + 600, runs: 11 }));
    const r = await slow;
    expect(r.out).to.match(/its lease changed while it ran \(HTTP 412\): this run is not recorded/);
    expect((await record())!.holder).to.equal("thief@host-t");
  });

  it("a holder whose lease another host wrote stops its run at the next renewal", async () => {
    await put(lease({ runs: 20 }));
    fs.rmSync(path.join(dir, "log"), { force: true });
    const run = runTask("robbed", { interval: 60, ttl: 12, workSeconds: 20 });
    await sleep(2000);
    await put(lease({ holder: "thief@host-t", expiresAt: now() + 600, runs: 21 }));
    const t0 = Date.now();
    const r = await run;
    expect(r.out).to.match(/maintenance prune: another host wrote its lease: stopping the run/);
    expect(Date.now() - t0, "stopped long before its 20 s of work").to.be.lessThan(12_000);
    expect(log().filter((l) => / end /.test(l)), "the work did not finish").to.deep.equal([]);
    expect((await record())!.holder).to.equal("thief@host-t");
  });

  it("a holder that cannot reach S3 to renew stops its run before the lease expires", async () => {
    await put(lease({ runs: 30 }));
    fs.rmSync(path.join(dir, "log"), { force: true });
    const run = runTask("cut", { interval: 60, ttl: 30, workSeconds: 60 });
    await sleep(2000);
    await stopS3(lab().dir);
    let r: { code: number; out: string };
    try {
      r = await run;
    } finally {
      await restartS3(lab().dir);
    }
    expect(r.out).to.match(/maintenance prune: its lease could not be renewed before it expired: stopping the run/);
    expect(log().filter((l) => / end /.test(l)), "the work did not finish").to.deep.equal([]);
    // It stopped while its lease still held (taken for 30 s, stopped with 20 s to spare at the latest).
    const m = (await record())!;
    expect(m.holder).to.equal("cut@host-cut");
    expect(m.expiresAt).to.be.greaterThan(now() - 25);
  });

  it("a holder whose S3 server hangs (no answer, no refusal) stops its run before the lease expires", async () => {
    // Every renewal request is bounded by a tenth of the lease: one that hangs cannot outlast it.
    await put(lease({ runs: 40 }));
    fs.rmSync(path.join(dir, "log"), { force: true });
    const takenBy = now() + 3;   // the lease is taken within the first seconds, for 60 s
    const run = runTask("hung", { interval: 60, ttl: 60, workSeconds: 61 });
    await sleep(3000);
    const pid = JSON.parse(fs.readFileSync(path.join(lab().dir, "state.json"), "utf8")).s3.pid as number;
    process.kill(pid, "SIGSTOP");
    let stoppedAt = 0;
    try {
      for (let i = 0; i < 120 && !stoppedAt; i++) {
        await sleep(1000);
        const busy = await new Promise<boolean>((resolve) => execFile("pgrep", ["-f", "sleep 61"], (err) => resolve(!err)));
        if (!busy) stoppedAt = now();
      }
    } finally {
      process.kill(pid, "SIGCONT");
    }
    const r = await run;
    expect(r.out).to.match(/maintenance prune: its lease could not be renewed before it expired: stopping the run/);
    expect(log().filter((l) => / end /.test(l)), "the work did not finish").to.deep.equal([]);
    // (The record is not read back: a PUT cut off by the frozen server can leave it torn on the lab's server.)
    expect(stoppedAt, "the work was stopped").to.be.greaterThan(0);
    expect(stoppedAt, `stopped at ${stoppedAt}, the lease taken by ${takenBy} held until ${takenBy + 60} at least`).to.be.lessThan(takenBy + 60);
  });

  it("a task that fails without a word on stderr is recorded as failed with its exit code", async () => {
    await put(lease({ runs: 40 }));
    const r = await runTask("mute", { interval: 60, fail: true, quiet: true });
    expect(r.code, r.out).to.equal(0);
    const m = (await record())!;
    expect([m.holder, m.lastResult, m.lastMessage, m.lastHolder]).to.deep.equal(["", "failed", "exit code 3", "mute@host-mute"]);
  });

  it("a failed task is recorded as failed with its message, and its metric says 0", async () => {
    await put(lease({ runs: 11 }));
    const r = await runTask("f", { interval: 60, fail: true });
    expect(r.code, r.out).to.equal(0);
    expect(r.out).to.match(/maintenance prune: run 12 FAILED/);
    const m = (await record())!;
    expect([m.holder, m.lastResult, m.lastHolder]).to.deep.equal(["", "failed", "f@host-f"]);
    expect(m.lastMessage).to.match(/pack 1234 is damaged/);
    const metric = metricsText();
    expect(metric).to.contain(`dboxed_repository_maintenance_success{task="prune",repository="s3://${lab().s3.bucket}/${prefix}"} 0`);
  });

  it("a task that succeeds says what it did of note in the journal (its TASK: lines) and its summary in the record", async () => {
    await put(lease({ runs: 20 }), "check");
    const r = await runTask("s", { task: "check", interval: 60, hook: `work() { echo "[INFO] noise" >&2; echo "check: snapshot abcd1234 was forgotten ...: checking the others again without it" >&2; echo "check: ok; left out abcd1234 (forgotten while the check ran: gone, not damaged)" >&2; }` });
    expect(r.code, r.out).to.equal(0);
    expect(r.out).to.match(/maintenance check: run 21 ok/);
    expect(r.out).to.match(/^check: snapshot abcd1234 was forgotten/m);
    expect(r.out).to.match(/^check: ok; left out abcd1234/m);
    expect(r.out).not.to.match(/\[INFO\] noise/);
    const m = (await record("check"))!;
    expect([m.lastResult, m.lastMessage]).to.deep.equal(["ok", "ok; left out abcd1234 (forgotten while the check ran: gone, not damaged)"]);
  });
});

describe("prune and check under concurrent backups (the agent's retry_race, rustic's answers replayed)", function () {
  // The soak saw both stop on races with other volumes: a snapshot saved after prune had read the
  // index ("Tree ID ... not found in index"), a snapshot forgotten after it was listed (404), and
  // rustic itself crashing in check ("index still in use", src/index.rs:312) on a busy host. The
  // stand-in for the rustic binary answers as rustic did; the agent's rustic_ wrapper runs as is.
  // human-panic 2.0.8 as rustic 0.11.4 uses it: without RUST_BACKTRACE or CI it writes the report
  // to $TMPDIR and prints boilerplate; with either set it prints to stderr instead. rustic is
  // built with panic = "abort": the process dies of SIGABRT, and bash reports that too.
  const banner = ["rustic-rs had a problem and crashed. To help us diagnose the problem you can send us a crash report.", "",
    'We have generated a report file at \\"$TMPDIR/report-1.toml\\". Submit an issue or email with the subject of \\"rustic-rs Crash Report\\" and include the report as an attachment.', "",
    "- Homepage: https://rustic.cli.rs/", "- Authors: the rustic-rs team", "", "We take privacy seriously, and do not perform any automated error collection. In order to improve the software, we rely on people to submit reports.", "", "Thank you kindly!"];
  // The real message carries the Debug form of the whole index on one line: megabytes.
  const crash = (cause: string) => `echo "[WARN] pack cdd4693d3c2a1b7e9f0a8d6c5b4e3f2a1908172635445362718293a4b5c6d7e8 not referenced in index. Can be a parallel backup job" >&2
report() { printf '%s\\n' 'name = "rustic-rs"' 'operating_system = "Debian GNU/Linux 13 [x86_64]"' 'crate_version = "0.11.4"' 'explanation = """' "Panic occurred in file '/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/rustic_core-0.13.0/src/index.rs' at line 312" '"""'
  printf 'cause = "%s' '${cause}'; yes 'IndexPack { id: PackId(Id(0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef)), blobs: [] }, ' | head -c 3000000 | tr -d '\\n'; printf '"\\nmethod = "Panic"\\nbacktrace = """\\n   0: 0x55d1 - core::panicking::panic\\n"""\\n'; }
if [ -n "\${RUST_BACKTRACE:-}" ] || [ -n "\${CI:-}" ]; then report >&2; else report > "$TMPDIR/report-1.toml"; printf '%s\\n' ${banner.map((l) => `"${l}"`).join(" ")} >&2; fi
kill -ABRT $$`;
  const SNAP_A = "2ea662310f5d8e4c7b6a5948372615049f8e7d6c5b4a39281706f5e4d3c2b1a0", SNAP_B = "7c1d9e0f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";
  const answer = {
    ok: 'echo "done" >&2; exit 0',
    forgottenC: `printf '%s\\n' "error: Reading file \\\`snapshots/${"c".repeat(64)}\\\` failed in the backend." "NotFound (persistent) at read, context: { response: Parts { status: 404 } }" >&2; exit 1`,
    forgotten: `printf '%s\\n' "[WARN] service=s3 name=lab-volumes path=snapshots/${SNAP_A} range=0-: read failed NotFound (persistent) at read" "error: Reading file \\\`snapshots/${SNAP_A}\\\` failed in the backend." "NotFound (persistent) at read, context: { uri: http://10.0.2.100:9000/lab-volumes/p/snapshots/${SNAP_A}, response: Parts { status: 404 } }" >&2; exit 1`,
    index: 'echo "error: Tree ID 4f1a2b7c not found in index" >&2; exit 1',
    gone: 'echo "NotFound (persistent) at read, context: { path: snapshots/2ea66231, response: Parts { status: 404 } } => S3Error { code: NoSuchKey }" >&2; exit 1',
    damaged: 'echo "error: pack 99 is damaged" >&2; exit 1',
    both: 'printf "%s\\n" "[ERROR] Error reading file Type: Snapshot, Id: 9f2ffd63" "NotFound (persistent) at read, context: { path: snapshots/9f2ffd63, status: 404 }" "[ERROR] pack 480e34ec: hash mismatch for blob 77aa" "error: check found errors!" >&2; exit 1',
    inUse: crash("index still in use: Index({Tree: TypeIndex { packs: ["),
    otherCrash: crash("called `Option::unwrap()` on a `None` value: "),
  };
  const run = (fn: string, answers: (keyof typeof answer)[], env: Record<string, string> = {}, lists: string[][] = [[SNAP_A]]) => new Promise<{ code: number; out: string; calls: number; args: string; left: string[] }>((resolve) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "race-"));
    const tmp = path.join(dir, "tmp");
    fs.mkdirSync(tmp);
    answers.forEach((a, k) => fs.writeFileSync(path.join(dir, `a${k + 1}`), answer[a]));
    // rustic_ calls: RUSTIC -P PROFILE --no-progress --cache-dir DIR ARGS...
    // `list snapshots` (a check's first step, and its test of a 404) answers from lists, in turn (the last one stays).
    lists.forEach((l, k) => fs.writeFileSync(path.join(dir, `l${k + 1}`), l.map((x) => `SnapshotId(${x})\n`).join("")));
    fs.writeFileSync(path.join(dir, "rustic"), `#!/bin/bash
shift 5
if [ "$1 $2" = "list snapshots" ]; then m=$(cat ${dir}/m 2>/dev/null || echo 0); [ -e ${dir}/l$((m + 1)) ] && m=$((m + 1)); echo $m > ${dir}/m; cat ${dir}/l$m; exit 0; fi
n=$(cat ${dir}/n 2>/dev/null || echo 0); n=$((n + 1)); echo $n > ${dir}/n; echo "$*" > ${dir}/args; . ${dir}/a$n
`, { mode: 0o755 });
    const script = `. ${JSON.stringify(AGENT)}
sleep() { :; }
RUSTIC=${dir}/rustic PROFILE=p KEEP_DELETE=300 MAINT_SUBSET=2/4 ${fn}`;
    execFile("bash", ["-c", script], { env: { ...process.env, ...env, TMPDIR: tmp }, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      const calls = Number(fs.readFileSync(path.join(dir, "n"), "utf8"));
      const args = fs.readFileSync(path.join(dir, "args"), "utf8").trim();
      const left = fs.readdirSync(tmp);
      fs.rmSync(dir, { recursive: true, force: true });
      resolve({ code: err ? (err as any).code ?? 1 : 0, out: stdout + stderr, calls, args, left });
    });
  });

  it("a prune that met a backup's new snapshot is tried again and succeeds", async () => {
    const r = await run("prune_repository", ["index", "ok"]);
    expect([r.code, r.calls, r.args], r.out).to.deep.equal([0, 2, "prune --keep-delete 300s"]);
    expect(r.out).to.match(/prune: the repository changed while prune read it .*: trying again \(attempt 2 of 3\)/);
  });

  it("a check that met a forgotten snapshot (404) is tried again and succeeds", async () => {
    const r = await run("check_repository", ["gone", "ok"]);
    expect([r.code, r.calls, r.args], r.out).to.deep.equal([0, 2, `check --read-data --read-data-subset 2/4 ${SNAP_A}`]);
    expect(r.out).to.match(/check: the repository changed while check read it/);
  });

  it("a check that could not read a snapshot another volume's retention forgot after the check listed it (404, no longer listed) runs again at once without it", async () => {
    const r = await run("check_repository", ["forgotten", "ok"], {}, [[SNAP_A, SNAP_B], [SNAP_B]]);
    expect([r.code, r.calls, r.args], r.out).to.deep.equal([0, 2, `check --read-data --read-data-subset 2/4 ${SNAP_B}`]);
    expect(r.out).to.match(/check: snapshot 2ea66231 was forgotten by another volume's retention after the check listed it: checking the others again without it/);
    expect(r.out).to.match(/check: ok; left out 2ea66231 \(forgotten while the check ran: gone, not damaged\)/);
    expect(r.out).not.to.match(/trying again/);
  });

  it("a 404 for a snapshot the check was not given (saved after the listing, forgotten since) is retried as a race", async () => {
    const r = await run("check_repository", ["forgottenC", "ok"], {}, [[SNAP_A, SNAP_B]]);
    expect([r.code, r.calls, r.args], r.out).to.deep.equal([0, 2, `check --read-data --read-data-subset 2/4 ${SNAP_A} ${SNAP_B}`]);
    expect(r.out).to.match(/check: the repository changed while check read it/);
    expect(r.out).not.to.match(/left out|without it/);
  });

  it("a snapshot that answered 404 but is still listed is not left out: retried as a race, then reported", async () => {
    const r = await run("check_repository", ["forgotten", "forgotten", "forgotten", "ok"], {}, [[SNAP_A, SNAP_B]]);
    expect([r.code, r.calls], r.out).to.deep.equal([1, 3]);
    expect(r.args).to.equal(`check --read-data --read-data-subset 2/4 ${SNAP_A} ${SNAP_B}`);
    expect(r.out).not.to.match(/left out|without it/);
  });

  it("it gives up after three such answers and fails with rustic's message", async () => {
    const r = await run("prune_repository", ["index", "gone", "index", "ok"]);
    expect([r.code, r.calls], r.out).to.deep.equal([1, 3]);
    expect(r.out).to.match(/not found in index\s*$/);
  });

  it("a check that found damage as well as a race is not retried: the damage is reported", async () => {
    const r = await run("check_repository", ["both", "ok"]);
    expect([r.code, r.calls], r.out).to.deep.equal([1, 1]);
    expect(r.out).to.match(/hash mismatch/);
  });

  it("any other failure is not retried", async () => {
    const r = await run("check_repository", ["damaged", "ok"]);
    expect([r.code, r.calls], r.out).to.deep.equal([1, 1]);
    expect(r.out).to.match(/pack 99 is damaged/);
  });

  it("a check that crashed inside rustic with \"index still in use\" is tried again, says why, and leaves no crash report", async () => {
    const r = await run("check_repository", ["inUse", "ok"]);
    expect([r.code, r.calls, r.args], r.out).to.deep.equal([0, 2, `check --read-data --read-data-subset 2/4 ${SNAP_A}`]);
    expect(r.out).to.match(/check: rustic crashed on a known rustic_core timing race .*: trying again \(attempt 2 of 3\): rustic crashed: index still in use: Index\(\{Tree: TypeIndex \{ packs: \[IndexPack \{ id: PackId.{0,160} \(rustic_core-0\.13\.0\/src\/index\.rs:312\)$/m);
    expect(r.out.split("\n").find((l) => l.includes("trying again")), r.out).not.to.match(/Aborted|Thank you kindly|We take privacy/);
    expect(r.out.length, "the index in the crash report is not printed").to.be.below(20_000);
    expect(r.left).to.deep.equal([]);
  });

  it("RUST_BACKTRACE or CI in the agent's environment does not turn the crash report into stderr", async () => {
    const r = await run("check_repository", ["inUse", "ok"], { RUST_BACKTRACE: "1", CI: "true" });
    expect([r.code, r.calls, r.left], r.out.slice(-2000)).to.deep.equal([0, 2, []]);
    expect(r.out.length).to.be.below(20_000);
    expect(r.out).to.match(/rustic crashed: index still in use/);
  });

  it("any other crash of rustic is not retried, and the failure names the panic", async () => {
    const r = await run("check_repository", ["otherCrash", "ok"]);
    expect([r.code, r.calls, r.left], r.out).to.deep.equal([134, 1, []]);
    expect(r.out).to.match(/rustic crashed: called `Option::unwrap\(\)` on a `None` value: IndexPack.{0,150} \(rustic_core-0\.13\.0\/src\/index\.rs:312\)\s*$/);
  });

  it("three crashes in a row fail the check with the crash's message", async () => {
    const r = await run("check_repository", ["inUse", "inUse", "inUse", "ok"]);
    expect([r.code, r.calls, r.left], r.out).to.deep.equal([134, 3, []]);
    expect(r.out).to.match(/rustic crashed: index still in use.*\s*$/);
  });
});

describe("repository maintenance on a lab host: started by a backup, shown by refresh, scraped from node-exporter", function () {
  const prefix = `mh-${crypto.randomBytes(3).toString("hex")}`;
  const volumeId = `mh-${crypto.randomBytes(3).toString("hex")}`;
  let stack: Stack;
  stepByStep(this, () => stack.run(["destroy", "--yes", "--skip-preview"]));
  const input = () => ({ provider: { s3: { prefix }, maintenance: { pruneInterval: 20, checkInterval: 20, checkSubsets: 3, keepDelete: "10m" } },
    volumes: [{ name: "m", host: 0, args: { volumeId, size: "128MiB", mountPath: "/srv/maint", backupSchedule: "hourly" } }] });

  before(async () => {
    stack = new Stack("maint", "volumes");
    await stack.init();
  });

  it("a backup starts prune and check (each run once, by this host); refresh shows them on the VolumeProvider", async () => {
    const res = await stack.up(input());
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const h = lab().hosts[0];
    const unit = `dboxed-volume-${volumeId}-maintain.service`;
    // The create's backup started maintenance; wait for it, then let the next backup start it again after the interval.
    const settle = untilInactive(unit);
    await onHost(h, settle, { timeoutMs: 600_000 });
    await sleep(21_000);
    await onHost(h, `head -c 2000000 /dev/urandom > /srv/maint/f; systemctl start dboxed-volume-${volumeId}-backup.service; sleep 2; ${settle}`, { timeoutMs: 600_000 });
    const journal = (await onHost(h, `journalctl -u ${unit} --no-pager -o cat`)).stdout;
    expect(journal.match(/maintenance prune: run \d+ ok/g)?.length, journal).to.equal(2);
    expect(journal.match(/maintenance check: run \d+ ok/g)?.length, journal).to.equal(2);
    expect(journal).to.match(/maintenance check: run 2 \(data part 2\/3\)/);
    const refresh = await stack.run(["refresh", "--yes", "--skip-preview"]);
    expect(refresh.code, refresh.stdout + refresh.stderr).to.equal(0);
    const p = await stack.resourceOutputs("store");
    const hostname = (await onHost(h, "hostname")).stdout.trim();
    expect(p.lastPrune).to.include({ result: "ok", host: `${volumeId}@${hostname}`, runs: 2 });
    expect(p.lastCheck).to.include({ result: "ok", host: `${volumeId}@${hostname}`, runs: 2, subset: "2/3" });
    const metrics = (await onHost(h, "curl -fsS http://127.0.0.1:9100/metrics")).stdout;
    expect(metrics).to.match(new RegExp(`dboxed_repository_maintenance_success\\{repository="s3://${lab().s3.bucket}/${prefix}",task="check"\\} 1`));
    expect(metrics).to.match(new RegExp(`dboxed_repository_maintenance_success\\{repository="s3://${lab().s3.bucket}/${prefix}",task="prune"\\} 1`));
  });

  it("destroy removes the volume and its maintenance unit", async () => {
    const res = await stack.run(["destroy", "--yes", "--skip-preview"]);
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const left = await onHost(lab().hosts[0], `ls /etc/systemd/system | grep -c ${volumeId} || true`);
    expect(left.stdout.trim()).to.equal("0");
  });
});

describe("prune reclaims what retention forgot (the agent's prune_repository, real rustic, the lab's S3 server)", function () {
  // The soak shows the load; this shows the space: a forgotten snapshot's data leaves the
  // repository in two prunes (the first marks its packs, one after keepDelete deletes them),
  // and what is kept still reads back whole.
  const prefix = `reclaim-${crypto.randomBytes(3).toString("hex")}`;
  let dir: string;
  const s3 = () => ({ ...lab().s3, prefix, forcePathStyle: true });
  const rustic = (args: string[]) => rusticWith(path.join(dir, "profile"), args);
  /** Bytes and count of the repository's pack files (data/). */
  async function packs(): Promise<{ bytes: number; keys: Set<string> }> {
    const { ListObjectsV2Command } = await import("@aws-sdk/client-s3");
    const { s3Client } = await import("../../provider/storage/s3");
    const c = s3Client(s3());
    let bytes = 0, token: string | undefined;
    const keys = new Set<string>();
    do {
      const r = await c.send(new ListObjectsV2Command({ Bucket: s3().bucket, Prefix: `${prefix}/data/`, ContinuationToken: token }));
      for (const o of r.Contents ?? []) { bytes += o.Size ?? 0; keys.add(o.Key!); }
      token = r.IsTruncated ? r.NextContinuationToken : undefined;
    } while (token);
    c.destroy();
    return { bytes, keys };
  }
  const prune = () => new Promise<{ code: number; out: string }>((resolve) => {
    const script = `. ${JSON.stringify(AGENT)}
rustic_() { NO_COLOR=1 ${JSON.stringify(lab().tools.rustic)} -P ${JSON.stringify(path.join(dir, "profile"))} --no-progress --no-cache "$@"; }
KEEP_DELETE=1 prune_repository`;
    execFile("bash", ["-c", script], (err, stdout, stderr) => resolve({ code: err ? (err as any).code ?? 1 : 0, out: stdout + stderr }));
  });
  const sums = (root: string) => Object.fromEntries(fs.readdirSync(root).sort().map((f) =>
    [f, crypto.createHash("sha256").update(fs.readFileSync(path.join(root, f))).digest("hex") + " " + (fs.statSync(path.join(root, f)).mode & 0o7777).toString(8)]));

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "reclaim-"));
    const { profileToml } = await import("../../provider/host/rustic");
    fs.writeFileSync(path.join(dir, "profile.toml"), profileToml({ ...s3(), password: "reclaim-test-password" }), { mode: 0o600 });
    await rustic(["init"]);
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  it("forget, then two prunes keepDelete apart: the forgotten data's packs are deleted, the repository shrinks, the kept snapshot restores byte for byte", async () => {
    const data = path.join(dir, "data");
    fs.mkdirSync(data);
    for (let k = 0; k < 4; k++) fs.writeFileSync(path.join(data, `f${k}`), crypto.randomBytes(1 << 20));
    const first = JSON.parse(await rustic(["backup", "--json", "--as-path", "/", data])).id as string;
    // Every file rewritten: the first snapshot's data pack is wholly unused once it is forgotten
    // (a partly used pack is repacked by rustic only within --max-repack, 10% of the repository).
    for (let k = 0; k < 4; k++) fs.writeFileSync(path.join(data, `f${k}`), crypto.randomBytes(1 << 20));
    fs.chmodSync(path.join(data, "f3"), 0o640);
    const kept = JSON.parse(await rustic(["backup", "--json", "--as-path", "/", data])).id as string;
    const before = sums(data);
    await rustic(["forget", first]);
    const p0 = await packs();
    const r1 = await prune();
    expect(r1.code, r1.out).to.equal(0);
    const p1 = await packs();
    // keepDelete: the first prune only marks (a backup that started before it may still use them).
    expect(p1.bytes, "bytes after the first prune").to.be.at.least(p0.bytes);
    await sleep(2000);
    const r2 = await prune();
    expect(r2.code, r2.out).to.equal(0);
    const p2 = await packs();
    const deleted = [...p0.keys].filter((k) => !p2.keys.has(k));
    console.log(`      pack bytes: ${p0.bytes} after forget, ${p1.bytes} after the first prune, ${p2.bytes} after the second; ${deleted.length} of ${p0.keys.size} packs deleted`);
    expect(deleted.length, `packs deleted\n${r1.out}\n${r2.out}`).to.be.greaterThan(0);
    // The first snapshot's four MiB are no longer referenced: at least 3.5 MiB is gone.
    expect(p0.bytes - p2.bytes, `bytes reclaimed\n${r1.out}\n${r2.out}`).to.be.at.least(3.5 * (1 << 20));
    await rustic(["check", "--read-data"]);
    const out = path.join(dir, "restored");
    await rustic(["restore", kept, out]);
    expect(sums(out)).to.deep.equal(before);
    const { parseSnapshots } = await import("../../provider/host/rustic");
    expect(parseSnapshots(await rustic(["snapshots", "--json", "-g", ""])).map((s) => s.id)).to.deep.equal([kept]);
  });
});

describe("a check while other volumes' retention forgets snapshots (the agent's check_repository, real rustic, a proxy in front of the lab's S3 server)", function () {
  // A check lists the snapshots, then reads each cached one back from S3 (its cache comparison);
  // under load that takes minutes, and in the soak every attempt met a snapshot that another
  // volume's retention forgot meanwhile. The proxy deletes a snapshot (for real, on the lab's
  // server) the moment a check first reads one after listing them: the same race, every attempt.
  const prefix = `cf-${crypto.randomBytes(3).toString("hex")}`;
  let dir: string;
  let proxy: S3Proxy;
  let mode: "forget" | "unreadable" = "forget";
  let armed = false;
  const deleted: string[] = [];
  let unreadable = "";
  const s3 = () => ({ ...lab().s3, prefix, forcePathStyle: true });
  const rustic = (args: string[]) => rusticWith(path.join(dir, "direct"), args);
  const snapshots = async () => {
    const { parseSnapshots } = await import("../../provider/host/rustic");
    return parseSnapshots(await rustic(["snapshots", "--json", "-g", ""])).map((s) => s.id).sort();
  };
  const check = () => new Promise<{ code: number; out: string }>((resolve) => {
    const script = `. ${JSON.stringify(AGENT)}
rustic_() { env -u RUST_BACKTRACE -u CI NO_COLOR=1 ${JSON.stringify(lab().tools.rustic)} -P ${JSON.stringify(path.join(dir, "proxied"))} --no-progress --no-cache "$@"; }
MAINT_SUBSET=1/1 check_repository`;
    execFile("bash", ["-c", script], { maxBuffer: 16 << 20 }, (err, stdout, stderr) => resolve({ code: err ? (err as any).code ?? 1 : 0, out: stdout + stderr }));
  });

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "cf-"));
    const { profileToml } = await import("../../provider/host/rustic");
    const { DeleteObjectCommand } = await import("@aws-sdk/client-s3");
    const { s3Client } = await import("../../provider/storage/s3");
    proxy = new S3Proxy({ upstream: lab().s3.endpoint, accessKeyId: lab().s3.accessKeyId, secretAccessKey: lab().s3.secretAccessKey,
      region: lab().s3.region, dropConditionals: false,
      intercept: async (method, url) => {
        if (method !== "GET") return;
        const u = decodeURIComponent(url);
        if (/[?&]list-type=2/.test(u) && u.includes(`${prefix}/snapshots/`)) { armed = true; return; }
        const m = new RegExp(`/${prefix}/snapshots/([0-9a-f]{64})$`).exec(u.split("?")[0]);
        if (!m) return;
        if (mode === "unreadable" && m[1] === unreadable) {
          return { status: 404, body: `<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>` };
        }
        if (mode === "forget" && armed && deleted.length < 3) {
          armed = false;
          const c = s3Client(s3());
          await c.send(new DeleteObjectCommand({ Bucket: s3().bucket, Key: `${prefix}/snapshots/${m[1]}` }));
          c.destroy();
          deleted.push(m[1]);
        }
      } });
    await proxy.start();
    fs.writeFileSync(path.join(dir, "direct.toml"), profileToml({ ...s3(), password: "cf-test-password" }), { mode: 0o600 });
    fs.writeFileSync(path.join(dir, "proxied.toml"), profileToml({ ...s3(), endpoint: proxy.url, password: "cf-test-password" }), { mode: 0o600 });
    await rustic(["init"]);
    const data = path.join(dir, "data");
    fs.mkdirSync(data);
    for (let k = 0; k < 5; k++) {
      fs.writeFileSync(path.join(data, "f"), crypto.randomBytes(4096));
      await rustic(["backup", "--host", "host-a", "--label", "v", "--as-path", "/", data]);
    }
  });
  after(async () => {
    await proxy?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("a snapshot forgotten under each of three attempts of the check: the check leaves them out and passes, having checked the others", async () => {
    const all = await snapshots();
    expect(all).to.have.length(5);
    mode = "forget";
    // No cache: each attempt reads every snapshot file from S3, as a host does for the snapshots
    // other hosts saved since it last read them (with them cached, a forget under it is harmless).
    const r = await check();
    expect(deleted, r.out).to.have.length(3);
    expect(r.code, r.out).to.equal(0);
    const left = /check: ok; left out((?: [0-9a-f]{8})+) \(forgotten while the check ran: gone, not damaged\)/.exec(r.out);
    expect(left, r.out).to.not.equal(null);
    expect(left![1].trim().split(" ").sort()).to.deep.equal(deleted.map((id) => id.slice(0, 8)).sort());
    expect(r.out).not.to.match(/trying again/);
    expect(await snapshots()).to.deep.equal(all.filter((id) => !deleted.includes(id)));
  });

  it("a snapshot the check cannot read but that is still listed is not forgiven: the check fails", async () => {
    const all = await snapshots();
    mode = "unreadable";
    unreadable = all[0];
    const r = await check();
    expect(r.code, r.out).to.not.equal(0);
    expect(r.out).to.match(new RegExp(`snapshots/${all[0]}`));
    expect(r.out, r.out).to.match(/trying again \(attempt 3 of 3\)/);
    expect(r.out).not.to.match(/left out|without it/);
    expect(await snapshots()).to.deep.equal(all);
  });

  it("an S3 answer without a Date header gives no clock offset (not today's midnight)", async () => {
    fs.writeFileSync(path.join(dir, "h"), "HTTP/1.1 200 OK\r\nETag: \"x\"\r\n\r\n");
    const r = await new Promise<string>((resolve, reject) => execFile("bash", ["-c", `. ${JSON.stringify(AGENT)}; srv_offset ${JSON.stringify(path.join(dir, "h"))} 1000`],
      (err, stdout) => err ? reject(err) : resolve(stdout.trim())));
    expect(r).to.equal("0");
  });
});
