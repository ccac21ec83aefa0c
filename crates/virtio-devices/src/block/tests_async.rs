//! The asynchronous paths: requests in flight together, out-of-order completion, several
//! queues, FLUSH ordering, DISCARD and WRITE_ZEROES, O_DIRECT bounce buffers, the fallback
//! engine, and the IOMMU's guard over I/O in flight.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use super::inflight::{Started, BOUNCE_BUDGET};
use super::tests::{
    block, file_bytes, header, image, poison_status, requests, status, submit, DATA, HDR, STATUS,
};
use super::*;
use crate::test_utils::{guest_memory, iommu_memory, ro, wo, Driver, FakeInterrupt};

/// An image of `sectors` sectors, sector `n` filled with byte `n % 256`.
fn image_of(sectors: u64) -> TempFile {
    let temp = TempFile::new().unwrap();
    for sector in 0..sectors {
        temp.as_file()
            .write_all_at(&[sector as u8; 512], sector * SECTOR_SIZE)
            .unwrap();
    }
    temp
}

/// A DISCARD or WRITE_ZEROES segment at `addr`.
fn segment(mem: &GuestMemoryMmap, addr: u64, sector: u64, sectors: u32, flags: u32) {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&sector.to_le_bytes());
    bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
    bytes[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
}

/// A request that needs no I/O (GET_ID) completes before a read the driver made available
/// first: the used ring follows completion, not submission.
#[test]
fn completions_reach_the_used_ring_out_of_order() {
    let mem = guest_memory();
    let temp = image();
    let mut dev = block(mem.clone(), &temp, BlockOptions::default());
    assert_eq!(dev.engine_kind(), io_engine::EngineKind::IoUring);
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let id_hdr = HDR + 0x100;
    header(&mem, HDR, VIRTIO_BLK_T_IN, 5);
    header(&mem, id_hdr, VIRTIO_BLK_T_GET_ID, 0);
    let read = driver.add(&[ro(HDR, 16), wo(DATA, 4096), wo(STATUS, 1)]);
    let get_id = driver.add(&[ro(id_hdr, 16), wo(DATA + 0x2000, 20), wo(STATUS + 1, 1)]);
    let features = dev.features();
    let (_notifier, interrupt) = driver.activate(&mut dev, features);
    assert!(crate::test_utils::eventually(|| driver.used().len() == 2));
    assert_eq!(
        driver.used(),
        vec![(u32::from(get_id), 21), (u32::from(read), 4097)]
    );
    assert!(interrupt.count(0) >= 1);
    let mut data = vec![0u8; 4096];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(&data[..512], &[5; 512][..]);
    assert_eq!(&data[4096 - 512..], &[12; 512][..]);
    dev.reset();
}

/// A queue keeps a request per ring entry in the engine at once, and each completes with
/// its own data and status.
#[test]
fn many_requests_in_flight_on_one_queue() {
    let mem = guest_memory();
    let temp = image_of(64);
    let dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let mut requests = requests(&dev);
    for i in 0..32u64 {
        let (hdr, data, status_addr) = (HDR + i * 16, DATA + i * 512, STATUS + i);
        header(&mem, hdr, VIRTIO_BLK_T_IN, 63 - i);
        mem.write_obj(0xffu8, GuestAddress(status_addr)).unwrap();
        let chain = driver.chain(&[ro(hdr, 16), wo(data, 512), wo(status_addr, 1)]);
        assert_eq!(requests.start(&mem, &chain), Started::Queued);
    }
    assert_eq!(requests.in_flight(), 32);
    let mut done = Vec::new();
    requests.wait_all(&mem, |head, len| done.push((head, len)));
    assert_eq!(done.len(), 32);
    assert!(done.iter().all(|&(_, len)| len == 513));
    for i in 0..32u64 {
        assert_eq!(status(&mem, STATUS + i), VIRTIO_BLK_S_OK);
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(DATA + i * 512))
            .unwrap();
        assert_eq!(data, [(63 - i) as u8; 512], "request {i}");
    }
}

