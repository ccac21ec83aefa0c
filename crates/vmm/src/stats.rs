//! What warden reports about DMA: the virtio-iommu's counters per domain and in total, and each
//! passed-through device's VFIO counters. One snapshot, in Cloud Hypervisor's counters shape
//! (device id → counter name → value), feeds both `vm.counters` and the lines printed on exit
//! and on SIGUSR1, so the two always agree.

use std::collections::BTreeMap;
use std::sync::Arc;

use api::Counters;
use vfio::VfioMapper;
use virtio_iommu::{StatsSnapshot, VirtioIommu};

/// The id of the virtio-iommu's totals in the counters.
pub const IOMMU_ID: &str = "virtio-iommu";

/// The sources of the counters.
pub struct StatsReport {
    pub iommu: Option<Arc<VirtioIommu>>,
    /// Per passed-through device: its name and mapper.
    pub vfio: Vec<(String, Arc<VfioMapper>)>,
}

/// The id of domain `domain`'s counters; destroyed domains keep theirs under another id (a
/// later domain may reuse the number).
fn domain_id(domain: u32, destroyed: bool) -> String {
    if destroyed {
        format!("{IOMMU_ID}-domain-{domain}-destroyed")
    } else {
        format!("{IOMMU_ID}-domain-{domain}")
    }
}

const TRANSLATION_COUNTERS: [&str; 6] = [
    "maps",
    "unmaps",
    "bytes_mapped",
    "bytes_unmapped",
    "faults",
    "translations",
];

fn snapshot_counters(s: &StatsSnapshot) -> BTreeMap<String, u64> {
    let values = [
        s.maps,
        s.unmaps,
        s.bytes_mapped,
        s.bytes_unmapped,
        s.faults,
        s.translations,
    ];
    TRANSLATION_COUNTERS
        .iter()
        .map(|name| name.to_string())
        .zip(values)
        .collect()
}

impl StatsReport {
    pub fn has_any(&self) -> bool {
        self.iommu.is_some() || !self.vfio.is_empty()
    }

    /// Every counter, now.
    pub fn counters(&self) -> Counters {
        let mut counters = Counters::new();
        if let Some(model) = &self.iommu {
            let stats = model.stats();
            let mut total = snapshot_counters(&stats.total);
            total.insert("iotlb_hits".into(), stats.iotlb_hits);
            total.insert("dropped_fault_events".into(), stats.dropped_fault_events);
            counters.insert(IOMMU_ID.into(), total);
            let domains = stats.domains.iter().map(|d| (d, false));
            let retired = stats.retired_domains.iter().map(|d| (d, true));
            for ((domain, snapshot), destroyed) in domains.chain(retired) {
                // Two destroyed domains with the same number: their sum.
                let entry = counters.entry(domain_id(*domain, destroyed)).or_default();
                for (name, value) in snapshot_counters(snapshot) {
                    *entry.entry(name).or_default() += value;
                }
            }
        }
        for (name, mapper) in &self.vfio {
            let s = mapper.stats();
            // A passed-through device's counters go by its id.
            counters.insert(
                name.clone(),
                BTreeMap::from([
                    ("maps".into(), s.maps),
                    ("unmaps".into(), s.unmaps),
                    ("bytes_mapped".into(), s.bytes_mapped),
                    ("live_entries".into(), s.live_entries),
                    ("peak_entries".into(), s.peak_entries),
                    ("entry_limit".into(), s.entry_limit),
                    ("limit_refusals".into(), s.limit_refusals),
                ]),
            );
        }
        counters
    }

    /// The report printed on exit and on SIGUSR1.
    pub fn print(&self) {
        for line in self.lines(&self.counters()) {
            eprintln!("{line}");
        }
    }

