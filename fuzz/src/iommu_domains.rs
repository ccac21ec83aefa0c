//! The virtio-iommu with many domains, endpoints and mappings: sequences of well-formed
//! ATTACH, DETACH, MAP and UNMAP requests (with bad values mixed in), translations that fault,
//! and event queues that drain the faults, checked against a model of the spec.
//!
//! `request_queue` feeds arbitrary bytes and layouts through the request queue; this target
//! reaches the states those rarely build: up to 8 live domains of up to 32 mappings, 12
//! endpoints moving between them, bypass domains, domains destroyed with their last endpoint.
//!
//! Input layout: operations of 5 bytes until the input ends. The first chooses the operation
//! (bits 0-2: ATTACH, DETACH, MAP, UNMAP, a translation, an event queue of 0..8 buffers),
//! the MAP permissions (bits 4-5), a write access (bit 6) and a misaligned range (bit 7);
//! the others give endpoint, domain, page-granular ranges in a 1 MiB window or on the MSI
//! region (sometimes reversed), lengths.
//!
//! Asserts: every request's status is the one the spec and the device's limits give
//! (NOENT, INVAL, RANGE, NOMEM or OK); after each, the endpoints' domains, the domain count
//! and every domain's mappings are the model's; a translation succeeds exactly when the whole
//! range is mapped with the access's permission (or the domain bypasses), with the model's
//! guest-physical pieces, and otherwise faults with the model's reason and first address;
//! the event queue returns those faults in order, one per buffer, as long as fewer than the
//! pending limit waited.

use std::collections::BTreeMap;

