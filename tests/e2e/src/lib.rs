//! End-to-end harness: boots real Linux guests under warden and reports what they printed.
//!
//! A [`Scenario`] has four parts, run in this order on the *KVM host* (the machine whose
//! `/dev/kvm` warden uses) and in the *guest* (L2, the Linux warden boots):
//!
//! 1. `host_setup`: shell on the KVM host before warden starts (create disk images, reserve
//!    huge pages, ...); the scenario stops here if it fails.
//! 2. warden, with the scenario's `warden_args` plus `--kernel`, `--initramfs`, `--cmdline`
//!    and `--serial tty` unless the scenario gives them, under a timeout.
//! 3. `guest_script`: shell run by the guest's `/init` after its modules are loaded; the guest
//!    then powers off. It runs with `set -e` and can call `wait_for PATH [SECONDS]`.
//! 4. `host_check`: shell on the KVM host after warden exits (read back what the guest wrote).
//!
//! A scenario can also shape the nested test host itself (see [`Scenario::l1_qemu_args`]):
//! extra QEMU devices for L1 (an emulated IOMMU and a PCI device to pass through), options for
//! L1's kernel, and files prepared beside QEMU first (`qemu_setup`). Such a scenario always
//! runs nested, since only there can the harness give the KVM host a device of its own.
//!
//! A scenario can boot the Debian 12 disk image instead of the busybox test guest
//! ([`Scenario::distro`]; its script then runs under systemd once the boot is complete), give
//! the KVM host a disk image ([`Scenario::host_disk`]: a copy, L1's `/dev/vda` when nested), or
//! hand the user's terminal to the guest ([`Scenario::terminal`], the interactive demo). What
//! the harness needs from Debian it installs the first time ([`packages`]).
//!
//! Host scripts run in a scratch directory, so relative paths (`disk.img`) work in both
//! the scripts and `warden_args`; `$WARDEN`, `$L2_KERNEL` and `$L2_INITRAMFS` name the files
//! warden gets, and `$API_CLIENT` a client of its `--api-socket` (`src/bin/api-client.rs`);
//! a scenario's [`Scenario::host_binary`]s (a peer's client) are on their `PATH`. Everything printed (the host's console, warden's serial output, so the guest's
//! console) lands in [`Outcome::console`] and in `console.log` in the scratch directory,
//! `<target dir>/e2e-runs/<scenario name>/`, which is kept for post-mortems.
//!
//! Where the KVM host is depends on the machine (see [`Mode`]): the machine itself when it
//! has hardware KVM, else a Linux booted under QEMU's software CPU (TCG), which emulates an AMD
//! CPU with SVM and so offers a real nested `/dev/kvm`. The guest images come from
//! `guest/build.sh` (Debian packages, cached outside the clone); warden is built as a static
//! binary so that it runs in that minimal L1.

mod cpio;
pub mod distro;
pub mod packages;
pub mod virtiofsd;
pub mod vsock;
pub mod wire;

pub use distro::DistroImage;

use std::fmt;
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The guest kernel command line the harness passes unless the scenario passes `--cmdline`.
/// The guest's console is its first serial port, which `--serial tty` sends to warden's stdout.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

/// Time the nested mode allows, on top of the scenario's timeout, for QEMU to boot L1 and run
/// the host scripts (L1 reaches its /init in ~2 s of its own time, more on a loaded machine).
const L1_OVERHEAD: Duration = Duration::from_secs(180);

/// Time allowed for the host scripts in direct mode, on top of the scenario's timeout.
const DIRECT_OVERHEAD: Duration = Duration::from_secs(60);

/// The static build warden gets: glibc static linking needs an explicit target so that build
/// scripts and proc macros stay dynamic.
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Where the KVM host that runs warden is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// This machine has hardware KVM (VMX or SVM): warden runs here, directly.
    Direct,
    /// No usable KVM here (none, or `kvm_pvm`, which can't run an unmodified Linux): warden
    /// runs inside an L1 Linux under `qemu-system-x86_64 -accel tcg` with nested SVM.
    Nested,
}

/// Which of L2's kernel images warden boots; warden supports both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The compressed `vmlinuz` (Linux boot protocol).
    BzImage,
    /// The ELF `vmlinux` extracted from it (PVH entry point).
    Elf,
}

/// One end-to-end test: host setup, warden's arguments, guest script, host check.
#[derive(Clone, Debug)]
pub struct Scenario {
    name: String,
    host_setup: String,
    warden_args: Vec<String>,
    default_args: bool,
    guest_script: String,
    host_check: String,
    timeout: Duration,
    kernel: Kernel,
    qemu_setup: String,
    l1_qemu_args: Vec<String>,
    l1_cmdline: String,
    guest_tools: Vec<String>,
    host_disk: Option<PathBuf>,
    distro: bool,
    terminal: bool,
    vmm: Option<PathBuf>,
    one_l1_cpu: bool,
    host_binaries: Vec<PathBuf>,
    reboots: bool,
    launcher: Option<String>,
}

