//! The kernel's vhost-net (`/dev/vhost-net`): one queue pair of a virtio-net device served by a
//! kernel thread that moves frames between the guest's rings and a tap, with no exit to the VMM.
//!
//! rust-vmm's `vhost` crate has the ioctls and the IOTLB messages; this wraps it where it falls
//! short. Its `vhost_kern::net::Net` cannot carry backend features (so no IOTLB messages), and
//! its `set_vring_addr` always turns guest-physical ring addresses into host ones, while behind
//! an IOMMU (device IOTLB) the kernel wants the driver's I/O virtual addresses as they are.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use thiserror::Error;
use vhost::vhost_kern::vhost_binding::{
    vhost_msg_v2, vhost_vring_addr, vhost_vring_file, VHOST_BACKEND_F_IOTLB_MSG_V2,
    VHOST_IOTLB_MSG_V2, VHOST_NET_SET_BACKEND, VHOST_SET_VRING_ADDR,
};
use vhost::vhost_kern::{VhostKernBackend, VhostKernFeatures};
use vhost::{
    VhostAccess, VhostBackend, VhostIotlbBackend, VhostIotlbMsg, VhostIotlbMsgParser,
    VhostIotlbType, VhostUserMemoryRegionInfo,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

const VHOST_NET_PATH: &str = "/dev/vhost-net";

/// Why vhost-net could not be set up.
#[derive(Debug, Error)]
pub enum VhostError {
    #[error(
        "cannot open {VHOST_NET_PATH}: {0} (load the vhost_net module: `modprobe vhost_net`, \
         or drop vhost=on)"
    )]
    Open(io::Error),
    #[error("vhost-net refused {what}: {source}")]
    Setup {
        what: &'static str,
        source: vhost::Error,
    },
    #[error(
        "vhost-net lacks IOTLB messages (VHOST_BACKEND_F_IOTLB_MSG_V2), needed behind the IOMMU"
    )]
    NoIotlb,
}

/// Where the kernel finds a ring: host virtual addresses, or, with the device IOTLB, the
/// driver's I/O virtual addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddresses {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// An access the kernel asks translated (an IOTLB miss).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbMiss {
    pub iova: u64,
    pub read: bool,
    pub write: bool,
}

/// One vhost-net instance: owned by this process, bound to guest RAM.
pub struct VhostNet {
    file: File,
    /// Guest RAM, for the memory table (guest-physical to host addresses).
    mem: Arc<GuestMemoryMmap>,
    backend_features: u64,
}

