//! The attack on the order of UNMAP and DMA, on a protected disk: a long read into a buffer
//! that is unmapped while the read is in flight, the buffer's pages written by the CPU as soon
//! as the unmap returns (what a kernel does with a page it got back). Once an UNMAP has
//! completed the device must not write there: warden completes it only after the transfers
//! that translated through the mapping have ended, so the read lands before it returns or is
//! refused. A VMM that translates first and copies later writes disk data over the reused
//! pages.
//!
//! Each round maps the buffer, publishes the read, unmaps at once and reuses the pages from
//! the last one back, against the device's copy going forward; the pages are checked once the
//! read has completed (or the device gave up on it).

use std::path::Path;
use std::sync::atomic::{fence, Ordering};

use crate::blk::{self, BLK_T_IN, HEADER, STATUS};
use crate::vfio::{pinned_pages, report, Desc, DESC_F_NEXT, DESC_F_WRITE, IOVA};

/// Where the raced buffer sits for the device, clear of the ring's buffer.
const IOVA_RACED: u64 = 0x6000_0000;
/// With the header and the status byte, the ring's 16 descriptors.
const SEGMENTS: usize = 14;
const SEGMENT_BYTES: usize = 512 << 10;
/// 7 MiB from the start of the 8 MiB disk: a copy long enough that the UNMAP often arrives
/// while it runs.
const RACED_BYTES: usize = SEGMENTS * SEGMENT_BYTES;
const PAGE: usize = 4096;
/// What the reused pages hold: a byte neither the disk's pattern nor its zeros contain.
const REUSED: u8 = 0xc3;
const ROUNDS: usize = 32;

/// The read of the whole raced buffer.
fn chain() -> [Desc; SEGMENTS + 2] {
    let mut descs = [Desc {
        addr: 0,
        len: 0,
        flags: DESC_F_NEXT | DESC_F_WRITE,
        next: 0,
    }; SEGMENTS + 2];
    descs[0] = Desc {
        addr: IOVA + HEADER as u64,
        len: 16,
        flags: DESC_F_NEXT,
        next: 1,
    };
    for (i, desc) in descs.iter_mut().enumerate().take(SEGMENTS + 1).skip(1) {
        desc.addr = IOVA_RACED + ((i - 1) * SEGMENT_BYTES) as u64;
        desc.len = SEGMENT_BYTES as u32;
        desc.next = i as u16 + 1;
    }
    descs[SEGMENTS + 1] = Desc {
        addr: IOVA + STATUS as u64,
        len: 1,
        flags: DESC_F_WRITE,
        next: 0,
    };
    descs
}

/// The pages of `buf` that no longer hold only [`REUSED`], read volatile: the device writes
/// them behind the compiler's back.
fn pages_overwritten(buf: &[u8]) -> usize {
    let word = u64::from_ne_bytes([REUSED; 8]);
    buf.chunks(PAGE)
        .filter(|page| {
            page.chunks_exact(8).any(|w| {
                // SAFETY: eight bytes inside the buffer, aligned as the buffer is page-aligned.
                unsafe { std::ptr::read_volatile(w.as_ptr() as *const u64) != word }
            })
        })
        .count()
}

/// How the rounds went, for the report.
#[derive(Default)]
struct Tally {
    done_before_unmap: usize,
    done_during_unmap: usize,
    done_later: usize,
    refused: usize,
    pages_overwritten: usize,
}

/// Races the disk at sysfs path `device`.
pub fn run(device: &Path) -> Result<(), String> {
    let (container, mut driver) = blk::attach(device)?;
    let raced = pinned_pages(RACED_BYTES, 0)?;
    let mut tally = Tally::default();
    for _ in 0..ROUNDS {
        container.map(raced.as_ptr() as u64, IOVA_RACED, RACED_BYTES)?;
        driver.publish(BLK_T_IN, 0, &chain())?;
        let done_before = driver.completed();
        container.unmap(IOVA_RACED, RACED_BYTES)?;
        let done_after = driver.completed();
        for page in raced.chunks_mut(PAGE).rev() {
            page.fill(REUSED);
        }
        fence(Ordering::SeqCst);
        let answer = driver.answer()?;
        fence(Ordering::SeqCst);
        tally.pages_overwritten += pages_overwritten(raced);
        match (done_before, done_after) {
            (true, _) => tally.done_before_unmap += 1,
            (false, true) => tally.done_during_unmap += 1,
            (false, false) => tally.done_later += 1,
        }
        if answer.refused() {
            tally.refused += 1;
        }
        driver.recover(&answer)?;
    }
    let verdict = if tally.pages_overwritten == 0 {
        "intact"
    } else {
        "CHANGED"
    };
    let details = format!(
        "rounds={ROUNDS} done-before-unmap={} done-during-unmap={} done-later={} refused={} \
         pages-written-after-unmap={}",
        tally.done_before_unmap,
        tally.done_during_unmap,
        tally.done_later,
        tally.refused,
        tally.pages_overwritten
    );
    report("UNMAP-IN-FLIGHT", verdict, &details);
    Ok(())
}
