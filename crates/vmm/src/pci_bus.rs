//! Bus 0 of each PCI segment as the VMM assembles it: devices plugged in at fixed numbers, BARs
//! placed in the segment's windows and put on the port or MMIO bus, queue notifications turned
//! into KVM ioeventfds.

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

/// Bus 0 of every segment, segment `n` at index `n`.
pub struct PciSegments(Vec<PciBus>);

impl PciSegments {
    /// `segments` empty buses, each with its share of the windows of a guest with `ram_size`
    /// bytes of RAM, their config mechanisms on the port and MMIO buses.
    pub fn new(
        ram_size: u64,
        segments: u16,
        pio: &mut Bus,
        mmio: &mut Bus,
    ) -> Result<Self, String> {
        (0..segments)
            .map(|segment| {
                let windows = layout::segment_windows(ram_size, segment, segments);
                PciBus::new(segment, &windows, pio, mmio)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(PciSegments)
    }

    /// Segment `segment`'s bus 0 (validated: it exists).
    pub fn segment(&mut self, segment: u16) -> &mut PciBus {
        &mut self.0[usize::from(segment)]
    }

    /// Every segment's bus, to clear when the VM ends.
    pub fn roots(&self) -> Vec<Arc<Mutex<PciRoot>>> {
        self.0.iter().map(PciBus::root).collect()
    }
}

pub struct PciBus {
    root: Arc<Mutex<PciRoot>>,
    allocator: BarAllocator,
}

impl PciBus {
    /// An empty bus 0 (host bridge only) of `segment`, whose BARs go to `windows`, with its
    /// ECAM on the MMIO bus; segment 0 is reached through the 0xCF8 ports too.
    fn new(
        segment: u16,
        windows: &layout::SegmentWindows,
        pio: &mut Bus,
        mmio: &mut Bus,
    ) -> Result<Self, String> {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let length = |range: &std::ops::Range<u64>| range.end - range.start;
        let io = u64::from(windows.io.start)..u64::from(windows.io.end);
        let allocator = BarAllocator::new(
            (windows.mmio32.start, length(&windows.mmio32)),
            Some((windows.mmio64.start, length(&windows.mmio64))),
            Some((io.start, length(&io))),
        )
        .map_err(|err| err.to_string())?;
        if segment == 0 {
            pio.insert(
                Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
                u64::from(layout::PCI_CONFIG_PORT),
                u64::from(layout::PCI_CONFIG_PORT_SIZE),
            )
            .map_err(|err| err.to_string())?;
        }
        mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
            windows.ecam,
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
