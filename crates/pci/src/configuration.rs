//! Type-0 configuration header emulation.
//!
//! The 256-byte space is kept as 64 little-endian dwords plus a per-bit write mask, so every
//! read-only field, BAR sizing and capability body follows from one rule: a write only changes
//! the bits its mask allows.

use log::debug;
use vm_device::warn_limited;

use crate::PciError;

/// Size of the conventional configuration space; ECAM's extended space beyond it reads as zero.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Number of BAR slots in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Command register: decode I/O BARs.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register: decode memory BARs.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;

const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
const COMMAND_REG: usize = 1;
const CLASS_REG: usize = 2;
const HEADER_REG: usize = 3;
const BAR0_REG: usize = 4;
const SUBSYSTEM_REG: usize = 11;
const CAPABILITY_POINTER_OFFSET: usize = 0x34;
const INTERRUPT_LINE_OFFSET: usize = 0x3c;
const INTERRUPT_PIN_OFFSET: usize = 0x3d;
const FIRST_CAPABILITY_OFFSET: usize = 0x40;

/// I/O space, memory space, bus master, parity error response, SERR# enable, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Status bit 4: the capability pointer is valid.
const STATUS_CAPABILITY_LIST: u32 = 1 << 4;
const BAR_IO_SPACE: u32 = 1;
const BAR_MEMORY_64: u32 = 0b10 << 1;
const BAR_PREFETCHABLE: u32 = 1 << 3;
/// Largest I/O BAR: the whole 16-bit port space.
const MAX_IO_BAR_SIZE: u64 = 1 << 16;

/// The identity of a function: what the guest matches drivers against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// The address space a BAR decodes in, and for memory how many address bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Memory32,
    /// Occupies two BAR slots: `index` and `index + 1`.
    Memory64,
    /// Port I/O: a guest `out` to it exits to the VMM with the port already decoded, cheaper
    /// than an MMIO access the hypervisor must decode from the instruction.
    Io,
}

impl BarKind {
    /// The low bits of the BAR register that hold flags rather than address bits.
    fn flags_mask(self) -> u32 {
        match self {
            BarKind::Io => 0x3,
            BarKind::Memory32 | BarKind::Memory64 => 0xf,
        }
    }

    /// The command register bit that makes the function decode BARs of this kind.
    fn decode_bit(self) -> u16 {
        match self {
            BarKind::Io => COMMAND_IO_SPACE,
            BarKind::Memory32 | BarKind::Memory64 => COMMAND_MEMORY_SPACE,
        }
    }
}

/// What a device asks of one BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// Length of the region: a power of two of at least 16 bytes.
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

/// The guest reprogrammed a BAR while memory decoding was enabled: the VMM must move the BAR's
/// bus range (and any ioeventfd inside it) from `old_base` to `new_base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    pub bar: usize,
    pub old_base: u64,
    pub new_base: u64,
    pub len: u64,
}

#[derive(Clone, Copy, Debug)]
enum BarSlot {
    Empty,
    /// `mapped` is where the VMM placed the BAR (or where the last reported move put it).
    Bar {
        spec: BarSpec,
        mapped: u64,
    },
    /// Upper dword of the 64-bit BAR in the previous slot.
    Upper,
}

