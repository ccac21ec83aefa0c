//! How devices raise interrupts without knowing about KVM.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// One MSI message as the guest programmed it into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// A device's set of interrupt vectors (its MSI-X vectors, or a single legacy line).
///
/// The VMM backs each vector with an eventfd registered as a KVM irqfd, so a device thread fires
/// an interrupt with one `write(2)` and no exit to the VMM.
pub trait InterruptGroup: Send + Sync {
    /// Number of vectors in the group.
    fn len(&self) -> usize;

    /// Whether the group has no vector at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Programs vector `index` with the message the guest wrote, or masks it.
    fn update(&self, index: usize, message: MsiMessage, masked: bool) -> io::Result<()>;

    /// Fires vector `index`.
    fn trigger(&self, index: usize) -> io::Result<()>;

    /// The eventfd behind vector `index`, for devices that want to hand it to a worker.
    fn notifier(&self, index: usize) -> Option<&EventFd>;
}
