//! Transport tests driving `VirtioPciDevice` the way the Linux driver does.

use std::io;
use std::sync::{Arc, Mutex};

use pci::{EventAddress, PciDevice};
use virtio_devices::{ActivateError, ActivatedQueue, VirtioDevice, VirtioInterrupt};
use virtio_queue::QueueT;
use vm_device::{InterruptGroup, MsiMessage};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::interrupt::{ISR_CONFIG, ISR_QUEUE};

const BAR_BASE: u64 = 0x10_0000_0000;
/// Where the harness places the notification (I/O) BAR.
const NOTIFY_PORT: u16 = 0x1000;
const F_DEVICE: u64 = 1 << 0;
const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const F_RING_PACKED: u64 = 1 << VIRTIO_F_RING_PACKED;
const F_ACCESS_PLATFORM: u64 = 1 << VIRTIO_F_ACCESS_PLATFORM;
const S_ACK_DRIVER: u8 = 1 | 2;

/// Common config offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

#[derive(Debug, PartialEq, Eq)]
struct QueueInfo {
    index: usize,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    ready: bool,
}

#[derive(Default)]
struct Log {
    acked: Vec<u64>,
    activations: Vec<Vec<QueueInfo>>,
    notifiers: Vec<EventFd>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    served_inline: Vec<usize>,
}

struct FakeDevice {
    features: u64,
    max_sizes: Vec<u16>,
    fail_activate: bool,
    /// A queue the device serves on the notifying thread.
    inline_queue: Option<usize>,
    log: Arc<Mutex<Log>>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn ack_features(&mut self, features: u64) {
        self.log.lock().unwrap().acked.push(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = 0xa0u8.wrapping_add(offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        queues: Vec<ActivatedQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::MissingQueue(0));
        }
        let mut log = self.log.lock().unwrap();
        let info = queues
            .iter()
            .map(|q| QueueInfo {
                index: q.index,
                size: q.queue.size(),
                desc: q.queue.desc_table(),
                avail: q.queue.avail_ring(),
                used: q.queue.used_ring(),
                event_idx: q.queue.event_idx_enabled(),
                ready: q.queue.ready(),
            })
            .collect();
        log.activations.push(info);
        log.notifiers = queues.into_iter().map(|q| q.notifier).collect();
        log.interrupt = Some(interrupt);
        Ok(())
    }
    fn serves_inline(&self, index: usize) -> bool {
        self.inline_queue == Some(index)
    }
    fn serve_inline(&mut self, index: usize) {
        self.log.lock().unwrap().served_inline.push(index);
    }
    fn reset(&mut self) {
        let mut log = self.log.lock().unwrap();
        log.resets += 1;
        log.interrupt = None;
        log.notifiers.clear();
    }
}

struct FakeInterrupts {
    vectors: usize,
    updates: Mutex<Vec<(usize, MsiMessage, bool)>>,
    triggers: Mutex<Vec<usize>>,
}

impl FakeInterrupts {
    fn take_triggers(&self) -> Vec<usize> {
        std::mem::take(&mut self.triggers.lock().unwrap())
    }
}

impl InterruptGroup for FakeInterrupts {
    fn len(&self) -> usize {
        self.vectors
    }
    fn update(&self, index: usize, message: MsiMessage, masked: bool) -> io::Result<()> {
        self.updates.lock().unwrap().push((index, message, masked));
        Ok(())
    }
    fn trigger(&self, index: usize) -> io::Result<()> {
        self.triggers.lock().unwrap().push(index);
        Ok(())
    }
    fn notifier(&self, _index: usize) -> Option<&EventFd> {
        None
    }
}

struct Harness {
    dev: VirtioPciDevice,
    log: Arc<Mutex<Log>>,
    irq: Arc<FakeInterrupts>,
}

fn harness_with(features: u64, max_sizes: &[u16], fail_activate: bool) -> Harness {
    harness_of(FakeDevice {
        features,
        max_sizes: max_sizes.to_vec(),
        fail_activate,
        inline_queue: None,
        log: Arc::default(),
    })
}

fn harness_of(device: FakeDevice) -> Harness {
    let log = device.log.clone();
    let irq = Arc::new(FakeInterrupts {
        vectors: msix_vectors(&device),
        updates: Mutex::new(Vec::new()),
        triggers: Mutex::new(Vec::new()),
    });
    let mut dev = VirtioPciDevice::new(Box::new(device), irq.clone()).unwrap();
    dev.config_mut().set_bar_address(0, BAR_BASE).unwrap();
    dev.config_mut()
        .set_bar_address(NOTIFY_BAR, u64::from(NOTIFY_PORT))
        .unwrap();
    Harness { dev, log, irq }
}

