//! `iommu=on` end to end (the virtual IOMMU issue): the guest finds the virtio-iommu through
//! the VIOT, puts exactly the protected devices in IOMMU groups, and its DMA through them is
//! translated and intact; huge-page RAM makes 2 MiB IOMMU pages available.

use e2e::{Outcome, Scenario};
use std::time::Duration;

/// Host side: two disks holding different 4 MiB of random data, whose checksums the host
/// prints (different, so that reading one disk for the other cannot pass).
const TWO_DISKS: &str = "for disk in protected plain; do
    dd if=/dev/urandom of=$disk.payload bs=1M count=4 2>/dev/null
    dd if=/dev/zero of=$disk.img bs=1M count=16 2>/dev/null
    dd if=$disk.payload of=$disk.img conv=notrunc 2>/dev/null
done
echo \"HOST-PROTECTED-PAYLOAD-MD5=$(md5sum <protected.payload | cut -d' ' -f1)\"
echo \"HOST-PLAIN-PAYLOAD-MD5=$(md5sum <plain.payload | cut -d' ' -f1)\"
# While the guest runs: one statistics report on SIGUSR1, from warden's confined stats thread.
( while ! pid=$(pidof warden); do sleep 1; done; sleep 3; kill -USR1 $pid ) >/dev/null 2>&1 &";

/// Guest side: topology, groups and driver state, then a read and a write on each disk.
const GUEST_CHECKS: &str = r#"
wait_for /dev/vda
wait_for /dev/vdb
wait_for /dev/hwrng
for dev in /sys/bus/pci/devices/*; do
    echo "IOMMU-PCI ${dev##*/} $(cat "$dev/vendor") $(cat "$dev/device")"
done
for group in /sys/kernel/iommu_groups/*; do
    [ -d "$group" ] && echo "IOMMU-GROUP ${group##*/} $(ls "$group/devices")"
done
dmesg | grep -q 'ACPI: VIOT' && echo IOMMU-VIOT=parsed
dmesg | grep -q 'virtio_iommu virtio[0-9]*: input address' && echo IOMMU-DRIVER=bound
echo "IOMMU-PAGE-MASK=$(dmesg | sed -n 's/.*virtio_iommu.*page mask: //p')"
echo "IOMMU-RNG-BYTES=$(head -c 64 /dev/hwrng | wc -c)"
# Disk names follow probe order, and the protected disk waits for the IOMMU driver: find each
# disk by whether its PCI function is in an IOMMU group.
for disk in /sys/block/vd*; do
    pci=$(readlink -f "$disk/device/..")
    if [ -e "$pci/iommu_group" ]; then protected=/dev/${disk##*/}; protected_pci=${pci##*/}
    else plain=/dev/${disk##*/}; plain_pci=${pci##*/}; fi
done
echo "IOMMU-PROTECTED-DISK-PCI=$protected_pci"
echo "IOMMU-PLAIN-DISK-PCI=$plain_pci"
md5() { md5sum | cut -d' ' -f1; }
echo "GUEST-PROTECTED-READ-MD5=$(head -c 4194304 "$protected" | md5)"
echo "GUEST-PLAIN-READ-MD5=$(head -c 4194304 "$plain" | md5)"
dd if=/dev/urandom of=/tmp/written bs=1M count=4 2>/dev/null
echo "GUEST-WRITTEN-MD5=$(md5 </tmp/written)"
dd if=/tmp/written of="$protected" bs=1M seek=8 conv=fsync 2>/dev/null
dd if=/tmp/written of="$plain" bs=1M seek=8 conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
echo "GUEST-PROTECTED-REREAD-MD5=$(dd if="$protected" bs=1M skip=8 count=4 iflag=direct 2>/dev/null | md5)"
"#;

const HOST_CHECK: &str = "md5() { md5sum | cut -d' ' -f1; }
echo \"HOST-PROTECTED-MD5=$(dd if=protected.img bs=1M skip=8 count=4 2>/dev/null | md5)\"
echo \"HOST-PLAIN-MD5=$(dd if=plain.img bs=1M skip=8 count=4 2>/dev/null | md5)\"";

fn lines_with<'a>(out: &'a Outcome, prefix: &str) -> Vec<&'a str> {
    out.guest_output()
        .lines()
        .filter_map(|line| line.trim().strip_prefix(prefix))
        .collect()
}

