//! VFIO passthrough for real, in the nested test host: QEMU gives L1 an emulated Intel IOMMU
//! and a virtio-blk-pci disk behind it; L1 binds the disk to vfio-pci and warden passes it to
//! L2, where the stock virtio_blk driver reads what this machine wrote into the image. That
//! only works if every DMA mapping reached L1's VFIO container correctly: with `iommu=on`
//! through L2's virtio-iommu MAP/UNMAP requests, without it from the all-RAM map at start.

use e2e::{Outcome, Scenario};
use std::time::Duration;

/// The passed-through disk's PCI address in L1 (QEMU `addr=0x5`).
const L1_DEVICE: &str = "/sys/bus/pci/devices/0000:00:05.0";
/// Its address in L2: after the virtio-iommu (01), console (02) and rng (03).
const L2_BDF: &str = "0000:00:04.0";

/// On this machine: 8 MiB of random data; the checksum of its first 4 MiB.
const IMAGE: &str = "dd if=/dev/urandom of=passthrough.img bs=1M count=8 2>/dev/null
echo \"HOST-DISK-MD5=$(head -c 4194304 passthrough.img | md5sum | cut -d' ' -f1)\"";

/// In L1: the IOMMU is on, the disk is bound to vfio-pci.
const BIND_IN_L1: &str = r#"dev=/sys/bus/pci/devices/0000:00:05.0
dmesg | grep -q 'DMAR: Intel(R) Virtualization Technology for Directed I/O' && echo L1-IOMMU=on
echo "L1-GROUP-DEVICES=$(ls "$(readlink -f $dev/iommu_group)/devices")"
echo vfio-pci >$dev/driver_override
if [ -e $dev/driver ]; then echo 0000:00:05.0 >$dev/driver/unbind; fi
echo 0000:00:05.0 >/sys/bus/pci/drivers_probe
echo "L1-DRIVER=$(basename "$(readlink $dev/driver)")"
echo "L1-DMA-ENTRY-LIMIT=$(cat /sys/module/vfio_iommu_type1/parameters/dma_entry_limit)""#;

/// In L2: topology, groups, then the disk read and a write read back with O_DIRECT.
const GUEST_READS: &str = r#"
wait_for /dev/vda 60
for dev in /sys/bus/pci/devices/*; do
    echo "PT-PCI ${dev##*/} $(cat "$dev/vendor") $(cat "$dev/device") $(basename "$(readlink "$dev/driver")")"
done
for group in /sys/kernel/iommu_groups/*; do
    [ -d "$group" ] && echo "PT-GROUP ${group##*/} $(ls "$group/devices")"
done
dmesg | grep virtio_iommu || true
md5() { md5sum | cut -d' ' -f1; }
echo "GUEST-DISK-MD5=$(head -c 4194304 /dev/vda | md5)"
dd if=/dev/urandom of=/tmp/written bs=1M count=2 2>/dev/null
echo "GUEST-WRITTEN-MD5=$(md5 </tmp/written)"
dd if=/tmp/written of=/dev/vda bs=1M seek=4 oflag=direct conv=fsync 2>/dev/null
echo "GUEST-REREAD-MD5=$(dd if=/dev/vda bs=1M skip=4 count=2 iflag=direct 2>/dev/null | md5)"
"#;

/// A scenario whose KVM host has the emulated IOMMU and the disk, bound to vfio-pci.
fn passthrough(name: &str, device_arg: &str) -> Scenario {
    Scenario::new(name)
        .qemu_setup(IMAGE)
        .l1_qemu_args([
            "-device",
            "intel-iommu,intremap=on",
            "-drive",
            "if=none,id=pt,file=passthrough.img,format=raw",
            "-device",
            "virtio-blk-pci,drive=pt,disable-legacy=on,iommu_platform=on,addr=0x5",
        ])
        .l1_cmdline("intel_iommu=on")
        .host_setup(BIND_IN_L1)
        .warden_args(["--memory", "size=512M", "--device", device_arg])
        .timeout(Duration::from_secs(300))
}

fn lines_with<'a>(out: &'a Outcome, prefix: &str) -> Vec<&'a str> {
    out.guest_output()
        .lines()
        .filter_map(|line| line.trim().strip_prefix(prefix))
        .collect()
}

