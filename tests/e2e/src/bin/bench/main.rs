//! `bench`: the benchmark of record for warden's data path (issue 13, part 4), and optionally
//! another VMM with the same command line in the same batch. Prints one markdown table.
//!
//! `cargo run --release -p e2e --bin bench -- [--rounds N] [--peer PATH] [--disk-opts OPTS]
//! [--net-opts OPTS] [--one-l1-cpu] [--sandbox]`
//!
//! Each boot is the Debian 12 image (`Scenario::distro`, root on the virtio disk, 1 vCPU,
//! 512 MiB) in one configuration: disk and tap both `iommu=on`, or both plain; warden, or the
//! peer (`--peer`, e.g. a static Cloud Hypervisor build). One boot runs every job of its
//! configuration; the rounds (default 3) run the configurations in turn, so a slow spell of the
//! machine hits all of them. The jobs, in the guest: fio with libaio and O_DIRECT on a 64 MiB
//! file in the root file system, 4 s each (4 KiB random read at depth 1 and 16, 1 MiB
//! sequential read at depth 4, 4 KiB random write at depth 16), then iperf3 TCP for 4 s each
//! way against the host end of the tap.
//!
//! With `--sandbox`, a container sandbox's devices too (guest RAM then shared, as vhost-user
//! needs): a vsock (behind the IOMMU in the `on` boots) and a virtio-fs share served by
//! virtiofsd (`--cache=never`, so every read and write crosses the device). Their jobs: 64 MiB
//! each way over the vsock on one connection and on four (socat in the guest, `vsock-peer
//! --serve` on the host, which acknowledges what it read), 1 MiB sequential reads and writes
//! on the share for 4 s (fio, psync), and 500 small files created, looked up and read (shell
//! builtins, so no process per file), their rate in operations per second.
//!
//! Host CPU: around each job the guest asks the KVM host, over the tap, to stamp the VMM
//! process's utime+stime (`/proc/PID/stat`, all threads) and waits for the answer; the
//! difference, over the bytes the job moved, is CPU seconds per GiB. It includes the vCPU's
//! time in the guest (`guest_time`), which the table also gives apart. For warden the stamp
//! also reads `vm.counters` over its API socket, so the table gives the guest's MAP requests
//! per I/O and what each cost in time and host CPU (the API call is counted in the job's CPU:
//! well under 1 % of it).
//!
//! Why a binary of the e2e crate and not a `benches/` target: it is the harness (scenarios,
//! the nested KVM host) that boots the guests, it takes arguments, and `cargo bench` or
//! `cargo test --benches` must not start half an hour of nested boots by accident.

mod parse;
mod report;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use e2e::{packages, Mode, Scenario};

use parse::{CpuTime, Measured};

/// The tap's host end, where iperf3 and the stamp server listen; the image's networkd gives
/// the guest .2.
const HOST_IP: &str = "192.168.249.1";
const STAMP_PORT: u16 = 5300;
/// The guest's MAC, given rather than random: Cloud Hypervisor draws a random one with a
/// blocking `getrandom`, which in the nested host, before its entropy pool is ready, stalled
/// its VM creation for minutes (the peer's guest then printed nothing).
const GUEST_MAC: &str = "52:54:00:12:34:56";
/// Where the guest keeps the fio file and the JSON of each job, read back after the run.
const GUEST_DIR: &str = "/root/warden-bench";
/// Seconds each job runs.
const JOB_SECONDS: u32 = 4;
/// The time limit per boot: a nested boot and its jobs take 1.5–5 minutes (more with
/// `--sandbox`); a nested host that hangs (its emulated CPUs halted, QEMU at 0 % CPU: seen
/// once) costs this much.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// What each vsock job moves, and the small files of the share's job.
const VSOCK_BYTES: u64 = 64 << 20;
const SMALL_FILES: u32 = 500;
/// Where the guest mounts the share.
const SHARE_DIR: &str = "/mnt/bench";

/// What a job reports: IOPS for small blocks, MiB/s for the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Iops,
    MibPerSecond,
}

/// The device a job measures, for the issues' targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Disk,
    Net,
    Vsock,
    Share,
}

#[derive(Clone, Copy, Debug)]
enum Work {
    Fio {
        rw: &'static str,
        bs: &'static str,
        depth: u32,
    },
    /// iperf3 from the guest to the host, or (`reverse`) from the host to the guest.
    Tcp { reverse: bool },
    /// [`VSOCK_BYTES`] over `connections` at once, from the guest or (`to_guest`) to it.
    Vsock { to_guest: bool, connections: u32 },
    /// fio on a file of the share, 1 MiB blocks.
    ShareFio { rw: &'static str },
    /// [`SMALL_FILES`] files created, looked up, read.
    SmallFiles,
}

/// One benchmark job: `name` names its JSON file and stamps, `title` its row.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    pub name: &'static str,
    pub title: &'static str,
    pub unit: Unit,
    pub device: Device,
    work: Work,
}

