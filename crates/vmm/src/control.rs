//! The API (`--api-socket`): its socket, its thread, and how its requests reach the VMM.

use std::collections::BTreeMap;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

use api::{ApiError, Refusal, Request, Response};
use sandbox::{Filters, ThreadKind};
use vm_config::VmConfig;

use crate::error::VmmError;
use crate::events::VmmEvent;
use crate::options::ApiSocket;
use crate::plugged::{device_node, place};
use crate::threads;

/// The API's side of the VMM: hands each request to the VMM thread and waits for its answer
/// (bounded: a wedged VMM must not hold the API forever). `vmm.ping` and `vmm.shutdown` are
/// answered here, so a busy VMM (a boot in progress) still answers pings.
pub(crate) struct Control {
    events: Sender<VmmEvent>,
    /// Ours, read before confinement (the API thread may not ask for it).
    pid: u32,
}

impl Control {
    pub(crate) fn new(events: Sender<VmmEvent>, pid: u32) -> Self {
        Control { events, pid }
    }
}

/// How long the API waits for the VMM's answer: a lifecycle call may build a VM (guest RAM
/// to map, devices to open).
fn answer_timeout(request: &Request) -> Duration {
    match request {
        Request::Create(_)
        | Request::Boot
        | Request::Reboot
        | Request::Shutdown
        | Request::Delete => Duration::from_secs(120),
        _ => Duration::from_secs(30),
    }
}

impl api::Vmm for Control {
    fn handle(&self, request: Request) -> Result<Response, ApiError> {
        match request {
            Request::Ping => return Ok(Response::Ping(ping(self.pid as i32))),
            // Ended once answered (see `answered`).
            Request::VmmShutdown => return Ok(Response::Done),
            _ => {}
        }
        let wait = answer_timeout(&request);
        let (reply, answer) = channel();
        self.events
            .send(VmmEvent::Api {
                request: Box::new(request),
                reply,
            })
            .map_err(|_| ApiError::new(Refusal::Failed, "the VMM is gone"))?;
        answer
            .recv_timeout(wait)
            .map_err(|_| ApiError::new(Refusal::Failed, "the VMM did not answer"))?
    }

    fn answered(&self, request: &Request) {
        if *request == Request::VmmShutdown {
            let _ = self.events.send(VmmEvent::VmmShutdownAnswered);
        }
    }
}

/// Opens the API's listening socket before the guest starts, so a bad path is a usage error.
pub(crate) fn api_listener(socket: &ApiSocket) -> Result<UnixListener, VmmError> {
    match socket {
        ApiSocket::Path(path) => {
            // A socket left by an earlier run that nobody listens on is replaced.
            if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
                use std::os::unix::fs::FileTypeExt;
                if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(path);
                }
            }
            // Owner-only (0600): whoever can connect controls the VM. The socket file takes
            // its mode from the umask as bind creates it, so the umask is narrowed around the
            // bind (this runs first thing at start-up, on the only thread): never a moment with
            // the file open to others. A listening socket passed as fd= keeps the mode its
            // creator gave it.
            // SAFETY: umask only swaps the process's file mode mask.
            let umask = unsafe { libc::umask(0o177) };
            let bound = UnixListener::bind(path);
            // SAFETY: as above, restoring the mask found.
            unsafe { libc::umask(umask) };
            bound.map_err(|err| {
                VmmError::Api(format!(
                    "cannot listen on {}: {err}; give a path that does not exist yet in a writable directory",
                    path.display()
                ))
            })
        }
        ApiSocket::Fd(fd) => {
            // SAFETY: the command line checked that `fd` is an open socket, which warden owns
            // from here on.
            let listener = unsafe { UnixListener::from_raw_fd(*fd) };
            listener
                .local_addr()
                .map(|_| listener)
                .map_err(|err| VmmError::Api(format!("fd={fd} is not a Unix socket: {err}")))
        }
    }
}

/// Serves the API from a thread of its own, never a vCPU's: a slow client holds up nothing
/// but other clients, and only briefly (see `api::Limits`).
pub(crate) fn serve_api(
    listener: UnixListener,
    control: Control,
    filters: Option<Arc<Filters>>,
) -> Result<(), VmmError> {
    threads::spawn("api", ThreadKind::Api, filters, move || {
        let err = api::serve(listener, &control, &api::Limits::default());
        log::error!("--api-socket: the API stopped: {err}");
    })
    .map(drop)
}

/// A device on bus 0 as `vm.info` lists it.
pub struct DeviceEntry {
    pub id: String,
    pub segment: u16,
    pub device_number: u8,
}

/// `vm.info` of the machine `config` (validated and resolved) builds, with its devices.
pub fn vm_info(config: &VmConfig, devices: &[DeviceEntry]) -> api::VmInfo {
    let device_tree: BTreeMap<String, api::DeviceNode> = devices
        .iter()
        .map(|device| {
            let bdf = place(device.segment, device.device_number).to_string();
            (device.id.clone(), device_node(&device.id, bdf))
        })
        .collect();
    api::VmInfo {
        config: config.clone(),
        state: api::VmState::Running,
        memory_actual_size: config.memory.size,
        device_tree,
    }
}

/// `vmm.ping`'s answer.
pub(crate) fn ping(pid: i32) -> api::VmmPingResponse {
    api::VmmPingResponse {
        build_version: format!("warden {}", env!("CARGO_PKG_VERSION")),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: i64::from(pid),
        features: vec!["kvm".into(), "virtio-iommu".into(), "vfio".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whoever can connect to the API controls the VM: the socket is the owner's only,
    /// whatever the umask.
    #[test]
    fn the_api_socket_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("api.sock");
        // SAFETY: swaps the process's file mode mask; restored below.
        let umask = unsafe { libc::umask(0o002) };
        let listener = api_listener(&ApiSocket::Path(path.clone()));
        // SAFETY: as above.
        unsafe { libc::umask(umask) };
        let _listener = listener.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
}
