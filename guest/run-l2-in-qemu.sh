#!/usr/bin/env bash
# Developer tool, not part of the test suite: boots the L2 test guest (guest/build.sh) directly
# under QEMU TCG, with the devices warden will give it (virtio-iommu, a virtio-blk disk and a
# virtio-rng behind it), to check the guest's /init, module loading, markers and poweroff
# without warden, or to compare warden's behaviour with QEMU's.
#
#   guest/run-l2-in-qemu.sh [SCENARIO.sh]
#
# SCENARIO.sh becomes the guest's /scenario.sh (after the helpers the harness also sources);
# without it the guest drops to an interactive shell. The disk is an 8 MiB scratch file whose
# first sector starts with "WARDEN-DISK-MARKER". Extra QEMU options: $QEMU_EXTRA.
set -euo pipefail

die() { echo "run-l2-in-qemu.sh: error: $*" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found: apt-get install qemu-system-x86"
command -v cpio >/dev/null || die "cpio not found: apt-get install cpio"

guest=$("$(dirname "$0")/build.sh")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

printf 'WARDEN-DISK-MARKER\n' | dd of="$tmp/disk.img" conv=notrunc status=none
truncate -s 8M "$tmp/disk.img"

cp "$guest/l2/initramfs.cpio" "$tmp/initramfs"
if [[ $# -gt 0 ]]; then
    mkdir "$tmp/extra"
    { echo '. /etc/warden-helpers.sh'; echo 'set -e'; cat "$1"; } >"$tmp/extra/scenario.sh"
    (cd "$tmp/extra" && echo scenario.sh | cpio -o -H newc -R 0:0 --quiet) >>"$tmp/initramfs"
fi

# shellcheck disable=SC2086 # QEMU_EXTRA is a list of options
timeout "${TIMEOUT:-300}" qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -cpu qemu64 \
    -m 512M -smp 2 -nographic -no-reboot \
    -kernel "$guest/l2/vmlinuz" -initrd "$tmp/initramfs" \
    -append "console=ttyS0 panic=-1 ${CMDLINE_EXTRA:-}" \
    -device virtio-iommu-pci \
    -drive "file=$tmp/disk.img,if=none,id=disk0,format=raw" \
    -device virtio-blk-pci,drive=disk0,iommu_platform=on,disable-legacy=on \
    -device virtio-rng-pci,iommu_platform=on,disable-legacy=on \
    ${QEMU_EXTRA:-}