/// Two queues, each with its own thread: both serve requests, each interrupts for its own.
#[test]
fn every_queue_of_a_multi_queue_disk_serves_requests() {
    let mem = guest_memory();
    let temp = image();
    let options = BlockOptions {
        num_queues: 2,
        queue_size: 64,
        ..Default::default()
    };
    let mut dev = block(mem.clone(), &temp, options);
    assert_eq!(dev.queue_max_sizes(), &[64, 64]);
    assert_ne!(dev.features() & (1 << VIRTIO_BLK_F_MQ), 0);
    let mut num_queues = [0u8; 2];
    dev.read_config(config::NUM_QUEUES as u64, &mut num_queues);
    assert_eq!(u16::from_le_bytes(num_queues), 2);
    let single = block(mem.clone(), &temp, BlockOptions::default());
    assert_eq!(single.features() & (1 << VIRTIO_BLK_F_MQ), 0);

    let mut drivers = [Driver::new(&mem, 0, 64), Driver::new(&mem, 0x8000, 64)];
    let notifiers: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let interrupt = Arc::new(FakeInterrupt::default());
    dev.ack_features(dev.features());
    let queues = drivers
        .iter()
        .zip(&notifiers)
        .enumerate()
        .map(|(index, (driver, notifier))| ActivatedQueue {
            index,
            queue: driver.queue(),
            notifier: notifier.try_clone().unwrap(),
        })
        .collect();
    dev.activate(queues, interrupt.clone()).unwrap();
    for (q, driver) in drivers.iter_mut().enumerate() {
        let q = q as u64;
        let (hdr, data, status_addr) = (HDR + q * 16, DATA + q * 512, STATUS + q);
        mem.write_slice(&[0x70 + q as u8; 512], GuestAddress(data))
            .unwrap();
        header(&mem, hdr, VIRTIO_BLK_T_OUT, 8 + q);
        driver.add(&[ro(hdr, 16), ro(data, 512), wo(status_addr, 1)]);
        notifiers[q as usize].write(1).unwrap();
    }
    assert!(interrupt.wait_for(0, 1) && interrupt.wait_for(1, 1));
    for q in 0..2u64 {
        assert_eq!(drivers[q as usize].used().len(), 1, "queue {q}");
        assert_eq!(status(&mem, STATUS + q), VIRTIO_BLK_S_OK);
        assert_eq!(
            file_bytes(&temp, (8 + q) * 512, 512),
            vec![0x70 + q as u8; 512]
        );
    }
    dev.reset();
}

/// A FLUSH taken while an earlier write is in flight waits for it, then syncs: its
/// `fdatasync` comes after the write's data reached the file.
#[test]
fn a_flush_waits_for_the_writes_before_it() {
    let mem = guest_memory();
    let temp = image();
    let mut dev = block(mem.clone(), &temp, BlockOptions::default());
    dev.ack_features(1 << VIRTIO_BLK_F_FLUSH);
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let mut requests = requests(&dev);
    mem.write_slice(&[0x3c; 4096], GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let write = driver.chain(&[ro(HDR, 16), ro(DATA, 4096), wo(STATUS, 1)]);
    let write_head = write.head;
    assert_eq!(requests.start(&mem, &write), Started::Queued);
    header(&mem, HDR + 16, VIRTIO_BLK_T_FLUSH, 0);
    let flush = driver.chain(&[ro(HDR + 16, 16), wo(STATUS + 1, 1)]);
    let flush_head = flush.head;
    assert_eq!(requests.start(&mem, &flush), Started::Queued);
    assert_eq!(dev.disk.syncs(), 0, "the flush waits for the write");
    let mut order = Vec::new();
    requests.wait_all(&mem, |head, _| order.push(head));
    assert_eq!(order, vec![write_head, flush_head]);
    assert_eq!(dev.disk.syncs(), 1);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    assert_eq!(status(&mem, STATUS + 1), VIRTIO_BLK_S_OK);
    assert_eq!(file_bytes(&temp, 0, 4096), vec![0x3c; 4096]);
}

/// Whether `fd` becomes readable within `ms` milliseconds.
fn readable_within(fd: std::os::fd::RawFd, ms: i32) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, owned by this frame.
    unsafe { libc::poll(&mut poll, 1, ms) == 1 }
}

