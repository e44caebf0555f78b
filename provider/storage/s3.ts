// S3 through @aws-sdk/client-s3: reachability, credentials and bucket checks with errors that
// say what to fix, and the repository's presence.
import type { S3Client } from "@aws-sdk/client-s3";
import { UserError } from "../errors";

export interface S3Settings {
  endpoint: string;
  region: string;
  bucket: string;
  prefix: string;
  forcePathStyle: boolean;
  accessKeyId: string;
  secretAccessKey: string;
}

/** `maxAttempts`: 1 where a request sent again could meet its own first attempt (a conditional write raced on purpose). */
export function s3Client(s: S3Settings, maxAttempts = 3): S3Client {
  // The SDK's notice that its 2027 releases need Node 22 would land in every `pulumi up`.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
  const { S3Client } = require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
  return new S3Client({
    endpoint: s.endpoint,
    region: s.region,
    forcePathStyle: s.forcePathStyle,
    credentials: { accessKeyId: s.accessKeyId, secretAccessKey: s.secretAccessKey },
    maxAttempts,
  });
}

/** Turns an SDK error into one that names the setting to fix. */
export function explainS3Error(err: unknown, s: S3Settings, action: string): Error {
  const e = err as { name?: string; code?: string; message?: string; $metadata?: { httpStatusCode?: number }; cause?: { code?: string } };
  const status = e.$metadata?.httpStatusCode;
  const code = e.code ?? e.cause?.code ?? e.name ?? "";
  if (/ECONNREFUSED|ENOTFOUND|EAI_AGAIN|ETIMEDOUT|ECONNRESET|EHOSTUNREACH|TimeoutError/.test(code + " " + (e.message ?? ""))) {
    return new UserError(`s3.endpoint: cannot reach ${s.endpoint} (${code || e.message}) while trying to ${action}: check the URL and that the S3 server runs`);
  }
  if (status === 403 || /InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden/.test(code)) {
    return new UserError(`s3.accessKeyId/s3.secretAccessKey: the S3 server at ${s.endpoint} refused the credentials (${code || status}) while trying to ${action}`);
  }
  if (status === 404 || /NoSuchBucket|NotFound/.test(code)) {
    return new UserError(`s3.bucket: bucket "${s.bucket}" does not exist at ${s.endpoint}: create it, or set s3.createBucket: true`);
  }
  return new UserError(`S3 at ${s.endpoint}: ${action} failed: ${code} ${e.message ?? ""} (HTTP ${status ?? "?"})`);
}

/** Checks endpoint, credentials and bucket; creates the bucket when asked to. */
export async function ensureBucket(s: S3Settings, createBucket: boolean): Promise<void> {
  const { HeadBucketCommand, CreateBucketCommand } = require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
  const client = s3Client(s);
  try {
    try {
      await client.send(new HeadBucketCommand({ Bucket: s.bucket }));
      return;
    } catch (err) {
      const status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
      if (!(status === 404 && createBucket)) throw explainS3Error(err, s, `check bucket "${s.bucket}"`);
    }
    try {
      await client.send(new CreateBucketCommand({ Bucket: s.bucket }));
    } catch (err) {
      throw explainS3Error(err, s, `create bucket "${s.bucket}"`);
    }
  } finally {
    client.destroy();
  }
}

/** Whether a rustic repository exists under the prefix (its config object). */
export async function repositoryExists(s: S3Settings): Promise<boolean> {
  const { HeadObjectCommand } = require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
  const client = s3Client(s);
  try {
    await client.send(new HeadObjectCommand({ Bucket: s.bucket, Key: `${s.prefix}/config` }));
    return true;
  } catch (err) {
    if ((err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode === 404) return false;
    throw explainS3Error(err, s, "look for the repository");
  } finally {
    client.destroy();
  }
}
