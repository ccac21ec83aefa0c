//! The boot path: from a validated configuration to a running guest, in order.

use std::io::{self, IsTerminal};
use std::path::Path;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use sandbox::{Filters, ThreadKind};
use vfio::{VfioDeviceFd, VfioPciDevice};
use virtio_devices::{DeviceThread, Iommu};
use virtio_iommu::{EndpointIommu, VirtioIommu};
use vm_device::Bus;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, IommuMemory,
};
use vm_superio::Serial;

use crate::bar_placement::BarPlacement;
use crate::boot::{self, BootInfo};
use crate::clock::PausedClock;
use vm_config::{ConsoleMode, SerialConfig, VmConfig};

use crate::control::{self, api_listener, serve_api, Control};
use crate::devices::{
    build_device, create_iommu_model, device_entries, device_ids, iommu_polling, kvm_vfio_device,
    open_output, open_passthrough, open_vhost, plan_devices, Passthrough, PlannedDevice,
};
use crate::hotplug::{self, Hotplug, HotplugRequest, HOTPLUG_SLOTS, PROTECTED_SLOTS};
use crate::interrupts::GsiRouter;
use crate::layout;
use crate::legacy::{
    AcpiReset, AcpiSleep, Cmos, GenericEvents, GuestExit, IrqfdTrigger, PowerButton, SerialPort,
    I8042,
};
use crate::memory::{self, MemoryError};
use crate::options::VmmOptions;
use crate::pause::PauseGate;
use crate::pci_bus::{PciBus, IOMMU_DEVICE_NUMBER};
use crate::pci_hotplug::PciHotplugController;
use crate::plugged::SharedInfo;
use crate::stats::StatsReport;
use crate::terminal::{forward_stdin, RawTerminal};
use crate::vcpu::{self, Topology, Vcpu};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm: {0}; warden needs KVM (load kvm_intel or kvm_amd, and run as a user who may open /dev/kvm)")]
    NoKvm(kvm_ioctls::Error),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("device setup: {0}")]
    Device(String),
    #[error(transparent)]
    Vfio(#[from] vfio::OpenError),
    /// A tap that cannot be used as asked: the host lacks the tun driver or the permission,
    /// or the name is taken.
    #[error("net: {0}")]
    Net(#[from] net_util::TapError),
    #[error("--seccomp: {0}; run with --seccomp false on a host without seccomp filters")]
    Seccomp(#[from] sandbox::Error),
    #[error("--api-socket: {0}")]
    Api(String),
}

impl VmmError {
    /// Errors the user can fix by changing the command line or preparing the host.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            VmmError::Memory(_)
                | VmmError::Boot(_)
                | VmmError::NoKvm(_)
                | VmmError::Vfio(_)
                | VmmError::Net(_)
                | VmmError::Api(_)
        )
    }
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// Builds the machine `config` (validated and resolved) describes, runs it under `options`,
/// and returns how the guest stopped.
pub fn run(config: &VmConfig, options: &VmmOptions) -> Result<GuestExit, VmmError> {
    let sigusr1 = block_sigusr1()?;
    vcpu::install_kick_handler().map_err(|source| VmmError::Io {
        what: "install the vCPU kick's signal handler".into(),
        source,
    })?;
    let filters = Filters::new(options.seccomp)?.map(Arc::new);
    if let Some(filters) = &filters {
        let filters = Arc::clone(filters);
        virtio_devices::set_thread_start_hook(Box::new(move |kind| {
            confine(Some(&filters), device_thread_kind(kind));
        }));
    }
    let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
    warn_if_kvm_cannot_run_linux();
    let api_listener = options.api_socket.as_ref().map(api_listener).transpose()?;

    let ram = memory::create_guest_ram(&config.memory)?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_error("create VM"))?);
    register_ram(&vm, &ram.memory)?;
    set_up_irqchip(&vm)?;
    let router = GsiRouter::new(Arc::clone(&vm)).map_err(|source| VmmError::Io {
        what: "set GSI routing".into(),
        source,
    })?;

    // Keystrokes go to the guest unprocessed (Ctrl-C included), as on a serial line.
    let _raw_terminal = (config.serial.mode == ConsoleMode::Tty
        || config.console.mode == ConsoleMode::Tty)
        .then(RawTerminal::enter)
        .flatten();
    let (exits_tx, exits) = channel();
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let power_button = add_legacy_devices(
        &mut pio,
        &router,
        &config.serial,
        &exits_tx,
        filters.clone(),
    )?;
    let mut pci = PciBus::new(config.memory.size, &mut pio, &mut mmio).map_err(VmmError::Device)?;
    let mut devices = plan_devices(config);
    open_vhost(&mut devices, &ram.memory)?;
    // Made before any filter: passed-through devices, those given now and those hot-added.
    let kvm_vfio = (!config.devices.is_empty() || options.api_socket.is_some())
        .then(|| kvm_vfio_device(&vm))
        .flatten();
    let passthrough = open_passthrough(config, kvm_vfio.as_ref(), &devices, &ram.memory)?;
    let protected: Vec<acpi::PciBdf> = devices
        .iter()
        .filter(|device| device.iommu)
        .map(PlannedDevice::endpoint)
        .chain(
            passthrough
                .iter()
                .filter(|p| p.config.iommu)
                .map(Passthrough::endpoint),
        )
        .collect();
    let platform = config.platform();
    let iommu = if config.iommu {
        let model = create_iommu_model(
            ram.backing_page_size,
            platform.iommu_address_width_bits,
            &devices,
            &passthrough,
            &ram.memory,
        )?;
        let device = Box::new(Iommu::new(
            Arc::clone(&model),
            ram.memory.clone(),
            iommu_polling(Duration::from_micros(platform.iommu_poll_us())),
        ));
        pci.add_virtio(
            IOMMU_DEVICE_NUMBER,
            device,
            &router,
            &vm,
            &mut pio,
            &mut mmio,
        )
        .map_err(VmmError::Device)?;
        Some(model)
    } else {
        None
    };
    let mut device_counters = Vec::new();
    for (planned, id) in devices.iter().zip(device_ids(&devices)) {
        let device = match (&iommu, planned.iommu) {
            (Some(model), true) => {
                let endpoint = planned.endpoint().endpoint_id();
                let translator = EndpointIommu::new(Arc::clone(model), endpoint)
                    .expect("every protected device was registered as an endpoint");
                let mem = IommuMemory::new(ram.memory.clone(), translator, true, ());
                build_device(&planned.kind, mem, true, &planned.vhost)?
            }
            _ => build_device(&planned.kind, ram.memory.clone(), false, &planned.vhost)?,
        };
        if let Some(counters) = device.counters() {
            device_counters.push((id, counters));
        }
        pci.add_virtio(
            planned.device_number,
            device,
            &router,
            &vm,
            &mut pio,
            &mut mmio,
        )
        .map_err(VmmError::Device)?;
    }
    let device_entries = device_entries(&devices, &passthrough, iommu.is_some());
    if options.api_socket.is_some() {
        if let Some(full) = device_entries
            .iter()
            .find(|d| d.device_number >= HOTPLUG_SLOTS.start)
        {
            return Err(VmmError::Device(format!(
                "bus 0 is full: {} would take slot {}, but --api-socket keeps slots {}..={} for hotplug; start with fewer devices",
                full.id,
                full.device_number,
                HOTPLUG_SLOTS.start,
                HOTPLUG_SLOTS.end - 1
            )));
        }
    }
    // KVM memory slots after guest RAM's, for the BARs of passed-through devices.
    let mut next_slot = ram.memory.num_regions() as u32;
    let mut vfio_devices = Vec::new();
    let mut vfio_stats = Vec::new();
    for p in passthrough {
        let name = p.id();
        let device =
            VfioPciDevice::new(&name, p.opened.device, |vectors| router.msi_group(vectors))
                .map_err(|err| VmmError::Device(format!("device {name}: {err}")))?;
        let device = Arc::new(Mutex::new(device));
        pci.add_vfio(
            p.device_number,
            device.clone(),
            &vm,
            &mut pio,
            &mut mmio,
            &mut next_slot,
        )
        .map_err(|err| VmmError::Device(format!("device {name}: {err}")))?;
        vfio_devices.push(device);
        vfio_stats.push((name, p.mapper));
    }

    let report = Arc::new(StatsReport::new(iommu.clone(), vfio_stats, device_counters));
    if report.prints_anything() {
        report_stats_on_sigusr1(Arc::clone(&report), sigusr1, filters.clone())?;
    }
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let gate = Arc::new(PauseGate::default());
    if let Some(listener) = api_listener {
        let info = Arc::new(Mutex::new(control::vm_info(config, &device_entries)));
        let hotplug = start_hotplug(
            &pci,
            Machine {
                vm: &vm,
                pio: &pio,
                mmio: &mmio,
                router: &router,
                memory: &ram.memory,
                kvm_vfio,
            },
            iommu.clone(),
            &power_button,
            Arc::clone(&info),
            Arc::clone(&report),
            filters.clone(),
        )?;
        let control = Control {
            info,
            stats: Arc::clone(&report),
            power_button,
            exits: exits_tx.clone(),
            hotplug,
            vcpus: Arc::clone(&gate),
            clock: PausedClock::new(Arc::clone(&vm)),
            pid: std::process::id(),
        };
        serve_api(listener, control, filters.clone())?;
    }

    let rsdp = acpi::write_tables(
        &acpi_layout(
            config,
            options.api_socket.is_some(),
            iommu.is_some().then_some(protected),
        ),
        &ram.memory,
        GuestAddress(layout::ACPI_START),
    )
    .map_err(|err| VmmError::Device(format!("ACPI tables: {err}")))?;
    let payload = config.payload();
    let entry = boot::load_kernel(
        &ram.memory,
        &BootInfo {
            kernel: payload.kernel(),
            initramfs: payload.initramfs.as_deref(),
            cmdline: payload.cmdline(),
            rsdp,
        },
    )?;
    vcpu::write_boot_tables(&ram.memory, entry)
        .map_err(|reason| VmmError::Vcpu(vcpu::VcpuError::Memory { id: 0, reason }))?;

    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_error("get supported CPUID"))?;
    let top = layout::pci_mmio64_start(config.memory.size) + layout::PCI_MMIO64_SIZE;
    if top > 1u64 << config.cpus.max_phys_bits.min(63) {
        return Err(VmmError::Device(format!(
            "cpus.max_phys_bits: {} bits cannot address the machine, which ends at {top:#x}",
            config.cpus.max_phys_bits
        )));
    }
    // Validated: 1 to 254.
    let cpus = config.cpus.boot_vcpus as u8;
    let topology = Topology {
        cpus,
        max_phys_bits: config.cpus.max_phys_bits,
        nested: config.cpus.nested,
    };
    // The guest starts once every vCPU and this thread are confined.
    let start = Arc::new(Barrier::new(usize::from(cpus) + 1));
    for id in 0..cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_error("create vCPU"))?;
        let vcpu = Vcpu::configure(id, fd, &supported_cpuid, &topology, entry)?;
        let (pio, mmio, exits) = (Arc::clone(&pio), Arc::clone(&mmio), exits_tx.clone());
        let (filters, start, gate) = (filters.clone(), Arc::clone(&start), Arc::clone(&gate));
        thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let confined = filters.map_or(Ok(()), |f| f.install(ThreadKind::Vcpu));
                start.wait();
                match confined {
                    Ok(()) => vcpu.run(pio, mmio, exits, &gate),
                    Err(err) => drop(exits.send(GuestExit::Crash(err.to_string()))),
                }
            })
            .map_err(|source| VmmError::Io {
                what: format!("start vCPU {id} thread"),
                source,
            })?;
    }
    drop(exits_tx);
    // Threads started from here on are device threads, started by vCPUs.
    if let Some(filters) = &filters {
        filters.install(ThreadKind::Vmm)?;
    }
    start.wait();

    let exit = exits
        .recv()
        .map_err(|_| VmmError::Device("every vCPU and device stopped without a reason".into()));
    router.stop();
    report.print();
    for device in &vfio_devices {
        vm_device::lock(device).reset();
    }
    exit
}

