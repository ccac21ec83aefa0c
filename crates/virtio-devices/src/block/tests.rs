use std::os::unix::fs::FileExt;
use std::thread;
use std::time::Duration;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::tempfile::TempFile;

use super::inflight::Started;
use super::*;
use crate::test_utils::{guest_memory, iommu_memory, ro, wo, Desc, Driver, FakeInterrupt};

pub(super) const HDR: u64 = 0x1_0000;
pub(super) const DATA: u64 = 0x2_0000;
pub(super) const STATUS: u64 = 0x3_0000;
pub(super) const DISK_SECTORS: u64 = 16;

/// A 16-sector image whose sector `n` is filled with byte `n`.
pub(super) fn image() -> TempFile {
    let temp = TempFile::new().unwrap();
    for sector in 0..DISK_SECTORS {
        temp.as_file()
            .write_all_at(&[sector as u8; 512], sector * SECTOR_SIZE)
            .unwrap();
    }
    temp
}

pub(super) fn block<M: DeviceMemory>(mem: M, temp: &TempFile, options: BlockOptions) -> Block<M> {
    Block::new(mem, temp.as_file().try_clone().unwrap(), options).unwrap()
}

pub(super) fn header<M: GuestMemory>(mem: &M, addr: u64, request_type: u32, sector: u64) {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&request_type.to_le_bytes());
    bytes[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
}

pub(super) fn status<M: GuestMemory>(mem: &M, addr: u64) -> u32 {
    u32::from(mem.read_obj::<u8>(GuestAddress(addr)).unwrap())
}

/// Carries out one request the way a queue's worker does, waiting for its I/O; returns the
/// length the used ring gets.
pub(super) fn submit<M: DeviceMemory>(
    dev: &Block<M>,
    driver: &mut Driver<M>,
    mem: &M,
    descs: &[Desc],
) -> u32 {
    let chain = driver.chain(descs);
    let mut requests = requests(dev);
    match requests.start(mem, &chain) {
        Started::Done(_, len) => len,
        Started::Queued => {
            let mut used = None;
            requests.wait_all(mem, |_, len| used = Some(len));
            used.expect("the request completed")
        }
        Started::NoRoom => panic!("no room for one request"),
    }
}

/// The in-flight table of `dev`'s first queue.
pub(super) fn requests<M>(dev: &Block<M>) -> Requests {
    Requests::new(
        Arc::clone(&dev.disk),
        Arc::clone(&dev.engines[0]),
        QUEUE_SIZE,
        Arc::clone(&dev.counters),
    )
}

/// Reads the image through a file of its own: the device's file is a dup of `temp`'s, so with
/// `direct` its O_DIRECT would apply to `temp`'s reads too, and refuse unaligned buffers.
pub(super) fn file_bytes(temp: &TempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    std::fs::File::open(temp.as_path())
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Writes 0xFF over the status byte so a test sees whether the device wrote it.
pub(super) fn poison_status<M: GuestMemory>(mem: &M) {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

#[test]
fn write_then_read_back_across_split_buffers() {
    let mem = guest_memory();
    let temp = image();
    let dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[
            ro(HDR, 16),
            ro(DATA, 300),
            ro(DATA + 300, 724),
            wo(STATUS, 1),
        ],
    );
    assert_eq!(used, 1);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    assert_eq!(file_bytes(&temp, 3 * 512, 1024), pattern);
    // Neighbouring sectors are untouched.
    assert_eq!(file_bytes(&temp, 2 * 512, 512), vec![2; 512]);
    assert_eq!(file_bytes(&temp, 5 * 512, 512), vec![5; 512]);

    let back = DATA + 0x1000;
    header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    poison_status(&mem);
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[
            ro(HDR, 16),
            wo(back, 100),
            wo(back + 100, 900),
            wo(back + 1000, 24),
            wo(STATUS, 1),
        ],
    );
    assert_eq!(used, 1024 + 1);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    let mut read = vec![0u8; 1024];
    mem.read_slice(&mut read, GuestAddress(back)).unwrap();
    assert_eq!(read, pattern);
}

