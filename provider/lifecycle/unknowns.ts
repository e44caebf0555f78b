// Values Pulumi does not know yet during a preview reach `check` as this sentinel string.
export const UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9";

export function isUnknown(v: unknown): boolean {
  return v === UNKNOWN;
}

/** Whether the value at `path` (or any parent of it) is unknown. */
export function unknownAt(root: unknown, path: (string | number)[]): boolean {
  let cur: unknown = root;
  for (const key of path) {
    if (isUnknown(cur)) return true;
    if (cur === null || typeof cur !== "object") return false;
    cur = (cur as Record<string | number, unknown>)[key];
  }
  return isUnknown(cur);
}

export function containsUnknown(v: unknown): boolean {
  if (isUnknown(v)) return true;
  if (Array.isArray(v)) return v.some(containsUnknown);
  if (v && typeof v === "object") return Object.values(v).some(containsUnknown);
  return false;
}