/// Blocks SIGUSR1 in the calling thread, before any other thread starts, so that every
/// thread inherits the mask and the signal is only consumed by [`report_stats_on_sigusr1`].
fn block_sigusr1() -> Result<libc::sigset_t, VmmError> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    let blocked = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if blocked != 0 {
        return Err(VmmError::Io {
            what: "block SIGUSR1".into(),
            source: io::Error::from_raw_os_error(blocked),
        });
    }
    Ok(set)
}

/// Prints the counters whenever the process gets SIGUSR1, from a thread of its own.
fn report_stats_on_sigusr1(
    report: Arc<StatsReport>,
    set: libc::sigset_t,
    filters: Option<Arc<Filters>>,
) -> Result<(), VmmError> {
    thread::Builder::new()
        .name("stats".into())
        .spawn(move || {
            confine(filters.as_deref(), ThreadKind::Stats);
            loop {
                let mut signal = 0;
                // SAFETY: `set` and `signal` are valid for the call.
                if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                    report.print();
                }
            }
        })
        .map(drop)
        .map_err(|source| VmmError::Io {
            what: "start the statistics thread".into(),
            source,
        })
}

/// What devices are plugged into while the guest runs.
struct Machine<'a> {
    vm: &'a Arc<VmFd>,
    pio: &'a Arc<Bus>,
    mmio: &'a Arc<Bus>,
    router: &'a Arc<GsiRouter>,
    memory: &'a GuestMemoryMmap,
    kvm_vfio: Option<Arc<VfioDeviceFd>>,
}

