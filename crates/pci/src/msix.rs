//! MSI-X: capability, vector table and pending-bit array.
//!
//! The vector state lives behind its own mutex ([`MsixState`]) because two parties touch it: the
//! vCPU thread programming the table through the BAR, and device workers firing vectors. Every
//! change to a vector's effective message or mask is pushed to the [`InterruptGroup`] so the VMM
//! can keep its KVM routes in step; a vector fired while masked sets its pending bit and is
//! delivered as soon as it is unmasked.

use std::io;
use std::sync::{Arc, Mutex};

use log::debug;
use vm_device::error_limited;
use vm_device::{lock, InterruptGroup, MsiMessage};
use vmm_sys_util::eventfd::EventFd;

use crate::{PciConfiguration, PciError};

/// PCI capability ID of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes per MSI-X table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// The table-size field holds N - 1 in 11 bits.
pub const MAX_MSIX_VECTORS: u16 = 2048;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CONTROL_MASK: u32 = 1;

#[derive(Clone, Copy, Debug)]
struct TableEntry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

impl Default for TableEntry {
    /// Vectors come out of reset masked.
    fn default() -> Self {
        Self {
            address_lo: 0,
            address_hi: 0,
            data: 0,
            control: VECTOR_CONTROL_MASK,
        }
    }
}

/// The guest-programmed vectors of one function and their pending bits.
pub struct MsixState {
    entries: Vec<TableEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// What was last passed to `InterruptGroup::update`, so routes are only rewritten on change.
    pushed: Vec<(MsiMessage, bool)>,
    interrupt: Arc<dyn InterruptGroup>,
}

impl MsixState {
    /// One vector per interrupt in `interrupt`; all masked, as after reset. The group is assumed
    /// to start masked too.
    fn new(interrupt: Arc<dyn InterruptGroup>) -> Self {
        let vectors = interrupt.len();
        Self {
            entries: vec![TableEntry::default(); vectors],
            pba: vec![0; vectors.div_ceil(64)],
            enabled: false,
            function_masked: false,
            pushed: vec![(MsiMessage::default(), true); vectors],
            interrupt,
        }
    }

    /// Whether the guest set the MSI-X enable bit.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Fires `vector`, or records it as pending while it (or the whole function) is masked or
    /// MSI-X is disabled, so the interrupt is not lost.
    pub fn trigger(&mut self, vector: u16) -> io::Result<()> {
        let index = usize::from(vector);
        if index >= self.entries.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("MSI-X vector {vector} out of range"),
            ));
        }
        if self.is_masked(index) {
            self.pba[index / 64] |= 1 << (index % 64);
            return Ok(());
        }
        self.interrupt.trigger(index)
    }

    /// The eventfd that fires `vector` in KVM (its irqfd), whatever its mask bit says.
    pub fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.interrupt.notifier(usize::from(vector))
    }

    /// Whether `vector` has a pending bit set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let index = usize::from(vector);
        index < self.entries.len() && self.pba[index / 64] & (1 << (index % 64)) != 0
    }

    fn is_masked(&self, index: usize) -> bool {
        !self.enabled
            || self.function_masked
            || self.entries[index].control & VECTOR_CONTROL_MASK != 0
    }

    fn message(&self, index: usize) -> MsiMessage {
        let entry = &self.entries[index];
        MsiMessage {
            address: u64::from(entry.address_hi) << 32 | u64::from(entry.address_lo),
            data: entry.data,
        }
    }

    fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if (enabled, function_masked) == (self.enabled, self.function_masked) {
            return;
        }
        debug!("MSI-X enabled={enabled} function_masked={function_masked}");
        self.enabled = enabled;
        self.function_masked = function_masked;
        for index in 0..self.entries.len() {
            self.sync(index);
        }
    }

    /// Pushes vector `index`'s effective state to the group if it changed, then delivers a
    /// pending interrupt if the vector is now unmasked.
    fn sync(&mut self, index: usize) {
        let state = (self.message(index), self.is_masked(index));
        if self.pushed[index] != state {
            if let Err(err) = self.interrupt.update(index, state.0, state.1) {
                error_limited!("cannot update MSI-X vector {index}: {err}");
            }
            self.pushed[index] = state;
        }
        let bit = 1u64 << (index % 64);
        if !state.1 && self.pba[index / 64] & bit != 0 {
            self.pba[index / 64] &= !bit;
            if let Err(err) = self.interrupt.trigger(index) {
                error_limited!("cannot deliver pending MSI-X vector {index}: {err}");
            }
        }
    }

    fn read_table(&self, offset: u64, data: &mut [u8]) {
        // Zeros for the accesses `for_each_dword` drops: `data` holds a previous exit's bytes.
        data.fill(0);
        for_each_dword(offset, data.len(), |dword_offset, range| {
            let index = (dword_offset / MSIX_TABLE_ENTRY_SIZE) as usize;
            let value = self.entries.get(index).map_or(0, |entry| {
                match dword_offset % MSIX_TABLE_ENTRY_SIZE {
                    0 => entry.address_lo,
                    4 => entry.address_hi,
                    8 => entry.data,
                    _ => entry.control,
                }
            });
            data[range].copy_from_slice(&value.to_le_bytes());
        });
    }

    fn write_table(&mut self, offset: u64, data: &[u8]) {
        for_each_dword(offset, data.len(), |dword_offset, range| {
            let index = (dword_offset / MSIX_TABLE_ENTRY_SIZE) as usize;
            let value = u32::from_le_bytes(data[range].try_into().unwrap());
            let Some(entry) = self.entries.get_mut(index) else {
                return;
            };
            match dword_offset % MSIX_TABLE_ENTRY_SIZE {
                // Message addresses are dword aligned: the low two bits are read-only zero.
                0 => entry.address_lo = value & !0x3,
                4 => entry.address_hi = value,
                8 => entry.data = value,
                _ => entry.control = value & VECTOR_CONTROL_MASK,
            }
            self.sync(index);
        });
    }

    fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for_each_dword(offset, data.len(), |dword_offset, range| {
            let qword = self.pba.get((dword_offset / 8) as usize).copied();
            let value = qword.map_or(0, |q| (q >> (dword_offset % 8 * 8)) as u32);
            data[range].copy_from_slice(&value.to_le_bytes());
        });
    }
}

