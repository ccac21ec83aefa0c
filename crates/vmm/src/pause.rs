//! `vm.pause` and `vm.resume`: the gate every vCPU passes before it enters the guest; and
//! the end of a VM, when the gate sends every vCPU out of its run loop for good.
//!
//! Pausing closes the gate, kicks every vCPU out of `KVM_RUN` (a signal, see
//! [`crate::vcpu::kick`]) and waits until each is parked at the gate; resuming opens it. The
//! gate knows nothing of KVM: a vCPU is a thread id to kick, and the kick is the caller's, as
//! is what is done while every vCPU is parked (the guest's clock is read once they all are and
//! set back before any runs again, see [`crate::clock`]).
//!
//! Device threads are not paused: a request the guest queued before the pause still completes
//! (and raises its interrupt, which waits in KVM for the vCPU), a received frame still fills a
//! buffer the guest posted; nothing new is asked of them while no vCPU runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use vm_device::lock;

/// Why a pause or a resume was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("cannot signal vCPU thread {tid}: {reason}; the VM keeps running")]
    Kick { tid: i32, reason: String },
    #[error("{running} of {vcpus} vCPUs did not stop within {} ms; the VM keeps running", .waited.as_millis())]
    Timeout {
        running: usize,
        vcpus: usize,
        waited: Duration,
    },
}

#[derive(Default)]
struct State {
    paused: bool,
    /// The VM is going away: every vCPU leaves its run loop at the gate.
    stopping: bool,
    /// The thread ids of the vCPUs in their run loop.
    vcpus: Vec<i32>,
    /// How many of them wait at the gate.
    parked: usize,
}

/// Where vCPUs stop while the VM is paused.
#[derive(Default)]
pub struct PauseGate {
    /// Read before every `KVM_RUN`: the common case costs a load, not a lock.
    closed: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

impl PauseGate {
    /// A vCPU thread `tid` starts its run loop: from now on a pause waits for it.
    pub fn enter(&self, tid: i32) {
        lock(&self.state).vcpus.push(tid);
    }

    /// The vCPU thread `tid` left its run loop for good (the guest stopped): a pause in
    /// progress no longer waits for it.
    pub fn leave(&self, tid: i32) {
        lock(&self.state).vcpus.retain(|&t| t != tid);
        self.changed.notify_all();
    }