#[test]
fn protected_disk_and_rng_are_translated_and_the_plain_disk_is_not() {
    let Some(out) = Scenario::new("iommu_protected_and_plain")
        .host_setup(TWO_DISKS)
        .warden_args([
            "--cpus",
            "1",
            "--memory",
            "size=512M",
            "--disk",
            "path=protected.img,iommu=on",
            "--disk",
            "path=plain.img",
            "--rng",
            "iommu=on",
        ])
        .guest_script(GUEST_CHECKS)
        .host_check(HOST_CHECK)
        .timeout(Duration::from_secs(180))
        .run()
    else {
        return;
    };
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert_eq!(
        lines_with(&out, "IOMMU-PCI "),
        [
            "0000:00:00.0 0x8086 0x0d57",
            "0000:00:01.0 0x1af4 0x1057",
            "0000:00:02.0 0x1af4 0x1043",
            "0000:00:03.0 0x1af4 0x1042",
            "0000:00:04.0 0x1af4 0x1042",
            "0000:00:05.0 0x1af4 0x1044",
        ],
        "virtio-iommu at 00:01.0, then console, disks, rng\n{out}"
    );
    let mut groups: Vec<&str> = lines_with(&out, "IOMMU-GROUP ")
        .into_iter()
        .filter_map(|line| line.split_once(' ').map(|(_, devices)| devices))
        .collect();
    groups.sort_unstable();
    assert_eq!(
        groups,
        ["0000:00:03.0", "0000:00:05.0"],
        "one group per protected device, none for the plain disk or console\n{out}"
    );
    assert_eq!(out.marker("IOMMU-VIOT"), Some("parsed"), "{out}");
    assert_eq!(out.marker("IOMMU-DRIVER"), Some("bound"), "{out}");
    assert_eq!(
        out.marker("IOMMU-PAGE-MASK"),
        Some("0x1000"),
        "anonymous RAM offers 4 KiB IOMMU pages only\n{out}"
    );
    assert_eq!(out.marker("IOMMU-RNG-BYTES"), Some("64"), "{out}");

    assert_eq!(
        out.marker("IOMMU-PROTECTED-DISK-PCI"),
        Some("0000:00:03.0"),
        "{out}"
    );
    assert_eq!(
        out.marker("IOMMU-PLAIN-DISK-PCI"),
        Some("0000:00:04.0"),
        "{out}"
    );
    let protected = out
        .marker("HOST-PROTECTED-PAYLOAD-MD5")
        .expect("host checksum");
    let plain = out.marker("HOST-PLAIN-PAYLOAD-MD5").expect("host checksum");
    assert_ne!(protected, plain);
    assert_eq!(
        out.marker("GUEST-PROTECTED-READ-MD5"),
        Some(protected),
        "{out}"
    );
    assert_eq!(out.marker("GUEST-PLAIN-READ-MD5"), Some(plain), "{out}");
    let written = out.marker("GUEST-WRITTEN-MD5").expect("guest checksum");
    assert_eq!(
        out.marker("GUEST-PROTECTED-REREAD-MD5"),
        Some(written),
        "{out}"
    );
    assert_eq!(out.marker("HOST-PROTECTED-MD5"), Some(written), "{out}");
    assert_eq!(out.marker("HOST-PLAIN-MD5"), Some(written), "{out}");

    assert_eq!(out.warden_exit, Some(0), "{out}");
    // The report on SIGUSR1 may land in the middle of a line of the guest's console.
    let totals: Vec<&str> = out
        .guest_output()
        .lines()
        .filter_map(|line| line.split_once("warden: virtio-iommu total: "))
        .map(|(_, total)| total)
        .collect();
    assert_eq!(
        totals.len(),
        2,
        "statistics on SIGUSR1 while the guest ran, and on exit\n{out}"
    );
    let total = totals[1];
    let maps: u64 = total
        .split(" maps")
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable statistics line {total:?}"));
    assert!(
        maps > 100,
        "a 16 MiB workload needs many MAP requests: {total}\n{out}"
    );
    assert!(
        total.contains(" 0 faults"),
        "the guest's own DMA never faults: {total}\n{out}"
    );
}

