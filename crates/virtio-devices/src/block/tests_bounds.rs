//! What a driver can make one queue hold or do: `SEG_MAX` descriptors per request, indirect
//! tables only when negotiated, a bounded number of guest segments in flight however the
//! buffers are fragmented, and a bounded number of chains per call however full the ring is
//! kept.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use vm_memory::{Bytes, GuestAddress, Permissions};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use super::inflight::{Requests, Started, SEGMENT_BUDGET};
use super::queue::QueueWorker;
use super::tests::{block, header, image, status, DATA, HDR, STATUS};
use super::*;
use crate::device_queue::{DeviceQueue, Served};
use crate::test_utils::{guest_memory, iommu_memory, ro, wo, Desc, Driver, FakeInterrupt};
use crate::worker::Poller;

/// `SEG_MAX` (the queue size less the header and status, here 6) is what a request may have,
/// through an indirect table too: one more data segment and the chain goes back unused, its
/// status byte untouched and no data moved.
#[test]
fn seg_max_is_enforced() {
    let mem = guest_memory();
    let temp = image();
    let options = BlockOptions {
        queue_size: 8,
        ..Default::default()
    };
    let mut dev = block(mem.clone(), &temp, options);
    let mut seg_max = [0u8; 4];
    dev.read_config(config::SEG_MAX as u64, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), 6);
    let mut driver = Driver::new(&mem, 0, 8);
    let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC;
    let (notifier, interrupt) = driver.activate(&mut dev, features);
    let request = |segments: u64| -> Vec<Desc> {
        let mut descs = vec![ro(HDR, 16)];
        descs.extend((0..segments).map(|i| wo(DATA + i * 512, 512)));
        descs.push(wo(STATUS, 1));
        descs
    };
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    mem.write_slice(&[0xee; 7 * 512], GuestAddress(DATA))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let too_long = driver.add_indirect(0x4_0000, &request(7));
    notifier.write(1).unwrap();
    assert!(interrupt.wait_for(0, 1));
    assert_eq!(driver.used(), [(u32::from(too_long), 0)]);
    assert_eq!(status(&mem, STATUS), 0xff, "the status byte is untouched");
    let mut data = [0u8; 512];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0xee; 512], "no data moved");

    let fits = driver.add_indirect(0x4_1000, &request(6));
    notifier.write(1).unwrap();
    assert!(interrupt.wait_for(0, 2));
    assert_eq!(driver.used()[1], (u32::from(fits), 6 * 512 + 1));
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    dev.reset();
}

/// A driver that maps each page of its buffers on its own (consecutive I/O addresses, scattered
/// guest pages) makes each request hold a segment per page. The queue holds at most
/// [`SEGMENT_BUDGET`] of them in flight: a request beyond that waits for room (the chain
/// goes back to the ring) instead of growing what the host holds with the queue's depth.
#[test]
fn segments_in_flight_are_bounded_whatever_the_fragmentation() {
    const PAGES: u64 = 256;
    let mem = iommu_memory();
    let iova = 0x1000_0000;
    for page in 0..PAGES {
        // Every other guest page: no two pages of the buffer are contiguous.
        let gpa = 0x2_0000 + (page % 2) * 0x2000;
        mem.iommu()
            .map(iova + page * 0x1000, gpa, 0x1000, Permissions::ReadWrite);
    }
    mem.iommu()
        .map(0x2000_0000, 0x4_0000, 0x1_0000, Permissions::ReadWrite);
    let temp = TempFile::new().unwrap();
    temp.as_file().set_len(PAGES * 0x1000).unwrap();
    let depth = 512;
    let dev = block(
        mem.clone(),
        &temp,
        BlockOptions {
            access_platform: true,
            queue_size: depth,
            ..Default::default()
        },
    );
    let mut driver = Driver::new(&mem, 0, depth);
    let mut requests = Requests::new(
        Arc::clone(&dev.disk),
        Arc::clone(&dev.engines[0]),
        depth,
        Arc::clone(&dev.counters),
    );
    let fits = SEGMENT_BUDGET as u64 / PAGES;
    for i in 0..=fits {
        let (hdr, status_at) = (0x2000_0000 + i * 16, 0x2000_8000 + i);
        header(&mem, hdr, VIRTIO_BLK_T_IN, 0);
        let chain = driver.chain(&[
            ro(hdr, 16),
            wo(iova, (PAGES * 0x1000) as u32),
            wo(status_at, 1),
        ]);
        let expected = if i < fits {
            Started::Queued
        } else {
            Started::NoRoom
        };
        assert_eq!(requests.start(&mem, &chain), expected, "request {i}");
    }
    assert_eq!(requests.segments(), SEGMENT_BUDGET);
    let mut done = 0;
    requests.wait_all(&mem, |_, len| {
        assert_eq!(len, (PAGES * 0x1000) as u32 + 1);
        done += 1;
    });
    assert_eq!(done, fits);
    assert_eq!(requests.segments(), 0);
}

/// However many chains the driver keeps available, one call takes at most its budget of
/// them and has the worker come back (the queue's notifier is written), so that a stop
/// request is seen in between.
#[test]
fn a_call_takes_at_most_its_budget_of_chains() {
    let mem = guest_memory();
    let temp = image();
    let mut dev = block(mem.clone(), &temp, BlockOptions::default());
    dev.ack_features(1 << VIRTIO_F_VERSION_1);
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let heads: Vec<u16> = (0..4u64)
        .map(|i| {
            header(&mem, HDR + 16 * i, VIRTIO_BLK_T_GET_ID, 0);
            driver.add(&[
                ro(HDR + 16 * i, 16),
                wo(DATA + 32 * i, 20),
                wo(STATUS + i, 1),
            ])
        })
        .collect();
    let mut worker = QueueWorker {
        mem: mem.clone(),
        queue: DeviceQueue::new(0, driver.queue(), 0, Arc::new(FakeInterrupt::default())),
        requests: Requests::new(
            Arc::clone(&dev.disk),
            Arc::clone(&dev.engines[0]),
            QUEUE_SIZE,
            Arc::clone(&dev.counters),
        ),
    };
    let epoll = Epoll::new().unwrap();
    let notifier = EventFd::new(EFD_NONBLOCK).unwrap();
    let notifiers = [(0, notifier.try_clone().unwrap())];
    let poller = Poller::with_notifiers(&epoll, &notifiers);
    assert_eq!(worker.serve_at_most(&poller, 2), Served::Budget);
    assert_eq!(driver.used().len(), 2);
    assert_eq!(
        notifier.read().unwrap(),
        1,
        "the worker comes back to the queue"
    );
    assert_eq!(worker.serve_at_most(&poller, 4), Served::All);
    let used: Vec<u32> = driver.used().iter().map(|&(head, _)| head).collect();
    assert_eq!(
        used,
        heads.iter().map(|&h| u32::from(h)).collect::<Vec<_>>()
    );
    assert!(notifier.read().is_err(), "nothing left to come back for");
}
