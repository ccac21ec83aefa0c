//! GSI routing for the in-kernel irqchip and MSI vectors delivered through irqfds.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vm_device::{InterruptGroup, MsiMessage};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{IOAPIC_PINS, MSI_GSI_BASE};

/// The VM's GSI routing table. KVM replaces the whole table on every update, so we keep it here
/// and resubmit it each time an MSI vector is reprogrammed.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
    /// Set once the guest has stopped: the VM and its routes go with the process, so the
    /// devices dropped then leave KVM alone (the VMM thread that drops them may not call it).
    stopped: AtomicBool,
}

struct RouterState {
    next_gsi: u32,
    /// GSIs of unplugged devices' vectors, handed out again before `next_gsi`.
    free_gsis: Vec<u32>,
    msi_routes: BTreeMap<u32, MsiMessage>,
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = chip;
    entry.u.irqchip.pin = pin;
    entry
}

fn msi_route(gsi: u32, message: MsiMessage) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi.address_lo = message.address as u32;
    entry.u.msi.address_hi = (message.address >> 32) as u32;
    entry.u.msi.data = message.data;
    entry
}

/// Routes for the legacy interrupt controllers, as a PC wires them: ISA IRQs reach both PICs
/// and the IOAPIC, except that the timer (IRQ0) is on IOAPIC pin 2 (the MADT says so too) and
/// IRQ2 is the PIC cascade.
fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for irq in 0..16 {
        if irq == 2 {
            continue;
        }
        let (chip, pin) = if irq < 8 {
            (KVM_IRQCHIP_PIC_MASTER, irq)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, irq - 8)
        };
        routes.push(irqchip_route(irq, chip, pin));
    }
    for gsi in 0..IOAPIC_PINS {
        match gsi {
            0 => routes.push(irqchip_route(0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            _ => routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi)),
        }
    }
    routes
}

impl GsiRouter {
    /// Installs the legacy routes; MSI routes are added as devices program their vectors.
    pub fn new(vm: Arc<VmFd>) -> io::Result<Arc<Self>> {
        let router = Arc::new(GsiRouter {
            vm,
            state: Mutex::new(RouterState {
                next_gsi: MSI_GSI_BASE,
                free_gsis: Vec::new(),
                msi_routes: BTreeMap::new(),
            }),
            stopped: AtomicBool::new(false),
        });
        router.commit(&router.lock())?;
        Ok(router)
    }

    /// The guest has stopped for good: from now on dropped vectors are not unregistered.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn commit(&self, state: &RouterState) -> io::Result<()> {
        let mut entries = legacy_routes();
        entries.extend(
            state
                .msi_routes
                .iter()
                .map(|(&gsi, &message)| msi_route(gsi, message)),
        );
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|err| io::Error::other(format!("routing table: {err:?}")))?;
        self.vm.set_gsi_routing(&routing).map_err(io::Error::from)
    }

    /// Creates `count` MSI vectors, each an eventfd registered as an irqfd on its own GSI.
    pub fn msi_group(self: &Arc<Self>, count: usize) -> io::Result<Arc<dyn InterruptGroup>> {
        let mut vectors = Vec::with_capacity(count);
        let mut state = self.lock();
        for _ in 0..count {
            let gsi = state.free_gsis.pop().unwrap_or_else(|| {
                state.next_gsi += 1;
                state.next_gsi - 1
            });
            let eventfd = EventFd::new(libc::EFD_NONBLOCK)?;
            // A route must exist before the irqfd fires; a zero message is a harmless MSI
            // until the guest programs the vector (the transport keeps it masked until then).
            state.msi_routes.insert(gsi, MsiMessage::default());
            vectors.push((gsi, eventfd));
        }
        self.commit(&state)?;
        drop(state);
        for (gsi, eventfd) in &vectors {
            self.vm.register_irqfd(eventfd, *gsi)?;
        }
        Ok(Arc::new(MsiGroup {
            router: Arc::clone(self),
            vectors,
        }))
    }

    /// An eventfd that raises IOAPIC/PIC line `gsi` when written (edge-triggered).
    pub fn legacy_irqfd(&self, gsi: u32) -> io::Result<EventFd> {
        let eventfd = EventFd::new(libc::EFD_NONBLOCK)?;
        self.vm.register_irqfd(&eventfd, gsi)?;
        Ok(eventfd)
    }
}

/// One device's MSI vectors.
struct MsiGroup {
    router: Arc<GsiRouter>,
    vectors: Vec<(u32, EventFd)>,
}

impl InterruptGroup for MsiGroup {
    fn len(&self) -> usize {
        self.vectors.len()
    }

    fn update(&self, index: usize, message: MsiMessage, _masked: bool) -> io::Result<()> {
        // Masking is the MSI-X emulation's job (it holds back triggers and sets PBA bits), so
        // the route always carries the latest message.
        let (gsi, _) = self.vectors.get(index).ok_or_else(|| bad_vector(index))?;
        let mut state = self.router.lock();
        if state.msi_routes.insert(*gsi, message) == Some(message) {
            return Ok(());
        }
        self.router.commit(&state)
    }

    fn trigger(&self, index: usize) -> io::Result<()> {
        let (_, eventfd) = self.vectors.get(index).ok_or_else(|| bad_vector(index))?;
        eventfd.write(1)
    }

    fn notifier(&self, index: usize) -> Option<&EventFd> {
        self.vectors.get(index).map(|(_, eventfd)| eventfd)
    }
}

/// An unplugged device's vectors: their irqfds and routes go, and their GSIs are reused, so
/// plugging devices in and out does not use up KVM's routing table.
impl Drop for MsiGroup {
    fn drop(&mut self) {
        if self.router.stopped.load(Ordering::Acquire) {
            return;
        }
        for (gsi, eventfd) in &self.vectors {
            if let Err(err) = self.router.vm.unregister_irqfd(eventfd, *gsi) {
                log::warn!("GSI {gsi}: cannot remove the irqfd: {err}");
            }
        }
        let mut state = self.router.lock();
        for (gsi, _) in &self.vectors {
            state.msi_routes.remove(gsi);
            state.free_gsis.push(*gsi);
        }
        if let Err(err) = self.router.commit(&state) {
            log::warn!("cannot drop the routes of an unplugged device: {err}");
        }
    }
}

fn bad_vector(index: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("no MSI vector {index}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_goes_to_ioapic_pin_2_and_cascade_is_unrouted() {
        let routes = legacy_routes();
        let ioapic_pin = |gsi: u32| {
            routes.iter().find_map(|r| {
                // SAFETY: every legacy route is of the irqchip kind.
                let chip = unsafe { r.u.irqchip };
                (r.gsi == gsi && chip.irqchip == KVM_IRQCHIP_IOAPIC).then_some(chip.pin)
            })
        };
        assert_eq!(ioapic_pin(0), Some(2));
        assert_eq!(ioapic_pin(2), None);
        assert_eq!(ioapic_pin(4), Some(4));
        assert_eq!(ioapic_pin(23), Some(23));
        assert!(!routes.iter().any(|r| r.gsi == 2));
    }
}
