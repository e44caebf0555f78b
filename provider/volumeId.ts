// Default volume ids: "<stack>-<name>" when that is already a valid id, else a readable form
// plus a short hash of the exact stack and name, so that two names never share an id.
import * as crypto from "crypto";

const VALID = /^[a-z0-9][a-z0-9-]{0,39}$/;

/** The id volumes got before ids were made injective; kept by volumes that already exist. */
export function legacyDefaultVolumeId(stack: string, name: string): string {
  return `${stack}-${name}`.toLowerCase().replace(/[^a-z0-9-]+/g, "-").replace(/^-+/, "").slice(0, 40).replace(/-+$/, "");
}

export function defaultVolumeId(stack: string, name: string): string {
  const plain = `${stack}-${name}`;
  if (VALID.test(plain) && !plain.endsWith("-")) return plain;
  // Rewritten or shortened: the hash of the original keeps distinct names distinct.
  const hash = crypto.createHash("sha256").update(`${stack}\0${name}`).digest("hex").slice(0, 8);
  const readable = legacyDefaultVolumeId(stack, name).slice(0, 40 - hash.length - 1).replace(/-+$/, "");
  return readable ? `${readable}-${hash}` : hash;
}
