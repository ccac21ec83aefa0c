//! The allow-list of each thread kind: the system calls it may make and, for `ioctl` and
//! `prctl`, the requests and options it may make them with.
//!
//! Filters stack: a thread keeps the filter of the thread that created it and adds its own, so
//! what it may do is the intersection. Device threads are created by vCPU threads (the guest
//! activates a device by writing its status register), so the vCPU list is built to contain
//! every device thread's list ([`vcpu`]); the other threads are created before any filter is
//! installed.

use std::collections::BTreeSet;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_create_device, kvm_device_attr, kvm_fpu, kvm_ioeventfd,
    kvm_irq_routing, kvm_irqfd, kvm_lapic_state, kvm_msi, kvm_msrs, kvm_pit_config, kvm_regs,
    kvm_sregs, kvm_userspace_memory_region, KVMIO,
};
use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
use vhost::vhost_kern::vhost_binding::{
    vhost_memory, vhost_vring_addr, vhost_vring_file, vhost_vring_state, VHOST,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

use crate::ThreadKind;

/// A system call: its x86_64 number and name.
pub(crate) type Syscall = (i64, &'static str);

/// A value allowed in an argument (an `ioctl` request, a `prctl` option) and its name.
pub(crate) type Value = (u32, &'static str);

macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name))),*]
    };
}

const fn kvm_write<T>(nr: u32) -> u32 {
    ioctl_expr(_IOC_WRITE, KVMIO, nr, std::mem::size_of::<T>() as u32) as u32
}

const fn kvm_read<T>(nr: u32) -> u32 {
    ioctl_expr(_IOC_READ, KVMIO, nr, std::mem::size_of::<T>() as u32) as u32
}

const fn vfio(nr: u32) -> u32 {
    ioctl_expr(_IOC_NONE, VFIO_TYPE as u32, VFIO_BASE + nr, 0) as u32
}

const fn vhost_write<T>(nr: u32) -> u32 {
    ioctl_expr(_IOC_WRITE, VHOST, nr, std::mem::size_of::<T>() as u32) as u32
}

const fn kvm_none(nr: u32) -> u32 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u32
}

const fn kvm_read_write<T>(nr: u32) -> u32 {
    ioctl_expr(
        _IOC_READ | _IOC_WRITE,
        KVMIO,
        nr,
        std::mem::size_of::<T>() as u32,
    ) as u32
}

const fn vhost_read<T>(nr: u32) -> u32 {
    ioctl_expr(_IOC_READ, VHOST, nr, std::mem::size_of::<T>() as u32) as u32
}

