//! Devices plugged in and out while the guest runs (`vm.add-disk`, `vm.add-net`,
//! `vm.add-device`, `vm.remove-device`), with
//! ACPI PCI hotplug: the slots at the top of each segment's bus 0, the controllers the DSDT's
//! slot methods use, and the one thread that changes the machine for the API.
//!
//! The API thread sends a [`HotplugRequest`] and waits for the answer; the `hotplug` thread
//! builds the device (over guest RAM, or RAM seen through the virtio-iommu for `iommu=on`),
//! plugs it into its slot and tells the guest. A removal asks the guest to release the device
//! and is answered then, as Cloud Hypervisor answers it (Kata gives it 5 s); once the guest's
//! `_EJ0` says it has (a vCPU passes the slot on), the thread unplugs it, detaches its endpoint
//! from its IOMMU domain (which withdraws its mappings) and drops it, which stops its threads
//! and frees its interrupts. A guest that never lets go keeps the device (the device tree still
//! lists it; the configuration no longer does).
//!
//! A passed-through device (`vm.add-device`) gets a VFIO container of its own, as at boot:
//! with `iommu=on` it becomes an endpoint whose mapper turns the guest's MAPs into host VFIO
//! maps, else all guest RAM is mapped for it. Its BARs are the guest's to place and every
//! access to them traps to VFIO (a boot device's BARs are mapped into the guest instead).

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use acpi::PciBdf;
use api::{ApiError, PciDeviceInfo, Refusal, Response};
use net_util::{Tap, TapError};
use pci::{PciDevice, PciRoot};
use sandbox::{Filters, ThreadKind};
use vfio::{HostIommuInfo, VfioDeviceFd, VfioMapper, VfioPciDevice};
use virtio_devices::{DeviceMemory, VirtioDevice};
use virtio_iommu::{EndpointConfig, ExternalMapper, IommuConfig, ReservedRegion, VirtioIommu};
use vm_device::lock;
use vm_memory::GuestMemoryMmap;

use crate::attach;
use crate::bar_placement::BarPlacement;
use crate::error::VmmError;
use crate::threads;
use vm_config::{DeviceConfig, DiskConfig, FsConfig, NetConfig, Problem, VmConfig, VsockConfig};

use crate::devices::{build_device, build_net, open_tap, DeviceKind, Held};
use crate::interrupts::GsiRouter;
use crate::legacy::IrqfdTrigger;
use crate::monitor::{self, EventMonitor};
use crate::pci_hotplug::{Ejected, PciHotplugController};
use crate::plugged::{place, Listed, Plugged, PluggedDevices, SharedInfo};
use crate::pty::Ptys;
use crate::stats::StatsReport;
use crate::taps::PassedTaps;

/// The slots of bus 0 that take hot-plugged devices (`--api-socket` keeps them free).
pub const HOTPLUG_SLOTS: Range<u8> = 24..32;
/// With a virtio-iommu, the VIOT puts these slots behind it: where `iommu=on` devices go.
pub const PROTECTED_SLOTS: Range<u8> = 24..28;

/// A second vsock, refused as Cloud Hypervisor refuses it (500).
pub(crate) const ONE_VSOCK: &str = "the VM has a vsock device already, and takes one only";

/// Where the hotplug thread sends its answer: straight to the API's client.
pub(crate) type Reply = Sender<Result<Response, ApiError>>;

/// What the API asks of the hotplug thread, with where to send the answer.
pub enum HotplugRequest {
    AddDisk {
        disk: DiskConfig,
        reply: Reply,
    },
    AddVsock {
        vsock: VsockConfig,
        reply: Reply,
    },
    AddFs {
        fs: FsConfig,
        reply: Reply,
    },
    /// A host PCI function to pass through.
    AddDevice {
        device: DeviceConfig,
        reply: Reply,
    },
    /// `vm.info` lists it with the name of its tap (the kernel names a new one); `fds` are
    /// the taps its client passed, if any.
    AddNet {
        net: NetConfig,
        fds: Vec<OwnedFd>,
        reply: Reply,
    },
    Remove {
        id: String,
        reply: Reply,
    },
    /// The guest released devices (their slots' `_EJ0` ran): see [`EjectToThread`].
    Ejected,
    /// The VM is going away: the thread ends.
    Stop,
}

