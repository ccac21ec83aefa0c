//! What the benchmark reads back: fio's and iperf3's JSON (written in the guest, read from its
//! disk after the run) and the KVM host's CPU-time stamps of the VMM process.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// One measurement: how fast, and how many bytes it moved (for CPU seconds per GiB).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// I/O operations per second (fio; 0 for TCP).
    pub iops: f64,
    /// Bytes per second.
    pub bytes_per_second: f64,
    /// Bytes moved.
    pub bytes: u64,
}

/// Everything in `text` from its first `{`: fio puts warnings before its JSON when they go to
/// the same stream.
fn json(text: &str, what: &str) -> Result<Value, String> {
    let start = text
        .find('{')
        .ok_or_else(|| format!("{what}: no JSON in {text:?}"))?;
    serde_json::from_str(&text[start..]).map_err(|e| format!("{what}: bad JSON: {e}"))
}

fn number(v: &Value, path: &str, what: &str) -> Result<f64, String> {
    v.pointer(path)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("{what}: no number at {path}"))
}

/// fio's `--output-format=json` of a single job: reads and writes together (each job here
/// does one or the other).
pub fn fio(text: &str) -> Result<Measured, String> {
    let v = json(text, "fio")?;
    let jobs = v
        .get("jobs")
        .and_then(Value::as_array)
        .ok_or("fio: no jobs array")?;
    let [job] = jobs.as_slice() else {
        return Err(format!("fio: {} jobs, expected one", jobs.len()));
    };
    let name = job.get("jobname").and_then(Value::as_str).unwrap_or("?");
    let what = format!("fio job {name}");
    let error = number(job, "/error", &what)?;
    if error != 0.0 {
        return Err(format!("{what} failed with error {error}"));
    }
    let mut total = Measured {
        iops: 0.0,
        bytes_per_second: 0.0,
        bytes: 0,
    };
    for dir in ["read", "write"] {
        total.iops += number(job, &format!("/{dir}/iops"), &what)?;
        total.bytes_per_second += number(job, &format!("/{dir}/bw_bytes"), &what)?;
        total.bytes += number(job, &format!("/{dir}/io_bytes"), &what)? as u64;
    }
    if total.bytes == 0 {
        return Err(format!("{what} moved no data"));
    }
    Ok(total)
}

/// iperf3 client's `-J`: what the receiving end got (the host with the guest as sender, the
/// guest with `-R`). iperf3 may exit 0 after a failed test, so its `error` decides.
pub fn iperf3(text: &str) -> Result<Measured, String> {
    let v = json(text, "iperf3")?;
    if let Some(error) = v.get("error").and_then(Value::as_str) {
        return Err(format!("iperf3: {error}"));
    }
    let bytes = number(&v, "/end/sum_received/bytes", "iperf3")? as u64;
    let bits = number(&v, "/end/sum_received/bits_per_second", "iperf3")?;
    if bytes == 0 {
        return Err("iperf3 moved no data".into());
    }
    Ok(Measured {
        iops: 0.0,
        bytes_per_second: bits / 8.0,
        bytes,
    })
}

/// A job the guest timed itself (the sandbox's): `{"bytes", "ops", "nanoseconds"}`.
pub fn timed(text: &str) -> Result<Measured, String> {
    let v = json(text, "timed job")?;
    let bytes = number(&v, "/bytes", "timed job")?;
    let ops = number(&v, "/ops", "timed job")?;
    let seconds = number(&v, "/nanoseconds", "timed job")? / 1e9;
    if seconds <= 0.0 || (bytes == 0.0 && ops == 0.0) {
        return Err(format!("timed job: nothing measured in {text:?}"));
    }
    Ok(Measured {
        iops: ops / seconds,
        bytes_per_second: bytes / seconds,
        bytes: bytes as u64,
    })
}

/// The VMM process's CPU time at one stamp, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuTime {
    /// utime + stime of all its threads.
    pub total: f64,
    /// The part its vCPU threads spent running the guest (`guest_time`, counted in utime).
    pub guest: f64,
}

