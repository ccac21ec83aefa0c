//! [`VfioMapper`]: a passed-through device's DMA mappings, as the host IOMMU must see them.
//!
//! With `iommu=on` the virtio-iommu model calls it for every MAP/UNMAP of the domain the
//! device is attached to (and replays or withdraws whole domains on ATTACH/DETACH); without,
//! the VMM calls [`ExternalMapper::set_identity`] once at start and all guest RAM is mapped
//! at IOVA = GPA. Either way a guest-physical range becomes the host virtual address of guest
//! RAM, which is what VFIO pins and maps.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::{debug, error};
use virtio_iommu::{ExternalMapper, MapPerms, MapperError};
use vm_device::error_limited;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::container::DmaContainer;

/// Where the host says how many DMA mappings one VFIO container may hold.
pub const DMA_ENTRY_LIMIT_PATH: &str = "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit";
/// The kernel's default for `vfio_iommu_type1.dma_entry_limit`.
pub const DEFAULT_DMA_ENTRY_LIMIT: u64 = 65_535;

/// Reads the host's per-container DMA entry limit; the kernel default if it can't be read
/// (the module is not loaded yet, or an older kernel without the parameter).
pub fn host_dma_entry_limit(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(DEFAULT_DMA_ENTRY_LIMIT)
}

/// What one device's mapper did, for the exit report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioStats {
    /// Successful `VFIO_IOMMU_MAP_DMA` calls.
    pub maps: u64,
    /// Successful `VFIO_IOMMU_UNMAP_DMA` calls.
    pub unmaps: u64,
    /// Bytes mapped, cumulative.
    pub bytes_mapped: u64,
    /// Mappings the container holds now (each counts against the entry limit).
    pub live_entries: u64,
    /// Most mappings held at once.
    pub peak_entries: u64,
    /// MAPs refused because the entry limit was reached.
    pub limit_refusals: u64,
    /// The host's entry limit.
    pub entry_limit: u64,
}

impl fmt::Display for VfioStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} maps, {} unmaps, {} bytes mapped, {} entries live, {} peak entries (limit {}, {} refused)",
            self.maps,
            self.unmaps,
            self.bytes_mapped,
            self.live_entries,
            self.peak_entries,
            self.entry_limit,
            self.limit_refusals
        )
    }
}

/// Mirrors one device's mappings into its VFIO container.
pub struct VfioMapper {
    /// Names the device in messages (`--device id=`, or its path).
    name: String,
    container: Arc<dyn DmaContainer>,
    memory: GuestMemoryMmap,
    state: Mutex<VfioStats>,
    /// The limit message is printed once: a guest that hits the limit usually keeps trying.
    limit_reported: AtomicBool,
}

impl VfioMapper {
    /// A mapper for device `name` whose DMA lands in `memory`, with at most `entry_limit`
    /// mappings in `container` at once.
    pub fn new(
        name: &str,
        container: Arc<dyn DmaContainer>,
        memory: GuestMemoryMmap,
        entry_limit: u64,
    ) -> Self {
        Self {
            name: name.to_string(),
            container,
            memory,
            state: Mutex::new(VfioStats {
                entry_limit,
                ..VfioStats::default()
            }),
            limit_reported: AtomicBool::new(false),
        }
    }

    pub fn stats(&self) -> VfioStats {
        *self.lock()
    }

