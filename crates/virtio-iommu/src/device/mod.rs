//! The device model: configuration, the endpoint and domain state, reset and introspection.
//! Its parts live beside it: `requests` (request semantics), `translate` (device accesses and
//! faults), `endpoint_dir` (bindings as lock-free readers see them) and `mapper_sync`
//! (external mappers kept in step, with rollback).
//!
//! All state sits behind one `RwLock`: requests (rare, ordered) take it for writing. Device
//! translations that hit take no lock at all (see `translate`); faults and anything unusual
//! fall back to the read lock. Per-endpoint IOTLBs are invalidated while the write lock is
//! held, and filled while the read lock is held, so an IOTLB can never be refilled with a
//! mapping an UNMAP has already removed.

mod endpoint_dir;
mod mapper_sync;
mod requests;
mod translate;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use log::error;
use thiserror::Error;
use vm_device::warn_limited;

use crate::inflight::InflightDma;
use crate::iotlb::EndpointIotlb;
use crate::mapper::ExternalMapper;
use crate::protocol::*;
use crate::stats::{Counters, HitCounter, IommuStats, StatsSnapshot};
use crate::table::{Mapping, MappingTable, MAX_TABLE_NODES, MIN_GRANULE_SHIFT};

use endpoint_dir::EndpointDir;
use mapper_sync::{settle_unattached, withdraw_leftover, WITHDRAW_ATTEMPTS};
pub(crate) use translate::perms_of;
pub use translate::{Access, Fault, FaultReason, GuestRange, MappedBlock, Translation};
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Feature bit every *protected* virtio device must offer so its guest driver routes DMA
/// through the IOMMU (`VIRTIO_F_ACCESS_PLATFORM`). The IOMMU device itself does not offer it:
/// its own queues are not translated.
pub const PROTECTED_DEVICE_FEATURES: u64 =
    1 << virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;

/// Largest accepted `probe_size`: PROBE answers are built in memory, so keep them small.
pub const MAX_PROBE_SIZE: u32 = 64 * 1024;

/// Parameters of the device. `Default` gives the values warden uses on x86.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuConfig {
    /// Supported page sizes; the lowest set bit is the mapping granule (at least 16 bytes).
    pub page_size_mask: u64,
    /// Inclusive IOVA range the device translates.
    pub input_range: (u64, u64),
    /// Inclusive range of domain IDs the driver may use.
    pub domain_range: (u32, u32),
    /// Size of the PROBE properties area; 0 means PROBE is not offered.
    pub probe_size: u32,
    /// Reserved regions reported for endpoints registered without their own list.
    pub reserved_regions: Vec<ReservedRegion>,
    /// MAP beyond this many mappings in a domain fails with NOMEM.
    pub max_mappings_per_domain: usize,
    /// MAP needing more than this many radix nodes (4 KiB each) in a domain's table fails
    /// with NOMEM: where the mappings go is the guest's choice, and scattered ones take a node
    /// each.
    pub max_table_nodes: usize,
    /// ATTACH creating a domain beyond this many fails with NOMEM.
    pub max_domains: usize,
    /// Initial (and system-reset) value of the `bypass` config field.
    pub boot_bypass: bool,
    /// Offer VIRTIO_IOMMU_F_MMIO (MAP flag MMIO).
    pub offer_mmio: bool,
    /// Fault records kept while the driver has no event buffer; older ones are kept, newer
    /// ones dropped and counted.
    pub max_pending_faults: usize,
}

impl Default for IommuConfig {
    fn default() -> Self {
        IommuConfig {
            page_size_mask: (1 << 12) | (1 << 21) | (1 << 30),
            input_range: (0, u64::MAX),
            domain_range: (0, u32::MAX),
            probe_size: 512,
            reserved_regions: vec![ReservedRegion::X86_MSI],
            max_mappings_per_domain: 1 << 21,
            max_table_nodes: MAX_TABLE_NODES,
            max_domains: 4096,
            boot_bypass: true,
            offer_mmio: true,
            max_pending_faults: 256,
        }
    }
}

