#!/usr/bin/env bash
# Builds a real Debian 12 (bookworm) disk image for warden, from Debian packages:
#
#   disk.img    1 GiB sparse raw image, GPT: p1 EFI system (16 MiB, unused), p2 Linux swap
#               (16 MiB), p3 the ext4 root file system, as in Clear Linux's
#               clear-kvm.img, so `root=/dev/vda3` boots either
#   vmlinuz     the image's kernel (Debian's 6.12 cloud kernel, the ABI guest/build.sh pins)
#   initrd.img  the image's initramfs-tools initrd; it loads virtio_iommu and virtio_blk,
#               without which a root disk behind the IOMMU never appears
#   root-offset the byte offset of p3 in disk.img (for debugfs/mke2fs `offset=`)
#
# The system: systemd as PID 1, a login on the serial console (root, empty password),
# systemd-networkd giving a virtio-net 192.168.249.2/24, and fio, iperf3, pciutils, ethtool,
# socat (vsock).
# Tests put a script at /usr/local/sbin/warden-scenario (see SCENARIO_UNIT): the image then
# runs it once the boot is complete, and powers off.
#
# The tree comes from `mmdebstrap` (it fetches from Debian's archive, ${WARDEN_DEBIAN_MIRROR:-
# http://deb.debian.org/debian} and its security archive); `sfdisk` and `mke2fs -d` write the
# image without loop devices or mounts. The output goes to ${WARDEN_DISTRO_CACHE:-
# $HOME/.cache/warden/distro} and is rebuilt only when this recipe or the kernel package
# changes. Only the cache directory is printed on stdout: `dir=$(guest/build-distro.sh)`.
#
# Needs root (mmdebstrap's root mode keeps file ownership right) and the Debian packages
# mmdebstrap, fdisk, e2fsprogs, plus what guest/build.sh needs.
set -euo pipefail

readonly SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
readonly CACHE="${WARDEN_DISTRO_CACHE:-$HOME/.cache/warden/distro}"
readonly MIRROR="${WARDEN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
readonly SECURITY_MIRROR="${WARDEN_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

# Image geometry, in 512-byte sectors: 1 GiB, p1 and p2 of 16 MiB each from 1 MiB, p3 after.
readonly IMAGE_SECTORS=$((1024 * 2048))
readonly P1_START=2048 P1_SIZE=$((16 * 2048))
readonly P2_START=$((P1_START + P1_SIZE)) P2_SIZE=$((16 * 2048))
readonly P3_START=$((P2_START + P2_SIZE))
# GPT keeps 33 sectors at the end for its backup header and table.
readonly P3_SIZE=$(((IMAGE_SECTORS - 34 - P3_START) / 8 * 8))

readonly PACKAGES=(systemd-sysv udev kmod initramfs-tools e2fsprogs iproute2
    fio iperf3 pciutils ethtool socat)