use virtio_iommu::protocol::FaultRecord;
use virtio_iommu::protocol::{
    encode_tail, AttachRequest, DetachRequest, MapRequest, Request, UnmapRequest, FAULT_SIZE,
    TAIL_SIZE, VIRTIO_IOMMU_ATTACH_F_BYPASS, VIRTIO_IOMMU_FAULT_F_ADDRESS,
    VIRTIO_IOMMU_FAULT_F_READ, VIRTIO_IOMMU_FAULT_F_WRITE, VIRTIO_IOMMU_FAULT_R_DOMAIN,
    VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_FAULT_R_UNKNOWN, VIRTIO_IOMMU_MAP_F_READ,
    VIRTIO_IOMMU_MAP_F_WRITE,
};
use virtio_iommu::table::{PERM_READ, PERM_WRITE};
use virtio_iommu::{
    Access, Answer, EndpointConfig, FaultReason, IommuConfig, ReservedRegion, Status, VirtioIommu,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::ring::Input;

const ENDPOINTS: u32 = 12;
/// An endpoint ID never registered.
const STRANGER: u32 = 99;
const MAX_DOMAINS: usize = 8;
const MAX_MAPPINGS: usize = 32;
const MAX_PENDING_FAULTS: usize = 16;
const PAGE: u64 = 0x1000;
const MSI: ReservedRegion = ReservedRegion::X86_MSI;
const EVENT_BUFFERS: u64 = 0x1_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapped {
    start: u64,
    end: u64,
    phys: u64,
    perms: u8,
}

#[derive(Default)]
struct Domain {
    bypass: bool,
    endpoints: Vec<u32>,
    mappings: Vec<Mapped>,
}

#[derive(Default)]
struct Model {
    attached: BTreeMap<u32, u32>,
    domains: BTreeMap<u32, Domain>,
    faults: Vec<FaultRecord>,
}

impl Model {
    fn detach(&mut self, ep: u32) {
        let Some(old) = self.attached.remove(&ep) else {
            return;
        };
        let d = self.domains.get_mut(&old).unwrap();
        d.endpoints.retain(|&e| e != ep);
        if d.endpoints.is_empty() {
            self.domains.remove(&old);
        }
    }

    fn attach(&mut self, r: AttachRequest) -> Status {
        let bypass = r.flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0;
        if r.endpoint >= ENDPOINTS {
            return Status::NoEnt;
        }
        let old = self.attached.get(&r.endpoint).copied();
        match self.domains.get(&r.domain) {
            Some(d) if d.bypass != bypass => return Status::Inval,
            Some(_) if old == Some(r.domain) => return Status::Ok,
            Some(_) => {}
            None => {
                let frees_one = old.is_some_and(|o| self.domains[&o].endpoints.len() == 1);
                if self.domains.len() >= MAX_DOMAINS && !frees_one {
                    return Status::NoMem;
                }
            }
        }
        self.detach(r.endpoint);
        let d = self.domains.entry(r.domain).or_insert_with(|| Domain {
            bypass,
            ..Domain::default()
        });
        d.endpoints.push(r.endpoint);
        self.attached.insert(r.endpoint, r.domain);
        Status::Ok
    }

    fn map(&mut self, r: MapRequest) -> Status {
        let Some(d) = self.domains.get_mut(&r.domain) else {
            return Status::NoEnt;
        };
        if d.bypass || r.virt_end < r.virt_start {
            return Status::Inval;
        }
        let g = PAGE - 1;
        if r.virt_start & g != 0 || r.phys_start & g != 0 || r.virt_end.wrapping_add(1) & g != 0 {
            return Status::Range;
        }
        let overlaps = |s: u64, e: u64| r.virt_start <= e && s <= r.virt_end;
        if overlaps(MSI.start, MSI.end) || d.mappings.iter().any(|m| overlaps(m.start, m.end)) {
            return Status::Inval;
        }
        if d.mappings.len() >= MAX_MAPPINGS {
            return Status::NoMem;
        }
        let mut perms = 0;
        if r.flags & VIRTIO_IOMMU_MAP_F_READ != 0 {
            perms |= PERM_READ;
        }
        if r.flags & VIRTIO_IOMMU_MAP_F_WRITE != 0 {
            perms |= PERM_WRITE;
        }
        d.mappings.push(Mapped {
            start: r.virt_start,
            end: r.virt_end,
            phys: r.phys_start,
            perms,
        });
        Status::Ok
    }

    fn unmap(&mut self, r: UnmapRequest) -> Status {
        let Some(d) = self.domains.get_mut(&r.domain) else {
            return Status::NoEnt;
        };
        if d.bypass || r.virt_end < r.virt_start {
            return Status::Inval;
        }
        let (s, e) = (r.virt_start, r.virt_end);
        let straddles = |m: &Mapped| m.start <= e && s <= m.end && (m.start < s || m.end > e);
        if d.mappings.iter().any(straddles) {
            return Status::Range;
        }
        d.mappings.retain(|m| m.end < s || m.start > e);
        Status::Ok
    }

    /// The pieces `[iova, iova + len)` translates to, or the fault it raises.
    fn translate(
        &self,
        ep: u32,
        iova: u64,
        len: u64,
        need: u8,
    ) -> Result<Vec<(u64, u64)>, FaultRecord> {
        let fault = |reason, address| FaultRecord {
            reason,
            flags: VIRTIO_IOMMU_FAULT_F_ADDRESS
                | if need == PERM_READ {
                    VIRTIO_IOMMU_FAULT_F_READ
                } else {
                    VIRTIO_IOMMU_FAULT_F_WRITE
                },
            endpoint: ep,
            address,
        };
        if ep >= ENDPOINTS {
            return Err(fault(VIRTIO_IOMMU_FAULT_R_UNKNOWN, iova));
        }
        let Some(d) = self.attached.get(&ep).map(|id| &self.domains[id]) else {
            return Err(fault(VIRTIO_IOMMU_FAULT_R_DOMAIN, iova));
        };
        if d.bypass {
            return Ok(vec![(iova, len)]);
        }
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        let mut at = iova;
        while at < iova + len {
            let Some(m) = d
                .mappings
                .iter()
                .find(|m| m.start <= at && at <= m.end && m.perms & need != 0)
            else {
                return Err(fault(VIRTIO_IOMMU_FAULT_R_MAPPING, at));
            };
            let n = (m.end - at + 1).min(iova + len - at);
            push_piece(&mut pieces, (m.phys + (at - m.start), n));
            at += n;
        }
        Ok(pieces)
    }
}

/// Appends a piece, merged with the last one if they are contiguous.
fn push_piece(pieces: &mut Vec<(u64, u64)>, (gpa, len): (u64, u64)) {
    match pieces.last_mut() {
        Some(last) if last.0 + last.1 == gpa => last.1 += len,
        _ => pieces.push((gpa, len)),
    }
}

/// A page-granular IOVA: mostly in a 1 MiB window, sometimes at the MSI region.
fn iova(page: u8) -> u64 {
    if page >= 0xf0 {
        MSI.start + u64::from(page & 0xf) * PAGE
    } else {
        u64::from(page) * PAGE
    }
}

fn endpoint(b: u8) -> u32 {
    if b == 0xff {
        STRANGER
    } else {
        u32::from(b) % ENDPOINTS
    }
}

/// One input; any byte string is valid.
pub fn run(data: &[u8]) {
    let dev = VirtioIommu::new(IommuConfig {
        max_mappings_per_domain: MAX_MAPPINGS,
        max_domains: MAX_DOMAINS,
        max_pending_faults: MAX_PENDING_FAULTS,
        boot_bypass: false,
        ..IommuConfig::default()
    })
    .unwrap();
    for ep in 0..ENDPOINTS {
        dev.add_endpoint(ep, EndpointConfig::default()).unwrap();
    }
    dev.ack_features(dev.features());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2_0000)]).unwrap();
    let mut model = Model::default();

    let mut input = Input(data);
    while !input.0.is_empty() {
        let kind = input.u8();
        let (a, b, c, d) = (input.u8(), input.u8(), input.u8(), input.u8());
        let domain = u32::from(b % 24);
        // Mostly aligned, sometimes off by a byte: RANGE.
        let skew = u64::from(kind >> 7);
        let request = match (kind & 7) % 6 {
            0 => {
                let flags = u32::from(c & 0x80 != 0) * VIRTIO_IOMMU_ATTACH_F_BYPASS;
                let r = AttachRequest {
                    domain,
                    endpoint: endpoint(a),
                    flags,
                    reserved: [0; 4],
                };
                Some((Request::Attach(r), model.attach(r)))
            }
            1 => {
                let r = DetachRequest {
                    domain,
                    endpoint: endpoint(a),
                };
                let status = match model.attached.get(&r.endpoint) {
                    _ if r.endpoint >= ENDPOINTS => Status::NoEnt,
                    Some(&d) if d == r.domain => {
                        model.detach(r.endpoint);
                        Status::Ok
                    }
                    _ => Status::Inval,
                };
                Some((Request::Detach(r), status))
            }
            2 => {
                let start = iova(c);
                let pages = u64::from(d % 16) + 1;
                let r = MapRequest {
                    domain,
                    virt_start: start + skew,
                    virt_end: start + pages * PAGE - 1,
                    phys_start: u64::from(a) * PAGE,
                    flags: u32::from(kind >> 4 & 3),
                };
                Some((Request::Map(r), model.map(r)))
            }
            3 => {
                let start = iova(c);
                let end = if d == 0xff {
                    start.wrapping_sub(1)
                } else {
                    start + u64::from(d % 24) * PAGE + PAGE - 1
                };
                let r = UnmapRequest {
                    domain,
                    virt_start: start,
                    virt_end: end.wrapping_sub(skew),
                };
                Some((Request::Unmap(r), model.unmap(r)))
            }
            4 => {
                translate(
                    &dev,
                    &mut model,
                    endpoint(a),
                    iova(c) + u64::from(b),
                    d,
                    kind,
                );
                None
            }
            _ => {
                drain_events(&dev, &mem, &mut model, a % 9);
                None
            }
        };
        if let Some((request, expected)) = request {
            let answer = dev.answer(&request.encode(), true, TAIL_SIZE as u64);
            assert_eq!(
                answer,
                Answer::Write(encode_tail(expected).to_vec()),
                "{request:?}"
            );
            check_state(&dev, &model);
        }
    }
}

