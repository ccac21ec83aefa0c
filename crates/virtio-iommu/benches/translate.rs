//! Translation and MAP/UNMAP throughput, each next to a plain `BTreeMap` range-lookup
//! baseline measured in the same run.
//!
//! Layout: N 4 KiB mappings at every other page (so misses fall in the gaps between them),
//! guest-physical pages scattered. Patterns: sequential hits (walk the mappings in IOVA
//! order), random hits, random misses. Each measurement is a batch of 1024 lookups; the
//! printed p50 is the median batch time divided by 1024.
//!
//! Columns: "radix" is the bare `MappingTable::lookup`; "model" is `VirtioIommu::translate`
//! end to end, single-threaded: hits take its lock-free path (endpoint slot, two sequence
//! checks, radix walk, per-thread hit counter); misses are faults, so they also take the
//! state read lock and record the fault (counters, full event queue: dropped and counted).
//!
//! `cargo bench -p virtio-iommu --bench translate` runs criterion and then prints the summary
//! table; `-- --quick-table` prints only the table.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use virtio_iommu::protocol::*;
use virtio_iommu::table::{Mapping, MappingTable, PERM_READ, PERM_WRITE};
use virtio_iommu::{Access, EndpointConfig, IommuConfig, VirtioIommu};

const SIZES: [usize; 4] = [1, 1_000, 65_536, 1_048_576];
const BATCH: usize = 1024;
const BASE: u64 = 0x1_0000_0000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn iova_of(i: usize) -> u64 {
    BASE + (i as u64) * 0x2000
}

fn phys_of(i: usize, n: usize) -> u64 {
    ((i as u64).wrapping_mul(7919) % (n as u64 * 4)) << 12
}

struct Baseline(BTreeMap<u64, (u64, u64)>);
impl Baseline {
    #[inline]
    fn lookup(&self, iova: u64) -> Option<u64> {
        self.0
            .range(..=iova)
            .next_back()
            .filter(|(_, &(end, _))| end >= iova)
            .map(|(&s, &(_, p))| p + (iova - s))
    }
}

struct Fixture {
    table: MappingTable,
    base: Baseline,
    dev: VirtioIommu,
    seq: Vec<u64>,
    rand: Vec<u64>,
    miss: Vec<u64>,
}

