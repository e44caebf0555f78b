// Progress lines in `pulumi up` output. The dynamic-provider host does not connect the SDK's
// log module to the engine, so this sends Log requests to the engine address it was started with.
let client: any | undefined;
let tried = false;

function engine(): any | undefined {
  if (tried) return client;
  tried = true;
  const addr = process.argv[2];
  if (!addr || !/^[\w.[\]:-]+:\d+$/.test(addr)) return undefined;
  try {
    const grpc = require(require.resolve("@grpc/grpc-js", { paths: [require.resolve("@pulumi/pulumi")] }));
    const engrpc = require("@pulumi/pulumi/proto/engine_grpc_pb");
    client = new engrpc.EngineClient(addr, grpc.credentials.createInsecure());
  } catch {
    client = undefined;
  }
  return client;
}

/** Logs one line, prefixed with what it is about, to the Pulumi engine (or stderr). */
export function progress(subject: string, msg: string, urn?: string): Promise<void> {
  const line = `${subject}: ${msg}`;
  const c = engine();
  if (!c) {
    process.stderr.write(line + "\n");
    return Promise.resolve();
  }
  const engproto = require("@pulumi/pulumi/proto/engine_pb");
  const req = new engproto.LogRequest();
  req.setSeverity(engproto.LogSeverity.INFO);
  req.setMessage(line);
  if (urn) req.setUrn(urn);
  return new Promise((resolve) => c.log(req, () => resolve()));
}
