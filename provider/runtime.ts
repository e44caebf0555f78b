// What the serialized shim loads at run time: the lifecycle handlers of each resource kind.
// Keep these names stable: states written by older versions call them.
import * as volume from "./lifecycle/volume";
import * as volumeProvider from "./lifecycle/volumeProvider";

export type Kind = "volume" | "volumeProvider";

export function handlers(kind: Kind) {
  const m = kind === "volume" ? volume : volumeProvider;
  return { check: m.check, diff: m.diff, create: m.create, read: m.read, update: m.update, delete: m.remove };
}
