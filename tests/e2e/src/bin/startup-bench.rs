//! `startup-bench`: how long a container waits for its VM when Kata Containers starts it, for
//! warden and Cloud Hypervisor in one batch: `kata-replay --boot-only` (Kata's command line,
//! calls, bodies and checks; see `src/bin/kata-replay.rs`) starts each VMM, and reports the
//! time from the VMM's start to `vmm.ping`'s first answer and, from that answer, to
//! `vm.create` answered, `vm.boot` answered and the guest's `/init` (its first line on the
//! serial console), with the VMM's peak RSS. Both with Kata's IOMMU-mode body and without the
//! IOMMU, rounds interleaved (the order of the VMMs alternating), medians printed as a
//! markdown table. In the IOMMU mode the rootfs's own flag is true for both VMMs: Cloud
//! Hypervisor refuses Kata's body as Kata writes it (`kata-replay --rootfs-iommu`).
//!
//! `cargo run --release -p e2e --bin startup-bench [-- --rounds N] [--peer PATH] [--logs]`:
//! one boot
//! of the nested KVM test host (about 5 minutes with 5 rounds); the peer is
//! `../shared/peers/cloud-hypervisor` unless given (`WARDEN_CH` also names it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use e2e::{peer_binary, Scenario};

const STEPS: [&str; 4] = ["ping", "create", "boot", "init"];
const MODES: [&str; 2] = ["iommu", "plain"];

