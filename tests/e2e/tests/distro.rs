//! A real Linux distribution under warden (issue #11): the Debian 12 image of
//! guest/build-distro.sh, root file system on partition 3 of a disk behind the virtual IOMMU,
//! systemd as PID 1. Each boot checks as much as it can (a nested boot costs ~100 s): systemd's
//! state, the root device and its IOMMU group, the PCI layout, a file the guest writes, a clean
//! poweroff; a second boot shows the same image without the IOMMU.

use e2e::{Outcome, Scenario};
use std::time::Duration;

/// Where the guest writes its boot id, for the host to read back from the disk afterwards.
const WRITTEN: &str = "/root/warden-e2e-written";

/// What every boot of the image reports: systemd's view, the root file system, the PCI
/// functions (slot and vendor:device), the IOMMU groups. `is-system-running --wait` returns
/// once the boot transaction is done: this script's unit is Type=exec, so it doesn't hold it.
const SYSTEM_CHECKS: &str = r#"
echo "DISTRO-STATE=$(systemctl is-system-running --wait || true)"
echo "DISTRO-FAILED-UNITS=$(systemctl list-units --state=failed --no-legend --plain | wc -l)"
systemctl list-units --state=failed --no-legend --plain
echo "DISTRO-DEFAULT-TARGET=$(systemctl is-active "$(systemctl get-default)")"
echo "DISTRO-PID1=$(cat /proc/1/comm)"
echo "DISTRO-ROOT=$(findmnt -n -o SOURCE /)"
echo "DISTRO-PCI=$(lspci -n | awk '{ printf "%s %s,", $1, $3 }')"
echo "DISTRO-GROUPS=$(ls /sys/kernel/iommu_groups | wc -l)"
disk=$(basename "$(dirname "$(readlink -f /sys/block/vda/device)")")
echo "DISTRO-DISK-PCI=$disk"
"#;

/// The first boot's extra checks: the disk's IOMMU group, the network, the installed tools, and
/// a file written and synced for the host to find in the image.
const IOMMU_CHECKS: &str = r#"
echo "DISTRO-DISK-GROUP=$(ls /sys/bus/pci/devices/$disk/iommu_group/devices | tr '\n' ' ')"
n=0
until ip -4 -o addr show | grep -q ' 192.168.249.2/24 ' || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "DISTRO-NET=$(ip -4 -o addr show | awk '$4 == "192.168.249.2/24" { print $2 }')"
fio --version >/dev/null && iperf3 --version >/dev/null && ethtool --version >/dev/null &&
    lspci --version >/dev/null && echo DISTRO-TOOLS=present
token=$(cat /proc/sys/kernel/random/boot_id)
echo "$token" >/root/warden-e2e-written
sync
echo "DISTRO-WRITTEN=$token"
"#;

fn assert_system_is_up(out: &Outcome) {
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert_eq!(out.marker("DISTRO-PID1"), Some("systemd"), "{out}");
    assert_eq!(out.marker("DISTRO-STATE"), Some("running"), "{out}");
    assert_eq!(out.marker("DISTRO-FAILED-UNITS"), Some("0"), "{out}");
    assert_eq!(out.marker("DISTRO-DEFAULT-TARGET"), Some("active"), "{out}");
    assert_eq!(out.marker("DISTRO-ROOT"), Some("/dev/vda3"), "{out}");
    assert_eq!(
        out.warden_exit,
        Some(0),
        "the guest's poweroff must make warden exit 0\n{out}"
    );
}

#[test]
fn debian_boots_with_its_root_disk_behind_the_iommu() {
    let Some(out) = Scenario::new("debian_boots_with_its_root_disk_behind_the_iommu")
        .distro()
        .warden_args([
            "--cpus",
            "1",
            "--memory",
            "size=512M",
            "--disk",
            "path=host-disk,iommu=on",
            "--net",
            "tap=,mac=,ip=192.168.249.1,mask=255.255.255.0",
            "--rng",
            "iommu=on",
        ])
        .guest_script(&format!("{SYSTEM_CHECKS}{IOMMU_CHECKS}"))
        .timeout(Duration::from_secs(400))
        .run()
    else {
        return;
    };
    assert_system_is_up(&out);
    // README "The guest sees": host bridge, virtio-iommu, then console (present by default),
    // disk, net, rng.
    assert_eq!(
        out.marker("DISTRO-PCI"),
        Some(
            "00:00.0 8086:0d57,00:01.0 1af4:1057,00:02.0 1af4:1043,00:03.0 1af4:1042,\
             00:04.0 1af4:1041,00:05.0 1af4:1044,"
        ),
        "{out}"
    );
    assert_eq!(out.marker("DISTRO-DISK-PCI"), Some("0000:00:03.0"), "{out}");
    // The disk's group holds the disk alone (the rng has a group of its own).
    assert_eq!(
        out.marker("DISTRO-DISK-GROUP"),
        Some("0000:00:03.0"),
        "{out}"
    );
    assert_eq!(out.marker("DISTRO-GROUPS"), Some("2"), "{out}");
    assert_eq!(out.marker("DISTRO-NET"), Some("enp0s4"), "{out}");
    assert_eq!(out.marker("DISTRO-TOOLS"), Some("present"), "{out}");
    let token = out
        .marker("DISTRO-WRITTEN")
        .expect("the guest wrote its file");
    let written = out.guest_file(WRITTEN);
    assert_eq!(
        written.as_deref().map(String::from_utf8_lossy).as_deref(),
        Some(format!("{token}\n").as_str()),
        "the file the guest wrote and synced is not in the image after warden exited\n{out}"
    );
}

#[test]
fn debian_boots_from_the_same_image_without_the_iommu() {
    let Some(out) = Scenario::new("debian_boots_from_the_same_image_without_the_iommu")
        .distro()
        .warden_args([
            "--cpus",
            "1",
            "--memory",
            "size=512M",
            "--disk",
            "path=host-disk",
        ])
        .guest_script(SYSTEM_CHECKS)
        .timeout(Duration::from_secs(400))
        .run()
    else {
        return;
    };
    assert_system_is_up(&out);
    // No virtio-iommu: slot 1 stays free, and nothing is in an IOMMU group.
    assert_eq!(
        out.marker("DISTRO-PCI"),
        Some("00:00.0 8086:0d57,00:02.0 1af4:1043,00:03.0 1af4:1042,00:04.0 1af4:1044,"),
        "{out}"
    );
    assert_eq!(out.marker("DISTRO-GROUPS"), Some("0"), "{out}");
    assert!(!out.guest_output().contains("virtio-iommu"), "{out}");
}
