//! PCI configuration space through the 0xCF8/0xCFC port pair (`pci::PciConfigIo`) and ECAM
//! (`pci::PciConfigMmio`), over a bus of the host bridge and three devices with 32-bit,
//! 64-bit and I/O BARs and a capability with writable bytes, the guest's BAR moves followed
//! by a `BarMoves` handler.
//!
//! Input layout: operations of one kind byte and up to 9 bytes of arguments until the input
//! ends: a CONFIG_ADDRESS write (a raw value, or one built from device, function, register
//! and the extended-register bits), a port access at 0xCF8 + 0..8 of size 1/2/3/4/8, an ECAM
//! access at any offset of the first two buses (or past the 256 buses) of any size, a BAR
//! size probe (all-ones, read back, restore) through either mechanism.
//!
//! Asserts after every operation: vendor/device ID, class and revision, header type,
//! subsystem IDs, interrupt pin and status never change; the command register holds only its
//! writable bits; every BAR keeps its flags and reads zero below its size; a probe reads back
//! exactly the BAR's size mask; a read returns all-ones for an absent function (other bus,
//! function or empty slot), a disabled CONFIG_ADDRESS or a bad size or alignment, zero for the
//! extended space of a present one, and otherwise the register's bytes at the size asked
//! (CONFIG_ADDRESS reads back as written, masked); each reported BAR move is of a decoded BAR,
//! to a new address aligned to its size, from where the last move (or the VMM) put it, at
//! most one per BAR per write: nothing accumulates.

use std::sync::{Arc, Mutex};

use pci::{
    BarKind, BarMove, BarMoves, BarSpec, PciConfigIo, PciConfigMmio, PciConfiguration, PciDevice,
    PciHeader, PciRoot, ECAM_BUS_SIZE, NUM_BARS,
};
use vm_device::BusDevice;

use crate::ring::Input;

/// Device numbers on bus 0 besides the host bridge.
const DEVICES: [u8; 3] = [3, 7, 31];
/// (device, BAR, spec, where the VMM placed it).
const BARS: [(u8, usize, BarSpec, u64); 5] = [
    (3, 0, bar(0x1000, BarKind::Memory32, false), 0xc000_0000),
    (3, 1, bar(0x20, BarKind::Io, false), 0x1000),
    (
        3,
        2,
        bar(0x10_0000, BarKind::Memory64, true),
        0x10_0000_0000,
    ),
    (
        7,
        4,
        bar(0x4000_0000, BarKind::Memory64, false),
        0x40_0000_0000,
    ),
    (7, 0, bar(16, BarKind::Memory32, true), 0xc000_1000),
];
const COMMAND_WRITABLE: u32 = 0x0547;

const fn bar(size: u64, kind: BarKind, prefetchable: bool) -> BarSpec {
    BarSpec {
        size,
        kind,
        prefetchable,
    }
}

/// A function with BARs and a vendor capability, and no behaviour of its own.
struct Function {
    config: PciConfiguration,
}

