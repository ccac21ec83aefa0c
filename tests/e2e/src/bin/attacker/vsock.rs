//! The attack on a protected virtio-vsock: packets to transmit, and receive buffers, outside
//! what the driver mapped (never mapped, the guest-physical address of its own pages).
//!
//! A packet the device can read always gets an answer here: the driver asks for host ports
//! nobody listens on, and the device answers each request with a reset. So a transmitted
//! packet the device must not read is a request placed where only a device without an IOMMU
//! could read it (a "lure" page, by guest-physical address): a reset for it would show the
//! device read it. A receive buffer the device must not write sits on the canary: the reset
//! owed must come, unwritten there, in the next buffer inside the mapping.

use std::path::Path;
use std::time::Duration;

use crate::vfio::{
    get_u16, guest_physical, pinned_pages, put, report, verdict, Canary, Driven, DESC_F_WRITE,
    IOVA, IOVA_NEVER_MAPPED,
};

const RX: u16 = 0;
const TX: u16 = 1;
/// Each queue's table, available and used rings in the buffer: receive, transmit, events.
const QUEUE_BASE: [usize; 3] = [0x0000, 0x4000, 0x8000];
/// The packets to send, then the receive buffers.
const PACKETS: usize = 0xc000;
const RX_BUFFERS: usize = 0x1_0000;
const RX_BUFFER_LEN: u32 = 4096 + HEADER_LEN as u32;
const HEADER_LEN: usize = 44;
/// The guest's CID, as the test starts warden.
const GUEST_CID: u64 = 3;
const OP_REQUEST: u16 = 1;
const OP_RST: u16 = 3;

/// A stream REQUEST from guest port `src` to host port `dst`.
fn request(src: u32, dst: u32) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
    header[8..16].copy_from_slice(&2u64.to_le_bytes());
    header[16..20].copy_from_slice(&src.to_le_bytes());
    header[20..24].copy_from_slice(&dst.to_le_bytes());
    header[28..30].copy_from_slice(&1u16.to_le_bytes());
    header[30..32].copy_from_slice(&OP_REQUEST.to_le_bytes());
    header[36..40].copy_from_slice(&(256u32 << 10).to_le_bytes());
    header
}

/// Transmits the header at `addr`; whether the device returned the buffer.
fn transmit(vsock: &mut Driven, addr: u64) -> Result<bool, String> {
    let header = [(addr, HEADER_LEN)];
    let used = vsock.submit(TX, (&header, 0), Duration::from_secs(3))?;
    Ok(used.is_some())
}

/// Posts a receive buffer at `addr` and waits up to `wait` for a packet in it: its length (0:
/// returned unwritten).
fn receive(vsock: &mut Driven, addr: u64, wait: Duration) -> Result<Option<u32>, String> {
    let buffer = [(addr, RX_BUFFER_LEN as usize)];
    vsock.submit(RX, (&buffer, DESC_F_WRITE), wait)
}

/// The operation and ports of the packet received into the mapped buffer `at`.
fn packet(vsock: &Driven, at: usize) -> (u16, u32, u32) {
    let word = |offset: usize| {
        u32::from(get_u16(vsock.buf, at + offset))
            | u32::from(get_u16(vsock.buf, at + offset + 2)) << 16
    };
    (get_u16(vsock.buf, at + 30), word(16), word(20))
}

/// Runs every check against the vsock at sysfs path `device`.
pub fn run(device: &Path) -> Result<(), String> {
    let mut vsock = Driven::attach(device, &QUEUE_BASE, PACKETS, "vsock")?;
    let canary = Canary::new(4096)?;
    let canary_gpa = canary.gpa;
    let lure = pinned_pages(4096, 0)?;
    lure[..HEADER_LEN].copy_from_slice(&request(41, 7041));
    let lure_gpa = guest_physical(lure.as_ptr())?;
    vsock.start()?;

    // The tool works: a request from the mapping is answered with a reset into the mapping.
    put(vsock.buf, PACKETS, &request(40, 7040));
    if !transmit(&mut vsock, IOVA + PACKETS as u64)? {
        return Err("the baseline request was never taken".into());
    }
    let rx = IOVA + RX_BUFFERS as u64;
    match receive(&mut vsock, rx, Duration::from_secs(5))? {
        Some(len) if packet(&vsock, RX_BUFFERS) == (OP_RST, 7040, 40) => report(
            "VSOCK-BASELINE",
            "ok",
            &format!("a request answered with a reset of {len} bytes"),
        ),
        other => return Err(format!("the baseline request got {other:?}")),
    }

    // Requests the device must not read: never mapped, and the lure's guest-physical address.
    for (name, addr) in [
        ("VSOCK-NEVER-MAPPED-TX", IOVA_NEVER_MAPPED),
        ("VSOCK-LURE-TX", lure_gpa),
    ] {
        let taken = transmit(&mut vsock, addr)?;
        let answered = receive(&mut vsock, rx + 0x2000, Duration::from_secs(2))?;
        report(
            name,
            verdict(answered.is_none()),
            &format!("addr={addr:#x} returned={taken} answer={answered:?}"),
        );
        vsock.start()?;
    }

    // Receive buffers the device must not write: the reset owed skips them, unwritten, and
    // lands in the next one inside the mapping.
    for (i, (name, addr)) in [
        ("VSOCK-NEVER-MAPPED-RX", IOVA_NEVER_MAPPED),
        ("VSOCK-CANARY-RX", canary_gpa),
    ]
    .into_iter()
    .enumerate()
    {
        let port = 7050 + i as u32;
        put(vsock.buf, PACKETS, &request(50, port));
        transmit(&mut vsock, IOVA + PACKETS as u64)?;
        let outside = receive(&mut vsock, addr, Duration::from_secs(3))?;
        let inside = receive(&mut vsock, rx, Duration::from_secs(5))?;
        let delivered = packet(&vsock, RX_BUFFERS) == (OP_RST, port, 50);
        let intact = canary.intact();
        report(
            name,
            verdict(outside.is_none_or(|len| len == 0) && delivered && intact),
            &format!("addr={addr:#x} outside={outside:?} inside={inside:?} delivered={delivered} canary-intact={intact}"),
        );
        vsock.start()?;
    }

    put(vsock.buf, PACKETS, &request(60, 7060));
    transmit(&mut vsock, IOVA + PACKETS as u64)?;
    match receive(&mut vsock, rx, Duration::from_secs(5))? {
        Some(_) if packet(&vsock, RX_BUFFERS) == (OP_RST, 7060, 60) => report(
            "VSOCK-RECOVERED",
            "ok",
            "a request answered after the attacks",
        ),
        other => report("VSOCK-RECOVERED", "FAILED", &format!("got {other:?}")),
    }
    let intact = canary.intact() && lure[HEADER_LEN..].iter().all(|&b| b == 0);
    report(
        "VSOCK-CANARY",
        if intact { "intact" } else { "CHANGED" },
        &format!("gpa={canary_gpa:#x} lure={lure_gpa:#x}"),
    );
    vsock.dev.reset()
}
