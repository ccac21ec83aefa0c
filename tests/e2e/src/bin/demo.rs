//! The demo: boots the test guest under warden with a disk and an entropy device behind the
//! virtual IOMMU, and shows what the guest sees. Runs warden directly on a host with hardware
//! KVM, else inside the nested KVM test host (see tests/e2e/README.md).
//!
//! `cargo run -p e2e --bin demo`

use std::process::ExitCode;
use std::time::Duration;

use e2e::Scenario;

const GUEST: &str = r#"
wait_for /dev/vda
echo "== PCI devices (vendor device class)"
for dev in /sys/bus/pci/devices/*; do
    echo "${dev##*/} $(cat "$dev/vendor") $(cat "$dev/device") $(cat "$dev/class")"
done
echo "== IOMMU groups"
for group in /sys/kernel/iommu_groups/*; do echo "group ${group##*/}: $(ls "$group/devices")"; done
echo "== kernel log"
dmesg | grep -E 'VIOT|virtio_iommu|iommu group'
echo "== the protected disk's first sector, read by DMA through the IOMMU"
head -c 40 /dev/vda; echo
"#;

fn main() -> ExitCode {
    let Some(out) = Scenario::new("demo")
        .host_setup(
            "dd if=/dev/zero of=disk.img bs=1M count=16 2>/dev/null
printf 'hello from the host, through the vIOMMU' | dd of=disk.img conv=notrunc 2>/dev/null",
        )
        .warden_args([
            "--cpus",
            "1",
            "--memory",
            "size=512M",
            "--disk",
            "path=disk.img,iommu=on",
            "--rng",
            "iommu=on",
        ])
        .guest_script(GUEST)
        .timeout(Duration::from_secs(180))
        .run()
    else {
        eprintln!("demo: no KVM and no QEMU here: nothing can run the guest");
        return ExitCode::FAILURE;
    };
    println!("{}", out.guest_output());
    println!(
        "warden ran in {:?} mode and exited with {:?}",
        out.mode, out.warden_exit
    );
    if out.warden_exit == Some(0) {
        ExitCode::SUCCESS
    } else {
        eprintln!("{out}");
        ExitCode::FAILURE
    }
}
