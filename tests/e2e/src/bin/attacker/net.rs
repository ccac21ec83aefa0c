//! The attack on a protected virtio-net whose data path is the kernel's vhost-net: first a
//! driver that leaves `VIRTIO_F_ACCESS_PLATFORM` out (warden must refuse it: the kernel would
//! take its addresses as warden's own), rings pointed at the canary; then a proper driver whose
//! transmit and receive buffers lie outside what it mapped (never mapped, the canary's
//! guest-physical address). The kernel asks warden to translate each (an IOTLB miss), warden
//! refuses and reports a fault, and the ring waits. Frames to receive come from the host,
//! which pings an address behind the tap the whole time (ARP broadcasts).

use std::path::Path;
use std::time::Duration;

use crate::blk::{CANARY_BYTE, FEATURES, IOVA, IOVA_NEVER_MAPPED};
use crate::vfio::{
    guest_physical, pinned_pages, put, report, verdict, Container, Desc, Device, QueueLayout,
    Rings, DESC_F_WRITE, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};

const BUFFER_LEN: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;
const RX: u16 = 0;
const TX: u16 = 1;
/// Each queue's table, available and used rings in the buffer: receive at 0, transmit at
/// 0x4000.
const QUEUE_BASE: [usize; 2] = [0x0000, 0x4000];
/// The frame to send, then the receive buffers.
const FRAME: usize = 0x8000;
const RX_BUFFERS: usize = 0x1_0000;
const RX_BUFFER_LEN: u32 = 2048;
/// The virtio-net header (VERSION_1: 12 bytes) and an Ethernet frame of 60 bytes.
const FRAME_LEN: usize = 12 + 60;
/// VIRTIO_F_VERSION_1 alone.
const WITHOUT_ACCESS_PLATFORM: u64 = 1 << 32;

/// The driver: the device, its DMA buffer and its queues.
struct Net {
    dev: Device,
    buf: &'static mut [u8],
    rings: Rings,
}

impl Net {
    /// Resets, negotiates VERSION_1 + ACCESS_PLATFORM and sets both queues up in the buffer.
    fn start(&mut self) -> Result<(), String> {
        self.rings
            .start(&self.dev, self.buf, (FEATURES, FRAME), "net device")
    }

    /// Makes `desc` available on `queue`, notifies, and waits up to `wait` for the device to
    /// use it; whether it did, and the length.
    fn offer(&mut self, queue: u16, desc: Desc, wait: Duration) -> Result<Option<u32>, String> {
        self.rings.offer(self.buf, &self.dev, queue, desc)?;
        Ok(self.rings.used(self.buf, queue, wait))
    }

    /// A frame to send from `addr`; `None` used means the device never sent it.
    fn send(&mut self, addr: u64, wait: Duration) -> Result<Option<u32>, String> {
        let desc = Desc {
            addr,
            len: FRAME_LEN as u32,
            flags: 0,
            next: 0,
        };
        self.offer(TX, desc, wait)
    }

    /// A receive buffer at `addr`; the length of the frame the device put there, if any.
    fn receive(&mut self, addr: u64, wait: Duration) -> Result<Option<u32>, String> {
        let desc = Desc {
            addr,
            len: RX_BUFFER_LEN,
            flags: DESC_F_WRITE,
            next: 0,
        };
        self.offer(RX, desc, wait)
    }
}

/// A broadcast Ethernet frame of an experimental type, with its (zero) virtio-net header.
fn frame() -> [u8; FRAME_LEN] {
    let mut bytes = [0u8; FRAME_LEN];
    bytes[12..18].fill(0xff);
    bytes[18..24].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x99]);
    bytes[24..26].copy_from_slice(&0x88b5u16.to_be_bytes());
    bytes[26..45].copy_from_slice(b"WARDEN-VHOST-ATTACK");
    bytes
}

/// Runs every check against the net device at sysfs path `device`.
pub fn run(device: &Path) -> Result<(), String> {
    let bdf = device.file_name().unwrap().to_string_lossy().into_owned();
    let container = Container::open(device)?;
    let buf = pinned_pages(BUFFER_LEN, 0)?;
    container.map(buf.as_ptr() as u64, IOVA, BUFFER_LEN)?;
    let canary = pinned_pages(4096, CANARY_BYTE)?;
    let canary_gpa = guest_physical(canary.as_ptr())?;
    let mut net = Net {
        dev: Device::open(&container, &bdf)?,
        buf,
        rings: Rings::new(IOVA, &QUEUE_BASE, QUEUE_SIZE),
    };

    // Without ACCESS_PLATFORM the device must not take the features, nor go live: its
    // rings, pointed at the canary's guest-physical address, reach no kernel.
    let accepted = net.dev.negotiate(WITHOUT_ACCESS_PLATFORM)?;
    for queue in [RX, TX] {
        let at_canary = QueueLayout {
            size: QUEUE_SIZE,
            desc: canary_gpa,
            avail: canary_gpa,
            used: canary_gpa,
        };
        net.dev.setup_queue(queue, at_canary)?;
    }
    let live = net.dev.driver_ok()?;
    net.dev.notify(RX)?;
    net.dev.notify(TX)?;
    std::thread::sleep(Duration::from_millis(500));
    let status = net.dev.status()?;
    let refused = !accepted && !live && status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) == 0;
    report(
        "VHOST-WITHOUT-ACCESS-PLATFORM",
        verdict(refused),
        &format!("features-ok={accepted} driver-ok={live} status={status:#x}"),
    );

    net.start()?;
    put(net.buf, FRAME, &frame());
    match net.send(IOVA + FRAME as u64, Duration::from_secs(5))? {
        Some(_) => report("VHOST-BASELINE-TX", "ok", "a frame sent from the mapping"),
        None => return Err("the baseline frame was never sent".into()),
    }

    // Frames to send from outside the grant: the kernel's miss is refused, the ring waits.
    for (name, addr) in [
        ("VHOST-NEVER-MAPPED-TX", IOVA_NEVER_MAPPED),
        ("VHOST-CANARY-TX", canary_gpa),
    ] {
        let sent = net.send(addr, Duration::from_secs(3))?;
        report(
            name,
            verdict(sent.is_none()),
            &format!("iova={addr:#x} used={sent:?}"),
        );
        net.start()?;
    }

    // Receiving: a buffer in the mapping gets the host's frames; one at the canary's address
    // gets nothing, and the canary stays as it was.
    let received = net.receive(IOVA + RX_BUFFERS as u64, Duration::from_secs(30))?;
    match received {
        Some(len) => report("VHOST-BASELINE-RX", "ok", &format!("len={len}")),
        None => return Err("no frame from the host reached the mapped receive buffer".into()),
    }
    net.start()?;
    let received = net.receive(canary_gpa, Duration::from_secs(5))?;
    let intact = canary.iter().all(|&b| b == CANARY_BYTE);
    report(
        "VHOST-CANARY-RX",
        verdict(received.is_none() && intact),
        &format!("gpa={canary_gpa:#x} used={received:?} canary-intact={intact}"),
    );
    net.start()?;
    match net.receive(IOVA + RX_BUFFERS as u64 + 2048, Duration::from_secs(30))? {
        Some(len) => report("VHOST-RECOVERED", "ok", &format!("len={len}")),
        None => report("VHOST-RECOVERED", "FAILED", "no frame after a reset"),
    }
    let intact = canary.iter().all(|&b| b == CANARY_BYTE);
    report(
        "VHOST-CANARY",
        if intact { "intact" } else { "CHANGED" },
        &format!("gpa={canary_gpa:#x}"),
    );
    net.dev.reset()
}