/// Splits a 4- or 8-byte naturally aligned access into dwords, the only accesses the spec
/// defines for the table and PBA; anything else is dropped (reads then return zeros).
fn for_each_dword(offset: u64, len: usize, mut f: impl FnMut(u64, std::ops::Range<usize>)) {
    if !matches!(len, 4 | 8) || !offset.is_multiple_of(len as u64) {
        debug!("ignoring MSI-X access of {len} bytes at {offset:#x}");
        return;
    }
    for i in (0..len).step_by(4) {
        f(offset + i as u64, i..i + 4);
    }
}

/// Where a table or PBA lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MsixRegion {
    bar: usize,
    offset: u64,
    len: u64,
}

impl MsixRegion {
    fn contains(&self, bar: usize, offset: u64, len: usize) -> Option<u64> {
        let rel = offset.checked_sub(self.offset)?;
        (bar == self.bar && rel.checked_add(len as u64)? <= self.len).then_some(rel)
    }
}

/// A function's MSI-X: capability location plus the shared vector state.
pub struct Msix {
    cap_offset: usize,
    table: MsixRegion,
    pba: MsixRegion,
    state: Arc<Mutex<MsixState>>,
}

impl Msix {
    /// Size in bytes of a table of `vectors` entries.
    pub fn table_len(vectors: usize) -> u64 {
        vectors as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Size in bytes of the PBA for `vectors` vectors (whole qwords).
    pub fn pba_len(vectors: usize) -> u64 {
        vectors.div_ceil(64) as u64 * 8
    }

    /// Adds an MSI-X capability with one vector per interrupt of `interrupt` to `config`; the
    /// table and PBA live at the given offsets of BARs the device already declared.
    pub fn new(
        config: &mut PciConfiguration,
        interrupt: Arc<dyn InterruptGroup>,
        (table_bar, table_offset): (usize, u32),
        (pba_bar, pba_offset): (usize, u32),
    ) -> Result<Self, PciError> {
        let vectors = interrupt.len();
        if vectors == 0 || vectors > usize::from(MAX_MSIX_VECTORS) {
            return Err(PciError::MsixVectorCountInvalid(vectors));
        }
        let region = |bar: usize, offset: u32, len: u64| -> Result<MsixRegion, PciError> {
            let bar_size = config
                .bars()
                .find(|&(index, _)| index == bar)
                .map(|(_, spec)| spec.size)
                .ok_or(PciError::MsixRegionInvalid)?;
            if !offset.is_multiple_of(8) || u64::from(offset) + len > bar_size {
                return Err(PciError::MsixRegionInvalid);
            }
            Ok(MsixRegion {
                bar,
                offset: offset.into(),
                len,
            })
        };
        let table = region(table_bar, table_offset, Self::table_len(vectors))?;
        let pba = region(pba_bar, pba_offset, Self::pba_len(vectors))?;
        if table.bar == pba.bar
            && table.offset < pba.offset + pba.len
            && pba.offset < table.offset + table.len
        {
            return Err(PciError::MsixRegionInvalid);
        }

        let control = (vectors - 1) as u16;
        let mut cap = vec![MSIX_CAPABILITY_ID, 0];
        cap.extend_from_slice(&control.to_le_bytes());
        cap.extend_from_slice(&(table_offset | table_bar as u32).to_le_bytes());
        cap.extend_from_slice(&(pba_offset | pba_bar as u32).to_le_bytes());
        // Only the enable and function-mask bits of message control are writable.
        let mut writable = vec![0; cap.len()];
        writable[3] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        let cap_offset = config.add_capability(&cap, &writable)?;

        Ok(Self {
            cap_offset,
            table,
            pba,
            state: Arc::new(Mutex::new(MsixState::new(interrupt))),
        })
    }

    /// The vector state, shared with whoever fires interrupts.
    pub fn state(&self) -> &Arc<Mutex<MsixState>> {
        &self.state
    }

    /// Offset of the capability in configuration space.
    pub fn cap_offset(&self) -> usize {
        self.cap_offset
    }

    /// Applies the enable and function-mask bits after a config write to register `reg_idx`.
    pub fn config_written(&self, config: &PciConfiguration, reg_idx: usize) {
        if reg_idx == self.cap_offset / 4 {
            let control = (config.read_reg(reg_idx) >> 16) as u16;
            lock(&self.state).set_control(control);
        }
    }

    /// Serves a BAR read if it falls in the table or PBA; returns whether it did.
    pub fn read_bar(&self, bar: usize, offset: u64, data: &mut [u8]) -> bool {
        if let Some(rel) = self.table.contains(bar, offset, data.len()) {
            lock(&self.state).read_table(rel, data);
        } else if let Some(rel) = self.pba.contains(bar, offset, data.len()) {
            lock(&self.state).read_pba(rel, data);
        } else {
            return false;
        }
        true
    }

    /// Serves a BAR write if it falls in the table or PBA (which is read-only); returns whether
    /// it did.
    pub fn write_bar(&self, bar: usize, offset: u64, data: &[u8]) -> bool {
        if let Some(rel) = self.table.contains(bar, offset, data.len()) {
            lock(&self.state).write_table(rel, data);
        } else if self.pba.contains(bar, offset, data.len()).is_none() {
            return false;
        }
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{BarKind, BarSpec, PciHeader};

    /// Records every call the device makes on its interrupt group.
    pub(crate) struct FakeInterrupts {
        pub(crate) vectors: usize,
        pub(crate) updates: Mutex<Vec<(usize, MsiMessage, bool)>>,
        pub(crate) triggers: Mutex<Vec<usize>>,
    }

    impl FakeInterrupts {
        pub(crate) fn new(vectors: usize) -> Arc<Self> {
            Arc::new(Self {
                vectors,
                updates: Mutex::new(Vec::new()),
                triggers: Mutex::new(Vec::new()),
            })
        }

        pub(crate) fn take_updates(&self) -> Vec<(usize, MsiMessage, bool)> {
            std::mem::take(&mut self.updates.lock().unwrap())
        }

        pub(crate) fn take_triggers(&self) -> Vec<usize> {
            std::mem::take(&mut self.triggers.lock().unwrap())
        }
    }

    impl InterruptGroup for FakeInterrupts {
        fn len(&self) -> usize {
            self.vectors
        }
        fn update(&self, index: usize, message: MsiMessage, masked: bool) -> io::Result<()> {
            self.updates.lock().unwrap().push((index, message, masked));
            Ok(())
        }
        fn trigger(&self, index: usize) -> io::Result<()> {
            self.triggers.lock().unwrap().push(index);
            Ok(())
        }
        fn notifier(&self, _index: usize) -> Option<&EventFd> {
            None
        }
    }

    fn setup(vectors: usize) -> (PciConfiguration, Msix, Arc<FakeInterrupts>) {
        let mut config = PciConfiguration::new(&PciHeader::default());
        config
            .add_bar(
                0,
                BarSpec {
                    size: 0x2000,
                    kind: BarKind::Memory32,
                    prefetchable: false,
                },
            )
            .unwrap();
        let irq = FakeInterrupts::new(vectors);
        let msix = Msix::new(&mut config, irq.clone(), (0, 0x0), (0, 0x1000)).unwrap();
        (config, msix, irq)
    }

    fn set_control(config: &mut PciConfiguration, msix: &Msix, control: u16) {
        let reg = msix.cap_offset() / 4;
        config.write_reg(reg, 2, &control.to_le_bytes());
        msix.config_written(config, reg);
    }

    fn write_entry(msix: &Msix, index: u64, address: u64, data: u32, masked: bool) {
        let base = index * MSIX_TABLE_ENTRY_SIZE;
        assert!(msix.write_bar(0, base, &address.to_le_bytes()));
        assert!(msix.write_bar(0, base + 8, &data.to_le_bytes()));
        assert!(msix.write_bar(0, base + 12, &u32::from(masked).to_le_bytes()));
    }

    fn read32(msix: &Msix, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        assert!(msix.read_bar(0, offset, &mut data));
        u32::from_le_bytes(data)
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let (config, msix, _) = setup(3);
        assert_eq!(msix.cap_offset(), 0x40);
        assert_eq!(config.read_reg(0x40 / 4), 0x0002_0011);
        assert_eq!(config.read_reg(0x44 / 4), 0x0000_0000);
        assert_eq!(config.read_reg(0x48 / 4), 0x0000_1000);
    }

    #[test]
    fn message_control_only_enable_and_mask_are_writable() {
        let (mut config, msix, _) = setup(3);
        set_control(&mut config, &msix, 0xffff);
        assert_eq!(config.read_reg(0x40 / 4) >> 16, 0xc002);
        assert!(lock(msix.state()).enabled());
    }

    #[test]
    fn table_round_trips_and_resets_masked() {
        let (_, msix, _) = setup(2);
        assert_eq!(read32(&msix, 12), 1);
        write_entry(&msix, 1, 0xfee0_1003, 0x4041, false);
        assert_eq!(read32(&msix, 16), 0xfee0_1000);
        assert_eq!(read32(&msix, 20), 0);
        assert_eq!(read32(&msix, 24), 0x4041);
        assert_eq!(read32(&msix, 28), 0);
        let mut qword = [0u8; 8];
        assert!(msix.read_bar(0, 16, &mut qword));
        assert_eq!(u64::from_le_bytes(qword), 0xfee0_1000);
        // Reserved vector-control bits read as zero.
        assert!(msix.write_bar(0, 28, &0xffff_fffeu32.to_le_bytes()));
        assert_eq!(read32(&msix, 28), 0);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let (_, msix, irq) = setup(2);
        assert!(msix.write_bar(0, 8, &[0xff]));
        assert!(msix.write_bar(0, 6, &[0xff; 4]));
        assert_eq!(read32(&msix, 8), 0);
        assert!(irq.take_updates().is_empty());
        // Past the table and outside both regions: not ours.
        assert!(!msix.write_bar(0, 32, &[0; 4]));
        assert!(!msix.write_bar(1, 0, &[0; 4]));
        let mut data = [0u8; 4];
        assert!(!msix.read_bar(0, 0x1008, &mut data));
        assert!(lock(msix.state()).trigger(2).is_err());
    }

    /// The vCPU hands a read the bytes its previous exit left, so an access the spec does
    /// not define must still fill the buffer.
    #[test]
    fn undefined_reads_return_zeros() {
        let (_, msix, _) = setup(2);
        write_entry(&msix, 0, 0xfee0_0000, 0x4041, false);
        for (offset, len) in [(8, 2), (9, 1), (6, 4), (4, 8), (0x1000, 2), (0x1002, 1)] {
            let mut data = vec![0xa5; len];
            assert!(msix.read_bar(0, offset, &mut data));
            assert_eq!(data, vec![0; len], "{len} bytes at {offset:#x}");
        }
    }

    #[test]
    fn updates_follow_effective_mask() {
        let (mut config, msix, irq) = setup(2);
        let message = MsiMessage {
            address: 0xfee0_0000,
            data: 0x21,
        };
        write_entry(&msix, 0, message.address, message.data, false);
        // MSI-X still disabled: the route changes but stays masked.
        assert_eq!(
            irq.take_updates(),
            vec![
                (
                    0,
                    MsiMessage {
                        address: 0xfee0_0000,
                        data: 0
                    },
                    true
                ),
                (0, message, true)
            ]
        );
        set_control(&mut config, &msix, CONTROL_ENABLE);
        assert_eq!(irq.take_updates(), vec![(0, message, false)]);
        set_control(&mut config, &msix, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(irq.take_updates(), vec![(0, message, true)]);
        set_control(&mut config, &msix, CONTROL_ENABLE);
        assert_eq!(irq.take_updates(), vec![(0, message, false)]);
        // Rewriting the same values pushes nothing.
        write_entry(&msix, 0, message.address, message.data, false);
        assert!(irq.take_updates().is_empty());
        write_entry(&msix, 0, message.address, message.data, true);
        assert_eq!(irq.take_updates(), vec![(0, message, true)]);
    }

    #[test]
    fn masked_vector_sets_pba_and_fires_on_unmask() {
        let (mut config, msix, irq) = setup(70);
        set_control(&mut config, &msix, CONTROL_ENABLE);
        write_entry(&msix, 65, 0xfee0_0000, 0x30, true);
        lock(msix.state()).trigger(65).unwrap();
        assert!(irq.take_triggers().is_empty());
        assert!(lock(msix.state()).is_pending(65));
        // Vector 65 is bit 1 of the second PBA qword.
        assert_eq!(read32(&msix, 0x1008), 0b10);
        // The PBA is read-only.
        assert!(msix.write_bar(0, 0x1008, &[0; 4]));
        assert_eq!(read32(&msix, 0x1008), 0b10);

        write_entry(&msix, 65, 0xfee0_0000, 0x30, false);
        assert_eq!(irq.take_triggers(), vec![65]);
        assert_eq!(read32(&msix, 0x1008), 0);
        lock(msix.state()).trigger(65).unwrap();
        assert_eq!(irq.take_triggers(), vec![65]);
    }

    #[test]
    fn disabled_or_function_masked_interrupts_stay_pending() {
        let (mut config, msix, irq) = setup(2);
        write_entry(&msix, 1, 0xfee0_0000, 0x31, false);
        lock(msix.state()).trigger(1).unwrap();
        set_control(&mut config, &msix, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        lock(msix.state()).trigger(1).unwrap();
        assert!(irq.take_triggers().is_empty());
        set_control(&mut config, &msix, CONTROL_ENABLE);
        // Two triggers while masked collapse into one pending interrupt.
        assert_eq!(irq.take_triggers(), vec![1]);
        assert!(!lock(msix.state()).is_pending(1));
    }

    #[test]
    fn construction_is_validated() {
        let mut config = PciConfiguration::new(&PciHeader::default());
        config
            .add_bar(
                0,
                BarSpec {
                    size: 0x1000,
                    kind: BarKind::Memory32,
                    prefetchable: false,
                },
            )
            .unwrap();
        let err = |vectors, table, pba| {
            Msix::new(
                &mut config.clone(),
                FakeInterrupts::new(vectors),
                table,
                pba,
            )
            .err()
        };
        assert_eq!(
            err(0, (0, 0), (0, 0x800)),
            Some(PciError::MsixVectorCountInvalid(0))
        );
        assert_eq!(
            err(2049, (0, 0), (0, 0x800)),
            Some(PciError::MsixVectorCountInvalid(2049))
        );
        assert_eq!(
            err(4, (1, 0), (0, 0x800)),
            Some(PciError::MsixRegionInvalid)
        );
        assert_eq!(
            err(4, (0, 0xff8), (0, 0x800)),
            Some(PciError::MsixRegionInvalid)
        );
        assert_eq!(
            err(4, (0, 4), (0, 0x800)),
            Some(PciError::MsixRegionInvalid)
        );
        assert_eq!(err(4, (0, 0), (0, 0x38)), Some(PciError::MsixRegionInvalid));
        assert_eq!(err(4, (0, 0), (0, 0x40)), None);
    }
}
