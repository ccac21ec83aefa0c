//! The boot path: from a validated configuration to a running guest, in order.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use kvm_bindings::{
    kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO, kvm_pit_config,
    kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use sandbox::{Filters, ThreadKind};
use vfio::{OpenedDevice, VfioDeviceFd, VfioMapper, VfioPciDevice};
use virtio_devices::{
    Block, BlockOptions, Console, DeviceMemory, DeviceThread, Iommu, Net, NetOptions, PollConfig,
    Rng, VirtioDevice,
};
use virtio_iommu::{EndpointConfig, EndpointIommu, ExternalMapper, IommuConfig, VirtioIommu};
use vm_device::Bus;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, IommuMemory,
};
use vm_superio::Serial;

use crate::boot::{self, BootInfo};
use crate::config::{DeviceConfig, DiskConfig, NetConfig, OutputConfig, RngConfig, VmConfig};
use crate::control::{self, api_listener, serve_api, Control, DeviceEntry};
use crate::interrupts::GsiRouter;
use crate::layout;
use crate::legacy::{
    AcpiReset, AcpiSleep, Cmos, GenericEvents, GuestExit, IrqfdTrigger, PowerButton, SerialPort,
    I8042,
};
use crate::memory::{self, MemoryError};
use crate::pci_bus::{PciBus, IOMMU_DEVICE_NUMBER};
use crate::stats::{self, StatsReport};
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
    #[error("--net: {0}")]
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

/// Builds the machine `config` describes, runs it, and returns how the guest stopped.
pub fn run(config: &VmConfig) -> Result<GuestExit, VmmError> {
    let sigusr1 = block_sigusr1()?;
    let filters = Filters::new(config.seccomp)?.map(Arc::new);
    if let Some(filters) = &filters {
        let filters = Arc::clone(filters);
        virtio_devices::set_thread_start_hook(Box::new(move |kind| {
            confine(Some(&filters), device_thread_kind(kind));
        }));
    }
    let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
    warn_if_kvm_cannot_run_linux();
    let api_listener = config.api_socket.as_ref().map(api_listener).transpose()?;

    let ram = memory::create_guest_ram(&config.memory)?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_error("create VM"))?);
    register_ram(&vm, &ram.memory)?;
    set_up_irqchip(&vm)?;
    let router = GsiRouter::new(Arc::clone(&vm)).map_err(|source| VmmError::Io {
        what: "set GSI routing".into(),
        source,
    })?;

    // Keystrokes go to the guest unprocessed (Ctrl-C included), as on a serial line.
    let _raw_terminal = (config.serial == OutputConfig::Tty || config.console == OutputConfig::Tty)
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
    let devices = plan_devices(config);
    let passthrough = open_passthrough(config, &vm, &devices, &ram.memory)?;
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
    let iommu = if config.needs_iommu() {
        let model = create_iommu_model(ram.backing_page_size, &devices, &passthrough)?;
        let device = Box::new(Iommu::new(
            Arc::clone(&model),
            ram.memory.clone(),
            iommu_polling(config.iommu_poll),
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
    for planned in &devices {
        let device = match (&iommu, planned.iommu) {
            (Some(model), true) => {
                let endpoint = planned.endpoint().endpoint_id();
                let translator = EndpointIommu::new(Arc::clone(model), endpoint)
                    .expect("every protected device was registered as an endpoint");
                let mem = IommuMemory::new(ram.memory.clone(), translator, true, ());
                build_device(&planned.kind, mem, true, config)?
            }
            _ => build_device(&planned.kind, ram.memory.clone(), false, config)?,
        };
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
    // KVM memory slots after guest RAM's, for the BARs of passed-through devices.
    let mut next_slot = ram.memory.num_regions() as u32;
    let mut vfio_devices = Vec::new();
    let mut vfio_stats = Vec::new();
    for p in passthrough {
        let name = p.config.name();
        let device =
            VfioPciDevice::new(&name, p.opened.device, |vectors| router.msi_group(vectors))
                .map_err(|err| VmmError::Device(format!("--device {name}: {err}")))?;
        let device = Arc::new(Mutex::new(device));
        pci.add_vfio(
            p.device_number,
            device.clone(),
            &vm,
            &mut pio,
            &mut mmio,
            &mut next_slot,
        )
        .map_err(|err| VmmError::Device(format!("--device {name}: {err}")))?;
        vfio_devices.push(device);
        vfio_stats.push((name, p.mapper));
    }

    let report = Arc::new(StatsReport {
        iommu: iommu.clone(),
        vfio: vfio_stats,
    });
    if report.has_any() {
        report_stats_on_sigusr1(Arc::clone(&report), sigusr1, filters.clone())?;
    }
    if let Some(listener) = api_listener {
        let control = Control {
            info: control::vm_info(config, &device_entries, iommu.is_some()),
            stats: Arc::clone(&report),
            power_button,
            exits: exits_tx.clone(),
            pid: std::process::id(),
        };
        serve_api(listener, control, filters.clone())?;
    }

    let rsdp = acpi::write_tables(
        &acpi_layout(config, iommu.is_some().then_some(protected)),
        &ram.memory,
        GuestAddress(layout::ACPI_START),
    )
    .map_err(|err| VmmError::Device(format!("ACPI tables: {err}")))?;
    let entry = boot::load_kernel(
        &ram.memory,
        &BootInfo {
            kernel: &config.kernel,
            initramfs: config.initramfs.as_deref(),
            cmdline: &config.cmdline,
            rsdp,
        },
    )?;
    vcpu::write_boot_tables(&ram.memory, entry)
        .map_err(|reason| VmmError::Vcpu(vcpu::VcpuError::Memory { id: 0, reason }))?;

    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_error("get supported CPUID"))?;
    let topology = Topology { cpus: config.cpus };
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    // The guest starts once every vCPU and this thread are confined.
    let start = Arc::new(Barrier::new(usize::from(config.cpus) + 1));
    for id in 0..config.cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_error("create vCPU"))?;
        let vcpu = Vcpu::configure(id, fd, &supported_cpuid, &topology, entry)?;
        let (pio, mmio, exits) = (Arc::clone(&pio), Arc::clone(&mmio), exits_tx.clone());
        let (filters, start) = (filters.clone(), Arc::clone(&start));
        thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let confined = filters.map_or(Ok(()), |f| f.install(ThreadKind::Vcpu));
                start.wait();
                match confined {
                    Ok(()) => vcpu.run(pio, mmio, exits),
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
    report.print();
    for device in &vfio_devices {
        vm_device::lock(device).reset();
    }
    exit
}

/// A host device to pass through, opened, with its place on bus 0 and its DMA mapper.
struct Passthrough<'a> {
    config: &'a DeviceConfig,
    device_number: u8,
    opened: OpenedDevice,
    mapper: Arc<VfioMapper>,
}

impl Passthrough<'_> {
    fn endpoint(&self) -> acpi::PciBdf {
        acpi::PciBdf::new(0, 0, self.device_number, 0)
    }
}