pub(crate) const KVM_RUN: Value = (ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0) as u32, "KVM_RUN");
/// MSI-X vectors are routed when the guest programs them.
const KVM_SET_GSI_ROUTING: Value = (kvm_write::<kvm_irq_routing>(0x6a), "KVM_SET_GSI_ROUTING");
const KVM_IRQFD: Value = (kvm_write::<kvm_irqfd>(0x76), "KVM_IRQFD");
/// Queue notifications are wired when the guest places the notification BAR.
const KVM_IOEVENTFD: Value = (kvm_write::<kvm_ioeventfd>(0x79), "KVM_IOEVENTFD");
/// A passed-through device's BARs are mapped into the guest where the guest places them.
const KVM_SET_USER_MEMORY_REGION: Value = (
    kvm_write::<kvm_userspace_memory_region>(0x46),
    "KVM_SET_USER_MEMORY_REGION",
);
const KVM_SIGNAL_MSI: Value = (kvm_write::<kvm_msi>(0xa5), "KVM_SIGNAL_MSI");
/// The guest's clock, read once every vCPU stopped for `vm.pause` and set back on `vm.resume`.
pub(crate) const KVM_GET_CLOCK: Value = (kvm_read::<kvm_clock_data>(0x7c), "KVM_GET_CLOCK");
pub(crate) const KVM_SET_CLOCK: Value = (kvm_write::<kvm_clock_data>(0x7b), "KVM_SET_CLOCK");
/// MSI-X of a passed-through device, wired to irqfds when the guest enables it.
const VFIO_DEVICE_SET_IRQS: Value = (vfio(10), "VFIO_DEVICE_SET_IRQS");
const VFIO_DEVICE_RESET: Value = (vfio(11), "VFIO_DEVICE_RESET");
/// The guest's virtio-iommu MAP and UNMAP requests, mirrored into the host IOMMU.
const VFIO_IOMMU_MAP_DMA: Value = (vfio(13), "VFIO_IOMMU_MAP_DMA");
const VFIO_IOMMU_UNMAP_DMA: Value = (vfio(14), "VFIO_IOMMU_UNMAP_DMA");
/// Opening a hot-added passed-through device (`vfio::open`): a container, its group set into
/// it and the type1 IOMMU chosen, the device's fd, its regions and interrupts, the host
/// IOMMU's page sizes and IOVA ranges; its group is unset again on removal.
const VFIO_OPEN: [Value; 11] = [
    (vfio(0), "VFIO_GET_API_VERSION"),
    (vfio(1), "VFIO_CHECK_EXTENSION"),
    (vfio(2), "VFIO_SET_IOMMU"),
    (vfio(3), "VFIO_GROUP_GET_STATUS"),
    (vfio(4), "VFIO_GROUP_SET_CONTAINER"),
    (vfio(5), "VFIO_GROUP_UNSET_CONTAINER"),
    (vfio(6), "VFIO_GROUP_GET_DEVICE_FD"),
    (vfio(7), "VFIO_DEVICE_GET_INFO"),
    (vfio(8), "VFIO_DEVICE_GET_REGION_INFO"),
    (vfio(9), "VFIO_DEVICE_GET_IRQ_INFO"),
    (vfio(12), "VFIO_IOMMU_GET_INFO"),
];
/// Telling the VM's KVM VFIO device of a hot-added device's group, and forgetting it.
const KVM_SET_DEVICE_ATTR: Value = (kvm_write::<kvm_device_attr>(0xe1), "KVM_SET_DEVICE_ATTR");
/// A disk on a host block device: DISCARD and WRITE_ZEROES (`<linux/fs.h>`).
const BLKDISCARD: Value = (ioctl_expr(_IOC_NONE, 0x12, 119, 0) as u32, "BLKDISCARD");
const BLKZEROOUT: Value = (ioctl_expr(_IOC_NONE, 0x12, 127, 0) as u32, "BLKZEROOUT");
/// Sizing a disk on a host block device when it is opened.
const BLKGETSIZE64: Value = (ioctl_expr(_IOC_READ, 0x12, 114, 8) as u32, "BLKGETSIZE64");
const BLKSSZGET: Value = (ioctl_expr(_IOC_NONE, 0x12, 104, 0) as u32, "BLKSSZGET");
/// A tap's offloads follow what the driver negotiated, on activation and reset (and, when a
/// tap is opened, the offloads it can deliver are probed with it).
const TUNSETOFFLOAD: Value = (libc::TUNSETOFFLOAD as u32, "TUNSETOFFLOAD");
/// A multi-queue net's control queue detaches the tap queues of the pairs the driver does
/// not use, and attaches them when it asks for them (on the worker thread; on activation, on
/// the vCPU's).
const TUNSETQUEUE: Value = (libc::TUNSETQUEUE as u32, "TUNSETQUEUE");
/// A net with `vhost=on` hands its rings to the kernel's vhost-net when the guest starts it
/// (on a vCPU thread), and stops them on reset (there, or on the hotplug thread when the net
/// is removed).
pub(crate) const VHOST_START: [Value; 7] = [
    (vhost_write::<u64>(0x00), "VHOST_SET_FEATURES"),
    (vhost_write::<vhost_memory>(0x03), "VHOST_SET_MEM_TABLE"),
    (
        vhost_write::<vhost_vring_state>(0x10),
        "VHOST_SET_VRING_NUM",
    ),
    (
        vhost_write::<vhost_vring_addr>(0x11),
        "VHOST_SET_VRING_ADDR",
    ),
    (
        vhost_write::<vhost_vring_state>(0x12),
        "VHOST_SET_VRING_BASE",
    ),
    (
        vhost_write::<vhost_vring_file>(0x20),
        "VHOST_SET_VRING_KICK",
    ),
    (
        vhost_write::<vhost_vring_file>(0x21),
        "VHOST_SET_VRING_CALL",
    ),
];
pub(crate) const VHOST_NET_SET_BACKEND: Value = (
    vhost_write::<vhost_vring_file>(0x30),
    "VHOST_NET_SET_BACKEND",
);
/// Opening a hot-added net's tap (`net_util::Tap::open`): attaching to (or creating) the
/// interface with virtio-net headers, and setting the header size to 12 bytes.
const TUNSETIFF: Value = (libc::TUNSETIFF as u32, "TUNSETIFF");
const TUNSETVNETHDRSZ: Value = (libc::TUNSETVNETHDRSZ as u32, "TUNSETVNETHDRSZ");
/// A tap passed as a descriptor (`vm.add-net` with `SCM_RIGHTS`): its name and flags.
const TUNGETIFF: Value = (libc::TUNGETIFF as u32, "TUNGETIFF");
/// Bringing the tap up, and giving its host end the address and netmask `NetConfig` asks for,
/// through an AF_INET datagram socket (the only kind `socket` is allowed to make).
const SIOCGIFFLAGS: Value = (libc::SIOCGIFFLAGS as u32, "SIOCGIFFLAGS");
const SIOCSIFFLAGS: Value = (libc::SIOCSIFFLAGS as u32, "SIOCSIFFLAGS");
const SIOCSIFADDR: Value = (libc::SIOCSIFADDR as u32, "SIOCSIFADDR");
const SIOCSIFNETMASK: Value = (libc::SIOCSIFNETMASK as u32, "SIOCSIFNETMASK");
const SIOCETHTOOL: Value = (libc::SIOCETHTOOL as u32, "SIOCETHTOOL");
/// The only signal `tgkill` may send (argument 2): the one that kicks a vCPU out of the guest
/// for `vm.pause` ([`crate::vcpu_kick_signal`]).
fn kick_signals() -> [Value; 1] {
    [(crate::vcpu_kick_signal() as u32, "SIGRTMIN (vCPU kick)")]
}

