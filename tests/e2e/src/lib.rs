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
//! Host scripts run in a scratch directory, so relative paths (`disk.img`) work in both
//! the scripts and `warden_args`; `$WARDEN`, `$L2_KERNEL` and `$L2_INITRAMFS` name the files
//! warden gets. Everything printed (the host's console, warden's serial output, so the guest's
//! console) lands in [`Outcome::console`] and in `console.log` in the scratch directory,
//! `<target dir>/e2e-runs/<scenario name>/`, which is kept for post-mortems.
//!
//! Where the KVM host is depends on the machine (see [`Mode`]): the machine itself when it
//! has hardware KVM, else a Linux booted under QEMU's software CPU (TCG), which emulates an AMD
//! CPU with SVM and so offers a real nested `/dev/kvm`. The guest images come from
//! `guest/build.sh` (Debian packages, cached outside the clone); warden is built as a static
//! binary so that it runs in that minimal L1.

mod cpio;

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
        }
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
}

impl Prepared {
    fn binary(&self, name: &str) -> PathBuf {
        self.warden.join(name)
    }
}

/// This crate's binaries that guest scripts may ask for ([`Scenario::guest_tool`]).
const GUEST_TOOLS: [&str; 1] = ["vfio-map"];

/// Serializes runs: tests in a crate run on parallel threads, and one QEMU already wants
/// both cores of a small CI machine (and a nested guest is too slow to share them).
static STATE: Mutex<Option<Prepared>> = Mutex::new(None);

/// Runs `scenario` and returns what happened, or `None` when this machine can run no KVM
/// guest at all (the reason is printed on stderr: the test should just return).
///
/// Panics if the guest images or warden can't be built, or the run can't be started: a
/// broken harness must not look like a passing test.
pub fn run(scenario: &Scenario) -> Option<Outcome> {
    let nested_only = !scenario.l1_qemu_args.is_empty();
    let mode = match detect_mode() {
        Some(Mode::Direct) if nested_only && in_path("qemu-system-x86_64") => Some(Mode::Nested),
        Some(Mode::Direct) if nested_only => {
            eprintln!(
                "E2E SKIPPED: scenario '{}' gives the nested KVM host devices of its own and needs qemu-system-x86_64 (Debian package qemu-system-x86)",
                scenario.name
            );
            return None;
        }
        mode => mode,
    };
    let Some(mode) = mode else {
        eprintln!(
            "E2E SKIPPED: neither real KVM (/dev/kvm with VMX/SVM) nor qemu-system-x86_64 \
             (Debian package qemu-system-x86) is available: scenario '{}' did not run",
            scenario.name
        );
        return None;
    };
    let mut state = STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if state.is_none() {
        *state = Some(Prepared {
            guest: build_guest_images(),
            warden: build_static_binaries(),
        });
    }
    let prepared = state.as_ref().expect("prepared above");
    let _machine = MachineLock::acquire();

    let mut outcome = run_once(scenario, mode, prepared);
    if host_kernel_died(&outcome) {
        eprintln!(
            "E2E RETRY: scenario '{}': the nested KVM host's own kernel died under TCG (a known \
             QEMU TCG flake, not the guest's or warden's doing); running it once more",
            scenario.name
        );
        outcome = run_once(scenario, mode, prepared);
        outcome.retried = true;
    }
    Some(outcome)
}

/// Serializes runs across processes too (two test binaries, a benchmark and a test, two
/// checkouts): an exclusive `flock` on a file in the system's temporary directory, held for
/// the whole run and released when dropped (or when the process dies).
struct MachineLock {
    _file: File,
}

impl MachineLock {
    fn acquire() -> Self {
        use std::os::fd::AsRawFd;
        let path = std::env::temp_dir().join("warden-e2e.lock");
        let file = File::create(&path)
            .unwrap_or_else(|e| panic!("cannot create the run lock {}: {e}", path.display()));
        // SAFETY: flock on a descriptor this function owns.
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            let err = std::io::Error::last_os_error();
            assert!(
                err.kind() == std::io::ErrorKind::Interrupted,
                "cannot lock {}: {err}",
                path.display()
            );
        }
        MachineLock { _file: file }
    }
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
    let l2_initramfs = run_dir.join("l2-initramfs.cpio");
    write_l2_initramfs(scenario, prepared, &l2_initramfs);
    let kernel = prepared.guest.join("l2").join(match scenario.kernel {
        Kernel::BzImage => "vmlinuz",
        Kernel::Elf => "vmlinux",
    });

    let start = Instant::now();
    let (status, timed_out) = match mode {
        Mode::Direct => {
            let files = HostFiles {
                warden: prepared.warden.clone(),
                kernel,
                initramfs: l2_initramfs,
            };
            write_host_scripts(scenario, &files, &run_dir);
            let mut cmd = Command::new("timeout");
            cmd.arg("--kill-after=10")
                .arg(secs(scenario.timeout + DIRECT_OVERHEAD))
                .args(["sh", "host.sh"])
                .current_dir(&run_dir);
            run_logged(cmd, &run_dir)
        }
        Mode::Nested => {
            let l1_initramfs = run_dir.join("l1-initramfs.cpio");
            write_l1_initramfs(scenario, prepared, &kernel, &l2_initramfs, &l1_initramfs);
            run_qemu_setup(scenario, &run_dir);
            let mut cmd = Command::new("nice");
            // QEMU's exit status when L1 powers off is 0, whatever the scenario did.
            cmd.args(["-n", "10", "timeout", "--kill-after=10"])
                .arg(secs(scenario.timeout + L1_OVERHEAD))
                .arg("qemu-system-x86_64")
                .args(["-machine", "q35", "-accel", "tcg,thread=multi"])
                .args(["-cpu", "qemu64,+svm,+npt", "-m", "2G", "-smp", "2"])
                .args(["-nographic", "-no-reboot"])
                .args(&scenario.l1_qemu_args)
                .arg("-kernel")
                .arg(prepared.guest.join("l1/vmlinuz"))
                .arg("-initrd")
                .arg(&l1_initramfs)
                .arg("-append")
                .arg(format!("console=ttyS0 panic=-1 {}", scenario.l1_cmdline).trim_end())
                .current_dir(&run_dir);
            run_logged(cmd, &run_dir)
        }
    };
    let elapsed = start.elapsed();
    let console = fs::read(run_dir.join("console.log")).expect("read console.log");
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
    };
    outcome.warden_exit = outcome.marker("WARDEN-EXIT").and_then(|v| v.parse().ok());
    if !timed_out && status != 0 {
        panic!("the KVM host exited with status {status}\n{outcome}");
    }
    outcome
}