impl Scenario {
    /// A scenario that boots the guest with default arguments and does nothing else. `name`
    /// names its scratch directory, so it must be unique among the tests and path-safe.
    pub fn new(name: &str) -> Self {
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "scenario name {name:?} must be non-empty [A-Za-z0-9_-]"
        );
        Scenario {
            name: name.to_string(),
            host_setup: String::new(),
            warden_args: Vec::new(),
            default_args: true,
            guest_script: String::new(),
            host_check: String::new(),
            timeout: Duration::from_secs(120),
            kernel: Kernel::BzImage,
            qemu_setup: String::new(),
            l1_qemu_args: Vec::new(),
            l1_cmdline: String::new(),
            guest_tools: Vec::new(),
            host_disk: None,
            distro: false,
            terminal: false,
            vmm: None,
            one_l1_cpu: true,
            host_binaries: Vec::new(),
            reboots: false,
            launcher: None,
        }
    }

    /// Lets warden's threads run on every CPU of the nested KVM host. By default the host's
    /// scripts, and so warden, are confined to its CPU 0: the emulated CPU of that host loses
    /// the guest (a false page fault, then a triple fault) when warden's threads run on two of
    /// its CPUs at once under I/O load, and never has with one (docs/net-soak-investigation.md).
    /// The soak that reproduces that, and the benchmark, which measures parallel work, opt out
    /// (the benchmark unless `--one-l1-cpu`).
    /// Direct runs on a real CPU are never confined.
    pub fn on_every_l1_cpu(mut self) -> Self {
        self.one_l1_cpu = false;
        self
    }

    /// Runs `binary` instead of warden, with the same arguments: another VMM with a
    /// Cloud-Hypervisor-compatible command line, which the benchmark (`src/bin/bench`) measures
    /// in the same batch. Nested, it must be a static binary: L1 has no shared libraries.
    pub fn vmm(mut self, binary: &Path) -> Self {
        self.vmm = Some(binary.to_owned());
        self
    }

    /// Lets warden boot the guest again when it resets itself (its default). Otherwise the
    /// harness gives warden `--no-reboot`, so that a reset ends the run: a guest the nested
    /// test host's emulated CPU triple-faults by mistake then shows as such (and the run is
    /// retried, see [`run`]) instead of booting again and running its script twice.
    pub fn reboots(mut self) -> Self {
        self.reboots = true;
        self
    }

    /// Puts `binary`, a program from outside this crate (a peer's client such as Cloud
    /// Hypervisor's `ch-remote`), on the KVM host's `PATH` under its own name for the host
    /// scripts. Nested, it must be a static binary: L1 has no shared libraries.
    pub fn host_binary(mut self, binary: &Path) -> Self {
        self.host_binaries.push(binary.to_owned());
        self
    }

    /// Starts warden through `tool`, one of this crate's [`HOST_TOOLS`] that plays an
    /// orchestrator: the run is `tool "$WARDEN" ARGS` with the scenario's
    /// [`Scenario::warden_args`], the tool gives warden a command line of its own (the
    /// harness adds none), and `WARDEN-EXIT` is the tool's exit status.
    pub fn launcher(mut self, tool: &str) -> Self {
        assert!(HOST_TOOLS.contains(&tool), "{tool} is not a host tool");
        self.launcher = Some(tool.to_string());
        self.default_args = false;
        self
    }

    /// A disk image for the KVM host. The harness copies it (sparse) to `host-disk` in the
    /// scratch directory, so the original is never written; in nested mode QEMU gives that
    /// copy to L1 as its virtio disk, and `host-disk` in L1's scratch directory is a link to
    /// the block device (`/dev/vda`). Either way warden takes `--disk path=host-disk`, and
    /// after the run [`Outcome::host_disk`] is the copy, with what the guest wrote.
    pub fn host_disk(mut self, image: &Path) -> Self {
        self.host_disk = Some(image.to_owned());
        self
    }

    /// Boots the Debian 12 image ([`DistroImage`]) instead of the busybox test guest: its
    /// kernel and initrd, its disk as the [`Scenario::host_disk`], and [`distro::DISTRO_CMDLINE`]
    /// unless `--cmdline` is given. The [`Scenario::guest_script`] goes into the image's copy as
    /// [`distro::SCENARIO_PATH`]: systemd runs it once the boot is complete (as root, in `sh`
    /// with `set -e`, output on the serial console) and then powers the guest off. Without a
    /// script the guest offers a login on the serial console. Needs root to build the image.
    pub fn distro(mut self) -> Self {
        self.distro = true;
        self
    }

    /// Gives this process's terminal to the run: the guest's serial console is the user's
    /// (warden's `--serial tty`, through QEMU's stdio and L1's console when nested), and
    /// nothing is captured, so the [`Outcome`] has an empty console. For the interactive demo.
    pub fn terminal(mut self) -> Self {
        self.terminal = true;
        self
    }

    /// Shell run on this machine in the scratch directory before QEMU starts (`sh -e`), to
    /// prepare files for [`Scenario::l1_qemu_args`] such as disk images; what it prints goes
    /// to the console, so it can print markers.
    pub fn qemu_setup(mut self, script: &str) -> Self {
        self.qemu_setup = script.to_string();
        self
    }

    /// Extra QEMU options for the nested KVM host, e.g. an emulated IOMMU and a device to pass
    /// through; QEMU runs in the scratch directory, so relative file names work. Makes the
    /// scenario nested-only.
    pub fn l1_qemu_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.l1_qemu_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Extra words for L1's kernel command line (e.g. `intel_iommu=on`).
    pub fn l1_cmdline(mut self, extra: &str) -> Self {
        self.l1_cmdline = extra.to_string();
        self
    }

    /// Puts binary `name` of this crate (`src/bin/<name>.rs`, built static) in the guest's
    /// `/bin`, for guest scripts that need more than busybox.
    pub fn guest_tool(mut self, name: &str) -> Self {
        self.guest_tools.push(name.to_string());
        self
    }

    /// Shell run on the KVM host, in the scratch directory, before warden starts.
    pub fn host_setup(mut self, script: &str) -> Self {
        self.host_setup = script.to_string();
        self
    }

    /// warden's arguments, each passed as one word (no shell expansion).
    pub fn warden_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.warden_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Don't add `--kernel`, `--initramfs`, `--cmdline` or `--serial`: for scenarios that
    /// don't boot a guest (`--version`, argument errors).
    pub fn without_default_args(mut self) -> Self {
        self.default_args = false;
        self
    }

    /// Shell run in the guest (L2) by its `/init`, with `set -e`.
    pub fn guest_script(mut self, script: &str) -> Self {
        self.guest_script = script.to_string();
        self
    }

    /// Shell run on the KVM host, in the scratch directory, after warden exits.
    pub fn host_check(mut self, script: &str) -> Self {
        self.host_check = script.to_string();
        self
    }

    /// How long warden may run before it is killed (default 120 s). Budget for TCG: the
    /// Debian guest reaches its /init ~10 s after warden starts when nested.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Which guest kernel image warden gets with `--kernel` (default: bzImage).
    pub fn kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Runs the scenario: see [`run`].
    pub fn run(&self) -> Option<Outcome> {
        run(self)
    }
}

/// What a scenario run printed and how it ended.
#[derive(Debug)]
pub struct Outcome {
    /// Where warden ran.
    pub mode: Mode,
    /// Everything printed: the KVM host's console (L1's kernel log in nested mode), the host
    /// scripts' output and warden's output, which includes the guest's serial console.
    pub console: String,
    /// warden's exit status; `None` if it never ran or its end wasn't seen (host setup failed,
    /// the whole run timed out). The scenario's timeout shows as 124 (or 143 in L1's busybox).
    pub warden_exit: Option<i32>,
    /// Whether the whole run (QEMU, or the host scripts in direct mode) had to be killed.
    pub timed_out: bool,
    /// The scenario's scratch directory; `console.log` there holds [`Outcome::console`].
    pub run_dir: PathBuf,
    /// Wall time of the run, without building images or warden.
    pub elapsed: Duration,
    /// Whether this is a second run, after the nested KVM host's kernel crashed in the first.
    pub retried: bool,
    /// The copy of the scenario's [`Scenario::host_disk`] after the run, if it had one.
    pub host_disk: Option<PathBuf>,
    /// The byte offset of the Debian image's root file system in `host_disk`, for
    /// [`Outcome::guest_file`].
    distro_root_offset: Option<u64>,
}