/// The socket interface ioctls are addressed to: AF_INET only (argument 0), unless a list
/// says otherwise.
const SOCKET_DOMAINS: &[Value] = &[INET_SOCKET];
const INET_SOCKET: Value = (libc::AF_INET as u32, "AF_INET");
/// A vsock device's host side: its listening socket, and the guest's connections to host
/// programs' sockets.
const UNIX_SOCKET: Value = (libc::AF_UNIX as u32, "AF_UNIX");
/// The `prctl` options of starting a thread: std names it, the filter is installed with
/// no-new-privileges, and the SIGSYS report reads the name first.
const PRCTL_OPTIONS: &[Value] = &[
    (libc::PR_SET_NAME as u32, "PR_SET_NAME"),
    (libc::PR_GET_NAME as u32, "PR_GET_NAME"),
    (libc::PR_SET_NO_NEW_PRIVS as u32, "PR_SET_NO_NEW_PRIVS"),
];

/// A debug build's std checks that a descriptor is open before closing it (`fcntl(fd,
/// F_GETFD)` in `OwnedFd`'s drop), and every thread closes what it drops: without it a debug
/// build's API thread died closing its first client. A thread that needs no other `fcntl`
/// gets this command alone, and only in debug builds.
const DEBUG_FD_CHECK: Value = (libc::F_GETFD as u32, "F_GETFD");

/// Accepted API clients are made non-blocking.
const FIONBIO: Value = (libc::FIONBIO as u32, "FIONBIO");

/// The terminal's mode is restored on exit (glibc's tcsetattr reads it back to check).
const TCSETS: Value = (libc::TCSETS as u32, "TCSETS");
const TCGETS: Value = (libc::TCGETS as u32, "TCGETS");
// A `Pty` serial port or console: unlock its master and learn its number.
const TIOCSPTLCK: Value = (libc::TIOCSPTLCK as u32, "TIOCSPTLCK");
const TIOCGPTN: Value = (libc::TIOCGPTN as u32, "TIOCGPTN");

