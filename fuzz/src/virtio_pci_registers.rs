//! The virtio-pci transport (`virtio_pci::VirtioPciDevice`) around a recording device:
//! arbitrary reads and writes of BAR 0 (common configuration, ISR, device configuration,
//! MSI-X table and PBA), the notification BAR and configuration space (including the
//! PCI_CFG capability's window), mixed with what the device itself does (interrupts,
//! NEEDS_RESET).
//!
//! Input layout: byte 0 = the device (bits 0-1 queues - 1, bit 2 EVENT_IDX and bit 3
//! RING_PACKED offered, bit 4 activation fails, bit 5 one MSI-X vector fewer than asked);
//! one byte per queue of its maximum size (a power of two up to 32768); then operations of
//! one kind byte and up to 11 bytes of arguments until the input ends.
//!
//! Asserts after every operation, reading the common configuration back through BAR 0 with
//! every feature and queue select (restored afterwards): no read leaks the bytes its buffer
//! held; the features offered are the device's minus those the transport cannot honour, with
//! VERSION_1; `num_queues` is the device's; each queue's size is a power of two no larger than
//! its maximum, `queue_enable` is 0 or 1, `queue_notify_off` is its index, and a queue past
//! the last reads zero; MSI-X vectors read back as NO_VECTOR or inside the table; the device
//! status only gains bits, NEEDS_RESET and FAILED included, until a reset, which brings every
//! register back to its initial value; DRIVER_OK needs FEATURES_OK, which needs VERSION_1 and
//! features offered, frozen from then on and the ones the device was given; the device is
//! activated once per DRIVER_OK, with ready queues of the sizes and EVENT_IDX configured, or
//! NEEDS_RESET says why not; the ISR holds only the queue and config bits and reads clear it;
//! the configuration header's IDs never change.

use std::sync::{Arc, Mutex};

use pci::PciDevice;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_SR_IOV,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_devices::{ActivateError, ActivatedQueue, VirtioDevice, VirtioInterrupt};
use virtio_pci::{VirtioPciDevice, VIRTIO_MSI_NO_VECTOR};
use virtio_queue::QueueT;

use crate::msix::RecordingGroup;
use crate::ring::Input;

const NOTIFY_BAR: usize = 2;
const STATUS: u64 = 0x14;
const UNSUPPORTED: u64 = (1 << VIRTIO_F_RING_PACKED)
    | (1 << VIRTIO_F_NOTIFICATION_DATA)
    | (1 << VIRTIO_F_RING_RESET)
    | (1 << VIRTIO_F_SR_IOV);
const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
const PCI_CAP_ID_VENDOR: u8 = 0x09;
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// One queue as the device was handed it.
#[derive(Debug)]
struct Activated {
    index: usize,
    size: u16,
    ready: bool,
    event_idx: bool,
}

/// What the transport did to the device.
#[derive(Default)]
struct Log {
    acked: Vec<u64>,
    activations: Vec<Vec<Activated>>,
    resets: usize,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

struct RecordingDevice {
    features: u64,
    max_sizes: Vec<u16>,
    fail_activate: bool,
    log: Arc<Mutex<Log>>,
}

impl VirtioDevice for RecordingDevice {
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
            *byte = (offset as u8).wrapping_add(i as u8) ^ 0x3c;
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        queues: Vec<ActivatedQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let mut log = self.log.lock().unwrap();
        log.interrupt = Some(interrupt);
        if self.fail_activate {
            return Err(ActivateError::MissingQueue(0));
        }
        let queues = queues
            .iter()
            .map(|q| Activated {
                index: q.index,
                size: q.queue.size(),
                ready: q.queue.ready(),
                event_idx: q.queue.event_idx_enabled(),
            })
            .collect();
        log.activations.push(queues);
        Ok(())
    }
    fn reset(&mut self) {
        let mut log = self.log.lock().unwrap();
        log.resets += 1;
        log.interrupt = None;
    }
}

