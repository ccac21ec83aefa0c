//! The seed's protection promise, tested by an attacker inside the guest (`src/bin/attacker`),
//! one boot for every device path a guest can drive:
//! - a protected disk bound to vfio-pci in L2 and driven from user space, which maps one
//!   buffer and then points the device everywhere else: an IOVA never mapped, the
//!   guest-physical address of a canary page, an IOVA it just unmapped, the MSI window, 4 GiB
//!   lengths, looping and overlapping chains; then a long read into a buffer unmapped while
//!   the read is in flight, whose pages are reused as soon as the unmap returns;
//! - a protected virtio-net on each data path, the kernel's vhost-net and warden's own
//!   worker: first negotiated without ACCESS_PLATFORM (refused: the device does not go live),
//!   then properly, with frames to send and receive buffers outside its mappings; the host
//!   counts the frames each tap got, so a refused frame cannot have left unseen;
//! - a protected vsock: packets to send and receive buffers outside its mappings (a request
//!   it must not read goes unanswered; the reset owed for one it may read skips a buffer it
//!   must not write and lands in the next);
//! - a protected virtio-rng: request buffers outside its mappings, alone, after a mapped
//!   buffer in one chain, or running past the mapping's end, get nothing, all or nothing;
//! - a protected virtio-console printing to a host file: text outside its mappings, alone or
//!   chained after a mapped line, never reaches the file (which holds exactly the two lines
//!   printed from the mapping);
//! - a disk hot-added behind the IOMMU whose ring the attacker keeps full while it writes the
//!   eject register of its slot over and over: warden unplugs it anyway (its worker stops
//!   though the ring never empties), queues nothing per write, and its API keeps answering,
//!   a later hot-add included.
//!
//! Every access outside a grant must be refused, reported to the guest as a fault and counted
//! by warden, the canary and the disk must be unchanged, warden must keep serving its other
//! protected disk with real traffic (during the flood too), and its memory must stay bounded.

use e2e::{Outcome, Scenario};
use std::time::Duration;

/// The attacked disk starts with a pattern the tool knows; the other disk is random data.
/// A background job samples warden's peak RSS until it exits.
const HOST_SETUP: &str = r#"dd if=/dev/zero of=attack.img bs=1M count=8 2>/dev/null
dd if=/dev/zero of=flood.img bs=1M count=8 2>/dev/null
dd if=/dev/zero of=after.img bs=1M count=8 2>/dev/null
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
) >/dev/null 2>&1 &
# Frames for the net devices' receive queues: ARP requests for an address behind each tap.
for peer in 192.168.253.2 192.168.254.2; do
  (
    set +e
    while :; do ping -c 1 -W 1 $peer >/dev/null 2>&1 || usleep 200000; done
  ) >/dev/null 2>&1 &
done
# The frames each net device sent, as its tap counts them, until warden is gone.
for tap in atkvhost0 atkown0; do
  (
    set +e
    stats=/sys/class/net/$tap/statistics/rx_packets
    while ! [ -e $stats ]; do usleep 100000; done
    while [ -e $stats ]; do
      cat $stats >$tap.next 2>/dev/null && [ -s $tap.next ] && mv $tap.next $tap.txt
      usleep 200000
    done
  ) >/dev/null 2>&1 &
done
# The API's side: once the guest is ready, hot-add the disk it floods; while it floods, time
# vm.info (in hundredths of a second, from /proc/uptime) and note whether the disk is listed;
# once the flood is over, hot-add another disk.
(
  set +e
  now() { cut -d' ' -f1 /proc/uptime | tr -d .; }
  signal() { dd if=other.img bs=512 skip=$((95 * 2048 + $1)) count=1 2>/dev/null | head -c $2; }
  n=0
  until [ "$(signal 0 13)" = READY-HOTPLUG ]; do n=$((n + 1)); [ $n -gt 3000 ] && exit 1; usleep 100000; done
  "$API_CLIENT" api.sock PUT /api/v1/vm.add-disk '{"path":"flood.img","iommu":true,"id":"flood"}' >add-flood.txt
  max=0
  until [ "$(signal 1 10)" = FLOOD-DONE ]; do
    start=$(now)
    "$API_CLIENT" api.sock GET /api/v1/vm.info >info-flood.txt
    took=$(($(now) - start))
    [ $took -gt $max ] && max=$took
    grep -q '"flood"' info-flood.txt && echo listed >flood-listed.txt
    n=$((n + 1)); [ $n -gt 6000 ] && break
    usleep 500000
  done
  echo $max >api-max.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.info >info-after-flood.txt
  start=$(now)
  "$API_CLIENT" api.sock PUT /api/v1/vm.add-disk '{"path":"after.img","iommu":true,"id":"after"}' >add-after.txt
  echo $(($(now) - start)) >add-after-took.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.info >info-after-add.txt
) >/dev/null 2>&1 &"#;