/// What any thread may need once confined: allocating (which may map, grow or give back memory),
/// locking, logging to stderr, sleeping, closing what it drops, and ending. `write` and
/// `exit_group` are also what the SIGSYS report needs, whichever thread it runs on.
const BASE: &[Syscall] = syscalls![
    SYS_brk,
    SYS_mmap,
    SYS_mremap,
    SYS_munmap,
    SYS_madvise,
    SYS_mprotect,
    SYS_futex,
    SYS_write,
    SYS_sched_yield,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_getrandom,
    SYS_gettid,
    SYS_close,
    SYS_sigaltstack,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_restart_syscall,
    SYS_exit,
    SYS_exit_group,
];

/// The device worker loop: waiting in epoll, draining notifier eventfds, signalling irqfds.
const WORKER_LOOP: &[Syscall] = syscalls![
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
    SYS_read,
    SYS_write,
];

/// Starting a thread and confining it: a vCPU does this when the guest activates a device, and
/// the new thread runs under the vCPU's filter until it has installed its own.
const THREAD_START: &[Syscall] = syscalls![
    SYS_clone,
    SYS_clone3,
    SYS_set_robust_list,
    SYS_rseq,
    // Only with PRCTL_OPTIONS.
    SYS_prctl,
    SYS_sched_getaffinity,
    SYS_seccomp,
    // A worker's epoll set, kill eventfd and notifier clones are made before it starts.
    SYS_epoll_create1,
    SYS_eventfd2,
    SYS_fcntl,
    SYS_dup,
];

/// A thread kind's allow-list.
pub(crate) struct AllowList {
    pub syscalls: BTreeSet<Syscall>,
    /// The requests `ioctl` is allowed with (argument 1); empty: no `ioctl` at all.
    pub ioctls: BTreeSet<Value>,
    /// The options `prctl` is allowed with (argument 0), if `syscalls` holds it.
    pub prctl_options: BTreeSet<Value>,
    /// The domains `socket` is allowed with (argument 0), if `syscalls` holds it.
    pub socket_domains: BTreeSet<Value>,
    /// The signals `tgkill` may send (argument 2), if `syscalls` holds it.
    pub signals: BTreeSet<Value>,
    /// The commands `fcntl` is restricted to (argument 1), if `syscalls` holds it; `None`:
    /// any command.
    pub fcntl_commands: Option<BTreeSet<Value>>,
}

impl AllowList {
    fn new(parts: &[&[Syscall]], ioctls: &[Value]) -> Self {
        let mut syscalls: BTreeSet<Syscall> =
            parts.iter().flat_map(|p| p.iter().copied()).collect();
        // Every thread may log, and writing a log line may ask whether stderr is a terminal
        // (isatty: TCGETS, which only reads the terminal's mode); seen on a vCPU thread's
        // first warning.
        syscalls.insert((libc::SYS_ioctl, "SYS_ioctl"));
        let ioctls: Vec<Value> = ioctls.iter().copied().chain([TCGETS]).collect();
        let prctl_options = if syscalls.iter().any(|&(nr, _)| nr == libc::SYS_prctl) {
            PRCTL_OPTIONS.iter().copied().collect()
        } else {
            BTreeSet::new()
        };
        let socket_domains = if syscalls.iter().any(|&(nr, _)| nr == libc::SYS_socket) {
            SOCKET_DOMAINS.iter().copied().collect()
        } else {
            BTreeSet::new()
        };
        let signals = if syscalls.iter().any(|&(nr, _)| nr == libc::SYS_tgkill) {
            kick_signals().into_iter().collect()
        } else {
            BTreeSet::new()
        };
        let fcntl = (libc::SYS_fcntl, "SYS_fcntl");
        let fcntl_commands = if syscalls.contains(&fcntl) {
            None
        } else if cfg!(debug_assertions) {
            syscalls.insert(fcntl);
            Some(BTreeSet::from([DEBUG_FD_CHECK]))
        } else {
            Some(BTreeSet::new())
        };
        AllowList {
            syscalls,
            ioctls: ioctls.into_iter().collect(),
            prctl_options,
            socket_domains,
            signals,
            fcntl_commands,
        }
    }