/// The common configuration as read back, for every select.
#[derive(Debug, PartialEq, Eq)]
struct Common {
    device_features: u64,
    driver_features: u64,
    config_vector: u16,
    status: u8,
    /// Per queue, and one past the last: size, vector, enable, notify_off, desc, driver, device.
    queues: Vec<(u16, u16, u16, u16, u64, u64, u64)>,
}

/// A BAR 0 read, made twice over different fill bytes: what the transport wrote must not
/// depend on what the buffer held. Not for the ISR, whose reads clear it.
fn read(dev: &mut VirtioPciDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut first = vec![0x5a; len];
    dev.read_bar(0, offset, &mut first);
    let mut second = vec![0xa5; len];
    dev.read_bar(0, offset, &mut second);
    assert_eq!(first, second, "read of {len} bytes at {offset:#x} leaks");
    first
}

fn read_u(dev: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..len].copy_from_slice(&read(dev, offset, len));
    u64::from_le_bytes(bytes)
}

fn write_u(dev: &mut VirtioPciDevice, offset: u64, len: usize, value: u64) {
    dev.write_bar(0, offset, &value.to_le_bytes()[..len]);
}

/// Reads the common configuration under every select, restoring the selects.
fn common(dev: &mut VirtioPciDevice, queues: usize) -> Common {
    let selects = [0x00, 0x08, 0x16].map(|o| (o, read_u(dev, o, if o == 0x16 { 2 } else { 4 })));
    let mut features = [0u64; 2];
    for (half, value) in features.iter_mut().enumerate() {
        write_u(dev, 0x00, 4, half as u64);
        *value = read_u(dev, 0x04, 4) << (32 * half);
    }
    let mut driver = [0u64; 2];
    for (half, value) in driver.iter_mut().enumerate() {
        write_u(dev, 0x08, 4, half as u64);
        *value = read_u(dev, 0x0c, 4) << (32 * half);
    }
    let queues = (0..=queues as u64)
        .map(|q| {
            write_u(dev, 0x16, 2, q);
            let r16 = |dev: &mut VirtioPciDevice, o| read_u(dev, o, 2) as u16;
            (
                r16(dev, 0x18),
                r16(dev, 0x1a),
                r16(dev, 0x1c),
                r16(dev, 0x1e),
                read_u(dev, 0x20, 8),
                read_u(dev, 0x28, 8),
                read_u(dev, 0x30, 8),
            )
        })
        .collect();
    for (offset, value) in selects {
        write_u(dev, offset, if offset == 0x16 { 2 } else { 4 }, value);
    }
    Common {
        device_features: features[0] | features[1],
        driver_features: driver[0] | driver[1],
        config_vector: read_u(dev, 0x10, 2) as u16,
        status: read_u(dev, STATUS, 1) as u8,
        queues,
    }
}

/// Offset of the PCI_CFG capability, found by walking the list as a driver does.
fn pci_cfg_cap(dev: &mut VirtioPciDevice) -> usize {
    let byte = |dev: &mut VirtioPciDevice, at: usize| {
        (dev.read_config_register(at / 4) >> (at % 4 * 8)) as u8
    };
    let mut at = usize::from(byte(dev, 0x34));
    while at != 0 {
        if byte(dev, at) == PCI_CAP_ID_VENDOR && byte(dev, at + 3) == VIRTIO_PCI_CAP_PCI_CFG {
            return at;
        }
        at = usize::from(byte(dev, at + 1));
    }
    panic!("no PCI_CFG capability");
}