impl Outcome {
    /// What warden printed: the guest's console (L2's kernel log, its /init's and the guest
    /// script's output) and warden's own messages.
    pub fn guest_output(&self) -> &str {
        self.between("WARDEN-START\n", "\nWARDEN-EXIT=")
    }

    /// What the host check printed.
    pub fn host_check_output(&self) -> &str {
        self.between("WARDEN-HOST-CHECK\n", "\nWARDEN-HOST-CHECK-EXIT=")
    }

    /// The value of the last `KEY=value` marker anywhere in the console (the text after `=` up
    /// to the end of its line); markers may follow other output on a line, as serial output
    /// from different sources interleaves.
    pub fn marker(&self, key: &str) -> Option<&str> {
        let needle = format!("{key}=");
        self.console
            .lines()
            .rev()
            .find_map(|line| line.find(&needle).map(|i| line[i + needle.len()..].trim()))
    }

    /// [`Outcome::marker`], which the run must have printed: a test fails naming it, with the
    /// whole outcome, if it did not.
    pub fn required_marker(&self, key: &str) -> &str {
        self.marker(key)
            .unwrap_or_else(|| panic!("no {key}\n{self}"))
    }

    /// The virtio feature bits a guest printed as `KEY=` followed by sysfs's string of 0s and
    /// 1s (a device's `features` file), as bit numbers.
    pub fn feature_bits(&self, key: &str) -> Vec<u32> {
        let bits = self
            .marker(key)
            .unwrap_or_else(|| panic!("no {key}\n{self}"));
        bits.chars()
            .enumerate()
            .filter(|&(_, c)| c == '1')
            .map(|(bit, _)| bit as u32)
            .collect()
    }

    /// One count of warden's exit report of the virtio-iommu's totals (the lines `warden:
    /// virtio-iommu total: 5 maps, 0 unmaps, ...` and `warden: virtio-iommu: 9 IOTLB hits,
    /// ...`), by the name after its number (`maps`, `faults`, `IOTLB hits`, ...).
    pub fn iommu_counter(&self, name: &str) -> u64 {
        let totals: Vec<&str> = self
            .guest_output()
            .lines()
            .filter_map(|line| {
                let line = line.trim();
                line.strip_prefix("warden: virtio-iommu total: ")
                    .or_else(|| line.strip_prefix("warden: virtio-iommu: "))
            })
            .collect();
        if totals.is_empty() {
            panic!("warden printed no IOMMU statistics\n{self}");
        }
        let suffix = format!(" {name}");
        totals
            .iter()
            .flat_map(|line| line.split(", "))
            .find_map(|field| field.strip_suffix(&suffix)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} count in the IOMMU's totals {totals:?}\n{self}"))
    }

    /// The host check's `API-REPLY NAME STATUS BODY` line for `name` (the tests' convention for
    /// calls made with `$API_CLIENT`): the status and the JSON body (null when empty).
    pub fn api_reply(&self, name: &str) -> (u16, serde_json::Value) {
        let prefix = format!("API-REPLY {name} ");
        let line = self
            .host_check_output()
            .lines()
            .find_map(|l| l.trim().strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no reply to {name}\n{self}"));
        let (status, body) = line.split_once(' ').unwrap_or((line, ""));
        let status = status
            .parse()
            .unwrap_or_else(|_| panic!("{name}: no status in {line:?}\n{self}"));
        let body = if body.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{name}: {e}: {body}\n{self}"))
        };
        (status, body)
    }

    /// File `path` in the root file system of a [`Scenario::distro`] run's disk, as the guest
    /// left it (read with debugfs after the run); `None` if it isn't there.
    pub fn guest_file(&self, path: &str) -> Option<Vec<u8>> {
        let offset = self.distro_root_offset?;
        distro::read_file(self.host_disk.as_deref()?, offset, path)
    }

    /// The guest script's exit status, as reported by the guest's /init.
    pub fn guest_script_exit(&self) -> Option<i32> {
        self.marker("WARDEN-L2-SCRIPT-EXIT")?.parse().ok()
    }

    /// The host check's exit status.
    pub fn host_check_exit(&self) -> Option<i32> {
        self.marker("WARDEN-HOST-CHECK-EXIT")?.parse().ok()
    }

    fn between(&self, start: &str, end: &str) -> &str {
        let Some(i) = self.console.find(start) else {
            return "";
        };
        let rest = &self.console[i + start.len()..];
        &rest[..rest.find(end).unwrap_or(rest.len())]
    }
}

/// A summary for assertion messages: how the run ended and the console's tail.
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const TAIL: usize = 80;
        let lines: Vec<&str> = self.console.lines().collect();
        writeln!(
            f,
            "mode {:?}, warden exit {:?}, guest script exit {:?}, host check exit {:?}, timed out {}, {:.1?}",
            self.mode,
            self.warden_exit,
            self.guest_script_exit(),
            self.host_check_exit(),
            self.timed_out,
            self.elapsed
        )?;
        writeln!(
            f,
            "full console: {} -- last {TAIL} lines:",
            self.run_dir.join("console.log").display()
        )?;
        for line in &lines[lines.len().saturating_sub(TAIL)..] {
            writeln!(f, "| {line}")?;
        }
        Ok(())
    }
}

/// Built once per test process, under [`STATE`]'s lock.
struct Prepared {
    /// `guest/build.sh`'s output directory.
    guest: PathBuf,
    /// The directory of the static binaries: warden and the guest tools.
    warden: PathBuf,
    /// The Debian image, built when the first [`Scenario::distro`] runs.
    distro: Option<DistroImage>,
}

impl Prepared {
    fn binary(&self, name: &str) -> PathBuf {
        self.warden.join(name)
    }

    /// The VMM `scenario` runs: warden, or its [`Scenario::vmm`].
    fn vmm(&self, scenario: &Scenario) -> PathBuf {
        scenario
            .vmm
            .clone()
            .unwrap_or_else(|| self.binary("warden"))
    }
}

/// This crate's binaries that guest scripts may ask for ([`Scenario::guest_tool`]).
const GUEST_TOOLS: [&str; 5] = [
    "vfio-map",
    "blk-discard",
    "attacker",
    "vsock-agent",
    "vsock-guest",
];