/// Picks where warden runs; `WARDEN_E2E_MODE=direct|nested|skip` overrides the detection
/// (e.g. to try the nested setup on a machine with hardware KVM).
fn detect_mode() -> Option<Mode> {
    match std::env::var("WARDEN_E2E_MODE").as_deref() {
        Ok("direct") => return Some(Mode::Direct),
        Ok("nested") => return Some(Mode::Nested),
        Ok("skip") => return None,
        Ok(other) => panic!("WARDEN_E2E_MODE={other}: expected direct, nested or skip"),
        Err(_) => {}
    }
    if has_hardware_kvm() {
        Some(Mode::Direct)
    } else if in_path("qemu-system-x86_64") {
        Some(Mode::Nested)
    } else {
        None
    }
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

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn workspace_root() -> PathBuf {
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
    let script = workspace_root().join("guest/build.sh");
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
    let dir = String::from_utf8(out.stdout).expect("guest/build.sh printed a non-UTF-8 path");
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
    for tool in GUEST_TOOLS {
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
    dest: &Path,
) {
    let files = HostFiles {
        warden: "/e2e/warden".into(),
        kernel: "/e2e/kernel".into(),
        initramfs: "/e2e/initramfs".into(),
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
        for (name, text) in &scripts {
            archive.file(&format!("e2e/{name}"), 0o755, text.as_bytes())?;
        }
        archive.file_from("e2e/warden", 0o755, &prepared.binary("warden"))?;
        archive.file_from("e2e/kernel", 0o644, kernel)?;
        archive.file_from("e2e/initramfs", 0o644, l2_initramfs)?;
        archive.finish()?;
        Ok(())
    })();
    result.unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
}

/// The files warden gets, as paths on the KVM host.
struct HostFiles {
    warden: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
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
            ("--cmdline", DEFAULT_CMDLINE.to_string()),
            ("--serial", "tty".to_string()),
        ] {
            if !given(flag) {
                args.push(flag.to_string());
                args.push(value);
            }
        }
    }
    // Checking the seccomp lists against a new path: the kernel logs what a list lacks.
    let seccomp_log = std::env::var("WARDEN_E2E_SECCOMP").is_ok_and(|mode| mode == "log");
    if seccomp_log && !given("--seccomp") {
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

    let host = format!(
        r#"# generated by the e2e harness: scenario {name}
export WARDEN={warden} L2_KERNEL={kernel} L2_INITRAMFS={initramfs}
echo WARDEN-HOST-SETUP
sh -e ./setup.sh
rc=$?
echo "WARDEN-HOST-SETUP-EXIT=$rc"
[ "$rc" -eq 0 ] || exit 0
echo WARDEN-START
{seccomp_setup}timeout {timeout} "$WARDEN" {args}
rc=$?
# The guest's last line may lack a newline.
printf '\nWARDEN-EXIT=%d\n' "$rc"
{seccomp_report}echo WARDEN-HOST-CHECK
sh -e ./check.sh
printf '\nWARDEN-HOST-CHECK-EXIT=%d\n' "$?"
"#,
        name = scenario.name,
        warden = shell_quote(&files.warden.display().to_string()),
        kernel = shell_quote(&files.kernel.display().to_string()),
        initramfs = shell_quote(&files.initramfs.display().to_string()),
        timeout = secs(scenario.timeout),
        args = args.join(" "),
    );
    [
        ("host.sh", host),
        ("setup.sh", format!("{}\n", scenario.host_setup)),
        ("check.sh", format!("{}\n", scenario.host_check)),
    ]
}

/// Runs `cmd` with stdout and stderr going to `dir/console.log` (readable live with `tail -f`)
/// and returns its exit status and whether `timeout` (status 124) killed it.
fn run_logged(mut cmd: Command, dir: &Path) -> (i32, bool) {
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
            kernel: "/k".into(),
            initramfs: "/i".into(),
        };
        let s = Scenario::new("t").warden_args(["--cmdline=x y", "--cpus", "2"]);
        let [(_, host), ..] = host_scripts(&s, &files);
        assert!(host.contains(
            r#""$WARDEN" '--kernel' '/k' '--initramfs' '/i' '--serial' 'tty' '--cmdline=x y' '--cpus' '2'"#
        ));
        let s = Scenario::new("t")
            .warden_args(["--version"])
            .without_default_args();
        let [(_, host), ..] = host_scripts(&s, &files);
        assert!(host.contains(r#""$WARDEN" '--version'"#));
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
