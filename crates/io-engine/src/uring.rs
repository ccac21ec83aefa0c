//! io_uring: operations in flight in the kernel, completed in any order.
//!
//! The ring is locked down when it is made, before anything is submitted
//! (`IORING_SETUP_R_DISABLED` until `IORING_REGISTER_RESTRICTIONS` is in place): it takes only
//! `READV`, `WRITEV`, `FSYNC` and `FALLOCATE`, and only on registered file 0, the engine's file.
//! io_uring operations do not pass through seccomp (the kernel carries them out, in its own
//! workers), so without this a thread confined to `io_uring_enter` could open files or sockets
//! through the ring; with it, the ring can do nothing the thread's own `preadv` could not.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::register::{Probe, Restriction};
use io_uring::types::{Fixed, FsyncFlags};
use io_uring::{opcode, squeue, IoUring};
use log::error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Completion, Op};

/// The only file the ring may touch, as registered file index 0.
const FILE: Fixed = Fixed(0);
/// The operations the ring is restricted to.
const OPCODES: [u8; 4] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];
/// Largest ring: a queue of virtio-blk has at most 32768 entries.
const MAX_ENTRIES: u32 = 32768;

pub struct UringEngine {
    pub(crate) ring: IoUring,
    /// Registered in the ring; kept open while operations may use it.
    _file: Arc<File>,
    /// Registered with the ring: the kernel writes it for every completion.
    ready: EventFd,
    /// Operations in flight, by slot (the SQE's user data).
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    in_flight: usize,
}

struct Pending {
    token: u64,
    /// For reads and writes, what is left to transfer and where.
    op: Op,
}

