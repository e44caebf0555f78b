#!/usr/bin/env bash
# Builds the lab's Debian guest image (root filesystem, kernel, initrd, admin ssh key), once,
# into the cache. The lab boots disposable hosts from it (lab/lab.ts).
# Why qemu guests: this machine's kernel has no device-mapper, so lvm2 only runs in a guest.
set -euo pipefail

CACHE="${DBOXED_LAB_CACHE:-$HOME/.cache/pulumi-dboxed-volumes}"
IMG="$CACHE/image"
# Bump when the package list or the configuration below changes: it invalidates the cache.
IMAGE_VERSION=4
MIRROR="${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}"
PACKAGES=systemd-sysv,udev,dbus,openssh-server,lvm2,linux-image-cloud-amd64,initramfs-tools,e2fsprogs,xfsprogs,iproute2,curl,kmod,procps,netbase,ca-certificates,attr,acl,util-linux,sudo,prometheus-node-exporter,rsync,openssh-client

if [ -f "$IMG/done" ] && [ "$(cat "$IMG/done")" = "$IMAGE_VERSION" ]; then
  echo "[image] cached: $IMG (version $IMAGE_VERSION)"; exit 0
fi
# The Debian mirror comes from this machine's own apt configuration (or DEBIAN_MIRROR), never a default.
[ -n "$MIRROR" ] || { echo "[image] no Debian mirror in /etc/apt/sources.list.d/debian.sources: set DEBIAN_MIRROR to the mirror apt uses" >&2; exit 1; }
t0=$SECONDS
rm -rf "$IMG"; mkdir -p "$IMG"
root="$IMG/rootfs"
echo "[image] debootstrap bookworm from $MIRROR (about 1-2 minutes)"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$MIRROR" > "$IMG/debootstrap.log" 2>&1 \
  || { tail -n 30 "$IMG/debootstrap.log"; echo "[image] debootstrap failed (log: $IMG/debootstrap.log)" >&2; exit 1; }
echo "[image] debootstrap done in $((SECONDS - t0)) s; configuring"

# The lab's admin key: the lab uses it once per host to install a per-lab key.
ssh-keygen -q -t ed25519 -N '' -C lab-admin -f "$IMG/admin_ed25519"
install -d -m 700 "$root/root/.ssh"
install -m 600 "$IMG/admin_ed25519.pub" "$root/root/.ssh/authorized_keys"
# MaxSessions stays at sshd's default (10 channels per connection), as on the hosts users have:
# the provider shares one connection between the operations on a host.
cat > "$root/etc/ssh/sshd_config.d/lab.conf" <<'CONF'
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
MaxStartups 50:30:100
CONF
cat > "$root/etc/systemd/network/10-lab.network" <<'CONF'
[Match]
Name=en* eth*
[Network]
DHCP=ipv4
CONF
echo lab-host > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 lab-host\n' > "$root/etc/hosts"
echo 'LABEL=root / ext4 defaults,noatime 0 1' > "$root/etc/fstab"
: > "$root/etc/machine-id"
chroot "$root" systemctl enable systemd-networkd ssh >/dev/null 2>&1
chroot "$root" systemctl set-default multi-user.target >/dev/null 2>&1
# node-exporter serves the volumes' textfile metrics; its own collector timers only cost CPU here.
for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
  prometheus-node-exporter-apt.timer prometheus-node-exporter-ipmitool-sensor.timer prometheus-node-exporter-mellanox-hca-temp.timer \
  prometheus-node-exporter-nvme.timer prometheus-node-exporter-smartmon.timer; do
  chroot "$root" systemctl disable "$u" >/dev/null 2>&1 || true
done
chroot "$root" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1
# Guests are disposable; keep the journal in memory.
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' > "$root/etc/systemd/journald.conf.d/lab.conf"
# The cloud kernel has virtio as modules: an initrd that loads them.
sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
printf 'virtio_pci\nvirtio_blk\n' >> "$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all > /dev/null 2>&1
cp "$(ls "$root"/boot/vmlinuz-* | head -n1)" "$IMG/vmlinuz"
cp "$(ls "$root"/boot/initrd.img-* | head -n1)" "$IMG/initrd.img"
rm -f "$root"/etc/ssh/ssh_host_*
chroot "$root" ssh-keygen -A >/dev/null
# The golden guest's host key: the lab pins it for its first login to each clone.
cp "$root/etc/ssh/ssh_host_ed25519_key.pub" "$IMG/host_ed25519.pub"
truncate -s 3G "$IMG/base.raw"
mkfs.ext4 -q -F -L root -d "$root" "$IMG/base.raw"
rm -rf "$root"
echo "$IMAGE_VERSION" > "$IMG/done"
echo "[image] built in $((SECONDS - t0)) s: $IMG"
