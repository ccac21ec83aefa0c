//! Translation for devices: bypass modes, multi-mapping accesses, permission faults, fault
//! records and statistics.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use virtio_iommu::protocol::*;
use virtio_iommu::{Access, FaultReason, GuestRange, IommuConfig, Status, RETIRED_DOMAINS_KEPT};

#[test]
fn boot_bypass_until_driver_clears_it() {
    let d = device();
    assert!(d.bypass());
    let t = d.translate(1, 0x1234_5000, 0x100, Access::Write).unwrap();
    assert_eq!(
        t.first(),
        Some(GuestRange {
            gpa: 0x1234_5000,
            len: 0x100
        })
    );
    d.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]);
    let f = d
        .translate(1, 0x1234_5000, 0x100, Access::Write)
        .unwrap_err();
    assert_eq!(f.reason, FaultReason::Domain);
    // Attached endpoints never bypass because of the global field.
    d.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(
        d.translate(1, 0x1000, 4, Access::Read).unwrap_err().reason,
        FaultReason::Mapping
    );
}

#[test]
fn bypass_domain_is_identity() {
    let d = device_with(IommuConfig {
        boot_bypass: false,
        ..Default::default()
    });
    assert_eq!(
        attach_flags(&d, 5, 1, VIRTIO_IOMMU_ATTACH_F_BYPASS),
        Status::Ok
    );
    let t = d.translate(1, 0xdead_0000, 0x10, Access::Write).unwrap();
    assert_eq!(t.first().unwrap().gpa, 0xdead_0000);
    assert_eq!(d.domain_stats(5).unwrap().translations, 1);
}

#[test]
fn access_spanning_mappings_returns_pieces() {
    let d = device();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    // Two mappings, physically discontiguous, then a third contiguous with the second.
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0x10_0000, RW), Status::Ok);
    assert_eq!(map(&d, 1, 0x2000, 0x2fff, 0x50_0000, RW), Status::Ok);
    assert_eq!(map(&d, 1, 0x3000, 0x3fff, 0x50_1000, RW), Status::Ok);
    let t = d.translate(1, 0x1ff0, 0x2010, Access::Read).unwrap();
    let pieces: Vec<_> = t.iter().copied().collect();
    assert_eq!(
        pieces,
        vec![
            GuestRange {
                gpa: 0x10_0ff0,
                len: 0x10
            },
            GuestRange {
                gpa: 0x50_0000,
                len: 0x2000
            },
        ]
    );
    assert_eq!(t.len(), 2);
    // A hole in the middle faults at the first unmapped byte.
    assert_eq!(unmap(&d, 1, 0x2000, 0x2fff), Status::Ok);
    let f = d.translate(1, 0x1ff0, 0x2010, Access::Read).unwrap_err();
    assert_eq!((f.reason, f.address), (FaultReason::Mapping, 0x2000));
    // Zero-length accesses are empty.
    assert!(d.translate(1, 0x9000, 0, Access::Read).unwrap().is_empty());
}

#[test]
fn many_pieces_spill_past_inline_storage() {
    let d = device();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    for i in 0..8u64 {
        let (s, e) = pages(i, 1);
        assert_eq!(map(&d, 1, s, e, 0x100_0000 + i * 0x2000, RW), Status::Ok);
    }
    let t = d.translate(1, 0, 8 * 0x1000, Access::Write).unwrap();
    assert_eq!(t.len(), 8);
    let gpas: Vec<u64> = t.iter().map(|r| r.gpa).collect();
    assert_eq!(gpas[7], 0x100_0000 + 7 * 0x2000);
    assert!(t.iter().all(|r| r.len == 0x1000));
}