log() { echo "guest/build-distro.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

need() { # need COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null || PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null ||
        die "'$1' not found: install the Debian package '$2' (apt-get install $2)"
}

# Runs the e2e harness's script, if the harness put one in the image, after the default
# target. Not `systemd.run=`: that boots into kernel-command-line.target instead of the
# default target, so a test could not see the real system come up. Type=exec, so that the
# boot transaction ends when the script starts and `systemctl is-system-running --wait`
# inside it can report "running".
readonly SCENARIO_UNIT='[Unit]
Description=warden e2e scenario (/usr/local/sbin/warden-scenario)
ConditionPathExists=/usr/local/sbin/warden-scenario
After=multi-user.target graphical.target

[Service]
Type=exec
ExecStart=/usr/local/sbin/warden-scenario
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target'

# The guest's configuration, written into the tree after the packages are installed.
configure() {
    local root=$1
    # initramfs-tools leaves virtio_iommu out by default; MODULES=dep fails in a chroot.
    printf '%s\n' virtio_iommu virtio_blk >>"$root/etc/initramfs-tools/modules"
    echo 'MODULES=list' >"$root/etc/initramfs-tools/conf.d/warden.conf"
    echo warden-debian >"$root/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 warden-debian\n' >"$root/etc/hosts"
    # The kernel mounts / read-only; this makes systemd remount it read-write.
    echo 'LABEL=warden-root / ext4 rw,errors=remount-ro 0 0' >"$root/etc/fstab"
    cat >"$root/etc/systemd/network/10-warden.network" <<'EOF'
# warden's demo network: the host end of the tap is 192.168.249.1.
[Match]
Driver=virtio_net
[Network]
Address=192.168.249.2/24
EOF
    chroot "$root" systemctl enable systemd-networkd.service >/dev/null 2>&1
    # Nothing waits for the network; with no virtio-net it would wait 2 min and fail.
    chroot "$root" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1
    chroot "$root" passwd -d root >/dev/null
    printf '%s\n' "$SCENARIO_UNIT" >"$root/etc/systemd/system/warden-scenario.service"
    chroot "$root" systemctl enable warden-scenario.service >/dev/null 2>&1
    printf '%s\n\n' "Debian 12 under warden: log in as root (no password); 'poweroff' ends the demo." \
        >>"$root/etc/issue"
    chroot "$root" update-initramfs -u -k all >/dev/null
}

build() {
    local kernel_pkg=$1 work="$CACHE/work"
    rm -rf "$work"
    mkdir -p "$work"
    log "mmdebstrap: Debian bookworm with $kernel_pkg (about a minute)"
    mmdebstrap --quiet --variant=minbase \
        --include="$(IFS=,; echo "${PACKAGES[*]},$kernel_pkg")" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        bookworm "$work/root" \
        "deb $MIRROR bookworm main" \
        "deb $MIRROR bookworm-updates main" \
        "deb $SECURITY_MIRROR bookworm-security main" >&2
    configure "$work/root"

    local abi=${kernel_pkg#linux-image-}
    cp "$work/root/boot/vmlinuz-$abi" "$work/vmlinuz"
    cp "$work/root/boot/initrd.img-$abi" "$work/initrd.img"

    log "writing the GPT and the ext4 root file system"
    truncate -s $((IMAGE_SECTORS * 512)) "$work/disk.img"
    sfdisk --quiet "$work/disk.img" >/dev/null <<EOF
label: gpt
start=$P1_START, size=$P1_SIZE, type=U, name=esp
start=$P2_START, size=$P2_SIZE, type=S, name=swap
start=$P3_START, size=$P3_SIZE, type=L, name=root
EOF
    # A formatted swap area: systemd's gpt-auto-generator activates the disk's swap partition.
    truncate -s $((P2_SIZE * 512)) "$work/swap"
    mkswap -q -L warden-swap "$work/swap"
    dd if="$work/swap" of="$work/disk.img" bs=512 seek=$P2_START conv=notrunc,sparse status=none
    mke2fs -q -F -t ext4 -b 4096 -L warden-root -d "$work/root" \
        -E offset=$((P3_START * 512)) "$work/disk.img" $((P3_SIZE / 8))
    echo $((P3_START * 512)) >"$work/root-offset"

    rm -rf "$CACHE/disk.img" "$CACHE/vmlinuz" "$CACHE/initrd.img" "$CACHE/root-offset"
    mv "$work/disk.img" "$work/vmlinuz" "$work/initrd.img" "$work/root-offset" "$CACHE/"
    rm -rf "$work"
}

main() {
    [[ $(id -u) == 0 ]] || die "building the Debian image needs root (mmdebstrap's root mode): run as root or with sudo"
    need mmdebstrap mmdebstrap
    need sfdisk fdisk
    need mke2fs e2fsprogs
    need mkswap util-linux

    # The kernel is the one guest/build.sh resolved (its pin, or the newer point release).
    local guest kernel_pkg key
    guest=$(bash "$(dirname "$SCRIPT")/build.sh")
    kernel_pkg=$(sed -n 2p "$guest/packages")
    [[ "$kernel_pkg" == linux-image-*-cloud-amd64 ]] || die "unexpected L2 kernel package '$kernel_pkg' in $guest/packages"

    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9 # another test process may be building the same image

    key=$(printf '%s\n' "$(sha256sum <"$SCRIPT")" "$kernel_pkg" "$MIRROR" "$SECURITY_MIRROR" |
        sha256sum | cut -d' ' -f1)
    if [[ "$(cat "$CACHE/stamp" 2>/dev/null)" != "$key" || ! -f "$CACHE/disk.img" ]]; then
        rm -f "$CACHE/stamp"
        log "building the Debian 12 image into $CACHE"
        build "$kernel_pkg"
        echo "$key" >"$CACHE/stamp"
        log "done: $(du -h --apparent-size "$CACHE/disk.img" | cut -f1) image, $(du -h "$CACHE/disk.img" | cut -f1) used"
    fi
    echo "$CACHE"
}

main "$@"
