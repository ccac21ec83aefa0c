//! What devices count for the VMM's `vm.counters`, under Cloud Hypervisor's names: relaxed
//! atomics in a struct the device and its worker threads share with the VMM, which reads it
//! while the device runs, without stopping or asking it.
//!
//! Only what completed is counted, and only the bytes that moved: a refused request, a
//! failed read or a dropped frame adds nothing. A counter only grows, from the device's
//! creation on (across resets by the driver), and nothing is ordered by it: a reader sees
//! each counter at some recent value, not all of them at one instant.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters a device keeps, by name; read by the VMM ([`crate::VirtioDevice::counters`]).
pub trait DeviceCounters: Send + Sync {
    /// Every counter, by name, now.
    fn read(&self) -> Vec<(&'static str, u64)>;
}

/// One counter, added to by whichever thread did the work.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// virtio-blk: one set per disk, fed by every queue's thread. Bytes are data bytes (no
/// header, no status byte).
#[derive(Debug, Default)]
pub(crate) struct BlockCounters {
    pub(crate) read_bytes: Counter,
    pub(crate) write_bytes: Counter,
    pub(crate) read_ops: Counter,
    /// Under write-through, a write counts once it is also stable.
    pub(crate) write_ops: Counter,
    pub(crate) flush_ops: Counter,
    pub(crate) discard_ops: Counter,
    pub(crate) write_zeroes_ops: Counter,
    /// `fdatasync`s warden asked of the host to make completed requests stable: FLUSHes,
    /// and under write-through each write, discard and zeroing.
    pub(crate) host_syncs: Counter,
}

impl DeviceCounters for BlockCounters {
    fn read(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("read_bytes", self.read_bytes.get()),
            ("write_bytes", self.write_bytes.get()),
            ("read_ops", self.read_ops.get()),
            ("write_ops", self.write_ops.get()),
            ("flush_ops", self.flush_ops.get()),
            ("discard_ops", self.discard_ops.get()),
            ("write_zeroes_ops", self.write_zeroes_ops.get()),
            ("host_syncs", self.host_syncs.get()),
        ]
    }
}

/// virtio-net: bytes are the Ethernet frames', without the virtio-net header (what crosses
/// the tap's wire side, as Cloud Hypervisor counts them).
#[derive(Debug, Default)]
pub(crate) struct NetCounters {
    /// Delivered into the guest's receive buffers.
    pub(crate) rx_bytes: Counter,
    pub(crate) rx_frames: Counter,
    /// Bytes of delivered frames (headers included) copied from the bounce buffer because
    /// they did not fit the chains held when the frame was read; the rest went from the tap
    /// straight into the guest's buffers.
    pub(crate) rx_bounced_bytes: Counter,
    /// Taken by the tap.
    pub(crate) tx_bytes: Counter,
    pub(crate) tx_frames: Counter,
}

impl DeviceCounters for NetCounters {
    fn read(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("rx_bytes", self.rx_bytes.get()),
            ("rx_frames", self.rx_frames.get()),
            ("rx_bounced_bytes", self.rx_bounced_bytes.get()),
            ("tx_bytes", self.tx_bytes.get()),
            ("tx_frames", self.tx_frames.get()),
        ]
    }
}

/// virtio-rng: entropy bytes written into the guest's buffers.
#[derive(Debug, Default)]
pub(crate) struct RngCounters {
    pub(crate) bytes: Counter,
}

impl DeviceCounters for RngCounters {
    fn read(&self) -> Vec<(&'static str, u64)> {
        vec![("bytes", self.bytes.get())]
    }
}

/// virtio-iommu's request queue: requests answered, and the notifications that brought some
/// of them. The driver spins on each request until it is answered, so a request that needed a
/// notification cost the guest a VM exit; the rest were found by polling, in parallel with it.
#[derive(Debug, Default)]
pub(crate) struct IommuQueueCounters {
    pub(crate) requests: Counter,
    pub(crate) notifications: Counter,
}

impl DeviceCounters for IommuQueueCounters {
    fn read(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("requests", self.requests.get()),
            ("notifications", self.notifications.get()),
        ]
    }
}

/// virtio-fs: what warden sees of a share whose back end does the work: how often the back
/// end went away, and the guest's requests answered with `ENOTCONN` meanwhile.
#[derive(Debug, Default)]
pub(crate) struct FsCounters {
    pub(crate) backend_lost: Counter,
    pub(crate) failed_requests: Counter,
}

impl DeviceCounters for FsCounters {
    fn read(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("backend_lost", self.backend_lost.get()),
            ("failed_requests", self.failed_requests.get()),
        ]
    }
}

/// virtio-vsock: packets and stream bytes each way (`rx` towards the guest, `tx` from it, as
/// for a net), connections opened either way, and connections warden ended with a reset (the
/// stream over, a rule broken, a host socket failed).
#[derive(Debug, Default)]
pub(crate) struct VsockCounters {
    pub(crate) rx_bytes: Counter,
    pub(crate) rx_packets: Counter,
    pub(crate) tx_bytes: Counter,
    pub(crate) tx_packets: Counter,
    pub(crate) connections: Counter,
    pub(crate) resets: Counter,
}

impl DeviceCounters for VsockCounters {
    fn read(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("rx_bytes", self.rx_bytes.get()),
            ("rx_packets", self.rx_packets.get()),
            ("tx_bytes", self.tx_bytes.get()),
            ("tx_packets", self.tx_packets.get()),
            ("connections", self.connections.get()),
            ("resets", self.resets.get()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    /// Workers on several threads add to one set; the reader sees the sum, under each name.
    #[test]
    fn additions_from_many_threads_all_count() {
        let counters = Arc::new(BlockCounters::default());
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let counters = Arc::clone(&counters);
                thread::spawn(move || {
                    for _ in 0..1000 {
                        counters.read_ops.add(1);
                        counters.read_bytes.add(512);
                    }
                })
            })
            .collect();
        workers.into_iter().for_each(|w| w.join().unwrap());
        counters.write_zeroes_ops.add(2);
        let read = counters.read();
        assert_eq!(
            read,
            [
                ("read_bytes", 4000 * 512),
                ("write_bytes", 0),
                ("read_ops", 4000),
                ("write_ops", 0),
                ("flush_ops", 0),
                ("discard_ops", 0),
                ("write_zeroes_ops", 2),
                ("host_syncs", 0),
            ]
        );
    }
}