fn fixture(n: usize) -> Fixture {
    let mut table = MappingTable::new(12);
    let mut base = BTreeMap::new();
    let dev = VirtioIommu::new(IommuConfig {
        boot_bypass: false,
        ..Default::default()
    })
    .unwrap();
    dev.add_endpoint(1, EndpointConfig::default()).unwrap();
    dev.ack_features(dev.features());
    let attach = Request::Attach(AttachRequest {
        domain: 1,
        endpoint: 1,
        flags: 0,
        reserved: [0; 4],
    });
    assert_eq!(dev.handle_request(&attach, 0).0, virtio_iommu::Status::Ok);
    for i in 0..n {
        let (s, p) = (iova_of(i), phys_of(i, n));
        table
            .insert(Mapping {
                start: s,
                end: s + 0xfff,
                phys: p,
                perms: PERM_READ | PERM_WRITE,
                mmio: false,
            })
            .unwrap();
        base.insert(s, (s + 0xfff, p));
        let map = Request::Map(MapRequest {
            domain: 1,
            virt_start: s,
            virt_end: s + 0xfff,
            phys_start: p,
            flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
        });
        assert_eq!(dev.handle_request(&map, 0).0, virtio_iommu::Status::Ok);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let count = 1 << 16;
    let seq = (0..count).map(|k| iova_of(k % n) + 0x80).collect();
    let rand = (0..count)
        .map(|_| iova_of(rng.next() as usize % n) + (rng.next() & 0xff8))
        .collect();
    let miss = (0..count)
        .map(|_| iova_of(rng.next() as usize % n) + 0x1000 + (rng.next() & 0xff8))
        .collect();
    Fixture {
        table,
        base: Baseline(base),
        dev,
        seq,
        rand,
        miss,
    }
}

/// Run `f` over consecutive 1024-address windows of `addrs`.
#[inline]
fn batch(addrs: &[u64], start: &mut usize, mut f: impl FnMut(u64) -> u64) -> u64 {
    let s = *start;
    *start = (s + BATCH) % addrs.len();
    let mut acc = 0u64;
    for &a in &addrs[s..s + BATCH] {
        acc = acc.wrapping_add(f(a));
    }
    acc
}

fn table_lookup(t: &MappingTable, a: u64) -> u64 {
    t.lookup(a).map_or(0, |h| h.phys)
}

fn model_translate(d: &VirtioIommu, a: u64) -> u64 {
    d.translate(1, a, 8, Access::Read)
        .ok()
        .and_then(|t| t.first())
        .map_or(0, |r| r.gpa)
}

/// Median ns per operation over `batches` timed batches.
fn p50(batches: usize, mut one_batch: impl FnMut() -> u64, per_batch: usize) -> f64 {
    for _ in 0..batches / 4 {
        black_box(one_batch());
    }
    let mut v: Vec<Duration> = (0..batches)
        .map(|_| {
            let t = Instant::now();
            black_box(one_batch());
            t.elapsed()
        })
        .collect();
    v.sort();
    v[v.len() / 2].as_nanos() as f64 / per_batch as f64
}

fn map_unmap_pair(d: &VirtioIommu, s: u64) {
    let map = Request::Map(MapRequest {
        domain: 1,
        virt_start: s,
        virt_end: s + 0xfff,
        phys_start: 0x1000,
        flags: VIRTIO_IOMMU_MAP_F_READ,
    });
    let unmap = Request::Unmap(UnmapRequest {
        domain: 1,
        virt_start: s,
        virt_end: s + 0xfff,
    });
    black_box(d.handle_request(&map, 0));
    black_box(d.handle_request(&unmap, 0));
}

fn table_pair(t: &mut MappingTable, s: u64) {
    t.insert(Mapping {
        start: s,
        end: s + 0xfff,
        phys: 0x1000,
        perms: PERM_READ,
        mmio: false,
    })
    .unwrap();
    black_box(t.unmap(s, s + 0xfff).ok());
}

fn baseline_pair(b: &mut BTreeMap<u64, (u64, u64)>, s: u64) {
    b.insert(s, (s + 0xfff, 0x1000));
    black_box(b.remove(&s));
}

fn summary(fixtures: &mut [(usize, Fixture)]) {
    println!();
    println!("| live mappings | pattern | radix table p50 ns | model translate p50 ns | BTreeMap p50 ns | BTreeMap / radix | BTreeMap / model translate |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for (n, f) in fixtures.iter() {
        for (name, addrs) in [
            ("sequential hits", &f.seq),
            ("random hits", &f.rand),
            ("misses", &f.miss),
        ] {
            let (mut a, mut b, mut c) = (0, 0, 0);
            let t = p50(
                400,
                || batch(addrs, &mut a, |x| table_lookup(&f.table, x)),
                BATCH,
            );
            let m = p50(
                400,
                || batch(addrs, &mut b, |x| model_translate(&f.dev, x)),
                BATCH,
            );
            let base = p50(
                400,
                || batch(addrs, &mut c, |x| f.base.lookup(x).unwrap_or(0)),
                BATCH,
            );
            println!(
                "| {n} | {name} | {t:.1} | {m:.1} | {base:.1} | {:.1}x | {:.1}x |",
                base / t,
                base / m
            );
        }
    }
    println!();
    println!("| live mappings | MAP+UNMAP pairs/s (device requests) | pairs/s (radix table) | pairs/s (BTreeMap baseline) | device / BTreeMap |");
    println!("|---:|---:|---:|---:|---:|");
    for (n, f) in fixtures.iter_mut() {
        let mut rng = Rng(42);
        let gaps: Vec<u64> = (0..BATCH)
            .map(|_| iova_of(rng.next() as usize % *n) + 0x1000)
            .collect();
        let dev = p50(
            200,
            || {
                for &s in &gaps {
                    map_unmap_pair(&f.dev, s)
                }
                0
            },
            BATCH,
        );
        let tab = p50(
            200,
            || {
                for &s in &gaps {
                    table_pair(&mut f.table, s)
                }
                0
            },
            BATCH,
        );
        let base = p50(
            200,
            || {
                for &s in &gaps {
                    baseline_pair(&mut f.base.0, s)
                }
                0
            },
            BATCH,
        );
        println!(
            "| {n} | {:.2} M | {:.2} M | {:.2} M | {:.2} |",
            1e3 / dev,
            1e3 / tab,
            1e3 / base,
            base / dev
        );
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick-table");
    let mut fixtures: Vec<(usize, Fixture)> = SIZES.iter().map(|&n| (n, fixture(n))).collect();
    if !quick {
        let mut c = Criterion::default()
            .configure_from_args()
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20);
        let mut g = c.benchmark_group("translate");
        g.throughput(Throughput::Elements(BATCH as u64));
        for (n, f) in &fixtures {
            for (name, addrs) in [("seq", &f.seq), ("rand", &f.rand), ("miss", &f.miss)] {
                let mut i = 0;
                g.bench_function(BenchmarkId::new(format!("radix/{name}"), n), |b| {
                    b.iter(|| batch(addrs, &mut i, |x| table_lookup(&f.table, x)))
                });
                let mut i = 0;
                g.bench_function(BenchmarkId::new(format!("model/{name}"), n), |b| {
                    b.iter(|| batch(addrs, &mut i, |x| model_translate(&f.dev, x)))
                });
                let mut i = 0;
                g.bench_function(BenchmarkId::new(format!("btreemap/{name}"), n), |b| {
                    b.iter(|| batch(addrs, &mut i, |x| f.base.lookup(x).unwrap_or(0)))
                });
            }
        }
        g.finish();
        let mut g = c.benchmark_group("map_unmap");
        for (n, f) in fixtures.iter_mut() {
            let gap = iova_of(*n / 2) + 0x1000;
            g.bench_function(BenchmarkId::new("device", *n), |b| {
                b.iter(|| map_unmap_pair(&f.dev, gap))
            });
            g.bench_function(BenchmarkId::new("btreemap", *n), |b| {
                b.iter(|| baseline_pair(&mut f.base.0, gap))
            });
        }
        g.finish();
        c.final_summary();
    }
    summary(&mut fixtures);
}
