use std::io::Read;
use std::os::fd::FromRawFd;

use super::*;

/// Runs `body` in a forked child whose stderr is a pipe; returns its wait status and stderr.
/// The child only makes system calls between fork and exit (no allocation, no locks), since
/// the test binary has other threads.
fn in_child(body: impl FnOnce()) -> (i32, String) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child below only makes system calls before _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: both descriptors are open; _exit ends the child without running destructors.
        unsafe {
            libc::dup2(fds[1], libc::STDERR_FILENO);
            body();
            libc::_exit(0);
        }
    }
    // SAFETY: fds[1] is ours to close; fds[0] is open and owned by the File from here on.
    let mut reader = unsafe {
        libc::close(fds[1]);
        std::fs::File::from_raw_fd(fds[0])
    };
    let mut stderr = String::new();
    reader.read_to_string(&mut stderr).unwrap();
    let mut status = 0;
    // SAFETY: `pid` is our child and `status` a valid place for its status.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    (status, stderr)
}

fn exit_code(status: i32) -> Option<i32> {
    libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
}

fn filters(mode: Mode) -> Filters {
    Filters::new(mode).unwrap().expect("a filtering mode")
}

#[test]
fn every_kind_compiles_in_both_filtering_modes_and_false_compiles_nothing() {
    for mode in [Mode::Enforce, Mode::Log] {
        let filters = filters(mode);
        assert_eq!(filters.programs.len(), ThreadKind::ALL.len());
        assert!(filters.programs.iter().all(|(_, p)| !p.is_empty()));
    }
    assert!(Filters::new(Mode::Off).unwrap().is_none());
}

#[test]
fn a_vcpu_allows_all_that_the_device_threads_it_starts_do() {
    let vcpu = lists::allow_list(ThreadKind::Vcpu);
    for &kind in lists::DEVICE_KINDS {
        let device = lists::allow_list(kind);
        let missing: Vec<_> = device.syscalls.difference(&vcpu.syscalls).collect();
        assert!(missing.is_empty(), "{kind}: {missing:?}");
        let missing: Vec<_> = device.ioctls.difference(&vcpu.ioctls).collect();
        assert!(missing.is_empty(), "{kind}: {missing:?}");
        let missing: Vec<_> = device
            .prctl_options
            .difference(&vcpu.prctl_options)
            .collect();
        assert!(missing.is_empty(), "{kind}: {missing:?}");
        if let Some(vcpu_commands) = &vcpu.fcntl_commands {
            let device_commands = device.fcntl_commands.as_ref().expect("restricted");
            assert!(device_commands.is_subset(vcpu_commands), "{kind}");
        }
    }
}

/// A debug build's std asks whether a descriptor is open before closing it; a thread whose
/// list has no `fcntl` of its own may ask that and nothing else.
#[test]
fn a_thread_without_fcntl_may_close_what_it_drops_in_a_debug_build() {
    let filters = filters(Mode::Enforce);
    let (status, stderr) = in_child(|| {
        // SAFETY: a new eventfd, owned by `fd` from here on.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(libc::eventfd(0, 0)) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        filters.install(ThreadKind::Api).unwrap();
        // SAFETY: plain system calls on a descriptor this child owns.
        unsafe {
            if cfg!(debug_assertions) && libc::fcntl(raw, libc::F_GETFD) != -1 {
                libc::write(libc::STDERR_FILENO, b"asked ".as_ptr().cast(), 6);
            }
            libc::fcntl(raw, libc::F_SETFL, libc::O_NONBLOCK);
        }
        drop(fd);
    });
    assert_eq!(exit_code(status), Some(EXIT_SECCOMP), "{stderr}");
    assert_eq!(
        stderr.starts_with("asked "),
        cfg!(debug_assertions),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "(api) made system call fcntl (72) command 0x{:x},",
            libc::F_SETFL
        )),
        "{stderr}"
    );
}

#[test]
fn a_forbidden_call_ends_the_process_with_one_line_naming_thread_and_call() {
    let filters = filters(Mode::Enforce);
    let (status, stderr) = in_child(|| {
        filters.install(ThreadKind::Block).unwrap();
        // SAFETY: a plain system call; the filter stops it.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    });
    assert_eq!(exit_code(status), Some(EXIT_SECCOMP), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("warden: seccomp: thread "), "{stderr}");
    assert!(
        stderr.contains(
            "(virtio-blk) made system call socket (41) domain 0x2 AF_INET, which its allow-list forbids"
        ),
        "{stderr}"
    );
}

#[test]
fn a_vcpu_may_run_the_guest_but_not_issue_other_ioctls() {
    let filters = filters(Mode::Enforce);
    let (status, stderr) = in_child(|| {
        filters.install(ThreadKind::Vcpu).unwrap();
        // SAFETY: ioctls on an fd that is not open fail with EBADF, if they get that far.
        unsafe {
            if libc::ioctl(-1, u64::from(lists::KVM_RUN.0)) != -1 {
                libc::_exit(3);
            }
            libc::ioctl(-1, libc::TUNSETIFF);
        }
    });
    assert_eq!(exit_code(status), Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "(vcpu) made system call ioctl (16) request 0x{:x} TUNSETIFF,",
            libc::TUNSETIFF
        )),
        "{stderr}"
    );
}