    /// The list, `socket` allowed with `domains` instead of the default ones.
    fn with_socket_domains(mut self, domains: &[Value]) -> Self {
        self.socket_domains = domains.iter().copied().collect();
        self
    }

    fn extend(&mut self, other: &AllowList) {
        self.syscalls.extend(other.syscalls.iter().copied());
        self.ioctls.extend(other.ioctls.iter().copied());
        self.prctl_options
            .extend(other.prctl_options.iter().copied());
        self.socket_domains
            .extend(other.socket_domains.iter().copied());
        self.signals.extend(other.signals.iter().copied());
        self.fcntl_commands = match (self.fcntl_commands.take(), &other.fcntl_commands) {
            (Some(mut mine), Some(theirs)) => {
                mine.extend(theirs.iter().copied());
                Some(mine)
            }
            _ => None,
        };
    }
}

/// The device thread kinds, which vCPU threads create.
pub(crate) const DEVICE_KINDS: &[ThreadKind] = &[
    ThreadKind::Block,
    ThreadKind::Net,
    ThreadKind::Rng,
    ThreadKind::Console,
    ThreadKind::IommuEvents,
    ThreadKind::IommuPoller,
    ThreadKind::Vsock,
    ThreadKind::Fs,
];

/// A vhost-user back end's socket (virtio-fs): connected (AF_UNIX) when the device is made,
/// and again when it starts after the back end went away; messages, and the descriptors they
/// carry (guest RAM, eventfds), go with sendmsg/recvmsg, under a deadline set on the socket.
const VHOST_USER: &[Syscall] = syscalls![
    SYS_socket,
    SYS_connect,
    SYS_setsockopt,
    SYS_sendmsg,
    SYS_recvmsg,
];

