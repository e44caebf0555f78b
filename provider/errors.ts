// Errors meant for the user: they say what failed and, where known, how to fix it.

/** Bad input or a host that does not fit: the message names the field or the fix. */
export class UserError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UserError";
  }
}

/** A host that could not be dialled (no answer, refused, timed out): not a wrong key or login. */
export class DialError extends UserError {
  constructor(message: string) {
    super(message);
    this.name = "DialError";
  }
}

/** A host a step needs, and could not reach: the caller decides again without it. */
export class HostUnreachable extends UserError {
  constructor(readonly host: { address: string; port: number; hostKey?: string }, readonly cause: Error) {
    super(cause.message);
    this.name = "HostUnreachable";
  }
}

/** A command on a host that exited non-zero: carries the command, exit code and output. */
export class CommandError extends Error {
  constructor(
    readonly host: string,
    readonly commandText: string,
    readonly code: number | null,
    readonly signal: string | null,
    readonly stdout: string,
    readonly stderr: string,
    hint?: string,
  ) {
    const status = code === null ? `signal ${signal ?? "unknown"}` : `exit code ${code}`;
    const out = [stderr.trim(), stdout.trim()].filter(Boolean).join("\n").slice(-4000);
    super(
      `on ${host}: ${shorten(commandText)} failed with ${status}` +
        (out ? `:\n${out}` : "") +
        (hint ? `\nhint: ${hint}` : ""),
    );
    this.name = "CommandError";
  }
}

function shorten(s: string): string {
  const one = s.replace(/\s+/g, " ").trim();
  return one.length > 300 ? one.slice(0, 300) + "..." : one;
}

/** How to take an existing volume into a stack, since `pulumi import` cannot. */
export function adoptionHint(what: string, id: string): string {
  return `${what}: pulumi import cannot adopt volume "${id}" (a volume's state needs its host connection and repository, ` +
    `which an id does not carry). To adopt it, declare the Volume without the import option, with volumeId: "${id}" and the ` +
    "host it lives on, and run pulumi up: create finds its logical volume and data and adopts them (it never formats a " +
    "filesystem that holds data). Its lease must name this resource (the same project, stack and name), as after a lost " +
    "state or `pulumi state delete`; a volume owned by another resource is refused, naming it.";
}

/** Runs fn; a failure to dial `host` becomes HostUnreachable (the caller decides again without it). */
export async function dialing<T>(host: { address: string; port: number; hostKey?: string }, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof DialError) throw new HostUnreachable(host, e);
    throw e;
  }
}
