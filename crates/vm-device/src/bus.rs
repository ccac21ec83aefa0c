//! Address-range dispatch for port I/O and MMIO exits.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

/// A device reachable through a range of the port-I/O or MMIO address space.
///
/// `base` is the start of the range the device was registered at and `offset` is relative to it,
/// so a device can be moved (a PCI BAR being reprogrammed) without knowing its own address.
pub trait BusDevice: Send {
    /// Fills `data` with what a read of `data.len()` bytes at `offset` returns.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Performs a write of `data` at `offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Why a range could not be inserted into a [`Bus`].
#[derive(Debug, PartialEq, Eq)]
pub enum BusError {
    /// The range has zero length or wraps around the address space.
    InvalidRange { base: u64, len: u64 },
    /// The range overlaps one already registered.
    Overlap { base: u64, len: u64 },
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusError::InvalidRange { base, len } => {
                write!(f, "invalid bus range {base:#x}+{len:#x}")
            }
            BusError::Overlap { base, len } => {
                write!(
                    f,
                    "bus range {base:#x}+{len:#x} overlaps a registered device"
                )
            }
        }
    }
}

impl std::error::Error for BusError {}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each owned by one device.
///
/// Ranges can be inserted and removed while vCPUs dispatch through the bus (devices plugged
/// in or out, BARs moved): the map is behind a read-write lock that an access holds only to
/// find its device, never while the device runs, so a device may itself change the bus.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(PoisonError::into_inner);
        let overlaps_previous = ranges
            .range(..end)
            .next_back()
            .is_some_and(|(&start, entry)| start + entry.len > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, len });
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the range starting exactly at `base`; returns whether one was registered.
    pub fn remove(&self, base: u64) -> bool {
        self.ranges
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&base)
            .is_some()
    }

    /// The device covering `addr`, with the base of its range.
    pub fn resolve(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.ranges.read().unwrap_or_else(PoisonError::into_inner);
        let (&base, entry) = ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (base, Arc::clone(&entry.device)))
    }

    /// Routes a read; returns false (leaving `data` untouched) when no device covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((base, device)) => {
                lock(&device).read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; returns false when no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((base, device)) => {
                lock(&device).write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

/// Locks `mutex` even if a previous holder panicked: a device's state is still the best
/// answer we have, and one poisoned lock must not take every vCPU down with it.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        last_write: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last_write = Some((base, offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder { last_write: None }))
    }

    #[test]
    fn routes_by_range_with_relative_offsets() {
        let bus = Bus::new();
        let a = recorder();
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x105, &mut data));
        assert_eq!(data, [5, 5]);
        assert!(bus.write(0x10f, &[7]));
        assert_eq!(a.lock().unwrap().last_write, Some((0x100, 0xf, vec![7])));
        assert!(!bus.read(0x110, &mut data));
        assert!(!bus.read(0xff, &mut data));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(recorder(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(recorder(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert!(bus.insert(recorder(), 0x110, 0x10).is_ok());
        assert!(bus.insert(recorder(), 0xf0, 0x10).is_ok());
        assert_eq!(
            bus.insert(recorder(), 0x200, 0),
            Err(BusError::InvalidRange {
                base: 0x200,
                len: 0
            })
        );
        assert!(bus.insert(recorder(), u64::MAX, 2).is_err());
    }

    #[test]
    fn remove_frees_the_range() {
        let bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();
        assert!(bus.remove(0x100));
        assert!(!bus.remove(0x100));
        assert!(bus.insert(recorder(), 0x100, 0x10).is_ok());
    }

    /// Unplugs itself from the bus it is reached through when written.
    struct SelfRemoving {
        bus: Arc<Bus>,
    }

    impl BusDevice for SelfRemoving {
        fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
            data.fill(1);
        }
        fn write(&mut self, base: u64, _offset: u64, _data: &[u8]) {
            assert!(self.bus.remove(base));
            self.bus.insert(recorder(), base + 0x100, 0x10).unwrap();
        }
    }

    #[test]
    fn a_device_may_change_the_bus_from_inside_an_access() {
        let bus = Arc::new(Bus::new());
        let device = Arc::new(Mutex::new(SelfRemoving {
            bus: Arc::clone(&bus),
        }));
        bus.insert(device, 0x100, 0x10).unwrap();
        assert!(bus.write(0x104, &[0]));
        let mut data = [0xffu8];
        assert!(!bus.read(0x104, &mut data), "the device is gone");
        assert!(bus.read(0x204, &mut data));
        assert_eq!(data, [4], "its replacement answers");
    }
}
