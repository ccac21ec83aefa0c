//! A vhost-user front end: a virtio device whose rings a back-end process (virtiofsd) serves,
//! reached over a Unix socket, guest RAM shared with it as file descriptors.
//!
//! rust-vmm's `vhost` crate speaks the protocol ([`Frontend`]); this wraps it with what it
//! leaves to its caller: the handshake (owner, features, protocol features, queue count), the
//! memory table from guest RAM, a ring's start and stop in the order the protocol wants, and a
//! deadline on every reply, so that a back end that stops answering costs an error, never a
//! thread of warden's.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// How long a back end has to answer one message.
const REPLY_DEADLINE: Duration = Duration::from_secs(10);
/// How long a back end may take to be listening: a VM's reboot builds its devices again at
/// once, while a supervisor restarts the back end whose connection the old device closed.
const LISTEN_PATIENCE: Duration = Duration::from_secs(5);
/// `VIRTIO_F_VERSION_1`: the only virtio warden's transport speaks.
const VERSION_1: u64 = 1 << 32;
/// The protocol features warden uses: several queues, and an answer to every request (so a
/// refused memory table or ring is an error here, not a silent stall).
const WANTED_PROTOCOL: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::MQ.union(VhostUserProtocolFeatures::REPLY_ACK);

/// Why a back end could not be reached or set up.
#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot connect to the vhost-user back end at {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("the vhost-user back end refused {what}: {source}")]
    Request {
        what: &'static str,
        source: vhost::Error,
    },
    #[error("the vhost-user back end lacks {0}")]
    Lacks(&'static str),
    #[error("the vhost-user back end serves {offered} queues; the device has {needed}")]
    TooFewQueues { offered: u64, needed: usize },
    #[error(
        "guest RAM is not shared with the back end (each region must be a file mapping: \
         --memory shared=on): {0}"
    )]
    PrivateMemory(vhost::Error),
}

/// Where a ring is, in warden's own address space (the back end translates those through the
/// memory table), and its eventfds.
pub struct Ring<'a> {
    pub index: usize,
    pub size: u16,
    pub next_avail: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Written by the driver's notifications (the transport's ioeventfd).
    pub kick: &'a EventFd,
    /// Written by the back end for an interrupt.
    pub call: &'a EventFd,
}

/// One connection to a back end, past the handshake.
pub struct Connection {
    /// Where the back end listens, to connect again.
    path: PathBuf,
    frontend: Frontend,
    /// The device's virtio features the back end implements (vhost-user's own bits removed).
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queues: usize,
}