pub const JOBS: [Job; 6] = [
    Job {
        name: "randread-4k-qd1",
        device: Device::Disk,
        title: "4 KiB random read, depth 1",
        unit: Unit::Iops,
        work: Work::Fio {
            rw: "randread",
            bs: "4k",
            depth: 1,
        },
    },
    Job {
        name: "randread-4k-qd16",
        device: Device::Disk,
        title: "4 KiB random read, depth 16",
        unit: Unit::Iops,
        work: Work::Fio {
            rw: "randread",
            bs: "4k",
            depth: 16,
        },
    },
    Job {
        name: "read-1m-qd4",
        device: Device::Disk,
        title: "1 MiB sequential read, depth 4",
        unit: Unit::MibPerSecond,
        work: Work::Fio {
            rw: "read",
            bs: "1m",
            depth: 4,
        },
    },
    Job {
        name: "randwrite-4k-qd16",
        device: Device::Disk,
        title: "4 KiB random write, depth 16",
        unit: Unit::Iops,
        work: Work::Fio {
            rw: "randwrite",
            bs: "4k",
            depth: 16,
        },
    },
    Job {
        name: "tcp-guest-to-host",
        device: Device::Net,
        title: "TCP guest → host",
        unit: Unit::MibPerSecond,
        work: Work::Tcp { reverse: false },
    },
    Job {
        name: "tcp-host-to-guest",
        device: Device::Net,
        title: "TCP host → guest",
        unit: Unit::MibPerSecond,
        work: Work::Tcp { reverse: true },
    },
];

/// The sandbox's jobs (`--sandbox`), after [`JOBS`].
pub const SANDBOX_JOBS: [Job; 7] = [
    Job {
        name: "vsock-guest-to-host",
        device: Device::Vsock,
        title: "vsock guest → host, 1 connection",
        unit: Unit::MibPerSecond,
        work: Work::Vsock {
            to_guest: false,
            connections: 1,
        },
    },
    Job {
        name: "vsock-host-to-guest",
        device: Device::Vsock,
        title: "vsock host → guest, 1 connection",
        unit: Unit::MibPerSecond,
        work: Work::Vsock {
            to_guest: true,
            connections: 1,
        },
    },
    Job {
        name: "vsock-guest-to-host-x4",
        device: Device::Vsock,
        title: "vsock guest → host, 4 connections",
        unit: Unit::MibPerSecond,
        work: Work::Vsock {
            to_guest: false,
            connections: 4,
        },
    },
    Job {
        name: "vsock-host-to-guest-x4",
        device: Device::Vsock,
        title: "vsock host → guest, 4 connections",
        unit: Unit::MibPerSecond,
        work: Work::Vsock {
            to_guest: true,
            connections: 4,
        },
    },
    Job {
        name: "fs-read-1m",
        device: Device::Share,
        title: "virtio-fs 1 MiB sequential read",
        unit: Unit::MibPerSecond,
        work: Work::ShareFio { rw: "read" },
    },
    Job {
        name: "fs-write-1m",
        device: Device::Share,
        title: "virtio-fs 1 MiB sequential write",
        unit: Unit::MibPerSecond,
        work: Work::ShareFio { rw: "write" },
    },
    Job {
        name: "fs-small-files",
        device: Device::Share,
        title: "virtio-fs small files, create + stat + read",
        unit: Unit::Iops,
        work: Work::SmallFiles,
    },
];

/// The jobs a run with `opts` has, in order.
pub fn jobs(opts: &BootOpts) -> Vec<Job> {
    let sandbox: &[Job] = if opts.sandbox { &SANDBOX_JOBS } else { &[] };
    JOBS.iter()
        .chain(sandbox)
        .filter(|job| opts.only.is_empty() || opts.only.iter().any(|name| name == job.name))
        .copied()
        .collect()
}

/// Which VMM a boot runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    Warden,
    Peer,
}

/// One configuration: a VMM with its disk and tap behind the IOMMU (`iommu`) or plain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub vmm: Vmm,
    pub iommu: bool,
}