impl std::ops::Sub for CpuTime {
    type Output = CpuTime;
    fn sub(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            total: self.total - earlier.total,
            guest: self.guest - earlier.guest,
        }
    }
}

/// `/proc/PID/stat` counts in USER_HZ ticks, 100 a second on x86 whatever the kernel's HZ.
const USER_HZ: f64 = 100.0;

/// The host's `STAMP utime stime guest_time LABEL` lines (ticks from `/proc/PID/stat`),
/// by label; other lines are ignored. A label stamped twice is an error.
pub fn stamps(text: &str) -> Result<HashMap<String, CpuTime>, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("STAMP ") else {
            continue;
        };
        let mut fields = rest.splitn(4, ' ');
        let mut tick = || -> Result<f64, String> {
            fields
                .next()
                .and_then(|f| f.parse::<u64>().ok())
                .map(|t| t as f64 / USER_HZ)
                .ok_or_else(|| format!("bad stamp line {line:?}"))
        };
        let (utime, stime, guest) = (tick()?, tick()?, tick()?);
        let label = fields
            .next()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| format!("stamp line without a label: {line:?}"))?;
        let time = CpuTime {
            total: utime + stime,
            guest,
        };
        if out.insert(label.to_string(), time).is_some() {
            return Err(format!("stamp {label:?} appears twice"));
        }
    }
    Ok(out)
}

/// The host's clock and the VMM's threads' CPU time at one stamp, in seconds; threads of one
/// kind (see [`thread_kind`]) summed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Threads {
    pub clock: f64,
    pub cpu: BTreeMap<String, f64>,
}

/// A thread's kind: its name without instance numbers or the separators left around them
/// (`vcpu0` → `vcpu`, `iou-wrk-186` → `iou-wrk`, `_disk0_q0` → `disk_q`).
pub fn thread_kind(name: &str) -> String {
    let mut kind = String::new();
    for c in name.chars().filter(|c| !c.is_ascii_digit()) {
        let separator = c == '-' || c == '_';
        if !(separator && kind.ends_with(c)) {
            kind.push(c);
        }
    }
    kind.trim_matches(|c| c == '-' || c == '_').to_string()
}

/// The host's `CLOCK LABEL|SECONDS` and `THREAD LABEL|NAME|UTIME STIME` lines (ticks from
/// each `/proc/PID/task/TID/stat`), by label; other lines are ignored.
pub fn threads(text: &str) -> Result<HashMap<String, Threads>, String> {
    let mut out: HashMap<String, Threads> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let bad = || format!("bad thread line {line:?}");
        if let Some(rest) = line.strip_prefix("CLOCK ") {
            let (label, seconds) = rest.split_once('|').ok_or_else(bad)?;
            let seconds = seconds.trim().parse().map_err(|_| bad())?;
            out.entry(label.to_string()).or_default().clock = seconds;
        } else if let Some(rest) = line.strip_prefix("THREAD ") {
            let mut fields = rest.splitn(3, '|');
            let (Some(label), Some(name), Some(ticks)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad());
            };
            // A thread that ended while its stamp was read (the host script skips it; an
            // older one wrote it with nothing read).
            if name.is_empty() && ticks.is_empty() {
                continue;
            }
            let mut ticks = ticks.split(' ').map(|t| t.parse::<u64>());
            let (Some(Ok(utime)), Some(Ok(stime)), None) =
                (ticks.next(), ticks.next(), ticks.next())
            else {
                return Err(bad());
            };
            *out.entry(label.to_string())
                .or_default()
                .cpu
                .entry(thread_kind(name))
                .or_default() += (utime + stime) as f64 / USER_HZ;
        }
    }
    Ok(out)
}

impl Threads {
    /// Each thread kind's share of one host CPU from `earlier` to this stamp (1.0: a CPU all
    /// the time). A thread that ended in between took its time with it: its kind may show
    /// less than it used, never below zero.
    pub fn busy_since(&self, earlier: &Threads) -> BTreeMap<String, f64> {
        let seconds = self.clock - earlier.clock;
        if seconds <= 0.0 {
            return BTreeMap::new();
        }
        self.cpu
            .iter()
            .map(|(kind, cpu)| {
                let before = earlier.cpu.get(kind).copied().unwrap_or(0.0);
                (kind.clone(), ((cpu - before) / seconds).max(0.0))
            })
            .collect()
    }
}