pub(crate) fn allow_list(kind: ThreadKind) -> AllowList {
    match kind {
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::Vmm => vmm(),
        ThreadKind::Block => AllowList::new(
            &[
                BASE,
                WORKER_LOOP,
                // Submitting to and reaping from the queue's io_uring. The ring is made, and
                // everything registered on it, when the disk is created, before any filter:
                // neither io_uring_setup nor io_uring_register is allowed here.
                syscalls![SYS_io_uring_enter],
                // The synchronous fallback where the host refuses io_uring: reads, writes,
                // FLUSH and write-through, DISCARD and WRITE_ZEROES on an image file.
                syscalls![SYS_preadv, SYS_pwritev, SYS_fdatasync, SYS_fallocate],
            ],
            // DISCARD and WRITE_ZEROES on a host block device.
            &[BLKDISCARD, BLKZEROOUT],
        ),
        ThreadKind::Net => {
            // Frames to the tap from the guest's buffers, and from the tap into them.
            AllowList::new(
                &[BASE, WORKER_LOOP, syscalls![SYS_writev, SYS_readv]],
                &[TUNSETQUEUE],
            )
        }
        ThreadKind::Rng | ThreadKind::Console | ThreadKind::IommuEvents => {
            AllowList::new(&[BASE, WORKER_LOOP], &[])
        }
        // Host programs' connections: accepted from the device's listening socket (made with
        // the device) and made non-blocking, or made to a program's socket for the guest
        // (non-blocking from the start); bytes read and written, a side shut down.
        ThreadKind::Vsock => AllowList::new(
            &[
                BASE,
                WORKER_LOOP,
                syscalls![
                    SYS_accept4,
                    SYS_socket,
                    SYS_connect,
                    SYS_shutdown,
                    // std's socket reads and writes (a client's CONNECT line, the OK
                    // line and bytes a slow client was kept waiting) are recv(2) and
                    // send(2); the data path's are read(2)/write(2).
                    SYS_recvfrom,
                    SYS_sendto,
                ],
            ],
            &[FIONBIO],
        )
        .with_socket_domains(&[UNIX_SOCKET]),
        // Interrupts for the back end's rings; the guest's requests once it is gone.
        ThreadKind::Fs => AllowList::new(&[BASE, WORKER_LOOP], &[]),
        // Serves MAP/UNMAP requests, which reach the host IOMMU for passed-through endpoints.
        ThreadKind::IommuPoller => {
            AllowList::new(&[BASE], &[VFIO_IOMMU_MAP_DMA, VFIO_IOMMU_UNMAP_DMA])
        }
        ThreadKind::Signals => AllowList::new(&[BASE, syscalls![SYS_rt_sigtimedwait]], &[]),
        // Terminal input, or a serial pty's, which it polls beside its stop eventfd.
        ThreadKind::SerialInput => {
            AllowList::new(&[BASE, syscalls![SYS_read, SYS_poll, SYS_ppoll]], &[])
        }
        // Plugs devices in and out while the guest runs (`--api-socket`): opens a disk image,
        // makes the device's eventfds, MSI vectors (irqfds and routes) and queue notification
        // ioeventfds, and undoes them on removal, when it also joins the device's threads.
        // A disk's io_uring rings are made (and restricted, through io_uring_register) with
        // the disk, so here, as on the boot path before any filter. A net's tap is opened
        // (`/dev/net/tun`), attached, sized for virtio-net headers, probed for offloads,
        // brought up and given its host address (an AF_INET socket's ioctls; an existing
        // multi-queue tap's carrier is read first, to refuse one in use) here; closing it
        // on removal is a `close`. A passed-through device is checked in sysfs (links and
        // directories read), opened through VFIO (VFIO_OPEN), its configuration space read
        // and its BARs mapped into warden; guest RAM is mapped for its DMA, or, behind the
        // IOMMU, the guest's mappings withdrawn when it leaves.
        ThreadKind::Hotplug => {
            let mut ioctls = vec![
                KVM_IRQFD,
                KVM_SET_GSI_ROUTING,
                KVM_IOEVENTFD,
                KVM_SET_DEVICE_ATTR,
                BLKGETSIZE64,
                BLKSSZGET,
                TUNSETIFF,
                TUNGETIFF,
                TUNSETVNETHDRSZ,
                TUNSETOFFLOAD,
                SIOCGIFFLAGS,
                SIOCSIFFLAGS,
                SIOCSIFADDR,
                SIOCSIFNETMASK,
                SIOCETHTOOL,
                VFIO_IOMMU_MAP_DMA,
                VFIO_IOMMU_UNMAP_DMA,
                VFIO_DEVICE_SET_IRQS,
                VHOST_NET_SET_BACKEND,
                FIONBIO,
            ];
            ioctls.extend(VFIO_OPEN);
            AllowList::new(
                &[
                    BASE,
                    syscalls![
                        SYS_io_uring_setup,
                        SYS_io_uring_register,
                        SYS_openat,
                        SYS_fstat,
                        SYS_newfstatat,
                        SYS_statx,
                        SYS_lseek,
                        SYS_eventfd2,
                        SYS_fcntl,
                        SYS_dup,
                        SYS_read,
                        SYS_pread64,
                        SYS_readlink,
                        SYS_readlinkat,
                        SYS_getdents64,
                        // A tap's host address (AF_INET), a vsock's listening socket
                        // (AF_UNIX), which goes with the device.
                        SYS_socket,
                        SYS_bind,
                        SYS_listen,
                        SYS_unlink,
                        SYS_unlinkat,
                    ],
                    // A share's back end, connected with the device, its rings stopped
                    // on removal.
                    VHOST_USER,
                ],
                &ioctls,
            )
            .with_socket_domains(&[INET_SOCKET, UNIX_SOCKET])
        }
        // One poll loop over the listening socket and its clients; each request goes to the
        // VMM thread and its answer comes back over channels (futex), so the API thread acts
        // on nothing itself.
        ThreadKind::Api => AllowList::new(
            &[
                BASE,
                syscalls![
                    SYS_poll,
                    SYS_ppoll,
                    SYS_accept4,
                    SYS_accept,
                    SYS_read,
                    // With the descriptors a client passes (`SCM_RIGHTS`).
                    SYS_recvmsg,
                    SYS_recvfrom,
                    SYS_sendto,
                    SYS_shutdown,
                ],
            ],
            &[FIONBIO],
        ),
    }
}