    /// Called by a vCPU before each `KVM_RUN`: `true` at once unless the VM is paused, and
    /// then once it is resumed; `false` once the VM is stopping, when the vCPU is to leave its
    /// run loop.
    pub fn pass(&self) -> bool {
        if !self.closed.load(Ordering::SeqCst) {
            return true;
        }
        let mut state = lock(&self.state);
        if !state.paused {
            return !state.stopping;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !state.stopping {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.parked -= 1;
        !state.stopping
    }

    /// Ends the VM's run: closes the gate for good (a paused VM's parked vCPUs wake to leave),
    /// `kick`s each vCPU thread out of the guest and waits, at most `timeout`, until every one
    /// has left its run loop.
    pub fn stop(
        &self,
        kick: impl Fn(i32) -> std::io::Result<()>,
        timeout: Duration,
    ) -> Result<(), PauseError> {
        let mut state = lock(&self.state);
        state.stopping = true;
        self.closed.store(true, Ordering::SeqCst);
        self.changed.notify_all();
        for &tid in &state.vcpus {
            kick(tid).map_err(|err| PauseError::Kick {
                tid,
                reason: err.to_string(),
            })?;
        }
        let (state, waited) = self
            .changed
            .wait_timeout_while(state, timeout, |s| !s.vcpus.is_empty())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if waited.timed_out() {
            return Err(PauseError::Timeout {
                running: state.vcpus.len(),
                vcpus: state.vcpus.len(),
                waited: timeout,
            });
        }
        Ok(())
    }

    /// Pauses the VM: closes the gate, `kick`s each vCPU thread out of the guest and waits,
    /// at most `timeout`, until every one of them is parked, then calls `stopped`. If one
    /// cannot be kicked or does not stop in time, the gate opens again and the VM runs on
    /// (and `stopped` is not called).
    pub fn pause(
        &self,
        kick: impl Fn(i32) -> std::io::Result<()>,
        timeout: Duration,
        stopped: impl FnOnce(),
    ) -> Result<(), PauseError> {
        let mut state = lock(&self.state);
        if state.paused {
            return Err(PauseError::AlreadyPaused);
        }
        state.paused = true;
        // Before the kicks: a vCPU that sees its kick also sees the gate closed.
        self.closed.store(true, Ordering::SeqCst);
        let kicked = state.vcpus.iter().try_for_each(|&tid| {
            kick(tid).map_err(|err| PauseError::Kick {
                tid,
                reason: err.to_string(),
            })
        });
        let result = match kicked {
            Err(err) => Err(err),
            Ok(()) => {
                let (waited, timed_out) = self
                    .changed
                    .wait_timeout_while(state, timeout, |s| s.parked < s.vcpus.len())
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                state = waited;
                if timed_out.timed_out() {
                    Err(PauseError::Timeout {
                        running: state.vcpus.len() - state.parked,
                        vcpus: state.vcpus.len(),
                        waited: timeout,
                    })
                } else {
                    // Under the lock: no resume comes between the parking and this.
                    stopped();
                    Ok(())
                }
            }
        };
        if result.is_err() {
            self.open(&mut state);
        }
        result
    }

    /// Resumes a paused VM: calls `resuming` while every vCPU is still parked, then every
    /// parked vCPU goes back into the guest. A VM that is not paused is left alone, and
    /// `resuming` not called.
    pub fn resume(&self, resuming: impl FnOnce()) -> Result<(), PauseError> {
        let mut state = lock(&self.state);
        if !state.paused {
            return Err(PauseError::NotPaused);
        }
        // Under the lock: a parked vCPU leaves only once it can take it and sees the gate open.
        resuming();
        self.open(&mut state);
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.state).paused
    }

    fn open(&self, state: &mut State) {
        state.paused = false;
        self.closed.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::thread;
    use std::time::Instant;

    use super::*;

    /// A fake vCPU: counts "guest instructions" between passes of the gate until `stop`.
    fn spawn_vcpu(
        gate: &Arc<PauseGate>,
        tid: i32,
        progress: &Arc<AtomicU64>,
        stop: &Arc<AtomicBool>,
    ) -> thread::JoinHandle<()> {
        gate.enter(tid);
        let (gate, progress, stop) = (gate.clone(), progress.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                gate.pass();
                progress.fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_micros(100));
            }
            gate.leave(tid);
        })
    }

    /// A vCPU that leaves its loop when the gate says so, as the real run loop does.
    fn spawn_stoppable_vcpu(gate: &Arc<PauseGate>, tid: i32) -> thread::JoinHandle<()> {
        gate.enter(tid);
        let gate = gate.clone();
        thread::spawn(move || {
            while gate.pass() {
                thread::sleep(Duration::from_micros(100));
            }
            gate.leave(tid);
        })
    }

    #[test]
    fn stopping_sends_running_and_parked_vcpus_out_for_good() {
        for paused_first in [false, true] {
            let gate = Arc::new(PauseGate::default());
            let vcpus: Vec<_> = (0..3).map(|tid| spawn_stoppable_vcpu(&gate, tid)).collect();
            if paused_first {
                gate.pause(|_| Ok(()), Duration::from_secs(5), || {})
                    .unwrap();
            }
            let kicked = Mutex::new(0);
            gate.stop(
                |_| {
                    *lock(&kicked) += 1;
                    Ok(())
                },
                Duration::from_secs(5),
            )
            .unwrap();
            assert_eq!(*lock(&kicked), 3);
            for vcpu in vcpus {
                vcpu.join().unwrap();
            }
            assert!(!gate.pass(), "nothing enters the guest again");
        }
    }

