// Manifests of trees on lab hosts (the provider's own manifest code, run through onHost).
import type { LabHost } from "../../lab/lab";
import { Manifest, manifestScript, parseManifest } from "../../provider/host/manifest";
import { onHost } from "./harness";

export type { Manifest };

export async function manifest(host: LabHost, dir: string, opts: { exclude?: string[] } = {}): Promise<Manifest> {
  const r = await onHost(host, manifestScript(dir, opts.exclude), { timeoutMs: 600_000 });
  return parseManifest(r.stdout);
}
