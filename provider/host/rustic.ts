// rustic: the repository profile (TOML, secrets inside, root-only on hosts and locally),
// argument vectors, and parsing of its JSON output.

import type { S3Settings } from "../storage/s3";

/**
 * Where the repository is and how to open it: with the password (on the machine that runs
 * pulumi), or with the repository's master key (on hosts: no scrypt per rustic call, which
 * costs seconds on a small host, and a host never holds the password).
 */
export type RepositoryConfig = S3Settings & ({ password: string } | { masterKey: string });

/** A TOML basic string. */
export function tomlString(s: string): string {
  return '"' + s.replace(/[\\"\u0000-\u001f\u007f]/g, (c) => {
    if (c === "\\") return "\\\\";
    if (c === '"') return '\\"';
    return "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0");
  }) + '"';
}

/** A master key as `rustic key export` prints it (JSON: the encryption and MAC keys). */
export function isMasterKey(text: string): boolean {
  try {
    const k = JSON.parse(text);
    return typeof k?.encrypt === "string" && typeof k?.mac?.k === "string" && typeof k?.mac?.r === "string";
  } catch {
    return false;
  }
}

export function profileToml(r: RepositoryConfig): string {
  return [
    "# Written by pulumi-dboxed-volumes. Holds secrets: keep it root-only (0600).",
    "[repository]",
    `repository = "opendal:s3"`,
    "password" in r ? `password = ${tomlString(r.password)}` : `key = ${tomlString(r.masterKey)}`,
    "",
    "[repository.options]",
    `endpoint = ${tomlString(r.endpoint.replace(/\/+$/, ""))}`,
    `region = ${tomlString(r.region)}`,
    `bucket = ${tomlString(r.bucket)}`,
    `root = ${tomlString("/" + r.prefix)}`,
    `access_key_id = ${tomlString(r.accessKeyId)}`,
    `secret_access_key = ${tomlString(r.secretAccessKey)}`,
    `enable_virtual_host_style = ${r.forcePathStyle ? '"false"' : '"true"'}`,
    "",
  ].join("\n");
}

export interface Snapshot {
  id: string;
  time: string;
  hostname: string;
  label?: string;
  paths?: string[];
  tags?: string[];
  parent?: string;
  tree?: string;
  summary?: Record<string, unknown>;
}

/** Parses `rustic snapshots --json` in both its flat (-g '') and grouped forms. */
export function parseSnapshots(json: string): Snapshot[] {
  const text = json.trim();
  if (!text) return [];
  const data = JSON.parse(text);
  const out: Snapshot[] = [];
  const visit = (v: unknown) => {
    if (Array.isArray(v)) v.forEach(visit);
    else if (v && typeof v === "object") {
      const o = v as Record<string, unknown>;
      if (typeof o.id === "string" && typeof o.time === "string" && "tree" in o) out.push(o as unknown as Snapshot);
      else if (Array.isArray(o.snapshots)) o.snapshots.forEach(visit);
    }
  };
  visit(data);
  return out.sort((a, b) => Date.parse(a.time) - Date.parse(b.time));
}

/** Common flags: profile, no progress bars, a cache dir of our own. */
export function rusticArgv(binary: string, profile: string, args: string[]): string[] {
  return [binary, "-P", profile, "--no-progress", "--cache-dir", "/var/cache/dboxed-volumes/rustic", ...args];
}

export function snapshotsArgs(rusticHost: string): string[] {
  return ["snapshots", "--json", "-g", "", "--filter-host", rusticHost];
}

export function restoreArgs(snapshotId: string, dest: string): string[] {
  return ["restore", "--numeric-id", "--delete", snapshotId, dest];
}

/** Compares a snapshot with a local tree: content (every chunk re-hashed) and metadata. */
export function diffArgs(snapshotId: string, dir: string): string[] {
  return ["diff", "--metadata", "-x", snapshotId, dir];
}

/**
 * The differences `rustic diff` printed: one line per path, a change mark first
 * (+ added, - removed, M content, U metadata, T type, ? bitrot). Other lines are not changes.
 */
export function parseDiff(stdout: string): string[] {
  return stdout.split("\n").map((l) => l.trimEnd()).filter((l) => /^[-+MUT?]\s+\S/.test(l) && !/^[-+]\s+\d/.test(l));
}
