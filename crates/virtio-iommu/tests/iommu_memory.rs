//! `IommuMemory<GuestMemoryMmap, EndpointIommu>`: a protected device's view of memory.

mod common;

use std::sync::Arc;

use common::*;
use virtio_iommu::protocol::*;
use virtio_iommu::{EndpointIommu, IommuConfig, Status, VirtioIommu};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Iommu, IommuMemory, Permissions,
};

type DevMem = IommuMemory<GuestMemoryMmap, EndpointIommu>;

fn setup(bypass: bool) -> (Arc<VirtioIommu>, GuestMemoryMmap, DevMem) {
    let d = device_with(IommuConfig {
        boot_bypass: bypass,
        ..Default::default()
    });
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let iommu = EndpointIommu::new(d.clone(), 1).unwrap();
    let dev_mem = IommuMemory::new(mem.clone(), iommu, true, ());
    (d, mem, dev_mem)
}

const IOVA: u64 = 0x10_0000_0000;

#[test]
fn reads_and_writes_go_through_mappings() {
    let (d, mem, dm) = setup(false);
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    // Two IOVA-contiguous pages backed by discontiguous guest pages.
    assert_eq!(map(&d, 1, IOVA, IOVA + 0xfff, 0x4000, RW), Status::Ok);
    assert_eq!(
        map(&d, 1, IOVA + 0x1000, IOVA + 0x1fff, 0x9000, RW),
        Status::Ok
    );
    dm.write_obj(0xdead_beef_u32, GuestAddress(IOVA + 0x10))
        .unwrap();
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x4010)).unwrap(),
        0xdead_beef
    );
    // An access straddling both pages lands in both guest pages.
    dm.write_obj(0x1122_3344_5566_7788_u64, GuestAddress(IOVA + 0xffc))
        .unwrap();
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x4ffc)).unwrap(),
        0x5566_7788
    );
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x9000)).unwrap(),
        0x1122_3344
    );
    assert_eq!(
        dm.read_obj::<u64>(GuestAddress(IOVA + 0xffc)).unwrap(),
        0x1122_3344_5566_7788
    );
    let hits = EndpointIommu::new(d.clone(), 1).unwrap().iotlb_hits();
    assert!(hits > 0, "repeat accesses hit the IOTLB");
    assert_eq!(d.pending_faults(), 0);
}

/// A MAP puts the mapping into the attached endpoints' IOTLBs, so the device's first access
/// already hits; an UNMAP takes it out again.
#[test]
fn a_new_mapping_hits_the_iotlb_at_once_and_leaves_with_unmap() {
    let (d, mem, dm) = setup(false);
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(map(&d, 1, IOVA, IOVA + 0xfff, 0x4000, RW), Status::Ok);
    let before = d.stats();
    mem.write_obj(0x5a5a_u16, GuestAddress(0x4008)).unwrap();
    assert_eq!(dm.read_obj::<u16>(GuestAddress(IOVA + 8)).unwrap(), 0x5a5a);
    let after = d.stats();
    assert_eq!(
        after.iotlb_hits,
        before.iotlb_hits + 1,
        "the first access hit"
    );
    assert_eq!(
        after.total.translations, before.total.translations,
        "no fill"
    );

    assert_eq!(unmap(&d, 1, IOVA, IOVA + 0xfff), Status::Ok);
    assert!(dm.read_obj::<u16>(GuestAddress(IOVA + 8)).is_err());
    assert_eq!(d.pending_faults(), 1);
}

#[test]
fn unmapped_iova_is_refused_and_reported() {
    let (d, _mem, dm) = setup(false);
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(
        map(&d, 1, IOVA, IOVA + 0xfff, 0x4000, VIRTIO_IOMMU_MAP_F_READ),
        Status::Ok
    );
    assert!(dm.read_obj::<u32>(GuestAddress(IOVA + 0x1000)).is_err());
    assert!(
        dm.write_obj(1u32, GuestAddress(IOVA)).is_err(),
        "read-only mapping"
    );
    assert_eq!(d.pending_faults(), 2);
    let s = d.domain_stats(1).unwrap();
    assert_eq!(s.faults, 2);
    // Reaching the last byte of the address space is refused, not a panic.
    assert!(dm.read_obj::<u32>(GuestAddress(u64::MAX - 3)).is_err());
}

