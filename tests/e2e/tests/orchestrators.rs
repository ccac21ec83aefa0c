//! Warden in place of `cloud-hypervisor` under its two orchestrators, each replayed from its
//! source byte for byte by a tool of this crate that starts warden as the orchestrator does
//! (`src/bin/kata-replay.rs`, `src/bin/libvirt-replay.rs`, which say what they replay):
//!
//! - Kata Containers' Go runtime in its IOMMU mode: virtiofsd started first, `--api-socket`
//!   alone, `vmm.ping` polled, `vm.create` with Kata's body (`platform.iommu_segments: [0]`,
//!   two PCI segments, a read-only rootfs whose own flag says `iommu: false`, `iommu: true` on
//!   the rest, the agent's vsock, the `kataShared` virtio-fs on segment 1), `vm.info` =
//!   `Created`, the NIC added before boot with its tap's descriptor in one `sendmsg`,
//!   `vm.boot`, `vm.info` = `Running`, a disk hot-plugged and removed within Kata's 5 s,
//!   `vm.resize` to what the VM has, pause/resume, `vmm.shutdown` and the process gone within
//!   Kata's 3 s; after boot the runtime dials its agent (`CONNECT 1024` on the hybrid vsock
//!   socket; a guest tool stands in for the agent) and a line goes each way. The guest finds
//!   every device but the share in an IOMMU group (the rootfs too: its segment is behind the
//!   IOMMU; the vsock too), sees segment 1, moves 64 MiB each way over the vsock (connections
//!   the host opens and connections the guest opens, then four at once), mounts the share
//!   and reads and writes 64 MiB of files there (checksums on both sides), finds the share's
//!   I/O failing once virtiofsd is killed, then reads the rootfs and the hot disk whole and
//!   writes 24 MiB to the hot disk (checksums both sides), and pings the host over the tap.
//! - libvirt's ch driver: `--version` parsed, `--api-socket fd=N` on the socket it bound,
//!   `--event-monitor` on its FIFO, `vm.create` with PTY serial and console, the NIC (behind
//!   the IOMMU) added with its tap's descriptor and answered within libvirt's 500 ms, the
//!   guest's console read from the PTY `vm.info` names, a disk attached and detached live,
//!   `vm.reboot` (the guest boots again, the PTY re-read on `vm:rebooted`), pause/resume (then
//!   a line typed at the PTY reaches the guest), `vm.shutdown`, and SIGTERM on `vm:shutdown`.

use e2e::{Outcome, Scenario};
use std::time::Duration;

/// Mebibytes of the Kata hot-plugged disk and of each libvirt data region.
const DATA_MIB: usize = 24;
/// Mebibytes the Kata sandbox moves each way over its vsock and through its share.
const SANDBOX_MIB: usize = 64;

const GROUP_HELPERS: &str = r#"
group_devices() { ls "/sys/kernel/iommu_groups/$(basename "$(readlink "$1/iommu_group")")/devices" 2>/dev/null | tr '\n' ' '; }
# Virtio devices (vendor 0x1af4) other than the virtio-iommu (0x1057) and virtio-fs (0x105a,
# a vhost-user device, outside the IOMMU) with no IOMMU group.
ungrouped() {
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat $d/vendor)" = 0x1af4 ] || continue
        case "$(cat $d/device)" in 0x1057|0x105a) continue ;; esac
        [ -e "$d/iommu_group" ] || printf '%s ' "${d##*/}"
    done
}
disk_pci() { readlink -f "/sys/block/$1/device/.."; }
gone() {
    n=0
    while [ -e "$1" ]; do n=$((n + 1)); [ $n -gt 120 ] && break; sleep 1; done
    [ -e "$1" ] && echo no || echo yes
}
pings() {
    wait_for /sys/class/net/eth0 120
    ip addr add "$1.2/24" dev eth0
    ip link set eth0 up
    n=0
    until ping -c 1 -W 1 "$1.1" >/dev/null 2>&1; do
        n=$((n + 1)); [ $n -gt 60 ] && break
        usleep 200000
    done
    ping -c 3 -W 5 "$1.1" | grep -c 'bytes from'
}
"#;

const KATA_GUEST: &str = r#"
vsock-agent 1024 &
vsock-guest SANDBOX_MIB &
vsock_data=$!
mkdir -p /mnt/share
mount -t virtiofs kataShared /mnt/share && echo KATA-GUEST-FS-MOUNTED=yes
fs=$(readlink -f /sys/bus/virtio/drivers/virtiofs/virtio*/..)
echo "KATA-GUEST-FS-PCI=${fs##*/}"
echo "KATA-GUEST-FS-GROUP=$(group_devices "$fs")"
for i in 1 2 3 4; do
    echo "KATA-GUEST-FS-READ-$i=$(sha256sum </mnt/share/r$i | cut -d' ' -f1)"