/// Opens every `--device`, in order, on the bus slots after the virtio devices. A device
/// without `iommu=on` gets all guest RAM mapped now (IOVA = GPA, as if there were no IOMMU);
/// one with `iommu=on` gets nothing until the guest maps it through the virtio-iommu.
fn open_passthrough<'a>(
    config: &'a VmConfig,
    vm: &VmFd,
    devices: &[PlannedDevice],
    memory: &GuestMemoryMmap,
) -> Result<Vec<Passthrough<'a>>, VmmError> {
    if config.devices.is_empty() {
        return Ok(Vec::new());
    }
    let kvm_vfio = kvm_vfio_device(vm);
    let first = devices
        .last()
        .map_or(IOMMU_DEVICE_NUMBER, |d| d.device_number)
        + 1;
    let entry_limit = vfio::host_dma_entry_limit(Path::new(vfio::DMA_ENTRY_LIMIT_PATH));
    let mut opened = Vec::new();
    for (device_config, device_number) in config.devices.iter().zip(first..) {
        if device_number >= pci::MAX_DEVICES {
            return Err(VmmError::Device(
                "--device: bus 0 is full (32 slots); pass fewer devices".into(),
            ));
        }
        let name = device_config.name();
        let device = vfio::open(&device_config.path, kvm_vfio.clone())?;
        let mapper = Arc::new(VfioMapper::new(
            &name,
            device.container.clone(),
            memory.clone(),
            entry_limit,
        ));
        if !device_config.iommu {
            mapper.set_identity(true).map_err(|err| {
                VmmError::Device(format!(
                    "--device {name}: cannot map guest RAM for its DMA: {err}"
                ))
            })?;
        }
        opened.push(Passthrough {
            config: device_config,
            device_number,
            opened: device,
            mapper,
        });
    }
    Ok(opened)
}