/// The L1 side went as planned: without it nothing below means anything.
fn assert_l1_ready(out: &Outcome) {
    assert_eq!(out.marker("L1-IOMMU"), Some("on"), "{out}");
    assert_eq!(
        out.marker("L1-GROUP-DEVICES"),
        Some("0000:00:05.0"),
        "{out}"
    );
    assert_eq!(out.marker("L1-DRIVER"), Some("vfio-pci"), "{out}");
}

/// The disk read what this machine wrote, and a write came back.
fn assert_disk_works(out: &Outcome) {
    let host = out.marker("HOST-DISK-MD5").expect("host checksum");
    assert_eq!(out.marker("GUEST-DISK-MD5"), Some(host), "{out}");
    let written = out.marker("GUEST-WRITTEN-MD5").expect("guest checksum");
    assert_eq!(out.marker("GUEST-REREAD-MD5"), Some(written), "{out}");
}

fn vfio_stats(out: &Outcome) -> &str {
    out.guest_output()
        .lines()
        .find_map(|line| line.trim().strip_prefix("warden: vfio "))
        .unwrap_or_else(|| panic!("warden printed no VFIO statistics\n{out}"))
}

#[test]
fn passthrough_behind_the_virtio_iommu() {
    let arg = format!("path={L1_DEVICE},iommu=on,id=disk0");
    let Some(out) = passthrough("vfio_iommu_on", &arg)
        .guest_script(GUEST_READS)
        .run()
    else {
        return;
    };
    assert_l1_ready(&out);
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert!(
        lines_with(&out, "PT-PCI ")
            .contains(&format!("{L2_BDF} 0x1af4 0x1042 virtio-pci").as_str()),
        "the disk is at {L2_BDF} with virtio-pci bound\n{out}"
    );
    let groups: Vec<&str> = lines_with(&out, "PT-GROUP ")
        .into_iter()
        .filter_map(|line| line.split_once(' ').map(|(_, devices)| devices))
        .collect();
    assert!(
        groups.contains(&L2_BDF),
        "the passed-through disk has an IOMMU group of its own\n{out}"
    );
    assert_disk_works(&out);
    assert_eq!(out.warden_exit, Some(0), "{out}");
    let stats = vfio_stats(&out);
    assert!(stats.starts_with("disk0: "), "{stats}");
    let maps: u64 = stats["disk0: ".len()..]
        .split(" maps")
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable statistics {stats:?}"));
    assert!(
        maps > 10,
        "the guest's MAP requests became VFIO maps: {stats}\n{out}"
    );
}

#[test]
fn passthrough_with_all_ram_mapped() {
    let arg = format!("path={L1_DEVICE},id=disk0");
    let Some(out) = passthrough("vfio_all_ram", &arg)
        .guest_script(GUEST_READS)
        .run()
    else {
        return;
    };
    assert_l1_ready(&out);
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert!(
        lines_with(&out, "PT-PCI ")
            .contains(&format!("{L2_BDF} 0x1af4 0x1042 virtio-pci").as_str()),
        "{out}"
    );
    assert!(
        lines_with(&out, "PT-GROUP ").is_empty(),
        "no virtio-iommu, so no IOMMU groups\n{out}"
    );
    assert_disk_works(&out);
    assert_eq!(out.warden_exit, Some(0), "{out}");
    assert_eq!(
        vfio_stats(&out),
        "disk0: 1 maps, 0 unmaps, 536870912 bytes mapped, 1 entries live, 1 peak entries (limit 65535, 0 refused)",
        "all 512 MiB of RAM in one entry, mapped once\n{out}"
    );
}

