//! Request semantics and status codes, one test per rule of virtio v1.2 §5.13.6.

mod common;

use common::*;
use virtio_iommu::protocol::*;
use virtio_iommu::{
    Access, Answer, EndpointConfig, FaultReason, IommuConfig, ReservedRegion, Status,
};

#[test]
fn spec_example_sequence() {
    // attach two endpoints, map, unmap a range covering several mappings, split -> RANGE,
    // detach destroys the domain.
    let d = device();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(attach(&d, 1, 2), Status::Ok);
    let (a0, a1) = pages(1, 1);
    let (b0, b1) = pages(2, 2);
    let (c0, c1) = pages(8, 4);
    assert_eq!(
        map(&d, 1, a0, a1, 0xa000, VIRTIO_IOMMU_MAP_F_READ),
        Status::Ok
    );
    assert_eq!(map(&d, 1, b0, b1, 0x10_0000, RW), Status::Ok);
    assert_eq!(map(&d, 1, c0, c1, 0x20_0000, RW), Status::Ok);
    // Both endpoints see the mapping.
    for ep in [1, 2] {
        let t = d.translate(ep, 0x1004, 4, Access::Read).unwrap();
        assert_eq!(t.first().unwrap().gpa, 0xa004);
    }
    // Covers a and b entirely (and unmapped space after), leaves c.
    assert_eq!(unmap(&d, 1, a0, pages(7, 1).1), Status::Ok);
    assert_eq!(d.domain_mappings(1).unwrap().len(), 1);
    assert!(d.translate(1, 0x1000, 1, Access::Read).is_err());
    // Would split c.
    assert_eq!(unmap(&d, 1, c0, c0 + 0xfff), Status::Range);
    assert_eq!(d.domain_mappings(1).unwrap().len(), 1);
    assert_eq!(detach(&d, 1, 1), Status::Ok);
    assert_eq!(d.domain_count(), 1);
    assert_eq!(detach(&d, 1, 2), Status::Ok);
    assert_eq!(d.domain_count(), 0, "last detach destroys the domain");
    assert!(d.domain_mappings(1).is_none());
    // Domain ID can be reused, empty.
    assert_eq!(attach(&d, 1, 3), Status::Ok);
    assert!(d.domain_mappings(1).unwrap().is_empty());
}