/// Puts the PCI hotplug controller on the port bus, has the bus follow the BARs the guest
/// gives hot-plugged devices, and starts the thread that plugs them in; returns where the API
/// sends its requests.
fn start_hotplug(
    pci: &PciBus,
    machine: Machine,
    iommu: Option<Arc<VirtioIommu>>,
    power_button: &PowerButton<IrqfdTrigger>,
    info: SharedInfo,
    stats: Arc<StatsReport>,
    filters: Option<Arc<Filters>>,
) -> Result<Sender<HotplugRequest>, VmmError> {
    let (requests_tx, requests, ejects, ejected) = hotplug::channel_for_ejects();
    // What vm.info lists at boot: the devices the VM started with.
    let boot_ids = vm_device::lock(&info).device_tree.keys().cloned().collect();
    let controller = Arc::new(Mutex::new(PciHotplugController::new(
        HOTPLUG_SLOTS,
        Arc::clone(&power_button.0),
        ejects,
    )));
    machine
        .pio
        .insert(
            controller.clone(),
            u64::from(layout::PCI_HOTPLUG_PORT),
            u64::from(acpi::PCI_HOTPLUG_PORTS),
        )
        .map_err(|err| VmmError::Device(format!("PCI hotplug controller: {err}")))?;
    let placement = BarPlacement::new(
        Arc::clone(machine.pio),
        Arc::clone(machine.mmio),
        Arc::clone(machine.vm),
    );
    vm_device::lock(&pci.root()).set_bar_moves(placement.clone());
    Hotplug {
        root: pci.root(),
        router: Arc::clone(machine.router),
        memory: machine.memory.clone(),
        iommu,
        controller,
        placement,
        kvm_vfio: machine.kvm_vfio,
        vfio_entry_limit: vfio::host_dma_entry_limit(Path::new(vfio::DMA_ENTRY_LIMIT_PATH)),
        boot_ids,
        stats,
        info,
        ejected,
    }
    .spawn(requests, filters)?;
    Ok(requests_tx)
}