/// The worker's last steps on a notification are submit, then reap: a reap that finds the
/// write done releases the FLUSH parked behind it, and that FLUSH must reach the kernel with
/// nothing more from the worker but waiting on the completion fd. It once sat in io_uring's
/// submission queue, unsubmitted, and a Debian guest behind the IOMMU froze at shutdown: its
/// UNMAP waited for that FLUSH, which held its status byte's translation.
#[test]
fn a_flush_released_by_a_reap_reaches_the_engine() {
    let mem = guest_memory();
    let temp = image();
    let mut dev = block(mem.clone(), &temp, BlockOptions::default());
    dev.ack_features(1 << VIRTIO_BLK_F_FLUSH);
    assert_eq!(dev.engine_kind(), io_engine::EngineKind::IoUring);
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let mut requests = requests(&dev);
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let write = driver.chain(&[ro(HDR, 16), ro(DATA, 4096), wo(STATUS, 1)]);
    assert_eq!(requests.start(&mem, &write), Started::Queued);
    header(&mem, HDR + 16, VIRTIO_BLK_T_FLUSH, 0);
    let flush = driver.chain(&[ro(HDR + 16, 16), wo(STATUS + 1, 1)]);
    let flush_head = flush.head;
    assert_eq!(requests.start(&mem, &flush), Started::Queued);
    requests.submit();
    let fd = requests.completion_fd();
    assert!(readable_within(fd, 5000), "the write never completed");
    let mut done = Vec::new();
    assert_eq!(requests.reap(&mem, |head, _| done.push(head)), 1);
    assert!(
        readable_within(fd, 5000),
        "the released FLUSH never reached the kernel"
    );
    requests.reap(&mem, |head, _| done.push(head));
    assert_eq!(done.last(), Some(&flush_head));
    assert_eq!(status(&mem, STATUS + 1), VIRTIO_BLK_S_OK);
    assert_eq!(dev.disk.syncs(), 1);
}

/// DISCARD punches a hole (the image gives blocks back, as `fstrim` expects) and
/// WRITE_ZEROES zeroes; a range past the end, an overflowing sector, a count above the
/// maximum (whatever its size, one check), unknown flags and extra segments are refused
/// with the spec's status, the image untouched.
#[test]
fn discard_and_write_zeroes_within_bounds() {
    let mem = guest_memory();
    let temp = image_of(256);
    temp.as_file().sync_all().unwrap();
    let dev = block(mem.clone(), &temp, BlockOptions::default());
    let features = dev.features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let mut max = [0u8; 4];
    dev.read_config(config::MAX_DISCARD_SECTORS as u64, &mut max);
    assert_eq!(u32::from_le_bytes(max), MAX_DISCARD_SECTORS);
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let request = |driver: &mut Driver<GuestMemoryMmap>, kind, sector, sectors, flags| {
        header(&mem, HDR, kind, 0);
        segment(&mem, DATA, sector, sectors, flags);
        poison_status(&mem);
        let used = submit(
            &dev,
            driver,
            &mem,
            &[ro(HDR, 16), ro(DATA, 16), wo(STATUS, 1)],
        );
        assert_eq!(used, 1);
        status(&mem, STATUS)
    };

    let blocks_before = temp.as_file().metadata().unwrap().blocks();
    assert_eq!(
        request(&mut driver, VIRTIO_BLK_T_DISCARD, 64, 128, 0),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(file_bytes(&temp, 64 * 512, 128 * 512), vec![0; 128 * 512]);
    let blocks_after = temp.as_file().metadata().unwrap().blocks();
    assert!(
        blocks_after < blocks_before,
        "{blocks_after} < {blocks_before}"
    );
    assert_eq!(temp.as_file().metadata().unwrap().len(), 256 * 512);

    for flags in [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP] {
        assert_eq!(
            request(&mut driver, VIRTIO_BLK_T_WRITE_ZEROES, 8, 2, flags),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(file_bytes(&temp, 8 * 512, 1024), vec![0; 1024]);
        assert_eq!(file_bytes(&temp, 10 * 512, 512), vec![10; 512]);
    }

    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        for (sector, sectors, flags, expected) in [
            (255, 2, 0, VIRTIO_BLK_S_IOERR),
            (256, 1, 0, VIRTIO_BLK_S_IOERR),
            (u64::MAX, 1, 0, VIRTIO_BLK_S_IOERR),
            (u64::MAX / 256, 1, 0, VIRTIO_BLK_S_IOERR),
            (0, u32::MAX, 0, VIRTIO_BLK_S_IOERR),
            (0, MAX_DISCARD_SECTORS + 1, 0, VIRTIO_BLK_S_IOERR),
            (0, 1, 0x8000_0000, VIRTIO_BLK_S_UNSUPP),
        ] {
            assert_eq!(
                request(&mut driver, kind, sector, sectors, flags),
                expected,
                "type {kind} sector {sector} count {sectors} flags {flags:#x}"
            );
        }
    }
    // UNMAP means nothing to a discard.
    assert_eq!(
        request(
            &mut driver,
            VIRTIO_BLK_T_DISCARD,
            0,
            1,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        ),
        VIRTIO_BLK_S_UNSUPP
    );
    // Two segments, or a truncated one.
    for len in [32, 8] {
        header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        poison_status(&mem);
        submit(
            &dev,
            &mut driver,
            &mem,
            &[ro(HDR, 16), ro(DATA, len), wo(STATUS, 1)],
        );
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_UNSUPP, "{len} bytes");
    }
    assert_eq!(file_bytes(&temp, 0, 8 * 512), image_bytes(0..8));
    assert_eq!(file_bytes(&temp, 255 * 512, 512), vec![255; 512]);

    let readonly = block(
        mem.clone(),
        &temp,
        BlockOptions {
            readonly: true,
            ..Default::default()
        },
    );
    assert_eq!(readonly.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, DATA, 0, 1, 0);
    poison_status(&mem);
    submit(
        &readonly,
        &mut driver,
        &mem,
        &[ro(HDR, 16), ro(DATA, 16), wo(STATUS, 1)],
    );
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    assert_eq!(file_bytes(&temp, 0, 512), vec![0; 512]);
}