/// One job's result in one boot.
#[derive(Clone, Debug)]
pub struct Sample {
    pub measured: Measured,
    /// The VMM's CPU time over the job.
    pub cpu: CpuTime,
    /// The virtio-iommu's MAP requests over the job (warden behind its IOMMU only).
    pub maps: Option<u64>,
    /// Each kind of the VMM's threads: its share of one host CPU over the job.
    pub threads: BTreeMap<String, f64>,
    /// The guest's interrupts from virtio devices over the job (and its two stamps).
    pub interrupts: Option<u64>,
}

impl Sample {
    /// The job's rate in its unit.
    pub fn rate(&self, unit: Unit) -> f64 {
        match unit {
            Unit::Iops => self.measured.iops,
            Unit::MibPerSecond => self.measured.bytes_per_second / f64::from(1 << 20),
        }
    }

    /// The guest's virtio interrupts per I/O, or per MiB for a job without I/Os of its own
    /// (TCP, vsock, small files); NaN without a count.
    pub fn interrupts_per_io(&self) -> f64 {
        let Some(interrupts) = self.interrupts else {
            return f64::NAN;
        };
        let m = &self.measured;
        let units = if m.iops > 0.0 && m.bytes_per_second > 0.0 {
            m.bytes as f64 * m.iops / m.bytes_per_second
        } else {
            m.bytes as f64 / f64::from(1 << 20)
        };
        interrupts as f64 / units
    }

    /// Host CPU seconds per GiB moved: all of it, and without the guest's own time.
    /// NaN for a job that moves no bytes to speak of (small files).
    pub fn cpu_per_gib(&self) -> (f64, f64) {
        if self.measured.bytes == 0 {
            return (f64::NAN, f64::NAN);
        }
        let gib = self.measured.bytes as f64 / f64::from(1 << 30);
        (
            self.cpu.total / gib,
            (self.cpu.total - self.cpu.guest) / gib,
        )
    }
}

/// One finished boot.
#[derive(Debug)]
pub struct Boot {
    pub config: Config,
    pub round: usize,
    /// Per job, in [`jobs`] order.
    pub samples: Vec<Sample>,
    /// The VMM's CPU time from its start to the guest's first stamp (the boot).
    pub boot_cpu: f64,
    pub elapsed: Duration,
    /// This machine's 1-minute load average before and after.
    pub load: (f64, f64),
    /// Whether this configuration and round needed more than one boot.
    pub retried: bool,
}

#[derive(Debug)]
struct Options {
    rounds: usize,
    peer: Option<PathBuf>,
    opts: BootOpts,
}

/// What every boot appends to its devices' options, and where the VMM runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootOpts {
    /// Appended to every `--disk` (e.g. `num_queues=1,queue_size=256,direct=on`).
    pub disk: String,
    /// Appended to every `--net` (e.g. `vhost=on`).
    pub net: String,
    /// Nested: the KVM host's scripts, the VMM included, confined to L1's CPU 0, as the e2e
    /// tests are (`--one-l1-cpu`). The nested host's false page faults
    /// (docs/net-soak-investigation.md) then spare the protected boots they otherwise kill
    /// again and again, but all the VMM's threads share one CPU.
    pub one_l1_cpu: bool,
    /// A vsock and a virtio-fs share besides, and their jobs.
    pub sandbox: bool,
    /// Only the jobs of these names (`--only`), to look at one effect in short boots; all
    /// when empty.
    pub only: Vec<String>,
    /// Warden's `--platform` (`--warden-platform`, e.g. `iommu_poll_us=0`), to compare its
    /// settings; the peer's boots never get it.
    pub warden_platform: String,
}

const USAGE: &str = "usage: bench [--rounds N (default 3)] [--peer PATH-TO-VMM] [--disk-opts OPTS] [--net-opts OPTS] [--one-l1-cpu] [--sandbox] [--only JOB,JOB...] [--warden-platform OPTS]";

