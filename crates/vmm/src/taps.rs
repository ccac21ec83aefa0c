//! The taps clients passed as descriptors (`vm.add-net` with `SCM_RIGHTS`), by the id of
//! their net: held while the net is in the configuration, so that each build of the VM (a
//! reboot, a boot after `vm.shutdown`) gets copies of its own, and closed when the net
//! leaves it (removed, or the VM deleted), as Cloud Hypervisor closes them.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use vm_device::lock;

#[derive(Clone, Default)]
pub(crate) struct PassedTaps(Arc<Mutex<BTreeMap<String, Vec<OwnedFd>>>>);

impl PassedTaps {
    pub(crate) fn insert(&self, id: &str, fds: Vec<OwnedFd>) {
        lock(&self.0).insert(id.to_string(), fds);
    }

    /// Copies of net `id`'s descriptors, for a device to own.
    pub(crate) fn copies(&self, id: &str) -> io::Result<Vec<OwnedFd>> {
        let taps = lock(&self.0);
        let fds = taps.get(id).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no tap descriptors were passed for net {id}"),
            )
        })?;
        fds.iter().map(OwnedFd::try_clone).collect()
    }

    pub(crate) fn remove(&self, id: &str) {
        lock(&self.0).remove(id);
    }

    pub(crate) fn clear(&self) {
        lock(&self.0).clear();
    }
}
