//! Tap devices (Linux `Documentation/networking/tuntap.rst`) carrying virtio-net headers.
//!
//! A tap opened here exchanges whole Ethernet frames, one per `read`/`write`, each preceded
//! by a 12-byte `struct virtio_net_hdr_mrg_rxbuf` (`IFF_VNET_HDR` with `TUNSETVNETHDRSZ`): the
//! header a virtio 1.x driver puts in front of every packet. The device can then pass the
//! driver's checksum and segmentation offload requests to the host kernel unchanged, and
//! receive still-unsegmented packets from it once [`Tap::set_offloads`] allows them.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Size of the virtio 1.x network header in front of every frame (virtio v1.2 §5.1.6): the
/// legacy 10 bytes plus `num_buffers`, present with `VIRTIO_F_VERSION_1` whatever else was
/// negotiated.
pub const VNET_HDR_LEN: usize = 12;

/// Name pattern of taps warden creates: the kernel replaces `%d` with the lowest free number.
const CREATED_NAME: &str = "vmtap%d";

/// The offloads a tap may be asked to hand over (`TUN_F_*`), in the order they are tried.
const OFFLOAD_CANDIDATES: [libc::c_uint; 2] = [
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6,
    libc::TUN_F_CSUM,
];

/// Why a tap could not be opened or configured; each message names the fix.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap={0:?} is not an interface name: give 1 to 15 characters without '/', ':', '%' or spaces, or tap= for a new tap")]
    BadName(String),
    #[error("cannot open /dev/net/tun ({0}); load the tun module (modprobe tun) or create the device node (mknod /dev/net/tun c 10 200)")]
    NoTunDevice(io::Error),
    #[error("not permitted to use /dev/net/tun or tap {name} ({source}); run warden as root or with CAP_NET_ADMIN, or create the tap for this user beforehand (ip tuntap add {name} mode tap user $USER) and pass tap={name}")]
    NotPermitted { name: String, source: io::Error },
    #[error("tap {0} is in use by another process; give another tap= name, or tap= for a new tap")]
    InUse(String),
    #[error("{0} exists but is not a single-queue tap device; give another tap= name, or tap= for a new tap")]
    NotATap(String),
    #[error("{0} exists but is not a multi-queue tap device; give another tap= name, tap= for a new tap, or num_queues=2 for one queue pair")]
    NotAMultiQueueTap(String),
    #[error("descriptor {fd} is not a tap ({source}); pass the descriptor of an open tap queue")]
    NotATapFd { fd: RawFd, source: io::Error },
    #[error("tap {0} was opened without IFF_VNET_HDR and IFF_NO_PI; open it with both (a virtio-net header before each frame)")]
    WithoutVnetHeader(String),
    #[error("the descriptors passed are queues of different taps ({0} and {1}); pass the queues of one tap")]
    DifferentTaps(String, String),
    #[error("tap {name}: {what} failed: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// Checks that `name` can name a network interface (`IFNAMSIZ` - 1 bytes, no path separator,
/// no alias colon, no kernel format pattern, no whitespace). The empty name is valid: it
/// asks for a new tap.
pub fn validate_tap_name(name: &str) -> Result<(), TapError> {
    let bad = name.len() >= libc::IFNAMSIZ
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| matches!(b, b'/' | b':' | b'%') || b.is_ascii_whitespace() || b == 0);
    if bad {
        Err(TapError::BadName(name.to_string()))
    } else {
        Ok(())
    }
}

/// An open tap queue, non-blocking, with 12-byte virtio-net headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    offloads: libc::c_uint,
}

