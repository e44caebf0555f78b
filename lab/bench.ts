// Benchmark (npm run bench): move downtime, warm vs cold, measured in one run on the lab.
// A volume holding 256 MiB in a few thousand files, 1% of them changed since the last periodic
// backup, is moved host-1 -> host-2 with a warm move (the latest periodic snapshot restored on
// host-2 first) and back with a cold one. Prints each move's phases and the downtime ratio.
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { down, LabJson, REPO, runOnHost, up } from "./lab";

const labDir = path.join(REPO, ".lab-bench");
const FILES = 3000;
const TOTAL_MIB = 256;

function pulumi(lab: LabJson, dir: string, args: string[]): string {
  const r = spawnSync(lab.tools.pulumi, [...args, "--cwd", dir, "--non-interactive"], {
    env: { ...process.env, ...lab.env, LAB_JSON: path.join(labDir, "lab.json") }, encoding: "utf8", maxBuffer: 256 * 1024 * 1024,
  });
  if (r.status !== 0) throw new Error(`pulumi ${args.join(" ")} failed:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

const onHost = (lab: LabJson, i: number, script: string) => runOnHost(lab.hosts[i], script);

async function main() {
  await down(labDir);
  const lab = await up(labDir, 2);
  try {
    const dir = path.join(labDir, "program");
    fs.cpSync(path.join(REPO, "test", "fixtures", "volumes"), dir, { recursive: true });
    fs.mkdirSync(path.join(dir, "node_modules"), { recursive: true });
    fs.symlinkSync(REPO, path.join(dir, "node_modules", "pulumi-dboxed-volumes"));
    fs.symlinkSync(path.join(REPO, "node_modules", "@pulumi"), path.join(dir, "node_modules", "@pulumi"));
    const volumeId = "bench";
    const mountPath = "/srv/bench";
    pulumi(lab, dir, ["stack", "init", "bench"]);
    const input = {
      provider: { s3: { prefix: `bench-${Date.now()}` } },
      volumes: [{ name: "b", host: 0, args: { volumeId, size: "640MiB", mountPath, backupSchedule: "hourly", warmMove: true } }],
    };
    const save = (host: number, warm: boolean) => {
      input.volumes[0].host = host;
      input.volumes[0].args.warmMove = warm;
      fs.writeFileSync(path.join(dir, "input.json"), JSON.stringify(input));
    };
    save(0, true);
    console.log(`creating the volume and writing ${TOTAL_MIB} MiB in ${FILES} files`);
    pulumi(lab, dir, ["up", "--yes", "--skip-preview"]);
    const per = Math.floor((TOTAL_MIB * 1024 * 1024) / FILES);
    await onHost(lab, 0, `set -e; cd ${mountPath}; for d in $(seq 1 30); do mkdir -p d$d; done
for i in $(seq 1 ${FILES}); do head -c ${per} /dev/urandom > d$((i % 30 + 1))/f$i; done; sync; du -sh .`);
    const change = (host: number) => onHost(lab, host, `set -e; cd ${mountPath}
for i in $(seq 1 ${Math.round(FILES / 100)}); do f=$(ls d$((i % 30 + 1)) | head -n $i | tail -n1); head -c ${per} /dev/urandom > d$((i % 30 + 1))/$f; done; sync`);
    const backup = (host: number) => onHost(lab, host, `systemctl start dboxed-volume-${volumeId}-backup.service`);
    const lastMove = () => JSON.parse(pulumi(lab, dir, ["stack", "output", "--json", "volumes"])).b.lastMove;

    console.log("periodic backup, then 1% of the files changed");
    await backup(0);
    await change(0);
    console.log("warm move host-1 -> host-2");
    save(1, true);
    pulumi(lab, dir, ["up", "--yes", "--skip-preview"]);
    const warm = lastMove();

    console.log("periodic backup, then 1% of the files changed");
    await backup(1);
    await change(1);
    console.log("cold move host-2 -> host-1");
    save(0, false);
    pulumi(lab, dir, ["up", "--yes", "--skip-preview"]);
    const cold = lastMove();

    console.log("\nphase times (s):");
    const phases = [...new Set([...Object.keys(warm.phases), ...Object.keys(cold.phases)])];
    console.log(["phase".padEnd(16), "warm".padStart(8), "cold".padStart(8)].join(""));
    for (const p of phases) console.log([p.padEnd(16), String(warm.phases[p] ?? "-").padStart(8), String(cold.phases[p] ?? "-").padStart(8)].join(""));
    console.log(`\ndowntime: warm ${warm.downtimeSeconds} s, cold ${cold.downtimeSeconds} s`);
    console.log(`ratio cold/warm downtime: ${(cold.downtimeSeconds / warm.downtimeSeconds).toFixed(2)}`);
    pulumi(lab, dir, ["destroy", "--yes", "--skip-preview"]);
  } finally {
    await down(labDir);
  }
}

main().catch((e) => {
  console.error(`bench failed: ${e.message ?? e}`);
  process.exit(1);
});