/// Invalid device or endpoint configuration.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The granule (lowest bit of `page_size_mask`) is missing or below 16 bytes.
    #[error("page_size_mask {0:#x} must have a lowest set bit of at least 16 bytes")]
    PageSizeMask(u64),
    /// `start > end`, or `input_range` not aligned on the granule.
    #[error("invalid range {0:#x}..={1:#x}")]
    Range(u64, u64),
    /// The reserved regions do not fit in `probe_size`, or `probe_size` exceeds
    /// [`MAX_PROBE_SIZE`] (then `needed` is that maximum).
    #[error("probe_size {probe_size} invalid: {needed} bytes needed or allowed")]
    ProbeSize {
        /// Bytes the properties need.
        needed: usize,
        /// Configured `probe_size`.
        probe_size: u32,
    },
    /// The endpoint is already registered.
    #[error("endpoint {0:#x} already registered")]
    DuplicateEndpoint(u32),
    /// The endpoint is not registered.
    #[error("endpoint {0:#x} not registered")]
    UnknownEndpoint(u32),
    /// The endpoint's external mapper refused to withdraw its domain's mappings.
    #[error("endpoint {0:#x}: external mapper refused to detach")]
    MapperRefused(u32),
}

/// How a registered endpoint is described to the driver and mirrored outside the model.
#[derive(Clone, Default)]
pub struct EndpointConfig {
    /// Reserved regions for PROBE and MAP checks; `None` uses the device default.
    pub reserved_regions: Option<Vec<ReservedRegion>>,
    /// Where this endpoint's domain mappings must also be applied (e.g. its VFIO container).
    pub mapper: Option<Arc<dyn ExternalMapper>>,
}

/// Fast `u32`-key hasher: IDs are not attacker-chosen hash-flooding inputs in a way that
/// matters (the set of endpoints is fixed by the VMM, domains are capped by `max_domains`).
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.0 = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// State an endpoint shares with its [`crate::EndpointIommu`] handles.
#[derive(Debug, Default)]
pub(crate) struct EndpointShared {
    pub(crate) iotlb: RwLock<EndpointIotlb>,
    pub(crate) hits: AtomicU64,
    /// The endpoint's device transfers in flight: a request that takes translations away
    /// from this endpoint waits for them, and only for them, so one device's slow transfer
    /// (or one stuck on the host) holds up no other device's UNMAP.
    pub(crate) dma: Arc<InflightDma>,
}

/// The transfer counters of the endpoints `which` selects, to wait for once the state is
/// unlocked (those transfers may need it to translate).
fn transfers_of(st: &State, which: impl Fn(u32, &Endpoint) -> bool) -> Vec<Arc<InflightDma>> {
    st.endpoints
        .iter()
        .filter(|(&id, ep)| which(id, ep))
        .map(|(_, ep)| Arc::clone(&ep.shared.dma))
        .collect()
}

/// Every I/O address: what an ATTACH, a DETACH or a change of bypass takes away.
pub(crate) const EVERY_ADDRESS: (u64, u64) = (0, u64::MAX);

/// Returns once every transfer that began before this call on any of `transfers`, and may
/// touch an address from `first` to `last` (inclusive), ended; says whether there was any.
fn wait_for_transfers(transfers: &[Arc<InflightDma>], (first, last): (u64, u64)) -> bool {
    transfers.iter().fold(false, |waited, dma| {
        dma.wait_for_earlier_touching(first, last) | waited
    })
}

pub(crate) fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

struct Endpoint {
    domain: Option<u32>,
    reserved: Vec<ReservedRegion>,
    mapper: Option<Arc<dyn ExternalMapper>>,
    /// Whether the mapper currently holds the bypass identity map.
    identity: bool,
    /// Mappings of a domain the endpoint was forced out of (device reset) that its mapper
    /// refused to withdraw: the host still translates them. Until they are gone the endpoint
    /// gets no identity map and no domain (ATTACH: DEVERR), and cannot be removed.
    leftover: Vec<Mapping>,
    shared: Arc<EndpointShared>,
}

struct Domain {
    bypass: bool,
    table: MappingTable,
    endpoints: Vec<u32>,
    /// Distinct mappers of attached endpoints, with how many endpoints use each.
    mappers: Vec<(Arc<dyn ExternalMapper>, usize)>,
    counters: Counters,
    /// `table.hits()` when the domain got the table: its translations are the difference.
    hits_base: u64,
}

impl Domain {
    fn snapshot_at(&self, hits: u64) -> StatsSnapshot {
        StatsSnapshot {
            translations: hits.wrapping_sub(self.hits_base),
            ..self.counters.snapshot()
        }
    }

    fn snapshot(&self) -> StatsSnapshot {
        self.snapshot_at(self.table.hits().sum())
    }
}

struct State {
    domains: IdMap<Domain>,
    endpoints: IdMap<Endpoint>,
    bypass: bool,
    acked_features: u64,
    /// Emptied tables of destroyed domains, with their hit count at destruction, reused for
    /// new domains. A lock-free reader may still be walking a destroyed domain's table, so
    /// tables (their root and radix nodes, up to the largest size each ever had) are only
    /// freed with the device; at most `max_domains` + 1 tables ever exist.
    table_pool: Vec<(MappingTable, u64)>,
}

