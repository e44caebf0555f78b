// Clone from a snapshot: a new Volume with `source` starts from another volume's snapshot
// ("latest", an id, or a time) and gets its own id and history; the source keeps running,
// unchanged. A source that matches nothing fails before anything is claimed or made.
import { expect } from "chai";
import * as crypto from "crypto";
import { installHeartbeat, lab, labLease, onHost, Stack, stepByStep } from "./harness";
import { manifest, Manifest } from "./manifest";
import { parseSnapshots, Snapshot } from "../../provider/host/rustic";
import type { LabHost } from "../../lab/lab";

const hex = () => crypto.randomBytes(3).toString("hex");
const prefix = `clone-${hex()}`;
const src = `cs-${hex()}`;
const ids = { latest: `cl-${hex()}`, byId: `ci-${hex()}`, byTime: `ct-${hex()}`, bad: `cb-${hex()}` };
const srcPath = "/srv/clone-src";
const writer = `app-${src}.service`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function snapshots(h: LabHost, profileOf: string, id: string): Promise<Snapshot[]> {
  const r = await onHost(h, `/usr/local/lib/dboxed-volumes/rustic -P /etc/dboxed-volumes/${profileOf}/rustic --no-progress snapshots --json -g '' --filter-host dboxed-volume-${id}`,
    { timeoutMs: 600_000 });
  return parseSnapshots(r.stdout);
}