fn harness() -> Harness {
    harness_with(F_VERSION_1 | F_EVENT_IDX | F_DEVICE, &[256, 128], false)
}

impl Harness {
    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.dev.read_bar(0, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    fn write(&mut self, offset: u64, value: u64, len: usize) {
        self.dev.write_bar(0, offset, &value.to_le_bytes()[..len]);
    }

    /// Notifies queue `index` as Linux does: its index, 16 bits, at the queue's register.
    fn notify(&mut self, index: u16) {
        let offset = u64::from(index) * u64::from(NOTIFY_OFF_MULTIPLIER);
        self.dev.write_bar(NOTIFY_BAR, offset, &index.to_le_bytes());
    }

    fn status(&mut self) -> u8 {
        self.read(DEVICE_STATUS, 1) as u8
    }

    fn set_status(&mut self, status: u8) {
        self.write(DEVICE_STATUS, status.into(), 1);
    }

    fn write_driver_features(&mut self, features: u64) {
        self.write(DRIVER_FEATURE_SELECT, 0, 4);
        self.write(DRIVER_FEATURE, features & 0xffff_ffff, 4);
        self.write(DRIVER_FEATURE_SELECT, 1, 4);
        self.write(DRIVER_FEATURE, features >> 32, 4);
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
    fn negotiate(&mut self, features: u64) -> u8 {
        self.set_status(S_ACK_DRIVER);
        self.write_driver_features(features);
        self.set_status(S_ACK_DRIVER | STATUS_FEATURES_OK);
        self.status()
    }

    fn setup_queue(&mut self, index: u16, size: u16, base: u64) {
        self.write(QUEUE_SELECT, index.into(), 2);
        self.write(QUEUE_SIZE, size.into(), 2);
        // Lo/hi halves, as Linux writes them.
        for (reg, addr) in [
            (QUEUE_DESC, base),
            (QUEUE_DRIVER, base + 0x1000),
            (QUEUE_DEVICE, base + 0x2000),
        ] {
            self.write(reg, addr & 0xffff_ffff, 4);
            self.write(reg + 4, addr >> 32, 4);
        }
        self.write(QUEUE_ENABLE, 1, 2);
    }

    fn driver_ok(&mut self) {
        let status = self.status();
        self.set_status(status | STATUS_DRIVER_OK);
    }

    fn config_byte(&mut self, offset: usize) -> u8 {
        (self.dev.read_config_register(offset / 4) >> (offset % 4 * 8)) as u8
    }

    fn config_write32(&mut self, offset: usize, value: u32) {
        self.dev
            .write_config_register(offset / 4, 0, &value.to_le_bytes());
    }

    /// Enables MSI-X and programs `vectors` unmasked entries.
    fn enable_msix(&mut self, vectors: u64) {
        let cap = self.dev.msix.cap_offset();
        self.dev
            .write_config_register(cap / 4, 2, &0x8000u16.to_le_bytes());
        for v in 0..vectors {
            let entry = MSIX_TABLE_OFFSET + v * 16;
            self.write(entry, 0xfee0_0000, 4);
            self.write(entry + 8, 0x40 + v, 4);
            self.write(entry + 12, 0, 4);
        }
    }
}

#[test]
fn pci_identity_matches_the_modern_virtio_ids() {
    let mut h = harness();
    assert_eq!(h.dev.read_config_register(0), 0x1042_1af4);
    assert_eq!(h.dev.read_config_register(2), 0x0100_0001);
    assert_eq!(h.dev.read_config_register(11), 0x0040_1af4);
    assert_eq!(h.config_byte(0x3d), 0, "no INTx pin");
    // BAR 0: 64-bit, non-prefetchable, sized to the layout.
    assert_eq!(h.dev.read_config_register(4), BAR_BASE as u32 | 0x4);
    h.config_write32(0x10, 0xffff_ffff);
    h.config_write32(0x14, 0xffff_ffff);
    let size_mask = u64::from(h.dev.read_config_register(5)) << 32
        | u64::from(h.dev.read_config_register(4) & !0xf);
    assert_eq!(!size_mask + 1, h.dev.bar_size());
    assert_eq!(h.dev.bar_size(), 0x8000);
    assert_eq!(class_code(VIRTIO_ID_NET), (0x02, 0x00));
    assert_eq!(class_code(23), (0xff, 0x00));
}

#[test]
fn capability_chain_is_what_linux_walks() {
    let mut h = harness();
    assert_ne!(
        h.dev.read_config_register(1) & (1 << 20),
        0,
        "capability list bit"
    );
    let mut virtio = Vec::new();
    let mut msix = None;
    let mut next = h.config_byte(0x34) as usize;
    let mut hops = 0;
    while next != 0 {
        hops += 1;
        assert!(hops < 48 && next >= 0x40 && next.is_multiple_of(4));
        let reg = |h: &mut Harness, off: usize| h.dev.read_config_register((next + off) / 4);
        match h.config_byte(next) {
            PCI_CAP_ID_VENDOR => {
                let cap_len = h.config_byte(next + 2);
                let cfg_type = h.config_byte(next + 3);
                let bar = h.config_byte(next + 4);
                let offset = reg(&mut h, 8);
                let length = reg(&mut h, 12);
                let extra = (cap_len > 16).then(|| reg(&mut h, 16));
                virtio.push((cfg_type, cap_len, bar, offset, length, extra));
            }
            0x11 => msix = Some((reg(&mut h, 0) >> 16, reg(&mut h, 4), reg(&mut h, 8))),
            id => panic!("unexpected capability {id:#x}"),
        }
        next = h.config_byte(next + 1) as usize;
    }
    assert_eq!(
        virtio,
        vec![
            (1, 16, 0, 0x0000, 0x1000, None),
            // Notifications: in the I/O BAR, one dword per queue.
            (2, 20, 2, 0, 8, Some(NOTIFY_OFF_MULTIPLIER)),
            (3, 16, 0, 0x1000, 0x1000, None),
            (4, 16, 0, 0x2000, 0x1000, None),
            (5, 20, 0, 0, 0, Some(0)),
        ]
    );
    // 3 vectors (2 queues + config), table and PBA in BAR 0 after the device config.
    assert_eq!(msix, Some((2, 0x3000, 0x4000)));
    // BAR 2 is an I/O BAR (bit 0) as large as the notify structure.
    assert_eq!(
        h.dev.read_config_register(4 + 2),
        u32::from(NOTIFY_PORT) | 1
    );
    h.config_write32(0x18, 0xffff_ffff);
    assert_eq!(h.dev.read_config_register(4 + 2), !(8 - 1) | 1);
    // Every queue's notify address lies inside the notify structure.
    let num_queues = h.read(NUM_QUEUES, 2);
    for q in 0..num_queues {
        h.write(QUEUE_SELECT, q, 2);
        let off = h.read(QUEUE_NOTIFY_OFF, 2);
        assert!(off * u64::from(NOTIFY_OFF_MULTIPLIER) + 2 <= 8);
    }
}

#[test]
fn features_are_offered_in_halves_without_unsupported_bits() {
    let mut h = harness_with(F_VERSION_1 | F_RING_PACKED | F_DEVICE, &[64], false);
    assert_eq!(h.read(DEVICE_FEATURE, 4), F_DEVICE);
    h.write(DEVICE_FEATURE_SELECT, 1, 4);
    assert_eq!(
        h.read(DEVICE_FEATURE, 4),
        1,
        "VERSION_1 only, packed hidden"
    );
    h.write(DEVICE_FEATURE_SELECT, 2, 4);
    assert_eq!(h.read(DEVICE_FEATURE, 4), 0);
    h.write(DEVICE_FEATURE, 0xffff_ffff, 4);
    assert_eq!(h.read(DEVICE_FEATURE, 4), 0, "read-only");
}

#[test]
fn accepted_features_reach_the_device() {
    let mut h = harness();
    let status = h.negotiate(F_VERSION_1 | F_EVENT_IDX);
    assert_eq!(status, S_ACK_DRIVER | STATUS_FEATURES_OK);
    assert_eq!(h.log.lock().unwrap().acked, vec![F_VERSION_1 | F_EVENT_IDX]);
    h.write(DRIVER_FEATURE_SELECT, 0, 4);
    assert_eq!(h.read(DRIVER_FEATURE, 4), F_EVENT_IDX);
    // Changing features after FEATURES_OK is ignored.
    h.write(DRIVER_FEATURE, F_DEVICE, 4);
    assert_eq!(h.read(DRIVER_FEATURE, 4), F_EVENT_IDX);
}

#[test]
fn features_not_offered_or_without_version_1_are_refused() {
    for features in [F_VERSION_1 | F_RING_PACKED, F_VERSION_1 | 1 << 20, F_DEVICE] {
        let mut h = harness();
        assert_eq!(h.negotiate(features), S_ACK_DRIVER, "{features:#x}");
        assert!(h.log.lock().unwrap().acked.is_empty());
        // DRIVER_OK cannot follow a refused FEATURES_OK.
        h.set_status(S_ACK_DRIVER | STATUS_DRIVER_OK);
        assert_eq!(h.status(), S_ACK_DRIVER);
        assert!(h.log.lock().unwrap().activations.is_empty());
    }
}

/// A device behind the IOMMU offers ACCESS_PLATFORM: a driver that leaves it out would hand
/// it guest-physical addresses, so FEATURES_OK does not stick and the device never starts.
#[test]
fn a_device_behind_the_iommu_requires_access_platform() {
    let mut h = harness_with(F_VERSION_1 | F_ACCESS_PLATFORM | F_DEVICE, &[64], false);
    assert_eq!(h.negotiate(F_VERSION_1 | F_DEVICE), S_ACK_DRIVER);
    assert!(h.log.lock().unwrap().acked.is_empty());
    h.setup_queue(0, 64, 0x10_000);
    h.set_status(S_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert_eq!(h.status(), S_ACK_DRIVER);
    assert!(h.log.lock().unwrap().activations.is_empty());

    // Asked again with the bit, after a reset, it is accepted.
    h.set_status(0);
    let features = F_VERSION_1 | F_ACCESS_PLATFORM;
    assert_eq!(h.negotiate(features), S_ACK_DRIVER | STATUS_FEATURES_OK);
    assert_eq!(h.log.lock().unwrap().acked, vec![features]);

    // A device outside the IOMMU does not offer it, and needs nothing of the sort.
    let mut h = harness_with(F_VERSION_1 | F_DEVICE, &[64], false);
    assert_eq!(h.negotiate(F_VERSION_1), S_ACK_DRIVER | STATUS_FEATURES_OK);
}

#[test]
fn status_bits_cannot_be_cleared_except_by_reset() {
    let mut h = harness();
    h.negotiate(F_VERSION_1);
    h.set_status(1);
    assert_eq!(h.status(), S_ACK_DRIVER | STATUS_FEATURES_OK);
    assert_eq!(h.log.lock().unwrap().resets, 0);
}

#[test]
fn queue_registers_validate_and_read_back() {
    let mut h = harness();
    assert_eq!(h.read(NUM_QUEUES, 2), 2);
    h.write(QUEUE_SELECT, 1, 2);
    assert_eq!(h.read(QUEUE_SIZE, 2), 128);
    assert_eq!(h.read(QUEUE_NOTIFY_OFF, 2), 1);
    assert_eq!(
        h.read(QUEUE_MSIX_VECTOR, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR)
    );
    for bad in [0, 100, 256] {
        h.write(QUEUE_SIZE, bad, 2);
        assert_eq!(h.read(QUEUE_SIZE, 2), 128, "size {bad}");
    }
    h.write(QUEUE_SIZE, 32, 2);
    assert_eq!(h.read(QUEUE_SIZE, 2), 32);
    // 64-bit and 32-bit halves both work.
    h.write(QUEUE_DESC, 0x1_2345_6000, 8);
    h.write(QUEUE_DRIVER + 4, 0x7, 4);
    h.write(QUEUE_DRIVER, 0x8000, 4);
    assert_eq!(h.read(QUEUE_DESC, 8), 0x1_2345_6000);
    assert_eq!(h.read(QUEUE_DRIVER, 4), 0x8000);
    assert_eq!(h.read(QUEUE_DRIVER + 4, 4), 0x7);
    // Enabled queues are frozen.
    h.write(QUEUE_ENABLE, 1, 2);
    h.write(QUEUE_SIZE, 64, 2);
    h.write(QUEUE_DESC, 0, 8);
    h.write(QUEUE_ENABLE, 0, 2);
    assert_eq!(h.read(QUEUE_SIZE, 2), 32);
    assert_eq!(h.read(QUEUE_DESC, 8), 0x1_2345_6000);
    assert_eq!(h.read(QUEUE_ENABLE, 2), 1);
    // Absent queues read as size 0 and ignore writes.
    h.write(QUEUE_SELECT, 7, 2);
    h.write(QUEUE_SIZE, 16, 2);
    h.write(QUEUE_ENABLE, 1, 2);
    assert_eq!(h.read(QUEUE_SIZE, 2), 0);
    assert_eq!(h.read(QUEUE_ENABLE, 2), 0);
}

#[test]
fn driver_ok_activates_enabled_queues_with_their_geometry() {
    let mut h = harness();
    h.negotiate(F_VERSION_1 | F_EVENT_IDX);
    h.setup_queue(1, 64, 0x1_0000_0000);
    h.driver_ok();
    assert_eq!(
        h.status(),
        S_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    );
    let log = h.log.lock().unwrap();
    assert_eq!(
        log.activations,
        vec![vec![QueueInfo {
            index: 1,
            size: 64,
            desc: 0x1_0000_0000,
            avail: 0x1_0000_1000,
            used: 0x1_0000_2000,
            event_idx: true,
            ready: true,
        }]]
    );
}

#[test]
fn event_idx_follows_negotiation() {
    let mut h = harness();
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 256, 0x10_0000);
    h.driver_ok();
    assert!(!h.log.lock().unwrap().activations[0][0].event_idx);
}

#[test]
fn misaligned_ring_needs_reset_without_activation() {
    let mut h = harness();
    h.enable_msix(3);
    h.write(CONFIG_MSIX_VECTOR, 2, 2);
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 256, 0x10_0008);
    h.driver_ok();
    assert!(h.log.lock().unwrap().activations.is_empty());
    assert_ne!(h.status() & STATUS_NEEDS_RESET, 0);
    assert_eq!(h.irq.take_triggers(), vec![2]);
}

#[test]
fn failed_activation_sets_needs_reset_and_notifies_config() {
    let mut h = harness_with(F_VERSION_1, &[16], true);
    h.enable_msix(2);
    h.write(CONFIG_MSIX_VECTOR, 1, 2);
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 16, 0x10_0000);
    h.driver_ok();
    let status = h.status();
    assert_ne!(status & STATUS_NEEDS_RESET, 0);
    assert_eq!(h.read(CONFIG_GENERATION, 1), 1);
    assert_eq!(h.irq.take_triggers(), vec![1]);
    assert_eq!(h.read(ISR_OFFSET, 1), u64::from(ISR_CONFIG));
    // The driver writing back status without NEEDS_RESET cannot clear it.
    h.set_status(status & !STATUS_NEEDS_RESET);
    assert_ne!(h.status() & STATUS_NEEDS_RESET, 0);
    h.set_status(0);
    assert_eq!(h.status(), 0);
}