/// Confines the calling thread to `kind`'s filter, if filters are on. A thread that cannot be
/// confined must not run at all, and has nobody to return an error to: warden exits.
pub(crate) fn confine(filters: Option<&Filters>, kind: ThreadKind) {
    if let Some(Err(err)) = filters.map(|f| f.install(kind)) {
        eprintln!("warden: {err}");
        std::process::exit(1);
    }
}

fn device_thread_kind(kind: DeviceThread) -> ThreadKind {
    match kind {
        DeviceThread::Block => ThreadKind::Block,
        DeviceThread::Net => ThreadKind::Net,
        DeviceThread::Rng => ThreadKind::Rng,
        DeviceThread::Console => ThreadKind::Console,
        DeviceThread::IommuEvents => ThreadKind::IommuEvents,
        DeviceThread::IommuPoller => ThreadKind::IommuPoller,
    }
}

/// The machine as the guest's ACPI tables describe it.
///
/// With `hotplug` (an API to plug devices in), the hotplug slots are there too, and with a
/// virtio-iommu the VIOT covers the slots for protected hotplug.
fn acpi_layout(
    config: &VmConfig,
    hotplug: bool,
    protected: Option<Vec<acpi::PciBdf>>,
) -> acpi::AcpiLayout {
    let mmio64_start = layout::pci_mmio64_start(config.memory.size);
    // Validated: 1 to 254.
    let cpus = config.cpus.boot_vcpus as u8;
    acpi::AcpiLayout {
        cpus,
        ioapic: acpi::IoApic {
            // After the LAPIC IDs 0..cpus, so that no two interrupt controllers share an ID.
            id: cpus,
            address: layout::IOAPIC_START as u32,
            gsi_base: 0,
        },
        lapic_address: layout::LAPIC_START as u32,
        ecam: acpi::Ecam {
            base: layout::PCI_ECAM_START,
            segment: 0,
            bus_start: 0,
            bus_end: 0,
        },
        mmio32: layout::PCI_MMIO32_START..layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE,
        mmio64: mmio64_start..mmio64_start + layout::PCI_MMIO64_SIZE,
        // Virtio queue notifications live in I/O BARs.
        pci_io: Some(layout::PCI_IO_START..layout::PCI_IO_END),
        serial: (config.serial.mode != ConsoleMode::Off).then_some(acpi::Serial {
            port: layout::COM1_PORT,
            irq: layout::COM1_IRQ,
        }),
        sleep: acpi::SleepRegisters {
            control_port: layout::ACPI_SLEEP_CONTROL_PORT,
            status_port: layout::ACPI_SLEEP_STATUS_PORT,
        },
        reset: Some(acpi::ResetRegister {
            port: layout::ACPI_RESET_PORT,
            value: layout::ACPI_RESET_VALUE,
        }),
        // Our i8042 only implements the reset line: keep Linux from probing it for a keyboard.
        i8042: false,
        events: Some(acpi::GenericEvents {
            port: layout::GED_PORT,
            irq: layout::GED_IRQ,
        }),
        iommu: protected.map(|protected| acpi::Viot {
            iommu: acpi::PciBdf::new(0, 0, IOMMU_DEVICE_NUMBER, 0),
            protected,
            protected_slots: if hotplug { PROTECTED_SLOTS } else { 0..0 },
        }),
        pci_hotplug: hotplug.then_some(acpi::PciHotplug {
            port: layout::PCI_HOTPLUG_PORT,
            slots: HOTPLUG_SLOTS,
        }),
    }
}