#[test]
fn spec_unmap_examples_through_requests() {
    let p = |n| pages(n, 1).0;
    let e = |n| pages(n, 1).1;
    type Seq = (&'static [(u64, u64)], (u64, u64), Status, usize);
    let cases: [Seq; 7] = [
        (&[], (0, 4), Status::Ok, 0),
        (&[(0, 9)], (0, 9), Status::Ok, 0),
        (&[(0, 4), (5, 9)], (0, 9), Status::Ok, 0),
        (&[(0, 9)], (0, 4), Status::Range, 1),
        (&[(0, 4), (5, 9)], (0, 4), Status::Ok, 1),
        (&[(0, 4)], (0, 9), Status::Ok, 0),
        (&[(0, 4), (10, 14)], (0, 14), Status::Ok, 0),
    ];
    for (i, (maps, (us, ue), status, left)) in cases.into_iter().enumerate() {
        let d = device();
        assert_eq!(attach(&d, 7, 1), Status::Ok);
        for &(s, t) in maps {
            assert_eq!(map(&d, 7, p(s), e(t), 0, RW), Status::Ok);
        }
        assert_eq!(unmap(&d, 7, p(us), e(ue)), status, "example {}", i + 1);
        assert_eq!(
            d.domain_mappings(7).unwrap().len(),
            left,
            "example {}",
            i + 1
        );
    }
}

#[test]
fn attach_statuses() {
    let d = device_with(IommuConfig {
        domain_range: (1, 100),
        max_domains: 2,
        ..Default::default()
    });
    let req = |reserved| {
        Request::Attach(AttachRequest {
            domain: 1,
            endpoint: 1,
            flags: 0,
            reserved,
        })
    };
    assert_eq!(run(&d, req([0, 0, 1, 0])), Status::Inval, "reserved");
    assert_eq!(
        attach_flags(&d, 1, 1, 1 << 5),
        Status::Inval,
        "unknown flag"
    );
    assert_eq!(attach(&d, 1, 99), Status::NoEnt);
    assert_eq!(attach(&d, 0, 1), Status::Range);
    assert_eq!(attach(&d, 101, 1), Status::Range);
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(attach(&d, 1, 1), Status::Ok, "re-attach is a no-op");
    assert_eq!(
        attach_flags(&d, 1, 2, VIRTIO_IOMMU_ATTACH_F_BYPASS),
        Status::Inval,
        "bypass flag inconsistent with the domain"
    );
    assert_eq!(attach(&d, 2, 2), Status::Ok);
    assert_eq!(attach(&d, 3, 3), Status::NoMem, "max_domains");
    // Moving the sole endpoint of a domain frees its slot, so this is allowed at the limit.
    assert_eq!(attach(&d, 3, 2), Status::Ok);
    assert_eq!(d.endpoint_domain(2), Some(3));
    assert_eq!(d.domain_count(), 2);
}

#[test]
fn attach_bypass_flag_needs_bypass_config() {
    let d = device();
    d.ack_features(d.features() & !(1 << VIRTIO_IOMMU_F_BYPASS_CONFIG));
    assert_eq!(
        attach_flags(&d, 1, 1, VIRTIO_IOMMU_ATTACH_F_BYPASS),
        Status::Inval
    );
    d.ack_features(d.features());
    assert_eq!(
        attach_flags(&d, 1, 1, VIRTIO_IOMMU_ATTACH_F_BYPASS),
        Status::Ok
    );
}

#[test]
fn attach_moves_endpoint_and_destroys_old_domain() {
    let d = device();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0x5000, RW), Status::Ok);
    assert_eq!(attach(&d, 2, 1), Status::Ok);
    assert_eq!(d.endpoint_domain(1), Some(2));
    assert!(d.domain_mappings(1).is_none(), "old domain destroyed");
    let f = d.translate(1, 0x1000, 4, Access::Read).unwrap_err();
    assert_eq!(f.reason, FaultReason::Mapping);
    let s = d.stats();
    assert_eq!(s.total.maps, 1);
    assert_eq!(s.total.unmaps, 1, "destroyed mappings count as unmapped");
    assert_eq!(s.total.live_bytes(), 0);
}

#[test]
fn attach_rejects_endpoint_whose_reserved_region_is_mapped() {
    let d = device();
    d.add_endpoint(
        9,
        EndpointConfig {
            reserved_regions: Some(vec![ReservedRegion {
                subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
                start: 0x10_0000,
                end: 0x10_ffff,
            }]),
            mapper: None,
        },
    )
    .unwrap();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(map(&d, 1, 0x10_0000, 0x10_0fff, 0, RW), Status::Ok);
    assert_eq!(attach(&d, 1, 9), Status::Unsupp);
    assert_eq!(d.endpoint_domain(9), None);
}

#[test]
fn detach_statuses() {
    let d = device();
    assert_eq!(detach(&d, 1, 99), Status::NoEnt);
    assert_eq!(detach(&d, 1, 1), Status::Inval, "not attached");
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(detach(&d, 2, 1), Status::Inval, "attached elsewhere");
    assert_eq!(detach(&d, 1, 1), Status::Ok);
    assert_eq!(d.endpoint_domain(1), None);
    // DETACH reserved bytes are ignored.
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    let mut bytes = Request::Detach(DetachRequest {
        domain: 1,
        endpoint: 1,
    })
    .encode();
    bytes[19] = 0xff;
    assert_eq!(
        d.answer(&bytes, true, 4),
        Answer::Write(encode_tail(Status::Ok).to_vec())
    );
}