/// What `image_of` put in `sectors`.
fn image_bytes(sectors: std::ops::Range<u64>) -> Vec<u8> {
    sectors.flat_map(|s| [s as u8; 512]).collect()
}

/// With O_DIRECT, guest buffers the host cannot use go through an aligned bounce buffer
/// (filled before a write, copied out after a read); aligned ones are used directly. A
/// request needing more bounce memory than a queue may hold is refused.
#[test]
fn direct_io_bounces_unaligned_guest_buffers() {
    let mem = guest_memory();
    let temp = image_of(64);
    let options = BlockOptions {
        direct: true,
        ..Default::default()
    };
    let dev = block(mem.clone(), &temp, options);
    let alignment = dev.disk.direct_alignment.unwrap();
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let mut requests = requests(&dev);
    let unaligned = DATA + 3;
    let pattern: Vec<u8> = (0..alignment * 2).map(|i| (i % 241) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(unaligned)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 16);
    let len = pattern.len() as u32;
    let chain = driver.chain(&[
        ro(HDR, 16),
        ro(unaligned, 100),
        ro(unaligned + 100, len - 100),
        wo(STATUS, 1),
    ]);
    assert_eq!(requests.start(&mem, &chain), Started::Queued);
    assert_eq!(requests.bounce_bytes(), pattern.len());
    requests.wait_all(&mem, |_, _| {});
    assert_eq!(requests.bounce_bytes(), 0);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    assert_eq!(file_bytes(&temp, 16 * 512, pattern.len()), pattern);

    header(&mem, HDR, VIRTIO_BLK_T_IN, 16);
    let back = DATA + 0x8001;
    let chain = driver.chain(&[ro(HDR, 16), wo(back, len), wo(STATUS, 1)]);
    assert_eq!(requests.start(&mem, &chain), Started::Queued);
    requests.wait_all(&mem, |_, _| {});
    let mut read = vec![0u8; pattern.len()];
    mem.read_slice(&mut read, GuestAddress(back)).unwrap();
    assert_eq!(read, pattern);

    // Aligned: no bounce.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let chain = driver.chain(&[ro(HDR, 16), wo(DATA, alignment as u32), wo(STATUS, 1)]);
    assert_eq!(requests.start(&mem, &chain), Started::Queued);
    assert_eq!(requests.bounce_bytes(), 0);
    requests.wait_all(&mem, |_, _| {});
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);

    // More than the bounce budget (descriptors overlapping in guest RAM) on a large sparse
    // image: refused, guest memory untouched.
    temp.as_file().set_len(64 << 20).unwrap();
    let dev = block(
        mem.clone(),
        &temp,
        BlockOptions {
            direct: true,
            ..Default::default()
        },
    );
    // Clear of the header and the status byte.
    let (far, piece) = (0x4_0001, 0xb_0000u32);
    let count = BOUNCE_BUDGET / piece as usize + 1;
    mem.write_slice(&vec![0xa5; piece as usize], GuestAddress(far))
        .unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let mut descs = vec![ro(HDR, 16)];
    descs.extend((0..count).map(|_| wo(far, piece)));
    descs.push(wo(STATUS, 1));
    assert_eq!(submit(&dev, &mut driver, &mem, &descs), 1);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    let mut untouched = vec![0u8; piece as usize];
    mem.read_slice(&mut untouched, GuestAddress(far)).unwrap();
    assert!(untouched.iter().all(|&b| b == 0xa5));
}