impl VhostNet {
    /// Opens `/dev/vhost-net` and takes ownership of it; `iotlb` turns on IOTLB messages
    /// (for a device behind the IOMMU).
    pub fn open(mem: GuestMemoryMmap, iotlb: bool) -> Result<Self, VhostError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(VHOST_NET_PATH)
            .map_err(VhostError::Open)?;
        let mut vhost = VhostNet {
            file,
            mem: Arc::new(mem),
            backend_features: 0,
        };
        vhost.set_owner().map_err(setup("VHOST_SET_OWNER"))?;
        if iotlb {
            let offered = vhost
                .get_backend_features()
                .map_err(setup("VHOST_GET_BACKEND_FEATURES"))?;
            // A bit number, as in the kernel's header.
            let msg_v2 = 1 << VHOST_BACKEND_F_IOTLB_MSG_V2;
            if offered & msg_v2 == 0 {
                return Err(VhostError::NoIotlb);
            }
            vhost
                .set_backend_features(msg_v2)
                .map_err(setup("VHOST_SET_BACKEND_FEATURES"))?;
        }
        Ok(vhost)
    }

    /// The virtio features the kernel's data path implements.
    pub fn supported_features(&self) -> io::Result<u64> {
        self.get_features().map_err(io_error)
    }

    /// Tells the kernel what the driver accepted (ring layout, header size, IOTLB). With
    /// `VIRTIO_F_ACCESS_PLATFORM` this starts an empty device IOTLB.
    pub fn set_acked_features(&self, features: u64) -> io::Result<()> {
        self.set_features(features).map_err(io_error)
    }

    /// Hands the kernel all of guest RAM (guest-physical to host addresses).
    pub fn set_guest_memory(&self) -> io::Result<()> {
        let regions = self
            .mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            })
            .collect::<Vec<_>>();
        self.set_mem_table(&regions).map(drop).map_err(io_error)
    }

    /// Sets up ring `index` (0 receive, 1 transmit): its size, where it starts (the next
    /// available entry), its addresses, the eventfd the driver kicks and the one the kernel
    /// signals.
    pub fn set_ring(
        &self,
        index: usize,
        size: u16,
        next_avail: u16,
        addresses: RingAddresses,
        kick: &EventFd,
        call: &EventFd,
    ) -> io::Result<()> {
        self.set_vring_num(index, size).map_err(io_error)?;
        self.set_vring_base(index, next_avail).map_err(io_error)?;
        let addr = vhost_vring_addr {
            index: index as u32,
            flags: 0,
            desc_user_addr: addresses.desc,
            used_user_addr: addresses.used,
            avail_user_addr: addresses.avail,
            log_guest_addr: 0,
        };
        // SAFETY: a vhost fd this value owns, and a struct that outlives the call.
        let ret = unsafe { ioctl_with_ref(&self.file, VHOST_SET_VRING_ADDR(), &addr) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        self.set_vring_kick(index, kick).map_err(io_error)?;
        self.set_vring_call(index, call).map_err(io_error)
    }

    /// Starts ring `index` on `tap` (a tap opened with virtio-net headers), or stops it.
    pub fn set_tap(&self, index: usize, tap: Option<RawFd>) -> io::Result<()> {
        let file = vhost_vring_file {
            index: index as u32,
            fd: tap.unwrap_or(-1),
        };
        // SAFETY: a vhost fd this value owns, and a struct that outlives the call.
        let ret = unsafe { ioctl_with_ref(&self.file, VHOST_NET_SET_BACKEND(), &file) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Tells the kernel that `[iova, iova + size)` is at host address `host` with these rights.
    pub fn iotlb_update(
        &self,
        iova: u64,
        size: u64,
        host: u64,
        read: bool,
        write: bool,
    ) -> io::Result<()> {
        let perm = match (read, write) {
            (true, true) => VhostAccess::ReadWrite,
            (true, false) => VhostAccess::ReadOnly,
            (false, true) => VhostAccess::WriteOnly,
            (false, false) => return Ok(()),
        };
        self.send(VhostIotlbMsg {
            iova,
            size,
            userspace_addr: host,
            perm,
            msg_type: VhostIotlbType::Update,
        })
    }

    /// Makes the kernel forget every translation within `[iova, iova + size)`. When this
    /// returns its rings are not mid-copy through one of them: the kernel takes every ring's
    /// lock to drop them.
    pub fn iotlb_invalidate(&self, iova: u64, size: u64) -> io::Result<()> {
        self.send(VhostIotlbMsg {
            iova,
            size,
            userspace_addr: 0,
            perm: VhostAccess::No,
            msg_type: VhostIotlbType::Invalidate,
        })
    }

    fn send(&self, msg: VhostIotlbMsg) -> io::Result<()> {
        self.send_iotlb_msg(&msg).map_err(io_error)
    }

    /// The next translation the kernel asks for, if any is waiting (the fd is non-blocking
    /// and readable when one is).
    pub fn next_miss(&self) -> io::Result<Option<IotlbMiss>> {
        loop {
            let mut raw = vhost_msg_v2::default();
            // SAFETY: reads at most the size of `raw` into it.
            let n = unsafe {
                libc::read(
                    self.file.as_raw_fd(),
                    (&mut raw as *mut vhost_msg_v2).cast(),
                    size_of::<vhost_msg_v2>(),
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(err),
                };
            }
            if n as usize != size_of::<vhost_msg_v2>() || raw.type_ != VHOST_IOTLB_MSG_V2 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected vhost message ({n} bytes, type {})", raw.type_),
                ));
            }
            let mut msg = VhostIotlbMsg::default();
            raw.parse(&mut msg).map_err(io_error)?;
            if msg.msg_type != VhostIotlbType::Miss {
                continue;
            }
            return Ok(Some(IotlbMiss {
                iova: msg.iova,
                read: matches!(msg.perm, VhostAccess::ReadOnly | VhostAccess::ReadWrite),
                write: matches!(msg.perm, VhostAccess::WriteOnly | VhostAccess::ReadWrite),
            }));
        }
    }
}

impl AsRawFd for VhostNet {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl VhostKernBackend for VhostNet {
    type AS = Arc<GuestMemoryMmap>;

    fn mem(&self) -> &Self::AS {
        &self.mem
    }
}

impl VhostKernFeatures for VhostNet {
    fn get_backend_features_acked(&self) -> u64 {
        self.backend_features
    }

    fn set_backend_features_acked(&mut self, features: u64) {
        self.backend_features = features;
    }
}

fn setup(what: &'static str) -> impl FnOnce(vhost::Error) -> VhostError {
    move |source| VhostError::Setup { what, source }
}

/// The crate's errors carry the OS error for every ioctl; keep it.
fn io_error(err: vhost::Error) -> io::Error {
    match err {
        vhost::Error::IoctlError(e) => e,
        vhost::Error::IOError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}