/// The VM's KVM VFIO device, through which KVM learns which groups the guest uses (for DMA
/// coherency); passthrough works without it, so a failure only costs a warning.
fn kvm_vfio_device(vm: &VmFd) -> Option<Arc<VfioDeviceFd>> {
    let mut request = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    match vm.create_device(&mut request) {
        Ok(fd) => Some(Arc::new(VfioDeviceFd::new_from_kvm(fd))),
        Err(err) => {
            log::warn!("no KVM VFIO device: {err}");
            None
        }
    }
}

/// One virtio device to plug in, before its memory view is chosen.
enum DeviceKind<'a> {
    Console,
    Disk(&'a DiskConfig),
    Net(&'a NetConfig),
    Rng(&'a RngConfig),
}

/// A virtio device with its place on bus 0 and whether the IOMMU translates its DMA.
struct PlannedDevice<'a> {
    device_number: u8,
    kind: DeviceKind<'a>,
    iommu: bool,
}

impl PlannedDevice<'_> {
    /// The endpoint ID the guest uses for this device in IOMMU requests: its PCI BDF, as the
    /// VIOT's PCI range nodes define it.
    fn endpoint(&self) -> acpi::PciBdf {
        acpi::PciBdf::new(0, 0, self.device_number, 0)
    }
}

/// The virtio devices in the order the guest sees them on bus 0: console, disks, nets, rng, after
/// the slot reserved for the virtio-iommu (kept free even without one, so that devices keep
/// their addresses when the IOMMU is switched on).
fn plan_devices(config: &VmConfig) -> Vec<PlannedDevice<'_>> {
    let console = (config.console != OutputConfig::Off)
        .then_some((DeviceKind::Console, config.console_iommu));
    let disks = config
        .disks
        .iter()
        .map(|disk| (DeviceKind::Disk(disk), disk.iommu));
    let nets = config
        .nets
        .iter()
        .map(|net| (DeviceKind::Net(net), net.iommu));
    let rng = config
        .rng
        .as_ref()
        .map(|rng| (DeviceKind::Rng(rng), rng.iommu));
    (IOMMU_DEVICE_NUMBER + 1..)
        .zip(console.into_iter().chain(disks).chain(nets).chain(rng))
        .map(|(device_number, (kind, iommu))| PlannedDevice {
            device_number,
            kind,
            iommu,
        })
        .collect()
}

/// Polling the request queue only pays when the poller has a CPU of its own: on a single
/// host CPU it would take turns with the vCPU it is meant to answer.
fn iommu_polling(max_window: Duration) -> PollConfig {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 && !max_window.is_zero() {
        log::info!("virtio-iommu: one host CPU, so the request queue is not polled");
        return PollConfig {
            max_window: Duration::ZERO,
        };
    }
    PollConfig { max_window }
}

