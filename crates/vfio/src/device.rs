//! [`VfioPciDevice`]: a host PCI function on warden's bus.
//!
//! Configuration space is the device's own, read and written through VFIO, except what the
//! guest must see as warden's:
//! - the BARs and the expansion ROM: warden places BARs in its own windows (the
//!   [`pci::BarAllocator`]) and offers no ROM; I/O BARs are not offered (no I/O window);
//! - the MSI-X capability: its table and PBA are emulated with [`pci::Msix`], and the vectors
//!   are wired with `VFIO_DEVICE_SET_IRQS` to the eventfds of an [`InterruptGroup`], which the
//!   VMM registers as KVM irqfds, so interrupts go from the host kernel to the vCPU without
//!   waking warden;
//! - MSI and INTx are hidden (MSI capability unlinked from the list, interrupt pin 0): the guest
//!   uses MSI-X, the only interrupt kind wired;
//! - the header type reads as single-function, since only function 0 of a slot is served.
//!
//! BARs the host lets us `mmap` (and that hold no part of the MSI-X table or PBA) are offered to
//! the VMM as [`BarMmap`]s to map straight into the guest; all other BAR accesses trap here and
//! go to the device with `pread`/`pwrite` on its VFIO file.
//!
//! Known limit: a masked MSI-X vector is not held back (the host signals its eventfd directly);
//! guests mask vectors only briefly while reprogramming them and treat a stray interrupt as
//! spurious.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{debug, warn};
use pci::{
    BarKind, BarMove, BarSpec, Msix, PciConfiguration, PciDevice, PciHeader, MSIX_CAPABILITY_ID,
    NUM_BARS,
};
use vfio_bindings::bindings::vfio::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP};
use vfio_ioctls::VfioDevice;
use vm_device::error_limited;
use vm_device::InterruptGroup;

const MSI_CAPABILITY_ID: u8 = 0x05;
const COMMAND_REG: usize = 1;
const HEADER_TYPE_OFFSET: usize = 0x0e;
const CAPABILITY_POINTER_OFFSET: usize = 0x34;
const BAR0_REG: usize = 4;
const ROM_REG: usize = 12;
const INTERRUPT_REG: usize = 15;
const MSIX_CAP_LEN: usize = 12;
const PAGE_SIZE: u64 = 4096;

/// A BAR the VMM should map into the guest: `len` bytes of device memory at `host_addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMmap {
    pub bar: usize,
    pub host_addr: u64,
    pub len: u64,
}

/// The MSI-X capability as the guest sees it at the device's offset, kept at `ours` in the
/// emulated configuration.
struct MsixCap {
    msix: Msix,
    device_offset: usize,
}

/// What the device's capability list looks like once the guest's view is applied: bytes whose
/// value warden chooses (list pointers), and the byte ranges of hidden capabilities.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CapabilityView {
    overrides: Vec<(usize, u8)>,
    hidden: Vec<(usize, usize)>,
    pub(crate) msix: Option<usize>,
}

impl CapabilityView {
    /// Puts warden's bytes into `bytes`, the value of register `reg_idx`; later overrides win.
    pub(crate) fn apply(&self, reg_idx: usize, bytes: &mut [u8; 4]) {
        for &(offset, value) in &self.overrides {
            if offset / 4 == reg_idx {
                bytes[offset % 4] = value;
            }
        }
    }

    /// Whether register `reg_idx` overlaps a hidden capability, so guest writes are dropped.
    pub(crate) fn hides(&self, reg_idx: usize) -> bool {
        let offset = reg_idx * 4;
        self.hidden
            .iter()
            .any(|&(start, end)| offset + 4 > start && offset < end)
    }
}