#[test]
fn unmap_and_detach_invalidate_the_iotlb() {
    let (d, _mem, dm) = setup(false);
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(map(&d, 1, IOVA, IOVA + 0xfff, 0x4000, RW), Status::Ok);
    assert_eq!(
        map(&d, 1, IOVA + 0x1000, IOVA + 0x1fff, 0x5000, RW),
        Status::Ok
    );
    dm.read_obj::<u32>(GuestAddress(IOVA)).unwrap();
    dm.read_obj::<u32>(GuestAddress(IOVA + 0x1000)).unwrap();
    assert_eq!(unmap(&d, 1, IOVA, IOVA + 0xfff), Status::Ok);
    assert!(dm.read_obj::<u32>(GuestAddress(IOVA)).is_err());
    dm.read_obj::<u32>(GuestAddress(IOVA + 0x1000)).unwrap();
    assert_eq!(detach(&d, 1, 1), Status::Ok);
    assert!(dm.read_obj::<u32>(GuestAddress(IOVA + 0x1000)).is_err());
}

#[test]
fn bypass_modes_in_the_iotlb() {
    let (d, mem, dm) = setup(true);
    mem.write_obj(0x55aa_u16, GuestAddress(0x7000)).unwrap();
    assert_eq!(dm.read_obj::<u16>(GuestAddress(0x7000)).unwrap(), 0x55aa);
    // Clearing bypass must drop the cached identity entries.
    d.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]);
    assert!(dm.read_obj::<u16>(GuestAddress(0x7000)).is_err());
    // A bypass domain is identity again; moving to a translated domain ends it.
    assert_eq!(
        attach_flags(&d, 1, 1, VIRTIO_IOMMU_ATTACH_F_BYPASS),
        Status::Ok
    );
    assert_eq!(dm.read_obj::<u16>(GuestAddress(0x7000)).unwrap(), 0x55aa);
    assert_eq!(attach(&d, 2, 1), Status::Ok);
    assert!(dm.read_obj::<u16>(GuestAddress(0x7000)).is_err());
}