#[derive(Default)]
struct FaultQueue {
    pending: std::collections::VecDeque<FaultRecord>,
    dropped: u64,
}

/// Called (from whichever thread faulted) when a fault record is queued. It must not block
/// and must not call back into the device; signalling an `EventFd` is the intended use.
pub type FaultNotifier = Arc<dyn Fn() + Send + Sync>;

/// The virtio-iommu device model. Share it in an `Arc` between the request-queue thread and
/// the translating device threads.
pub struct VirtioIommu {
    config: IommuConfig,
    granule_shift: u32,
    state: RwLock<State>,
    faults: Mutex<FaultQueue>,
    notifier: RwLock<Option<FaultNotifier>>,
    /// Destroyed domains and unattached-endpoint faults.
    totals: Counters,
    /// Translations of unattached endpoints under the global bypass.
    bypass_hits: HitCounter,
    /// Endpoint bindings for lock-free translation.
    dir: EndpointDir,
    /// The last destroyed domains' counters, newest last: a guest resets the IOMMU when it
    /// shuts down, and what each domain did must still be reportable afterwards.
    retired: Mutex<VecDeque<(u32, StatsSnapshot)>>,
    /// Requests that completed only once device transfers still in flight through what they
    /// took away had ended ([`IommuStats::requests_waited_for_dma`]).
    requests_waited_for_dma: AtomicU64,
}

/// How many destroyed domains [`IommuStats::retired_domains`] remembers.
pub const RETIRED_DOMAINS_KEPT: usize = 64;

