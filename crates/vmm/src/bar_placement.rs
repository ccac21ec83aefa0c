//! The BARs of hot-plugged devices, where the guest puts them.
//!
//! The boot path places every BAR itself, as firmware would, and the guest keeps those
//! addresses. A device plugged in later is the guest's to place (Linux's acpiphp assigns its
//! BARs from the host bridge's windows), so the VMM follows: when the guest turns decoding on
//! at new addresses, each BAR's range moves on the port or MMIO bus, and the queue
//! notifications inside it move as KVM ioeventfds. This runs on the vCPU thread that wrote the
//! command register, under the bus's lock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::{BarKind, BarMove, BarMoves, EventAddress, PciBarRegion, PciDevice};
use vm_device::{lock, Bus};

/// Where one device's BARs and ioeventfds are now.
#[derive(Default)]
struct Placed {
    /// BAR index → (on the port bus?, base, length).
    bars: BTreeMap<usize, (bool, u64, u64)>,
    /// The device's ioeventfds as registered, in `PciDevice::ioeventfds` order.
    ioevents: Vec<Option<IoEventAddress>>,
}

pub(crate) struct BarPlacement {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    vm: Arc<VmFd>,
    devices: Mutex<BTreeMap<u8, Placed>>,
}

impl BarPlacement {
    pub(crate) fn new(pio: Arc<Bus>, mmio: Arc<Bus>, vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(BarPlacement {
            pio,
            mmio,
            vm,
            devices: Mutex::default(),
        })
    }

    /// Follows the BARs of the device about to be plugged in at `device_number`.
    pub(crate) fn track(&self, device_number: u8) {
        lock(&self.devices).insert(device_number, Placed::default());
    }

    /// Takes an unplugged device's BARs off the buses and its ioeventfds out of KVM.
    pub(crate) fn untrack(&self, device_number: u8, device: &Arc<Mutex<dyn PciDevice>>) {
        let mut devices = lock(&self.devices);
        let Some(mut placed) = devices.remove(&device_number) else {
            return;
        };
        self.unregister_ioevents(&mut placed, &*lock(device));
        for (on_pio, base, _) in placed.bars.into_values() {
            self.bus(on_pio).remove(base);
        }
    }

    fn bus(&self, on_pio: bool) -> &Bus {
        if on_pio {
            &self.pio
        } else {
            &self.mmio
        }
    }

    fn unregister_ioevents(&self, placed: &mut Placed, device: &dyn PciDevice) {
        for ((eventfd, _), address) in device
            .ioeventfds()
            .into_iter()
            .zip(placed.ioevents.drain(..))
        {
            if let Some(address) = address {
                if let Err(err) = self.vm.unregister_ioevent(eventfd, &address, NoDatamatch) {
                    log::warn!("cannot remove a queue notification ioeventfd: {err}");
                }
            }
        }
    }
}

impl BarMoves for BarPlacement {
    fn moved(&self, device_number: u8, device: &Arc<Mutex<dyn PciDevice>>, moves: &[BarMove]) {
        let mut devices = lock(&self.devices);
        // Boot devices stay where the VMM put them (see `PciRoot`).
        let Some(placed) = devices.get_mut(&device_number) else {
            return;
        };
        let dev = lock(device);
        self.unregister_ioevents(placed, &*dev);
        for m in moves {
            let on_pio = dev
                .config()
                .bars()
                .any(|(bar, spec)| bar == m.bar && spec.kind == BarKind::Io);
            if let Some((was_pio, base, _)) = placed.bars.remove(&m.bar) {
                self.bus(was_pio).remove(base);
            }
            let region = Arc::new(Mutex::new(PciBarRegion::new(device.clone(), m.bar)));
            match self.bus(on_pio).insert(region, m.new_base, m.len) {
                Ok(()) => {
                    placed.bars.insert(m.bar, (on_pio, m.new_base, m.len));
                }
                Err(err) => log::warn!(
                    "00:{device_number:02x}.0: BAR {} at {:#x} not mapped: {err}",
                    m.bar,
                    m.new_base
                ),
            }
        }
        // Only notifications inside a placed BAR: the others would land on address 0.
        let inside = |on_pio: bool, addr: u64| {
            placed
                .bars
                .values()
                .any(|&(p, base, len)| p == on_pio && (base..base + len).contains(&addr))
        };
        let mut registered = Vec::new();
        for (eventfd, address) in dev.ioeventfds() {
            let (on_pio, addr, kvm_address) = match address {
                EventAddress::Port(port) => {
                    (true, u64::from(port), IoEventAddress::Pio(u64::from(port)))
                }
                EventAddress::Memory(addr) => (false, addr, IoEventAddress::Mmio(addr)),
            };
            let address = inside(on_pio, addr).then_some(kvm_address);
            let address =
                address.filter(
                    |a| match self.vm.register_ioevent(eventfd, a, NoDatamatch) {
                        Ok(()) => true,
                        Err(err) => {
                            log::warn!(
                                "00:{device_number:02x}.0: queue notification at {addr:#x}: {err}"
                            );
                            false
                        }
                    },
                );
            registered.push(address);
        }
        placed.ioevents = registered;
    }
}
