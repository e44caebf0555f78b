// Benchmark (npm run bench): every performance figure of the project, measured in one run on a
// fresh lab (3 hosts), printed as ratios (this machine is noisy; ratios measured side by side in
// one run are what can be compared), each with its goal and the parts it is made of. Writes
// docs/bench/results.json and docs/bench/move-phases.svg (the move's phases side by side).
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { down, LabJson, REPO, runOnHost, up } from "./lab";

const labDir = path.join(REPO, ".lab-bench");
const outDir = path.join(REPO, "docs", "bench");
const FILES = 3000;
const TOTAL_MIB = 256;
const mountPath = "/srv/bench";
const volumeId = "bench";

interface Run { stdout: string; secs: number }
let lab: LabJson;
let dir = "";
const trace = path.join(labDir, "ssh-trace.log");

function pulumi(args: string[], opts: { traced?: boolean; allowFailure?: boolean } = {}): Run {
  const t0 = Date.now();
  if (opts.traced) fs.writeFileSync(trace, "");
  const r = spawnSync(lab.tools.pulumi, [...args, "--cwd", dir, "--non-interactive"], {
    env: { ...process.env, ...lab.env, LAB_JSON: path.join(labDir, "lab.json"), ...(opts.traced ? { DBOXED_VOLUMES_TRACE: trace } : {}) },
    encoding: "utf8", maxBuffer: 256 * 1024 * 1024,
  });
  if (r.status !== 0 && !opts.allowFailure) throw new Error(`pulumi ${args.join(" ")} failed:\n${r.stdout}\n${r.stderr}`);
  return { stdout: r.stdout, secs: (Date.now() - t0) / 1000 };
}

/** SSH connections the provider opened per host during the last traced run. */
function connections(): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of fs.readFileSync(trace, "utf8").split("\n")) {
    const m = / (\S+) connect$/.exec(line);
    if (m) out[m[1]] = (out[m[1]] ?? 0) + 1;
  }
  return out;
}

const onHost = (i: number, script: string) => runOnHost(lab.hosts[i], script);
async function timedOnHost(i: number, script: string): Promise<number> {
  const t0 = Date.now();
  await onHost(i, script);
  return (Date.now() - t0) / 1000;
}

function save(input: unknown) {
  fs.writeFileSync(path.join(dir, "input.json"), JSON.stringify(input));
}

const provider = { s3: { prefix: `bench-${Date.now()}` } };
const benchVolume = (host: number, warm: boolean) => ({
  provider, volumes: [{ name: "b", host, args: { volumeId, size: "640MiB", mountPath, backupSchedule: "hourly", warmMove: warm } }],
});
const per = Math.floor((TOTAL_MIB * 1024 * 1024) / FILES);
const changeScript = `set -e; cd ${mountPath}
for i in $(seq 1 ${Math.round(FILES / 100)}); do f=$(ls d$((i % 30 + 1)) | head -n $i | tail -n1); head -c ${per} /dev/urandom > d$((i % 30 + 1))/$f; done; sync`;
const backupNow = (host: number) => timedOnHost(host, `systemctl start dboxed-volume-${volumeId}-backup.service`);
const rusticBare = (args: string) => `NO_COLOR=1 /usr/local/lib/dboxed-volumes/rustic -P /etc/dboxed-volumes/${volumeId}/rustic --no-progress --cache-dir /var/cache/dboxed-volumes/rustic ${args}`;

