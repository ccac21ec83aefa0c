//! Lock-free translation with several threads: the statistics count each success exactly
//! once, and endpoints the lock-free directory does not cover keep working. The race between
//! translations and every kind of request is tested in `src/race_tests.rs`, where test-only
//! yields widen the race windows.

mod common;

use std::sync::{Arc, Barrier};

use common::*;
use virtio_iommu::{Access, IommuConfig, Status};

/// Many threads (more than the counters' exclusive slots) hitting the same domain and the
/// global bypass at once: counts stay exact.
#[test]
fn hit_counters_are_exact_with_many_threads() {
    let d = device();
    assert_eq!(attach(&d, 7, 1), Status::Ok);
    assert_eq!(map(&d, 7, 0x1000, 0x1fff, 0x5000, RW), Status::Ok);
    const THREADS: u64 = 12;
    const EACH: u64 = 20_000;
    let start = Arc::new(Barrier::new(THREADS as usize));
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let (d, start) = (d.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..EACH {
                    // Even threads use the domain, odd ones the boot-bypassed endpoint 2.
                    let (ep, gpa) = if i % 2 == 0 { (1, 0x5008) } else { (2, 0x1008) };
                    let t = d.translate(ep, 0x1008, 8, Access::Write).unwrap();
                    assert_eq!(t.first().unwrap().gpa, gpa);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let half = THREADS / 2 * EACH;
    assert_eq!(d.domain_stats(7).unwrap().translations, half);
    assert_eq!(d.stats().total.translations, 2 * half);
    // Destroying the domain keeps its count in the totals and in the retired record.
    assert_eq!(detach(&d, 7, 1), Status::Ok);
    let s = d.stats();
    assert_eq!(s.total.translations, 2 * half);
    let retired: Vec<(u32, u64)> = s
        .retired_domains
        .iter()
        .map(|(id, r)| (*id, r.translations))
        .collect();
    assert_eq!(retired, [(7, half)]);
    // A new domain reusing the pooled table starts from zero.
    assert_eq!(attach(&d, 8, 1), Status::Ok);
    assert_eq!(map(&d, 8, 0x1000, 0x1fff, 0x6000, RW), Status::Ok);
    d.translate(1, 0x1000, 8, Access::Read).unwrap();
    assert_eq!(d.domain_stats(8).unwrap().translations, 1);
    assert_eq!(d.stats().total.translations, 2 * half + 1);
}

/// Endpoint IDs beyond the lock-free directory, removal and re-registration all keep the
/// locked-path semantics.
#[test]
fn large_ids_and_reregistered_endpoints() {
    let d = device_with(IommuConfig {
        boot_bypass: false,
        ..Default::default()
    });
    let big = 0x12_3456;
    d.add_endpoint(big, Default::default()).unwrap();
    assert_eq!(attach(&d, 1, big), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0x8000, RW), Status::Ok);
    assert_eq!(
        d.translate(big, 0x1010, 4, Access::Read)
            .unwrap()
            .first()
            .unwrap()
            .gpa,
        0x8010
    );
    assert_eq!(attach(&d, 1, 3), Status::Ok);
    assert_eq!(
        d.translate(3, 0x1010, 4, Access::Read)
            .unwrap()
            .first()
            .unwrap()
            .gpa,
        0x8010
    );
    d.remove_endpoint(3).unwrap();
    let f = d.translate(3, 0x1010, 4, Access::Read).unwrap_err();
    assert_eq!(f.reason, virtio_iommu::FaultReason::Unknown);
    d.add_endpoint(3, Default::default()).unwrap();
    let f = d.translate(3, 0x1010, 4, Access::Read).unwrap_err();
    assert_eq!(f.reason, virtio_iommu::FaultReason::Domain);
    assert_eq!(d.domain_stats(1).unwrap().translations, 2);
}