/// Eight writes and a FLUSH made available at once, on the queue worker's thread: the FLUSH
/// waits for the writes, then syncs, and every request completes with that one notification.
fn writes_then_a_flush_complete_on_one_notification(kind: io_engine::EngineKind) {
    let mem = guest_memory();
    let temp = image();
    let mut dev = block(mem.clone(), &temp, BlockOptions::default());
    if kind == io_engine::EngineKind::Synchronous {
        *dev.engines[0].lock().unwrap() =
            io_engine::Engine::synchronous(Arc::clone(&dev.disk.file)).unwrap();
    }
    assert_eq!(dev.engine_kind(), kind);
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let (notifier, interrupt) = driver.activate(
        &mut dev,
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH),
    );
    for i in 0..8u64 {
        mem.write_slice(&[0x40 + i as u8; 512], GuestAddress(DATA + i * 512))
            .unwrap();
        header(&mem, HDR + i * 16, VIRTIO_BLK_T_OUT, i);
        driver.add(&[
            ro(HDR + i * 16, 16),
            ro(DATA + i * 512, 512),
            wo(STATUS + i, 1),
        ]);
    }
    header(&mem, HDR + 0x200, VIRTIO_BLK_T_FLUSH, 0);
    driver.add(&[ro(HDR + 0x200, 16), wo(STATUS + 8, 1)]);
    notifier.write(1).unwrap();
    assert!(interrupt.wait_for(0, 1));
    assert!(
        crate::test_utils::eventually(|| driver.used().len() == 9),
        "{kind:?}: {} of 9 requests completed",
        driver.used().len()
    );
    for i in 0..8u64 {
        assert_eq!(status(&mem, STATUS + i), VIRTIO_BLK_S_OK);
        assert_eq!(file_bytes(&temp, i * 512, 512), vec![0x40 + i as u8; 512]);
    }
    assert_eq!(status(&mem, STATUS + 8), VIRTIO_BLK_S_OK);
    assert_eq!(dev.disk.syncs(), 1);
    dev.reset();
}

/// The same on io_uring, whose writes complete while the worker sleeps or serves.
#[test]
fn the_queue_worker_serves_writes_then_a_flush() {
    writes_then_a_flush_complete_on_one_notification(io_engine::EngineKind::IoUring);
}

/// Where io_uring is refused, the synchronous engine serves the same queue worker: requests
/// complete, and a FLUSH still syncs.
#[test]
fn the_fallback_engine_serves_the_queue() {
    writes_then_a_flush_complete_on_one_notification(io_engine::EngineKind::Synchronous);
}

/// Long reads made available together are submitted and returned a batch at a time: with an
/// engine that completes inside the submission (the synchronous one here, io_uring on cached
/// pages), the driver hears of the first read before the second is copied, not of both at
/// once after both.
#[test]
fn long_reads_made_available_together_are_returned_a_batch_at_a_time() {
    const LEN: u32 = 256 << 10;
    const SECTORS: u64 = LEN as u64 / 512;
    let mem = guest_memory();
    let temp = image_of(2 * SECTORS);
    let mut dev = block(mem.clone(), &temp, BlockOptions::default());
    *dev.engines[0].lock().unwrap() =
        io_engine::Engine::synchronous(Arc::clone(&dev.disk.file)).unwrap();
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let data = [0x2_0000, 0x6_0000];
    for (i, at) in (0u64..).zip(data) {
        header(&mem, HDR + i * 16, VIRTIO_BLK_T_IN, i * SECTORS);
        driver.add(&[ro(HDR + i * 16, 16), wo(at, LEN), wo(HDR + 0x100 + i, 1)]);
    }
    let (_notifier, interrupt) = driver.activate(&mut dev, 1 << VIRTIO_F_VERSION_1);
    assert!(crate::test_utils::eventually(|| driver.used().len() == 2));
    assert!(
        crate::test_utils::eventually(|| interrupt.count(0) == 2),
        "{} interrupts for two batches",
        interrupt.count(0)
    );
    for (i, at) in (0u64..).zip(data) {
        assert_eq!(status(&mem, HDR + 0x100 + i), VIRTIO_BLK_S_OK);
        let (first, last) = (i * SECTORS, (i + 1) * SECTORS - 1);
        let mut sector = [0u8; 512];
        mem.read_slice(&mut sector, GuestAddress(at)).unwrap();
        assert_eq!(sector, [first as u8; 512]);
        mem.read_slice(&mut sector, GuestAddress(at + u64::from(LEN) - 512))
            .unwrap();
        assert_eq!(sector, [last as u8; 512]);
    }
    dev.reset();
}

