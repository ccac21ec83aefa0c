//! The queue handling every worker-backed device shares (`DeviceQueue::process`) and the
//! chain accessors (`buffers.rs`) over arbitrary descriptor tables, avail rings and indices.
//!
//! Input layout: byte 0 = options (bit 0 EVENT_IDX, bit 1 an avail index from the input
//! instead of the number of entries, bit 2 a used ring outside guest memory, bit 3
//! INDIRECT_DESC); 2 bytes of
//! avail index; the ring ([`crate::ring::Ring::build`]); per chain 6 bytes of what the
//! handler does (read and write windows, used length, whether to stop); the indirect tables;
//! the rest copied to the data area.
//!
//! Asserts: chains come in avail order, each as the reference walks it, those that break the
//! ring's rules (ring.rs) returned with length 0 without reaching the handler; a read or write
//! succeeds exactly when its window lies in the chain's readable or writable buffers, all in
//! guest memory; a read returns guest memory, a write lands where it should and a refused
//! one changes nothing; the used ring gets each chain the handler completed, with the
//! handler's length; a call serves at most a queue's worth of chains; an avail index more than a queue size ahead, or a used ring that cannot
//! be written, breaks the queue (reported once, nothing served after); at most one interrupt
//! per call, and one whenever chains were used without EVENT_IDX; nothing outside the
//! writable buffers and the used ring changed.

use std::sync::Arc;

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_devices::fuzzing::{ChainQueue, Interrupts};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::ring::{self, Chain, Desc, Input, Ring, Written};

/// What the handler does with one chain.
struct Step {
    read: (u64, usize),
    write: (u64, usize),
    used_len: u32,
    stop: bool,
}

impl Step {
    fn new(input: &mut Input) -> Step {
        let b = input.u8();
        Step {
            read: (u64::from(input.u8()) * 16, usize::from(input.u8()) * 4),
            write: (u64::from(input.u8()) * 16, usize::from(input.u8()) * 4),
            used_len: u32::from(input.u8()),
            stop: b == 0xff,
        }
    }
}

/// Whether `len` bytes from `offset` into `descs` lie inside them and in guest memory (an
/// empty window always does: nothing moves).
fn window_ok(descs: &[Desc], mut offset: u64, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    if offset.saturating_add(len) > total {
        return false;
    }
    let mut left = len;
    for d in descs {
        if left == 0 {
            break;
        }
        let dlen = u64::from(d.len);
        if offset >= dlen {
            offset -= dlen;
            continue;
        }
        let count = (dlen - offset).min(left);
        let inside = d
            .addr
            .checked_add(offset)
            .and_then(|start| start.checked_add(count))
            .is_some_and(|end| end <= ring::MEM_SIZE);
        if !inside {
            return false;
        }
        offset = 0;
        left -= count;
    }
    true
}

/// Guest-memory addresses of `len` bytes from `offset` into `descs` (a window that fits).
fn window_addrs(descs: &[Desc], offset: u64, len: u64) -> Vec<u64> {
    descs
        .iter()
        .flat_map(|d| (0..u64::from(d.len)).map(move |i| d.addr + i))
        .skip(offset as usize)
        .take(len as usize)
        .collect()
}

