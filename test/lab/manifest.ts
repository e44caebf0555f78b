// Manifests of trees on lab hosts (the provider's own manifest code, run through onHost).
import type { LabHost } from "../../lab/lab";
import { Manifest as Listing, manifestScript, parseManifest } from "../../provider/host/manifest";
import { onHost } from "./harness";

/** A tree's content and metadata: without when it was listed, nor inodes and change times (they differ per listing and host). */
export type Manifest = Omit<Listing, "start" | "bootTime" | "stamps">;

export async function manifest(host: LabHost, dir: string, opts: { exclude?: string[] } = {}): Promise<Manifest> {
  const r = await onHost(host, manifestScript(dir, opts.exclude), { timeoutMs: 600_000 });
  const { entries, xattrs, acls, root } = parseManifest(r.stdout);
  return { entries, xattrs, acls, root };
}