/// The virtio-iommu model for a guest whose RAM is backed by pages of `backing_page_size`,
/// with the protected virtio devices and passed-through devices as endpoints.
///
/// Page sizes larger than 4 KiB are offered only where RAM is really backed by them, so that a
/// guest mapping a 2 MiB IOMMU page also maps one contiguous host page (what VFIO needs). With
/// passed-through endpoints, page sizes and the input range are narrowed to what their host
/// IOMMU supports, each such endpoint reports the host's IOVA holes as reserved regions, and
/// boot bypass is off: a real device could otherwise DMA anywhere in guest RAM before the
/// guest's IOMMU driver attaches it.
fn create_iommu_model(
    backing_page_size: u64,
    devices: &[PlannedDevice],
    passthrough: &[Passthrough],
) -> Result<Arc<VirtioIommu>, VmmError> {
    let mut page_size_mask = [4 << 10, 2 << 20, 1 << 30]
        .into_iter()
        .filter(|&size| size <= backing_page_size.max(4 << 10))
        .fold(0, |mask, size| mask | size);
    let mut input_range = (0, u64::MAX);
    let behind_iommu: Vec<&Passthrough> = passthrough.iter().filter(|p| p.config.iommu).collect();
    for p in &behind_iommu {
        let host = &p.opened.iommu;
        page_size_mask = intersect_page_sizes(page_size_mask, host.page_sizes);
        let (first, last) = (
            host.iova_ranges[0],
            host.iova_ranges[host.iova_ranges.len() - 1],
        );
        input_range = (input_range.0.max(first.0), input_range.1.min(last.1));
    }
    if page_size_mask == 0 || input_range.0 > input_range.1 {
        return Err(VmmError::Device(format!(
            "--device: the host IOMMU's page sizes or IOVA ranges leave the virtio-iommu nothing to offer (page sizes {page_size_mask:#x}, range {:#x}..={:#x})",
            input_range.0, input_range.1
        )));
    }
    let model = VirtioIommu::new(IommuConfig {
        page_size_mask,
        input_range,
        boot_bypass: behind_iommu.is_empty(),
        ..IommuConfig::default()
    })
    .map_err(|err| VmmError::Device(format!("virtio-iommu: {err}")))?;
    let add = |endpoint: acpi::PciBdf, cfg: EndpointConfig| {
        model
            .add_endpoint(endpoint.endpoint_id(), cfg)
            .map_err(|err| VmmError::Device(format!("virtio-iommu: {err}")))
    };
    for device in devices.iter().filter(|device| device.iommu) {
        add(device.endpoint(), EndpointConfig::default())?;
    }
    for p in behind_iommu {
        let mapper: Arc<dyn ExternalMapper> = p.mapper.clone();
        add(
            p.endpoint(),
            EndpointConfig {
                reserved_regions: Some(p.opened.iommu.reserved_regions()),
                mapper: Some(mapper),
            },
        )?;
    }
    Ok(Arc::new(model))
}

/// The page sizes both sides support. The host IOMMU can map any multiple of its granule, so a
/// guest page size the host lacks is still fine if it is a multiple of the host's granule.
fn intersect_page_sizes(guest: u64, host: u64) -> u64 {
    if host == 0 {
        return guest;
    }
    let host_granule = host & host.wrapping_neg();
    guest & !(host_granule - 1)
}

