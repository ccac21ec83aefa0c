//! What warden counts, in Cloud Hypervisor's counters shape (device id → counter name →
//! value): the virtio-iommu's counters per domain and in total, each passed-through device's
//! VFIO counters, and the I/O of each virtio disk, net and rng (by the id `vm.info` gives it).
//!
//! One snapshot feeds both `vm.counters` and the report printed on exit and on SIGUSR1, so
//! the two agree; the report is about DMA (the IOMMU's and VFIO's lines): a disk's or a net's
//! traffic is `vm.counters`' alone, not a line on every exit.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use api::Counters;
use vfio::VfioMapper;
use virtio_devices::DeviceCounters;
use virtio_iommu::{StatsSnapshot, VirtioIommu};
use vm_device::lock;

pub use vm_config::IOMMU_ID;

/// The sources of the counters.
pub struct StatsReport {
    iommu: Option<Arc<VirtioIommu>>,
    /// Per passed-through device: its name and mapper (hot-added ones join, removed ones
    /// leave).
    vfio: Mutex<Vec<(String, Arc<VfioMapper>)>>,
    /// The virtio devices that count, by id: hot-added ones join, removed ones leave.
    devices: Mutex<BTreeMap<String, Arc<dyn DeviceCounters>>>,
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
    pub fn new(
        iommu: Option<Arc<VirtioIommu>>,
        vfio: Vec<(String, Arc<VfioMapper>)>,
        devices: impl IntoIterator<Item = (String, Arc<dyn DeviceCounters>)>,
    ) -> Self {
        StatsReport {
            iommu,
            vfio: Mutex::new(vfio),
            devices: Mutex::new(devices.into_iter().collect()),
        }
    }

    /// Whether the printed report has any line: an IOMMU or a passed-through device.
    pub fn prints_anything(&self) -> bool {
        self.iommu.is_some() || !lock(&self.vfio).is_empty()
    }

    /// A hot-added passed-through device's counters join, under its id.
    pub fn add_passthrough(&self, id: &str, mapper: Arc<VfioMapper>) {
        lock(&self.vfio).push((id.to_string(), mapper));
    }

    /// A hot-added device's counters join, under its id.
    pub fn add_device(&self, id: &str, counters: Arc<dyn DeviceCounters>) {
        lock(&self.devices).insert(id.to_string(), counters);
    }

    /// A removed device's counters leave with it.
    pub fn remove_device(&self, id: &str) {
        lock(&self.devices).remove(id);
        lock(&self.vfio).retain(|(name, _)| name != id);
    }

    /// Every counter, now.
    pub fn counters(&self) -> Counters {
        let mut counters = Counters::new();
        if let Some(model) = &self.iommu {
            let stats = model.stats();
            let mut total = snapshot_counters(&stats.total);
            total.insert("iotlb_hits".into(), stats.iotlb_hits);
            total.insert("dropped_fault_events".into(), stats.dropped_fault_events);
            total.insert(
                "requests_waited_for_dma".into(),
                stats.requests_waited_for_dma,
            );
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
        for (name, mapper) in lock(&self.vfio).iter() {
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
        for (id, device) in lock(&self.devices).iter() {
            let values = device
                .read()
                .into_iter()
                .map(|(name, value)| (name.to_string(), value));
            // The virtio-iommu device's own counters join its model's.
            counters.entry(id.clone()).or_default().extend(values);
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
                "warden: virtio-iommu: {} IOTLB hits, {} fault events dropped, {} requests waited for DMA",
                get(total, "iotlb_hits"),
                get(total, "dropped_fault_events"),
                get(total, "requests_waited_for_dma")
            ));
        }
        for (name, _) in lock(&self.vfio).iter() {
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
        let report = StatsReport::new(Some(Arc::clone(&model)), Vec::new(), []);
        let counters = report.counters();
        assert_eq!(counters[IOMMU_ID]["maps"], 0);
        assert_eq!(counters[IOMMU_ID].len(), 9, "{counters:?}");
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
                "warden: virtio-iommu: 0 IOTLB hits, 0 fault events dropped, 0 requests waited for DMA",
            ]
        );
    }

    /// A device's counters as a device model keeps them: values that change under the VMM.
    struct FakeCounters(std::sync::atomic::AtomicU64);

    impl DeviceCounters for FakeCounters {
        fn read(&self) -> Vec<(&'static str, u64)> {
            let reads = self.0.load(std::sync::atomic::Ordering::Relaxed);
            vec![("read_ops", reads), ("read_bytes", reads * 512)]
        }
    }

    #[test]
    fn devices_count_under_their_ids_from_plug_to_removal_and_print_nothing() {
        let boot_disk = Arc::new(FakeCounters(3.into()));
        let report = StatsReport::new(
            None,
            Vec::new(),
            [("_disk0".to_string(), boot_disk.clone() as _)],
        );
        assert!(
            !report.prints_anything(),
            "device I/O is not in the exit report"
        );
        let counters = report.counters();
        assert_eq!(
            counters,
            Counters::from([(
                "_disk0".to_string(),
                BTreeMap::from([("read_ops".into(), 3), ("read_bytes".into(), 1536)])
            )])
        );
        assert!(report.lines(&counters).is_empty());

        // Read again, not cached: the device counted on meanwhile.
        boot_disk.0.store(4, std::sync::atomic::Ordering::Relaxed);
        report.add_device("hot0", Arc::new(FakeCounters(1.into())));
        let counters = report.counters();
        assert_eq!(counters["_disk0"]["read_ops"], 4);
        assert_eq!(counters["hot0"]["read_bytes"], 512);

        report.remove_device("hot0");
        let ids: Vec<String> = report.counters().into_keys().collect();
        assert_eq!(ids, ["_disk0"]);
    }

    #[test]
    fn the_iommu_devices_counters_join_its_models() {
        let model = Arc::new(VirtioIommu::new(IommuConfig::default()).unwrap());
        let queue = Arc::new(FakeCounters(2.into()));
        let report = StatsReport::new(
            Some(model),
            Vec::new(),
            [(IOMMU_ID.to_string(), queue as _)],
        );
        let iommu = &report.counters()[IOMMU_ID];
        assert_eq!((iommu["maps"], iommu["read_ops"]), (0, 2));
        assert_eq!(iommu.len(), 11, "{iommu:?}");
    }
}