#[test]
fn virtio_queue_is_translated() {
    let (d, mem, dm) = setup(false);
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    // Ring and buffers live at IOVAs backed by guest memory at 0x2_0000 and up.
    assert_eq!(map(&d, 1, IOVA, IOVA + 0xffff, 0x2_0000, RW), Status::Ok);
    mem.write_slice(b"hello", GuestAddress(0x2_8000)).unwrap();
    let vq = MockSplitQueue::create(&dm, GuestAddress(IOVA), 16);
    let desc = RawDescriptor::from(SplitDescriptor::new(IOVA + 0x8000, 5, 0, 0));
    vq.add_desc_chains(&[desc], 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(&dm).unwrap();
    let mut r = chain.clone().reader(&dm).unwrap();
    let mut buf = [0u8; 5];
    std::io::Read::read_exact(&mut r, &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    q.add_used(&dm, chain.head_index(), 0).unwrap();
    // Once the ring is unmapped the device cannot reach it any more.
    assert_eq!(unmap(&d, 1, IOVA, IOVA + 0xffff), Status::Ok);
    assert!(q.pop_descriptor_chain(&dm).is_none());
    assert!(q.add_used(&dm, 0, 0).is_err());
    assert!(d.pending_faults() > 0);
}

/// Entries in the endpoint's IOTLB, counted in the `Debug` form of a translation through it
/// (vm-memory's `Iotlb` has no length); `at` must translate.
fn iotlb_entries(iommu: &EndpointIommu, at: u64) -> usize {
    let it = iommu
        .translate(GuestAddress(at), 1, Permissions::Read)
        .unwrap();
    format!("{it:?}").matches("target_source_diff").count()
}

#[test]
fn bypass_accesses_do_not_grow_the_iotlb() {
    let (d, _mem, _dm) = setup(true);
    let iommu = EndpointIommu::new(d.clone(), 1).unwrap();
    // Accesses that never touch: each would be an entry of its own.
    for i in 0..1000u64 {
        iommu
            .translate(GuestAddress(i * 0x2000), 1, Permissions::Write)
            .unwrap();
    }
    assert_eq!(iotlb_entries(&iommu, 0), 1, "one identity entry");
    // The same through a bypass domain.
    assert_eq!(
        attach_flags(&d, 1, 1, VIRTIO_IOMMU_ATTACH_F_BYPASS),
        Status::Ok
    );
    for i in 0..1000u64 {
        iommu
            .translate(GuestAddress(i * 0x2000 + 0x1000), 1, Permissions::Read)
            .unwrap();
    }
    assert_eq!(iotlb_entries(&iommu, 0), 1, "one identity entry");
}

#[test]
fn the_iotlb_stays_bounded_with_many_mappings() {
    let (d, _mem, _dm) = setup(false);
    let iommu = EndpointIommu::new(d.clone(), 1).unwrap();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    // Mappings at every other page never merge in the IOTLB; MAP prefills the first 4096
    // and each access fills one more.
    const N: u64 = 40_000;
    for i in 0..N {
        let iova = IOVA + i * 0x2000;
        assert_eq!(map(&d, 1, iova, iova + 0xfff, 0x1000, RW), Status::Ok);
    }
    for i in 0..N {
        iommu
            .translate(GuestAddress(IOVA + i * 0x2000), 8, Permissions::Read)
            .unwrap();
    }
    let entries = iotlb_entries(&iommu, IOVA);
    assert!(
        entries <= virtio_iommu::IOTLB_MAX_ENTRIES,
        "{entries} IOTLB entries"
    );
}

#[test]
fn one_access_over_more_mappings_than_the_iotlb_holds_is_translated() {
    let (d, _mem, _dm) = setup(false);
    let iommu = EndpointIommu::new(d.clone(), 1).unwrap();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    // IOVA-contiguous pages all backed by the same guest page: nothing merges in the IOTLB.
    let pages = virtio_iommu::IOTLB_MAX_ENTRIES as u64;
    for i in 0..pages {
        let iova = IOVA + i * 0x1000;
        assert_eq!(map(&d, 1, iova, iova + 0xfff, 0x4000, RW), Status::Ok);
    }
    let pieces = iommu
        .translate(
            GuestAddress(IOVA),
            (pages * 0x1000) as usize,
            Permissions::Read,
        )
        .unwrap()
        .count();
    assert_eq!(pieces as u64, pages);
}

#[test]
fn a_removed_endpoint_keeps_nothing_in_its_iotlb() {
    let (d, mem, dm) = setup(true);
    mem.write_obj(0x55aa_u16, GuestAddress(0x7000)).unwrap();
    assert_eq!(dm.read_obj::<u16>(GuestAddress(0x7000)).unwrap(), 0x55aa);
    d.remove_endpoint(1).unwrap();
    assert!(dm.read_obj::<u16>(GuestAddress(0x7000)).is_err());
}

/// A transfer that translated before an UNMAP keeps the UNMAP from completing until its
/// data has moved: the guest may reuse the page as soon as UNMAP answers.
#[test]
fn unmap_completes_only_after_transfers_that_translated_before_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use virtio_iommu::{DmaFence, Footprint};

    let (d, mem, dm) = setup(false);
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(map(&d, 1, IOVA, IOVA + 0xfff, 0x4000, RW), Status::Ok);
    let elsewhere = IOVA + 0x10_0000;
    assert_eq!(
        map(&d, 1, elsewhere, elsewhere + 0xfff, 0x5000, RW),
        Status::Ok
    );
    // The device starts a transfer of 8 bytes at IOVA and translates its buffer...
    let transfer = dm.iommu().begin_dma(Footprint::of([(IOVA, 8)]));
    let slice = dm
        .get_slices(GuestAddress(IOVA), 8, Permissions::Write)
        .expect("mapped buffer translates")
        .next()
        .unwrap()
        .unwrap();
    let answered = Arc::new(AtomicBool::new(false));
    let unmapper = {
        let (d, answered) = (d.clone(), answered.clone());
        std::thread::spawn(move || {
            let status = unmap(&d, 1, IOVA, IOVA + 0xfff);
            answered.store(true, Ordering::SeqCst);
            status
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !answered.load(Ordering::SeqCst),
        "UNMAP answered while a transfer through the mapping was still moving data"
    );
    // An UNMAP of what the transfer does not touch is answered meanwhile.
    let (answer, other) = std::sync::mpsc::channel();
    let d2 = d.clone();
    std::thread::spawn(move || answer.send(unmap(&d2, 1, elsewhere, elsewhere + 0xfff)));
    assert_eq!(
        other.recv_timeout(Duration::from_secs(5)),
        Ok(Status::Ok),
        "a transfer held up the UNMAP of addresses it does not touch"
    );
    // ... and moves its data later, still into the page the guest granted.
    slice.write_obj(0x5a5a_5a5a_u32, 0).unwrap();
    assert_eq!(d.stats().requests_waited_for_dma, 0);
    drop(transfer);
    assert_eq!(unmapper.join().unwrap(), Status::Ok);
    assert_eq!(
        d.stats().requests_waited_for_dma,
        1,
        "the UNMAP that waited is counted, the one that did not is not"
    );
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x4000)).unwrap(),
        0x5a5a_5a5a
    );
    // Transfers that begin after the UNMAP see it.
    let _later = dm.iommu().begin_dma(Footprint::EVERYTHING);
    assert!(dm
        .get_slices(GuestAddress(IOVA), 8, Permissions::Write)
        .is_err());
}

