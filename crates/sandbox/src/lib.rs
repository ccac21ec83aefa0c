//! seccomp-bpf for warden's threads: one allow-list per kind of thread, compiled once before
//! any thread is confined, installed by each thread on itself when it starts.
//!
//! With [`Mode::Enforce`] a system call outside the list raises SIGSYS, whose handler prints
//! one line naming the thread and the call (and an ioctl's request) and ends warden with
//! [`EXIT_SECCOMP`]. With [`Mode::Log`] the kernel logs the call (an audit record of type 1326)
//! and lets it run, which is how the lists are checked against a new code path.
//!
//! The lists are for x86_64 (system call numbers differ per architecture).

mod glibc;
mod lists;
mod sigsys;

use std::fmt;
use std::str::FromStr;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use sigsys::EXIT_SECCOMP;

/// The signal that kicks a vCPU thread out of `KVM_RUN` (`vm.pause`); the only one a list lets
/// a thread send.
pub fn vcpu_kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// What a filter does with a system call outside its list (`--seccomp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// `false`: no filter at all.
    Off,
    /// `true`: report the call and end warden.
    #[default]
    Enforce,
    /// `log`: the kernel logs the call, which then runs.
    Log,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "true" => Ok(Mode::Enforce),
            "false" => Ok(Mode::Off),
            "log" => Ok(Mode::Log),
            other => Err(format!("`{other}`: expected true, false or log")),
        }
    }
}

/// The kinds of thread warden runs, each with its own allow-list.
///
/// Passed-through (VFIO) devices have no thread: their register accesses are emulated on vCPU
/// threads and their DMA mappings follow IOMMU requests, served on vCPU threads and the IOMMU
/// request poller, so those two lists hold the VFIO ioctls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread once the guest runs: it waits for the guest to stop.
    Vmm,
    Vcpu,
    Block,
    Net,
    Rng,
    Console,
    /// The virtio-iommu's worker: event queue and fault reports.
    IommuEvents,
    /// The virtio-iommu's request queue poller.
    IommuPoller,
    /// virtio-vsock: its queues and the host programs' Unix sockets.
    Vsock,
    /// virtio-fs: relays its vhost-user back end's interrupts, serves the queues once the back
    /// end is gone.
    Fs,
    /// Takes the process's signals: SIGUSR1 prints statistics, SIGTERM and SIGINT end the VMM.
    Signals,
    /// Forwards the terminal's input, or a serial pty's, to the serial port.
    SerialInput,
    /// Serves the REST API on its Unix socket (`--api-socket`).
    Api,
    /// Plugs devices in and out for the API (`--api-socket`).
    Hotplug,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 14] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Rng,
        ThreadKind::Console,
        ThreadKind::IommuEvents,
        ThreadKind::IommuPoller,
        ThreadKind::Vsock,
        ThreadKind::Fs,
        ThreadKind::Signals,
        ThreadKind::SerialInput,
        ThreadKind::Api,
        ThreadKind::Hotplug,
    ];

    /// The kind's name in the SIGSYS report.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Block => "virtio-blk",
            ThreadKind::Net => "virtio-net",
            ThreadKind::Rng => "virtio-rng",
            ThreadKind::Console => "virtio-console",
            ThreadKind::IommuEvents => "virtio-iommu events",
            ThreadKind::IommuPoller => "virtio-iommu poller",
            ThreadKind::Vsock => "virtio-vsock",
            ThreadKind::Fs => "virtio-fs",
            ThreadKind::Signals => "signals",
            ThreadKind::SerialInput => "serial input",
            ThreadKind::Api => "api",
            ThreadKind::Hotplug => "hotplug",
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp filter for the {kind} thread: {source}")]
    Compile {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("cannot install the seccomp filter of the {kind} thread: {source}")]
    Install {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
}

/// The compiled filter of every thread kind.
pub struct Filters {
    programs: Vec<(ThreadKind, BpfProgram)>,
}

impl Filters {
    /// Compiles every kind's filter for `mode` (`None` for [`Mode::Off`]); with
    /// [`Mode::Enforce`], also installs the process's SIGSYS handler. Compiling allocates, so it
    /// is done here, before any thread is confined.
    pub fn new(mode: Mode) -> Result<Option<Filters>, Error> {
        let mismatch = match mode {
            Mode::Off => return Ok(None),
            Mode::Enforce => SeccompAction::Trap,
            Mode::Log => SeccompAction::Log,
        };
        let programs = ThreadKind::ALL
            .iter()
            .map(|&kind| {
                compile(kind, mismatch.clone())
                    .map(|program| (kind, program))
                    .map_err(|source| Error::Compile { kind, source })
            })
            .collect::<Result<_, _>>()?;
        if mode == Mode::Enforce {
            sigsys::install_handler().map_err(Error::Handler)?;
        }
        glibc::read_what_malloc_reads_once();
        Ok(Some(Filters { programs }))
    }

    /// Confines the calling thread to `kind`'s list, for the rest of its life. A thread that
    /// already has a filter keeps it: it may then only make calls both lists allow.
    pub fn install(&self, kind: ThreadKind) -> Result<(), Error> {
        let (_, program) = self
            .programs
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("every kind is compiled");
        sigsys::record_thread(kind);
        seccompiler::apply_filter(program).map_err(|source| Error::Install { kind, source })
    }
}

fn compile(
    kind: ThreadKind,
    mismatch: SeccompAction,
) -> Result<BpfProgram, seccompiler::BackendError> {
    let list = lists::allow_list(kind);
    // These arguments are ints to the kernel (an ioctl's request is an unsigned int, a prctl's
    // option, a socket's domain, a signal and an fcntl command an int): only their low 32 bits count, so only those are
    // compared.
    let one_of = |arg: u8, values: &std::collections::BTreeSet<lists::Value>| {
        values
            .iter()
            .map(|&(value, _)| {
                SeccompRule::new(vec![SeccompCondition::new(
                    arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    u64::from(value),
                )?])
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let ioctl_rules = one_of(1, &list.ioctls)?;
    let prctl_rules = one_of(0, &list.prctl_options)?;
    let socket_rules = one_of(0, &list.socket_domains)?;
    let tgkill_rules = one_of(2, &list.signals)?;
    let fcntl_rules = match &list.fcntl_commands {
        Some(commands) => one_of(1, commands)?,
        None => Vec::new(),
    };
    let rules = list
        .syscalls
        .iter()
        .map(|&(nr, _)| {
            let rules = match nr {
                libc::SYS_ioctl => ioctl_rules.clone(),
                libc::SYS_prctl => prctl_rules.clone(),
                libc::SYS_socket => socket_rules.clone(),
                libc::SYS_tgkill => tgkill_rules.clone(),
                libc::SYS_fcntl => fcntl_rules.clone(),
                _ => Vec::new(),
            };
            (nr, rules)
        })
        .collect();
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)?.try_into()
}

#[cfg(test)]
mod tests;