fn translate(dev: &VirtioIommu, model: &mut Model, ep: u32, iova: u64, len: u8, kind: u8) {
    let len = u64::from(len) * 64 + 1;
    let (access, need) = if kind & 0x40 != 0 {
        (Access::Write, PERM_WRITE)
    } else {
        (Access::Read, PERM_READ)
    };
    let expected = model.translate(ep, iova, len, need);
    match (dev.translate(ep, iova, len, access), expected) {
        (Ok(t), Ok(pieces)) => {
            let mut got = Vec::new();
            for r in t.iter() {
                push_piece(&mut got, (r.gpa, r.len));
            }
            assert_eq!(got, pieces, "translation of {iova:#x}+{len:#x} for {ep}");
        }
        (Err(f), Err(record)) => {
            let reason = match f.reason {
                FaultReason::Unknown => VIRTIO_IOMMU_FAULT_R_UNKNOWN,
                FaultReason::Domain => VIRTIO_IOMMU_FAULT_R_DOMAIN,
                FaultReason::Mapping => VIRTIO_IOMMU_FAULT_R_MAPPING,
            };
            assert_eq!(
                (reason, f.endpoint, f.address),
                (record.reason, ep, record.address)
            );
            // Only registered endpoints can be reported, and only so many wait.
            if ep < ENDPOINTS && model.faults.len() < MAX_PENDING_FAULTS {
                model.faults.push(record);
            }
        }
        (got, expected) => panic!(
            "translation of {iova:#x}+{len:#x} for {ep}: {:?}, expected {expected:?}",
            got.map(|t| t.iter().copied().collect::<Vec<_>>())
        ),
    }
}