describe("clone from a snapshot (real pulumi, lab hosts)", function () {
  let stack: Stack;
  stepByStep(this, () => stack.run(["destroy", "--yes", "--skip-preview"]));
  let h1: LabHost, h2: LabHost;
  let first: Manifest["entries"], second: Manifest["entries"];
  let s1: Snapshot, s2: Snapshot;
  let srcSnaps: string[] = [];
  let srcToken = "";
  const source = { name: "src", host: 0, args: { volumeId: src, size: "128MiB", mountPath: srcPath, backupSchedule: "hourly", stopUnits: [writer] } };
  const clone = (name: string, host: number, volumeId: string, snapshot?: string) =>
    ({ name, host, args: { volumeId, size: "128MiB", mountPath: `/srv/${name}`, backupSchedule: "hourly", source: { volumeId: src, ...(snapshot ? { snapshot } : {}) } } });
  const input = (volumes: unknown[]) => ({ provider: { s3: { prefix } }, volumes });
  const dataOf = async (h: LabHost, dir: string) => (await manifest(h, `${dir}/data`)).entries;

  before(async () => {
    [h1, h2] = lab().hosts;
    // The source's application: a heartbeat on the volume, outside the data the clones compare.
    await installHeartbeat(h1, writer, srcPath);
    stack = new Stack("clone", "volumes");
    await stack.init();
  });

  it("a source volume with two snapshots of different data, its application running", async () => {
    const res = await stack.up(input([source]));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    const backup = `systemctl start dboxed-volume-${src}-backup.service`;
    await onHost(h1, `set -e; mkdir -p ${srcPath}/data/sub; for i in $(seq 1 20); do head -c $((i * 2000)) /dev/urandom > ${srcPath}/data/f-$i; done
echo one > ${srcPath}/data/sub/version; setfattr -n user.v -v one ${srcPath}/data/f-1; chown 1234:2345 ${srcPath}/data/f-2; sync; ${backup}`);
    first = await dataOf(h1, srcPath);
    await sleep(1500);
    await onHost(h1, `set -e; echo two > ${srcPath}/data/sub/version; rm ${srcPath}/data/f-3; head -c 5000 /dev/urandom > ${srcPath}/data/new; sync; ${backup}`);
    second = await dataOf(h1, srcPath);
    expect(second).to.not.deep.equal(first);
    await onHost(h1, `systemctl start ${writer}`);
    const snaps = await snapshots(h1, src, src);
    expect(snaps.length).to.equal(3);
    [s1, s2] = snaps.slice(1);
    srcSnaps = snaps.map((s) => s.id);
    srcToken = (await labLease(prefix, src))!.lease.token;
  });

  it("three clones in one up (latest, an id, a time) each hold their snapshot's data; the source runs on unchanged", async () => {
    const between = new Date((Date.parse(s1.time) + Date.parse(s2.time)) / 2).toISOString();
    const res = await stack.up(input([source,
      clone("latest", 1, ids.latest),
      clone("byid", 0, ids.byId, s1.id.slice(0, 12)),
      clone("bytime", 1, ids.byTime, between)]));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    // Content and metadata (modes, owners, xattrs, hardlinks) of each clone equal the chosen snapshot's.
    expect(await dataOf(h2, "/srv/latest")).to.deep.equal(second);
    expect(await dataOf(h1, "/srv/byid")).to.deep.equal(first);
    expect(await dataOf(h2, "/srv/bytime")).to.deep.equal(first);
    const o = (await stack.outputs()).volumes;
    expect(o.latest.clonedFrom).to.deep.equal({ volumeId: src, snapshotId: s2.id, snapshotTime: s2.time });
    expect(o.byid.clonedFrom).to.deep.equal({ volumeId: src, snapshotId: s1.id, snapshotTime: s1.time });
    expect(o.bytime.clonedFrom).to.deep.equal({ volumeId: src, snapshotId: s1.id, snapshotTime: s1.time });
    expect(o.src.clonedFrom).to.deep.equal({});
    // Each clone has a history of its own, under its own id, written from its host.
    for (const [h, id] of [[h2, ids.latest], [h1, ids.byId], [h2, ids.byTime]] as const) {
      const own = await snapshots(h, id, id);
      expect(own.length, id).to.equal(1);
      expect(own[0].hostname).to.equal(`dboxed-volume-${id}`);
      expect((await labLease(prefix, id))!.lease.holder.port).to.equal(h.port);
    }
    // The source: same snapshots, same lease, mounted read-write, its application writing, data unchanged.
    expect((await snapshots(h1, src, src)).map((s) => s.id)).to.deep.equal(srcSnaps);
    const l = (await labLease(prefix, src))!.lease;
    expect([l.token, l.holder.port]).to.deep.equal([srcToken, h1.port]);
    const state = await onHost(h1, `findmnt -n -o OPTIONS --mountpoint ${srcPath} | cut -d, -f1; systemctl is-active ${writer}; echo $(( $(date +%s) - $(stat -c %Y ${srcPath}/heartbeat) ))`);
    const [mode, active, age] = state.stdout.trim().split("\n");
    expect([mode, active]).to.deep.equal(["rw", "active"]);
    expect(Number(age)).to.be.lessThan(5);
    expect(await dataOf(h1, srcPath)).to.deep.equal(second);
  });

  it("a source that matches no snapshot fails naming the field, before anything is claimed or made", async () => {
    const res = await stack.up(input([source, clone("latest", 1, ids.latest), clone("byid", 0, ids.byId, s1.id.slice(0, 12)),
      clone("bytime", 1, ids.byTime, new Date((Date.parse(s1.time) + Date.parse(s2.time)) / 2).toISOString()),
      clone("bad", 1, ids.bad, "2020-01-01T00:00:00Z"),
      { ...clone("nosrc", 1, `cn-${ids.bad}`), args: { ...clone("nosrc", 1, `cn-${ids.bad}`).args, source: { volumeId: "no-such-volume" } } }]));
    expect(res.code).to.not.equal(0);
    const out = res.stdout + res.stderr;
    expect(out).to.match(new RegExp(`source\\.snapshot: volume ${src} has no snapshot at or before 2020-01-01T00:00:00Z \\(its oldest is of `));
    expect(out).to.match(/source\.volumeId: volume no-such-volume has no snapshots in this repository/);
    expect(await labLease(prefix, ids.bad)).to.equal(undefined);
    expect(await labLease(prefix, `cn-${ids.bad}`)).to.equal(undefined);
    const left = await onHost(h2, `ls -d /etc/dboxed-volumes/${ids.bad} /etc/dboxed-volumes/cn-${ids.bad} /srv/bad /srv/nosrc 2>/dev/null | wc -l; vgs --noheadings -o vg_name | grep -c -e ${ids.bad} || true`);
    expect(left.stdout.trim().split("\n")).to.deep.equal(["0", "0"]);
  });

  it("a changed source of an existing clone changes nothing on it: its data stays", async () => {
    const res = await stack.up(input([source, clone("latest", 1, ids.latest), clone("byid", 0, ids.byId, s1.id.slice(0, 12)),
      clone("bytime", 1, ids.byTime, "latest")]));
    expect(res.code, res.stdout + res.stderr).to.equal(0);
    expect(await dataOf(h2, "/srv/bytime")).to.deep.equal(first);
    expect((await stack.outputs()).volumes.bytime.clonedFrom.snapshotId).to.equal(s1.id);
  });

  it("destroy removes the clones and the source", async () => {
    await onHost(h1, `systemctl stop ${writer}`);
    const res = await stack.run(["destroy", "--yes", "--skip-preview"]);
    expect(res.code, res.stdout + res.stderr).to.equal(0);
  });
});