/// A device that finds a queue broken (from its worker thread) asks for a reset: the driver
/// reads NEEDS_RESET and gets one config interrupt however often the device asks, cannot clear
/// the bit itself, and its reset brings the device back.
#[test]
fn a_broken_queue_sets_needs_reset_until_the_driver_resets() {
    let mut h = harness();
    h.enable_msix(3);
    h.write(CONFIG_MSIX_VECTOR, 2, 2);
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 256, 0x10_0000);
    h.driver_ok();
    let status = h.status();
    assert_eq!(status & STATUS_NEEDS_RESET, 0);
    let interrupt = h.log.lock().unwrap().interrupt.clone().unwrap();
    std::thread::spawn(move || {
        interrupt.needs_reset().unwrap();
        interrupt.needs_reset().unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(h.status(), status | STATUS_NEEDS_RESET);
    assert_eq!(h.irq.take_triggers(), vec![2], "one config interrupt");
    assert_eq!(h.read(CONFIG_GENERATION, 1), 1);
    assert_eq!(h.read(ISR_OFFSET, 1), u64::from(ISR_CONFIG));
    h.set_status(status);
    assert_ne!(
        h.status() & STATUS_NEEDS_RESET,
        0,
        "the driver cannot clear it"
    );

    h.set_status(0);
    assert_eq!(h.status(), 0);
    h.write(CONFIG_MSIX_VECTOR, 2, 2);
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 256, 0x10_0000);
    h.driver_ok();
    assert_eq!(h.status() & STATUS_NEEDS_RESET, 0);
    assert_eq!(
        h.log.lock().unwrap().activations.len(),
        2,
        "activated again"
    );
    let interrupt = h.log.lock().unwrap().interrupt.clone().unwrap();
    interrupt.needs_reset().unwrap();
    assert_eq!(
        h.irq.take_triggers(),
        vec![2],
        "reported again after the reset"
    );
}

