// The demo (npm run demo): boots the lab, runs `pulumi up` of examples/basic on it, writes data
// into a volume, backs it up, shows the snapshots and the outputs, and destroys it again.
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { down, LabJson, REPO, runOnHost, up } from "./lab";

const labDir = path.join(REPO, ".lab-demo");
const say = (msg: string) => console.log(`\n\x1b[1m== ${msg}\x1b[0m`);

function pulumi(lab: LabJson, dir: string, args: string[], input?: string): string {
  const r = spawnSync(lab.tools.pulumi, [...args, "--cwd", dir, "--non-interactive"], {
    env: { ...process.env, ...lab.env }, input, encoding: "utf8", maxBuffer: 64 * 1024 * 1024,
    stdio: [input === undefined ? "ignore" : "pipe", "pipe", "inherit"],
  });
  if (r.status !== 0) throw new Error(`pulumi ${args.join(" ")} failed:\n${r.stdout}`);
  return r.stdout;
}

const onHost = (lab: LabJson, i: number, script: string) => runOnHost(lab.hosts[i], script);

async function main() {
  say("starting the lab: an S3 server and two Debian hosts (qemu)");
  await down(labDir);
  const lab = await up(labDir, 2);
  try {
    const dir = path.join(labDir, "program");
    fs.cpSync(path.join(REPO, "examples", "basic"), dir, { recursive: true });
    fs.mkdirSync(path.join(dir, "node_modules"), { recursive: true });
    // The example's dependencies: this checkout as the package, and its own node_modules.
    fs.symlinkSync(REPO, path.join(dir, "node_modules", "pulumi-dboxed-volumes"));
    for (const m of ["@pulumi", "typescript", "@types"]) fs.symlinkSync(path.join(REPO, "node_modules", m), path.join(dir, "node_modules", m));

    say("configuring the example stack (secrets through stdin, stored encrypted)");
    pulumi(lab, dir, ["stack", "init", "demo"]);
    const set = (key: string, value: string, secret = false) =>
      pulumi(lab, dir, ["config", "set", ...(secret ? ["--secret"] : []), key], value);
    set("s3Endpoint", lab.s3.endpoint);
    set("s3HostEndpoint", lab.s3.hostEndpoint);
    set("s3Region", lab.s3.region);
    set("s3Bucket", lab.s3.bucket);
    set("s3AccessKeyId", lab.s3.accessKeyId, true);
    set("s3SecretAccessKey", lab.s3.secretAccessKey, true);
    set("repositoryPassword", `demo-${Date.now()}-password`, true);
    set("rusticPath", lab.tools.rustic);
    set("sshPrivateKey", fs.readFileSync(lab.hosts[0].privateKeyPath, "utf8"), true);
    lab.hosts.forEach((h, i) => {
      pulumi(lab, dir, ["config", "set", "--path", `hosts[${i}].address`, h.address]);
      pulumi(lab, dir, ["config", "set", "--path", `hosts[${i}].port`, String(h.port)]);
      pulumi(lab, dir, ["config", "set", "--path", `hosts[${i}].hostKey`, h.hostKey]);
    });

    say("pulumi up: two volumes are created, mounted, scheduled and backed up");
    process.stdout.write(pulumi(lab, dir, ["up", "--yes", "--skip-preview"]));

    say("writing data into pgdata on host-1 and running its backup service");
    const id = JSON.parse(pulumi(lab, dir, ["stack", "output", "--json", "volumesSummary"])).pgdata.volumeId as string;
    process.stdout.write(await onHost(lab, 0, `set -e
mkdir -p /srv/pgdata/base && head -c 20000000 /dev/urandom > /srv/pgdata/base/table.dat && echo "hello from the demo" > /srv/pgdata/README
du -sh /srv/pgdata
systemctl start dboxed-volume-${id}-backup.service
journalctl -u dboxed-volume-${id}-backup.service -n 6 --no-pager -o cat`));

    say(`the volume's snapshots in the repository (rustic on host-1)`);
    process.stdout.write(await onHost(lab, 0,
      `/usr/local/lib/dboxed-volumes/rustic -P /etc/dboxed-volumes/${id}/rustic --no-progress snapshots --filter-host dboxed-volume-${id} 2>&1`));

    say("pulumi refresh, then the stack outputs");
    pulumi(lab, dir, ["refresh", "--yes", "--skip-preview"]);
    pulumi(lab, dir, ["up", "--yes", "--skip-preview"]);
    process.stdout.write(pulumi(lab, dir, ["stack", "output", "--json"]));

    say("pulumi destroy: final backups, then the hosts are cleaned; the snapshots stay in S3");
    process.stdout.write(pulumi(lab, dir, ["destroy", "--yes", "--skip-preview"]));
    say("done");
  } finally {
    if (process.env.DBOXED_DEMO_KEEP_LAB !== "1") await down(labDir);
  }
}

main().catch((e) => {
  console.error(`demo failed: ${e.message ?? e}`);
  process.exit(1);
});