/// One input; any byte string is valid.
pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let shape = input.u8();
    let queues = usize::from(shape & 3) + 1;
    let mut features = (1 << VIRTIO_F_VERSION_1) | 0b1011;
    if shape & 4 != 0 {
        features |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    if shape & 8 != 0 {
        features |= 1 << VIRTIO_F_RING_PACKED;
    }
    let max_sizes: Vec<u16> = (0..queues).map(|_| 1 << (input.u8() % 16)).collect();
    let vectors = queues + 1 - usize::from(shape & 0x20 != 0);
    let log = Arc::new(Mutex::new(Log::default()));
    let device = RecordingDevice {
        features,
        max_sizes: max_sizes.clone(),
        fail_activate: shape & 0x10 != 0,
        log: log.clone(),
    };
    let group = RecordingGroup::new(vectors);
    let mut dev = VirtioPciDevice::new(Box::new(device), group).unwrap();
    let ids = [0, 11].map(|r| dev.read_config_register(r));
    let cfg_cap = pci_cfg_cap(&mut dev);
    let initial = common(&mut dev, queues);
    let offered = features & !UNSUPPORTED;
    assert_eq!(initial.device_features, offered);
    assert_eq!(initial.status, 0);

    let mut last = initial;
    let mut resets = 0;
    let mut activations = 0;
    while !input.0.is_empty() {
        let kind = input.u8();
        let len = [1, 2, 4, 8, 3][usize::from(input.u8() % 5)];
        let raw = u64::from(input.u16()) | u64::from(input.u16()) << 16;
        let value = u64::from(input.u16()) | u64::from(input.u16()) << 16;
        let value = value | value << 32;
        let mut isr_read = false;
        match kind % 8 {
            // Mostly the common configuration, sometimes anywhere in BAR 0.
            0 | 1 => {
                let offset = if raw & 0x8000_0000 != 0 {
                    raw & 0xffff
                } else {
                    raw % 0x40
                };
                write_u(&mut dev, offset, len, value);
            }
            2 => {
                let offset = raw % 0x6000;
                if (0x1000..0x2000).contains(&offset) {
                    let mut data = vec![0x5a; len];
                    dev.read_bar(0, offset, &mut data);
                    let isr = u64::from(data[0]);
                    assert!(offset != 0x1000 || isr & !3 == 0, "ISR {isr:#x}");
                    assert!(data[usize::from(offset == 0x1000)..]
                        .iter()
                        .all(|&b| b == 0));
                    isr_read = offset == 0x1000;
                } else {
                    read(&mut dev, offset, len);
                }
            }
            3 => dev.write_bar(NOTIFY_BAR, raw % 0x20, &value.to_le_bytes()[..len]),
            4 => {
                let mut data = vec![0x5a; len];
                dev.read_bar((raw % 6) as usize, raw >> 8, &mut data);
                if raw % 6 != 0 {
                    assert!(data.iter().all(|&b| b == 0), "BAR {} reads zero", raw % 6);
                }
            }
            // Configuration space, mostly the PCI_CFG window.
            5 => {
                let reg = if raw & 0x80 != 0 {
                    cfg_cap / 4 + (raw as usize >> 8) % 5
                } else {
                    (raw as usize >> 8) % 64
                };
                let offset = (raw >> 4) % 4;
                if offset as usize + len <= 4 {
                    dev.write_config_register(reg, offset, &value.to_le_bytes()[..len]);
                }
            }
            6 => {
                let reg = cfg_cap / 4 + 4;
                isr_read = true;
                dev.read_config_register(if raw & 1 != 0 {
                    reg
                } else {
                    (raw >> 8) as usize % 64
                });
            }
            // What the device does once activated.
            _ => {
                let interrupt = log.lock().unwrap().interrupt.clone();
                if let Some(interrupt) = interrupt {
                    let _ = match raw % 3 {
                        0 => interrupt.needs_reset(),
                        1 => interrupt.notify_config(),
                        _ => interrupt.notify_queue((raw >> 8) as usize % (queues + 1)),
                    };
                }
            }
        }
        let now = common(&mut dev, queues);
        let recorded = log.lock().unwrap();
        let reset = recorded.resets > resets;
        resets = recorded.resets;
        check(&last, &now, reset, offered, &max_sizes, vectors);
        let activated = recorded.activations.len() - activations;
        activations = recorded.activations.len();
        let driver_ok = now.status & DRIVER_OK != 0 && last.status & DRIVER_OK == 0;
        assert!(
            activated <= usize::from(driver_ok),
            "activated once per DRIVER_OK"
        );
        if activated == 1 {
            check_activation(recorded.activations.last().unwrap(), &now, &max_sizes);
        } else if driver_ok {
            assert_ne!(
                now.status & NEEDS_RESET,
                0,
                "a failed activation is reported"
            );
        }
        drop(recorded);
        if !isr_read {
            let mut isr = [0u8; 1];
            dev.read_bar(0, 0x1000, &mut isr);
            assert_eq!(isr[0] & !3, 0);
            dev.read_bar(0, 0x1000, &mut isr);
            assert_eq!(isr[0], 0, "an ISR read clears it");
        }
        last = now;
    }
    assert_eq!(ids, [0, 11].map(|r| dev.read_config_register(r)));
}