#[test]
fn map_statuses() {
    let d = device_with(IommuConfig {
        input_range: (0, (1 << 48) - 1),
        max_mappings_per_domain: 2,
        ..Default::default()
    });
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0, RW), Status::NoEnt);
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(
        map(&d, 1, 0x1001, 0x1fff, 0, RW),
        Status::Range,
        "virt_start"
    );
    assert_eq!(
        map(&d, 1, 0x1000, 0x1ffe, 0, RW),
        Status::Range,
        "virt_end+1"
    );
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0x10, RW), Status::Range, "phys");
    assert_eq!(
        map(&d, 1, 0x2000, 0x1fff, 0, RW),
        Status::Inval,
        "end < start"
    );
    assert_eq!(
        map(&d, 1, 1 << 48, (1 << 48) + 0xfff, 0, RW),
        Status::Range,
        "input_range"
    );
    assert_eq!(
        map(&d, 1, 0x1000, 0x2fff, u64::MAX - 0xfff, RW),
        Status::Range,
        "phys end overflows"
    );
    assert_eq!(
        map(&d, 1, 0x1000, 0x1fff, 0, 1 << 3),
        Status::Inval,
        "unknown flag"
    );
    assert_eq!(
        map(&d, 1, 0xfee0_0000, 0xfee0_0fff, 0, RW),
        Status::Inval,
        "MSI reserved region"
    );
    assert_eq!(map(&d, 1, 0x1000, 0x2fff, 0, RW), Status::Ok);
    assert_eq!(map(&d, 1, 0x2000, 0x2fff, 0, RW), Status::Inval, "overlap");
    assert_eq!(
        map(&d, 1, 0x0, 0x1fff, 0, RW),
        Status::Inval,
        "overlap at start"
    );
    assert_eq!(
        map(&d, 1, 0x3000, 0x3fff, 0, 0),
        Status::Ok,
        "no-access mapping"
    );
    assert_eq!(
        map(&d, 1, 0x4000, 0x4fff, 0, RW),
        Status::NoMem,
        "max mappings"
    );
    assert_eq!(
        attach_flags(&d, 2, 2, VIRTIO_IOMMU_ATTACH_F_BYPASS),
        Status::Ok
    );
    assert_eq!(
        map(&d, 2, 0x1000, 0x1fff, 0, RW),
        Status::Inval,
        "bypass domain"
    );
}

/// Mappings scattered one per 2 MiB take a radix node each: the table's node limit ends them
/// with NOMEM, whatever `max_mappings_per_domain` allows, and UNMAPs make room again.
#[test]
fn map_beyond_the_table_node_limit_is_nomem() {
    let d = device_with(IommuConfig {
        max_table_nodes: 100,
        ..Default::default()
    });
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    let page = |i: u64| (i << 21, (i << 21) + 0xfff);
    let mut n = 0;
    while n < 1000 {
        let (start, end) = page(n);
        match map(&d, 1, start, end, 0x1000, RW) {
            Status::Ok => n += 1,
            status => {
                assert_eq!(status, Status::NoMem);
                break;
            }
        }
    }
    assert!(n > 50 && n < 100, "{n} mappings");
    assert_eq!(d.domain_mappings(1).unwrap().len() as u64, n);
    for i in 0..20 {
        let (start, end) = page(i);
        assert_eq!(unmap(&d, 1, start, end), Status::Ok);
    }
    let (start, end) = page(n);
    assert_eq!(map(&d, 1, start, end, 0x1000, RW), Status::Ok);
}

#[test]
fn map_mmio_flag_requires_negotiation() {
    let d = device();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    d.ack_features(d.features() & !(1 << VIRTIO_IOMMU_F_MMIO));
    let mmio = VIRTIO_IOMMU_MAP_F_MMIO | VIRTIO_IOMMU_MAP_F_WRITE;
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0, mmio), Status::Inval);
    d.ack_features(d.features());
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0, mmio), Status::Ok);
    assert!(d.domain_mappings(1).unwrap()[0].mmio);
}

#[test]
fn map_top_of_address_space() {
    let d = device();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(
        map(&d, 1, u64::MAX - 0xfff, u64::MAX, 0x7000, RW),
        Status::Ok
    );
    let t = d.translate(1, u64::MAX - 7, 8, Access::Read).unwrap();
    assert_eq!(t.first().unwrap().gpa, 0x7ff8);
    assert!(
        d.translate(1, u64::MAX - 7, 9, Access::Read).is_err(),
        "wraps"
    );
    assert_eq!(unmap(&d, 1, 0, u64::MAX), Status::Ok);
    assert!(d.domain_mappings(1).unwrap().is_empty());
}

