//! The boot path: from a validated configuration to a machine ready to run, in order. [`build`]
//! reads as the list of what a VM is made of; each `attach_*` step owns one part.

use std::io::{self, IsTerminal};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vfio::{VfioDeviceFd, VfioPciDevice};
use virtio_devices::{Iommu, VirtioDevice};
use virtio_iommu::VirtioIommu;
use vm_config::{ConsoleMode, SerialConfig, VmConfig};
use vm_device::{lock, Bus};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::Serial;

use crate::attach;
use crate::bar_placement::BarPlacement;
use crate::boot::{self, BootInfo, EntryPoint};
use crate::clock::PausedClock;
use crate::control::{vm_info, DeviceEntry};
use crate::devices::{
    create_iommu_model, device_entries, device_ids, iommu_polling, kvm_vfio_device, open_output,
    open_passthrough, open_vhost, plan_devices, ConfiguredDevice, Held, Passthrough, PlannedDevice,
};
use crate::error::{kvm_error, VmmError};
use crate::events::ExitNotice;
use crate::host::Host;
use crate::hotplug::{
    self, Hotplug, HotplugThread, SegmentHotplug, HOTPLUG_SLOTS, PROTECTED_SLOTS,
};
use crate::interrupts::GsiRouter;
use crate::layout;
use crate::legacy::{
    AcpiReset, AcpiSleep, Cmos, GenericEvents, IrqfdTrigger, PowerButton, SerialPort, I8042,
};
use crate::memory::{self, GuestRam};
use crate::pause::PauseGate;
use crate::pci_bus::{PciSegments, IOMMU_DEVICE_NUMBER};
use crate::pci_hotplug::PciHotplugController;
use crate::plugged::SharedInfo;
use crate::stats::StatsReport;
use crate::terminal::RawTerminal;
use crate::vcpu::{self, Topology, Vcpu};
use crate::vm::Vm;

/// Builds VM number `number` as `config` (validated and resolved) describes it, ready for
/// [`Vm::start`].
pub(crate) fn build(config: &VmConfig, host: &Host, number: u64) -> Result<Vm, VmmError> {
    let ram = memory::create_guest_ram(&config.memory)?;
    let fd = attach_kvm_vm(&host.kvm, &ram.memory)?;
    let router = GsiRouter::new(Arc::clone(&fd)).map_err(|source| VmmError::Io {
        what: "set GSI routing".into(),
        source,
    })?;
    let exits = ExitNotice::new(number, host.events.clone());
    // Keystrokes go to the guest unprocessed (Ctrl-C included), as on a serial line.
    let raw_terminal = (config.serial.mode == ConsoleMode::Tty
        || config.console.mode == ConsoleMode::Tty)
        .then(RawTerminal::enter)
        .flatten();
    let mut buses = Buses::default();
    let power_button =
        attach_legacy_devices(&mut buses.pio, &router, &config.serial, &exits, host)?;
    let segments = config.platform().num_pci_segments;
    let mut pci = PciSegments::new(
        config.memory.size,
        segments,
        &mut buses.pio,
        &mut buses.mmio,
    )
    .map_err(VmmError::Device)?;
    let mut devices = plan_devices(config);
    open_vhost(&mut devices, &ram.memory)?;
    let kvm_vfio = (!config.devices.is_empty() || host.hotplug)
        .then(|| kvm_vfio_device(&fd))
        .flatten();
    let passthrough = open_passthrough(config, kvm_vfio.as_ref(), &devices, &ram.memory)?;
    let entries = device_entries(&devices, &passthrough, config.iommu);
    check_hotplug_slots_free(host.hotplug, &entries)?;
    let machine = Machine {
        fd: &fd,
        router: &router,
        ram: &ram,
    };
    let (iommu, iommu_counters) = attach_iommu(
        config,
        &machine,
        &devices,
        &passthrough,
        &mut pci,
        &mut buses,
    )?;
    let mut stats = attach_virtio_devices(
        &machine,
        &devices,
        iommu.as_ref(),
        &mut pci,
        &mut buses,
        Held {
            taps: &host.taps,
            ptys: &host.ptys,
        },
    )?;
    stats.extend(iommu_counters);
    let protected = protected_endpoints(&devices, &passthrough);
    let (vfio_devices, vfio_stats) =
        attach_passthrough(passthrough, &machine, &mut pci, &mut buses)?;
    let stats = Arc::new(StatsReport::new(iommu.clone(), vfio_stats, stats.drain(..)));
    let info: SharedInfo = Arc::new(Mutex::new(vm_info(config, &entries)));
    let (pio, mmio) = (Arc::new(buses.pio), Arc::new(buses.mmio));
    let hotplug = if host.hotplug {
        Some(attach_hotplug(
            &pci,
            &machine,
            (&pio, &mmio),
            kvm_vfio,
            iommu.clone(),
            &power_button,
            (Arc::clone(&info), Arc::clone(&stats)),
            host,
        )?)
    } else {
        None
    };
    let entry = load_payload(
        config,
        &ram.memory,
        host.hotplug,
        iommu.is_some().then_some(protected),
    )?;
    let vcpus = create_vcpus(host, &fd, config, entry)?;
    Ok(Vm {
        number,
        pid: host.pid,
        _memory: ram.memory.clone(),
        roots: pci.roots(),
        clock: PausedClock::new(Arc::clone(&fd)),
        _fd: fd,
        pio,
        mmio,
        router,
        gate: Arc::new(PauseGate::default()),
        power_button,
        stats,
        info,
        hotplug,
        vfio_devices,
        vcpus,
        running: Vec::new(),
        exits,
        _raw_terminal: raw_terminal,
    })
}

