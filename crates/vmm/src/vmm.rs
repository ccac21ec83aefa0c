//! The VMM process and the VM's lifecycle, as Cloud Hypervisor has it: started with a
//! configuration (the command line: `vm.create` then `vm.boot` of what it parsed) or empty,
//! waiting for `vm.create` on its API socket. One thread, this one, acts on every request
//! that changes the VM and on how its guest stops, in order:
//!
//! - `vm.create` stores a validated configuration (state `Created`); `vm.boot` builds the VM
//!   and starts it (`Running`); `vm.shutdown` ends it and keeps the configuration, hot-plugged
//!   devices included (`Created` again, `vm.boot` starts it anew); `vm.reboot` and a guest's
//!   own reset end it and build it again; `vm.delete` ends it and forgets the configuration;
//!   `vmm.shutdown` ends the VMM.
//! - The guest's poweroff ends the VMM (exit 0), as Cloud Hypervisor's does; a crash ends it
//!   with the reason (exit 1).
//! - A request in a state that does not allow it is refused with Cloud Hypervisor's status:
//!   404 for a VM not created, 500 for one not running or already created.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use api::{ApiError, Refusal, Request, Response, VmInfo, VmResize, VmState};
use kvm_ioctls::Kvm;
use sandbox::{Filters, ThreadKind};
use vm_config::VmConfig;

use crate::builder;
use crate::control::{api_listener, ping, serve_api, Control};
use crate::error::VmmError;
use crate::events::GuestExit;
use crate::events::VmmEvent;
use crate::host::Host;
use crate::hotplug::{HotplugRequest, ONE_VSOCK};
use crate::monitor::{self, EventMonitor};
use crate::options::VmmOptions;
use crate::pause::PauseError;
use crate::pty::Ptys;
use crate::stats::StatsReport;
use crate::taps::PassedTaps;
use crate::terminal::SerialInput;
use crate::threads;
use crate::vcpu;
use crate::vm::Vm;

