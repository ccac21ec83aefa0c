//! Lock-free translation racing with requests: every successful translation must be one the
//! device state allowed at some instant during the call, and the statistics must count each
//! success exactly once. The random race runs once as is and once with readers sleeping inside
//! their race windows (through [`RACE_HOOK`]), so writers really change things there; targeted
//! tests run requests from inside a reader's window, on the reader's own thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::{CONFIG_BYPASS_OFFSET, VIRTIO_IOMMU_ATTACH_F_BYPASS};
use crate::seqlock::{RacePoint, RACE_HOOK};
use crate::test_common::{attach, attach_flags, detach, device_with, gpa_of, map, unmap, RW};
use crate::{Access, IommuConfig, Status, VirtioIommu};

/// The endpoint the readers translate for.
const EP: u32 = 1;
/// Another endpoint whose domains reuse the tables the checked endpoint's domains leave.
const OTHER: u32 = 2;
const PAGES: u64 = 64;
const MAX_PHASES: usize = 1 << 14;
/// Phase field of the other endpoint's mappings: never a phase of the checked endpoint.
const FOREIGN: u64 = 0x7fff;
const OFF_BITS: u32 = 28;
const GEN_BITS: u32 = 20;

/// IOVA of a page: pages come in adjacent pairs, one pair per 2 MiB, so each pair has its own
/// radix leaf node and unmapping a pair frees the node for reuse at another IOVA.
fn iova_of(page: u64) -> u64 {
    ((page / 2) << 21) | ((page % 2) << 12)
}

fn page_of(iova: u64) -> u64 {
    ((iova >> 21) << 1) | ((iova >> 12) & 1)
}

/// Mapped guest-physical address: the phase (= domain ID) and the MAP's generation are
/// encoded above the IOVA, so a reader can tell exactly which mapping it was given.
fn phys(phase: u64, gen: u64, page: u64) -> u64 {
    (phase << 48) | (gen << OFF_BITS) | iova_of(page)
}

fn decode(gpa: u64) -> (u64, u64, u64) {
    (
        gpa >> 48,
        (gpa >> OFF_BITS) & ((1 << GEN_BITS) - 1),
        gpa & ((1 << OFF_BITS) - 1),
    )
}

/// What the writer publishes for readers to check results against.
struct Shared {
    /// Highest phase whose change has begun (results of it may appear).
    started: AtomicU64,
    /// Highest phase whose change has completed (older phases may no longer appear).
    done: AtomicU64,
    /// Phases in which the endpoint translates as identity.
    identity: Vec<AtomicBool>,
    /// Per page: generation of the last mapping an UNMAP has completely removed.
    dead_gen: Vec<AtomicU64>,
    /// Highest generation handed to a MAP so far.
    max_gen: AtomicU64,
    stop: AtomicBool,
}

/// Check one successful translation of `[iova, iova + len)`.
fn check(sh: &Shared, lo: u64, dead: &[u64], iova: u64, len: u64, pieces: &[(u64, u64)]) {
    let hi = sh.started.load(Ordering::Acquire);
    let max_gen = sh.max_gen.load(Ordering::Acquire);
    let total: u64 = pieces.iter().map(|p| p.1).sum();
    assert_eq!(total, len, "pieces must cover the access: {pieces:x?}");
    if pieces.len() == 1 && pieces[0].0 == iova {
        // Identity: some phase in [lo, hi] must have been a bypass phase.
        assert!(
            (lo..=hi).any(|k| sh.identity[k as usize].load(Ordering::Acquire)),
            "identity translation at {iova:#x} outside any bypass phase {lo}..={hi}"
        );
        return;
    }
    let mut cur = iova;
    let mut phase_seen = None;
    for &(gpa, plen) in pieces {
        let (phase, gen, off) = decode(gpa);
        assert_eq!(
            off,
            cur & ((1 << OFF_BITS) - 1),
            "gpa {gpa:#x} for iova {cur:#x}"
        );
        assert!(
            (lo..=hi).contains(&phase) && !sh.identity[phase as usize].load(Ordering::Acquire),
            "phase {phase} outside {lo}..={hi} (iova {cur:#x})"
        );
        assert_eq!(*phase_seen.get_or_insert(phase), phase, "pieces mix phases");
        let page = page_of(cur);
        assert!(
            gen > dead[page as usize] && gen <= max_gen,
            "page {page}: generation {gen} already unmapped (dead {}) or never mapped",
            dead[page as usize]
        );
        cur += plen;
    }
}

