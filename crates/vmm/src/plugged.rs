//! The devices the API plugged in, by slot of bus 0: the hotplug thread's record of them and
//! what `vm.info` lists of them, changed together in one place. However a device comes or goes
//! (a client's call, one that timed out and succeeded later, or the guest ejecting it on its
//! own), `vm.info` says what the machine has.

use std::collections::BTreeMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::ApiError;
use pci::PciDevice;
use vm_device::lock;

use crate::hotplug::EJECT_TIMEOUT;

/// `vm.info`, shared by the API (which reads it) and the hotplug thread (which alone changes
/// what it lists of hot-plugged devices).
pub(crate) type SharedInfo = Arc<Mutex<api::VmInfo>>;

/// How a hot-plugged device appears in `vm.info`'s configuration (resolved: with its id).
#[derive(Clone, Debug)]
pub(crate) enum Listed {
    Disk(vm_config::DiskConfig),
    Net(vm_config::NetConfig),
    Device(vm_config::DeviceConfig),
}

/// A device the API plugged in.
pub(crate) struct Plugged {
    pub(crate) id: String,
    pub(crate) transport: Arc<Mutex<dyn PciDevice>>,
    /// Its virtio-iommu endpoint, if it is behind the IOMMU.
    pub(crate) endpoint: Option<u32>,
    /// Asked to leave: until when the client waits, and the client.
    pub(crate) eject: Option<(Instant, Sender<Result<(), ApiError>>)>,
}

/// The hot-plugged devices by slot, kept in step with `vm.info`.
pub(crate) struct PluggedDevices {
    slots: BTreeMap<u8, Plugged>,
    info: SharedInfo,
}

impl PluggedDevices {
    pub(crate) fn new(info: SharedInfo) -> Self {
        PluggedDevices {
            slots: BTreeMap::new(),
            info,
        }
    }

    /// Whether `slot` holds a device.
    pub(crate) fn holds(&self, slot: u8) -> bool {
        self.slots.contains_key(&slot)
    }

    /// The device with id `id`, and its slot.
    pub(crate) fn find_mut(&mut self, id: &str) -> Option<(u8, &mut Plugged)> {
        self.slots
            .iter_mut()
            .find(|(_, p)| p.id == id)
            .map(|(&slot, p)| (slot, p))
    }

    /// The earliest time a removal waits until.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .values()
            .filter_map(|p| p.eject.as_ref().map(|(at, _)| *at))
            .min()
    }

    /// Records `plugged` in `slot` and lists it in `vm.info` as `listed`.
    pub(crate) fn insert(&mut self, slot: u8, plugged: Plugged, listed: Listed) {
        let id = plugged.id.clone();
        let mut info = lock(&self.info);
        let config = &mut info.config;
        match listed {
            Listed::Disk(disk) => config.disks.push(disk),
            Listed::Net(net) => config.net.push(net),
            Listed::Device(device) => config.devices.push(device),
        }
        let node = device_node(&id, pci_bdf(slot));
        info.device_tree.insert(id, node);
        drop(info);
        self.slots.insert(slot, plugged);
    }

    /// Takes the device in `slot` out of the record and of `vm.info`.
    pub(crate) fn remove(&mut self, slot: u8) -> Option<Plugged> {
        let plugged = self.slots.remove(&slot)?;
        let id = Some(plugged.id.as_str());
        let mut info = lock(&self.info);
        info.device_tree.remove(&plugged.id);
        let config = &mut info.config;
        config.disks.retain(|d| d.id.as_deref() != id);
        config.net.retain(|n| n.id.as_deref() != id);
        config.devices.retain(|d| d.id.as_deref() != id);
        drop(info);
        Some(plugged)
    }

    /// Answers the removals the guest has not acknowledged by `now`; the devices stay, and a
    /// later `_EJ0` still removes them.
    pub(crate) fn expire(&mut self, now: Instant) {
        for plugged in self.slots.values_mut() {
            if plugged.eject.as_ref().is_none_or(|(at, _)| *at > now) {
                continue;
            }
            if let Some((_, reply)) = plugged.eject.take() {
                let _ = reply.send(Err(ApiError::new(
                    504,
                    format!(
                        "the guest did not release {} within {} s; it stays plugged in (ask again, or check the guest's acpiphp)",
                        plugged.id,
                        EJECT_TIMEOUT.as_secs()
                    ),
                )));
            }
        }
    }
}

/// The address `vm.info` and the API give a device in `slot` of bus 0.
pub(crate) fn pci_bdf(slot: u8) -> String {
    format!("0000:00:{slot:02x}.0")
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
    use std::sync::mpsc::channel;
    use std::time::Duration;

    use super::*;

    fn plugged(id: &str) -> Plugged {
        Plugged {
            id: id.into(),
            transport: Arc::new(Mutex::new(pci::HostBridge::new())),
            endpoint: None,
            eject: None,
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
        devices.insert(24, plugged("scratch"), Listed::Disk(disk));
        let net = vm_config::NetConfig {
            id: Some("_net0".into()),
            ..Default::default()
        };
        devices.insert(28, plugged("_net0"), Listed::Net(net));
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
        assert!(devices.holds(24) && devices.holds(28));

        // The guest's own _EJ0 for slot 24.
        assert_eq!(devices.remove(24).map(|p| p.id), Some("scratch".into()));
        assert_eq!(
            listed_ids(&info),
            (vec![], vec!["_net0".into()], vec!["_net0".into()])
        );
        assert!(devices.remove(24).is_none(), "an empty slot ejects nothing");
    }

    #[test]
    fn an_unacknowledged_removal_answers_504_once_and_the_device_stays() {
        let (reply, answer) = channel();
        let now = Instant::now();
        let mut devices = PluggedDevices::new(empty_info());
        let mut scratch = plugged("scratch");
        scratch.eject = Some((now + Duration::from_secs(1), reply));
        devices.insert(24, scratch, Listed::Disk(Default::default()));
        assert_eq!(devices.next_deadline(), Some(now + Duration::from_secs(1)));
        devices.expire(now);
        assert!(answer.try_recv().is_err(), "not yet due");
        devices.expire(now + Duration::from_secs(1));
        let err = answer.try_recv().unwrap().unwrap_err();
        assert_eq!(err.status, 504);
        assert!(
            err.message.contains("did not release scratch"),
            "{}",
            err.message
        );
        assert!(
            devices.next_deadline().is_none(),
            "a new request may ask again"
        );
        devices.expire(now + Duration::from_secs(5));
        assert!(answer.try_recv().is_err(), "answered once");
        assert!(devices.holds(24));
    }
}