/// Walks the capability list of `config` (the first 256 bytes of configuration space) and
/// unlinks the capabilities with an ID in `hide`.
pub(crate) fn capability_view(config: &[u8; 256], hide: &[u8]) -> CapabilityView {
    let mut caps = Vec::new();
    let mut offset = usize::from(config[CAPABILITY_POINTER_OFFSET] & !3);
    // A list longer than the space can hold is looping.
    while offset >= 0x40 && caps.len() < 48 {
        caps.push((offset, config[offset]));
        offset = usize::from(config[offset + 1] & !3);
    }
    let mut view = CapabilityView::default();
    let visible: Vec<usize> = caps
        .iter()
        .filter(|(_, id)| !hide.contains(id))
        .map(|&(offset, _)| offset)
        .collect();
    let first = visible.first().copied().unwrap_or(0);
    view.overrides
        .push((CAPABILITY_POINTER_OFFSET, first as u8));
    for (i, &offset) in visible.iter().enumerate() {
        let next = visible.get(i + 1).copied().unwrap_or(0);
        view.overrides.push((offset + 1, next as u8));
    }
    for &(offset, id) in &caps {
        if hide.contains(&id) {
            // Up to the next capability in memory, or a generous 24 bytes (MSI is ≤ 24).
            let end = caps
                .iter()
                .map(|&(o, _)| o)
                .filter(|&o| o > offset)
                .min()
                .unwrap_or(offset + 24)
                .min(256);
            view.hidden.push((offset, end));
        }
        // The guest's driver uses the first MSI-X capability in the list: emulate that one.
        if id == MSIX_CAPABILITY_ID && view.msix.is_none() {
            view.msix = Some(offset);
        }
    }
    view
}

/// The fields of an MSI-X capability: vector count, and the table and PBA as (BAR, offset).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MsixFields {
    pub(crate) vectors: usize,
    pub(crate) table: (usize, u32),
    pub(crate) pba: (usize, u32),
}

/// Reads the MSI-X capability at `offset` of `config`; `None` if its 12 bytes run past the
/// configuration space (the capability pointer can name any dword up to 0xfc).
pub(crate) fn msix_fields(config: &[u8; 256], offset: usize) -> Option<MsixFields> {
    let cap = config.get(offset..offset.checked_add(MSIX_CAP_LEN)?)?;
    let u32_at = |o: usize| u32::from_le_bytes([cap[o], cap[o + 1], cap[o + 2], cap[o + 3]]);
    let control = u16::from_le_bytes([cap[2], cap[3]]);
    let (table, pba) = (u32_at(4), u32_at(8));
    Some(MsixFields {
        vectors: usize::from(control & 0x7ff) + 1,
        table: ((table & 7) as usize, table & !7),
        pba: ((pba & 7) as usize, pba & !7),
    })
}

/// A host PCI function passed through to the guest.
pub struct VfioPciDevice {
    name: String,
    device: Arc<VfioDevice>,
    config: PciConfiguration,
    view: CapabilityView,
    msix: Option<MsixCap>,
    interrupt: Option<Arc<dyn InterruptGroup>>,
    /// Whether VFIO currently routes the device's MSI-X vectors to our eventfds.
    msix_wired: bool,
    mmaps: Vec<BarMmap>,
}

impl VfioPciDevice {
    /// Builds the guest's view of `device`. `interrupts(n)` creates the group of `n` MSI vectors
    /// (called only if the device has MSI-X).
    pub fn new(
        name: &str,
        device: VfioDevice,
        interrupts: impl FnOnce(usize) -> io::Result<Arc<dyn InterruptGroup>>,
    ) -> Result<Self, String> {
        let device = Arc::new(device);
        let mut raw = [0u8; 256];
        device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut raw, 0);
        let u16_at = |o: usize| u16::from_le_bytes([raw[o], raw[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().unwrap());
        if u16_at(0) == 0xffff {
            return Err(format!("{name}: configuration space reads as all-ones"));
        }
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: u16_at(0),
            device_id: u16_at(2),
            revision: raw[8],
            prog_if: raw[9],
            subclass: raw[10],
            class: raw[11],
            subsystem_vendor_id: u16_at(0x2c),
            subsystem_id: u16_at(0x2e),
        });