fn reader(d: Arc<VirtioIommu>, sh: Arc<Shared>, seed: u64) -> u64 {
    let mut rng = seed | 1;
    let mut ok = 0;
    let mut dead = vec![0u64; PAGES as usize];
    while !sh.stop.load(Ordering::Relaxed) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let page = rng % PAGES;
        // Half the accesses straddle a pair's two pages, so two radix leaves serve them.
        let (iova, len) = if rng & 0x100 != 0 && page.is_multiple_of(2) {
            (iova_of(page) + 0xff8, 16)
        } else {
            (iova_of(page) + 0x10, 8)
        };
        let lo = sh.done.load(Ordering::Acquire);
        for (p, dg) in dead.iter_mut().zip(&sh.dead_gen) {
            *p = dg.load(Ordering::Acquire);
        }
        if let Ok(t) = d.translate(EP, iova, len, Access::Read) {
            let pieces: Vec<(u64, u64)> = t.iter().map(|r| (r.gpa, r.len)).collect();
            check(&sh, lo, &dead, iova, len, &pieces);
            ok += 1;
        }
    }
    ok
}

/// One writer maps, unmaps (single pages and ranges), moves the endpoint to new domains
/// (destroying the old one, whose table the next domain reuses), detaches, attaches to bypass
/// domains and flips the global bypass, while readers translate and check every result.
#[test]
fn racing_translations_are_always_valid_and_counted_once() {
    race(false);
}

#[test]
fn racing_translations_with_widened_windows() {
    race(true);
}

/// The other endpoint joins a new domain (leaving its previous one, if any), which takes the
/// table pooled last, and maps the checked endpoint's IOVAs to foreign addresses.
fn move_other(
    d: &VirtioIommu,
    other: &mut Option<u32>,
    other_next: &mut u32,
    next: &mut dyn FnMut() -> u64,
) {
    if let Some(o) = other.take() {
        assert_eq!(detach(d, o, OTHER), Status::Ok);
    }
    *other_next += 1;
    let domain = *other.insert(*other_next);
    assert_eq!(attach(d, domain, OTHER), Status::Ok);
    for page in 0..PAGES {
        if next().is_multiple_of(2) {
            let s = iova_of(page);
            let p = phys(FOREIGN, 0, page);
            assert_eq!(map(d, domain, s, s + 0xfff, p, RW), Status::Ok);
        }
    }
}