/// How the VMM ended.
#[derive(Debug, PartialEq, Eq)]
pub enum VmmExit {
    /// The guest powered off.
    Poweroff,
    /// `vmm.shutdown`.
    ApiShutdown,
    /// The guest reset itself and `--no-reboot` asked the VMM to end rather than build it
    /// again.
    Reset(&'static str),
    /// A vCPU stopped in a way the guest did not ask for.
    Crash(String),
    /// SIGTERM or SIGINT (its number): the VM was stopped and the VMM ended as on
    /// `vmm.shutdown` (how libvirt stops Cloud Hypervisor).
    Signal(i32),
}

/// The VM the SIGUSR1 report is about: the running one's counters.
type ReportSlot = Arc<Mutex<Option<Arc<StatsReport>>>>;

/// Runs the VMM: with `config` (the command line's), builds and boots that VM; with an API
/// socket, serves it; returns once the VMM is to end.
pub fn run(config: Option<VmConfig>, options: &VmmOptions) -> Result<VmmExit, VmmError> {
    let signals = block_signals()?;
    vcpu::install_kick_handler().map_err(|source| VmmError::Io {
        what: "install the vCPU kick's signal handler".into(),
        source,
    })?;
    let filters = sandbox::Filters::new(options.seccomp)?.map(Arc::new);
    if let Some(filters) = &filters {
        threads::install_device_thread_hook(filters);
    }
    let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
    warn_if_kvm_cannot_run_linux();
    let listener = options.api_socket.as_ref().map(api_listener).transpose()?;
    let monitor = options
        .event_monitor
        .as_ref()
        .map(|target| {
            EventMonitor::open(target).map_err(|source| VmmError::Io {
                what: format!("--event-monitor: cannot open {target:?}"),
                source,
            })
        })
        .transpose()?
        .map(Arc::new);
    monitor::emit(monitor.as_deref(), "vmm", "starting", &[]);
    let reports = ReportSlot::default();
    let (events_tx, events) = channel();
    watch_signals(
        Arc::clone(&reports),
        signals,
        events_tx.clone(),
        filters.clone(),
    )?;
    let pid = std::process::id() as i32;
    let mut vmm = Vmm {
        host: Host {
            tsc_deadline_timer: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
            kvm,
            filters: filters.clone(),
            events: events_tx.clone(),
            hotplug: listener.is_some(),
            serial_input: SerialInput::new(filters.clone()),
            pid,
            monitor,
            taps: PassedTaps::default(),
            ptys: Ptys::default(),
        },
        config: None,
        vm: None,
        built: 0,
        no_reboot: options.no_reboot,
        reports,
    };
    // From here on this thread builds VMs under its filter, which allows what that takes.
    if let Some(filters) = &filters {
        filters.install(ThreadKind::Vmm)?;
    }
    if let Some(listener) = listener {
        serve_api(listener, Control::new(events_tx, pid as u32), filters)?;
    }
    if let Some(config) = config {
        vmm.create(config)
            .map_err(|err| VmmError::Config(err.message))?;
        vmm.boot()?;
    }
    let exit = vmm.serve(&events);
    vmm.host.emit("vmm", "shutdown");
    Ok(exit)
}

/// The VMM's state: the configuration once created, the VM once booted.
struct Vmm {
    host: Host,
    config: Option<VmConfig>,
    vm: Option<Vm>,
    /// VMs built so far: the next one's number.
    built: u64,
    no_reboot: bool,
    reports: ReportSlot,
}

impl Vmm {
    /// Acts on events until the VMM is to end; the VM is gone by then.
    fn serve(&mut self, events: &Receiver<VmmEvent>) -> VmmExit {
        loop {
            let Ok(event) = events.recv() else {
                // Every sender is gone: nothing can ask anything of the VMM again.
                self.delete();
                return VmmExit::ApiShutdown;
            };
            match event {
                VmmEvent::Api { request, reply } => self.answer(*request, reply),
                VmmEvent::VmmShutdownAnswered => {
                    self.delete();
                    return VmmExit::ApiShutdown;
                }
                VmmEvent::Terminate(signal) => {
                    self.delete();
                    return VmmExit::Signal(signal);
                }
                VmmEvent::Guest { vm, exit } => {
                    if self.vm.as_ref().is_none_or(|current| current.number != vm) {
                        // About a VM already gone (a second vCPU's report, a reset racing a
                        // shutdown).
                        continue;
                    }
                    if let Some(exit) = self.guest_stopped(exit) {
                        return exit;
                    }
                }
            }
        }
    }

    /// The running guest stopped: `Some` if the VMM ends with it.
    fn guest_stopped(&mut self, exit: GuestExit) -> Option<VmmExit> {
        match exit {
            GuestExit::Poweroff => {
                self.delete();
                Some(VmmExit::Poweroff)
            }
            GuestExit::Reset(why) if self.no_reboot => {
                self.end_vm();
                Some(VmmExit::Reset(why))
            }
            GuestExit::Reset(why) => {
                eprintln!("warden: the guest reset itself ({why}): booting it again");
                match self.reboot() {
                    Ok(()) => None,
                    Err(err) => {
                        self.end_vm();
                        Some(VmmExit::Crash(format!(
                            "cannot boot the guest again: {}",
                            err.message
                        )))
                    }
                }
            }
            GuestExit::Crash(why) => {
                self.end_vm();
                Some(VmmExit::Crash(why))
            }
        }
    }