    fn lock(&self) -> MutexGuard<'_, VfioStats> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The host address of `size` bytes of guest RAM at `gpa`, which must lie in one RAM region.
    ///
    /// Anything else (another device's BAR, the MSI window, a hole) is refused: VFIO could
    /// only map it through some host mapping of that device, and peer-to-peer DMA between
    /// passed-through devices is not supported. The refusal is `MapperError::Failed`, which the
    /// model reports to the guest as DEVERR for that MAP (the guest's `iommu_map` fails, the
    /// VMM keeps running and the rest of the domain is untouched).
    fn host_address(&self, gpa: u64, size: u64) -> Result<u64, MapperError> {
        let outside = || {
            MapperError::Failed(format!(
                "{}: GPA {gpa:#x}+{size:#x} is not guest RAM (a device BAR or a hole): peer-to-peer DMA is not supported",
                self.name
            ))
        };
        let region = self
            .memory
            .find_region(GuestAddress(gpa))
            .ok_or_else(outside)?;
        let offset = gpa - region.start_addr().0;
        if offset
            .checked_add(size)
            .is_none_or(|end| end > region.len())
        {
            return Err(outside());
        }
        let host = region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|_| outside())?;
        Ok(host as u64)
    }

    /// Maps one range, counting it against the entry limit.
    fn map_one(
        &self,
        iova: u64,
        vaddr: u64,
        size: u64,
        perms: MapPerms,
    ) -> Result<(), MapperError> {
        let mut stats = self.lock();
        if stats.live_entries >= stats.entry_limit {
            stats.limit_refusals += 1;
            let limit = stats.entry_limit;
            drop(stats);
            self.report_limit(limit);
            return Err(MapperError::NoResources);
        }
        // SAFETY: `vaddr` comes from `host_address`: guest RAM, mapped for the VMM's lifetime.
        match unsafe { self.container.map(iova, size, vaddr, perms) } {
            Ok(()) => {
                stats.maps += 1;
                stats.bytes_mapped += size;
                stats.live_entries += 1;
                stats.peak_entries = stats.peak_entries.max(stats.live_entries);
                Ok(())
            }
            // The kernel's own count said no (e.g. the limit was lowered by another user).
            Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => {
                stats.limit_refusals += 1;
                let limit = stats.entry_limit;
                drop(stats);
                self.report_limit(limit);
                Err(MapperError::NoResources)
            }
            Err(err) if err.raw_os_error() == Some(libc::ENOMEM) => {
                error_limited!(
                    "{}: VFIO could not pin {size:#x} bytes for IOVA {iova:#x}: {err} (raise the locked-memory limit: ulimit -l)",
                    self.name
                );
                Err(MapperError::NoResources)
            }
            Err(err) => Err(MapperError::Failed(format!(
                "{}: VFIO map of IOVA {iova:#x}+{size:#x}: {err}",
                self.name
            ))),
        }
    }

    fn unmap_one(&self, iova: u64, size: u64) -> Result<(), MapperError> {
        let mut stats = self.lock();
        self.container.unmap(iova, size).map_err(|err| {
            MapperError::Failed(format!(
                "{}: VFIO unmap of IOVA {iova:#x}+{size:#x}: {err}",
                self.name
            ))
        })?;
        stats.unmaps += 1;
        stats.live_entries = stats.live_entries.saturating_sub(1);
        Ok(())
    }

    fn report_limit(&self, limit: u64) {
        if !self.limit_reported.swap(true, Ordering::Relaxed) {
            eprintln!(
                "warden: {}: the guest's DMA mappings reached VFIO's limit of {limit} entries per container ({DMA_ENTRY_LIMIT_PATH}); further MAP requests fail with NOMEM. Remedy: back guest RAM with huge pages (--memory hugepages=on or file=/dev/hugepages) so the guest maps fewer, larger ranges, or raise the limit before starting warden (modprobe vfio_iommu_type1 dma_entry_limit=N, or write N to {DMA_ENTRY_LIMIT_PATH})",
                self.name
            );
        }
    }

    /// Every RAM region, as (GPA, host address, length).
    fn ram(&self) -> Vec<(u64, u64, u64)> {
        self.memory
            .iter()
            .map(|region| (region.start_addr().0, region.as_ptr() as u64, region.len()))
            .collect()
    }
}

impl ExternalMapper for VfioMapper {
    fn map(&self, iova: u64, gpa: u64, size: u64, perms: MapPerms) -> Result<(), MapperError> {
        let vaddr = self.host_address(gpa, size)?;
        debug!(
            "{}: VFIO map {iova:#x}+{size:#x} -> GPA {gpa:#x}",
            self.name
        );
        self.map_one(iova, vaddr, size, perms)
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), MapperError> {
        debug!("{}: VFIO unmap {iova:#x}+{size:#x}", self.name);
        self.unmap_one(iova, size)
    }

