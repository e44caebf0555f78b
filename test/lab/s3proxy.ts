// A forwarding HTTP proxy in front of the lab's S3 server that can play an S3-compatible server
// which ignores conditional writes: it drops If-None-Match and If-Match from requests; or one
// that honours them but not atomically (checkThenWrite): it checks the precondition itself with
// a HEAD, waits a moment, then writes without it, as versitygw before 1.8.0 did.
// The AWS SDK signs those headers (SigV4), so a dropped header would only turn into a
// signature error; the proxy re-signs such requests with the lab's credentials.
// (@aws-crypto/sha256-js, which @smithy/signature-v4 needs, is not installed here, so the
// header signing is done with Node's crypto below.)
import * as crypto from "crypto";
import * as http from "http";
import type { AddressInfo } from "net";

export interface S3ProxyOptions {
  upstream: string;                      // e.g. http://127.0.0.1:9000
  accessKeyId: string;
  secretAccessKey: string;
  region: string;
  /** Drop if-none-match / if-match (the default), only the ones named, or (false) none. */
  dropConditionals?: boolean | ("if-none-match" | "if-match")[];
  /** Evaluate a PUT's condition here (HEAD, then a gap), then write unconditionally. */
  checkThenWrite?: boolean;
  /** For a request this returns true for: forward it, then cut the client's connection instead of answering (a lost answer). */
  loseAnswer?: (method: string, url: string) => boolean;
  /** Called before a request is forwarded (it may act on the upstream first); an answer it returns is sent instead. */
  intercept?: (method: string, url: string) => Promise<{ status: number; body: string } | void>;
}