/// A device's counters, by its id.
type Counted = (String, Arc<dyn virtio_devices::DeviceCounters>);

/// Passed-through devices, and their DMA mappers by id.
type Passed = (
    Vec<Arc<Mutex<VfioPciDevice>>>,
    Vec<(String, Arc<vfio::VfioMapper>)>,
);

/// The port and MMIO buses while devices are put on them.
#[derive(Default)]
struct Buses {
    pio: Bus,
    mmio: Bus,
}

/// What the devices of one VM are built on.
struct Machine<'a> {
    fd: &'a Arc<VmFd>,
    router: &'a Arc<GsiRouter>,
    ram: &'a GuestRam,
}

/// The KVM VM, its RAM registered, with the in-kernel interrupt controllers and timer.
fn attach_kvm_vm(kvm: &Kvm, memory: &GuestMemoryMmap) -> Result<Arc<VmFd>, VmmError> {
    let fd = Arc::new(kvm.create_vm().map_err(kvm_error("create VM"))?);
    register_ram(&fd, memory)?;
    set_up_irqchip(&fd)?;
    Ok(fd)
}

/// The virtio-iommu, in its own slot, when the configuration asks for one; returns its model,
/// through which protected devices translate, and the request queue's counters.
fn attach_iommu(
    config: &VmConfig,
    machine: &Machine,
    devices: &[PlannedDevice],
    passthrough: &[Passthrough],
    pci: &mut PciSegments,
    buses: &mut Buses,
) -> Result<(Option<Arc<VirtioIommu>>, Option<Counted>), VmmError> {
    if !config.iommu {
        return Ok((None, None));
    }
    let platform = config.platform();
    let model = create_iommu_model(
        machine.ram.backing_page_size,
        platform.iommu_address_width_bits,
        devices,
        passthrough,
        &machine.ram.memory,
    )?;
    let device = Box::new(Iommu::new(
        Arc::clone(&model),
        machine.ram.memory.clone(),
        iommu_polling(Duration::from_micros(platform.iommu_poll_us())),
    ));
    let counters = device
        .counters()
        .map(|counters| (vm_config::IOMMU_ID.to_string(), counters));
    pci.segment(0)
        .add_virtio(
            IOMMU_DEVICE_NUMBER,
            device,
            machine.router,
            machine.fd,
            &mut buses.pio,
            &mut buses.mmio,
        )
        .map_err(VmmError::Device)?;
    Ok((Some(model), counters))
}

/// Each virtio device in its slot, over guest RAM or, behind the IOMMU, RAM seen through it;
/// returns the counters of those that count.
fn attach_virtio_devices(
    machine: &Machine,
    devices: &[PlannedDevice],
    iommu: Option<&Arc<VirtioIommu>>,
    pci: &mut PciSegments,
    buses: &mut Buses,
    held: Held<'_>,
) -> Result<Vec<Counted>, VmmError> {
    let mut counters = Vec::new();
    for (planned, id) in devices.iter().zip(device_ids(devices)) {
        let behind = iommu
            .filter(|_| planned.iommu)
            .map(|model| (model, planned.endpoint().endpoint_id()));
        let recipe = ConfiguredDevice {
            kind: &planned.kind,
            vhost: &planned.vhost,
            held,
        };
        let device = attach::virtio_device(recipe, &machine.ram.memory, behind)?;
        if let Some(device_counters) = device.counters() {
            counters.push((id, device_counters));
        }
        pci.segment(planned.segment)
            .add_virtio(
                planned.device_number,
                device,
                machine.router,
                machine.fd,
                &mut buses.pio,
                &mut buses.mmio,
            )
            .map_err(VmmError::Device)?;
    }
    Ok(counters)
}

