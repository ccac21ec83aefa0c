//! What the VMM thread waits for: the API's requests, and how a VM's guest stopped.

use std::sync::mpsc::Sender;

use api::{ApiError, Request, Response};

/// Why the guest stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// ACPI S5 (`poweroff`): the normal end of a run.
    Poweroff,
    /// The guest asked for a reset (`reboot`, `panic=N`, a triple fault): the VM is built
    /// again from its configuration.
    Reset(&'static str),
    /// A vCPU stopped in a way the guest did not ask for.
    Crash(String),
}

/// One thing for the VMM thread to act on.
pub(crate) enum VmmEvent {
    /// A request from the API thread, and where the answer goes (the VMM thread may hand it
    /// on: a hotplug request is answered by the hotplug thread).
    Api {
        request: Box<Request>,
        reply: Sender<Result<Response, ApiError>>,
    },
    /// The answer to `vmm.shutdown` is in the client's socket: the VMM may end.
    VmmShutdownAnswered,
    /// The process got SIGTERM or SIGINT (its number): the VMM ends.
    Terminate(i32),
    /// The guest of VM number `vm` stopped.
    Guest { vm: u64, exit: GuestExit },
}

/// Where a VM's vCPUs and devices report how the guest stopped: the VMM thread's events,
/// tagged with the VM's number, so that a report that comes late about a VM already gone (a
/// second vCPU's, a reset racing a shutdown) is told apart and ignored.
#[derive(Clone)]
pub struct ExitNotice {
    vm: u64,
    events: Sender<VmmEvent>,
}

impl ExitNotice {
    pub(crate) fn new(vm: u64, events: Sender<VmmEvent>) -> Self {
        ExitNotice { vm, events }
    }

    pub fn send(&self, exit: GuestExit) {
        // The VMM thread is gone only when the process ends.
        let _ = self.events.send(VmmEvent::Guest { vm: self.vm, exit });
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use std::sync::mpsc::{channel, Receiver};

    use super::*;

    /// A notice for VM 0 and the guest exits it reports.
    pub(crate) fn notice() -> (ExitNotice, impl Fn() -> Option<GuestExit>) {
        let (tx, rx): (Sender<VmmEvent>, Receiver<VmmEvent>) = channel();
        let next = move || match rx.try_recv() {
            Ok(VmmEvent::Guest { exit, .. }) => Some(exit),
            _ => None,
        };
        (ExitNotice::new(0, tx), next)
    }
}
