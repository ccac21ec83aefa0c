//! Several PCI segments on the real Debian image: a machine of two segments, segment 0 with
//! the root disk and a protected data disk, segment 1 with a plain disk and a protected one.
//! The guest must see segment 1 (`lspci -D`: `0001:00:..`), put only the protected disks in
//! IOMMU groups, and read and write each data disk (32 MiB read whole, 16 MiB written with
//! O_DIRECT), the checksums compared with the images on the host. (The root disk is plain:
//! protected disks probe once the virtio-iommu has, so a plain one on segment 1 would take
//! `vda`, the name the image's command line boots from.)

use e2e::Scenario;
use std::time::Duration;

const IMAGES: [&str; 3] = ["prot0", "plain1", "prot1"];

const HOST_SETUP: &str = r#"for image in prot0 plain1 prot1; do
    dd if=/dev/urandom of=$image.img bs=1M count=32 2>/dev/null
    echo "SEG-HOST-$image=$(sha256sum <$image.img | cut -c1-64)"
done"#;

const GUEST: &str = r#"
for b in /sys/block/vd?; do
    case "$(cat $b/serial)" in
        prot0.img) prot0=${b##*/} ;;
        plain1.img) plain=${b##*/} ;;
        prot1.img) prot=${b##*/} ;;
    esac
done
pci() { basename "$(readlink -f /sys/block/$1/device/..)"; }
group() { ls "/sys/bus/pci/devices/$(pci $1)/iommu_group/devices" 2>/dev/null | tr '\n' ' '; }
echo "SEG-LSPCI=$(lspci -D | cut -d' ' -f1 | tr '\n' ' ')"
echo "SEG-ROOT-PCI=$(pci vda)"
echo "SEG-PROT0-PCI=$(pci $prot0)"
echo "SEG-PLAIN-PCI=$(pci $plain)"
echo "SEG-PROT-PCI=$(pci $prot)"
echo "SEG-ROOT-GROUP=$(group vda)"
echo "SEG-PROT0-GROUP=$(group $prot0)"
echo "SEG-PLAIN-GROUP=$(group $plain)"
echo "SEG-PROT-GROUP=$(group $prot)"
for d in $prot0 $plain $prot; do
    name=$(cat /sys/block/$d/serial)
    echo "SEG-READ-${name%.img}=$(sha256sum </dev/$d | cut -c1-64)"
    head -c 16M /dev/urandom >/tmp/w
    echo "SEG-WROTE-${name%.img}=$(sha256sum </tmp/w | cut -c1-64)"
    dd if=/tmp/w of=/dev/$d bs=1M seek=16 oflag=direct conv=fsync 2>/dev/null
done
echo SEG-DONE
"#;

const HOST_CHECK: &str = r#"for image in prot0 plain1 prot1; do
    echo "SEG-HOST-AFTER-$image=$(dd if=$image.img bs=1M skip=16 count=16 2>/dev/null | sha256sum | cut -c1-64)"
done"#;

#[test]
fn a_second_pci_segment_holds_plain_and_protected_disks_the_guest_drives() {
    let Some(out) = Scenario::new("pci_segments")
        .distro()
        .host_setup(HOST_SETUP)
        .warden_args([
            "--cpus",
            "1",
            "--memory",
            "size=512M",
            "--platform",
            "num_pci_segments=2",
            "--disk",
            "path=host-disk",
            "--disk",
            "path=prot0.img,iommu=on",
            "--disk",
            "path=plain1.img,pci_segment=1",
            "--disk",
            "path=prot1.img,pci_segment=1,iommu=on",
        ])
        .guest_script(GUEST)
        .host_check(HOST_CHECK)
        .timeout(Duration::from_secs(600))
        .run()
    else {
        return;
    };
    let marker = |key: &str| {
        out.marker(key)
            .unwrap_or_else(|| panic!("no {key}\n{out}"))
            .trim()
            .to_string()
    };
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    // Segment 1's devices from slot 1 on, in the configuration's order.
    assert_eq!(marker("SEG-PLAIN-PCI"), "0001:00:01.0", "{out}");
    assert_eq!(marker("SEG-PROT-PCI"), "0001:00:02.0", "{out}");
    assert!(marker("SEG-ROOT-PCI").starts_with("0000:00:"), "{out}");
    assert!(marker("SEG-PROT0-PCI").starts_with("0000:00:"), "{out}");
    let lspci = marker("SEG-LSPCI");
    for bdf in ["0000:00:01.0", "0001:00:01.0", "0001:00:02.0"] {
        assert!(lspci.contains(bdf), "{bdf} in {lspci}\n{out}");
    }
    // Behind the IOMMU: the two protected disks, each alone in its group; the plain ones in
    // none.
    assert_eq!(marker("SEG-PROT0-GROUP"), marker("SEG-PROT0-PCI"), "{out}");
    assert_eq!(marker("SEG-PROT-GROUP"), "0001:00:02.0", "{out}");
    assert_eq!(marker("SEG-PLAIN-GROUP"), "", "{out}");
    assert_eq!(marker("SEG-ROOT-GROUP"), "", "{out}");
    for image in IMAGES {
        assert_eq!(
            marker(&format!("SEG-READ-{image}")),
            marker(&format!("SEG-HOST-{image}")),
            "{image} read whole\n{out}"
        );
        assert_eq!(
            marker(&format!("SEG-HOST-AFTER-{image}")),
            marker(&format!("SEG-WROTE-{image}")),
            "{image} written\n{out}"
        );
    }
    assert_eq!(out.warden_exit, Some(0), "{out}");
}
