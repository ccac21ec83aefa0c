//! `iommu-bench`: what the virtual IOMMU costs a virtio disk, measured in a real guest and
//! printed as markdown tables (method and results: `docs/iommu-performance.md`).
//!
//! `cargo run --release -p e2e --bin iommu-bench` (about 10 minutes in the nested KVM test host;
//! runs one guest at a time, so don't run other QEMU jobs next to it).
//!
//! Six boots of the test guest, each with a protected disk (`--disk path=a.img,iommu=on`) and
//! a plain one (`--disk path=b.img`), both 128 MiB; the guest tells them apart by the IOMMU
//! group of their PCI function, not by name:
//!
//! 1. `throughput`: O_DIRECT reads of 1 MiB (MiB/s) and of 4 KiB (IOPS), each measurement at
//!    least 3 s of guest time, three rounds interleaved protected, plain, protected, plain;
//!    medians and the protected/plain ratios, next to Cloud Hypervisor's. Also the boot time
//!    with the IOMMU.
//! 2. `no-poll`: the same with `--platform iommu_poll_us=0`, so that every synchronous MAP
//!    is a VM exit served on the vCPU's thread: what the request-queue poller gains.
//! 3. `no-iommu`: both disks plain: the boot time without the IOMMU, and one round on each
//!    disk (does the position of a disk matter?).
//! 4. `boot-only`, `4k` and `1m`: boot and nothing else; boot and 4096 reads of 4 KiB; boot
//!    and 64 reads of 1 MiB (timed, then the same on the plain disk). warden's exit totals of
//!    the last two minus those of `boot-only` give the MAP requests and removed mappings per
//!    I/O. These guests also record the kernel's `iommu:map` and `iommu:unmap` trace events
//!    from boot, one per MAP and per UNMAP request: they count UNMAP requests (warden counts
//!    removed mappings) and cross-check warden's MAP count run by run.
//!
//! Boot time is wall time from the KVM host starting warden (its `WARDEN-START` line) to the
//! guest's `/init` (`WARDEN-L2-INIT`), both seen live in the run's `console.log`.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use e2e::{Outcome, Scenario, DEFAULT_CMDLINE};

/// Size of each disk image (L1 keeps them in RAM).
const DISK_MIB: u64 = 128;
/// Each throughput measurement repeats its `dd` until this much guest time has passed.
const MIN_CENTISECONDS: u64 = 300;
/// Interleaved rounds of the throughput run.
const ROUNDS: usize = 3;
/// 4 KiB reads in the `4k` run.
const SMALL_IOS: u64 = 4096;
/// 1 MiB reads in the `1m` run.
const LARGE_IOS: u64 = 64;
const MIB: u64 = 1 << 20;
const SMALL: u64 = 4096;

/// Cloud Hypervisor in the same kind of nested host: 1 MiB reads in MiB/s and 4 KiB reads in
/// IOPS, protected and plain.
const CH_1M: (f64, f64) = (40.0, 716.0);
const CH_4K: (f64, f64) = (1763.0, 3346.0);
/// warden's targets for the protected/plain ratios: twice CH's at 1 MiB, 0.80 at 4 KiB.
const TARGET_1M: f64 = 0.112;
const TARGET_4K: f64 = 0.80;

/// Shell helpers every guest script starts with.
const GUEST_PRELUDE: &str = r#"
wait_for /dev/vda
wait_for /dev/vdb
# now: centiseconds since the guest booted; reads DISK: read requests DISK has completed
now() { read -r up _ </proc/uptime; echo "${up%.*}${up#*.}"; }
reads() { read -r n _ <"/sys/block/$1/stat"; echo "$n"; }
# P: the disk whose PCI function has an IOMMU group (protected); U: the other one
P=none U=none
for d in vda vdb; do
    if [ -e "/sys/block/$d/device/../iommu_group" ]; then P=$d; else U=$d; fi
done
echo "DISKS=$P $U"
echo "KERNEL-RUN-INIT=$(dmesg | sed -n 's/^\[ *\([0-9.]*\)\] Run \/init .*/\1/p')"
# measure LABEL DISK BS BLOCKS: repeats a dd of BLOCKS direct reads of BS bytes from DISK until
# MIN centiseconds have passed; prints the blocks read, the time and the device's read requests
measure() {
    r0=$(reads "$2"); t0=$(now); n=0
    while :; do
        dd if="/dev/$2" of=/dev/null bs="$3" count="$4" iflag=direct 2>/dev/null
        n=$((n + $4)); t=$(($(now) - t0))
        [ "$t" -lt MIN ] || break
    done
    echo "BENCH $1 $3 $n $t $(($(reads "$2") - r0))"
}
# dd64 LABEL DISK: one dd of 64 MiB in direct 1 MiB reads, timed
dd64() {
    t0=$(now)
    dd if="/dev/$2" of=/dev/null bs=1048576 count=64 iflag=direct 2>/dev/null
    echo "DD64 $1 $(($(now) - t0))"
}
"#;