/// Behind the IOMMU a request holds its DmaGuard until its I/O completed: an UNMAP (which
/// waits for earlier transfers) cannot complete while a read may still land in the buffer.
#[test]
fn an_unmap_waits_for_io_in_flight() {
    let mem = iommu_memory();
    mem.iommu()
        .map(0x1000_0000, 0x2_0000, 0x1_0000, Permissions::ReadWrite);
    let temp = image();
    let dev = block(
        mem.clone(),
        &temp,
        BlockOptions {
            access_platform: true,
            ..Default::default()
        },
    );
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let mut requests = requests(&dev);
    let (hdr, data, status_iova) = (0x1000_0000, 0x1000_1000, 0x1000_3000);
    header(&mem, hdr, VIRTIO_BLK_T_IN, 3);
    let chain = driver.chain(&[ro(hdr, 16), wo(data, 512), wo(status_iova, 1)]);
    assert_eq!(requests.start(&mem, &chain), Started::Queued);
    assert_eq!(mem.iommu().dma.in_flight(), 1);
    // The request touches its own buffers only: an UNMAP of the page after its status byte
    // (another request's, say) does not wait for it.
    mem.iommu()
        .dma
        .wait_for_earlier_touching(status_iova + 1, 0x1000_ffff);

    let unmapped = Arc::new(AtomicBool::new(false));
    let unmap = {
        let (dma, unmapped) = (Arc::clone(&mem.iommu().dma), Arc::clone(&unmapped));
        std::thread::spawn(move || {
            dma.wait_for_earlier_touching(data + 511, data + 0xfff);
            unmapped.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !unmapped.load(Ordering::SeqCst),
        "UNMAP completed with a read in flight"
    );
    requests.wait_all(&mem, |_, _| {});
    unmap.join().unwrap();
    assert!(unmapped.load(Ordering::SeqCst));
    assert_eq!(mem.iommu().dma.in_flight(), 0);
    let mut read = [0u8; 512];
    mem.get_backend()
        .read_slice(&mut read, GuestAddress(0x2_1000))
        .unwrap();
    assert_eq!(read, [3; 512]);
}

/// Carries out a DISCARD (or with `zero` a WRITE_ZEROES) of sectors 8..16 through `requests`,
/// the way a worker does; returns the used length and the status.
fn discard(
    dev: &Block<GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    driver: &mut Driver<GuestMemoryMmap>,
    zero: bool,
) -> (u32, u32) {
    let kind = if zero {
        VIRTIO_BLK_T_WRITE_ZEROES
    } else {
        VIRTIO_BLK_T_DISCARD
    };
    header(mem, HDR, kind, 0);
    segment(mem, DATA, 8, 8, 0);
    poison_status(mem);
    let used = submit(
        dev,
        driver,
        mem,
        &[ro(HDR, 16), ro(DATA, 16), wo(STATUS, 1)],
    );
    (used, status(mem, STATUS))
}

/// Without FLUSH (or with the driver's write-through) every request that changes the image
/// is stable when it completes: DISCARD and WRITE_ZEROES get their `fdatasync` as writes
/// do; under write-back they wait for the driver's FLUSH.
#[test]
fn discard_and_write_zeroes_are_stable_on_completion_under_write_through() {
    for zero in [false, true] {
        let mem = guest_memory();
        let temp = image_of(64);
        let mut dev = block(mem.clone(), &temp, BlockOptions::default());
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        let syncs = |dev: &Block<GuestMemoryMmap>| dev.disk.syncs();

        dev.ack_features(1 << VIRTIO_F_VERSION_1);
        assert_eq!(discard(&dev, &mem, &mut driver, zero), (1, VIRTIO_BLK_S_OK));
        assert_eq!(syncs(&dev), 1, "write-through, zero={zero}");
        assert_eq!(file_bytes(&temp, 8 * 512, 4096), vec![0; 4096]);

        dev.ack_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH);
        assert_eq!(discard(&dev, &mem, &mut driver, zero), (1, VIRTIO_BLK_S_OK));
        assert_eq!(syncs(&dev), 1, "write-back, zero={zero}");
    }
}

/// A FLUSH taken while a DISCARD is in flight waits for it as it waits for writes: the
/// hole is in the file before the `fdatasync` that makes it stable.
#[test]
fn a_flush_waits_for_a_discard_before_it() {
    let mem = guest_memory();
    let temp = image_of(64);
    let mut dev = block(mem.clone(), &temp, BlockOptions::default());
    dev.ack_features(1 << VIRTIO_BLK_F_FLUSH);
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let mut requests = requests(&dev);
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, DATA, 8, 8, 0);
    let discard = driver.chain(&[ro(HDR, 16), ro(DATA, 16), wo(STATUS, 1)]);
    let discard_head = discard.head;
    assert_eq!(requests.start(&mem, &discard), Started::Queued);
    header(&mem, HDR + 16, VIRTIO_BLK_T_FLUSH, 0);
    let flush = driver.chain(&[ro(HDR + 16, 16), wo(STATUS + 1, 1)]);
    let flush_head = flush.head;
    assert_eq!(requests.start(&mem, &flush), Started::Queued);
    assert_eq!(dev.disk.syncs(), 0, "parked");
    let mut order = Vec::new();
    requests.wait_all(&mem, |head, _| order.push(head));
    assert_eq!(order, vec![discard_head, flush_head]);
}

