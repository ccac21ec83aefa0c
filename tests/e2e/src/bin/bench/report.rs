//! The benchmark's markdown: one table of medians, ratios and CPU per GiB, the samples
//! behind it, the boots, and the targets met or missed.

use std::fmt::Write;

use e2e::Mode;

use crate::{jobs, Boot, BootOpts, Config, Device, Job, Unit, Vmm};

mod breakdown;

/// Every boot of one run of the benchmark.
pub struct Batch {
    pub mode: Mode,
    pub rounds: usize,
    /// The peer VMM's file name, if one ran.
    pub peer: Option<String>,
    pub opts: BootOpts,
    pub boots: Vec<Boot>,
    /// The configurations and rounds for which every attempt died.
    pub lost: Vec<Lost>,
}

/// A configuration's round that no attempt completed.
pub struct Lost {
    pub config: Config,
    pub round: usize,
    /// The last attempt's first line of error.
    pub why: String,
}

/// "warden on", "cloud-hypervisor off", ...
pub fn config_name(config: Config, peer: Option<&str>) -> String {
    let vmm = match config.vmm {
        Vmm::Warden => "warden",
        Vmm::Peer => peer.unwrap_or("peer"),
    };
    format!("{vmm} {}", if config.iommu { "on" } else { "off" })
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// About three significant digits.
fn num(x: f64) -> String {
    match x.abs() {
        a if a.is_nan() => "n/a".into(),
        a if a >= 100.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        _ => format!("{x:.2}"),
    }
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}", a / b)
}

/// One configuration's medians for one job: rate, CPU s/GiB, CPU s/GiB without guest time,
/// MAP requests per byte (NaN without warden's IOMMU) and bytes per I/O (NaN for TCP).
struct Medians {
    rate: f64,
    cpu: f64,
    vmm_cpu: f64,
    maps_per_byte: f64,
    io_bytes: f64,
}

impl Batch {
    /// The jobs every boot of the batch ran, in order.
    pub fn jobs(&self) -> Vec<Job> {
        jobs(&self.opts)
    }

    fn config(&self, vmm: Vmm, iommu: bool) -> Config {
        Config { vmm, iommu }
    }

    fn boots_of(&self, config: Config) -> impl Iterator<Item = &Boot> {
        self.boots.iter().filter(move |b| b.config == config)
    }

    fn medians(&self, config: Config, job: usize) -> Medians {
        let unit = self.jobs()[job].unit;
        let samples: Vec<_> = self.boots_of(config).map(|b| &b.samples[job]).collect();
        Medians {
            rate: median(samples.iter().map(|s| s.rate(unit)).collect()),
            cpu: median(samples.iter().map(|s| s.cpu_per_gib().0).collect()),
            vmm_cpu: median(samples.iter().map(|s| s.cpu_per_gib().1).collect()),
            maps_per_byte: median(
                samples
                    .iter()
                    .filter_map(|s| Some(s.maps? as f64 / s.measured.bytes as f64))
                    .collect(),
            ),
            io_bytes: median(
                samples
                    .iter()
                    .filter(|s| s.measured.iops > 0.0)
                    .map(|s| s.measured.bytes_per_second / s.measured.iops)
                    .collect(),
            ),
        }
    }

    fn vmms(&self) -> Vec<Vmm> {
        if self.peer.is_some() {
            vec![Vmm::Warden, Vmm::Peer]
        } else {
            vec![Vmm::Warden]
        }
    }

    fn name(&self, config: Config) -> String {
        config_name(config, self.peer.as_deref())
    }
}

fn unit_text(unit: Unit) -> &'static str {
    match unit {
        Unit::Iops => "IOPS",
        Unit::MibPerSecond => "MiB/s",
    }
}

