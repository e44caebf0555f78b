// check() of both resources: every bad input fails with a message that names its field.
import { expect } from "chai";
import { execFileSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import * as volume from "../../provider/lifecycle/volume";
import * as volumeProvider from "../../provider/lifecycle/volumeProvider";
import { formatSize, parseSize } from "../../provider/inputs";
import { effectiveRandomDelay } from "../../provider/lifecycle/steps";
import { UNKNOWN } from "../../provider/lifecycle/unknowns";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "inputs-test-"));
execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", path.join(dir, "k")]);
const privateKey = fs.readFileSync(path.join(dir, "k"), "utf8");
const hostKey = fs.readFileSync(path.join(dir, "k.pub"), "utf8").split(" ").slice(0, 2).join(" ");

const goodVolume = () => ({
  volumeId: "pgdata",
  host: { address: "10.1.2.3", port: 22, user: "root", privateKey, hostKey },
  size: "1GiB", filesystem: "ext4", mountPath: "/srv/pgdata", backupSchedule: "*:0/5",
  finalBackupOnDelete: true, forgetSnapshotsOnDelete: false,
  repository: { endpoint: "http://10.0.2.100:9000", localEndpoint: "http://127.0.0.1:9000", region: "us-east-1", bucket: "b", prefix: "p", forcePathStyle: true },
  accessKeyId: "AKIA", secretAccessKey: "secret", password: "password1",
  retention: { keepLast: 2, keepHourly: 6, keepDaily: 7, keepWeekly: 4, keepMonthly: 6, keepYearly: 1 },
  rustic: { localPath: "/usr/local/bin/rustic" },
});
const goodProvider = () => ({
  s3: { endpoint: "http://127.0.0.1:9000", bucket: "my-bucket", accessKeyId: "AKIA", secretAccessKey: "s" },
  password: "password1", retention: {}, rustic: { localPath: "/usr/local/bin/rustic" },
});

function set(o: any, p: string, v: unknown) {
  const keys = p.split(".");
  let cur = o;
  for (const k of keys.slice(0, -1)) cur = cur[k];
  cur[keys[keys.length - 1]] = v;
  return o;
}

const metachars = "a;$(reboot)`id`|&>x";
const badVolumes: [string, string, unknown][] = [
  ["size", "size", "10 potatoes"],
  ["size", "size", 1_000_000_000],
  ["size", "size", "16MiB"],
  ["size", "size", `1GiB${metachars}`],
  ["filesystem", "filesystem", "btrfs"],
  ["filesystem", "filesystem", `ext4;${metachars}`],
  ["mountPath", "mountPath", "relative/path"],
  ["mountPath", "mountPath", `/srv/a${metachars}`],
  ["mountPath", "mountPath", "/etc"],
  ["mountPath", "mountPath", "/srv/../etc"],
  ["mountPath", "mountPath", "/srv/with space"],
  ["volumeId", "volumeId", "Bad_ID"],
  ["volumeId", "volumeId", `v${metachars}`],
  ["backupSchedule", "backupSchedule", "every 5 minutes"],
  ["backupSchedule", "backupSchedule", `*:0/5${metachars}`],
  ["host.address", "host.address", `h${metachars}`],
  ["host.port", "host.port", 70000],
  ["host.user", "host.user", `root${metachars}`],
  ["host.privateKey", "host.privateKey", `not a key ${metachars}`],
  ["host.hostKey", "host.hostKey", `ssh-ed25519 ${metachars}`],
  ["volumeGroup", "volumeGroup", `vg0 ${metachars}`],
  // Unit names reach systemctl after "--", and must not read as an option even so.
  ["stopUnits.0", "stopUnits", ["-now.service"]],
  ["stopUnits.0", "stopUnits", ["--help.service"]],
  ["stopUnits.0", "stopUnits", [".hidden.service"]],
  // Values from the VolumeProvider that reach files on the host: a newline would start a new directive.
  ["password", "password", "pass\nword1"],
  ["accessKeyId", "accessKeyId", "AKIA\nuser = \"x:y\""],
  ["secretAccessKey", "secretAccessKey", "s\r\nurl = file:///etc/shadow"],
  ["repository.endpoint", "repository.endpoint", "http://h:9000\n[repository]"],
  ["source.volumeId", "source", { volumeId: `v${metachars}` }],
  ["source.volumeId", "source", { volumeId: "pgdata" }],
  ["source.snapshot", "source", { volumeId: "other", snapshot: "yesterday" }],
  ["source.snapshot", "source", { volumeId: "other", snapshot: "abc" }],
  ["source.snapshot", "source", { volumeId: "other", snapshot: `2026-11-28${metachars}` }],
  // A time without its zone would pick another snapshot on a machine in another zone.
  ["source.snapshot", "source", { volumeId: "other", snapshot: "2026-11-28T10:00:00" }],
];