    #[test]
    fn pausing_parks_every_vcpu_until_resumed_and_progress_stops_meanwhile() {
        let gate = Arc::new(PauseGate::default());
        let progress = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let vcpus: Vec<_> = (0..3)
            .map(|tid| spawn_vcpu(&gate, tid, &progress, &stop))
            .collect();
        let kicked = Mutex::new(Vec::new());
        gate.pause(
            |tid| {
                lock(&kicked).push(tid);
                Ok(())
            },
            Duration::from_secs(5),
            || {},
        )
        .unwrap();
        assert_eq!(*lock(&kicked), [0, 1, 2], "every vCPU is kicked once");
        assert!(gate.is_paused());
        assert_eq!(lock(&gate.state).parked, 3);
        let before = progress.load(Ordering::SeqCst);
        thread::sleep(Duration::from_millis(50));
        assert_eq!(progress.load(Ordering::SeqCst), before, "no vCPU ran");

        assert_eq!(
            gate.pause(|_| Ok(()), Duration::from_secs(1), || {}),
            Err(PauseError::AlreadyPaused)
        );
        gate.resume(|| {}).unwrap();
        assert!(!gate.is_paused());
        let deadline = Instant::now() + Duration::from_secs(5);
        while progress.load(Ordering::SeqCst) < before + 30 {
            assert!(Instant::now() < deadline, "the vCPUs did not run again");
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(gate.resume(|| {}), Err(PauseError::NotPaused));

        stop.store(true, Ordering::SeqCst);
        vcpus.into_iter().for_each(|v| v.join().unwrap());
        assert!(lock(&gate.state).vcpus.is_empty());
    }

    /// What is done with the VM stopped (the guest's clock) happens once per pause, after the
    /// last vCPU parked, and once per resume, before any vCPU runs; a refused pause or resume
    /// does nothing.
    #[test]
    fn the_stopped_and_resuming_hooks_run_once_with_every_vcpu_parked() {
        let gate = Arc::new(PauseGate::default());
        let progress = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let vcpus: Vec<_> = (0..2)
            .map(|tid| spawn_vcpu(&gate, tid, &progress, &stop))
            .collect();
        let calls = Mutex::new(Vec::new());
        let record =
            |what: &'static str| lock(&calls).push((what, progress.load(Ordering::SeqCst)));
        for round in 0..2 {
            gate.pause(|_| Ok(()), Duration::from_secs(5), || record("stopped"))
                .unwrap();
            let paused_at = progress.load(Ordering::SeqCst);
            gate.pause(
                |_| Ok(()),
                Duration::from_secs(1),
                || record("stopped again"),
            )
            .unwrap_err();
            thread::sleep(Duration::from_millis(20));
            gate.resume(|| record("resuming")).unwrap();
            gate.resume(|| record("resumed again")).unwrap_err();
            assert_eq!(
                lock(&calls)[round * 2..],
                [("stopped", paused_at), ("resuming", paused_at)],
                "round {round}: no vCPU ran between the two"
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while progress.load(Ordering::SeqCst) < paused_at + 10 {
                assert!(Instant::now() < deadline, "the vCPUs did not run again");
                thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(lock(&calls).len(), 4);
        stop.store(true, Ordering::SeqCst);
        vcpus.into_iter().for_each(|v| v.join().unwrap());
    }

    #[test]
    fn a_vcpu_that_does_not_stop_in_time_fails_the_pause_and_the_vm_runs_on() {
        let gate = Arc::new(PauseGate::default());
        // Thread 7 entered the loop but never passes the gate (stuck outside the guest).
        gate.enter(7);
        let err = gate
            .pause(
                |_| Ok(()),
                Duration::from_millis(20),
                || panic!("the VM did not stop"),
            )
            .unwrap_err();
        assert_eq!(
            err,
            PauseError::Timeout {
                running: 1,
                vcpus: 1,
                waited: Duration::from_millis(20)
            }
        );
        assert!(err
            .to_string()
            .contains("1 of 1 vCPUs did not stop within 20 ms"));
        assert!(!gate.is_paused(), "the gate opened again");
        assert!(!gate.closed.load(Ordering::SeqCst));
        // A vCPU that leaves (the guest stopped) is not waited for.
        gate.leave(7);
        gate.pause(|_| Ok(()), Duration::from_millis(20), || {})
            .unwrap();
        gate.resume(|| {}).unwrap();
    }

    #[test]
    fn a_failed_kick_fails_the_pause() {
        let gate = PauseGate::default();
        gate.enter(3);
        let err = gate
            .pause(
                |_| Err(std::io::Error::from_raw_os_error(libc::ESRCH)),
                Duration::from_secs(1),
                || panic!("the VM did not stop"),
            )
            .unwrap_err();
        assert!(matches!(err, PauseError::Kick { tid: 3, .. }), "{err}");
        assert!(!gate.is_paused());
        gate.pass();
    }

    #[test]
    fn a_vcpu_leaving_during_a_pause_ends_the_wait() {
        let gate = Arc::new(PauseGate::default());
        gate.enter(1);
        let leaver = {
            let gate = gate.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(30));
                gate.leave(1);
            })
        };
        let started = Instant::now();
        gate.pause(|_| Ok(()), Duration::from_secs(10), || {})
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        leaver.join().unwrap();
        gate.resume(|| {}).unwrap();
    }
}