done
for i in 1 2 3 4; do
    sum=$(dd if=/dev/urandom bs=1M count=$((SANDBOX_MIB / 4)) 2>/dev/null | tee /mnt/share/w$i | sha256sum | cut -d' ' -f1)
    echo "KATA-GUEST-FS-WROTE-$i=$sum"
done
sync
echo KATA-GUEST-FS-DONE
# Kata's runtime kills virtiofsd now: the share's I/O fails, and nothing else.
n=0
while [ $n -lt 120 ]; do
    err=$(touch /mnt/share/after-kill-$n 2>&1) || break
    n=$((n + 1))
    sleep 1
done
echo "KATA-GUEST-FS-AFTER-KILL=${err##*: }"
echo "KATA-GUEST-SEGMENTS=$(ls /sys/bus/pci/devices | cut -d: -f1 | sort -u | tr '\n' ' ')"
wait_for /dev/vda
echo "KATA-GUEST-ROOTFS-RO=$(cat /sys/block/vda/ro)"
echo "KATA-GUEST-ROOTFS-SUM=$(sha256sum </dev/vda | cut -d' ' -f1)"
rootfs=$(disk_pci vda)
echo "KATA-GUEST-ROOTFS-GROUP=$(group_devices "$rootfs")"
echo "KATA-GUEST-ROOTFS-PCI=${rootfs##*/}"
echo "KATA-GUEST-NET-PINGS=$(pings 192.168.249)"
echo "KATA-GUEST-NET-MAC=$(cat /sys/class/net/eth0/address)"
echo "KATA-GUEST-UNGROUPED=$(ungrouped)"
wait $vsock_data
echo KATA-GUEST-READY
wait_for /dev/vdb 120
hot=$(disk_pci vdb)
echo "KATA-GUEST-HOT-PCI=${hot##*/}"
echo "KATA-GUEST-HOT-GROUP=$(group_devices "$hot")"
echo "KATA-GUEST-HOT-READ-SUM=$(sha256sum </dev/vdb | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/out bs=1M count=DATA_MIB 2>/dev/null
echo "KATA-GUEST-HOT-WROTE-SUM=$(sha256sum </tmp/out | cut -d' ' -f1)"
dd if=/tmp/out of=/dev/vdb bs=1M conv=fsync 2>/dev/null
rm /tmp/out
echo KATA-GUEST-HOT-DONE
echo "KATA-GUEST-HOT-GONE=$(gone "$hot")"
# Kata ends it with vmm.shutdown.
sleep 600
"#;

const KATA_SETUP: &str = r#"vsock-peer clh.sock SANDBOX_MIB >peer.log 2>&1 &
mkdir share
for i in 1 2 3 4; do
    dd if=/dev/urandom of=share/r$i bs=1M count=$((SANDBOX_MIB / 4)) 2>/dev/null
    sha256sum share/r$i | cut -d' ' -f1 >r$i.sum
done
dd if=/dev/urandom of=rootfs.img bs=1M count=16 2>/dev/null
sha256sum rootfs.img | cut -d' ' -f1 >rootfs.sum
dd if=/dev/urandom of=hot.img bs=1M count=DATA_MIB 2>/dev/null
sha256sum hot.img | cut -d' ' -f1 >hot.before"#;

const KATA_CHECK: &str = r#"echo "KATA-HOST-ROOTFS-SUM=$(cat rootfs.sum)"
echo "KATA-HOST-ROOTFS-AFTER=$(sha256sum rootfs.img | cut -d' ' -f1)"
echo "KATA-HOST-HOT-BEFORE=$(cat hot.before)"
echo "KATA-HOST-HOT-AFTER=$(sha256sum hot.img | cut -d' ' -f1)"
for i in 1 2 3 4; do
    echo "KATA-HOST-FS-READ-$i=$(cat r$i.sum)"
    echo "KATA-HOST-FS-WROTE-$i=$(sha256sum share/w$i | cut -d' ' -f1)"
done
cat peer.log"#;

