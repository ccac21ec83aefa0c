//! Bus 0 as the VMM assembles it: devices plugged in at fixed numbers, BARs placed in the PCI
//! windows and put on the port or MMIO bus, queue notifications turned into KVM ioeventfds.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::{BarAllocator, BarKind, EventAddress, PciConfigIo, PciConfigMmio, PciDevice, PciRoot};
use vfio::VfioPciDevice;
use virtio_devices::VirtioDevice;
use vm_device::{lock, Bus};

use crate::attach;
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
            Some((
                u64::from(layout::PCI_IO_START),
                u64::from(layout::PCI_IO_END - layout::PCI_IO_START),
            )),
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

    /// The bus itself, for devices plugged in while the guest runs.
    pub fn root(&self) -> Arc<Mutex<PciRoot>> {
        Arc::clone(&self.root)
    }

    /// Places `device`'s BARs and puts each on the bus of its address space, where accesses
    /// reach the device model.
    fn place_bars(
        &mut self,
        device: &Arc<Mutex<dyn PciDevice>>,
        pio: &mut Bus,
        mmio: &mut Bus,
    ) -> Result<(), String> {
        for bar in self
            .allocator
            .allocate(device)
            .map_err(|err| err.to_string())?
        {
            let bus = if bar.kind == BarKind::Io {
                &mut *pio
            } else {
                &mut *mmio
            };
            bus.insert(bar.region, bar.base, bar.len)
                .map_err(|err| err.to_string())?;
        }
        Ok(())
    }

    /// Plugs `device` in behind the virtio-pci transport at `device_number`: MSI-X vectors
    /// from `router`, BARs on `pio` and `mmio`, queue notifications as ioeventfds of `vm`.
    pub fn add_virtio(
        &mut self,
        device_number: u8,
        device: Box<dyn VirtioDevice>,
        router: &Arc<GsiRouter>,
        vm: &VmFd,
        pio: &mut Bus,
        mmio: &mut Bus,
    ) -> Result<(), String> {
        let transport = attach::transport(device, router)?;
        self.place_bars(&transport, pio, mmio)?;
        for (eventfd, address) in lock(&transport).ioeventfds() {
            let kvm_address = match address {
                EventAddress::Port(port) => IoEventAddress::Pio(u64::from(port)),
                EventAddress::Memory(addr) => IoEventAddress::Mmio(addr),
            };
            vm.register_ioevent(eventfd, &kvm_address, NoDatamatch)
                .map_err(|err| format!("ioeventfd at {address:x?}: {err}"))?;
        }
        lock(&self.root)
            .add_device(device_number, transport)
            .map_err(|err| err.to_string())
    }
}

impl PciBus {
    /// Plugs a passed-through device in at `device_number`. Every BAR goes on its bus, where
    /// accesses trap to the device model; BARs the host let us map also become KVM memory
    /// slots (numbered from `next_slot` on), so the guest reaches them without exits.
    pub fn add_vfio(
        &mut self,
        device_number: u8,
        device: Arc<Mutex<VfioPciDevice>>,
        vm: &VmFd,
        pio: &mut Bus,
        mmio: &mut Bus,
        next_slot: &mut u32,
    ) -> Result<(), String> {
        let pci_device: Arc<Mutex<dyn PciDevice>> = device.clone();
        self.place_bars(&pci_device, pio, mmio)?;
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