#[test]
fn unmap_statuses() {
    let d = device_with(IommuConfig {
        input_range: (0x1000, (1 << 40) - 1),
        ..Default::default()
    });
    assert_eq!(unmap(&d, 1, 0x1000, 0x1fff), Status::NoEnt);
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(unmap(&d, 1, 0x2000, 0x1fff), Status::Inval);
    assert_eq!(unmap(&d, 1, 0, 0xfff), Status::Range, "below input_range");
    assert_eq!(map(&d, 1, 0x1000, 0x3fff, 0, RW), Status::Ok);
    assert_eq!(
        unmap(&d, 1, 0x2000, 0x5fff),
        Status::Range,
        "split at start"
    );
    assert_eq!(unmap(&d, 1, 0x1000, 0x2fff), Status::Range, "split at end");
    assert_eq!(unmap(&d, 1, 0x1000, 0x3fff), Status::Ok);
    assert_eq!(
        attach_flags(&d, 2, 2, VIRTIO_IOMMU_ATTACH_F_BYPASS),
        Status::Ok
    );
    assert_eq!(unmap(&d, 2, 0x1000, 0x1fff), Status::Inval, "bypass domain");
}

#[test]
fn probe_reports_reserved_regions() {
    let d = device();
    let custom = ReservedRegion {
        subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
        start: 0x8000_0000,
        end: 0x8fff_ffff,
    };
    d.add_endpoint(
        0x10,
        EndpointConfig {
            reserved_regions: Some(vec![ReservedRegion::X86_MSI, custom]),
            mapper: None,
        },
    )
    .unwrap();
    let probe = |ep| Request::Probe(ProbeRequest { endpoint: ep }).encode();
    let w = 4 + u64::from(d.config().probe_size);
    let Answer::Write(out) = d.answer(&probe(1), true, w) else {
        panic!()
    };
    assert_eq!(out.len() as u64, w);
    assert_eq!(out[out.len() - 4], Status::Ok as u8);
    let props = &out[..out.len() - 4];
    assert_eq!(
        ReservedRegion::decode_properties(props),
        vec![ReservedRegion::X86_MSI]
    );
    assert!(props[RESV_MEM_PROPERTY_SIZE..].iter().all(|&b| b == 0));

    let Answer::Write(out) = d.answer(&probe(0x10), true, w) else {
        panic!()
    };
    assert_eq!(
        ReservedRegion::decode_properties(&out[..out.len() - 4]),
        vec![ReservedRegion::X86_MSI, custom]
    );
    let Answer::Write(out) = d.answer(&probe(0x99), true, w) else {
        panic!()
    };
    assert_eq!(out[out.len() - 4], Status::NoEnt as u8);
    // Properties area smaller than probe_size: INVAL and no property written.
    let Answer::Write(out) = d.answer(&probe(1), true, w - 8) else {
        panic!()
    };
    assert_eq!(out[out.len() - 4], Status::Inval as u8);
    assert!(out[..out.len() - 4].iter().all(|&b| b == 0));
    // Reserved padding of PROBE is ignored.
    let mut p = probe(1);
    p[40] = 0xff;
    let Answer::Write(out) = d.answer(&p, true, w) else {
        panic!()
    };
    assert_eq!(out[out.len() - 4], Status::Ok as u8);
}

#[test]
fn probe_not_offered_is_left_untouched() {
    let d = device_with(IommuConfig {
        probe_size: 0,
        ..Default::default()
    });
    assert_eq!(d.features() & (1 << VIRTIO_IOMMU_F_PROBE), 0);
    let p = Request::Probe(ProbeRequest { endpoint: 1 }).encode();
    assert_eq!(d.answer(&p, true, 4), Answer::Untouched);
}

#[test]
fn malformed_requests() {
    let d = device();
    let attach = Request::Attach(AttachRequest {
        domain: 1,
        endpoint: 1,
        flags: 0,
        reserved: [0; 4],
    })
    .encode();
    let inval = Answer::Write(encode_tail(Status::Inval).to_vec());
    // Unknown type and missing head: untouched (used length 0).
    assert_eq!(d.answer(&[0x42, 0, 0, 0], true, 4), Answer::Untouched);
    assert_eq!(d.answer(&[1, 0], true, 4), Answer::Untouched);
    assert_eq!(d.answer(&[], true, 4), Answer::Untouched);
    // No room for the tail, or a writable part bigger than the layout: untouched.
    assert_eq!(d.answer(&attach, true, 3), Answer::Untouched);
    assert_eq!(d.answer(&attach, true, 8), Answer::Untouched);
    // Short and oversized readable parts: INVAL, and nothing was executed.
    assert_eq!(d.answer(&attach[..16], true, 4), inval);
    let mut long = attach.clone();
    long.push(0);
    assert_eq!(d.answer(&long, true, 4), inval);
    assert_eq!(d.endpoint_domain(1), None);
    // Readable buffer outside guest RAM: FAULT (bad address).
    assert_eq!(
        d.answer(&[], false, 4),
        Answer::Write(encode_tail(Status::Fault).to_vec())
    );
    assert_eq!(
        d.answer(&attach, true, 4),
        Answer::Write(encode_tail(Status::Ok).to_vec())
    );
}

