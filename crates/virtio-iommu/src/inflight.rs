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
//! old mappings). It is a grace period in the RCU sense, with two counters that alternate.
//!
//! Each endpoint counts its own transfers, and a request waits only for those of the
//! endpoints it takes translations from (an UNMAP: its domain's; an ATTACH or DETACH: the
//! endpoint's): a device whose transfer is slow, or stuck on the host, holds up its own
//! domain and no other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a wait for transfers goes before it is reported as stuck (a disk request in
/// flight, however slow the host, ends well within it).
const STUCK_AFTER: Duration = Duration::from_secs(10);

/// Counts of transfers in flight, by the epoch they began in.
#[derive(Debug, Default)]
pub struct InflightDma {
    /// Bumped by each wait; its low bit picks the counter new transfers use.
    epoch: AtomicU64,
    active: [AtomicU64; 2],
    /// Waits run one at a time: two overlapping ones would share an epoch.
    waiting: Mutex<()>,
}

/// One transfer in flight; dropping it ends the transfer.
#[derive(Debug)]
pub struct DmaGuard {
    dma: Arc<InflightDma>,
    parity: usize,
}

impl InflightDma {
    /// Starts a transfer: translations made while the guard lives are waited for.
    pub fn begin(self: &Arc<Self>) -> DmaGuard {
        loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            let parity = (epoch & 1) as usize;
            self.active[parity].fetch_add(1, Ordering::SeqCst);
            // A wait that flipped the epoch in between may already have seen this counter at
            // zero: count in the new epoch instead (nothing was translated yet).
            if self.epoch.load(Ordering::SeqCst) == epoch {
                return DmaGuard {
                    dma: Arc::clone(self),
                    parity,
                };
            }
            self.active[parity].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Returns once every transfer that began before this call has ended. The caller made
    /// its change (table, IOTLBs) first, so later transfers translate under the new state.
    pub fn wait_for_earlier(&self) {
        let _one_at_a_time = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.epoch.fetch_add(1, Ordering::SeqCst);
        let counter = &self.active[(old & 1) as usize];
        let started = Instant::now();
        let mut reported = false;
        while counter.load(Ordering::SeqCst) != 0 {
            // Transfers end on device threads, after system calls: give them the CPU.
            std::thread::yield_now();
            // The guest's driver spins until the request completes: a transfer that never
            // ends freezes it silently, so say which wait it is stuck in.
            if !reported && started.elapsed() >= STUCK_AFTER {
                reported = true;
                log::warn!(
                    "virtio-iommu: a request taking translations away has waited {} s for {} \
                     device transfers still in flight",
                    STUCK_AFTER.as_secs(),
                    counter.load(Ordering::SeqCst)
                );
            }
        }
    }

    /// Transfers in flight now (for tests and statistics).
    pub fn in_flight(&self) -> u64 {
        self.active.iter().map(|c| c.load(Ordering::SeqCst)).sum()
    }
}

impl Drop for DmaGuard {
    fn drop(&mut self) {
        self.dma.active[self.parity].fetch_sub(1, Ordering::SeqCst);
    }
}

/// An IOMMU whose translations devices bracket with [`DmaGuard`]s.
pub trait DmaFence {
    /// Starts a transfer through this IOMMU.
    fn begin_dma(&self) -> DmaGuard;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[test]
    fn a_wait_ends_only_after_earlier_transfers() {
        let dma = Arc::new(InflightDma::default());
        let guard = dma.begin();
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
        let later = dma.begin();
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
                        let _g = dma.begin();
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
}
