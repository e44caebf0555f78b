// Pure builders and parsers of the host side: unit names, env files, TOML, JSON output parsing,
// manifests, lease URLs.
import { expect } from "chai";
import { execFileSync, spawn, spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { layoutFor, mountUnitName, volumeEnv } from "../../provider/host/layout";
import { parseLvs } from "../../provider/host/lvm";
import { diffManifests, filesToHash, hashScript, manifestScript, parseManifest, parseSums, pathsInput, withHashes } from "../../provider/host/manifest";
import { isMasterKey, parseSnapshots, profileToml, tomlString } from "../../provider/host/rustic";
import { leaseUrl, maintenanceUrl, sameHost } from "../../provider/storage/lease";
import { diff, planDiff } from "../../provider/lifecycle/volume";
import { curlConfig, mustSucceed, pickSnapshot } from "../../provider/lifecycle/steps";
import { hostKeyAlgorithms } from "../../provider/remote/ssh";
import { backupTimer, unitsArgv, unitsCommand } from "../../provider/host/systemd";

describe("host layout and units", () => {
  it("the backup timer spreads its start by a fixed random delay and catches up once after downtime", () => {
    const t = backupTimer(layoutFor({ volumeId: "pg", mountPath: "/srv/pg", filesystem: "ext4" }), "*:0/5", 120);
    expect(t).to.match(/^OnCalendar=\*:0\/5$/m);
    expect(t).to.match(/^RandomizedDelaySec=120s$/m);
    expect(t).to.match(/^FixedRandomDelay=true$/m);
    expect(t).to.match(/^Persistent=true$/m);
  });

  it("escapes mount paths as systemd-escape --path does", () => {
    expect(mountUnitName("/srv/pgdata")).to.equal("srv-pgdata.mount");
    expect(mountUnitName("/srv/my-data/x")).to.equal("srv-my\\x2ddata-x.mount");
    // systemd-escape escapes a '.' only as the very first character (the lab test compares
    // more paths with the real systemd-escape on a host).
    expect(mountUnitName("/srv/.hidden")).to.equal("srv-.hidden.mount");
    expect(mountUnitName("/.data")).to.equal("\\x2edata.mount");
    expect(mountUnitName("/srv/a_b.c-d")).to.equal("srv-a_b.c\\x2dd.mount");
  });

  it("asks the server for the pinned key's type only (a host offering several keys shows the pinned one)", () => {
    expect(hostKeyAlgorithms("ssh-ed25519")).to.deep.equal(["ssh-ed25519"]);
    expect(hostKeyAlgorithms("ecdsa-sha2-nistp384")).to.deep.equal(["ecdsa-sha2-nistp384"]);
    expect(hostKeyAlgorithms("ssh-rsa")).to.deep.equal(["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]);
  });

  it("mustSucceed stops the enclosing script when the inner one fails under its own set -e (not so with `( ... ) || exit`)", () => {
    const inner = "set -e\nfalse\necho inner-went-on";
    const run = (script: string) => spawnSync("sh", ["-c", script], { encoding: "utf8" });
    const ok = run(`${mustSucceed(inner)}\necho outer-went-on`);
    expect([ok.status, ok.stdout]).to.deep.equal([1, ""]);
    // The form it replaces: set -e is ignored on the left of ||, the failure is lost.
    const old = run(`( ${inner} ) || exit $?\necho outer-went-on`);
    expect(old.stdout).to.equal("inner-went-on\nouter-went-on\n");
  });

  it("writes a curl config line that no value can break out of", () => {
    expect(curlConfig({ accessKeyId: 'a"b\\', secretAccessKey: "s:t" })).to.equal('user = "a\\"b\\\\:s:t"\n');
    expect(() => curlConfig({ accessKeyId: "a", secretAccessKey: "s\nurl = file:///etc/shadow" })).to.throw(/s3.secretAccessKey: must be one line/);
    expect(() => curlConfig({ accessKeyId: "a\r", secretAccessKey: "s" })).to.throw(/s3.accessKeyId/);
  });

  it("writes a volume.env that sh reads back value for value", () => {
    const l = layoutFor({ volumeId: "v1", mountPath: "/srv/a", filesystem: "ext4" });
    const env = volumeEnv(l, {
      sizeBytes: 1 << 30,
      retention: { keepLast: 2, keepHourly: 6, keepDaily: 7, keepWeekly: 4, keepMonthly: 6, keepYearly: 1 },
      lease: { token: "tok'en$(id)", url: "http://h:9000/b/p-meta/volumes/v1/lease.json", region: "us-east-1", seconds: 600 },
      maintenance: { url: "http://h:9000/b/p-meta/maintenance/", listUrl: "http://h:9000/b/?list-type=2&prefix=p-meta%2Fmaintenance%2Fbackup-", repository: "s3://b/p", pruneInterval: 86400, checkInterval: 604800, checkSubsets: 10, keepDelete: 82800 },
    });
    const out = execFileSync("sh", ["-c", `${env}\nprintf '%s|%s|%s|%s' "$VG" "$LEASE_TOKEN" "$MOUNT_PATH" "$MAINT_LIST_URL"`]).toString();
    expect(out).to.equal("dbv-v1|tok'en$(id)|/srv/a|http://h:9000/b/?list-type=2&prefix=p-meta%2Fmaintenance%2Fbackup-");
  });
});

describe("rustic", () => {
  it("TOML strings escape quotes, backslashes and control characters", () => {
    expect(tomlString(`a"b\\c\nd`)).to.equal(`"a\\"b\\\\c\\u000ad"`);
    const toml = profileToml({ endpoint: "http://x:1/", region: "r", bucket: "b", prefix: "p", forcePathStyle: true,
      accessKeyId: "k", secretAccessKey: "s", password: `pa"ss` });
    expect(toml).to.contain(`password = "pa\\"ss"`).and.to.contain(`endpoint = "http://x:1"`).and.to.contain(`root = "/p"`);
  });

  it("a host profile carries the master key instead of the password", () => {
    const masterKey = JSON.stringify({ mac: { k: "a", r: "b" }, encrypt: "c" });
    expect(isMasterKey(masterKey)).to.equal(true);
    expect(isMasterKey("{}")).to.equal(false);
    expect(isMasterKey("not json")).to.equal(false);
    const toml = profileToml({ endpoint: "http://x:1/", region: "r", bucket: "b", prefix: "p", forcePathStyle: true,
      accessKeyId: "k", secretAccessKey: "s", masterKey });
    expect(toml).to.contain(`key = "{\\"mac\\":{\\"k\\":\\"a\\",\\"r\\":\\"b\\"},\\"encrypt\\":\\"c\\"}"`).and.not.to.contain("password");
  });

  it("parses flat and grouped snapshot lists, oldest first", () => {
    const a = { id: "a", time: "2026-01-02T00:00:00Z", tree: "t", hostname: "h" };
    const b = { id: "b", time: "2026-01-01T00:00:00Z", tree: "t", hostname: "h" };
    expect(parseSnapshots(JSON.stringify([a, b])).map((s) => s.id)).to.deep.equal(["b", "a"]);
    expect(parseSnapshots(JSON.stringify([[{ hostname: "h" }, [a, b]]])).map((s) => s.id)).to.deep.equal(["b", "a"]);
    expect(parseSnapshots("")).to.deep.equal([]);
  });
});

describe("clone sources", () => {
  const snaps = [
    { id: "aaaaaaaa1111" + "0".repeat(52), time: "2026-11-27T10:00:00Z", hostname: "dboxed-volume-src" },
    { id: "aaaaaaaa2222" + "0".repeat(52), time: "2026-11-28T10:00:00Z", hostname: "dboxed-volume-src" },
    { id: "bbbb3333" + "0".repeat(56), time: "2026-11-29T10:00:00Z", hostname: "dboxed-volume-src" },
  ];
  it("picks the latest, an id by unique prefix, or the newest at or before a time", () => {
    expect(pickSnapshot(snaps, "src", "latest").id).to.match(/^bbbb3333/);
    expect(pickSnapshot(snaps, "src", "aaaaaaaa2222").id).to.match(/^aaaaaaaa2222/);
    expect(pickSnapshot(snaps, "src", "2026-11-28T10:00:00Z").id).to.match(/^aaaaaaaa2222/);
    expect(pickSnapshot(snaps, "src", "2026-11-28T09:59:59Z").id).to.match(/^aaaaaaaa1111/);
    expect(pickSnapshot(snaps, "src", "2026-12-01").id).to.match(/^bbbb3333/);
  });
  it("fails naming the field when nothing or more than one snapshot matches", () => {
    expect(() => pickSnapshot(snaps, "src", "aaaaaaaa")).to.throw(/source\.snapshot: aaaaaaaa matches 2 snapshots of src: give more digits/);
    expect(() => pickSnapshot(snaps, "src", "cccc4444")).to.throw(/source\.snapshot: volume src has no snapshot cccc4444/);
    expect(() => pickSnapshot(snaps, "src", "2026-11-01T00:00:00Z")).to.throw(/source\.snapshot: .*no snapshot at or before .*oldest is of 2026-11-27/);
    expect(() => pickSnapshot([], "src", "latest")).to.throw(/source\.volumeId: volume src has no snapshots/);
  });
});

describe("lvm", () => {
  it("parses lvs JSON reports, also after warnings", () => {
    const json = `  WARNING: something\n{"report":[{"lv":[{"lv_name":"data","vg_name":"dbv-x","lv_size":"134217728","lv_active":"active","origin":""}]}]}`;
    expect(parseLvs(json)).to.deep.equal([{ name: "data", vg: "dbv-x", sizeBytes: 134217728, active: true, origin: "" }]);
    expect(parseLvs("")).to.deep.equal([]);
  });
});

describe("manifests", () => {
  const out = (meta: string, sums: string, root = "41ed\t0\t0") =>
    `==start\n100.5 90.25\n==root\n${root}\n==meta\n${Buffer.from(meta).toString("base64")}\n==sums\n${Buffer.from(sums).toString("base64")}\n==xattrs\n\n==acls\n\n`;
  const h = "0".repeat(64);
  /**
   * Runs host scripts here, with the shell's tools and stand-ins for getfattr/getfacl (the attr and
   * acl packages may be missing on this machine); `done` removes the stand-ins.
   */
  const localHost = () => {
    const bin = fs.mkdtempSync(path.join(os.tmpdir(), "manifest-bin-"));
    for (const t of ["getfattr", "getfacl"]) fs.writeFileSync(path.join(bin, t), "#!/bin/sh\nexit 0\n", { mode: 0o755 });
    return {
      bin,
      run: (script: string, input?: Buffer) => {
        const res = spawnSync("/bin/bash", ["-c", script], { env: { PATH: `${bin}:${process.env.PATH}` }, input });
        expect(res.status, res.stderr.toString()).to.equal(0);
        return res.stdout.toString();
      },
      done: () => fs.rmSync(bin, { recursive: true, force: true }),
    };
  };
  it("groups hardlinks and finds differences by field", () => {
    const meta = "f\t644\t0\t0\t3\t1.5\t2\t11\t1.5\0./a\0\0f\t644\t0\t0\t3\t1.5\t2\t11\t1.5\0./b\0\0l\t777\t0\t0\t1\t2.0\t1\t12\t2.0\0./c\0a\0";
    const m = parseManifest(out(meta, `${h}  ./a\0${h}  ./b\0`));
    expect(m.entries["./b"].hardlinkGroup).to.equal("./a");
    expect(m.entries["./c"].target).to.equal("a");
    expect(m.stamps["./c"]).to.deep.equal({ ino: "12", ctime: "2.0" });
    expect([m.start, m.bootTime]).to.deep.equal([100.5, 10.25]);
    expect(diffManifests(m, m)).to.deep.equal([]);
    const other = parseManifest(out(meta.replace("\t644\t0\t0\t3\t1.5\t2\t11\t1.5\0./b", "\t600\t0\t0\t3\t1.5\t2\t11\t1.5\0./b"), `${h}  ./a\0${h}  ./b\0`));
    expect(diffManifests(m, other)[0]).to.match(/^\.\/b: mode 644 != 600/);
    // A file hashed on neither side (unreadable) is no match.
    const unread = parseManifest(out(meta, `${h}  ./a\0`));
    expect(diffManifests(unread, unread)).to.deep.equal(["./b: its content could not be read on either host"]);
  });

  it("compares the volume root's own mode and owner", () => {
    const a = parseManifest(out("", "", "41ed\t0\t0"));
    const b = parseManifest(out("", "", "41c0\t999\t999"));
    expect(diffManifests(a, b)).to.deep.equal(["the volume root's mode and owner differ: 41ed\t0\t0 != 41c0\t999\t999"]);
  });

  it("reuses a hash from before only for the same inode, size and change time, changed over two seconds before that listing, on the same clock", () => {
    const e = (size: number, sha = h) => ({ type: "f", mode: "644", uid: 0, gid: 0, size, mtime: "1.0", target: "", links: 1, hardlinkGroup: "", sha256: sha });
    const before = {
      entries: { "./same": e(3), "./recent": e(3), "./ctime": e(3), "./ino": e(3), "./size": e(3), "./unread": e(3, ""), "./gone": e(3), "./dir": { ...e(0, ""), type: "d" } },
      stamps: { "./same": { ino: "1", ctime: "50.1" }, "./recent": { ino: "2", ctime: "99.6" }, "./ctime": { ino: "3", ctime: "50.1" }, "./ino": { ino: "4", ctime: "50.1" },
        "./size": { ino: "5", ctime: "50.1" }, "./unread": { ino: "6", ctime: "50.1" }, "./gone": { ino: "7", ctime: "50.1" }, "./dir": { ino: "8", ctime: "50.1" } },
      xattrs: "", acls: "", root: "", start: 100.5, bootTime: 10,
    };
    const now = {
      ...before,
      entries: { "./same": e(3, ""), "./recent": e(3, ""), "./ctime": e(3, ""), "./ino": e(3, ""), "./size": e(4, ""), "./unread": e(3, ""), "./new": e(3, ""), "./dir": { ...e(0, ""), type: "d" } },
      stamps: { ...before.stamps, "./ctime": { ino: "3", ctime: "120.0" }, "./ino": { ino: "40", ctime: "50.1" }, "./new": { ino: "9", ctime: "50.1" } },
      start: 200, bootTime: 10.3,
    };
    expect(filesToHash(before, now)).to.deep.equal(["./ctime", "./ino", "./new", "./recent", "./size", "./unread"]);
    expect(filesToHash(undefined, now)).to.have.length(7);
    // Changed 1.5 s before the listing began: within the margin of one-second timestamps.
    expect(filesToHash({ ...before, start: 51.6 }, now)).to.include("./same");
    // The clock stepped (or the host rebooted) between the listings: nothing is reused.
    expect(filesToHash(before, { ...now, bootTime: 11 })).to.have.length(7);
    expect(filesToHash(before, { ...now, bootTime: 9 })).to.have.length(7);
    const sums = new Map([["./ctime", "1".repeat(64)], ["./same", "2".repeat(64)]]);
    const merged = withHashes(before, now, sums);
    expect(merged.entries["./same"].sha256, "reused, not the fresh sum of a file that was not to be hashed").to.equal(h);
    expect(merged.entries["./ctime"].sha256).to.equal("1".repeat(64));
    expect(merged.entries["./ino"].sha256, "to be hashed, and no fresh sum: no hash, never the old one").to.equal("");
  });

  it("lists a real tree (names and link targets with tabs and newlines) and hashes again only what changed", function () {
    this.timeout(20000);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "manifest-tree-"));
    const { bin, run, done } = localHost();
    try {
      fs.writeFileSync(path.join(dir, "a\tb"), "one");
      fs.writeFileSync(path.join(dir, "line\nbreak"), "two");
      fs.writeFileSync(path.join(dir, "kept"), "three");
      fs.symlinkSync("x\ty", path.join(dir, "link"));
      // A name that is not UTF-8 ("caf" and latin1 e-acute) and one that is.
      fs.writeFileSync(Buffer.concat([Buffer.from(dir + "/caf"), Buffer.from([0xe9])]), "four");
      fs.writeFileSync(path.join(dir, "caf\u00e9"), "five");
      // Older than two seconds before the listing: only then may a hash be reused.
      spawnSync("sleep", ["2.2"]);
      const before = parseManifest(run(manifestScript(dir, [], { forReuse: true })));
      const latin1 = (x: string) => Buffer.from(x, "utf8").toString("latin1");
      expect(Object.keys(before.entries).sort()).to.deep.equal(["./a\tb", "./caf\u00e9", latin1("./caf\u00e9"), "./kept", "./line\nbreak", "./link"].sort());
      expect(before.entries["./caf\u00e9"].sha256).to.equal(crypto.createHash("sha256").update("four").digest("hex"));
      expect(before.entries["./link"].target).to.equal("x\ty");
      expect(before.entries["./a\tb"].sha256).to.equal(crypto.createHash("sha256").update("one").digest("hex"));
      // Same size, mtime set back: only the change time tells.
      const f = path.join(dir, "a\tb"), ref = path.join(bin, "mtime");
      execFileSync("touch", ["-r", f, ref]);
      fs.writeFileSync(f, "ONE");
      execFileSync("touch", ["-m", "-r", ref, f]);
      fs.appendFileSync(Buffer.concat([Buffer.from(dir + "/caf"), Buffer.from([0xe9])]), "!");
      const now = parseManifest(run(manifestScript(dir, [], { hash: false })));
      expect(now.entries["./a\tb"].sha256).to.equal("");
      const todo = filesToHash(before, now);
      expect(todo).to.deep.equal(["./a\tb", "./caf\u00e9"]);
      const merged = withHashes(before, now, parseSums(run(hashScript(dir), pathsInput(todo))));
      expect(merged.entries["./caf\u00e9"].sha256, "a name that is not UTF-8 is hashed as it is on disk").to.equal(crypto.createHash("sha256").update("four!").digest("hex"));
      const diff = diffManifests(before, merged);
      expect(diff[0]).to.equal(`./a\tb: sha256 ${before.entries["./a\tb"].sha256} != ${crypto.createHash("sha256").update("ONE").digest("hex")}`);
      expect(diff[1]).to.match(/^\.\/caf\ufffd: size 4 != 5, .*sha256/);
      expect(merged.entries["./kept"].sha256).to.equal(before.entries["./kept"].sha256);
      expect(merged.entries[latin1("./caf\u00e9")].sha256).to.equal(crypto.createHash("sha256").update("five").digest("hex"));
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
      done();
    }
  });

  it("sees a write through a shared mapping after the listing (the listing syncs first: a dirty mapped page takes writes without setting ctime)", async function () {
    this.timeout(30000);
    // On a disk filesystem (as the volumes' ext4 and xfs): tmpfs never writes pages back.
    let base = os.tmpdir();
    if (execFileSync("stat", ["-f", "-c", "%T", base]).toString().trim() === "tmpfs") base = process.cwd();
    const dir = fs.mkdtempSync(path.join(base, ".manifest-mmap-"));
    const { run, done } = localHost();
    // A writer that maps the file, writes, waits past the reuse margin, then writes to the same page again when told.
    const writer = spawn("python3", ["-c", `
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644); os.ftruncate(fd, 4096)
m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
m[0:1] = b"A"; time.sleep(2.5); print("ready", flush=True)
sys.stdin.readline(); m[1:2] = b"B"; print("written", flush=True); sys.stdin.readline()
`, path.join(dir, "mapped")], { stdio: ["pipe", "pipe", "inherit"] });
    const lines: string[] = [];
    writer.stdout.on("data", (d: Buffer) => lines.push(...d.toString().split("\n").filter(Boolean)));
    const waitFor = async (l: string) => { for (let i = 0; i < 200 && !lines.includes(l); i++) await new Promise((r) => setTimeout(r, 100)); expect(lines, "python3 (the mmap writer) ran").to.include(l); };
    try {
      await waitFor("ready");
      const before = parseManifest(run(manifestScript(dir, [], { forReuse: true })));
      writer.stdin.write("go\n");
      await waitFor("written");
      const now = parseManifest(run(manifestScript(dir, [], { hash: false })));
      expect(filesToHash(before, now), "the second mapped write changed the file's ctime").to.deep.equal(["./mapped"]);
    } finally {
      writer.kill();
      fs.rmSync(dir, { recursive: true, force: true });
      done();
    }
  });

  it("fails when getfattr or getfacl is missing instead of comparing empty sections", () => {
    // A PATH with the shell's tools and all three the manifest needs, then each of them taken away.
    const bin = fs.mkdtempSync(path.join(os.tmpdir(), "manifest-path-"));
    try {
      for (const d of ["/usr/bin", "/bin"]) {
        for (const f of fs.existsSync(d) ? fs.readdirSync(d) : []) {
          if (!fs.existsSync(path.join(bin, f))) fs.symlinkSync(path.join(d, f), path.join(bin, f));
        }
      }
      const tools = ["getfattr", "getfacl", "sha256sum"];
      for (const missing of tools) {
        for (const t of tools) {
          fs.rmSync(path.join(bin, t), { force: true });
          if (t !== missing) fs.writeFileSync(path.join(bin, t), "#!/bin/sh\nexit 0\n", { mode: 0o755 });
        }
        const res = spawnSync("/bin/sh", ["-c", manifestScript("/tmp")], { env: { PATH: bin } });
        expect(res.status, missing).to.equal(44);
        expect(res.stderr.toString()).to.include(`manifest: ${missing} is missing`);
      }
    } finally {
      fs.rmSync(bin, { recursive: true, force: true });
    }
  });
});

describe("leases and diff", () => {
  it("compares hosts by address and port, builds lease URLs in both styles", () => {
    expect(sameHost({ address: "a", port: 22 }, { address: "a", port: 22 })).to.equal(true);
    expect(sameHost({ address: "a", port: 22 }, { address: "a", port: 2222 })).to.equal(false);
    expect(leaseUrl("http://10.0.2.100:9000", "bkt", "p/q", "v1", true)).to.equal("http://10.0.2.100:9000/bkt/p/q-meta/volumes/v1/lease.json");
    expect(leaseUrl("https://s3.example.org", "bkt", "p", "v1", false)).to.equal("https://bkt.s3.example.org/p-meta/volumes/v1/lease.json");
    expect(maintenanceUrl("http://10.0.2.100:9000", "bkt", "p/q", true)).to.equal("http://10.0.2.100:9000/bkt/p/q-meta/maintenance/");
  });

  it("a new host is an update (a move); a new filesystem or volumeGroup an update (a rebuild), never a replacement", async () => {
    const hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHr9dXpxG0Hk3Zc1s4Hk0a5x0d8hX8cX2v8tQ2x3y4z5";
    const base = { volumeId: "v", host: { address: "a", port: 22, hostKey }, filesystem: "ext4", size: 1 };
    // planDiff: what diff decides before it runs the new host's pre-flight (a lab test runs that).
    const move = await planDiff(base, { ...base, host: { address: "b", port: 22, hostKey: hostKey.replace("Hr9", "Xr9") } });
    expect(move.changes).to.equal(true);
    expect(move.move).to.equal(true);
    expect(move.replaces).to.deep.equal([]);
    // The same machine (same pinned key) at another address is no move: no pre-flight.
    const readdress = await planDiff(base, { ...base, host: { address: "b", port: 2222, hostKey } });
    expect([readdress.changes, readdress.move]).to.deep.equal([true, false]);
    const fs = await diff("v", base, { ...base, filesystem: "xfs" });
    expect(fs.changes).to.equal(true);
    expect(fs.replaces).to.deep.equal([]);
    const vg = await diff("v", base, { ...base, volumeGroup: "vg0" });
    expect(vg.replaces).to.deep.equal([]);
    expect((await diff("v", base, { ...base })).changes).to.equal(false);
    // A state from before leaseDuration existed had its default: no diff for existing stacks.
    expect((await diff("v", base, { ...base, leaseDuration: 600, forceDespiteLiveLease: false })).changes).to.equal(false);
    expect((await diff("v", base, { ...base, leaseDuration: 120 })).changes).to.equal(true);
    // Bookkeeping inputs set by the Volume class are not changes.
    expect((await diff("v", base, { ...base, owner: { project: "p", stack: "s", name: "n" }, volumeIdFrom: { stack: "s", name: "n" } })).changes).to.equal(false);
  });
});

describe("starting and stopping the volume's users", () => {
  it("puts -- before the unit names, in argument vectors and quoted command lines", () => {
    expect(unitsArgv("stop", ["-H.service", "app.service"])).to.deep.equal(["systemctl", "stop", "--", "-H.service", "app.service"]);
    expect(unitsCommand("start", ["-H.service", "a$b.service"])).to.equal("systemctl start -- -H.service 'a$b.service'");
    // The shell sees -- first, then each name as one word.
    const out = execFileSync("/bin/sh", ["-c", `systemctl() { printf '[%s]' "$@"; }; ${unitsCommand("stop", ["-H.service", "a b.service"])}`]).toString();
    expect(out).to.equal("[stop][--][-H.service][a b.service]");
  });
});
