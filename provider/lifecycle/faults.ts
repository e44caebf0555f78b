// Fault injection for the resumability tests: with DBOXED_VOLUMES_FAULT=<point> in the
// environment of `pulumi up`, the provider process dies abruptly at that point of a move (as a
// killed pulumi or a lost machine would), taking its SSH connections with it. Unset, it does nothing.
export type FaultPoint = "after-final-backup" | "during-final-restore" | "after-final-restore" | "after-restored" | "after-switch-on" | "before-old-cleanup";

export function faultPoint(point: FaultPoint, delayMs = 0): void {
  if (process.env.DBOXED_VOLUMES_FAULT !== point) return;
  const die = () => {
    process.stderr.write(`fault injected at ${point}: the provider process dies now\n`);
    process.kill(process.pid, "SIGKILL");
  };
  if (delayMs > 0) setTimeout(die, delayMs).unref();
  else die();
}

/**
 * With DBOXED_VOLUMES_PAUSE=<point>:<dir>, the provider stops at that point of a move: it
 * writes <dir>/paused and waits until <dir>/resume exists (a test acts on the hosts meanwhile).
 */
export async function pausePoint(point: "after-final-backup" | "after-final-restore" | "undo-before-teardown" | "undo-before-give-back"): Promise<void> {
  const spec = process.env.DBOXED_VOLUMES_PAUSE;
  if (!spec || !spec.startsWith(`${point}:`)) return;
  const fs = require("fs") as typeof import("fs");
  const dir = spec.slice(point.length + 1);
  fs.writeFileSync(`${dir}/paused`, point);
  while (!fs.existsSync(`${dir}/resume`)) await new Promise((r) => setTimeout(r, 200));
}