#[test]
fn header_split_across_descriptors_and_status_sharing_the_data_buffer() {
    let mem = guest_memory();
    let temp = image();
    let dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

    header(&mem, HDR, VIRTIO_BLK_T_IN, 9);
    // Header in three pieces, data and status in one writable descriptor.
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[ro(HDR, 3), ro(HDR + 3, 9), ro(HDR + 12, 4), wo(DATA, 513)],
    );
    assert_eq!(used, 513);
    assert_eq!(status(&mem, DATA + 512), VIRTIO_BLK_S_OK);
    let mut read = vec![0u8; 512];
    mem.read_slice(&mut read, GuestAddress(DATA)).unwrap();
    assert_eq!(read, vec![9; 512]);
}

#[test]
fn flush_and_get_id() {
    let mem = guest_memory();
    let temp = image();
    let options = BlockOptions {
        serial: Some("a-serial-longer-than-twenty-bytes".into()),
        ..Default::default()
    };
    let dev = block(mem.clone(), &temp, options);
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    poison_status(&mem);
    let used = submit(&dev, &mut driver, &mem, &[ro(HDR, 16), wo(STATUS, 1)]);
    assert_eq!(used, 1);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);

    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    poison_status(&mem);
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[ro(HDR, 16), wo(DATA, 20), wo(STATUS, 1)],
    );
    assert_eq!(used, 21);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"a-serial-longer-than");
}

#[test]
fn open_by_path_defaults_the_serial_to_the_file_name() {
    let mem = guest_memory();
    let temp = image();
    let dev = Block::open(mem.clone(), temp.as_path(), BlockOptions::default()).unwrap();
    let name = temp.as_path().file_name().unwrap().to_str().unwrap();
    let expected = &name.as_bytes()[..name.len().min(20)];
    assert_eq!(&dev.disk.serial[..expected.len()], expected);
    assert_eq!(dev.capacity(), DISK_SECTORS);

    let missing = temp.as_path().with_extension("missing");
    let err = Block::open(mem, &missing, BlockOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, BlockError::Open { .. }));
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn sectors_beyond_capacity_fail_with_ioerr() {
    let mem = guest_memory();
    let temp = image();
    let dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

    for (request_type, sector, data) in [
        // Last sector plus one more.
        (VIRTIO_BLK_T_IN, DISK_SECTORS - 1, 1024),
        (VIRTIO_BLK_T_OUT, DISK_SECTORS, 512),
        // sector + count wraps around.
        (VIRTIO_BLK_T_IN, u64::MAX, 512),
        // Byte offset would overflow.
        (VIRTIO_BLK_T_OUT, u64::MAX / 256, 512),
    ] {
        header(&mem, HDR, request_type, sector);
        poison_status(&mem);
        let data_desc = if request_type == VIRTIO_BLK_T_IN {
            wo(DATA, data)
        } else {
            ro(DATA, data)
        };
        let used = submit(
            &dev,
            &mut driver,
            &mem,
            &[ro(HDR, 16), data_desc, wo(STATUS, 1)],
        );
        assert_eq!(used, 1, "type {request_type} sector {sector}");
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    }
    assert_eq!(file_bytes(&temp, 15 * 512, 512), vec![15; 512]);
}

#[test]
fn hostile_layouts_fail_with_ioerr() {
    let mem = guest_memory();
    let temp = image();
    let dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

    let cases: [(u32, Vec<Desc>); 5] = [
        // Length not a multiple of the sector size.
        (
            VIRTIO_BLK_T_IN,
            vec![ro(HDR, 16), wo(DATA, 500), wo(STATUS, 1)],
        ),
        // A read that also carries device-readable data.
        (
            VIRTIO_BLK_T_IN,
            vec![ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)],
        ),
        // A write whose data is device-writable.
        (
            VIRTIO_BLK_T_OUT,
            vec![ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)],
        ),
        // Readable descriptor after a writable one.
        (
            VIRTIO_BLK_T_OUT,
            vec![ro(HDR, 16), wo(DATA, 512), ro(DATA, 512), wo(STATUS, 1)],
        ),
        // Header shorter than 16 bytes.
        (VIRTIO_BLK_T_IN, vec![ro(HDR, 8), wo(STATUS, 1)]),
    ];
    for (request_type, descs) in cases {
        header(&mem, HDR, request_type, 0);
        poison_status(&mem);
        let used = submit(&dev, &mut driver, &mem, &descs);
        assert_eq!(used, 1, "{descs:?}");
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR, "{descs:?}");
    }
    assert_eq!(file_bytes(&temp, 0, 512), vec![0; 512]);
}