/// The seed's "faster mappings" claim, measured through the whole chain: in L2, a device
/// behind warden's virtio-iommu is bound to vfio-pci and `vfio-map` maps a 64 MiB buffer with
/// one `VFIO_IOMMU_MAP_DMA`, from 4 KiB pages (in a fresh guest, and with the guest's memory
/// fragmented as after a long run) and from 2 MiB huge pages. L2's type1 driver sends one MAP
/// request per physically contiguous run; warden turns each into one VFIO mapping in L1. The
/// device is QEMU's `edu` (no L2 driver, so no other DMA traffic): warden's totals are the
/// buffer's, plus one 8 KiB MAP/UNMAP pair type1 makes when the container is set up (its
/// fine-grained super page probe).
#[test]
fn huge_pages_need_far_fewer_mappings() {
    let mut rows = Vec::new();
    for mode in ["4k", "4k-fragmented", "2m"] {
        let hugepages = if mode == "2m" {
            "echo 40 >/proc/sys/vm/nr_hugepages\necho \"L2-HUGEPAGES=$(cat /proc/sys/vm/nr_hugepages)\"\n"
        } else {
            ""
        };
        let script = format!(
            r#"dev=/sys/bus/pci/devices/{L2_BDF}
echo vfio-pci >$dev/driver_override
echo {L2_BDF} >/sys/bus/pci/drivers_probe
echo "L2-DRIVER=$(basename "$(readlink $dev/driver)")"
echo "L2-GROUP-DEVICES=$(ls "$(readlink -f $dev/iommu_group)/devices")"
# The virtio-iommu offers no interrupt remapping on x86, which type1 insists on unless told
# otherwise; the device's MSIs are still remapped by L1's IOMMU.
echo 1 >/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts
{hugepages}vfio-map $dev {mode} 64 &
pid=$!
while [ ! -e /tmp/vfio-map.done ]; do kill -0 $pid; usleep 100000; done
"#
        );
        let Some(out) = Scenario::new(&format!("vfio_map_{mode}"))
            .l1_qemu_args([
                "-device",
                "intel-iommu,intremap=on",
                "-device",
                "edu,addr=0x6",
            ])
            .l1_cmdline("intel_iommu=on")
            .host_setup(&BIND_IN_L1.replace("00:05.0", "00:06.0"))
            .warden_args([
                "--memory",
                "size=512M",
                "--device",
                "path=/sys/bus/pci/devices/0000:00:06.0,iommu=on,id=edu",
            ])
            .guest_tool("vfio-map")
            .guest_script(&script)
            .timeout(Duration::from_secs(400))
            .run()
        else {
            return;
        };
        assert_eq!(out.marker("L1-DRIVER"), Some("vfio-pci"), "{out}");
        assert_eq!(out.marker("L2-DRIVER"), Some("vfio-pci"), "{out}");
        assert_eq!(out.marker("L2-GROUP-DEVICES"), Some(L2_BDF), "{out}");
        assert_eq!(out.guest_script_exit(), Some(0), "{out}");
        let ms = out
            .marker(&format!("VFIO-MAP-{}", mode.to_uppercase()))
            .and_then(|v| v.strip_prefix("mapped ms="))
            .unwrap_or_else(|| panic!("vfio-map did not map\n{out}"))
            .to_string();
        let total = out
            .guest_output()
            .lines()
            .find_map(|line| line.trim().strip_prefix("warden: virtio-iommu total: "))
            .unwrap_or_else(|| panic!("no IOMMU statistics\n{out}"));
        let requests = leading_number(total);
        let vfio = vfio_stats(&out)
            .strip_prefix("edu: ")
            .expect("stats for edu");
        let field = |name: &str| -> u64 {
            let end = vfio.find(name).expect(name);
            let start = vfio[..end - 1].rfind(' ').map_or(0, |i| i + 1);
            vfio[start..end - 1].parse().expect(name)
        };
        let bytes = field("bytes mapped");
        assert!(
            (64 << 20..(64 << 20) + (64 << 10)).contains(&bytes),
            "the buffer, and no more than type1's probe, went to VFIO: {bytes}\n{out}"
        );
        rows.push((mode, requests, field("peak entries"), ms));
    }
    eprintln!("| buffer pages | MAP requests | VFIO entries (peak) | VFIO_IOMMU_MAP_DMA in L2 |");
    eprintln!("| --- | --- | --- | --- |");
    for (mode, requests, entries, ms) in &rows {
        eprintln!("| {mode} | {requests} | {entries} | {ms} ms |");
    }
    // 32 huge pages at most, plus type1's probe.
    let (fragmented, huge) = (rows[1].1, rows[2].1);
    assert!(
        huge <= 33,
        "64 MiB of 2 MiB pages is at most 32 runs: {rows:?}"
    );
    assert!(
        fragmented >= 256 * huge,
        "scattered 4 KiB pages need at least 256 times the MAP requests: {rows:?}"
    );
}

/// The number a statistics line starts with.
fn leading_number(line: &str) -> u64 {
    line.split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable statistics {line:?}"))
}
