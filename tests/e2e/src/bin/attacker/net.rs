//! The attack on a protected virtio-net, through either data path: the kernel's vhost-net or
//! warden's own worker. First a driver that leaves `VIRTIO_F_ACCESS_PLATFORM` out (warden must
//! refuse it: vhost-net would take its addresses as warden's own), rings pointed at the canary;
//! then a proper driver whose transmit and receive buffers lie outside what it mapped (never
//! mapped; a frame whose header is mapped and whose payload is the canary's guest-physical
//! address; a receive buffer there). Refused either way, the paths differ in what the driver
//! sees: vhost-net asks warden to translate each (an IOTLB miss), warden refuses and reports a
//! fault, and the ring waits; warden's own worker faults, drops the frame and returns the chain
//! unused. Whether a refused frame left anyway only the host can tell: it counts the frames its
//! tap got (two: the baseline and the one sent after the attacks). Frames to receive come from
//! the host, which pings an address behind the tap the whole time (ARP broadcasts).

use std::path::Path;
use std::time::Duration;

use crate::vfio::{
    put, report, verdict, Canary, Driven, QueueLayout, DESC_F_WRITE, DRIVEN_QUEUE_SIZE, IOVA,
    IOVA_NEVER_MAPPED, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};

const RX: u16 = 0;
const TX: u16 = 1;
/// Each queue's table, available and used rings in the buffer: receive at 0, transmit at
/// 0x4000.
const QUEUE_BASE: [usize; 2] = [0x0000, 0x4000];
/// The frame to send, then the receive buffers.
const FRAME: usize = 0x8000;
const RX_BUFFERS: usize = 0x1_0000;
const RX_BUFFER_LEN: u32 = 2048;
/// The virtio-net header (VERSION_1: 12 bytes).
const HEADER_LEN: usize = 12;
/// The header and an Ethernet frame of 60 bytes.
const FRAME_LEN: usize = HEADER_LEN + 60;
/// VIRTIO_F_VERSION_1 alone.
const WITHOUT_ACCESS_PLATFORM: u64 = 1 << 32;

/// Whose data path serves the device.
#[derive(Clone, Copy)]
pub enum Datapath {
    /// The kernel's vhost-net, translating through warden's IOTLB.
    Vhost,
    /// Warden's own worker.
    Warden,
}

impl Datapath {
    /// The prefix of this path's check names.
    fn name(self) -> &'static str {
        match self {
            Datapath::Vhost => "VHOST",
            Datapath::Warden => "WARDEN-NET",
        }
    }

    /// Whether a chain outside the grant came back as refused: vhost-net's ring waits on the
    /// refused miss; warden's worker returns the chain with nothing written. For a frame to
    /// send, warden's worker returns it so whether it left or not: only the host's count of
    /// the frames its tap got tells.
    fn refused(self, used: Option<u32>) -> bool {
        match self {
            Datapath::Vhost => used.is_none(),
            Datapath::Warden => used == Some(0),
        }
    }
}

/// A frame to send: its header at `header`, its Ethernet frame at `payload`; `None` used means
/// the device never returned it.
fn send(
    net: &mut Driven,
    header: u64,
    payload: u64,
    wait: Duration,
) -> Result<Option<u32>, String> {
    let parts = [(header, HEADER_LEN), (payload, FRAME_LEN - HEADER_LEN)];
    net.submit(TX, (&parts, 0), wait)
}

/// The frame at `FRAME` of the mapping, sent.
fn send_mapped(net: &mut Driven, wait: Duration) -> Result<Option<u32>, String> {
    let frame = IOVA + FRAME as u64;
    send(net, frame, frame + HEADER_LEN as u64, wait)
}

/// A receive buffer at `addr`; the length of the frame the device put there, if any.
fn receive(net: &mut Driven, addr: u64, wait: Duration) -> Result<Option<u32>, String> {
    let buffer = [(addr, RX_BUFFER_LEN as usize)];
    net.submit(RX, (&buffer, DESC_F_WRITE), wait)
}