/// For the counting runs: the kernel traces iommu:map and iommu:unmap from boot (see
/// [`TRACED_CMDLINE`]); `count` prints how many the buffer holds, the protected disk's read
/// requests, and how many events the buffer lost (must be 0).
const GUEST_TRACE: &str = r#"
T=/sys/kernel/tracing
mount -t tracefs tracefs "$T"
events() { grep -c " $1: " "$T/trace" || true; }
count() {
    echo "COUNT $1 $(events map) $(events unmap) $(reads "$P") $(sed -n 's/^overrun: //p' "$T/per_cpu/cpu0/stats")"
}
"#;

/// Kernel options of the counting runs: trace every MAP and UNMAP from boot, in a buffer
/// large enough for the 1 MiB run.
const TRACED_CMDLINE: &str = "trace_event=iommu:map,iommu:unmap trace_buf_size=16M";

fn main() -> ExitCode {
    match bench() {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("iommu-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the six boots and returns the report.
fn bench() -> Result<String, String> {
    let interleaved = measure_rounds(
        ROUNDS,
        &[("on", "$P"), ("off", "$U")],
        &[(MIB, DISK_MIB), (SMALL, 4096)],
    );
    let throughput = boot("throughput", true, false, &[], &interleaved)?;
    let no_poll = boot(
        "no-poll",
        true,
        false,
        &["--platform", "iommu_poll_us=0"],
        &interleaved,
    )?;
    let no_iommu = boot(
        "no-iommu",
        false,
        false,
        &[],
        &format!(
            "dd64 vda vda\ndd64 vdb vdb\n{}",
            measure_rounds(
                1,
                &[("vda", "vda"), ("vdb", "vdb")],
                &[(MIB, DISK_MIB), (SMALL, 4096)]
            )
        ),
    )?;
    for (run, labels, rounds) in [
        (&throughput, ["on", "off"], ROUNDS),
        (&no_poll, ["on", "off"], ROUNDS),
        (&no_iommu, ["vda", "vdb"], 1),
    ] {
        for label in labels {
            for bs in [MIB, SMALL] {
                if run.samples(label, bs).len() != rounds {
                    return Err(format!("{}: missing BENCH {label} {bs} lines", run.name));
                }
            }
        }
    }
    let boot_only = boot("boot-only", true, true, &[], "count boot\nsleep 1")?;
    let small = boot(
        "4k",
        true,
        true,
        &[],
        &format!(
            "count boot
dd if=/dev/$P of=/dev/null bs={SMALL} count={SMALL_IOS} iflag=direct 2>/dev/null
count after
sleep 1"
        ),
    )?;
    let large = boot(
        "1m",
        true,
        true,
        &[],
        "count boot\ndd64 on $P\ncount after\ndd64 off $U\nsleep 1",
    )?;
    for (run, ios) in [(&small, SMALL_IOS), (&large, LARGE_IOS)] {
        if run.counts("after")?.reads < run.counts("boot")?.reads + ios {
            return Err(format!(
                "{}: the protected disk saw fewer reads than {ios}",
                run.name
            ));
        }
    }
    report(&Runs {
        throughput,
        no_poll,
        no_iommu,
        boot_only,
        small,
        large,
    })
}

/// Guest script for interleaved measurements: `rounds` times, for each (block size, blocks per
/// dd), each (label, disk) in turn.
fn measure_rounds(rounds: usize, disks: &[(&str, &str)], sizes: &[(u64, u64)]) -> String {
    let mut script = String::new();
    for _ in 0..rounds {
        for (bs, blocks) in sizes {
            for (label, disk) in disks {
                script.push_str(&format!("measure {label} {disk} {bs} {blocks}\n"));
            }
        }
    }
    script
}

/// One finished boot: what it printed and when it reached the guest's /init.
struct Run {
    name: &'static str,
    out: Outcome,
    /// Wall time from warden's start to the guest's /init, if the console was seen live.
    to_init: Option<Duration>,
    /// Whether the first attempt died with the KVM host's kernel.
    retried: bool,
    /// This machine's 1-minute load average before and after the run.
    load: (f64, f64),
}

/// This machine's 1-minute load average (the runs share its cores with anything else).
fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Boots the guest with the two disks (`iommu` protects the first one; `traced` adds
/// [`TRACED_CMDLINE`]), runs `workload` after [`GUEST_PRELUDE`], and checks that everything
/// exited cleanly.
fn boot(
    name: &'static str,
    iommu: bool,
    traced: bool,
    extra_args: &[&str],
    workload: &str,
) -> Result<Run, String> {
    let scenario_name = format!("iommu-bench-{name}");
    let mut args = vec![
        "--cpus".to_string(),
        "1".into(),
        "--memory".into(),
        "size=512M".into(),
        "--disk".into(),
        if iommu {
            "path=a.img,iommu=on"
        } else {
            "path=a.img"
        }
        .into(),
        "--disk".into(),
        "path=b.img".into(),
    ];
    args.extend(extra_args.iter().map(|arg| arg.to_string()));
    if traced {
        args.extend([
            "--cmdline".into(),
            format!("{DEFAULT_CMDLINE} {TRACED_CMDLINE}"),
        ]);
    }
    let script = format!(
        "{}{}{workload}",
        GUEST_PRELUDE.replace("MIN", &MIN_CENTISECONDS.to_string()),
        if traced { GUEST_TRACE } else { "" }
    );
    let scenario = Scenario::new(&scenario_name)
        .host_setup(&format!(
            "dd if=/dev/zero of=a.img bs=1M count={DISK_MIB} 2>/dev/null\ncp a.img b.img"
        ))
        .warden_args(args)
        .guest_script(&script)
        .timeout(Duration::from_secs(900));

    let dir = harness_run_dir(&scenario_name);
    eprintln!("iommu-bench: booting '{name}'");
    // The harness recreates the directory; removing it first keeps the watcher from
    // reading the previous run's console.
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("cannot remove {}: {e}", dir.display()))?;
    }
    let load_before = load_average();
    let stop = AtomicBool::new(false);
    let (out, seen) = thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            watch(
                &dir.join("console.log"),
                &["WARDEN-START", "WARDEN-L2-INIT"],
                &stop,
            )
        });
        let out = scenario.run();
        stop.store(true, Ordering::Relaxed);
        (out, watcher.join().expect("console watcher panicked"))
    });
    let out = out.ok_or("no KVM and no QEMU here: nothing can run the guest")?;
    let load = (load_before, load_average());
    let retried = out.retried;
    let to_init = match (out.run_dir == dir, seen[0], seen[1]) {
        (true, Some(start), Some(init)) => Some(init.duration_since(start)),
        _ => None,
    };
    let ok = out.warden_exit == Some(0)
        && out.guest_script_exit() == Some(0)
        && iommu_totals(&out).is_none_or(|t| t.faults == 0);
    let expected_disks = if iommu { "vd" } else { "none vdb" };
    if !ok
        || !out
            .marker("DISKS")
            .unwrap_or("")
            .starts_with(expected_disks)
    {
        return Err(format!("run '{name}' failed:\n{out}"));
    }
    Ok(Run {
        name,
        out,
        to_init,
        retried,
        load,
    })
}