/// Binaries of this crate the KVM host gets beside warden, on its scripts' `PATH` (and
/// `api-client` as `$API_CLIENT`).
const HOST_TOOLS: [&str; 5] = [
    "api-client",
    "tap-fd",
    "kata-replay",
    "libvirt-replay",
    "vsock-peer",
];

/// Serializes runs: tests in a crate run on parallel threads, and one QEMU already wants
/// both cores of a small CI machine (and a nested guest is too slow to share them).
static STATE: Mutex<Option<Prepared>> = Mutex::new(None);

/// Runs `scenario` and returns what happened, or `None` when this machine can run no KVM
/// guest at all (the reason is printed on stderr: the test should just return).
///
/// Panics if the guest images or warden can't be built, or the run can't be started: a
/// broken harness must not look like a passing test.
pub fn run(scenario: &Scenario) -> Option<Outcome> {
    let mode = match choose_mode(!scenario.l1_qemu_args.is_empty()) {
        Ok(mode) => mode,
        Err(why) => {
            // Loud: past the test harness's capture, which shows eprintln! only on failure.
            packages::say(&format!(
                "E2E SKIPPED: scenario '{}' did not run: {why}",
                scenario.name
            ));
            return None;
        }
    };
    let mut state = STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if state.is_none() {
        packages::ensure(packages::GUEST_IMAGES);
        *state = Some(Prepared {
            guest: build_guest_images(),
            warden: build_static_binaries(),
            distro: None,
        });
    }
    let prepared = state.as_mut().expect("prepared above");
    if scenario.distro && prepared.distro.is_none() {
        prepared.distro = Some(DistroImage::build());
    }
    let prepared = &*prepared;
    let _machine = MachineLock::acquire();

    let mut outcome = run_once(scenario, mode, prepared);
    if let Some(why) = nested_host_flake(&outcome) {
        eprintln!(
            "E2E RETRY: scenario '{}': {why}; running it once more",
            scenario.name
        );
        outcome = run_once(scenario, mode, prepared);
        outcome.retried = true;
    }
    Some(outcome)
}

/// What the nested test host (not the guest or warden) may have done to this run, worth one
/// more run: a crash of L1's own kernel, or a guest triple fault, which the emulated CPU raises
/// by itself under I/O load (a not-present fault on kernel text whose page tables in RAM are
/// intact: docs/net-soak-investigation.md). A second failure fails the test. Never in direct
/// mode, on a real CPU.
fn nested_host_flake(outcome: &Outcome) -> Option<&'static str> {
    if host_kernel_died(outcome) {
        return Some(
            "the nested KVM host's own kernel died under TCG (a known QEMU TCG flake, not the \
             guest's or warden's doing)",
        );
    }
    let triple_fault = outcome.mode == Mode::Nested
        && !outcome.timed_out
        && outcome.console.contains(TRIPLE_FAULT);
    triple_fault.then_some(
        "the guest triple-faulted in the nested KVM host, whose emulated CPU raises false page \
         faults under I/O load (docs/net-soak-investigation.md)",
    )
}

/// What warden prints when the guest triple-faults (crates/warden/src/main.rs).
const TRIPLE_FAULT: &str = "the guest asked for a reset (triple fault)";

/// Serializes runs across processes too (two test binaries, a benchmark and a test, two
/// checkouts): an exclusive `flock` on a file in the system's temporary directory, held for
/// the whole run and released when dropped (or when the process dies).
struct MachineLock {
    _file: File,
}

impl MachineLock {
    fn acquire() -> Self {
        MachineLock {
            _file: exclusive_lock("warden-e2e.lock", "run lock"),
        }
    }
}

/// An exclusive `flock` on `name` in the system's temporary directory (`what` names it in a
/// panic), held until the file is dropped or the process dies.
pub(crate) fn exclusive_lock(name: &str, what: &str) -> File {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join(name);
    let file = File::create(&path)
        .unwrap_or_else(|e| panic!("cannot create the {what} {}: {e}", path.display()));
    // SAFETY: flock on a descriptor this function owns.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let err = std::io::Error::last_os_error();
        assert!(
            err.kind() == std::io::ErrorKind::Interrupted,
            "cannot lock {}: {err}",
            path.display()
        );
    }
    file
}

/// Whether the run ended because L1's kernel (the nested KVM host) crashed: an Oops or panic
/// in L1's own log, that is anywhere if warden never reported an exit, or after its exit (in
/// the host check). A crash of the L2 guest's kernel cannot look like this: it sits inside
/// warden's output, and warden reports it and exits 1.
fn host_kernel_died(outcome: &Outcome) -> bool {
    if outcome.mode != Mode::Nested || outcome.timed_out {
        return false;
    }
    let host_log = match outcome.warden_exit {
        None => outcome.console.as_str(),
        Some(_) => outcome
            .console
            .rsplit_once("WARDEN-EXIT=")
            .map_or("", |(_, after)| after),
    };
    host_log.contains("Oops: ") || host_log.contains("Kernel panic")
}

