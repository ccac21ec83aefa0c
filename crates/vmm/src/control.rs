//! The VMM's side of the API (`--api-socket`): what each request does to the running machine.

use std::collections::BTreeMap;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use api::{ApiError, Request, Response};
use kvm_ioctls::VmFd;
use sandbox::{Filters, ThreadKind};

use crate::builder::{confine, VmmError};
use crate::clock::PausedClock;
use vm_config::{DeviceConfig, DiskConfig, NetConfig, VmConfig};

use crate::hotplug::{HotplugRequest, EJECT_TIMEOUT};
use crate::legacy::{GuestExit, IrqfdTrigger, PowerButton};
use crate::options::ApiSocket;
use crate::pause::{PauseError, PauseGate};
use crate::plugged::{device_node, pci_bdf, SharedInfo};
use crate::stats::StatsReport;

/// Answers API requests for one running VM.
pub struct Control {
    /// `vm.info`: the hotplug thread keeps its list of hot-plugged devices (see
    /// `plugged.rs`), the API its state.
    pub(crate) info: SharedInfo,
    pub stats: Arc<StatsReport>,
    pub power_button: PowerButton<IrqfdTrigger>,
    /// Where the VMM thread waits for the reason the VM ends.
    pub exits: Sender<GuestExit>,
    /// The thread that plugs devices in and out.
    pub hotplug: Sender<HotplugRequest>,
    /// Where the vCPUs stop while the VM is paused.
    pub vcpus: Arc<PauseGate>,
    /// The guest's clock, held still while the VM is paused.
    pub clock: PausedClock<VmFd>,
    /// Ours, read before confinement (the API thread may not ask for it).
    pub pid: u32,
}

impl api::Vmm for Control {
    fn handle(&self, request: Request) -> Result<Response, ApiError> {
        match request {
            Request::Ping => Ok(Response::Ping(api::VmmPingResponse {
                build_version: format!("warden {}", env!("CARGO_PKG_VERSION")),
                version: env!("CARGO_PKG_VERSION").into(),
                pid: i64::from(self.pid),
                features: vec!["kvm".into(), "virtio-iommu".into(), "vfio".into()],
            })),
            Request::Info => Ok(Response::Info(Box::new(vm_device::lock(&self.info).clone()))),
            Request::Counters => Ok(Response::Counters(self.stats.counters())),
            Request::PowerButton => self
                .power_button
                .press()
                .map(|()| Response::Done)
                .map_err(|err| ApiError::new(500, format!("cannot raise the power button's interrupt: {err}"))),
            // Done once answered (see `answered`).
            Request::Shutdown | Request::VmmShutdown => Ok(Response::Done),
            Request::Pause => self.pause().map(|()| Response::Done),
            Request::Resume => self.resume().map(|()| Response::Done),
            Request::Reboot => Err(ApiError::not_supported(
                "warden does not restart guests (a guest reset ends it); use vm.power-button or vm.shutdown",
            )),
            Request::AddDisk(disk) => self.add_disk(disk).map(Response::Added),
            Request::RemoveDevice(remove) => self
                .remove_device(remove.id.unwrap_or_default())
                .map(|()| Response::Done),
            Request::AddNet(net) => self.add_net(net).map(Response::Added),
            Request::AddDevice(device) => self.add_device(device).map(Response::Added),
        }
    }

    fn answered(&self, request: &Request) {
        let why = match request {
            Request::Shutdown => "vm.shutdown",
            Request::VmmShutdown => "vmm.shutdown",
            _ => return,
        };
        let _ = self.exits.send(GuestExit::Shutdown(why));
    }
}

/// How long a pause waits for every vCPU to leave the guest (one emulating a slow exit, a
/// VFIO mapping say, gets there when it is done).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The answer to a refused pause or resume: 405 when the VM is not in the state for it (as
/// Cloud Hypervisor's description has it), 500 when the vCPUs could not be stopped.
fn pause_refusal(err: PauseError) -> ApiError {
    match err {
        PauseError::AlreadyPaused | PauseError::NotPaused => ApiError::wrong_state(err.to_string()),
        PauseError::Kick { .. } | PauseError::Timeout { .. } => ApiError::new(500, err.to_string()),
    }
}

/// How long the API waits for the hotplug thread beyond what the guest is given.
const HOTPLUG_MARGIN: Duration = Duration::from_secs(10);

