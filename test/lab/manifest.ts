// A manifest of a directory tree on a host: paths, types, sizes, modes, owners, mtimes, symlink
// targets, hardlink groups, xattrs, ACLs and content hashes. Two trees are equal when their
// manifests are deep-equal; file counts prove nothing.
import type { LabHost } from "../../lab/lab";
import { quote } from "../../provider/host/shell";
import { onHost } from "./harness";

export interface Entry {
  type: string; mode: string; uid: number; gid: number; size: number; mtime: string;
  target: string; links: number; hardlinkGroup: string; sha256: string;
}
export interface Manifest { entries: Record<string, Entry>; xattrs: string; acls: string }

export async function manifest(host: LabHost, dir: string, opts: { exclude?: string[] } = {}): Promise<Manifest> {
  const d = quote(dir);
  const prune = (opts.exclude ?? []).map((e) => `-path ${quote("./" + e)} -prune -o`).join(" ");
  const r = await onHost(host, `set -e; cd ${d}
echo '==meta'; find . -mindepth 1 ${prune} -printf '%y\\t%m\\t%U\\t%G\\t%s\\t%T@\\t%n\\t%i\\t%l\\t%p\\0' | base64 -w0; echo
echo '==sums'; find . -mindepth 1 ${prune} -type f -print0 | xargs -0 -r sha256sum -z | base64 -w0; echo
echo '==xattrs'; find . -mindepth 1 ${prune} -print0 | sort -z | xargs -0 -r getfattr -h -d -m - --absolute-names 2>/dev/null | base64 -w0; echo
echo '==acls'; find . -mindepth 1 ${prune} ! -type l -print0 | sort -z | xargs -0 -r getfacl -p -n 2>/dev/null | base64 -w0; echo
`, { timeoutMs: 600_000 });
  const sec = (name: string) => Buffer.from(r.stdout.split(`==${name}\n`)[1].split("\n")[0], "base64").toString("utf8");
  const sums = new Map<string, string>();
  for (const rec of sec("sums").split("\0").filter(Boolean)) {
    const m = /^([0-9a-f]{64}) {2}(.*)$/s.exec(rec);
    if (m) sums.set(m[2], m[1]);
  }
  const raw = sec("meta").split("\0").filter(Boolean).map((rec) => rec.split("\t"));
  const byInode = new Map<string, string[]>();
  for (const f of raw) if (f[0] === "f" && Number(f[6]) > 1) byInode.set(f[7], [...(byInode.get(f[7]) ?? []), f.slice(9).join("\t")]);
  const entries: Record<string, Entry> = {};
  for (const f of raw) {
    const p = f.slice(9).join("\t");
    const group = byInode.get(f[7]);
    entries[p] = {
      type: f[0], mode: f[1], uid: Number(f[2]), gid: Number(f[3]), size: f[0] === "d" ? 0 : Number(f[4]),
      mtime: f[5], target: f[8], links: f[0] === "d" ? 0 : Number(f[6]),
      hardlinkGroup: group ? group.sort()[0] : "", sha256: sums.get(p) ?? "",
    };
  }
  return { entries, xattrs: sec("xattrs"), acls: sec("acls") };
}
