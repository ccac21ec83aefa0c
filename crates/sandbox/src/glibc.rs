//! glibc's malloc opens files of its own, once per process, the first time it needs to know
//! something about the host; that first time may come in any thread, and no list allows opening
//! files. So it is made to ask, or spared the question, before any thread is confined.

use std::hint::black_box;
use std::sync::Once;

/// Both of malloc's one-time reads, done (or made unnecessary) on the first call.
pub(crate) fn read_what_malloc_reads_once() {
    static DONE: Once = Once::new();
    DONE.call_once(|| {
        fix_arena_limit();
        learn_whether_heaps_may_shrink();
    });
}

/// Malloc counts the host's CPUs, by reading `/sys/devices/system/cpu/online`, the first time
/// a thread needs an arena of its own. Setting the limit (to glibc's default, 8 arenas per CPU)
/// spares it the count.
fn fix_arena_limit() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arenas = i32::try_from(cpus.saturating_mul(8)).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets a tunable; M_ARENA_MAX takes any positive count.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}

/// Malloc reads `/proc/sys/vm/overcommit_memory` the first time the heap of a thread's own
/// arena shrinks (a disk thread freeing its buffers did, at shutdown, and was killed for it).
/// A new thread, which gets an arena of its own while the arena limit is not reached, frees
/// 4 MiB from the top of its heap: past the trim threshold as long as the process has not
/// freed a block of over 2 MiB from `mmap` before (glibc raises the threshold to twice that).
fn learn_whether_heaps_may_shrink() {
    let shrink = std::thread::Builder::new()
        .name("malloc-probe".into())
        .spawn(|| {
            // 64 KiB pieces: under the smallest mmap threshold (128 KiB), so from the heap.
            let pieces: Vec<Vec<u8>> = (0..64)
                .map(|_| black_box(Vec::with_capacity(64 << 10)))
                .collect();
            for piece in pieces.into_iter().rev() {
                drop(black_box(piece));
            }
        });
    // A thread that cannot be started only leaves the read to the first thread whose heap
    // shrinks, as before.
    if let Ok(thread) = shrink {
        let _ = thread.join();
    }
}