#[test]
fn readonly_disk_refuses_writes_but_serves_reads() {
    let mem = guest_memory();
    let temp = image();
    let options = BlockOptions {
        readonly: true,
        ..Default::default()
    };
    let dev = block(mem.clone(), &temp, options);
    assert_ne!(dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

    mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)],
    );
    assert_eq!(used, 1);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    assert_eq!(file_bytes(&temp, 512, 512), vec![1; 512]);

    header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    poison_status(&mem);
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)],
    );
    assert_eq!(used, 513);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mem = guest_memory();
    let temp = image();
    let dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

    for request_type in [2, 5, 0xdead_beef] {
        header(&mem, HDR, request_type, 0);
        poison_status(&mem);
        let used = submit(&dev, &mut driver, &mem, &[ro(HDR, 16), wo(STATUS, 1)]);
        assert_eq!(used, 1);
        assert_eq!(
            status(&mem, STATUS),
            VIRTIO_BLK_S_UNSUPP,
            "type {request_type}"
        );
    }
}

#[test]
fn buffers_outside_guest_memory_never_panic() {
    let mem = guest_memory();
    let temp = image();
    let dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let outside = 0x20_0000; // guest RAM ends at 1 MiB

    // Data buffer outside RAM: error reported in the (valid) status byte.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    poison_status(&mem);
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[ro(HDR, 16), wo(outside, 512), wo(STATUS, 1)],
    );
    assert_eq!(used, 1);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);

    // Data buffer straddling the end of RAM: nothing of it is written.
    mem.write_slice(&[0xaa; 256], GuestAddress(0x10_0000 - 256))
        .unwrap();
    poison_status(&mem);
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[ro(HDR, 16), wo(0x10_0000 - 256, 512), wo(STATUS, 1)],
    );
    assert_eq!(used, 1);
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    let mut tail = [0u8; 256];
    mem.read_slice(&mut tail, GuestAddress(0x10_0000 - 256))
        .unwrap();
    assert_eq!(tail, [0xaa; 256]);

    // Header outside RAM, and an address range that wraps around.
    for descs in [
        vec![ro(outside, 16), wo(STATUS, 1)],
        vec![ro(HDR, 16), wo(u64::MAX - 100, 512), wo(STATUS, 1)],
    ] {
        poison_status(&mem);
        let used = submit(&dev, &mut driver, &mem, &descs);
        assert_eq!(used, 1);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
    }

    // Status byte outside RAM, or not writable at all: completed with nothing written.
    for descs in [
        vec![ro(HDR, 16), wo(DATA, 512), wo(outside, 1)],
        vec![ro(HDR, 16), ro(STATUS, 1)],
        vec![ro(HDR, 16), wo(STATUS, 0)],
    ] {
        let used = submit(&dev, &mut driver, &mem, &descs);
        assert_eq!(used, 0, "{descs:?}");
    }
}

/// Writes `byte` over sector 7 through the worker, with `features` negotiated; returns how
/// many `fdatasync`s the disk did.
fn write_through_worker(features: u64, byte: u8) -> u64 {
    let mem = guest_memory();
    let temp = image();
    let mut dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let (notifier, interrupt) = driver.activate(&mut dev, features);
    mem.write_slice(&[byte; 512], GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 7);
    driver.add(&[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]);
    notifier.write(1).unwrap();
    assert!(interrupt.wait_for(0, 1));
    assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    assert_eq!(file_bytes(&temp, 7 * 512, 512), vec![byte; 512]);
    dev.reset();
    dev.disk.syncs()
}

