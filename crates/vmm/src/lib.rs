//! Builds one KVM virtual machine from a [`config::VmConfig`] and runs it to its end.
//!
//! [`builder::run`] is the whole boot path, top to bottom; the modules beside it each own one
//! piece of the machine (its address map, RAM, interrupt routing, legacy devices, kernel
//! loading, vCPUs), and [`control`] answers the API.

mod bar_placement;
pub mod boot;
pub mod builder;
pub mod clock;
pub mod control;
mod devices;
pub mod hotplug;
pub mod interrupts;
pub mod layout;
pub mod legacy;
pub mod memory;
pub mod options;
pub mod pause;
pub mod pci_bus;
pub mod pci_hotplug;
mod plugged;
pub mod stats;
mod terminal;
pub mod vcpu;

pub use builder::{run, VmmError};
pub use legacy::GuestExit;