describe("Volume check", () => {
  it("accepts a good volume and normalises the size to bytes", async () => {
    const r = await volume.check({}, goodVolume());
    expect(r.failures).to.deep.equal([]);
    expect(r.inputs.size).to.equal(1024 ** 3);
  });

  for (const [field, p, value] of badVolumes) {
    it(`refuses ${field} = ${JSON.stringify(value).slice(0, 40)} naming the field`, async () => {
      const r = await volume.check({}, set(goodVolume(), p, value));
      expect(r.failures.map((f) => f.property)).to.include(field);
      expect(r.failures.find((f) => f.property === field)!.reason).to.match(new RegExp(`^${field.replace(".", "\\.")}: `));
    });
  }

  it("takes leaseDuration as seconds or with a unit, and refuses what is out of range", async () => {
    expect((await volume.check({}, { ...goodVolume(), leaseDuration: "10m" })).inputs.leaseDuration).to.equal(600);
    expect((await volume.check({}, { ...goodVolume(), leaseDuration: 90 })).inputs.leaseDuration).to.equal(90);
    expect((await volume.check({}, goodVolume())).inputs.leaseDuration).to.equal(600);
    for (const bad of ["5s", "8d", "ten minutes", 59.5]) {
      const r = await volume.check({}, { ...goodVolume(), leaseDuration: bad });
      expect(r.failures.map((f) => f.reason).join()).to.match(/^leaseDuration: must be 60 seconds to 7 days/);
    }
  });

  it("takes backupRandomDelay as seconds or with a unit (unset: a default the host's schedule decides), and refuses what is out of range", async () => {
    expect((await volume.check({}, goodVolume())).inputs.backupRandomDelay).to.equal(undefined);
    expect(effectiveRandomDelay(undefined, 300)).to.equal(120);
    expect(effectiveRandomDelay(undefined, 20)).to.equal(10);
    expect(effectiveRandomDelay(undefined, undefined)).to.equal(120);
    expect(effectiveRandomDelay(0, 20)).to.equal(0);
    expect((await volume.check({}, { ...goodVolume(), backupRandomDelay: "3m" })).inputs.backupRandomDelay).to.equal(180);
    expect((await volume.check({}, { ...goodVolume(), backupRandomDelay: 0 })).inputs.backupRandomDelay).to.equal(0);
    for (const bad of [-1, "2d", "soon", 1.5]) {
      const r = await volume.check({}, { ...goodVolume(), backupRandomDelay: bad });
      expect(r.failures.map((f) => f.reason).join()).to.match(/^backupRandomDelay: must be 0 seconds to 1 day/);
    }
  });

  it("refuses xfs below its minimum size", async () => {
    const r = await volume.check({}, { ...goodVolume(), filesystem: "xfs", size: "128MiB" });
    expect(r.failures[0].reason).to.match(/size: xfs needs at least 320MiB/);
  });

  it("refuses unknown fields (a typo) and names them", async () => {
    const r = await volume.check({}, { ...goodVolume(), sise: "2GiB" });
    expect(r.failures[0].reason).to.match(/unknown field\(s\) sise/);
  });

  it("refuses shrinking, naming size", async () => {
    const r = await volume.check({ volumeId: "pgdata", size: 2 * 1024 ** 3 }, goodVolume());
    expect(r.failures.map((f) => f.reason).join()).to.match(/size: shrinking a volume is not supported \(2GiB -> 1GiB\)/);
  });

  it("lets values that are unknown during a preview through", async () => {
    const r = await volume.check({}, { ...goodVolume(), password: UNKNOWN, repository: UNKNOWN });
    expect(r.failures).to.deep.equal([]);
  });

  it("still reports known bad values when others are unknown", async () => {
    const r = await volume.check({}, { ...goodVolume(), password: UNKNOWN, mountPath: "/etc" });
    expect(r.failures.map((f) => f.property)).to.deep.equal(["mountPath"]);
  });
});