fn main() -> ExitCode {
    match bench() {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("startup-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<String, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    // Every run's whole output (the guest's console, its decompressor's messages too, each
    // line stamped with the milliseconds since the VMM started; the VMM's log) in the run's
    // console.log, to see where a difference comes from. Its times are not the benchmark's.
    let logs = if args.iter().any(|a| a == "--logs") {
        "--diagnose"
    } else {
        ""
    };
    let rounds: usize = value("--rounds")
        .map_or(Ok(5), |r| r.parse())
        .map_err(|_| "--rounds takes a number")?;
    let peer = match value("--peer") {
        Some(path) => PathBuf::from(path),
        None => peer_binary("cloud-hypervisor", "WARDEN_CH", "startup-bench")
            .ok_or("no Cloud Hypervisor to compare with")?,
    };
    let peer_name = peer
        .file_name()
        .ok_or("--peer names no file")?
        .to_string_lossy()
        .into_owned();
    let mut samples: Samples = BTreeMap::new();
    let mut failures = Vec::new();
    let mut raw = String::new();
    let mut done = 0;
    while done < rounds {
        let batch = (rounds - done).min(ROUNDS_PER_BOOT);
        let console = run_batch(&peer, &peer_name, done, batch, logs)?;
        for line in console
            .lines()
            .filter_map(|l| l.trim().strip_prefix("BENCH-ROUND "))
        {
            record(line, &mut samples, &mut failures);
            raw += &format!("BENCH-ROUND {line}\n");
        }
        done += batch;
    }
    if samples.is_empty() {
        return Err("no round ran; see target/e2e-runs/startup_bench".into());
    }
    // Every run's numbers after the table, for a second look.
    Ok(format!(
        "{}\n{raw}",
        report(&samples, &peer_name, rounds, &failures)
    ))
}

/// (VMM, mode) → step → (round, value) of each run.
type Samples = BTreeMap<(String, String), BTreeMap<String, Vec<(usize, f64)>>>;

/// Rounds per boot of the nested test host: its emulated kernel dies now and then under
/// long runs (the harness retries a boot once), so a batch loses little.
const ROUNDS_PER_BOOT: usize = 5;

/// Rounds `first + 1 ..= first + count` in one boot of the nested test host; its console.
fn run_batch(
    peer: &Path,
    peer_name: &str,
    first: usize,
    count: usize,
    logs: &str,
) -> Result<String, String> {
    let script = format!(
        r#"dd if=/dev/urandom of=rootfs.img bs=1M count=16 2>/dev/null
for r in $(seq {from} {to}); do
  if [ $((r % 2)) = 1 ]; then order="warden {peer_name}"; else order="{peer_name} warden"; fi
  for vmm in $order; do
    binary=$(command -v $vmm || true)
    [ $vmm = warden ] && binary=$WARDEN
    for mode in iommu plain; do
      flag=--rootfs-iommu; [ $mode = plain ] && flag=--plain
      rm -f clh-api.sock
      timeout 120 kata-replay "$binary" --boot-only $flag {logs} >run.log 2>&1 || true
      echo "BENCH-ROUND $r $vmm $mode $(grep -E '^(KATA-TIME|KATA-PEAK|KATA-FAIL|KATA-VMM-EXIT)' run.log | tr ' \n' '= ')"
      if [ -n "{logs}" ]; then sed "s/^/BENCH-LOG $r $vmm $mode /" run.log; fi
    done
  done
done"#,
        from = first + 1,
        to = first + count,
    );
    let out = Scenario::new("startup_bench")
        .host_binary(peer)
        .host_setup(&script)
        .without_default_args()
        .warden_args(["--version"])
        .timeout(Duration::from_secs(60 + 60 * count as u64))
        .run()
        .ok_or("this machine cannot run the nested KVM test host")?;
    Ok(out.console)
}

/// One `BENCH-ROUND` line's samples and failure, if any.
fn record(line: &str, samples: &mut Samples, failures: &mut Vec<String>) {
    let mut words = line.split_whitespace();
    let (round, vmm, mode) = (words.next(), words.next(), words.next());
    let (Some(Ok(round)), Some(vmm), Some(mode)) = (round.map(str::parse), vmm, mode) else {
        return;
    };
    let entry = samples
        .entry((vmm.to_string(), mode.to_string()))
        .or_default();
    for word in words {
        if let Some(fail) = word.strip_prefix("KATA-FAIL=") {
            failures.push(format!("{vmm} {mode}: {}", fail.replace('=', " ")));
        } else if let Some(kib) = word.strip_prefix("KATA-PEAK-RSS-KIB=") {
            if let Ok(kib) = kib.parse::<f64>() {
                entry
                    .entry("rss".into())
                    .or_default()
                    .push((round, kib / 1024.0));
            }
        } else if let Some((step, ms)) = word
            .strip_prefix("KATA-TIME=")
            .and_then(|time| time.split_once('='))
        {
            if let Ok(ms) = ms.parse::<f64>() {
                entry.entry(step.to_string()).or_default().push((round, ms));
            }
        }
    }
}

fn median(values: &[(usize, f64)]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().map(|&(_, v)| v).collect();
    sorted.sort_by(f64::total_cmp);
    (!sorted.is_empty()).then(|| sorted[sorted.len() / 2])
}

/// Round by round, warden's run against the peer's: in how many warden's was the smaller,
/// of how many pairs, and the median of warden's minus the peer's.
fn paired(ours: &[(usize, f64)], theirs: &[(usize, f64)]) -> (usize, usize, Option<f64>) {
    let differences: Vec<(usize, f64)> = ours
        .iter()
        .filter_map(|&(round, a)| {
            theirs
                .iter()
                .find(|&&(r, _)| r == round)
                .map(|&(_, b)| (round, a - b))
        })
        .collect();
    let smaller = differences.iter().filter(|&&(_, d)| d < 0.0).count();
    (smaller, differences.len(), median(&differences))
}

fn report(samples: &Samples, peer: &str, rounds: usize, failures: &[String]) -> String {
    let values = |vmm: &str, mode: &str, step: &str| {
        samples
            .get(&(vmm.to_string(), mode.to_string()))
            .and_then(|steps| steps.get(step))
            .cloned()
            .unwrap_or_default()
    };
    let mut text = format!(
        "Start-up as Kata Containers drives it, medians of {rounds} interleaved rounds (ms; \
         `ping` from the VMM's start, the rest from vmm.ping's first answer; n = samples; \
         paired: round by round, how often warden's run was the smaller, and the median of \
         warden's minus {peer}'s)\n\n\
         | mode | step | warden | {peer} | warden/{peer} | warden smaller | median difference |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for mode in MODES {
        for step in STEPS.iter().chain(&["rss"]) {
            let (ours, theirs) = (values("warden", mode, step), values(peer, mode, step));
            let show = |v: &[(usize, f64)]| {
                median(v).map_or("refused".into(), |m| format!("{m:.1} (n={})", v.len()))
            };
            let ratio = match (median(&ours), median(&theirs)) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "-".into(),
            };
            let (won, of, difference) = paired(&ours, &theirs);
            let difference = difference.map_or("-".into(), |d| format!("{d:+.1}"));
            let step = if *step == "rss" {
                "peak RSS (MiB)"
            } else {
                step
            };
            text += &format!(
                "| {mode} | {step} | {} | {} | {ratio} | {won}/{of} | {difference} |\n",
                show(&ours),
                show(&theirs)
            );
        }
    }
    if !failures.is_empty() {
        text += "\nRefusals and failures:\n";
        let mut seen = Vec::new();
        for failure in failures {
            if !seen.contains(failure) {
                text += &format!("- {failure}\n");
                seen.push(failure.clone());
            }
        }
    }
    text
}
