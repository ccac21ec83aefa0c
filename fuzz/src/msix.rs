//! `pci::Msix`: the guest reads and writes the table and PBA at any offset and size, sets the
//! enable and function-mask bits, and devices fire vectors, checked against a model of the
//! PCI spec's rules.
//!
//! Input layout: byte 0 = vector count - 1 (1..=256, so the PBA has up to four qwords);
//! byte 1 bit 0 = the PBA in BAR 2 instead of after the table in BAR 0; then operations of
//! one kind byte and up to 11 bytes of arguments until the input ends: a BAR write or read
//! (BAR, offset, size 1/2/3/4/8, value), a message-control write (size and value), a
//! trigger (vector, possibly out of range).
//!
//! Asserts after every operation: BAR accesses are claimed exactly when they lie in the table
//! or PBA; reads return, at the size asked, the model's table and PBA for aligned dword and
//! qword accesses and zeros for any other; the PBA is read-only; a trigger of a vector out of
//! range fails; a vector fired while masked (itself, the function, or MSI-X off) sets its
//! pending bit and reaches the interrupt group exactly once when it is unmasked, and an
//! unmasked one is delivered at once; the last route pushed for each vector is its
//! effective message and mask.

use std::io;
use std::sync::{Arc, Mutex};

use pci::{BarKind, BarSpec, Msix, PciConfiguration, PciHeader, MSIX_TABLE_ENTRY_SIZE};
use vm_device::{InterruptGroup, MsiMessage};
use vmm_sys_util::eventfd::EventFd;

use crate::ring::Input;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const TABLE_BAR: usize = 0;
const PBA_OFFSET_BAR0: u32 = 0x1000;
const OTHER_BAR: usize = 2;

/// The interrupt group's view: the routes pushed and the vectors fired.
#[derive(Default)]
pub struct Recorded {
    pub routes: Vec<(MsiMessage, bool)>,
    pub fired: Vec<usize>,
}

/// An interrupt group of `len` vectors that records what it is asked to do.
pub struct RecordingGroup {
    len: usize,
    pub recorded: Mutex<Recorded>,
}

impl RecordingGroup {
    /// All vectors masked, as the MSI-X state assumes a new group to be.
    pub fn new(len: usize) -> Arc<Self> {
        Arc::new(RecordingGroup {
            len,
            recorded: Mutex::new(Recorded {
                routes: vec![(MsiMessage::default(), true); len],
                fired: Vec::new(),
            }),
        })
    }

    /// The vectors fired since the last call.
    pub fn take_fired(&self) -> Vec<usize> {
        std::mem::take(&mut self.recorded.lock().unwrap().fired)
    }
}

impl InterruptGroup for RecordingGroup {
    fn len(&self) -> usize {
        self.len
    }

    fn update(&self, index: usize, message: MsiMessage, masked: bool) -> io::Result<()> {
        self.recorded.lock().unwrap().routes[index] = (message, masked);
        Ok(())
    }

    fn trigger(&self, index: usize) -> io::Result<()> {
        assert!(index < self.len, "vector {index} fired past the group");
        self.recorded.lock().unwrap().fired.push(index);
        Ok(())
    }

    fn notifier(&self, _index: usize) -> Option<&EventFd> {
        None
    }
}

/// What the spec says the function's MSI-X state is.
#[derive(Clone, Copy, Default)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    masked: bool,
}

struct Model {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    table: (usize, u64),
    pba: (usize, u64),
}

impl Model {
    fn masked(&self, v: usize) -> bool {
        !self.enabled || self.function_masked || self.entries[v].masked
    }

    fn route(&self, v: usize) -> (MsiMessage, bool) {
        let e = &self.entries[v];
        let address = u64::from(e.address_hi) << 32 | u64::from(e.address_lo);
        let message = MsiMessage {
            address,
            data: e.data,
        };
        (message, self.masked(v))
    }

    /// Delivers what became unmasked; returns the vectors fired.
    fn deliver(&mut self, v: usize, fired: &mut Vec<usize>) {
        if self.pending[v] && !self.masked(v) {
            self.pending[v] = false;
            fired.push(v);
        }
    }

    fn region(&self, bar: usize, offset: u64, len: usize) -> Option<(bool, u64)> {
        let inside = |(rbar, start): (usize, u64), rlen: u64| {
            let rel = offset.checked_sub(start)?;
            (bar == rbar && rel + len as u64 <= rlen).then_some(rel)
        };
        let vectors = self.entries.len();
        inside(self.table, Msix::table_len(vectors))
            .map(|rel| (true, rel))
            .or_else(|| inside(self.pba, Msix::pba_len(vectors)).map(|rel| (false, rel)))
    }

    fn table_dword(&self, rel: u64) -> u32 {
        let e = &self.entries[(rel / MSIX_TABLE_ENTRY_SIZE) as usize];
        match rel % MSIX_TABLE_ENTRY_SIZE {
            0 => e.address_lo,
            4 => e.address_hi,
            8 => e.data,
            _ => u32::from(e.masked),
        }
    }

    fn pba_dword(&self, rel: u64) -> u32 {
        (0..32)
            .filter(|bit| self.pending.get((rel * 8) as usize + bit) == Some(&true))
            .fold(0, |acc, bit| acc | 1 << bit)
    }

