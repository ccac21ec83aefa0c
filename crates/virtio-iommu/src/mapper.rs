//! External mappers: mirrors of a domain's mappings in something outside the model, typically
//! the host VFIO container of a passed-through endpoint, whose DMA the host IOMMU translates
//! without ever asking this model.

use thiserror::Error;

/// Access rights passed to an external mapper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapPerms {
    /// Endpoints may read.
    pub read: bool,
    /// Endpoints may write.
    pub write: bool,
}

/// Failure of an external mapper; the request is rolled back and the guest sees the status.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum MapperError {
    /// The mapper ran out of entries or memory (e.g. VFIO's DMA entry limit): NOMEM.
    #[error("external mapper out of resources")]
    NoResources,
    /// Any other failure: DEVERR.
    #[error("external mapper failed: {0}")]
    Failed(String),
}

/// Receives the MAP/UNMAP traffic of the domain its endpoint is attached to.
///
/// Calls arrive with the device's state lock held, in request order; one mapper registered for
/// several endpoints of the same domain is called once per mapping, not once per endpoint
/// (mappers are compared by `Arc` identity).
///
/// Contract, per mapper (bypass state is tracked per endpoint, so an endpoint that needs
/// bypass should have a mapper of its own):
/// - `map` is called for each new mapping of the domain, and for every existing mapping when
///   the mapper joins a domain (replay on ATTACH);
/// - `unmap` is called with exactly the ranges earlier passed to `map` (whole mappings), when
///   UNMAP removes them or when the mapper leaves the domain (DETACH, ATTACH to another
///   domain, device reset);
/// - when a call fails the model undoes the calls it already made for the same request, so the
///   mapper ends in the state it had before the request;
/// - a device reset cannot be refused: a withdraw refused `WITHDRAW_ATTEMPTS` times leaves the
///   mappings still held recorded on the endpoint, and `unmap` is called again for them (at
///   the next ATTACH, which gets DEVERR while they remain, `bypass` change, reset or removal);
///   the identity map is not requested while they remain.
pub trait ExternalMapper: Send + Sync {
    /// Map `size` bytes at `iova` to guest-physical `gpa`.
    fn map(&self, iova: u64, gpa: u64, size: u64, perms: MapPerms) -> Result<(), MapperError>;
    /// Unmap `size` bytes at `iova`, a range earlier passed to `map`.
    fn unmap(&self, iova: u64, size: u64) -> Result<(), MapperError>;
    /// Enter (`true`) or leave bypass mode: map all guest RAM 1:1, or remove that identity
    /// map. Called when the endpoint is registered under boot bypass, when the `bypass` config
    /// field changes while it is unattached, and on ATTACH/DETACH to or from bypass. The
    /// identity map and domain mappings never coexist: it is removed before a replay and
    /// added after a withdrawal.
    fn set_identity(&self, enabled: bool) -> Result<(), MapperError>;
}
