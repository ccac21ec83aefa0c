//! Property test: the device's mapping tables against a simple reference model (a list of
//! mappings per domain and an endpoint->domain map) over random request sequences.

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use virtio_iommu::{Access, IommuConfig, Status};

#[derive(Clone, Debug)]
enum Op {
    Attach {
        domain: u32,
        ep: u32,
    },
    Detach {
        domain: u32,
        ep: u32,
    },
    Map {
        domain: u32,
        page: u64,
        pages: u64,
        phys: u64,
        write: bool,
    },
    Unmap {
        domain: u32,
        page: u64,
        pages: u64,
    },
    Translate {
        ep: u32,
        page: u64,
        off: u64,
        len: u64,
        write: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // Small domain/page spaces so operations collide often; a few huge pages exercise
    // high radix levels.
    let page = prop_oneof![0u64..64, Just(1 << 20), Just((1 << 52) - 32)];
    prop_oneof![
        (0u32..3, 1u32..4).prop_map(|(domain, ep)| Op::Attach { domain, ep }),
        (0u32..3, 1u32..4).prop_map(|(domain, ep)| Op::Detach { domain, ep }),
        (0u32..3, page.clone(), 1u64..9, 0u64..1024, any::<bool>()).prop_map(
            |(domain, page, pages, phys, write)| Op::Map {
                domain,
                page,
                pages,
                phys,
                write
            }
        ),
        (0u32..3, page.clone(), 1u64..20).prop_map(|(domain, page, pages)| Op::Unmap {
            domain,
            page,
            pages
        }),
        (1u32..4, page, 0u64..0x1000, 1u64..0x3000, any::<bool>()).prop_map(
            |(ep, page, off, len, write)| Op::Translate {
                ep,
                page,
                off,
                len,
                write
            }
        ),
    ]
}

/// Reference: domain -> (start page -> (pages, phys page, writable)), endpoint -> domain.
#[derive(Default)]
struct Model {
    domains: BTreeMap<u32, BTreeMap<u64, (u64, u64, bool)>>,
    eps: BTreeMap<u32, u32>,
}

impl Model {
    fn attach(&mut self, domain: u32, ep: u32) -> Status {
        if let Some(old) = self.eps.insert(ep, domain) {
            if old != domain && !self.eps.values().any(|&d| d == old) {
                self.domains.remove(&old);
            }
        }
        self.domains.entry(domain).or_default();
        Status::Ok
    }
    fn detach(&mut self, domain: u32, ep: u32) -> Status {
        if self.eps.get(&ep) != Some(&domain) {
            return Status::Inval;
        }
        self.eps.remove(&ep);
        if !self.eps.values().any(|&d| d == domain) {
            self.domains.remove(&domain);
        }
        Status::Ok
    }
    fn map(&mut self, domain: u32, page: u64, pages: u64, phys: u64, write: bool) -> Status {
        let Some(m) = self.domains.get_mut(&domain) else {
            return Status::NoEnt;
        };
        let end = page + pages - 1;
        if m.iter().any(|(&s, &(n, _, _))| s <= end && page < s + n) {
            return Status::Inval;
        }
        m.insert(page, (pages, phys, write));
        Status::Ok
    }
    fn unmap(&mut self, domain: u32, page: u64, pages: u64) -> Status {
        let Some(m) = self.domains.get_mut(&domain) else {
            return Status::NoEnt;
        };
        let end = page + pages - 1;
        let hit: Vec<u64> = m
            .iter()
            .filter(|(&s, &(n, _, _))| s <= end && page < s + n)
            .map(|(&s, _)| s)
            .collect();
        if hit.iter().any(|s| *s < page || s + m[s].0 - 1 > end) {
            return Status::Range;
        }
        for s in hit {
            m.remove(&s);
        }
        Status::Ok
    }
    /// Guest-physical address of each byte of the access, or None on a fault.
    fn translate(&self, ep: u32, iova: u64, len: u64, write: bool) -> Option<Vec<(u64, u64)>> {
        let m = self.domains.get(self.eps.get(&ep)?)?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut cur = iova;
        while cur < iova + len {
            let p = cur >> 12;
            let (&s, &(n, phys, w)) = m.range(..=p).next_back()?;
            if p > s + n - 1 || (write && !w) {
                return None;
            }
            let gpa = ((phys + (p - s)) << 12) + (cur & 0xfff);
            let chunk = (((p + 1) << 12) - cur).min(iova + len - cur);
            match out.last_mut() {
                Some(l) if l.0 + l.1 == gpa => l.1 += chunk,
                _ => out.push((gpa, chunk)),
            }
            cur += chunk;
        }
        Some(out)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn device_matches_reference(ops in proptest::collection::vec(op(), 1..120)) {
        let d = device_with(IommuConfig { boot_bypass: false, ..Default::default() });
        let mut m = Model::default();
        for op in ops {
            match op {
                Op::Attach { domain, ep } => {
                    prop_assert_eq!(attach(&d, domain, ep), m.attach(domain, ep));
                }
                Op::Detach { domain, ep } => {
                    prop_assert_eq!(detach(&d, domain, ep), m.detach(domain, ep));
                }
                Op::Map { domain, page, pages, phys, write } => {
                    let flags = if write { RW } else { virtio_iommu::protocol::VIRTIO_IOMMU_MAP_F_READ };
                    let (s, e) = common::pages(page, pages);
                    prop_assert_eq!(
                        map(&d, domain, s, e, phys << 12, flags),
                        m.map(domain, page, pages, phys, write)
                    );
                }
                Op::Unmap { domain, page, pages } => {
                    let (s, e) = common::pages(page, pages);
                    prop_assert_eq!(unmap(&d, domain, s, e), m.unmap(domain, page, pages));
                }
                Op::Translate { ep, page, off, len, write } => {
                    let iova = (page << 12) + off;
                    let access = if write { Access::Write } else { Access::Read };
                    let got = d
                        .translate(ep, iova, len, access)
                        .ok()
                        .map(|t| t.iter().map(|r| (r.gpa, r.len)).collect::<Vec<_>>());
                    prop_assert_eq!(got, m.translate(ep, iova, len, write));
                }
            }
        }
        // Final tables agree mapping for mapping.
        for (&dom, maps) in &m.domains {
            let got: Vec<(u64, u64, u64)> = d
                .domain_mappings(dom)
                .unwrap()
                .iter()
                .map(|x| (x.start >> 12, (x.end - x.start + 1) >> 12, x.phys >> 12))
                .collect();
            let want: Vec<(u64, u64, u64)> =
                maps.iter().map(|(&s, &(n, p, _))| (s, n, p)).collect();
            prop_assert_eq!(got, want);
        }
        prop_assert_eq!(d.domain_count(), m.domains.len());
    }
}
