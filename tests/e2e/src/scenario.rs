//! What one end-to-end test asks for (see the crate's documentation for the order its parts
//! run in), built up call by call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{run, Kernel, Outcome, HOST_TOOLS};

/// One end-to-end test: host setup, warden's arguments, guest script, host check.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub(crate) name: String,
    pub(crate) host_setup: String,
    pub(crate) warden_args: Vec<String>,
    pub(crate) default_args: bool,
    pub(crate) guest_script: String,
    pub(crate) host_check: String,
    pub(crate) timeout: Duration,
    pub(crate) kernel: Kernel,
    pub(crate) qemu_setup: String,
    pub(crate) l1_qemu_args: Vec<String>,
    pub(crate) l1_cmdline: String,
    pub(crate) guest_tools: Vec<String>,
    pub(crate) host_disk: Option<PathBuf>,
    pub(crate) distro: bool,
    pub(crate) terminal: bool,
    pub(crate) vmm: Option<PathBuf>,
    pub(crate) one_l1_cpu: bool,
    pub(crate) host_binaries: Vec<PathBuf>,
    pub(crate) reboots: bool,
    pub(crate) launcher: Option<String>,
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