/// Bind the attacked disk (found by its serial, the image's name) to vfio-pci and attack it,
/// then the vhost-net; then tell the host to hot-add the disk to flood, flood it (ejecting its
/// slot meanwhile) while moving 32 MiB from and 3 x 16 MiB to the other disk, each write read
/// back after the page cache is dropped. Every report line is also kept in a file and printed
/// again at the end, when warden is quiet: its log lines share the console with the guest's
/// serial output and can cut a line printed while it logs.
const GUEST: &str = r#"
report=/tmp/report.txt
say() { echo "$*" | tee -a $report; }
# Runs a tool, keeps its output in the report; its exit status in $rc.
keep() { "$@" >/tmp/tool.txt 2>&1 && rc=0 || rc=$?; tee -a $report </tmp/tool.txt; }
wait_for /dev/vda 60
wait_for /dev/vdb 60
for b in /sys/block/vd?; do
    case "$(cat $b/serial)" in
        attack.img) dev=$(readlink -f $b/device/..) ;;
        other.img) other=/dev/${b##*/} ;;
    esac
done
# Hands the PCI device at sysfs path $1 to vfio-pci.
to_vfio() {
    echo vfio-pci >$1/driver_override
    if [ -e $1/driver ]; then echo ${1##*/} >$1/driver/unbind; fi
    echo ${1##*/} >/sys/bus/pci/drivers_probe
}
say "ATTACK-GROUP-DEVICES=$(ls "$dev/iommu_group/devices" | tr '\n' ' ')"
to_vfio $dev
say "ATTACK-DRIVER=$(basename "$(readlink $dev/driver)")"
# The virtio-iommu offers no interrupt remapping on x86, which type1 insists on unless told.
echo 1 >/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts
keep attacker blk $dev
say "ATTACK-EXIT=$rc"
faults() { dmesg | grep -i virtio_iommu | grep -ci fault; }
say "ATTACK-KERNEL-FAULTS=$(faults)"
dmesg | grep -i virtio_iommu | grep -i fault | head -4
# Its reads unmapped while in flight, after the faults are counted: how many of them fault
# depends on who wins each race.
keep attacker blk-unmap-race $dev
say "ATTACK-RACE-EXIT=$rc"

# Hands the device at sysfs path $3 to vfio-pci and runs `attacker $2` on it; reports
# ATTACK-$1-DRIVER, -EXIT and the guest kernel's fault count after it, -KERNEL-FAULTS.
attack() {
    to_vfio $3
    say "ATTACK-$1-DRIVER=$(basename "$(readlink $3/driver)")"
    keep attacker $2 $3
    say "ATTACK-$1-EXIT=$rc"
    say "ATTACK-$1-KERNEL-FAULTS=$(faults)"
}
# The sysfs path of the PCI device whose vendor:device is $1 (the last, if several).
by_id() {
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat $d/vendor):$(cat $d/device)" = $1 ]; then found=$d; fi
    done
    echo $found
}
# The net devices, told apart by their MAC addresses while the guest's driver has them.
for d in /sys/bus/pci/devices/*; do
    case "$(cat $d/virtio*/net/*/address 2>/dev/null)" in
        52:54:00:12:34:99) net=$d ;;
        52:54:00:12:34:98) own=$d ;;
    esac
done
attack NET net $net
attack OWN-NET net-warden $own
# Modern virtio ids: vsock 1af4:1053, rng 1af4:1044, console 1af4:1043.
attack VSOCK vsock $(by_id 0x1af4:0x1053)
attack RNG rng $(by_id 0x1af4:0x1044)
attack CONSOLE console $(by_id 0x1af4:0x1043)

# Signals to the host, in the other disk's 95th MiB, written through to the image.
signal() { printf $2 | dd of=$other bs=512 seek=$((95 * 2048 + $1)) count=1 conv=sync,notrunc oflag=direct 2>/dev/null; }
signal 0 READY-HOTPLUG
n=0
until flood=$(grep -l flood.img /sys/block/vd*/serial 2>/dev/null); do
    n=$((n + 1)); [ $n -gt 600 ] && break
    usleep 100000
done
flood=$(readlink -f ${flood%/serial}/device/..)
slot=$((0x$(echo ${flood##*/} | cut -d: -f3 | cut -d. -f1)))
say "ATTACK-FLOOD-DEVICE=${flood##*/} slot $slot"
to_vfio $flood
attacker flood $flood 20 6 $slot >/tmp/flood.txt 2>&1 &
flooding=$!

say "OTHER-READ-MD5=$(head -c 33554432 $other | md5sum | cut -d' ' -f1)"
for round in 1 2 3; do
    dd if=/dev/urandom of=/tmp/round.bin bs=1M count=16 2>/dev/null
    say "OTHER-WROTE-$round-MD5=$(md5sum </tmp/round.bin | cut -d' ' -f1)"
    dd if=/tmp/round.bin of=$other bs=1M seek=$((16 + 16 * round)) conv=notrunc,fsync 2>/dev/null
    echo 3 >/proc/sys/vm/drop_caches
    say "OTHER-READBACK-$round-MD5=$(dd if=$other bs=1M skip=$((16 + 16 * round)) count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
done
status=0
wait $flooding || status=$?
say "ATTACK-FLOOD-EXIT=$status"
tee -a $report </tmp/flood.txt
signal 1 FLOOD-DONE
# The host hot-adds another disk now (into the slot the guest still believes taken).
sleep 5
echo ATTACK-REPORT-AGAIN
cat $report
"#;

/// What the host's images hold after the guest is gone, and warden's peak RSS.
const HOST_CHECK: &str = r#"echo "HOST-ATTACK-AFTER-MD5=$(md5sum <attack.img | cut -d' ' -f1)"
for round in 1 2 3; do
    echo "HOST-OTHER-$round-MD5=$(dd if=other.img bs=1M skip=$((16 + 16 * round)) count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
done
echo "HOST-WARDEN-HWM-KB=$(cat hwm.txt)"
echo "HOST-CONSOLE-BYTES=$(wc -c <console.out)"
echo "HOST-CONSOLE-LINES=$(grep -c -e WARDEN-CONSOLE-BASELINE -e WARDEN-CONSOLE-RECOVERED console.out)"
echo "HOST-CONSOLE-CANARY-BYTES=$(tr -dc '\245' <console.out | wc -c)"
echo "HOST-VHOST-TAP-FRAMES=$(cat atkvhost0.txt 2>/dev/null)"
echo "HOST-OWN-TAP-FRAMES=$(cat atkown0.txt 2>/dev/null)"
echo "HOST-API-MAX-CS=$(cat api-max.txt 2>/dev/null)"
echo "HOST-FLOOD-LISTED=$(cat flood-listed.txt 2>/dev/null)"
echo "HOST-ADD-AFTER-CS=$(cat add-after-took.txt 2>/dev/null)"
for f in add-flood info-after-flood add-after info-after-add; do
  echo "API-REPLY $f $(cat $f.txt 2>/dev/null)"
done"#;

/// The frames each net device may have sent: the baseline and the one after the attacks.
const NET_FRAMES_SENT: u64 = 2;

/// One device the guest script's `attack` ran against: the name its run reported under, the
/// prefix of its checks, and what each check must come back as.
struct DeviceAttack {
    run: &'static str,
    prefix: &'static str,
    /// Checks that must come back `refused`.
    refused: &'static [&'static str],
    /// Checks that must come back `ok`.
    ok: &'static [&'static str],
    /// The check of the canary page after the attacks, which must come back `intact`.
    canary: &'static str,
    /// Faults the guest kernel logs for the device at least: one per refused check that
    /// reaches the IOMMU (a refused negotiation does not).
    faults_at_least: u64,
}

/// Both net data paths' checks: the negotiation without ACCESS_PLATFORM is refused before any
/// address is translated; each other refused access faults at least once (vhost-net asks
/// again as frames keep coming).
const NET_REFUSED: &[&str] = &[
    "WITHOUT-ACCESS-PLATFORM",
    "NEVER-MAPPED-TX",
    "CANARY-TX",
    "CANARY-RX",
];
const NET_OK: &[&str] = &["BASELINE-TX", "BASELINE-RX", "RECOVERED", "RECOVERED-TX"];

/// The devices after the disk, in the order the guest script attacks them (each one's faults
/// come on top of those before it).
const DEVICE_ATTACKS: [DeviceAttack; 5] = [
    DeviceAttack {
        run: "NET",
        prefix: "VHOST",
        refused: NET_REFUSED,
        ok: NET_OK,
        canary: "CANARY",
        faults_at_least: 3,
    },
    DeviceAttack {
        run: "OWN-NET",
        prefix: "WARDEN-NET",
        refused: NET_REFUSED,
        ok: NET_OK,
        canary: "CANARY",
        faults_at_least: 3,
    },
    // Packets it must not read are not answered, buffers it must not write stay as they
    // were, and what it owes the guest waits for a buffer it may write.
    DeviceAttack {
        run: "VSOCK",
        prefix: "VSOCK",
        refused: &["NEVER-MAPPED-TX", "LURE-TX", "NEVER-MAPPED-RX", "CANARY-RX"],
        ok: &["BASELINE", "RECOVERED"],
        canary: "CANARY",
        faults_at_least: 4,
    },
    // Nothing delivered outside the grant, not even into the mapped part of a chain that
    // also reaches outside it.
    DeviceAttack {
        run: "RNG",
        prefix: "RNG",
        refused: &["NEVER-MAPPED", "CANARY", "HALF-CANARY", "PAST-MAPPING"],
        ok: &["BASELINE", "RECOVERED"],
        canary: "CANARY-PAGE",
        faults_at_least: 4,
    },
    // Each refused chain comes back; the host's file tells what was printed.
    DeviceAttack {
        run: "CONSOLE",
        prefix: "CONSOLE",
        refused: &["NEVER-MAPPED", "CANARY", "HALF-CANARY"],
        ok: &["BASELINE", "RECOVERED"],
        canary: "CANARY-PAGE",
        faults_at_least: 3,
    },
];
/// What the console may have printed: its baseline and recovered lines, and nothing else.
const CONSOLE_PRINTED: &str = "WARDEN-CONSOLE-BASELINE\nWARDEN-CONSOLE-RECOVERED\n";
/// Longest a `vm.info` may take while the guest floods a ring, in hundredths of a second.
const API_ANSWER_CS: u64 = 500;

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

/// A number the run reported, 0 if it did not.
fn count(out: &Outcome, key: &str) -> u64 {
    out.marker(key).and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn verdict<'a>(out: &'a Outcome, check: &str) -> &'a str {
    out.marker(&format!("ATTACK-{check}"))
        .and_then(|v| v.split(' ').next())
        .unwrap_or_else(|| panic!("the attacker did not report {check}\n{out}"))
}

/// Checks what the guest script's `attack` reported for one device; returns the guest
/// kernel's fault count after it, which must be at least `faults_before` plus the device's.
fn check_device_attack(out: &Outcome, attack: &DeviceAttack, faults_before: u64) -> u64 {
    let DeviceAttack { run, prefix, .. } = attack;
    assert_eq!(
        out.marker(&format!("ATTACK-{run}-DRIVER")),
        Some("vfio-pci"),
        "{out}"
    );
    assert_eq!(
        out.marker(&format!("ATTACK-{run}-EXIT")),
        Some("0"),
        "{out}"
    );
    let expected = [("refused", attack.refused), ("ok", attack.ok)];
    for (want, checks) in expected {
        for check in checks {
            let check = format!("{prefix}-{check}");
            assert_eq!(verdict(out, &check), want, "{check}\n{out}");
        }
    }
    let canary = format!("{prefix}-{}", attack.canary);
    assert_eq!(verdict(out, &canary), "intact", "{out}");
    let faults = count(out, &format!("ATTACK-{run}-KERNEL-FAULTS"));
    assert!(
        faults >= faults_before + attack.faults_at_least,
        "the guest kernel logs {prefix}'s faults too: {faults}\n{out}"
    );
    faults
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
            "--net",
            "tap=atkvhost0,mac=52:54:00:12:34:99,ip=192.168.253.1,iommu=on,vhost=on",
            "--net",
            "tap=atkown0,mac=52:54:00:12:34:98,ip=192.168.254.1,iommu=on",
            "--vsock",
            "cid=3,socket=v.sock,iommu=on",
            "--rng",
            "iommu=on",
            "--console",
            "file=console.out,iommu=on",
            "--api-socket",
            "path=api.sock",
        ])
        .guest_tool("attacker")
        .guest_script(GUEST)
        .host_check(HOST_CHECK)
        .timeout(Duration::from_secs(600))
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

    let kernel_faults = count(&out, "ATTACK-KERNEL-FAULTS");
    assert_eq!(
        kernel_faults, TRANSLATION_FAULTS,
        "the guest kernel logs a fault event for each\n{out}"
    );

    // Reads unmapped while in flight: nothing lands on the pages once the UNMAP returned.
    // Warden counts the UNMAPs that waited for a transfer (the guest's own traffic unmaps
    // only what has completed): at least one race was met.
    assert_eq!(out.marker("ATTACK-RACE-EXIT"), Some("0"), "{out}");
    assert_eq!(verdict(&out, "UNMAP-IN-FLIGHT"), "intact", "{out}");
    let waited = out.iommu_counter("requests waited for DMA");
    assert!(
        waited >= 1,
        "no UNMAP met a read in flight: the race was never run\n{out}"
    );

    // Every other device: bound to vfio-pci, its checks as required, the canary intact, and
    // each refused access logged as a fault by the guest kernel on top of the ones before.
    let mut kernel_faults_before = kernel_faults;
    for attack in &DEVICE_ATTACKS {
        kernel_faults_before = check_device_attack(&out, attack, kernel_faults_before);
    }
    // No refused frame reached either tap.
    for tap in ["VHOST", "OWN"] {
        assert_eq!(
            count(&out, &format!("HOST-{tap}-TAP-FRAMES")),
            NET_FRAMES_SENT,
            "{tap}: the frames the host got from the guest\n{out}"
        );
    }
    // No refused text in the console's file, not even the mapped line chained to the canary.
    assert_eq!(count(&out, "HOST-CONSOLE-LINES"), 2, "{out}");
    assert_eq!(count(&out, "HOST-CONSOLE-CANARY-BYTES"), 0, "{out}");
    assert_eq!(
        count(&out, "HOST-CONSOLE-BYTES"),
        CONSOLE_PRINTED.len() as u64,
        "the console's file holds its two lines and nothing else\n{out}"
    );

    let faults = out.iommu_counter("faults");
    assert!(
        faults
            >= TRANSLATION_FAULTS
                + DEVICE_ATTACKS
                    .iter()
                    .map(|a| a.faults_at_least)
                    .sum::<u64>(),
        "warden counts each: {faults}\n{out}"
    );

    // The flood: the disk served while the ring was kept full, then unplugged though it never
    // emptied; the eject register written thousands of times; vm.info answering all along and
    // no longer listing the disk; a hot-add after it answered at once.
    assert_eq!(out.marker("ATTACK-FLOOD-EXIT"), Some("0"), "{out}");
    assert_eq!(out.api_reply("add-flood").0, 200, "{out}");
    assert_eq!(out.marker("HOST-FLOOD-LISTED"), Some("listed"), "{out}");
    let writes = count(&out, "ATTACK-FLOOD-EJECT-WRITES");
    assert!(
        writes >= 1000,
        "the eject register was flooded: {writes}\n{out}"
    );
    assert_eq!(
        out.marker("ATTACK-FLOOD-STILL-SERVED"),
        Some("false"),
        "the ejected disk stopped\n{out}"
    );
    let (_, info) = out.api_reply("info-after-flood");
    assert!(
        !info["device_tree"]
            .as_object()
            .is_some_and(|tree| tree.contains_key("flood")),
        "vm.info no longer lists the disk the guest ejected: {info}\n{out}"
    );
    let centiseconds = |key: &str| -> u64 {
        out.marker(key)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key}\n{out}"))
    };
    assert!(
        centiseconds("HOST-API-MAX-CS") <= API_ANSWER_CS,
        "vm.info answered within {API_ANSWER_CS} cs during the flood\n{out}"
    );
    // The hotplug thread is free: a disk added after the flood is plugged at once, and listed.
    assert_eq!(out.api_reply("add-after").0, 200, "{out}");
    assert!(centiseconds("HOST-ADD-AFTER-CS") <= API_ANSWER_CS, "{out}");
    let (_, info) = out.api_reply("info-after-add");
    assert!(
        info["device_tree"]
            .as_object()
            .is_some_and(|tree| tree.contains_key("after") && !tree.contains_key("flood")),
        "{info}\n{out}"
    );

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
