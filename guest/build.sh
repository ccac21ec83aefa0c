#!/usr/bin/env bash
# Builds the Linux guests warden's end-to-end tests boot, from Debian packages (no kernel
# compile, seconds when the .debs are at hand):
#
#   L2 = the guest warden boots:          l2/vmlinuz (bzImage), l2/vmlinux (ELF, PVH note),
#                                          l2/initramfs.cpio (busybox + virtio/vfio modules)
#   L1 = the software KVM test host, run   l1/vmlinuz, l1/initramfs.cpio (busybox + kvm,
#        under QEMU TCG when this machine        kvm-amd nested=1, tun, vfio*, iperf3)
#        has no usable hardware KVM:
#
# The output goes to a cache outside the clone, ${WARDEN_GUEST_CACHE:-$HOME/.cache/warden/guest},
# and is rebuilt only when an input changes (this script, the package versions). The only
# thing printed on stdout is the cache directory, so callers can do `dir=$(guest/build.sh)`.
#
# Needs: apt-get/apt-cache/dpkg-deb (Debian or derivative with the bookworm security archive),
# zstd, cpio, kmod (modinfo), flock. Root only if the apt package lists need an `apt-get update`.
set -euo pipefail

# Kernel ABI these guests were tested with. Debian's security archive eventually drops old
# point releases: when this one is gone we take the newest 6.12 (see resolve_kernel_pkg).
# Override with WARDEN_GUEST_KERNEL_ABI=6.12.N+deb12 to test another one.
readonly PINNED_ABI="${WARDEN_GUEST_KERNEL_ABI:-6.12.117+deb12}"

# L2 modules, in load order (the order the guest README measured; deps are added first).
# button and evdev: the ACPI power button warden presses, readable as /dev/input/eventN;
# vmw_vsock_virtio_transport: virtio-vsock (the Kata replay's agent listens on it);
# virtiofs (it brings fuse): the Kata replay's share.
readonly L2_MODULES=(virtio-iommu virtio_blk failover net_failover virtio_net virtio-rng
    vfio vfio_iommu_type1 irqbypass vfio-pci-core vfio-pci button evdev
    vmw_vsock_virtio_transport virtiofs)
# L1 modules: KVM for AMD SVM (TCG emulates an AMD CPU), nested so L1's /dev/kvm can run L2;
# tun for tap networking, vhost_net for `--net vhost=on` (it brings vhost, vhost_iotlb, tap);
# virtio_blk for a disk image QEMU gives L1 (Scenario::host_disk);
# vfio* and virtio-iommu for passthrough scenarios (an emulated IOMMU
# given to L1). Parameters follow the module name after a colon.
readonly L1_MODULES=(irqbypass ccp kvm kvm-amd:nested=1 tun vhost_net virtio_blk vfio
    vfio_iommu_type1 vfio-pci-core vfio-pci virtio-iommu)
# iperf3 in L1, the host end of the benchmark's TCP test (tests/e2e/src/bin/bench): Debian's
# build, with the packages of the shared libraries it loads (L1 is otherwise static busybox).
readonly L1_IPERF3_PACKAGES=(iperf3 libiperf0 libsctp1 libssl3 libc6)
readonly L1_IPERF3_LIBS=(ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libiperf.so.0 libcrypto.so.3
    libsctp.so.1)

readonly SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
readonly CACHE="${WARDEN_GUEST_CACHE:-$HOME/.cache/warden/guest}"