impl UringEngine {
    /// A restricted ring on `file` with room for `depth` operations; fails where the host
    /// refuses io_uring or lacks one of the operations.
    pub(crate) fn new(file: Arc<File>, depth: u32) -> io::Result<Self> {
        let entries = depth.clamp(1, MAX_ENTRIES).next_power_of_two();
        let ring: IoUring = IoUring::builder()
            .setup_r_disabled()
            // Every operation in flight fits in the completion queue: none is ever dropped.
            .setup_cqsize(entries * 2)
            .build(entries)?;
        let submitter = ring.submitter();
        let mut probe = Probe::new();
        submitter.register_probe(&mut probe)?;
        if let Some(missing) = OPCODES.iter().find(|&&op| !probe.is_supported(op)) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel's io_uring lacks opcode {missing}"),
            ));
        }
        submitter.register_files(&[file.as_raw_fd()])?;
        let ready = EventFd::new(EFD_NONBLOCK)?;
        submitter.register_eventfd(ready.as_raw_fd())?;
        let mut restrictions: Vec<Restriction> =
            OPCODES.iter().map(|&op| Restriction::sqe_op(op)).collect();
        restrictions.push(Restriction::sqe_flags_required(
            squeue::Flags::FIXED_FILE.bits(),
        ));
        submitter.register_restrictions(&mut restrictions)?;
        submitter.register_enable_rings()?;
        Ok(UringEngine {
            ring,
            _file: file,
            ready,
            pending: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
        })
    }

    pub(crate) fn push(&mut self, token: u64, op: Op) -> io::Result<()> {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.pending.push(None);
            self.pending.len() - 1
        });
        self.pending[slot] = Some(Pending { token, op });
        if let Err(err) = self.queue(slot) {
            self.pending[slot] = None;
            self.free.push(slot);
            return Err(err);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Puts the SQE for what is left of slot `slot`'s operation in the submission queue.
    fn queue(&mut self, slot: usize) -> io::Result<()> {
        let Some(pending) = &self.pending[slot] else {
            return Err(io::ErrorKind::NotFound.into());
        };
        let entry = match &pending.op {
            Op::Read { offset, buffers } => {
                let batch = buffers.batch();
                opcode::Readv::new(FILE, batch.as_ptr(), batch.len() as u32)
                    .offset(checked_offset(*offset)?)
                    .build()
            }
            Op::Write { offset, buffers } => {
                let batch = buffers.batch();
                opcode::Writev::new(FILE, batch.as_ptr(), batch.len() as u32)
                    .offset(checked_offset(*offset)?)
                    .build()
            }
            Op::SyncData => opcode::Fsync::new(FILE).flags(FsyncFlags::DATASYNC).build(),
            Op::Fallocate { mode, offset, len } => opcode::Fallocate::new(FILE, *len)
                .offset(checked_offset(*offset)?)
                .mode(*mode)
                .build(),
        }
        .user_data(slot as u64);
        for _ in 0..2 {
            // SAFETY: the iovec array lives in `self.pending` until the operation completes
            // (the kernel copies it at submission anyway, IORING_FEAT_SUBMIT_STABLE), and the
            // memory it describes is what the caller of `Engine::push` vouched for.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
        Err(io::Error::other("io_uring submission queue stays full"))
    }

    pub(crate) fn submit(&mut self) -> io::Result<()> {
        // Callers submit after every batch and every reap: skip the system call when there
        // is nothing to hand over.
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        }
    }

    pub(crate) fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.ready.read();
        let finished: Vec<(usize, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data() as usize, cqe.result()))
            .collect();
        let mut requeued = false;
        for (slot, result) in finished {
            match self.advance(slot, result) {
                Progress::Again => match self.queue(slot) {
                    Ok(()) => requeued = true,
                    Err(err) => self.finish(slot, Err(err), out),
                },
                Progress::Done(result) => self.finish(slot, result, out),
                Progress::Unknown => error!("io_uring completion for unknown slot {slot}"),
            }
        }
        if requeued {
            if let Err(err) = self.submit() {
                // The entries stay queued; the next submit hands them over.
                error!("cannot resubmit continued I/O: {err}");
            }
        }
    }

    /// Applies a completion to slot `slot`: whether its operation is done or goes on.
    fn advance(&mut self, slot: usize, result: i32) -> Progress {
        let Some(Some(pending)) = self.pending.get_mut(slot) else {
            return Progress::Unknown;
        };
        if result < 0 {
            return match -result {
                libc::EINTR | libc::EAGAIN => Progress::Again,
                errno => Progress::Done(Err(io::Error::from_raw_os_error(errno))),
            };
        }
        match &mut pending.op {
            Op::Read { offset, buffers } | Op::Write { offset, buffers } => {
                if result == 0 {
                    return Progress::Done(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                *offset += result as u64;
                buffers.advance(result as usize);
                if buffers.is_empty() {
                    Progress::Done(Ok(()))
                } else {
                    Progress::Again
                }
            }
            Op::SyncData | Op::Fallocate { .. } => Progress::Done(Ok(())),
        }
    }

    fn finish(&mut self, slot: usize, result: io::Result<()>, out: &mut Vec<Completion>) {
        if let Some(pending) = self.pending[slot].take() {
            self.free.push(slot);
            self.in_flight -= 1;
            out.push(Completion {
                token: pending.token,
                result,
            });
        }
    }

    pub(crate) fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        if self.in_flight == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        }
        self.reap(out);
        Ok(())
    }

    pub(crate) fn completion_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }
}

enum Progress {
    Again,
    Done(io::Result<()>),
    Unknown,
}

/// io_uring reads an offset of -1 as "the file position": never pass one that large.
fn checked_offset(offset: u64) -> io::Result<u64> {
    if offset > i64::MAX as u64 {
        return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
    }
    Ok(offset)
}

impl Drop for UringEngine {
    /// Operations still in flight would write into memory their owner is about to free:
    /// wait for every one of them.
    fn drop(&mut self) {
        let mut discarded = Vec::new();
        while self.in_flight > 0 {
            if let Err(err) = self.wait(&mut discarded) {
                error!(
                    "cannot wait for {} I/O operations in flight: {err}",
                    self.in_flight
                );
                return;
            }
            discarded.clear();
        }
    }
}