/// Without VIRTIO_BLK_F_FLUSH the driver cannot ask for durability, so the device must
/// make each write stable before completing it (virtio 1.2 §5.2.6.2); with it, writes may
/// stay in the host's cache until a FLUSH.
#[test]
fn writes_are_stable_on_completion_unless_flush_was_negotiated() {
    let version_1 = 1u64 << VIRTIO_F_VERSION_1;
    assert_eq!(write_through_worker(version_1, 0x5a), 1);
    assert_eq!(
        write_through_worker(version_1 | 1 << VIRTIO_BLK_F_FLUSH, 0xa5),
        0
    );
}

/// With CONFIG_WCE the driver reads and sets the cache mode in `writeback`: write-back
/// (1) only if it can flush; switching to write-through makes earlier writes stable, and
/// from then on each write is made stable before it completes.
#[test]
fn the_driver_sets_the_cache_mode_with_config_wce() {
    let syncs = |dev: &Block<GuestMemoryMmap>| dev.disk.syncs();
    let writeback = |dev: &Block<GuestMemoryMmap>| {
        let mut mode = [0xffu8];
        dev.read_config(config::WRITEBACK as u64, &mut mode);
        mode[0]
    };
    let mem = guest_memory();
    let temp = image();
    let mut dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let wce = 1u64 << VIRTIO_BLK_F_CONFIG_WCE;
    let flush = 1u64 << VIRTIO_BLK_F_FLUSH;
    let write = |dev: &Block<GuestMemoryMmap>, driver: &mut Driver<GuestMemoryMmap>| {
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 4);
        poison_status(&mem);
        submit(
            dev,
            driver,
            &mem,
            &[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)],
        );
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    };

    dev.ack_features(wce | flush);
    assert_eq!(writeback(&dev), 1);
    write(&dev, &mut driver);
    assert_eq!(syncs(&dev), 0, "write-back");
    dev.write_config(config::WRITEBACK as u64, &[0]);
    assert_eq!(writeback(&dev), 0);
    assert_eq!(syncs(&dev), 1, "earlier writes made stable");
    write(&dev, &mut driver);
    assert_eq!(syncs(&dev), 2, "write-through");
    dev.write_config(config::WRITEBACK as u64, &[1]);
    assert_eq!(writeback(&dev), 1);
    write(&dev, &mut driver);
    assert_eq!(syncs(&dev), 2);

    // Without FLUSH the driver cannot have write-back; without CONFIG_WCE it cannot set it.
    dev.reset();
    dev.ack_features(wce);
    assert_eq!(writeback(&dev), 0);
    dev.write_config(config::WRITEBACK as u64, &[1]);
    assert_eq!(writeback(&dev), 0);
    dev.reset();
    dev.ack_features(flush);
    dev.write_config(config::WRITEBACK as u64, &[0]);
    assert_eq!(writeback(&dev), 1);
}

/// Switching to write-through makes earlier writes stable first; if the host cannot (its
/// `fdatasync` fails), the cache stays write-back as the driver reads it back, so the driver
/// keeps flushing instead of believing those writes stable.
#[test]
fn a_failed_sync_keeps_the_cache_write_back() {
    // A device whose `fdatasync` fails (EINVAL), as a failing host disk's would.
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .unwrap();
    let mut dev = Block::new(guest_memory(), null, BlockOptions::default()).unwrap();
    dev.ack_features(1 << VIRTIO_BLK_F_CONFIG_WCE | 1 << VIRTIO_BLK_F_FLUSH);
    let mut mode = [0u8];
    dev.read_config(config::WRITEBACK as u64, &mut mode);
    assert_eq!(mode, [1]);
    dev.write_config(config::WRITEBACK as u64, &[0]);
    dev.read_config(config::WRITEBACK as u64, &mut mode);
    assert_eq!(mode, [1], "still write-back");
    assert!(dev.disk.writeback());
}

/// An image has one writer: a second disk on it (another VM's, or this one's) is refused
/// while the first is open, read-only users may share it with each other but not with a
/// writer, and the lock goes with the disk.
#[test]
fn an_image_has_one_writer_at_a_time() {
    let temp = image();
    let open = |readonly| {
        Block::open(
            guest_memory(),
            temp.as_path(),
            BlockOptions {
                readonly,
                ..Default::default()
            },
        )
    };
    let writer = open(false).unwrap();
    for readonly in [false, true] {
        let err = open(readonly).err().expect("the image is locked");
        assert!(matches!(err, BlockError::Locked { .. }), "{err}");
        assert!(
            err.to_string().starts_with("the disk image is in use"),
            "{err}"
        );
    }
    drop(writer);
    let reader = open(true).unwrap();
    let other_reader = open(true).unwrap();
    assert!(matches!(
        open(false),
        Err(BlockError::Locked { readonly: false })
    ));
    drop((reader, other_reader));
    open(false).unwrap();
}