fn run_once(scenario: &Scenario, mode: Mode, prepared: &Prepared) -> Outcome {
    let run_dir = target_dir().join("e2e-runs").join(&scenario.name);
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir).expect("remove the previous run's scratch directory");
    }
    fs::create_dir_all(&run_dir).expect("create the scenario's scratch directory");
    let distro = scenario
        .distro
        .then(|| prepared.distro.as_ref().expect("built in run()"));
    let (kernel, l2_initramfs) = match distro {
        Some(image) => (image.kernel.clone(), image.initrd.clone()),
        None => {
            let l2_initramfs = run_dir.join("l2-initramfs.cpio");
            write_l2_initramfs(scenario, prepared, &l2_initramfs);
            let kernel = prepared.guest.join("l2").join(match scenario.kernel {
                Kernel::BzImage => "vmlinuz",
                Kernel::Elf => "vmlinux",
            });
            (kernel, l2_initramfs)
        }
    };
    let host_disk = distro
        .map(|image| image.disk.clone())
        .or_else(|| scenario.host_disk.clone())
        .map(|image| copy_host_disk(&image, &run_dir));
    if let (Some(image), Some(disk)) = (distro, &host_disk) {
        if !scenario.guest_script.is_empty() {
            let script = distro_script(scenario);
            distro::write_file(
                disk,
                image.root_offset,
                distro::SCENARIO_PATH,
                script.as_bytes(),
                &run_dir,
            );
        }
    }

    let start = Instant::now();
    let (status, timed_out) = match mode {
        Mode::Direct => {
            let bin_dir = run_dir.join("bin");
            fs::create_dir(&bin_dir).expect("create the host binaries' directory");
            let tools = HOST_TOOLS.iter().map(|tool| prepared.binary(tool));
            for binary in tools.chain(scenario.host_binaries.iter().cloned()) {
                std::os::unix::fs::symlink(&binary, bin_dir.join(binary_name(&binary)))
                    .unwrap_or_else(|e| panic!("cannot link {}: {e}", binary.display()));
            }
            let files = HostFiles {
                warden: prepared.vmm(scenario),
                api_client: prepared.binary("api-client"),
                bin_dir,
                kernel,
                initramfs: l2_initramfs,
                disk_device: None,
                nested: false,
            };
            write_host_scripts(scenario, &files, &run_dir);
            let mut cmd = Command::new("timeout");
            cmd.arg("--kill-after=10");
            if scenario.terminal {
                cmd.arg("--foreground");
            }
            cmd.arg(secs(scenario.timeout + DIRECT_OVERHEAD))
                .args(["sh", "host.sh"])
                .current_dir(&run_dir);
            run_logged(cmd, &run_dir, scenario.terminal)
        }
        Mode::Nested => {
            let l1_initramfs = run_dir.join("l1-initramfs.cpio");
            let disk_device = host_disk.as_ref().map(|_| "/dev/vda");
            write_l1_initramfs(
                scenario,
                prepared,
                &kernel,
                &l2_initramfs,
                disk_device,
                &l1_initramfs,
            );
            run_qemu_setup(scenario, &run_dir);
            let mut cmd = Command::new("nice");
            // QEMU's exit status when L1 powers off is 0, whatever the scenario did.
            cmd.args(["-n", "10", "timeout", "--kill-after=10"]);
            if scenario.terminal {
                // Lets QEMU read the terminal: timeout otherwise runs it in the background.
                cmd.arg("--foreground");
            }
            cmd.arg(secs(scenario.timeout + L1_OVERHEAD))
                .arg("qemu-system-x86_64")
                .args(["-machine", "q35", "-accel", "tcg,thread=multi"])
                .args(["-cpu", "qemu64,+svm,+npt", "-m", "2G", "-smp", "2"])
                .args(["-nographic", "-no-reboot"]);
            if host_disk.is_some() {
                // The first virtio disk, so /dev/vda in L1. A scratch copy: flushes can be
                // skipped, the data is read back after QEMU exits.
                cmd.args(["-drive", "file=host-disk,if=virtio,format=raw,cache=unsafe"]);
            }
            // L1's own kernel messages would mix with the guest's login prompt.
            let quiet = if scenario.terminal { " quiet" } else { "" };
            cmd.args(&scenario.l1_qemu_args)
                .arg("-kernel")
                .arg(prepared.guest.join("l1/vmlinuz"))
                .arg("-initrd")
                .arg(&l1_initramfs)
                .arg("-append")
                .arg(format!("console=ttyS0 panic=-1{quiet} {}", scenario.l1_cmdline).trim_end())
                .current_dir(&run_dir);
            run_logged(cmd, &run_dir, scenario.terminal)
        }
    };
    let elapsed = start.elapsed();
    let console = fs::read(run_dir.join("console.log")).unwrap_or_default();
    // Serial consoles end lines with CRLF; markers are matched per line.
    let console = String::from_utf8_lossy(&console).replace('\r', "");
    let mut outcome = Outcome {
        mode,
        console,
        warden_exit: None,
        timed_out,
        run_dir,
        elapsed,
        retried: false,
        host_disk,
        distro_root_offset: distro.map(|image| image.root_offset),
    };
    outcome.warden_exit = outcome.marker("WARDEN-EXIT").and_then(|v| v.parse().ok());
    if scenario.terminal && mode == Mode::Direct {
        // host.sh exits with warden's status when it owns the terminal (no markers).
        outcome.warden_exit = Some(status);
    }
    if !timed_out && status != 0 && !scenario.terminal {
        panic!("the KVM host exited with status {status}\n{outcome}");
    }
    outcome
}

/// A binary's file name, which it keeps on the KVM host.
fn binary_name(binary: &Path) -> String {
    binary
        .file_name()
        .unwrap_or_else(|| panic!("{} names no file", binary.display()))
        .to_string_lossy()
        .into_owned()
}

/// Copies `image` sparsely to `host-disk` in `run_dir` (a 1 GiB image with 350 MB of data
/// takes a second or two) and returns the copy's path.
fn copy_host_disk(image: &Path, run_dir: &Path) -> PathBuf {
    let copy = run_dir.join("host-disk");
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(image)
        .arg(&copy)
        .status()
        .expect("cannot run cp");
    assert!(
        status.success(),
        "copying {} to {} failed ({status})",
        image.display(),
        copy.display()
    );
    copy
}

/// The Debian image's scenario script: the scenario's script in a `set -e` subshell between
/// the markers the test guest's /init prints, then a clean poweroff.
fn distro_script(scenario: &Scenario) -> String {
    format!(
        r#"#!/bin/sh
# generated by the e2e harness: scenario {name}; run by warden-scenario.service
echo WARDEN-L2-SCRIPT-BEGIN
(
set -e
{script}
)
echo "WARDEN-L2-SCRIPT-EXIT=$?"
sync
systemctl poweroff --no-block
"#,
        name = scenario.name,
        script = scenario.guest_script
    )
}

/// A peer's static binary (`../shared/peers/` beside the workspace, see its README: Cloud
/// Hypervisor's `cloud-hypervisor` and `ch-remote`), or the file `variable` names. `None`,
/// said loudly for `test`, when it isn't there: the test should just return.
pub fn peer_binary(name: &str, variable: &str, test: &str) -> Option<PathBuf> {
    let path = std::env::var_os(variable).map_or_else(
        || workspace_root().join("../shared/peers").join(name),
        PathBuf::from,
    );
    if path.is_file() {
        return Some(path);
    }
    packages::say(&format!(
        "E2E SKIPPED: {test} did not run: no {name} at {} (set {variable} to a static build)",
        path.display()
    ));
    None
}

/// Where scenarios run on this machine, or why none can: for callers whose own set-up depends
/// on it (the benchmark installs its host-side tools only where the KVM host is this machine).
/// Installs QEMU when the nested host needs it, as [`run`] would.
pub fn mode() -> Result<Mode, String> {
    choose_mode(false)
}