impl Tap {
    /// Opens tap `name`, creating it if it does not exist; an empty name creates a new tap
    /// `vmtapN`. The tap is brought up; host offloads start disabled.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        Self::open_queue(name, false)
    }

    /// Opens `count` queues of one tap (`IFF_MULTI_QUEUE` when there are several), named and
    /// created as [`Tap::open`] does: one per queue pair of a multi-queue device, so that each
    /// pair's worker reads and writes its own file. Every queue starts attached.
    pub fn open_queues(name: &str, count: usize) -> Result<Vec<Tap>, TapError> {
        if count <= 1 {
            return Ok(vec![Self::open(name)?]);
        }
        // The kernel refuses a second user of a single-queue tap (EBUSY), but lets anyone
        // add queues to a multi-queue one and spreads its frames over them: an existing tap
        // is taken only while nobody has a queue on it.
        if !name.is_empty() && carrier(name)? == Some(true) {
            return Err(TapError::InUse(name.to_string()));
        }
        let first = Self::open_queue(name, true)?;
        let mut queues = Vec::with_capacity(count);
        for _ in 1..count {
            queues.push(Self::open_queue(first.name(), true)?);
        }
        queues.insert(0, first);
        Ok(queues)
    }

    /// The queues of a tap a client opened and passed as descriptors (`vm.add-net` with
    /// `SCM_RIGHTS`), one per queue pair: each must be a queue of the same tap, opened with
    /// virtio-net headers. It is made non-blocking and given 12-byte headers; its name, up
    /// state and addresses are the client's.
    pub fn from_fds(fds: Vec<OwnedFd>) -> Result<Vec<Tap>, TapError> {
        let mut taps: Vec<Tap> = Vec::with_capacity(fds.len());
        for fd in fds {
            let raw = fd.as_raw_fd();
            let file = File::from(fd);
            let mut ifr = ifreq("");
            // SAFETY: TUNGETIFF fills an ifreq, which `ifr` is.
            if unsafe { ioctl_with_mut_ref(&file, libc::TUNGETIFF as _, &mut ifr) } < 0 {
                return Err(TapError::NotATapFd {
                    fd: raw,
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: the kernel NUL-terminates the name within IFNAMSIZ; TUNGETIFF wrote the
            // flags member.
            let (name, flags) = unsafe {
                (
                    CStr::from_ptr(ifr.ifr_name.as_ptr())
                        .to_string_lossy()
                        .into_owned(),
                    i32::from(ifr.ifr_ifru.ifru_flags) & 0xffff,
                )
            };
            let needed = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
            if flags & needed != needed {
                return Err(TapError::WithoutVnetHeader(name));
            }
            if let Some(first) = taps.first() {
                if first.name != name {
                    return Err(TapError::DifferentTaps(first.name.clone(), name));
                }
            }
            // SAFETY: fcntl on a descriptor `file` owns.
            let status = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
            // SAFETY: as above.
            if status < 0
                || unsafe {
                    libc::fcntl(file.as_raw_fd(), libc::F_SETFL, status | libc::O_NONBLOCK)
                } < 0
            {
                return Err(TapError::Ioctl {
                    name,
                    what: "fcntl(O_NONBLOCK)",
                    source: io::Error::last_os_error(),
                });
            }
            taps.push(Tap::with_vnet_header(file, name)?);
        }
        Ok(taps)
    }

    fn open_queue(name: &str, multi_queue: bool) -> Result<Tap, TapError> {
        validate_tap_name(name)?;
        let requested = if name.is_empty() { CREATED_NAME } else { name };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|err| match err.raw_os_error() {
                Some(libc::EACCES | libc::EPERM) => TapError::NotPermitted {
                    name: requested.replace("%d", "0"),
                    source: err,
                },
                _ => TapError::NoTunDevice(err),
            })?;

        let mut ifr = ifreq(requested);
        // IFF_NO_PI: no packet-information prefix; IFF_VNET_HDR: a virtio-net header instead.
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        ifr.ifr_ifru.ifru_flags = flags as i16;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `ifr` is.
        if unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as _, &mut ifr) } < 0 {
            let err = io::Error::last_os_error();
            let name = requested.to_string();
            return Err(match err.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::NotPermitted { name, source: err },
                Some(libc::EBUSY) => TapError::InUse(name),
                Some(libc::EINVAL) if multi_queue => TapError::NotAMultiQueueTap(name),
                Some(libc::EINVAL) => TapError::NotATap(name),
                _ => TapError::Ioctl {
                    name,
                    what: "TUNSETIFF",
                    source: err,
                },
            });
        }
        // SAFETY: the kernel NUL-terminates the name it chose within IFNAMSIZ.
        let name = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let tap = Tap::with_vnet_header(file, name)?;
        tap.set_up()?;
        Ok(tap)
    }

    /// A tap queue `file` of `name`, set to take and give the virtio-net header, its
    /// offloads probed.
    fn with_vnet_header(file: File, name: String) -> Result<Tap, TapError> {
        let mut tap = Tap {
            file,
            name,
            offloads: 0,
        };
        tap.set_vnet_header()?;
        tap.offloads = tap.probe_offloads()?;
        Ok(tap)
    }

    /// 12-byte virtio-net headers before each frame.
    fn set_vnet_header(&self) -> Result<(), TapError> {
        let header_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { ioctl_with_ref(&self.file, libc::TUNSETVNETHDRSZ as _, &header_len) } < 0 {
            return Err(self.ioctl_error("TUNSETVNETHDRSZ"));
        }
        Ok(())
    }

    /// What the tap accepts now is what it can deliver once a guest asks for it; it starts
    /// with none.
    fn probe_offloads(&self) -> Result<libc::c_uint, TapError> {
        let offloads = OFFLOAD_CANDIDATES
            .into_iter()
            .find(|&offloads| self.set_offloads(offloads).is_ok())
            .unwrap_or(0);
        self.set_offloads(0)
            .map_err(|_| self.ioctl_error("TUNSETOFFLOAD"))?;
        Ok(offloads)
    }

    /// The interface name, as the kernel chose it for a new tap.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `TUN_F_*` offloads this tap can deliver: partially checksummed frames
    /// (`TUN_F_CSUM`) and TCP segments up to 64 KiB (`TUN_F_TSO4`, `TUN_F_TSO6`).
    pub fn supported_offloads(&self) -> libc::c_uint {
        self.offloads
    }

    /// Lets the tap deliver frames needing `offloads` (`TUN_F_*`): only what the guest
    /// accepted, since the kernel otherwise completes checksums and segments itself.
    pub fn set_offloads(&self, offloads: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD as _, offloads.into()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Attaches this queue to its tap or detaches it (`TUNSETQUEUE`): the kernel spreads the
    /// host's frames over the attached queues only, so a queue pair the driver does not use
    /// is detached and receives nothing. Only for queues of [`Tap::open_queues`].
    pub fn set_queue_attached(&self, attached: bool) -> io::Result<()> {
        let mut ifr = ifreq("");
        let flag = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        ifr.ifr_ifru.ifru_flags = flag as i16;
        // SAFETY: TUNSETQUEUE reads the flags of an ifreq, which `ifr` is.
        if unsafe { ioctl_with_ref(&self.file, libc::TUNSETQUEUE as _, &ifr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Gives the host end of the link address `ip` with netmask `mask` (the route to the
    /// guest's subnet follows from it).
    pub fn set_ipv4(&self, ip: Ipv4Addr, mask: Ipv4Addr) -> Result<(), TapError> {
        let socket = self.control_socket()?;
        for (request, value, what) in [
            (libc::SIOCSIFADDR, ip, "SIOCSIFADDR"),
            (libc::SIOCSIFNETMASK, mask, "SIOCSIFNETMASK"),
        ] {
            let mut ifr = ifreq(&self.name);
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(value).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in and sockaddr have the same size; the union field is a
            // sockaddr, which the kernel reads as sockaddr_in for AF_INET.
            unsafe {
                std::ptr::write(
                    std::ptr::addr_of_mut!(ifr.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
                    addr,
                );
            }
            // SAFETY: the request reads an ifreq, which `ifr` is.
            if unsafe { ioctl_with_ref(&socket, request as _, &ifr) } < 0 {
                return Err(self.ioctl_error(what));
            }
        }
        Ok(())
    }

    /// Brings the interface up: a tap that is down drops every frame the guest sends.
    fn set_up(&self) -> Result<(), TapError> {
        let socket = self.control_socket()?;
        let mut ifr = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS fills the flags of an ifreq, which `ifr` is.
        if unsafe { ioctl_with_mut_ref(&socket, libc::SIOCGIFFLAGS as _, &mut ifr) } < 0 {
            return Err(self.ioctl_error("SIOCGIFFLAGS"));
        }
        // SAFETY: SIOCGIFFLAGS just wrote the flags member.
        unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16 };
        // SAFETY: SIOCSIFFLAGS reads an ifreq, which `ifr` is.
        if unsafe { ioctl_with_ref(&socket, libc::SIOCSIFFLAGS as _, &ifr) } < 0 {
            return Err(self.ioctl_error("SIOCSIFFLAGS"));
        }
        Ok(())
    }

    /// A socket to address interface ioctls to (any AF_INET socket will do).
    fn control_socket(&self) -> Result<OwnedFd, TapError> {
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(self.ioctl_error("socket(AF_INET)"));
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The last OS error, reported for ioctl `what`; permission errors get the usual fix.
    fn ioctl_error(&self, what: &'static str) -> TapError {
        let source = io::Error::last_os_error();
        let name = self.name.clone();
        match source.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => TapError::NotPermitted { name, source },
            _ => TapError::Ioctl { name, what, source },
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Whether interface `name` has its carrier on (`ETHTOOL_GLINK`); `None` if there is no such
/// interface. tun turns a tap's carrier on as a queue attaches and off as the last one
/// leaves, so a tap with its carrier on is one some process is using.
fn carrier(name: &str) -> Result<Option<bool>, TapError> {
    /// `struct ethtool_value`.
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_GLINK: u32 = 0x0a;
    let error = |source| TapError::Ioctl {
        name: name.to_string(),
        what: "SIOCETHTOOL",
        source,
    };
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(error(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GLINK,
        data: 0,
    };
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_data = std::ptr::addr_of_mut!(value).cast();
    // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value its data points to, which
    // lives until the call returns, and writes the link state into it.
    if unsafe { ioctl_with_mut_ref(&socket, libc::SIOCETHTOOL as _, &mut ifr) } < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENODEV) => Ok(None),
            _ => Err(error(err)),
        };
    }
    Ok(Some(value.data != 0))
}

/// An all-zero ifreq naming interface `name` (already checked to fit).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data for which all zeroes is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    /// Runs `test` on a thread of its own in a fresh network namespace, so that taps and
    /// addresses never touch the host's networking. Returns `false` (after saying why) where
    /// that is not permitted, e.g. without root.
    fn in_private_netns(test: impl FnOnce() + Send + 'static) -> bool {
        thread::spawn(move || {
            // SAFETY: unshare affects the calling thread only (CLONE_NEWNET alone).
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "TAP TEST SKIPPED: cannot enter a private network namespace ({}): needs root",
                    io::Error::last_os_error()
                );
                return false;
            }
            if !std::path::Path::new("/dev/net/tun").exists() {
                eprintln!("TAP TEST SKIPPED: no /dev/net/tun");
                return false;
            }
            test();
            true
        })
        .join()
        .expect("tap test panicked")
    }

    /// The ifreq that interface ioctl `request` returns for interface `name`.
    fn query(name: &str, request: libc::c_ulong) -> libc::ifreq {
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(fd >= 0);
        // SAFETY: just opened.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ifr = ifreq(name);
        // SAFETY: the request fills an ifreq.
        assert!(unsafe { ioctl_with_mut_ref(&socket, request as _, &mut ifr) } >= 0);
        ifr
    }

    fn ipv4_of(name: &str) -> (Ipv4Addr, Ipv4Addr) {
        let read = |request| {
            let ifr = query(name, request);
            // SAFETY: filled with a sockaddr_in for AF_INET.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read(std::ptr::addr_of!(ifr.ifr_ifru).cast()) };
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
        };
        (read(libc::SIOCGIFADDR), read(libc::SIOCGIFNETMASK))
    }

    /// A tap queue opened as an orchestrator opens one (Kata: a single queue with virtio-net
    /// headers), blocking, its descriptor to pass on.
    fn open_as_a_client(name: &str, flags: i32) -> OwnedFd {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut ifr = ifreq(name);
        ifr.ifr_ifru.ifru_flags = flags as i16;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `ifr` is.
        assert!(unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as _, &mut ifr) } >= 0);
        OwnedFd::from(file)
    }

    #[test]
    fn a_tap_passed_as_a_descriptor_is_taken_as_it_was_opened() {
        in_private_netns(|| {
            let vnet = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
            let taps = Tap::from_fds(vec![open_as_a_client("kata0", vnet)]).unwrap();
            assert_eq!(taps[0].name(), "kata0");
            // SAFETY: fcntl on a descriptor the tap owns.
            let status = unsafe { libc::fcntl(taps[0].as_raw_fd(), libc::F_GETFL) };
            assert_ne!(status & libc::O_NONBLOCK, 0, "made non-blocking");
            assert_ne!(taps[0].supported_offloads() & libc::TUN_F_CSUM, 0);

            let bare = open_as_a_client("bare0", libc::IFF_TAP | libc::IFF_NO_PI);
            let err = Tap::from_fds(vec![bare]).unwrap_err();
            assert!(
                matches!(err, TapError::WithoutVnetHeader(ref n) if n == "bare0"),
                "{err}"
            );

            let (read, _write) = std::io::pipe().unwrap();
            let err = Tap::from_fds(vec![OwnedFd::from(read)]).unwrap_err();
            assert!(err.to_string().contains("is not a tap"), "{err}");

            let multi = vnet | libc::IFF_MULTI_QUEUE;
            let err = Tap::from_fds(vec![
                open_as_a_client("mq0", multi),
                open_as_a_client("mq1", multi),
            ])
            .unwrap_err();
            assert!(matches!(err, TapError::DifferentTaps(..)), "{err}");
        });
    }

    #[test]
    fn names_are_checked() {
        for good in ["", "vmtap0", "tap-guest_1", "a23456789012345"] {
            assert!(validate_tap_name(good).is_ok(), "{good}");
        }
        for bad in ["a234567890123456", "a/b", "eth0:1", "t%d", "a b", ".", ".."] {
            let err = validate_tap_name(bad).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("tap={bad:?} is not")),
                "{err}"
            );
        }
    }

    #[test]
    fn created_tap_is_named_configured_and_up() {
        in_private_netns(|| {
            let tap = Tap::open("").unwrap();
            assert_eq!(tap.name(), "vmtap0");
            assert_ne!(tap.supported_offloads() & libc::TUN_F_CSUM, 0);
            tap.set_offloads(tap.supported_offloads()).unwrap();
            let second = Tap::open("").unwrap();
            assert_eq!(second.name(), "vmtap1");

            tap.set_ipv4(
                Ipv4Addr::new(192, 168, 249, 1),
                Ipv4Addr::new(255, 255, 255, 0),
            )
            .unwrap();
            assert_eq!(
                ipv4_of("vmtap0"),
                (
                    Ipv4Addr::new(192, 168, 249, 1),
                    Ipv4Addr::new(255, 255, 255, 0)
                )
            );
            // SAFETY: SIOCGIFFLAGS fills the flags member.
            let flags = unsafe { query("vmtap0", libc::SIOCGIFFLAGS).ifr_ifru.ifru_flags };
            assert_ne!(flags & libc::IFF_UP as i16, 0, "the tap is up");
        });
    }

    /// A multi-queue tap another user has queues on is refused, not joined (the kernel would
    /// let a second user add queues and share its traffic); free again once that user closed
    /// its queues.
    #[test]
    fn a_multi_queue_tap_in_use_is_not_joined() {
        in_private_netns(|| {
            let other = Tap::open_queues("mq0", 2).unwrap();
            let err = Tap::open_queues("mq0", 2).unwrap_err();
            assert!(matches!(err, TapError::InUse(_)), "{err}");
            assert_eq!(carrier("mq0").unwrap(), Some(true));
            assert_eq!(carrier("absent0").unwrap(), None);
            drop(other);
            // Not persistent: it went with its queues, and the name is free again.
            let mine = Tap::open_queues("mq0", 2).unwrap();
            assert_eq!(mine.len(), 2);
        });
    }

    #[test]
    fn named_taps_are_created_reopened_and_refused_while_busy() {
        in_private_netns(|| {
            let tap = Tap::open("guest0").unwrap();
            assert_eq!(tap.name(), "guest0");
            // A single-queue tap has one user at a time.
            let err = Tap::open("guest0").unwrap_err();
            assert!(matches!(err, TapError::InUse(_)), "{err}");
            assert_eq!(
                err.to_string(),
                "tap guest0 is in use by another process; give another tap= name, or tap= for a new tap"
            );
            // Not persistent: closing removes it, and the name is free again.
            drop(tap);
            Tap::open("guest0").unwrap();

            let err = Tap::open("lo").unwrap_err();
            assert!(matches!(err, TapError::NotATap(_)), "{err}");
            assert!(err
                .to_string()
                .starts_with("lo exists but is not a single-queue tap"));
        });
    }

    /// The datagrams of [`broadcast_flows`] waiting on each queue of `queues`, read until
    /// each is empty (the host sends other frames of its own too).
    fn flows_per_queue(queues: &[Tap]) -> Vec<usize> {
        let mut frame = vec![0u8; 2048];
        queues
            .iter()
            .map(|queue| {
                let mut count = 0;
                loop {
                    // SAFETY: reads into a live buffer of the given length.
                    let len = unsafe {
                        libc::read(queue.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len())
                    };
                    if len <= 0 {
                        return count;
                    }
                    count += usize::from(frame[..len as usize].ends_with(b"flow"));
                }
            })
            .collect()
    }

    /// The host sends `flows` broadcast datagrams out of the tap, each from its own port (a
    /// flow of its own, which the kernel may put on any attached queue).
    fn broadcast_flows(flows: u16) {
        for port in 0..flows {
            let socket =
                std::net::UdpSocket::bind((Ipv4Addr::new(10, 0, 0, 1), 40000 + port)).unwrap();
            socket.set_broadcast(true).unwrap();
            socket
                .send_to(b"flow", (Ipv4Addr::new(10, 0, 0, 255), 9))
                .unwrap();
        }
        thread::sleep(std::time::Duration::from_millis(50));
    }

    #[test]
    fn a_multi_queue_tap_sends_only_to_its_attached_queues() {
        in_private_netns(|| {
            let queues = Tap::open_queues("", 3).unwrap();
            assert_eq!(queues.len(), 3);
            assert!(queues.iter().all(|q| q.name() == "vmtap0"), "{queues:?}");
            queues[0]
                .set_ipv4(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(255, 255, 255, 0))
                .unwrap();
            flows_per_queue(&queues);

            queues[1].set_queue_attached(false).unwrap();
            queues[2].set_queue_attached(false).unwrap();
            broadcast_flows(32);
            assert_eq!(flows_per_queue(&queues), [32, 0, 0]);

            queues[1].set_queue_attached(true).unwrap();
            queues[2].set_queue_attached(true).unwrap();
            broadcast_flows(32);
            let spread = flows_per_queue(&queues);
            assert_eq!(spread.iter().sum::<usize>(), 32, "{spread:?}");
            assert!(spread.iter().filter(|&&n| n > 0).count() >= 2, "{spread:?}");

            // A single-queue tap in use is refused as in use, before its kind matters.
            let single = Tap::open("guest1").unwrap();
            let err = Tap::open_queues("guest1", 2).unwrap_err();
            assert!(matches!(err, TapError::InUse(_)), "{err}");
            drop(single);
            assert_eq!(Tap::open_queues("guest1", 1).unwrap().len(), 1);
        });
    }

    /// A frame written with a virtio-net header reaches the host stack, and the host's answer
    /// comes back with a header in front: ARP for the host's own address.
    #[test]
    fn frames_carry_virtio_net_headers_both_ways() {
        in_private_netns(|| {
            let tap = Tap::open("").unwrap();
            tap.set_ipv4(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(255, 255, 255, 0))
                .unwrap();
            let guest_mac = [0x02, 0, 0, 0, 0, 2];
            let mut frame = vec![0u8; VNET_HDR_LEN];
            frame.extend_from_slice(&[0xff; 6]);
            frame.extend_from_slice(&guest_mac);
            frame.extend_from_slice(&[0x08, 0x06]); // ARP
            frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4 request
            frame.extend_from_slice(&guest_mac);
            frame.extend_from_slice(&[10, 0, 0, 2]);
            frame.extend_from_slice(&[0; 6]);
            frame.extend_from_slice(&[10, 0, 0, 1]);
            // SAFETY: writes from a live buffer of the given length.
            let written =
                unsafe { libc::write(tap.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            assert_eq!(
                written,
                frame.len() as isize,
                "{}",
                io::Error::last_os_error()
            );

            let mut reply = [0u8; 2048];
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                assert!(std::time::Instant::now() < deadline, "no ARP reply");
                // SAFETY: reads into a live buffer of the given length.
                let got =
                    unsafe { libc::read(tap.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len()) };
                if got < 0 {
                    thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
                let frame = &reply[..got as usize];
                // IPv6 router solicitations and the like also come out of a fresh interface.
                let eth = &frame[VNET_HDR_LEN..];
                if eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 2] {
                    assert_eq!(&eth[..6], &guest_mac);
                    assert_eq!(&eth[28..32], &[10, 0, 0, 1]);
                    // No offloads were allowed: a plain header.
                    assert_eq!(&frame[..10], &[0; 10]);
                    break;
                }
            }
        });
    }
}