/// The running hotplug thread: where requests go. Dropped, it stops the thread and waits for
/// it (the controller on the port bus holds a sender too, so the channel alone would never
/// close).
pub(crate) struct HotplugThread {
    requests: Sender<HotplugRequest>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HotplugThread {
    pub(crate) fn send(&self, request: HotplugRequest) -> Result<(), ApiError> {
        self.requests
            .send(request)
            .map_err(|_| ApiError::new(Refusal::Failed, "the hotplug thread is gone"))
    }
}

impl Drop for HotplugThread {
    fn drop(&mut self) {
        let _ = self.requests.send(HotplugRequest::Stop);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the hotplug thread panicked");
            }
        }
    }
}

/// The slots a new device may take: behind the IOMMU or not. Without a virtio-iommu there is
/// no VIOT, so every hotplug slot takes unprotected devices.
pub fn slot_range(protected: bool, iommu: bool) -> Range<u8> {
    match (protected, iommu) {
        (true, _) => PROTECTED_SLOTS,
        (false, true) => PROTECTED_SLOTS.end..HOTPLUG_SLOTS.end,
        (false, false) => HOTPLUG_SLOTS,
    }
}

/// The first slot of `range` that is not in `used`.
pub fn free_slot(used: impl Fn(u8) -> bool, range: Range<u8>) -> Option<u8> {
    range.clone().find(|&slot| !used(slot))
}

/// The answer to a configuration the machine cannot take: a conflict for an id or a tap in
/// use (as Cloud Hypervisor answers a duplicate id), else a bad request naming the field.
fn config_refusal(err: vm_config::ConfigError) -> ApiError {
    let refusal = match err.problem {
        Problem::DuplicateId(_) | Problem::DuplicateTap(_) => Refusal::Conflict,
        _ => Refusal::BadRequest,
    };
    ApiError::new(refusal, err.to_string())
}