/// Picks where warden runs: here with hardware KVM, else nested in QEMU (installed if
/// missing), and always nested for a scenario that gives the KVM host devices of its own.
/// `WARDEN_E2E_MODE=direct|nested|skip` overrides the detection (e.g. to try the nested setup
/// on a machine with hardware KVM). An error says why the scenario can't run here.
fn choose_mode(nested_only: bool) -> Result<Mode, String> {
    let direct = match std::env::var("WARDEN_E2E_MODE").as_deref() {
        Ok("direct") => true,
        Ok("nested") => false,
        Ok("skip") => return Err("WARDEN_E2E_MODE=skip".into()),
        Ok(other) => panic!("WARDEN_E2E_MODE={other}: expected direct, nested or skip"),
        Err(_) => has_hardware_kvm(),
    };
    if direct && !nested_only {
        return Ok(Mode::Direct);
    }
    let why = if direct {
        "it gives the nested KVM host devices of its own, so it needs QEMU"
    } else {
        "there is no hardware KVM (/dev/kvm with VMX/SVM) here, and the software KVM host needs QEMU"
    };
    packages::install(packages::NESTED_HOST).map_err(|e| format!("{why}; {e}"))?;
    Ok(Mode::Nested)
}

/// `/dev/kvm` backed by VMX or SVM. `kvm_pvm` (KVM without hardware virtualization) doesn't
/// count: it runs guest kernel code through an instruction emulator that can't run an
/// unmodified Linux.
fn has_hardware_kvm() -> bool {
    Path::new("/dev/kvm").exists()
        && !Path::new("/sys/module/kvm_pvm").exists()
        && fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
            info.lines()
                .filter(|line| line.starts_with("flags"))
                .any(|line| line.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Cargo's target directory for this workspace: the harness keeps its own builds and scratch
/// directories there, away from the normal build.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs `guest/build.sh` (seconds when cached) and returns its output directory.
fn build_guest_images() -> PathBuf {
    run_build_script("guest/build.sh")
}

/// Runs the image-building script `script` (relative to the workspace) and returns the
/// directory it prints, its only output on stdout. Panics if it fails.
pub(crate) fn run_build_script(script: &str) -> PathBuf {
    let script = workspace_root().join(script);
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}): see its messages above",
        script.display(),
        out.status
    );
    let dir = String::from_utf8(out.stdout)
        .unwrap_or_else(|_| panic!("{} printed a non-UTF-8 path", script.display()));
    PathBuf::from(dir.trim())
}

/// Builds warden and the guest tools as static binaries (they must run in busybox-only
/// initramfs images) in their own target directory, so the flags don't invalidate the normal
/// build; returns the directory that holds them.
fn build_static_binaries() -> PathBuf {
    let target = target_dir().join("e2e-static");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "--release", "-p", "warden", "-p", "e2e"])
        .args(["--bin", "warden"]);
    for tool in GUEST_TOOLS.iter().chain(&HOST_TOOLS) {
        cmd.args(["--bin", tool]);
    }
    let status = cmd
        .arg("--target")
        .arg(STATIC_TARGET)
        .arg("--target-dir")
        .arg(&target)
        .current_dir(workspace_root())
        // Cargo prefers CARGO_ENCODED_RUSTFLAGS (set for us when we run under cargo) to RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // Debug info would make the binary, and so every L1 initramfs, several times larger.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .status()
        .expect("cannot run cargo");
    assert!(
        status.success(),
        "building the static warden failed ({status})"
    );
    target.join(STATIC_TARGET).join("release")
}

/// Runs the scenario's `qemu_setup` in the scratch directory; its output starts console.log.
fn run_qemu_setup(scenario: &Scenario, run_dir: &Path) {
    if scenario.qemu_setup.is_empty() {
        return;
    }
    let log = File::create(run_dir.join("console.log")).expect("create console.log");
    let status = Command::new("sh")
        .args(["-e", "-c", &scenario.qemu_setup])
        .current_dir(run_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup console.log"))
        .stderr(log)
        .status()
        .expect("cannot run sh");
    assert!(
        status.success(),
        "the scenario's qemu_setup failed ({status}): see {}",
        run_dir.join("console.log").display()
    );
}

/// L2's initramfs for this scenario: the cached base plus an archive with `/scenario.sh` and
/// the guest tools it asked for.
fn write_l2_initramfs(scenario: &Scenario, prepared: &Prepared, dest: &Path) {
    let mut out = BufWriter::new(File::create(dest).expect("create L2 initramfs"));
    let mut base =
        File::open(prepared.guest.join("l2/initramfs.cpio")).expect("open L2 base initramfs");
    std::io::copy(&mut base, &mut out).expect("copy L2 base initramfs");
    let script = format!(
        "# generated by the e2e harness: scenario {}\n. /etc/warden-helpers.sh\nset -e\n{}\n",
        scenario.name, scenario.guest_script
    );
    let mut archive = cpio::Writer::new(out);
    archive
        .file("scenario.sh", 0o755, script.as_bytes())
        .expect("write L2 scenario archive");
    for tool in &scenario.guest_tools {
        assert!(
            GUEST_TOOLS.contains(&tool.as_str()),
            "guest tool {tool} is not in GUEST_TOOLS"
        );
        archive
            .file_from(&format!("bin/{tool}"), 0o755, &prepared.binary(tool))
            .expect("write a guest tool");
    }
    archive.finish().expect("finish L2 initramfs");
}

/// L1's initramfs for this scenario: the cached base plus `/e2e/` with the host scripts,
/// warden, L2's kernel and initramfs.
fn write_l1_initramfs(
    scenario: &Scenario,
    prepared: &Prepared,
    kernel: &Path,
    l2_initramfs: &Path,
    disk_device: Option<&str>,
    dest: &Path,
) {
    let vmm = prepared.vmm(scenario);
    // Under its own name, so the host scripts can find a peer VMM's process (`pidof`) too.
    let vmm_in_l1 = Path::new("e2e/vmm").join(vmm.file_name().expect("a VMM binary's name"));
    let files = HostFiles {
        warden: Path::new("/").join(&vmm_in_l1),
        api_client: "/e2e/api-client".into(),
        bin_dir: "/e2e/bin".into(),
        kernel: "/e2e/kernel".into(),
        initramfs: "/e2e/initramfs".into(),
        disk_device: disk_device.map(str::to_string),
        nested: true,
    };
    let scripts = host_scripts(scenario, &files);
    let result = (|| -> std::io::Result<()> {
        let mut out = BufWriter::new(File::create(dest)?);
        std::io::copy(
            &mut File::open(prepared.guest.join("l1/initramfs.cpio"))?,
            &mut out,
        )?;
        let mut archive = cpio::Writer::new(out);
        archive.dir("e2e")?;
        archive.dir("e2e/vmm")?;
        archive.dir("e2e/bin")?;
        for tool in HOST_TOOLS {
            archive.file_from(&format!("e2e/bin/{tool}"), 0o755, &prepared.binary(tool))?;
        }
        for binary in &scenario.host_binaries {
            archive.file_from(&format!("e2e/bin/{}", binary_name(binary)), 0o755, binary)?;
        }
        for (name, text) in &scripts {
            archive.file(&format!("e2e/{name}"), 0o755, text.as_bytes())?;
        }
        archive.file_from(&vmm_in_l1.display().to_string(), 0o755, &vmm)?;
        archive.file_from("e2e/api-client", 0o755, &prepared.binary("api-client"))?;
        archive.file_from("e2e/kernel", 0o644, kernel)?;
        archive.file_from("e2e/initramfs", 0o644, l2_initramfs)?;
        archive.finish()?;
        Ok(())
    })();
    result.unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
}

/// The files warden gets, as paths on the KVM host.
struct HostFiles {
    /// warden, or the scenario's [`Scenario::vmm`].
    warden: PathBuf,
    api_client: PathBuf,
    /// Where the scenario's [`Scenario::host_binary`]s are: first on the scripts' `PATH`.
    bin_dir: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    /// The block device that holds the [`Scenario::host_disk`] in L1 (nested mode), which
    /// `host-disk` in the scratch directory is to link to.
    disk_device: Option<String>,
    /// The scripts run in the nested KVM host (L1), not on this machine.
    nested: bool,
}

fn write_host_scripts(scenario: &Scenario, files: &HostFiles, dir: &Path) {
    for (name, text) in host_scripts(scenario, files) {
        fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("cannot write {name}: {e}"));
    }
}

