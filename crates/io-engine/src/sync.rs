//! The fallback: each operation is one (or, for a short transfer, a few) system calls made in
//! the pushing thread, so operations complete in order and one at a time.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Completion, IoVecs, Op};

pub struct SyncEngine {
    file: Arc<File>,
    done: Vec<Completion>,
    /// Written when `done` gains a completion, so an epoll loop wakes as with io_uring.
    ready: EventFd,
}

impl SyncEngine {
    pub(crate) fn new(file: Arc<File>) -> io::Result<Self> {
        Ok(SyncEngine {
            file,
            done: Vec::new(),
            ready: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Carries out `op` now. The caller of `Engine::push` vouched for the buffers.
    pub(crate) fn push(&mut self, token: u64, op: Op) {
        let fd = self.file.as_raw_fd();
        let result = match op {
            Op::Read { offset, buffers } => transfer(fd, offset, buffers, false),
            Op::Write { offset, buffers } => transfer(fd, offset, buffers, true),
            Op::SyncData => self.file.sync_data(),
            Op::Fallocate { mode, offset, len } => fallocate(fd, mode, offset, len),
        };
        self.done.push(Completion { token, result });
        // A failed signal only delays nothing: the caller reaps after pushing anyway.
        let _ = self.ready.write(1);
    }

    pub(crate) fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.ready.read();
        out.append(&mut self.done);
    }

    pub(crate) fn completion_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.done.len()
    }
}

/// `preadv`/`pwritev` until every byte moved, continuing short transfers.
fn transfer(fd: RawFd, mut offset: u64, mut buffers: IoVecs, write: bool) -> io::Result<()> {
    while !buffers.is_empty() {
        let batch = buffers.batch();
        let position = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: the iovecs describe memory the caller of `Engine::push` guaranteed valid
        // (writable for a read) until the completion is reaped, which is later than this.
        let moved = unsafe {
            if write {
                libc::pwritev(fd, batch.as_ptr(), batch.len() as libc::c_int, position)
            } else {
                libc::preadv(fd, batch.as_ptr(), batch.len() as libc::c_int, position)
            }
        };
        match moved {
            n if n < 0 => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                offset += n as u64;
                buffers.advance(n as usize);
            }
        }
    }
    Ok(())
}

fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
    };
    loop {
        // SAFETY: no memory is passed.
        if unsafe { libc::fallocate(fd, mode, offset, len) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