    /// Answers `request`, or hands `reply` to the hotplug thread, which answers it.
    fn answer(&mut self, request: Request, reply: Sender<Result<Response, ApiError>>) {
        let handled: Handled = match request {
            Request::Ping => Ok(Response::Ping(ping(self.host.pid))).into(),
            Request::Create(config) => self.create(*config).map(|()| Response::Done).into(),
            Request::Boot => self
                .boot()
                .map(|()| Response::Done)
                .map_err(boot_refusal)
                .into(),
            Request::Shutdown => self.shutdown().map(|()| Response::Done).into(),
            Request::Reboot => self.reboot().map(|()| Response::Done).into(),
            Request::Delete => {
                self.delete();
                Ok(Response::Done).into()
            }
            // Answered on the API thread; the VMM ends once the answer is out.
            Request::VmmShutdown => Ok(Response::Done).into(),
            Request::Info => self
                .info()
                .map(|info| Response::Info(Box::new(info)))
                .into(),
            Request::Counters => self
                .running()
                .map(|vm| Response::Counters(vm.counters()))
                .into(),
            Request::PowerButton => self
                .running()
                .and_then(|vm| {
                    vm.press_power_button()
                        .map(|()| Response::Done)
                        .map_err(|err| {
                            ApiError::new(
                                Refusal::Failed,
                                format!("cannot raise the power button's interrupt: {err}"),
                            )
                        })
                })
                .into(),
            Request::Pause => self
                .running()
                .and_then(|vm| {
                    self.host.emit("vm", "pausing");
                    vm.pause().map_err(pause_refusal)
                })
                .map(|()| {
                    self.host.emit("vm", "paused");
                    Response::Done
                })
                .into(),
            Request::Resume => self
                .running()
                .and_then(|vm| {
                    self.host.emit("vm", "resuming");
                    vm.resume().map_err(pause_refusal)
                })
                .map(|()| {
                    self.host.emit("vm", "resumed");
                    Response::Done
                })
                .into(),
            Request::Resize(resize) => self.resize(&resize).map(|()| Response::Done).into(),
            Request::AddDisk(disk) => {
                let added = disk.clone();
                self.plug(
                    |reply| HotplugRequest::AddDisk { disk, reply },
                    |config| config.disks.push(added),
                    reply.clone(),
                )
            }
            Request::AddNet(net, files) => self.add_net(net, files.take(), reply.clone()),
            Request::AddVsock(vsock) => self.add_vsock(vsock, reply.clone()),
            Request::AddFs(fs) => {
                let added = fs.clone();
                self.plug(
                    |reply| HotplugRequest::AddFs { fs, reply },
                    |config| config.fs.push(added),
                    reply.clone(),
                )
            }
            Request::AddDevice(device) => {
                let added = device.clone();
                self.plug(
                    |reply| HotplugRequest::AddDevice { device, reply },
                    |config| config.devices.push(added),
                    reply.clone(),
                )
            }
            Request::RemoveDevice(remove) => {
                self.unplug(remove.id.unwrap_or_default(), reply.clone())
            }
        };
        if let Handled::Answer(answer) = handled {
            let _ = reply.send(answer);
        }
    }

    /// `vm.create`: a validated configuration, with what it leaves open settled.
    fn create(&mut self, mut config: VmConfig) -> Result<(), ApiError> {
        if self.config.is_some() {
            return Err(ApiError::new(Refusal::Failed, "VM is already created"));
        }
        config
            .validate()
            .map_err(|err| ApiError::bad_request(err.to_string()))?;
        config.resolve().map_err(|err| {
            ApiError::new(Refusal::Failed, format!("cannot pick a random MAC: {err}"))
        })?;
        self.host.ptys = Ptys::open(&mut config, self.host.filters.clone())
            .map_err(|err| ApiError::new(Refusal::Failed, err.to_string()))?;
        self.config = Some(config);
        Ok(())
    }

    /// `vm.boot`: builds the created VM and runs it.
    fn boot(&mut self) -> Result<(), VmmError> {
        self.host.emit("vm", "booting");
        self.start_vm()?;
        self.host.emit("vm", "booted");
        Ok(())
    }

    /// Builds the VM from its configuration and starts it.
    fn start_vm(&mut self) -> Result<(), VmmError> {
        if self.vm.is_some() {
            return Err(VmmError::Lifecycle("VM is already created"));
        }
        let config = self
            .config
            .as_ref()
            .ok_or(VmmError::Lifecycle("VM config is missing"))?;
        let number = self.built;
        self.built += 1;
        let mut vm = builder::build(config, &self.host, number)?;
        vm.start(&self.host)?;
        *vm_device::lock(&self.reports) = Some(Arc::clone(&vm.stats));
        self.vm = Some(vm);
        Ok(())
    }