/// Behind the IOMMU, what moves no guest data while in flight holds no guard: a FLUSH (or a
/// DISCARD, a WRITE_ZEROES) on a slow host holds up no UNMAP. Its status byte is
/// translated again to complete, and one the driver took away meanwhile is not written.
#[test]
fn requests_that_move_no_guest_data_hold_no_guard_in_flight() {
    let mem = iommu_memory();
    mem.iommu()
        .map(0x1000_0000, 0x2_0000, 0x1_0000, Permissions::ReadWrite);
    let temp = image();
    let mut dev = block(
        mem.clone(),
        &temp,
        BlockOptions {
            access_platform: true,
            ..Default::default()
        },
    );
    dev.ack_features(dev.features());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let mut requests = requests(&dev);
    let (hdr, segment_iova, status_iova) = (0x1000_0000, 0x1000_0100, 0x1000_3000);
    header(&mem, hdr, VIRTIO_BLK_T_FLUSH, 0);
    mem.write_obj(0xffu8, GuestAddress(status_iova)).unwrap();
    let flush = driver.chain(&[ro(hdr, 16), wo(status_iova, 1)]);
    assert_eq!(requests.start(&mem, &flush), Started::Queued);
    assert_eq!(mem.iommu().dma.in_flight(), 0, "a FLUSH holds no guard");
    requests.wait_all(&mem, |_, len| assert_eq!(len, 1));
    assert_eq!(status(&mem, status_iova), VIRTIO_BLK_S_OK);

    header(&mem, hdr, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&2u64.to_le_bytes());
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(segment_iova)).unwrap();
    let zeroes = driver.chain(&[ro(hdr, 16), ro(segment_iova, 16), wo(status_iova, 1)]);
    assert_eq!(requests.start(&mem, &zeroes), Started::Queued);
    assert_eq!(
        mem.iommu().dma.in_flight(),
        0,
        "a WRITE_ZEROES holds no guard"
    );
    // The driver takes the status byte's page away while the zeroing is in flight.
    mem.iommu()
        .map(0x1000_3000, 0x2_3000, 0x1000, Permissions::No);
    requests.wait_all(&mem, |_, len| assert_eq!(len, 0, "no status written"));
    assert_eq!(
        mem.get_backend()
            .read_obj::<u8>(GuestAddress(0x2_3000))
            .unwrap(),
        VIRTIO_BLK_S_OK as u8,
        "the old status stays"
    );
    assert_eq!(file_bytes(&temp, 2 * 512, 1024), vec![0; 1024]);
}

/// A wait for I/O in flight that fails (the kernel refused `io_uring_enter`) does not end a
/// drain with the requests' guards leaked, which would hold up every later UNMAP of the
/// device for good: the drain looks again until the kernel is done, then lets them go.
#[test]
fn a_drain_whose_wait_fails_still_ends_with_every_guard_released() {
    let mem = iommu_memory();
    mem.iommu()
        .map(0x1000_0000, 0x2_0000, 0x1_0000, Permissions::ReadWrite);
    let temp = image();
    let dev = block(
        mem.clone(),
        &temp,
        BlockOptions {
            access_platform: true,
            ..Default::default()
        },
    );
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let mut requests = requests(&dev);
    header(&mem, 0x1000_0000, VIRTIO_BLK_T_IN, 3);
    let chain = driver.chain(&[
        ro(0x1000_0000, 16),
        wo(0x1000_1000, 512),
        wo(0x1000_3000, 1),
    ]);
    assert_eq!(requests.start(&mem, &chain), Started::Queued);
    requests.submit();
    assert_eq!(mem.iommu().dma.in_flight(), 1);
    let mut failures = 3;
    requests.drain_with(|engine, completions| {
        if failures > 0 {
            failures -= 1;
            return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
        }
        engine.wait(completions)
    });
    assert_eq!(mem.iommu().dma.in_flight(), 0, "guards released");
    assert_eq!(requests.in_flight(), 0);
}

