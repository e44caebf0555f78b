// LVM: shell steps that create, grow and remove a volume's storage, each safe to run again,
// and parsing of `lvs --reportformat json`.
import { imageBytes, VolumeLayout } from "./layout";
import { quote as q } from "./shell";

/** Creates (or finds) the image, loop device, VG and LV. Refuses a VG that is not this volume's. */
/** Printed by ensureStorageScript when it made the storage now (it was not there before). */
export const STORAGE_MADE = "dboxed-storage-made";

export function ensureStorageScript(l: VolumeLayout, sizeBytes: number): string {
  if (!l.ownVg) {
    return `set -e
vgs ${q(l.vg)} >/dev/null 2>&1 || { echo "volume group ${l.vg} does not exist on this host" >&2; exit 20; }
if ! lvs ${q(`${l.vg}/${l.lv}`)} >/dev/null 2>&1; then
  lvcreate -q -y -Wy -Zy --setautoactivation n --addtag dboxed-volume -L ${sizeBytes}b -n ${q(l.lv)} ${q(l.vg)} >/dev/null
  echo "${STORAGE_MADE}"
fi
lvchange -q -ay ${q(`${l.vg}/${l.lv}`)}
`;
  }
  return `set -e
mkdir -p ${q(l.stateDir)}
if [ ! -e ${q(l.image)} ]; then
  truncate -s ${imageBytes(sizeBytes)} ${q(l.image + ".tmp")}
  mv ${q(l.image + ".tmp")} ${q(l.image)}
  echo "${STORAGE_MADE}"
fi
dev=$(losetup -j ${q(l.image)} -n -O NAME | head -n1)
[ -n "$dev" ] || dev=$(losetup -f --show ${q(l.image)})
if vgs ${q(l.vg)} >/dev/null 2>&1; then
  vgs --noheadings -o pv_name ${q(l.vg)} | grep -qx " *$dev" || {
    echo "volume group ${l.vg} exists but is not on this volume's image ${l.image}: refusing to touch it" >&2; exit 21; }
else
  pvs "$dev" >/dev/null 2>&1 || pvcreate -q -y "$dev" >/dev/null
  vgcreate -q --setautoactivation n --addtag dboxed-volume ${q(l.vg)} "$dev" >/dev/null
fi
vgchange -q -ay ${q(l.vg)} >/dev/null
lvs ${q(`${l.vg}/${l.lv}`)} >/dev/null 2>&1 || lvcreate -q -y -Wy -Zy --setautoactivation n -L ${sizeBytes}b -n ${q(l.lv)} ${q(l.vg)} >/dev/null
`;
}

/** Grows the LV (and for an own VG the image and PV first) and the mounted filesystem, online. */
export function growScript(l: VolumeLayout, sizeBytes: number): string {
  const lvPath = q(`${l.vg}/${l.lv}`);
  const growFs = l.filesystem === "xfs" ? `xfs_growfs ${q(l.mountPath)} >/dev/null` : `resize2fs ${q(l.device)} >/dev/null 2>&1`;
  const own = l.ownVg ? `
size=$(stat -c %s ${q(l.image)})
[ "$size" -ge ${imageBytes(sizeBytes)} ] || truncate -s ${imageBytes(sizeBytes)} ${q(l.image)}
dev=$(losetup -j ${q(l.image)} -n -O NAME | head -n1)
losetup -c "$dev"
pvresize -q "$dev" >/dev/null
` : "";
  // A backup in progress holds the volume's backup lock and an lvm2 snapshot of the LV, and lvm2
  // resizes no origin that has a snapshot: wait for the backup (the timer may have started one).
  // Under the lock a snapshot LV is a leftover of a killed run: removed, as the next backup would.
  const snapLv = q(`${l.vg}/${l.snapshotLv}`);
  return `set -e
export LVM_SUPPRESS_FD_WARNINGS=1
mkdir -p ${q(l.stateDir)}
exec 9>${q(`${l.stateDir}/backup.lock`)}
flock -w 900 9 || { echo ${q(`a backup of volume ${l.volumeId} held it for 15 minutes: run pulumi up again later`)} >&2; exit 9; }
if lvs ${snapLv} >/dev/null 2>&1; then
  umount ${q(l.snapshotMount)} 2>/dev/null || true
  lvremove -q -f -y ${snapLv} >/dev/null
fi${own}
cur=$(lvs --noheadings --units b --nosuffix -o lv_size ${lvPath} | tr -d ' ')
[ "$cur" -ge ${sizeBytes} ] || lvextend -q -L ${sizeBytes}b ${lvPath} >/dev/null
${growFs}
`;
}

/** Removes the LV, and for an own VG the VG, PV, loop device and image. */
export function removeStorageScript(l: VolumeLayout): string {
  if (!l.ownVg) {
    return `set -e
if lvs ${q(`${l.vg}/${l.snapshotLv}`)} >/dev/null 2>&1; then lvremove -q -f -y ${q(`${l.vg}/${l.snapshotLv}`)} >/dev/null; fi
if lvs ${q(`${l.vg}/${l.lv}`)} >/dev/null 2>&1; then lvremove -q -f -y ${q(`${l.vg}/${l.lv}`)} >/dev/null; fi
`;
  }
  return `set -e
if [ -e ${q(l.image)} ]; then
  dev=$(losetup -j ${q(l.image)} -n -O NAME | head -n1)
  [ -n "$dev" ] || dev=$(losetup -f --show ${q(l.image)})
  if vgs ${q(l.vg)} >/dev/null 2>&1; then
    vgs --noheadings -o pv_name ${q(l.vg)} | grep -qx " *$dev" || { echo "volume group ${l.vg} is not on ${l.image}: not removing it" >&2; exit 21; }
    vgremove -q -f -y ${q(l.vg)} >/dev/null
  fi
  pvremove -q -y "$dev" >/dev/null 2>&1 || true
  # Attaching the image wakes lvm's autoactivation (udev): the loop device may be busy for a
  # moment, or already gone (autoclear) when detached. Retry for a while, then say so.
  n=0
  while dev=$(losetup -j ${q(l.image)} -n -O NAME | head -n1) && [ -n "$dev" ]; do
    losetup -d "$dev" 2>/dev/null || true
    n=$((n + 1))
    [ "$n" -lt 60 ] || { echo "the loop device $dev of ${l.image} stays attached: not removing the image" >&2; exit 22; }
    sleep 0.5
  done
  rm -f ${q(l.image)}
fi
`;
}

export interface LvInfo { name: string; vg: string; sizeBytes: number; active: boolean; origin: string }

/** Parses `lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,lv_active,origin`. */
export function parseLvs(json: string): LvInfo[] {
  const start = json.indexOf("{");
  if (start < 0) return [];
  const data = JSON.parse(json.slice(start)) as { report: { lv: Record<string, string>[] }[] };
  return data.report.flatMap((r) => r.lv ?? []).map((lv) => ({
    name: lv.lv_name, vg: lv.vg_name, sizeBytes: Number(lv.lv_size), active: lv.lv_active === "active", origin: lv.origin ?? "",
  }));
}

export function lvsArgv(vg: string): string[] {
  return ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "lv_name,vg_name,lv_size,lv_active,origin", vg];
}
