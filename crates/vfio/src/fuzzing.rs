//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`, off by default).
//!
//! For fuzzing only, not an API: the parsing of the configuration space the host device
//! provides, private to [`crate::device`], as the guest's view of it is built.

use crate::device::{self, CapabilityView};

/// The capability list as the guest sees it, built from a device's configuration space.
pub struct GuestView(CapabilityView);

impl GuestView {
    /// The view of `config` (its first 256 bytes) with the capabilities of IDs in `hide`
    /// unlinked.
    pub fn new(config: &[u8; 256], hide: &[u8]) -> Self {
        GuestView(device::capability_view(config, hide))
    }

    /// Register `reg_idx` as the guest reads it when the device's value is `device_value`.
    pub fn read(&self, reg_idx: usize, device_value: u32) -> u32 {
        let mut bytes = device_value.to_le_bytes();
        self.0.apply(reg_idx, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    /// Whether guest writes to register `reg_idx` are dropped (it overlaps a hidden one).
    pub fn drops_writes(&self, reg_idx: usize) -> bool {
        self.0.hides(reg_idx)
    }

    /// Where the MSI-X capability that warden emulates sits, if any.
    pub fn msix(&self) -> Option<usize> {
        self.0.msix
    }
}

/// The MSI-X capability at `offset` of `config` as (vectors, table, PBA), each of the last two
/// as (BAR, offset); `None` if it runs past the configuration space.
pub fn msix_fields(
    config: &[u8; 256],
    offset: usize,
) -> Option<(usize, (usize, u32), (usize, u32))> {
    device::msix_fields(config, offset).map(|f| (f.vectors, f.table, f.pba))
}
