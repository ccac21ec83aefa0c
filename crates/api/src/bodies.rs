//! Request bodies that are not part of the VM's configuration (those are `vm_config`'s).

use serde::{Deserialize, Serialize};

/// `VmRemoveDevice`: the id of the device to eject.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmRemoveDevice {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl VmRemoveDevice {
    /// An id to look for; one no device has is answered 404 by the VMM.
    pub fn validate(&self) -> Result<(), String> {
        match self.id.as_deref() {
            None | Some("") => Err("VmRemoveDevice: id is required".into()),
            Some(_) => Ok(()),
        }
    }
}

/// `VmResize`: the vCPUs, RAM and balloon the VM is to have; absent: unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmResize {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_vcpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_ram: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_balloon: Option<u64>,
}