/// The KVM host's scripts: `host.sh` (run in the scratch directory, by L1's /init in nested
/// mode) runs `setup.sh`, warden and `check.sh`, and prints the markers [`Outcome`] parses.
fn host_scripts(scenario: &Scenario, files: &HostFiles) -> [(&'static str, String); 3] {
    let mut args = Vec::new();
    let given = |flag: &str| {
        scenario
            .warden_args
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    if scenario.default_args {
        for (flag, value) in [
            ("--kernel", files.kernel.display().to_string()),
            ("--initramfs", files.initramfs.display().to_string()),
            (
                "--cmdline",
                if scenario.distro {
                    distro::DISTRO_CMDLINE
                } else {
                    DEFAULT_CMDLINE
                }
                .to_string(),
            ),
            ("--serial", "tty".to_string()),
        ] {
            if !given(flag) {
                args.push(flag.to_string());
                args.push(value);
            }
        }
    }
    let launched = scenario.launcher.is_some();
    if scenario.vmm.is_none() && !scenario.reboots && !launched && !given("--no-reboot") {
        args.push("--no-reboot".to_string());
    }
    // Checking the seccomp lists against a new path: the kernel logs what a list lacks.
    let seccomp_log = std::env::var("WARDEN_E2E_SECCOMP").is_ok_and(|mode| mode == "log");
    if seccomp_log && !launched && !given("--seccomp") {
        args.extend(["--seccomp".to_string(), "log".to_string()]);
    }
    args.extend(scenario.warden_args.iter().cloned());
    let args: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    // The kernel prints audit records through printk, whose rate limit would drop most.
    let (seccomp_setup, seccomp_report) = if seccomp_log {
        (
            "echo 0 > /proc/sys/kernel/printk_ratelimit\n",
            "dmesg | grep 'type=1326' | sed 's/^/SECCOMP-LOGGED /'\n",
        )
    } else {
        ("", "")
    };

    // With the terminal, markers would land on the user's screen: they go nowhere, and
    // host.sh's exit status is warden's. In direct mode coreutils' timeout must then leave
    // warden in the foreground to read the terminal (busybox's, in L1, has no such option).
    let (mark, foreground) = match (scenario.terminal, &files.disk_device) {
        (false, _) => (">&1", ""),
        (true, None) => (">/dev/null", "--foreground "),
        (true, Some(_)) => (">/dev/null", ""),
    };
    let link_disk = files.disk_device.as_ref().map_or(String::new(), |dev| {
        format!(
            r#"# The host disk's driver probes asynchronously.
n=100
while [ ! -b {dev} ] && [ $n -gt 0 ]; do sleep 0.1; n=$((n - 1)); done
ln -sf {dev} host-disk
"#,
            dev = shell_quote(dev)
        )
    });
    let one_cpu = if files.nested && scenario.one_l1_cpu {
        "# Everything from here on, warden included, on L1's CPU 0 (Scenario::on_every_l1_cpu).\n\
         taskset -p 1 $$ >/dev/null\n"
    } else {
        ""
    };
    let host = format!(
        r#"# generated by the e2e harness: scenario {name}
export WARDEN={warden} L2_KERNEL={kernel} L2_INITRAMFS={initramfs} API_CLIENT={api_client}
export PATH={bin_dir}:"$PATH"
mark() {{ echo "$@" {mark}; }}
{one_cpu}{link_disk}mark WARDEN-HOST-SETUP
sh -e ./setup.sh
rc=$?
mark "WARDEN-HOST-SETUP-EXIT=$rc"
[ "$rc" -eq 0 ] || exit 0
mark WARDEN-START
{seccomp_setup}timeout {foreground}{timeout} {launcher}"$WARDEN" {args}
warden_rc=$?
# The guest's last line may lack a newline.
mark ""
mark "WARDEN-EXIT=$warden_rc"
{seccomp_report}mark WARDEN-HOST-CHECK
sh -e ./check.sh
rc=$?
mark ""
mark "WARDEN-HOST-CHECK-EXIT=$rc"
{exit}
"#,
        name = scenario.name,
        warden = shell_quote(&files.warden.display().to_string()),
        api_client = shell_quote(&files.api_client.display().to_string()),
        bin_dir = shell_quote(&files.bin_dir.display().to_string()),
        kernel = shell_quote(&files.kernel.display().to_string()),
        initramfs = shell_quote(&files.initramfs.display().to_string()),
        timeout = secs(scenario.timeout),
        args = args.join(" "),
        launcher = scenario
            .launcher
            .as_deref()
            .map_or(String::new(), |tool| format!("{tool} ")),
        exit = if scenario.terminal {
            "exit $warden_rc"
        } else {
            ""
        },
    );
    [
        ("host.sh", host),
        ("setup.sh", format!("{}\n", scenario.host_setup)),
        ("check.sh", format!("{}\n", scenario.host_check)),
    ]
}

/// Runs `cmd` with stdout and stderr going to `dir/console.log` (readable live with `tail -f`),
/// or on this process's terminal with `terminal`, and returns its exit status and whether
/// `timeout` (status 124) killed it.
fn run_logged(mut cmd: Command, dir: &Path, terminal: bool) -> (i32, bool) {
    if terminal {
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let code = status.code().unwrap_or(-1);
        return (code, code == 124 || code == 137);
    }
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("console.log"))
        .expect("open console.log");
    let status = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup console.log"))
        .stderr(log)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let code = status.code().unwrap_or(-1);
    (code, code == 124 || code == 137)
}

fn secs(d: Duration) -> String {
    d.as_secs().max(1).to_string()
}

/// Quotes `s` as one word for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(console: &str) -> Outcome {
        Outcome {
            mode: Mode::Direct,
            console: console.to_string(),
            warden_exit: None,
            timed_out: false,
            run_dir: PathBuf::new(),
            elapsed: Duration::ZERO,
            retried: false,
            host_disk: None,
            distro_root_offset: None,
        }
    }

    #[test]
    fn only_a_crash_of_the_kvm_host_is_retried() {
        let nested = |console: &str, warden_exit: Option<i32>| Outcome {
            mode: Mode::Nested,
            warden_exit,
            ..outcome(console)
        };
        let l1_oops = "[ 1.28] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n";
        assert!(host_kernel_died(&nested(l1_oops, None)));
        assert!(host_kernel_died(&nested(
            "Kernel panic - not syncing: x\n",
            None
        )));
        // The guest's panic: warden saw it and exited 1, a real failure.
        assert!(!host_kernel_died(&nested(
            "WARDEN-START\nKernel panic - not syncing: x\nWARDEN-EXIT=1\n",
            Some(1)
        )));
        assert!(!host_kernel_died(&nested("boot\n", None)));
        // L1 died in the host check, after warden had exited cleanly.
        assert!(host_kernel_died(&nested(
            "WARDEN-START\nguest\nWARDEN-EXIT=0\nWARDEN-HOST-CHECK\n[ 12.3] Oops: int3\n",
            Some(0)
        )));
        assert!(!host_kernel_died(&Outcome {
            timed_out: true,
            ..nested(l1_oops, None)
        }));
        assert!(!host_kernel_died(&outcome(l1_oops)));
    }

    #[test]
    fn a_nested_guest_triple_fault_is_retried_a_guest_panic_and_a_direct_run_are_not() {
        let nested = |console: &str| Outcome {
            mode: Mode::Nested,
            warden_exit: Some(1),
            ..outcome(console)
        };
        let triple = format!("WARDEN-START\nwarden: {TRIPLE_FAULT}: it rebooted\nWARDEN-EXIT=1\n");
        assert!(nested_host_flake(&nested(&triple)).is_some());
        // A second boot in the host check that triple-faults counts too.
        let in_check = format!("WARDEN-EXIT=0\nWARDEN-HOST-CHECK\nwarden: {TRIPLE_FAULT}: x\n");
        assert!(nested_host_flake(&nested(&in_check)).is_some());
        let reset = "warden: the guest asked for a reset (system reset): it rebooted\n";
        assert!(nested_host_flake(&nested(reset)).is_none());
        assert!(
            nested_host_flake(&outcome(&triple)).is_none(),
            "direct mode"
        );
        assert!(nested_host_flake(&Outcome {
            timed_out: true,
            ..nested(&triple)
        })
        .is_none());
    }

    #[test]
    fn markers_and_sections_are_parsed() {
        let o = outcome(
            "boot\nWARDEN-START\nguest line\n[ 1.0] WARDEN-L2-SCRIPT-EXIT=3\n\
             WARDEN-EXIT=0\nWARDEN-HOST-CHECK\nchecked\nWARDEN-HOST-CHECK-EXIT=0\n",
        );
        assert_eq!(
            o.guest_output(),
            "guest line\n[ 1.0] WARDEN-L2-SCRIPT-EXIT=3"
        );
        assert_eq!(o.host_check_output(), "checked");
        assert_eq!(o.guest_script_exit(), Some(3));
        assert_eq!(o.marker("WARDEN-EXIT"), Some("0"));
        assert_eq!(o.marker("MISSING"), None);
    }

    #[test]
    fn default_args_are_added_unless_given() {
        let files = HostFiles {
            warden: "/w".into(),
            api_client: "/a".into(),
            bin_dir: "/b".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            disk_device: None,
            nested: false,
        };
        let s = Scenario::new("t").warden_args(["--cmdline=x y", "--cpus", "2"]);
        let [(_, host), ..] = host_scripts(&s, &files);
        assert!(host.contains(
            r#""$WARDEN" '--kernel' '/k' '--initramfs' '/i' '--serial' 'tty' '--no-reboot' '--cmdline=x y' '--cpus' '2'"#
        ));
        let s = Scenario::new("t")
            .warden_args(["--version"])
            .without_default_args();
        let [(_, host), ..] = host_scripts(&s, &files);
        assert!(host.contains(r#""$WARDEN" '--no-reboot' '--version'"#));
        let s = Scenario::new("t").reboots().without_default_args();
        let [(_, host), ..] = host_scripts(&s, &files);
        assert!(!host.contains("--no-reboot"), "{host}");
        let s = Scenario::new("t")
            .vmm(Path::new("/peer"))
            .without_default_args();
        let [(_, host), ..] = host_scripts(&s, &files);
        assert!(
            !host.contains("--no-reboot"),
            "a peer has no such option: {host}"
        );
    }

    #[test]
    fn nested_hosts_confine_warden_to_one_cpu_unless_told() {
        let files = |nested| HostFiles {
            warden: "/w".into(),
            api_client: "/a".into(),
            bin_dir: "/b".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            disk_device: None,
            nested,
        };
        let pin = "taskset -p 1 $$";
        let host = |s: &Scenario, nested| host_scripts(s, &files(nested))[0].1.clone();
        let default = Scenario::new("t");
        let pinned = host(&default, true);
        assert!(pinned.contains(pin), "{pinned}");
        assert!(
            pinned.find(pin) < pinned.find("sh -e ./setup.sh"),
            "before anything starts"
        );
        assert!(!host(&default, false).contains(pin), "direct runs never");
        assert!(!host(&Scenario::new("t").on_every_l1_cpu(), true).contains(pin));
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