impl PciDevice for Function {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

fn function(number: u8) -> Function {
    let mut config = PciConfiguration::new(&PciHeader {
        vendor_id: 0x1234,
        device_id: 0x1100 + u16::from(number),
        revision: number,
        class: 0xff,
        subclass: 1,
        prog_if: 2,
        subsystem_vendor_id: 0x5678,
        subsystem_id: u16::from(number) << 8,
    });
    config.set_interrupt_pin(number % 2);
    for &(_, index, spec, base) in BARS.iter().filter(|b| b.0 == number) {
        config.add_bar(index, spec).unwrap();
        config.set_bar_address(index, base).unwrap();
    }
    // A vendor capability whose last four bytes the guest may write.
    let cap = [0x09, 0, 12, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let mut writable = [0u8; 12];
    writable[8..].fill(0xff);
    config.add_capability(&cap, &writable).unwrap();
    Function { config }
}

/// The moves reported, checked as they come.
struct MoveLog {
    mapped: Mutex<Vec<(u8, usize, u64)>>,
}

impl BarMoves for MoveLog {
    fn moved(&self, device_number: u8, device: &Arc<Mutex<dyn PciDevice>>, moves: &[BarMove]) {
        let command = vm_device::lock(device).config().command();
        let mut mapped = self.mapped.lock().unwrap();
        for (i, m) in moves.iter().enumerate() {
            assert!(
                moves[i + 1..].iter().all(|n| n.bar != m.bar),
                "one move per BAR"
            );
            let slot = mapped
                .iter_mut()
                .find(|(d, b, _)| (*d, *b) == (device_number, m.bar))
                .expect("a move of a declared BAR");
            let &(_, _, spec, _) = BARS
                .iter()
                .find(|b| (b.0, b.1) == (device_number, m.bar))
                .unwrap();
            let decode = if spec.kind == BarKind::Io { 1 } else { 2 };
            assert!(command & decode != 0, "a move of a BAR not decoded");
            assert_eq!(m.len, spec.size);
            assert_eq!(m.old_base, slot.2, "a move from where the BAR was");
            assert_ne!(m.new_base, m.old_base);
            assert!(m.new_base.is_multiple_of(spec.size), "{m:?} misaligned");
            slot.2 = m.new_base;
        }
    }
}

/// The fixed registers of a function: what no guest write may change.
fn identity(root: &PciRoot, dev: u8) -> [u32; 5] {
    let reg = |r| root.read_config(0, dev, 0, r);
    [
        reg(0),
        reg(2),
        reg(3) & 0x00ff_0000,
        reg(11),
        reg(15) & 0xff00,
    ]
}

/// What a valid, enabled access to (bus, device, function, register) at byte `byte` reads.
fn expected(root: &PciRoot, target: (u8, u8, u8, usize), byte: usize, len: usize) -> Vec<u8> {
    let (bus, dev, func, reg) = target;
    let present = bus == 0 && func == 0 && (dev == 0 || DEVICES.contains(&dev));
    let valid = matches!(len, 1 | 2 | 4) && byte.is_multiple_of(len) && byte + len <= 4;
    if !present || !valid {
        return vec![0xff; len];
    }
    if reg >= 64 {
        return vec![0; len];
    }
    let value = vm_device::lock(root.device(dev).unwrap())
        .config()
        .read_reg(reg);
    value.to_le_bytes()[byte..byte + len].to_vec()
}

fn cf8_target(address: u32) -> Option<(u8, u8, u8, usize)> {
    (address & 1 << 31 != 0).then_some((
        (address >> 16) as u8,
        ((address >> 11) & 0x1f) as u8,
        ((address >> 8) & 7) as u8,
        ((((address >> 16) & 0xf00) | (address & 0xfc)) >> 2) as usize,
    ))
}

fn ecam_target(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 7) as u8,
        ((offset & 0xfff) >> 2) as usize,
    )
}

struct Bus {
    root: Arc<Mutex<PciRoot>>,
    io: PciConfigIo,
    ecam: PciConfigMmio,
    /// CONFIG_ADDRESS as the guest last wrote it, masked as the spec reads it back.
    address: u32,
}

impl Bus {
    fn io_read(&mut self, offset: u64, len: usize) {
        let mut data = vec![0x5a; len];
        self.io.read(0xcf8, offset, &mut data);
        let want = match (offset, len) {
            (0, 4) => self.address.to_le_bytes().to_vec(),
            (4..=7, _) => match cf8_target(self.address) {
                Some(t) => expected(&vm_device::lock(&self.root), t, offset as usize - 4, len),
                None => vec![0xff; len],
            },
            _ => vec![0xff; len],
        };
        assert_eq!(data, want, "read of {len} bytes at 0xcf8+{offset}");
    }

    fn ecam_read(&mut self, offset: u64, len: usize) {
        let mut data = vec![0x5a; len];
        self.ecam.read(0xe000_0000, offset, &mut data);
        let want = if offset >= 256 * ECAM_BUS_SIZE {
            vec![0xff; len]
        } else {
            let byte = (offset & 3) as usize;
            expected(&vm_device::lock(&self.root), ecam_target(offset), byte, len)
        };
        assert_eq!(data, want, "ECAM read of {len} bytes at {offset:#x}");
    }

    /// Writes all-ones to BAR register `reg` of `dev`, checks it reads back as the size mask,
    /// and restores it.
    fn probe(&mut self, dev: u8, reg: usize, through_ecam: bool) {
        let offset = u64::from(dev) << 15 | (reg as u64 * 4);
        let cf8 = 1 << 31 | u32::from(dev) << 11 | (reg as u32 * 4);
        let access = |bus: &mut Bus, value: Option<u32>| -> u32 {
            let mut data = [0u8; 4];
            match (through_ecam, value) {
                (true, Some(v)) => bus.ecam.write(0, offset, &v.to_le_bytes()),
                (true, None) => bus.ecam.read(0, offset, &mut data),
                (false, v) => {
                    bus.io.write(0xcf8, 0, &cf8.to_le_bytes());
                    match v {
                        Some(v) => bus.io.write(0xcf8, 4, &v.to_le_bytes()),
                        None => bus.io.read(0xcf8, 4, &mut data),
                    }
                }
            }
            u32::from_le_bytes(data)
        };
        let original = access(self, None);
        access(self, Some(u32::MAX));
        let sized = access(self, None);
        access(self, Some(original));
        if !through_ecam {
            self.address = cf8;
        }
        let want = size_mask(dev, reg - 4);
        assert_eq!(sized, want, "size probe of device {dev} register {reg}");
    }
}