/// One input; any byte string is valid.
pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let options = input.u8();
    let event_idx = options & 1 != 0;
    let indirect = options & 8 != 0;
    let raw_avail_idx = input.u16();
    let mem = ring::guest_memory();
    let mut ring = Ring::build(&mem, 0, &mut input);
    let steps: Vec<Step> = (0..ring.size).map(|_| Step::new(&mut input)).collect();
    ring::indirect_tables(&mem, &mut input);
    ring::fill_data(&mem, input.rest());
    let beyond_ring = options & 2 != 0 && {
        ring.set_avail_idx(&mem, raw_avail_idx);
        raw_avail_idx > ring.size
    };
    ring.walk(&mem, indirect, None);
    let mut queue = ring.queue();
    let used_broken = options & 4 != 0;
    if used_broken {
        queue.set_used_ring_address(Some(0xffff_f000), Some(0));
    }
    let before = ring::snapshot(&mem);

    let interrupts = Arc::new(Interrupts::default());
    let mut features = 0;
    if event_idx {
        features |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    if indirect {
        features |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
    }
    let mut queue = ChainQueue::new(queue, features, Arc::clone(&interrupts));
    // The chains the handler completed, and the next reference chain it may get.
    let mut handled: Vec<(u16, u32)> = Vec::new();
    let mut next = 0;
    let mut writes = Written::default();
    writes.allow(ring.used_range());
    for pass in 0..2 {
        let signalled = interrupts.queue();
        let used_before = ring.used(&mem).len();
        let mut taken = 0;
        let budget_spent = queue.process(&mem, |chain| {
            // The device returned the refused chains before this one by itself.
            while ring.chains.get(next).is_some_and(|c| c.refused) {
                next += 1;
            }
            let i = handled.len();
            let reference: &Chain = ring
                .chains
                .get(next)
                .expect("no more chains than available");
            taken += 1;
            assert_eq!(chain.head(), reference.head);
            let seen: Vec<Desc> = chain
                .buffers()
                .into_iter()
                .map(|(addr, len, writable)| Desc {
                    addr,
                    len,
                    writable,
                })
                .collect();
            assert_eq!(seen, reference.descs, "the chain as the reference walks it");
            let step = &steps[i % steps.len()];
            if pass == 0 && step.stop {
                return None;
            }
            exercise(&mem, chain, reference, step);
            writes.allow_writable([reference]);
            handled.push((chain.head(), step.used_len));
            next += 1;
            Some(step.used_len)
        });
        assert!(taken <= usize::from(ring.size), "a queue's worth per call");
        if budget_spent {
            assert_eq!(
                ring.chains.len(),
                usize::from(ring.size),
                "stopped at its budget"
            );
        }
        assert!(
            interrupts.queue() - signalled <= 1,
            "one interrupt per call"
        );
        let used_now = ring.used(&mem).len();
        if !event_idx && used_now > used_before && !used_broken {
            assert_eq!(
                interrupts.queue() - signalled,
                1,
                "used chains are signalled"
            );
        }
    }

    let used = ring.used(&mem);
    if beyond_ring {
        assert!(
            handled.is_empty(),
            "nothing is served past a bogus avail index"
        );
        assert_eq!(interrupts.needs_reset(), 1, "reported once");
    } else if used_broken {
        assert!(
            handled.len() <= 1,
            "nothing is served after a failed completion"
        );
        assert_eq!(interrupts.needs_reset(), 1);
    } else {
        // Every chain before a head that names no descriptor (which breaks the queue) is
        // returned in order: refused with 0, or with the handler's length.
        assert_eq!(interrupts.needs_reset(), usize::from(!ring.heads_valid()));
        let mut lens = handled.iter();
        let expected: Vec<(u32, u32)> = ring
            .served()
            .iter()
            .map(|c| {
                let len = if c.refused {
                    0
                } else {
                    let &(head, len) = lens.next().expect("every chain kept is handled");
                    assert_eq!(head, c.head);
                    len
                };
                (u32::from(c.head), len)
            })
            .collect();
        assert!(lens.next().is_none(), "only the chains kept are handled");
        assert_eq!(used, expected);
    }
    writes.check(&before, &ring::snapshot(&mem));
}

/// Reads and writes `chain` through the device's accessors and checks each against guest
/// memory.
fn exercise(
    mem: &vm_memory::GuestMemoryMmap,
    chain: &virtio_devices::fuzzing::Chain,
    reference: &Chain,
    step: &Step,
) {
    let readable: Vec<Desc> = reference
        .descs
        .iter()
        .copied()
        .filter(|d| !d.writable)
        .collect();
    let writable: Vec<Desc> = reference
        .descs
        .iter()
        .copied()
        .filter(|d| d.writable)
        .collect();

    let (offset, len) = step.read;
    let mut buf = vec![0; len];
    let ok = chain.read(offset, &mut buf);
    assert_eq!(
        ok,
        window_ok(&readable, offset, len as u64),
        "read {offset}+{len}"
    );
    if ok {
        let now = ring::snapshot(mem);
        let expected: Vec<u8> = window_addrs(&readable, offset, len as u64)
            .into_iter()
            .map(|a| now[a as usize])
            .collect();
        assert_eq!(buf, expected);
    }

    let (offset, len) = step.write;
    let data: Vec<u8> = (0..len).map(|i| !(i as u8)).collect();
    let before = ring::snapshot(mem);
    let ok = chain.write(offset, &data);
    assert_eq!(
        ok,
        window_ok(&writable, offset, len as u64),
        "write {offset}+{len}"
    );
    if ok {
        // Later bytes of the window win where buffers overlap.
        let mut expected = before.clone();
        for (a, b) in window_addrs(&writable, offset, len as u64)
            .into_iter()
            .zip(&data)
        {
            expected[a as usize] = *b;
        }
        let mut got = vec![0; before.len()];
        mem.read_slice(&mut got, GuestAddress(0)).unwrap();
        assert!(got == expected, "write {offset}+{len} landed elsewhere");
    } else {
        assert!(
            ring::snapshot(mem) == before,
            "a refused write changed memory"
        );
    }
}
