// Fault injection for the resumability tests: with DBOXED_VOLUMES_FAULT=<point> in the
// environment of `pulumi up`, the provider process dies abruptly at that point of a move (as a
// killed pulumi or a lost machine would), taking its SSH connections with it. Unset, it does nothing.
export type FaultPoint = "after-final-backup" | "during-final-restore" | "after-final-restore" | "before-old-cleanup";

export function faultPoint(point: FaultPoint, delayMs = 0): void {
  if (process.env.DBOXED_VOLUMES_FAULT !== point) return;
  const die = () => {
    process.stderr.write(`fault injected at ${point}: the provider process dies now\n`);
    process.kill(process.pid, "SIGKILL");
  };
  if (delayMs > 0) setTimeout(die, delayMs).unref();
  else die();
}