/// With hotplug, slots 24..31 of every segment stay free for it; every bus has 32 slots.
fn check_hotplug_slots_free(hotplug: bool, entries: &[DeviceEntry]) -> Result<(), VmmError> {
    if let Some(full) = entries.iter().find(|d| d.device_number >= pci::MAX_DEVICES) {
        return Err(VmmError::Device(format!(
            "bus 0 of PCI segment {} is full (32 slots): {} finds none; start with fewer devices",
            full.segment, full.id
        )));
    }
    let full = entries
        .iter()
        .find(|d| hotplug && d.device_number >= HOTPLUG_SLOTS.start);
    match full {
        Some(full) => Err(VmmError::Device(format!(
            "bus 0 of PCI segment {} is full: {} would take slot {}, but --api-socket keeps slots {}..={} for hotplug; start with fewer devices",
            full.segment,
            full.id,
            full.device_number,
            HOTPLUG_SLOTS.start,
            HOTPLUG_SLOTS.end - 1
        ))),
        None => Ok(()),
    }
}

/// The endpoints behind the IOMMU, as the VIOT lists them.
fn protected_endpoints(
    devices: &[PlannedDevice],
    passthrough: &[Passthrough],
) -> Vec<acpi::PciBdf> {
    devices
        .iter()
        .filter(|device| device.iommu)
        .map(PlannedDevice::endpoint)
        .chain(
            passthrough
                .iter()
                .filter(|p| p.config.iommu)
                .map(Passthrough::endpoint),
        )
        .collect()
}

/// Each passed-through device in its slot, its BARs mapped into the guest; returns them (to
/// reset when the VM ends) and their mappers (for the counters).
fn attach_passthrough(
    passthrough: Vec<Passthrough>,
    machine: &Machine,
    pci: &mut PciSegments,
    buses: &mut Buses,
) -> Result<Passed, VmmError> {
    // KVM memory slots after guest RAM's, for the BARs of passed-through devices.
    let mut next_slot = machine.ram.memory.num_regions() as u32;
    let mut devices = Vec::new();
    let mut mappers = Vec::new();
    for p in passthrough {
        let name = p.id();
        let device = VfioPciDevice::new(&name, p.opened.device, |vectors| {
            machine.router.msi_group(vectors)
        })
        .map_err(|err| VmmError::Device(format!("device {name}: {err}")))?;
        let device = Arc::new(Mutex::new(device));
        pci.segment(p.segment)
            .add_vfio(
                p.device_number,
                device.clone(),
                machine.fd,
                &mut buses.pio,
                &mut buses.mmio,
                &mut next_slot,
            )
            .map_err(|err| VmmError::Device(format!("device {name}: {err}")))?;
        devices.push(device);
        mappers.push((name, p.mapper));
    }
    Ok((devices, mappers))
}

/// Puts each segment's PCI hotplug controller on the port bus, has each bus follow the BARs
/// the guest gives hot-plugged devices, and starts the thread that plugs them in.
#[allow(clippy::too_many_arguments)]
fn attach_hotplug(
    pci: &PciSegments,
    machine: &Machine,
    (pio, mmio): (&Arc<Bus>, &Arc<Bus>),
    kvm_vfio: Option<Arc<VfioDeviceFd>>,
    iommu: Option<Arc<VirtioIommu>>,
    power_button: &PowerButton<IrqfdTrigger>,
    (info, stats): (SharedInfo, Arc<StatsReport>),
    host: &Host,
) -> Result<HotplugThread, VmmError> {
    let (requests_tx, requests) = std::sync::mpsc::channel();
    // What vm.info lists at boot: the devices the VM started with.
    let boot_ids = lock(&info).device_tree.keys().cloned().collect();
    let mut segments = Vec::new();
    for (segment, root) in (0u16..).zip(pci.roots()) {
        let (ejects, ejected) = hotplug::ejects_to(&requests_tx);
        let controller = Arc::new(Mutex::new(PciHotplugController::new(
            HOTPLUG_SLOTS,
            Arc::clone(&power_button.0),
            ejects,
        )));
        pio.insert(
            controller.clone(),
            u64::from(layout::pci_hotplug_port(segment)),
            u64::from(acpi::PCI_HOTPLUG_PORTS),
        )
        .map_err(|err| VmmError::Device(format!("PCI hotplug controller: {err}")))?;
        let placement =
            BarPlacement::new(Arc::clone(pio), Arc::clone(mmio), Arc::clone(machine.fd));
        lock(&root).set_bar_moves(placement.clone());
        segments.push(SegmentHotplug {
            root,
            controller,
            placement,
            ejected,
        });
    }
    Hotplug {
        segments,
        router: Arc::clone(machine.router),
        memory: machine.ram.memory.clone(),
        iommu,
        kvm_vfio,
        vfio_entry_limit: vfio::host_dma_entry_limit(Path::new(vfio::DMA_ENTRY_LIMIT_PATH)),
        boot_ids,
        stats,
        info,
        monitor: host.monitor.clone(),
        taps: host.taps.clone(),
    }
    .spawn(requests_tx, requests, host.filters.clone())
}

