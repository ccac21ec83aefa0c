//! Placing BARs in the VMM's MMIO windows, as firmware would.
//!
//! `vm_allocator::AddressAllocator` already does aligned first-fit allocation in an interval
//! tree, which is exactly what natural BAR alignment needs, so we only add the window policy.

use std::sync::{Arc, Mutex};

use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::{BarKind, PciBarRegion, PciDevice, PciError};
use vm_device::lock;

/// One placed BAR: insert `region` at `base` for `len` bytes, on the port bus for an I/O BAR
/// and on the MMIO bus otherwise.
pub struct BarMapping {
    pub bar: usize,
    pub kind: BarKind,
    pub base: u64,
    pub len: u64,
    pub region: Arc<Mutex<PciBarRegion>>,
}

/// Hands out naturally aligned BAR addresses from a 32-bit window, an optional 64-bit one and
/// an optional I/O port window.
///
/// 64-bit BARs go to the 64-bit window when there is one and fall back to the 32-bit window
/// when it is absent or full; 32-bit BARs only ever use the 32-bit window; I/O BARs only the
/// I/O window.
pub struct BarAllocator {
    mmio32: AddressAllocator,
    mmio64: Option<AddressAllocator>,
    io: Option<AddressAllocator>,
}

/// The window a BAR was placed in.
#[derive(Clone, Copy)]
enum Window {
    Mmio32,
    Mmio64,
    Io,
}

impl BarAllocator {
    /// `mmio32` must lie below 4 GiB and `io` in the 16-bit port space; windows are
    /// `(base, size)`.
    pub fn new(
        mmio32: (u64, u64),
        mmio64: Option<(u64, u64)>,
        io: Option<(u64, u64)>,
    ) -> Result<Self, PciError> {
        let window = |(base, size): (u64, u64)| {
            AddressAllocator::new(base, size).map_err(|_| PciError::WindowInvalid { base, size })
        };
        let (base, size) = mmio32;
        if base.checked_add(size).is_none_or(|end| end > 1 << 32) {
            return Err(PciError::WindowInvalid { base, size });
        }
        if let Some((base, size)) = io {
            if base.checked_add(size).is_none_or(|end| end > 1 << 16) {
                return Err(PciError::WindowInvalid { base, size });
            }
        }
        Ok(Self {
            mmio32: window(mmio32)?,
            mmio64: mmio64.map(window).transpose()?,
            io: io.map(window).transpose()?,
        })
    }

    /// Places every BAR of `device`, programs the addresses into its configuration space and
    /// returns one mapping per BAR. On failure nothing stays allocated and no address changes.
    pub fn allocate(
        &mut self,
        device: &Arc<Mutex<dyn PciDevice>>,
    ) -> Result<Vec<BarMapping>, PciError> {
        let bars: Vec<_> = lock(device).config().bars().collect();
        let mut placed: Vec<(usize, BarKind, RangeInclusive, Window)> = Vec::new();
        for (bar, spec) in bars {
            match self.allocate_one(spec.size, spec.kind) {
                Ok((range, window)) => placed.push((bar, spec.kind, range, window)),
                Err(source) => {
                    self.release(&placed);
                    return Err(PciError::BarAllocation {
                        bar,
                        size: spec.size,
                        source,
                    });
                }
            }
        }

        let mut dev = lock(device);
        let mut mappings = Vec::with_capacity(placed.len());
        for &(bar, kind, range, _) in &placed {
            if let Err(err) = dev.config_mut().set_bar_address(bar, range.start()) {
                // Ranges from our own windows always suit the BAR; still, never leak them.
                self.release(&placed);
                return Err(err);
            }
            mappings.push(BarMapping {
                bar,
                kind,
                base: range.start(),
                len: range.len(),
                region: Arc::new(Mutex::new(PciBarRegion::new(device.clone(), bar))),
            });
        }
        Ok(mappings)
    }

    fn allocate_one(
        &mut self,
        size: u64,
        kind: BarKind,
    ) -> Result<(RangeInclusive, Window), vm_allocator::Error> {
        match kind {
            BarKind::Io => {
                let io = self
                    .io
                    .as_mut()
                    .ok_or(vm_allocator::Error::ResourceNotAvailable)?;
                Ok((
                    io.allocate(size, size, AllocPolicy::FirstMatch)?,
                    Window::Io,
                ))
            }
            BarKind::Memory64 => {
                if let Some(mmio64) = &mut self.mmio64 {
                    if let Ok(range) = mmio64.allocate(size, size, AllocPolicy::FirstMatch) {
                        return Ok((range, Window::Mmio64));
                    }
                }
                let range = self.mmio32.allocate(size, size, AllocPolicy::FirstMatch)?;
                Ok((range, Window::Mmio32))
            }
            BarKind::Memory32 => {
                let range = self.mmio32.allocate(size, size, AllocPolicy::FirstMatch)?;
                Ok((range, Window::Mmio32))
            }
        }
    }

