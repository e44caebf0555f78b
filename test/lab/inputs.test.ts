// Bad inputs fail at preview, through the real CLI, with a message that names the field, and
// no host is touched.
import { expect } from "chai";
import { execFileSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { lab, onHost, Stack } from "./harness";

const bad = "x;$(reboot)`id`|&>y";

/** [field named in the error, volume args, host override, provider override] */
const cases: [string, Record<string, unknown>, Record<string, unknown>, Record<string, unknown>][] = [
  ["size", { size: "10 potatoes" }, {}, {}],
  ["size", { size: `1GiB${bad}` }, {}, {}],
  ["size", { size: 1_000_000_000 }, {}, {}],
  ["filesystem", { filesystem: `ext4${bad}` }, {}, {}],
  ["mountPath", { mountPath: `/srv/a${bad}` }, {}, {}],
  ["mountPath", { mountPath: "/etc" }, {}, {}],
  ["volumeId", { volumeId: `v${bad}` }, {}, {}],
  ["backupSchedule", { backupSchedule: `*:0/5${bad}` }, {}, {}],
  ["volumeGroup", { volumeGroup: `vg0${bad}` }, {}, {}],
  ["host.address", {}, { address: `h${bad}` }, {}],
  ["host.user", {}, { user: `root${bad}` }, {}],
  ["host.port", {}, { port: 70000 }, {}],
  ["host.hostKey", {}, { hostKey: `ssh-ed25519 ${bad}` }, {}],
  ["host.privateKey", {}, { privateKey: bad }, {}],
  ["s3.bucket", {}, {}, { s3: { bucket: `b${bad}` } }],
  ["s3.prefix", {}, {}, { s3: { prefix: `p/../${bad}` } }],
  ["s3.region", {}, {}, { s3: { region: `us${bad}` } }],
  ["s3.hostEndpoint", {}, {}, { s3: { hostEndpoint: `http://h${bad}` } }],
  ["password", {}, {}, { password: "short" }],
  ["retention.keepLast", {}, {}, { retention: { keepLast: 0 } }],
  ["unknown argument(s) sise", { sise: "1GiB" }, {}, {}],
];

/**
 * Bad secret inputs: the preview fails naming the field, and prints no secret. The engine
 * prints the value of a property that a check failure names (a whole `host` or `s3` object for
 * a misspelt field inside it), so the value itself, and the lab's real key, are looked for.
 */
const labKeyLine = () => fs.readFileSync(lab().hosts[0].privateKeyPath, "utf8").split("\n").filter((x) => x.length > 40)[0];
const encrypted = (() => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "bad-inputs-"));
  execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "RightPass-1", "-C", "", "-f", path.join(dir, "k")]);
  const key = fs.readFileSync(path.join(dir, "k"), "utf8");
  fs.rmSync(dir, { recursive: true, force: true });
  return { key, line: key.split("\n").filter((x) => x.length > 40)[0] };
})();
const bastion = (auth: Record<string, unknown>) => () => ({ proxy: { address: "10.0.2.13", hostKey: lab().hosts[0].hostKey, ...auth } });
const secretCases: [string, Record<string, unknown> | (() => Record<string, unknown>), Record<string, unknown>, () => string[]][] = [
  ["host.privateKeyPassword", { privateKey: encrypted.key, privateKeyPassword: "WrongPass-58" }, {}, () => ["WrongPass-58", "RightPass-1", encrypted.line]],
  ["host.proxy.privateKey", bastion({ privateKey: "-----BEGIN OPENSSH PRIVATE KEY-----\nYnJva2VuLXByb3h5LWtleS02Ng==\n-----END OPENSSH PRIVATE KEY-----\n" }), {},
    () => ["YnJva2VuLXByb3h5LWtleS02Ng=="]],
  ["host.proxy.privateKeyPassword", bastion({ privateKey: encrypted.key, privateKeyPassword: "ProxyPass-19" }), {}, () => ["ProxyPass-19", encrypted.line]],
  ["s3.accessKeyId", {}, { s3: { accessKeyId: "AKIA-SECRET-77\nx" } }, () => ["AKIA-SECRET-77"]],
  ["password", {}, { password: "Short7!" }, () => ["Short7!"]],
  ["password", {}, { password: "multi-line-secret-1\nsecond line" }, () => ["multi-line-secret-1"]],
  ["s3.secretAccessKey", {}, { s3: { secretAccessKey: "SeCrEtKeY-42\nmore" } }, () => ["SeCrEtKeY-42"]],
  ["unknown field(s) sekret", {}, { s3: { sekret: "x" } }, () => [lab().s3.secretAccessKey]],
  ["host.privateKey", { privateKey: "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LWJ1dC1icm9rZW4ta2V5\n-----END OPENSSH PRIVATE KEY-----\n" }, {},
    () => ["c2VjcmV0LWJ1dC1icm9rZW4ta2V5"]],
  ["unknown field(s) passphrase", { passphrase: "PaSsPhRaSe-7" }, {}, () => ["PaSsPhRaSe-7", labKeyLine()]],
];

async function hostState(): Promise<string[]> {
  return Promise.all(lab().hosts.map(async (h) => (await onHost(h,
    "ls -la /etc/dboxed-volumes /usr/local/lib/dboxed-volumes 2>&1; lvs --noheadings -o vg_name,lv_name -S 'origin=\"\"' 2>&1; " +
    "systemctl list-unit-files 'dboxed-volume*' --no-legend 2>&1; ls /etc/systemd/system; ls /srv 2>&1")).stdout));
}

describe("bad inputs (real pulumi preview)", function () {
  let stack: Stack;
  let initial: string[];

  before(async () => {
    stack = new Stack("bad-inputs", "volumes");
    await stack.init();
    initial = await hostState();
  });

  for (const [field, args, hostOverride, provider] of cases) {
    it(`${field}: ${JSON.stringify({ ...args, ...hostOverride, ...provider }).slice(0, 60)} fails at preview naming the field`, async () => {
      const res = await stack.preview({
        provider: provider,
        volumes: [{ name: "v", host: 0, hostOverride, args: { volumeId: "bad-input", size: "64MiB", mountPath: "/srv/bad", ...args } }],
      });
      const text = res.stdout + res.stderr;
      expect(res.code, text).to.not.equal(0);
      expect(text).to.include(field.startsWith("unknown") ? field : `${field}: `);
    });
  }

  for (const [field, hostOverride, provider, secrets] of secretCases) {
    it(`${field}: a bad secret input fails at preview naming the field, and the output holds no secret`, async () => {
      const res = await stack.preview({
        provider,
        volumes: [{ name: "v", host: 0, hostOverride: typeof hostOverride === "function" ? hostOverride() : hostOverride,
          args: { volumeId: "bad-input", size: "64MiB", mountPath: "/srv/bad" } }],
      });
      const text = res.stdout + res.stderr;
      expect(res.code, text).to.not.equal(0);
      expect(text).to.include(field.startsWith("unknown") ? field : `${field}: `);
      for (const secret of secrets()) expect(text.includes(secret), `the output shows the secret ${secret.slice(0, 6)}...:\n${text}`).to.equal(false);
    });
  }

  it("touched no host", async () => {
    expect(await hostState()).to.deep.equal(initial);
  });
});
