//! Interrupt delivery for a virtio-pci function.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use pci::MsixState;
use virtio_devices::VirtioInterrupt;
use vmm_sys_util::eventfd::EventFd;

use crate::VIRTIO_MSI_NO_VECTOR;

/// ISR bit: a queue has used buffers.
pub(crate) const ISR_QUEUE: u8 = 1;
/// ISR bit: the device configuration changed.
pub(crate) const ISR_CONFIG: u8 = 2;

/// The vector routing the driver programmed, shared with the device's workers.
///
/// Vectors and ISR are atomics so a worker can raise an interrupt without taking the
/// transport's lock (which a vCPU may hold while waiting in `VirtioDevice::reset` for that very
/// worker to stop).
pub(crate) struct VirtioPciInterrupt {
    pub(crate) isr: AtomicU8,
    pub(crate) config_generation: AtomicU8,
    pub(crate) config_vector: AtomicU16,
    pub(crate) queue_vectors: Vec<AtomicU16>,
    /// DEVICE_NEEDS_RESET as the device reported it (from any thread) since the last reset.
    pub(crate) needs_reset: AtomicBool,
    msix: Arc<Mutex<MsixState>>,
}

impl VirtioPciInterrupt {
    pub(crate) fn new(queues: usize, msix: Arc<Mutex<MsixState>>) -> Self {
        Self {
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            needs_reset: AtomicBool::new(false),
            msix,
        }
    }

    /// Back to the device-reset state: no vectors, nothing pending in the ISR, no reset needed.
    pub(crate) fn reset(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        for vector in &self.queue_vectors {
            vector.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
    }

    fn signal(&self, isr_bit: u8, vector: u16) -> io::Result<()> {
        self.isr.fetch_or(isr_bit, Ordering::SeqCst);
        if vector == VIRTIO_MSI_NO_VECTOR {
            return Ok(());
        }
        vm_device::lock(&self.msix).trigger(vector)
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn notify_queue(&self, queue_index: usize) -> io::Result<()> {
        let vector = self.queue_vectors.get(queue_index).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no queue {queue_index}"),
            )
        })?;
        self.signal(ISR_QUEUE, vector.load(Ordering::SeqCst))
    }

    fn notify_config(&self) -> io::Result<()> {
        // The driver re-reads device configuration until the generation is stable.
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.signal(ISR_CONFIG, self.config_vector.load(Ordering::SeqCst))
    }

    fn needs_reset(&self) -> io::Result<()> {
        if self.needs_reset.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.notify_config()
    }

    fn queue_irqfd(&self, queue_index: usize) -> Option<EventFd> {
        let vector = self.queue_vectors.get(queue_index)?.load(Ordering::SeqCst);
        if vector == VIRTIO_MSI_NO_VECTOR {
            return None;
        }
        vm_device::lock(&self.msix).irqfd(vector)?.try_clone().ok()
    }
}