/// A type-0 configuration space: header, BARs and capability list.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    bars: [BarSlot; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl PciConfiguration {
    /// A header with memory-space decoding off, no BARs and no capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut regs = [0u32; NUM_REGS];
        let mut writable = [0u32; NUM_REGS];
        regs[0] = u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        regs[CLASS_REG] = u32::from(header.class) << 24
            | u32::from(header.subclass) << 16
            | u32::from(header.prog_if) << 8
            | u32::from(header.revision);
        regs[SUBSYSTEM_REG] =
            u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        writable[COMMAND_REG] = COMMAND_WRITABLE;
        // Cache line size is writable (Linux programs it); latency timer, header type (0: type-0,
        // single function) and BIST stay read-only zero.
        writable[HEADER_REG] = 0xff;
        // Interrupt line is scratch space for the guest; the pin stays read-only.
        writable[INTERRUPT_LINE_OFFSET / 4] = 0xff;
        Self {
            regs,
            writable,
            bars: [BarSlot::Empty; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY_OFFSET,
        }
    }

    /// Sets the interrupt pin (1 = INTA#); 0, the default, means the function has no INTx.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.set_byte(INTERRUPT_PIN_OFFSET, pin);
    }

    /// Declares BAR `index`; its address stays zero until [`PciConfiguration::set_bar_address`].
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), PciError> {
        let slots = match spec.kind {
            BarKind::Memory32 | BarKind::Io => 1,
            BarKind::Memory64 => 2,
        };
        if index + slots > NUM_BARS {
            return Err(PciError::BarIndexInvalid(index));
        }
        if self.bars[index..index + slots]
            .iter()
            .any(|slot| !matches!(slot, BarSlot::Empty))
        {
            return Err(PciError::BarInUse(index));
        }
        let (min_size, max_size) = match spec.kind {
            BarKind::Memory32 => (16, 1 << 31),
            BarKind::Memory64 => (16, 1 << 63),
            BarKind::Io => (4, MAX_IO_BAR_SIZE),
        };
        if !spec.size.is_power_of_two() || spec.size < min_size || spec.size > max_size {
            return Err(PciError::BarSizeInvalid(spec.size));
        }
        let mut flags = 0;
        if spec.kind == BarKind::Io {
            flags |= BAR_IO_SPACE;
        } else if spec.prefetchable {
            flags |= BAR_PREFETCHABLE;
        }
        let size_mask = !(spec.size - 1);
        let reg = BAR0_REG + index;
        if spec.kind == BarKind::Memory64 {
            flags |= BAR_MEMORY_64;
            self.regs[reg + 1] = 0;
            self.writable[reg + 1] = (size_mask >> 32) as u32;
            self.bars[index + 1] = BarSlot::Upper;
        }
        self.regs[reg] = flags;
        self.writable[reg] = size_mask as u32 & !spec.kind.flags_mask();
        self.bars[index] = BarSlot::Bar { spec, mapped: 0 };
        Ok(())
    }

    /// The BARs the device declared, by index.
    pub fn bars(&self) -> impl Iterator<Item = (usize, BarSpec)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| match slot {
                BarSlot::Bar { spec, .. } => Some((index, *spec)),
                _ => None,
            })
    }

    /// Where BAR `index` sits on the VMM's bus: the address it was allocated at, or the latest
    /// [`BarMove`] target.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        match self.bars.get(index)? {
            BarSlot::Bar { mapped, .. } => Some(*mapped),
            _ => None,
        }
    }

    /// Places BAR `index` at `address`, as firmware would: programs the register and records
    /// the address as mapped.
    pub fn set_bar_address(&mut self, index: usize, address: u64) -> Result<(), PciError> {
        let Some(BarSlot::Bar { spec, mapped }) = self.bars.get_mut(index) else {
            return Err(PciError::BarIndexInvalid(index));
        };
        let fits = match spec.kind {
            BarKind::Memory32 => address.checked_add(spec.size) <= Some(1 << 32),
            BarKind::Memory64 => address.checked_add(spec.size).is_some(),
            BarKind::Io => address.checked_add(spec.size) <= Some(MAX_IO_BAR_SIZE),
        };
        if !address.is_multiple_of(spec.size) || !fits {
            return Err(PciError::BarAddressInvalid {
                bar: index,
                address,
            });
        }
        *mapped = address;
        let kind = spec.kind;
        let reg = BAR0_REG + index;
        let flags = kind.flags_mask();
        self.regs[reg] = (self.regs[reg] & flags) | (address as u32 & !flags);
        if kind == BarKind::Memory64 {
            self.regs[reg + 1] = (address >> 32) as u32;
        }
        Ok(())
    }

    /// Appends a capability and links it into the list.
    ///
    /// `cap[0]` is the capability ID and `cap[1]` is overwritten with the next pointer.
    /// `writable` is either empty (read-only body) or a per-byte write mask as long as `cap`.
    /// Returns the capability's offset in configuration space.
    pub fn add_capability(&mut self, cap: &[u8], writable: &[u8]) -> Result<usize, PciError> {
        if cap.len() < 2 || !(writable.is_empty() || writable.len() == cap.len()) {
            return Err(PciError::CapabilityInvalid);
        }
        let offset = self.next_capability;
        if offset + cap.len() > CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilitySpaceFull(cap.len()));
        }
        for (i, &byte) in cap.iter().enumerate() {
            self.set_byte(offset + i, if i == 1 { 0 } else { byte });
            // The ID and next pointer are never writable.
            let mask = if i < 2 {
                0
            } else {
                writable.get(i).copied().unwrap_or(0)
            };
            self.set_writable_byte(offset + i, mask);
        }
        match self.last_capability {
            Some(last) => self.set_byte(last + 1, offset as u8),
            None => {
                self.set_byte(CAPABILITY_POINTER_OFFSET, offset as u8);
                self.regs[COMMAND_REG] |= STATUS_CAPABILITY_LIST << 16;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (offset + cap.len()).next_multiple_of(4);
        Ok(offset)
    }

    /// Reads dword register `reg_idx`; registers past the conventional space read as zero.
    pub fn read_reg(&self, reg_idx: usize) -> u32 {
        self.regs.get(reg_idx).copied().unwrap_or(0)
    }

    /// The command register as last written by the guest.
    pub fn command(&self) -> u16 {
        self.regs[COMMAND_REG] as u16
    }

    /// Writes `data` (1, 2 or 4 bytes, not crossing the dword) at byte `offset` of register
    /// `reg_idx`, honouring the write mask. Returns the BARs the write moved.
    pub fn write_reg(&mut self, reg_idx: usize, offset: u64, data: &[u8]) -> Vec<BarMove> {
        let offset = offset as usize;
        if reg_idx >= NUM_REGS || !matches!(data.len(), 1 | 2 | 4) || offset + data.len() > 4 {
            debug!(
                "ignoring config write of {} bytes at register {reg_idx} offset {offset}",
                data.len()
            );
            return Vec::new();
        }
        let mut value = self.regs[reg_idx];
        for (i, &byte) in data.iter().enumerate() {
            let shift = (offset + i) * 8;
            let mask = (self.writable[reg_idx] >> shift) & 0xff;
            value = (value & !(mask << shift)) | ((u32::from(byte) & mask) << shift);
        }
        self.regs[reg_idx] = value;

        // An all-ones write is BAR sizing, not a new address; the restoring write follows.
        let sizing = data.iter().all(|&b| b == 0xff);
        match reg_idx {
            COMMAND_REG => (0..NUM_BARS)
                .filter_map(|i| self.check_bar_move(i))
                .collect(),
            r if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&r) && !sizing => {
                let index = r - BAR0_REG;
                // A 64-bit BAR is only complete once its upper half is written (Linux writes the
                // lower half first), so only that write can move it.
                let moved = match self.bars[index] {
                    BarSlot::Bar { spec, .. } if spec.kind != BarKind::Memory64 => {
                        self.check_bar_move(index)
                    }
                    BarSlot::Upper => self.check_bar_move(index - 1),
                    _ => None,
                };
                moved.into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// The address the guest programmed into BAR `index` (which must be a BAR slot).
    fn programmed_address(&self, index: usize, kind: BarKind) -> u64 {
        let low = u64::from(self.regs[BAR0_REG + index] & !kind.flags_mask());
        match kind {
            BarKind::Memory32 | BarKind::Io => low,
            BarKind::Memory64 => u64::from(self.regs[BAR0_REG + index + 1]) << 32 | low,
        }
    }

    fn check_bar_move(&mut self, index: usize) -> Option<BarMove> {
        let BarSlot::Bar { spec, mapped } = self.bars[index] else {
            return None;
        };
        if self.command() & spec.kind.decode_bit() == 0 {
            return None;
        }
        let programmed = self.programmed_address(index, spec.kind);
        if programmed == mapped {
            return None;
        }
        warn_limited!("guest moved BAR {index} from {mapped:#x} to {programmed:#x}");
        self.bars[index] = BarSlot::Bar {
            spec,
            mapped: programmed,
        };
        Some(BarMove {
            bar: index,
            old_base: mapped,
            new_base: programmed,
            len: spec.size,
        })
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    fn set_writable_byte(&mut self, offset: usize, mask: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.writable[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(mask) << shift);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class: 0x01,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    fn write32(config: &mut PciConfiguration, reg: usize, value: u32) -> Vec<BarMove> {
        config.write_reg(reg, 0, &value.to_le_bytes())
    }

    #[test]
    fn header_fields_are_read_only() {
        let mut config = PciConfiguration::new(&header());
        assert_eq!(config.read_reg(0), 0x1042_1af4);
        assert_eq!(config.read_reg(2), 0x0100_0001);
        assert_eq!(config.read_reg(11), 0x0040_1af4);
        for reg in [0, 2, 11, 12, 13] {
            let before = config.read_reg(reg);
            write32(&mut config, reg, 0xdead_beef);
            assert_eq!(config.read_reg(reg), before, "register {reg}");
        }
    }

    #[test]
    fn command_has_only_defined_writable_bits_and_status_is_read_only() {
        let mut config = PciConfiguration::new(&header());
        write32(&mut config, 1, 0xffff_ffff);
        assert_eq!(config.read_reg(1), 0x0000_0547);
        assert_eq!(config.command(), 0x547);
    }

    #[test]
    fn sub_dword_writes_touch_only_their_bytes() {
        let mut config = PciConfiguration::new(&header());
        config.set_interrupt_pin(1);
        config.write_reg(15, 0, &[0x0b]);
        assert_eq!(config.read_reg(15), 0x0000_010b);
        // Cache line size (byte 0 of register 3) is writable, header type (byte 2) is not.
        config.write_reg(3, 0, &[0x10]);
        config.write_reg(3, 2, &[0x80]);
        assert_eq!(config.read_reg(3), 0x10);
        config.write_reg(1, 2, &[0xff, 0xff]);
        config.write_reg(1, 0, &[0x06, 0x00]);
        assert_eq!(config.read_reg(1), 0x0006);
    }

    #[test]
    fn malformed_writes_are_ignored() {
        let mut config = PciConfiguration::new(&header());
        config.write_reg(1, 3, &[0xff, 0xff]);
        config.write_reg(1, 0, &[0xff, 0xff, 0xff]);
        config.write_reg(1, 0, &[0xff; 8]);
        config.write_reg(64, 0, &[0xff; 4]);
        config.write_reg(usize::MAX, 0, &[0xff; 4]);
        assert_eq!(config.read_reg(1), 0);
        assert_eq!(config.read_reg(64), 0);
    }

    #[test]
    fn bar32_sizing_reads_back_size_mask_and_flags() {
        let mut config = PciConfiguration::new(&header());
        let spec = BarSpec {
            size: 0x1000,
            kind: BarKind::Memory32,
            prefetchable: true,
        };
        config.add_bar(2, spec).unwrap();
        config.set_bar_address(2, 0xc000_1000).unwrap();
        assert_eq!(config.read_reg(6), 0xc000_1008);
        write32(&mut config, 6, 0xffff_ffff);
        assert_eq!(config.read_reg(6), 0xffff_f008);
        write32(&mut config, 6, 0xc000_1000);
        assert_eq!(config.read_reg(6), 0xc000_1008);
        assert_eq!(config.bars().collect::<Vec<_>>(), vec![(2, spec)]);
    }

    #[test]
    fn bar64_sizing_covers_both_halves() {
        let mut config = PciConfiguration::new(&header());
        let spec = BarSpec {
            size: 0x4000,
            kind: BarKind::Memory64,
            prefetchable: false,
        };
        config.add_bar(0, spec).unwrap();
        config.set_bar_address(0, 0x1_0000_8000).unwrap();
        assert_eq!(config.read_reg(4), 0x0000_8004);
        assert_eq!(config.read_reg(5), 0x1);
        write32(&mut config, 4, 0xffff_ffff);
        write32(&mut config, 5, 0xffff_ffff);
        assert_eq!(config.read_reg(4), 0xffff_c004);
        assert_eq!(config.read_reg(5), 0xffff_ffff);

        let mut big = PciConfiguration::new(&header());
        big.add_bar(
            2,
            BarSpec {
                size: 1 << 33,
                ..spec
            },
        )
        .unwrap();
        write32(&mut big, 6, 0xffff_ffff);
        write32(&mut big, 7, 0xffff_ffff);
        assert_eq!(big.read_reg(6), 0x0000_0004);
        assert_eq!(big.read_reg(7), 0xffff_fffe);
    }

    #[test]
    fn unused_bars_and_rom_read_zero_after_sizing() {
        let mut config = PciConfiguration::new(&header());
        for reg in 4..10 {
            write32(&mut config, reg, 0xffff_ffff);
            assert_eq!(config.read_reg(reg), 0);
        }
        write32(&mut config, 12, 0xffff_ffff);
        assert_eq!(config.read_reg(12), 0);
    }

    #[test]
    fn bar_declaration_is_validated() {
        let mut config = PciConfiguration::new(&header());
        let spec = BarSpec {
            size: 0x1000,
            kind: BarKind::Memory64,
            prefetchable: false,
        };
        assert_eq!(config.add_bar(5, spec), Err(PciError::BarIndexInvalid(5)));
        config.add_bar(0, spec).unwrap();
        assert_eq!(config.add_bar(1, spec), Err(PciError::BarInUse(1)));
        let small = BarSpec {
            kind: BarKind::Memory32,
            size: 8,
            prefetchable: false,
        };
        assert_eq!(config.add_bar(2, small), Err(PciError::BarSizeInvalid(8)));
        let odd = BarSpec {
            size: 0x3000,
            ..small
        };
        assert_eq!(
            config.add_bar(2, odd),
            Err(PciError::BarSizeInvalid(0x3000))
        );
        assert_eq!(
            config.set_bar_address(0, 0x800),
            Err(PciError::BarAddressInvalid {
                bar: 0,
                address: 0x800
            })
        );
        assert_eq!(
            config.set_bar_address(1, 0x1000),
            Err(PciError::BarIndexInvalid(1))
        );
        config
            .add_bar(
                2,
                BarSpec {
                    size: 0x1000,
                    ..small
                },
            )
            .unwrap();
        assert!(config.set_bar_address(2, 0xffff_f000).is_ok());
        assert!(config.set_bar_address(2, 0x1_0000_0000).is_err());
    }

    #[test]
    fn capability_chain_links_in_order() {
        let mut config = PciConfiguration::new(&header());
        assert_eq!(config.read_reg(1) >> 16 & STATUS_CAPABILITY_LIST, 0);
        let first = config.add_capability(&[0x09, 0xaa, 5, 1], &[]).unwrap();
        let second = config.add_capability(&[0x11, 0, 1, 2, 3], &[]).unwrap();
        let third = config.add_capability(&[0x09, 0, 3], &[]).unwrap();
        assert_eq!((first, second, third), (0x40, 0x44, 0x4c));
        assert_ne!(config.read_reg(1) >> 16 & STATUS_CAPABILITY_LIST, 0);

        let byte = |c: &PciConfiguration, off: usize| (c.read_reg(off / 4) >> (off % 4 * 8)) as u8;
        let mut walk = Vec::new();
        let mut next = byte(&config, 0x34) as usize;
        while next != 0 {
            walk.push((next, byte(&config, next)));
            next = byte(&config, next + 1) as usize;
        }
        assert_eq!(walk, vec![(0x40, 0x09), (0x44, 0x11), (0x4c, 0x09)]);
        assert_eq!(byte(&config, 0x42), 5);
    }

    #[test]
    fn capability_write_mask_applies() {
        let mut config = PciConfiguration::new(&header());
        let off = config
            .add_capability(&[0x11, 0, 0x03, 0x00], &[0xff, 0xff, 0x00, 0xc0])
            .unwrap();
        write32(&mut config, off / 4, 0xffff_ffff);
        // ID and next pointer stay, byte 2 is read-only, only the top bits of byte 3 change.
        assert_eq!(config.read_reg(off / 4), 0xc003_0011);
    }

    #[test]
    fn capability_space_is_bounded() {
        let mut config = PciConfiguration::new(&header());
        config.add_capability(&[0x09; 180], &[]).unwrap();
        assert_eq!(
            config.add_capability(&[0x09; 20], &[]),
            Err(PciError::CapabilitySpaceFull(20))
        );
        assert_eq!(
            config.add_capability(&[0x09], &[]),
            Err(PciError::CapabilityInvalid)
        );
        assert_eq!(
            config.add_capability(&[0x09, 0, 0], &[0]),
            Err(PciError::CapabilityInvalid)
        );
    }

    fn bar_config() -> PciConfiguration {
        let mut config = PciConfiguration::new(&header());
        config
            .add_bar(
                0,
                BarSpec {
                    size: 0x4000,
                    kind: BarKind::Memory64,
                    prefetchable: false,
                },
            )
            .unwrap();
        config
            .add_bar(
                2,
                BarSpec {
                    size: 0x1000,
                    kind: BarKind::Memory32,
                    prefetchable: false,
                },
            )
            .unwrap();
        config.set_bar_address(0, 0x2_0000_0000).unwrap();
        config.set_bar_address(2, 0xc000_0000).unwrap();
        config
    }

    #[test]
    fn keeping_firmware_addresses_moves_nothing() {
        let mut config = bar_config();
        assert!(write32(&mut config, 1, u32::from(COMMAND_MEMORY_SPACE)).is_empty());
        // Linux sizing with decoding left on, then restoring.
        for (reg, value) in [(4, 0), (5, 2), (6, 0xc000_0000)] {
            assert!(write32(&mut config, reg, 0xffff_ffff).is_empty());
            assert!(write32(&mut config, reg, value).is_empty());
        }
        assert_eq!(config.bar_address(0), Some(0x2_0000_0000));
    }

    #[test]
    fn moves_are_reported_only_while_decoding() {
        let mut config = bar_config();
        // Decoding off: rewriting addresses is silent until decoding is turned on.
        assert!(write32(&mut config, 6, 0xd000_0000).is_empty());
        let moves = write32(&mut config, 1, u32::from(COMMAND_MEMORY_SPACE));
        assert_eq!(
            moves,
            vec![BarMove {
                bar: 2,
                old_base: 0xc000_0000,
                new_base: 0xd000_0000,
                len: 0x1000
            }]
        );
        assert_eq!(config.bar_address(2), Some(0xd000_0000));

        // Decoding on: a 64-bit BAR moves once its upper half is written.
        assert!(write32(&mut config, 4, 0x4000).is_empty());
        let moves = write32(&mut config, 5, 0x3);
        assert_eq!(
            moves,
            vec![BarMove {
                bar: 0,
                old_base: 0x2_0000_0000,
                new_base: 0x3_0000_4000,
                len: 0x4000
            }]
        );
        assert!(write32(&mut config, 1, u32::from(COMMAND_MEMORY_SPACE)).is_empty());
    }

    #[test]
    fn io_bars_size_and_move_with_io_decoding() {
        let mut config = PciConfiguration::new(&header());
        let spec = BarSpec {
            size: 0x20,
            kind: BarKind::Io,
            prefetchable: false,
        };
        config.add_bar(1, spec).unwrap();
        config.set_bar_address(1, 0x1000).unwrap();
        assert_eq!(config.read_reg(5), 0x1001);
        assert!(write32(&mut config, 5, 0xffff_ffff).is_empty(), "sizing");
        assert_eq!(config.read_reg(5), 0xffff_ffe1);
        assert!(write32(&mut config, 5, 0x1000).is_empty());
        assert!(
            config.set_bar_address(1, 0xfff0).is_err(),
            "past the port space"
        );
        // Memory decoding does not move an I/O BAR; I/O decoding does.
        assert!(write32(&mut config, 5, 0x2000).is_empty());
        assert!(write32(&mut config, 1, u32::from(COMMAND_MEMORY_SPACE)).is_empty());
        let moves = write32(&mut config, 1, u32::from(COMMAND_IO_SPACE));
        assert_eq!(
            moves,
            vec![BarMove {
                bar: 1,
                old_base: 0x1000,
                new_base: 0x2000,
                len: 0x20
            }]
        );
    }
}