    /// Maps (or unmaps) all guest RAM at IOVA = GPA, one entry per RAM region; a failure
    /// midway undoes the regions already done.
    fn set_identity(&self, enabled: bool) -> Result<(), MapperError> {
        let all = MapPerms {
            read: true,
            write: true,
        };
        let ram = self.ram();
        for (i, &(gpa, vaddr, len)) in ram.iter().enumerate() {
            let done = if enabled {
                self.map_one(gpa, vaddr, len, all)
            } else {
                self.unmap_one(gpa, len)
            };
            if let Err(err) = done {
                for &(gpa, vaddr, len) in ram[..i].iter().rev() {
                    let undone = if enabled {
                        self.unmap_one(gpa, len)
                    } else {
                        self.map_one(gpa, vaddr, len, all)
                    };
                    if let Err(err) = undone {
                        error!("{}: identity map rollback failed: {err}", self.name);
                    }
                }
                return Err(err);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io;

    use virtio_iommu::protocol::{
        AttachRequest, MapRequest, Request, UnmapRequest, VIRTIO_IOMMU_MAP_F_READ,
        VIRTIO_IOMMU_MAP_F_WRITE,
    };
    use virtio_iommu::{EndpointConfig, IommuConfig, Status, VirtioIommu};

    /// A container that records its mappings and can be told to fail.
    #[derive(Default)]
    struct FakeContainer {
        maps: Mutex<BTreeMap<u64, (u64, u64, MapPerms)>>,
        /// Fail the map whose IOVA is this one, with this errno.
        fail_map_at: Mutex<Option<(u64, i32)>>,
        calls: Mutex<Vec<String>>,
    }

    impl FakeContainer {
        fn mapped(&self) -> Vec<(u64, u64)> {
            let maps = self.maps.lock().unwrap();
            maps.iter()
                .map(|(&iova, &(size, _, _))| (iova, size))
                .collect()
        }
        fn vaddr(&self, iova: u64) -> Option<u64> {
            self.maps.lock().unwrap().get(&iova).map(|m| m.1)
        }
    }

    impl DmaContainer for FakeContainer {
        unsafe fn map(&self, iova: u64, size: u64, vaddr: u64, perms: MapPerms) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("map {iova:#x}+{size:#x}"));
            if let Some((at, errno)) = *self.fail_map_at.lock().unwrap() {
                if at == iova {
                    return Err(io::Error::from_raw_os_error(errno));
                }
            }
            let mut maps = self.maps.lock().unwrap();
            // VFIO refuses overlaps with EEXIST; so does the fake.
            if maps
                .iter()
                .any(|(&start, &(len, _, _))| start < iova + size && iova < start + len)
            {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            maps.insert(iova, (size, vaddr, perms));
            Ok(())
        }

        fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("unmap {iova:#x}+{size:#x}"));
            let mut maps = self.maps.lock().unwrap();
            match maps.get(&iova) {
                Some(&(len, _, _)) if len == size => {
                    maps.remove(&iova);
                    Ok(())
                }
                _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            }
        }
    }

    const RAM: u64 = 64 << 20;
    const RW: MapPerms = MapPerms {
        read: true,
        write: true,
    };

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn setup(limit: u64) -> (Arc<FakeContainer>, Arc<VfioMapper>, GuestMemoryMmap) {
        let fake = Arc::new(FakeContainer::default());
        let mem = memory();
        let mapper = Arc::new(VfioMapper::new("dev0", fake.clone(), mem.clone(), limit));
        (fake, mapper, mem)
    }

