//! Opening a host PCI function for passthrough, with the host's usual mistakes (no VFIO, device
//! not bound to vfio-pci, group shared with devices still in use, not root) turned into one-line
//! errors that say how to fix them, before `vfio-ioctls` would report a bare errno.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioOps};

use crate::container::{HostContainer, HostIommuInfo};

/// Host drivers under which a device may share a group with a passed-through one: the kernel
/// only lets a group into a container when no other driver can reach its devices' DMA.
const VIABLE_DRIVERS: [&str; 3] = ["vfio-pci", "pci-stub", "pcieport"];

/// Why a device could not be opened; each message is one line naming `--device` and the fix.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("device: {0}: no such PCI device; give its sysfs path, e.g. path=/sys/bus/pci/devices/0000:01:00.0")]
    NoDevice(PathBuf),
    #[error("device: /dev/vfio/vfio does not exist: load VFIO on the host (modprobe vfio-pci)")]
    NoVfio,
    #[error("device: {0} has no IOMMU group: the host IOMMU is off; enable it (intel_iommu=on or amd_iommu=on on the host's kernel command line)")]
    NoGroup(PathBuf),
    #[error("device: {bdf} is {driver}, not vfio-pci; bind it: echo vfio-pci > {path}/driver_override; echo {bdf} > {path}/driver/unbind; echo {bdf} > /sys/bus/pci/drivers_probe")]
    NotVfioPci {
        bdf: String,
        path: String,
        driver: String,
    },
    #[error("device: IOMMU group {group} of {bdf} is not viable: {others} must be bound to vfio-pci (or unbound) too, since devices in one group can reach each other's DMA")]
    GroupNotViable {
        group: u32,
        bdf: String,
        others: String,
    },
    #[error("device: cannot open /dev/vfio/{0}: permission denied; run warden as root (or give its user the group's device node)")]
    NotPermitted(u32),
    #[error("device: /dev/vfio/{0} is busy: another process (another VMM?) holds the group")]
    Busy(u32),
    #[error("device: {path}: {what}")]
    Vfio { path: PathBuf, what: String },
}

impl OpenError {
    fn vfio(path: &Path, what: impl std::fmt::Display) -> Self {
        OpenError::Vfio {
            path: path.to_path_buf(),
            what: what.to_string(),
        }
    }
}

/// A passed-through device with the container that holds its group.
pub struct OpenedDevice {
    pub device: VfioDevice,
    pub container: Arc<HostContainer>,
    /// What the host IOMMU behind the container supports.
    pub iommu: HostIommuInfo,
}

/// The name of the driver bound to `device` (a sysfs device directory), if any.
fn driver_of(device: &Path) -> Option<String> {
    let link = fs::read_link(device.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Checks the host state `path` needs for passthrough; returns the device's IOMMU group.
pub fn check_host(path: &Path) -> Result<u32, OpenError> {
    if !path.join("config").exists() {
        return Err(OpenError::NoDevice(path.to_path_buf()));
    }
    let bdf = path
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| path.display().to_string());
    let group_link =
        fs::read_link(path.join("iommu_group")).map_err(|_| OpenError::NoGroup(path.into()))?;
    let group: u32 = group_link
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| OpenError::NoGroup(path.into()))?;
    if !Path::new("/dev/vfio/vfio").exists() {
        return Err(OpenError::NoVfio);
    }
    match driver_of(path) {
        Some(driver) if driver == "vfio-pci" => {}
        other => {
            return Err(OpenError::NotVfioPci {
                bdf,
                path: path.display().to_string(),
                driver: other.map_or("bound to no driver".into(), |d| format!("bound to {d}")),
            })
        }
    }
    let members = Path::new("/sys/kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let others: Vec<String> = fs::read_dir(&members)
        .map_err(|err| OpenError::vfio(path, format!("{}: {err}", members.display())))?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy() != bdf)
        .filter_map(|entry| {
            let driver = driver_of(&entry.path())?;
            (!VIABLE_DRIVERS.contains(&driver.as_str())).then(|| {
                format!(
                    "{} (bound to {driver})",
                    entry.file_name().to_string_lossy()
                )
            })
        })
        .collect();
    if !others.is_empty() {
        return Err(OpenError::GroupNotViable {
            group,
            bdf,
            others: others.join(", "),
        });
    }
    // Open once ourselves, only to name the two errors `vfio-ioctls` would report as a bare
    // errno; the node is closed again before it opens it.
    let node = format!("/dev/vfio/{group}");
    if let Err(err) = fs::OpenOptions::new().read(true).write(true).open(&node) {
        return Err(match err.kind() {
            io::ErrorKind::PermissionDenied => OpenError::NotPermitted(group),
            _ if err.raw_os_error() == Some(libc::EBUSY) => OpenError::Busy(group),
            _ => OpenError::vfio(path, format!("{node}: {err}")),
        });
    }
    Ok(group)
}

/// Opens the device at `path` in a container of its own. `kvm_vfio` is the VM's KVM VFIO
/// device, which KVM uses to learn about DMA coherency of the groups it is told about.
pub fn open(path: &Path, kvm_vfio: Option<Arc<VfioDeviceFd>>) -> Result<OpenedDevice, OpenError> {
    check_host(path)?;
    let container = Arc::new(VfioContainer::new(kvm_vfio).map_err(|e| OpenError::vfio(path, e))?);
    let ops: Arc<dyn VfioOps> = container.clone();
    let device = VfioDevice::new(path, ops, false).map_err(|e| OpenError::vfio(path, e))?;
    let container = Arc::new(HostContainer::new(container));
    let iommu = container
        .info()
        .map_err(|e| OpenError::vfio(path, format!("VFIO_IOMMU_GET_INFO: {e}")))?;
    Ok(OpenedDevice {
        device,
        container,
        iommu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_is_named() {
        let err = check_host(Path::new("/sys/bus/pci/devices/0000:ff:1f.7")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "device: /sys/bus/pci/devices/0000:ff:1f.7: no such PCI device; give its sysfs path, e.g. path=/sys/bus/pci/devices/0000:01:00.0"
        );
    }

    /// A fake sysfs tree: a device bound to a driver, in a group.
    #[test]
    fn an_unbound_or_wrongly_bound_device_gets_the_bind_commands() {
        let root = std::env::temp_dir().join(format!("warden-vfio-sysfs-{}", std::process::id()));
        let dev = root.join("0000:00:03.0");
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("config"), [0u8; 64]).unwrap();
        // No iommu_group link: the host IOMMU is off.
        let err = check_host(&dev).unwrap_err();
        assert!(err.to_string().contains("has no IOMMU group"), "{err}");
        std::os::unix::fs::symlink("../groups/7", dev.join("iommu_group")).unwrap();
        if Path::new("/dev/vfio/vfio").exists() {
            std::os::unix::fs::symlink("../drivers/virtio-pci", dev.join("driver")).unwrap();
            let err = check_host(&dev).unwrap_err().to_string();
            assert!(
                err.starts_with("device: 0000:00:03.0 is bound to virtio-pci, not vfio-pci; bind it: echo vfio-pci >"),
                "{err}"
            );
        } else {
            let err = check_host(&dev).unwrap_err();
            assert!(matches!(err, OpenError::NoVfio), "{err}");
        }
        fs::remove_dir_all(&root).unwrap();
    }
}
