//! The back end a virtio-fs device hands its rings to: in warden a vhost-user connection
//! ([`VhostUserFs`]), in the tests a fake.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

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
pub struct VhostUserFs {
    path: PathBuf,
    queues: usize,
    connection: Connection,
}

impl VhostUserFs {
    /// Connects to the back end at `path` for a device of `queues` queues.
    pub fn connect(path: &Path, queues: usize) -> Result<Self, Error> {
        Ok(VhostUserFs {
            path: path.to_owned(),
            queues,
            connection: Connection::connect(path, queues)?,
        })
    }
}

impl AsRawFd for VhostUserFs {
    fn as_raw_fd(&self) -> RawFd {
        self.connection.as_raw_fd()
    }
}

impl FsBackend for VhostUserFs {
    fn features(&self) -> u64 {
        self.connection.features()
    }

    fn offers_iotlb(&self) -> bool {
        self.connection.offers_iotlb()
    }

    fn start(&mut self, acked: u64, ram: &GuestMemoryMmap, rings: &[Ring]) -> Result<(), Error> {
        self.connection.start(acked, ram, rings)
    }

    fn stop(&mut self) -> Result<(), Error> {
        self.connection.stop()
    }

    fn reconnect(&mut self) -> Result<(), Error> {
        let connection = Connection::connect(&self.path, self.queues)?;
        // The driver negotiated with the first back end: the new one must do at least as much.
        if self.connection.features() & !connection.features() != 0 {
            return Err(Error::Lacks("features the first back end offered"));
        }
        self.connection = connection;
        Ok(())
    }
}
