//! virtio-net (virtio v1.2 §5.1) on a tap device: one receive and one transmit queue per
//! queue pair, each pair on a tap queue and a worker thread of its own; with more than one
//! pair, `VIRTIO_NET_F_MQ` and the control queue that switches pairs on (`control.rs`).
//!
//! Frames cross the tap with the same 12-byte `virtio_net_hdr` the driver uses, so checksum
//! and segmentation offloads pass through untouched: what the driver sends with
//! `VIRTIO_NET_F_CSUM`/`HOST_TSO*` the host kernel completes, and what the host sends
//! unsegmented reaches a driver that accepted `GUEST_CSUM`/`GUEST_TSO*` as it is. The device
//! offers the guest offloads only where the tap accepted them, and allows the tap to deliver
//! them only once the driver accepted them (see [`NetBackend::set_offloads`]).
//!
//! The data path is in `datapath.rs`: transmit frames are written to the tap straight from the
//! guest's buffers; received frames are read into a bounce buffer and copied into as many
//! receive chains as they need (`VIRTIO_NET_F_MRG_RXBUF`). Or it is the kernel's vhost-net
//! (`vhost.rs`), one instance per pair.

mod control;
mod datapath;
mod vhost;

pub use vhost::{VhostIotlb, VhostKernel};

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::debug;
use net_util::{MacAddr, Tap};
use virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::QueueT;
use vm_device::warn_limited;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::counters::NetCounters;
use crate::device_queue::DeviceQueue;
use crate::worker::{DeviceThread, DeviceWorker};
use crate::{
    common_features, read_config_bytes, take_queue, ActivateError, ActivatedQueue, DeviceCounters,
    DeviceMemory, VirtioDevice, VirtioInterrupt,
};
use control::{ControlQueue, TapQueues};
use datapath::{NetWorker, PairQueues};

/// Index of the first receive queue (host to guest); pair `n` receives on `2n`.
pub const RX_QUEUE: usize = 0;
/// Index of the first transmit queue (guest to host); pair `n` transmits on `2n + 1`.
pub const TX_QUEUE: usize = 1;
/// The most queue pairs a device takes (a tap has at most 256 queues; a guest rarely has
/// more vCPUs than this to spread them over).
pub const MAX_QUEUE_PAIRS: usize = 16;

/// The host end of the link: a non-blocking file descriptor carrying one Ethernet frame per
/// `read` and per `write`, each preceded by a 12-byte virtio-net header. In warden this is a
/// [`Tap`]; the device's tests use a datagram socket pair.
pub trait NetBackend: AsRawFd + Send + Sync + 'static {
    /// The `TUN_F_*` offloads the backend can deliver once allowed.
    fn supported_offloads(&self) -> u32;
    /// Allows the backend to deliver frames needing `offloads` (`TUN_F_*`) unfinished.
    fn set_offloads(&self, offloads: u32) -> io::Result<()>;
    /// Attaches this queue of a multi-queue backend to its link, or detaches it so that the
    /// host sends it nothing.
    fn set_queue_attached(&self, attached: bool) -> io::Result<()>;
}

impl NetBackend for Tap {
    fn supported_offloads(&self) -> u32 {
        Tap::supported_offloads(self)
    }

    fn set_offloads(&self, offloads: u32) -> io::Result<()> {
        Tap::set_offloads(self, offloads)
    }

    fn set_queue_attached(&self, attached: bool) -> io::Result<()> {
        Tap::set_queue_attached(self, attached)
    }
}

/// How the VMM wants the network device presented.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// The guest's MAC address, in the configuration space (`VIRTIO_NET_F_MAC`).
    pub mac: MacAddr,
    /// Maximum size of each queue; a power of two.
    pub queue_size: u16,
    /// Offer `VIRTIO_F_ACCESS_PLATFORM`: set when the device's memory is an `IommuMemory`.
    pub access_platform: bool,
}

/// A virtio-net device over guest memory `M` (plain or behind the IOMMU), attached to `B`.
pub struct Net<M, B = Tap> {
    mem: M,
    taps: Arc<TapQueues<B>>,
    core: DeviceWorker,
    config: Vec<u8>,
    /// Receive and transmit queue of each pair, then the control queue if there are several.
    queue_sizes: Vec<u16>,
    counters: Arc<NetCounters>,
    /// The kernel's vhost-net instances, one per pair, when they are the data path.
    vhost: Option<Vec<Arc<dyn VhostKernel>>>,
}