impl Control {
    /// Asks the hotplug thread and waits for its answer (a bounded time: a wedged thread must
    /// not hold the API forever).
    fn ask<T>(
        &self,
        request: impl FnOnce(Sender<Result<T, ApiError>>) -> HotplugRequest,
        wait: Duration,
    ) -> Result<T, ApiError> {
        let (reply, answer) = channel();
        self.hotplug
            .send(request(reply))
            .map_err(|_| ApiError::new(500, "the hotplug thread is gone"))?;
        answer
            .recv_timeout(wait)
            .map_err(|_| ApiError::new(500, "the hotplug thread did not answer"))?
    }

    /// Stops every vCPU (device threads finish what the guest had queued, see `pause`), then
    /// the guest's clock.
    fn pause(&self) -> Result<(), ApiError> {
        let pid = self.pid as i32;
        self.vcpus
            .pause(
                |tid| crate::vcpu::kick(pid, tid),
                PAUSE_TIMEOUT,
                || self.clock.save(),
            )
            .map_err(pause_refusal)?;
        vm_device::lock(&self.info).state = api::VmState::Paused;
        log::info!("vm.pause: every vCPU is stopped");
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.vcpus
            .resume(|| self.clock.restore())
            .map_err(pause_refusal)?;
        vm_device::lock(&self.info).state = api::VmState::Running;
        log::info!("vm.resume: the vCPUs run again");
        Ok(())
    }

    fn add_disk(&self, disk: DiskConfig) -> Result<api::PciDeviceInfo, ApiError> {
        self.ask(
            |reply| HotplugRequest::AddDisk { disk, reply },
            HOTPLUG_MARGIN,
        )
    }

    fn add_device(&self, device: DeviceConfig) -> Result<api::PciDeviceInfo, ApiError> {
        self.ask(
            |reply| HotplugRequest::AddDevice { device, reply },
            HOTPLUG_MARGIN,
        )
    }

    fn add_net(&self, net: NetConfig) -> Result<api::PciDeviceInfo, ApiError> {
        self.ask(
            |reply| HotplugRequest::AddNet { net, reply },
            HOTPLUG_MARGIN,
        )
    }

    fn remove_device(&self, id: String) -> Result<(), ApiError> {
        self.ask(
            |reply| HotplugRequest::Remove { id, reply },
            EJECT_TIMEOUT + HOTPLUG_MARGIN,
        )
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
    thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            confine(filters.as_deref(), ThreadKind::Api);
            let err = api::serve(listener, &control, &api::Limits::default());
            log::error!("--api-socket: the API stopped: {err}");
        })
        .map(drop)
        .map_err(|source| VmmError::Io {
            what: "start the API thread".into(),
            source,
        })
}

/// A device on bus 0 as `vm.info` lists it.
pub struct DeviceEntry {
    pub id: String,
    pub device_number: u8,
}

/// `vm.info` of the machine `config` (validated and resolved) builds, with its devices.
pub fn vm_info(config: &VmConfig, devices: &[DeviceEntry]) -> api::VmInfo {
    let device_tree: BTreeMap<String, api::DeviceNode> = devices
        .iter()
        .map(|device| {
            let bdf = pci_bdf(device.device_number);
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

    #[test]
    fn pausing_twice_or_resuming_a_running_vm_is_the_wrong_state_and_a_stuck_vcpu_an_error() {
        let gate = PauseGate::default();
        let wrong = pause_refusal(gate.resume(|| {}).unwrap_err());
        assert_eq!(wrong.status, 405);
        assert_eq!(wrong.message, "the VM is not paused");
        gate.pause(|_| Ok(()), Duration::from_millis(1), || {})
            .unwrap();
        let wrong = pause_refusal(gate.pause(|_| Ok(()), Duration::ZERO, || {}).unwrap_err());
        assert_eq!(
            (wrong.status, wrong.message.as_str()),
            (405, "the VM is already paused")
        );
        gate.resume(|| {}).unwrap();
        gate.enter(9);
        let stuck = pause_refusal(
            gate.pause(|_| Ok(()), Duration::from_millis(1), || {})
                .unwrap_err(),
        );
        assert_eq!(stuck.status, 500);
        assert!(stuck.message.contains("did not stop"), "{}", stuck.message);
    }
}
