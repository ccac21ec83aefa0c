//! The demo: boots a real Debian 12 (guest/build-distro.sh) under warden the way Cloud
//! Hypervisor's README boots its cloud image, with the root disk and an entropy device behind
//! the virtual IOMMU and a virtio-net on a tap (192.168.249.1 on the host's end, the guest is
//! .2). Runs warden directly on a host with hardware KVM, else inside the nested KVM test host
//! (see tests/e2e/README.md). On a terminal the user gets the guest's serial console and its
//! login prompt; otherwise the guest prints its IOMMU groups and PCI devices and powers off.
//!
//! `cargo run -p e2e --bin demo` (as root: it installs what it needs the first time)

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use e2e::{Mode, Scenario};

/// What the guest shows when there is no terminal to log in on.
const SCRIPT: &str = r#"
echo "== ls /sys/kernel/iommu_groups"
ls /sys/kernel/iommu_groups
for group in /sys/kernel/iommu_groups/*; do
    echo "== devices in IOMMU group ${group##*/}: $(ls "$group/devices")"
done
echo "== lspci"
lspci
echo "== findmnt /"
findmnt /
"#;

/// warden's options besides --kernel, --initramfs and --serial tty, which the harness adds.
const ARGS: [&str; 12] = [
    "--cpus",
    "1",
    "--memory",
    "size=512M",
    "--disk",
    "path=host-disk,iommu=on",
    "--cmdline",
    "console=ttyS0 root=/dev/vda3",
    "--net",
    "tap=,mac=,ip=192.168.249.1,mask=255.255.255.0",
    "--rng",
    "iommu=on",
];

fn main() -> ExitCode {
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    eprintln!(
        "demo: warden --kernel vmlinuz --initramfs initrd.img --serial tty {}",
        ARGS.map(|a| if a.contains(' ') {
            format!("\"{a}\"")
        } else {
            a.to_string()
        })
        .join(" ")
    );
    let scenario = Scenario::new("demo").distro().warden_args(ARGS);
    let scenario = if interactive {
        eprintln!(
            "demo: log in as root (no password); `poweroff` in the guest ends the demo (when \
             nested in QEMU, Ctrl-A X also quits). The guest is 192.168.249.2 on the tap."
        );
        scenario.terminal().timeout(Duration::from_secs(4 * 3600))
    } else {
        eprintln!("demo: no terminal: the guest prints what it sees, then powers off");
        scenario
            .guest_script(SCRIPT)
            .timeout(Duration::from_secs(300))
    };
    let start = Instant::now();
    let Some(out) = scenario.run() else {
        eprintln!("demo: no KVM and no QEMU here: nothing can run the guest");
        return ExitCode::FAILURE;
    };
    if interactive {
        eprintln!("demo: the guest ran for {:.0?}", start.elapsed());
        return if out.mode == Mode::Nested || out.warden_exit == Some(0) {
            ExitCode::SUCCESS
        } else {
            eprintln!("demo: warden exited with {:?}", out.warden_exit);
            ExitCode::FAILURE
        };
    }
    println!("{}", out.guest_output());
    println!(
        "warden ran in {:?} mode and exited with {:?} ({:.0?})",
        out.mode, out.warden_exit, out.elapsed
    );
    if out.warden_exit == Some(0) && out.guest_script_exit() == Some(0) {
        ExitCode::SUCCESS
    } else {
        eprintln!("{out}");
        ExitCode::FAILURE
    }
}
