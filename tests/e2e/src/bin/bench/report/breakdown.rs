//! Where each job's time went, per configuration: the VMM's threads, and the guest's
//! interrupts from its virtio devices.

use std::fmt::Write;

use super::{median, num, row, Batch};
use crate::{Config, Sample};

/// A thread kind below this share of a CPU is left out of [`threads`]'s cells.
const THREAD_SHOWN: f64 = 0.02;

/// Where each VMM's host CPU went over each job: every kind of its threads (vCPU, device
/// workers, the IOMMU's poller, io_uring's workers) with its median share of one host CPU,
/// so a job bound by one thread, or by two sharing a CPU, shows as such.
pub(super) fn threads(s: &mut String, batch: &Batch) {
    let heading = format!(
        "The VMM's threads over each job (medians; share of one host CPU, 1.00 = all the \
         time; below {THREAD_SHOWN} left out)"
    );
    per_config(
        s,
        batch,
        &heading,
        "---",
        |x| !x.threads.is_empty(),
        |samples| {
            let mut kinds: Vec<&String> = samples.iter().flat_map(|x| x.threads.keys()).collect();
            kinds.sort();
            kinds.dedup();
            let mut shares: Vec<(f64, &String)> = kinds
                .into_iter()
                .map(|kind| {
                    let each = samples
                        .iter()
                        .map(|x| x.threads.get(kind).copied().unwrap_or(0.0));
                    (median(each.collect()), kind)
                })
                .filter(|(share, _)| *share >= THREAD_SHOWN)
                .collect();
            shares.sort_by(|a, b| b.0.total_cmp(&a.0));
            let text: Vec<String> = shares
                .iter()
                .map(|(share, kind)| format!("{kind} {share:.2}"))
                .collect();
            if text.is_empty() {
                "n/a".to_string()
            } else {
                text.join(", ")
            }
        },
    );
}

/// How often the guest was interrupted by its virtio devices per I/O: what a VMM that
/// signals each completion apart costs a guest whose vCPU is the bottleneck.
pub(super) fn interrupts(s: &mut String, batch: &Batch) {
    let heading = "The guest's interrupts from virtio devices (medians; per I/O, or per MiB for \
                   the jobs without I/Os: TCP, vsock, small files)";
    per_config(
        s,
        batch,
        heading,
        "---:",
        |x| x.interrupts.is_some(),
        |samples| {
            let each = samples
                .iter()
                .map(|x| x.interrupts_per_io())
                .filter(|x| !x.is_nan());
            num(median(each.collect()))
        },
    );
}

/// A table under `heading` with a row per job and a column per configuration (every VMM, on
/// then off), each cell made by `cell` from that job's samples in that configuration's
/// boots; nothing when no sample is `measured`.
fn per_config(
    s: &mut String,
    batch: &Batch,
    heading: &str,
    align: &str,
    measured: impl Fn(&Sample) -> bool,
    cell: impl Fn(&[&Sample]) -> String,
) {
    if !batch.boots.iter().any(|b| b.samples.iter().any(&measured)) {
        return;
    }
    let _ = writeln!(s, "\n{heading}:\n");
    let configs: Vec<Config> = batch
        .vmms()
        .into_iter()
        .flat_map(|vmm| [true, false].map(|iommu| Config { vmm, iommu }))
        .collect();
    let mut header = vec!["job".to_string()];
    header.extend(configs.iter().map(|&c| batch.name(c)));
    row(s, &header);
    let mut rule = vec![align.to_string(); header.len()];
    rule[0] = "---".into();
    row(s, &rule);
    for (j, job) in batch.jobs().iter().enumerate() {
        let mut cells = vec![job.name.to_string()];
        for &config in &configs {
            let samples: Vec<&Sample> = batch.boots_of(config).map(|b| &b.samples[j]).collect();
            cells.push(cell(&samples));
        }
        row(s, &cells);
    }
}
