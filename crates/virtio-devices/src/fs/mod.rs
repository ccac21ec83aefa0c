//! virtio-fs (virtio 1.2 §5.11): a host directory the guest mounts by its tag, its FUSE
//! requests served by a vhost-user back end (virtiofsd) in a process of its own.
//!
//! Warden keeps the configuration space and the transport; on DRIVER_OK it hands the back end
//! guest RAM (shared memory, as file descriptors) and the rings. The back end signals each
//! queue's MSI-X irqfd itself, as Cloud Hypervisor has it, so an interrupt costs no hop
//! through warden; one thread of warden's watches the back end and relays what cannot go
//! straight to KVM ([`relay`]). The back end reaches guest RAM by the
//! addresses the driver wrote, untranslated: a device behind the IOMMU would need the back end
//! to speak vhost-user's IOTLB protocol, which virtiofsd does not, so one is refused.

mod backend;
mod relay;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::{debug, info, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::counters::FsCounters;
use crate::host_rings::host_ring_addresses;
use crate::worker::{DeviceThread, DeviceWorker};
use crate::{
    read_config_bytes, take_queue, ActivateError, ActivatedQueue, DeviceCounters, VirtioDevice,
    VirtioInterrupt,
};
pub use backend::FsBackend;
use relay::FsRelay;
pub use vhost_user::Connection as VhostUserConnection;

/// The longest tag the configuration space holds.
pub const TAG_LEN: usize = 36;
/// The features warden's transport and the relay handle, when the back end has them.
const RING_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC);

/// Why a virtio-fs device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("the back end cannot serve a device behind the IOMMU: {0}")]
    BehindIommu(&'static str),
    #[error("the tag must be 1 to {TAG_LEN} bytes, not {0}")]
    Tag(usize),
}

/// A virtio-fs device: `hiprio` (queue 0), then the request queues.
pub struct Fs {
    ram: GuestMemoryMmap,
    /// `tag` (36 bytes, NUL-padded) and `num_request_queues` (le32).
    config: [u8; TAG_LEN + 4],
    queue_sizes: Vec<u16>,
    backend: Box<dyn FsBackend>,
    /// Set by the relay when the back end went away; the next activation connects again.
    gone: Arc<AtomicBool>,
    /// The back end's rings run (between a successful start and the next reset).
    started: bool,
    core: DeviceWorker,
    counters: Arc<FsCounters>,
}

impl Fs {
    /// A share the guest mounts as `tag`, with `request_queues` queues of `queue_size`
    /// entries besides `hiprio`, served by `backend` (connected for `request_queues + 1`
    /// queues). `behind_iommu` is refused with the reason.
    pub fn new(
        ram: GuestMemoryMmap,
        tag: &str,
        request_queues: u16,
        queue_size: u16,
        backend: Box<dyn FsBackend>,
        behind_iommu: bool,
    ) -> Result<Self, FsError> {
        if behind_iommu {
            return Err(FsError::BehindIommu(if backend.offers_iotlb() {
                "warden does not relay vhost-user IOTLB messages"
            } else {
                "it does not offer VIRTIO_F_ACCESS_PLATFORM with a back-end request channel \
                 (the vhost-user IOTLB protocol); put the share on a segment outside the IOMMU"
            }));
        }
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.len()));
        }
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&u32::from(request_queues).to_le_bytes());
        let features = backend.features() & RING_FEATURES;
        Ok(Fs {
            ram,
            config,
            queue_sizes: vec![queue_size; usize::from(request_queues) + 1],
            backend,
            gone: Arc::default(),
            started: false,
            core: DeviceWorker::new(DeviceThread::Fs, features),
            counters: Arc::default(),
        })
    }

    /// Hands the back end guest RAM and the rings; the relay's eventfd of each queue (the
    /// back end's "call" where the queue has no irqfd, else only the relay's own).
    fn start_backend(
        &mut self,
        queues: &[ActivatedQueue],
        interrupt: &dyn VirtioInterrupt,
    ) -> Result<Vec<(usize, EventFd)>, ActivateError> {
        let acked = self.core.acked_features();
        let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut relayed = Vec::with_capacity(queues.len());
        let mut calls = Vec::with_capacity(queues.len());
        let mut addresses = Vec::with_capacity(queues.len());
        for activated in queues {
            let relay = EventFd::new(EFD_NONBLOCK)?;
            calls.push(match interrupt.queue_irqfd(activated.index) {
                Some(irqfd) => irqfd,
                None => relay.try_clone()?,
            });
            relayed.push((activated.index, relay));
            addresses.push(host_ring_addresses(&self.ram, &activated.queue, event_idx)?);
        }
        let rings: Vec<vhost_user::Ring> = queues
            .iter()
            .zip(&calls)
            .zip(&addresses)
            .map(|((activated, call), at)| vhost_user::Ring {
                index: activated.index,
                size: activated.queue.size(),
                next_avail: activated.queue.next_avail(),
                desc: at.desc,
                avail: at.avail,
                used: at.used,
                kick: &activated.notifier,
                call,
            })
            .collect();
        if self.gone.swap(false, Ordering::SeqCst) {
            self.backend.reconnect()?;
            info!("virtio-fs: connected to the back end again");
        }
        if let Err(err) = self.backend.start(acked, &self.ram, &rings) {
            // A back end restarted since the last activation: the old connection is dead.
            warn!("virtio-fs: {err}; connecting to the back end again");
            self.backend.reconnect()?;
            self.backend.start(acked, &self.ram, &rings)?;
        }
        self.started = true;
        Ok(relayed)
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.core.features()
    }

    fn ack_features(&mut self, features: u64) {
        self.core.ack_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-fs: ignoring config write of {} bytes at {offset}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mut queues: Vec<ActivatedQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let queues = (0..self.queue_sizes.len())
            .map(|index| take_queue(&mut queues, index))
            .collect::<Result<Vec<_>, _>>()?;
        let relayed = self.start_backend(&queues, interrupt.as_ref())?;
        let relay = FsRelay::new(
            self.ram.clone(),
            interrupt,
            self.backend.as_ref(),
            self.core.acked_features(),
            queues.into_iter().map(|q| (q.queue, q.notifier)).collect(),
            Arc::clone(&self.gone),
            Arc::clone(&self.counters),
        );
        self.core.start(relayed, relay)
    }

    fn counters(&self) -> Option<Arc<dyn DeviceCounters>> {
        Some(self.counters.clone())
    }

    /// Stops the relay, then the back end's rings (unless it is gone).
    fn reset(&mut self) {
        self.core.reset();
        if std::mem::take(&mut self.started) && !self.gone.load(Ordering::SeqCst) {
            if let Err(err) = self.backend.stop() {
                warn!("virtio-fs: cannot stop the back end's rings: {err}");
            }
        }
    }
}
