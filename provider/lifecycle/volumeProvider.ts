// The VolumeProvider resource: an S3 bucket + prefix holding one rustic repository that the
// provider's volumes back up into. Create checks S3 and initialises the repository once.
import { volumeProviderSchema, VolumeProviderInputs } from "../inputs";
import { MaintenanceRecord, probeConditionalWrites, readMaintenance } from "../storage/lease";
import { ensureBucket, repositoryExists, S3Settings } from "../storage/s3";
import { checkInputs } from "./check";
import { runLocalRustic } from "./localRustic";
import { progress } from "./progress";
import { UserError } from "../errors";

type Props = Record<string, any>;

/** Changing where the repository is means another repository (a new password is a new key of the same one). */
const REPLACE_PATHS = ["s3.endpoint", "s3.bucket", "s3.prefix"];

export async function check(_olds: Props, news: Props) {
  const res = checkInputs(volumeProviderSchema, news);
  return { inputs: res.inputs, failures: res.failures };
}

function get(o: Props, p: string): unknown {
  return p.split(".").reduce<any>((a, k) => (a == null ? undefined : a[k]), o);
}

export async function diff(_id: string, olds: Props, news: Props) {
  const keys = ["s3", "password", "retention", "maintenance", "rustic"];
  const changed = keys.filter((k) => JSON.stringify(olds[k] ?? null) !== JSON.stringify(news[k] ?? null));
  const replaces = REPLACE_PATHS.filter((p) => JSON.stringify(get(olds, p) ?? null) !== JSON.stringify(get(news, p) ?? null));
  return { changes: changed.length > 0, replaces, deleteBeforeReplace: false, stables: [] as string[] };
}

function s3Settings(v: VolumeProviderInputs): S3Settings {
  return { ...v.s3 };
}

/**
 * `probe`: check that the server honours conditional writes (it writes a probe object, so
 * only create and update call for it, never check or diff: previews must not write to S3).
 */
async function ensureRepository(v: VolumeProviderInputs, probe: boolean): Promise<boolean> {
  const s3 = s3Settings(v);
  await ensureBucket(s3, v.s3.createBucket);
  // After the bucket check (the probe needs the bucket), before any repository is made.
  if (probe) await probeConditionalWrites(s3);
  if (await repositoryExists(s3)) {
    // The repository is there: prove the password opens it, so volumes do not fail later.
    await runLocalRustic(v.rustic, { ...s3, password: v.password }, ["cat", "config"]).catch((e) => {
      throw new Error(`password: cannot open the existing repository at s3://${v.s3.bucket}/${v.s3.prefix}: ${(e as Error).message}`);
    });
    return false;
  }
  void progress("volume provider", `initialising the rustic repository at s3://${v.s3.bucket}/${v.s3.prefix}`);
  await runLocalRustic(v.rustic, { ...s3, password: v.password }, ["init"]);
  return true;
}

export async function create(inputs: Props) {
  const v = inputs as VolumeProviderInputs;
  const initialised = await ensureRepository(v, true);
  return {
    id: `s3://${v.s3.bucket}/${v.s3.prefix}`,
    outs: { ...inputs, repository: `s3://${v.s3.bucket}/${v.s3.prefix}`, initialisedRepository: initialised, lastPrune: {}, lastCheck: {} },
  };
}

/** rustic's answer to a password that opens no key of the repository (error C002). */
export const WRONG_PASSWORD = /No suitable key found for the given password|docs\/errors\/C002/;

/** The id of the key a password opens, from `rustic key list` (it marks that key with *); undefined if it opens none. */
export function keyOpenedBy(keyList: string): string | undefined {
  return /\|\s*\*([0-9a-f]{8,64})\s*\|/.exec(keyList)?.[1];
}

/**
 * A new password becomes a new key of the same repository: added (opened with the old password),
 * proven to open it, and only then the old password's key removed. Every step checks what is
 * there first, so a run cut off anywhere is finished by the next. The master key, which is what
 * the hosts hold, does not change: their backups go on throughout.
 */
async function rotatePassword(v: VolumeProviderInputs, oldPassword: string): Promise<void> {
  const s3 = s3Settings(v);
  const where = `s3://${v.s3.bucket}/${v.s3.prefix}`;
  // Only rustic's "no key for this password" means no key: any other failure (S3, network) stops
  // the rotation, or a transient error would leave the previous password's key in place for good.
  const keyOf = (password: string) => runLocalRustic(v.rustic, { ...s3, password }, ["key", "list"]).then(keyOpenedBy, (e: Error) => {
    if (WRONG_PASSWORD.test(e.message)) return undefined;
    throw e;
  });
  let newKey = await keyOf(v.password);
  const oldKey = await keyOf(oldPassword);
  if (!newKey) {
    if (!oldKey) throw new UserError(`password: neither the new nor the previous password opens the repository at ${where}; set password to one that does`);
    void progress("volume provider", `adding the new password as a key of ${where}`);
    await runLocalRustic(v.rustic, { ...s3, password: oldPassword }, ["key", "add"], { newPassword: v.password });
    newKey = await keyOf(v.password);
    if (!newKey) throw new UserError(`password: the key added for the new password does not open ${where}; the previous password still does`);
  }
  if (oldKey && oldKey !== newKey) {
    void progress("volume provider", `removing the previous password's key ${oldKey} from ${where}`);
    await runLocalRustic(v.rustic, { ...s3, password: v.password }, ["key", "remove", oldKey]);
  }
}

export async function update(_id: string, olds: Props, news: Props) {
  const v = news as VolumeProviderInputs;
  if (olds.password && olds.password !== v.password) await rotatePassword(v, olds.password);
  // Probed once per S3 server: again only when the s3 settings change.
  await ensureRepository(v, JSON.stringify(olds.s3 ?? null) !== JSON.stringify(news.s3 ?? null));
  return { outs: { ...news, repository: `s3://${v.s3.bucket}/${v.s3.prefix}`, lastPrune: olds.lastPrune ?? {}, lastCheck: olds.lastCheck ?? {} } };
}

/** The last run of a maintenance task as an output ({} before the first). */
function lastRun(m: MaintenanceRecord | undefined): Record<string, unknown> {
  if (!m || !m.lastRunAt) return {};
  return { at: new Date(m.lastRunAt * 1000).toISOString(), result: m.lastResult, message: m.lastMessage, host: m.lastHolder,
    durationSeconds: m.lastDurationSeconds, runs: m.runs, ...(m.lastSubset ? { subset: m.lastSubset } : {}) };
}

/** Refresh reads the repository's last prune and check (run by the hosts, recorded in S3). */
export async function read(id: string, props: Props) {
  const v = props as VolumeProviderInputs;
  if (!v?.s3?.bucket) return { id, props };
  const s3 = s3Settings(v);
  try {
    const [prune, check] = await Promise.all([readMaintenance(s3, "prune"), readMaintenance(s3, "check")]);
    return { id, props: { ...props, lastPrune: lastRun(prune), lastCheck: lastRun(check) } };
  } catch (e) {
    void progress("volume provider", `cannot read the repository's maintenance records (${(e as Error).message.split("\n")[0]}); keeping the last known`);
    return { id, props };
  }
}

export async function remove(_id: string, _props: Props) {
  // The repository and its snapshots are kept: volumes' data must outlive the stack.
}
