//! warden boots an unmodified Linux guest with its basic devices (the VMM issue): vCPUs, a
//! virtio-blk disk backed by a host file, virtio-rng, the PCI topology, and a clean exit when
//! the guest powers off. All checks share one guest boot: a boot costs ~15 s when nested.

use e2e::{Kernel, Outcome, Scenario};
use std::time::Duration;

/// The guest's half: print what it sees as `BOOT-...` markers, write a block for the host.
const GUEST_CHECKS: &str = r#"
wait_for /dev/vda
wait_for /dev/hwrng
echo "BOOT-CPUS-ONLINE=$(cat /sys/devices/system/cpu/online)"
echo "BOOT-DISK-SECTOR0=$(head -c 18 /dev/vda)"
printf 'WARDEN-GUEST-MARKER' | dd of=/dev/vda bs=512 seek=1 conv=notrunc,fsync 2>/dev/null
echo "BOOT-RNG-SOURCE=$(cat /sys/class/misc/hw_random/rng_current)"
echo "BOOT-RNG-BYTES=$(head -c 16 /dev/hwrng | wc -c)"
echo "BOOT-IOMMU-GROUPS=$(ls /sys/kernel/iommu_groups | wc -l)"
# The host's seccomp watcher writes this once it has seen the device threads.
for _ in $(seq 120); do
    echo 3 >/proc/sys/vm/drop_caches
    [ "$(dd if=/dev/vda bs=512 skip=2 count=1 2>/dev/null | head -c 14)" = WARDEN-WATCHED ] && break
    sleep 0.5
done
dmesg | grep -q 'ACPI: VIOT' && echo BOOT-VIOT=present
for dev in /sys/bus/pci/devices/*; do
    echo "BOOT-PCI ${dev##*/} $(cat "$dev/vendor") $(cat "$dev/device") $(cat "$dev/class")"
done
"#;

#[test]
fn boot_linux_with_disk_and_rng() {
    let Some(out) = Scenario::new("boot_linux_with_disk_and_rng")
        .host_setup(&format!(
            "dd if=/dev/zero of=disk.img bs=1M count=8 2>/dev/null\n\
             printf 'WARDEN-HOST-MARKER' | dd of=disk.img conv=notrunc 2>/dev/null\n\
             {WATCH_SECCOMP}"
        ))
        .warden_args([
            "--cpus",
            "2",
            "--memory",
            "size=512M",
            "--disk",
            "path=disk.img",
            "--rng",
            "src=/dev/urandom",
        ])
        .guest_script(GUEST_CHECKS)
        .host_check(
            "echo \"BOOT-HOST-SECTOR1=$(dd if=disk.img bs=512 skip=1 count=1 2>/dev/null | head -c 19)\"\n\
             sed 's/^[0-9]* /BOOT-SECCOMP /' seccomp.txt",
        )
        .timeout(Duration::from_secs(180))
        .run()
    else {
        return;
    };

    let guest = out.guest_output();
    assert!(
        guest.contains("WARDEN-L2-INIT"),
        "the guest's /init didn't run\n{out}"
    );
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert_eq!(out.marker("BOOT-CPUS-ONLINE"), Some("0-1"), "{out}");
    assert_eq!(
        out.marker("BOOT-DISK-SECTOR0"),
        Some("WARDEN-HOST-MARKER"),
        "{out}"
    );
    assert_eq!(out.marker("BOOT-RNG-SOURCE"), Some("virtio_rng.0"), "{out}");
    assert_eq!(out.marker("BOOT-RNG-BYTES"), Some("16"), "{out}");
    assert_pci_topology(&out);
    // Default iommu=off: no virtio-iommu (the topology above has no 1af4:1057), no VIOT, no
    // group, and no IOMMU statistics from warden.
    assert_eq!(out.marker("BOOT-IOMMU-GROUPS"), Some("0"), "{out}");
    assert_eq!(out.marker("BOOT-VIOT"), None, "{out}");
    assert!(!out.guest_output().contains("virtio-iommu"), "{out}");
    assert_eq!(
        out.warden_exit,
        Some(0),
        "warden must exit 0 after the guest's poweroff\n{out}"
    );
    assert_eq!(
        out.marker("BOOT-HOST-SECTOR1"),
        Some("WARDEN-GUEST-MARKER"),
        "{out}"
    );
    assert_threads_confined(&out);
}