/// The status byte is checked before any data moves: a request whose status cannot be
/// written changes neither the image nor guest memory.
#[test]
fn an_unwritable_status_byte_moves_no_data() {
    let mem = guest_memory();
    let temp = image();
    let dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let outside = 0x20_0000; // guest RAM ends at 1 MiB

    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 2);
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[ro(HDR, 16), ro(DATA, 512), wo(outside, 1)],
    );
    assert_eq!(used, 0);
    assert_eq!(
        file_bytes(&temp, 2 * 512, 512),
        vec![2; 512],
        "image unchanged"
    );

    header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[ro(HDR, 16), wo(DATA, 512), wo(0x10_0000 - 1, 2)],
    );
    assert_eq!(used, 0);
    let mut data = [0u8; 512];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0x5a; 512], "guest memory unchanged");
}

#[test]
fn config_and_features() {
    let mem = guest_memory();
    let temp = image();
    let options = BlockOptions {
        access_platform: true,
        ..Default::default()
    };
    let dev = block(mem, &temp, options);
    assert_eq!(dev.device_type(), VIRTIO_ID_BLOCK);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE]);
    let features = dev.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_ACCESS_PLATFORM,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_CONFIG_WCE,
    ] {
        assert_ne!(features & (1 << bit), 0, "bit {bit}");
    }
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);

    let mut capacity = [0u8; 8];
    dev.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
    let mut seg_max = [0u8; 4];
    dev.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), u32::from(QUEUE_SIZE) - 2);
    let mut past_end = [0xffu8; 8];
    dev.read_config(20, &mut past_end);
    assert_eq!(past_end, [0; 8]);

    assert_eq!(
        features & (1 << VIRTIO_RING_F_INDIRECT_DESC),
        0,
        "behind the IOMMU an indirect table costs a MAP request per I/O"
    );

    let plain = block(guest_memory(), &temp, BlockOptions::default());
    assert_eq!(plain.features() & (1 << VIRTIO_F_ACCESS_PLATFORM), 0);
    assert_ne!(plain.features() & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
}

#[test]
fn worker_serves_the_queue_until_reset() {
    let mem = guest_memory();
    let temp = image();
    let mut dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let features = dev.features();
    let (notifier, interrupt) = driver.activate(&mut dev, features);

    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 7);
    let head = driver.add(&[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]);
    notifier.write(1).unwrap();
    assert!(interrupt.wait_for(0, 1));
    assert_eq!(driver.used(), vec![(u32::from(head), 1)]);
    assert_eq!(file_bytes(&temp, 7 * 512, 512), vec![0x5a; 512]);

    dev.reset();
    mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    driver.add(&[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]);
    notifier.write(1).unwrap();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(driver.used().len(), 1);
    assert_eq!(file_bytes(&temp, 7 * 512, 512), vec![0x5a; 512]);
}

#[test]
fn protected_device_serves_requests_through_the_worker() {
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
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let features = dev.features();
    let (notifier, interrupt) = driver.activate(&mut dev, features);

    let (hdr, data, status_iova) = (0x1000_0000, 0x1000_1000, 0x1000_3000);
    header(&mem, hdr, VIRTIO_BLK_T_IN, 11);
    let head = driver.add(&[ro(hdr, 16), wo(data, 1024), wo(status_iova, 1)]);
    notifier.write(1).unwrap();
    assert!(interrupt.wait_for(0, 1));
    assert_eq!(driver.used(), vec![(u32::from(head), 1025)]);
    let mut read = vec![0u8; 1024];
    mem.get_backend()
        .read_slice(&mut read, GuestAddress(0x2_1000))
        .unwrap();
    assert_eq!(&read[..512], &[11; 512][..]);
    assert_eq!(&read[512..], &[12; 512][..]);
    dev.reset();
}