    /// A table write, dword by dword as the hardware applies it; the vectors it fires.
    fn write_table(&mut self, rel: u64, data: &[u8]) -> Vec<usize> {
        let mut fired = Vec::new();
        if !dword_access(rel, data.len()) {
            return fired;
        }
        for (i, dword) in data.chunks_exact(4).enumerate() {
            let at = rel + 4 * i as u64;
            let v = (at / MSIX_TABLE_ENTRY_SIZE) as usize;
            let value = u32::from_le_bytes(dword.try_into().unwrap());
            let e = &mut self.entries[v];
            match at % MSIX_TABLE_ENTRY_SIZE {
                0 => e.address_lo = value & !3,
                4 => e.address_hi = value,
                8 => e.data = value,
                _ => e.masked = value & 1 != 0,
            }
            self.deliver(v, &mut fired);
        }
        fired
    }
}

/// The accesses the spec defines for the table and PBA: aligned dwords and qwords.
fn dword_access(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && offset.is_multiple_of(len as u64)
}

/// One input; any byte string is valid.
pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let vectors = usize::from(input.u8()) + 1;
    let pba_apart = input.u8() & 1 != 0;
    let mut config = PciConfiguration::new(&PciHeader::default());
    let bar = |size| BarSpec {
        size,
        kind: BarKind::Memory32,
        prefetchable: false,
    };
    config.add_bar(TABLE_BAR, bar(0x2000)).unwrap();
    config.add_bar(OTHER_BAR, bar(0x1000)).unwrap();
    let pba = if pba_apart {
        (OTHER_BAR, 0x800)
    } else {
        (TABLE_BAR, PBA_OFFSET_BAR0)
    };
    let group = RecordingGroup::new(vectors);
    let msix = Msix::new(&mut config, group.clone(), (TABLE_BAR, 0), pba).unwrap();
    let control_reg = msix.cap_offset() / 4;
    let mut model = Model {
        entries: vec![
            Entry {
                masked: true,
                ..Entry::default()
            };
            vectors
        ],
        pending: vec![false; vectors],
        enabled: false,
        function_masked: false,
        table: (TABLE_BAR, 0),
        pba: (pba.0, u64::from(pba.1)),
    };

    while !input.0.is_empty() {
        let kind = input.u8();
        let fired = match kind % 4 {
            0 | 1 => bar_access(&msix, &mut model, kind % 4 == 0, &mut input),
            2 => {
                let (size, value) = (input.u8(), input.u16());
                let (offset, bytes) = match size % 3 {
                    0 => (2, value.to_le_bytes().to_vec()),
                    1 => (3, vec![(value >> 8) as u8]),
                    _ => (0, (u32::from(value) << 16 | 0x11).to_le_bytes().to_vec()),
                };
                config.write_reg(control_reg, offset, &bytes);
                msix.config_written(&config, control_reg);
                let control = (config.read_reg(control_reg) >> 16) as u16;
                model.enabled = control & CONTROL_ENABLE != 0;
                model.function_masked = control & CONTROL_FUNCTION_MASK != 0;
                let mut fired = Vec::new();
                for v in 0..vectors {
                    model.deliver(v, &mut fired);
                }
                fired
            }
            _ => {
                let vector = input.u16() % (vectors as u16 + 4);
                let result = vm_device::lock(msix.state()).trigger(vector);
                let v = usize::from(vector);
                assert_eq!(result.is_ok(), v < vectors, "trigger of vector {v}");
                match v < vectors && !model.masked(v) {
                    true => vec![v],
                    false => {
                        if let Some(p) = model.pending.get_mut(v) {
                            *p = true;
                        }
                        Vec::new()
                    }
                }
            }
        };
        assert_eq!(group.take_fired(), fired, "vectors fired (op {kind:#x})");
        let state = vm_device::lock(msix.state());
        let routes = &group.recorded.lock().unwrap().routes;
        for (v, route) in routes.iter().enumerate() {
            assert_eq!(state.is_pending(v as u16), model.pending[v], "pending {v}");
            assert_eq!(*route, model.route(v), "route of vector {v}");
        }
    }
}

/// A guest write (`write`) or read of the table or PBA; returns the vectors the write fires.
fn bar_access(msix: &Msix, model: &mut Model, write: bool, input: &mut Input) -> Vec<usize> {
    let bar = [TABLE_BAR, OTHER_BAR, 1][usize::from(input.u8() % 3)];
    let offset = u64::from(input.u16()) % 0x2010;
    let len = [1, 2, 3, 4, 8][usize::from(input.u8() % 5)];
    let value: Vec<u8> = (0..len).map(|_| input.u8()).collect();
    let region = model.region(bar, offset, len);
    if write {
        assert_eq!(msix.write_bar(bar, offset, &value), region.is_some());
        // The PBA is read-only: the pending bits checked after each operation stay the model's.
        return match region {
            Some((true, rel)) => model.write_table(rel, &value),
            _ => Vec::new(),
        };
    }
    let mut data = vec![0xa5; len];
    assert_eq!(msix.read_bar(bar, offset, &mut data), region.is_some());
    assert_eq!(data.len(), len);
    if let Some((table, rel)) = region {
        let expected: Vec<u8> = if dword_access(rel, len) {
            (0..len as u64)
                .step_by(4)
                .flat_map(|i| {
                    match table {
                        true => model.table_dword(rel + i),
                        false => model.pba_dword(rel + i),
                    }
                    .to_le_bytes()
                })
                .collect()
        } else {
            vec![0; len]
        };
        assert_eq!(
            data, expected,
            "read of {len} bytes at {offset:#x} of BAR {bar}"
        );
    }
    Vec::new()
}