fn check(
    last: &Common,
    now: &Common,
    reset: bool,
    offered: u64,
    max_sizes: &[u16],
    vectors: usize,
) {
    assert_eq!(now.device_features, offered);
    let vector_ok = |v: u16| v == VIRTIO_MSI_NO_VECTOR || usize::from(v) < vectors;
    assert!(vector_ok(now.config_vector));
    for (q, regs) in now.queues.iter().enumerate() {
        let &(size, vector, enable, notify_off, ..) = regs;
        match max_sizes.get(q) {
            Some(&max) => {
                assert!(
                    size.is_power_of_two() && size <= max,
                    "queue {q} size {size}"
                );
                assert!(vector_ok(vector) && enable <= 1 && usize::from(notify_off) == q);
            }
            None => assert_eq!(*regs, (0, 0, 0, 0, 0, 0, 0), "no queue {q}"),
        }
    }
    if reset {
        assert_eq!(now.status, 0);
        assert_eq!(now.driver_features, 0);
        assert_eq!(now.config_vector, VIRTIO_MSI_NO_VECTOR);
        for (q, &max) in max_sizes.iter().enumerate() {
            let initial = (max, VIRTIO_MSI_NO_VECTOR, 0, q as u16, 0, 0, 0);
            assert_eq!(now.queues[q], initial, "queue {q} after reset");
        }
        return;
    }
    assert_eq!(
        last.status & !now.status,
        0,
        "status bits lost without a reset"
    );
    if now.status & DRIVER_OK != 0 {
        assert_ne!(now.status & FEATURES_OK, 0, "DRIVER_OK without FEATURES_OK");
    }
    if now.status & FEATURES_OK != 0 {
        assert_eq!(now.driver_features & !offered, 0);
        assert_ne!(now.driver_features & 1 << VIRTIO_F_VERSION_1, 0);
    }
    if last.status & FEATURES_OK != 0 {
        assert_eq!(
            now.driver_features, last.driver_features,
            "features after FEATURES_OK"
        );
    }
    for (q, (before, after)) in last.queues.iter().zip(&now.queues).enumerate() {
        if before.2 == 1 {
            assert_eq!(before.0, after.0, "size of enabled queue {q}");
            assert_eq!(
                (before.4, before.5, before.6),
                (after.4, after.5, after.6),
                "rings of enabled queue {q}"
            );
        }
    }
}

fn check_activation(queues: &[Activated], now: &Common, max_sizes: &[u16]) {
    let event_idx = now.driver_features & 1 << VIRTIO_RING_F_EVENT_IDX != 0;
    for q in queues {
        assert!(q.index < max_sizes.len());
        assert_eq!(
            now.queues[q.index].2, 1,
            "queue {} activated while disabled",
            q.index
        );
        assert_eq!(q.size, now.queues[q.index].0);
        assert!(q.ready && q.event_idx == event_idx, "{q:?}");
    }
    let enabled = now.queues.iter().filter(|q| q.2 == 1).count();
    assert_eq!(queues.len(), enabled, "every enabled queue is handed over");
}
