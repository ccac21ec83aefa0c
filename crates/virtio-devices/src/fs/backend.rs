//! The back end a virtio-fs device hands its rings to: in warden a vhost-user connection
//! ([`Connection`]), in the tests a fake.

use std::os::fd::AsRawFd;

use vhost_user::{Connection, Error, Ring};
use vm_memory::GuestMemoryMmap;

/// What the device asks of its back end.
pub trait FsBackend: AsRawFd + Send {
    /// The virtio features the back end implements.
    fn features(&self) -> u64;
    /// Whether it could serve a device behind an IOMMU (see [`Connection::offers_iotlb`]).
    fn offers_iotlb(&self) -> bool;
    /// Starts the rings on the features the driver accepted.
    fn start(&mut self, acked: u64, ram: &GuestMemoryMmap, rings: &[Ring]) -> Result<(), Error>;
    /// Stops every ring.
    fn stop(&mut self) -> Result<(), Error>;
    /// Connects again, to a back end that came back at the same socket.
    fn reconnect(&mut self) -> Result<(), Error>;
}

/// A vhost-user back end (virtiofsd) on a Unix socket.
impl FsBackend for Connection {
    fn features(&self) -> u64 {
        Connection::features(self)
    }

    fn offers_iotlb(&self) -> bool {
        Connection::offers_iotlb(self)
    }

    fn start(&mut self, acked: u64, ram: &GuestMemoryMmap, rings: &[Ring]) -> Result<(), Error> {
        Connection::start(self, acked, ram, rings)
    }

    fn stop(&mut self) -> Result<(), Error> {
        Connection::stop(self)
    }

    fn reconnect(&mut self) -> Result<(), Error> {
        Connection::reconnect(self)
    }
}
