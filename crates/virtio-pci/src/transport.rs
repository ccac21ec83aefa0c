//! The virtio-pci function: PCI header, capabilities, BAR 0 structures and device lifecycle.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::debug;
use pci::{BarKind, BarMove, BarSpec, EventAddress, Msix, PciConfiguration, PciDevice, PciHeader};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_PACKED,
    VIRTIO_F_RING_RESET, VIRTIO_F_SR_IOV, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_devices::{ActivatedQueue, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_device::InterruptGroup;
use vm_device::{error_limited, warn_limited};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupt::VirtioPciInterrupt;
use crate::VirtioPciError;

/// Red Hat's vendor ID, assigned to virtio.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// "No vector": the driver gets no interrupt for this queue or for config changes.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// Queue `n` is notified at `notify base + n * NOTIFY_OFF_MULTIPLIER`: one dword per queue, so
/// each queue gets its own ioeventfd address.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

/// Subsystem ID for modern devices (the spec asks for at least 0x40).
const SUBSYSTEM_ID: u16 = 0x40;
const REVISION: u8 = 1;

const VIRTIO_BAR: usize = 0;
/// The queue notification registers live in an I/O BAR of their own (BAR 0 is 64-bit and
/// takes slots 0 and 1): a guest's `out` exits with the port already decoded, whereas an MMIO
/// notification must be decoded by the hypervisor from the instruction. Notifications are
/// the hottest guest exit there is, and the virtio-iommu's are synchronous.
const NOTIFY_BAR: usize = 2;
const PAGE: u64 = 0x1000;
/// BAR 0 layout: one page each for common config, ISR and device config, then the MSI-X
/// table and the PBA, each page aligned so the guest can map them separately.
const COMMON_CFG_OFFSET: u64 = 0;
const ISR_OFFSET: u64 = PAGE;
const DEVICE_CFG_OFFSET: u64 = 2 * PAGE;
const MSIX_TABLE_OFFSET: u64 = 3 * PAGE;

const PCI_CAP_ID_VENDOR: u8 = 0x09;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
/// Size of `struct virtio_pci_cap`.
const VIRTIO_PCI_CAP_LEN: u8 = 16;

/// Size of the common configuration structure, including the 1.2 `queue_notif_config_data`
/// and `queue_reset` fields (which read as zero: we offer neither feature).
const COMMON_CFG_LEN: usize = 0x3c;

const MAX_QUEUES: usize = 1024;
const MAX_QUEUE_SIZE: u16 = 32768;

/// Transport features we cannot honour: packed rings (virtio-queue's `Queue` is split only),
/// notification data, per-queue reset and SR-IOV. They are hidden from the driver.
const UNSUPPORTED_FEATURES: u64 = (1 << VIRTIO_F_RING_PACKED)
    | (1 << VIRTIO_F_NOTIFICATION_DATA)
    | (1 << VIRTIO_F_RING_RESET)
    | (1 << VIRTIO_F_SR_IOV);

const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;

/// MSI-X vectors the VMM should give a device: one per queue plus one for config changes.
pub fn msix_vectors(device: &dyn VirtioDevice) -> usize {
    device.queue_max_sizes().len() + 1
}

/// PCI class and subclass by device type, as QEMU reports them, so guest tools that look at
/// classes (udev rules, lspci) see the familiar values.
fn class_code(device_type: u32) -> (u8, u8) {
    match device_type {
        VIRTIO_ID_NET => (0x02, 0x00),
        VIRTIO_ID_BLOCK => (0x01, 0x00),
        VIRTIO_ID_CONSOLE => (0x07, 0x80),
        _ => (0xff, 0x00),
    }
}

/// Where things sit in BAR 0, and the size of the notification BAR.
#[derive(Clone, Copy, Debug)]
struct BarLayout {
    /// Bytes of notification registers: one dword per queue.
    notify_len: u64,
    msix_pba_offset: u64,
    size: u64,
    notify_bar_size: u64,
}

impl BarLayout {
    fn new(queues: usize, vectors: usize) -> Self {
        let notify_len = queues as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        let msix_pba_offset = MSIX_TABLE_OFFSET + Msix::table_len(vectors).next_multiple_of(PAGE);
        let end = msix_pba_offset + Msix::pba_len(vectors).next_multiple_of(PAGE);
        Self {
            notify_len,
            msix_pba_offset,
            size: end.next_power_of_two(),
            notify_bar_size: notify_len.next_power_of_two(),
        }
    }
}

/// What the driver wrote for one queue before enabling it.
#[derive(Clone, Copy, Debug)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// A ready `Queue` with the configured geometry; `None` if the driver's addresses break the
    /// split-ring alignment rules.
    fn build(&self, event_idx: bool) -> Option<Queue> {
        let mut queue = Queue::new(self.max_size).ok()?;
        queue.try_set_size(self.size).ok()?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .ok()?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .ok()?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .ok()?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        Some(queue)
    }
}