/// Builds one virtio device over `mem`: guest RAM itself, or RAM seen through the IOMMU.
fn build_device<M: DeviceMemory>(
    kind: &DeviceKind,
    mem: M,
    access_platform: bool,
    config: &VmConfig,
) -> Result<Box<dyn VirtioDevice>, VmmError> {
    Ok(match kind {
        DeviceKind::Console => {
            let input =
                if config.console == OutputConfig::Tty && io::stdin().is_terminal() {
                    Some(io::stdin().as_fd().try_clone_to_owned().map_err(|source| {
                        VmmError::Io {
                            what: "--console: duplicate stdin".into(),
                            source,
                        }
                    })?)
                } else {
                    None
                };
            let output = open_output(&config.console, "--console")?;
            Box::new(Console::new(mem, output, input, access_platform))
        }
        DeviceKind::Disk(disk) => {
            let options = BlockOptions {
                readonly: disk.readonly,
                access_platform,
                ..Default::default()
            };
            Box::new(
                Block::open(mem, &disk.path, options)
                    .map_err(|err| VmmError::Device(format!("--disk: {err}")))?,
            )
        }
        DeviceKind::Net(net) => {
            let tap = net_util::Tap::open(&net.tap)?;
            if let Some((ip, mask)) = net.host_ipv4 {
                tap.set_ipv4(ip, mask)?;
            }
            // The name matters to whoever configures the host side of a tap warden created.
            log::info!(
                "--net: tap {} for the guest's {} (queues of {}{})",
                tap.name(),
                net.mac,
                net.queue_size,
                if access_platform {
                    ", behind the IOMMU"
                } else {
                    ""
                }
            );
            let options = NetOptions {
                mac: net.mac,
                queue_size: net.queue_size,
                access_platform,
            };
            Box::new(Net::new(mem, tap, options))
        }
        DeviceKind::Rng(rng) => Box::new(
            Rng::new(mem, &rng.src, access_platform)
                .map_err(|err| VmmError::Device(format!("--rng: {err}")))?,
        ),
    })
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

/// The devices on bus 0 as `vm.info` names them: Cloud Hypervisor's ids (`_disk0`, `_net0`,
/// ...), the virtio-iommu under the id of its counters, passed-through devices by their id.
fn device_entries(
    devices: &[PlannedDevice],
    passthrough: &[Passthrough],
    iommu: bool,
) -> Vec<DeviceEntry> {
    let (mut disks, mut nets) = (0, 0);
    let mut entries: Vec<DeviceEntry> = devices
        .iter()
        .map(|device| {
            let id = match device.kind {
                DeviceKind::Console => "_console".to_string(),
                DeviceKind::Rng(_) => "_rng".to_string(),
                DeviceKind::Disk(_) => {
                    disks += 1;
                    format!("_disk{}", disks - 1)
                }
                DeviceKind::Net(_) => {
                    nets += 1;
                    format!("_net{}", nets - 1)
                }
            };
            DeviceEntry {
                id,
                device_number: device.device_number,
            }
        })
        .collect();
    if iommu {
        entries.push(DeviceEntry {
            id: stats::IOMMU_ID.into(),
            device_number: IOMMU_DEVICE_NUMBER,
        });
    }
    entries.extend(passthrough.iter().map(|p| DeviceEntry {
        id: p.config.name(),
        device_number: p.device_number,
    }));
    entries
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
fn acpi_layout(config: &VmConfig, protected: Option<Vec<acpi::PciBdf>>) -> acpi::AcpiLayout {
    let mmio64_start = layout::pci_mmio64_start(config.memory.size);
    acpi::AcpiLayout {
        cpus: config.cpus,
        ioapic: acpi::IoApic {
            // After the LAPIC IDs 0..cpus, so that no two interrupt controllers share an ID.
            id: config.cpus,
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
        serial: (config.serial != OutputConfig::Off).then_some(acpi::Serial {
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
            protected_slots: 0..0,
        }),
        pci_hotplug: None,
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
    serial: &OutputConfig,
    exits: &Sender<GuestExit>,
    filters: Option<Arc<Filters>>,
) -> Result<PowerButton<IrqfdTrigger>, VmmError> {
    let insert =
        |pio: &mut Bus, device: Arc<Mutex<dyn vm_device::BusDevice>>, base: u16, len: u16| {
            pio.insert(device, u64::from(base), u64::from(len))
                .map_err(|err| VmmError::Device(err.to_string()))
        };
    if *serial != OutputConfig::Off {
        let irq = router
            .legacy_irqfd(layout::COM1_IRQ)
            .map_err(|source| VmmError::Io {
                what: "serial interrupt".into(),
                source,
            })?;
        let out = open_output(serial, "--serial")?;
        let port = Arc::new(Mutex::new(SerialPort(Serial::new(IrqfdTrigger(irq), out))));
        insert(pio, port.clone(), layout::COM1_PORT, 8)?;
        if *serial == OutputConfig::Tty && io::stdin().is_terminal() {
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

/// Opens where a character device writes: the terminal, or a file named by `option`.
fn open_output(output: &OutputConfig, option: &str) -> Result<Box<dyn Write + Send>, VmmError> {
    match output {
        OutputConfig::Off | OutputConfig::Null => Ok(Box::new(io::sink())),
        OutputConfig::Tty => Ok(Box::new(io::stdout())),
        OutputConfig::File(path) => OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(|file| Box::new(file) as Box<dyn Write + Send>)
            .map_err(|source| VmmError::Io {
                what: format!("{option}: cannot open file={}", path.display()),
                source,
            }),
    }
}

/// The terminal on stdin in raw mode, restored to what it was when dropped.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Switches stdin to raw mode; `None` when stdin is not a terminal.
    fn enter() -> Option<Self> {
        if !io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios is plain data, filled in by tcgetattr before any use.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is open and `saved` is a valid termios to fill in.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios; cfmakeraw only edits its flags.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd 0 is open and `raw` is a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: fd 0 is open and `saved` is the termios it had before.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

/// Feeds terminal input to the guest's serial port from a thread of its own.
fn forward_stdin(port: Arc<Mutex<SerialPort>>, filters: Option<Arc<Filters>>) {
    let spawned = thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || {
            confine(filters.as_deref(), ThreadKind::SerialInput);
            let mut buffer = [0u8; 64];
            let mut stdin = io::stdin();
            while let Ok(count) = stdin.read(&mut buffer) {
                if count == 0 {
                    break;
                }
                feed_serial(&port, &buffer[..count]);
            }
        });
    if let Err(err) = spawned {
        log::warn!("no serial input: {err}");
    }
}

/// Puts `bytes` into the UART's receive FIFO. It holds 64 bytes: when a paste (or a fast typist
/// over a slow nested guest) fills it, the rest waits here until the guest has read some,
/// instead of being lost.
fn feed_serial(port: &Mutex<SerialPort>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let taken = vm_device::lock(port).0.enqueue_raw_bytes(bytes);
        match taken {
            Ok(0) => break, // loopback mode: the UART takes no input
            Ok(n) => bytes = &bytes[n..],
            Err(vm_superio::serial::Error::FullFifo) => thread::sleep(Duration::from_millis(1)),
            Err(err) => {
                log::debug!("serial input dropped: {err:?}");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::{MacAddr, MemoryBacking, MemoryConfig};

    #[test]
    fn serial_input_longer_than_the_fifo_waits_instead_of_being_dropped() {
        use vm_device::BusDevice;
        let irq = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let port = Arc::new(Mutex::new(SerialPort(Serial::new(
            IrqfdTrigger(irq),
            Box::new(io::sink()),
        ))));
        let input: Vec<u8> = (0..200u8).collect();
        let feeder = {
            let (port, input) = (Arc::clone(&port), input.clone());
            thread::spawn(move || feed_serial(&port, &input))
        };
        // The guest's side: read the data register (offset 0) while the line status register
        // (offset 5) says data is ready (bit 0).
        let mut received = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while received.len() < input.len() && std::time::Instant::now() < deadline {
            let mut port = vm_device::lock(&port);
            let mut status = [0u8];
            port.read(0, 5, &mut status);
            if status[0] & 1 != 0 {
                let mut byte = [0u8];
                port.read(0, 0, &mut byte);
                received.push(byte[0]);
            } else {
                drop(port);
                thread::yield_now();
            }
        }
        feeder.join().unwrap();
        assert_eq!(received, input);
    }

    #[test]
    fn nets_sit_between_disks_and_rng_and_count_for_the_iommu() {
        let disk = DiskConfig {
            path: PathBuf::from("disk.img"),
            readonly: false,
            iommu: false,
        };
        let net = NetConfig {
            tap: String::new(),
            mac: MacAddr::new([0x02, 0, 0, 0, 0, 1]),
            host_ipv4: None,
            queue_size: NetConfig::DEFAULT_QUEUE_SIZE,
            iommu: true,
        };
        let config = VmConfig {
            cpus: 1,
            memory: MemoryConfig {
                size: 512 << 20,
                backing: MemoryBacking::Anonymous,
                shared: false,
            },
            kernel: PathBuf::from("vmlinux"),
            initramfs: None,
            cmdline: String::new(),
            disks: vec![disk.clone(), disk],
            nets: vec![
                net.clone(),
                NetConfig {
                    iommu: false,
                    ..net
                },
            ],
            rng: Some(RngConfig {
                src: PathBuf::from("/dev/urandom"),
                iommu: false,
            }),
            serial: OutputConfig::Off,
            console: OutputConfig::Null,
            console_iommu: false,
            iommu_poll: Duration::ZERO,
            devices: Vec::new(),
            seccomp: crate::config::SeccompMode::Off,
            api_socket: None,
        };
        assert!(config.needs_iommu(), "a protected net needs the IOMMU");
        let plan: Vec<(u8, &str, bool)> = plan_devices(&config)
            .iter()
            .map(|device| {
                let kind = match device.kind {
                    DeviceKind::Console => "console",
                    DeviceKind::Disk(_) => "disk",
                    DeviceKind::Net(_) => "net",
                    DeviceKind::Rng(_) => "rng",
                };
                (device.device_number, kind, device.iommu)
            })
            .collect();
        assert_eq!(
            plan,
            [
                (2, "console", false),
                (3, "disk", false),
                (4, "disk", false),
                (5, "net", true),
                (6, "net", false),
                (7, "rng", false),
            ]
        );
    }
}