/// What a BAR register reads after all-ones were written: its size mask and flags (all-ones
/// of a 64-bit BAR's upper half above its size, zero for no BAR).
fn size_mask(dev: u8, index: usize) -> u32 {
    for &(d, i, spec, _) in &BARS {
        if d != dev {
            continue;
        }
        let mask = !(spec.size - 1);
        if i == index {
            let flags = match (spec.kind, spec.prefetchable) {
                (BarKind::Io, _) => 1,
                (BarKind::Memory64, p) => 0b100 | u32::from(p) << 3,
                (BarKind::Memory32, p) => u32::from(p) << 3,
            };
            let low_flags = if spec.kind == BarKind::Io { 3 } else { 0xf };
            return (mask as u32 & !low_flags) | flags;
        }
        if spec.kind == BarKind::Memory64 && i + 1 == index {
            return (mask >> 32) as u32;
        }
    }
    0
}

/// One input; any byte string is valid.
pub fn run(data: &[u8]) {
    let mut root = PciRoot::new();
    for dev in DEVICES {
        root.add_device(dev, Arc::new(Mutex::new(function(dev))))
            .unwrap();
    }
    let log = Arc::new(MoveLog {
        mapped: Mutex::new(BARS.iter().map(|b| (b.0, b.1, b.3)).collect()),
    });
    root.set_bar_moves(log.clone());
    let identities: Vec<[u32; 5]> = (0..32).map(|d| identity(&root, d)).collect();
    let status: Vec<u32> = (0..32)
        .map(|d| root.read_config(0, d, 0, 1) >> 16)
        .collect();
    let root = Arc::new(Mutex::new(root));
    let mut bus = Bus {
        io: PciConfigIo::new(root.clone()),
        ecam: PciConfigMmio::new(root.clone()),
        root,
        address: 0,
    };

    let mut input = Input(data);
    while !input.0.is_empty() {
        let kind = input.u8();
        let len = [1, 2, 4, 8, 3][usize::from(input.u8() % 5)];
        match kind % 6 {
            0 => {
                let sel = input.u8();
                let raw = u32::from(input.u16()) | u32::from(input.u16()) << 16;
                let address = if sel & 0x80 != 0 {
                    raw
                } else {
                    // Mostly a present device, sometimes a function or bus past it, an
                    // extended register.
                    let dev = [0u8, 3, 7, 31, 4][usize::from(sel % 5)];
                    1u32 << 31 | (raw & 0x0f01_07fc) | u32::from(dev) << 11
                };
                bus.io.write(0xcf8, 0, &address.to_le_bytes());
                bus.address = address & 0x8fff_fffc;
            }
            1 => {
                let offset = u64::from(input.u8() % 8);
                let value: Vec<u8> = (0..len).map(|_| input.u8()).collect();
                bus.io.write(0xcf8, offset, &value);
                if (offset, len) == (0, 4) {
                    let v = u32::from_le_bytes(value.try_into().unwrap());
                    bus.address = v & 0x8fff_fffc;
                }
            }
            2 => bus.io_read(u64::from(input.u8() % 8), len),
            3 | 4 => {
                let raw = u64::from(input.u16()) | u64::from(input.u16()) << 16;
                let offset = match raw >> 30 {
                    // Past the 256 buses; else bus 0 or 1, the devices first.
                    3 => 256 * ECAM_BUS_SIZE + (raw & 0xffff),
                    _ => raw & 0x001f_ffff,
                };
                if kind % 6 == 3 {
                    let value: Vec<u8> = (0..len).map(|_| input.u8()).collect();
                    bus.ecam.write(0, offset, &value);
                } else {
                    bus.ecam_read(offset, len);
                }
            }
            _ => {
                let sel = input.u8();
                let dev = DEVICES[usize::from(sel % 3)];
                let reg = 4 + usize::from(sel >> 2) % NUM_BARS;
                bus.probe(dev, reg, sel & 0x80 != 0);
            }
        }
        check(&bus.root.lock().unwrap(), &identities, &status);
    }
}

fn check(root: &PciRoot, identities: &[[u32; 5]], status: &[u32]) {
    for dev in 0..32u8 {
        assert_eq!(identity(root, dev), identities[usize::from(dev)], "{dev}");
        let command = root.read_config(0, dev, 0, 1);
        assert_eq!(command >> 16, status[usize::from(dev)], "status of {dev}");
        if root.device(dev).is_some() {
            assert_eq!(command & 0xffff & !COMMAND_WRITABLE, 0);
        }
    }
    for &(dev, index, spec, _) in &BARS {
        let value = root.read_config(0, dev, 0, 4 + index);
        let low = spec.size - 1;
        let flags = size_mask(dev, index) & if spec.kind == BarKind::Io { 3 } else { 0xf };
        assert_eq!(value & (low as u32), flags, "BAR {index} of device {dev}");
    }
}
