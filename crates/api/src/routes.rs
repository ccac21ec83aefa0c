//! The endpoints: which path takes which method and body, and the typed request each becomes.

use serde::de::DeserializeOwned;

use vm_config::{DeviceConfig, DiskConfig, FsConfig, NetConfig, VmConfig, VsockConfig};

use crate::bodies::{VmRemoveDevice, VmResize};
use crate::files::Files;
use crate::responses::{Counters, PciDeviceInfo, VmInfo, VmmPingResponse};

/// What a client asked the VMM for, its body parsed and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Ping,
    Info,
    Counters,
    /// `vm.create`: the VM's configuration, as given (the VMM validates it).
    Create(Box<VmConfig>),
    /// `vm.boot`: build the created VM and start it.
    Boot,
    /// `vm.delete`: stop the VM if it runs, and forget its configuration.
    Delete,
    /// `vm.shutdown`: stop the guest now; the VMM stays, the configuration too.
    Shutdown,
    /// `vm.power-button`: ask the guest to shut itself down.
    PowerButton,
    Pause,
    Resume,
    Reboot,
    Resize(VmResize),
    /// `vmm.shutdown`: end the VMM (and so the guest).
    VmmShutdown,
    AddDisk(DiskConfig),
    /// A net, with the taps the client passed for it (none: warden opens its `tap`).
    AddNet(NetConfig, Files),
    AddDevice(DeviceConfig),
    AddVsock(VsockConfig),
    AddFs(FsConfig),
    RemoveDevice(VmRemoveDevice),
}

/// The VMM's answer to a [`Request`].
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    Ping(VmmPingResponse),
    Info(Box<VmInfo>),
    Counters(Counters),
    /// Done, nothing to say (204).
    Done,
    /// A device was hot-added here (200).
    Added(PciDeviceInfo),
}

/// Why a request was refused. The VMM says what went wrong; the status code each kind gets
/// is chosen here alone ([`Refusal::status`]), as Cloud Hypervisor answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It cannot be acted on as given: a bad body or configuration, a file that cannot be
    /// opened, a host not prepared for it.
    BadRequest,
    /// No such endpoint, no VM, or no device by that id.
    NotFound,
    /// Something it needs is taken: an id, a tap, the hotplug slots.
    Conflict,
    /// The VMM could not do it, or not in the VM's present state.
    Failed,
    /// Something warden does not do.
    NotImplemented,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::BadRequest => 400,
            Refusal::NotFound => 404,
            Refusal::Conflict => 409,
            Refusal::Failed => 500,
            Refusal::NotImplemented => 501,
        }
    }
}

/// A refused request: why, and a one-line reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub refusal: Refusal,
    pub message: String,
}

impl ApiError {
    pub fn new(refusal: Refusal, message: impl Into<String>) -> Self {
        ApiError {
            refusal,
            message: message.into(),
        }
    }

    /// The body is not one warden can act on.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Refusal::BadRequest, message)
    }

    pub fn status(&self) -> u16 {
        self.refusal.status()
    }
}

const PREFIX: &str = "/api/v1/";

/// Every endpoint: its name under [`PREFIX`] and its method.
const ENDPOINTS: &[(&str, &str)] = &[
    ("vmm.ping", "GET"),
    ("vmm.shutdown", "PUT"),
    ("vm.info", "GET"),
    ("vm.counters", "GET"),
    ("vm.create", "PUT"),
    ("vm.boot", "PUT"),
    ("vm.delete", "PUT"),
    ("vm.shutdown", "PUT"),
    ("vm.power-button", "PUT"),
    ("vm.pause", "PUT"),
    ("vm.resume", "PUT"),
    ("vm.reboot", "PUT"),
    ("vm.resize", "PUT"),
    ("vm.add-disk", "PUT"),
    ("vm.add-net", "PUT"),
    ("vm.add-device", "PUT"),
    ("vm.add-vsock", "PUT"),
    ("vm.add-fs", "PUT"),
    ("vm.remove-device", "PUT"),
];

/// The method `path` takes, if it is an endpoint (for a 405's `Allow`).
pub fn allowed_method(path: &str) -> Option<&'static str> {
    let name = path.strip_prefix(PREFIX)?;
    ENDPOINTS
        .iter()
        .find(|(endpoint, _)| *endpoint == name)
        .map(|&(_, method)| method)
}

