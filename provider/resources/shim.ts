// The part of the provider that Pulumi serializes into each resource's state. It only loads
// the installed package when called, so `delete` and `refresh` of old state run today's code.
import type * as pulumi from "@pulumi/pulumi";

export function shim(kind: "volume" | "volumeProvider"): pulumi.dynamic.ResourceProvider {
  return {
    check: (olds: any, news: any) => require("pulumi-dboxed-volumes/dist/provider/runtime").handlers(kind).check(olds, news),
    diff: (id: string, olds: any, news: any) => require("pulumi-dboxed-volumes/dist/provider/runtime").handlers(kind).diff(id, olds, news),
    create: (inputs: any) => require("pulumi-dboxed-volumes/dist/provider/runtime").handlers(kind).create(inputs),
    read: (id: string, props: any) => require("pulumi-dboxed-volumes/dist/provider/runtime").handlers(kind).read(id, props),
    update: (id: string, olds: any, news: any) => require("pulumi-dboxed-volumes/dist/provider/runtime").handlers(kind).update(id, olds, news),
    delete: (id: string, props: any) => require("pulumi-dboxed-volumes/dist/provider/runtime").handlers(kind).delete(id, props),
  };
}

/** JavaScript programs get no type check: a misspelt argument must not pass silently. */
export function refuseUnknownArgs(what: string, args: object, known: string[]): void {
  const unknown = Object.keys(args ?? {}).filter((k) => !known.includes(k));
  if (unknown.length > 0) {
    throw new Error(`${what}: unknown argument(s) ${unknown.join(", ")}: check the spelling (known: ${known.join(", ")})`);
  }
}
