// The VolumeProvider resource: an S3 bucket + prefix holding one rustic repository that the
// provider's volumes back up into. Create checks S3 and initialises the repository once.
import { volumeProviderSchema, VolumeProviderInputs } from "../inputs";
import { probeConditionalWrites } from "../storage/lease";
import { ensureBucket, repositoryExists, S3Settings } from "../storage/s3";
import { checkInputs } from "./check";
import { runLocalRustic } from "./localRustic";
import { progress } from "./progress";

type Props = Record<string, any>;

/** Changing where the repository is, or its password, means another repository. */
const REPLACE_PATHS = ["s3.endpoint", "s3.bucket", "s3.prefix", "password"];

export async function check(_olds: Props, news: Props) {
  const res = checkInputs(volumeProviderSchema, news);
  return { inputs: res.inputs, failures: res.failures };
}

function get(o: Props, p: string): unknown {
  return p.split(".").reduce<any>((a, k) => (a == null ? undefined : a[k]), o);
}

export async function diff(_id: string, olds: Props, news: Props) {
  const keys = ["s3", "password", "retention", "rustic"];
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
    outs: { ...inputs, repository: `s3://${v.s3.bucket}/${v.s3.prefix}`, initialisedRepository: initialised },
  };
}

export async function update(_id: string, olds: Props, news: Props) {
  const v = news as VolumeProviderInputs;
  // Probed once per S3 server: again only when the s3 settings change.
  await ensureRepository(v, JSON.stringify(olds.s3 ?? null) !== JSON.stringify(news.s3 ?? null));
  return { outs: { ...news, repository: `s3://${v.s3.bucket}/${v.s3.prefix}` } };
}

export async function read(id: string, props: Props) {
  return { id, props };
}

export async function remove(_id: string, _props: Props) {
  // The repository and its snapshots are kept: volumes' data must outlive the stack.
}