/// The request `method` on `path` with `body` (and the descriptors that came with it) stands
/// for: 404 for an unknown path, 400 for the wrong method (Cloud Hypervisor's status; the
/// answer's `Allow` names the right one) and for a body that does not parse or validate.
/// Descriptors go with `vm.add-net` only, as in Cloud Hypervisor; any other request's are
/// closed.
pub fn route(method: &str, path: &str, body: &[u8], files: Files) -> Result<Request, ApiError> {
    let allowed = allowed_method(path)
        .ok_or_else(|| ApiError::new(Refusal::NotFound, format!("no endpoint {path}")))?;
    if method != allowed {
        return Err(ApiError::bad_request(format!(
            "{path} takes {allowed}, not {method}"
        )));
    }
    let name = &path[PREFIX.len()..];
    Ok(match name {
        "vmm.ping" => Request::Ping,
        "vmm.shutdown" => Request::VmmShutdown,
        "vm.info" => Request::Info,
        "vm.counters" => Request::Counters,
        "vm.create" => Request::Create(Box::new(json(name, "VmConfig", body)?)),
        "vm.boot" => Request::Boot,
        "vm.delete" => Request::Delete,
        "vm.shutdown" => Request::Shutdown,
        "vm.power-button" => Request::PowerButton,
        "vm.pause" => Request::Pause,
        "vm.resume" => Request::Resume,
        "vm.reboot" => Request::Reboot,
        "vm.resize" => Request::Resize(json(name, "VmResize", body)?),
        "vm.add-disk" => {
            let disk: DiskConfig = json(name, "DiskConfig", body)?;
            disk.validate().map_err(config_refusal)?;
            Request::AddDisk(disk)
        }
        "vm.add-net" => {
            let net: NetConfig = json(name, "NetConfig", body)?;
            net.validate().map_err(config_refusal)?;
            Request::AddNet(net, files)
        }
        "vm.add-device" => {
            let device: DeviceConfig = json(name, "DeviceConfig", body)?;
            device.validate().map_err(config_refusal)?;
            Request::AddDevice(device)
        }
        "vm.add-fs" => {
            let fs: FsConfig = json(name, "FsConfig", body)?;
            fs.validate().map_err(config_refusal)?;
            Request::AddFs(fs)
        }
        "vm.add-vsock" => {
            let vsock: VsockConfig = json(name, "VsockConfig", body)?;
            vsock.validate().map_err(config_refusal)?;
            Request::AddVsock(vsock)
        }
        "vm.remove-device" => {
            let remove: VmRemoveDevice = json(name, "VmRemoveDevice", body)?;
            remove.validate().map_err(ApiError::bad_request)?;
            Request::RemoveDevice(remove)
        }
        _ => unreachable!("every endpoint in ENDPOINTS is routed"),
    })
}

/// 400 for a configuration warden cannot build, naming the field.
fn config_refusal(err: vm_config::ConfigError) -> ApiError {
    ApiError::bad_request(err.to_string())
}

/// The body of `endpoint`, a JSON `schema` object.
fn json<T: DeserializeOwned>(endpoint: &str, schema: &str, body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(format!(
            "{endpoint} needs a {schema} JSON body"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("{endpoint}: not a {schema}: {err}")))
}

/// The status and JSON body of the VMM's answer.
pub fn status_and_body(answer: Result<Response, ApiError>) -> (u16, Option<String>) {
    let json = |value: serde_json::Result<String>| match value {
        Ok(body) => (200, Some(body)),
        Err(err) => (500, Some(crate::http::error_body(&err.to_string()))),
    };
    match answer {
        Ok(Response::Ping(ping)) => json(serde_json::to_string(&ping)),
        Ok(Response::Info(info)) => json(serde_json::to_string(&info)),
        Ok(Response::Counters(counters)) => json(serde_json::to_string(&counters)),
        Ok(Response::Added(info)) => json(serde_json::to_string(&info)),
        Ok(Response::Done) => (204, None),
        Err(err) => (err.status(), Some(crate::http::error_body(&err.message))),
    }
}