#[test]
fn reset_stops_the_device_and_clears_transport_state() {
    let mut h = harness();
    h.enable_msix(3);
    h.write(CONFIG_MSIX_VECTOR, 0, 2);
    h.negotiate(F_VERSION_1 | F_EVENT_IDX);
    h.setup_queue(1, 64, 0x20_0000);
    h.write(QUEUE_MSIX_VECTOR, 2, 2);
    h.driver_ok();
    h.notify(1);
    h.set_status(0);

    assert_eq!(h.log.lock().unwrap().resets, 1);
    assert!(h.log.lock().unwrap().interrupt.is_none());
    assert_eq!(h.status(), 0);
    assert_eq!(
        h.read(CONFIG_MSIX_VECTOR, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR)
    );
    assert_eq!(h.read(QUEUE_SELECT, 2), 0);
    h.write(DRIVER_FEATURE_SELECT, 1, 4);
    assert_eq!(h.read(DRIVER_FEATURE, 4), 0);
    h.write(QUEUE_SELECT, 1, 2);
    assert_eq!(h.read(QUEUE_SIZE, 2), 128);
    assert_eq!(h.read(QUEUE_ENABLE, 2), 0);
    assert_eq!(h.read(QUEUE_DESC, 8), 0);
    assert_eq!(
        h.read(QUEUE_MSIX_VECTOR, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR)
    );
    // The stale notification was drained.
    assert!(h.dev.notifiers[1].read().is_err());

    // The device can be brought up again.
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 128, 0x30_0000);
    h.driver_ok();
    let log = h.log.lock().unwrap();
    assert_eq!(log.activations.len(), 2);
    assert_eq!(log.activations[1][0].index, 0);
    assert_eq!(log.acked, vec![F_VERSION_1 | F_EVENT_IDX, F_VERSION_1]);
}

