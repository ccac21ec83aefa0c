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
mod outcome;
pub mod packages;
mod scenario;
pub mod virtiofsd;
pub mod vsock;
pub mod wire;

pub use distro::DistroImage;
pub use outcome::Outcome;
pub use scenario::Scenario;

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
    use crate::outcome::tests::outcome;

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
