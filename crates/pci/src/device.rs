//! The contract between a PCI function and the bus that owns it.

use vmm_sys_util::eventfd::EventFd;

use crate::{BarMove, PciConfiguration};

/// Where a KVM ioeventfd listens: a port, or a guest-physical MMIO address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventAddress {
    Port(u16),
    Memory(u64),
}

/// A function on the PCI bus.
///
/// Config accesses arrive as dword registers of the conventional 256-byte space (the root
/// handles sub-dword extraction and the extended space); BAR accesses arrive with offsets
/// relative to the BAR's base so a move costs the device nothing.
pub trait PciDevice: Send {
    /// The function's configuration header.
    fn config(&self) -> &PciConfiguration;

    /// Mutable access, used to place BARs.
    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// Reads config register `reg_idx` (0..64). Override to give registers read side effects.
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config().read_reg(reg_idx)
    }

    /// Writes `data` at byte `offset` of config register `reg_idx` (0..64); returns the BARs
    /// the guest moved. Override to react to writes (MSI-X control, capability windows).
    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) -> Vec<BarMove> {
        self.config_mut().write_reg(reg_idx, offset, data)
    }

    /// Reads `data.len()` bytes at `offset` within BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// Writes `data` at `offset` within BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// Eventfds the VMM should register as KVM ioeventfds, with the address of each; valid
    /// once BARs are placed, and shifted by any [`BarMove`].
    fn ioeventfds(&self) -> Vec<(&EventFd, EventAddress)> {
        Vec::new()
    }
}
