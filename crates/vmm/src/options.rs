//! How the VMM process runs, apart from the VM it builds (that is `vm_config::VmConfig`):
//! its sandbox and where it serves the API.

use std::path::PathBuf;

pub use crate::monitor::MonitorTarget;
pub use sandbox::Mode as SeccompMode;

/// The VMM's own settings.
#[derive(Clone, Debug)]
pub struct VmmOptions {
    /// What each thread's seccomp filter does with a system call outside its list.
    pub seccomp: SeccompMode,
    /// Where to serve Cloud Hypervisor's REST API, if anywhere.
    pub api_socket: Option<ApiSocket>,
    /// A guest's reset ends the VMM instead of booting the VM again (QEMU's `-no-reboot`).
    pub no_reboot: bool,
    /// Where to write Cloud Hypervisor's event stream, if anywhere.
    pub event_monitor: Option<MonitorTarget>,
}

/// The Unix socket of the API (`--api-socket`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiSocket {
    /// A path to bind (a stale socket nobody listens on is replaced).
    Path(PathBuf),
    /// A listening socket warden inherited.
    Fd(i32),
}