#[test]
fn interrupts_follow_the_vectors_the_driver_chose() {
    let mut h = harness();
    h.enable_msix(3);
    h.write(CONFIG_MSIX_VECTOR, 0, 2);
    assert_eq!(h.read(CONFIG_MSIX_VECTOR, 2), 0);
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 256, 0x10_0000);
    h.write(QUEUE_MSIX_VECTOR, 2, 2);
    // A vector beyond the table reads back as NO_VECTOR.
    h.write(QUEUE_SELECT, 1, 2);
    h.write(QUEUE_MSIX_VECTOR, 3, 2);
    assert_eq!(
        h.read(QUEUE_MSIX_VECTOR, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR)
    );
    h.setup_queue(1, 128, 0x20_0000);
    h.driver_ok();

    let interrupt = h.log.lock().unwrap().interrupt.clone().unwrap();
    interrupt.notify_queue(0).unwrap();
    assert_eq!(h.irq.take_triggers(), vec![2]);
    interrupt.notify_queue(1).unwrap();
    assert!(h.irq.take_triggers().is_empty());
    assert_eq!(h.read(ISR_OFFSET, 1), u64::from(ISR_QUEUE));
    assert_eq!(h.read(ISR_OFFSET, 1), 0, "ISR read clears it");
    interrupt.notify_config().unwrap();
    assert_eq!(h.irq.take_triggers(), vec![0]);
    assert_eq!(h.read(CONFIG_GENERATION, 1), 1);
    assert!(interrupt.notify_queue(2).is_err());

    // Masking the vector parks the interrupt in the PBA until unmasked.
    let entry2 = MSIX_TABLE_OFFSET + 2 * 16;
    h.write(entry2 + 12, 1, 4);
    interrupt.notify_queue(0).unwrap();
    assert!(h.irq.take_triggers().is_empty());
    assert_eq!(h.read(h.dev.layout.msix_pba_offset, 8), 0b100);
    h.write(entry2 + 12, 0, 4);
    assert_eq!(h.irq.take_triggers(), vec![2]);
    assert!(h.irq.updates.lock().unwrap().contains(&(
        2,
        MsiMessage {
            address: 0xfee0_0000,
            data: 0x42
        },
        false
    )));
}

