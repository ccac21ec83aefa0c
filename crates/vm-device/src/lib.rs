//! The contracts between emulated devices and the VMM.
//!
//! Devices never touch KVM. They answer port or MMIO accesses routed to them by a [`Bus`], and
//! they raise interrupts through an [`InterruptGroup`] that the VMM implements with irqfds.
//! Keeping both contracts here lets device crates be unit-tested without a VM. Devices also
//! share [`log_limit`], so that what a guest makes them log cannot flood the host.

pub mod bus;
pub mod interrupt;
pub mod log_limit;

pub use bus::{lock, Bus, BusDevice, BusError};
pub use interrupt::{InterruptGroup, MsiMessage};
