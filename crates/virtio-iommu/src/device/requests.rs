//! Request semantics: ATTACH, DETACH, MAP, UNMAP and PROBE against the device state, with
//! the endpoints' IOTLBs and external mappers kept in step.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::debug;
use vm_device::{error_limited, warn_limited};

use super::mapper_sync::{
    map_perms, mapper_status, mappers_map, run_steps, withdraw_leftover, Step,
};
use super::translate::permissions_from;
use super::{
    lock, transfers_of, wait_for_transfers, write_lock, Domain, EndpointShared, State, VirtioIommu,
    EVERY_ADDRESS, RETIRED_DOMAINS_KEPT,
};
use crate::mapper::ExternalMapper;
use crate::protocol::*;
use crate::stats::Counters;
use crate::table::{Mapping, MappingTable, PERM_READ, PERM_WRITE};
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

impl VirtioIommu {
    /// Execute one decoded request. `props_len` is the size of the PROBE properties area the
    /// driver provided; the returned bytes (PROBE only) fill it.
    /// UNMAP, DETACH and ATTACH take translations away from endpoints, so they complete only
    /// once the device transfers that may have translated before them have ended (see
    /// [`InflightDma`](crate::inflight::InflightDma)); the wait runs with the state unlocked, as those transfers may need it.
    pub fn handle_request(&self, req: &Request, props_len: usize) -> (Status, Vec<u8>) {
        let mut st = write_lock(&self.state);
        let answer = match *req {
            Request::Attach(r) => (self.attach_req(&mut st, r), Vec::new()),
            Request::Detach(r) => (self.detach_req(&mut st, r), Vec::new()),
            Request::Map(r) => (self.map_req(&mut st, r), Vec::new()),
            Request::Unmap(r) => (self.unmap_req(&mut st, r), Vec::new()),
            Request::Probe(r) => self.probe_req(&st, r, props_len),
        };
        // The endpoints that lost translations, and which: an UNMAP's domain's, of its range;
        // or every one of the endpoint (re)attached or detached.
        let (affected, lost) = match *req {
            _ if answer.0 != Status::Ok => (Vec::new(), EVERY_ADDRESS),
            Request::Attach(AttachRequest { endpoint, .. })
            | Request::Detach(DetachRequest { endpoint, .. }) => {
                (transfers_of(&st, |id, _| id == endpoint), EVERY_ADDRESS)
            }
            Request::Unmap(r) => (
                transfers_of(&st, |_, ep| ep.domain == Some(r.domain)),
                (r.virt_start, r.virt_end),
            ),
            Request::Map(_) | Request::Probe(_) => (Vec::new(), EVERY_ADDRESS),
        };
        drop(st);
        if wait_for_transfers(&affected, lost) {
            self.requests_waited_for_dma.fetch_add(1, Ordering::Relaxed);
        }
        debug!("virtio-iommu: {req:?} -> {:?}", answer.0);
        answer
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
        let Some(ep) = st.endpoints.get_mut(&r.endpoint) else {
            return Status::NoEnt;
        };
        // Mappings of a domain it was forced out of still reach the host: no new domain
        // until they are gone.
        if !withdraw_leftover(r.endpoint, ep) {
            return Status::DevErr;
        }
        let ep = &*ep;
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
    pub(super) fn unlink(&self, st: &mut State, id: u32, domain: u32) {
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
    pub(super) fn detach(&self, st: &mut State, id: u32, domain: u32) -> Status {
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

    /// Take endpoint `id` out of `domain` although its mapper refused to withdraw the
    /// domain's mappings (device reset): the domain goes, and the mappings the mapper still
    /// holds become the endpoint's leftover, so no state says they are gone while the host
    /// still translates them.
    pub(super) fn force_detach(&self, st: &mut State, id: u32, domain: u32) {
        let refused: Vec<Mapping> = match (st.endpoints.get(&id), st.domains.get(&domain)) {
            (Some(ep), Some(d)) if ep.mapper.as_ref().is_some_and(|m| mapper_refs(d, m) == 1) => {
                d.table.iter().collect()
            }
            _ => Vec::new(),
        };
        self.unlink(st, id, domain);
        self.publish(st, id);
        if let Some(ep) = st.endpoints.get_mut(&id) {
            ep.leftover.extend(refused);
            error_limited!(
                "reset: endpoint {id:#x} forced out of domain {domain}; its external mapper \
                 keeps {} mappings, and the endpoint gets no domain until they are withdrawn",
                ep.leftover.len()
            );
        }
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
}
