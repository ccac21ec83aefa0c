//! The device's thread beside its back end: it turns the back end's "call" eventfds into
//! interrupts for the queues without an irqfd of their own (through [`VirtioInterrupt`]), and
//! watches the back end's socket. When the back end goes away (killed, crashed, or speaking
//! out of turn) the thread takes the rings over and answers every FUSE request the guest made
//! and makes with `ENOTCONN`, as a FUSE mount whose daemon died answers: the guest's file
//! operations on the share fail, and nothing else does.
//!
//! Taking over assumes the back end returned requests in order, as virtiofsd does: the
//! requests it had taken but not answered are those past the used ring's index.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_device::{error_limited, warn_limited};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::buffers::{self, Buffer, Chain};
use crate::counters::FsCounters;
use crate::device_queue::{DeviceQueue, Served};
use crate::worker::{Poller, WorkerHandler};
use crate::VirtioInterrupt;

/// Token of the back end's socket; a queue's kick eventfd, once taken over, has its index.
const BACKEND_TOKEN: u32 = u32::MAX;
/// `ENOTCONN`, as FUSE answers for a daemon that is gone.
const NOT_CONNECTED: i32 = -libc::ENOTCONN;
/// A FUSE request's `fuse_in_header` and a reply's `fuse_out_header`.
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
/// Requests that get no reply (`FUSE_FORGET`, `FUSE_BATCH_FORGET`).
const NO_REPLY: [u32; 2] = [2, 42];

pub(super) struct FsRelay {
    ram: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    backend: RawFd,
    features: u64,
    /// The rings as the driver set them up, by queue index, until the back end is gone; then
    /// this thread's.
    rings: Vec<Option<Queue>>,
    served: Vec<Option<DeviceQueue>>,
    /// The eventfds the driver's notifications arrive on, by queue index.
    kicks: Vec<EventFd>,
    gone: Arc<AtomicBool>,
    counters: Arc<FsCounters>,
}

impl FsRelay {
    pub(super) fn new(
        ram: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        backend: &dyn AsRawFd,
        features: u64,
        rings: Vec<(Queue, EventFd)>,
        gone: Arc<AtomicBool>,
        counters: Arc<FsCounters>,
    ) -> Self {
        let (rings, kicks): (Vec<_>, Vec<_>) = rings
            .into_iter()
            .map(|(queue, kick)| (Some(queue), kick))
            .unzip();
        FsRelay {
            ram,
            interrupt,
            backend: backend.as_raw_fd(),
            features,
            served: rings.iter().map(|_| None).collect(),
            rings,
            kicks,
            gone,
            counters,
        }
    }

    /// The back end is gone: each ring goes on from its used index, served here.
    fn take_over(&mut self, poller: &Poller) {
        if self.gone.swap(true, Ordering::SeqCst) {
            return;
        }
        self.counters.backend_lost.add(1);
        error_limited!(
            "virtio-fs: the vhost-user back end is gone; the guest's requests on the share \
             fail with ENOTCONN until the device is reset with a back end listening again"
        );
        if let Err(err) = poller.remove(self.backend) {
            warn_limited!("virtio-fs: cannot stop watching the back end: {err}");
        }
        if let Err(err) = self.interrupt.needs_reset() {
            warn_limited!("virtio-fs: cannot signal NEEDS_RESET: {err}");
        }
        for index in 0..self.rings.len() {
            let Some(mut queue) = self.rings[index].take() else {
                continue;
            };
            let used_index = GuestAddress(queue.used_ring().wrapping_add(2));
            let next = match self.ram.read_obj::<u16>(used_index) {
                Ok(next) => u16::from_le(next),
                Err(err) => {
                    warn_limited!("virtio-fs: queue {index}: cannot read its used index: {err}");
                    continue;
                }
            };
            queue.set_next_avail(next);
            queue.set_next_used(next);
            let watched = match self.kicks.get(index) {
                Some(kick) => poller.add(kick.as_raw_fd(), index as u32),
                None => Err(io::Error::from(io::ErrorKind::NotFound)),
            };
            if let Err(err) = watched {
                warn_limited!("virtio-fs: queue {index}: cannot watch its notifications: {err}");
            }
            self.served[index] = Some(DeviceQueue::new(
                index,
                queue,
                self.features,
                Arc::clone(&self.interrupt),
            ));
            self.serve(index, poller);
        }
    }

    /// Answers every request available on queue `index` with `ENOTCONN`.
    fn serve(&mut self, index: usize, poller: &Poller) {
        let Some(queue) = self.served.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        let (ram, counters) = (&self.ram, &self.counters);
        let served = queue.process(ram, |chain| {
            counters.failed_requests.add(1);
            Some(refuse(ram, chain))
        });
        if served == Served::Budget {
            poller.rearm(index);
        }
    }
}

/// Writes a `fuse_out_header` with `ENOTCONN` for the request in `chain`; how many bytes that
/// was (none for a request that takes no reply, or a chain with no room for one).
fn refuse(ram: &GuestMemoryMmap, chain: &Chain) -> u32 {
    let (request, reply): (Vec<Buffer>, Vec<Buffer>) =
        chain.buffers.iter().partition(|buffer| !buffer.writable);
    let mut header = [0u8; IN_HEADER_LEN];
    if buffers::read_into(ram, &request, 0, &mut header).is_err() {
        return 0;
    }
    let opcode = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if NO_REPLY.contains(&opcode) {
        return 0;
    }
    let mut answer = [0u8; OUT_HEADER_LEN];
    answer[..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    answer[4..8].copy_from_slice(&NOT_CONNECTED.to_le_bytes());
    answer[8..].copy_from_slice(&header[8..16]);
    match buffers::write_from(ram, &reply, 0, &answer) {
        Ok(()) => OUT_HEADER_LEN as u32,
        Err(_) => 0,
    }
}

impl WorkerHandler for FsRelay {
    fn start(&mut self, poller: &Poller) -> io::Result<()> {
        poller.add(self.backend, BACKEND_TOKEN)
    }

    /// A "call" from the back end relayed here, or this thread's own [`Poller::rearm`] once it
    /// serves.
    fn queue_notified(&mut self, index: usize, poller: &Poller) {
        if self.gone.load(Ordering::SeqCst) {
            self.serve(index, poller);
        } else if let Err(err) = self.interrupt.notify_queue(index) {
            warn_limited!("virtio-fs: cannot interrupt for queue {index}: {err}");
        }
    }

    fn fd_ready(&mut self, token: u32, poller: &Poller) {
        if token == BACKEND_TOKEN {
            return self.take_over(poller);
        }
        let index = token as usize;
        // The driver's notification, which the back end would have read.
        if let Some(kick) = self.kicks.get(index) {
            let _ = kick.read();
        }
        self.serve(index, poller);
    }
}
