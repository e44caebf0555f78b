// The host agent's reading of rustic's output, on what the real rustic prints: a backup that left
// out a file it could not read (rustic 0.11 warns and exits 0) is found, naming the file.
import { expect } from "chai";
import { execFileSync, spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";

const AGENT = path.join(__dirname, "..", "..", "provider", "host", "agent.sh");
const CACHE = process.env.DBOXED_LAB_CACHE ?? path.join(os.homedir(), ".cache", "pulumi-dboxed-volumes");
const RUSTIC = path.join(CACHE, "bin", "rustic");

describe("agent: a backup that could not read everything", function () {
  this.timeout(60_000);
  let dir: string;
  const rusticAsNobody = (args: string[]) => spawnSync("setpriv", ["--reuid=nobody", "--regid=nogroup", "--clear-groups", path.join(dir, "rustic"),
    "-r", path.join(dir, "repo"), "--password", "unit-test", "--no-progress", "--no-cache", ...args], { env: { ...process.env, NO_COLOR: "1" } });
  const unreadable = (errFile: string, src: string) =>
    execFileSync("bash", ["-c", `. "$1"; unreadable "$2" "$3" /srv/vol`, "_", AGENT, errFile, src]).toString();

  before(() => {
    // The real rustic (lab/toolchain.sh builds it before the unit tests run): never skipped.
    expect(fs.existsSync(RUSTIC), `${RUSTIC} (built by lab/toolchain.sh)`).to.equal(true);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "agent-test-"));
    fs.chmodSync(dir, 0o777);
    // A copy nobody may run (root's home is closed to it).
    fs.copyFileSync(RUSTIC, path.join(dir, "rustic"));
    fs.chmodSync(path.join(dir, "rustic"), 0o755);
    fs.mkdirSync(path.join(dir, "src", "sub"), { recursive: true });
    fs.writeFileSync(path.join(dir, "src", "ok.txt"), "readable\n");
    fs.writeFileSync(path.join(dir, "src", "bad file.txt"), "secret\n");
    fs.chmodSync(path.join(dir, "src", "bad file.txt"), 0o000);
    const init = rusticAsNobody(["init"]);
    expect(init.status, init.stderr.toString()).to.equal(0);
  });

  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  it("names the file rustic left out (it exits 0), as a path on the volume", () => {
    const res = rusticAsNobody(["backup", "--json", "--as-path", "/", path.join(dir, "src")]);
    expect(res.status, "rustic 0.11 exits 0 although it skipped a file").to.equal(0);
    const err = path.join(dir, "err");
    fs.writeFileSync(err, res.stderr);
    const said = unreadable(err, path.join(dir, "src"));
    expect(said).to.match(/^Error: Failed to open ReadSourceOpen at `\/srv\/vol\/bad file\.txt`\n$/);
  });

  it("says nothing of a backup that read everything", () => {
    fs.chmodSync(path.join(dir, "src", "bad file.txt"), 0o644);
    const res = rusticAsNobody(["backup", "--json", "--as-path", "/", path.join(dir, "src")]);
    expect(res.status).to.equal(0);
    const err = path.join(dir, "err");
    fs.writeFileSync(err, res.stderr);
    expect(unreadable(err, path.join(dir, "src"))).to.equal("");
  });
});
