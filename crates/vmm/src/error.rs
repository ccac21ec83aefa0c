//! Why building or running a VM failed.

use std::io;

use crate::boot::BootError;
use crate::memory::MemoryError;
use crate::vcpu::VcpuError;

/// Sorted by where they arise; [`VmmError::is_user_error`] tells the ones the user fixes.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("--api-socket: {0}")]
    Api(String),
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A configuration the VM cannot be built from.
    #[error("{0}")]
    Config(String),
    #[error("device setup: {0}")]
    Device(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// A lifecycle call in a state that does not allow it (Cloud Hypervisor's wording).
    #[error("{0}")]
    Lifecycle(&'static str),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A tap that cannot be used as asked: the host lacks the tun driver or the permission,
    /// or the name is taken.
    #[error("net: {0}")]
    Net(#[from] net_util::TapError),
    #[error("cannot open /dev/kvm: {0}; warden needs KVM (load kvm_intel or kvm_amd, and run as a user who may open /dev/kvm)")]
    NoKvm(kvm_ioctls::Error),
    #[error("--seccomp: {0}; run with --seccomp false on a host without seccomp filters")]
    Seccomp(#[from] sandbox::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Vfio(#[from] vfio::OpenError),
}

impl VmmError {
    /// Errors the user can fix by changing the configuration or preparing the host.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            VmmError::Api(_)
                | VmmError::Boot(_)
                | VmmError::Config(_)
                | VmmError::Memory(_)
                | VmmError::Net(_)
                | VmmError::NoKvm(_)
                | VmmError::Vfio(_)
        )
    }
}

/// Turns a KVM call's error into a [`VmmError`] saying what was being done.
pub(crate) fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}