impl Connection {
    /// Connects to the back end listening at `path` for a device of `queues` queues, waiting
    /// up to [`LISTEN_PATIENCE`] for its socket to appear and take connections.
    pub fn connect(path: &Path, queues: usize) -> Result<Self, Error> {
        let connect = |source| Error::Connect {
            path: path.to_owned(),
            source,
        };
        let stream = listening(path).map_err(connect)?;
        stream
            .set_read_timeout(Some(REPLY_DEADLINE))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_DEADLINE)))
            .map_err(connect)?;
        let mut frontend = Frontend::from_stream(stream, queues as u64);
        let refused = |what| move |source| Error::Request { what, source };
        frontend.set_owner().map_err(refused("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(refused("GET_FEATURES"))?;
        if offered & VERSION_1 == 0 {
            return Err(Error::Lacks("VIRTIO_F_VERSION_1"));
        }
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & protocol_bit == 0 {
            return Err(Error::Lacks("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        // The protocol features exist once this bit is set; the virtio features proper are
        // set again at each start.
        frontend
            .set_features(protocol_bit)
            .map_err(refused("SET_FEATURES"))?;
        let protocol = frontend
            .get_protocol_features()
            .map_err(refused("GET_PROTOCOL_FEATURES"))?;
        let acked = protocol & WANTED_PROTOCOL;
        frontend
            .set_protocol_features(acked)
            .map_err(refused("SET_PROTOCOL_FEATURES"))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let offered_queues = if acked.contains(VhostUserProtocolFeatures::MQ) {
            frontend.get_queue_num().map_err(refused("GET_QUEUE_NUM"))?
        } else {
            1
        };
        if offered_queues < queues as u64 {
            return Err(Error::TooFewQueues {
                offered: offered_queues,
                needed: queues,
            });
        }
        Ok(Connection {
            path: path.to_owned(),
            frontend,
            features: offered & !protocol_bit,
            protocol,
            queues,
        })
    }

    /// Connects again, to a back end that came back at the same socket; the driver
    /// negotiated with the first one, so the new one must do at least as much.
    pub fn reconnect(&mut self) -> Result<(), Error> {
        let connection = Connection::connect(&self.path, self.queues)?;
        if self.features & !connection.features != 0 {
            return Err(Error::Lacks("features the first back end offered"));
        }
        *self = connection;
        Ok(())
    }

    /// The device's virtio features the back end implements.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether the back end could serve a device behind an IOMMU: it translates through an
    /// IOTLB of its own when `VIRTIO_F_ACCESS_PLATFORM` is negotiated, asking the front end
    /// for misses on its request channel (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`).
    pub fn offers_iotlb(&self) -> bool {
        const ACCESS_PLATFORM: u64 = 1 << 33;
        self.features & ACCESS_PLATFORM != 0
            && self
                .protocol
                .contains(VhostUserProtocolFeatures::BACKEND_REQ)
    }

    /// Starts the device on the features the driver accepted: guest RAM, then each ring,
    /// enabled last.
    pub fn start(&self, acked: u64, ram: &GuestMemoryMmap, rings: &[Ring]) -> Result<(), Error> {
        let refused = |what| move |source| Error::Request { what, source };
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features((acked & self.features) | protocol_bit)
            .map_err(refused("SET_FEATURES"))?;
        let regions = ram
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::PrivateMemory)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(refused("SET_MEM_TABLE"))?;
        let mut frontend = self.frontend.clone();
        for ring in rings {
            let addresses = VringConfigData {
                queue_max_size: ring.size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: ring.desc,
                used_ring_addr: ring.used,
                avail_ring_addr: ring.avail,
                log_addr: None,
            };
            frontend
                .set_vring_num(ring.index, ring.size)
                .map_err(refused("SET_VRING_NUM"))?;
            frontend
                .set_vring_addr(ring.index, &addresses)
                .map_err(refused("SET_VRING_ADDR"))?;
            frontend
                .set_vring_base(ring.index, ring.next_avail)
                .map_err(refused("SET_VRING_BASE"))?;
            frontend
                .set_vring_call(ring.index, ring.call)
                .map_err(refused("SET_VRING_CALL"))?;
            frontend
                .set_vring_kick(ring.index, ring.kick)
                .map_err(refused("SET_VRING_KICK"))?;
            frontend
                .set_vring_enable(ring.index, true)
                .map_err(refused("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops every ring: the back end touches the rings no more once each has answered.
    pub fn stop(&self) -> Result<(), Error> {
        let refused = |what| move |source| Error::Request { what, source };
        for index in 0..self.queues {
            self.frontend
                .get_vring_base(index)
                .map_err(refused("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}

/// A stream to the socket at `path`, once something listens there.
fn listening(path: &Path) -> io::Result<UnixStream> {
    let deadline = Instant::now() + LISTEN_PATIENCE;
    loop {
        match UnixStream::connect(path) {
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

impl AsRawFd for Connection {
    /// The socket: readable only when the back end hangs up or speaks out of turn, since
    /// every answer is read as it is asked for.
    fn as_raw_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_back_end_restarting_is_waited_for() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/warden-vu-").unwrap();
        let path = dir.as_path().join("fs.sock");
        let later = path.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let listener = UnixListener::bind(later).unwrap();
            listener.accept().unwrap();
        });
        assert!(listening(&path).is_ok(), "connected once it listened");
        server.join().unwrap();
    }
}