/// A broadcast Ethernet frame of an experimental type, with its (zero) virtio-net header.
fn frame() -> [u8; FRAME_LEN] {
    let mut bytes = [0u8; FRAME_LEN];
    bytes[12..18].fill(0xff);
    bytes[18..24].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x99]);
    bytes[24..26].copy_from_slice(&0x88b5u16.to_be_bytes());
    bytes[26..45].copy_from_slice(b"WARDEN-ATTACK-FRAME");
    bytes
}

/// Runs every check against the net device at sysfs path `device`, served by `path`.
pub fn run(device: &Path, path: Datapath) -> Result<(), String> {
    let mut net = Driven::attach(device, &QUEUE_BASE, FRAME, "net device")?;
    let canary = Canary::new(4096)?;
    let canary_gpa = canary.gpa;
    let name = |check: &str| format!("{}-{check}", path.name());

    // Without ACCESS_PLATFORM the device must not take the features, nor go live: its
    // rings, pointed at the canary's guest-physical address, reach no kernel.
    let accepted = net.dev.negotiate(WITHOUT_ACCESS_PLATFORM)?;
    for queue in [RX, TX] {
        let at_canary = QueueLayout {
            size: DRIVEN_QUEUE_SIZE,
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
        &name("WITHOUT-ACCESS-PLATFORM"),
        verdict(refused),
        &format!("features-ok={accepted} driver-ok={live} status={status:#x}"),
    );

    net.start()?;
    put(net.buf, FRAME, &frame());
    match send_mapped(&mut net, Duration::from_secs(5))? {
        Some(_) => report(&name("BASELINE-TX"), "ok", "a frame sent from the mapping"),
        None => return Err("the baseline frame was never sent".into()),
    }

    // Frames to send from outside the grant: a header never mapped, and a mapped header
    // whose payload is the canary. Neither may reach the tap (the host counts).
    let header = IOVA + FRAME as u64;
    for (check, header, payload) in [
        (
            "NEVER-MAPPED-TX",
            IOVA_NEVER_MAPPED,
            header + HEADER_LEN as u64,
        ),
        ("CANARY-TX", header, canary_gpa),
    ] {
        let used = send(&mut net, header, payload, Duration::from_secs(3))?;
        report(
            &name(check),
            verdict(path.refused(used)),
            &format!("header={header:#x} payload={payload:#x} used={used:?}"),
        );
        net.start()?;
    }

    // Receiving: a buffer in the mapping gets the host's frames; one at the canary's address
    // gets nothing, and the canary stays as it was.
    let received = receive(&mut net, IOVA + RX_BUFFERS as u64, Duration::from_secs(30))?;
    match received {
        Some(len) if len > 0 => report(&name("BASELINE-RX"), "ok", &format!("len={len}")),
        _ => return Err("no frame from the host reached the mapped receive buffer".into()),
    }
    net.start()?;
    let received = receive(&mut net, canary_gpa, Duration::from_secs(5))?;
    let intact = canary.intact();
    report(
        &name("CANARY-RX"),
        verdict(received.is_none_or(|len| len == 0) && intact),
        &format!("gpa={canary_gpa:#x} used={received:?} canary-intact={intact}"),
    );
    net.start()?;
    match receive(
        &mut net,
        IOVA + RX_BUFFERS as u64 + 2048,
        Duration::from_secs(30),
    )? {
        Some(len) if len > 0 => report(&name("RECOVERED"), "ok", &format!("len={len}")),
        other => report(
            &name("RECOVERED"),
            "FAILED",
            &format!("no frame after a reset: {other:?}"),
        ),
    }
    match send_mapped(&mut net, Duration::from_secs(5))? {
        Some(_) => report(
            &name("RECOVERED-TX"),
            "ok",
            "a frame sent after the attacks",
        ),
        None => report(&name("RECOVERED-TX"), "FAILED", "never sent"),
    }
    canary.report(&name("CANARY"));
    net.dev.reset()
}