log() { echo "guest/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

need() { # need COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null || die "'$1' not found: install the Debian package '$2' (apt-get install $2)"
}

# Candidate versions of the packages apt was asked about, by name (see lookup).
declare -A CANDIDATE=()

# Asks apt for the candidate versions of packages $@ in one go (each apt-cache run costs
# ~0.5 s, most of this script's time when the cache is up to date).
lookup() {
    local pkg version
    while read -r pkg version; do
        [[ "$version" == "(none)" ]] || CANDIDATE[$pkg]=$version
    done < <(apt-cache policy "$@" 2>/dev/null |
        awk '/^[^ ].*:$/ { pkg = substr($0, 1, length($0) - 1) } /Candidate:/ { print pkg, $2 }')
}

# Prints the candidate version of package $1 (looked up before), or nothing if apt has none.
candidate() {
    echo "${CANDIDATE[$1]:-}"
}

# Prints the linux-image package for flavour $1 ("amd64" or "cloud-amd64"): the pinned ABI if
# apt can still fetch it, else the one Debian's 6.12 meta-package currently depends on.
resolve_kernel_pkg() {
    local flavour=$1 pkg="linux-image-${PINNED_ABI}-$1" meta dep
    if [[ -n "$(candidate "$pkg")" ]]; then
        echo "$pkg"
        return
    fi
    meta="linux-image-6.12-${flavour}"
    dep=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-6\.12\./ { print $2; exit }')
    [[ -n "$dep" ]] || return 1
    log "note: $pkg is no longer available; using the newer point release $dep"
    echo "$dep"
}

# Sets L1_PKG, L2_PKG, BUSYBOX_VERSION; runs `apt-get update` once if apt can't find them.
resolve_packages() {
    local attempt
    for attempt in 1 2; do
        lookup "linux-image-${PINNED_ABI}-amd64" "linux-image-${PINNED_ABI}-cloud-amd64" busybox-static
        if L1_PKG=$(resolve_kernel_pkg amd64) && L2_PKG=$(resolve_kernel_pkg cloud-amd64) &&
            BUSYBOX_VERSION=$(candidate busybox-static) && [[ -n "$BUSYBOX_VERSION" ]]; then
            # A fallback to a newer point release wasn't looked up yet.
            [[ -n "$(candidate "$L1_PKG")" && -n "$(candidate "$L2_PKG")" ]] || lookup "$L1_PKG" "$L2_PKG"
            return 0
        fi
        [[ $attempt == 1 ]] || break
        if [[ $(id -u) == 0 ]]; then
            log "packages not in apt's lists: running apt-get update"
            apt-get update -qq >&2 || die "apt-get update failed"
        else
            die "apt doesn't know linux-image-6.12*-amd64 / busybox-static: run 'sudo apt-get update' (needs Debian bookworm + bookworm-security sources)"
        fi
    done
    die "could not find linux-image-${PINNED_ABI}-amd64 / -cloud-amd64 (or a newer 6.12 via linux-image-6.12-amd64) and busybox-static in apt: are the bookworm and bookworm-security sources configured?"
}

# Prints the .deb of package $1 at version $2 already in debs/, if any.
find_deb() {
    local f
    for f in "$CACHE/debs/$1"_*.deb; do
        if [[ -f "$f" && "$(dpkg-deb -f "$f" Version)" == "$2" ]]; then
            echo "$f"
            return
        fi
    done
}

# Downloads package $1 (at apt's candidate version) into debs/ unless already there; prints
# the .deb path.
fetch() {
    local pkg=$1 version deb
    version=$(candidate "$pkg")
    mkdir -p "$CACHE/debs"
    deb=$(find_deb "$pkg" "$version")
    if [[ -z "$deb" ]]; then
        log "downloading $pkg $version"
        # As root, apt warns that it can't drop privileges to _apt here; harmless.
        (cd "$CACHE/debs" && apt-get download -qq "$pkg=$version" 2>&1 | { grep -v unsandboxed || true; } >&2)
        deb=$(find_deb "$pkg" "$version")
        [[ -n "$deb" ]] || die "apt-get download $pkg=$version failed"
    fi
    echo "$deb"
}

# extract_vmlinux BZIMAGE OUT: writes the ELF kernel inside a zstd-compressed bzImage.
# The x86 boot protocol (>= 2.08) says where the payload is: setup_sects at 0x1f1 gives the
# size of the real-mode part, payload_offset/payload_length at 0x248/0x24c locate the
# compressed kernel inside the protected-mode part. The payload ends with the 4-byte
# uncompressed size (Kbuild's size_append), which zstd would reject as trailing garbage.
extract_vmlinux() {
    local img=$1 out=$2 setup_sects payload_offset payload_length start magic
    u() { od -An -t "u$2" -j "$1" -N "$2" "$img" | tr -d ' '; }
    [[ "$(od -An -c -j $((0x202)) -N 4 "$img" | tr -d ' ')" == "HdrS" ]] || die "$img is not a bzImage"
    setup_sects=$(u $((0x1f1)) 1)
    payload_offset=$(u $((0x248)) 4)
    payload_length=$(u $((0x24c)) 4)
    start=$(((setup_sects + 1) * 512 + payload_offset))
    magic=$(od -An -t x1 -j "$start" -N 4 "$img" | tr -d ' ')
    [[ "$magic" == "28b52ffd" ]] || die "$img: payload is not zstd (magic $magic); only zstd kernels are supported"
    dd if="$img" iflag=skip_bytes,count_bytes skip="$start" count=$((payload_length - 4)) bs=1M status=none |
        zstd -q -d -c >"$out"
    [[ "$(od -An -c -N 4 "$out" | tr -d ' ')" == "177ELF" ]] || die "$img: decompressed payload is not an ELF file"
}

# add_modules MODDIR DEST SPEC...: copies the modules named by SPEC ("name" or
# "name:param=value ...") and, first, their dependencies (from modinfo) into DEST/lib/modules,
# and writes DEST/etc/modules.load: "file params" per line, in load order, for /init's insmod.
# Modules are stored decompressed: busybox insmod would first hand the .ko.xz to the kernel as
# is (an "Invalid ELF header" per module in the log) before decompressing it itself.
add_modules() {
    local moddir=$1 dest=$2 spec
    shift 2
    declare -A file_of=() loaded=()
    local f n
    while IFS= read -r f; do
        n=$(basename "$f"); n=${n%%.ko*}; n=${n//-/_}
        file_of[$n]=$f
    done < <(find "$moddir/kernel" -name '*.ko*')
    mkdir -p "$dest/lib/modules" "$dest/etc"
    : >"$dest/etc/modules.load"

    load() { # load NAME [PARAMS]
        local name=${1//-/_} params=${2:-} dep f
        [[ -z "${loaded[$name]:-}" ]] || return 0
        if [[ -z "${file_of[$name]:-}" ]]; then
            grep -q "/${name//_/[-_]}\.ko" "$moddir/modules.builtin" && return 0
            die "module $1 not found in $moddir"
        fi
        for dep in $(modinfo -F depends "${file_of[$name]}" | tr ',' ' '); do
            load "$dep"
        done
        loaded[$name]=1
        f=$(basename "${file_of[$name]}")
        f=${f%%.ko*}.ko
        case "${file_of[$name]}" in
            *.ko.xz) "$BUSYBOX" xzcat "${file_of[$name]}" >"$dest/lib/modules/$f" ;;
            *.ko) cp "${file_of[$name]}" "$dest/lib/modules/$f" ;;
            *) die "${file_of[$name]}: unsupported module compression" ;;
        esac
        echo "$f $params" >>"$dest/etc/modules.load"
    }
    for spec in "$@"; do
        if [[ "$spec" == *:* ]]; then load "${spec%%:*}" "${spec#*:}"; else load "$spec"; fi
    done
}