#[test]
fn a_vcpu_may_name_and_confine_a_new_thread_but_not_use_other_prctl_options() {
    let filters = filters(Mode::Enforce);
    let (status, stderr) = in_child(|| {
        filters.install(ThreadKind::Vcpu).unwrap();
        // SAFETY: prctl with a NUL-terminated name, then with an option and no pointer.
        unsafe {
            if libc::prctl(libc::PR_SET_NAME, c"renamed".as_ptr()) != 0 {
                libc::_exit(3);
            }
            libc::prctl(libc::PR_SET_DUMPABLE, 0);
        }
    });
    assert_eq!(exit_code(status), Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains("(vcpu) made system call prctl (157) option 0x4,"),
        "{stderr}"
    );
}

#[test]
fn log_mode_lets_the_call_run() {
    let filters = filters(Mode::Log);
    let (status, stderr) = in_child(|| {
        filters.install(ThreadKind::Rng).unwrap();
        // SAFETY: a plain system call, logged and allowed; _exit ends the child at once.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            libc::_exit(if fd >= 0 { 0 } else { 4 });
        }
    });
    assert_eq!(exit_code(status), Some(0), "{stderr}");
    assert_eq!(stderr, "");
}

#[test]
fn filters_stack_so_a_thread_can_only_narrow() {
    let filters = filters(Mode::Enforce);
    let (status, stderr) = in_child(|| {
        filters.install(ThreadKind::Vcpu).unwrap();
        filters.install(ThreadKind::Rng).unwrap();
        // pread64 is the vCPU's (VFIO configuration space) but not the rng thread's.
        // SAFETY: on a closed fd this fails with EBADF, if it gets that far.
        unsafe { libc::pread(-1, std::ptr::null_mut(), 0, 0) };
    });
    assert_eq!(exit_code(status), Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains("(virtio-rng) made system call pread64 (17)"),
        "{stderr}"
    );
}

#[test]
fn modes_parse_as_cloud_hypervisor_spells_them() {
    assert_eq!("true".parse(), Ok(Mode::Enforce));
    assert_eq!("false".parse(), Ok(Mode::Off));
    assert_eq!("log".parse(), Ok(Mode::Log));
    assert_eq!(
        "yes".parse::<Mode>(),
        Err("`yes`: expected true, false or log".to_string())
    );
    assert_eq!(Mode::default(), Mode::Enforce);
}

/// A disk thread drives the io_uring made for it before confinement, but cannot make one:
/// a ring of its own would not carry the restrictions the disk's ring was set up with.
#[test]
fn a_disk_thread_may_enter_its_ring_but_not_set_one_up() {
    let filters = filters(Mode::Enforce);
    let (status, stderr) = in_child(|| {
        filters.install(ThreadKind::Block).unwrap();
        // SAFETY: io_uring_enter on an fd that is not open fails with EBADF; io_uring_setup
        // with a null parameter pointer would fail with EFAULT, if it got that far.
        unsafe {
            if libc::syscall(libc::SYS_io_uring_enter, -1, 0, 0, 0, 0usize, 0) != -1 {
                libc::_exit(3);
            }
            libc::syscall(libc::SYS_io_uring_setup, 1, 0usize);
        }
    });
    assert_eq!(exit_code(status), Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains("(virtio-blk) made system call io_uring_setup (425)"),
        "{stderr}"
    );
}

/// The hotplug thread opens a hot-added net's tap and sets its host address through an
/// AF_INET socket, and binds a hot-added vsock's AF_UNIX socket; no other kind of socket (a
/// netlink one, say) is allowed.
#[test]
fn the_hotplug_thread_may_make_inet_and_unix_sockets_only() {
    let filters = filters(Mode::Enforce);
    let (status, stderr) = in_child(|| {
        filters.install(ThreadKind::Hotplug).unwrap();
        // SAFETY: plain system calls; the descriptors are closed by _exit.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 || libc::ioctl(fd, libc::SIOCGIFFLAGS, std::ptr::null_mut::<u8>()) != -1 {
                libc::_exit(3);
            }
            if libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) < 0 {
                libc::_exit(4);
            }
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0);
        }
    });
    assert_eq!(exit_code(status), Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains("(hotplug) made system call socket (41) domain 0x10,"),
        "{stderr}"
    );
}

/// A vsock's worker connects the guest to host programs' Unix sockets, and to nothing else.
#[test]
fn the_vsock_thread_may_make_unix_sockets_only() {
    let filters = filters(Mode::Enforce);
    let (status, stderr) = in_child(|| {
        filters.install(ThreadKind::Vsock).unwrap();
        // SAFETY: plain system calls; the descriptor is closed by _exit.
        unsafe {
            let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
            if libc::socket(libc::AF_UNIX, flags, 0) < 0 {
                libc::_exit(3);
            }
            libc::socket(libc::AF_INET, flags, 0);
        }
    });
    assert_eq!(exit_code(status), Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains("(virtio-vsock) made system call socket (41) domain 0x2 AF_INET"),
        "{stderr}"
    );
}

