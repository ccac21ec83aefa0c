//! Bus 0 as the VMM assembles it: devices plugged in at fixed numbers, BARs placed in the PCI
//! windows and put on the MMIO bus, queue notifications turned into KVM ioeventfds.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::{BarAllocator, PciConfigIo, PciConfigMmio, PciDevice, PciRoot};
use vfio::VfioPciDevice;
use virtio_devices::VirtioDevice;
use virtio_pci::VirtioPciDevice;
use vm_device::Bus;

use crate::interrupts::GsiRouter;
use crate::layout;

/// Device number 1 is the virtio-iommu's when there is one, so that guests see the IOMMU at
/// the same address whatever else is plugged in.
pub const IOMMU_DEVICE_NUMBER: u8 = 1;

pub struct PciBus {
    root: Arc<Mutex<PciRoot>>,
    allocator: BarAllocator,
}

impl PciBus {
    /// An empty bus 0 (host bridge only) whose BARs go to the windows of a guest with
    /// `ram_size` bytes of RAM, with its config mechanisms on the port and MMIO buses.
    pub fn new(ram_size: u64, pio: &mut Bus, mmio: &mut Bus) -> Result<Self, String> {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let allocator = BarAllocator::new(
            (layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
            Some((layout::pci_mmio64_start(ram_size), layout::PCI_MMIO64_SIZE)),
        )
        .map_err(|err| err.to_string())?;
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
            u64::from(layout::PCI_CONFIG_PORT),
            u64::from(layout::PCI_CONFIG_PORT_SIZE),
        )
        .map_err(|err| err.to_string())?;
        mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
        )
        .map_err(|err| err.to_string())?;
        Ok(PciBus { root, allocator })
    }

    /// Plugs `device` in behind the virtio-pci transport at `device_number`: MSI-X vectors
    /// from `router`, BARs on `mmio`, queue notifications as ioeventfds of `vm`.
    pub fn add_virtio(
        &mut self,
        device_number: u8,
        device: Box<dyn VirtioDevice>,
        router: &Arc<GsiRouter>,
        vm: &VmFd,
        mmio: &mut Bus,
    ) -> Result<(), String> {
        let vectors = virtio_pci::msix_vectors(device.as_ref());
        let interrupt = router.msi_group(vectors).map_err(|err| err.to_string())?;
        let transport = VirtioPciDevice::new(device, interrupt).map_err(|err| err.to_string())?;
        let transport: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(transport));
        for bar in self
            .allocator
            .allocate(&transport)
            .map_err(|err| err.to_string())?
        {
            mmio.insert(bar.region, bar.base, bar.len)
                .map_err(|err| err.to_string())?;
        }
        for (eventfd, address) in lock(&transport).ioeventfds() {
            vm.register_ioevent(eventfd, &IoEventAddress::Mmio(address), NoDatamatch)
                .map_err(|err| format!("ioeventfd at {address:#x}: {err}"))?;
        }
        lock(&self.root)
            .add_device(device_number, transport)
            .map_err(|err| err.to_string())
    }
}

impl PciBus {
    /// Plugs a passed-through device in at `device_number`. Every BAR goes on `mmio`, where
    /// accesses trap to the device model; BARs the host let us map also become KVM memory
    /// slots (numbered from `next_slot` on), so the guest reaches them without exits.
    pub fn add_vfio(
        &mut self,
        device_number: u8,
        device: Arc<Mutex<VfioPciDevice>>,
        vm: &VmFd,
        mmio: &mut Bus,
        next_slot: &mut u32,
    ) -> Result<(), String> {
        let pci_device: Arc<Mutex<dyn PciDevice>> = device.clone();
        for bar in self
            .allocator
            .allocate(&pci_device)
            .map_err(|err| err.to_string())?
        {
            mmio.insert(bar.region, bar.base, bar.len)
                .map_err(|err| err.to_string())?;
        }
        let dev = lock(&device);
        for m in dev.mmaps() {
            let base = dev
                .config()
                .bar_address(m.bar)
                .ok_or_else(|| format!("BAR {} was not placed", m.bar))?;
            let region = kvm_userspace_memory_region {
                slot: *next_slot,
                guest_phys_addr: base,
                memory_size: m.len,
                userspace_addr: m.host_addr,
                flags: 0,
            };
            // SAFETY: the mapping belongs to the device, which lives as long as the VM (both
            // are kept until the process exits).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|err| format!("map BAR {} at {base:#x} into the guest: {err}", m.bar))?;
            *next_slot += 1;
        }
        drop(dev);
        lock(&self.root)
            .add_device(device_number, pci_device)
            .map_err(|err| err.to_string())
    }
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