/// A device to hot-add, before its memory view is chosen.
enum NewDevice<'a> {
    Disk(&'a DiskConfig),
    /// Its tap's queues are open already.
    Net(&'a NetConfig, Vec<Tap>),
    Vsock(&'a VsockConfig),
    Fs(&'a FsConfig),
}

impl attach::Recipe<ApiError> for NewDevice<'_> {
    fn build<M: DeviceMemory>(
        self,
        mem: M,
        access_platform: bool,
    ) -> Result<Box<dyn VirtioDevice>, ApiError> {
        let nothing = Held {
            taps: &PassedTaps::default(),
            ptys: &Ptys::default(),
        };
        let built = match self {
            NewDevice::Disk(disk) => {
                build_device(&DeviceKind::Disk(disk), mem, access_platform, &[], nothing)
            }
            NewDevice::Vsock(vsock) => build_device(
                &DeviceKind::Vsock(vsock),
                mem,
                access_platform,
                &[],
                nothing,
            ),
            NewDevice::Fs(fs) => {
                build_device(&DeviceKind::Fs(fs), mem, access_platform, &[], nothing)
            }
            NewDevice::Net(net, tap) => build_net(mem, tap, net, access_platform, &[]),
        };
        built.map_err(|err| ApiError::bad_request(err.to_string()))
    }
}

/// The answer to a tap that cannot be opened: a conflict if someone else has it, else a bad
/// request.
fn tap_refusal(err: TapError) -> ApiError {
    let refusal = if matches!(err, TapError::InUse(_)) {
        Refusal::Conflict
    } else {
        Refusal::BadRequest
    };
    ApiError::new(refusal, format!("net: {err}"))
}

/// Tells the hotplug thread of the slots the guest ejects on one segment: a bit per slot, and
/// one message whenever the bits go from none to some. However often the guest writes the
/// eject register, what waits for the thread is a word and at most two messages per segment.
struct EjectToThread {
    slots: Arc<AtomicU32>,
    thread: Mutex<Sender<HotplugRequest>>,
}

impl Ejected for EjectToThread {
    fn ejected(&self, slot: u8) {
        let bit = 1u32.checked_shl(u32::from(slot)).unwrap_or(0);
        if self.slots.fetch_or(bit, Ordering::AcqRel) == 0 {
            let _ = lock(&self.thread).send(HotplugRequest::Ejected);
        }
    }
}

/// One PCI segment as the hotplug thread changes it: its bus 0, the controller of its slots,
/// what follows the BARs the guest places there, and the slots its guest ejected that the
/// thread has not looked at (see [`EjectToThread`]).
pub(crate) struct SegmentHotplug {
    pub(crate) root: Arc<Mutex<PciRoot>>,
    pub(crate) controller: Arc<Mutex<PciHotplugController<IrqfdTrigger>>>,
    pub(crate) placement: Arc<BarPlacement>,
    pub(crate) ejected: Arc<AtomicU32>,
}

/// What the hotplug thread changes the machine with.
pub(crate) struct Hotplug {
    /// Each segment's, segment `n` at index `n`.
    pub(crate) segments: Vec<SegmentHotplug>,
    pub(crate) router: Arc<GsiRouter>,
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) iommu: Option<Arc<VirtioIommu>>,
    /// The VM's KVM VFIO device, told of each passed-through device's group.
    pub(crate) kvm_vfio: Option<Arc<VfioDeviceFd>>,
    /// The host's limit of VFIO mappings per container.
    pub(crate) vfio_entry_limit: u64,
    /// Ids of the devices the VM started with: not ours to remove.
    pub(crate) boot_ids: Vec<String>,
    /// Where a plugged device's counters join `vm.counters`, and leave it on removal.
    pub(crate) stats: Arc<StatsReport>,
    /// `vm.info`, whose list of hot-plugged devices this thread keeps.
    pub(crate) info: SharedInfo,
    /// Told of each device the guest let go of (`device-removed`).
    pub(crate) monitor: Option<Arc<EventMonitor>>,
    /// The taps clients passed, which a net added with them joins and a removed one leaves.
    pub(crate) taps: PassedTaps,
}

/// A segment controller's way to the hotplug thread listening on `thread`, and the slots it
/// marks ejected.
pub(crate) fn ejects_to(thread: &Sender<HotplugRequest>) -> (Box<dyn Ejected>, Arc<AtomicU32>) {
    let slots = Arc::new(AtomicU32::new(0));
    let ejects = Box::new(EjectToThread {
        slots: Arc::clone(&slots),
        thread: Mutex::new(thread.clone()),
    });
    (ejects, slots)
}

impl Hotplug {
    /// Serves `requests` (whose sender is `sender`) from a thread of its own, confined to the
    /// hotplug list.
    pub(crate) fn spawn(
        self,
        sender: Sender<HotplugRequest>,
        requests: Receiver<HotplugRequest>,
        filters: Option<Arc<Filters>>,
    ) -> Result<HotplugThread, VmmError> {
        let thread = threads::spawn("hotplug", ThreadKind::Hotplug, filters, move || {
            self.serve(&requests)
        })?;
        Ok(HotplugThread {
            requests: sender,
            thread: Some(thread),
        })
    }

    fn serve(self, requests: &Receiver<HotplugRequest>) {
        let mut slots = PluggedDevices::new(Arc::clone(&self.info));
        loop {
            match requests.recv() {
                Ok(HotplugRequest::AddDisk { disk, reply }) => {
                    let _ = reply.send(self.add_disk(&mut slots, disk).map(Response::Added));
                }
                Ok(HotplugRequest::AddVsock { vsock, reply }) => {
                    let _ = reply.send(self.add_vsock(&mut slots, vsock).map(Response::Added));
                }
                Ok(HotplugRequest::AddFs { fs, reply }) => {
                    let _ = reply.send(self.add_fs(&mut slots, fs).map(Response::Added));
                }
                Ok(HotplugRequest::AddDevice { device, reply }) => {
                    let added = self.add_passthrough(&mut slots, device);
                    let _ = reply.send(added.map(Response::Added));
                }
                Ok(HotplugRequest::AddNet { net, fds, reply }) => {
                    let added = self.add_net(&mut slots, net, fds);
                    let _ = reply.send(added.map(Response::Added));
                }
                Ok(HotplugRequest::Remove { id, reply }) => {
                    let asked = self.request_removal(&mut slots, &id);
                    let _ = reply.send(asked.map(|()| Response::Done));
                }
                Ok(HotplugRequest::Ejected) => {
                    for (segment, hotplug) in (0u16..).zip(&self.segments) {
                        let ejected = hotplug.ejected.swap(0, Ordering::AcqRel);
                        for slot in (0..32u8).filter(|slot| ejected & (1 << slot) != 0) {
                            self.unplug(&mut slots, place(segment, slot));
                        }
                    }
                }
                Ok(HotplugRequest::Stop) | Err(_) => return,
            }
        }
    }

    /// The machine's configuration with a new device (`push`), checked whole as it would be at
    /// boot (ids and taps used once, segments that exist) and resolved: the new device as
    /// `last` finds it there, with its id and, for a net, its MAC.
    fn admit<T>(
        &self,
        push: impl FnOnce(&mut VmConfig),
        last: impl FnOnce(&VmConfig) -> Option<&T>,
    ) -> Result<T, ApiError>
    where
        T: Clone,
    {
        let mut candidate = lock(&self.info).config.clone();
        push(&mut candidate);
        candidate.validate().map_err(config_refusal)?;
        candidate.resolve().map_err(|err| {
            ApiError::new(Refusal::Failed, format!("cannot pick a random MAC: {err}"))
        })?;
        Ok(last(&candidate).expect("just pushed").clone())
    }

    fn add_disk(
        &self,
        slots: &mut PluggedDevices,
        disk: DiskConfig,
    ) -> Result<PciDeviceInfo, ApiError> {
        let disk = self.admit(|c| c.disks.push(disk), |c| c.disks.last())?;
        self.add(
            slots,
            (disk.pci_segment, disk.iommu),
            disk.id.clone().unwrap_or_default(),
            || {
                let what = disk.path().display().to_string();
                Ok((NewDevice::Disk(&disk), what, Listed::Disk(disk.clone())))
            },
        )
    }

    /// A share, connected to its back end here, on the hotplug thread.
    fn add_fs(&self, slots: &mut PluggedDevices, fs: FsConfig) -> Result<PciDeviceInfo, ApiError> {
        let fs = self.admit(|c| c.fs.push(fs), |c| c.fs.last())?;
        self.add(
            slots,
            (fs.pci_segment, fs.iommu),
            fs.id.clone().unwrap_or_default(),
            || {
                let what = format!("tag {:?}, back end {}", fs.tag, fs.socket.display());
                Ok((NewDevice::Fs(&fs), what, Listed::Fs(fs.clone())))
            },
        )
    }

    /// The VM's vsock, if it has none yet: its socket is bound here, on the hotplug thread.
    fn add_vsock(
        &self,
        slots: &mut PluggedDevices,
        vsock: VsockConfig,
    ) -> Result<PciDeviceInfo, ApiError> {
        // One leaving still counts: the guest's driver takes one device only.
        if lock(&self.info).config.vsock.is_some() || slots.has_vsock() {
            return Err(ApiError::new(Refusal::Failed, ONE_VSOCK));
        }
        let vsock = self.admit(|c| c.vsock = Some(vsock), |c| c.vsock.as_ref())?;
        self.add(
            slots,
            (vsock.pci_segment, vsock.iommu),
            vsock.id.clone().unwrap_or_default(),
            || {
                let what = format!("socket {}", vsock.socket.display());
                Ok((NewDevice::Vsock(&vsock), what, Listed::Vsock(vsock.clone())))
            },
        )
    }

    /// A net on the tap it names, or on `fds`, the taps its client passed (kept, for the
    /// VM's next build, while the net is plugged in).
    fn add_net(
        &self,
        slots: &mut PluggedDevices,
        net: NetConfig,
        fds: Vec<OwnedFd>,
    ) -> Result<PciDeviceInfo, ApiError> {
        let net = self.admit(|c| c.net.push(net), |c| c.net.last())?;
        let id = net.id.clone().unwrap_or_default();
        if !fds.is_empty() {
            self.taps.insert(&id, fds);
        }
        let added = self.add(slots, (net.pci_segment, net.iommu), id.clone(), || {
            let tap = open_tap(&net, &self.taps).map_err(tap_refusal)?;
            let name = tap[0].name().to_string();
            // A tap warden created is listed by name; one passed as a descriptor stays
            // `fds` alone, as its client gave it.
            let listed = NetConfig {
                tap: net.fds.is_none().then(|| name.clone()),
                ..net.clone()
            };
            Ok((
                NewDevice::Net(&net, tap),
                format!("tap {name}"),
                Listed::Net(listed),
            ))
        });
        if added.is_err() {
            self.taps.remove(&id);
        }
        added
    }

    /// A free slot for the new device `id` on its segment (validated: it exists), behind the
    /// IOMMU or not; 409 while a device the guest has not released yet still has the id.
    fn reserve(
        &self,
        slots: &PluggedDevices,
        id: &str,
        (segment, iommu): (u16, bool),
    ) -> Result<PciBdf, ApiError> {
        if slots.has_id(id) {
            return Err(ApiError::new(
                Refusal::Conflict,
                format!("id {id:?} is in use by a device the guest has not released yet"),
            ));
        }
        if iommu && self.iommu.is_none() {
            return Err(ApiError::bad_request(
                "iommu=on needs the virtio-iommu, which this VM does not have: start warden with a device behind it or with --platform iommu=on",
            ));
        }
        let range = slot_range(iommu, self.iommu.is_some());
        let free = free_slot(|slot| slots.holds(place(segment, slot)), range.clone());
        free.map(|slot| place(segment, slot)).ok_or_else(|| {
            ApiError::new(
                Refusal::Conflict,
                format!(
                    "no free slot for a device {} the IOMMU: slots {:02x}..{:02x} of PCI segment {segment} are all in use; remove one first",
                    if iommu { "behind" } else { "outside" },
                    range.start,
                    range.end - 1
                ),
            )
        })
    }

    /// Finds the new device `id` a slot, then makes it (`make`, only once nothing refuses
    /// it: no tap is opened for a refused request; it also says what the device is for the
    /// log), over guest RAM or through the virtio-iommu, and plugs it in.
    fn add<'a>(
        &self,
        slots: &mut PluggedDevices,
        (segment, iommu): (u16, bool),
        id: String,
        make: impl FnOnce() -> Result<(NewDevice<'a>, String, Listed), ApiError>,
    ) -> Result<PciDeviceInfo, ApiError> {
        let at = self.reserve(slots, &id, (segment, iommu))?;
        let (new, what, listed) = make()?;
        let endpoint = match &self.iommu {
            Some(model) if iommu => {
                let endpoint = at.endpoint_id();
                model
                    .add_endpoint(endpoint, EndpointConfig::default())
                    .map_err(|err| {
                        ApiError::new(Refusal::Failed, format!("virtio-iommu: {err}"))
                    })?;
                Some((model, endpoint))
            }
            _ => None,
        };
        let device = attach::virtio_device(new, &self.memory, endpoint);
        let endpoint = endpoint.map(|(_, endpoint)| endpoint);
        let counters = device.as_ref().ok().and_then(|device| device.counters());
        let transport = match device.and_then(|device| self.plug(at, device)) {
            Ok(transport) => transport,
            Err(err) => {
                self.withdraw_endpoint(endpoint);
                return Err(err);
            }
        };
        if let Some(counters) = counters {
            self.stats.add_device(&id, counters);
        }
        Ok(self.record(slots, at, id, (&what, listed), transport, endpoint))
    }

    /// Passes the host PCI function `device` through in a free slot, behind the IOMMU (its
    /// mappings following the guest's) or with all guest RAM mapped.
    fn add_passthrough(
        &self,
        slots: &mut PluggedDevices,
        device: DeviceConfig,
    ) -> Result<PciDeviceInfo, ApiError> {
        let device = self.admit(|c| c.devices.push(device), |c| c.devices.last())?;
        let id = device.id.clone().unwrap_or_default();
        let at = self.reserve(slots, &id, (device.pci_segment, device.iommu))?;
        let refused = |err: vfio::OpenError| ApiError::bad_request(err.to_string());
        let opened = vfio::open(device.path(), self.kvm_vfio.clone()).map_err(refused)?;
        let mapper = Arc::new(VfioMapper::new(
            &id,
            opened.container.clone(),
            self.memory.clone(),
            self.vfio_entry_limit,
        ));
        let endpoint = match &self.iommu {
            Some(model) if device.iommu => {
                let regions = hot_reserved_regions(model.config(), &opened.iommu)?;
                let endpoint = at.endpoint_id();
                let external: Arc<dyn ExternalMapper> = mapper.clone();
                model
                    .add_endpoint(
                        endpoint,
                        EndpointConfig {
                            reserved_regions: Some(regions),
                            mapper: Some(external),
                        },
                    )
                    .map_err(|err| {
                        ApiError::new(Refusal::Failed, format!("virtio-iommu: {err}"))
                    })?;
                Some(endpoint)
            }
            _ => {
                mapper.set_identity(true).map_err(|err| {
                    ApiError::new(
                        Refusal::Failed,
                        format!("cannot map guest RAM for {id}'s DMA: {err}"),
                    )
                })?;
                None
            }
        };
        let pci = VfioPciDevice::new(&id, opened.device, |vectors| self.router.msi_group(vectors))
            .map_err(|err| ApiError::new(Refusal::Failed, err));
        let transport: Result<Arc<Mutex<dyn PciDevice>>, ApiError> =
            pci.and_then(|pci| self.insert(at, Arc::new(Mutex::new(pci))));
        let transport = match transport {
            Ok(transport) => transport,
            Err(err) => {
                self.withdraw_endpoint(endpoint);
                return Err(err);
            }
        };
        self.stats.add_passthrough(&id, mapper);
        let what = device.path().display().to_string();
        let listed = (&*what, Listed::Device(device.clone()));
        Ok(self.record(slots, at, id, listed, transport, endpoint))
    }

    /// Takes back the endpoint of a device that could not be plugged in.
    fn withdraw_endpoint(&self, endpoint: Option<u32>) {
        if let (Some(model), Some(endpoint)) = (&self.iommu, endpoint) {
            let _ = model.remove_endpoint(endpoint);
        }
    }

    /// Notes the device plugged in at `at` (`what` it is for the log, and how `vm.info`
    /// lists it); returns what the API answers.
    fn record(
        &self,
        slots: &mut PluggedDevices,
        at: PciBdf,
        id: String,
        (what, listed): (&str, Listed),
        transport: Arc<Mutex<dyn PciDevice>>,
        endpoint: Option<u32>,
    ) -> PciDeviceInfo {
        log::info!(
            "hotplug: {id} ({what}) plugged in at {at}{}",
            if endpoint.is_some() {
                ", behind the IOMMU"
            } else {
                ""
            }
        );
        let vsock = matches!(listed, Listed::Vsock(_));
        slots.insert(
            at,
            Plugged {
                id: id.clone(),
                transport,
                endpoint,
                leaving: false,
                vsock,
            },
            listed,
        );
        PciDeviceInfo {
            id,
            bdf: at.to_string(),
        }
    }

    /// Puts `device` behind a virtio-pci transport at `at` and tells the guest.
    fn plug(
        &self,
        at: PciBdf,
        device: Box<dyn VirtioDevice>,
    ) -> Result<Arc<Mutex<dyn PciDevice>>, ApiError> {
        let transport = attach::transport(device, &self.router)
            .map_err(|err| ApiError::new(Refusal::Failed, err))?;
        self.insert(at, transport)
    }

    /// Puts `transport` at `at` (a slot of a segment's bus 0), its BARs following where the
    /// guest places them, and tells the guest.
    fn insert(
        &self,
        at: PciBdf,
        transport: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<Arc<Mutex<dyn PciDevice>>, ApiError> {
        let segment = &self.segments[usize::from(at.segment)];
        let slot = at.device;
        segment.placement.track(slot);
        if let Err(err) = lock(&segment.root).add_device(slot, transport.clone()) {
            segment.placement.untrack(slot, &transport);
            return Err(ApiError::new(Refusal::Failed, format!("bus 0: {err}")));
        }
        if let Err(err) = lock(&segment.controller).plugged(slot) {
            // The device is there; the guest finds it when it next rescans.
            log::warn!("hotplug: cannot raise the hotplug event: {err}");
        }
        Ok(transport)
    }

    /// Asks the guest to release the device `id` (it leaves the configuration now, the machine
    /// when the guest's `_EJ0` says so).
    fn request_removal(&self, slots: &mut PluggedDevices, id: &str) -> Result<(), ApiError> {
        if self.boot_ids.iter().any(|boot| boot == id) {
            return Err(ApiError::bad_request(format!(
                "{id} was there at boot; only hot-plugged devices can be removed"
            )));
        }
        let Some((at, plugged)) = slots.find_mut(id) else {
            return Err(ApiError::new(
                Refusal::NotFound,
                format!("no device has id {id:?}"),
            ));
        };
        if plugged.leaving {
            return Err(ApiError::new(
                Refusal::Conflict,
                format!("{id} is already being removed"),
            ));
        }
        let controller = &self.segments[usize::from(at.segment)].controller;
        lock(controller).request_eject(at.device).map_err(|err| {
            ApiError::new(
                Refusal::Failed,
                format!("cannot raise the hotplug event: {err}"),
            )
        })?;
        slots.mark_leaving(at);
        // Its taps' descriptors close now, as Cloud Hypervisor closes them (the device's own
        // copies go with it).
        self.taps.remove(id);
        Ok(())
    }

    /// The guest let go of the device at `at`: take it out of the machine. Asked for or not:
    /// a guest may release a device on its own (`echo 0 > /sys/bus/pci/slots/N/power`), and
    /// Cloud Hypervisor then ejects it too. It stops taking part at once (off the bus and out
    /// of its IOMMU domain); its threads stop within one round of their bounded work.
    fn unplug(&self, slots: &mut PluggedDevices, at: PciBdf) {
        let Some(plugged) = slots.remove(at) else {
            log::debug!("hotplug: the guest ejected empty slot {at}");
            return;
        };
        let segment = &self.segments[usize::from(at.segment)];
        lock(&segment.root).remove_device(at.device);
        segment.placement.untrack(at.device, &plugged.transport);
        if let (Some(model), Some(endpoint)) = (&self.iommu, plugged.endpoint) {
            if let Err(err) = model.remove_endpoint(endpoint) {
                log::error!("hotplug: {}: endpoint {endpoint:#x}: {err}", plugged.id);
            }
        }
        log::info!("hotplug: {} removed from {at}", plugged.id);
        monitor::emit(
            self.monitor.as_deref(),
            "vm",
            "device-removed",
            &[("id", &plugged.id), ("bdf", &at.to_string())],
        );
        self.stats.remove_device(&plugged.id);
        // Dropping the transport stops the device's threads, frees its vectors and closes its
        // files (a tap warden made goes with it).
        drop(plugged.transport);
    }
}

/// What a hot-added device behind the IOMMU must not have mapped: what its host IOMMU
/// reserves, and the parts of the virtio-iommu's input range (fixed at boot, before this
/// device) outside the host's IOVA ranges. Refused if the host maps in pages larger than the
/// smallest the guest may use.
fn hot_reserved_regions(
    model: &IommuConfig,
    host: &HostIommuInfo,
) -> Result<Vec<ReservedRegion>, ApiError> {
    let granule = |mask: u64| mask & mask.wrapping_neg();
    if host.page_sizes != 0 && granule(host.page_sizes) > granule(model.page_size_mask) {
        return Err(ApiError::bad_request(format!(
            "devices: the host IOMMU maps in {:#x}-byte pages, larger than the virtio-iommu's {:#x} (fixed at boot); pass the device at boot with --device instead",
            granule(host.page_sizes),
            granule(model.page_size_mask)
        )));
    }
    let mut regions = host.reserved_regions();
    let (start, end) = model.input_range;
    let reserved = |start: u64, end: u64| ReservedRegion {
        subtype: virtio_iommu::protocol::VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
        start,
        end,
    };
    if let (Some(first), Some(last)) = (host.iova_ranges.first(), host.iova_ranges.last()) {
        if first.0 > start {
            regions.push(reserved(start, first.0 - 1));
        }
        if last.1 < end {
            regions.push(reserved(last.1 + 1, end));
        }
    }
    Ok(regions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_and_plain_devices_take_separate_slots_when_there_is_an_iommu() {
        assert_eq!(slot_range(true, true), 24..28);
        assert_eq!(slot_range(false, true), 28..32);
        assert_eq!(slot_range(false, false), 24..32);
        // The VIOT's range is the protected one, inside the hotplug slots.
        const {
            assert!(
                HOTPLUG_SLOTS.start <= PROTECTED_SLOTS.start
                    && PROTECTED_SLOTS.end <= HOTPLUG_SLOTS.end
            )
        };
    }

    #[test]
    fn slots_are_taken_first_free_first_and_run_out() {
        let used = [24u8, 25, 27];
        assert_eq!(free_slot(|s| used.contains(&s), 24..28), Some(26));
        let used = [24u8, 25, 26, 27];
        assert_eq!(free_slot(|s| used.contains(&s), 24..28), None);
        assert_eq!(free_slot(|_| false, 28..32), Some(28));
    }

    #[test]
    fn a_hot_added_device_behind_the_iommu_gets_the_host_reserved_regions_and_edges() {
        let model = IommuConfig {
            page_size_mask: 0x1000 | 0x20_0000,
            input_range: (0, u64::MAX),
            ..IommuConfig::default()
        };
        // The host's doorbell gap, and nothing above 1 TiB.
        let host = HostIommuInfo {
            page_sizes: 0x1000 | 0x20_0000 | 0x4000_0000,
            iova_ranges: vec![(0, 0xfedf_ffff), (0xfef0_0000, (1 << 40) - 1)],
        };
        let regions = hot_reserved_regions(&model, &host).unwrap();
        assert!(regions.contains(&ReservedRegion::X86_MSI), "{regions:?}");
        assert!(
            regions
                .iter()
                .any(|r| (r.start, r.end) == (1 << 40, u64::MAX)),
            "above the host's last range: {regions:?}"
        );
        assert!(!regions.iter().any(|r| r.start == 0), "{regions:?}");

        // A host that maps only 64 KiB pages cannot follow 4 KiB guest mappings.
        let coarse = HostIommuInfo {
            page_sizes: 0x1_0000,
            ..host
        };
        let err = hot_reserved_regions(&model, &coarse).unwrap_err();
        assert_eq!(err.refusal, Refusal::BadRequest);
        assert!(
            err.message.contains("0x10000-byte pages"),
            "{}",
            err.message
        );
    }

    /// A guest that writes the eject register in a loop queues one message for the hotplug
    /// thread, not one per write: the slots are bits of a word the thread takes at once.
    #[test]
    fn eject_writes_coalesce_into_one_pending_message() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ejects, ejected) = ejects_to(&tx);
        for _ in 0..10_000 {
            ejects.ejected(24);
            ejects.ejected(31);
        }
        assert_eq!(rx.try_iter().count(), 1);
        assert_eq!(ejected.swap(0, Ordering::AcqRel), 1 << 24 | 1 << 31);
        // Taken: the next write is news again.
        ejects.ejected(25);
        assert_eq!(rx.try_iter().count(), 1);
        assert_eq!(ejected.load(Ordering::Acquire), 1 << 25);
    }
}
