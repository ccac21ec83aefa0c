//! virtio-vsock (virtio 1.2 §5.10): stream sockets between the guest and host programs, the
//! host side on Unix sockets as Cloud Hypervisor and Firecracker have it (see [`muxer`]).
//!
//! Three queues: the guest's receive buffers, its transmitted packets, and an event queue
//! (only for a transport reset after migration, which warden does not do: its buffers stay
//! posted). One worker thread serves both data queues and the host sockets. Behind the
//! IOMMU every packet moves through the guest's mappings, each inside one DMA transfer.

mod connection;
mod muxer;
mod packet;
#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::debug;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use crate::counters::VsockCounters;
use crate::device_queue::{DeviceQueue, Served};
use crate::worker::{DeviceThread, DeviceWorker, Poller, WorkerHandler};
use crate::{
    common_features, read_config_bytes, take_queue, ActivateError, ActivatedQueue, DeviceCounters,
    DeviceMemory, VirtioDevice, VirtioInterrupt,
};
use muxer::{Muxer, LISTENER_TOKEN};

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0 to 2 are the hypervisor's and the host's; `u32::MAX` is `VMADDR_CID_ANY`.
    #[error("cid {0} is not a guest's: it must be at least 3 and below 4294967295")]
    Cid(u64),
    /// The host-side socket cannot be created (a file already there, a missing directory).
    #[error("cannot listen on {}: {source}", path.display())]
    Listen { path: PathBuf, source: io::Error },
}

/// A virtio-vsock device over guest memory `M`, listening at its socket path from its
/// creation to its drop (host clients that connect before the guest's driver is up wait in
/// the listener's backlog).
pub struct Vsock<M> {
    mem: M,
    cid: u64,
    listener: Arc<UnixListener>,
    path: PathBuf,
    /// The socket file's device and inode as bound: what the drop may remove.
    file: (u64, u64),
    core: DeviceWorker,
    counters: Arc<VsockCounters>,
}

impl<M: DeviceMemory> Vsock<M> {
    /// The device of guest `cid`, its host side at `path` (which must not exist yet);
    /// `access_platform` when `mem` goes through the IOMMU.
    pub fn new(mem: M, cid: u64, path: &Path, access_platform: bool) -> Result<Self, VsockError> {
        if cid < 3 || cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(cid));
        }
        let listen = |source| VsockError::Listen {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(listen)?;
        let file = std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()));
        let file = match listener.set_nonblocking(true).and(file) {
            Ok(file) => file,
            Err(err) => {
                let _ = std::fs::remove_file(path);
                return Err(listen(err));
            }
        };
        Ok(Vsock {
            mem,
            cid,
            listener: Arc::new(listener),
            path: path.to_owned(),
            file,
            core: DeviceWorker::new(DeviceThread::Vsock, common_features(access_platform)),
            counters: Arc::default(),
        })
    }
}

impl<M> Drop for Vsock<M> {
    /// The socket file goes with the device, so the same path serves the next one; a file
    /// someone else put there since is left alone.
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file);
        if ours {
            if let Err(err) = std::fs::remove_file(&self.path) {
                debug!("vsock: cannot remove {}: {err}", self.path.display());
            }
        }
    }
}

impl<M: DeviceMemory> VirtioDevice for Vsock<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        self.core.features()
    }

    fn ack_features(&mut self, features: u64) {
        self.core.ack_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // `guest_cid`, a le64 (§5.10.4).
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-vsock: ignoring config write of {} bytes at {offset}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mut queues: Vec<ActivatedQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let rx = take_queue(&mut queues, RX)?;
        let tx = take_queue(&mut queues, TX)?;
        let event = take_queue(&mut queues, EVENT)?;
        let features = self.core.acked_features();
        let handler = VsockWorker {
            mem: self.mem.clone(),
            rx: DeviceQueue::new(RX, rx.queue, features, Arc::clone(&interrupt)),
            tx: DeviceQueue::new(TX, tx.queue, features, interrupt),
            muxer: Muxer::new(
                self.cid,
                Arc::clone(&self.listener),
                self.path.clone(),
                Arc::clone(&self.counters),
            ),
        };
        let notifiers = vec![
            (RX, rx.notifier),
            (TX, tx.notifier),
            (EVENT, event.notifier),
        ];
        self.core.start(notifiers, handler)
    }

    fn counters(&self) -> Option<Arc<dyn DeviceCounters>> {
        Some(self.counters.clone())
    }

    /// Every connection ends with the worker (their host sockets close); the listener stays.
    fn reset(&mut self) {
        self.core.reset();
    }
}

struct VsockWorker<M> {
    mem: M,
    rx: DeviceQueue,
    tx: DeviceQueue,
    muxer: Muxer,
}

impl<M: DeviceMemory> VsockWorker<M> {
    /// Takes the guest's packets, each inside its own DMA transfer.
    fn serve_tx(&mut self, poller: &Poller) {
        let (mem, muxer) = (&self.mem, &mut self.muxer);
        let served = self.tx.process(mem, |chain| {
            let _transfer = mem.begin_dma_within(chain.footprint());
            muxer.guest_sent(mem, chain, poller);
            Some(0)
        });
        if served == Served::Budget {
            poller.rearm(TX);
        }
    }

    /// Fills receive buffers while the guest is owed packets.
    fn serve_rx(&mut self, poller: &Poller) {
        if !self.muxer.has_packets() {
            return;
        }
        let (mem, muxer) = (&self.mem, &mut self.muxer);
        let served = self.rx.process(mem, |chain| {
            let _transfer = mem.begin_dma_within(chain.footprint());
            muxer.next_for_guest(mem, chain, poller)
        });
        if served == Served::Budget {
            poller.rearm(RX);
        }
    }
}

impl<M: DeviceMemory> WorkerHandler for VsockWorker<M> {
    fn start(&mut self, poller: &Poller) -> io::Result<()> {
        poller.add(self.muxer.listener_fd(), LISTENER_TOKEN)
    }

    fn queue_notified(&mut self, index: usize, poller: &Poller) {
        match index {
            TX => self.serve_tx(poller),
            RX => {}
            _ => return,
        }
        self.serve_rx(poller);
    }

    fn fd_ready(&mut self, token: u32, poller: &Poller) {
        self.muxer.host_ready(token, poller);
        self.serve_rx(poller);
    }
}