/** The host work of a create (storage, filesystem, mount, units, first backup) as one plain shell script. */
const shellCreate = `set -e
d=/var/lib/bench-shell; mkdir -p $d; truncate -s 140M $d/disk.img
dev=$(losetup -f --show $d/disk.img); pvcreate -q $dev; vgcreate -q benchsh $dev
lvcreate -q -y -l 16 -n data benchsh; mkfs.ext4 -q /dev/benchsh/data
mkdir -p /srv/bench-shell; mount /dev/benchsh/data /srv/bench-shell
for u in a b c d e f; do printf '[Unit]\\nDescription=bench %s\\n[Service]\\nType=oneshot\\nExecStart=/bin/true\\n' $u > /etc/systemd/system/bench-shell-$u.service; done
printf '[Timer]\\nOnCalendar=hourly\\n[Install]\\nWantedBy=timers.target\\n' > /etc/systemd/system/bench-shell-a.timer
systemctl daemon-reload; systemctl enable --now --quiet bench-shell-a.timer
lvcreate -q -s -l 100%FREE -n snap benchsh/data 2>/dev/null || lvcreate -q -s -L 32M -n snap benchsh/data
mkdir -p /run/bench-shell-snap; mount -o ro /dev/benchsh/snap /run/bench-shell-snap
${rusticBare("backup --host bench-shell --as-path / /run/bench-shell-snap")} >/dev/null
umount /run/bench-shell-snap; lvremove -q -f benchsh/snap`;
const shellCleanup = `systemctl disable --now --quiet bench-shell-a.timer 2>/dev/null; rm -f /etc/systemd/system/bench-shell-*; systemctl daemon-reload
umount /srv/bench-shell 2>/dev/null; vgremove -q -f benchsh >/dev/null 2>&1; for l in $(losetup -j /var/lib/bench-shell/disk.img -n -O NAME); do losetup -d $l; done
rm -rf /var/lib/bench-shell /srv/bench-shell; true`;

interface Row { figure: string; value: number; goal: string; ok: boolean; parts: string }
const rows: Row[] = [];
function row(figure: string, value: number, goal: number, cmp: "<=" | "=", parts: string) {
  rows.push({ figure, value: Math.round(value * 1000) / 1000, goal: `${cmp} ${goal}`, ok: cmp === "=" ? value === goal : value <= goal, parts });
}

function svg(bars: { name: string; phases: Record<string, number> }[]): string {
  const colors = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1"];
  const names = [...new Set(bars.flatMap((b) => Object.keys(b.phases)))];
  const max = Math.max(...bars.map((b) => Object.values(b.phases).reduce((a, x) => a + x, 0)));
  const W = 640, scale = (W - 140) / max;
  let y = 30;
  let out = `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${60 + bars.length * 40 + names.length * 18}" font-family="sans-serif" font-size="12">`;
  out += `<text x="10" y="18" font-weight="bold">Downtime of a move (s): where the time goes</text>`;
  for (const b of bars) {
    out += `<text x="10" y="${y + 15}">${b.name}</text>`;
    let x = 130;
    for (const [k, v] of Object.entries(b.phases)) {
      const w = Math.max(1, v * scale);
      out += `<rect x="${x}" y="${y}" width="${w}" height="22" fill="${colors[names.indexOf(k) % colors.length]}"><title>${k}: ${v} s</title></rect>`;
      x += w;
    }
    out += `<text x="${x + 4}" y="${y + 15}">${Object.values(b.phases).reduce((a, x) => a + x, 0).toFixed(1)} s</text>`;
    y += 40;
  }
  for (const [i, n] of names.entries()) {
    out += `<rect x="130" y="${y + i * 18}" width="12" height="12" fill="${colors[i % colors.length]}"/><text x="148" y="${y + i * 18 + 10}">${n}</text>`;
  }
  return out + "</svg>\n";
}