/// A virtio device behind the modern virtio-pci transport.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    msix: Msix,
    device: Box<dyn VirtioDevice>,
    layout: BarLayout,
    /// Size of the MSI-X table.
    msix_vectors: usize,
    /// Offset of the `VIRTIO_PCI_CAP_PCI_CFG` capability in configuration space.
    pci_cfg_cap: usize,
    offered_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    notifiers: Vec<EventFd>,
    interrupt: Arc<VirtioPciInterrupt>,
}

impl VirtioPciDevice {
    /// Wraps `device`; `interrupt` backs the MSI-X table (ideally [`msix_vectors`] vectors; with
    /// fewer the driver shares vectors between queues).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        interrupt: Arc<dyn InterruptGroup>,
    ) -> Result<Self, VirtioPciError> {
        let features = device.features();
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VirtioPciError::VersionOneMissing);
        }
        let max_sizes = device.queue_max_sizes().to_vec();
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::QueueCountInvalid(max_sizes.len()));
        }
        if let Some((index, &size)) = max_sizes
            .iter()
            .enumerate()
            .find(|(_, &s)| !s.is_power_of_two() || s > MAX_QUEUE_SIZE)
        {
            return Err(VirtioPciError::QueueSizeInvalid { index, size });
        }

        let device_type = device.device_type();
        let (class, subclass) = class_code(device_type);
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device_type as u16),
            revision: REVISION,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: SUBSYSTEM_ID,
        });
        let msix_vectors = interrupt.len();
        let layout = BarLayout::new(max_sizes.len(), msix_vectors);
        // Non-prefetchable: reading the ISR has a side effect.
        config.add_bar(
            VIRTIO_BAR,
            BarSpec {
                size: layout.size,
                kind: BarKind::Memory64,
                prefetchable: false,
            },
        )?;
        config.add_bar(
            NOTIFY_BAR,
            BarSpec {
                size: layout.notify_bar_size,
                kind: BarKind::Io,
                prefetchable: false,
            },
        )?;

        let region_cap = |cfg_type: u8, bar: usize, offset: u64, len: u64| {
            let mut cap = vec![
                PCI_CAP_ID_VENDOR,
                0,
                VIRTIO_PCI_CAP_LEN,
                cfg_type,
                bar as u8,
                0,
                0,
                0,
            ];
            cap.extend_from_slice(&(offset as u32).to_le_bytes());
            cap.extend_from_slice(&(len as u32).to_le_bytes());
            cap
        };
        config.add_capability(
            &region_cap(
                VIRTIO_PCI_CAP_COMMON_CFG,
                VIRTIO_BAR,
                COMMON_CFG_OFFSET,
                PAGE,
            ),
            &[],
        )?;
        let mut notify = region_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_BAR, 0, layout.notify_len);
        notify[2] += 4;
        notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        config.add_capability(&notify, &[])?;
        config.add_capability(
            &region_cap(VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_BAR, ISR_OFFSET, PAGE),
            &[],
        )?;
        config.add_capability(
            &region_cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                VIRTIO_BAR,
                DEVICE_CFG_OFFSET,
                PAGE,
            ),
            &[],
        )?;
        // The PCI_CFG window: the driver chooses bar, offset and length, then accesses
        // pci_cfg_data; all four fields are writable.
        let mut window = region_cap(VIRTIO_PCI_CAP_PCI_CFG, VIRTIO_BAR, 0, 0);
        window[2] += 4;
        window.extend_from_slice(&[0; 4]);
        let mut writable = vec![0u8; window.len()];
        writable[4] = 0xff;
        writable[8..].fill(0xff);
        let pci_cfg_cap = config.add_capability(&window, &writable)?;

        let msix = Msix::new(
            &mut config,
            interrupt,
            (VIRTIO_BAR, MSIX_TABLE_OFFSET as u32),
            (VIRTIO_BAR, layout.msix_pba_offset as u32),
        )?;
        let notifiers = max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioPciError::EventFd)?;
        let interrupt = Arc::new(VirtioPciInterrupt::new(
            max_sizes.len(),
            msix.state().clone(),
        ));

        Ok(Self {
            config,
            msix,
            device,
            layout,
            msix_vectors,
            pci_cfg_cap,
            offered_features: features & !UNSUPPORTED_FEATURES,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: max_sizes.into_iter().map(QueueRegs::new).collect(),
            notifiers,
            interrupt,
        })
    }

    /// Size of BAR 0.
    pub fn bar_size(&self) -> u64 {
        self.layout.size
    }

    /// The vector as the device accepted it: out-of-range vectors read back as NO_VECTOR,
    /// which is how the driver learns the mapping failed.
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector != VIRTIO_MSI_NO_VECTOR && usize::from(vector) >= self.msix_vectors {
            warn_limited!("driver chose MSI-X vector {vector} beyond the table");
            return VIRTIO_MSI_NO_VECTOR;
        }
        vector
    }

    fn selected_queue(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The common configuration structure as the driver currently sees it.
    fn common_cfg(&self) -> [u8; COMMON_CFG_LEN] {
        let half = |value: u64, select: u32| match select {
            0 => value as u32,
            1 => (value >> 32) as u32,
            _ => 0,
        };
        let queue = self.selected_queue();
        let vectors = &self.interrupt.queue_vectors;
        let mut cfg = [0u8; COMMON_CFG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            cfg[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(
            0x04,
            &half(self.offered_features, self.device_feature_select).to_le_bytes(),
        );
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(
            0x0c,
            &half(self.driver_features, self.driver_feature_select).to_le_bytes(),
        );
        put(
            0x10,
            &self
                .interrupt
                .config_vector
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.device_status()]);
        put(
            0x15,
            &[self.interrupt.config_generation.load(Ordering::SeqCst)],
        );
        put(0x16, &self.queue_select.to_le_bytes());
        if let Some(queue) = queue {
            let index = usize::from(self.queue_select);
            put(0x18, &queue.size.to_le_bytes());
            put(0x1a, &vectors[index].load(Ordering::SeqCst).to_le_bytes());
            put(0x1c, &u16::from(queue.enabled).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes());
            put(0x20, &queue.desc.to_le_bytes());
            put(0x28, &queue.driver.to_le_bytes());
            put(0x30, &queue.device.to_le_bytes());
        }
        cfg
    }

    fn read_common_cfg(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.common_cfg();
        data.fill(0);
        let start = offset as usize;
        if let Some(src) = cfg.get(start..start + data.len()) {
            data.copy_from_slice(src);
        }
    }

    fn write_common_cfg(&mut self, offset: u64, data: &[u8]) {
        let value = match *data {
            [a] => u64::from(a),
            [a, b] => u64::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            _ => match <[u8; 8]>::try_from(data) {
                Ok(bytes) => u64::from_le_bytes(bytes),
                Err(_) => {
                    debug!("ignoring {}-byte common config write", data.len());
                    return;
                }
            },
        };
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) => self.write_driver_features(value as u32),
            (0x10, 2) => {
                let vector = self.checked_vector(value as u16);
                self.interrupt.config_vector.store(vector, Ordering::SeqCst);
            }
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x1a, 2) => {
                let vector = self.checked_vector(value as u16);
                if let Some(slot) = self
                    .interrupt
                    .queue_vectors
                    .get(usize::from(self.queue_select))
                {
                    slot.store(vector, Ordering::SeqCst);
                }
            }
            (0x18, 2) | (0x1c, 2) | (0x20..=0x37, _) => {
                self.write_queue_reg(offset, data.len(), value)
            }
            _ => debug!(
                "ignoring {}-byte common config write at {offset:#x}",
                data.len()
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            warn_limited!("driver changed features after FEATURES_OK; ignored");
            return;
        }
        let shift = match self.driver_feature_select {
            0 => 0,
            1 => 32,
            select => {
                debug!("driver feature select {select} has no features");
                return;
            }
        };
        self.driver_features =
            (self.driver_features & !(0xffff_ffff << shift)) | (u64::from(value) << shift);
    }

    /// Queue size, enable and ring addresses: only while the queue is still disabled.
    fn write_queue_reg(&mut self, offset: u64, len: usize, value: u64) {
        let select = self.queue_select;
        let Some(queue) = self.queues.get_mut(usize::from(select)) else {
            debug!("write to queue register {offset:#x} of absent queue {select}");
            return;
        };
        if queue.enabled {
            warn_limited!("driver reconfigured enabled queue {select}; ignored");
            return;
        }
        match (offset, len) {
            (0x18, _) => {
                let size = value as u16;
                if size.is_power_of_two() && size <= queue.max_size {
                    queue.size = size;
                } else {
                    warn_limited!(
                        "queue {select}: invalid size {size} (max {})",
                        queue.max_size
                    );
                }
            }
            (0x1c, _) => {
                // Disabling needs VIRTIO_F_RING_RESET, which we do not offer.
                if value == 1 {
                    queue.enabled = true;
                } else {
                    debug!("queue {select}: queue_enable write of {value} ignored");
                }
            }
            (0x20..=0x37, 4 | 8) if offset.is_multiple_of(len as u64) => {
                let field = match (offset - 0x20) / 8 {
                    0 => &mut queue.desc,
                    1 => &mut queue.driver,
                    _ => &mut queue.device,
                };
                *field = match (len, offset % 8) {
                    (8, _) => value,
                    (_, 0) => (*field & !0xffff_ffff) | value,
                    _ => (*field & 0xffff_ffff) | (value << 32),
                };
            }
            _ => debug!("ignoring {len}-byte queue register write at {offset:#x}"),
        }
    }

    /// The status the driver reads: its own bits, and NEEDS_RESET once the device (or a failed
    /// activation) reported it.
    fn device_status(&self) -> u8 {
        if self.interrupt.needs_reset.load(Ordering::SeqCst) {
            self.status | STATUS_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // NEEDS_RESET belongs to the device: whatever the driver wrote back, it is not stored.
        let mut new = value & !STATUS_NEEDS_RESET;
        if new & old != old {
            warn_limited!(
                "driver tried to clear device status bits ({old:#x} -> {value:#x}); ignored"
            );
            return;
        }
        let newly_set = new & !old;
        if newly_set & STATUS_FEATURES_OK != 0 {
            match self.refusal(self.driver_features) {
                Some(why) => {
                    warn_limited!(
                        "virtio device type {}: refusing features {:#x}: {why}",
                        self.device.device_type(),
                        self.driver_features
                    );
                    new &= !STATUS_FEATURES_OK;
                }
                None => self.device.ack_features(self.driver_features),
            }
        }
        if newly_set & STATUS_DRIVER_OK != 0 && new & STATUS_FEATURES_OK == 0 {
            warn_limited!("DRIVER_OK without FEATURES_OK; ignored");
            new &= !STATUS_DRIVER_OK;
        }
        self.status = new;
        if new & !old & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// Why the driver's feature set cannot be accepted, if it cannot.
    ///
    /// A device behind the IOMMU offers `VIRTIO_F_ACCESS_PLATFORM` and requires it back (virtio
    /// 1.2 §6.1 lets a device fail FEATURES_OK then): a driver that leaves it out means to hand
    /// the device guest-physical addresses, which a device whose every access is translated
    /// must not be given, whatever its data path (the kernel's vhost would take them as
    /// addresses of its own without an IOTLB).
    fn refusal(&self, accepted: u64) -> Option<&'static str> {
        const ACCESS_PLATFORM: u64 = 1 << VIRTIO_F_ACCESS_PLATFORM;
        if accepted & !self.offered_features != 0 {
            Some("it accepts features the device did not offer")
        } else if accepted & (1 << VIRTIO_F_VERSION_1) == 0 {
            Some("VERSION_1 is required")
        } else if self.offered_features & ACCESS_PLATFORM != 0 && accepted & ACCESS_PLATFORM == 0 {
            Some("the device is behind the IOMMU and ACCESS_PLATFORM is required")
        } else {
            None
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::new();
        for (index, regs) in self.queues.iter().enumerate().filter(|(_, q)| q.enabled) {
            let Some(queue) = regs.build(event_idx) else {
                self.activation_failed(&format!("queue {index} is misconfigured: {regs:?}"));
                return;
            };
            let notifier = match self.notifiers[index].try_clone() {
                Ok(notifier) => notifier,
                Err(err) => {
                    self.activation_failed(&format!("cannot clone queue {index} notifier: {err}"));
                    return;
                }
            };
            queues.push(ActivatedQueue {
                index,
                queue,
                notifier,
            });
        }
        if let Err(err) = self.device.activate(queues, self.interrupt.clone()) {
            self.activation_failed(&err.to_string());
        }
    }

    /// Tells the driver the device is unusable until it resets it.
    fn activation_failed(&mut self, why: &str) {
        error_limited!(
            "virtio device type {} failed to activate: {why}",
            self.device.device_type()
        );
        if let Err(err) = virtio_devices::VirtioInterrupt::needs_reset(&*self.interrupt) {
            error_limited!("cannot signal NEEDS_RESET: {err}");
        }
    }

    /// Device reset (status 0): the device stops, and every transport register returns to its
    /// initial value. The MSI-X table is PCI state and survives.
    fn reset(&mut self) {
        self.device.reset();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        for queue in &mut self.queues {
            *queue = QueueRegs::new(queue.max_size);
        }
        self.interrupt.reset();
        // Drop notifications from the previous life so a new activation starts clean.
        for notifier in &self.notifiers {
            let _ = notifier.read();
        }
    }

    fn read_isr(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = self.interrupt.isr.swap(0, Ordering::SeqCst);
            }
        }
    }

    fn notify(&mut self, offset: u64) {
        let index = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        if self.device.serves_inline(index as usize) {
            self.device.serve_inline(index as usize);
            return;
        }
        match self.notifiers.get(index as usize) {
            Some(notifier) => {
                if let Err(err) = notifier.write(1) {
                    error_limited!("cannot signal queue {index}: {err}");
                }
            }
            None => debug!("notify for absent queue {index}"),
        }
    }

    /// (bar, offset, length) the driver set in the PCI_CFG capability, if it describes an
    /// access we can perform.
    fn pci_cfg_window(&self) -> Option<(usize, u64, usize)> {
        let reg = self.pci_cfg_cap / 4;
        let bar = (self.config.read_reg(reg + 1) & 0xff) as usize;
        let offset = u64::from(self.config.read_reg(reg + 2));
        let len = self.config.read_reg(reg + 3) as usize;
        let valid = (bar == VIRTIO_BAR || bar == NOTIFY_BAR)
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64);
        if !valid {
            debug!("PCI_CFG window bar {bar} offset {offset:#x} length {len} unusable");
        }
        valid.then_some((bar, offset, len))
    }

    fn pci_cfg_data_reg(&self) -> usize {
        self.pci_cfg_cap / 4 + 4
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        if reg_idx == self.pci_cfg_data_reg() {
            if let Some((bar, offset, len)) = self.pci_cfg_window() {
                let mut data = [0u8; 4];
                self.read_bar(bar, offset, &mut data[..len]);
                return u32::from_le_bytes(data);
            }
        }
        self.config.read_reg(reg_idx)
    }

    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) -> Vec<BarMove> {
        let moves = self.config.write_reg(reg_idx, offset, data);
        self.msix.config_written(&self.config, reg_idx);
        if reg_idx == self.pci_cfg_data_reg() {
            if let Some((bar, offset, len)) = self.pci_cfg_window() {
                let value = self.config.read_reg(reg_idx).to_le_bytes();
                self.write_bar(bar, offset, &value[..len]);
            }
        }
        moves
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != VIRTIO_BAR {
            data.fill(0);
            return;
        }
        if self.msix.read_bar(bar, offset, data) {
            return;
        }
        let end = offset.saturating_add(data.len() as u64);
        match offset {
            o if end <= ISR_OFFSET => self.read_common_cfg(o - COMMON_CFG_OFFSET, data),
            o if o >= ISR_OFFSET && end <= DEVICE_CFG_OFFSET => self.read_isr(o - ISR_OFFSET, data),
            o if o >= DEVICE_CFG_OFFSET && end <= MSIX_TABLE_OFFSET => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            _ => {
                debug!("read of {} bytes at BAR 0 offset {offset:#x}", data.len());
                data.fill(0);
            }
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let end = offset.saturating_add(data.len() as u64);
        if bar == NOTIFY_BAR {
            if end <= self.layout.notify_len {
                self.notify(offset);
            }
            return;
        }
        if bar != VIRTIO_BAR || self.msix.write_bar(bar, offset, data) {
            return;
        }
        match offset {
            o if end <= ISR_OFFSET => self.write_common_cfg(o - COMMON_CFG_OFFSET, data),
            o if o >= DEVICE_CFG_OFFSET && end <= MSIX_TABLE_OFFSET => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            _ => debug!("write of {} bytes at BAR 0 offset {offset:#x}", data.len()),
        }
    }

    fn ioeventfds(&self) -> Vec<(&EventFd, EventAddress)> {
        let base = self.config.bar_address(NOTIFY_BAR).unwrap_or(0);
        self.notifiers
            .iter()
            .enumerate()
            .filter(|(index, _)| !self.device.serves_inline(*index))
            .map(|(index, fd)| {
                let port = base + index as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
                // The allocator keeps I/O BARs inside the 16-bit port space.
                (fd, EventAddress::Port(port as u16))
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