        let mut bar = 0;
        while bar < NUM_BARS {
            let reg = u32_at((BAR0_REG + bar) * 4);
            let size = device.get_region_size(bar as u32);
            let kind = if reg & 0b110 == 0b100 {
                BarKind::Memory64
            } else {
                BarKind::Memory32
            };
            let slots = if kind == BarKind::Memory64 { 2 } else { 1 };
            if size == 0 {
                // Unimplemented BAR.
            } else if reg & 1 != 0 {
                warn!("{name}: I/O BAR {bar} ({size} bytes) is not offered to the guest: warden has no PCI I/O window");
            } else {
                let spec = BarSpec {
                    size,
                    kind,
                    prefetchable: reg & 0b1000 != 0,
                };
                config
                    .add_bar(bar, spec)
                    .map_err(|err| format!("{name}: BAR {bar}: {err}"))?;
            }
            bar += slots;
        }

        let view = capability_view(&raw, &[MSI_CAPABILITY_ID]);
        let (msix, interrupt) = match view.msix {
            Some(offset) => {
                let fields = msix_fields(&raw, offset).ok_or_else(|| {
                    format!("{name}: MSI-X capability at {offset:#x} runs past configuration space")
                })?;
                let vectors = fields.vectors;
                let interrupt = interrupts(vectors)
                    .map_err(|err| format!("{name}: {vectors} MSI-X vectors: {err}"))?;
                let msix = Msix::new(&mut config, interrupt.clone(), fields.table, fields.pba)
                    .map_err(|err| format!("{name}: MSI-X: {err}"))?;
                let cap = MsixCap {
                    msix,
                    device_offset: offset,
                };
                (Some(cap), Some(interrupt))
            }
            None => {
                warn!("{name}: no MSI-X capability: the guest gets no interrupts from it");
                (None, None)
            }
        };

        let mut dev = VfioPciDevice {
            name: name.to_string(),
            device,
            config,
            view,
            msix,
            interrupt,
            msix_wired: false,
            mmaps: Vec::new(),
        };
        dev.view
            .overrides
            .push((HEADER_TYPE_OFFSET, raw[HEADER_TYPE_OFFSET] & 0x7f));
        dev.map_bars();
        Ok(dev)
    }

    /// BARs mapped into warden for the VMM to give the guest directly.
    pub fn mmaps(&self) -> &[BarMmap] {
        &self.mmaps
    }

    /// Whether BAR `bar` holds part of the MSI-X table or PBA, which must trap.
    fn holds_msix(&self, bar: usize) -> bool {
        self.msix.as_ref().is_some_and(|cap| {
            let table = self.config.read_reg(cap.msix.cap_offset() / 4 + 1);
            let pba = self.config.read_reg(cap.msix.cap_offset() / 4 + 2);
            (table & 7) as usize == bar || (pba & 7) as usize == bar
        })
    }

    fn map_bars(&mut self) {
        let bars: Vec<_> = self.config.bars().collect();
        for (bar, spec) in bars {
            let index = bar as u32;
            let flags = self.device.get_region_flags(index);
            if flags & VFIO_REGION_INFO_FLAG_MMAP == 0
                || spec.size % PAGE_SIZE != 0
                || self.holds_msix(bar)
                || !self.device.get_region_caps(index).is_empty()
            {
                debug!("{}: BAR {bar} traps", self.name);
                continue;
            }
            let offset = self.device.get_region_offset(index);
            // SAFETY: a fresh shared mapping of the device file; nothing else refers to it.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    spec.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    self.device.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if addr == libc::MAP_FAILED {
                warn!(
                    "{}: cannot mmap BAR {bar}, it traps instead: {}",
                    self.name,
                    io::Error::last_os_error()
                );
                continue;
            }
            self.mmaps.push(BarMmap {
                bar,
                host_addr: addr as u64,
                len: spec.size,
            });
        }
    }

    /// The emulated register that stands for device register `reg_idx`, if it is emulated.
    fn emulated(&self, reg_idx: usize) -> Option<usize> {
        match reg_idx {
            r if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&r) => Some(r),
            ROM_REG | INTERRUPT_REG => Some(reg_idx),
            r => {
                let cap = self.msix.as_ref()?;
                let rel = (r * 4).checked_sub(cap.device_offset)?;
                (rel < MSIX_CAP_LEN).then(|| cap.msix.cap_offset() / 4 + rel / 4)
            }
        }
    }

    /// Wires or unwires the device's vectors after the guest toggled MSI-X enable.
    fn sync_msix(&mut self) {
        let (Some(cap), Some(interrupt)) = (&self.msix, &self.interrupt) else {
            return;
        };
        let enabled = vm_device::lock(cap.msix.state()).enabled();
        if enabled == self.msix_wired {
            return;
        }
        let result = if enabled {
            let fds: Vec<_> = (0..interrupt.len())
                .filter_map(|i| interrupt.notifier(i))
                .collect();
            self.device.enable_msix(fds)
        } else {
            self.device.disable_msix()
        };
        match result {
            Ok(()) => self.msix_wired = enabled,
            Err(err) => error_limited!("{}: MSI-X enable={enabled}: {err}", self.name),
        }
    }

    /// Quiesces the device for the next user: interrupts off, then a function reset if the
    /// device supports one.
    pub fn reset(&mut self) {
        if self.msix_wired {
            if let Err(err) = self.device.disable_msix() {
                warn!("{}: disable MSI-X: {err}", self.name);
            }
            self.msix_wired = false;
        }
        self.device.reset();
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        for m in &self.mmaps {
            // SAFETY: the mapping was made by `map_bars` with this length and is ours alone.
            unsafe { libc::munmap(m.host_addr as *mut libc::c_void, m.len as usize) };
        }
    }
}

