// A manifest of a directory tree: path, type, mode, owner, size, mtime, symlink target,
// hardlink group, content hash, xattrs and ACLs of every entry. A move is verified by
// comparing the manifests of the source and the restored tree, not by counting files.
import { quote } from "./shell";

export interface ManifestEntry {
  type: string; mode: string; uid: number; gid: number; size: number; mtime: string;
  target: string; links: number; hardlinkGroup: string; sha256: string;
}
export interface Manifest { entries: Record<string, ManifestEntry>; xattrs: string; acls: string; root: string }

/** The host script: one section per kind of data, base64 so that any file name survives. */
export function manifestScript(dir: string, exclude: string[] = []): string {
  const d = quote(dir);
  const prune = exclude.map((e) => `-path ${quote("./" + e)} -prune -o`).join(" ");
  // Without getfattr/getfacl the xattr and ACL sections would be empty on both sides and
  // compare equal: a manifest that cannot see them fails instead.
  return `set -e; cd ${d}
for t in getfattr getfacl sha256sum; do command -v $t >/dev/null 2>&1 || { echo "manifest: $t is missing (install the attr and acl packages)" >&2; exit 44; }; done
echo '==root'; stat -c '%f\t%u\t%g' .
echo '==meta'; find . -xdev -mindepth 1 ${prune} -printf '%y\\t%m\\t%U\\t%G\\t%s\\t%T@\\t%n\\t%i\\t%l\\t%p\\0' | base64 -w0; echo
echo '==sums'; find . -xdev -mindepth 1 ${prune} -type f -print0 | xargs -0 -r sha256sum -z | base64 -w0; echo
echo '==xattrs'; find . -xdev -mindepth 1 ${prune} -print0 | sort -z | xargs -0 -r getfattr -h -d -m - --absolute-names 2>/dev/null | base64 -w0; echo
echo '==acls'; find . -xdev -mindepth 1 ${prune} ! -type l -print0 | sort -z | xargs -0 -r getfacl -p -n 2>/dev/null | base64 -w0; echo
`;
}

export function parseManifest(stdout: string): Manifest {
  const sec = (name: string) => {
    const part = stdout.split(`==${name}\n`)[1];
    if (part === undefined) throw new Error(`manifest output lacks its ${name} section`);
    return Buffer.from(part.split("\n")[0], "base64").toString("utf8");
  };
  const sums = new Map<string, string>();
  for (const rec of sec("sums").split("\0").filter(Boolean)) {
    const m = /^([0-9a-f]{64}) {2}(.*)$/s.exec(rec);
    if (m) sums.set(m[2], m[1]);
  }
  const raw = sec("meta").split("\0").filter(Boolean).map((rec) => rec.split("\t"));
  const byInode = new Map<string, string[]>();
  for (const f of raw) if (f[0] === "f" && Number(f[6]) > 1) byInode.set(f[7], [...(byInode.get(f[7]) ?? []), f.slice(9).join("\t")]);
  const entries: Record<string, ManifestEntry> = {};
  for (const f of raw) {
    const p = f.slice(9).join("\t");
    const group = byInode.get(f[7]);
    entries[p] = {
      type: f[0], mode: f[1], uid: Number(f[2]), gid: Number(f[3]), size: f[0] === "d" ? 0 : Number(f[4]),
      mtime: f[5], target: f[8], links: f[0] === "d" ? 0 : Number(f[6]),
      hardlinkGroup: group ? [...group].sort()[0] : "", sha256: sums.get(p) ?? "",
    };
  }
  const root = /==root\n([^\n]*)\n/.exec(stdout)?.[1];
  if (root === undefined) throw new Error("manifest output lacks its root section");
  return { entries, xattrs: sec("xattrs"), acls: sec("acls"), root };
}

/** The differences between two manifests, as readable lines (empty when they are equal). */
export function diffManifests(a: Manifest, b: Manifest, limit = 20): string[] {
  const out: string[] = [];
  const keys = new Set([...Object.keys(a.entries), ...Object.keys(b.entries)]);
  for (const k of [...keys].sort()) {
    const x = a.entries[k], y = b.entries[k];
    if (!x) out.push(`only in the restored tree: ${k}`);
    else if (!y) out.push(`missing from the restored tree: ${k}`);
    else {
      const fields = (Object.keys(x) as (keyof ManifestEntry)[]).filter((f) => x[f] !== y[f]);
      if (fields.length) out.push(`${k}: ${fields.map((f) => `${f} ${x[f]} != ${y[f]}`).join(", ")}`);
    }
    if (out.length >= limit) break;
  }
  if (a.root !== b.root) out.push(`the volume root's mode and owner differ: ${a.root} != ${b.root}`);
  if (a.xattrs !== b.xattrs) out.push("extended attributes differ");
  if (a.acls !== b.acls) out.push("ACLs differ");
  return out;
}
