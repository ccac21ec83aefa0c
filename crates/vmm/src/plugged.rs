//! The devices the API plugged in, by place (segment, slot of its bus 0): the hotplug
//! thread's record of them and what `vm.info` lists of them, changed together in one place.
//! However a device comes or goes (a client's call, or the guest ejecting it on its own),
//! `vm.info` says what the machine has.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use acpi::PciBdf;
use pci::PciDevice;
use vm_device::lock;

/// `vm.info`, shared by the API (which reads it) and the hotplug thread (which alone changes
/// what it lists of hot-plugged devices).
pub(crate) type SharedInfo = Arc<Mutex<api::VmInfo>>;

/// How a hot-plugged device appears in `vm.info`'s configuration (resolved: with its id).
#[derive(Clone, Debug)]
pub(crate) enum Listed {
    Disk(vm_config::DiskConfig),
    Net(vm_config::NetConfig),
    Device(vm_config::DeviceConfig),
    Vsock(vm_config::VsockConfig),
    Fs(vm_config::FsConfig),
}

/// A device the API plugged in.
pub(crate) struct Plugged {
    pub(crate) id: String,
    pub(crate) transport: Arc<Mutex<dyn PciDevice>>,
    /// Its virtio-iommu endpoint, if it is behind the IOMMU.
    pub(crate) endpoint: Option<u32>,
    /// Asked to leave, and not let go of yet.
    pub(crate) leaving: bool,
    /// The VM's vsock: while it is plugged in, leaving or not, it takes no other.
    pub(crate) vsock: bool,
}

/// The hot-plugged devices by place (function 0 of a slot of a segment's bus 0), kept in step
/// with `vm.info`.
pub(crate) struct PluggedDevices {
    slots: BTreeMap<PciBdf, Plugged>,
    info: SharedInfo,
}

impl PluggedDevices {
    pub(crate) fn new(info: SharedInfo) -> Self {
        PluggedDevices {
            slots: BTreeMap::new(),
            info,
        }
    }

    /// Whether `place` holds a device.
    pub(crate) fn holds(&self, place: PciBdf) -> bool {
        self.slots.contains_key(&place)
    }

    /// The device with id `id`, and its place.
    pub(crate) fn find_mut(&mut self, id: &str) -> Option<(PciBdf, &mut Plugged)> {
        self.slots
            .iter_mut()
            .find(|(_, p)| p.id == id)
            .map(|(&slot, p)| (slot, p))
    }

    /// Whether the vsock is plugged in, leaving or not.
    pub(crate) fn has_vsock(&self) -> bool {
        self.slots.values().any(|p| p.vsock)
    }

    /// Whether a plugged device, leaving or not, has id `id`.
    pub(crate) fn has_id(&self, id: &str) -> bool {
        self.slots.values().any(|p| p.id == id)
    }

    /// Records `plugged` at `place` and lists it in `vm.info` as `listed`.
    pub(crate) fn insert(&mut self, place: PciBdf, plugged: Plugged, listed: Listed) {
        let id = plugged.id.clone();
        let mut info = lock(&self.info);
        let config = &mut info.config;
        match listed {
            Listed::Disk(disk) => config.disks.push(disk),
            Listed::Net(net) => config.net.push(net),
            Listed::Device(device) => config.devices.push(device),
            Listed::Vsock(vsock) => config.vsock = Some(vsock),
            Listed::Fs(fs) => config.fs.push(fs),
        }
        let node = device_node(&id, place.to_string());
        info.device_tree.insert(id, node);
        drop(info);
        self.slots.insert(place, plugged);
    }

    /// Takes the device at `place` out of the record and of `vm.info`.
    pub(crate) fn remove(&mut self, place: PciBdf) -> Option<Plugged> {
        let plugged = self.slots.remove(&place)?;
        let mut info = lock(&self.info);
        info.device_tree.remove(&plugged.id);
        info.config.remove_device(&plugged.id);
        drop(info);
        Some(plugged)
    }

    /// The device `id` is leaving: the configuration no longer lists it (a reboot builds the
    /// VM without it), the device tree does until the guest lets go.
    pub(crate) fn mark_leaving(&mut self, place: PciBdf) {
        let Some(plugged) = self.slots.get_mut(&place) else {
            return;
        };
        plugged.leaving = true;
        lock(&self.info).config.remove_device(&plugged.id);
    }
}

