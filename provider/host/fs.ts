// Filesystems: format once (never over existing data), and report usage.
import { VolumeLayout } from "./layout";
import { quote as q } from "./shell";

/**
 * Formats the LV only if it has no filesystem signature and was never formatted by us before
 * (a marker in the state dir). A different filesystem on it is an error, never overwritten.
 */
export function ensureFilesystemScript(l: VolumeLayout): string {
  const mkfs = l.filesystem === "xfs" ? `mkfs.xfs -q ${q(l.device)}` : `mkfs.ext4 -q -F ${q(l.device)}`;
  return `set -e
mkdir -p ${q(l.stateDir)}
rc=0; fstype=$(blkid -p -o value -s TYPE ${q(l.device)}) || rc=$?
if [ "$rc" = 2 ]; then
  if [ -e ${q(l.stateDir + "/formatted")} ]; then
    echo "${l.device} was formatted before but has no filesystem now: refusing to format it again" >&2; exit 22
  fi
  ${mkfs} >/dev/null
  touch ${q(l.stateDir + "/formatted")}
elif [ "$rc" != 0 ]; then
  echo "blkid could not read ${l.device} (exit $rc)" >&2; exit 23
elif [ "$fstype" != ${q(l.filesystem)} ]; then
  echo "${l.device} holds a $fstype filesystem, not ${l.filesystem}: refusing to format it" >&2; exit 24
else
  touch ${q(l.stateDir + "/formatted")}
fi
`;
}
