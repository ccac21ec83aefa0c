//! The devices the boot path plugs in: the plan of each segment's bus 0, the virtio devices
//! over plain or translated memory, the virtio-iommu model and its endpoints, passed-through
//! devices, and the ids `vm.info` gives them.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use net_util::VhostNet;
use vfio::{OpenedDevice, VfioDeviceFd, VfioMapper};
use virtio_devices::net::{VhostIotlb, VhostKernel};
use virtio_devices::{
    Block, BlockOptions, Console, DeviceMemory, Fs, Net, NetOptions, PollConfig, Rng,
    VhostUserConnection, VirtioDevice, Vsock,
};
use virtio_iommu::{EndpointConfig, ExternalMapper, IommuConfig, VirtioIommu};
use vm_memory::GuestMemoryMmap;

use crate::attach;
use crate::control::DeviceEntry;
use crate::error::VmmError;
use crate::pci_bus::IOMMU_DEVICE_NUMBER;
use crate::pty::{Pty, Ptys};
use crate::stats;
use crate::taps::PassedTaps;
use vm_config::{
    ConsoleConfig, ConsoleMode, DeviceConfig, DiskConfig, FsConfig, NetConfig, RngConfig, VmConfig,
    VsockConfig,
};

/// A host device to pass through, opened, with its place and its DMA mapper.
pub(crate) struct Passthrough<'a> {
    pub(crate) config: &'a DeviceConfig,
    pub(crate) segment: u16,
    pub(crate) device_number: u8,
    pub(crate) opened: OpenedDevice,
    pub(crate) mapper: Arc<VfioMapper>,
}

impl Passthrough<'_> {
    pub(crate) fn endpoint(&self) -> acpi::PciBdf {
        acpi::PciBdf::new(self.segment, 0, self.device_number, 0)
    }

    /// Its id (resolved: the one given, or `_vfioN`).
    pub(crate) fn id(&self) -> String {
        self.config.id.clone().unwrap_or_default()
    }
}

/// Opens every `--device`, in order, on its segment's slots after the virtio devices. A device
/// without `iommu=on` gets all guest RAM mapped now (IOVA = GPA, as if there were no IOMMU);
/// one with `iommu=on` gets nothing until the guest maps it through the virtio-iommu.
pub(crate) fn open_passthrough<'a>(
    config: &'a VmConfig,
    kvm_vfio: Option<&Arc<VfioDeviceFd>>,
    devices: &[PlannedDevice],
    memory: &GuestMemoryMmap,
) -> Result<Vec<Passthrough<'a>>, VmmError> {
    if config.devices.is_empty() {
        return Ok(Vec::new());
    }
    let mut slots = Slots::after(devices);
    let entry_limit = vfio::host_dma_entry_limit(Path::new(vfio::DMA_ENTRY_LIMIT_PATH));
    let mut opened = Vec::new();
    for device_config in &config.devices {
        let segment = device_config.pci_segment;
        let device_number = slots.take(segment);
        if device_number >= pci::MAX_DEVICES {
            return Err(VmmError::Device(format!(
                "devices: bus 0 of PCI segment {segment} is full (32 slots); pass fewer devices"
            )));
        }
        let name = device_config.id.clone().unwrap_or_default();
        let device = vfio::open(device_config.path(), kvm_vfio.cloned())?;
        let mapper = Arc::new(VfioMapper::new(
            &name,
            device.container.clone(),
            memory.clone(),
            entry_limit,
        ));
        if !device_config.iommu {
            mapper.set_identity(true).map_err(|err| {
                VmmError::Device(format!(
                    "device {name}: cannot map guest RAM for its DMA: {err}"
                ))
            })?;
        }
        opened.push(Passthrough {
            config: device_config,
            segment,
            device_number,
            opened: device,
            mapper,
        });
    }
    Ok(opened)
}

