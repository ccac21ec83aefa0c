//! The attack on a protected virtio-console, whose output the host keeps in a file: text to
//! print from outside what the driver mapped (never mapped, the canary's guest-physical
//! address, a mapped line chained to the canary). The device returns each unprinted, and the
//! host's file must hold the two lines printed from the mapping and nothing else: no canary
//! byte, and not the mapped line of the refused chain either (a chain prints whole or not at
//! all).

use std::path::Path;
use std::time::Duration;

use crate::blk::{CANARY_BYTE, FEATURES, IOVA, IOVA_NEVER_MAPPED};
use crate::vfio::{attach, put, report, verdict, Attached, Device, Rings};

const BUFFER_LEN: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;
const TX: u16 = 1;
/// Each queue's table, available and used rings in the buffer: receive, transmit.
const QUEUE_BASE: [usize; 2] = [0x0000, 0x4000];
/// Where the text to print starts.
const TEXT: usize = 0x8000;
/// The lines the host must find in its file, in this order, and only them.
const BASELINE: &[u8] = b"WARDEN-CONSOLE-BASELINE\n";
const RECOVERED: &[u8] = b"WARDEN-CONSOLE-RECOVERED\n";
/// The line the mapped half of a refused chain repeats: the host must not find it.
const REFUSED_LINE: &[u8] = b"WARDEN-CONSOLE-LEAK\n";
/// The mapped half's length: several of the device's output chunks (4 KiB), so that a device
/// printing a chain a chunk at a time until it meets the canary would show.
const REFUSED_HALF_LEN: usize = 16 << 10;

/// The driver: the device, its DMA buffer and its queues.
struct Console {
    dev: Device,
    buf: &'static mut [u8],
    rings: Rings,
}

impl Console {
    /// Prints the buffers `(addr, len)` as one chain; whether the device returned it.
    fn print(&mut self, parts: &[(u64, usize)]) -> Result<bool, String> {
        let used =
            self.rings
                .submit(self.buf, &self.dev, TX, (parts, 0), Duration::from_secs(5))?;
        Ok(used.is_some())
    }

    /// Puts `text` at `at` of the mapping and prints it.
    fn print_mapped(&mut self, at: usize, text: &[u8]) -> Result<bool, String> {
        put(self.buf, at, text);
        self.print(&[(IOVA + at as u64, text.len())])
    }
}

/// Runs every check against the console at sysfs path `device`.
pub fn run(device: &Path) -> Result<(), String> {
    let Attached {
        dev,
        buf,
        canary,
        canary_gpa,
    } = attach(device, IOVA, BUFFER_LEN, CANARY_BYTE)?;
    let mut console = Console {
        dev,
        buf,
        rings: Rings::new(IOVA, &QUEUE_BASE, QUEUE_SIZE),
    };
    console
        .rings
        .start(&console.dev, console.buf, (FEATURES, TEXT), "console")?;

    if !console.print_mapped(TEXT, BASELINE)? {
        return Err("the baseline line was never printed".into());
    }
    report("CONSOLE-BASELINE", "ok", "a line printed from the mapping");

    // Text from outside the grant: each chain comes back, and the host's file shows whether
    // any of it was printed.
    let half = TEXT + 0x1000;
    for line in 0..REFUSED_HALF_LEN / REFUSED_LINE.len() {
        put(console.buf, half + line * REFUSED_LINE.len(), REFUSED_LINE);
    }
    for (check, parts) in [
        ("CONSOLE-NEVER-MAPPED", vec![(IOVA_NEVER_MAPPED, 64)]),
        ("CONSOLE-CANARY", vec![(canary_gpa, 64)]),
        (
            "CONSOLE-HALF-CANARY",
            vec![(IOVA + half as u64, REFUSED_HALF_LEN), (canary_gpa, 64)],
        ),
    ] {
        let returned = console.print(&parts)?;
        report(
            check,
            verdict(returned),
            &format!("first={:#x} returned={returned}", parts[0].0),
        );
    }

    match console.print_mapped(half + REFUSED_HALF_LEN, RECOVERED)? {
        true => report(
            "CONSOLE-RECOVERED",
            "ok",
            "a line printed after the attacks",
        ),
        false => report("CONSOLE-RECOVERED", "FAILED", "never printed"),
    }
    let intact = canary.iter().all(|&b| b == CANARY_BYTE);
    report(
        "CONSOLE-CANARY-PAGE",
        if intact { "intact" } else { "CHANGED" },
        &format!("gpa={canary_gpa:#x}"),
    );
    console.dev.reset()
}