    fn host(mem: &GuestMemoryMmap, gpa: u64) -> u64 {
        mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    #[test]
    fn map_translates_gpa_to_host_and_keeps_permissions() {
        let (fake, mapper, mem) = setup(10);
        let ro = MapPerms {
            read: true,
            write: false,
        };
        mapper.map(0x10_0000, 0x20_0000, 0x2000, ro).unwrap();
        assert_eq!(fake.vaddr(0x10_0000), Some(host(&mem, 0x20_0000)));
        assert_eq!(fake.maps.lock().unwrap()[&0x10_0000].2, ro);
        mapper.unmap(0x10_0000, 0x2000).unwrap();
        assert!(fake.mapped().is_empty());
        let stats = mapper.stats();
        assert_eq!(
            (stats.maps, stats.unmaps, stats.bytes_mapped),
            (1, 1, 0x2000)
        );
        assert_eq!((stats.live_entries, stats.peak_entries), (0, 1));
    }

    #[test]
    fn gpa_outside_ram_is_refused_before_vfio_sees_it() {
        let (fake, mapper, _) = setup(10);
        // A BAR in the 32-bit PCI window, and a range running off the end of RAM.
        for (gpa, size) in [(0xc000_0000, 0x1000), (RAM - 0x1000, 0x2000)] {
            let err = mapper.map(0, gpa, size, RW).unwrap_err();
            assert!(
                matches!(&err, MapperError::Failed(m) if m.contains("not guest RAM")),
                "{err}"
            );
        }
        assert!(fake.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn identity_maps_every_region_and_rolls_back() {
        let fake = Arc::new(FakeContainer::default());
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 << 20),
            (GuestAddress(1 << 32), 16 << 20),
        ])
        .unwrap();
        let mapper = VfioMapper::new("dev0", fake.clone(), mem.clone(), 10);
        mapper.set_identity(true).unwrap();
        assert_eq!(fake.mapped(), [(0, 16 << 20), (1 << 32, 16 << 20)]);
        assert_eq!(fake.vaddr(1 << 32), Some(host(&mem, 1 << 32)));
        mapper.set_identity(false).unwrap();
        assert!(fake.mapped().is_empty());

        // The second region fails: the first is unmapped again.
        *fake.fail_map_at.lock().unwrap() = Some((1 << 32, libc::EFAULT));
        assert!(mapper.set_identity(true).is_err());
        assert!(fake.mapped().is_empty());
        assert_eq!(mapper.stats().live_entries, 0);
    }

    #[test]
    fn limit_reached_is_nomem_and_frees_up_after_unmap() {
        let (fake, mapper, _) = setup(2);
        mapper.map(0x0, 0x0, 0x1000, RW).unwrap();
        mapper.map(0x1000, 0x1000, 0x1000, RW).unwrap();
        assert_eq!(
            mapper.map(0x2000, 0x2000, 0x1000, RW),
            Err(MapperError::NoResources)
        );
        assert_eq!(fake.mapped().len(), 2, "the refused MAP never reached VFIO");
        let stats = mapper.stats();
        assert_eq!((stats.limit_refusals, stats.peak_entries), (1, 2));
        mapper.unmap(0x0, 0x1000).unwrap();
        mapper.map(0x2000, 0x2000, 0x1000, RW).unwrap();
        // The kernel's own ENOSPC is the same condition.
        *fake.fail_map_at.lock().unwrap() = Some((0x8000, libc::ENOSPC));
        mapper.unmap(0x1000, 0x1000).unwrap();
        assert_eq!(
            mapper.map(0x8000, 0x8000, 0x1000, RW),
            Err(MapperError::NoResources)
        );
        assert_eq!(mapper.stats().limit_refusals, 2);
    }

    #[test]
    fn entry_limit_is_read_from_the_host_or_defaulted() {
        let dir = std::env::temp_dir().join(format!("warden-vfio-limit-{}", std::process::id()));
        std::fs::write(&dir, "1234\n").unwrap();
        assert_eq!(host_dma_entry_limit(&dir), 1234);
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(host_dma_entry_limit(&dir), DEFAULT_DMA_ENTRY_LIMIT);
    }

    // Through the device model: what the guest's requests turn into.

    const EP: u32 = 0x20;

    fn model_with(mapper: Arc<VfioMapper>) -> VirtioIommu {
        let model = VirtioIommu::new(IommuConfig {
            boot_bypass: false,
            ..IommuConfig::default()
        })
        .unwrap();
        model
            .add_endpoint(
                EP,
                EndpointConfig {
                    reserved_regions: None,
                    mapper: Some(mapper),
                },
            )
            .unwrap();
        model
    }

    fn attach(model: &VirtioIommu, domain: u32) -> Status {
        model.handle_request(&protocol_attach(domain, EP), 0).0
    }

    fn protocol_attach(domain: u32, endpoint: u32) -> Request {
        Request::Attach(AttachRequest {
            domain,
            endpoint,
            flags: 0,
            reserved: [0; 4],
        })
    }

    fn map_req(domain: u32, iova: u64, gpa: u64, size: u64) -> Request {
        Request::Map(MapRequest {
            domain,
            virt_start: iova,
            virt_end: iova + size - 1,
            phys_start: gpa,
            flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
        })
    }