fn options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut o = Options {
        rounds: 3,
        peer: None,
        opts: BootOpts::default(),
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--rounds" => {
                o.rounds = value()?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(format!("--rounds takes a positive count\n{USAGE}"))?;
            }
            "--peer" => o.peer = Some(PathBuf::from(value()?)),
            "--disk-opts" => o.opts.disk = value()?,
            "--net-opts" => o.opts.net = value()?,
            "--one-l1-cpu" => o.opts.one_l1_cpu = true,
            "--sandbox" => o.opts.sandbox = true,
            "--only" => o.opts.only = value()?.split(',').map(String::from).collect(),
            "--warden-platform" => o.opts.warden_platform = value()?,
            _ => return Err(format!("unknown argument {arg}\n{USAGE}")),
        }
    }
    let known: Vec<&str> = JOBS.iter().chain(&SANDBOX_JOBS).map(|j| j.name).collect();
    if let Some(unknown) = o.opts.only.iter().find(|n| !known.contains(&n.as_str())) {
        return Err(format!(
            "--only: no job {unknown:?}; the jobs: {}",
            known.join(", ")
        ));
    }
    if !o.opts.only.is_empty() && jobs(&o.opts).is_empty() {
        return Err("--only: none of these jobs runs without --sandbox".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    match options(std::env::args().skip(1)).and_then(|o| bench(&o)) {
        Ok(table) => {
            println!("{table}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bench: {err}");
            ExitCode::FAILURE
        }
    }
}

fn bench(o: &Options) -> Result<String, String> {
    let peer = match &o.peer {
        Some(path) => {
            Some(fs::canonicalize(path).map_err(|e| format!("--peer {}: {e}", path.display()))?)
        }
        None => None,
    };
    let mode = e2e::mode()?;
    if mode == Mode::Direct {
        packages::install(packages::BENCH_HOST)?;
    }
    let vmms: &[Vmm] = if peer.is_some() {
        &[Vmm::Warden, Vmm::Peer]
    } else {
        &[Vmm::Warden]
    };
    let configs: Vec<Config> = vmms
        .iter()
        .flat_map(|&vmm| [true, false].map(|iommu| Config { vmm, iommu }))
        .collect();
    let peer_name = peer
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned());
    let mut batch = report::Batch {
        mode,
        rounds: o.rounds,
        peer: peer_name.clone(),
        opts: o.opts.clone(),
        boots: Vec::new(),
        lost: Vec::new(),
    };
    for round in 1..=o.rounds {
        for &config in &configs {
            let name = report::config_name(config, peer_name.as_deref());
            eprintln!("bench: round {round}/{}: {name}", o.rounds);
            // A configuration whose every attempt died this round costs its sample, not the
            // batch: the table's medians are over the rounds it completed, and say so.
            match boot_with_retries(config, round, peer.as_deref(), &o.opts) {
                Ok(boot) => batch.boots.push(boot),
                Err(err) => {
                    let first = err.lines().next().unwrap_or_default().to_string();
                    eprintln!("bench: round {round}: {name} lost: {first}");
                    batch.lost.push(report::Lost {
                        config,
                        round,
                        why: first,
                    });
                }
            }
        }
        // A batch stopped later (a time limit, a dead host) keeps what it measured.
        if round < o.rounds && !batch.boots.is_empty() {
            eprintln!("bench: after round {round}:\n{}", report::table(&batch));
        }
    }
    if batch.boots.is_empty() {
        return Err("every boot was lost".into());
    }
    Ok(report::table(&batch))
}

/// Boots that may die before one completes a configuration's jobs: the nested test host
/// sometimes kills a guest under heavy I/O (docs/net-soak-investigation.md), and a lost boot
/// should cost that boot, not the batch. Each death is said on stderr, with its first lines.
const ATTEMPTS: usize = 3;

fn boot_with_retries(
    config: Config,
    round: usize,
    peer: Option<&std::path::Path>,
    opts: &BootOpts,
) -> Result<Boot, String> {
    let mut attempt = 1;
    loop {
        match boot(config, round, peer, opts) {
            Err(err) if attempt < ATTEMPTS => {
                let head: Vec<&str> = err.lines().take(2).collect();
                eprintln!(
                    "bench: attempt {attempt}/{ATTEMPTS} lost: {}",
                    head.join(" / ")
                );
                attempt += 1;
            }
            // A boot lost before this one counts as a retry, as the harness's own does.
            Ok(mut boot) => {
                boot.retried |= attempt > 1;
                return Ok(boot);
            }
            err => return err,
        }
    }
}