    /// `vm.shutdown`: ends the VM, keeps its configuration.
    fn shutdown(&mut self) -> Result<(), ApiError> {
        self.running()?;
        self.end_vm();
        Ok(())
    }

    /// `vm.reboot`, or the guest's own reset: the VM ends and is built again from its
    /// configuration (hot-plugged devices included).
    fn reboot(&mut self) -> Result<(), ApiError> {
        self.host.emit("vm", "rebooting");
        if self.vm.is_none() {
            return Err(not_created());
        }
        // No `vm/shutdown` between: libvirt stops the VMM when it reads one.
        self.stop_vm();
        self.start_vm().map_err(boot_refusal)?;
        self.host.emit("vm", "rebooted");
        Ok(())
    }

    /// `vm.delete`, and the VMM's end: the VM ends and its configuration is forgotten.
    fn delete(&mut self) {
        self.end_vm();
        self.host.taps.clear();
        self.host.ptys = Ptys::default();
        if self.config.take().is_some() {
            self.host.emit("vm", "deleted");
        }
    }

    /// Ends the VM if there is one, and says so on the event monitor.
    fn end_vm(&mut self) {
        if self.stop_vm() {
            self.host.emit("vm", "shutdown");
        }
    }

    /// Ends the VM if there is one (whether there was): its configuration as it stands is
    /// kept, its counters printed.
    fn stop_vm(&mut self) -> bool {
        let Some(vm) = self.vm.take() else {
            return false;
        };
        self.config = Some(vm.config());
        *vm_device::lock(&self.reports) = None;
        let stats = vm.shutdown();
        stats.print();
        true
    }

    fn running(&self) -> Result<&Vm, ApiError> {
        match (&self.vm, &self.config) {
            (Some(vm), _) => Ok(vm),
            (None, Some(_)) => Err(ApiError::new(Refusal::Failed, "VM is not running")),
            (None, None) => Err(not_created()),
        }
    }

    /// `vm.info`: the running VM's, or the created one's configuration in state `Created`.
    fn info(&self) -> Result<VmInfo, ApiError> {
        match (&self.vm, &self.config) {
            (Some(vm), _) => Ok(vm.info()),
            (None, Some(config)) => Ok(VmInfo {
                config: config.clone(),
                state: VmState::Created,
                memory_actual_size: config.memory.size,
                device_tree: Default::default(),
            }),
            (None, None) => Err(not_created()),
        }
    }

    /// `vm.resize`: warden has no vCPU or memory hotplug and no balloon yet, so a running VM
    /// takes only what it has already; a created one takes new counts into its
    /// configuration (checked whole).
    fn resize(&mut self, resize: &VmResize) -> Result<(), ApiError> {
        let Some(config) = &self.config else {
            return Err(not_created());
        };
        let mut resized = match &self.vm {
            Some(vm) => vm.config(),
            None => config.clone(),
        };
        if let Some(vcpus) = resize.desired_vcpus {
            resized.cpus.boot_vcpus = vcpus;
        }
        if let Some(ram) = resize.desired_ram {
            resized.memory.size = ram;
        }
        if resize.desired_balloon.is_some_and(|size| size != 0) {
            return Err(ApiError::new(
                Refusal::Failed,
                "warden has no balloon device",
            ));
        }
        match &self.vm {
            Some(vm) => {
                let current = vm.config();
                if resized.cpus.boot_vcpus != current.cpus.boot_vcpus {
                    return Err(ApiError::new(
                        Refusal::Failed,
                        format!(
                            "warden has no vCPU hotplug yet: the VM keeps its {} vCPUs",
                            current.cpus.boot_vcpus
                        ),
                    ));
                }
                if resized.memory.size != current.memory.size {
                    return Err(ApiError::new(
                        Refusal::Failed,
                        format!(
                            "warden has no memory hotplug yet: the VM keeps its {} bytes of RAM",
                            current.memory.size
                        ),
                    ));
                }
                Ok(())
            }
            None => {
                resized
                    .validate()
                    .map_err(|err| ApiError::bad_request(err.to_string()))?;
                self.config = Some(resized);
                Ok(())
            }
        }
    }