/// Building a VM on the VMM thread, besides what the threads it starts do: opening its files
/// (kernel, initramfs, images, taps, /dev/vhost-net, VFIO groups), mapping guest RAM (a
/// memfd, or a file sized to it), making each disk's io_uring, and the eventfds and epoll sets
/// of devices and interrupts.
const BUILD: &[Syscall] = syscalls![
    SYS_openat,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_fstatfs,
    SYS_lseek,
    SYS_ftruncate,
    SYS_memfd_create,
    SYS_getdents64,
    SYS_readlink,
    SYS_readlinkat,
    SYS_io_uring_setup,
    SYS_io_uring_register,
    SYS_io_uring_enter,
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_dup,
    // A tap's host address (AF_INET); a vsock's listening socket (AF_UNIX, from the device
    // lists), removed with the device.
    SYS_socket,
    SYS_bind,
    SYS_listen,
    SYS_unlink,
    SYS_unlinkat,
    // Only with the kick signal: a pause, and the end of a VM, kick its vCPUs out.
    SYS_tgkill,
];

/// The calls that make a VM and its vCPUs (KVM's), hold the guest's clock still across a
/// pause, open a vhost-net instance, put the terminal in raw mode and back, and reset
/// passed-through devices when a VM ends.
const BUILD_IOCTLS: [Value; 29] = [
    (kvm_none(0x01), "KVM_CREATE_VM"),
    (kvm_none(0x04), "KVM_GET_VCPU_MMAP_SIZE"),
    (
        kvm_read_write::<kvm_cpuid2>(0x05),
        "KVM_GET_SUPPORTED_CPUID",
    ),
    (kvm_none(0x41), "KVM_CREATE_VCPU"),
    (kvm_none(0x47), "KVM_SET_TSS_ADDR"),
    (kvm_write::<u64>(0x48), "KVM_SET_IDENTITY_MAP_ADDR"),
    (kvm_none(0x60), "KVM_CREATE_IRQCHIP"),
    (kvm_write::<kvm_pit_config>(0x77), "KVM_CREATE_PIT2"),
    (kvm_write::<kvm_regs>(0x82), "KVM_SET_REGS"),
    (kvm_read::<kvm_sregs>(0x83), "KVM_GET_SREGS"),
    (kvm_write::<kvm_sregs>(0x84), "KVM_SET_SREGS"),
    (kvm_write::<kvm_msrs>(0x89), "KVM_SET_MSRS"),
    (kvm_write::<kvm_fpu>(0x8d), "KVM_SET_FPU"),
    (kvm_read::<kvm_lapic_state>(0x8e), "KVM_GET_LAPIC"),
    (kvm_write::<kvm_lapic_state>(0x8f), "KVM_SET_LAPIC"),
    (kvm_write::<kvm_cpuid2>(0x90), "KVM_SET_CPUID2"),
    (
        kvm_read_write::<kvm_create_device>(0xe0),
        "KVM_CREATE_DEVICE",
    ),
    KVM_GET_CLOCK,
    KVM_SET_CLOCK,
    (vhost_read::<u64>(0x00), "VHOST_GET_FEATURES"),
    (
        ioctl_expr(_IOC_NONE, VHOST, 0x01, 0) as u32,
        "VHOST_SET_OWNER",
    ),
    (vhost_write::<u64>(0x25), "VHOST_SET_BACKEND_FEATURES"),
    (vhost_read::<u64>(0x26), "VHOST_GET_BACKEND_FEATURES"),
    TCGETS,
    TCSETS,
    TIOCSPTLCK,
    TIOCGPTN,
    VFIO_DEVICE_SET_IRQS,
    VFIO_DEVICE_RESET,
];

/// The VMM thread: builds VMs (the command line's, `vm.boot`, `vm.reboot`, the guest's own
/// reset) and ends them, and acts on the API's requests. It starts every other thread, which
/// keeps its filter under its own, so its list holds every other list.
fn vmm() -> AllowList {
    let mut list = AllowList::new(&[BASE, THREAD_START, BUILD], &BUILD_IOCTLS);
    for kind in ThreadKind::ALL {
        if kind != ThreadKind::Vmm {
            list.extend(&allow_list(kind));
        }
    }
    list
}

