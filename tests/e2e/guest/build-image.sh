#!/usr/bin/env bash
# The e2e guest image recipe: a Debian bookworm guest that plays a mariner VM under QEMU.
# Every file in this directory is part of the recipe: tests/e2e/image.py keys the cache by
# their hash and calls this script with an empty work directory; it leaves there
#   rootfs.img   ext4 root file system (sparse, made with mkfs.ext4 -d: no loop mount)
#   vmlinuz, initrd.img   for QEMU's direct kernel boot
# Needs root (debootstrap, chroot). Environment:
#   MARINER_E2E_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   MARINER_E2E_DEBS     a directory kept between builds for debootstrap's downloads
set -euo pipefail

out="$1"
here="$(cd "$(dirname "$0")" && pwd)"
mirror="${MARINER_E2E_MIRROR:-http://deb.debian.org/debian}"
root="$out/rootfs"
packages=systemd-sysv,dbus,openssh-server,sudo,iproute2,udev,kmod,initramfs-tools,python3,linux-image-cloud-amd64

if [ "$(id -u)" != 0 ]; then
  echo "build-image.sh: debootstrap and chroot need root" >&2
  exit 1
fi

# debootstrap mounts /proc (and more) inside the target while it works: never leave a mount
# behind, or deleting the work directory would reach into it.
unmount_all() {
  local status=$?
  { grep -o " $root[^ ]*" /proc/mounts || true; } | sort -r | while read -r mnt; do
    umount -l "$mnt" || true
  done
  exit "$status"
}
trap unmount_all EXIT

cache_args=()
if [ -n "${MARINER_E2E_DEBS:-}" ]; then
  mkdir -p "$MARINER_E2E_DEBS"
  cache_args=(--cache-dir="$MARINER_E2E_DEBS")
fi

echo "build-image: debootstrap bookworm ($packages)" >&2
debootstrap --variant=minbase --include="$packages" "${cache_args[@]}" \
  bookworm "$root" "$mirror" >"$out/debootstrap.log" 2>&1 || {
  tail -30 "$out/debootstrap.log" >&2
  exit 1
}

echo "build-image: configuring the guest" >&2
cp -a "$here/rootfs/." "$root/"
chmod 0755 "$root/usr/local/sbin/mariner-guest-config"
echo mariner-e2e >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n' >"$root/etc/hosts"
printf 'nameserver 10.0.2.3\n' >"$root/etc/resolv.conf"
printf '%s\n' virtiofs virtio_net virtio_blk virtio_pci qemu_fw_cfg >>"$root/etc/initramfs-tools/modules"
echo qemu_fw_cfg >"$root/etc/modules-load.d/mariner.conf"

# Each VM gets its own identity on its first boot: host keys (mariner-guest-config runs
# ssh-keygen -A) and machine id (systemd writes an empty /etc/machine-id).
rm -f "$root"/etc/ssh/ssh_host_*
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

# systemctl enable works offline in a chroot: it only makes symlinks.
chroot "$root" systemctl enable -q systemd-networkd.service mariner-guest-config.service
# Units that only slow down a throwaway guest booting under TCG.
chroot "$root" systemctl mask -q apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
  e2scrub_reap.service fstrim.timer systemd-networkd-wait-online.service 2>/dev/null || true

chroot "$root" update-initramfs -u -k all >"$out/initramfs.log" 2>&1 || {
  tail -30 "$out/initramfs.log" >&2
  exit 1
}
kernel="$(cd "$root/boot" && ls vmlinuz-* | sort -V | tail -1)"
cp "$root/boot/$kernel" "$out/vmlinuz"
cp "$root/boot/initrd.img-${kernel#vmlinuz-}" "$out/initrd.img"
version="${kernel#vmlinuz-}"
contents="$(chroot "$root" lsinitramfs "/boot/initrd.img-$version")"
for module in virtiofs virtio_blk virtio_net virtio_pci; do
  grep -q "/$module\.ko" <<<"$contents" \
    || grep -q "/$module\.ko" "$root/lib/modules/$version/modules.builtin" || {
    echo "build-image: the initramfs lacks $module (and the kernel does not build it in)" >&2
    exit 1
  }
done

rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
echo "build-image: mkfs.ext4 -d" >&2
mkfs.ext4 -q -F -L mariner-root -d "$root" "$out/rootfs.img" 3G
rm -rf "$root"
