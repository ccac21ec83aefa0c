//! PCI as the guest sees it, without KVM.
//!
//! [`PciConfiguration`] emulates a type-0 configuration header (IDs, command, BARs with sizing,
//! capability list); [`Msix`] adds an MSI-X capability with its table and PBA; devices implement
//! [`PciDevice`] and are owned by a [`PciRoot`] that answers the legacy 0xCF8/0xCFC mechanism
//! ([`PciConfigIo`]) and ECAM ([`PciConfigMmio`]). [`BarAllocator`] places BARs into the VMM's
//! MMIO windows and hands back one [`PciBarRegion`] per BAR to insert on the MMIO bus.

mod allocator;
mod configuration;
mod device;
mod msix;
mod root;

pub use allocator::{BarAllocator, BarMapping};
pub use configuration::{
    BarKind, BarMove, BarSpec, PciConfiguration, PciHeader, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE,
    CONFIG_SPACE_SIZE, NUM_BARS,
};
pub use device::{EventAddress, PciDevice};
pub use msix::{Msix, MsixState, MAX_MSIX_VECTORS, MSIX_CAPABILITY_ID, MSIX_TABLE_ENTRY_SIZE};
pub use root::{
    BarMoves, HostBridge, PciBarRegion, PciConfigIo, PciConfigMmio, PciRoot, ECAM_BUS_SIZE,
    HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID, MAX_DEVICES,
};

/// Why a PCI structure could not be built or placed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("BAR index {0} is out of range or is the upper half of a 64-bit BAR")]
    BarIndexInvalid(usize),
    #[error("BAR {0} is already in use")]
    BarInUse(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes that fits the BAR type")]
    BarSizeInvalid(u64),
    #[error("address {address:#x} does not suit BAR {bar}")]
    BarAddressInvalid { bar: usize, address: u64 },
    #[error("no room left for a {0}-byte capability in configuration space")]
    CapabilitySpaceFull(usize),
    #[error(
        "capability is shorter than its two-byte header or its write mask has the wrong length"
    )]
    CapabilityInvalid,
    #[error("device number {0} is out of range (0..32)")]
    DeviceNumberInvalid(u8),
    #[error("device number {0} is already taken")]
    DeviceNumberInUse(u8),
    #[error("MMIO window {base:#x}+{size:#x} is invalid")]
    WindowInvalid { base: u64, size: u64 },
    #[error("no room for BAR {bar} ({size:#x} bytes): {source}")]
    BarAllocation {
        bar: usize,
        size: u64,
        source: vm_allocator::Error,
    },
    #[error("MSI-X vector count {0} is not in 1..=2048")]
    MsixVectorCountInvalid(usize),
    #[error("MSI-X table or PBA does not fit its BAR or is misaligned")]
    MsixRegionInvalid,
}
