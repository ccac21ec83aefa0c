//! Guest tool for the in-guest attacker test: what a compromised guest kernel or a malicious
//! user-space driver would do to devices that sit behind warden's virtio-iommu, each bound to
//! vfio-pci in the guest and driven from user space.
//!
//! - `attacker blk SYSFS_DEVICE_PATH`: a protected disk (`blk.rs`);
//! - `attacker blk-unmap-race SYSFS_DEVICE_PATH`: a protected disk's read unmapped while in
//!   flight (`blk_race.rs`);
//! - `attacker net SYSFS_DEVICE_PATH`: a protected vhost-net (`net.rs`);
//! - `attacker net-warden SYSFS_DEVICE_PATH`: a protected virtio-net on warden's own data
//!   path (`net.rs`);
//! - `attacker vsock SYSFS_DEVICE_PATH`: a protected vsock (`vsock.rs`);
//! - `attacker rng SYSFS_DEVICE_PATH`: a protected virtio-rng (`rng.rs`);
//! - `attacker console SYSFS_DEVICE_PATH`: a protected virtio-console (`console.rs`);
//! - `attacker flood SYSFS_DEVICE_PATH SECONDS EJECT_AT SLOT`: a disk's ring kept full while
//!   its slot's eject register is written over and over (`flood.rs`).
//!
//! One line per check, `ATTACK-<NAME>=<verdict> <details>`; a verdict is `refused`, `intact`,
//! `ok` or `survived`, anything else (`ALLOWED`, `CHANGED`, `FAILED`) is the attack getting
//! through. Exits 0 once every check has run, 1 if the tool itself could not run.

mod blk;
mod blk_race;
mod console;
mod flood;
mod net;
mod rng;
mod vfio;
mod vsock;

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.as_slice() {
        [_, mode, device] if mode == "blk" => blk::run(Path::new(device)),
        [_, mode, device] if mode == "blk-unmap-race" => blk_race::run(Path::new(device)),
        [_, mode, device] if mode == "net" => net::run(Path::new(device), net::Datapath::Vhost),
        [_, mode, device] if mode == "net-warden" => {
            net::run(Path::new(device), net::Datapath::Warden)
        }
        [_, mode, device] if mode == "vsock" => vsock::run(Path::new(device)),
        [_, mode, device] if mode == "rng" => rng::run(Path::new(device)),
        [_, mode, device] if mode == "console" => console::run(Path::new(device)),
        [_, mode, device, seconds, eject_at, slot] if mode == "flood" => {
            match (seconds.parse(), eject_at.parse(), slot.parse()) {
                (Ok(seconds), Ok(eject_at), Ok(slot)) => {
                    flood::run(Path::new(device), seconds, eject_at, slot)
                }
                _ => Err(format!("flood: bad numbers {seconds} {eject_at} {slot}")),
            }
        }
        _ => {
            eprintln!(
                "usage: attacker blk|blk-unmap-race|net|net-warden|vsock|rng|console SYSFS_DEVICE_PATH\n       attacker flood SYSFS_DEVICE_PATH SECONDS EJECT_AT SLOT"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            println!("ATTACK-ERROR={err}");
            ExitCode::FAILURE
        }
    }
}
