//! How a virtio device joins a VM, the same at boot (the command line's and `vm.create`'s
//! devices) and when hot-plugged: built over guest RAM, or, behind the IOMMU, over RAM seen
//! through its endpoint's translations and with `VIRTIO_F_ACCESS_PLATFORM`; then given its
//! virtio-pci transport, its MSI-X vectors routed. Which slot it takes, and whether the guest
//! is told of it, is the caller's.

use std::sync::{Arc, Mutex};

use pci::PciDevice;
use virtio_devices::{DeviceMemory, VirtioDevice};
use virtio_iommu::{EndpointIommu, VirtioIommu};
use virtio_pci::VirtioPciDevice;
use vm_memory::{GuestMemoryMmap, IommuMemory};

use crate::interrupts::GsiRouter;

/// What builds one device once its memory is chosen (a boot device's plan, a hot-plug
/// request); `E` is how its caller reports a failure.
pub(crate) trait Recipe<E> {
    fn build<M: DeviceMemory>(
        self,
        mem: M,
        access_platform: bool,
    ) -> Result<Box<dyn VirtioDevice>, E>;
}

/// Builds what `recipe` describes over `ram`, or behind `iommu` as `endpoint` (registered
/// with it already: at boot with the whole topology, for the VIOT; when hot-plugged, just
/// before).
pub(crate) fn virtio_device<E, R: Recipe<E>>(
    recipe: R,
    ram: &GuestMemoryMmap,
    behind: Option<(&Arc<VirtioIommu>, u32)>,
) -> Result<Box<dyn VirtioDevice>, E> {
    match behind {
        Some((iommu, endpoint)) => {
            let translator = EndpointIommu::new(Arc::clone(iommu), endpoint)
                .expect("a protected device's endpoint is registered before it is built");
            recipe.build(IommuMemory::new(ram.clone(), translator, true, ()), true)
        }
        None => recipe.build(ram.clone(), false),
    }
}

/// `device`'s virtio-pci transport, with an MSI-X vector routed for each of its queues and
/// its configuration changes.
pub(crate) fn transport(
    device: Box<dyn VirtioDevice>,
    router: &Arc<GsiRouter>,
) -> Result<Arc<Mutex<dyn PciDevice>>, String> {
    let vectors = virtio_pci::msix_vectors(device.as_ref());
    let interrupt = router
        .msi_group(vectors)
        .map_err(|err| format!("MSI vectors: {err}"))?;
    let transport =
        VirtioPciDevice::new(device, interrupt).map_err(|err| format!("virtio-pci: {err}"))?;
    Ok(Arc::new(Mutex::new(transport)))
}
