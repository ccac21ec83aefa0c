//! The PCI hotplug controller the DSDT's slot methods talk to (see [`acpi::PciHotplug`]): three
//! 32-bit registers on the port bus, with one bit per slot of bus 0.
//!
//! The VMM marks a slot up (a device was plugged in) or down (it asks the guest to let go of
//! the device) and raises the Generic Event Device's interrupt; the guest's `PCNT` reads both
//! bitmaps, which clears them, and notifies the slots. When the guest has released a device, its
//! slot's `_EJ0` writes the slot's bit to the eject register, and the controller passes the
//! slot on to whoever removes devices ([`Ejected`]). No KVM here: the interrupt is a
//! [`Trigger`], so the registers are tested as they are.

use std::sync::{Arc, Mutex};

use vm_device::BusDevice;
use vm_superio::Trigger;

use crate::legacy::GenericEvents;

/// Told of each slot the guest ejects, on the vCPU thread that ran `_EJ0`: it must not block.
pub trait Ejected: Send {
    fn ejected(&self, slot: u8);
}

pub struct PciHotplugController<T: Trigger> {
    up: u32,
    down: u32,
    /// The slots `_EJ0` may name: a write naming others is ignored.
    slots: u32,
    events: Arc<Mutex<GenericEvents<T>>>,
    ejected: Box<dyn Ejected>,
}

impl<T: Trigger> PciHotplugController<T> {
    /// A controller for `slots` (device numbers below 32) that raises `events`.
    pub fn new(
        slots: std::ops::Range<u8>,
        events: Arc<Mutex<GenericEvents<T>>>,
        ejected: Box<dyn Ejected>,
    ) -> Self {
        let slots = slots
            .filter(|&slot| slot < 32)
            .fold(0, |mask, slot| mask | 1 << slot);
        PciHotplugController {
            up: 0,
            down: 0,
            slots,
            events,
            ejected,
        }
    }

    /// Tells the guest to look at `slot`, where a device was just plugged in.
    pub fn plugged(&mut self, slot: u8) -> Result<(), T::E> {
        self.signal(slot, true)
    }

    /// Asks the guest to release the device in `slot`.
    pub fn request_eject(&mut self, slot: u8) -> Result<(), T::E> {
        self.signal(slot, false)
    }

    fn signal(&mut self, slot: u8, up: bool) -> Result<(), T::E> {
        let bit = 1u32.checked_shl(u32::from(slot)).unwrap_or(0) & self.slots;
        if up {
            self.up |= bit;
            self.down &= !bit;
        } else {
            self.down |= bit;
            self.up &= !bit;
        }
        vm_device::lock(&self.events).raise(acpi::GED_PCI_HOTPLUG)
    }
}

impl<T: Trigger + Send> BusDevice for PciHotplugController<T> {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match offset {
            acpi::PCI_HOTPLUG_UP => std::mem::take(&mut self.up),
            acpi::PCI_HOTPLUG_DOWN => std::mem::take(&mut self.down),
            _ => 0,
        };
        // Only whole-register reads clear anything: AML reads these fields with DWordAcc.
        let bytes = value.to_le_bytes();
        let len = data.len().min(4);
        data[..len].copy_from_slice(&bytes[..len]);
        data[len..].fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != acpi::PCI_HOTPLUG_EJECT || data.len() != 4 {
            return;
        }
        let mask = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & self.slots;
        for slot in (0..32u8).filter(|&slot| mask & (1 << slot) != 0) {
            self.ejected.ejected(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Sender};

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::legacy::IrqfdTrigger;

    struct ToChannel(Mutex<Sender<u8>>);

    impl Ejected for ToChannel {
        fn ejected(&self, slot: u8) {
            let _ = self.0.lock().unwrap().send(slot);
        }
    }

    fn read32(controller: &mut PciHotplugController<IrqfdTrigger>, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        controller.read(0, offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn up_and_down_bitmaps_raise_the_ged_and_read_once() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let events = Arc::new(Mutex::new(GenericEvents::new(IrqfdTrigger(
            irq.try_clone().unwrap(),
        ))));
        let (tx, _rx) = channel();
        let mut controller =
            PciHotplugController::new(24..32, events.clone(), Box::new(ToChannel(Mutex::new(tx))));
        assert_eq!(read32(&mut controller, acpi::PCI_HOTPLUG_UP), 0);
        controller.plugged(24).unwrap();
        controller.plugged(25).unwrap();
        assert_eq!(irq.read().unwrap(), 2, "one interrupt per change");
        let mut ged = [0u8];
        vm_device::lock(&events).read(0, 0, &mut ged);
        assert_eq!(ged[0], acpi::GED_PCI_HOTPLUG);
        assert_eq!(read32(&mut controller, acpi::PCI_HOTPLUG_UP), 0b11 << 24);
        assert_eq!(
            read32(&mut controller, acpi::PCI_HOTPLUG_UP),
            0,
            "read clears"
        );
        assert_eq!(read32(&mut controller, acpi::PCI_HOTPLUG_DOWN), 0);

        controller.request_eject(25).unwrap();
        assert_eq!(read32(&mut controller, acpi::PCI_HOTPLUG_DOWN), 1 << 25);
        assert_eq!(read32(&mut controller, acpi::PCI_HOTPLUG_DOWN), 0);
        // A slot outside the range never shows, though the event is still raised.
        controller.plugged(3).unwrap();
        assert_eq!(read32(&mut controller, acpi::PCI_HOTPLUG_UP), 0);
        assert_eq!(read32(&mut controller, acpi::PCI_HOTPLUG_EJECT), 0);
    }

    #[test]
    fn a_later_request_replaces_an_unread_one_for_the_same_slot() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let events = Arc::new(Mutex::new(GenericEvents::new(IrqfdTrigger(irq))));
        let (tx, _rx) = channel();
        let mut controller =
            PciHotplugController::new(24..32, events, Box::new(ToChannel(Mutex::new(tx))));
        controller.plugged(26).unwrap();
        controller.request_eject(26).unwrap();
        assert_eq!(read32(&mut controller, acpi::PCI_HOTPLUG_UP), 0);
        assert_eq!(read32(&mut controller, acpi::PCI_HOTPLUG_DOWN), 1 << 26);
    }

    #[test]
    fn eject_writes_name_slots_in_the_range_only() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let events = Arc::new(Mutex::new(GenericEvents::new(IrqfdTrigger(irq))));
        let (tx, rx) = channel();
        let mut controller =
            PciHotplugController::new(24..32, events, Box::new(ToChannel(Mutex::new(tx))));
        let value: u32 = 1 << 24 | 1 << 31 | 1 << 5;
        controller.write(0, acpi::PCI_HOTPLUG_EJECT, &value.to_le_bytes());
        // Narrow writes and other registers eject nothing.
        controller.write(0, acpi::PCI_HOTPLUG_EJECT, &[0xff]);
        controller.write(0, acpi::PCI_HOTPLUG_UP, &u32::MAX.to_le_bytes());
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [24, 31]);
    }
}
