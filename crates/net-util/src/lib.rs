//! The host side of guest networking: tap devices, MAC addresses, and the kernel's vhost-net.
//!
//! Kept apart from the virtio-net device so that the device model sees only a packet file
//! descriptor and an offload switch, and the command line can validate MACs and tap names
//! without pulling in device code.

mod mac;
mod tap;
mod vhost;

pub use mac::{MacAddr, MacParseError};
pub use tap::{validate_tap_name, Tap, TapError, VNET_HDR_LEN};
pub use vhost::{IotlbMiss, RingAddresses, VhostError, VhostNet};
