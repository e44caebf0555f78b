// A manifest of a directory tree: path, type, mode, owner, size, mtime, symlink target,
// hardlink group, content hash, xattrs and ACLs of every entry. A move is verified by
// comparing the manifests of the source and the restored tree, not by counting files.
//
// Hashing every byte on both hosts while the volume is down made the verification most of a warm
// move's downtime. So a move hashes both trees before the stop as well (the old one while it
// runs, the new one after the warm restore), and after it hashes again only the files that may
// have changed since: a hash taken before is reused only for the same inode with the same change
// time (ctime), a time the kernel sets on a change of content or metadata and no program can set,
// and only when that ctime lies over two seconds before the earlier listing began (a change within
// the timestamps' granularity of it, a second on ext4 with small inodes, could leave ctime as it
// was), and when the host's clock was not stepped in between (boot time by the realtime clock
// moved, or a reboot). Writes through a shared mapping set ctime only on the first write to a
// clean page: the listing syncs the filesystem first, so that any later write faults and sets it.
// Every entry's metadata is still listed and compared after the stop.
//
// Paths are kept as byte strings (latin1): a name that is not valid UTF-8 must reach sha256sum as
// it is on disk. Only the lines shown to people are decoded as UTF-8.
import { quote } from "./shell";

export interface ManifestEntry {
  type: string; mode: string; uid: number; gid: number; size: number; mtime: string;
  target: string; links: number; hardlinkGroup: string; sha256: string;
}
/** What proves that a file has not changed since it was listed: not compared between trees. */
export interface Stamp { ino: string; ctime: string }
export interface Manifest {
  entries: Record<string, ManifestEntry>; xattrs: string; acls: string; root: string;
  /**
   * When the listing began, on the host's clock (seconds); the boot time by that clock (realtime
   * minus uptime: moves when the clock is stepped, or the host rebooted); each entry's inode and
   * change time.
   */
  start: number; bootTime: number; stamps: Record<string, Stamp>;
}

const TOOLS_CHECK = (tools: string[]) =>
  `for t in ${tools.join(" ")}; do command -v $t >/dev/null 2>&1 || { echo "manifest: $t is missing (install the attr and acl packages)" >&2; exit 44; }; done`;

/**
 * The host script: one section per kind of data, base64 so that any file name survives.
 * `hash: false` lists everything but hashes nothing (hashScript hashes what must be, after).
 * `forReuse`: hashes that a later listing may reuse (filesToHash): the filesystem is synced first.
 */
export function manifestScript(dir: string, exclude: string[] = [], opts: { hash?: boolean; lowPriority?: boolean; forReuse?: boolean } = {}): string {
  const d = quote(dir);
  const prune = exclude.map((e) => `-path ${quote("./" + e)} -prune -o`).join(" ");
  const hash = opts.hash ?? true;
  // A tree hashed while its application runs (before a move's stop) yields to it.
  const nice = opts.lowPriority ? `nice -n 10 $(command -v ionice >/dev/null 2>&1 && echo ionice -c2 -n7) ` : "";
  // Without getfattr/getfacl the xattr and ACL sections would be empty on both sides and
  // compare equal: a manifest that cannot see them fails instead. Each entry is three
  // NUL-terminated fields (metadata, path, symlink target): a tab in a name is no separator.
  return `set -e; cd ${d}
${TOOLS_CHECK(["getfattr", "getfacl", "sha256sum"])}
echo '==start'; read -r up _ < /proc/uptime; echo "$(date +%s.%N) $up"
${opts.forReuse ? "sync -f .\n" : ""}echo '==root'; stat -c '%f\t%u\t%g' .
echo '==meta'; find . -xdev -mindepth 1 ${prune} -printf '%y\\t%m\\t%U\\t%G\\t%s\\t%T@\\t%n\\t%i\\t%C@\\0%p\\0%l\\0' | base64 -w0; echo
echo '==sums'; ${hash ? `find . -xdev -mindepth 1 ${prune} -type f -print0 | xargs -0 -r ${nice}sha256sum -z | base64 -w0` : "true"}; echo
echo '==xattrs'; find . -xdev -mindepth 1 ${prune} -print0 | sort -z | xargs -0 -r getfattr -h -d -m - --absolute-names 2>/dev/null | base64 -w0; echo
echo '==acls'; find . -xdev -mindepth 1 ${prune} ! -type l -print0 | sort -z | xargs -0 -r getfacl -p -n 2>/dev/null | base64 -w0; echo
`;
}

/** The host script that hashes the files named on stdin (NUL-terminated paths relative to dir). */
export function hashScript(dir: string): string {
  return `set -e; cd ${quote(dir)}
${TOOLS_CHECK(["sha256sum"])}
echo '==sums'; xargs -0 -r sha256sum -z -- | base64 -w0; echo
`;
}

function section(stdout: string, name: string): string {
  const part = stdout.split(`==${name}\n`)[1];
  if (part === undefined) throw new Error(`manifest output lacks its ${name} section`);
  return Buffer.from(part.split("\n")[0], "base64").toString("latin1");
}

/** A path (a byte string) as people read it. */
export const shown = (p: string) => Buffer.from(p, "latin1").toString("utf8");

/** hashScript's stdin: the paths, NUL-terminated, byte for byte. */
export const pathsInput = (paths: string[]) => Buffer.from(paths.map((p) => `${p}\0`).join(""), "latin1");