#[test]
fn notify_writes_signal_the_queue_eventfd() {
    let mut h = harness();
    let addresses: Vec<EventAddress> = h.dev.ioeventfds().iter().map(|(_, a)| *a).collect();
    assert_eq!(
        addresses,
        vec![
            EventAddress::Port(NOTIFY_PORT),
            EventAddress::Port(NOTIFY_PORT + 4)
        ]
    );

    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 256, 0x10_0000);
    h.setup_queue(1, 128, 0x20_0000);
    h.driver_ok();
    // Linux writes the queue index as a 16-bit value at the queue's notify address.
    h.notify(1);
    let log = h.log.lock().unwrap();
    assert_eq!(log.notifiers[1].read().unwrap(), 1);
    assert!(log.notifiers[0].read().is_err(), "queue 0 was not notified");
    drop(log);
    // The registered ioeventfd is the very eventfd the device waits on.
    h.dev.ioeventfds()[0].0.write(3).unwrap();
    assert_eq!(h.log.lock().unwrap().notifiers[0].read().unwrap(), 3);
    // Past the last queue: ignored.
    h.notify(2);
}

#[test]
fn inline_queues_get_no_ioeventfd_and_are_served_on_the_writing_thread() {
    let mut h = harness_of(FakeDevice {
        features: F_VERSION_1,
        max_sizes: vec![256, 128],
        fail_activate: false,
        inline_queue: Some(0),
        log: Arc::default(),
    });
    let addresses: Vec<EventAddress> = h.dev.ioeventfds().iter().map(|(_, a)| *a).collect();
    assert_eq!(
        addresses,
        vec![EventAddress::Port(NOTIFY_PORT + 4)],
        "only queue 1 goes through KVM"
    );
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 256, 0x10_0000);
    h.setup_queue(1, 128, 0x20_0000);
    h.driver_ok();
    h.notify(0);
    h.notify(1);
    let log = h.log.lock().unwrap();
    assert_eq!(log.served_inline, vec![0]);
    assert!(log.notifiers[0].read().is_err(), "queue 0 is not signalled");
    assert_eq!(log.notifiers[1].read().unwrap(), 1);
}

