//! Several PCI segments on the real Debian image: a machine of two segments, segment 0 with
//! the root disk and a protected data disk, segment 1 with a plain disk and a protected one.
//! The guest must see segment 1 (`lspci -D`: `0001:00:..`), put only the protected disks in
//! IOMMU groups, and read and write each data disk (32 MiB read whole, 16 MiB written with
//! O_DIRECT), the checksums compared with the images on the host. Then, through the API, a
//! plain disk is hot-added on segment 1 and a protected one on segment 0, and the guest drives
//! both the same way. (The root disk is plain: protected disks probe once the virtio-iommu
//! has, so a plain one on segment 1 would take `vda`, the name the image's command line boots
//! from.)

use e2e::Scenario;
use std::time::Duration;

const IMAGES: [&str; 5] = ["prot0", "plain1", "prot1", "hotplain1", "hotprot0"];

/// The images, then the API's side: once the guest says so (`HOTPLUG` in the first sector
/// of `signal.img`), a plain disk hot-added on segment 1 and a protected one on segment 0.
const HOST_SETUP: &str = r#"for image in prot0 plain1 prot1 hotplain1 hotprot0; do
    dd if=/dev/urandom of=$image.img bs=1M count=32 2>/dev/null
    echo "SEG-HOST-$image=$(sha256sum <$image.img | cut -c1-64)"
done
dd if=/dev/zero of=signal.img bs=1M count=1 2>/dev/null
(
  set +e
  n=0
  until [ "$(head -c 7 signal.img)" = HOTPLUG ]; do n=$((n + 1)); [ $n -gt 3000 ] && exit 1; usleep 100000; done
  "$API_CLIENT" api.sock PUT /api/v1/vm.add-disk '{"path":"hotplain1.img","pci_segment":1,"id":"hotplain1"}' >add-hotplain1.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.add-disk '{"path":"hotprot0.img","iommu":true,"id":"hotprot0"}' >add-hotprot0.txt
) >/dev/null 2>&1 &"#;

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
drive() {
    name=$(cat /sys/block/$1/serial)
    echo "SEG-READ-${name%.img}=$(sha256sum </dev/$1 | cut -c1-64)"
    head -c 16M /dev/urandom >/tmp/w
    echo "SEG-WROTE-${name%.img}=$(sha256sum </tmp/w | cut -c1-64)"
    dd if=/tmp/w of=/dev/$1 bs=1M seek=16 oflag=direct conv=fsync 2>/dev/null
}
for d in $prot0 $plain $prot; do drive $d; done
for b in /sys/block/vd?; do [ "$(cat $b/serial)" = signal.img ] && signal=${b##*/}; done
printf HOTPLUG | dd of=/dev/$signal bs=512 count=1 conv=sync oflag=direct 2>/dev/null
n=0
until [ -n "$hotplain" ] && [ -n "$hotprot" ]; do
    for b in /sys/block/vd?; do
        case "$(cat $b/serial)" in
            hotplain1.img) hotplain=${b##*/} ;;
            hotprot0.img) hotprot=${b##*/} ;;
        esac
    done
    n=$((n + 1)); [ $n -gt 600 ] && break
    sleep 0.2
done
echo "SEG-HOTPLAIN-PCI=$(pci $hotplain)"
echo "SEG-HOTPROT-PCI=$(pci $hotprot)"
echo "SEG-HOTPLAIN-GROUP=$(group $hotplain)"
echo "SEG-HOTPROT-GROUP=$(group $hotprot)"
drive $hotplain
drive $hotprot
echo SEG-DONE
"#;

const HOST_CHECK: &str = r#"for image in prot0 plain1 prot1 hotplain1 hotprot0; do
    echo "SEG-HOST-AFTER-$image=$(dd if=$image.img bs=1M skip=16 count=16 2>/dev/null | sha256sum | cut -c1-64)"
done
for f in add-hotplain1 add-hotprot0; do echo "API-REPLY $f $(cat $f.txt 2>/dev/null)"; done"#;

#[test]
fn a_second_pci_segment_holds_plain_and_protected_disks_at_boot_and_hot_plugged() {
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
            "--disk",
            "path=signal.img",
            "--api-socket",
            "path=api.sock",
        ])
        .guest_script(GUEST)
        .host_check(HOST_CHECK)
        .timeout(Duration::from_secs(600))
        .run()
    else {
        return;
    };
    let marker = |key: &str| out.required_marker(key).to_string();
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
    // Hot-plugged: the plain disk in segment 1's first plain hotplug slot, the protected one
    // in segment 0's first protected slot, in an IOMMU group of its own.
    let (status, added) = out.api_reply("add-hotplain1");
    assert_eq!(
        (status, &added["bdf"]),
        (200, &"0001:00:1c.0".into()),
        "{out}"
    );
    let (status, added) = out.api_reply("add-hotprot0");
    assert_eq!(
        (status, &added["bdf"]),
        (200, &"0000:00:18.0".into()),
        "{out}"
    );
    assert_eq!(marker("SEG-HOTPLAIN-PCI"), "0001:00:1c.0", "{out}");
    assert_eq!(marker("SEG-HOTPROT-PCI"), "0000:00:18.0", "{out}");
    assert_eq!(marker("SEG-HOTPLAIN-GROUP"), "", "{out}");
    assert_eq!(marker("SEG-HOTPROT-GROUP"), "0000:00:18.0", "{out}");
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
