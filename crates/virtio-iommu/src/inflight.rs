//! DMA transfers in flight, so that a request that takes translations away (UNMAP, DETACH, an
//! ATTACH that moves an endpoint, bypass turned off) completes only once no transfer that may
//! have translated under the old state is still moving data.
//!
//! A device translates a buffer and then moves its bytes later (a disk read lands after
//! `preadv` returns, a frame after `writev`): invalidating the IOTLB alone would let a transfer
//! translated just before an UNMAP write into memory the guest got back from the UNMAP. So each
//! transfer holds a [`DmaGuard`] from before its first translation until its last byte moved,
//! and [`InflightDma::wait_for_earlier`] waits for the transfers that began before it was
//! called, without stopping new ones (they translate after the change, so they cannot see the
//! old mappings).
//!
//! Each endpoint counts its own transfers, and a request waits only for those of the
//! endpoints it takes translations from (an UNMAP: its domain's; an ATTACH or DETACH: the
//! endpoint's): a device whose transfer is slow, or stuck on the host, holds up its own
//! domain and no other. A transfer also says which I/O addresses it may touch (its
//! [`Footprint`]: the buffers of its descriptor chain), and an UNMAP waits only for those that
//! overlap what it unmaps: the guest unmaps a finished request's buffers while the requests
//! after it are still in flight, and waiting for those (as a disk at depth 16 did, for up to
//! 15 host reads per UNMAP, while the guest's next MAP queued behind it) would serialise the
//! queue on the IOMMU.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a wait for transfers goes before it is reported as stuck (a disk request in
/// flight, however slow the host, ends well within it).
const STUCK_AFTER: Duration = Duration::from_secs(10);

/// Address spans a [`Footprint`] keeps apart; more are folded into one span covering them.
const FOOTPRINT_SPANS: usize = 4;

/// The I/O virtual addresses a transfer may touch, as inclusive spans; a superset is always
/// safe (an UNMAP then waits for a transfer it need not have waited for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    spans: [(u64, u64); FOOTPRINT_SPANS],
    len: usize,
}

impl Footprint {
    /// Every address: for a transfer whose buffers are not known up front.
    pub const EVERYTHING: Footprint = Footprint {
        spans: [(0, u64::MAX); FOOTPRINT_SPANS],
        len: 1,
    };

    /// The buffers `(address, length)` a transfer uses. A buffer running past the end of the
    /// address space is taken to its end.
    pub fn of(buffers: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut footprint = Footprint {
            spans: [(0, 0); FOOTPRINT_SPANS],
            len: 0,
        };
        for (addr, len) in buffers {
            if len == 0 {
                continue;
            }
            let span = (addr, addr.saturating_add(len - 1));
            if footprint.len == FOOTPRINT_SPANS {
                let hull = footprint
                    .spans
                    .iter()
                    .fold(span, |(lo, hi), &(first, last)| {
                        (lo.min(first), hi.max(last))
                    });
                footprint.spans[0] = hull;
                footprint.len = 1;
            } else {
                footprint.spans[footprint.len] = span;
                footprint.len += 1;
            }
        }
        footprint
    }

    /// Whether any address from `first` to `last` (inclusive) is in it.
    pub fn touches(&self, first: u64, last: u64) -> bool {
        self.spans[..self.len]
            .iter()
            .any(|&(lo, hi)| lo <= last && first <= hi)
    }
}

/// The transfers in flight, in the order they began.
#[derive(Debug, Default)]
struct Live {
    /// The number the next transfer gets: transfers numbered below a wait's snapshot of it
    /// began before the wait.
    next: u64,
    transfers: Vec<(u64, Footprint)>,
}

impl Live {
    /// Whether a transfer that began before `boundary` may touch `first..=last`.
    fn any_before(&self, boundary: u64, first: u64, last: u64) -> bool {
        self.transfers
            .iter()
            .any(|(id, footprint)| *id < boundary && footprint.touches(first, last))
    }
}

/// The transfers of one endpoint in flight.
#[derive(Debug, Default)]
pub struct InflightDma {
    live: Mutex<Live>,
}

/// One transfer in flight; dropping it ends the transfer.
#[derive(Debug)]
pub struct DmaGuard {
    dma: Arc<InflightDma>,
    id: u64,
}

impl InflightDma {
    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a transfer that touches at most `footprint`: translations made while the guard
    /// lives are waited for by requests that take any of those addresses away.
    pub fn begin(self: &Arc<Self>, footprint: Footprint) -> DmaGuard {
        let mut live = self.live();
        let id = live.next;
        live.next += 1;
        live.transfers.push((id, footprint));
        DmaGuard {
            dma: Arc::clone(self),
            id,
        }
    }

    /// Returns once every transfer that began before this call has ended. The caller made
    /// its change (table, IOTLBs) first, so later transfers translate under the new state.
    pub fn wait_for_earlier(&self) {
        self.wait_for_earlier_touching(0, u64::MAX);
    }

