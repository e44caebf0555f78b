#!/usr/bin/env node
// The Node.js language host for the pulumi CLI, written for this lab.
//
// Why it exists: the official host (Go module github.com/pulumi/pulumi/sdk/nodejs/cmd/
// pulumi-language-nodejs/v3) is refused by the Go module proxy this machine reaches
// ("403 This module version is not available" for every version), and no other registry
// ships it. This host does what the official one does for `pulumi up/preview/refresh/destroy`:
// it serves the LanguageRuntime gRPC service and runs each program with the Pulumi Node.js
// SDK's own runner (@pulumi/pulumi/cmd/run), resolved from the program's directory, with the
// same flags and environment. Everything else (engine, state, providers, SDK) is the real one.
"use strict";
const path = require("path");
const { spawn } = require("child_process");

const sdkDir = path.dirname(require.resolve("@pulumi/pulumi/package.json", { paths: [__dirname, process.cwd()] }));
const grpc = require(require.resolve("@grpc/grpc-js", { paths: [sdkDir] }));
const langproto = require(path.join(sdkDir, "proto/language_pb"));
const langrpc = require(path.join(sdkDir, "proto/language_grpc_pb"));
const plugproto = require(path.join(sdkDir, "proto/plugin_pb"));
const emptyproto = require(require.resolve("google-protobuf/google/protobuf/empty_pb", { paths: [sdkDir] }));
const sdkVersion = require(path.join(sdkDir, "package.json")).version;

// The CLI starts us as: pulumi-language-nodejs [-flags...] <engine address>
const positional = process.argv.slice(2).filter((a) => !a.startsWith("-"));
let engineAddress = positional[positional.length - 1] || "";

function ok(callback, msg) { callback(null, msg); }

const service = {
  handshake(call, callback) {
    if (call.request.getEngineAddress()) engineAddress = call.request.getEngineAddress();
    ok(callback, new langproto.LanguageHandshakeResponse());
  },
  getPluginInfo(call, callback) {
    ok(callback, new plugproto.PluginInfo().setVersion(sdkVersion));
  },
  getRequiredPlugins(call, callback) {
    ok(callback, new langproto.GetRequiredPluginsResponse().setPluginsList([]));
  },
  getRequiredPackages(call, callback) {
    ok(callback, new langproto.GetRequiredPackagesResponse().setPackagesList([]));
  },
  installDependencies(call) {
    // Dependencies are installed by npm before the CLI runs; nothing to stream.
    call.end();
  },
  about(call, callback) {
    ok(callback, new langproto.AboutResponse().setExecutable(process.execPath).setVersion(process.version));
  },
  getProgramDependencies(call, callback) {
    ok(callback, new langproto.GetProgramDependenciesResponse().setDependenciesList([]));
  },
  run(call, callback) {
    const req = call.request;
    const info = req.getInfo();
    const programDir = (info && info.getProgramDirectory()) || req.getPwd() || process.cwd();
    const entry = (info && info.getEntryPoint()) || req.getProgram() || ".";
    const options = (info && info.getOptions() && info.getOptions().toJavaScript()) || {};
    let runner;
    try {
      runner = require.resolve("@pulumi/pulumi/cmd/run", { paths: [programDir] });
    } catch (e) {
      return ok(callback, new langproto.RunResponse().setError(
        `cannot find @pulumi/pulumi from ${programDir}: run npm install in the program directory (${e.message})`));
    }
    const args = [runner, "--monitor", req.getMonitorAddress(), "--engine", engineAddress,
      "--organization", req.getOrganization(), "--project", req.getProject(), "--stack", req.getStack(),
      "--pwd", req.getPwd(), "--parallel", String(req.getParallel())];
    if (info && info.getRootDirectory()) args.push("--root-directory", info.getRootDirectory());
    if (req.getDryrun()) args.push("--dry-run");
    args.push(path.resolve(programDir, entry), ...req.getArgsList());
    const config = {};
    for (const [k, v] of req.getConfigMap().entries()) config[k] = v;
    const env = {
      ...process.env,
      PULUMI_CONFIG: JSON.stringify(config),
      PULUMI_CONFIG_SECRET_KEYS: JSON.stringify(req.getConfigsecretkeysList()),
      PULUMI_NODEJS_TYPESCRIPT: options.typescript === false ? "false" : "true",
    };
    if (options.tsconfig) env.PULUMI_NODEJS_TSCONFIG_PATH = String(options.tsconfig);
    const nodeargs = options.nodeargs ? String(options.nodeargs).split(/\s+/).filter(Boolean) : [];
    const child = spawn(process.execPath, [...nodeargs, ...args], { cwd: req.getPwd() || programDir, env, stdio: ["ignore", "inherit", "inherit"] });
    child.on("error", (e) => ok(callback, new langproto.RunResponse().setError(`cannot start node: ${e.message}`)));
    child.on("exit", (code, signal) => {
      const resp = new langproto.RunResponse();
      // Exit code 32 is the runner's "errors were already reported" code: bail quietly.
      if (code === 32) resp.setBail(true);
      else if (code !== 0) resp.setError(`program exited with ${code === null ? "signal " + signal : "code " + code}`);
      ok(callback, resp);
    });
  },
};

const server = new grpc.Server({ "grpc.max_receive_message_length": 400 * 1024 * 1024 });
server.addService(langrpc.LanguageRuntimeService, service);
server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) { console.error(err); process.exit(1); }
  process.stdout.write(`${port}\n`);
});
process.on("SIGTERM", () => server.forceShutdown());