#[test]
fn activation_needs_queue_zero() {
    let mem = guest_memory();
    let temp = image();
    let mut dev = block(mem, &temp, BlockOptions::default());
    let err = dev
        .activate(Vec::new(), Arc::new(FakeInterrupt::default()))
        .unwrap_err();
    assert!(matches!(err, ActivateError::MissingQueue(0)));
}

#[test]
fn requests_through_the_iommu_are_translated() {
    let mem = iommu_memory();
    let phys: &GuestMemoryMmap = mem.get_backend();
    // The guest mapped its request buffers at IOVA 0x1000_0000, backed by RAM at 0x2_0000.
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

    let (hdr, data, status_iova) = (0x1000_0000, 0x1000_1000, 0x1000_3000);
    mem.write_slice(&[0x77; 512], GuestAddress(data)).unwrap();
    header(&mem, hdr, VIRTIO_BLK_T_OUT, 4);
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[ro(hdr, 16), ro(data, 512), wo(status_iova, 1)],
    );
    assert_eq!(used, 1);
    assert_eq!(status(phys, 0x2_3000), VIRTIO_BLK_S_OK);
    assert_eq!(file_bytes(&temp, 4 * 512, 512), vec![0x77; 512]);

    header(&mem, hdr, VIRTIO_BLK_T_IN, 6);
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[ro(hdr, 16), wo(0x1000_2000, 512), wo(status_iova, 1)],
    );
    assert_eq!(used, 513);
    let mut read = vec![0u8; 512];
    phys.read_slice(&mut read, GuestAddress(0x2_2000)).unwrap();
    assert_eq!(read, vec![6; 512]);
}

#[test]
fn unmapped_or_readonly_buffers_give_ioerr_without_touching_memory() {
    let mem = iommu_memory();
    let phys: &GuestMemoryMmap = mem.get_backend();
    mem.iommu()
        .map(0x1000_0000, 0x2_0000, 0x1_0000, Permissions::ReadWrite);
    // A buffer the guest exposed to the device for reading only.
    mem.iommu()
        .map(0x2000_0000, 0x4_0000, 0x1000, Permissions::Read);
    let temp = image();
    let dev = block(mem.clone(), &temp, BlockOptions::default());
    let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
    let (hdr, mapped, status_iova) = (0x1000_0000, 0x1000_4000, 0x1000_3000);
    phys.write_slice(&[0xaa; 512], GuestAddress(0x2_4000))
        .unwrap();
    phys.write_slice(&[0xbb; 512], GuestAddress(0x4_0000))
        .unwrap();

    header(&mem, hdr, VIRTIO_BLK_T_IN, 2);
    for data in [
        // First half mapped, second half not: the mapped half must stay untouched too.
        vec![wo(mapped, 512), wo(0x3000_0000, 512)],
        // Mapped, but not for device writes.
        vec![wo(0x2000_0000, 512)],
        // Mapped RAM addresses are not IOVAs: physical 0x2_4000 is not mapped.
        vec![wo(0x2_4000, 512)],
    ] {
        let mut descs = vec![ro(hdr, 16)];
        descs.extend(data);
        descs.push(wo(status_iova, 1));
        phys.write_obj(0xffu8, GuestAddress(0x2_3000)).unwrap();
        let used = submit(&dev, &mut driver, &mem, &descs);
        assert_eq!(used, 1, "{descs:?}");
        assert_eq!(status(phys, 0x2_3000), VIRTIO_BLK_S_IOERR, "{descs:?}");
    }
    let mut buf = [0u8; 512];
    phys.read_slice(&mut buf, GuestAddress(0x2_4000)).unwrap();
    assert_eq!(buf, [0xaa; 512]);
    phys.read_slice(&mut buf, GuestAddress(0x4_0000)).unwrap();
    assert_eq!(buf, [0xbb; 512]);

    // An unmapped status byte cannot be reported: completed with length 0.
    let used = submit(
        &dev,
        &mut driver,
        &mem,
        &[ro(hdr, 16), wo(mapped, 512), wo(0x3000_0000, 1)],
    );
    assert_eq!(used, 0);
}