/// Guest RAM on hugetlbfs: the IOMMU offers 2 MiB pages. In the same host, warden boots with
/// `hugepages=on` too, and refuses clearly once no huge pages are reserved.
#[test]
fn huge_page_ram_offers_2m_iommu_pages() {
    let Some(out) = Scenario::new("iommu_hugepages")
        .host_setup(
            "echo 300 >/proc/sys/vm/nr_hugepages
echo \"HOST-HUGEPAGES=$(cat /proc/sys/vm/nr_hugepages)\"
dd if=/dev/zero of=disk.img bs=1M count=8 2>/dev/null",
        )
        .warden_args([
            "--memory",
            "size=512M,file=/dev/hugepages",
            "--disk",
            "path=disk.img,iommu=on",
        ])
        .guest_script(
            "wait_for /dev/vda
echo \"HUGE-PAGE-MASK=$(dmesg | sed -n 's/.*virtio_iommu.*page mask: //p')\"
echo \"HUGE-DISK-BYTES=$(head -c 65536 /dev/vda | wc -c)\"",
        )
        .host_check(
            "\"$WARDEN\" --memory size=512M,hugepages=on --disk path=disk.img,iommu=on \
    --kernel \"$L2_KERNEL\" --initramfs \"$L2_INITRAMFS\" --cmdline 'console=ttyS0 panic=-1' \
    >memfd-boot.log 2>&1 && echo MEMFD-EXIT=0 || echo MEMFD-EXIT=$?
echo \"MEMFD-PAGE-MASK=$(sed -n 's/^HUGE-PAGE-MASK=//p' memfd-boot.log | tr -d '\\r')\"
echo 0 >/proc/sys/vm/nr_hugepages
\"$WARDEN\" --memory size=512M,hugepages=on --kernel \"$L2_KERNEL\" >refused.log 2>&1 \
    && echo REFUSED-EXIT=0 || echo REFUSED-EXIT=$?
echo \"REFUSED-LINES=$(wc -l <refused.log)\"
echo \"REFUSED-MESSAGE=$(cat refused.log)\"",
        )
        .timeout(Duration::from_secs(180))
        .run()
    else {
        return;
    };
    assert_eq!(out.marker("HOST-HUGEPAGES"), Some("300"), "{out}");
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert_eq!(
        out.marker("HUGE-PAGE-MASK"),
        Some("0x201000"),
        "hugetlbfs RAM: 4 KiB and 2 MiB IOMMU pages\n{out}"
    );
    assert_eq!(out.marker("HUGE-DISK-BYTES"), Some("65536"), "{out}");
    assert_eq!(out.warden_exit, Some(0), "{out}");
    assert_eq!(
        out.marker("MEMFD-EXIT"),
        Some("0"),
        "hugepages=on boots\n{out}"
    );
    assert_eq!(out.marker("MEMFD-PAGE-MASK"), Some("0x201000"), "{out}");
    assert_eq!(out.marker("REFUSED-EXIT"), Some("2"), "{out}");
    assert_eq!(
        out.marker("REFUSED-LINES"),
        Some("1"),
        "one line of error\n{out}"
    );
    let message = out.marker("REFUSED-MESSAGE").unwrap_or_default();
    assert!(
        message.starts_with("warden: memory:") && message.contains("/proc/sys/vm/nr_hugepages"),
        "the refusal names the section and the remedy: {message:?}\n{out}"
    );
}