const badProviders: [string, string, unknown][] = [
  ["s3.endpoint", "s3.endpoint", "not a url"],
  ["s3.endpoint", "s3.endpoint", `http://h${metachars}`],
  ["s3.hostEndpoint", "s3.hostEndpoint", "ftp://x"],
  ["s3.bucket", "s3.bucket", "Bad_Bucket"],
  ["s3.prefix", "s3.prefix", "/abs"],
  ["s3.prefix", "s3.prefix", "a/../b"],
  ["s3.region", "s3.region", `us east${metachars}`],
  ["s3.accessKeyId", "s3.accessKeyId", "line\nbreak"],
  ["password", "password", "short"],
  ["retention.keepLast", "retention.keepLast", 0],
  ["rustic.sha256", "rustic", { url: "https://example.org/rustic", sha256: "abc" }],
  ["password", "password", "pass\tword\n2nd line"],
  ["password", "password", "password\r"],
  // A URL is stored in plain state and reaches the host's command line: no credentials in it.
  ["rustic.url", "rustic", { url: "https://user:token@example.org/rustic", sha256: "a".repeat(64) }],
  ["rustic.url", "rustic", { url: "https://bucket.example.org/rustic?X-Amz-Signature=abc", sha256: "a".repeat(64) }],
  ["rustic.url", "rustic", { url: "https://example.org/rustic?access_token=abc", sha256: "a".repeat(64) }],
];

describe("connections as remote.Connection describes them", () => {
  execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "pass phrase", "-f", path.join(dir, "enc")]);
  const encrypted = fs.readFileSync(path.join(dir, "enc"), "utf8");
  const bastion = { address: "bastion.example.org", hostKey, privateKey };
  it("accepts a bastion, an agent socket, an encrypted key with its passphrase, dial limits, ecdsa and rsa pins", async () => {
    const host = { ...goodVolume().host, privateKey: encrypted, privateKeyPassword: "pass phrase", proxy: bastion, dialErrorLimit: 3, perDialTimeout: 10 };
    const r = await volume.check({}, { ...goodVolume(), host });
    expect(r.failures).to.deep.equal([]);
    expect(r.inputs.host.proxy).to.deep.equal({ ...bastion, port: 22, user: "root" });
    for (const pin of ["ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBPp", "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABgQC"]) {
      expect((await volume.check({}, { ...goodVolume(), host: { ...goodVolume().host, hostKey: pin } })).failures, pin).to.deep.equal([]);
    }
    const agent = { ...goodVolume().host, privateKey: undefined, agentSocketPath: "/run/user/1000/ssh-agent.sock" };
    expect((await volume.check({}, { ...goodVolume(), host: agent })).failures).to.deep.equal([]);
  });
  it("refuses an encrypted key without or with a wrong passphrase, and no key without an agent, naming the field", async () => {
    const noPass = await volume.check({}, { ...goodVolume(), host: { ...goodVolume().host, privateKey: encrypted } });
    expect(noPass.failures.map((f) => f.reason)).to.deep.equal(["host.privateKey: is encrypted: set privateKeyPassword to its passphrase"]);
    const wrong = await volume.check({}, { ...goodVolume(), host: { ...goodVolume().host, privateKey: encrypted, privateKeyPassword: "nope" } });
    expect(wrong.failures.map((f) => f.property)).to.deep.equal(["host.privateKeyPassword"]);
    const saved = process.env.SSH_AUTH_SOCK;
    delete process.env.SSH_AUTH_SOCK;
    try {
      const none = await volume.check({}, { ...goodVolume(), host: { ...goodVolume().host, privateKey: undefined } });
      expect(none.failures.map((f) => f.reason).join()).to.match(/^host.privateKey: is required unless an SSH agent is used/);
    } finally {
      if (saved !== undefined) process.env.SSH_AUTH_SOCK = saved;
    }
    const badProxy = await volume.check({}, { ...goodVolume(), host: { ...goodVolume().host, proxy: { ...bastion, hostKey: "nope" } } });
    expect(badProxy.failures.map((f) => f.property)).to.deep.equal(["host.proxy.hostKey"]);
  });
  it("a connection given as an Output arrives with absent fields as null: they are dropped", async () => {
    const host = { ...goodVolume().host, privateKeyPassword: null, agentSocketPath: null, proxy: null, dialErrorLimit: null };
    expect((await volume.check({}, { ...goodVolume(), host })).failures).to.deep.equal([]);
  });
});