const CONDITIONAL = ["if-none-match", "if-match"];
// Hop-by-hop headers: not signed by the SDK, and the forwarded request sets its own framing.
const HOP = ["connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "upgrade", "te"];

export class S3Proxy {
  private server?: http.Server;
  url = "";
  /** How many requests had conditional headers dropped (so a test can see the proxy acted). */
  dropped = 0;
  /** How many answers were lost on purpose. */
  lost = 0;
  constructor(private readonly o: S3ProxyOptions) {}

  async start(): Promise<string> {
    this.server = http.createServer((req, res) => {
      this.forward(req, res).catch((e) => {
        if (!res.headersSent) res.writeHead(502, { "content-type": "text/plain" });
        res.end(`s3proxy: ${(e as Error).message}`);
      });
    });
    await new Promise<void>((resolve) => this.server!.listen(0, "127.0.0.1", resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this.url;
  }

  async stop(): Promise<void> {
    if (!this.server) return;
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server!.close(() => resolve()));
  }

  private async forward(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const answer = await this.o.intercept?.(req.method!, req.url!);
    if (answer) {
      res.writeHead(answer.status, { "content-type": "application/xml" });
      res.end(answer.body);
      return;
    }
    const body = Buffer.concat(chunks);
    const headers: Record<string, string> = {};
    for (const [k, v] of Object.entries(req.headers)) {
      if (v !== undefined && !HOP.includes(k)) headers[k] = Array.isArray(v) ? v.join(",") : v;
    }
    headers["content-length"] = String(body.length);
    // The Host header is forwarded as the client sent it: the client's signature covers it,
    // and the upstream (path-style) checks the signature against the Host it receives.
    const drop = this.o.dropConditionals === false ? [] : Array.isArray(this.o.dropConditionals) ? this.o.dropConditionals : CONDITIONAL;
    if (this.o.checkThenWrite && req.method === "PUT" && CONDITIONAL.some((h) => h in headers)) {
      if (!(await this.preconditionHolds(req.url!, headers))) {
        res.writeHead(412, { "content-type": "application/xml" });
        res.end("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you specified did not hold</Message></Error>");
        return;
      }
      await new Promise((r) => setTimeout(r, 50)); // the gap between the check and the write
      for (const h of CONDITIONAL) delete headers[h];
      this.resign(req.method!, req.url!, headers, body);
      this.dropped++;
    } else if (drop.some((h) => h in headers)) {
      for (const h of drop) delete headers[h];
      this.resign(req.method!, req.url!, headers, body);
      this.dropped++;
    }
    const up = new URL(this.o.upstream);
    await new Promise<void>((resolve, reject) => {
      const out = http.request({ host: up.hostname, port: up.port, method: req.method, path: req.url, headers }, (r) => {
        if (this.o.loseAnswer?.(req.method!, req.url!)) {
          // The server did the work; its answer never reaches the client.
          this.lost++;
          r.resume();
          r.on("end", () => { req.socket.destroy(); resolve(); });
          return;
        }
        res.writeHead(r.statusCode ?? 502, r.headers);
        r.pipe(res);
        r.on("end", resolve);
        r.on("error", reject);
      });
      out.on("error", reject);
      out.end(body);
    });
  }

  /** The condition of a PUT, checked against the object's current ETag (path-style URL). */
  private async preconditionHolds(rawUrl: string, headers: Record<string, string>): Promise<boolean> {
    const { S3Client, HeadObjectCommand } = await import("@aws-sdk/client-s3");
    const [bucket, ...rest] = rawUrl.split("?")[0].slice(1).split("/");
    const client = new S3Client({ endpoint: this.o.upstream, region: this.o.region, forcePathStyle: true, maxAttempts: 1,
      credentials: { accessKeyId: this.o.accessKeyId, secretAccessKey: this.o.secretAccessKey } });
    let etag: string | undefined;
    try {
      etag = (await client.send(new HeadObjectCommand({ Bucket: decodeURIComponent(bucket), Key: decodeURIComponent(rest.join("/")) }))).ETag;
    } catch (e) {
      if ((e as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode !== 404) throw e;
    } finally {
      client.destroy();
    }
    if (headers["if-none-match"] === "*" && etag) return false;
    if (headers["if-match"] && headers["if-match"] !== etag) return false;
    return true;
  }

  /** SigV4 header signing, with the client's date and signed-header list minus the dropped headers. */
  private resign(method: string, rawUrl: string, headers: Record<string, string>, body: Buffer): void {
    const auth = headers["authorization"] ?? "";
    const m = /SignedHeaders=([^,\s]+)/.exec(auth);
    const amzDate = headers["x-amz-date"];
    if (!m || !amzDate) return; // unsigned or presigned: nothing this proxy needs to handle
    const hex = (d: crypto.BinaryLike) => crypto.createHash("sha256").update(d).digest("hex");
    const hmac = (k: crypto.BinaryLike, d: string) => crypto.createHmac("sha256", k).update(d).digest();
    headers["x-amz-content-sha256"] = hex(body);
    const signed = m[1].split(";").filter((h) => !CONDITIONAL.includes(h) && h in headers).sort();
    const [path, query = ""] = rawUrl.split(/\?(.*)/s);
    // S3 signs the path as sent (encoded once) and the query sorted and strictly encoded.
    const enc = (x: string) => encodeURIComponent(x).replace(/[!'()*]/g, (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase());
    const canonicalQuery = query.split("&").filter(Boolean).map((p) => {
      const [k, v = ""] = p.split(/=(.*)/s).map((x) => decodeURIComponent(x.replace(/\+/g, " ")));
      return [enc(k), enc(v)];
    }).sort((a, b) => (a[0] === b[0] ? (a[1] < b[1] ? -1 : 1) : a[0] < b[0] ? -1 : 1)).map((kv) => kv.join("=")).join("&");
    const canonicalHeaders = signed.map((h) => `${h}:${headers[h].trim().replace(/\s+/g, " ")}\n`).join("");
    const canonical = [method, path, canonicalQuery, canonicalHeaders, signed.join(";"), headers["x-amz-content-sha256"]].join("\n");
    const day = amzDate.slice(0, 8);
    const scope = `${day}/${this.o.region}/s3/aws4_request`;
    const toSign = ["AWS4-HMAC-SHA256", amzDate, scope, hex(canonical)].join("\n");
    let key: Buffer = hmac(`AWS4${this.o.secretAccessKey}`, day);
    for (const part of [this.o.region, "s3", "aws4_request"]) key = hmac(key, part);
    const signature = crypto.createHmac("sha256", key).update(toSign).digest("hex");
    headers["authorization"] = `AWS4-HMAC-SHA256 Credential=${this.o.accessKeyId}/${scope}, SignedHeaders=${signed.join(";")}, Signature=${signature}`;
  }
}