    fn release(&mut self, placed: &[(usize, BarKind, RangeInclusive, Window)]) {
        for (_, _, range, window) in placed {
            let allocator = match window {
                Window::Mmio32 => Some(&mut self.mmio32),
                Window::Mmio64 => self.mmio64.as_mut(),
                Window::Io => self.io.as_mut(),
            };
            // Freeing a range we just allocated cannot fail.
            if let Some(allocator) = allocator {
                let _ = allocator.free(range);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::tests::TestDevice;
    use crate::BarSpec;

    fn spec(size: u64, kind: BarKind) -> BarSpec {
        BarSpec {
            size,
            kind,
            prefetchable: false,
        }
    }

    fn device(bars: &[(usize, BarSpec)]) -> Arc<Mutex<dyn PciDevice>> {
        Arc::new(Mutex::new(TestDevice::new(1, bars)))
    }

    #[test]
    fn bars_are_naturally_aligned_and_programmed() {
        let mut alloc = BarAllocator::new((0xc000_0000, 0x2000_0000), None, None).unwrap();
        let small = device(&[(0, spec(0x100, BarKind::Memory32))]);
        alloc.allocate(&small).unwrap();
        let dev = device(&[
            (0, spec(0x4000, BarKind::Memory64)),
            (2, spec(0x10_0000, BarKind::Memory32)),
        ]);
        let mappings = alloc.allocate(&dev).unwrap();
        let summary: Vec<_> = mappings.iter().map(|m| (m.bar, m.base, m.len)).collect();
        assert_eq!(
            summary,
            vec![(0, 0xc000_4000, 0x4000), (2, 0xc010_0000, 0x10_0000)]
        );
        let dev = dev.lock().unwrap();
        assert_eq!(dev.config().bar_address(0), Some(0xc000_4000));
        assert_eq!(dev.config().read_reg(4), 0xc000_4004);
        assert_eq!(dev.config().read_reg(6), 0xc010_0000);
    }

    #[test]
    fn bar64_prefers_the_64bit_window_and_falls_back() {
        let mut alloc = BarAllocator::new(
            (0xc000_0000, 0x1_0000),
            Some((0x10_0000_0000, 0x8000)),
            None,
        )
        .unwrap();
        let dev = device(&[
            (0, spec(0x8000, BarKind::Memory64)),
            (2, spec(0x1000, BarKind::Memory32)),
        ]);
        let mappings = alloc.allocate(&dev).unwrap();
        assert_eq!(mappings[0].base, 0x10_0000_0000);
        assert_eq!(mappings[1].base, 0xc000_0000);
        assert_eq!(dev.lock().unwrap().config().read_reg(5), 0x10);
        // The 64-bit window is now full: the next 64-bit BAR lands below 4 GiB.
        let dev = device(&[(0, spec(0x4000, BarKind::Memory64))]);
        assert_eq!(alloc.allocate(&dev).unwrap()[0].base, 0xc000_4000);
    }

    #[test]
    fn exhaustion_fails_without_leaking() {
        let mut alloc = BarAllocator::new((0xc000_0000, 0x4000), None, None).unwrap();
        let dev = device(&[
            (0, spec(0x2000, BarKind::Memory32)),
            (1, spec(0x4000, BarKind::Memory32)),
        ]);
        let err = alloc.allocate(&dev).err().unwrap();
        assert!(matches!(
            err,
            PciError::BarAllocation {
                bar: 1,
                size: 0x4000,
                ..
            }
        ));
        assert_eq!(dev.lock().unwrap().config().bar_address(0), Some(0));
        // The first BAR's range was released: the whole window is still usable.
        let fits = device(&[(0, spec(0x4000, BarKind::Memory32))]);
        assert_eq!(alloc.allocate(&fits).unwrap()[0].base, 0xc000_0000);
        let more = device(&[(0, spec(0x10, BarKind::Memory32))]);
        assert!(alloc.allocate(&more).is_err());
    }

    #[test]
    fn io_bars_go_to_the_io_window_only() {
        let mut alloc =
            BarAllocator::new((0xc000_0000, 0x1_0000), None, Some((0x1000, 0x100))).unwrap();
        let dev = device(&[
            (0, spec(0x1000, BarKind::Memory32)),
            (2, spec(0x20, BarKind::Io)),
        ]);
        let maps = alloc.allocate(&dev).unwrap();
        let io = maps.iter().find(|m| m.bar == 2).unwrap();
        assert_eq!((io.kind, io.base, io.len), (BarKind::Io, 0x1000, 0x20));
        assert_eq!(
            dev.lock().unwrap().config().read_reg(4 + 2),
            0x1000 | 1,
            "I/O space bit"
        );
        // Sized like a memory BAR, but with the I/O flag bits kept.
        let more = device(&[(0, spec(0x100, BarKind::Io))]);
        assert!(alloc.allocate(&more).is_err(), "window exhausted");
        let mut no_io = BarAllocator::new((0xc000_0000, 0x1_0000), None, None).unwrap();
        assert!(no_io
            .allocate(&device(&[(0, spec(4, BarKind::Io))]))
            .is_err());
    }

    #[test]
    fn windows_are_validated() {
        assert!(BarAllocator::new((0xf000_0000, 0x2000_0000), None, None).is_err());
        assert!(BarAllocator::new((0xc000_0000, 0), None, None).is_err());
        assert!(BarAllocator::new((0xc000_0000, 0x1000), Some((1 << 40, 0)), None).is_err());
        assert!(
            BarAllocator::new((0xc000_0000, 0x4000_0000), Some((1 << 40, 1 << 30)), None).is_ok()
        );
        assert!(BarAllocator::new((0xc000_0000, 0x1000), None, Some((0xf000, 0x2000))).is_err());
        assert!(BarAllocator::new((0xc000_0000, 0x1000), None, Some((0x1000, 0xf000))).is_ok());
    }

    #[test]
    fn mapping_region_reaches_the_device() {
        let mut alloc = BarAllocator::new((0xc000_0000, 0x1_0000), None, None).unwrap();
        let dev = device(&[(3, spec(0x1000, BarKind::Memory32))]);
        let mappings = alloc.allocate(&dev).unwrap();
        let bus = vm_device::Bus::new();
        let m = &mappings[0];
        bus.insert(m.region.clone(), m.base, m.len).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(m.base + 5, &mut data));
        assert_eq!(data, [0x35]);
    }
}
