//! The device model: configuration, features, domains, endpoints, request semantics,
//! translation for devices and fault bookkeeping.
//!
//! All state sits behind one `RwLock`: requests (rare, ordered) take it for writing. Device
//! translations that hit take no lock at all (see "Lock-free translation" below); faults and
//! anything unusual fall back to the read lock. Per-endpoint IOTLBs are invalidated while the
//! write lock is held, and filled while the read lock is held, so an IOTLB can never be
//! refilled with a mapping an UNMAP has already removed.
//!
//! # Lock-free translation
//!
//! A locked read path costs two atomic read-modify-writes for the lock and one for the
//! statistics counter; on x86 each is a full barrier that stops consecutive random radix walks
//! from overlapping in the CPU (83 ns instead of ~10 ns per random hit at 1 M mappings). So
//! [`VirtioIommu::translate`] first tries a path made only of loads and plain stores:
//! - endpoint ID -> [`EndpointSlot`] through [`EndpointDir`], a lazily filled two-level array
//!   for IDs below 65536 (PCI BDFs); larger IDs always take the locked path;
//! - the slot holds the endpoint's binding (unregistered, unattached, bypass, or the domain's
//!   table) under a sequence count ([`SeqCount`]) that writers make odd around every change;
//! - the domain's radix table ([`RadixRoot`]) has its own sequence count, odd around every
//!   MAP/UNMAP/clear;
//! - a walk is kept only if neither count moved, so it equals the state at one instant;
//!   otherwise it is retried, and after [`READ_ATTEMPTS`] (or for an unregistered or
//!   unattached endpoint) the locked path decides and records faults exactly as before;
//! - a validated miss (no mapping or permission) is a fault, recorded under the read lock
//!   without walking again, provided the endpoint's binding is still the one that missed;
//! - success is counted in a [`HitCounter`] (per-thread slots, no read-modify-write).
//!
//! Memory safety does not depend on the counts: everything a reader can reach is type-stable.
//! Slots and directory leaves live until the device is dropped. A destroyed domain's table is
//! emptied and parked in `State::table_pool` for the next new domain instead of being freed,
//! since a reader may still be walking it; the counts make such a reader retry.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use log::{debug, error};
use thiserror::Error;
use vm_device::{error_limited, warn_limited};
use vm_memory::Permissions;

use crate::inflight::{DmaGuard, InflightDma};
use crate::iotlb::EndpointIotlb;
use crate::mapper::{ExternalMapper, MapPerms, MapperError};
use crate::protocol::*;
use crate::seqlock::{race_point, read_fence, RacePoint, SeqCount};
use crate::stats::{Counters, HitCounter, IommuStats, StatsSnapshot};
use crate::table::{
    Mapping, MappingTable, RadixRoot, MAX_TABLE_NODES, MIN_GRANULE_SHIFT, PERM_READ, PERM_WRITE,
};

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

/// Kind of a device access being translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// The endpoint reads guest memory (DMA to the device).
    Read,
    /// The endpoint writes guest memory.
    Write,
}

impl Access {
    fn perms(self) -> u8 {
        match self {
            Access::Read => PERM_READ,
            Access::Write => PERM_WRITE,
        }
    }
}

pub(crate) fn perms_of(p: Permissions) -> u8 {
    match p {
        Permissions::No => 0,
        Permissions::Read => PERM_READ,
        Permissions::Write => PERM_WRITE,
        Permissions::ReadWrite => PERM_READ | PERM_WRITE,
    }
}

fn permissions_from(perms: u8) -> Permissions {
    match perms & (PERM_READ | PERM_WRITE) {
        0 => Permissions::No,
        PERM_READ => Permissions::Read,
        PERM_WRITE => Permissions::Write,
        _ => Permissions::ReadWrite,
    }
}

/// Why a translation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// The endpoint is not registered with the device.
    Unknown,
    /// The endpoint is not attached to a domain and not in bypass mode.
    Domain,
    /// The address is not mapped, or not with the needed permission.
    Mapping,
}

/// A refused translation. It has been counted and, for registered endpoints, queued as an
/// event-queue FAULT record by the time the caller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Why.
    pub reason: FaultReason,
    /// Faulting endpoint.
    pub endpoint: u32,
    /// First IOVA that could not be translated.
    pub address: u64,
    /// `PERM_*` bits the access needed.
    pub(crate) need: u8,
}

impl Fault {
    /// The event-queue record for this fault.
    pub fn record(&self) -> FaultRecord {
        let mut flags = VIRTIO_IOMMU_FAULT_F_ADDRESS;
        if self.need & PERM_READ != 0 {
            flags |= VIRTIO_IOMMU_FAULT_F_READ;
        }
        if self.need & PERM_WRITE != 0 {
            flags |= VIRTIO_IOMMU_FAULT_F_WRITE;
        }
        FaultRecord {
            reason: match self.reason {
                FaultReason::Unknown => VIRTIO_IOMMU_FAULT_R_UNKNOWN,
                FaultReason::Domain => VIRTIO_IOMMU_FAULT_R_DOMAIN,
                FaultReason::Mapping => VIRTIO_IOMMU_FAULT_R_MAPPING,
            },
            flags,
            endpoint: self.endpoint,
            address: self.address,
        }
    }
}

/// One guest-physical piece of a translated access.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRange {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

const INLINE_PIECES: usize = 2;

/// The guest-physical pieces covering a translated IOVA range, in order. Physically
/// contiguous pieces are merged; up to two pieces are stored without heap allocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    inline: [GuestRange; INLINE_PIECES],
    n: usize,
    spill: Vec<GuestRange>,
}

impl Translation {
    /// One piece. Built whole, not pushed: the lock-free path returns this by value, and
    /// piecewise stores read back as a whole stall store forwarding.
    #[inline]
    fn single(gpa: u64, len: u64) -> Self {
        Translation {
            inline: [GuestRange { gpa, len }, GuestRange::default()],
            n: 1,
            spill: Vec::new(),
        }
    }