#[test]
fn ioeventfds_follow_a_bar_move() {
    let mut h = harness();
    h.config_write32(0x04, u32::from(pci::COMMAND_IO_SPACE));
    let moves = h
        .dev
        .write_config_register(0x18 / 4, 0, &0x2000u32.to_le_bytes());
    assert_eq!(moves.len(), 1);
    assert_eq!(h.dev.ioeventfds()[1].1, EventAddress::Port(0x2004));
}

#[test]
fn device_config_is_forwarded() {
    let mut h = harness();
    assert_eq!(h.read(DEVICE_CFG_OFFSET + 4, 2), 0xa5a4);
    h.write(DEVICE_CFG_OFFSET + 8, 0x77, 1);
    assert_eq!(h.log.lock().unwrap().config_writes, vec![(8, vec![0x77])]);
}

#[test]
fn pci_cfg_window_reaches_bar0() {
    let mut h = harness();
    let cap = h.dev.pci_cfg_cap;
    // bar 0, offset of num_queues, length 2.
    h.dev.write_config_register(cap / 4 + 1, 0, &[0]);
    h.config_write32(cap + 8, NUM_QUEUES as u32);
    h.config_write32(cap + 12, 2);
    assert_eq!(h.dev.read_config_register(cap / 4 + 4), 2);
    // Writing device_status through the window.
    h.config_write32(cap + 8, DEVICE_STATUS as u32);
    h.config_write32(cap + 12, 1);
    h.config_write32(cap + 16, u32::from(S_ACK_DRIVER));
    assert_eq!(h.status(), S_ACK_DRIVER);
    // Unusable windows (length 3, other BAR) fall back to the raw register.
    h.config_write32(cap + 12, 3);
    assert_eq!(
        h.dev.read_config_register(cap / 4 + 4),
        u32::from(S_ACK_DRIVER)
    );
}

#[test]
fn construction_rejects_devices_the_transport_cannot_drive() {
    let device = |features, sizes: &[u16]| {
        Box::new(FakeDevice {
            features,
            max_sizes: sizes.to_vec(),
            fail_activate: false,
            inline_queue: None,
            log: Arc::default(),
        })
    };
    let irq = || -> Arc<dyn InterruptGroup> {
        Arc::new(FakeInterrupts {
            vectors: 2,
            updates: Mutex::default(),
            triggers: Mutex::default(),
        })
    };
    assert!(matches!(
        VirtioPciDevice::new(device(F_DEVICE, &[16]), irq()),
        Err(VirtioPciError::VersionOneMissing)
    ));
    assert!(matches!(
        VirtioPciDevice::new(device(F_VERSION_1, &[16, 100]), irq()),
        Err(VirtioPciError::QueueSizeInvalid {
            index: 1,
            size: 100
        })
    ));
    assert!(matches!(
        VirtioPciDevice::new(device(F_VERSION_1, &[]), irq()),
        Err(VirtioPciError::QueueCountInvalid(0))
    ));
    let no_vectors: Arc<dyn InterruptGroup> = Arc::new(FakeInterrupts {
        vectors: 0,
        updates: Mutex::default(),
        triggers: Mutex::default(),
    });
    assert!(matches!(
        VirtioPciDevice::new(device(F_VERSION_1, &[16]), no_vectors),
        Err(VirtioPciError::Pci(pci::PciError::MsixVectorCountInvalid(
            0
        )))
    ));
}