impl std::fmt::Debug for VirtioIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioIommu")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl VirtioIommu {
    /// Create a device; validates the configuration.
    pub fn new(config: IommuConfig) -> Result<Self, ConfigError> {
        let granule_shift = config.page_size_mask.trailing_zeros();
        if config.page_size_mask == 0 || granule_shift < MIN_GRANULE_SHIFT {
            return Err(ConfigError::PageSizeMask(config.page_size_mask));
        }
        let g = (1u64 << granule_shift) - 1;
        let (s, e) = config.input_range;
        if s > e || s & g != 0 || e.wrapping_add(1) & g != 0 {
            return Err(ConfigError::Range(s, e));
        }
        let (ds, de) = config.domain_range;
        if ds > de {
            return Err(ConfigError::Range(ds.into(), de.into()));
        }
        let dev = VirtioIommu {
            granule_shift,
            state: RwLock::new(State {
                domains: IdMap::default(),
                endpoints: IdMap::default(),
                bypass: config.boot_bypass,
                acked_features: 0,
                table_pool: Vec::new(),
            }),
            faults: Mutex::new(FaultQueue::default()),
            notifier: RwLock::new(None),
            totals: Counters::default(),
            bypass_hits: HitCounter::default(),
            dir: EndpointDir::new(),
            retired: Mutex::new(VecDeque::new()),
            requests_waited_for_dma: AtomicU64::new(0),
            config,
        };
        if dev.config.probe_size > MAX_PROBE_SIZE {
            return Err(ConfigError::ProbeSize {
                needed: MAX_PROBE_SIZE as usize,
                probe_size: dev.config.probe_size,
            });
        }
        dev.check_probe_fit(&dev.config.reserved_regions)?;
        Ok(dev)
    }

    /// The configuration the device was built with.
    pub fn config(&self) -> &IommuConfig {
        &self.config
    }

    fn check_probe_fit(&self, regions: &[ReservedRegion]) -> Result<(), ConfigError> {
        let needed = regions.len() * RESV_MEM_PROPERTY_SIZE;
        if self.config.probe_size > 0 && needed > self.config.probe_size as usize {
            return Err(ConfigError::ProbeSize {
                needed,
                probe_size: self.config.probe_size,
            });
        }
        Ok(())
    }

    /// Register an endpoint ID (e.g. a PCI BDF) the device manages. Requests naming any other
    /// endpoint get NOENT. The endpoint starts unattached.
    pub fn add_endpoint(&self, id: u32, cfg: EndpointConfig) -> Result<(), ConfigError> {
        let reserved = cfg
            .reserved_regions
            .unwrap_or_else(|| self.config.reserved_regions.clone());
        self.check_probe_fit(&reserved)?;
        let mut st = write_lock(&self.state);
        if st.endpoints.contains_key(&id) {
            return Err(ConfigError::DuplicateEndpoint(id));
        }
        // A new endpoint is unattached: under boot bypass its DMA must already reach RAM.
        let identity = st.bypass && cfg.mapper.is_some();
        if let Some(m) = cfg.mapper.as_ref().filter(|_| identity) {
            if m.set_identity(true).is_err() {
                return Err(ConfigError::MapperRefused(id));
            }
        }
        st.endpoints.insert(
            id,
            Endpoint {
                domain: None,
                reserved,
                mapper: cfg.mapper,
                identity,
                leftover: Vec::new(),
                shared: Arc::default(),
            },
        );
        self.publish(&st, id);
        Ok(())
    }

    /// Unregister an endpoint (hot-unplug), detaching it first. Fails, leaving it attached
    /// (or with its leftover mappings), if its mapper refuses to withdraw them.
    pub fn remove_endpoint(&self, id: u32) -> Result<(), ConfigError> {
        let mut st = write_lock(&self.state);
        let Some(ep) = st.endpoints.get_mut(&id) else {
            return Err(ConfigError::UnknownEndpoint(id));
        };
        if !withdraw_leftover(id, ep) {
            return Err(ConfigError::MapperRefused(id));
        }
        if let Some(d) = ep.domain {
            if self.detach(&mut st, id, d) != Status::Ok {
                return Err(ConfigError::MapperRefused(id));
            }
        }
        let Some(ep) = st.endpoints.remove(&id) else {
            return Ok(());
        };
        self.publish(&st, id);
        // Handles of the endpoint may outlive it: nothing cached (bypass) may serve them.
        write_lock(&ep.shared.iotlb).invalidate_all();
        if let Some(m) = ep.mapper.filter(|_| ep.identity) {
            if let Err(e) = m.set_identity(false) {
                error!("endpoint {id:#x}: identity map left behind: {e}");
            }
        }
        drop(st);
        ep.shared.dma.wait_for_earlier();
        Ok(())
    }

    pub(crate) fn endpoint_shared(&self, id: u32) -> Option<Arc<EndpointShared>> {
        read_lock(&self.state)
            .endpoints
            .get(&id)
            .map(|e| e.shared.clone())
    }

    /// Register the callback signalled when a fault record is queued (replaces any previous).
    pub fn set_fault_notifier(&self, notifier: Option<FaultNotifier>) {
        *write_lock(&self.notifier) = notifier;
    }

    // ---- features and config space ----

    /// Feature bits the device offers.
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_IOMMU_F_INPUT_RANGE)
            | (1 << VIRTIO_IOMMU_F_DOMAIN_RANGE)
            | (1 << VIRTIO_IOMMU_F_MAP_UNMAP)
            | (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG);
        if self.config.probe_size > 0 {
            f |= 1 << VIRTIO_IOMMU_F_PROBE;
        }
        if self.config.offer_mmio {
            f |= 1 << VIRTIO_IOMMU_F_MMIO;
        }
        f
    }

    /// Record the features the driver accepted (bits not offered are dropped).
    pub fn ack_features(&self, features: u64) {
        write_lock(&self.state).acked_features = features & self.features();
    }

    /// Features negotiated so far.
    pub fn acked_features(&self) -> u64 {
        read_lock(&self.state).acked_features
    }

    fn acked(st: &State, bit: u32) -> bool {
        st.acked_features & (1 << bit) != 0
    }

    fn config_space(&self, st: &State) -> ConfigSpace {
        ConfigSpace {
            page_size_mask: self.config.page_size_mask,
            input_range: self.config.input_range,
            domain_range: self.config.domain_range,
            probe_size: self.config.probe_size,
            bypass: u8::from(st.bypass),
        }
    }

    /// Read the config space; bytes past its end read as zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.config_space(&read_lock(&self.state)).encode();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| bytes.get(o).copied())
                .unwrap_or(0);
        }
    }

    /// Write the config space. Only `bypass` is writable, and only once BYPASS_CONFIG is
    /// negotiated; other writes are ignored. Only bit 0 is kept, so the field stays 0 or 1.
    pub fn write_config(&self, offset: u64, data: &[u8]) {
        let idx = (CONFIG_BYPASS_OFFSET as u64).checked_sub(offset);
        let Some(value) = idx
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| data.get(i))
        else {
            warn_limited!("ignoring write to read-only iommu config at {offset:#x}");
            return;
        };
        let mut st = write_lock(&self.state);
        if !Self::acked(&st, VIRTIO_IOMMU_F_BYPASS_CONFIG) {
            warn_limited!("ignoring bypass write: BYPASS_CONFIG not negotiated");
            return;
        }
        self.set_global_bypass(&mut st, value & 1 != 0);
        let unattached = transfers_of(&st, |_, ep| ep.domain.is_none());
        drop(st);
        wait_for_transfers(&unattached, EVERY_ADDRESS);
    }

    /// Change the `bypass` field: unattached endpoints switch mode, so their IOTLBs are
    /// flushed and their mappers gain or drop the identity map. A mapper failure here cannot
    /// be reported to the driver; it is logged and the mapper keeps its previous state.
    fn set_global_bypass(&self, st: &mut State, bypass: bool) {
        st.bypass = bypass;
        let unattached: Vec<u32> = st
            .endpoints
            .iter()
            .filter(|(_, e)| e.domain.is_none())
            .map(|(&id, _)| id)
            .collect();
        for &id in &unattached {
            self.publish(st, id);
        }
        for (&id, ep) in st.endpoints.iter_mut().filter(|(_, e)| e.domain.is_none()) {
            write_lock(&ep.shared.iotlb).invalidate_all();
            settle_unattached(id, ep, bypass);
        }
    }

    /// Current value of the `bypass` config field.
    pub fn bypass(&self) -> bool {
        read_lock(&self.state).bypass
    }

    /// Device reset: every endpoint is detached and every domain destroyed, features and
    /// pending faults are cleared. `bypass` keeps its value, as the spec asks. A mapper that
    /// keeps refusing to withdraw a domain cannot keep the domain alive, but what it still
    /// holds stays recorded on its endpoint and is retried.
    pub fn reset(&self) {
        let mut st = write_lock(&self.state);
        let attached: Vec<(u32, u32)> = st
            .endpoints
            .iter()
            .filter_map(|(&id, e)| e.domain.map(|d| (id, d)))
            .collect();
        for (id, d) in attached {
            let detached =
                (0..WITHDRAW_ATTEMPTS).any(|_| self.detach(&mut st, id, d) == Status::Ok);
            if !detached {
                self.force_detach(&mut st, id, d);
            }
        }
        let bypass = st.bypass;
        for (&id, ep) in st.endpoints.iter_mut() {
            if ep.domain.is_none() {
                settle_unattached(id, ep, bypass);
            }
        }
        st.acked_features = 0;
        lock(&self.faults).pending.clear();
        let every = transfers_of(&st, |_, _| true);
        drop(st);
        wait_for_transfers(&every, EVERY_ADDRESS);
    }

    /// Restore the `bypass` field to its boot value (system reset, not device reset).
    pub fn system_reset(&self) {
        self.reset();
        let mut st = write_lock(&self.state);
        self.set_global_bypass(&mut st, self.config.boot_bypass);
    }

    // ---- introspection ----

    /// Statistics snapshot: totals and per live domain.
    pub fn stats(&self) -> IommuStats {
        let st = read_lock(&self.state);
        let mut domains: Vec<(u32, StatsSnapshot)> = st
            .domains
            .iter()
            .map(|(&id, d)| (id, d.snapshot()))
            .collect();
        domains.sort_by_key(|(id, _)| *id);
        let mut base = self.totals.snapshot();
        let parked = st.table_pool.iter().fold(0u64, |a, (t, h)| {
            a.wrapping_add(t.hits().sum().wrapping_sub(*h))
        });
        base.translations = base
            .translations
            .wrapping_add(self.bypass_hits.sum())
            .wrapping_add(parked);
        let total =
            StatsSnapshot::sum(std::iter::once(&base).chain(domains.iter().map(|(_, s)| s)));
        IommuStats {
            total,
            domains,
            retired_domains: lock(&self.retired).iter().copied().collect(),
            dropped_fault_events: lock(&self.faults).dropped,
            requests_waited_for_dma: self.requests_waited_for_dma.load(Ordering::Relaxed),
            iotlb_hits: st
                .endpoints
                .values()
                .map(|e| e.shared.hits.load(Ordering::Relaxed))
                .sum(),
        }
    }

    /// Statistics of one live domain.
    pub fn domain_stats(&self, domain: u32) -> Option<StatsSnapshot> {
        read_lock(&self.state)
            .domains
            .get(&domain)
            .map(Domain::snapshot)
    }

    /// The domain an endpoint is attached to.
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<u32> {
        read_lock(&self.state)
            .endpoints
            .get(&endpoint)
            .and_then(|e| e.domain)
    }

    /// The mappings of a domain, in IOVA order (for migration, debugging and tests).
    pub fn domain_mappings(&self, domain: u32) -> Option<Vec<Mapping>> {
        read_lock(&self.state).domains.get(&domain).map(|d| {
            let mut v: Vec<Mapping> = d.table.iter().collect();
            v.sort_by_key(|m| m.start);
            v
        })
    }

    /// Number of live domains.
    pub fn domain_count(&self) -> usize {
        read_lock(&self.state).domains.len()
    }
}
