//! The disk's counters as the VMM reads them (`VirtioDevice::counters`): what completed adds
//! its bytes and one operation, what failed adds nothing, and every queue feeds one set.

use std::collections::BTreeMap;
use std::fs::OpenOptions;

use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::tests::{block, header, image, poison_status, status, submit, DATA, HDR, STATUS};
use super::*;
use crate::test_utils::{guest_memory, ro, wo, Driver, FakeInterrupt};

/// The counters `dev` gives the VMM, by name.
fn counters<M: DeviceMemory>(dev: &Block<M>) -> BTreeMap<&'static str, u64> {
    dev.counters()
        .expect("a disk counts")
        .read()
        .into_iter()
        .collect()
}

/// A request of `kind` at `sector` with `data` as its data descriptor (readable for writes
/// and segments, writable for reads); returns the status.
fn request(
    dev: &Block<GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    driver: &mut Driver<GuestMemoryMmap>,
    kind: u32,
    sector: u64,
    data: Option<(u32, bool)>,
) -> u32 {
    header(mem, HDR, kind, sector);
    poison_status(mem);
    let mut descs = vec![ro(HDR, 16)];
    match data {
        Some((len, true)) => descs.push(wo(DATA, len)),
        Some((len, false)) => descs.push(ro(DATA, len)),
        None => {}
    }
    descs.push(wo(STATUS, 1));
    submit(dev, driver, mem, &descs);
    status(mem, STATUS)
}

/// A DISCARD or WRITE_ZEROES segment of `sectors` at sector 0, at `DATA`.
fn segment(mem: &GuestMemoryMmap, sectors: u32) {
    let mut bytes = [0u8; 16];
    bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
}

#[test]
fn completed_requests_add_their_bytes_and_one_operation_each() {
    let mem = guest_memory();
    let temp = image();
    let dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    assert!(
        counters(&dev).values().all(|&v| v == 0),
        "{:?}",
        counters(&dev)
    );

    let read = request(
        &dev,
        &mem,
        &mut driver,
        VIRTIO_BLK_T_IN,
        2,
        Some((1024, true)),
    );
    assert_eq!(read, VIRTIO_BLK_S_OK);
    let read = request(
        &dev,
        &mem,
        &mut driver,
        VIRTIO_BLK_T_IN,
        0,
        Some((512, true)),
    );
    assert_eq!(read, VIRTIO_BLK_S_OK);
    let write = request(
        &dev,
        &mem,
        &mut driver,
        VIRTIO_BLK_T_OUT,
        4,
        Some((2048, false)),
    );
    assert_eq!(write, VIRTIO_BLK_S_OK);
    assert_eq!(
        request(&dev, &mem, &mut driver, VIRTIO_BLK_T_FLUSH, 0, None),
        VIRTIO_BLK_S_OK
    );
    segment(&mem, 2);
    let discard = request(
        &dev,
        &mem,
        &mut driver,
        VIRTIO_BLK_T_DISCARD,
        0,
        Some((16, false)),
    );
    assert_eq!(discard, VIRTIO_BLK_S_OK);
    let zeroes = request(
        &dev,
        &mem,
        &mut driver,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        Some((16, false)),
    );
    assert_eq!(zeroes, VIRTIO_BLK_S_OK);
    // GET_ID moves nothing between the image and the guest.
    let get_id = request(
        &dev,
        &mem,
        &mut driver,
        VIRTIO_BLK_T_GET_ID,
        0,
        Some((20, true)),
    );
    assert_eq!(get_id, VIRTIO_BLK_S_OK);

    assert_eq!(
        counters(&dev),
        BTreeMap::from([
            ("read_bytes", 1536),
            ("read_ops", 2),
            ("write_bytes", 2048),
            ("write_ops", 1),
            ("flush_ops", 1),
            ("discard_ops", 1),
            ("write_zeroes_ops", 1),
            // Write-through (no FLUSH negotiated): the write, the discard and the zeroing are
            // each made stable, and the FLUSH syncs too.
            ("host_syncs", 4),
        ])
    );
}

