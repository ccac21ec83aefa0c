//! Asynchronous file I/O for device back-ends.
//!
//! An [`Engine`] carries out [`Op`]s on one file and hands back [`Completion`]s in whatever
//! order the kernel finishes them, in batches. It uses io_uring (through the `io-uring` crate)
//! where the host allows it, and plain system calls, one at a time in the caller's thread,
//! where it does not (io_uring refused with `ENOSYS` on old kernels, `EPERM` under a seccomp
//! profile or `kernel.io_uring_disabled`): the choice is made when the engine is created and
//! logged once per process.
//!
//! Reads and writes complete whole or fail: a short transfer is continued by the engine, so a
//! caller never sees one.

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Once};

use log::{info, warn};

mod sync;
mod uring;

#[cfg(test)]
mod tests;

pub use sync::SyncEngine;
pub use uring::UringEngine;

/// Most iovecs one `preadv`/`pwritev` or io_uring `READV`/`WRITEV` takes (`UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// Memory segments of a transfer: plain addresses and lengths, as `preadv` takes them.
///
/// The engine only passes them to the kernel; whoever pushes the [`Op`] vouches for them (see
/// [`Engine::push`]).
pub struct IoVecs(Vec<libc::iovec>);

// SAFETY: the addresses are only handed to the kernel; validity across threads is what the
// caller of `Engine::push` promises.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Segments `(address, length)`, in file order.
    pub fn new(segments: impl IntoIterator<Item = (*mut u8, usize)>) -> Self {
        IoVecs(
            segments
                .into_iter()
                .map(|(base, len)| libc::iovec {
                    iov_base: base.cast(),
                    iov_len: len,
                })
                .collect(),
        )
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|v| v.iov_len as u64).sum()
    }

    /// Whether there is nothing left to transfer.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The next batch the kernel takes in one call.
    fn batch(&self) -> &[libc::iovec] {
        &self.0[..self.0.len().min(MAX_IOVECS)]
    }

    /// Drops the first `moved` bytes: what a (possibly short) transfer already did.
    fn advance(&mut self, mut moved: usize) {
        let mut done = 0;
        while moved > 0 && done < self.0.len() {
            let iovec = &mut self.0[done];
            let step = moved.min(iovec.iov_len);
            iovec.iov_len -= step;
            // SAFETY: stays within the segment the iovec describes.
            iovec.iov_base = unsafe { iovec.iov_base.cast::<u8>().add(step).cast() };
            moved -= step;
            if iovec.iov_len == 0 {
                done += 1;
            }
        }
        self.0.drain(..done);
        // Zero-length segments left at the front would make the next call move nothing.
        let empty = self.0.iter().take_while(|v| v.iov_len == 0).count();
        self.0.drain(..empty);
    }
}

/// One operation on the engine's file.
pub enum Op {
    /// Fills `buffers` from the file at `offset`.
    Read { offset: u64, buffers: IoVecs },
    /// Writes `buffers` to the file at `offset`.
    Write { offset: u64, buffers: IoVecs },
    /// `fdatasync`: makes the writes completed so far stable.
    SyncData,
    /// `fallocate(mode, offset, len)`: punch a hole, zero a range.
    Fallocate { mode: i32, offset: u64, len: u64 },
}

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    /// What the caller passed to [`Engine::push`].
    pub token: u64,
    /// A read or write moved all its bytes, or failed with this error.
    pub result: io::Result<()>,
}

/// How an engine does its I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring: many operations in flight, done by the kernel.
    IoUring,
    /// One system call at a time in the calling thread.
    Synchronous,
}

/// Carries out operations on one file, many at a time where the host allows it.
pub enum Engine {
    /// Boxed: a ring is much larger than the fallback.
    IoUring(Box<UringEngine>),
    Synchronous(SyncEngine),
}

static FALLBACK_LOGGED: Once = Once::new();
static URING_LOGGED: Once = Once::new();

impl Engine {
    /// An engine on `file` for up to `depth` operations in flight: io_uring if the host allows
    /// it, else synchronous (logged once per process with the reason).
    pub fn new(file: Arc<File>, depth: u32) -> io::Result<Self> {
        match UringEngine::new(Arc::clone(&file), depth) {
            Ok(engine) => {
                URING_LOGGED.call_once(|| info!("disk I/O through io_uring"));
                Ok(Engine::IoUring(Box::new(engine)))
            }
            Err(err) => {
                FALLBACK_LOGGED.call_once(|| {
                    warn!(
                        "io_uring unavailable ({err}): disk I/O falls back to synchronous system calls, one request at a time"
                    )
                });
                Ok(Engine::Synchronous(SyncEngine::new(file)?))
            }
        }
    }

    /// A synchronous engine even where io_uring works (tests, and whoever wants one).
    pub fn synchronous(file: Arc<File>) -> io::Result<Self> {
        Ok(Engine::Synchronous(SyncEngine::new(file)?))
    }

    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::IoUring(_) => EngineKind::IoUring,
            Engine::Synchronous(_) => EngineKind::Synchronous,
        }
    }

    /// Queues `op`, to be reported with `token`. A synchronous engine carries it out now.
    ///
    /// # Safety
    ///
    /// The memory `op`'s buffers describe must stay valid, writable for a read, until this
    /// engine returned its completion from [`Engine::reap`] or [`Engine::wait`], or until the
    /// engine is dropped (which waits for every operation in flight).
    pub unsafe fn push(&mut self, token: u64, op: Op) -> io::Result<()> {
        match self {
            Engine::IoUring(e) => e.push(token, op),
            Engine::Synchronous(e) => {
                e.push(token, op);
                Ok(())
            }
        }
    }

    /// Hands the queued operations to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        match self {
            Engine::IoUring(e) => e.submit(),
            Engine::Synchronous(_) => Ok(()),
        }
    }

    /// Appends the operations finished so far to `out`, without blocking.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        match self {
            Engine::IoUring(e) => e.reap(out),
            Engine::Synchronous(e) => e.reap(out),
        }
    }

    /// Like [`Engine::reap`], but first waits until at least one operation finished (returns
    /// at once if none is in flight).
    pub fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        match self {
            Engine::IoUring(e) => e.wait(out),
            Engine::Synchronous(e) => {
                e.reap(out);
                Ok(())
            }
        }
    }

    /// Readable (an eventfd) when completions may be waiting: for the caller's epoll set.
    pub fn completion_fd(&self) -> RawFd {
        match self {
            Engine::IoUring(e) => e.completion_fd(),
            Engine::Synchronous(e) => e.completion_fd(),
        }
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::IoUring(e) => e.in_flight(),
            Engine::Synchronous(e) => e.in_flight(),
        }
    }
}
