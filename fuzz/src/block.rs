//! A virtio-blk disk (a 16-sector image in a memfd) serves a queue of arbitrary chains:
//! headers, segments and DISCARD/WRITE_ZEROES ranges come from the input.
//!
//! Input layout: byte 0 = options (bit 0 read-only disk, bit 1 FLUSH accepted, bit 2
//! EVENT_IDX accepted, bit 3 INDIRECT_DESC accepted); then the ring ([`crate::ring::Ring::build`]), the indirect tables
//! (128 descriptors of 6 bytes) and the rest copied to the data area, where the descriptors
//! point.
//!
//! Asserts: every chain is returned (or the queue is reported broken, when a head names no
//! descriptor); a chain that breaks the ring's rules is returned with length 0; a used length
//! fits the chain's writable buffers; a chain returned with a
//! length has a writable status byte at the end of its last descriptor, holding OK, IOERR or
//! UNSUPP; nothing outside the chains' writable buffers and the used ring changed; a
//! read-only image is unchanged.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::FromRawFd;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_devices::fuzzing::{self, Interrupts};

use crate::ring::{self, Input, Ring, Written};

const IMAGE_LEN: usize = 16 * 512;

/// A memfd: tmpfs, so the fdatasyncs of write-through and FLUSH cost nothing.
fn image() -> File {
    // SAFETY: a constant NUL-terminated name; the fd returned is owned by the File.
    let fd = unsafe { libc::memfd_create(c"fuzz-blk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(&[0xee; IMAGE_LEN]).unwrap();
    file
}

fn image_bytes(file: &mut File) -> Vec<u8> {
    let mut bytes = Vec::new();
    file.rewind().unwrap();
    file.read_to_end(&mut bytes).unwrap();
    bytes
}

/// Most descriptors the disk takes in a chain: `SEG_MAX` (its default queue size less two)
/// plus the header and the status.
const BLOCK_MAX_DESCRIPTORS: u16 = 256;

/// One input; any byte string is valid.
pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let options = input.u8();
    let readonly = options & 1 != 0;
    let mut features = 1 << VIRTIO_F_VERSION_1;
    if options & 2 != 0 {
        features |= 1 << VIRTIO_BLK_F_FLUSH;
    }
    if options & 4 != 0 {
        features |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    let indirect = options & 8 != 0;
    if indirect {
        features |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
    }

    let mem = ring::guest_memory();
    let mut ring = Ring::build(&mem, 0, &mut input);
    ring::indirect_tables(&mem, &mut input);
    ring::fill_data(&mem, input.rest());
    ring.walk(&mem, indirect, Some(BLOCK_MAX_DESCRIPTORS));
    let before = ring::snapshot(&mem);

    let mut file = image();
    let interrupts = Arc::new(Interrupts::default());
    fuzzing::block(
        &mem,
        file.try_clone().unwrap(),
        readonly,
        features,
        ring.queue(),
        Arc::clone(&interrupts),
    )
    .unwrap();

    let used = ring.used(&mem);
    if ring.heads_valid() {
        assert_eq!(interrupts.needs_reset(), 0);
        let mut heads: Vec<u32> = used.iter().map(|&(head, _)| head).collect();
        let mut avail: Vec<u32> = ring.chains.iter().map(|c| u32::from(c.head)).collect();
        heads.sort_unstable();
        avail.sort_unstable();
        assert_eq!(heads, avail, "every chain is returned once");
    } else {
        assert_eq!(
            interrupts.needs_reset(),
            1,
            "a head past the table breaks the queue"
        );
        assert!(used.len() < ring.chains.len());
    }

    let mut written = Written::default();
    written.allow(ring.used_range());
    written.allow_writable(&ring.chains);
    let after = ring::snapshot(&mem);
    for &(head, len) in &used {
        let chain = ring.chain(head).expect("a used head was made available");
        if chain.refused {
            assert_eq!(len, 0, "chain {head} breaks the rules");
            continue;
        }
        assert!(
            u64::from(len) <= chain.writable_len(),
            "used length {len} exceeds the writable {} bytes of chain {head}",
            chain.writable_len()
        );
        if len == 0 {
            continue;
        }
        let last = chain
            .descs
            .last()
            .expect("a chain answered has descriptors");
        assert!(
            last.writable && last.len > 0,
            "chain {head}: no status byte"
        );
        let at = last
            .addr
            .checked_add(u64::from(last.len) - 1)
            .filter(|&at| at < ring::MEM_SIZE)
            .expect("the status byte is in guest memory");
        if written.exclusive(&(at as usize..at as usize + 1)) {
            let status = u32::from(after[at as usize]);
            assert!(
                [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP].contains(&status),
                "chain {head}: status byte {status:#x}"
            );
        }
    }
    written.check(&before, &after);
    if readonly {
        assert_eq!(image_bytes(&mut file), vec![0xee; IMAGE_LEN]);
    }
}