/** The sums section of manifestScript or hashScript output: path -> sha256. */
export function parseSums(stdout: string): Map<string, string> {
  const sums = new Map<string, string>();
  for (const rec of section(stdout, "sums").split("\0").filter(Boolean)) {
    const m = /^([0-9a-f]{64}) {2}(.*)$/s.exec(rec);
    if (m) sums.set(m[2], m[1]);
  }
  return sums;
}

export function parseManifest(stdout: string): Manifest {
  const sums = parseSums(stdout);
  const fields = section(stdout, "meta").split("\0");
  const raw: { f: string[]; path: string; target: string }[] = [];
  for (let i = 0; i + 2 < fields.length; i += 3) raw.push({ f: fields[i].split("\t"), path: fields[i + 1], target: fields[i + 2] });
  const byInode = new Map<string, string[]>();
  for (const { f, path } of raw) if (f[0] === "f" && Number(f[6]) > 1) byInode.set(f[7], [...(byInode.get(f[7]) ?? []), path]);
  const entries: Record<string, ManifestEntry> = {};
  const stamps: Record<string, Stamp> = {};
  for (const { f, path, target } of raw) {
    const group = byInode.get(f[7]);
    entries[path] = {
      type: f[0], mode: f[1], uid: Number(f[2]), gid: Number(f[3]), size: f[0] === "d" ? 0 : Number(f[4]),
      mtime: f[5], target, links: f[0] === "d" ? 0 : Number(f[6]),
      hardlinkGroup: group ? [...group].sort()[0] : "", sha256: sums.get(path) ?? "",
    };
    stamps[path] = { ino: f[7], ctime: f[8] };
  }
  const root = /==root\n([^\n]*)\n/.exec(stdout)?.[1];
  if (root === undefined) throw new Error("manifest output lacks its root section");
  const [start, uptime] = (/==start\n([^\n]*)\n/.exec(stdout)?.[1] ?? "").split(" ").map(Number);
  if (!Number.isFinite(start) || !Number.isFinite(uptime)) throw new Error("manifest output lacks its start section");
  return { entries, xattrs: section(stdout, "xattrs"), acls: section(stdout, "acls"), root, start, bootTime: start - uptime, stamps };
}

/** How far (s) the boot time by the realtime clock may drift between two listings (NTP slews far less). */
const CLOCK_STEP_S = 0.5;
/** A hash is reused only for a change time this long (s) before the earlier listing began. */
const CTIME_MARGIN_S = 2;

/**
 * The regular files of `now` (listed without hashes) whose hash from `before` cannot be reused:
 * new, another inode, another size, another change time, a change time within two seconds of
 * `before`'s listing, or not hashed then; all of them when the clock was stepped (or the host
 * rebooted) in between.
 */
export function filesToHash(before: Manifest | undefined, now: Manifest): string[] {
  const out: string[] = [];
  const sameClock = !!before && Math.abs(before.bootTime - now.bootTime) <= CLOCK_STEP_S;
  for (const [p, e] of Object.entries(now.entries)) {
    if (e.type !== "f") continue;
    const b = before?.entries[p], bs = before?.stamps[p], ns = now.stamps[p];
    const reusable = sameClock && !!b && !!bs && !!ns && b.type === "f" && b.sha256 !== "" && b.size === e.size &&
      bs.ino === ns.ino && bs.ctime === ns.ctime && Number(bs.ctime) < before!.start - CTIME_MARGIN_S;
    if (!reusable) out.push(p);
  }
  return out.sort();
}

/**
 * `now` with every file's hash: those filesToHash names from `sums` (none when sha256sum could not
 * read it), the others reused from `before`.
 */
export function withHashes(before: Manifest | undefined, now: Manifest, sums: Map<string, string>): Manifest {
  const fresh = new Set(filesToHash(before, now));
  const entries: Record<string, ManifestEntry> = {};
  for (const [p, e] of Object.entries(now.entries)) {
    entries[p] = e.type === "f" ? { ...e, sha256: (fresh.has(p) ? sums.get(p) : before?.entries[p]?.sha256) ?? "" } : e;
  }
  return { ...now, entries };
}

/** The differences between two manifests, as readable lines (empty when they are equal). */
export function diffManifests(a: Manifest, b: Manifest, limit = 20): string[] {
  const out: string[] = [];
  const keys = new Set([...Object.keys(a.entries), ...Object.keys(b.entries)]);
  for (const k of [...keys].sort()) {
    const x = a.entries[k], y = b.entries[k];
    if (!x) out.push(`only in the restored tree: ${shown(k)}`);
    else if (!y) out.push(`missing from the restored tree: ${shown(k)}`);
    else {
      const fields = (Object.keys(x) as (keyof ManifestEntry)[]).filter((f) => x[f] !== y[f]);
      if (fields.length) out.push(`${shown(k)}: ${fields.map((f) => `${f} ${shown(String(x[f]))} != ${shown(String(y[f]))}`).join(", ")}`);
      // Two empty hashes are no proof of equal content.
      else if (x.type === "f" && !x.sha256) out.push(`${shown(k)}: its content could not be read on either host`);
    }
    if (out.length >= limit) break;
  }
  if (a.root !== b.root) out.push(`the volume root's mode and owner differ: ${a.root} != ${b.root}`);
  if (a.xattrs !== b.xattrs) out.push("extended attributes differ");
  if (a.acls !== b.acls) out.push("ACLs differ");
  return out;
}