# new_rootfs DIR: a busybox userland (applets as symlinks in /bin) and the usual mount points.
new_rootfs() {
    local dir=$1 applet
    mkdir -p "$dir"/{bin,dev,proc,sys,tmp,run,etc,root}
    ln -sf bin "$dir/sbin"
    cp "$BUSYBOX" "$dir/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        [[ "$applet" == busybox ]] || ln -sf busybox "$dir/bin/$applet"
    done
}

# pack DIR OUT: DIR as a newc cpio owned by root, entries sorted so the bytes are reproducible.
pack() {
    (cd "$1" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) >"$2"
}

# add_iperf3 DEST: Debian's iperf3 and the libraries it needs in DEST/opt/iperf3, and a
# /bin/iperf3 that starts it with that loader and library path, so nothing else in L1 changes.
add_iperf3() {
    local dest=$1 pkg lib file
    mkdir -p "$work/iperf3" "$dest/opt/iperf3"
    for pkg in "${L1_IPERF3_PACKAGES[@]}"; do
        dpkg-deb -x "$(fetch "$pkg")" "$work/iperf3"
    done
    cp "$work/iperf3/usr/bin/iperf3" "$dest/opt/iperf3/"
    for lib in "${L1_IPERF3_LIBS[@]}"; do
        file=$(find "$work/iperf3" -name "$lib" -print -quit)
        [[ -n "$file" ]] || die "$lib not found in ${L1_IPERF3_PACKAGES[*]}"
        cp -L "$file" "$dest/opt/iperf3/"
    done
    printf '#!/bin/sh\nexec /opt/iperf3/ld-linux-x86-64.so.2 --library-path /opt/iperf3 /opt/iperf3/iperf3 "$@"\n' \
        >"$dest/bin/iperf3"
    chmod 755 "$dest/bin/iperf3"
}

write_l2_init() {
    cat >"$1/init" <<'EOF'
#!/bin/sh
# /init of warden's L2 test guest (generated by guest/build.sh).
# Without a /dev/console in the archive the kernel starts us with no stdio: get it first.
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
echo WARDEN-L2-INIT
while read -r file params; do
    insmod "/lib/modules/$file" $params || echo "WARDEN-L2-INSMOD-FAILED=$file"
done </etc/modules.load
echo WARDEN-L2-MODULES-LOADED
if [ -f /scenario.sh ]; then
    echo WARDEN-L2-SCRIPT-BEGIN
    sh /scenario.sh
    echo "WARDEN-L2-SCRIPT-EXIT=$?"
else
    echo "no /scenario.sh in the initramfs: interactive shell, exit it to power off"
    setsid cttyhack sh
fi
sync
poweroff -f
EOF
    chmod 755 "$1/init"
    # Sourced by the harness-generated /scenario.sh.
    cat >"$1/etc/warden-helpers.sh" <<'EOF'
# Helpers for L2 scenario scripts (generated by guest/build.sh).

# wait_for PATH [SECONDS=15]: devices appear asynchronously once their driver probes (the disk
# waits for the virtio-iommu, for one), so wait for PATH to exist; fail after SECONDS.
wait_for() {
    _n=$(( ${2:-15} * 10 ))
    while [ ! -e "$1" ]; do
        if [ "$_n" -le 0 ]; then echo "WARDEN-L2-WAIT-TIMEOUT=$1"; return 1; fi
        _n=$((_n - 1))
        usleep 100000
    done
}
EOF
}