    /// Returns once every transfer that began before this call and may touch an address from
    /// `first` to `last` (inclusive) has ended. A transfer registers before it translates and
    /// this snapshot is taken after the caller's change, both under the same lock: one that
    /// registered later translates under the new state.
    /// Says whether there was any to wait for.
    pub fn wait_for_earlier_touching(&self, first: u64, last: u64) -> bool {
        let boundary = {
            let live = self.live();
            if !live.any_before(live.next, first, last) {
                return false;
            }
            live.next
        };
        let started = Instant::now();
        let mut reported = false;
        loop {
            // Transfers end on device threads, after system calls: give them the CPU.
            std::thread::yield_now();
            if !self.live().any_before(boundary, first, last) {
                return true;
            }
            // The guest's driver spins until the request completes: a transfer that never
            // ends freezes it silently, so say which wait it is stuck in.
            if !reported && started.elapsed() >= STUCK_AFTER {
                reported = true;
                log::warn!(
                    "virtio-iommu: a request taking translations away has waited {} s for \
                     device transfers still in flight ({} on the endpoint)",
                    STUCK_AFTER.as_secs(),
                    self.in_flight()
                );
            }
        }
    }

    /// Whether a transfer in flight may touch an address from `first` to `last` (for tests:
    /// a translation nothing in flight covers is one no UNMAP would wait for).
    pub fn touched(&self, first: u64, last: u64) -> bool {
        let live = self.live();
        live.any_before(live.next, first, last)
    }

    /// Transfers in flight now (for tests and statistics).
    pub fn in_flight(&self) -> u64 {
        self.live().transfers.len() as u64
    }
}

impl Drop for DmaGuard {
    fn drop(&mut self) {
        let mut live = self.dma.live();
        if let Some(at) = live.transfers.iter().position(|(id, _)| *id == self.id) {
            live.transfers.swap_remove(at);
        }
    }
}

/// An IOMMU whose translations devices bracket with [`DmaGuard`]s.
pub trait DmaFence {
    /// Starts a transfer through this IOMMU that touches at most `footprint`.
    fn begin_dma(&self, footprint: Footprint) -> DmaGuard;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn a_wait_ends_only_after_earlier_transfers() {
        let dma = Arc::new(InflightDma::default());
        let guard = dma.begin(Footprint::EVERYTHING);
        let done = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (dma, done) = (Arc::clone(&dma), Arc::clone(&done));
            std::thread::spawn(move || {
                dma.wait_for_earlier();
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "the wait ended with a transfer in flight"
        );
        // A transfer that begins during the wait is not waited for.
        let later = dma.begin(Footprint::EVERYTHING);
        drop(guard);
        waiter.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        assert_eq!(dma.in_flight(), 1);
        drop(later);
        assert_eq!(dma.in_flight(), 0);
    }

    #[test]
    fn waits_and_transfers_race_without_losing_count() {
        let dma = Arc::new(InflightDma::default());
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (dma, stop) = (Arc::clone(&dma), Arc::clone(&stop));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _g = dma.begin(Footprint::EVERYTHING);
                    }
                })
            })
            .collect();
        for _ in 0..2000 {
            dma.wait_for_earlier();
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(dma.in_flight(), 0);
    }

    #[test]
    fn a_wait_for_some_addresses_ignores_transfers_elsewhere() {
        let dma = Arc::new(InflightDma::default());
        let elsewhere = dma.begin(Footprint::of([(0x1000, 0x1000), (0x8000, 16)]));
        // Nothing in flight touches 0x3000..=0x7fff: no wait at all.
        dma.wait_for_earlier_touching(0x3000, 0x7fff);
        let done = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (dma, done) = (Arc::clone(&dma), Arc::clone(&done));
            std::thread::spawn(move || {
                dma.wait_for_earlier_touching(0x800f, 0x9000);
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "the wait ended while a transfer touching its last byte was in flight"
        );
        drop(elsewhere);
        waiter.join().unwrap();
    }

    #[test]
    fn a_footprint_keeps_four_spans_and_folds_more_into_one_covering_them() {
        let four = Footprint::of([
            (0x1000, 0x10),
            (0x5000, 1),
            (0, 0),
            (0x9000, 0x1000),
            (0x20, 4),
        ]);
        assert!(four.touches(0x100f, 0x100f) && four.touches(0x5000, 0x5000));
        assert!(four.touches(0x9fff, u64::MAX) && four.touches(0x23, 0x23));
        assert!(!four.touches(0x1010, 0x4fff) && !four.touches(0, 0x1f));
        let five = Footprint::of([
            (0x1000, 1),
            (0x3000, 1),
            (0x5000, 1),
            (0x7000, 1),
            (0x9000, 1),
        ]);
        assert!(five.touches(0x9000, 0x9000) && five.touches(0x1000, 0x1000));
        assert!(five.touches(0x2000, 0x2000), "folded: the gaps are covered");
        assert!(!five.touches(0x9001, u64::MAX) && !five.touches(0, 0xfff));
        let to_the_end = Footprint::of([(u64::MAX - 1, 16)]);
        assert!(to_the_end.touches(u64::MAX, u64::MAX));
        assert!(!Footprint::of([]).touches(0, u64::MAX));
        assert!(Footprint::EVERYTHING.touches(0, 0));
    }
}