fn race(widened: bool) {
    let d = device_with(IommuConfig {
        boot_bypass: false,
        max_pending_faults: 8,
        ..Default::default()
    });
    let sh = Arc::new(Shared {
        started: AtomicU64::new(0),
        done: AtomicU64::new(0),
        identity: (0..MAX_PHASES).map(|_| AtomicBool::new(false)).collect(),
        dead_gen: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
        max_gen: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let readers: Vec<_> = (0..3)
        .map(|i| {
            let (d, sh) = (d.clone(), sh.clone());
            std::thread::spawn(move || {
                if widened {
                    RACE_HOOK.with(|h| {
                        *h.borrow_mut() =
                            Some(Box::new(|_| std::thread::sleep(Duration::from_micros(50))))
                    });
                }
                reader(d, sh, 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 1))
            })
        })
        .collect();

    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut phase = 0u64;
    let mut domain: Option<u32> = None; // current translating or bypass domain
    let mut translating = false;
    let mut global_bypass = false;
    let mut gens = vec![0u64; PAGES as usize];
    let mut gen = 0u64;
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut phases_of_each_kind = [0u32; 5];
    let mut other_next = 0x8000_0000u32;
    let mut other: Option<u32> = None;
    while Instant::now() < deadline
        && (phase as usize) < MAX_PHASES - 2
        && gen < (1 << GEN_BITS) - PAGES
    {
        let r = next() % 100;
        if translating && r < 97 {
            let page = next() % PAGES;
            let dom = domain.unwrap();
            if gens[page as usize] == 0 {
                gen += 1;
                sh.max_gen.store(gen, Ordering::Release);
                let s = iova_of(page);
                assert_eq!(
                    map(&d, dom, s, s + 0xfff, phys(phase, gen, page), RW),
                    Status::Ok
                );
                gens[page as usize] = gen;
            } else {
                // Unmap this page, sometimes with the next pairs (one request, many mappings).
                let n = if r < 20 { 6.min(PAGES - page) } else { 1 };
                let s = iova_of(page);
                let e = iova_of(page + n - 1) + 0xfff;
                assert_eq!(unmap(&d, dom, s, e), Status::Ok);
                for p in page..page + n {
                    let g = std::mem::take(&mut gens[p as usize]);
                    if g != 0 {
                        sh.dead_gen[p as usize].store(g, Ordering::Release);
                    }
                }
            }
            continue;
        }
        if next() % 3 == 0 {
            move_other(&d, &mut other, &mut other_next, &mut next);
            phases_of_each_kind[4] += 1;
            continue;
        }
        // A binding change of the checked endpoint: a new phase. The other endpoint leaves
        // first, so the checked endpoint's table is the one pooled last.
        if let Some(o) = other.take() {
            assert_eq!(detach(&d, o, OTHER), Status::Ok);
        }
        phase += 1;
        let kind = if domain.is_none() {
            next() % 3
        } else {
            next() % 4
        };
        // 0: new translating domain, 1: new bypass domain, 2: global bypass flip (only while
        // unattached, else a detach), 3: detach.
        let (identity, kind) = match kind {
            0 => (false, 0),
            1 => (true, 1),
            2 if domain.is_none() => (!global_bypass, 2),
            _ => (global_bypass, 3),
        };
        phases_of_each_kind[kind] += 1;
        sh.identity[phase as usize].store(identity, Ordering::Release);
        sh.started.store(phase, Ordering::Release);
        match kind {
            0 | 1 => {
                let flags = if kind == 1 {
                    VIRTIO_IOMMU_ATTACH_F_BYPASS
                } else {
                    0
                };
                assert_eq!(attach_flags(&d, phase as u32, EP, flags), Status::Ok);
                domain = Some(phase as u32);
                translating = kind == 0;
            }
            2 => {
                global_bypass = identity;
                d.write_config(CONFIG_BYPASS_OFFSET as u64, &[u8::from(identity)]);
            }
            _ => {
                assert_eq!(detach(&d, domain.unwrap(), EP), Status::Ok);
                domain = None;
                translating = false;
            }
        }
        // The previous domain (if any) is gone with its mappings: new generations start over.
        gens.iter_mut().for_each(|g| *g = 0);
        sh.done.store(phase, Ordering::Release);
        if kind == 3 {
            // Right after a detach pooled the checked endpoint's table: a reader still
            // holding the old binding must not see the other endpoint's mappings in it.
            move_other(&d, &mut other, &mut other_next, &mut next);
            phases_of_each_kind[4] += 1;
        }
    }
    sh.stop.store(true, Ordering::Relaxed);
    let successes: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(
        phases_of_each_kind.iter().all(|&n| n > 0),
        "every kind of binding change ran: {phases_of_each_kind:?}"
    );
    assert!(successes > 0, "some translations succeeded");
    // Every success was counted exactly once, whichever domain or table served it.
    assert_eq!(d.stats().total.translations, successes);
}

/// Run `f` once, when this thread reaches race point `at` for the `nth` time (from 1).
fn once_at(at: RacePoint, nth: usize, f: impl FnOnce() + 'static) {
    let mut f = Some(f);
    let mut seen = 0;
    RACE_HOOK.with(|h| {
        *h.borrow_mut() = Some(Box::new(move |p| {
            if p == at {
                seen += 1;
                if seen == nth {
                    if let Some(f) = f.take() {
                        f()
                    }
                }
            }
        }))
    });
}

fn clear_hook() {
    RACE_HOOK.with(|h| *h.borrow_mut() = None);
}

fn strict() -> Arc<VirtioIommu> {
    device_with(IommuConfig {
        boot_bypass: false,
        ..Default::default()
    })
}

/// The endpoint leaves its domain, and another endpoint's new domain reuses the table, while
/// a reader holds the old binding: the reader must notice through the endpoint's count.
#[test]
fn stale_binding_to_a_reused_table_is_rejected() {
    let d = strict();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0xa000, RW), Status::Ok);
    let w = d.clone();
    once_at(RacePoint::Bound, 1, move || {
        assert_eq!(detach(&w, 1, 1), Status::Ok);
        assert_eq!(attach(&w, 2, 2), Status::Ok); // takes domain 1's table
        assert_eq!(map(&w, 2, 0x1000, 0x1fff, 0xf000, RW), Status::Ok);
    });
    let r = d.translate(1, 0x1010, 4, Access::Read);
    clear_hook();
    assert_eq!(r.unwrap_err().reason, crate::FaultReason::Domain);
    assert_eq!(gpa_of(&d, 2, 0x1010), 0xf010);
}

