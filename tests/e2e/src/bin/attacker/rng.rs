//! The attack on a protected virtio-rng, the simplest device that writes into the guest:
//! request buffers outside what the driver mapped (never mapped, the canary's guest-physical
//! address, a chain whose first buffer is mapped and whose second is the canary, a buffer
//! running past the end of the mapping). Each must come back with nothing delivered, and
//! all or nothing: the mapped part of a refused chain stays as it was too.

use std::path::Path;
use std::time::Duration;

use crate::vfio::{report, verdict, Canary, Driven, DESC_F_WRITE, IOVA, IOVA_NEVER_MAPPED};

const REQUESTS: u16 = 0;
/// The request queue's table, available and used rings at the start of the buffer.
const QUEUE_BASE: [usize; 1] = [0x0000];
/// Where the request buffers start.
const BUFFERS: usize = 0x1_0000;
const REQUEST_LEN: usize = 4096;
/// What the attacker leaves in a buffer before asking: random bytes change most of it.
const UNTOUCHED: u8 = 0x5a;

/// Offers the buffers `(addr, len)` as one request; how many bytes the device delivered,
/// `None` if it never answered.
fn request(rng: &mut Driven, parts: &[(u64, usize)]) -> Result<Option<u32>, String> {
    rng.submit(REQUESTS, (parts, DESC_F_WRITE), Duration::from_secs(5))
}

/// Whether the mapped bytes `[at, at + len)` still hold what the attacker left there.
fn untouched(rng: &Driven, at: usize, len: usize) -> bool {
    rng.buf[at..at + len].iter().all(|&b| b == UNTOUCHED)
}

/// A request filled inside the mapping: delivered, and most of its bytes changed.
fn filled(rng: &mut Driven, at: usize) -> Result<(Option<u32>, bool), String> {
    rng.buf[at..at + REQUEST_LEN].fill(UNTOUCHED);
    let used = request(rng, &[(IOVA + at as u64, REQUEST_LEN)])?;
    let changed = rng.buf[at..at + REQUEST_LEN]
        .iter()
        .filter(|&&b| b != UNTOUCHED)
        .count();
    Ok((
        used,
        used == Some(REQUEST_LEN as u32) && changed > REQUEST_LEN / 2,
    ))
}

/// Runs every check against the rng at sysfs path `device`.
pub fn run(device: &Path) -> Result<(), String> {
    let mut rng = Driven::attach(device, &QUEUE_BASE, BUFFERS, "rng")?;
    rng.start()?;
    let canary = Canary::new(4096)?;
    let canary_gpa = canary.gpa;

    match filled(&mut rng, BUFFERS)? {
        (_, true) => report("RNG-BASELINE", "ok", "random bytes in the mapping"),
        (used, false) => return Err(format!("the baseline request got {used:?}")),
    }

    // Requests outside the grant: nothing delivered, the canary and the mapped parts as
    // they were.
    let head = BUFFERS + REQUEST_LEN;
    let last_page = rng.buf.len() - REQUEST_LEN;
    rng.buf[head..head + REQUEST_LEN].fill(UNTOUCHED);
    rng.buf[last_page..].fill(UNTOUCHED);
    let mapped = |at: usize| IOVA + at as u64;
    for (check, parts, inside) in [
        (
            "RNG-NEVER-MAPPED",
            vec![(IOVA_NEVER_MAPPED, REQUEST_LEN)],
            None,
        ),
        ("RNG-CANARY", vec![(canary_gpa, REQUEST_LEN)], None),
        (
            "RNG-HALF-CANARY",
            vec![(mapped(head), REQUEST_LEN), (canary_gpa, REQUEST_LEN)],
            Some(head),
        ),
        (
            "RNG-PAST-MAPPING",
            vec![(mapped(last_page), 4 * REQUEST_LEN)],
            Some(last_page),
        ),
    ] {
        let used = request(&mut rng, &parts)?;
        let canary_intact = canary.intact();
        let mapped_intact = inside.is_none_or(|at| untouched(&rng, at, REQUEST_LEN));
        report(
            check,
            verdict(used == Some(0) && canary_intact && mapped_intact),
            &format!(
                "first={:#x} used={used:?} canary-intact={canary_intact} \
                 mapped-part-intact={mapped_intact}",
                parts[0].0
            ),
        );
    }

    match filled(&mut rng, BUFFERS + 2 * REQUEST_LEN)? {
        (_, true) => report("RNG-RECOVERED", "ok", "random bytes after the attacks"),
        (used, false) => report("RNG-RECOVERED", "FAILED", &format!("used={used:?}")),
    }
    canary.report("RNG-CANARY-PAGE");
    rng.dev.reset()
}