#[test]
fn config_space_and_features() {
    let d = device_with(IommuConfig {
        page_size_mask: 0x1000,
        input_range: (0, (1 << 39) - 1),
        domain_range: (0, 255),
        probe_size: 128,
        boot_bypass: true,
        ..Default::default()
    });
    let mut b = [0u8; 40];
    d.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 0x1000);
    assert_eq!(
        u64::from_le_bytes(b[16..24].try_into().unwrap()),
        (1 << 39) - 1
    );
    assert_eq!(u32::from_le_bytes(b[28..32].try_into().unwrap()), 255);
    assert_eq!(u32::from_le_bytes(b[32..36].try_into().unwrap()), 128);
    assert_eq!(b[36], 1);
    let mut tail = [0xaa; 8];
    d.read_config(36, &mut tail);
    assert_eq!(tail, [1, 0, 0, 0, 0, 0, 0, 0], "past the end reads zero");

    let f = d.features();
    for bit in [
        VIRTIO_IOMMU_F_INPUT_RANGE,
        VIRTIO_IOMMU_F_DOMAIN_RANGE,
        VIRTIO_IOMMU_F_MAP_UNMAP,
        VIRTIO_IOMMU_F_PROBE,
        VIRTIO_IOMMU_F_MMIO,
        VIRTIO_IOMMU_F_BYPASS_CONFIG,
        virtio_iommu::VIRTIO_F_VERSION_1,
    ] {
        assert_ne!(f & (1 << bit), 0, "bit {bit}");
    }
    assert_eq!(
        f & (1 << VIRTIO_IOMMU_F_BYPASS),
        0,
        "legacy bypass not offered"
    );
    assert_eq!(
        f & virtio_iommu::PROTECTED_DEVICE_FEATURES,
        0,
        "the IOMMU itself is not behind an IOMMU"
    );

    // Read-only fields ignore writes.
    d.write_config(0, &[0xff; 8]);
    d.read_config(0, &mut b);
    assert_eq!(b[1], 0x10);
    // bypass is writable only with BYPASS_CONFIG negotiated; only bit 0 is kept.
    d.ack_features(f & !(1 << VIRTIO_IOMMU_F_BYPASS_CONFIG));
    d.write_config(36, &[0]);
    assert!(d.bypass());
    d.ack_features(f);
    d.write_config(36, &[0]);
    assert!(!d.bypass());
    d.write_config(32, &[0, 0, 0, 0, 3]);
    assert!(d.bypass());
    d.write_config(36, &[2]);
    assert!(!d.bypass());
    // Device reset keeps bypass; system reset restores the boot value.
    d.reset();
    assert!(!d.bypass());
    assert_eq!(d.acked_features(), 0);
    d.system_reset();
    assert!(d.bypass());
}

#[test]
fn invalid_configs_are_refused() {
    use virtio_iommu::{ConfigError, VirtioIommu};
    let bad = |c: IommuConfig| VirtioIommu::new(c).unwrap_err();
    assert_eq!(
        bad(IommuConfig {
            page_size_mask: 0,
            ..Default::default()
        }),
        ConfigError::PageSizeMask(0)
    );
    assert!(matches!(
        bad(IommuConfig {
            page_size_mask: 0b110,
            ..Default::default()
        }),
        ConfigError::PageSizeMask(_)
    ));
    assert!(matches!(
        bad(IommuConfig {
            input_range: (0x1000, 0x10),
            ..Default::default()
        }),
        ConfigError::Range(..)
    ));
    assert!(matches!(
        bad(IommuConfig {
            probe_size: 8,
            ..Default::default()
        }),
        ConfigError::ProbeSize { .. }
    ));
    let d = device();
    assert_eq!(
        d.add_endpoint(1, EndpointConfig::default()),
        Err(ConfigError::DuplicateEndpoint(1))
    );
    assert_eq!(d.remove_endpoint(77), Err(ConfigError::UnknownEndpoint(77)));
}