pub fn table(batch: &Batch) -> String {
    let mut s = String::new();
    let peer = batch.peer.as_deref().unwrap_or("peer");
    let _ = writeln!(
        s,
        "# warden data-path benchmark ({:?} mode, {} round{}, Debian 12 image, 1 vCPU, 512 MiB{}{})\n",
        batch.mode,
        batch.rounds,
        if batch.rounds == 1 { "" } else { "s" },
        [
            ("disk", &batch.opts.disk),
            ("net", &batch.opts.net),
            ("warden's platform", &batch.opts.warden_platform)
        ]
        .iter()
        .filter(|(_, opts)| !opts.is_empty())
        .map(|(what, opts)| format!(", {what} `{opts}`"))
        .collect::<String>(),
        if batch.opts.one_l1_cpu {
            ", the VMM on one L1 CPU"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "Medians over the rounds; `on`: disk and tap `iommu=on`, `off`: both plain. CPU: the \
         VMM process's utime+stime on the KVM host over the job, per GiB moved (in brackets: \
         without the vCPU's time in the guest).\n"
    );
    let mut header = vec!["job".to_string()];
    for &vmm in &batch.vmms() {
        let on = batch.name(batch.config(vmm, true));
        let off = batch.name(batch.config(vmm, false));
        header.extend([on, off, format!("{} on/off", vmm_name(vmm, peer))]);
    }
    if batch.peer.is_some() {
        header.extend([format!("warden/{peer} on"), format!("warden/{peer} off")]);
    }
    for &vmm in &batch.vmms() {
        for iommu in [true, false] {
            header.push(format!(
                "CPU s/GiB {}",
                batch.name(batch.config(vmm, iommu))
            ));
        }
        header.push(format!("CPU {} on/off", vmm_name(vmm, peer)));
    }
    row(&mut s, &header);
    row(
        &mut s,
        &header
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---" } else { "---:" }.to_string())
            .collect::<Vec<_>>(),
    );
    for (j, job) in batch.jobs().iter().enumerate() {
        let m = |vmm, iommu| batch.medians(batch.config(vmm, iommu), j);
        let mut cells = vec![format!("{} ({})", job.title, unit_text(job.unit))];
        for &vmm in &batch.vmms() {
            let (on, off) = (m(vmm, true), m(vmm, false));
            cells.extend([num(on.rate), num(off.rate), ratio(on.rate, off.rate)]);
        }
        if batch.peer.is_some() {
            for iommu in [true, false] {
                cells.push(ratio(m(Vmm::Warden, iommu).rate, m(Vmm::Peer, iommu).rate));
            }
        }
        for &vmm in &batch.vmms() {
            let (on, off) = (m(vmm, true), m(vmm, false));
            for x in [&on, &off] {
                cells.push(format!("{} ({})", num(x.cpu), num(x.vmm_cpu)));
            }
            cells.push(ratio(on.cpu, off.cpu));
        }
        row(&mut s, &cells);
    }
    targets(&mut s, batch);
    costs(&mut s, batch);
    breakdown::threads(&mut s, batch);
    breakdown::interrupts(&mut s, batch);
    samples(&mut s, batch);
    s
}

/// What the IOMMU's requests cost warden's guest, from warden's own counters: MAP requests
/// per I/O, and the protected run's extra wall time and host CPU per byte (against plain)
/// spread over them. With the IOMMU, what a job loses is these requests times their cost.
fn costs(s: &mut String, batch: &Batch) {
    let on = batch.config(Vmm::Warden, true);
    let off = batch.config(Vmm::Warden, false);
    let jobs = batch.jobs();
    if (0..jobs.len()).all(|j| batch.medians(on, j).maps_per_byte.is_nan()) {
        return;
    }
    let _ = writeln!(
        s,
        "\nWhat the IOMMU costs, from warden's counters (medians; per MAP: warden on's extra time \
         and host CPU per byte against warden off, over the MAP requests per byte):\n"
    );
    let _ = writeln!(
        s,
        "| job | MAP requests per I/O | MAP requests per MiB | extra wall time per MAP (µs) | extra host CPU per MAP (µs) |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: |");
    // The share is never behind the IOMMU: the MAPs over its jobs are the disk's.
    for (j, job) in jobs.iter().enumerate() {
        if job.device == Device::Share {
            continue;
        }
        let (p, q) = (batch.medians(on, j), batch.medians(off, j));
        let bytes_per_map = 1.0 / p.maps_per_byte;
        let seconds_per_byte = |m: &Medians| match job.unit {
            Unit::Iops => 1.0 / (m.rate * m.io_bytes),
            Unit::MibPerSecond => 1.0 / (m.rate * f64::from(1 << 20)),
        };
        let cpu_per_byte = |m: &Medians| m.cpu / f64::from(1 << 30);
        let time = (seconds_per_byte(&p) - seconds_per_byte(&q)) * bytes_per_map * 1e6;
        let cpu = (cpu_per_byte(&p) - cpu_per_byte(&q)) * bytes_per_map * 1e6;
        row(
            s,
            &[
                job.name.to_string(),
                num(p.maps_per_byte * p.io_bytes),
                num(p.maps_per_byte * f64::from(1 << 20)),
                num(time),
                num(cpu),
            ],
        );
    }
}

fn vmm_name(vmm: Vmm, peer: &str) -> &str {
    match vmm {
        Vmm::Warden => "warden",
        Vmm::Peer => peer,
    }
}

fn row(s: &mut String, cells: &[String]) {
    let _ = writeln!(s, "| {} |", cells.join(" | "));
}

/// The targets of issues 13 and 23, each with the jobs that miss it.
fn targets(s: &mut String, batch: &Batch) {
    let _ = writeln!(s, "\nTargets (issues 13, 23), from the medians above:\n");
    let jobs = &batch.jobs();
    let mut check = |what: &str, ok: &dyn Fn(usize) -> Option<(bool, f64)>| {
        let results: Vec<_> = (0..jobs.len()).filter_map(|j| Some((j, ok(j)?))).collect();
        if results.is_empty() {
            return;
        }
        let missed: Vec<String> = results
            .iter()
            .filter(|(_, (met, _))| !met)
            .map(|(j, (_, v))| format!("{} {v:.2}", jobs[*j].name))
            .collect();
        let verdict = if missed.is_empty() {
            "met".to_string()
        } else {
            format!("missed: {}", missed.join(", "))
        };
        let _ = writeln!(s, "- {what}: {verdict}");
    };
    let rate = |vmm, iommu, j| batch.medians(batch.config(vmm, iommu), j).rate;
    if batch.peer.is_some() {
        check(
            "plain devices, warden ≥ the peer (warden off / peer off ≥ 1)",
            &|j| {
                let r = rate(Vmm::Warden, false, j) / rate(Vmm::Peer, false, j);
                Some((r >= 1.0, r))
            },
        );
    }
    let on_off = |j| rate(Vmm::Warden, true, j) / rate(Vmm::Warden, false, j);
    let protected = |device: Device, at_least: f64| {
        move |j: usize| (jobs[j].device == device).then(|| (on_off(j) >= at_least, on_off(j)))
    };
    check(
        "protected disk, ≥ 0.90 of warden's plain",
        &protected(Device::Disk, 0.90),
    );
    check(
        "protected net, ≥ 0.80 of warden's plain",
        &protected(Device::Net, 0.80),
    );
    check(
        "protected vsock, ≥ 0.80 of warden's plain",
        &protected(Device::Vsock, 0.80),
    );
    // The share is never behind the IOMMU: its on/off compares two plain shares.
    check("host CPU per GiB protected within 1.5x of plain", &|j| {
        let on = batch.medians(batch.config(Vmm::Warden, true), j).cpu;
        let off = batch.medians(batch.config(Vmm::Warden, false), j).cpu;
        (jobs[j].device != Device::Share && !on.is_nan()).then(|| (on <= 1.5 * off, on / off))
    });
}

/// Each round's rate, and the boots themselves, so the medians can be checked.
fn samples(s: &mut String, batch: &Batch) {
    let _ = writeln!(s, "\nEvery round, in order:\n");
    let mut configs: Vec<Config> = Vec::new();
    for b in &batch.boots {
        if !configs.contains(&b.config) {
            configs.push(b.config);
        }
    }
    let mut header = vec!["job".to_string()];
    header.extend(configs.iter().map(|&c| batch.name(c)));
    row(s, &header);
    row(s, &vec!["---".to_string(); header.len()]);
    for (j, job) in batch.jobs().iter().enumerate() {
        let mut cells = vec![job.name.to_string()];
        for &c in &configs {
            let rates: Vec<String> = batch
                .boots_of(c)
                .map(|b| num(b.samples[j].rate(job.unit)))
                .collect();
            cells.push(rates.join(", "));
        }
        row(s, &cells);
    }
    for lost in &batch.lost {
        let _ = writeln!(
            s,
            "\nLost: {} in round {}, every attempt ({}); its medians are over the other rounds.",
            batch.name(lost.config),
            lost.round,
            lost.why
        );
    }
    let _ = writeln!(s, "\n| boot | round | wall time | VMM CPU to the first stamp | load before → after | retried |");
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | --- | --- |");
    for b in &batch.boots {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} s | {:.1} s | {:.2} → {:.2} | {} |",
            batch.name(b.config),
            b.round,
            b.elapsed.as_secs_f64(),
            b.boot_cpu,
            b.load.0,
            b.load.1,
            if b.retried { "yes" } else { "no" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{CpuTime, Measured};
    use crate::Sample;
    use std::time::Duration;

    /// A boot whose every job ran at `iops` IOPS and `mib` MiB/s, moving 1 GiB with `cpu` s.
    fn boot(vmm: Vmm, iommu: bool, round: usize, iops: f64, mib: f64, cpu: f64) -> Boot {
        let sample = Sample {
            measured: Measured {
                iops,
                bytes_per_second: mib * f64::from(1 << 20),
                bytes: 1 << 30,
            },
            cpu: CpuTime {
                total: cpu,
                guest: cpu / 4.0,
            },
            // 1 GiB moved in 4 KiB I/Os or not, warden on makes 3 MAPs per 4 KiB.
            maps: (vmm == Vmm::Warden && iommu).then_some(3 << 18),
            // The vCPU at half a CPU a round (median 1.00 over rounds 1 to 3), warden's poller
            // where it polls, the peer's disk thread, and a kind too idle to be shown.
            threads: [
                ("vcpu", 0.5 * round as f64),
                ("iou-wrk", 0.01),
                (
                    match vmm {
                        Vmm::Warden if iommu => "iommu-poll",
                        Vmm::Warden => "virtio-blk",
                        Vmm::Peer => "disk_q",
                    },
                    0.3,
                ),
            ]
            .map(|(kind, share)| (kind.to_string(), share))
            .into(),
            // An interrupt per 4 KiB I/O, and half of that for the peer.
            interrupts: Some(match vmm {
                Vmm::Warden => 1 << 18,
                Vmm::Peer => 1 << 17,
            }),
        };
        Boot {
            config: Config { vmm, iommu },
            round,
            samples: vec![sample.clone(); crate::JOBS.len()],
            boot_cpu: 30.0,
            elapsed: Duration::from_secs(120),
            load: (1.0, 1.5),
            retried: false,
        }
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn the_table_has_medians_ratios_and_cpu_per_gib() {
        let mut boots = Vec::new();
        for (round, k) in [(1, 1.0), (2, 3.0), (3, 2.0)] {
            boots.push(boot(Vmm::Warden, true, round, 900.0 * k, 90.0 * k, 2.0 * k));
            boots.push(boot(
                Vmm::Warden,
                false,
                round,
                1000.0 * k,
                100.0 * k,
                1.0 * k,
            ));
            boots.push(boot(Vmm::Peer, true, round, 500.0 * k, 50.0 * k, 4.0 * k));
            boots.push(boot(Vmm::Peer, false, round, 800.0 * k, 200.0 * k, 1.0 * k));
        }
        let batch = Batch {
            mode: Mode::Nested,
            rounds: 3,
            peer: Some("cloud-hypervisor".into()),
            opts: BootOpts::default(),
            lost: Vec::new(),
            boots,
        };
        let t = table(&batch);
        // The IOPS row: medians 1800 / 2000 / 1000 / 1600; CPU medians 4 / 2 / 8 / 2 s per GiB,
        // 3 / 1.5 / 6 / 1.5 without the guest's quarter.
        assert!(
            t.contains(
                "| 4 KiB random read, depth 1 (IOPS) | 1800 | 2000 | 0.90 | 1000 | 1600 | 0.62 \
                 | 1.80 | 1.25 | 4.00 (3.00) | 2.00 (1.50) | 2.00 | 8.00 (6.00) | 2.00 (1.50) | 4.00 |"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "| TCP host → guest (MiB/s) | 180 | 200 | 0.90 | 100 | 400 | 0.25 | 1.80 | 0.50 |"
            ),
            "{t}"
        );
        assert!(
            t.contains("- protected disk, ≥ 0.90 of warden's plain: met"),
            "{t}"
        );
        assert!(t.contains("warden off / peer off ≥ 1): missed: read-1m-qd4 0.50, tcp-guest-to-host 0.50, tcp-host-to-guest 0.50"), "{t}");
        assert!(
            t.contains("within 1.5x of plain: missed: randread-4k-qd1 2.00"),
            "{t}"
        );
        // 3 MAPs per 4 KiB over I/Os of 100 KiB (90 MiB/s at 900 IOPS): 76.8 a request;
        // per byte on 1/(180 MiB/s) against off 1/(200 MiB/s), 1365 bytes a MAP: 0.72 µs;
        // CPU 4 against 2 s/GiB: 2.54 µs.
        assert!(
            t.contains("| randread-4k-qd1 | 76.8 | 768 | 0.72 | 2.54 |"),
            "{t}"
        );
        assert!(
            t.contains("| randread-4k-qd1 | 900, 2700, 1800 | 1000, 3000, 2000 |"),
            "{t}"
        );
        assert!(
            t.contains(
                "| tcp-host-to-guest | vcpu 1.00, iommu-poll 0.30 | vcpu 1.00, virtio-blk 0.30 \
                 | vcpu 1.00, disk_q 0.30 | vcpu 1.00, disk_q 0.30 |"
            ),
            "{t}"
        );
        assert!(!t.contains("iou-wrk"), "below the threshold: {t}");
        // 1 GiB at 90 MiB/s and 900 IOPS is 10,240 I/Os of 0.1 MiB (rounds scale both):
        // 2^18 interrupts are 25.6 an I/O; the peer's 2^17 over I/Os of 0.1 MiB (on) and
        // 0.25 MiB (off) are 12.8 and 32.
        assert!(
            t.contains("| randread-4k-qd1 | 25.6 | 25.6 | 12.8 | 32.0 |"),
            "{t}"
        );
        assert!(
            t.contains("| cloud-hypervisor off | 3 | 120 s | 30.0 s | 1.00 → 1.50 | no |"),
            "{t}"
        );
    }

    #[test]
    fn the_sandbox_adds_its_rows_and_the_protected_vsock_target() {
        let opts = BootOpts {
            sandbox: true,
            ..Default::default()
        };
        let count = jobs(&opts).len();
        let with_jobs = |mut boot: Boot| {
            boot.samples = vec![boot.samples[0].clone(); count];
            boot
        };
        let batch = Batch {
            mode: Mode::Nested,
            rounds: 1,
            peer: None,
            opts,
            lost: Vec::new(),
            boots: vec![
                with_jobs(boot(Vmm::Warden, true, 1, 700.0, 70.0, 2.0)),
                with_jobs(boot(Vmm::Warden, false, 1, 1000.0, 100.0, 1.0)),
            ],
        };
        let t = table(&batch);
        assert!(
            t.contains("| vsock host → guest, 4 connections (MiB/s) | 70.0 | 100 | 0.70 |"),
            "{t}"
        );
        assert!(
            t.contains(
                "| virtio-fs small files, create + stat + read (IOPS) | 700 | 1000 | 0.70 |"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "- protected vsock, ≥ 0.80 of warden's plain: missed: vsock-guest-to-host 0.70, \
                 vsock-host-to-guest 0.70, vsock-guest-to-host-x4 0.70, vsock-host-to-guest-x4 0.70"
            ),
            "{t}"
        );
        // The share's rows are not held to the protected targets, nor costed in MAPs.
        assert!(!t.contains("fs-read-1m 0.70"), "{t}");
        assert_eq!(
            t.matches("| fs-read-1m |").count(),
            3,
            "the threads, interrupts and samples, not the costs: {t}"
        );
    }

    #[test]
    fn without_a_peer_there_are_no_peer_columns() {
        let batch = Batch {
            mode: Mode::Direct,
            rounds: 1,
            peer: None,
            opts: BootOpts {
                disk: "direct=on".into(),
                net: "vhost=on".into(),
                one_l1_cpu: true,
                ..Default::default()
            },
            lost: vec![Lost {
                config: Config {
                    vmm: Vmm::Warden,
                    iommu: true,
                },
                round: 2,
                why: "triple fault".into(),
            }],
            boots: vec![
                boot(Vmm::Warden, true, 1, 900.0, 90.0, 2.0),
                boot(Vmm::Warden, false, 1, 1000.0, 100.0, 1.0),
            ],
        };
        let t = table(&batch);
        assert!(t.contains("| job | warden on | warden off | warden on/off | CPU s/GiB warden on | CPU s/GiB warden off | CPU warden on/off |"), "{t}");
        assert!(!t.contains("peer"), "{t}");
        assert!(
            t.contains("Lost: warden on in round 2, every attempt (triple fault)"),
            "{t}"
        );
        assert!(
            t.contains(
                "1 round, Debian 12 image, 1 vCPU, 512 MiB, disk `direct=on`, net `vhost=on`, the VMM on one L1 CPU"
            ),
            "{t}"
        );
    }
}
