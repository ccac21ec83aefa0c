//! virtio-rng serves a queue of arbitrary chains from a 16 KiB entropy source of known
//! content (a memfd), so that both its limits and its exhaustion are reached.
//!
//! Input layout: byte 0 = options (bit 0 EVENT_IDX accepted, bit 1 INDIRECT_DESC accepted);
//! the ring
//! ([`crate::ring::Ring::build`]), the indirect tables, and the rest copied to the data area.
//!
//! Asserts, chain by chain against the chains walked before the device ran: every chain is
//! returned in order (or the queue is reported broken, when a head names no descriptor); one
//! that breaks the ring's rules with length 0 and nothing taken from the source; each used
//! length is exactly what the chain can take: its writable bytes, at
//! most `MAX_REQUEST_BYTES` and what is left of the source, or 0 when those bytes are not all
//! guest memory, so never more than its writable bytes; the chains hold the source's bytes in
//! order, and nothing past them, where no other chain may have written; the device's byte
//! counter is the sum of the used lengths; readable buffers and everything else outside the
//! writable buffers and the used ring are untouched.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_devices::fuzzing::{self, Interrupts};
use virtio_devices::rng::MAX_REQUEST_BYTES;

use crate::ring::{self, Desc, Input, Ring, Written};

const SOURCE_LEN: usize = 16 << 10;

fn source_bytes() -> Vec<u8> {
    (0..SOURCE_LEN).map(|i| (i * 13 + (i >> 9)) as u8).collect()
}

/// The entropy source, in a memfd the device opens through /proc.
fn source() -> File {
    // SAFETY: a constant NUL-terminated name; the fd returned is owned by the File.
    let fd = unsafe { libc::memfd_create(c"fuzz-rng".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(&source_bytes()).unwrap();
    file
}

/// One input; any byte string is valid.
pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let options = input.u8();
    let mut features = 1 << VIRTIO_F_VERSION_1;
    if options & 1 != 0 {
        features |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    let indirect = options & 2 != 0;
    if indirect {
        features |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
    }
    let mem = ring::guest_memory();
    let mut ring = Ring::build(&mem, 0, &mut input);
    ring::indirect_tables(&mem, &mut input);
    ring::fill_data(&mem, input.rest());
    ring.walk(&mem, indirect, None);
    let before = ring::snapshot(&mem);

    let file = source();
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let interrupts = Arc::new(Interrupts::default());
    let counted = fuzzing::rng(
        &mem,
        path.as_ref(),
        features,
        ring.queue(),
        Arc::clone(&interrupts),
    )
    .unwrap();
    let after = ring::snapshot(&mem);

    let used = ring.used(&mem);
    let served = ring.served();
    if std::env::var("FUZZ_DEBUG").is_ok() {
        eprintln!(
            "used {used:?}\nchains {:#?}\ncounted {counted}",
            ring.chains
        );
    }
    assert_eq!(used.len(), served.len());
    assert_eq!(interrupts.needs_reset(), usize::from(!ring.heads_valid()));
    let mut allowed = Written::default();
    allowed.allow_writable(&ring.chains);
    let source = source_bytes();
    let mut consumed = 0;
    for (&(head, len), chain) in used.iter().zip(served) {
        if chain.refused {
            assert_eq!(
                (head, len),
                (u32::from(chain.head), 0),
                "chain {head} is refused"
            );
            continue;
        }
        let writable: Vec<&Desc> = chain.descs.iter().filter(|d| d.writable).collect();
        let asked = chain.writable_len().min(MAX_REQUEST_BYTES);
        let expected = if ring::prefix_accessible(&writable, asked) {
            asked.min((SOURCE_LEN - consumed) as u64)
        } else {
            0
        };
        assert_eq!(
            (head, u64::from(len)),
            (u32::from(chain.head), expected),
            "chain {head} with {} writable bytes",
            chain.writable_len()
        );
        assert!(u64::from(len) <= chain.writable_len());
        let mut rest = &source[consumed..consumed + len as usize];
        for d in &writable {
            let range = d.in_memory();
            let n = rest.len().min(range.len());
            if allowed.exclusive(&range) {
                assert!(after[range.start..range.start + n] == rest[..n], "entropy");
                let past = range.start + n..range.end;
                assert!(
                    after[past.clone()] == before[past],
                    "written past the entropy"
                );
            }
            rest = &rest[n..];
        }
        consumed += len as usize;
    }
    assert_eq!(counted, consumed as u64, "the byte counter");

    let mut written = Written::default();
    written.allow(ring.used_range());
    written.allow_writable(&ring.chains);
    written.check(&before, &after);
}
