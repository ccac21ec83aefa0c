//! The attack on a protected virtio-console, whose output the host keeps in a file: text to
//! print from outside what the driver mapped (never mapped, the canary's guest-physical
//! address, a mapped line chained to the canary). The device returns each unprinted, and the
//! host's file must hold the two lines printed from the mapping and nothing else: no canary
//! byte, and not the mapped line of the refused chain either (a chain prints whole or not at
//! all).

use std::path::Path;
use std::time::Duration;

use crate::vfio::{put, report, verdict, Canary, Driven, IOVA, IOVA_NEVER_MAPPED};

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

/// Prints the buffers `(addr, len)` as one chain; whether the device returned it.
fn print(console: &mut Driven, parts: &[(u64, usize)]) -> Result<bool, String> {
    let used = console.submit(TX, (parts, 0), Duration::from_secs(5))?;
    Ok(used.is_some())
}

/// Puts `text` at `at` of the mapping and prints it.
fn print_mapped(console: &mut Driven, at: usize, text: &[u8]) -> Result<bool, String> {
    put(console.buf, at, text);
    print(console, &[(IOVA + at as u64, text.len())])
}

/// Runs every check against the console at sysfs path `device`.
pub fn run(device: &Path) -> Result<(), String> {
    let mut console = Driven::attach(device, &QUEUE_BASE, TEXT, "console")?;
    console.start()?;
    let canary = Canary::new(4096)?;
    let canary_gpa = canary.gpa;

    if !print_mapped(&mut console, TEXT, BASELINE)? {
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
        let returned = print(&mut console, &parts)?;
        report(
            check,
            verdict(returned),
            &format!("first={:#x} returned={returned}", parts[0].0),
        );
    }

    match print_mapped(&mut console, half + REFUSED_HALF_LEN, RECOVERED)? {
        true => report(
            "CONSOLE-RECOVERED",
            "ok",
            "a line printed after the attacks",
        ),
        false => report("CONSOLE-RECOVERED", "FAILED", "never printed"),
    }
    canary.report("CONSOLE-CANARY-PAGE");
    console.dev.reset()
}