/// The ACPI tables, the kernel, its initramfs and command line, and the boot structures the
/// boot vCPU starts from; returns where it starts.
fn load_payload(
    config: &VmConfig,
    memory: &GuestMemoryMmap,
    hotplug: bool,
    protected: Option<Vec<acpi::PciBdf>>,
) -> Result<EntryPoint, VmmError> {
    let rsdp = acpi::write_tables(
        &acpi_layout(config, hotplug, protected),
        memory,
        GuestAddress(layout::ACPI_START),
    )
    .map_err(|err| VmmError::Device(format!("ACPI tables: {err}")))?;
    let payload = config.payload();
    let entry = boot::load_kernel(
        memory,
        &BootInfo {
            kernel: payload.kernel(),
            initramfs: payload.initramfs.as_deref(),
            cmdline: payload.cmdline(),
            rsdp,
        },
    )?;
    vcpu::write_boot_tables(memory, entry)
        .map_err(|reason| VmmError::Vcpu(vcpu::VcpuError::Memory { id: 0, reason }))?;
    Ok(entry)
}

/// The vCPUs, configured to start at `entry`, not yet running.
fn create_vcpus(
    host: &Host,
    fd: &VmFd,
    config: &VmConfig,
    entry: EntryPoint,
) -> Result<Vec<Vcpu>, VmmError> {
    let top = layout::pci_mmio64_start(config.memory.size) + layout::PCI_MMIO64_SIZE;
    if top > 1u64 << config.cpus.max_phys_bits.min(63) {
        return Err(VmmError::Device(format!(
            "cpus.max_phys_bits: {} bits cannot address the machine, which ends at {top:#x}",
            config.cpus.max_phys_bits
        )));
    }
    let supported_cpuid = host
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_error("get supported CPUID"))?;
    // Validated: 1 to 254.
    let cpus = config.cpus.boot_vcpus as u8;
    let topology = Topology {
        cpus,
        max_phys_bits: config.cpus.max_phys_bits,
        nested: config.cpus.nested,
        tsc_deadline_timer: host.tsc_deadline_timer,
    };
    (0..cpus)
        .map(|id| {
            let vcpu_fd = fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_error("create vCPU"))?;
            Ok(Vcpu::configure(
                id,
                vcpu_fd,
                &supported_cpuid,
                &topology,
                entry,
            )?)
        })
        .collect()
}

/// The machine as the guest's ACPI tables describe it.
///
/// Each PCI segment is a host bridge with its share of the windows. With `hotplug` (an API to
/// plug devices in), each segment's hotplug slots are there too, and with a virtio-iommu the
/// VIOT covers each segment's slots for protected hotplug.
fn acpi_layout(
    config: &VmConfig,
    hotplug: bool,
    protected: Option<Vec<acpi::PciBdf>>,
) -> acpi::AcpiLayout {
    let count = config.platform().num_pci_segments;
    let segments = (0..count)
        .map(|segment| {
            let windows = layout::segment_windows(config.memory.size, segment, count);
            acpi::PciSegment {
                ecam: acpi::Ecam {
                    base: windows.ecam,
                    segment,
                    bus_start: 0,
                    bus_end: 0,
                },
                mmio32: windows.mmio32,
                mmio64: windows.mmio64,
                // Virtio queue notifications live in I/O BARs.
                pci_io: Some(windows.io),
                hotplug: hotplug.then_some(acpi::PciHotplug {
                    port: layout::pci_hotplug_port(segment),
                    slots: HOTPLUG_SLOTS,
                }),
            }
        })
        .collect();
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
        segments,
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
            protected_slots: if hotplug {
                (0..count)
                    .map(|segment| (segment, PROTECTED_SLOTS))
                    .collect()
            } else {
                Vec::new()
            },
        }),
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
        // of it: the `Vm` keeps a clone of `memory` and drops it after the VM's fd and every
        // vCPU (see its fields' order).
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

/// The legacy devices (COM1, CMOS, i8042, the ACPI sleep and reset registers, the power
/// button's event register); returns the power button.
fn attach_legacy_devices(
    pio: &mut Bus,
    router: &GsiRouter,
    serial: &SerialConfig,
    exits: &ExitNotice,
    host: &Host,
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
        let pty = host.ptys.serial();
        let out = open_output(serial.mode, serial.file.as_deref(), pty, "serial")?;
        let port = Arc::new(Mutex::new(SerialPort(Serial::new(IrqfdTrigger(irq), out))));
        insert(pio, port.clone(), layout::COM1_PORT, 8)?;
        host.ptys.attach_serial(&port);
        if serial.mode == ConsoleMode::Tty && io::stdin().is_terminal() {
            host.serial_input.attach(port)?;
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