impl<M: DeviceMemory, B: NetBackend> Net<M, B> {
    /// A network device with a queue pair per queue of `backends` (one tap's queues, at least
    /// one, at most [`MAX_QUEUE_PAIRS`]), offering the guest the offloads they can deliver.
    pub fn new(mem: M, backends: Vec<B>, options: NetOptions) -> Self {
        Self::build(mem, backends, options, u64::MAX, None)
    }

    /// The same device with the kernel's vhost-net as its data path, an instance per pair
    /// (the same number as `backends`); ring features the kernel lacks are not offered.
    pub fn with_vhost(
        mem: M,
        backends: Vec<B>,
        options: NetOptions,
        kernels: Vec<Arc<dyn VhostKernel>>,
    ) -> io::Result<Self> {
        assert_eq!(kernels.len(), backends.len(), "a vhost-net per queue pair");
        let supported = kernels[0].supported_features()?;
        let lacking = vhost::RING_FEATURES & !supported;
        // Offered without it, the device would have the driver bypass the IOMMU.
        if options.access_platform && lacking & (1 << VIRTIO_F_ACCESS_PLATFORM) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel's vhost-net lacks VIRTIO_F_ACCESS_PLATFORM, needed behind the IOMMU",
            ));
        }
        Ok(Self::build(mem, backends, options, !lacking, Some(kernels)))
    }

    fn build(
        mem: M,
        backends: Vec<B>,
        options: NetOptions,
        feature_mask: u64,
        vhost: Option<Vec<Arc<dyn VhostKernel>>>,
    ) -> Self {
        assert!(
            (1..=MAX_QUEUE_PAIRS).contains(&backends.len()),
            "{} tap queues for one device",
            backends.len()
        );
        let pairs = backends.len();
        let backend = &backends[0];
        // The tap parses a header on every write, so transmit offloads are always available.
        let mut features = common_features(options.access_platform)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6);
        let offloads = backend.supported_offloads();
        // GUEST_TSO* depend on GUEST_CSUM (virtio v1.2 §5.1.3.1).
        if offloads & libc::TUN_F_CSUM != 0 {
            features |= 1 << VIRTIO_NET_F_GUEST_CSUM;
            if offloads & libc::TUN_F_TSO4 != 0 {
                features |= 1 << VIRTIO_NET_F_GUEST_TSO4;
            }
            if offloads & libc::TUN_F_TSO6 != 0 {
                features |= 1 << VIRTIO_NET_F_GUEST_TSO6;
            }
        }

        // One pair needs no control queue: a driver that asks for nothing is served as
        // before multi-queue existed.
        let mut queues = 2 * pairs;
        if pairs > 1 {
            features |= (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_MQ);
            queues += 1;
        }

        // Config layout: mac[6], status (le16), max_virtqueue_pairs (le16, read by drivers
        // that accepted VIRTIO_NET_F_MQ). The link is always up: the tap exists for as long
        // as the device does.
        let mut config = Vec::with_capacity(10);
        config.extend_from_slice(&options.mac.octets());
        config.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config.extend_from_slice(&(pairs as u16).to_le_bytes());

        Net {
            mem,
            taps: Arc::new(TapQueues::new(backends)),
            core: DeviceWorker::new(DeviceThread::Net, features & feature_mask),
            config,
            queue_sizes: vec![options.queue_size; queues],
            counters: Arc::default(),
            vhost,
        }
    }
}