/// The VMM thread kicks vCPUs out of the guest (for vm.pause, and to end a VM) with one
/// signal, and may send no other (SIGKILL would end warden).
#[test]
fn the_vmm_thread_may_send_the_kick_signal_only() {
    let filters = filters(Mode::Enforce);
    let (status, stderr) = in_child(|| {
        filters.install(ThreadKind::Vmm).unwrap();
        // SAFETY: tgkill to a thread id that does not exist fails with ESRCH, if it gets
        // that far (pid 1 has no thread 0x7fffffff).
        unsafe {
            if libc::syscall(libc::SYS_tgkill, 1, 0x7fff_ffff, vcpu_kick_signal()) != -1 {
                libc::_exit(3);
            }
            libc::syscall(libc::SYS_tgkill, 1, 0x7fff_ffff, libc::SIGKILL);
        }
    });
    assert_eq!(exit_code(status), Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains("(vmm) made system call tgkill (234),"),
        "{stderr}"
    );
}

/// vm.pause reads the guest's clock and vm.resume sets it back, on the VMM thread; an ioctl
/// no thread needs (pushing input into the terminal) it may not make. The numbers are the
/// kernel's (`_IOR`/`_IOW` of `struct kvm_clock_data`, 48 bytes).
#[test]
fn the_vmm_thread_may_read_and_set_the_guest_clock_but_not_feed_the_terminal() {
    assert_eq!(lists::KVM_GET_CLOCK.0, 0x8030_ae7c);
    assert_eq!(lists::KVM_SET_CLOCK.0, 0x4030_ae7b);
    let filters = filters(Mode::Enforce);
    let (status, stderr) = in_child(|| {
        filters.install(ThreadKind::Vmm).unwrap();
        // SAFETY: ioctls on an fd that is not open fail with EBADF, if they get that far.
        unsafe {
            for request in [lists::KVM_GET_CLOCK.0, lists::KVM_SET_CLOCK.0] {
                if libc::ioctl(-1, u64::from(request), std::ptr::null_mut::<u8>()) != -1 {
                    libc::_exit(3);
                }
            }
            libc::ioctl(-1, libc::TIOCSTI, std::ptr::null_mut::<u8>());
        }
    });
    assert_eq!(exit_code(status), Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "(vmm) made system call ioctl (16) request 0x{:x},",
            libc::TIOCSTI
        )),
        "{stderr}"
    );
}

/// The API thread hands every request to the VMM thread: it can neither signal a thread nor
/// touch the VM.
#[test]
fn the_api_thread_only_serves_its_sockets() {
    let filters = filters(Mode::Enforce);
    let (status, stderr) = in_child(|| {
        filters.install(ThreadKind::Api).unwrap();
        // SAFETY: as above, the filter stops the call first.
        unsafe { libc::syscall(libc::SYS_tgkill, 1, 0x7fff_ffff, vcpu_kick_signal()) };
    });
    assert_eq!(exit_code(status), Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains("(api) made system call tgkill (234),"),
        "{stderr}"
    );
}

/// Every thread is started by the VMM thread (or by a thread it started) and keeps its
/// filter under its own: the VMM's list must hold every other list.
#[test]
fn the_vmm_thread_allows_all_that_the_threads_it_starts_do() {
    let vmm = lists::allow_list(ThreadKind::Vmm);
    for kind in ThreadKind::ALL {
        let list = lists::allow_list(kind);
        let missing: Vec<_> = list.syscalls.difference(&vmm.syscalls).collect();
        assert!(missing.is_empty(), "{kind}: {missing:?}");
        let missing: Vec<_> = list.ioctls.difference(&vmm.ioctls).collect();
        assert!(missing.is_empty(), "{kind}: {missing:?}");
        assert!(list.signals.is_subset(&vmm.signals), "{kind}");
        assert!(list.socket_domains.is_subset(&vmm.socket_domains), "{kind}");
        assert!(list.prctl_options.is_subset(&vmm.prctl_options), "{kind}");
        assert!(vmm.fcntl_commands.is_none(), "any fcntl: {kind}");
    }
}

/// The vhost-net requests a vCPU may make are the ones the `vhost` crate issues.
#[test]
fn the_vhost_requests_allowed_are_the_crates() {
    use vhost::vhost_kern::vhost_binding as vb;
    let issued = [
        vb::VHOST_SET_FEATURES(),
        vb::VHOST_SET_MEM_TABLE(),
        vb::VHOST_SET_VRING_NUM(),
        vb::VHOST_SET_VRING_ADDR(),
        vb::VHOST_SET_VRING_BASE(),
        vb::VHOST_SET_VRING_KICK(),
        vb::VHOST_SET_VRING_CALL(),
    ];
    for ((value, name), issued) in lists::VHOST_START.iter().zip(issued) {
        assert_eq!(u64::from(*value), issued, "{name}");
    }
    assert_eq!(
        u64::from(lists::VHOST_NET_SET_BACKEND.0),
        vb::VHOST_NET_SET_BACKEND()
    );
}
