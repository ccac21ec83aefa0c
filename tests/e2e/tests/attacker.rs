//! The seed's protection promise, tested by an attacker inside the guest: a protected disk is
//! bound to vfio-pci in L2 and driven from user space by `attacker` (src/bin/attacker.rs),
//! which maps one buffer and then points the device everywhere else: an IOVA never mapped,
//! the guest-physical address of a canary page, an IOVA it just unmapped, the MSI window, 4 GiB
//! lengths, looping and overlapping chains. Every access outside the grant must be refused,
//! reported to the guest as a fault and counted by warden, the canary and the disk must be
//! unchanged, warden must keep serving its other protected disk with real traffic, and its
//! memory must stay bounded.

use e2e::{Outcome, Scenario};
use std::time::Duration;

/// The attacked disk starts with a pattern the tool knows; the other disk is random data.
/// A background job samples warden's peak RSS until it exits.
const HOST_SETUP: &str = r#"dd if=/dev/zero of=attack.img bs=1M count=8 2>/dev/null
yes WARDEN-ATTACK-DISK | head -c 65536 | dd of=attack.img conv=notrunc 2>/dev/null
echo "HOST-ATTACK-MD5=$(md5sum <attack.img | cut -d' ' -f1)"
dd if=/dev/urandom of=other.img bs=1M count=96 2>/dev/null
echo "HOST-OTHER-MD5=$(head -c 33554432 other.img | md5sum | cut -d' ' -f1)"
(
  set +e
  while ! pid=$(pidof warden); do usleep 100000; done
  while kill -0 "$pid" 2>/dev/null; do
    sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' /proc/$pid/status >hwm.next 2>/dev/null &&
      [ -s hwm.next ] && mv hwm.next hwm.txt
    usleep 200000
  done
) >/dev/null 2>&1 &"#;

/// Bind the attacked disk (found by its serial, the image's name) to vfio-pci, attack, then
/// move 32 MiB from and 3 x 16 MiB to the other disk, each write read back after the page
/// cache is dropped.
const GUEST: &str = r#"
wait_for /dev/vda 60
wait_for /dev/vdb 60
for b in /sys/block/vd?; do
    case "$(cat $b/serial)" in
        attack.img) dev=$(readlink -f $b/device/..) ;;
        other.img) other=/dev/${b##*/} ;;
    esac
done
bdf=${dev##*/}
echo "ATTACK-GROUP-DEVICES=$(ls "$dev/iommu_group/devices" | tr '\n' ' ')"
echo vfio-pci >$dev/driver_override
echo $bdf >$dev/driver/unbind
echo $bdf >/sys/bus/pci/drivers_probe
echo "ATTACK-DRIVER=$(basename "$(readlink $dev/driver)")"
# The virtio-iommu offers no interrupt remapping on x86, which type1 insists on unless told.
echo 1 >/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts
attacker $dev
echo "ATTACK-EXIT=$?"
echo "ATTACK-KERNEL-FAULTS=$(dmesg | grep -i virtio_iommu | grep -ci fault)"
dmesg | grep -i virtio_iommu | grep -i fault | head -4

echo "OTHER-READ-MD5=$(head -c 33554432 $other | md5sum | cut -d' ' -f1)"
for round in 1 2 3; do
    dd if=/dev/urandom of=/tmp/round.bin bs=1M count=16 2>/dev/null
    echo "OTHER-WROTE-$round-MD5=$(md5sum </tmp/round.bin | cut -d' ' -f1)"
    dd if=/tmp/round.bin of=$other bs=1M seek=$((16 + 16 * round)) conv=notrunc,fsync 2>/dev/null
    echo 3 >/proc/sys/vm/drop_caches
    echo "OTHER-READBACK-$round-MD5=$(dd if=$other bs=1M skip=$((16 + 16 * round)) count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
done
"#;

/// What the host's images hold after the guest is gone, and warden's peak RSS.
const HOST_CHECK: &str = r#"echo "HOST-ATTACK-AFTER-MD5=$(md5sum <attack.img | cut -d' ' -f1)"
for round in 1 2 3; do
    echo "HOST-OTHER-$round-MD5=$(dd if=other.img bs=1M skip=$((16 + 16 * round)) count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
done
echo "HOST-WARDEN-HWM-KB=$(cat hwm.txt)""#;

/// Guest RAM: warden's peak RSS may hold all of it, plus a bounded amount of its own.
const GUEST_RAM_MIB: u64 = 512;
const OWN_MEMORY_BOUND_MIB: u64 = 256;

/// The checks the attacker runs, each of which must come back `refused`.
const REFUSED: [&str; 8] = [
    "NEVER-MAPPED-READ",
    "NEVER-MAPPED-WRITE",
    "CANARY-READ",
    "CANARY-WRITE",
    "MSI-WINDOW-READ",
    "AFTER-UNMAP-READ",
    "GIGABYTES-READ",
    "LOOPED-CHAIN",
];
/// Of those, the ones that point outside the grant (the first six): each must reach the
/// IOMMU's translation and fault there, once. The other two fail before any address is
/// translated (4 GiB is beyond the disk; the looped chain has no status byte), and the guest's
/// own DMA on the other disk never faults, so the totals are exactly six.
const TRANSLATION_FAULTS: u64 = 6;

fn verdict<'a>(out: &'a Outcome, check: &str) -> &'a str {
    out.marker(&format!("ATTACK-{check}"))
        .and_then(|v| v.split(' ').next())
        .unwrap_or_else(|| panic!("the attacker did not report {check}\n{out}"))
}