/// The `TUN_F_*` offloads matching the guest offloads in `features`.
fn tap_offloads(features: u64) -> u32 {
    [
        (VIRTIO_NET_F_GUEST_CSUM, libc::TUN_F_CSUM),
        (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
        (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
    ]
    .into_iter()
    .filter(|&(bit, _)| features & (1 << bit) != 0)
    .fold(0, |offloads, (_, flag)| offloads | flag)
}

impl<M: DeviceMemory, B: NetBackend> VirtioDevice for Net<M, B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
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
        // The MAC is writable only for legacy drivers; status is read-only.
        debug!(
            "virtio-net: ignoring config write of {} bytes at {offset}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mut queues: Vec<ActivatedQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        // Without MQ the driver knows one pair, and the control queue (if any) follows it.
        let max_pairs = if self.core.acked(VIRTIO_NET_F_MQ) {
            self.taps.len()
        } else {
            1
        };
        let mut pairs = Vec::with_capacity(max_pairs);
        for pair in 0..max_pairs {
            let rx = take_queue(&mut queues, RX_QUEUE + 2 * pair)?;
            let tx = take_queue(&mut queues, TX_QUEUE + 2 * pair)?;
            pairs.push((rx, tx));
        }
        let control = if self.core.acked(VIRTIO_NET_F_CTRL_VQ) {
            Some(take_queue(&mut queues, 2 * max_pairs)?)
        } else {
            None
        };
        let all = pairs.iter().flat_map(|(rx, tx)| [rx, tx]).chain(&control);
        for activated in all {
            if !activated.queue.is_valid(&self.mem) {
                warn_limited!(
                    "virtio-net: queue {} is not accessible; it will not work",
                    activated.index
                );
            }
        }
        // The tap must not hand over unfinished frames a driver cannot take (the offloads
        // are the interface's, whichever queue sets them).
        self.taps
            .backend(0)
            .set_offloads(tap_offloads(self.core.acked_features()))
            .map_err(ActivateError::Io)?;
        // The driver starts on the first pair (§5.1.6.5.5).
        if let (_, Err(err)) = self.taps.use_pairs(1) {
            return Err(ActivateError::Io(err));
        }

        if let Some(kernels) = &self.vhost {
            return self.activate_vhost(kernels.clone(), pairs, control, interrupt);
        }

        let features = self.core.acked_features();
        let mrg_rxbuf = self.core.acked(VIRTIO_NET_F_MRG_RXBUF);
        let wakes = wake_fds(max_pairs)?;
        let mut control = match control {
            Some(activated) => {
                let wakes = wakes
                    .iter()
                    .map(EventFd::try_clone)
                    .collect::<io::Result<Vec<_>>>()
                    .map_err(ActivateError::Io)?;
                Some(self.control_queue(activated, wakes, &interrupt))
            }
            None => None,
        };
        let mut threads = Vec::with_capacity(max_pairs);
        for (pair, ((rx, tx), wake)) in pairs.into_iter().zip(wakes).enumerate() {
            let mut notifiers = vec![(rx.index, rx.notifier), (tx.index, tx.notifier)];
            let queues = PairQueues {
                pair,
                rx: DeviceQueue::new(rx.index, rx.queue, features, Arc::clone(&interrupt))
                    .with_max_descriptors(datapath::MAX_CHAIN_DESCRIPTORS),
                tx: DeviceQueue::new(tx.index, tx.queue, features, Arc::clone(&interrupt))
                    .with_max_descriptors(datapath::MAX_CHAIN_DESCRIPTORS),
                wake,
            };
            let mut worker = NetWorker::new(
                self.mem.clone(),
                Arc::clone(&self.taps),
                queues,
                mrg_rxbuf,
                Arc::clone(&self.counters),
            );
            // The first pair's thread also answers the control queue.
            if let Some((notifier, control)) = control.take() {
                notifiers.push((control.queue.index(), notifier));
                worker = worker.with_control(control);
            }
            threads.push((notifiers, worker));
        }
        self.core.start_each(threads)
    }

    fn counters(&self) -> Option<Arc<dyn DeviceCounters>> {
        Some(self.counters.clone())
    }

    fn reset(&mut self) {
        if let Some(kernels) = &self.vhost {
            vhost::stop_pairs(kernels);
        }
        // Dropping the worker stops and joins its thread, which also drops the queues and a
        // received frame not yet delivered.
        self.core.reset();
        if let Err(err) = self.taps.backend(0).set_offloads(0) {
            warn_limited!("virtio-net: cannot disable the tap's offloads: {err}");
        }
    }
}

impl<M: DeviceMemory, B: NetBackend> Net<M, B> {
    /// Hands every pair's rings to its vhost-net instance; this device's one thread relays
    /// the kernel's interrupts, answers its IOTLB misses and serves the control queue.
    fn activate_vhost(
        &mut self,
        kernels: Vec<Arc<dyn VhostKernel>>,
        pairs: Vec<(ActivatedQueue, ActivatedQueue)>,
        control: Option<ActivatedQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let rings = pairs
            .into_iter()
            .map(|(rx, tx)| {
                [
                    (rx.index, rx.queue, rx.notifier),
                    (tx.index, tx.queue, tx.notifier),
                ]
            })
            .collect::<Vec<_>>();
        let pairs = rings.len();
        // The kernel's threads need no wake-up when their pair leaves use: a detached tap
        // queue gives them nothing.
        let control = match control {
            Some(activated) => Some(self.control_queue(activated, wake_fds(pairs)?, &interrupt)),
            None => None,
        };
        let taps = Arc::clone(&self.taps);
        let acked = self.core.acked_features();
        let started = vhost::start_pairs(
            &self.mem,
            &kernels,
            |pair| taps.backend(pair).as_raw_fd(),
            rings,
            acked,
        );
        let mut notifiers = match started {
            Ok(calls) => calls,
            Err(err) => {
                vhost::stop_pairs(&kernels);
                return Err(err);
            }
        };
        let control = control.map(|(notifier, control)| {
            let index = control.queue.index();
            notifiers.push((index, notifier));
            (index, control)
        });
        let relay = vhost::VhostRelay {
            mem: self.mem.clone(),
            kernels: kernels.clone(),
            interrupt,
            control,
        };
        let started = self.core.start_each(vec![(notifiers, relay)]);
        if started.is_err() {
            vhost::stop_pairs(&kernels);
        }
        started
    }
}

impl<M: DeviceMemory, B: NetBackend> Net<M, B> {
    /// The control queue's handler over `activated`, switching this device's pairs (and
    /// writing `wakes`, one per pair, when a pair joins or leaves use), with its notifier.
    fn control_queue(
        &self,
        activated: ActivatedQueue,
        wakes: Vec<EventFd>,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> (EventFd, ControlQueue<B>) {
        let features = self.core.acked_features();
        let pairs = wakes.len();
        let queue = DeviceQueue::new(
            activated.index,
            activated.queue,
            features,
            Arc::clone(interrupt),
        );
        let control = ControlQueue::new(queue, Arc::clone(&self.taps), pairs, wakes);
        (activated.notifier, control)
    }
}

/// One non-blocking eventfd per pair, for the pairs' wake-ups.
fn wake_fds(pairs: usize) -> Result<Vec<EventFd>, ActivateError> {
    (0..pairs)
        .map(|_| EventFd::new(EFD_NONBLOCK))
        .collect::<io::Result<Vec<_>>>()
        .map_err(ActivateError::Io)
}

#[cfg(feature = "fuzzing")]
impl<M: DeviceMemory, B: NetBackend> Net<M, B> {
    /// Serves one notification of the first pair's transmit queue, then of its receive
    /// queue, as the worker would, on the calling thread (see [`crate::fuzzing::net`]).
    pub(crate) fn serve_for_fuzzing(
        &self,
        rx: virtio_queue::Queue,
        tx: virtio_queue::Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> io::Result<()> {
        let features = self.core.acked_features();
        let queues = PairQueues {
            pair: 0,
            rx: DeviceQueue::new(RX_QUEUE, rx, features, Arc::clone(&interrupt))
                .with_max_descriptors(datapath::MAX_CHAIN_DESCRIPTORS),
            tx: DeviceQueue::new(TX_QUEUE, tx, features, interrupt)
                .with_max_descriptors(datapath::MAX_CHAIN_DESCRIPTORS),
            wake: EventFd::new(EFD_NONBLOCK)?,
        };
        NetWorker::new(
            self.mem.clone(),
            Arc::clone(&self.taps),
            queues,
            self.core.acked(VIRTIO_NET_F_MRG_RXBUF),
            Arc::clone(&self.counters),
        )
        .serve_for_fuzzing()
    }
}

#[cfg(test)]
mod mq_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vhost_tests;
