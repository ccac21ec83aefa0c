//! The guest's clock across `vm.pause`, as Cloud Hypervisor keeps it: KVM's clock (the
//! kvm-clock a Linux guest keeps time by) is read once every vCPU has stopped and set back
//! before any runs again, so the guest's clocks do not jump by the time it was paused.
//!
//! The clock is set back to its value alone, with no flags: from Linux 5.16 on, KVM_GET_CLOCK
//! reports `KVM_CLOCK_REALTIME` (with the host's wall time), given which KVM_SET_CLOCK would
//! advance the clock by the host time elapsed since the read, the pause itself; before 5.16,
//! KVM_SET_CLOCK refuses any flag (`KVM_CLOCK_TSC_STABLE` among those the read reports) with
//! EINVAL. Cloud Hypervisor clears the flags too.
//!
//! A clock that cannot be read or set costs a warning, never the pause or the resume: the
//! guest then sees the paused time pass, as it would without this.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;
use vm_device::lock;

/// Where the VM's clock is read and set: KVM_GET_CLOCK and KVM_SET_CLOCK on the VM, or a fake.
pub trait VmClock: Send + Sync {
    fn get(&self) -> Result<kvm_clock_data, kvm_ioctls::Error>;
    fn set(&self, clock: &kvm_clock_data) -> Result<(), kvm_ioctls::Error>;
}

impl VmClock for VmFd {
    fn get(&self) -> Result<kvm_clock_data, kvm_ioctls::Error> {
        self.get_clock()
    }

    fn set(&self, clock: &kvm_clock_data) -> Result<(), kvm_ioctls::Error> {
        self.set_clock(clock)
    }
}

/// The guest's clock while the VM is paused; driven by the pause gate's hooks (see
/// [`crate::pause::PauseGate`]), which call it with every vCPU parked.
pub struct PausedClock<C: ?Sized> {
    /// What KVM_SET_CLOCK is to be given on resume: `None` while the VM runs, or when the read
    /// at the pause failed.
    saved: Mutex<Option<kvm_clock_data>>,
    vm: Arc<C>,
}

impl<C: VmClock + ?Sized> PausedClock<C> {
    pub fn new(vm: Arc<C>) -> Self {
        PausedClock {
            saved: Mutex::new(None),
            vm,
        }
    }

    /// Every vCPU is stopped: remembers where the guest's clock stands.
    pub fn save(&self) {
        let saved = match self.vm.get() {
            Ok(read) => Some(to_set_back(&read)),
            Err(err) => {
                log::warn!(
                    "vm.pause: cannot read the guest's clock (KVM_GET_CLOCK): {err}; after vm.resume it will have advanced by the pause"
                );
                None
            }
        };
        *lock(&self.saved) = saved;
    }

    /// The vCPUs are about to run again: puts the clock back where [`PausedClock::save`] found
    /// it, once.
    pub fn restore(&self) {
        let Some(clock) = lock(&self.saved).take() else {
            return;
        };
        if let Err(err) = self.vm.set(&clock) {
            log::warn!(
                "vm.resume: cannot set the guest's clock back (KVM_SET_CLOCK): {err}; it has advanced by the pause"
            );
        }
    }
}

/// What KVM_SET_CLOCK is given to put the clock back at `read` (KVM_GET_CLOCK's answer): the
/// value alone, no flags (see the module's comment), no host times.
fn to_set_back(read: &kvm_clock_data) -> kvm_clock_data {
    kvm_clock_data {
        clock: read.clock,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE};

    use super::*;

    /// A VM whose clock reads `now` (with the flags a 5.16+ host reports), or fails.
    #[derive(Default)]
    struct FakeVm {
        now: Mutex<Option<u64>>,
        set: Mutex<Vec<kvm_clock_data>>,
    }

    impl FakeVm {
        fn at(&self, now: Option<u64>) {
            *lock(&self.now) = now;
        }

        fn set_calls(&self) -> Vec<(u64, u32, u64, u64)> {
            lock(&self.set)
                .iter()
                .map(|c| (c.clock, c.flags, c.realtime, c.host_tsc))
                .collect()
        }
    }

    impl VmClock for FakeVm {
        fn get(&self) -> Result<kvm_clock_data, kvm_ioctls::Error> {
            let clock = (*lock(&self.now)).ok_or(kvm_ioctls::Error::new(libc::ENOTTY))?;
            Ok(kvm_clock_data {
                clock,
                flags: KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC,
                realtime: 1_700_000_000_000_000_000,
                host_tsc: 123_456,
                ..Default::default()
            })
        }

        fn set(&self, clock: &kvm_clock_data) -> Result<(), kvm_ioctls::Error> {
            lock(&self.set).push(*clock);
            Ok(())
        }
    }

    #[test]
    fn each_resume_sets_back_the_clock_of_its_pause_once_and_without_flags() {
        let vm = Arc::new(FakeVm::default());
        let clock = PausedClock::new(Arc::clone(&vm));
        vm.at(Some(5_000));
        clock.save();
        vm.at(Some(9_000));
        clock.restore();
        assert_eq!(vm.set_calls(), [(5_000, 0, 0, 0)]);
        clock.restore();
        assert_eq!(vm.set_calls().len(), 1, "a second resume sets nothing");

        // The next pause reads anew.
        clock.save();
        clock.restore();
        assert_eq!(vm.set_calls(), [(5_000, 0, 0, 0), (9_000, 0, 0, 0)]);
    }

    #[test]
    fn nothing_is_set_without_a_pause_or_after_a_failed_read() {
        let vm = Arc::new(FakeVm::default());
        let clock = PausedClock::new(Arc::clone(&vm));
        vm.at(Some(1_000));
        clock.restore();
        assert!(vm.set_calls().is_empty(), "no pause, nothing saved");

        vm.at(None);
        clock.save();
        clock.restore();
        assert!(
            vm.set_calls().is_empty(),
            "the read failed, nothing to set back"
        );
        vm.at(Some(2_000));
        clock.save();
        clock.restore();
        assert_eq!(vm.set_calls(), [(2_000, 0, 0, 0)], "the next pause works");
    }
}