impl PciDevice for VfioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        let mut bytes = match self.emulated(reg_idx) {
            Some(ours) => self.config.read_reg(ours).to_le_bytes(),
            None => {
                let mut data = [0u8; 4];
                self.device.region_read(
                    VFIO_PCI_CONFIG_REGION_INDEX,
                    &mut data,
                    reg_idx as u64 * 4,
                );
                data
            }
        };
        self.view.apply(reg_idx, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) -> Vec<BarMove> {
        if self.view.hides(reg_idx) {
            debug!(
                "{}: write to hidden capability at register {reg_idx} dropped",
                self.name
            );
            return Vec::new();
        }
        if let Some(ours) = self.emulated(reg_idx) {
            let moves = self.config.write_reg(ours, offset, data);
            if let Some(cap) = &self.msix {
                if ours == cap.msix.cap_offset() / 4 {
                    cap.msix.config_written(&self.config, ours);
                    self.sync_msix();
                }
            }
            return moves;
        }
        // The device must see bus mastering and memory decoding; warden tracks the command
        // register too, to notice BAR moves.
        let moves = if reg_idx == COMMAND_REG {
            self.config.write_reg(reg_idx, offset, data)
        } else {
            Vec::new()
        };
        self.device.region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            data,
            reg_idx as u64 * 4 + offset,
        );
        moves
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if self
            .msix
            .as_ref()
            .is_some_and(|cap| cap.msix.read_bar(bar, offset, data))
        {
            return;
        }
        self.device.region_read(bar as u32, data, offset);
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if self
            .msix
            .as_ref()
            .is_some_and(|cap| cap.msix.write_bar(bar, offset, data))
        {
            return;
        }
        self.device.region_write(bar as u32, data, offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration space whose capability list is `caps` as (offset, ID, next), from `first`.
    fn config_with_caps(caps: &[(usize, u8, usize)], first: usize) -> [u8; 256] {
        let mut raw = [0u8; 256];
        raw[CAPABILITY_POINTER_OFFSET] = first as u8;
        for &(offset, id, next) in caps {
            raw[offset] = id;
            raw[offset + 1] = next as u8;
        }
        raw
    }

    #[test]
    fn msi_is_unlinked_and_msix_found() {
        // 0x40 vendor -> 0x50 MSI -> 0x70 MSI-X -> 0x80 PCIe.
        let raw = config_with_caps(
            &[
                (0x40, 0x09, 0x50),
                (0x50, MSI_CAPABILITY_ID, 0x70),
                (0x70, MSIX_CAPABILITY_ID, 0x80),
                (0x80, 0x10, 0),
            ],
            0x40,
        );
        let view = capability_view(&raw, &[MSI_CAPABILITY_ID]);
        assert_eq!(view.msix, Some(0x70));
        assert_eq!(
            view.overrides,
            [
                (CAPABILITY_POINTER_OFFSET, 0x40),
                (0x41, 0x70),
                (0x71, 0x80),
                (0x81, 0)
            ]
        );
        assert_eq!(view.hidden, [(0x50, 0x70)]);
    }

    #[test]
    fn msi_first_in_the_list_moves_the_pointer() {
        let raw = config_with_caps(
            &[
                (0x40, MSI_CAPABILITY_ID, 0x60),
                (0x60, MSIX_CAPABILITY_ID, 0),
            ],
            0x40,
        );
        let view = capability_view(&raw, &[MSI_CAPABILITY_ID]);
        assert_eq!(view.overrides[0], (CAPABILITY_POINTER_OFFSET, 0x60));
        assert_eq!(view.hidden, [(0x40, 0x60)]);
    }

    #[test]
    fn a_looping_list_ends() {
        let raw = config_with_caps(&[(0x40, 0x09, 0x50), (0x50, 0x09, 0x40)], 0x40);
        let view = capability_view(&raw, &[]);
        assert_eq!(view.msix, None);
        assert!(view.overrides.len() <= 49);
    }

    #[test]
    fn msix_fields_are_read_and_a_capability_past_the_end_is_refused() {
        let mut raw = config_with_caps(&[(0x70, MSIX_CAPABILITY_ID, 0)], 0x70);
        raw[0x72..0x74].copy_from_slice(&0x8003u16.to_le_bytes());
        raw[0x74..0x78].copy_from_slice(&0x2000_u32.to_le_bytes());
        raw[0x78..0x7c].copy_from_slice(&0x3004_u32.to_le_bytes());
        assert_eq!(
            msix_fields(&raw, 0x70),
            Some(MsixFields {
                vectors: 4,
                table: (0, 0x2000),
                pba: (4, 0x3000),
            })
        );
        // The capability pointer can name any dword up to 0xfc; the 12 bytes of MSI-X must fit.
        let raw = config_with_caps(&[(0xf8, MSIX_CAPABILITY_ID, 0)], 0xf8);
        assert_eq!(capability_view(&raw, &[]).msix, Some(0xf8));
        assert_eq!(msix_fields(&raw, 0xf8), None);
        assert!(msix_fields(&raw, 0xf4).is_some());
        assert_eq!(msix_fields(&raw, 0xfc), None);
    }

    /// Linux's driver programs the first MSI-X capability it finds, so that is the one to
    /// emulate.
    #[test]
    fn the_first_msix_capability_is_emulated() {
        let raw = config_with_caps(
            &[
                (0x40, MSIX_CAPABILITY_ID, 0x50),
                (0x50, MSI_CAPABILITY_ID, 0x60),
                (0x60, MSIX_CAPABILITY_ID, 0),
            ],
            0x40,
        );
        assert_eq!(capability_view(&raw, &[MSI_CAPABILITY_ID]).msix, Some(0x40));
    }

    #[test]
    fn no_capabilities() {
        let view = capability_view(&[0u8; 256], &[MSI_CAPABILITY_ID]);
        assert_eq!(view.overrides, [(CAPABILITY_POINTER_OFFSET, 0)]);
        assert!(view.hidden.is_empty());
    }
}