    /// A hot-add: to the running VM's hotplug thread (which answers), or, to a VM only
    /// created, into its configuration (`add_to`), checked whole.
    fn plug(
        &mut self,
        request: impl FnOnce(Sender<Result<Response, ApiError>>) -> HotplugRequest,
        add_to: impl FnOnce(&mut VmConfig),
        reply: Sender<Result<Response, ApiError>>,
    ) -> Handled {
        match &self.vm {
            Some(vm) => hand_on(vm, request(reply)),
            None => self.cold_plug(add_to),
        }
    }

    /// A device added before boot: into the configuration, checked whole and resolved.
    fn cold_plug(&mut self, add_to: impl FnOnce(&mut VmConfig)) -> Handled {
        let Some(config) = &self.config else {
            return Handled::Answer(Err(not_created()));
        };
        let mut added = config.clone();
        add_to(&mut added);
        let checked = added
            .validate()
            .map_err(|err| ApiError::bad_request(err.to_string()))
            .and_then(|()| {
                added.resolve().map_err(|err| {
                    ApiError::new(Refusal::Failed, format!("cannot pick a random MAC: {err}"))
                })
            });
        Handled::Answer(checked.map(|()| {
            self.config = Some(added);
            Response::Done
        }))
    }

    /// `vm.add-net`: on the tap it names, or on `fds`, the tap queues its client passed (one
    /// per queue pair), which the configuration then lists by number and the VMM holds while
    /// the net is in it.
    fn add_net(
        &mut self,
        mut net: vm_config::NetConfig,
        fds: Vec<OwnedFd>,
        reply: Sender<Result<Response, ApiError>>,
    ) -> Handled {
        if !fds.is_empty() {
            net.fds = Some(fds.iter().map(AsRawFd::as_raw_fd).collect());
        }
        if let Some(vm) = &self.vm {
            return hand_on(vm, HotplugRequest::AddNet { net, fds, reply });
        }
        let answer = self.cold_plug(|config| config.net.push(net));
        if let (Handled::Answer(Ok(_)), false) = (&answer, fds.is_empty()) {
            let id = self
                .config
                .as_ref()
                .and_then(|config| config.net.last())
                .and_then(|net| net.id.clone())
                .unwrap_or_default();
            self.host.taps.insert(&id, fds);
        }
        answer
    }

    /// `vm.add-vsock`: a VM has one vsock at most (Cloud Hypervisor answers a second with 500).
    fn add_vsock(
        &mut self,
        vsock: vm_config::VsockConfig,
        reply: Sender<Result<Response, ApiError>>,
    ) -> Handled {
        if let Some(vm) = &self.vm {
            return hand_on(vm, HotplugRequest::AddVsock { vsock, reply });
        }
        if self.config.as_ref().is_some_and(|c| c.vsock.is_some()) {
            return Handled::Answer(Err(ApiError::new(Refusal::Failed, ONE_VSOCK)));
        }
        self.cold_plug(|config| config.vsock = Some(vsock))
    }

