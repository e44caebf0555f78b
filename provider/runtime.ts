// What the serialized shim loads at run time: the lifecycle handlers of each resource kind.
// Keep these names stable: states written by older versions call them.
import * as volume from "./lifecycle/volume";
import * as volumeProvider from "./lifecycle/volumeProvider";

export type Kind = "volume" | "volumeProvider";

/**
 * The engine prints the value of the property a check failure names ("property password value
 * {...} has a problem"), secrets included. Every reason names its field already, so the
 * failures go to the engine without a property: no input value is ever printed.
 */
export function withoutValues<T extends { failures?: { property: string; reason: string }[] }>(res: T): T {
  return { ...res, failures: (res.failures ?? []).map((f) => ({ property: "", reason: f.reason })) };
}

export function handlers(kind: Kind) {
  const m = kind === "volume" ? volume : volumeProvider;
  const check = async (olds: any, news: any) => withoutValues(await (m.check as any)(olds, news));
  return { check, diff: m.diff, create: m.create, read: m.read, update: m.update, delete: m.remove };
}
