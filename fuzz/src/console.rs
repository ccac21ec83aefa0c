//! virtio-console: arbitrary transmit chains go to a captured output, then input (as if
//! typed) is delivered into arbitrary receive chains.
//!
//! Input layout: byte 0 = options (bit 0 EVENT_IDX accepted, bit 1 INDIRECT_DESC accepted); 2
//! bytes of input length (up to
//! 8 KiB of typed bytes, a pattern unlike guest memory's); the receive ring, the transmit
//! ring ([`crate::ring::Ring::build`]), the indirect tables, and the rest copied to the data
//! area.
//!
//! Asserts, chain by chain against the chains walked before the device ran: every transmit
//! chain is returned with length 0 and the output is exactly, in order, the readable bytes of
//! each chain that keeps the ring's rules and whose readable buffers all lie in guest memory (the others
//! are dropped whole); receive chains are used in order while input is pending, each with
//! the length of the input it can take (as much as fits its writable buffers, or 0 when the
//! part to write is not all guest memory), and hold that input, in order, where no other
//! chain may have written; input is left over only when every chain was used; nothing outside
//! the receive chains' writable buffers and the used rings changed.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_devices::fuzzing::{self, Interrupts};

use crate::ring::{self, Chain, Desc, Input, Ring, Written};

const MAX_INPUT: usize = 8 << 10;

/// What the device wrote out, kept for inspection.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The bytes a transmit chain writes out: all its readable bytes, or none when one readable
/// buffer is not all guest memory.
fn transmitted(chain: &Chain, mem: &[u8]) -> Vec<u8> {
    let readable: Vec<&Desc> = chain.descs.iter().filter(|d| !d.writable).collect();
    let mut bytes = Vec::new();
    for d in readable {
        match d.bytes(mem) {
            Some(b) => bytes.extend_from_slice(b),
            None => return Vec::new(),
        }
    }
    bytes
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
    let typed: Vec<u8> = (0..usize::from(input.u16()) % (MAX_INPUT + 1))
        .map(|i| (i * 7 + 3) as u8 ^ 0x5a)
        .collect();

    let mem = ring::guest_memory();
    let mut rx = Ring::build(&mem, 0, &mut input);
    let mut tx = Ring::build(&mem, 1, &mut input);
    ring::indirect_tables(&mem, &mut input);
    ring::fill_data(&mem, input.rest());
    rx.walk(&mem, indirect, None);
    tx.walk(&mem, indirect, None);
    let before = ring::snapshot(&mem);

    let output = Captured::default();
    let interrupts = Arc::new(Interrupts::default());
    let left = fuzzing::console(
        &mem,
        Box::new(output.clone()),
        features,
        rx.queue(),
        tx.queue(),
        &typed,
        Arc::clone(&interrupts),
    );
    let after = ring::snapshot(&mem);

    let tx_used = tx.used(&mem);
    let tx_served = tx.served();
    assert_eq!(
        tx_used.len(),
        tx_served.len(),
        "every transmit chain is returned"
    );
    for (&(head, len), chain) in tx_used.iter().zip(tx_served) {
        assert_eq!((head, len), (u32::from(chain.head), 0));
    }
    let expected: Vec<u8> = tx_served
        .iter()
        .filter(|c| !c.refused)
        .flat_map(|c| transmitted(c, &before))
        .collect();
    assert!(
        *output.0.lock().unwrap() == expected,
        "the output is not the transmit chains' bytes"
    );

    check_rx(&rx, &mem, &after, &typed, left);

    let mut written = Written::default();
    written.allow(rx.used_range());
    written.allow(tx.used_range());
    written.allow_writable(&rx.chains);
    written.check(&before, &after);
    let broken = usize::from(!rx.heads_valid()) + usize::from(!tx.heads_valid());
    assert!(interrupts.needs_reset() <= broken);
}

fn check_rx(rx: &Ring, mem: &vm_memory::GuestMemoryMmap, after: &[u8], typed: &[u8], left: usize) {
    let used = rx.used(mem);
    let mut written = Written::default();
    written.allow_writable(&rx.chains);
    let mut delivered = 0;
    let mut served = 0;
    for chain in rx.served() {
        // With input pending the device takes chains; one that breaks the rules goes back
        // unused as it is reached, even once the input ran out (until the next chain).
        if typed.is_empty() || (delivered == typed.len() && !chain.refused) {
            break;
        }
        if chain.refused {
            assert_eq!(
                used.get(served),
                Some(&(u32::from(chain.head), 0)),
                "receive chain {served} is refused"
            );
            served += 1;
            continue;
        }
        let writable: Vec<&Desc> = chain.descs.iter().filter(|d| d.writable).collect();
        let take =
            (typed.len() - delivered).min(chain.writable_len().min(usize::MAX as u64) as usize);
        let len = if ring::prefix_accessible(&writable, take as u64) {
            take
        } else {
            0
        };
        assert_eq!(
            used.get(served),
            Some(&(u32::from(chain.head), len as u32)),
            "receive chain {served} took {len} bytes of input"
        );
        served += 1;
        let mut rest = &typed[delivered..delivered + len];
        for d in &writable {
            let n = rest.len().min(d.len as usize);
            let range = d.in_memory().start..d.in_memory().start + n;
            if written.exclusive(&d.in_memory()) {
                assert!(after[range] == rest[..n], "receive chain holds the input");
            }
            rest = &rest[n..];
        }
        delivered += len;
    }
    assert_eq!(
        used.len(),
        served,
        "no receive chain used once input ran out"
    );
    assert_eq!(left, typed.len() - delivered, "input left pending");
}