    fn unmap_req(domain: u32, iova: u64, size: u64) -> Request {
        Request::Unmap(UnmapRequest {
            domain,
            virt_start: iova,
            virt_end: iova + size - 1,
        })
    }

    #[test]
    fn model_map_unmap_replay_and_detach_reach_the_container() {
        let (fake, mapper, mem) = setup(100);
        let model = model_with(mapper.clone());
        assert!(
            fake.mapped().is_empty(),
            "nothing is mapped before the guest asks"
        );

        // Mappings made before the endpoint joins are replayed on ATTACH.
        assert_eq!(attach_other_and_map(&model), Status::Ok);
        assert!(fake.mapped().is_empty());
        assert_eq!(attach(&model, 1), Status::Ok);
        assert_eq!(fake.mapped(), [(0x4000_0000, 0x20_0000)]);
        assert_eq!(fake.vaddr(0x4000_0000), Some(host(&mem, 0x20_0000)));

        assert_eq!(
            model
                .handle_request(&map_req(1, 0x1000, 0x3000, 0x1000), 0)
                .0,
            Status::Ok
        );
        assert_eq!(fake.mapped().len(), 2);
        assert_eq!(
            model.handle_request(&unmap_req(1, 0x1000, 0x1000), 0).0,
            Status::Ok
        );
        assert_eq!(fake.mapped(), [(0x4000_0000, 0x20_0000)]);

        // Moving to another domain withdraws domain 1's mappings.
        assert_eq!(attach(&model, 2), Status::Ok);
        assert!(fake.mapped().is_empty());
        let stats = mapper.stats();
        assert_eq!((stats.maps, stats.unmaps, stats.live_entries), (2, 2, 0));
    }

    /// Domain 1 gets a mapping through another endpoint without a mapper.
    fn attach_other_and_map(model: &VirtioIommu) -> Status {
        model.add_endpoint(0x8, EndpointConfig::default()).unwrap();
        let s = model.handle_request(&protocol_attach(1, 0x8), 0).0;
        if s != Status::Ok {
            return s;
        }
        model
            .handle_request(&map_req(1, 0x4000_0000, 0x20_0000, 0x20_0000), 0)
            .0
    }

    #[test]
    fn model_rolls_back_a_failed_replay_and_reports_the_limit() {
        let (fake, mapper, _) = setup(1);
        let model = model_with(mapper.clone());
        model.add_endpoint(0x8, EndpointConfig::default()).unwrap();
        assert_eq!(
            model.handle_request(&protocol_attach(1, 0x8), 0).0,
            Status::Ok
        );
        for i in 0..2 {
            let req = map_req(1, i * 0x1000, i * 0x1000, 0x1000);
            assert_eq!(model.handle_request(&req, 0).0, Status::Ok);
        }
        // Two mappings, room for one: the replay fails, nothing stays in the container and
        // the endpoint is still detached.
        assert_eq!(attach(&model, 1), Status::NoMem);
        assert!(fake.mapped().is_empty());
        assert_eq!(model.endpoint_domain(EP), None);
        assert_eq!(mapper.stats().limit_refusals, 1);

        // Attached to an empty domain, a MAP past the limit is NOMEM and leaves no trace.
        assert_eq!(attach(&model, 3), Status::Ok);
        assert_eq!(
            model.handle_request(&map_req(3, 0, 0, 0x1000), 0).0,
            Status::Ok
        );
        assert_eq!(
            model
                .handle_request(&map_req(3, 0x1000, 0x1000, 0x1000), 0)
                .0,
            Status::NoMem
        );
        assert_eq!(model.domain_mappings(3).unwrap().len(), 1);
        assert_eq!(fake.mapped(), [(0, 0x1000)]);
    }

    #[test]
    fn model_refuses_a_map_of_a_bar_with_deverr() {
        let (fake, mapper, _) = setup(10);
        let model = model_with(mapper);
        assert_eq!(attach(&model, 1), Status::Ok);
        let bar = map_req(1, 0x1_0000, 0xc000_0000, 0x1000);
        assert_eq!(model.handle_request(&bar, 0).0, Status::DevErr);
        assert!(fake.mapped().is_empty());
        assert!(model.domain_mappings(1).unwrap().is_empty());
    }
}
