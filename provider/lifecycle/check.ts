// `check` for both resources: zod validation whose failures name the field, tolerant of
// values that are still unknown during a preview.
import type { z } from "zod";
import { Failure, validate } from "../inputs";
import { containsUnknown, unknownAt } from "./unknowns";

export function checkInputs<T>(schema: z.ZodType<T, any, any>, news: Record<string, unknown>): { inputs: any; failures: Failure[]; value?: T } {
  const { __provider, ...raw } = news;
  const { value, failures } = validate(schema, raw);
  if (!containsUnknown(raw)) {
    return { inputs: value ? { ...(value as object), __provider } : news, failures, value };
  }
  // Unknown values are checked on the next run, when they are known.
  const known = failures.filter((f) => !unknownAt(raw, f.property.split(".")));
  return { inputs: news, failures: known };
}