/// Refused requests (beyond the disk, unaligned, a write to a read-only disk, an unknown
/// type) and requests the host failed add nothing.
#[test]
fn failed_requests_add_nothing() {
    let mem = guest_memory();
    let temp = image();
    let dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let beyond = request(
        &dev,
        &mem,
        &mut driver,
        VIRTIO_BLK_T_IN,
        15,
        Some((1024, true)),
    );
    assert_eq!(beyond, VIRTIO_BLK_S_IOERR);
    let unaligned = request(
        &dev,
        &mem,
        &mut driver,
        VIRTIO_BLK_T_OUT,
        0,
        Some((100, false)),
    );
    assert_eq!(unaligned, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        request(&dev, &mem, &mut driver, 0xff, 0, None),
        VIRTIO_BLK_S_UNSUPP
    );
    let readonly = block(
        mem.clone(),
        &temp,
        BlockOptions {
            readonly: true,
            ..Default::default()
        },
    );
    let refused = request(
        &readonly,
        &mem,
        &mut driver,
        VIRTIO_BLK_T_OUT,
        0,
        Some((512, false)),
    );
    assert_eq!(refused, VIRTIO_BLK_S_IOERR);

    // An image the host opened read-only behind a disk that offers writes: the engine fails
    // each write (EBADF) after the request was taken.
    let file = OpenOptions::new().read(true).open(temp.as_path()).unwrap();
    let failing = Block::new(mem.clone(), file, BlockOptions::default()).unwrap();
    let failed = request(
        &failing,
        &mem,
        &mut driver,
        VIRTIO_BLK_T_OUT,
        0,
        Some((512, false)),
    );
    assert_eq!(failed, VIRTIO_BLK_S_IOERR);

    for dev in [&dev, &readonly, &failing] {
        assert!(
            counters(dev).values().all(|&v| v == 0),
            "{:?}",
            counters(dev)
        );
    }
    // The read-only disk still counts what it serves.
    let read = request(
        &readonly,
        &mem,
        &mut driver,
        VIRTIO_BLK_T_IN,
        0,
        Some((512, true)),
    );
    assert_eq!(read, VIRTIO_BLK_S_OK);
    assert_eq!(counters(&readonly)["read_bytes"], 512);
}

/// Under write-through (a driver without FLUSH) a write is counted once it is stable.
#[test]
fn a_write_through_write_counts_once() {
    let mem = guest_memory();
    let temp = image();
    let mut dev = block(mem.clone(), &temp, BlockOptions::default());
    dev.ack_features(0);
    assert!(!dev.disk.writeback());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let write = request(
        &dev,
        &mem,
        &mut driver,
        VIRTIO_BLK_T_OUT,
        1,
        Some((512, false)),
    );
    assert_eq!(write, VIRTIO_BLK_S_OK);
    let counted = counters(&dev);
    assert_eq!((counted["write_ops"], counted["write_bytes"]), (1, 512));
    assert_eq!(counted["flush_ops"], 0, "the write's own sync is no FLUSH");
}

/// Each queue of a multi-queue disk has its own thread; all of them add to the disk's one
/// set of counters.
#[test]
fn every_queue_feeds_the_one_set_of_counters() {
    let mem = guest_memory();
    let temp = image();
    let options = BlockOptions {
        num_queues: 3,
        queue_size: 64,
        ..Default::default()
    };
    let mut dev = block(mem.clone(), &temp, options);
    let mut drivers: Vec<_> = (0..3u64)
        .map(|q| Driver::new(&mem, q * 0x4000, 64))
        .collect();
    let notifiers: Vec<EventFd> = (0..3)
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
        let q64 = q as u64;
        let (hdr, data, status_addr) = (HDR + q64 * 16, DATA + q64 * 0x1000, STATUS + q64);
        header(&mem, hdr, VIRTIO_BLK_T_IN, q64);
        // Queue q reads q + 1 sectors.
        driver.add(&[
            ro(hdr, 16),
            wo(data, 512 * (q as u32 + 1)),
            wo(status_addr, 1),
        ]);
        notifiers[q].write(1).unwrap();
    }
    for q in 0..3 {
        assert!(interrupt.wait_for(q, 1), "queue {q}");
    }
    let counted = counters(&dev);
    assert_eq!(counted["read_ops"], 3);
    assert_eq!(counted["read_bytes"], 512 * (1 + 2 + 3));
    dev.reset();
    assert_eq!(counters(&dev)["read_ops"], 3, "kept across a reset");
}