/// The guest's script: wait for the network, stamp, lay out the fio file (and mount the
/// share), then each job between two stamps, its JSON in [`GUEST_DIR`].
fn guest_script(opts: &BootOpts) -> String {
    let mut s = format!(
        r#"B={GUEST_DIR}
mkdir -p "$B"
n=0
until ip -4 -o addr show | grep -q ' 192.168.249.2/24 '; do
    n=$((n + 1)); [ "$n" -lt 600 ] || {{ echo BENCH-NET=missing; exit 1; }}; sleep 0.1
done
# stamp LABEL: the KVM host records the VMM's CPU time, and answers once it has. No
# connection yet: try again; any answer but ok: stop.
stamp() {{
    n=0
    while :; do
        rc=0
        bash -c 'exec 3<>/dev/tcp/{HOST_IP}/{STAMP_PORT} || exit 1
            echo "$1" >&3; read -r a <&3; [ "$a" = ok ] || {{ echo "BENCH-STAMP-REFUSED=$a"; exit 2; }}' \
            stamp "$1" 2>/dev/null || rc=$?
        [ "$rc" -ne 0 ] || return 0
        [ "$rc" -eq 1 ] && [ "$n" -lt 100 ] || {{ echo "BENCH-STAMP-FAILED=$1"; exit 1; }}
        n=$((n + 1)); sleep 0.2
    done
}}
# irqs NAME: each virtio interrupt's count so far (all CPUs), by name, into $B/NAME.irq.
irqs() {{
    awk '/virtio/ {{ n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; print $NF, n }}' \
        /proc/interrupts >"$B/$1.irq"
}}
stamp boot
fio --name=layout --filename="$B/file" --size=64M --rw=write --bs=1M --ioengine=libaio \
    --direct=1 --iodepth=4 --output-format=json --output="$B/layout.json"
"#
    );
    if opts.sandbox {
        s.push_str(&SANDBOX_HELPERS.replace("SHARE_DIR", SHARE_DIR));
    }
    for job in &jobs(opts) {
        let command = match job.work {
            Work::Fio { rw, bs, depth } => format!(
                "fio --name={name} --filename=\"$B/file\" --size=64M --rw={rw} --bs={bs} \
                 --iodepth={depth} --ioengine=libaio --direct=1 --time_based \
                 --runtime={JOB_SECONDS} --output-format=json --output=\"$B/{name}.json\"",
                name = job.name
            ),
            Work::Tcp { reverse } => format!(
                "iperf3 -c {HOST_IP} -t {JOB_SECONDS}{} -J >\"$B/{}.json\"",
                if reverse { " -R" } else { "" },
                job.name
            ),
            Work::Vsock {
                to_guest,
                connections,
            } => format!(
                "vsock_job {} {connections} {VSOCK_BYTES} {}",
                if to_guest { 7001 } else { 7000 },
                job.name
            ),
            Work::ShareFio { rw } => format!(
                "fio --name={name} --filename={SHARE_DIR}/file --size=64M --rw={rw} --bs=1m \
                 --ioengine=psync --time_based --runtime={JOB_SECONDS} --output-format=json \
                 --output=\"$B/{name}.json\"",
                name = job.name
            ),
            Work::SmallFiles => format!("small_files {SMALL_FILES} {}", job.name),
        };
        s.push_str(&format!(
            "irqs begin-{name}\nstamp 'begin {name}'\n{command}\nstamp 'end {name}'\n\
             irqs end-{name}\necho BENCH-JOB={name}\n",
            name = job.name
        ));
    }
    s.push_str("sync\necho BENCH-DONE=yes\n");
    s
}

/// The sandbox's jobs in the guest. `vsock_job PORT CONNECTIONS BYTES NAME`: each connection
/// to host port 7000 sends its share and waits for the host's acknowledgement; to 7001 it asks
/// for its share and reads it to the end. `small_files N NAME`: N files created, looked up and
/// read with shell builtins. Both write `{"bytes", "ops", "nanoseconds"}`.
const SANDBOX_HELPERS: &str = r#"mkdir -p SHARE_DIR
mount -t virtiofs bench SHARE_DIR || { echo BENCH-SHARE=unmounted; exit 1; }
fio --name=fs-layout --filename=SHARE_DIR/file --size=64M --rw=write --bs=1M --ioengine=psync \
    --output-format=json --output="$B/fs-layout.json"
timed() {
    echo "{\"bytes\": $1, \"ops\": $2, \"nanoseconds\": $(( $(date +%s%N) - $3 ))}" >"$B/$4.json"
}
vsock_job() {
    each=$(($3 / $2)) t0=$(date +%s%N)
    for i in $(seq "$2"); do
        if [ "$1" = 7000 ]; then
            head -c "$each" /dev/zero | socat -t 60 - VSOCK-CONNECT:2:7000 >/dev/null &
        else
            echo "$each" | socat -t 60 - VSOCK-CONNECT:2:7001 | wc -c >"$B/$4.$i.got" &
        fi
    done
    wait
    got=$(cat "$B/$4".*.got 2>/dev/null | awk '{ n += $1 } END { print n + 0 }')
    [ "$1" = 7000 ] || [ "$got" = "$3" ] || { echo "BENCH-VSOCK-SHORT=$4 $got"; exit 1; }
    timed "$3" 0 "$t0" "$4"
}
small_files() {
    d=SHARE_DIR/small t0=$(date +%s%N)
    mkdir "$d"
    for i in $(seq "$1"); do echo x >"$d/f$i"; done
    for i in $(seq "$1"); do [ -e "$d/f$i" ] || exit 1; done
    for i in $(seq "$1"); do read -r line <"$d/f$i"; done
    timed 0 $((3 * $1)) "$t0" "$2"
    rm -r "$d"
}
"#;