#[test]
fn arbitrary_guest_accesses_never_panic() {
    let mut h = harness();
    let size = h.dev.bar_size();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = [1, 2, 3, 4, 8, 16][(seed % 6) as usize];
        let offset = (seed >> 8) % (size + 16);
        let mut data = vec![(seed >> 40) as u8; len];
        if seed & (1 << 60) != 0 {
            h.dev.write_bar(0, offset, &data);
        } else {
            h.dev.read_bar(0, offset, &mut data);
        }
        let reg = ((seed >> 20) % 70) as usize;
        h.dev
            .write_config_register(reg, (seed >> 30) % 4, &data[..len.min(4)]);
        h.dev.read_config_register(reg);
    }
    h.dev.read_bar(0, u64::MAX, &mut [0; 4]);
    h.dev.write_bar(0, u64::MAX - 1, &[0; 4]);
    h.dev.write_bar(1, 0, &[0; 4]);
}

/// The VMM's wiring: root, ECAM, BAR allocation, MMIO bus, ioeventfds.
#[test]
fn works_end_to_end_on_a_pci_root() {
    use pci::{BarAllocator, PciConfigMmio, PciRoot};
    use vm_device::{Bus, BusDevice};

    let Harness { dev, log, .. } = harness();
    let device: Arc<Mutex<VirtioPciDevice>> = Arc::new(Mutex::new(dev));
    let root = Arc::new(Mutex::new(PciRoot::new()));
    root.lock().unwrap().add_device(2, device.clone()).unwrap();
    let mut allocator = BarAllocator::new(
        (0xc000_0000, 0x2000_0000),
        Some((1 << 36, 1 << 30)),
        Some((0x1000, 0x1000)),
    )
    .unwrap();
    let dyn_device: Arc<Mutex<dyn PciDevice>> = device.clone();
    let mappings = allocator.allocate(&dyn_device).unwrap();
    let (mut mmio, mut pio) = (Bus::new(), Bus::new());
    for m in &mappings {
        let bus = if m.kind == pci::BarKind::Io {
            &mut pio
        } else {
            &mut mmio
        };
        bus.insert(m.region.clone(), m.base, m.len).unwrap();
    }
    let ecam: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(PciConfigMmio::new(root.clone())));
    mmio.insert(ecam, 0xe000_0000, pci::ECAM_BUS_SIZE).unwrap();

    let mut id = [0u8; 4];
    assert!(mmio.read(0xe000_0000 | 2 << 15, &mut id));
    assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
    let bar0 = mappings[0].base;
    assert_eq!(bar0, 1 << 36);
    let fds = device.lock().unwrap().ioeventfds().len();
    assert_eq!(fds, 2);
    assert_eq!(
        device.lock().unwrap().ioeventfds()[1].1,
        EventAddress::Port(0x1004)
    );

    // Drive the device through the bus as the guest would.
    let mut num_queues = [0u8; 2];
    assert!(mmio.read(bar0 + NUM_QUEUES, &mut num_queues));
    assert_eq!(u16::from_le_bytes(num_queues), 2);
    mmio.write(bar0 + DEVICE_STATUS, &[S_ACK_DRIVER]);
    mmio.write(bar0 + DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
    mmio.write(bar0 + DRIVER_FEATURE, &1u32.to_le_bytes());
    mmio.write(bar0 + DEVICE_STATUS, &[S_ACK_DRIVER | STATUS_FEATURES_OK]);
    mmio.write(bar0 + QUEUE_ENABLE, &1u16.to_le_bytes());
    mmio.write(
        bar0 + DEVICE_STATUS,
        &[S_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK],
    );
    assert_eq!(log.lock().unwrap().acked, vec![F_VERSION_1]);
    assert_eq!(log.lock().unwrap().activations[0][0].index, 0);
    assert!(pio.write(0x1000, &0u16.to_le_bytes()));
    assert_eq!(log.lock().unwrap().notifiers[0].read().unwrap(), 1);
}