/// Transfers are counted per endpoint: a transfer of one device that never ends (stuck on
/// the host) holds up UNMAPs of its own domain, and nobody else's.
#[test]
fn a_transfer_holds_up_only_its_own_endpoints_unmaps() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use virtio_iommu::{DmaFence, Footprint};

    let (d, _mem, dm) = setup(false);
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(attach(&d, 2, 2), Status::Ok);
    assert_eq!(map(&d, 1, IOVA, IOVA + 0xfff, 0x4000, RW), Status::Ok);
    assert_eq!(map(&d, 2, IOVA, IOVA + 0xfff, 0x8000, RW), Status::Ok);
    let stuck = dm.iommu().begin_dma(Footprint::EVERYTHING);
    // The other endpoint's domain unmaps at once (a thread, so that a wait fails the test
    // rather than hanging it).
    let (answer, other) = std::sync::mpsc::channel();
    let d2 = d.clone();
    std::thread::spawn(move || answer.send(unmap(&d2, 2, IOVA, IOVA + 0xfff)));
    assert_eq!(
        other.recv_timeout(Duration::from_secs(5)),
        Ok(Status::Ok),
        "another endpoint's transfer held up the UNMAP"
    );
    // Its own waits for the transfer.
    let answered = Arc::new(AtomicBool::new(false));
    let unmapper = {
        let (d, answered) = (d.clone(), answered.clone());
        std::thread::spawn(move || {
            let status = unmap(&d, 1, IOVA, IOVA + 0xfff);
            answered.store(true, Ordering::SeqCst);
            status
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!answered.load(Ordering::SeqCst));
    drop(stuck);
    assert_eq!(unmapper.join().unwrap(), Status::Ok);
}

/// A data path that keeps an IOTLB of its own (the kernel's vhost) is handed the block of
/// the mapping that serves an access (a page of the table here): where it starts and ends,
/// where it goes, its rights; bypass is one block over the whole space. An access outside
/// every mapping, or beyond its rights, gets nothing and is a fault like any other.
#[test]
fn an_external_iotlb_gets_whole_mappings() {
    use virtio_iommu::{FaultReason, MappedBlock, MappingLookup};
    let (d, _mem, dev_mem) = setup(true);
    let lookup = |iova, read, write| {
        let mut got = None;
        dev_mem
            .iommu()
            .with_mapping(iova, read, write, &mut |block| got = Some(block))
            .map(|()| got)
    };
    assert_eq!(
        lookup(0x1234, true, true),
        Ok(Some(MappedBlock {
            first: 0,
            last: u64::MAX,
            gpa: 0,
            read: true,
            write: true
        }))
    );
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(
        map(
            &d,
            1,
            IOVA,
            IOVA + 0x2fff,
            0x4_0000,
            VIRTIO_IOMMU_MAP_F_READ
        ),
        Status::Ok
    );
    let page = MappedBlock {
        first: IOVA + 0x1000,
        last: IOVA + 0x1fff,
        gpa: 0x4_1000,
        read: true,
        write: false,
    };
    assert_eq!(lookup(IOVA + 0x1800, true, false), Ok(Some(page)));
    let faults = d.domain_stats(1).unwrap().faults;
    assert_eq!(
        lookup(IOVA + 0x1800, false, true),
        Err(FaultReason::Mapping)
    );
    assert_eq!(
        lookup(IOVA + 0x3000, true, false),
        Err(FaultReason::Mapping)
    );
    assert_eq!(d.domain_stats(1).unwrap().faults, faults + 2);
}