/// The KVM host before the VMM starts: the stamp server (busybox `nc -ll`, one `stamp.sh` per
/// connection) and the iperf3 server, both in the background, killed by [`HOST_CHECK`].
/// `stamp.sh` finds the VMM by its file name (`$WARDEN` is the peer for the peer's boots) and
/// its working directory, this one; where warden's API socket is, it first writes warden's
/// counters (`COUNTERS LABEL|STATUS JSON`); with the stamp go the host's clock and each of
/// the VMM's threads' CPU time (`CLOCK LABEL|SECONDS`, `THREAD LABEL|NAME|UTIME STIME`); it
/// answers `ok` once the stamp is written.
const HOST_SETUP: &str = r#"dir=$(pwd -P)
name=$(basename "$WARDEN")
cat >stamp.sh <<EOF
#!/bin/sh
read -r label
pid=
for p in \$(pidof "$name"); do
    [ "\$(readlink "/proc/\$p/cwd")" != "$dir" ] || pid=\$p
done
if [ -S "$dir/api.sock" ]; then
    reply=\$("$API_CLIENT" "$dir/api.sock" GET /api/v1/vm.counters 2>&1)
    echo "COUNTERS \$label|\$reply" >>"$dir/counters.log"
fi
if [ -n "\$pid" ] && [ -r "/proc/\$pid/stat" ]; then
    set -- \$(cut -d' ' -f14,15,43 "/proc/\$pid/stat")
    echo "STAMP \$1 \$2 \$3 \$label" >>"$dir/stamps.log"
    # Each thread's utime and stime (the fields after the name, which may hold spaces).
    {
        echo "CLOCK \$label|\$(cut -d' ' -f1 /proc/uptime)"
        for t in /proc/\$pid/task/*; do
            # A thread may end between the listing and the reads: then it has no line.
            c=\$(cat \$t/comm 2>/dev/null) && s=\$(sed 's/.*) //' \$t/stat 2>/dev/null) &&
                [ -n "\$s" ] && echo "THREAD \$label|\$c|\$(echo "\$s" | cut -d' ' -f12,13)"
        done
    } >>"$dir/threads.log"
    echo ok
else
    echo "no-$name-process-in-$dir"
fi
EOF
chmod +x stamp.sh
busybox nc -ll -p STAMP_PORT -e "$dir/stamp.sh" >stamp-server.log 2>&1 &
echo $! >stamp-server.pid
iperf3 -s >iperf3-server.log 2>&1 &
echo $! >iperf3-server.pid
"#;

/// The sandbox's host end: virtiofsd on `share`, every read and write to the back end
/// (`--cache=never`), and `vsock-peer --serve` on the vsock's socket; stopped by
/// [`SANDBOX_CHECK`].
const SANDBOX_SETUP: &str = r#"mkdir -p share
virtiofsd --socket-path=fs.sock --shared-dir=share --cache=never --sandbox=none >virtiofsd.log 2>&1 &
echo $! >virtiofsd.pid
vsock-peer --serve v.sock >vsock-peer.log 2>&1 &
echo $! >vsock-peer.pid
n=0
until [ -S fs.sock ]; do n=$((n + 1)); [ $n -lt 100 ] || break; sleep 0.1; done
"#;

const SANDBOX_CHECK: &str = r#"kill "$(cat virtiofsd.pid)" "$(cat vsock-peer.pid)" 2>/dev/null || true
cat vsock-peer.log"#;

/// The KVM host after the VMM exits: the servers stopped, the stamps (and warden's counters)
/// printed.
const HOST_CHECK: &str = r#"kill "$(cat stamp-server.pid)" "$(cat iperf3-server.pid)" 2>/dev/null || true
cat stamps.log
[ ! -f counters.log ] || cat counters.log
[ ! -f threads.log ] || cat threads.log"#;

/// warden's (and the peer's) arguments for `config`; the harness adds the kernel, initrd,
/// command line and `--serial tty`. `--console off`: Cloud Hypervisor's default console is the
/// terminal too, which it refuses next to `--serial tty`.
fn vmm_args(config: Config, opts: &BootOpts) -> Vec<String> {
    let iommu = if config.iommu { ",iommu=on" } else { "" };
    let extra = |opts: &str| {
        if opts.is_empty() {
            String::new()
        } else {
            format!(",{opts}")
        }
    };
    let (disk_opts, net_opts) = (extra(&opts.disk), extra(&opts.net));
    let memory = if opts.sandbox {
        "size=512M,shared=on"
    } else {
        "size=512M"
    };
    let mut args = [
        "--cpus",
        "boot=1",
        "--memory",
        memory,
        "--console",
        "off",
        "--disk",
        &format!("path=host-disk{disk_opts}{iommu}"),
        "--net",
        &format!("tap=,mac={GUEST_MAC},ip={HOST_IP},mask=255.255.255.0{net_opts}{iommu}"),
    ]
    .map(String::from)
    .to_vec();
    if opts.sandbox {
        args.extend(
            [
                "--vsock",
                &format!("cid=3,socket=v.sock{iommu}"),
                "--fs",
                "tag=bench,socket=fs.sock",
            ]
            .map(String::from),
        );
    }
    args
}

fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Boots `config` once and collects every job's sample.
fn boot(
    config: Config,
    round: usize,
    peer: Option<&std::path::Path>,
    opts: &BootOpts,
) -> Result<Boot, String> {
    let name = format!(
        "bench-{}-{}",
        match config.vmm {
            Vmm::Warden => "warden",
            Vmm::Peer => "peer",
        },
        if config.iommu { "on" } else { "off" }
    );
    let mut args = vmm_args(config, opts);
    if config.vmm == Vmm::Warden {
        // Where the stamp server reads warden's counters.
        args.extend(["--api-socket", "api.sock"].map(String::from));
        if !opts.warden_platform.is_empty() {
            args.extend(["--platform".to_string(), opts.warden_platform.clone()]);
        }
    }
    let mut scenario = Scenario::new(&name);
    if !opts.one_l1_cpu {
        scenario = scenario.on_every_l1_cpu();
    }
    let mut setup = HOST_SETUP.replace("STAMP_PORT", &STAMP_PORT.to_string());
    let mut check = HOST_CHECK.to_string();
    if opts.sandbox {
        setup.push_str(SANDBOX_SETUP);
        check = format!("{SANDBOX_CHECK}\n{check}");
        scenario = scenario.host_binary(&e2e::virtiofsd::binary());
    }
    scenario = scenario
        .distro()
        .host_setup(&setup)
        .warden_args(args)
        .guest_script(&guest_script(opts))
        .host_check(&check)
        .timeout(BOOT_TIMEOUT);
    if config.vmm == Vmm::Peer {
        scenario = scenario.vmm(peer.expect("peer configurations only with --peer"));
    }
    let load_before = load_average();
    let out = scenario
        .run()
        .ok_or("no KVM and no QEMU here: nothing can run the guest")?;
    let load = (load_before, load_average());
    if out.warden_exit != Some(0)
        || out.guest_script_exit() != Some(0)
        || out.marker("BENCH-DONE") != Some("yes")
    {
        return Err(format!("boot {name} (round {round}) failed:\n{out}"));
    }
    let stamps = parse::stamps(out.host_check_output())?;
    let maps = parse::map_requests(out.host_check_output())?;
    let threads = parse::threads(out.host_check_output())?;
    let stamp = |label: &str| {
        stamps
            .get(label)
            .copied()
            .ok_or_else(|| format!("{name}: no stamp {label:?} from the KVM host\n{out}"))
    };
    let mut samples = Vec::new();
    for job in &jobs(opts) {
        let path = format!("{GUEST_DIR}/{}.json", job.name);
        let text = out
            .guest_file(&path)
            .ok_or_else(|| format!("{name}: {path} is not on the guest's disk\n{out}"))?;
        let text = String::from_utf8_lossy(&text);
        let measured = match job.work {
            Work::Fio { .. } | Work::ShareFio { .. } => parse::fio(&text),
            Work::Tcp { .. } => parse::iperf3(&text),
            Work::Vsock { .. } | Work::SmallFiles => parse::timed(&text),
        }
        .map_err(|e| format!("{name}: {e}"))?;
        let (begin, end) = (format!("begin {}", job.name), format!("end {}", job.name));
        let cpu = stamp(&end)? - stamp(&begin)?;
        let maps = match (maps.get(&begin), maps.get(&end)) {
            (Some(Some(begin)), Some(Some(end))) => Some(end - begin),
            _ => None,
        };
        let threads = match (threads.get(&begin), threads.get(&end)) {
            (Some(begin), Some(end)) => end.busy_since(begin),
            _ => BTreeMap::new(),
        };
        let irqs = |when: &str| {
            let path = format!("{GUEST_DIR}/{when}-{}.irq", job.name);
            let text = out.guest_file(&path)?;
            parse::interrupts(&String::from_utf8_lossy(&text)).ok()
        };
        let interrupts = irqs("end")
            .zip(irqs("begin"))
            .map(|(end, begin)| end.saturating_sub(begin));
        samples.push(Sample {
            measured,
            cpu,
            maps,
            threads,
            interrupts,
        });
    }
    Ok(Boot {
        config,
        round,
        samples,
        boot_cpu: stamp("boot")?.total,
        elapsed: out.elapsed,
        load,
        retried: out.retried,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Options, String> {
        options(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn options_have_defaults_and_refuse_nonsense() {
        let o = args(&[]).unwrap();
        assert_eq!((o.rounds, o.peer, o.opts), (3, None, BootOpts::default()));
        let o = args(&[
            "--rounds",
            "1",
            "--peer",
            "/ch",
            "--disk-opts",
            "direct=on",
            "--net-opts",
            "vhost=on",
            "--one-l1-cpu",
        ])
        .unwrap();
        assert_eq!(o.rounds, 1);
        assert_eq!(o.peer, Some(PathBuf::from("/ch")));
        assert_eq!(
            (o.opts.disk.as_str(), o.opts.net.as_str()),
            ("direct=on", "vhost=on")
        );
        assert!(o.opts.one_l1_cpu);
        let o = args(&["--sandbox", "--only", "vsock-guest-to-host,randread-4k-qd1"]).unwrap();
        let names: Vec<&str> = jobs(&o.opts).iter().map(|j| j.name).collect();
        assert_eq!(names, ["randread-4k-qd1", "vsock-guest-to-host"]);
        assert!(args(&["--only", "vsock-guest-to-host"])
            .unwrap_err()
            .contains("without --sandbox"));
        assert!(args(&["--only", "fastest"]).unwrap_err().contains("no job"));
        assert!(args(&["--rounds", "0"]).is_err());
        assert!(args(&["--rounds"]).is_err());
        assert!(args(&["--fast"]).is_err());
    }

    #[test]
    fn both_vmms_get_the_same_cloud_hypervisor_style_arguments() {
        let on = vmm_args(
            Config {
                vmm: Vmm::Peer,
                iommu: true,
            },
            &BootOpts {
                disk: "direct=on".into(),
                net: "vhost=on".into(),
                one_l1_cpu: false,
                ..Default::default()
            },
        );
        assert_eq!(on[7], "path=host-disk,direct=on,iommu=on");
        assert_eq!(
            on[9],
            "tap=,mac=52:54:00:12:34:56,ip=192.168.249.1,mask=255.255.255.0,vhost=on,iommu=on"
        );
        let off = vmm_args(
            Config {
                vmm: Vmm::Warden,
                iommu: false,
            },
            &BootOpts::default(),
        );
        assert_eq!(off[7], "path=host-disk");
        assert_eq!(
            off[9],
            "tap=,mac=52:54:00:12:34:56,ip=192.168.249.1,mask=255.255.255.0"
        );
    }

    #[test]
    fn interrupts_are_counted_per_io_or_per_mib() {
        let sample = |iops: f64, interrupts| Sample {
            measured: Measured {
                iops,
                bytes_per_second: 4096.0 * 1000.0,
                bytes: 4096 * 4000,
            },
            cpu: CpuTime {
                total: 1.0,
                guest: 0.5,
            },
            maps: None,
            threads: BTreeMap::new(),
            interrupts,
        };
        // 4000 I/Os of 4 KiB; without I/Os, 15.6 MiB.
        assert_eq!(sample(1000.0, Some(2000)).interrupts_per_io(), 0.5);
        assert_eq!(sample(0.0, Some(2000)).interrupts_per_io(), 128.0);
        assert!(sample(1000.0, None).interrupts_per_io().is_nan());
    }

    #[test]
    fn every_job_is_stamped_and_written_where_it_is_read_back() {
        let opts = BootOpts {
            sandbox: true,
            ..Default::default()
        };
        let script = guest_script(&opts);
        assert_eq!(jobs(&opts).len(), JOBS.len() + SANDBOX_JOBS.len());
        for job in &jobs(&opts) {
            let name = job.name;
            assert!(script.contains(&format!("stamp 'begin {name}'")));
            assert!(script.contains(&format!("stamp 'end {name}'")));
            assert!(script.contains(&format!("irqs begin-{name}\nstamp 'begin {name}'")));
            assert!(script.contains(&format!("stamp 'end {name}'\nirqs end-{name}\n")));
            // fio and iperf3 write it; the sandbox's helpers take the name last and write
            // it through `timed`.
            let direct = script.contains(&format!("\"$B/{name}.json\""));
            let helper = script.contains(&format!(" {name}\nstamp 'end {name}'"))
                && script.contains(r#">"$B/$4.json""#);
            assert!(direct || helper, "{name}");
        }
    }
}