    /// The report's lines, from `counters`: destroyed domains, live domains, the total, then
    /// each passed-through device.
    fn lines(&self, counters: &Counters) -> Vec<String> {
        let get = |c: &BTreeMap<String, u64>, name: &str| c.get(name).copied().unwrap_or(0);
        let line = |what: &str, c: &BTreeMap<String, u64>| {
            format!(
                "warden: virtio-iommu {what}: {} maps, {} unmaps, {} bytes mapped, {} faults, {} translations",
                get(c, "maps"),
                get(c, "unmaps"),
                get(c, "bytes_mapped"),
                get(c, "faults"),
                get(c, "translations")
            )
        };
        let mut lines = Vec::new();
        if let Some(total) = counters.get(IOMMU_ID) {
            let domains = |destroyed: bool| {
                let mut domains: Vec<(u32, &BTreeMap<String, u64>)> = counters
                    .iter()
                    .filter_map(|(id, c)| {
                        let rest = id.strip_prefix(IOMMU_ID)?.strip_prefix("-domain-")?;
                        let number = match rest.strip_suffix("-destroyed") {
                            Some(number) if destroyed => number,
                            None if !destroyed => rest,
                            _ => return None,
                        };
                        Some((number.parse().ok()?, c))
                    })
                    .collect();
                domains.sort_by_key(|&(number, _)| number);
                domains
            };
            for (domain, c) in domains(true) {
                lines.push(line(&format!("domain {domain} (destroyed)"), c));
            }
            for (domain, c) in domains(false) {
                lines.push(line(&format!("domain {domain}"), c));
            }
            lines.push(line("total", total));
            lines.push(format!(
                "warden: virtio-iommu: {} IOTLB hits, {} fault events dropped",
                get(total, "iotlb_hits"),
                get(total, "dropped_fault_events")
            ));
        }
        for (name, _) in &self.vfio {
            if let Some(c) = counters.get(name) {
                lines.push(format!(
                    "warden: vfio {name}: {} maps, {} unmaps, {} bytes mapped, {} entries live, {} peak entries (limit {}, {} refused)",
                    get(c, "maps"),
                    get(c, "unmaps"),
                    get(c, "bytes_mapped"),
                    get(c, "live_entries"),
                    get(c, "peak_entries"),
                    get(c, "entry_limit"),
                    get(c, "limit_refusals")
                ));
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_iommu::{EndpointConfig, IommuConfig};

    #[test]
    fn the_printed_lines_are_the_counters() {
        let model = Arc::new(VirtioIommu::new(IommuConfig::default()).unwrap());
        model.add_endpoint(0x10, EndpointConfig::default()).unwrap();
        let report = StatsReport {
            iommu: Some(Arc::clone(&model)),
            vfio: Vec::new(),
        };
        let counters = report.counters();
        assert_eq!(counters[IOMMU_ID]["maps"], 0);
        assert_eq!(counters[IOMMU_ID].len(), 8, "{counters:?}");
        let mut faked = counters.clone();
        faked.get_mut(IOMMU_ID).unwrap().insert("maps".into(), 5);
        faked.insert(
            domain_id(2, false),
            BTreeMap::from([("maps".into(), 3), ("translations".into(), 9)]),
        );
        faked.insert(domain_id(10, false), BTreeMap::from([("faults".into(), 1)]));
        faked.insert(domain_id(1, true), BTreeMap::from([("unmaps".into(), 4)]));
        assert_eq!(
            report.lines(&faked),
            [
                "warden: virtio-iommu domain 1 (destroyed): 0 maps, 4 unmaps, 0 bytes mapped, 0 faults, 0 translations",
                "warden: virtio-iommu domain 2: 3 maps, 0 unmaps, 0 bytes mapped, 0 faults, 9 translations",
                "warden: virtio-iommu domain 10: 0 maps, 0 unmaps, 0 bytes mapped, 1 faults, 0 translations",
                "warden: virtio-iommu total: 5 maps, 0 unmaps, 0 bytes mapped, 0 faults, 0 translations",
                "warden: virtio-iommu: 0 IOTLB hits, 0 fault events dropped",
            ]
        );
    }
}