describe("check failures reach the engine without a property", () => {
  it("so that the engine never prints a value (a secret) beside them; each reason names its field", async () => {
    const { handlers } = await import("../../provider/runtime");
    const r = await handlers("volumeProvider").check({}, { ...goodProvider(), password: "Short7!" });
    expect(r.failures).to.deep.equal([{ property: "", reason: "password: must be at least 8 characters" }]);
    const v = await handlers("volume").check({}, { ...goodVolume(), host: { ...goodVolume().host, typo: 1 } });
    expect(v.failures.map((f: any) => f.property)).to.deep.equal([""]);
    expect(v.failures[0].reason).to.match(/^host: unknown field\(s\) typo/);
  });
});

describe("VolumeProvider check", () => {
  it("accepts a plain rustic URL, and a password with a tab (TOML and curl carry it quoted)", async () => {
    expect((await volumeProvider.check({}, { ...goodProvider(), rustic: { url: "https://example.org/rustic-v0.11", sha256: "a".repeat(64) } })).failures).to.deep.equal([]);
    // A query that carries no credential (existing stacks may use one) stays accepted.
    expect((await volumeProvider.check({}, { ...goodProvider(), rustic: { url: "https://example.org/rustic?raw=true", sha256: "a".repeat(64) } })).failures).to.deep.equal([]);
    expect((await volumeProvider.check({}, { ...goodProvider(), password: "pass\tword1" })).failures).to.deep.equal([]);
  });

  it("accepts a good provider and fills defaults", async () => {
    const r = await volumeProvider.check({}, goodProvider());
    expect(r.failures).to.deep.equal([]);
    expect(r.inputs.s3.prefix).to.equal("dboxed-volumes");
    expect(r.inputs.retention.keepLast).to.equal(2);
  });
  for (const [field, p, value] of badProviders) {
    it(`refuses ${field} = ${JSON.stringify(value).slice(0, 40)} naming the field`, async () => {
      const r = await volumeProvider.check({}, set(goodProvider(), p, value));
      expect(r.failures.map((f) => f.property)).to.include(field);
    });
  }
});

describe("sizes", () => {
  const table: [string | number, number][] = [
    ["1GiB", 1024 ** 3], ["512MiB", 512 * 1024 ** 2], ["1.5G", 1.5 * 1024 ** 3], ["2GB", 2e9], [4194304, 4194304], ["1 TiB", 1024 ** 4],
  ];
  for (const [input, bytes] of table) it(`parses ${JSON.stringify(input)}`, () => expect(parseSize(input)).to.equal(bytes));
  it("formats in the largest exact unit", () => {
    expect(formatSize(1024 ** 3)).to.equal("1GiB");
    expect(formatSize(260 * 1024 ** 2)).to.equal("260MiB");
  });
  it("refuses garbage", () => {
    expect(() => parseSize("1 GiBs")).to.throw(/not a size/);
    expect(() => parseSize(-1)).to.throw();
  });
});