#[test]
fn permission_faults_are_recorded_with_flags() {
    let d = device();
    let signals = Arc::new(AtomicUsize::new(0));
    let s = signals.clone();
    d.set_fault_notifier(Some(Arc::new(move || {
        s.fetch_add(1, Ordering::SeqCst);
    })));
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(
        map(&d, 1, 0x1000, 0x1fff, 0x8000, VIRTIO_IOMMU_MAP_F_READ),
        Status::Ok
    );
    assert_eq!(
        map(&d, 1, 0x2000, 0x2fff, 0x9000, VIRTIO_IOMMU_MAP_F_WRITE),
        Status::Ok
    );
    assert!(d.translate(1, 0x1000, 8, Access::Read).is_ok());
    let f = d.translate(1, 0x1008, 8, Access::Write).unwrap_err();
    let rec = f.record();
    assert_eq!(rec.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
    assert_eq!(
        rec.flags,
        VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS
    );
    assert_eq!((rec.endpoint, rec.address), (1, 0x1008));
    let f = d.translate(1, 0x2000, 8, Access::Read).unwrap_err();
    assert_eq!(
        f.record().flags,
        VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS
    );
    assert_eq!(d.pending_faults(), 2);
    assert_eq!(signals.load(Ordering::SeqCst), 2);
    let st = d.domain_stats(1).unwrap();
    assert_eq!((st.faults, st.translations), (2, 1));
}

#[test]
fn domain_fault_and_unknown_endpoint() {
    let d = device_with(IommuConfig {
        boot_bypass: false,
        ..Default::default()
    });
    let f = d.translate(2, 0x4000, 1, Access::Read).unwrap_err();
    assert_eq!(f.record().reason, VIRTIO_IOMMU_FAULT_R_DOMAIN);
    assert_eq!(d.pending_faults(), 1);
    // Unregistered endpoint: counted, but not reported (no valid endpoint ID to name).
    let f = d.translate(0x999, 0x4000, 1, Access::Read).unwrap_err();
    assert_eq!(f.reason, FaultReason::Unknown);
    assert_eq!(f.record().reason, VIRTIO_IOMMU_FAULT_R_UNKNOWN);
    assert_eq!(d.pending_faults(), 1);
    assert_eq!(d.stats().total.faults, 2);
}

#[test]
fn pending_faults_are_bounded() {
    let d = device_with(IommuConfig {
        boot_bypass: false,
        max_pending_faults: 3,
        ..Default::default()
    });
    for i in 0..5 {
        assert!(d.translate(1, i << 12, 1, Access::Read).is_err());
    }
    assert_eq!(d.pending_faults(), 3);
    let s = d.stats();
    assert_eq!((s.total.faults, s.dropped_fault_events), (5, 2));
}

#[test]
fn stats_per_domain_and_total() {
    let d = device();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(attach(&d, 2, 2), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x2fff, 0, RW), Status::Ok);
    assert_eq!(map(&d, 2, 0x1000, 0x1fff, 0, RW), Status::Ok);
    assert_eq!(map(&d, 2, 0x4000, 0x4fff, 0, RW), Status::Ok);
    assert_eq!(unmap(&d, 2, 0x4000, 0x4fff), Status::Ok);
    d.translate(1, 0x1000, 4, Access::Read).unwrap();
    d.translate(2, 0x1000, 4, Access::Read).unwrap();
    d.translate(2, 0x1000, 4, Access::Read).unwrap();
    let s = d.stats();
    assert_eq!(s.domains.len(), 2);
    let (id, d1) = s.domains[0];
    assert_eq!(id, 1);
    assert_eq!(
        (d1.maps, d1.unmaps, d1.bytes_mapped, d1.translations),
        (1, 0, 0x2000, 1)
    );
    let d2 = s.domains[1].1;
    assert_eq!(
        (d2.maps, d2.unmaps, d2.live_bytes(), d2.translations),
        (2, 1, 0x1000, 2)
    );
    assert_eq!(
        (s.total.maps, s.total.unmaps, s.total.translations),
        (3, 1, 3)
    );
    // Totals survive domain destruction.
    assert_eq!(detach(&d, 1, 1), Status::Ok);
    let s = d.stats();
    assert_eq!(s.domains.len(), 1);
    assert_eq!(
        (s.total.maps, s.total.unmaps, s.total.translations),
        (3, 2, 3)
    );
    assert_eq!(s.total.live_bytes(), 0x1000);
    // ... and so does what each destroyed domain did, through detach and device reset alike.
    d.reset();
    let s = d.stats();
    assert!(s.domains.is_empty());
    let retired: Vec<(u32, u64, u64, u64)> = s
        .retired_domains
        .iter()
        .map(|(id, r)| (*id, r.maps, r.unmaps, r.translations))
        .collect();
    assert_eq!(retired, [(1, 1, 1, 1), (2, 2, 2, 2)]);
}

#[test]
fn retired_domains_are_bounded() {
    let d = device();
    for domain in 1..=(RETIRED_DOMAINS_KEPT as u32 + 3) {
        assert_eq!(attach(&d, domain, 1), Status::Ok);
    }
    let retired = d.stats().retired_domains;
    assert_eq!(retired.len(), RETIRED_DOMAINS_KEPT);
    assert_eq!(
        retired.first().map(|(id, _)| *id),
        Some(3),
        "oldest dropped first"
    );
}

#[test]
fn concurrent_translation_and_requests() {
    let d = device();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(map(&d, 1, 0, 0xfff, 0x7000, RW), Status::Ok);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let d = d.clone();
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    // Page 0 is never unmapped; page 1 comes and goes.
                    assert_eq!(gpa_of(&d, 1, 0x10), 0x7010);
                    if let Ok(t) = d.translate(1, 0x1000, 4, Access::Read) {
                        assert_eq!(t.first().unwrap().gpa, 0x9000);
                    }
                }
            })
        })
        .collect();
    for _ in 0..2_000 {
        assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0x9000, RW), Status::Ok);
        assert_eq!(unmap(&d, 1, 0x1000, 0x1fff), Status::Ok);
    }
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn device_and_endpoint_iommu_are_shareable_across_threads() {
    // Compile-time property: the VMM shares these between vCPU and device threads.
    fn shareable<T: Send + Sync>() {}
    shareable::<virtio_iommu::VirtioIommu>();
    shareable::<virtio_iommu::EndpointIommu>();
}