/// kvm_pvm runs guest kernel code through an instruction emulator: say so once, up front,
/// instead of leaving the user to wonder why the guest never reaches userspace.
fn warn_if_kvm_cannot_run_linux() {
    if Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "warden: warning: this host's KVM is kvm_pvm (no VMX/SVM): guest kernel code is emulated, so an unmodified Linux guest will crawl and cannot start userspace here; use a host with hardware virtualization"
        );
    }
}

fn register_ram(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (slot, region) in memory.iter().enumerate() {
        let region_info = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which outlives the VM's use
        // of it: both are kept until the process exits.
        unsafe { vm.set_user_memory_region(region_info) }
            .map_err(kvm_error("register guest RAM"))?;
    }
    Ok(())
}

fn set_up_irqchip(vm: &VmFd) -> Result<(), VmmError> {
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
        .map_err(kvm_error("set identity map address"))?;
    vm.set_tss_address(layout::KVM_TSS_START as usize)
        .map_err(kvm_error("set TSS address"))?;
    vm.create_irq_chip().map_err(kvm_error("create irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_error("create PIT"))
}

/// Adds the legacy devices; returns the power button.
fn add_legacy_devices(
    pio: &mut Bus,
    router: &GsiRouter,
    serial: &SerialConfig,
    exits: &Sender<GuestExit>,
    filters: Option<Arc<Filters>>,
) -> Result<PowerButton<IrqfdTrigger>, VmmError> {
    let insert =
        |pio: &mut Bus, device: Arc<Mutex<dyn vm_device::BusDevice>>, base: u16, len: u16| {
            pio.insert(device, u64::from(base), u64::from(len))
                .map_err(|err| VmmError::Device(err.to_string()))
        };
    if serial.mode != ConsoleMode::Off {
        let irq = router
            .legacy_irqfd(layout::COM1_IRQ)
            .map_err(|source| VmmError::Io {
                what: "serial interrupt".into(),
                source,
            })?;
        let out = open_output(serial.mode, serial.file.as_deref(), "serial")?;
        let port = Arc::new(Mutex::new(SerialPort(Serial::new(IrqfdTrigger(irq), out))));
        insert(pio, port.clone(), layout::COM1_PORT, 8)?;
        if serial.mode == ConsoleMode::Tty && io::stdin().is_terminal() {
            forward_stdin(port, filters);
        }
    }
    insert(
        pio,
        Arc::new(Mutex::new(Cmos::default())),
        layout::RTC_PORT,
        2,
    )?;
    insert(
        pio,
        Arc::new(Mutex::new(I8042::new(exits.clone()))),
        layout::I8042_PORT,
        5,
    )?;
    insert(
        pio,
        Arc::new(Mutex::new(AcpiSleep::new(exits.clone()))),
        layout::ACPI_SLEEP_CONTROL_PORT,
        2,
    )?;
    insert(
        pio,
        Arc::new(Mutex::new(AcpiReset::new(exits.clone()))),
        layout::ACPI_RESET_PORT,
        1,
    )?;
    let irq = router
        .legacy_irqfd(layout::GED_IRQ)
        .map_err(|source| VmmError::Io {
            what: "power button interrupt".into(),
            source,
        })?;
    let events = Arc::new(Mutex::new(GenericEvents::new(IrqfdTrigger(irq))));
    insert(pio, events.clone(), layout::GED_PORT, 1)?;
    Ok(PowerButton(events))
}