#[test]
fn a_user_space_driver_in_the_guest_reaches_nothing_outside_its_mappings() {
    let Some(out) = Scenario::new("attacker")
        .host_setup(HOST_SETUP)
        .warden_args([
            "--memory",
            &format!("size={GUEST_RAM_MIB}M"),
            "--disk",
            "path=attack.img,iommu=on",
            "--disk",
            "path=other.img,iommu=on",
        ])
        .guest_tool("attacker")
        .guest_script(GUEST)
        .host_check(HOST_CHECK)
        .timeout(Duration::from_secs(400))
        .run()
    else {
        return;
    };
    assert_eq!(out.marker("ATTACK-DRIVER"), Some("vfio-pci"), "{out}");
    assert_eq!(out.marker("ATTACK-ERROR"), None, "{out}");
    assert_eq!(out.marker("ATTACK-EXIT"), Some("0"), "{out}");
    assert_eq!(verdict(&out, "BASELINE"), "ok", "{out}");
    for check in REFUSED {
        assert_eq!(verdict(&out, check), "refused", "{check}\n{out}");
    }
    assert_eq!(verdict(&out, "OVERLAPPING-BUFFERS"), "survived", "{out}");
    assert_eq!(verdict(&out, "CANARY"), "intact", "{out}");
    assert_eq!(verdict(&out, "SECTOR-8"), "intact", "{out}");
    assert_eq!(verdict(&out, "RECOVERED"), "ok", "{out}");
    assert_eq!(
        out.marker("HOST-ATTACK-AFTER-MD5"),
        out.marker("HOST-ATTACK-MD5"),
        "no refused write reached the attacked image\n{out}"
    );

    let kernel_faults: u64 = out
        .marker("ATTACK-KERNEL-FAULTS")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert_eq!(
        kernel_faults, TRANSLATION_FAULTS,
        "the guest kernel logs a fault event for each\n{out}"
    );
    let faults = out.iommu_counter("faults");
    assert_eq!(faults, TRANSLATION_FAULTS, "warden counts each\n{out}");

    // Still serving the other protected disk, with real traffic both ways.
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert_eq!(out.warden_exit, Some(0), "{out}");
    assert!(out.marker("HOST-OTHER-MD5").is_some(), "{out}");
    assert_eq!(
        out.marker("OTHER-READ-MD5"),
        out.marker("HOST-OTHER-MD5"),
        "{out}"
    );
    for round in 1..=3 {
        let wrote = out.marker(&format!("OTHER-WROTE-{round}-MD5"));
        assert!(wrote.is_some(), "round {round}\n{out}");
        assert_eq!(
            out.marker(&format!("OTHER-READBACK-{round}-MD5")),
            wrote,
            "{out}"
        );
        assert_eq!(
            out.marker(&format!("HOST-OTHER-{round}-MD5")),
            wrote,
            "{out}"
        );
    }

    let hwm_mib = out
        .marker("HOST-WARDEN-HWM-KB")
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no RSS sample\n{out}"))
        >> 10;
    eprintln!("warden peak RSS {hwm_mib} MiB, {faults} faults counted");
    assert!(
        hwm_mib <= GUEST_RAM_MIB + OWN_MEMORY_BOUND_MIB,
        "warden's peak RSS {hwm_mib} MiB\n{out}"
    );
}
