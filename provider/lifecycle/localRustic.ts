// Runs rustic on the machine that runs pulumi, for what is done from there: initialising the
// repository, exporting its master key for the hosts. The profile (with secrets) lives in a
// private temporary directory.
import { execFile } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { UserError } from "../errors";
import { isMasterKey, profileToml, RepositoryConfig } from "../host/rustic";

export type RusticSource = { localPath: string } | { url: string; sha256: string };

async function localBinary(src: RusticSource): Promise<string> {
  if ("localPath" in src) {
    if (!fs.existsSync(src.localPath)) throw new UserError(`rustic.localPath: ${src.localPath} does not exist on this machine`);
    return src.localPath;
  }
  const dir = path.join(os.homedir(), ".cache", "pulumi-dboxed-volumes");
  const file = path.join(dir, `rustic-${src.sha256}`);
  if (fs.existsSync(file)) return file;
  const res = await fetch(src.url);
  if (!res.ok) throw new UserError(`rustic.url: download of ${src.url} failed: HTTP ${res.status}`);
  const data = Buffer.from(await res.arrayBuffer());
  const sum = crypto.createHash("sha256").update(data).digest("hex");
  if (sum !== src.sha256) throw new UserError(`rustic.sha256: ${src.url} has sha256 ${sum}, not ${src.sha256}`);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(file + ".tmp", data, { mode: 0o755 });
  fs.renameSync(file + ".tmp", file);
  return file;
}

/**
 * Runs `rustic -P <private profile> <args>` locally and returns stdout. `newPassword` (for `key
 * add`) goes to rustic in a file next to the profile, never on its command line.
 */
export async function runLocalRustic(src: RusticSource, repo: RepositoryConfig, args: string[], opts: { newPassword?: string } = {}): Promise<string> {
  const bin = await localBinary(src);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "dboxed-volumes-"));
  try {
    fs.chmodSync(dir, 0o700);
    fs.writeFileSync(path.join(dir, "profile.toml"), profileToml(repo), { mode: 0o600 });
    if (opts.newPassword !== undefined) {
      fs.writeFileSync(path.join(dir, "new-password"), opts.newPassword, { mode: 0o600 });
      args = [...args, "--new-password-file", path.join(dir, "new-password")];
    }
    return await new Promise<string>((resolve, reject) => {
      execFile(bin, ["-P", path.join(dir, "profile"), "--no-progress", "--no-cache", ...args],
        { timeout: 300_000, maxBuffer: 64 * 1024 * 1024, env: { ...process.env, NO_COLOR: "1" } },
        (err, stdout, stderr) => {
          if (err) reject(new UserError(`rustic ${args[0]} failed on this machine: ${String(stderr || err.message).replace(/\x1b\[[0-9;]*m/g, "").replace(/\n\s*Backtrace:[\s\S]*$/, "").trim().slice(-2000)}`));
          else resolve(stdout);
        });
    });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const masterKeys = new Map<string, Promise<string>>();

/**
 * The repository's master key, opened once per provider process with the password (scrypt runs
 * here, natively, not on every host for every rustic call). Never logged: only its shape is checked.
 */
export function repositoryMasterKey(src: RusticSource, repo: RepositoryConfig & { password: string }): Promise<string> {
  const id = crypto.createHash("sha256")
    .update(JSON.stringify([repo.endpoint, repo.bucket, repo.prefix, repo.accessKeyId, repo.password])).digest("hex");
  let key = masterKeys.get(id);
  if (!key) {
    key = runLocalRustic(src, repo, ["key", "export"]).then((out) => {
      const text = out.trim();
      if (!isMasterKey(text)) throw new UserError("rustic key export printed no master key: is rustic.localPath a rustic 0.11 or newer?");
      return text;
    });
    key.catch(() => masterKeys.delete(id));
    masterKeys.set(id, key);
  }
  return key;
}
