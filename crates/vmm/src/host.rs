//! What every VM of this process is built with: the host's KVM, the seccomp filters, where
//! guests report and events go, and what the VMM holds for the configuration across its VMs
//! (taps passed as descriptors, pseudo-terminals).

use std::sync::mpsc::Sender;
use std::sync::Arc;

use kvm_ioctls::Kvm;
use sandbox::Filters;

use crate::events::VmmEvent;
use crate::monitor::{self, EventMonitor};
use crate::pty::Ptys;
use crate::taps::PassedTaps;
use crate::terminal::SerialInput;

/// What every VM of this process is built with.
pub(crate) struct Host {
    pub(crate) kvm: Kvm,
    /// `KVM_CAP_TSC_DEADLINE_TIMER`, asked once before the VMM thread's filter (which does
    /// not allow `KVM_CHECK_EXTENSION`) is installed.
    pub(crate) tsc_deadline_timer: bool,
    pub(crate) filters: Option<Arc<Filters>>,
    /// Where the VMs' guests report how they stopped.
    pub(crate) events: Sender<VmmEvent>,
    /// An API to plug devices in and out through: the hotplug slots and their thread.
    pub(crate) hotplug: bool,
    pub(crate) serial_input: SerialInput,
    pub(crate) pid: i32,
    /// Where the VMM's and the VM's events go (`--event-monitor`).
    pub(crate) monitor: Option<Arc<EventMonitor>>,
    /// The taps clients passed for nets of the configuration.
    pub(crate) taps: PassedTaps,
    /// The configuration's pseudo-terminals.
    pub(crate) ptys: Ptys,
}

impl Host {
    pub(crate) fn emit(&self, source: &str, event: &str) {
        monitor::emit(self.monitor.as_deref(), source, event, &[]);
    }
}