/// `KATA-STEP NAME STATUS MS BODY` as (status, milliseconds, body).
fn step(out: &Outcome, prefix: &str, name: &str) -> (u16, u64, String) {
    let start = format!("{prefix}-STEP {name} ");
    let line = out
        .console
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(&start))
        .unwrap_or_else(|| panic!("no step {name}\n{out}"));
    let mut fields = line.splitn(3, ' ');
    let status = fields.next().and_then(|s| s.parse().ok()).expect("status");
    let ms = fields.next().and_then(|s| s.parse().ok()).expect("ms");
    (
        status,
        ms,
        fields.next().unwrap_or_default().trim().to_string(),
    )
}

#[test]
fn kata_containers_drives_warden_in_its_iommu_mode() {
    let sizes = |text: &str| {
        text.replace("SANDBOX_MIB", &SANDBOX_MIB.to_string())
            .replace("DATA_MIB", &DATA_MIB.to_string())
    };
    let Some(out) = Scenario::new("kata_iommu")
        .launcher("kata-replay")
        .warden_args(["--sandbox"])
        .guest_tool("vsock-agent")
        .guest_tool("vsock-guest")
        .host_binary(&e2e::virtiofsd::binary())
        .host_setup(&sizes(KATA_SETUP))
        .guest_script(&sizes(&format!("{GROUP_HELPERS}{KATA_GUEST}")))
        .host_check(&sizes(KATA_CHECK))
        .timeout(Duration::from_secs(900))
        .run()
    else {
        return;
    };
    assert!(!out.console.contains("KATA-FAIL"), "{out}");
    let ok = |name: &str, status: u16| {
        let (got, ms, body) = step(&out, "KATA", name);
        assert_eq!(got, status, "{name}: {body}\n{out}");
        ms
    };
    ok("ping", 200);
    ok("create", 204);
    assert!(step(&out, "KATA", "info-created")
        .2
        .contains(r#""state":"Created""#));
    // Before boot the NIC goes into the configuration: 204, as Cloud Hypervisor answers.
    ok("add-net", 204);
    ok("boot", 204);
    assert!(step(&out, "KATA", "info-running")
        .2
        .contains(r#""state":"Running""#));
    assert!(ok("add-disk", 200) < 5000);
    assert!(ok("remove-device", 204) < 5000);
    ok("resize", 204);
    ok("pause", 204);
    ok("resume", 204);
    ok("shutdown", 204);
    assert!(out.marker("KATA-STOPPED-MS").is_some(), "{out}");
    assert_eq!(out.warden_exit, Some(0), "{out}");

    // The agent's channel: Kata's dialer through warden's hybrid vsock, behind the IOMMU.
    let agent = out
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("KATA-AGENT "))
        .unwrap_or_else(|| panic!("the runtime never reached its agent\n{out}"));
    assert!(
        agent.ends_with("KATA-AGENT-HELLO 3 echo=kata-ping"),
        "{agent}\n{out}"
    );
    assert_eq!(
        out.marker("KATA-GUEST-SEGMENTS"),
        Some("0000 0001"),
        "{out}"
    );

    // Every device behind the IOMMU: the rootfs through its segment, whatever its own flag.
    let rootfs = out.marker("KATA-GUEST-ROOTFS-PCI").expect("rootfs");
    assert_eq!(out.marker("KATA-GUEST-ROOTFS-GROUP"), Some(rootfs), "{out}");
    assert_eq!(out.marker("KATA-GUEST-UNGROUPED"), Some(""), "{out}");
    assert_eq!(out.marker("KATA-GUEST-ROOTFS-RO"), Some("1"), "{out}");
    assert_eq!(
        out.marker("KATA-GUEST-ROOTFS-SUM"),
        out.marker("KATA-HOST-ROOTFS-SUM"),
        "{out}"
    );
    assert_eq!(
        out.marker("KATA-HOST-ROOTFS-AFTER"),
        out.marker("KATA-HOST-ROOTFS-SUM"),
        "{out}"
    );
    assert_eq!(out.marker("KATA-GUEST-NET-PINGS"), Some("3"), "{out}");
    assert_eq!(
        out.marker("KATA-GUEST-NET-MAC"),
        Some("52:54:00:4b:41:01"),
        "{out}"
    );
    let hot = out.marker("KATA-GUEST-HOT-PCI").expect("hot disk");
    assert_eq!(
        format!("0000:00:{}.0", out.marker("KATA-HOT-SLOT").unwrap()),
        hot,
        "{out}"
    );
    assert_eq!(out.marker("KATA-GUEST-HOT-GROUP"), Some(hot), "{out}");
    assert_eq!(
        out.marker("KATA-GUEST-HOT-READ-SUM"),
        out.marker("KATA-HOST-HOT-BEFORE"),
        "{out}"
    );
    assert_eq!(
        out.marker("KATA-GUEST-HOT-WROTE-SUM"),
        out.marker("KATA-HOST-HOT-AFTER"),
        "{out}"
    );
    assert_eq!(out.marker("KATA-GUEST-HOT-GONE"), Some("yes"), "{out}");
    sandbox_moved_its_data(&out);
}

/// The sandbox's vsock and share moved their data intact, and the share alone failed once its
/// back end was killed.
fn sandbox_moved_its_data(out: &Outcome) {
    let marker = |key: &str| out.required_marker(key).to_string();
    e2e::vsock::assert_peer_moved_data(out, SANDBOX_MIB);
    // The share: on segment 1, outside the IOMMU, read and written whole.
    assert_eq!(marker("KATA-GUEST-FS-MOUNTED"), "yes", "{out}");
    assert!(marker("KATA-GUEST-FS-PCI").starts_with("0001:00:"), "{out}");
    assert_eq!(marker("KATA-GUEST-FS-GROUP"), "", "{out}");
    for i in 1..=4 {
        for way in ["READ", "WROTE"] {
            let guest = marker(&format!("KATA-GUEST-FS-{way}-{i}"));
            assert_eq!(guest.len(), 64, "{way} {i}\n{out}");
            assert_eq!(guest, marker(&format!("KATA-HOST-FS-{way}-{i}")), "{out}");
        }
    }
    assert!(out.console.contains("KATA-VIRTIOFSD-KILLED"), "{out}");
    assert!(
        marker("KATA-GUEST-FS-AFTER-KILL").contains("not connected"),
        "{out}"
    );
}

const LIBVIRT_GUEST: &str = r#"
wait_for /dev/vda
tell() { printf "$1" | dd of=/dev/vda bs=512 seek=$2 conv=notrunc,fsync 2>/dev/null; }
boot_sector=$((48 * 2048))
if [ "$(dd if=/dev/vda bs=512 skip=$boot_sector count=1 2>/dev/null | head -c 5)" = BOOT1 ]; then
    echo LIBVIRT-GUEST-SECOND-BOOT=yes
    echo "LIBVIRT-GUEST-SECOND-NET-PINGS=$(pings 192.168.253)"
    read line
    echo "LIBVIRT-GUEST-TYPED=$line"
    sleep 600
fi
echo "LIBVIRT-GUEST-DISK-SUM=$(dd if=/dev/vda bs=1M count=DATA_MIB 2>/dev/null | sha256sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/out bs=1M count=DATA_MIB 2>/dev/null
echo "LIBVIRT-GUEST-WROTE-SUM=$(sha256sum </tmp/out | cut -d' ' -f1)"
dd if=/tmp/out of=/dev/vda bs=1M seek=DATA_MIB conv=fsync 2>/dev/null
rm /tmp/out
echo "LIBVIRT-GUEST-NET-PINGS=$(pings 192.168.253)"
echo "LIBVIRT-GUEST-NET-MAC=$(cat /sys/class/net/eth0/address)"
net=$(readlink -f /sys/class/net/eth0/device/..)
echo "LIBVIRT-GUEST-NET-PCI=${net##*/}"
echo "LIBVIRT-GUEST-NET-GROUP=$(group_devices "$net")"
echo LIBVIRT-GUEST-READY
wait_for /dev/vdb 120
hot=$(disk_pci vdb)
echo "LIBVIRT-GUEST-HOT-SUM=$(sha256sum </dev/vdb | cut -d' ' -f1)"
echo LIBVIRT-GUEST-HOT-DONE
echo "LIBVIRT-GUEST-HOT-GONE=$(gone "$hot")"
tell BOOT1 $boot_sector
echo LIBVIRT-GUEST-REBOOT-READY
# libvirt reboots it.
sleep 600
"#;

const LIBVIRT_SETUP: &str = r#"mkdir -p /dev/pts
grep -q devpts /proc/mounts || mount -t devpts devpts /dev/pts
dd if=/dev/urandom of=disk.img bs=1M count=DATA_MIB 2>/dev/null
sha256sum disk.img | cut -d' ' -f1 >disk.before
truncate -s 64M disk.img
dd if=/dev/urandom of=hot.img bs=1M count=8 2>/dev/null
sha256sum hot.img | cut -d' ' -f1 >hot.sum"#;

const LIBVIRT_CHECK: &str = r#"echo "LIBVIRT-HOST-DISK-SUM=$(cat disk.before)"
echo "LIBVIRT-HOST-WRITTEN-SUM=$(dd if=disk.img bs=1M skip=DATA_MIB count=DATA_MIB 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "LIBVIRT-HOST-HOT-SUM=$(cat hot.sum)""#;

#[test]
fn libvirt_drives_warden() {
    let mib = DATA_MIB.to_string();
    let guest = format!("{GROUP_HELPERS}{LIBVIRT_GUEST}").replace("DATA_MIB", &mib);
    let Some(out) = Scenario::new("libvirt")
        .launcher("libvirt-replay")
        .host_setup(&LIBVIRT_SETUP.replace("DATA_MIB", &mib))
        .guest_script(&guest)
        .host_check(&LIBVIRT_CHECK.replace("DATA_MIB", &mib))
        .timeout(Duration::from_secs(420))
        .run()
    else {
        return;
    };
    assert!(!out.console.contains("LIBVIRT-FAIL"), "{out}");
    let version: u64 = out.marker("LIBVIRT-VERSION").unwrap().parse().unwrap();
    assert!(version >= 40_000_000, "{out}");
    let ok = |name: &str, status: u16| {
        let (got, ms, body) = step(&out, "LIBVIRT", name);
        assert_eq!(got, status, "{name}: {body}\n{out}");
        ms
    };
    ok("create", 204);
    assert!(ok("add-net", 204) < 500, "libvirt's deadline");
    ok("boot", 204);
    ok("info", 200);
    ok("add-disk", 200);
    ok("remove-device", 204);
    ok("reboot", 204);
    ok("info-rebooted", 200);
    ok("pause", 204);
    ok("resume", 204);
    ok("shutdown", 204);
    let pty = out.marker("LIBVIRT-SERIAL-PTY").expect("a serial pty");
    assert!(pty.starts_with("/dev/pts/"), "{out}");
    let console = out.marker("LIBVIRT-CONSOLE-PTY").expect("a console pty");
    assert!(console.starts_with("/dev/pts/") && console != pty, "{out}");
    // SIGTERM, sent on vm:shutdown: warden ends as on vmm.shutdown.
    let stop = out.marker("LIBVIRT-STOP").expect("stopped");
    assert!(stop.starts_with("exit 0"), "{out}");
    assert_eq!(out.warden_exit, Some(0), "{out}");

    let events = out.marker("LIBVIRT-EVENTS").expect("events");
    let expected = [
        "vmm:starting",
        "vm:booting",
        "vm:booted",
        "vm:device-removed",
        "vm:rebooting",
        "vm:rebooted",
        "vm:pausing",
        "vm:paused",
        "vm:resuming",
        "vm:resumed",
        "vm:shutdown",
        "vm:deleted",
        "vmm:shutdown",
    ];
    let mut rest = events.split(' ');
    for event in expected {
        assert!(
            rest.any(|e| e == event),
            "{event} in order in {events}\n{out}"
        );
    }
    // One vm:shutdown only: libvirt stops the VMM on the first (a reboot must not say it).
    assert_eq!(events.matches("vm:shutdown").count(), 1, "{events}");

    assert_eq!(
        out.marker("LIBVIRT-GUEST-DISK-SUM"),
        out.marker("LIBVIRT-HOST-DISK-SUM"),
        "{out}"
    );
    assert_eq!(
        out.marker("LIBVIRT-GUEST-WROTE-SUM"),
        out.marker("LIBVIRT-HOST-WRITTEN-SUM"),
        "{out}"
    );
    assert_eq!(out.marker("LIBVIRT-GUEST-NET-PINGS"), Some("3"), "{out}");
    assert_eq!(
        out.marker("LIBVIRT-GUEST-NET-MAC"),
        Some("52:54:00:12:34:56"),
        "{out}"
    );
    let net = out.marker("LIBVIRT-GUEST-NET-PCI").expect("net");
    assert_eq!(out.marker("LIBVIRT-GUEST-NET-GROUP"), Some(net), "{out}");
    assert_eq!(
        out.marker("LIBVIRT-GUEST-HOT-SUM"),
        out.marker("LIBVIRT-HOST-HOT-SUM"),
        "{out}"
    );
    assert_eq!(out.marker("LIBVIRT-GUEST-HOT-GONE"), Some("yes"), "{out}");
    assert_eq!(
        out.marker("LIBVIRT-GUEST-SECOND-BOOT"),
        Some("yes"),
        "{out}"
    );
    assert_eq!(
        out.marker("LIBVIRT-GUEST-SECOND-NET-PINGS"),
        Some("3"),
        "{out}"
    );
    assert_eq!(out.marker("LIBVIRT-GUEST-TYPED"), Some("resumed"), "{out}");
}