/// The vCPU runs the guest, emulates device registers (including a passed-through device's
/// configuration space, read and written with `pread64`/`pwrite64`), serves IOMMU requests
/// inline, and activates and resets devices: so it also holds each device thread's list.
fn vcpu() -> AllowList {
    let mut list = AllowList::new(
        &[
            BASE,
            THREAD_START,
            syscalls![SYS_read, SYS_pread64, SYS_pwrite64],
            // A share's back end gets its rings on DRIVER_OK, stops them on reset.
            VHOST_USER,
        ],
        &[
            KVM_RUN,
            KVM_SET_GSI_ROUTING,
            KVM_IRQFD,
            KVM_IOEVENTFD,
            KVM_SET_USER_MEMORY_REGION,
            KVM_SIGNAL_MSI,
            VFIO_DEVICE_SET_IRQS,
            VFIO_DEVICE_RESET,
            VFIO_IOMMU_MAP_DMA,
            VFIO_IOMMU_UNMAP_DMA,
            TUNSETOFFLOAD,
            VHOST_NET_SET_BACKEND,
        ],
    )
    .with_socket_domains(&[UNIX_SOCKET]);
    list.extend(&AllowList::new(&[], &VHOST_START));
    for &kind in DEVICE_KINDS {
        list.extend(&allow_list(kind));
    }
    list
}

/// System calls no list allows that a compromised thread would reach for first; named in the
/// SIGSYS report along with every allowed one.
const NOTABLE: &[Syscall] = syscalls![
    SYS_open,
    SYS_openat,
    SYS_socket,
    SYS_connect,
    SYS_bind,
    SYS_execve,
    SYS_execveat,
    SYS_fork,
    SYS_vfork,
    SYS_ptrace,
    SYS_kill,
    SYS_tgkill,
    SYS_mount,
    SYS_unshare,
    SYS_setns,
    SYS_chdir,
    SYS_unlink,
    SYS_unlinkat,
    SYS_rename,
    SYS_mkdir,
    SYS_memfd_create,
    SYS_process_vm_writev,
    SYS_rt_sigaction,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_lseek,
    SYS_fsync,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_getpid,
    SYS_readv,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_io_uring_setup,
    SYS_io_uring_register,
    SYS_poll,
    SYS_ppoll,
    SYS_select,
    SYS_pselect6,
    SYS_epoll_pwait2,
];

/// Every system call the SIGSYS report can name.
pub(crate) fn named_syscalls() -> BTreeSet<Syscall> {
    let mut all: BTreeSet<Syscall> = NOTABLE.iter().copied().collect();
    all.extend(vcpu().syscalls);
    for kind in [
        ThreadKind::Vmm,
        ThreadKind::Signals,
        ThreadKind::SerialInput,
        ThreadKind::Api,
        ThreadKind::Hotplug,
    ] {
        all.extend(allow_list(kind).syscalls);
    }
    all
}

/// Every `socket` domain a list allows.
pub(crate) fn named_socket_domains() -> BTreeSet<Value> {
    BTreeSet::from([INET_SOCKET, UNIX_SOCKET])
}

/// Every `prctl` option the SIGSYS report can name.
pub(crate) fn named_prctl_options() -> BTreeSet<Value> {
    PRCTL_OPTIONS.iter().copied().collect()
}

/// Every `fcntl` command the SIGSYS report can name.
pub(crate) fn named_fcntl_commands() -> BTreeSet<Value> {
    BTreeSet::from([DEBUG_FD_CHECK])
}

/// Every ioctl request the SIGSYS report can name.
pub(crate) fn named_ioctls() -> BTreeSet<Value> {
    let mut all = vcpu().ioctls;
    all.extend(allow_list(ThreadKind::Vmm).ioctls);
    all.extend(allow_list(ThreadKind::Api).ioctls);
    all.extend(allow_list(ThreadKind::Hotplug).ioctls);
    all
}
