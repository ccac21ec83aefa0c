//! A sequence counter for lock-free readers of data that one writer at a time changes.
//!
//! Writers (already serialized by the device's state lock) make the count odd before they
//! change the data and even again after; a reader notes an even count, reads the data with
//! plain atomic loads, and keeps what it read only if the count is unchanged afterwards.
//! Readers never write shared memory: no read-modify-write, no lock, no fence instruction
//! on x86 (acquire loads and fences compile to plain loads there), so independent lookups
//! still overlap in the CPU. The data read in between must be atomics (a racing reader may
//! see a mix of old and new values, which the count check then throws away) and must stay
//! valid memory whatever the reader sees: callers keep such memory type-stable.

use std::sync::atomic::{fence, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(crate) struct SeqCount(AtomicU64);

impl SeqCount {
    /// Start a change (idempotent: a change already in progress stays one). Single writer.
    #[inline]
    pub(crate) fn write_begin(&self) {
        let s = self.0.load(Ordering::Relaxed);
        if s & 1 == 0 {
            self.0.store(s.wrapping_add(1), Ordering::Relaxed);
            // Orders the odd count before every data store that follows.
            fence(Ordering::Release);
        }
    }

    /// End a change begun by [`Self::write_begin`] (no-op if none is in progress).
    #[inline]
    pub(crate) fn write_end(&self) {
        let s = self.0.load(Ordering::Relaxed);
        if s & 1 != 0 {
            self.0.store(s.wrapping_add(1), Ordering::Release);
        }
    }

    /// Start a read: the count to validate against, or `None` while a change is in progress.
    #[inline]
    pub(crate) fn read_begin(&self) -> Option<u64> {
        let s = self.0.load(Ordering::Acquire);
        (s & 1 == 0).then_some(s)
    }

    /// Whether nothing changed since `read_begin` returned `s`. The caller must have issued
    /// [`read_fence`] after its data loads (one fence may serve several counts).
    #[inline]
    pub(crate) fn unchanged(&self, s: u64) -> bool {
        self.0.load(Ordering::Relaxed) == s
    }
}

/// Orders a reader's data loads before the loads of [`SeqCount::unchanged`].
#[inline]
pub(crate) fn read_fence() {
    fence(Ordering::Acquire);
}

/// Where a lock-free reader can race with a writer (see [`race_point`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RacePoint {
    /// The endpoint binding is read, the table not yet.
    Bound,
    /// Between two radix levels.
    Level,
    /// The walk is done, not yet validated.
    Walked,
    /// A validated miss, before the lock is taken to record the fault.
    Missed,
}

#[cfg(test)]
type RaceHook = Box<dyn FnMut(RacePoint)>;

#[cfg(test)]
thread_local! {
    /// Test-only: called at this thread's [`race_point`]s, e.g. to run requests (or sleep)
    /// inside a lock-free reader's race window. Not re-entered: race points reached from
    /// within the hook are skipped.
    pub(crate) static RACE_HOOK: std::cell::RefCell<Option<RaceHook>> =
        const { std::cell::RefCell::new(None) };
}

/// A point inside a lock-free reader's race window. Nothing outside tests.
#[inline(always)]
pub(crate) fn race_point(_at: RacePoint) {
    #[cfg(test)]
    {
        let hook = RACE_HOOK.with(|h| h.borrow_mut().take());
        if let Some(mut f) = hook {
            f(_at);
            RACE_HOOK.with(|h| {
                h.borrow_mut().get_or_insert(f);
            });
        }
    }
}