    /// `vm.remove-device`: the running VM's hotplug thread asks the guest to let go, or the
    /// device leaves the created VM's configuration.
    fn unplug(&mut self, id: String, reply: Sender<Result<Response, ApiError>>) -> Handled {
        if let Some(vm) = &self.vm {
            return hand_on(vm, HotplugRequest::Remove { id, reply });
        }
        let Some(config) = &mut self.config else {
            return Handled::Answer(Err(not_created()));
        };
        let removed = config.remove_device(&id);
        self.host.taps.remove(&id);
        Handled::Answer(if removed {
            Ok(Response::Done)
        } else {
            Err(ApiError::new(
                Refusal::NotFound,
                format!("no device has id {id:?}"),
            ))
        })
    }
}

/// Hands `request` to `vm`'s hotplug thread, which answers it.
fn hand_on(vm: &Vm, request: HotplugRequest) -> Handled {
    match vm.hotplug(request) {
        Ok(()) => Handled::HandedOn,
        Err(err) => Handled::Answer(Err(err)),
    }
}

/// What became of a request: answered here, or handed on with its reply channel.
enum Handled {
    Answer(Result<Response, ApiError>),
    HandedOn,
}

impl From<Result<Response, ApiError>> for Handled {
    fn from(answer: Result<Response, ApiError>) -> Self {
        Handled::Answer(answer)
    }
}

fn not_created() -> ApiError {
    ApiError::new(Refusal::NotFound, "VM is not created")
}

/// A boot that failed: not found without a configuration, failed when one runs already
/// (Cloud Hypervisor's answers), a bad request for what the user can fix (a file, the host's
/// preparation), else failed.
fn boot_refusal(err: VmmError) -> ApiError {
    let refusal = match &err {
        VmmError::Lifecycle("VM config is missing") => Refusal::NotFound,
        VmmError::Lifecycle(_) => Refusal::Failed,
        err if err.is_user_error() => Refusal::BadRequest,
        _ => Refusal::Failed,
    };
    ApiError::new(refusal, err.to_string())
}

/// A refused pause or resume: failed, as Cloud Hypervisor answers both a wrong state and a
/// failure.
fn pause_refusal(err: PauseError) -> ApiError {
    ApiError::new(Refusal::Failed, err.to_string())
}

/// The signals the signal thread takes: SIGUSR1 (a report), SIGTERM and SIGINT (the end).
const WATCHED_SIGNALS: [libc::c_int; 3] = [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT];

/// Blocks [`WATCHED_SIGNALS`] in the calling thread, before any other thread starts, so that
/// every thread inherits the mask and only [`watch_signals`] consumes them.
fn block_signals() -> Result<libc::sigset_t, VmmError> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    let blocked = unsafe {
        libc::sigemptyset(&mut set);
        for signal in WATCHED_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if blocked != 0 {
        return Err(VmmError::Io {
            what: "block SIGUSR1, SIGTERM and SIGINT".into(),
            source: io::Error::from_raw_os_error(blocked),
        });
    }
    Ok(set)
}

/// A thread of its own for the process's signals: SIGUSR1 prints the running VM's counters;
/// SIGTERM or SIGINT asks the VMM thread to stop the VM and end, as Cloud Hypervisor does (a
/// second one, should the VMM thread be stuck, ends the process at once).
fn watch_signals(
    reports: ReportSlot,
    set: libc::sigset_t,
    events: Sender<VmmEvent>,
    filters: Option<Arc<Filters>>,
) -> Result<(), VmmError> {
    threads::spawn("signals", ThreadKind::Signals, filters, move || {
        let mut ending = false;
        loop {
            let mut signal = 0;
            // SAFETY: `set` and `signal` are valid for the call.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                continue;
            }
            if signal == libc::SIGUSR1 {
                let report = vm_device::lock(&reports).clone();
                if let Some(report) = report {
                    report.print();
                }
            } else if ending {
                std::process::exit(128 + signal);
            } else {
                ending = true;
                let _ = events.send(VmmEvent::Terminate(signal));
            }
        }
    })
    .map(drop)
}

/// kvm_pvm runs guest kernel code through an instruction emulator: say so once, up front,
/// instead of leaving the user to wonder why the guest never reaches userspace.
fn warn_if_kvm_cannot_run_linux() {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "warden: warning: this host's KVM is kvm_pvm (no VMX/SVM): guest kernel code is emulated, so an unmodified Linux guest will crawl and cannot start userspace here; use a host with hardware virtualization"
        );
    }
}
