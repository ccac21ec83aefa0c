//! The VMM: its lifecycle ([`vmm`]: the VM created, booted, shut down, rebooted, deleted,
//! through the command line or the API) and the machine it builds from a
//! `vm_config::VmConfig`.
//!
//! [`builder::build`] is the whole boot path, top to bottom, and [`vm::Vm`] the machine from
//! its start to its end; the modules beside them each own one piece of the machine (its
//! address map, RAM, interrupt routing, legacy devices, kernel loading, vCPUs, hotplug), and
//! [`control`] carries the API's requests to the VMM thread.

mod attach;
mod bar_placement;
pub mod boot;
mod builder;
pub mod clock;
mod control;
mod devices;
mod error;
mod events;
mod host;
pub mod hotplug;
pub mod interrupts;
pub mod layout;
pub mod legacy;
pub mod memory;
pub mod monitor;
pub mod options;
pub mod pause;
pub mod pci_bus;
pub mod pci_hotplug;
mod plugged;
mod pty;
pub mod stats;
mod taps;
mod terminal;
mod threads;
pub mod vcpu;
mod vm;
mod vmm;

pub use error::VmmError;
pub use vmm::{run, VmmExit};