/// The scratch directory the harness gives scenario `name`: `<target dir>/e2e-runs/<name>`
/// (tests/e2e/README.md); checked against [`Outcome::run_dir`] after the run.
fn harness_run_dir(name: &str) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("e2e-runs")
        .join(name)
}

/// Follows `path` as it grows (it may not exist yet) and returns when each of `markers` first
/// appeared in it, polling every 10 ms until all have or `stop` is set.
fn watch(path: &Path, markers: &[&str], stop: &AtomicBool) -> Vec<Option<Instant>> {
    let mut seen = vec![None; markers.len()];
    let mut text = Vec::new();
    let mut file = None;
    while !stop.load(Ordering::Relaxed) && seen.iter().any(Option::is_none) {
        // The harness recreates console.log when it runs a scenario again (after the KVM
        // host's kernel crashed): start over with the new file.
        if fs::metadata(path).is_ok_and(|m| m.len() < text.len() as u64) {
            seen.fill(None);
            text.clear();
            file = None;
        }
        if file.is_none() {
            file = File::open(path).ok();
        }
        if let Some(f) = &mut file {
            if f.read_to_end(&mut text).is_ok() {
                let now = Instant::now();
                for (marker, when) in markers.iter().zip(&mut seen) {
                    if when.is_none() && text.windows(marker.len()).any(|w| w == marker.as_bytes())
                    {
                        *when = Some(now);
                    }
                }
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    seen
}

/// warden's `virtio-iommu total:` line.
#[derive(Clone, Copy)]
struct Totals {
    maps: u64,
    /// Mappings removed (an UNMAP request can remove several).
    removed: u64,
    faults: u64,
}

fn iommu_totals(out: &Outcome) -> Option<Totals> {
    let line = out
        .guest_output()
        .lines()
        .find_map(|l| l.split_once("warden: virtio-iommu total: ").map(|(_, t)| t))?;
    let n: Vec<u64> = line
        .split(", ")
        .filter_map(|field| field.split(' ').next()?.parse().ok())
        .collect();
    Some(Totals {
        maps: *n.first()?,
        removed: *n.get(1)?,
        faults: *n.get(3)?,
    })
}

/// A `COUNT` line: trace events and the protected disk's read requests at one point of a run.
#[derive(Clone, Copy)]
struct Counts {
    maps: u64,
    unmaps: u64,
    reads: u64,
}

/// One `BENCH` line: `blocks` reads in `centiseconds`, `requests` at the device.
struct Sample {
    blocks: u64,
    centiseconds: u64,
    requests: u64,
}

impl Sample {
    /// Reads per second: MiB/s for 1 MiB reads, IOPS for 4 KiB reads.
    fn rate(&self) -> f64 {
        self.blocks as f64 * 100.0 / self.centiseconds as f64
    }
}

impl Run {
    /// The fields after each `tag ` in the guest's output.
    fn records(&self, tag: &str) -> Vec<Vec<&str>> {
        let needle = format!("{tag} ");
        self.out
            .guest_output()
            .lines()
            .filter_map(|l| l.find(&needle).map(|i| &l[i + needle.len()..]))
            .map(|rest| rest.split_whitespace().collect())
            .collect()
    }

    fn samples(&self, label: &str, bs: u64) -> Vec<Sample> {
        self.records("BENCH")
            .into_iter()
            .filter(|f| f.len() == 5 && f[0] == label && f[1] == bs.to_string())
            .map(|f| Sample {
                blocks: f[2].parse().unwrap_or(0),
                centiseconds: f[3].parse().unwrap_or(1).max(1),
                requests: f[4].parse().unwrap_or(0),
            })
            .collect()
    }

    /// The `COUNT` line `label`; an error if it is missing or the trace buffer lost events.
    fn counts(&self, label: &str) -> Result<Counts, String> {
        let fields = self
            .records("COUNT")
            .into_iter()
            .find(|f| f.len() == 5 && f[0] == label)
            .ok_or_else(|| format!("{}: no COUNT {label} line", self.name))?;
        let n: Vec<u64> = fields[1..].iter().filter_map(|v| v.parse().ok()).collect();
        match n[..] {
            [maps, unmaps, reads, 0] => Ok(Counts {
                maps,
                unmaps,
                reads,
            }),
            _ => Err(format!("{}: bad or lossy COUNT line {fields:?}", self.name)),
        }
    }

    /// Seconds of a `DD64` line.
    fn dd64(&self, label: &str) -> Option<f64> {
        self.records("DD64")
            .into_iter()
            .find(|f| f.len() == 2 && f[0] == label)
            .and_then(|f| f[1].parse::<f64>().ok())
            .map(|cs| cs / 100.0)
    }

    fn totals(&self) -> Result<Totals, String> {
        iommu_totals(&self.out)
            .ok_or_else(|| format!("{}: warden printed no IOMMU totals", self.name))
    }

    fn boot_text(&self) -> String {
        let wall = self
            .to_init
            .map_or("n/a".into(), |d| format!("{:.2} s", d.as_secs_f64()));
        let kernel = self.out.marker("KERNEL-RUN-INIT").unwrap_or("n/a");
        format!("{wall} ({kernel} s)")
    }
}

struct Runs {
    throughput: Run,
    no_poll: Run,
    no_iommu: Run,
    boot_only: Run,
    small: Run,
    large: Run,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median rate, and "median (each sample)".
fn summary(samples: &[Sample]) -> (f64, String) {
    let rates: Vec<f64> = samples.iter().map(Sample::rate).collect();
    let all: Vec<String> = rates.iter().map(|&r| rate_text(r)).collect();
    let m = median(rates);
    (m, format!("{} ({})", rate_text(m), all.join(", ")))
}

/// Three significant digits or so.
fn rate_text(r: f64) -> String {
    if r < 100.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.0}")
    }
}

/// Device read requests per dd block, over all samples.
fn requests_per_block(samples: &[Sample]) -> f64 {
    let requests: u64 = samples.iter().map(|s| s.requests).sum();
    let blocks: u64 = samples.iter().map(|s| s.blocks).sum();
    requests as f64 / blocks as f64
}

fn verdict(ratio: f64, target: f64) -> &'static str {
    if ratio >= target {
        "met"
    } else {
        "missed"
    }
}

fn report(r: &Runs) -> Result<String, String> {
    let all = [
        &r.throughput,
        &r.no_poll,
        &r.no_iommu,
        &r.boot_only,
        &r.small,
        &r.large,
    ];
    let mut s = String::new();
    let mut line = |text: String| {
        s.push_str(&text);
        s.push('\n');
    };
    line(format!(
        "# warden virtio-iommu benchmark ({:?} mode; disks {DISK_MIB} MiB, 1 vCPU, 512 MiB)\n",
        r.throughput.out.mode
    ));

    line("## Read throughput: protected (iommu=on) vs plain disk, same guest".into());
    line(format!(
        "O_DIRECT `dd` reads, each sample >= {} s; median (samples), {ROUNDS} rounds interleaved.\n",
        MIN_CENTISECONDS / 100
    ));
    line("| reads | protected | plain | ratio | Cloud Hypervisor | target | device requests per read (on/off) |".into());
    line("| --- | --- | --- | --- | --- | --- | --- |".into());
    let mut ratios = Vec::new();
    for (bs, unit, ch, target) in [
        (MIB, "1 MiB, MiB/s", CH_1M, TARGET_1M),
        (SMALL, "4 KiB, IOPS", CH_4K, TARGET_4K),
    ] {
        let on = r.throughput.samples("on", bs);
        let off = r.throughput.samples("off", bs);
        let (m_on, t_on) = summary(&on);
        let (m_off, t_off) = summary(&off);
        let ratio = m_on / m_off;
        ratios.push((bs, m_on, m_off));
        line(format!(
            "| {unit} | {t_on} | {t_off} | **{ratio:.3}** | {:.3} ({:.0} → {:.0}) | ≥ {target:.3}: {} | {:.2} / {:.2} |",
            ch.0 / ch.1,
            ch.1,
            ch.0,
            verdict(ratio, target),
            requests_per_block(&on),
            requests_per_block(&off),
        ));
    }

    line("\n## Serving the request queue: polled after a notification (default) or only on notifications".into());
    line(
        "Protected/plain ratio of the `throughput` run (default, `iommu_poll_us=2000`) and of \
         the `no-poll` run (`--platform iommu_poll_us=0`: every MAP is a VM exit served on the \
         vCPU's thread); same method.\n"
            .into(),
    );
    line(
        "| reads | polled: protected / plain | ratio | not polled: protected / plain | ratio |"
            .into(),
    );
    line("| --- | --- | --- | --- | --- |".into());
    for (bs, unit) in [(MIB, "1 MiB, MiB/s"), (SMALL, "4 KiB, IOPS")] {
        let cells = |run: &Run| {
            let (on, _) = summary(&run.samples("on", bs));
            let (off, _) = summary(&run.samples("off", bs));
            format!("{} / {} | {:.3}", rate_text(on), rate_text(off), on / off)
        };
        line(format!(
            "| {unit} | {} | {} |",
            cells(&r.throughput),
            cells(&r.no_poll)
        ));
    }

    line("\n## MAP/UNMAP requests per I/O (protected disk)".into());
    line(
        "warden: exit totals (MAP requests, mappings removed). Trace: the guest kernel's \
         iommu:map/unmap events, one per MAP/UNMAP request, recorded from boot.\n"
            .into(),
    );
    line("| run | MAP (warden) | MAP (trace) | UNMAP (trace) | mappings removed (warden) | device reads |".into());
    line("| --- | --- | --- | --- | --- | --- |".into());
    for (label, run) in [
        ("boot only", &r.boot_only),
        ("boot + 4096 × 4 KiB", &r.small),
        ("boot + 64 × 1 MiB", &r.large),
    ] {
        let t = run.totals()?;
        let boot = run.counts("boot")?;
        let last = if run.name == "boot-only" {
            boot
        } else {
            run.counts("after")?
        };
        line(format!(
            "| {label} | {} | {} | {} | {} | {} |",
            t.maps,
            last.maps,
            last.unmaps,
            t.removed,
            last.reads - boot.reads
        ));
    }
    line("".into());
    line("| workload | I/Os (device reads) | MAP/I/O (warden − boot-only) | MAP/I/O (trace) | UNMAP/I/O (trace) | removed/I/O (warden − boot-only) | extra time per I/O (on − off) | cost per request |".into());
    line("| --- | --- | --- | --- | --- | --- | --- | --- |".into());
    let base = r.boot_only.totals()?;
    for (label, run, ios, bs) in [
        ("4 KiB", &r.small, SMALL_IOS, SMALL),
        ("1 MiB", &r.large, LARGE_IOS, MIB),
    ] {
        let t = run.totals()?;
        let (boot, after) = (run.counts("boot")?, run.counts("after")?);
        let per = |n: u64| n as f64 / ios as f64;
        let maps_warden = t.maps as f64 - base.maps as f64;
        let unmaps_trace = per(after.unmaps - boot.unmaps);
        let (_, m_on, m_off) = ratios
            .iter()
            .copied()
            .find(|(b, ..)| *b == bs)
            .expect("both sizes measured");
        // rates are reads per second for both sizes (MiB/s of 1 MiB reads = reads/s)
        let extra_us = (1.0 / m_on - 1.0 / m_off) * 1e6;
        let requests = maps_warden / ios as f64 + unmaps_trace;
        line(format!(
            "| {ios} × {label} | {ios} ({}) | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} µs | {:.1} µs |",
            after.reads - boot.reads,
            maps_warden / ios as f64,
            per(after.maps - boot.maps),
            unmaps_trace,
            (t.removed as f64 - base.removed as f64) / ios as f64,
            extra_us,
            extra_us / requests,
        ));
    }
    line(
        "\ncost per request = extra time per I/O (throughput medians) / (MAP (warden) + UNMAP \
         (trace)) per I/O."
            .into(),
    );

    line("\n## Boot, and 64 MiB through each disk".into());
    line(
        "Boot: wall time from warden's start to the guest's /init (the guest kernel's own \
         clock at /init in parentheses).\n"
            .into(),
    );
    line("| | with the IOMMU (`throughput` run) | without (`no-iommu` run) |".into());
    line("| --- | --- | --- |".into());
    line(format!(
        "| boot to /init | {} | {} |",
        r.throughput.boot_text(),
        r.no_iommu.boot_text()
    ));
    let secs = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2} s"));
    line(format!(
        "| 64 MiB dd, 1 MiB direct reads | protected {}, plain {} (`1m` run) | vda {}, vdb {} |",
        secs(r.large.dd64("on")),
        secs(r.large.dd64("off")),
        secs(r.no_iommu.dd64("vda")),
        secs(r.no_iommu.dd64("vdb")),
    ));
    let t = r.large.totals()?;
    let after = r.large.counts("after")?;
    line(format!(
        "\nBoot + 64 MiB dd through the protected disk (`1m` run): {} MAP requests (trace: {}), \
         {} UNMAP requests (trace), {} mappings removed, {} faults.",
        t.maps, after.maps, after.unmaps, t.removed, t.faults
    ));
    line(format!(
        "Boot times of every run (traced runs boot with a 16 MiB trace buffer): {}.",
        all.iter()
            .map(|run| format!("{} {}", run.name, run.boot_text()))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    line("\n## Same guest, no IOMMU: does the disk's position matter?".into());
    line("| reads | vda | vdb | vda/vdb |".into());
    line("| --- | --- | --- | --- |".into());
    for (bs, unit) in [(MIB, "1 MiB, MiB/s"), (SMALL, "4 KiB, IOPS")] {
        let (a, ta) = summary(&r.no_iommu.samples("vda", bs));
        let (b, tb) = summary(&r.no_iommu.samples("vdb", bs));
        line(format!("| {unit} | {ta} | {tb} | {:.3} |", a / b));
    }
    line(format!(
        "\nProtected and plain disk in the throughput run (`DISKS=`): {}.",
        r.throughput.out.marker("DISKS").unwrap_or("?")
    ));
    line("\n| run | load average before → after | retried after a host kernel panic |".into());
    line("| --- | --- | --- |".into());
    for run in all {
        line(format!(
            "| {} | {:.2} → {:.2} | {} |",
            run.name,
            run.load.0,
            run.load.1,
            if run.retried { "yes" } else { "no" }
        ));
    }
    Ok(s)
}