/// tmpfs (and NFS) have no `FALLOC_FL_ZERO_RANGE`: a WRITE_ZEROES without UNMAP there punches
/// a hole instead, which reads back as zeroes just the same, rather than failing with IOERR.
#[test]
fn write_zeroes_on_a_file_system_without_zero_range_punches_a_hole() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm here: skipped");
        return;
    }
    let temp = TempFile::new_in(shm).unwrap();
    for sector in 0..64u64 {
        temp.as_file()
            .write_all_at(&[0xab; 512], sector * SECTOR_SIZE)
            .unwrap();
    }
    for engine in [
        io_engine::EngineKind::IoUring,
        io_engine::EngineKind::Synchronous,
    ] {
        let mem = guest_memory();
        let mut dev = block(mem.clone(), &temp, BlockOptions::default());
        if engine == io_engine::EngineKind::Synchronous {
            dev.engines[0] = Arc::new(std::sync::Mutex::new(
                io_engine::Engine::synchronous(Arc::clone(&dev.disk.file)).unwrap(),
            ));
        }
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&mem, DATA, 8, 8, 0);
        poison_status(&mem);
        let used = submit(
            &dev,
            &mut driver,
            &mem,
            &[ro(HDR, 16), ro(DATA, 16), wo(STATUS, 1)],
        );
        assert_eq!(
            (used, status(&mem, STATUS)),
            (1, VIRTIO_BLK_S_OK),
            "{engine:?}"
        );
        assert_eq!(
            file_bytes(&temp, 8 * 512, 4096),
            vec![0; 4096],
            "{engine:?}"
        );
        assert_eq!(file_bytes(&temp, 16 * 512, 512), vec![0xab; 512]);
        temp.as_file().write_all_at(&[0xab; 4096], 8 * 512).unwrap();
    }
}

/// A driver that notifies only when the device asks for it (past `avail_event` with
/// EVENT_IDX, or while `VRING_USED_F_NO_NOTIFY` is clear without), as Linux's does, keeping 16
/// reads in flight: the device asks for no notification while reads are in flight and takes
/// what came meanwhile once they complete, so no request is ever left on the ring.
fn a_driver_that_notifies_only_when_asked_is_never_stranded(event_idx: bool) {
    const TOTAL: u16 = 600;
    const DEPTH: u16 = 16;
    let mem = guest_memory();
    let temp = image_of(64);
    let mut dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let features = (1 << VIRTIO_F_VERSION_1)
        | if event_idx {
            1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX
        } else {
            0
        };
    let (notifier, _interrupt) = driver.activate(&mut dev, features);
    let (mut submitted, mut notifications) = (0u16, 0u32);
    let mut last_progress = (0, std::time::Instant::now());
    loop {
        let completed = driver.used().len() as u16;
        if completed == TOTAL {
            break;
        }
        if completed != last_progress.0 {
            last_progress = (completed, std::time::Instant::now());
        }
        assert!(
            last_progress.1.elapsed() < Duration::from_secs(5),
            "event_idx {event_idx}: {} requests stranded on the ring ({completed} of \
             {submitted} completed, {notifications} notifications)",
            submitted - completed
        );
        if submitted == TOTAL || submitted - completed == DEPTH {
            std::thread::yield_now();
            continue;
        }
        let slot = u64::from(submitted % 64);
        let (hdr, data, status_at) = (HDR + slot * 16, DATA + slot * 512, STATUS + slot);
        header(&mem, hdr, VIRTIO_BLK_T_IN, u64::from(submitted % 64));
        let old = driver.avail_idx();
        driver.add(&[ro(hdr, 16), wo(data, 512), wo(status_at, 1)]);
        submitted += 1;
        let new = driver.avail_idx();
        let asked = if event_idx {
            let event = driver.avail_event();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            driver.used_flags() & virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if asked {
            notifier.write(1).unwrap();
            notifications += 1;
        }
    }
    assert!(driver.used().iter().all(|&(_, len)| len == 513));
    dev.reset();
}

#[test]
fn a_driver_notifying_only_when_asked_is_never_stranded_with_event_idx() {
    a_driver_that_notifies_only_when_asked_is_never_stranded(true);
}

#[test]
fn a_driver_notifying_only_when_asked_is_never_stranded_without_event_idx() {
    a_driver_that_notifies_only_when_asked_is_never_stranded(false);
}