/// The guest's `NAME COUNT` lines (its virtio interrupts, from `/proc/interrupts`): their sum.
pub fn interrupts(text: &str) -> Result<u64, String> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            line.rsplit_once(' ')
                .and_then(|(_, count)| count.trim().parse::<u64>().ok())
                .ok_or_else(|| format!("bad interrupt line {line:?}"))
        })
        .sum()
}

/// The host's `COUNTERS LABEL|STATUS JSON` lines (warden's `vm.counters`, read by the stamp
/// server just before each stamp), by label: the virtio-iommu's MAP requests so far, or `None`
/// for a VM without one. A VMM without warden's API (the peer) has no such lines.
pub fn map_requests(text: &str) -> Result<HashMap<String, Option<u64>>, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("COUNTERS ") else {
            continue;
        };
        let (label, reply) = rest
            .split_once('|')
            .ok_or_else(|| format!("bad counters line {line:?}"))?;
        let body = reply
            .strip_prefix("200 ")
            .ok_or_else(|| format!("vm.counters refused at {label:?}: {reply}"))?;
        let counters: Value = serde_json::from_str(body)
            .map_err(|e| format!("vm.counters at {label:?}: bad JSON: {e}"))?;
        let maps = counters
            .pointer("/virtio-iommu/maps")
            .and_then(Value::as_u64);
        if out.insert(label.to_string(), maps).is_some() {
            return Err(format!("counters {label:?} appear twice"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from fio 3.33 (Debian 12, the guest image's version) and iperf3 3.12 (the
    // guest's and L1's), run with the benchmark's options but 1 s long.
    const FIO_RANDREAD: &str = include_str!("samples/fio-randread-4k-qd1.json");
    const FIO_RANDWRITE: &str = include_str!("samples/fio-randwrite-4k-qd16.json");
    const IPERF3_UP: &str = include_str!("samples/iperf3-up.json");
    const IPERF3_DOWN: &str = include_str!("samples/iperf3-down.json");
    const IPERF3_REFUSED: &str = include_str!("samples/iperf3-refused.json");

    #[test]
    fn fio_reads_and_writes_are_counted() {
        let r = fio(FIO_RANDREAD).unwrap();
        assert_eq!(r.bytes, 54_661_120);
        assert!((r.iops - 13_331.668_332).abs() < 1e-6);
        assert_eq!(r.bytes_per_second, 54_606_513.0);
        let w = fio(FIO_RANDWRITE).unwrap();
        assert_eq!(w.bytes, 354_816_000);
        assert!((w.iops - 86_538.461_538).abs() < 1e-6);
        assert_eq!(w.bytes_per_second, 354_461_538.0);
    }

    #[test]
    fn fio_warnings_before_the_json_are_skipped_and_failures_refused() {
        let warned = format!("fio: note: something\n{FIO_RANDREAD}");
        assert_eq!(fio(&warned), fio(FIO_RANDREAD));
        let failed = FIO_RANDREAD.replacen("\"error\" : 0", "\"error\" : 5", 1);
        assert!(fio(&failed).unwrap_err().contains("error 5"));
        assert!(fio("fio: failed to open file\n").is_err());
        assert!(fio(&FIO_RANDREAD[..500]).is_err());
    }

    #[test]
    fn iperf3_takes_the_receivers_count_both_ways() {
        let up = iperf3(IPERF3_UP).unwrap();
        assert_eq!(up.bytes, 2_726_428_672);
        assert!((up.bytes_per_second - 21_801_662_231.320_37 / 8.0).abs() < 1.0);
        let down = iperf3(IPERF3_DOWN).unwrap();
        assert_eq!(down.bytes, 2_648_965_120);
        assert!((down.bytes_per_second - 21_191_042_846.628_906 / 8.0).abs() < 1.0);
    }

    #[test]
    fn iperf3_errors_are_refused_though_it_exits_0() {
        assert_eq!(
            iperf3(IPERF3_REFUSED).unwrap_err(),
            "iperf3: unable to connect to server: Connection refused"
        );
    }

    #[test]
    fn stamps_are_seconds_by_label() {
        let text = "console noise\nSTAMP 150 50 120 begin randread-4k-qd1\n\
                    STAMP 400 90 300 end randread-4k-qd1\nSTAMP 7 3 0 boot\n";
        let s = stamps(text).unwrap();
        assert_eq!(s.len(), 3);
        let d = s["end randread-4k-qd1"] - s["begin randread-4k-qd1"];
        assert!((d.total - 2.9).abs() < 1e-9 && (d.guest - 1.8).abs() < 1e-9);
        assert_eq!(s["boot"].total, 0.1);
        assert!(stamps("STAMP 1 2 3 boot\nSTAMP 4 5 6 boot\n").is_err());
        assert!(stamps("STAMP 1 x 3 boot\n").is_err());
        assert!(stamps("STAMP 1 2 3\n").is_err());
    }

    #[test]
    fn threads_are_summed_by_kind_and_give_their_share_of_a_cpu() {
        assert_eq!(thread_kind("vcpu0"), "vcpu");
        assert_eq!(thread_kind("iou-wrk-186"), "iou-wrk");
        assert_eq!(thread_kind("_disk0_q0"), "disk_q");
        assert_eq!(thread_kind("iommu-poll-0"), "iommu-poll");
        assert_eq!(thread_kind("virtio-blk-12"), "virtio-blk");
        let text = "CLOCK begin job|100.00\n\
                    THREAD begin job|vcpu0|100 50\n\
                    THREAD begin job|iou-wrk-3|10 0\n\
                    STAMP 1 2 3 begin job\n\
                    CLOCK end job|104.00\n\
                    THREAD end job|vcpu0|450 100\n\
                    THREAD end job|virtio-blk-0|40 40\n\
                    THREAD end job|iou-wrk-3|5 0\n\
                    THREAD end job|iou-wrk-4|15 0\n";
        let t = threads(text).unwrap();
        let busy = t["end job"].busy_since(&t["begin job"]);
        assert_eq!(busy["vcpu"], 1.0);
        assert_eq!(busy["virtio-blk"], 0.2);
        assert_eq!(busy["iou-wrk"], 0.025);
        assert!(threads("THREAD a|vcpu0|1\n").is_err());
        assert!(threads("THREAD a||\n").unwrap().is_empty());
        assert!(threads("THREAD a|vcpu0|1 2 3\n").is_err());
        assert!(threads("CLOCK a|soon\n").is_err());
        assert!(t["end job"].busy_since(&t["end job"]).is_empty());
    }

    #[test]
    fn interrupts_are_summed_over_the_devices() {
        let text = "virtio0-config 1\nvirtio1-req.0 5120\nvirtio2-input.0 40\n\n";
        assert_eq!(interrupts(text), Ok(5161));
        assert_eq!(interrupts(""), Ok(0));
        assert!(interrupts("virtio1-req.0 many\n").is_err());
    }

    #[test]
    fn map_requests_are_read_from_the_counters_by_label() {
        let text = "STAMP 1 2 3 boot\n\
                    COUNTERS begin read-1m-qd4|200 {\"virtio-iommu\":{\"faults\":0,\"maps\":120},\"disk0\":{\"reads\":9}}\n\
                    COUNTERS end read-1m-qd4|200 {\"virtio-iommu\":{\"maps\":5120}}\n\
                    COUNTERS boot|200 {\"disk0\":{\"reads\":1}}\n";
        let m = map_requests(text).unwrap();
        assert_eq!(
            m["end read-1m-qd4"].unwrap() - m["begin read-1m-qd4"].unwrap(),
            5000
        );
        assert_eq!(m["boot"], None);
        assert!(map_requests("COUNTERS boot|500 {}\n")
            .unwrap_err()
            .contains("refused"));
        assert!(map_requests("COUNTERS boot 200 {}\n").is_err());
        assert!(map_requests("COUNTERS a|200 {}\nCOUNTERS a|200 {}\n").is_err());
    }
}