/// Function 0 of `slot` of bus 0 of `segment`: where a device is plugged in; as a string, the
/// address `vm.info` and the API give it (`0001:00:03.0`).
pub(crate) fn place(segment: u16, slot: u8) -> PciBdf {
    PciBdf::new(segment, 0, slot, 0)
}

/// A device as `vm.info`'s device tree lists it.
pub(crate) fn device_node(id: &str, bdf: String) -> api::DeviceNode {
    api::DeviceNode {
        id: id.to_string(),
        resources: Vec::new(),
        children: Vec::new(),
        pci_bdf: Some(bdf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugged(id: &str) -> Plugged {
        Plugged {
            id: id.into(),
            transport: Arc::new(Mutex::new(pci::HostBridge::new())),
            endpoint: None,
            leaving: false,
            vsock: false,
        }
    }

    /// `vm.info` of a machine with no device.
    fn empty_info() -> SharedInfo {
        Arc::new(Mutex::new(api::VmInfo {
            config: vm_config::VmConfig::default(),
            state: api::VmState::Running,
            memory_actual_size: 1 << 29,
            device_tree: Default::default(),
        }))
    }

    fn listed_ids(info: &SharedInfo) -> (Vec<String>, Vec<String>, Vec<String>) {
        let info = lock(info);
        let ids = |ids: Vec<Option<String>>| ids.into_iter().flatten().collect::<Vec<_>>();
        let disks = ids(info.config.disks.iter().map(|d| d.id.clone()).collect());
        let nets = ids(info.config.net.iter().map(|n| n.id.clone()).collect());
        let tree = info.device_tree.keys().cloned().collect();
        (disks, nets, tree)
    }

    /// `vm.info` follows the record whoever changes it: a device the guest ejects on its own
    /// leaves both at once, with no API call to update the list.
    #[test]
    fn vm_info_follows_every_plug_and_unplug() {
        let info = empty_info();
        let mut devices = PluggedDevices::new(Arc::clone(&info));
        let disk = vm_config::DiskConfig {
            path: Some("/images/scratch.img".into()),
            id: Some("scratch".into()),
            ..Default::default()
        };
        devices.insert(place(0, 24), plugged("scratch"), Listed::Disk(disk));
        let net = vm_config::NetConfig {
            id: Some("_net0".into()),
            ..Default::default()
        };
        devices.insert(place(0, 28), plugged("_net0"), Listed::Net(net));
        assert_eq!(
            listed_ids(&info),
            (
                vec!["scratch".into()],
                vec!["_net0".into()],
                vec!["_net0".into(), "scratch".into()]
            )
        );
        assert_eq!(
            lock(&info).device_tree["scratch"].pci_bdf.as_deref(),
            Some("0000:00:18.0")
        );
        assert!(devices.holds(place(0, 24)) && devices.holds(place(0, 28)));

        // The guest's own _EJ0 for slot 24.
        assert_eq!(
            devices.remove(place(0, 24)).map(|p| p.id),
            Some("scratch".into())
        );
        assert_eq!(
            listed_ids(&info),
            (vec![], vec!["_net0".into()], vec!["_net0".into()])
        );
        assert!(
            devices.remove(place(0, 24)).is_none(),
            "an empty slot ejects nothing"
        );
    }

    /// A device asked to leave is gone from the configuration at once (a reboot would not
    /// build it), and from the device tree once the guest lets go.
    #[test]
    fn a_leaving_device_leaves_the_configuration_first_and_the_tree_on_eject() {
        let info = empty_info();
        let mut devices = PluggedDevices::new(Arc::clone(&info));
        let disk = vm_config::DiskConfig {
            path: Some("/images/scratch.img".into()),
            id: Some("scratch".into()),
            ..Default::default()
        };
        devices.insert(place(0, 24), plugged("scratch"), Listed::Disk(disk));
        devices.mark_leaving(place(0, 24));
        assert_eq!(listed_ids(&info), (vec![], vec![], vec!["scratch".into()]));
        assert!(devices.has_id("scratch"), "still plugged in");
        assert!(devices.remove(place(0, 24)).is_some_and(|p| p.leaving));
        assert_eq!(listed_ids(&info), (vec![], vec![], vec![]));
    }
}