    #[inline]
    fn push(&mut self, gpa: u64, len: u64) {
        let last = if !self.spill.is_empty() {
            self.spill.last_mut()
        } else if self.n > 0 {
            Some(&mut self.inline[self.n - 1])
        } else {
            None
        };
        if let Some(l) = last {
            if l.gpa.checked_add(l.len) == Some(gpa) {
                l.len += len;
                return;
            }
        }
        if self.n < INLINE_PIECES {
            self.inline[self.n] = GuestRange { gpa, len };
            self.n += 1;
        } else {
            self.spill.push(GuestRange { gpa, len });
        }
    }

    /// Pieces in IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = &GuestRange> {
        self.inline[..self.n].iter().chain(self.spill.iter())
    }

    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.n + self.spill.len()
    }

    /// Whether the translated access was empty.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The first piece (the whole translation when the access stays in one mapping).
    pub fn first(&self) -> Option<GuestRange> {
        (self.n > 0).then_some(self.inline[0])
    }
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

/// A validated lock-free miss: no mapping (or permission) for `at`, with the endpoint bound
/// as `slot` says at count `seq`.
struct Miss<'a> {
    slot: &'a EndpointSlot,
    seq: u64,
    at: u64,
}

/// How many times the lock-free path retries a walk that raced with a writer before it
/// leaves the decision to the locked path.
const READ_ATTEMPTS: usize = 4;

/// Endpoint bindings as lock-free readers see them ([`EndpointSlot::kind`]).
const BIND_UNREGISTERED: u32 = 0;
/// Unattached, global bypass off: every access faults (locked path).
const BIND_FAULT: u32 = 1;
/// Unattached, global bypass on: identity, counted in the device totals.
const BIND_BYPASS: u32 = 2;
/// Attached to a translating domain whose table is [`EndpointSlot::table`].
const BIND_DOMAIN: u32 = 3;
/// Attached to a bypass domain: identity, counted in [`EndpointSlot::table`]'s hits.
const BIND_BYPASS_DOMAIN: u32 = 4;

/// What a lock-free translation needs to know about one endpoint ID, valid while `seq` is
/// even and unchanged. Written only under the state write lock.
#[derive(Debug, Default)]
struct EndpointSlot {
    seq: SeqCount,
    kind: AtomicU32,
    /// The domain's table root for `BIND_DOMAIN` / `BIND_BYPASS_DOMAIN`, else null. Always
    /// null or the root of a table the device keeps until it is dropped.
    table: AtomicPtr<RadixRoot>,
}

const DIR_LEAF_BITS: u32 = 8;
const DIR_LEAF: usize = 1 << DIR_LEAF_BITS;

struct DirLeaf([EndpointSlot; DIR_LEAF]);

/// Endpoint ID -> [`EndpointSlot`] without a lock, for IDs below 65536: a fixed array of
/// lazily allocated leaves of 256 slots. Leaves (6 KiB each) are freed only with the device,
/// and a removed endpoint's slot is kept (marked unregistered) for a reader that may still
/// look at it and for the next endpoint with that ID.
struct EndpointDir {
    leaves: [AtomicPtr<DirLeaf>; DIR_LEAF],
}

impl EndpointDir {
    fn new() -> Self {
        EndpointDir {
            leaves: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
        }
    }

    #[inline]
    fn get(&self, id: u32) -> Option<&EndpointSlot> {
        let leaf = self.leaves.get((id >> DIR_LEAF_BITS) as usize)?;
        // SAFETY: a non-null leaf pointer comes from `Box::into_raw` in `get_or_create` and
        // is freed only in `drop` (which has `&mut self`). Acquire pairs with its publication.
        let leaf = unsafe { leaf.load(Ordering::Acquire).as_ref() }?;
        Some(&leaf.0[id as usize & (DIR_LEAF - 1)])
    }

    /// The slot of `id`, allocating its leaf if needed; `None` for IDs the directory does not
    /// cover.
    fn get_or_create(&self, id: u32) -> Option<&EndpointSlot> {
        let cell = self.leaves.get((id >> DIR_LEAF_BITS) as usize)?;
        if cell.load(Ordering::Acquire).is_null() {
            let leaf = Box::into_raw(Box::new(DirLeaf(std::array::from_fn(|_| {
                EndpointSlot::default()
            }))));
            let raced = cell.compare_exchange(
                std::ptr::null_mut(),
                leaf,
                Ordering::Release,
                Ordering::Acquire,
            );
            if raced.is_err() {
                // SAFETY: `leaf` was never published, so this is its only owner.
                drop(unsafe { Box::from_raw(leaf) });
            }
        }
        self.get(id)
    }
}