write_l1_init() {
    cat >"$1/init" <<'EOF'
#!/bin/sh
# /init of warden's L1 KVM test host (generated by guest/build.sh): brings up KVM (nested SVM
# under QEMU TCG) and runs the scenario the harness appended as /e2e/host.sh.
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/hugepages && mount -t hugetlbfs hugetlbfs /dev/hugepages
ip link set lo up
echo WARDEN-L1-INIT
while read -r file params; do
    insmod "/lib/modules/$file" $params || echo "WARDEN-L1-INSMOD-FAILED=$file"
done </etc/modules.load
[ -c /dev/kvm ] || echo "WARDEN-L1-NO-KVM"
if [ -f /e2e/host.sh ]; then
    cd /e2e && sh /e2e/host.sh
else
    echo "no /e2e/host.sh in the initramfs: interactive shell, exit it to power off"
    setsid cttyhack sh
fi
sync
poweroff -f
EOF
    chmod 755 "$1/init"
}

main() {
    need apt-get apt
    need dpkg-deb dpkg
    need zstd zstd
    need cpio cpio
    need modinfo kmod
    need flock util-linux

    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9 # another test process may be building the same cache

    resolve_packages
    lookup "${L1_IPERF3_PACKAGES[@]}"
    local key pkg iperf3_versions=()
    for pkg in "${L1_IPERF3_PACKAGES[@]}"; do
        [[ -n "$(candidate "$pkg")" ]] || die "apt has no candidate for $pkg (L1's iperf3)"
        iperf3_versions+=("$pkg=$(candidate "$pkg")")
    done
    key=$(printf '%s\n' "$(sha256sum <"$SCRIPT")" "$L1_PKG=$(candidate "$L1_PKG")" \
        "$L2_PKG=$(candidate "$L2_PKG")" "busybox-static=$BUSYBOX_VERSION" "${iperf3_versions[@]}" |
        sha256sum | cut -d' ' -f1)
    if [[ "$(cat "$CACHE/stamp" 2>/dev/null)" == "$key" ]]; then
        echo "$CACHE"
        return
    fi
    log "building guests into $CACHE ($L1_PKG, $L2_PKG, busybox-static $BUSYBOX_VERSION)"

    local work="$CACHE/work"
    rm -rf "$work" "$CACHE/stamp"
    mkdir -p "$work"
    dpkg-deb -x "$(fetch busybox-static)" "$work/busybox"
    dpkg-deb -x "$(fetch "$L1_PKG")" "$work/l1-pkg"
    dpkg-deb -x "$(fetch "$L2_PKG")" "$work/l2-pkg"
    BUSYBOX="$work/busybox/bin/busybox"

    local out="$work/out" abi
    mkdir -p "$out/l1" "$out/l2"

    abi=${L2_PKG#linux-image-}
    cp "$work/l2-pkg/boot/vmlinuz-$abi" "$out/l2/vmlinuz"
    extract_vmlinux "$out/l2/vmlinuz" "$out/l2/vmlinux"
    new_rootfs "$work/l2-root"
    add_modules "$work/l2-pkg/lib/modules/$abi" "$work/l2-root" "${L2_MODULES[@]}"
    write_l2_init "$work/l2-root"
    pack "$work/l2-root" "$out/l2/initramfs.cpio"

    abi=${L1_PKG#linux-image-}
    cp "$work/l1-pkg/boot/vmlinuz-$abi" "$out/l1/vmlinuz"
    new_rootfs "$work/l1-root"
    add_modules "$work/l1-pkg/lib/modules/$abi" "$work/l1-root" "${L1_MODULES[@]}"
    add_iperf3 "$work/l1-root"
    write_l1_init "$work/l1-root"
    pack "$work/l1-root" "$out/l1/initramfs.cpio"

    printf '%s\n' "$L1_PKG" "$L2_PKG" "busybox-static=$BUSYBOX_VERSION" >"$out/packages"
    rm -rf "$CACHE/l1" "$CACHE/l2" "$CACHE/packages"
    mv "$out/l1" "$out/l2" "$out/packages" "$CACHE/"
    rm -rf "$work"
    echo "$key" >"$CACHE/stamp"
    log "done"
    echo "$CACHE"
}

main "$@"