/// A radix node freed and reused at another IOVA between two levels of a walk: the reader
/// must notice through the table's count.
#[test]
fn node_reused_between_levels_is_rejected() {
    let d = strict();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0xa000, RW), Status::Ok);
    // Three levels (a mapping at 1 GiB), and a second leaf node under the same level-1 node.
    assert_eq!(map(&d, 1, 0x4000_0000, 0x4000_0fff, 0xc000, RW), Status::Ok);
    assert_eq!(map(&d, 1, 0x40_0000, 0x40_0fff, 0xd000, RW), Status::Ok);
    let w = d.clone();
    // The second level boundary: the reader holds the leaf node of 0x1000.
    once_at(RacePoint::Level, 2, move || {
        // Same index in a leaf node 2 MiB further: the emptied node is reused there.
        assert_eq!(unmap(&w, 1, 0x1000, 0x1fff), Status::Ok);
        assert_eq!(map(&w, 1, 0x20_1000, 0x20_1fff, 0xf000, RW), Status::Ok);
    });
    let r = d.translate(1, 0x1010, 4, Access::Read);
    clear_hook();
    assert_eq!(r.unwrap_err().reason, crate::FaultReason::Mapping);
    assert_eq!(gpa_of(&d, 1, 0x20_1010), 0xf010);
}

/// A change after the walk but before validation: retried, so the answer is the new state.
#[test]
fn change_before_validation_is_retried() {
    let d = strict();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0xa000, RW), Status::Ok);
    let w = d.clone();
    once_at(RacePoint::Walked, 1, move || {
        assert_eq!(unmap(&w, 1, 0x1000, 0x1fff), Status::Ok);
        assert_eq!(map(&w, 1, 0x1000, 0x1fff, 0xb000, RW), Status::Ok);
    });
    let r = d.translate(1, 0x1010, 4, Access::Read);
    clear_hook();
    assert_eq!(r.unwrap().first().unwrap().gpa, 0xb010);
    // Counted once, although the walk ran twice.
    assert_eq!(d.domain_stats(1).unwrap().translations, 1);
}

/// A validated miss whose endpoint moves before the fault is recorded: the locked path
/// decides (here: unattached, so a domain fault counted in the device totals).
#[test]
fn binding_change_before_a_miss_is_recorded_is_rechecked() {
    let d = strict();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    let w = d.clone();
    once_at(RacePoint::Missed, 1, move || {
        assert_eq!(detach(&w, 1, 1), Status::Ok);
    });
    let r = d.translate(1, 0x1010, 4, Access::Read);
    clear_hook();
    assert_eq!(r.unwrap_err().reason, crate::FaultReason::Domain);
    let s = d.stats();
    assert_eq!((s.total.faults, s.retired_domains[0].1.faults), (1, 0));
}

/// The common miss: recorded once, in the endpoint's domain, with the first unmapped byte.
#[test]
fn validated_miss_is_recorded_in_its_domain() {
    let d = strict();
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0xa000, RW), Status::Ok);
    let f = d.translate(1, 0x1ff0, 0x20, Access::Write).unwrap_err();
    assert_eq!((f.reason, f.address), (crate::FaultReason::Mapping, 0x2000));
    assert_eq!(d.domain_stats(1).unwrap().faults, 1);
    assert_eq!(d.pending_faults(), 1);
}