/// The VM's KVM VFIO device, through which KVM learns which groups the guest uses (for DMA
/// coherency); passthrough works without it, so a failure only costs a warning. A VM has one:
/// the boot path's devices and hot-added ones share it.
pub(crate) fn kvm_vfio_device(vm: &VmFd) -> Option<Arc<VfioDeviceFd>> {
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
pub(crate) enum DeviceKind<'a> {
    Console(&'a ConsoleConfig),
    Disk(&'a DiskConfig),
    Net(&'a NetConfig),
    Rng(&'a RngConfig),
    Vsock(&'a VsockConfig),
    Fs(&'a FsConfig),
}

/// A virtio device with its place (segment, and device number on its bus 0) and whether the
/// IOMMU translates its DMA.
pub(crate) struct PlannedDevice<'a> {
    pub(crate) segment: u16,
    pub(crate) device_number: u8,
    pub(crate) kind: DeviceKind<'a>,
    pub(crate) iommu: bool,
    /// A net's vhost-net instances, one per pair, with `vhost=on` (see [`open_vhost`]).
    pub(crate) vhost: Vec<Arc<dyn VhostKernel>>,
}

impl PlannedDevice<'_> {
    /// The endpoint ID the guest uses for this device in IOMMU requests: its PCI BDF, as the
    /// VIOT's PCI range nodes define it.
    pub(crate) fn endpoint(&self) -> acpi::PciBdf {
        acpi::PciBdf::new(self.segment, 0, self.device_number, 0)
    }
}

/// Hands out device numbers on each segment's bus 0, in order: on segment 0 after the slot
/// kept for the virtio-iommu (free even without one, so that devices keep their addresses
/// when the IOMMU is switched on), on the others after their host bridge.
struct Slots(std::collections::BTreeMap<u16, u8>);

impl Slots {
    /// The slots after the virtio devices of `devices`.
    fn after(devices: &[PlannedDevice]) -> Self {
        let mut slots = Slots(Default::default());
        for device in devices {
            let next = slots.0.entry(device.segment).or_default();
            *next = (*next).max(device.device_number.saturating_add(1));
        }
        slots
    }

    fn take(&mut self, segment: u16) -> u8 {
        let first = if segment == 0 {
            IOMMU_DEVICE_NUMBER + 1
        } else {
            1
        };
        let next = self.0.entry(segment).or_insert(first);
        let taken = (*next).max(first);
        *next = taken.saturating_add(1);
        taken
    }
}

/// The virtio devices in the order the guest sees them on their segments' bus 0: console,
/// disks, nets, rng, vsock, shares.
pub(crate) fn plan_devices(config: &VmConfig) -> Vec<PlannedDevice<'_>> {
    let console = (config.console.mode != ConsoleMode::Off).then_some((
        DeviceKind::Console(&config.console),
        config.console.iommu,
        config.console.pci_segment,
    ));
    let disks = config
        .disks
        .iter()
        .map(|disk| (DeviceKind::Disk(disk), disk.iommu, disk.pci_segment));
    let nets = config
        .net
        .iter()
        .map(|net| (DeviceKind::Net(net), net.iommu, net.pci_segment));
    let rng = Some((
        DeviceKind::Rng(&config.rng),
        config.rng.iommu,
        config.rng.pci_segment,
    ));
    let vsock = config
        .vsock
        .as_ref()
        .map(|vsock| (DeviceKind::Vsock(vsock), vsock.iommu, vsock.pci_segment));
    let shares = config
        .fs
        .iter()
        .map(|fs| (DeviceKind::Fs(fs), fs.iommu, fs.pci_segment));
    let mut slots = Slots(Default::default());
    console
        .into_iter()
        .chain(disks)
        .chain(nets)
        .chain(rng)
        .chain(vsock)
        .chain(shares)
        .map(|(kind, iommu, segment)| PlannedDevice {
            segment,
            device_number: slots.take(segment),
            kind,
            iommu,
            vhost: Vec::new(),
        })
        .collect()
}

/// Opens a vhost-net instance per queue pair of each net with `vhost=on`, before the IOMMU
/// model (a protected one's device IOTLB is its endpoint's mapper) and before any filter.
pub(crate) fn open_vhost(
    devices: &mut [PlannedDevice],
    ram: &GuestMemoryMmap,
) -> Result<(), VmmError> {
    for device in devices {
        let DeviceKind::Net(net) = device.kind else {
            continue;
        };
        if !net.vhost {
            continue;
        }
        for _ in 0..net.queue_pairs() {
            let kernel = VhostNet::open(ram.clone(), device.iommu)
                .map_err(|err| VmmError::Device(format!("net vhost: {err}")))?;
            device.vhost.push(Arc::new(kernel));
        }
    }
    Ok(())
}

/// Polling the request queue only pays when the poller has a CPU of its own: on a single
/// host CPU it would take turns with the vCPU it is meant to answer.
pub(crate) fn iommu_polling(max_window: Duration) -> PollConfig {
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
/// taking addresses of `address_width_bits`, with the protected virtio devices and
/// passed-through devices as endpoints.
///
/// Page sizes larger than 4 KiB are offered only where RAM is really backed by them, so that a
/// guest mapping a 2 MiB IOMMU page also maps one contiguous host page (what VFIO needs). With
/// passed-through endpoints, page sizes and the input range are narrowed to what their host
/// IOMMU supports, each such endpoint reports the host's IOVA holes as reserved regions, and
/// boot bypass is off: a real device could otherwise DMA anywhere in guest RAM before the
/// guest's IOMMU driver attaches it.
pub(crate) fn create_iommu_model(
    backing_page_size: u64,
    address_width_bits: u8,
    devices: &[PlannedDevice],
    passthrough: &[Passthrough],
    ram: &GuestMemoryMmap,
) -> Result<Arc<VirtioIommu>, VmmError> {
    let mut page_size_mask = [4 << 10, 2 << 20, 1 << 30]
        .into_iter()
        .filter(|&size| size <= backing_page_size.max(4 << 10))
        .fold(0, |mask, size| mask | size);
    // Validated: 1 to 64 bits.
    let mut input_range = (0, u64::MAX >> (64 - u32::from(address_width_bits)));
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
            "devices: the host IOMMU's page sizes or IOVA ranges leave the virtio-iommu nothing to offer (page sizes {page_size_mask:#x}, range {:#x}..={:#x})",
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
        // A vhost-net's kernel keeps a device IOTLB, which must lose what the guest unmaps.
        let mapper = (!device.vhost.is_empty()).then(|| {
            Arc::new(VhostIotlb::new(device.vhost.clone(), ram.clone())) as Arc<dyn ExternalMapper>
        });
        add(
            device.endpoint(),
            EndpointConfig {
                reserved_regions: None,
                mapper,
            },
        )?;
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

/// What the VMM holds across builds of its configuration's VM that devices are built on.
#[derive(Clone, Copy)]
pub(crate) struct Held<'a> {
    /// The taps clients passed as descriptors.
    pub(crate) taps: &'a PassedTaps,
    /// The `Pty` devices' pseudo-terminals.
    pub(crate) ptys: &'a Ptys,
}

/// A device of the configuration, as [`attach::virtio_device`] builds it.
pub(crate) struct ConfiguredDevice<'a> {
    pub(crate) kind: &'a DeviceKind<'a>,
    pub(crate) vhost: &'a [Arc<dyn VhostKernel>],
    pub(crate) held: Held<'a>,
}

impl attach::Recipe<VmmError> for ConfiguredDevice<'_> {
    fn build<M: DeviceMemory>(
        self,
        mem: M,
        access_platform: bool,
    ) -> Result<Box<dyn VirtioDevice>, VmmError> {
        build_device(self.kind, mem, access_platform, self.vhost, self.held)
    }
}

/// Builds one virtio device over `mem`: guest RAM itself, or RAM seen through the IOMMU (a
/// net on taps its client passed, or a console on a pty, finds them in `held`).
pub(crate) fn build_device<M: DeviceMemory>(
    kind: &DeviceKind,
    mem: M,
    access_platform: bool,
    vhost: &[Arc<dyn VhostKernel>],
    held: Held<'_>,
) -> Result<Box<dyn VirtioDevice>, VmmError> {
    Ok(match kind {
        DeviceKind::Console(console) => {
            let duplicated = |source| VmmError::Io {
                what: "console: duplicate its input".into(),
                source,
            };
            let pty = held.ptys.console();
            let input = match (console.mode, pty) {
                (ConsoleMode::Tty, _) if io::stdin().is_terminal() => Some(
                    io::stdin()
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(duplicated)?,
                ),
                (ConsoleMode::Pty, Some(pty)) => Some(pty.input().map_err(duplicated)?),
                _ => None,
            };
            let output = open_output(console.mode, console.file.as_deref(), pty, "console")?;
            Box::new(Console::new(mem, output, input, access_platform))
        }
        DeviceKind::Disk(disk) => {
            let options = BlockOptions {
                readonly: disk.readonly,
                access_platform,
                direct: disk.direct,
                // Validated: at most 64.
                num_queues: disk.num_queues as u16,
                queue_size: disk.queue_size,
                ..Default::default()
            };
            let id = disk.id.as_deref().unwrap_or_default();
            Box::new(
                Block::open(mem, disk.path(), options)
                    .map_err(|err| VmmError::Device(format!("disk {id}: {err}")))?,
            )
        }
        DeviceKind::Net(net) => {
            build_net(mem, open_tap(net, held.taps)?, net, access_platform, vhost)?
        }
        DeviceKind::Rng(rng) => Box::new(
            Rng::new(mem, &rng.src, access_platform)
                .map_err(|err| VmmError::Device(format!("rng: {err}")))?,
        ),
        DeviceKind::Vsock(vsock) => Box::new(
            Vsock::new(mem, u64::from(vsock.cid), &vsock.socket, access_platform)
                .map_err(|err| VmmError::Device(format!("vsock: {err}")))?,
        ),
        DeviceKind::Fs(fs) => build_fs(mem.ram(), fs, access_platform)?,
    })
}

/// A virtio-fs share, connected to its vhost-user back end.
fn build_fs(
    ram: &GuestMemoryMmap,
    fs: &FsConfig,
    access_platform: bool,
) -> Result<Box<dyn VirtioDevice>, VmmError> {
    let failed = |err: &dyn std::fmt::Display| {
        let id = fs.id.as_deref().unwrap_or_default();
        VmmError::Device(format!("fs {id}: {err}"))
    };
    // Validated: at most 16 request queues.
    let request_queues = fs.num_queues as u16;
    let backend = VhostUserConnection::connect(&fs.socket, usize::from(request_queues) + 1)
        .map_err(|err| failed(&err))?;
    let device = Fs::new(
        ram.clone(),
        &fs.tag,
        request_queues,
        fs.queue_size,
        Box::new(backend),
        access_platform,
    )
    .map_err(|err| failed(&err))?;
    log::info!(
        "fs: tag {:?} served by the vhost-user back end at {}",
        fs.tag,
        fs.socket.display()
    );
    Ok(Box::new(device))
}

/// The tap queues of `net`, one per queue pair: copies of the descriptors its client passed
/// (held in `passed`), or the tap it names, opened (or created) with its host end given the
/// address asked for.
pub(crate) fn open_tap(
    net: &NetConfig,
    passed: &PassedTaps,
) -> Result<Vec<net_util::Tap>, net_util::TapError> {
    if net.fds.is_some() {
        let id = net.id.as_deref().unwrap_or_default();
        let fds = passed
            .copies(id)
            .map_err(|source| net_util::TapError::Ioctl {
                name: id.to_string(),
                what: "dup",
                source,
            })?;
        return net_util::Tap::from_fds(fds);
    }
    let name = net.tap.as_deref().unwrap_or_default();
    let queues = net_util::Tap::open_queues(name, net.queue_pairs())?;
    if let Some((ip, mask)) = net.host_ipv4() {
        queues[0].set_ipv4(ip, mask)?;
    }
    Ok(queues)
}

/// A virtio-net on the queues of a tap, already opened by [`open_tap`], its frames moved by
/// warden's threads or, given an instance per pair, by the kernel's vhost-net.
pub(crate) fn build_net<M: DeviceMemory>(
    mem: M,
    tap: Vec<net_util::Tap>,
    net: &NetConfig,
    access_platform: bool,
    vhost: &[Arc<dyn VhostKernel>],
) -> Result<Box<dyn VirtioDevice>, VmmError> {
    // The name matters to whoever configures the host side of a tap warden created.
    let mac = net.mac.expect("a resolved net has its MAC");
    log::info!(
        "net: tap {} for the guest's {} ({} queue pair{} of {}{}{})",
        tap[0].name(),
        mac,
        tap.len(),
        if tap.len() == 1 { "" } else { "s" },
        net.queue_size,
        if access_platform {
            ", behind the IOMMU"
        } else {
            ""
        },
        if vhost.is_empty() { "" } else { ", vhost-net" }
    );
    let options = NetOptions {
        mac,
        queue_size: net.queue_size,
        access_platform,
    };
    if vhost.is_empty() {
        return Ok(Box::new(Net::new(mem, tap, options)));
    }
    let device = Net::with_vhost(mem, tap, options, vhost.to_vec())
        .map_err(|err| VmmError::Device(format!("net vhost: {err}")))?;
    Ok(Box::new(device))
}

/// The ids of the virtio devices, in their order: the configuration's (resolved: Cloud
/// Hypervisor's `_disk0`, `_net0`, ... unless given), and `_console` and `_rng`, which
/// `vm.info`, `vm.counters` and `vm.remove-device` share.
pub(crate) fn device_ids(devices: &[PlannedDevice]) -> Vec<String> {
    devices
        .iter()
        .map(|device| match device.kind {
            DeviceKind::Console(_) => "_console".to_string(),
            DeviceKind::Rng(_) => "_rng".to_string(),
            DeviceKind::Disk(disk) => disk.id.clone().unwrap_or_default(),
            DeviceKind::Net(net) => net.id.clone().unwrap_or_default(),
            DeviceKind::Vsock(vsock) => vsock.id.clone().unwrap_or_default(),
            DeviceKind::Fs(fs) => fs.id.clone().unwrap_or_default(),
        })
        .collect()
}

/// The devices as `vm.info` names them: the virtio devices by [`device_ids`], the virtio-iommu
/// under the id of its counters, passed-through devices by their id.
pub(crate) fn device_entries(
    devices: &[PlannedDevice],
    passthrough: &[Passthrough],
    iommu: bool,
) -> Vec<DeviceEntry> {
    let mut entries: Vec<DeviceEntry> = devices
        .iter()
        .zip(device_ids(devices))
        .map(|(device, id)| DeviceEntry {
            id,
            segment: device.segment,
            device_number: device.device_number,
        })
        .collect();
    if iommu {
        entries.push(DeviceEntry {
            id: stats::IOMMU_ID.into(),
            segment: 0,
            device_number: IOMMU_DEVICE_NUMBER,
        });
    }
    entries.extend(passthrough.iter().map(|p| DeviceEntry {
        id: p.id(),
        segment: p.segment,
        device_number: p.device_number,
    }));
    entries
}

/// Opens where a character device (`what`) writes: the terminal, its file or its `pty`.
pub(crate) fn open_output(
    mode: ConsoleMode,
    file: Option<&Path>,
    pty: Option<&Pty>,
    what: &str,
) -> Result<Box<dyn Write + Send>, VmmError> {
    match (mode, file, pty) {
        (ConsoleMode::Tty, _, _) => Ok(Box::new(io::stdout())),
        (ConsoleMode::Pty, _, Some(pty)) => pty.output().map_err(|source| VmmError::Io {
            what: format!("{what}: duplicate its pseudo-terminal"),
            source,
        }),
        (ConsoleMode::File, Some(path), _) => OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(|file| Box::new(file) as Box<dyn Write + Send>)
            .map_err(|source| VmmError::Io {
                what: format!("{what}: cannot open file {}", path.display()),
                source,
            }),
        // Validated: a file mode has its file, Socket is refused; a Pty has its pty.
        _ => Ok(Box::new(io::sink())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets_sit_between_disks_and_rng_shares_last_and_each_counts_for_the_iommu() {
        let disk = DiskConfig {
            path: Some("disk.img".into()),
            ..Default::default()
        };
        let net = NetConfig {
            iommu: true,
            ..Default::default()
        };
        let mut config = VmConfig {
            disks: vec![disk.clone(), disk],
            net: vec![
                net.clone(),
                NetConfig {
                    iommu: false,
                    ..net
                },
            ],
            console: ConsoleConfig {
                mode: ConsoleMode::Null,
                ..Default::default()
            },
            vsock: Some(VsockConfig {
                cid: 3,
                socket: "v.sock".into(),
                iommu: true,
                ..Default::default()
            }),
            fs: vec![FsConfig {
                tag: "share".into(),
                socket: "fs.sock".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        config.resolve().unwrap();
        assert!(config.iommu, "a protected net needs the IOMMU");
        let plan: Vec<(u8, &str, bool)> = plan_devices(&config)
            .iter()
            .map(|device| {
                let kind = match device.kind {
                    DeviceKind::Console(_) => "console",
                    DeviceKind::Disk(_) => "disk",
                    DeviceKind::Net(_) => "net",
                    DeviceKind::Rng(_) => "rng",
                    DeviceKind::Vsock(_) => "vsock",
                    DeviceKind::Fs(_) => "fs",
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
                (8, "vsock", true),
                (9, "fs", false),
            ]
        );
        assert_eq!(
            device_ids(&plan_devices(&config)),
            ["_console", "_disk0", "_disk1", "_net0", "_net1", "_rng", "_vsock0", "_fs0"]
        );
    }

    #[test]
    fn each_segment_numbers_its_devices_from_its_first_free_slot() {
        let disk = |segment| DiskConfig {
            path: Some("disk.img".into()),
            pci_segment: segment,
            ..Default::default()
        };
        let mut config = VmConfig {
            disks: vec![disk(1), disk(0), disk(1)],
            platform: Some(vm_config::PlatformConfig {
                num_pci_segments: 2,
                iommu_segments: Some(vec![1]),
                ..Default::default()
            }),
            rng: RngConfig {
                pci_segment: 1,
                ..Default::default()
            },
            console: ConsoleConfig {
                mode: ConsoleMode::Off,
                ..Default::default()
            },
            ..Default::default()
        };
        config.resolve().unwrap();
        let plan = plan_devices(&config);
        let places: Vec<(u16, u8, bool)> = plan
            .iter()
            .map(|d| (d.segment, d.device_number, d.iommu))
            .collect();
        // Segment 0 after the virtio-iommu's slot, segment 1 after its host bridge; the
        // IOMMU segment's devices are behind it.
        assert_eq!(
            places,
            [(1, 1, true), (0, 2, false), (1, 2, true), (1, 3, true)]
        );
        assert_eq!(plan[2].endpoint().endpoint_id(), 1 << 16 | 2 << 3);
        let entries = device_entries(&plan, &[], true);
        let info = crate::control::vm_info(&config, &entries);
        let bdf = |id: &str| info.device_tree[id].pci_bdf.clone().unwrap();
        assert_eq!(bdf("_disk0"), "0001:00:01.0");
        assert_eq!(bdf("_disk1"), "0000:00:02.0");
        assert_eq!(bdf("_rng"), "0001:00:03.0");
        assert_eq!(bdf("virtio-iommu"), "0000:00:01.0");
        let mut slots = Slots::after(&plan);
        assert_eq!((slots.take(0), slots.take(1), slots.take(2)), (3, 4, 1));
    }
}