/// An event queue of `buffers` fault-sized buffers: it takes the oldest faults, one each.
fn drain_events(dev: &VirtioIommu, mem: &GuestMemoryMmap, model: &mut Model, buffers: u8) {
    if buffers == 0 {
        return;
    }
    let descs: Vec<RawDescriptor> = (0..u64::from(buffers))
        .map(|i| {
            let addr = EVENT_BUFFERS + i * FAULT_SIZE as u64;
            RawDescriptor::from(SplitDescriptor::new(addr, FAULT_SIZE as u32, 2, 0))
        })
        .collect();
    let vq = MockSplitQueue::new(mem, 16);
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    dev.process_event_queue(mem, &mut queue).unwrap();
    let taken = usize::from(buffers).min(model.faults.len());
    for (i, expected) in model.faults.drain(..taken).enumerate() {
        let mut bytes = [0u8; FAULT_SIZE];
        let at = EVENT_BUFFERS + i as u64 * FAULT_SIZE as u64;
        mem.read_slice(&mut bytes, GuestAddress(at)).unwrap();
        assert_eq!(FaultRecord::decode(&bytes), expected, "event {i}");
    }
}

fn check_state(dev: &VirtioIommu, model: &Model) {
    for ep in 0..ENDPOINTS {
        assert_eq!(
            dev.endpoint_domain(ep),
            model.attached.get(&ep).copied(),
            "endpoint {ep}"
        );
    }
    assert_eq!(dev.domain_count(), model.domains.len());
    for (&id, d) in &model.domains {
        let mut want = d.mappings.clone();
        want.sort_by_key(|m| m.start);
        let got: Vec<Mapped> = dev
            .domain_mappings(id)
            .expect("a live domain")
            .iter()
            .map(|m| Mapped {
                start: m.start,
                end: m.end,
                phys: m.phys,
                perms: m.perms,
            })
            .collect();
        assert_eq!(got, want, "mappings of domain {id}");
    }
}
