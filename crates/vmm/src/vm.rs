//! One VM, from its build to its end: [`Vm::start`] runs its vCPUs, the API's requests act
//! on it while it runs, and [`Vm::shutdown`] stops every thread it has and gives back every
//! resource (KVM's VM and vCPUs, guest RAM, devices and their files), so that the VMM can
//! build it again (`vm.reboot`, `vm.boot` after `vm.shutdown`) in the same process.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use api::{ApiError, Counters, Refusal, VmInfo, VmState};
use kvm_ioctls::VmFd;
use pci::PciRoot;
use sandbox::ThreadKind;
use vfio::VfioPciDevice;
use vm_device::{lock, Bus};
use vm_memory::GuestMemoryMmap;

use crate::clock::PausedClock;
use crate::error::VmmError;
use crate::events::ExitNotice;
use crate::host::Host;
use crate::hotplug::{HotplugRequest, HotplugThread};
use crate::interrupts::GsiRouter;
use crate::legacy::{IrqfdTrigger, PowerButton};
use crate::pause::{PauseError, PauseGate};
use crate::plugged::SharedInfo;
use crate::stats::StatsReport;
use crate::terminal::RawTerminal;
use crate::threads;
use crate::vcpu::{self, Vcpu};

/// How long a pause, and the end of a VM, wait for every vCPU to leave the guest (one
/// emulating a slow exit, a VFIO mapping say, gets there when it is done).
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A built VM. Fields drop in order: what runs and what holds devices first, guest RAM last.
pub(crate) struct Vm {
    /// Its number in this process: its vCPUs' and devices' reports carry it.
    pub(crate) number: u64,
    /// The VMM's process id, which kicks are addressed to.
    pub(crate) pid: i32,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) running: Vec<JoinHandle<()>>,
    pub(crate) gate: Arc<PauseGate>,
    pub(crate) hotplug: Option<HotplugThread>,
    pub(crate) power_button: PowerButton<IrqfdTrigger>,
    pub(crate) stats: Arc<StatsReport>,
    /// `vm.info`'s configuration and device tree; the hotplug thread keeps what it plugs.
    pub(crate) info: SharedInfo,
    pub(crate) vfio_devices: Vec<Arc<Mutex<VfioPciDevice>>>,
    /// Each PCI segment's bus 0.
    pub(crate) roots: Vec<Arc<Mutex<PciRoot>>>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) exits: ExitNotice,
    pub(crate) router: Arc<GsiRouter>,
    pub(crate) clock: PausedClock<VmFd>,
    /// KVM's VM, closed once nothing of the machine uses it.
    pub(crate) _fd: Arc<VmFd>,
    pub(crate) _raw_terminal: Option<RawTerminal>,
    /// Guest RAM, unmapped last: KVM's memory slots point into it.
    pub(crate) _memory: GuestMemoryMmap,
}

impl Vm {
    /// Runs the guest: a thread per vCPU, each confined to the vCPU filter before it enters
    /// the guest.
    pub(crate) fn start(&mut self, host: &Host) -> Result<(), VmmError> {
        for vcpu in self.vcpus.drain(..) {
            let (pio, mmio, exits) = (
                Arc::clone(&self.pio),
                Arc::clone(&self.mmio),
                self.exits.clone(),
            );
            let gate = Arc::clone(&self.gate);
            let id = vcpu.id();
            let thread = threads::spawn(
                format!("vcpu{id}"),
                ThreadKind::Vcpu,
                host.filters.clone(),
                move || vcpu.run(pio, mmio, exits, &gate),
            )?;
            self.running.push(thread);
        }
        Ok(())
    }

    /// `vm.info` of this VM in `state`.
    pub(crate) fn info(&self) -> VmInfo {
        let mut info = lock(&self.info).clone();
        info.state = if self.gate.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        };
        info
    }

    /// The configuration as it stands, hot-plugged devices included: what a reboot builds.
    pub(crate) fn config(&self) -> vm_config::VmConfig {
        lock(&self.info).config.clone()
    }

    pub(crate) fn counters(&self) -> Counters {
        self.stats.counters()
    }

    pub(crate) fn press_power_button(&self) -> std::io::Result<()> {
        self.power_button.press()
    }

    /// Stops every vCPU (device threads finish what the guest had queued), then the guest's
    /// clock.
    pub(crate) fn pause(&self) -> Result<(), PauseError> {
        let pid = self.pid;
        self.gate.pause(
            |tid| vcpu::kick(pid, tid),
            VCPU_STOP_TIMEOUT,
            || self.clock.save(),
        )
    }

    pub(crate) fn resume(&self) -> Result<(), PauseError> {
        self.gate.resume(|| self.clock.restore())
    }

    /// Hands `request` to the hotplug thread, which answers its client.
    pub(crate) fn hotplug(&self, request: HotplugRequest) -> Result<(), ApiError> {
        match &self.hotplug {
            Some(thread) => thread.send(request),
            None => Err(ApiError::new(Refusal::Failed, "this VM has no hotplug")),
        }
    }

    /// Ends the VM (see [`Drop`]); returns its counters, for the caller's last report.
    pub(crate) fn shutdown(self) -> Arc<StatsReport> {
        Arc::clone(&self.stats)
    }

    /// Its vCPUs leave the guest for good, the hotplug thread stops, passed-through devices
    /// are reset, and the bus lets go of the devices; dropping the rest then stops every
    /// device's threads and closes its files.
    fn stop(&mut self) {
        let pid = self.pid;
        if let Err(err) = self
            .gate
            .stop(|tid| vcpu::kick(pid, tid), VCPU_STOP_TIMEOUT)
        {
            log::error!("VM {}: {err}", self.number);
        }
        for thread in self.running.drain(..) {
            if thread.join().is_err() {
                log::error!("VM {}: a vCPU thread panicked", self.number);
            }
        }
        // Stopped and joined before anything it plugs into goes.
        self.hotplug = None;
        self.router.stop();
        for device in &self.vfio_devices {
            lock(device).reset();
        }
        // A bus holds the devices and, through the handler that follows moved BARs, the
        // buses that hold the bus: emptied, that cycle lets go.
        for root in &self.roots {
            lock(root).clear();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