async function main() {
  await down(labDir);
  lab = await up(labDir, 3);
  try {
    dir = path.join(labDir, "program");
    fs.cpSync(path.join(REPO, "test", "fixtures", "volumes"), dir, { recursive: true });
    fs.mkdirSync(path.join(dir, "node_modules"), { recursive: true });
    fs.symlinkSync(REPO, path.join(dir, "node_modules", "pulumi-dboxed-volumes"));
    fs.symlinkSync(path.join(REPO, "node_modules", "@pulumi"), path.join(dir, "node_modules", "@pulumi"));
    pulumi(["stack", "init", "bench"]);

    console.log("create: one volume, then the same host work as one shell script");
    save(benchVolume(0, true));
    const create1 = pulumi(["up", "--yes", "--skip-preview"], { traced: true });
    const createConns = connections();
    const shell = await timedOnHost(0, shellCreate);
    await onHost(0, shellCleanup);
    row("`pulumi up` create of one volume / the same host work as one shell script", create1.secs / shell, 1.3, "<=",
      `create ${create1.secs.toFixed(1)} s (pulumi CLI and program included), script ${shell.toFixed(1)} s`);

    console.log(`writing ${TOTAL_MIB} MiB in ${FILES} files; full, no-change and 1% backups; bare rustic`);
    await onHost(0, `set -e; cd ${mountPath}; for d in $(seq 1 30); do mkdir -p d$d; done
for i in $(seq 1 ${FILES}); do head -c ${per} /dev/urandom > d$((i % 30 + 1))/f$i; done; sync`);
    const full = await backupNow(0);
    const noop = await backupNow(0);
    await onHost(0, rusticBare(`backup --host bench-bare --as-path / ${mountPath}`));
    const bare = await timedOnHost(0, rusticBare(`backup --host bench-bare --as-path / ${mountPath}`));
    const steps = JSON.parse(await onHost(0, `cat /var/lib/dboxed-volumes/${volumeId}/status.json`)).steps;
    row("backup with nothing changed / bare `rustic backup` of the same tree on that host", noop / bare, 2, "<=",
      `backup ${noop.toFixed(1)} s (${steps}), bare rustic ${bare.toFixed(1)} s`);
    await onHost(0, changeScript);
    const incr = await backupNow(0);
    row("incremental backup with 1% changed / full backup of the same tree", incr / full, 0.1, "<=", `1% ${incr.toFixed(1)} s, full ${full.toFixed(1)} s`);

    console.log("two-pass rsync baseline host-1 -> host-2 (through the lab's relay)");
    await onHost(0, `test -e /root/.ssh/bench || ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/bench`);
    const pub = await onHost(0, "cat /root/.ssh/bench.pub");
    await onHost(1, `printf '%s\\n' '${pub.trim()}' >> /root/.ssh/authorized_keys; mkdir -p /var/tmp/rsync-bench`);
    const rsync = `rsync -aHAX --numeric-ids --delete -e 'ssh -i /root/.ssh/bench -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR' ${mountPath}/ root@${lab.hosts[1].peerAddress}:/var/tmp/rsync-bench/`;
    const rsyncFirst = await timedOnHost(0, rsync);
    await onHost(0, changeScript);
    const rsyncFinal = await timedOnHost(0, rsync);
    await onHost(1, "rm -rf /var/tmp/rsync-bench");

    console.log("warm move host-1 -> host-2 (a periodic backup, then 1% changed)");
    await backupNow(0);
    await onHost(0, changeScript);
    save(benchVolume(1, true));
    pulumi(["up", "--yes", "--skip-preview"], { traced: true });
    const moveConns = connections();
    const lastMove = () => JSON.parse(pulumi(["stack", "output", "--json", "volumes"]).stdout).b.lastMove;
    const warm = lastMove();
    console.log("cold move host-2 -> host-1 (a periodic backup, then 1% changed)");
    await backupNow(1);
    await onHost(1, changeScript);
    save(benchVolume(0, false));
    pulumi(["up", "--yes", "--skip-preview"]);
    const cold = lastMove();
    const downPhases = (m: any) => Object.fromEntries(["stop old", "final backup", "final restore", "verify", "switch"].map((k) => [k, m.phases[k] ?? 0]));
    row("warm move downtime / cold move downtime (256 MiB, 3000 files, 1% changed)", warm.downtimeSeconds / cold.downtimeSeconds, 0.15, "<=",
      `warm ${warm.downtimeSeconds} s, cold ${cold.downtimeSeconds} s; warm: ${Object.entries(downPhases(warm)).map(([k, v]) => `${k} ${v}`).join(", ")}` +
      (warm.hashedAfterStop ? `; files hashed after the stop (old/new host, of ${warm.hashedAfterStop.files}): warm ${warm.hashedAfterStop.old}/${warm.hashedAfterStop.new}` : "") +
      (cold.hashedAfterStop ? `, cold ${cold.hashedAfterStop.old}/${cold.hashedAfterStop.new}` : ""));
    row("warm move downtime / two-pass rsync final pass of the same tree, same hosts, same run", warm.downtimeSeconds / rsyncFinal, 3, "<=",
      `rsync final pass ${rsyncFinal.toFixed(1)} s (first pass ${rsyncFirst.toFixed(1)} s), over SSH between the guests through the lab's relay on the machine running pulumi`);
    const perHost = (c: Record<string, number>) => Math.max(0, ...Object.values(c));
    row("SSH connections per host per `pulumi up` (create; move)", Math.max(perHost(createConns), perHost(moveConns)), 1, "=",
      `create ${JSON.stringify(createConns)}; move ${JSON.stringify(moveConns)}`);
    pulumi(["destroy", "--yes", "--skip-preview"]);

    console.log("one volume, then twelve volumes on three hosts, in one pulumi up each");
    const small = (n: number) => ({ provider, volumes: Array.from({ length: n }, (_, i) => ({ name: `s${i}`, host: i % 3,
      args: { volumeId: `bench-s${i}`, size: "64MiB", mountPath: `/srv/bench-s${i}`, backupSchedule: "hourly" } })) });
    save(small(1));
    const one = pulumi(["up", "--yes", "--skip-preview"]);
    pulumi(["destroy", "--yes", "--skip-preview"]);
    save(small(12));
    const twelve = pulumi(["up", "--yes", "--skip-preview"]);
    row("12 volumes on 3 hosts in one `pulumi up` / 1 volume", twelve.secs / one.secs, 4, "<=",
      `12: ${twelve.secs.toFixed(1)} s, 1: ${one.secs.toFixed(1)} s (pulumi's default --parallel here: 4 x 2 cores)`);
    pulumi(["preview"], { traced: true });
    const previewConns = Object.values(connections()).reduce((a, x) => a + x, 0);
    row("SSH connections during `pulumi preview` with nothing changed (12 volumes)", previewConns, 0, "=", "all hosts together");
    pulumi(["destroy", "--yes", "--skip-preview"]);

    const cpu = fs.readFileSync("/proc/cpuinfo", "utf8").match(/model name\s*:\s*(.*)/)?.[1] ?? "unknown cpu";
    const machine = `${require("os").cpus().length} cores (${cpu}), lab hosts: qemu guests under TCG emulation`;
    console.log(`\n| figure | measured | goal | | made of |\n|---|---|---|---|---|`);
    for (const r of rows) console.log(`| ${r.figure} | ${r.value} | ${r.goal} | ${r.ok ? "ok" : "**missed**"} | ${r.parts} |`);
    console.log(`\nmachine: ${machine}`);
    fs.mkdirSync(outDir, { recursive: true });
    fs.writeFileSync(path.join(outDir, "results.json"), JSON.stringify({ date: new Date().toISOString(), machine, rows,
      moves: { warm, cold, rsync: { first: rsyncFirst, final: rsyncFinal } } }, null, 2) + "\n");
    fs.writeFileSync(path.join(outDir, "move-phases.svg"), svg([
      { name: "warm move", phases: downPhases(warm) },
      { name: "cold move", phases: downPhases(cold) },
      { name: "rsync, 2nd pass", phases: { "rsync final pass": Math.round(rsyncFinal * 10) / 10 } },
    ]));
    console.log(`written: ${path.relative(REPO, outDir)}/results.json, move-phases.svg`);
  } finally {
    await down(labDir);
  }
}

main().catch((e) => {
  console.error(`bench failed: ${e.message ?? e}`);
  process.exit(1);
});