/// Watches warden from the KVM host while it runs: each of its threads, by thread id, with its
/// name, seccomp mode and number of filters (`seccomp.txt`, merged over every pass, so a thread
/// seen once stays listed). One `grep` reads all of a pass's status files: the nested host is
/// slow enough that a process per file made passes seconds long. Once both device threads the
/// test checks have been seen it writes `WARDEN-WATCHED` to sector 2 of the disk, which the
/// guest waits for before it powers off: the sample then cannot miss a thread by timing.
const WATCH_SECCOMP: &str = r#"(
  set +e
  while ! pid=$(pidof warden); do sleep 1; done
  while kill -0 "$pid"; do
    grep -HE '^(Name|Seccomp|Seccomp_filters):' /proc/$pid/task/*/status 2>/dev/null |
      awk -F'[/:\t]+' '{ v[$5 "," $7] = $8; tids[$5] = 1 }
        END { for (t in tids) print t, v[t ",Name"], v[t ",Seccomp"], v[t ",Seccomp_filters"] }' \
      >seccomp.pass
    # A later pass wins: a thread first seen before it installed its filter is seen again.
    cat seccomp.txt seccomp.pass 2>/dev/null |
      awk '{ line[$1] = $0 } END { for (t in line) print line[t] }' >seccomp.merged
    mv seccomp.merged seccomp.txt
    if grep -q ' virtio-blk' seccomp.txt && grep -q ' virtio-rng' seccomp.txt; then
      printf 'WARDEN-WATCHED' | dd of=disk.img bs=512 seek=2 conv=notrunc 2>/dev/null
    fi
    sleep 0.2
  done
) >/dev/null 2>&1 &"#;

/// With the default `--seccomp true`, every thread runs in seccomp filter mode (2): the main
/// (VMM) thread with its own filter, each vCPU with its own on top of the VMM's that started
/// it, each device thread with its own on top of those of the vCPU that started it.
fn assert_threads_confined(out: &Outcome) {
    let threads: Vec<Vec<&str>> = out
        .host_check_output()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("BOOT-SECCOMP "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let filters = |prefix: &str| -> Vec<&str> {
        threads
            .iter()
            .filter(|t| t[0].starts_with(prefix))
            .map(|t| t.get(2).copied().unwrap_or("?"))
            .collect()
    };
    assert!(
        threads.iter().all(|t| t.get(1) == Some(&"2")),
        "every thread in seccomp filter mode: {threads:?}\n{out}"
    );
    assert_eq!(filters("warden"), ["1"], "{threads:?}\n{out}");
    assert_eq!(filters("vcpu"), ["2", "2"], "{threads:?}\n{out}");
    assert_eq!(filters("virtio-blk"), ["3"], "{threads:?}\n{out}");
    assert_eq!(filters("virtio-rng"), ["3"], "{threads:?}\n{out}");
}

/// The host bridge comes first, then (with no virtio-iommu, which would take 00:01.0) the
/// virtio devices in the order the VMM creates them: console, disk, rng. Slots aren't
/// asserted: without an IOMMU the first device may take 00:01.0.
fn assert_pci_topology(out: &Outcome) {
    // Lines: "BOOT-PCI <bdf> <vendor> <device> <class>", in BDF order (sysfs sorts them).
    let devices: Vec<Vec<&str>> = out
        .guest_output()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("BOOT-PCI "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        !devices.is_empty(),
        "the guest listed no PCI devices\n{out}"
    );
    assert!(
        devices[0][3].starts_with("0x0600"),
        "00:00.0 should be a host bridge (class 0x0600xx), got {:?}\n{out}",
        devices[0]
    );
    let ids: Vec<(&str, &str)> = devices[1..].iter().map(|d| (d[1], d[2])).collect();
    assert_eq!(
        ids,
        [
            ("0x1af4", "0x1043"),
            ("0x1af4", "0x1042"),
            ("0x1af4", "0x1044")
        ],
        "expected virtio console, block, rng after the host bridge\n{out}"
    );
}

/// warden also boots the ELF vmlinux (PVH entry) extracted from the same kernel.
#[test]
fn boot_linux_elf_kernel() {
    let Some(out) = Scenario::new("boot_linux_elf_kernel")
        .kernel(Kernel::Elf)
        .warden_args(["--cpus", "1", "--memory", "size=512M"])
        .guest_script("echo \"BOOT-ELF-CPUS=$(cat /sys/devices/system/cpu/online)\"")
        .timeout(Duration::from_secs(180))
        .run()
    else {
        return;
    };
    assert_eq!(out.marker("BOOT-ELF-CPUS"), Some("0"), "{out}");
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert_eq!(out.warden_exit, Some(0), "{out}");
}

/// With `--no-reboot` (which the harness gives unless a scenario `reboots`), a guest that
/// panics (and so reboots, with `panic=-1`) makes warden say so and exit 1 rather than boot
/// it again.
#[test]
fn guest_panic_is_reported_not_rebooted() {
    let Some(out) = Scenario::new("boot_guest_panic")
        .warden_args(["--cpus", "1", "--memory", "size=512M"])
        // The pause lets the tty drain the marker before the panic writes over the console.
        .guest_script("echo BOOT-PANICKING=yes\nsleep 1\necho c >/proc/sysrq-trigger")
        .timeout(Duration::from_secs(180))
        .run()
    else {
        return;
    };
    assert_eq!(out.marker("BOOT-PANICKING"), Some("yes"), "{out}");
    assert!(out.guest_output().contains("Kernel panic"), "{out}");
    assert_eq!(out.warden_exit, Some(1), "{out}");
    assert!(
        out.guest_output()
            .contains("warden: the guest asked for a reset"),
        "warden explains why it stopped\n{out}"
    );
    assert_eq!(
        out.guest_output().matches("WARDEN-L2-INIT").count(),
        1,
        "the guest was not booted again\n{out}"
    );
}

/// A guest that reboots itself is built again from its configuration and boots a second
/// time, as Cloud Hypervisor does; it tells the two boots apart by a sector of its disk.
#[test]
fn a_guest_that_reboots_is_booted_again() {
    let Some(out) = Scenario::new("boot_guest_reboot")
        .reboots()
        .host_setup("dd if=/dev/zero of=mailbox.img bs=1M count=1 2>/dev/null")
        .warden_args([
            "--cpus",
            "1",
            "--memory",
            "size=512M",
            "--disk",
            "path=mailbox.img",
        ])
        .guest_script(
            r#"wait_for /dev/vda
if [ "$(head -c 8 /dev/vda)" = "REBOOTED" ]; then
    echo BOOT-SECOND=yes
else
    printf REBOOTED | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null
    echo BOOT-FIRST=yes
    reboot -f
fi"#,
        )
        .timeout(Duration::from_secs(240))
        .run()
    else {
        return;
    };
    assert_eq!(out.marker("BOOT-FIRST"), Some("yes"), "{out}");
    assert_eq!(out.marker("BOOT-SECOND"), Some("yes"), "{out}");
    assert_eq!(
        out.guest_output().matches("WARDEN-L2-INIT").count(),
        2,
        "booted twice\n{out}"
    );
    assert!(
        out.guest_output()
            .contains("warden: the guest reset itself"),
        "warden says why it boots again\n{out}"
    );
    assert_eq!(
        out.warden_exit,
        Some(0),
        "the second boot powers off\n{out}"
    );
}
