//! Helpers shared by the integration tests: a device with endpoints 1..=3 and request
//! shorthands that go through the same decode + execute path as the queue.
#![allow(dead_code)]

use std::sync::Arc;

use virtio_iommu::protocol::*;
use virtio_iommu::{Access, EndpointConfig, IommuConfig, Status, VirtioIommu};

pub const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;

pub fn device_with(cfg: IommuConfig) -> Arc<VirtioIommu> {
    let d = Arc::new(VirtioIommu::new(cfg).unwrap());
    for ep in 1..=3 {
        d.add_endpoint(ep, EndpointConfig::default()).unwrap();
    }
    d.ack_features(d.features());
    d
}

pub fn device() -> Arc<VirtioIommu> {
    device_with(IommuConfig::default())
}

/// Run a request through the byte-level path (encode, answer) and return its status.
pub fn run(d: &VirtioIommu, req: Request) -> Status {
    let writable = match req {
        Request::Probe(_) => 4 + d.config().probe_size as u64,
        _ => 4,
    };
    match d.answer(&req.encode(), true, writable) {
        virtio_iommu::Answer::Write(b) => status_of(b[b.len() - 4]),
        virtio_iommu::Answer::Untouched => panic!("request left untouched"),
    }
}

pub fn status_of(b: u8) -> Status {
    [
        Status::Ok,
        Status::IoErr,
        Status::Unsupp,
        Status::DevErr,
        Status::Inval,
        Status::Range,
        Status::NoEnt,
        Status::Fault,
        Status::NoMem,
    ][b as usize]
}

pub fn attach(d: &VirtioIommu, domain: u32, endpoint: u32) -> Status {
    attach_flags(d, domain, endpoint, 0)
}

pub fn attach_flags(d: &VirtioIommu, domain: u32, endpoint: u32, flags: u32) -> Status {
    run(
        d,
        Request::Attach(AttachRequest {
            domain,
            endpoint,
            flags,
            reserved: [0; 4],
        }),
    )
}

pub fn detach(d: &VirtioIommu, domain: u32, endpoint: u32) -> Status {
    run(d, Request::Detach(DetachRequest { domain, endpoint }))
}

pub fn map(d: &VirtioIommu, domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Status {
    run(
        d,
        Request::Map(MapRequest {
            domain,
            virt_start: start,
            virt_end: end,
            phys_start: phys,
            flags,
        }),
    )
}

pub fn unmap(d: &VirtioIommu, domain: u32, start: u64, end: u64) -> Status {
    run(
        d,
        Request::Unmap(UnmapRequest {
            domain,
            virt_start: start,
            virt_end: end,
        }),
    )
}

/// Inclusive end of `pages` 4 KiB pages starting at page `first`.
pub fn pages(first: u64, pages: u64) -> (u64, u64) {
    (first << 12, ((first + pages) << 12) - 1)
}

/// Where a 4-byte read by `endpoint` at `iova` goes; panics on a fault.
pub fn gpa_of(d: &VirtioIommu, endpoint: u32, iova: u64) -> u64 {
    d.translate(endpoint, iova, 4, Access::Read)
        .unwrap()
        .first()
        .unwrap()
        .gpa
}
