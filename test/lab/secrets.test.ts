// Secrets never appear in plain text: not in the state file, not in pulumi's output, not in a
// host's process list during a backup, not in its journal; on hosts they sit in root-only files.
// The password is full of shell metacharacters on purpose: it must still work end to end.
import { expect } from "chai";
import * as crypto from "crypto";
import * as fs from "fs";
import { quote } from "../../provider/host/shell";
import { lab, onHost, Stack, stepByStep } from "./harness";

describe("secrets (real pulumi, lab host)", function () {
  stepByStep(this);
  const password = `pa$$ 'w"o\\rd;$(reboot)\`id\`|${crypto.randomBytes(4).toString("hex")}`;
  const volumeId = `sec-${crypto.randomBytes(3).toString("hex")}`;
  const prefix = `sec-${crypto.randomBytes(3).toString("hex")}`;
  let stack: Stack;
  let upOutput = "";
  const input = () => ({
    provider: { password, s3: { prefix } },
    volumes: [{ name: "s", host: 2, args: { volumeId, size: "64MiB", mountPath: "/srv/secret-test", backupSchedule: "hourly" } }],
  });
  const secrets = () => {
    const l = lab();
    const keyLines = fs.readFileSync(l.hosts[2].privateKeyPath, "utf8").split("\n").filter((x) => x.length > 40);
    return [password, l.s3.secretAccessKey, l.s3.accessKeyId, ...keyLines];
  };
  const expectClean = (what: string, text: string) => {
    for (const s of secrets()) expect(text.includes(s), `${what} contains a secret`).to.equal(false);
  };

  it("a volume with a password full of shell metacharacters is created and backed up", async () => {
    stack = new Stack("secrets", "volumes");
    await stack.init();
    const res = await stack.up(input());
    upOutput = res.stdout + res.stderr;
    expect(res.code, upOutput).to.equal(0);
    expect((await stack.outputs()).volumes.s.lastBackupStatus).to.equal("ok");
  });

  it("the state file and pulumi's output hold no secret in plain text", async () => {
    expectClean("pulumi up output", upOutput);
    const state = stack.stateText();
    expect(state.length).to.be.greaterThan(1000);
    expect(state).to.include("ciphertext");
    expectClean("the state file", state);
  });

  it("the process list during a backup and the journal hold no secret", async () => {
    const h = lab().hosts[2];
    const seen = await onHost(h, `
systemctl start --no-block dboxed-volume-${volumeId}-backup.service
for i in $(seq 1 80); do ps -eo args; sleep 0.2; done
echo ==journal; journalctl --no-pager -o cat`, { timeoutMs: 300_000 });
    expect(seen.stdout).to.match(/dboxed-volume backup/);
    expectClean("ps output and the journal", seen.stdout);
  });

  it("secrets on the host are in root-only files", async () => {
    const h = lab().hosts[2];
    const dir = `/etc/dboxed-volumes/${volumeId}`;
    const modes = await onHost(h, `stat -c '%a %U %n' ${dir} ${dir}/rustic.toml ${dir}/s3.curl`);
    expect(modes.stdout.trim().split("\n")).to.deep.equal([`700 root ${dir}`, `600 root ${dir}/rustic.toml`, `600 root ${dir}/s3.curl`]);
    // The S3 secret is only in the rustic profile and the curl config of the lease check.
    const grep = await onHost(h, `grep -rlF -- ${JSON.stringify(lab().s3.secretAccessKey)} /etc /var/lib/dboxed-volumes /usr/local/lib 2>/dev/null | sort; true`);
    expect(grep.stdout.trim().split("\n")).to.deep.equal([`${dir}/rustic.toml`, `${dir}/s3.curl`]);
    // Hosts open the repository with its master key: the password never reaches them.
    // (printf is a shell builtin: the password is on no command line, the pattern comes on stdin)
    const pw = await onHost(h, `printf '%s\\n' ${quote(password)} | grep -rlFf - /etc /var/lib/dboxed-volumes /usr/local/lib /root 2>/dev/null | sort; grep -c '^key = ' ${dir}/rustic.toml; true`);
    expect(pw.stdout.trim().split("\n")).to.deep.equal(["1"]);
  });

  after(async () => {
    if (stack) await stack.run(["destroy", "--yes", "--skip-preview"]);
  });
});