impl Drop for EndpointDir {
    fn drop(&mut self) {
        for leaf in &mut self.leaves {
            let p = *leaf.get_mut();
            if !p.is_null() {
                // SAFETY: published by `get_or_create` from `Box::into_raw`, freed only here.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

struct Endpoint {
    domain: Option<u32>,
    reserved: Vec<ReservedRegion>,
    mapper: Option<Arc<dyn ExternalMapper>>,
    /// Whether the mapper currently holds the bypass identity map.
    identity: bool,
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
    /// Device transfers in flight: requests that take translations away wait for them.
    dma: Arc<InflightDma>,
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

fn mapper_status(e: &MapperError) -> Status {
    match e {
        MapperError::NoResources => Status::NoMem,
        MapperError::Failed(_) => Status::DevErr,
    }
}

fn map_perms(perms: u8) -> MapPerms {
    MapPerms {
        read: perms & PERM_READ != 0,
        write: perms & PERM_WRITE != 0,
    }
}

fn mapper_refs(d: &Domain, m: &Arc<dyn ExternalMapper>) -> usize {
    d.mappers
        .iter()
        .find(|(x, _)| Arc::ptr_eq(x, m))
        .map_or(0, |(_, n)| *n)
}

fn ranges_overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// Invalidate `[start, end]` in an IOTLB.
fn invalidate(shared: &EndpointShared, start: u64, end: u64) {
    write_lock(&shared.iotlb).invalidate(start, end);
}

/// Up to this many live mappings in a domain, MAP also fills its endpoints' IOTLBs
/// ([`prefill`]). Beyond, an IOTLB insert (an ordered range map) would cost MAP more than the
/// miss it saves: at 1 M live mappings, MAP+UNMAP pairs fell from 4.8 M/s to 1.1 M/s.
const PREFILL_MAX_MAPPINGS: usize = 4096;

/// Put a new mapping into an attached endpoint's IOTLB. A driver maps right before the DMA
/// that uses the mapping, and a miss would make the device's own thread, on the I/O's critical
/// path, walk the table under the state lock; done here, by the request that has the state
/// write lock anyway, the cost overlaps the guest. Coherent for the same reason invalidation
/// is: both happen under the write lock. A mapping that grants nothing is left to the miss
/// path, which faults.
fn prefill(shared: &EndpointShared, m: &Mapping) {
    if m.perms & (PERM_READ | PERM_WRITE) != 0 {
        write_lock(&shared.iotlb).insert_all(&[(
            m.start,
            m.end,
            m.phys,
            permissions_from(m.perms),
        )]);
    }
}

/// Map `m` into each mapper; on failure undo the ones already done.
fn mappers_map(mappers: &[(Arc<dyn ExternalMapper>, usize)], m: &Mapping) -> Result<(), Status> {
    for (i, (mapper, _)) in mappers.iter().enumerate() {
        if let Err(e) = mapper.map(m.start, m.phys, m.size(), map_perms(m.perms)) {
            warn_limited!(
                "external mapper MAP {:#x}+{:#x} failed: {e}",
                m.start,
                m.size()
            );
            for (done, _) in &mappers[..i] {
                if let Err(e) = done.unmap(m.start, m.size()) {
                    error_limited!("rollback unmap {:#x} failed: {e}", m.start);
                }
            }
            return Err(mapper_status(&e));
        }
    }
    Ok(())
}

/// Replay every mapping of `table` into `mapper`; on failure undo what was replayed.
fn replay(table: &MappingTable, mapper: &dyn ExternalMapper) -> Result<(), Status> {
    let mut done: Vec<Mapping> = Vec::new();
    for m in table.iter() {
        if let Err(e) = mapper.map(m.start, m.phys, m.size(), map_perms(m.perms)) {
            warn_limited!("external mapper replay of {:#x} failed: {e}", m.start);
            unreplay(&done, mapper);
            return Err(mapper_status(&e));
        }
        done.push(m);
    }
    Ok(())
}

/// Unmap `mappings` from `mapper` during a rollback; failures can only be logged.
fn unreplay(mappings: &[Mapping], mapper: &dyn ExternalMapper) {
    for m in mappings {
        if let Err(e) = mapper.unmap(m.start, m.size()) {
            error_limited!("rollback unmap {:#x} failed: {e}", m.start);
        }
    }
}

/// Remove every mapping of `table` from `mapper`; on failure re-map what was removed.
fn withdraw(table: &MappingTable, mapper: &dyn ExternalMapper) -> Result<(), Status> {
    let mut done: Vec<Mapping> = Vec::new();
    for m in table.iter() {
        if let Err(e) = mapper.unmap(m.start, m.size()) {
            warn_limited!("external mapper unmap of {:#x} failed: {e}", m.start);
            for d in &done {
                if let Err(e) = mapper.map(d.start, d.phys, d.size(), map_perms(d.perms)) {
                    error_limited!("rollback map {:#x} failed: {e}", d.start);
                }
            }
            return Err(mapper_status(&e));
        }
        done.push(m);
    }
    Ok(())
}

/// One reversible piece of mapper work.
enum Step<'a> {
    Withdraw(&'a MappingTable),
    Identity(bool),
    Replay(&'a MappingTable),
}

fn apply(m: &dyn ExternalMapper, step: &Step) -> Result<(), Status> {
    match step {
        Step::Withdraw(t) => withdraw(t, m),
        Step::Identity(on) => m.set_identity(*on).map_err(|e| {
            warn_limited!("external mapper identity={on} failed: {e}");
            mapper_status(&e)
        }),
        Step::Replay(t) => replay(t, m),
    }
}

fn revert(m: &dyn ExternalMapper, step: &Step) {
    let undone = match step {
        Step::Withdraw(t) => replay(t, m),
        Step::Identity(on) => m.set_identity(!on).map_err(|e| mapper_status(&e)),
        Step::Replay(t) => withdraw(t, m),
    };
    if undone.is_err() {
        error_limited!("external mapper rollback failed; its mappings no longer match the domain");
    }
}

/// Run steps in order; on failure undo the completed ones (each step already undoes its own
/// partial progress), so the mapper ends as it started.
fn run_steps(m: &dyn ExternalMapper, steps: &[Step]) -> Result<(), Status> {
    for (i, step) in steps.iter().enumerate() {
        if let Err(s) = apply(m, step) {
            for done in steps[..i].iter().rev() {
                revert(m, done);
            }
            return Err(s);
        }
    }
    Ok(())
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
            config,
            dma: Arc::default(),
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
                shared: Arc::default(),
            },
        );
        self.publish(&st, id);
        Ok(())
    }

    /// Unregister an endpoint (hot-unplug), detaching it first. Fails, leaving it attached,
    /// if its mapper refuses to withdraw the domain's mappings.
    pub fn remove_endpoint(&self, id: u32) -> Result<(), ConfigError> {
        let mut st = write_lock(&self.state);
        let Some(domain) = st.endpoints.get(&id).map(|e| e.domain) else {
            return Err(ConfigError::UnknownEndpoint(id));
        };
        if let Some(d) = domain {
            if self.detach(&mut st, id, d) != Status::Ok {
                return Err(ConfigError::MapperRefused(id));
            }
        }
        if let Some(ep) = st.endpoints.remove(&id) {
            self.publish(&st, id);
            // Handles of the endpoint may outlive it: nothing cached (bypass) may serve them.
            write_lock(&ep.shared.iotlb).invalidate_all();
            if let Some(m) = ep.mapper.filter(|_| ep.identity) {
                if let Err(e) = m.set_identity(false) {
                    error!("endpoint {id:#x}: identity map left behind: {e}");
                }
            }
        }
        drop(st);
        self.dma.wait_for_earlier();
        Ok(())
    }

    /// Start changing what endpoint `id` translates with: its lock-free readers retry (or
    /// take the locked path) until [`Self::publish`]. Must precede any change that could make
    /// the endpoint's published binding stale, above all destroying its domain.
    fn unpublish(&self, id: u32) {
        if let Some(slot) = self.dir.get(id) {
            slot.seq.write_begin();
        }
    }

    /// Publish endpoint `id`'s binding as `st` now has it, ending any change in progress.
    fn publish(&self, st: &State, id: u32) {
        let (kind, table) = match st.endpoints.get(&id) {
            None => (BIND_UNREGISTERED, std::ptr::null_mut()),
            Some(ep) => match ep.domain.map(|d| st.domains.get(&d)) {
                None if st.bypass => (BIND_BYPASS, std::ptr::null_mut()),
                None | Some(None) => (BIND_FAULT, std::ptr::null_mut()),
                Some(Some(d)) => (
                    if d.bypass {
                        BIND_BYPASS_DOMAIN
                    } else {
                        BIND_DOMAIN
                    },
                    d.table.root().as_ptr(),
                ),
            },
        };
        let slot = if kind == BIND_UNREGISTERED {
            self.dir.get(id)
        } else {
            self.dir.get_or_create(id)
        };
        if let Some(slot) = slot {
            slot.seq.write_begin();
            slot.kind.store(kind, Ordering::Relaxed);
            // Release: a reader that sees the pointer sees the table's initialisation.
            slot.table.store(table, Ordering::Release);
            slot.seq.write_end();
        }
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
        drop(st);
        self.dma.wait_for_earlier();
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
        for (id, ep) in st.endpoints.iter_mut().filter(|(_, e)| e.domain.is_none()) {
            write_lock(&ep.shared.iotlb).invalidate_all();
            if let Some(m) = ep.mapper.as_ref().filter(|_| ep.identity != bypass) {
                match m.set_identity(bypass) {
                    Ok(()) => ep.identity = bypass,
                    Err(e) => error_limited!("endpoint {id:#x}: identity={bypass} failed: {e}"),
                }
            }
        }
    }

    /// Current value of the `bypass` config field.
    pub fn bypass(&self) -> bool {
        read_lock(&self.state).bypass
    }

    /// Device reset: every endpoint is detached and every domain destroyed, features and
    /// pending faults are cleared. `bypass` keeps its value, as the spec asks.
    pub fn reset(&self) {
        let mut st = write_lock(&self.state);
        let attached: Vec<(u32, u32)> = st
            .endpoints
            .iter()
            .filter_map(|(&id, e)| e.domain.map(|d| (id, d)))
            .collect();
        for (id, d) in attached {
            if self.detach(&mut st, id, d) != Status::Ok {
                // A mapper that refuses to let go cannot hold the guest's state hostage.
                error_limited!("reset: forcing detach of endpoint {id:#x}");
                self.unlink(&mut st, id, d);
                self.publish(&st, id);
            }
        }
        st.acked_features = 0;
        lock(&self.faults).pending.clear();
        drop(st);
        self.dma.wait_for_earlier();
    }

    /// Restore the `bypass` field to its boot value (system reset, not device reset).
    pub fn system_reset(&self) {
        self.reset();
        let mut st = write_lock(&self.state);
        self.set_global_bypass(&mut st, self.config.boot_bypass);
    }

    // ---- requests ----

    /// Execute one decoded request. `props_len` is the size of the PROBE properties area the
    /// driver provided; the returned bytes (PROBE only) fill it.
    /// UNMAP, DETACH and ATTACH take translations away from endpoints, so they complete only
    /// once the device transfers that may have translated before them have ended (see
    /// [`InflightDma`]); the wait runs with the state unlocked, as those transfers may need it.
    pub fn handle_request(&self, req: &Request, props_len: usize) -> (Status, Vec<u8>) {
        let mut st = write_lock(&self.state);
        let answer = match *req {
            Request::Attach(r) => (self.attach_req(&mut st, r), Vec::new()),
            Request::Detach(r) => (self.detach_req(&mut st, r), Vec::new()),
            Request::Map(r) => (self.map_req(&mut st, r), Vec::new()),
            Request::Unmap(r) => (self.unmap_req(&mut st, r), Vec::new()),
            Request::Probe(r) => self.probe_req(&st, r, props_len),
        };
        drop(st);
        let takes_translations = matches!(
            req,
            Request::Attach(_) | Request::Detach(_) | Request::Unmap(_)
        );
        if takes_translations && answer.0 == Status::Ok {
            self.dma.wait_for_earlier();
        }
        debug!("virtio-iommu: {req:?} -> {:?}", answer.0);
        answer
    }

    /// Starts a device transfer: see [`InflightDma`].
    pub fn begin_dma(&self) -> DmaGuard {
        self.dma.begin()
    }

    fn attach_req(&self, st: &mut State, r: AttachRequest) -> Status {
        if r.reserved != [0; 4] {
            return Status::Inval;
        }
        let known = if Self::acked(st, VIRTIO_IOMMU_F_BYPASS_CONFIG) {
            VIRTIO_IOMMU_ATTACH_F_BYPASS
        } else {
            0
        };
        if r.flags & !known != 0 {
            return Status::Inval;
        }
        let bypass = r.flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0;
        let Some(ep) = st.endpoints.get(&r.endpoint) else {
            return Status::NoEnt;
        };
        let (lo, hi) = self.config.domain_range;
        if r.domain < lo || r.domain > hi {
            return Status::Range;
        }
        let old = ep.domain;
        let mapper = ep.mapper.clone();
        match st.domains.get(&r.domain) {
            Some(d) => {
                if d.bypass != bypass {
                    return Status::Inval;
                }
                if old == Some(r.domain) {
                    return Status::Ok;
                }
                // Properties must be compatible: no existing mapping in a reserved region.
                if ep
                    .reserved
                    .iter()
                    .any(|rr| d.table.overlaps(rr.start, rr.end))
                {
                    return Status::Unsupp;
                }
            }
            None => {
                // Moving the sole endpoint of a domain destroys that domain, freeing a slot.
                let frees_one = old
                    .and_then(|o| st.domains.get(&o))
                    .is_some_and(|d| d.endpoints.len() == 1);
                if st.domains.len() >= self.config.max_domains && !frees_one {
                    return Status::NoMem;
                }
            }
        }
        // All fallible mapper work happens before any bookkeeping, so a failure leaves the
        // device exactly as it was. The identity map (bypass) and translated mappings never
        // coexist in a mapper: identity goes before a replay and comes after a withdrawal.
        if let Some(m) = &mapper {
            let identity = ep.identity;
            let mut steps = Vec::new();
            if let Some(od) = old
                .and_then(|o| st.domains.get(&o))
                .filter(|d| mapper_refs(d, m) == 1)
            {
                steps.push(Step::Withdraw(&od.table));
            }
            if identity && !bypass {
                steps.push(Step::Identity(false));
            }
            if let Some(nd) = st.domains.get(&r.domain).filter(|d| mapper_refs(d, m) == 0) {
                steps.push(Step::Replay(&nd.table));
            }
            if bypass && !identity {
                steps.push(Step::Identity(true));
            }
            if let Err(s) = run_steps(m.as_ref(), &steps) {
                return s;
            }
            if let Some(ep) = st.endpoints.get_mut(&r.endpoint) {
                ep.identity = bypass;
            }
        }
        if let Some(o) = old {
            self.unlink(st, r.endpoint, o);
        }
        self.link(st, r.endpoint, r.domain, bypass);
        Status::Ok
    }

    /// Record that endpoint `id` is attached to `domain` (created if needed). Mapper content
    /// has already been replayed by the caller.
    fn link(&self, st: &mut State, id: u32, domain: u32, bypass: bool) {
        self.unpublish(id);
        self.link_state(st, id, domain, bypass);
        self.publish(st, id);
    }

    fn link_state(&self, st: &mut State, id: u32, domain: u32, bypass: bool) {
        let State {
            domains,
            endpoints,
            table_pool,
            ..
        } = st;
        let Some(ep) = endpoints.get_mut(&id) else {
            return;
        };
        let d = domains.entry(domain).or_insert_with(|| {
            let (table, hits_base) = match table_pool.pop() {
                Some((table, parked)) => {
                    // Hits counted after the old domain's snapshot (a reader racing with its
                    // destruction) belong to no domain but still to the totals.
                    let now = table.hits().sum();
                    self.totals.add_translations(now.wrapping_sub(parked));
                    (table, now)
                }
                None => (
                    MappingTable::with_node_limit(self.granule_shift, self.config.max_table_nodes),
                    0,
                ),
            };
            Domain {
                bypass,
                table,
                endpoints: Vec::new(),
                mappers: Vec::new(),
                counters: Counters::default(),
                hits_base,
            }
        });
        if let Some(mapper) = &ep.mapper {
            match d.mappers.iter_mut().find(|(m, _)| Arc::ptr_eq(m, mapper)) {
                Some(slot) => slot.1 += 1,
                None => d.mappers.push((mapper.clone(), 1)),
            }
        }
        d.endpoints.push(id);
        ep.domain = Some(domain);
        // Leaving bypass (boot or domain) or another domain: drop every cached entry.
        write_lock(&ep.shared.iotlb).invalidate_all();
    }

    /// Record that endpoint `id` left `domain`, destroying the domain (and its mappings) if
    /// it was the last endpoint. Mapper content has already been withdrawn by the caller.
    /// Leaves the endpoint's lock-free binding mid-change: the caller publishes it.
    fn unlink(&self, st: &mut State, id: u32, domain: u32) {
        self.unpublish(id);
        let State {
            domains,
            endpoints,
            table_pool,
            ..
        } = st;
        let Some(ep) = endpoints.get_mut(&id) else {
            return;
        };
        ep.domain = None;
        write_lock(&ep.shared.iotlb).invalidate_all();
        let Some(d) = domains.get_mut(&domain) else {
            return;
        };
        if let Some(mapper) = &ep.mapper {
            if let Some(pos) = d.mappers.iter().position(|(m, _)| Arc::ptr_eq(m, mapper)) {
                d.mappers[pos].1 -= 1;
                if d.mappers[pos].1 == 0 {
                    d.mappers.remove(pos);
                }
            }
        }
        d.endpoints.retain(|&e| e != id);
        if d.endpoints.is_empty() {
            if let Some(mut d) = domains.remove(&domain) {
                for m in d.table.iter() {
                    d.counters.unmapped(m.size());
                }
                let hits = d.table.hits().sum();
                let snapshot = d.snapshot_at(hits);
                self.totals.absorb(&snapshot);
                {
                    let mut retired = lock(&self.retired);
                    if retired.len() == RETIRED_DOMAINS_KEPT {
                        retired.pop_front();
                    }
                    retired.push_back((domain, snapshot));
                }
                // Not freed: a lock-free reader may still be walking it (see `table_pool`).
                d.table.clear();
                table_pool.push((d.table, hits));
            }
        }
    }

    /// Detach an endpoint from `domain`: withdraw the domain's mappings from its mapper if
    /// no other endpoint of the domain shares it, then unlink.
    fn detach(&self, st: &mut State, id: u32, domain: u32) -> Status {
        let (Some(ep), Some(d)) = (st.endpoints.get(&id), st.domains.get(&domain)) else {
            return Status::Inval;
        };
        if let Some(m) = &ep.mapper {
            // Unattached, the endpoint bypasses exactly when the global field says so.
            let mut steps = Vec::new();
            if mapper_refs(d, m) == 1 {
                steps.push(Step::Withdraw(&d.table));
            }
            if ep.identity != st.bypass {
                steps.push(Step::Identity(st.bypass));
            }
            if let Err(s) = run_steps(m.as_ref(), &steps) {
                return s;
            }
        }
        let bypass = st.bypass;
        self.unlink(st, id, domain);
        self.publish(st, id);
        if let Some(ep) = st.endpoints.get_mut(&id).filter(|e| e.mapper.is_some()) {
            ep.identity = bypass;
        }
        Status::Ok
    }

    fn detach_req(&self, st: &mut State, r: DetachRequest) -> Status {
        let Some(ep) = st.endpoints.get(&r.endpoint) else {
            return Status::NoEnt;
        };
        if ep.domain != Some(r.domain) {
            return Status::Inval;
        }
        self.detach(st, r.endpoint, r.domain)
    }

    fn map_req(&self, st: &mut State, r: MapRequest) -> Status {
        let mut known = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
        if Self::acked(st, VIRTIO_IOMMU_F_MMIO) {
            known |= VIRTIO_IOMMU_MAP_F_MMIO;
        }
        if r.flags & !known != 0 {
            return Status::Inval;
        }
        let State {
            domains, endpoints, ..
        } = st;
        let Some(d) = domains.get_mut(&r.domain) else {
            return Status::NoEnt;
        };
        if d.bypass || r.virt_end < r.virt_start {
            return Status::Inval;
        }
        let g = (1u64 << self.granule_shift) - 1;
        if r.virt_start & g != 0 || r.phys_start & g != 0 || r.virt_end.wrapping_add(1) & g != 0 {
            return Status::Range;
        }
        let (lo, hi) = self.config.input_range;
        if r.virt_start < lo || r.virt_end > hi {
            return Status::Range;
        }
        if r.phys_start
            .checked_add(r.virt_end - r.virt_start)
            .is_none()
        {
            return Status::Range;
        }
        let range = (r.virt_start, r.virt_end);
        let reserved_hit = d
            .endpoints
            .iter()
            .filter_map(|e| endpoints.get(e))
            .any(|e| {
                e.reserved
                    .iter()
                    .any(|rr| ranges_overlap(range, (rr.start, rr.end)))
            });
        if reserved_hit || d.table.overlaps(r.virt_start, r.virt_end) {
            return Status::Inval;
        }
        if d.table.len() >= self.config.max_mappings_per_domain {
            return Status::NoMem;
        }
        let mut perms = 0;
        if r.flags & VIRTIO_IOMMU_MAP_F_READ != 0 {
            perms |= PERM_READ;
        }
        if r.flags & VIRTIO_IOMMU_MAP_F_WRITE != 0 {
            perms |= PERM_WRITE;
        }
        let m = Mapping {
            start: r.virt_start,
            end: r.virt_end,
            phys: r.phys_start,
            perms,
            mmio: r.flags & VIRTIO_IOMMU_MAP_F_MMIO != 0,
        };
        // Memory first: a MAP the table cannot hold must fail before the mappers see it.
        if d.table.reserve().is_err() {
            return Status::NoMem;
        }
        if let Err(s) = mappers_map(&d.mappers, &m) {
            return s;
        }
        let inserted = d.table.insert(m);
        debug_assert_eq!(inserted, Ok(()), "overlap and memory were checked above");
        d.counters.mapped(m.size());
        if d.table.len() <= PREFILL_MAX_MAPPINGS {
            for e in d.endpoints.iter().filter_map(|e| endpoints.get(e)) {
                prefill(&e.shared, &m);
            }
        }
        Status::Ok
    }

    fn unmap_req(&self, st: &mut State, r: UnmapRequest) -> Status {
        let State {
            domains, endpoints, ..
        } = st;
        let Some(d) = domains.get_mut(&r.domain) else {
            return Status::NoEnt;
        };
        if d.bypass || r.virt_end < r.virt_start {
            return Status::Inval;
        }
        let (lo, hi) = self.config.input_range;
        if r.virt_start < lo || r.virt_end > hi {
            return Status::Range;
        }
        let Ok(plan) = d.table.unmap_plan(r.virt_start, r.virt_end) else {
            return Status::Range;
        };
        for (i, (mapper, _)) in d.mappers.iter().enumerate() {
            for (j, m) in plan.iter().enumerate() {
                if let Err(e) = mapper.unmap(m.start, m.size()) {
                    warn_limited!("external mapper UNMAP {:#x} failed: {e}", m.start);
                    // Re-map what this request already removed, newest first.
                    let undo = |mp: &Arc<dyn ExternalMapper>, ms: &[Mapping]| {
                        for m in ms.iter().rev() {
                            if let Err(e) = mp.map(m.start, m.phys, m.size(), map_perms(m.perms)) {
                                error_limited!("rollback map {:#x} failed: {e}", m.start);
                            }
                        }
                    };
                    undo(mapper, &plan[..j]);
                    for (done, _) in d.mappers[..i].iter().rev() {
                        undo(done, &plan);
                    }
                    return mapper_status(&e);
                }
            }
        }
        d.table.remove_all(plan.iter().map(|m| m.start));
        for m in &plan {
            d.counters.unmapped(m.size());
            for e in d.endpoints.iter().filter_map(|e| endpoints.get(e)) {
                invalidate(&e.shared, m.start, m.end);
            }
        }
        Status::Ok
    }

    fn probe_req(&self, st: &State, r: ProbeRequest, props_len: usize) -> (Status, Vec<u8>) {
        let Some(ep) = st.endpoints.get(&r.endpoint) else {
            return (Status::NoEnt, Vec::new());
        };
        if props_len < self.config.probe_size as usize {
            return (Status::Inval, Vec::new());
        }
        let mut props = Vec::with_capacity(props_len);
        for rr in &ep.reserved {
            rr.encode_property(&mut props);
        }
        props.resize(props_len, 0);
        (Status::Ok, props)
    }

    // ---- translation ----

    /// Translate a DMA access of `len` bytes at `iova` by `endpoint`: the guest-physical
    /// pieces covering it (the access may span several mappings), or the fault, which has
    /// already been counted and queued for the event queue.
    ///
    /// Hits take no lock and make no atomic read-modify-write (see the module doc); faults,
    /// and translations that keep racing with requests, take the state read lock.
    #[inline]
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        let need = access.perms();
        let mut miss = None;
        if let Some(t) = self.translate_unlocked(endpoint, iova, len, need, &mut miss) {
            return Ok(t);
        }
        if let Some(Miss { slot, seq, at }) = miss {
            if let Some(fault) = self.record_miss(endpoint, slot, seq, at, need) {
                return Err(fault);
            }
        }
        self.translate_locked(endpoint, iova, len, access)
    }

    /// The lock-free attempt: a successful translation, or `None` with `miss` set for a
    /// missing mapping, each validated against both sequence counts; `None` alone leaves the
    /// decision to the locked path. (A miss goes through `miss` rather than in the return
    /// value so that the hit's `Translation` is built in place: a wider return type cost
    /// ~2 ns per hit in moves.)
    #[inline]
    fn translate_unlocked<'a>(
        &'a self,
        endpoint: u32,
        iova: u64,
        len: u64,
        need: u8,
        miss: &mut Option<Miss<'a>>,
    ) -> Option<Translation> {
        let slot = self.dir.get(endpoint)?;
        let last = iova.checked_add(len.checked_sub(1)?)?;
        for _ in 0..READ_ATTEMPTS {
            let Some(e1) = slot.seq.read_begin() else {
                std::hint::spin_loop();
                continue;
            };
            let kind = slot.kind.load(Ordering::Relaxed);
            let out;
            let hits = match kind {
                BIND_BYPASS => {
                    out = Translation::single(iova, len);
                    read_fence();
                    if !slot.seq.unchanged(e1) {
                        continue;
                    }
                    &self.bypass_hits
                }
                BIND_DOMAIN | BIND_BYPASS_DOMAIN => {
                    // SAFETY: `table` is null or the root of a table this device keeps until
                    // it is dropped (tables of destroyed domains are pooled, never freed), and
                    // `self` is borrowed. Acquire pairs with the Release in `publish`.
                    let Some(table) = (unsafe { slot.table.load(Ordering::Acquire).as_ref() })
                    else {
                        continue;
                    };
                    race_point(RacePoint::Bound);
                    let Some(t1) = table.seq().read_begin() else {
                        std::hint::spin_loop();
                        continue;
                    };
                    // A missing mapping or permission is a fault, recorded under the lock once
                    // the miss is validated like a hit.
                    let mut missed = None;
                    if kind == BIND_BYPASS_DOMAIN {
                        out = Translation::single(iova, len);
                    } else {
                        match table.lookup(iova).filter(|h| h.perms & need == need) {
                            Some(hit) if hit.last >= last => {
                                out = Translation::single(hit.phys, len)
                            }
                            Some(hit) => match Self::walk_rest(table, hit, iova, last, need) {
                                Ok(t) => out = t,
                                Err(at) => {
                                    out = Translation::default();
                                    missed = Some(at);
                                }
                            },
                            None => {
                                out = Translation::default();
                                missed = Some(iova);
                            }
                        }
                    }
                    race_point(RacePoint::Walked);
                    read_fence();
                    if !table.seq().unchanged(t1) || !slot.seq.unchanged(e1) {
                        continue;
                    }
                    if let Some(at) = missed {
                        *miss = Some(Miss { slot, seq: e1, at });
                        return None;
                    }
                    table.hits()
                }
                _ => return None,
            };
            hits.bump();
            return Some(out);
        }
        None
    }

    /// Record the fault of a validated lock-free miss, without walking again (at 1 M
    /// mappings the second walk doubled the cost of a miss: the lock's read-modify-write
    /// waits for the first walk's cache misses, then the second one pays them again).
    /// `None` if the endpoint's binding changed since: the locked path decides then.
    #[cold]
    fn record_miss(
        &self,
        endpoint: u32,
        slot: &EndpointSlot,
        seq: u64,
        at: u64,
        need: u8,
    ) -> Option<Fault> {
        race_point(RacePoint::Missed);
        let st = read_lock(&self.state);
        // Bindings change only under the write lock, so with the read lock held an unchanged
        // count means the endpoint is still attached to the domain whose table missed, and
        // the fault is counted there. The miss itself was the table's state at one instant.
        if !slot.seq.unchanged(seq) {
            return None;
        }
        let f = Fault {
            reason: FaultReason::Mapping,
            endpoint,
            address: at,
            need,
        };
        Some(self.fault(&st, f))
    }

    /// The rest of a lock-free walk whose first block (`first`, at `iova`) ends before `last`.
    #[inline(never)]
    fn walk_rest(
        table: &RadixRoot,
        first: crate::table::Hit,
        iova: u64,
        last: u64,
        need: u8,
    ) -> Result<Translation, u64> {
        let mut out = Translation::default();
        let (mut cur, mut hit) = (iova, first);
        loop {
            out.push(hit.phys, hit.last.min(last) - cur + 1);
            if hit.last >= last {
                return Ok(out);
            }
            cur = hit.last + 1;
            hit = table
                .lookup(cur)
                .filter(|h| h.perms & need == need)
                .ok_or(cur)?;
        }
    }

    #[cold]
    fn translate_locked(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        let st = read_lock(&self.state);
        let mut out = Translation::default();
        let end = iova.saturating_add(len.saturating_sub(1));
        self.walk(
            &st,
            endpoint,
            iova,
            len,
            access.perms(),
            |first, last, phys, _| {
                // Clip the block to the access.
                let from = first.max(iova);
                out.push(phys + (from - first), last.min(end) - from + 1)
            },
        )?;
        Ok(out)
    }

    /// Resolve `[iova, iova + len)` for `endpoint`, calling `block(first, last, gpa, perms)`
    /// for each contiguous block covering it (`gpa` is where `first` goes; blocks may extend
    /// past the access), with the state lock held by the caller. Bypass is one identity block
    /// over the whole space, so that an IOTLB holds a single entry for it.
    #[inline]
    fn walk(
        &self,
        st: &State,
        endpoint: u32,
        iova: u64,
        len: u64,
        need: u8,
        mut block: impl FnMut(u64, u64, u64, u8),
    ) -> Result<(), Fault> {
        let fault = |reason, address| Fault {
            reason,
            endpoint,
            address,
            need,
        };
        let Some(ep) = st.endpoints.get(&endpoint) else {
            return Err(self.fault(st, fault(FaultReason::Unknown, iova)));
        };
        if len == 0 {
            return Ok(());
        }
        let Some(last) = iova.checked_add(len - 1) else {
            return Err(self.fault(st, fault(FaultReason::Mapping, iova)));
        };
        let domain = match ep.domain {
            None if st.bypass => {
                block(0, u64::MAX, 0, PERM_READ | PERM_WRITE);
                self.bypass_hits.bump();
                return Ok(());
            }
            None => return Err(self.fault(st, fault(FaultReason::Domain, iova))),
            Some(d) => d,
        };
        let Some(d) = st.domains.get(&domain) else {
            return Err(self.fault(st, fault(FaultReason::Unknown, iova)));
        };
        if d.bypass {
            block(0, u64::MAX, 0, PERM_READ | PERM_WRITE);
            d.table.hits().bump();
            return Ok(());
        }
        let mut cur = iova;
        loop {
            let hit = match d.table.lookup(cur) {
                Some(h) if h.perms & need == need => h,
                _ => return Err(self.fault(st, fault(FaultReason::Mapping, cur))),
            };
            block(hit.first, hit.last, hit.phys - (cur - hit.first), hit.perms);
            if hit.last >= last {
                break;
            }
            cur = hit.last + 1;
        }
        d.table.hits().bump();
        Ok(())
    }

    /// Fill an endpoint IOTLB so that `[iova, iova + len)` hits, with whole mappings so that
    /// neighbouring accesses hit too. Holding the state read lock while inserting is what
    /// keeps a concurrent UNMAP from being undone by a stale fill.
    pub(crate) fn fill_iotlb(
        &self,
        endpoint: u32,
        shared: &EndpointShared,
        iova: u64,
        len: u64,
        need: u8,
    ) -> Result<(), Fault> {
        let st = read_lock(&self.state);
        // Whole leaf blocks go in (the IOTLB merges neighbouring blocks of one mapping), so
        // the next accesses to the same page or mapping hit.
        let mut entries = Vec::new();
        self.walk(
            &st,
            endpoint,
            iova,
            len,
            need,
            |first, last, phys, perms| entries.push((first, last, phys, permissions_from(perms))),
        )?;
        write_lock(&shared.iotlb).insert_all(&entries);
        Ok(())
    }

    /// Record the fault for an access the IOTLB cannot represent (it reaches the last byte of
    /// the 64-bit space).
    pub(crate) fn translate_fault_at_top(&self, endpoint: u32, iova: u64, need: u8) -> Fault {
        let st = read_lock(&self.state);
        let reason = if st.endpoints.contains_key(&endpoint) {
            FaultReason::Mapping
        } else {
            FaultReason::Unknown
        };
        self.fault(
            &st,
            Fault {
                reason,
                endpoint,
                address: iova,
                need,
            },
        )
    }

    /// Count a fault and queue its record (registered endpoints only), then notify.
    fn fault(&self, st: &State, f: Fault) -> Fault {
        let domain = st
            .endpoints
            .get(&f.endpoint)
            .and_then(|e| e.domain)
            .and_then(|d| st.domains.get(&d));
        match domain {
            Some(d) => d.counters.fault(),
            None => self.totals.fault(),
        }
        if f.reason == FaultReason::Unknown && !st.endpoints.contains_key(&f.endpoint) {
            // No valid endpoint ID to report: counted only.
            return f;
        }
        {
            let mut q = lock(&self.faults);
            if q.pending.len() >= self.config.max_pending_faults {
                q.dropped += 1;
                return f;
            }
            q.pending.push_back(f.record());
        }
        if let Some(n) = read_lock(&self.notifier).as_ref() {
            n();
        }
        f
    }

    /// Fault records waiting for event-queue buffers.
    pub fn pending_faults(&self) -> usize {
        lock(&self.faults).pending.len()
    }

    pub(crate) fn front_fault(&self) -> Option<FaultRecord> {
        lock(&self.faults).pending.front().copied()
    }

    pub(crate) fn pop_fault(&self) {
        lock(&self.faults).pending.pop_front();
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
