//! Cloud Hypervisor's REST API for warden: HTTP/1.1 on a Unix socket, with the request and
//! response bodies of Cloud Hypervisor's OpenAPI description
//! (`vmm/src/api/openapi/cloud-hypervisor.yaml`), so that a client written for it works
//! unchanged.
//!
//! The crate knows nothing of KVM: [`serve`] parses requests ([`http`], with `httparse`),
//! routes them ([`routes`]) to typed [`Request`]s and hands each to a [`Vmm`], whose answer it
//! writes back. Every request is bounded in size and in time (see [`Limits`]), and one thread
//! serves all clients without blocking on any of them.

pub mod bodies;
mod files;
pub mod http;
pub mod responses;
pub mod routes;
mod server;

pub use bodies::{VmRemoveDevice, VmResize};
pub use files::Files;
pub use responses::{Counters, DeviceNode, PciDeviceInfo, VmInfo, VmState, VmmPingResponse};
pub use routes::{ApiError, Refusal, Request, Response};
pub use server::{serve, Limits};

/// What the API asks of the virtual machine monitor. Called on the API thread, one request at
/// a time: an implementation must answer promptly (it blocks every client while it runs).
pub trait Vmm: Send + Sync {
    fn handle(&self, request: Request) -> Result<Response, ApiError>;

    /// Called once the answer to a `request` that [`Vmm::handle`] accepted is in the client's
    /// socket (or the client is gone): the place for what ends the VMM, so the client still
    /// gets its answer.
    fn answered(&self, _request: &Request) {}
}

#[cfg(test)]
mod tests;
