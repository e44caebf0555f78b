// The only place where strings become shell text. Every value that reaches a shell on a
// host goes through `quote`, which emits POSIX single quotes (works in sh, dash and bash).

/** Quotes one value for a POSIX shell: the shell reads it back byte for byte. */
export function quote(value: string | number): string {
  const s = String(value);
  if (s.includes("\0")) throw new Error("a shell argument cannot contain a NUL byte");
  if (s !== "" && /^[A-Za-z0-9_@%+=:,./-]+$/.test(s)) return s;
  return "'" + s.replace(/'/g, `'\\''`) + "'";
}

/** Joins an argument vector into one command line, each argument quoted. */
export function command(argv: readonly (string | number)[]): string {
  if (argv.length === 0) throw new Error("empty command");
  return argv.map(quote).join(" ");
}

/** Joins commands so that the first failure stops the rest. */
export function all(...commands: string[]): string {
  return commands.join(" && ");
}
