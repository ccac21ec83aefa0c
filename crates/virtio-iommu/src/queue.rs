//! Virtqueue entry points: turning descriptor chains into requests and answers, and fault
//! records into event-queue buffers.
//!
//! A request chain has a device-readable part (the request) followed by a device-writable
//! part (PROBE properties, then the tail). The request may be split across descriptors in any
//! way; the tail is the last four writable bytes.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::device::VirtioIommu;
use crate::protocol::*;

/// Errors that stop queue processing (the queue itself is unusable, not a single request).
#[derive(Debug, Error)]
pub enum Error {
    /// Publishing a used entry or reading the notification state failed.
    #[error("virtqueue error: {0}")]
    Queue(#[from] virtio_queue::Error),
}

/// The descriptor layout of one chain, already checked for direction order.
#[derive(Debug, Default)]
pub struct ChainLayout {
    /// Device-readable buffers, in order.
    pub readable: Vec<(GuestAddress, u32)>,
    /// Device-writable buffers, in order.
    pub writable: Vec<(GuestAddress, u32)>,
}

impl ChainLayout {
    /// Split a chain into its parts; `None` if a readable buffer follows a writable one,
    /// which virtio forbids and which leaves no well-defined request or tail.
    pub fn from_descriptors(descs: impl IntoIterator<Item = Descriptor>) -> Option<Self> {
        let mut layout = ChainLayout::default();
        for d in descs {
            if d.is_write_only() {
                layout.writable.push((d.addr(), d.len()));
            } else if layout.writable.is_empty() {
                layout.readable.push((d.addr(), d.len()));
            } else {
                return None;
            }
        }
        Some(layout)
    }

    fn writable_len(&self) -> u64 {
        self.writable.iter().map(|&(_, l)| u64::from(l)).sum()
    }
}

/// What the device does with one request chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Return the buffers untouched with used length 0 (unparseable request).
    Untouched,
    /// Fill the whole writable part with these bytes (properties, then the tail).
    Write(Vec<u8>),
}

impl VirtioIommu {
    /// Decide the answer to a request given its readable bytes and the writable size.
    ///
    /// `request` holds the readable part, truncated after `MAX_REQUEST_SIZE + 1` bytes (any
    /// longer request is oversized anyway); `readable_ok` is false when some readable buffer
    /// lies outside guest memory. This is the guest-memory-free core of request handling,
    /// used by the queue entry point and directly by tests and fuzzing.
    pub fn answer(&self, request: &[u8], readable_ok: bool, writable_len: u64) -> Answer {
        if writable_len < TAIL_SIZE as u64 {
            return Answer::Untouched;
        }
        let probe_offered = self.config().probe_size > 0;
        let max_writable = TAIL_SIZE as u64 + u64::from(self.config().probe_size);
        let reply = |status: Status| {
            // Never more than probe_size + 4 bytes: bigger buffers were refused below.
            let mut out = vec![0u8; writable_len as usize];
            let n = out.len();
            out[n - TAIL_SIZE..].copy_from_slice(&encode_tail(status));
            Answer::Write(out)
        };
        if !readable_ok {
            if writable_len > max_writable {
                return Answer::Untouched;
            }
            return reply(Status::Fault);
        }
        let Some(&kind) = request.first() else {
            return Answer::Untouched;
        };
        if request.len() < HEAD_SIZE || request_size(kind).is_none() {
            // Spec: an unrecognised type is returned unwritten with used length 0.
            return Answer::Untouched;
        }
        let expected_writable = if kind == VIRTIO_IOMMU_T_PROBE {
            if !probe_offered {
                return Answer::Untouched;
            }
            max_writable
        } else {
            TAIL_SIZE as u64
        };
        if writable_len > expected_writable {
            return Answer::Untouched;
        }
        let req = match Request::decode(request) {
            Ok(r) => r,
            Err(_) => return reply(Status::Inval),
        };
        let props_len = (writable_len - TAIL_SIZE as u64) as usize;
        let (status, props) = self.handle_request(&req, props_len);
        let Answer::Write(mut out) = reply(status) else {
            return Answer::Untouched;
        };
        if status == Status::Ok && props.len() == props_len {
            out[..props_len].copy_from_slice(&props);
        }
        Answer::Write(out)
    }

    /// Handle one request chain whose layout is known: read, answer, write back. Returns
    /// the used length.
    pub fn process_chain<M: GuestMemory + ?Sized>(&self, mem: &M, layout: &ChainLayout) -> u32 {
        let readable_ok = layout
            .readable
            .iter()
            .all(|&(a, l)| mem.check_range(a, l as usize, Permissions::Read));
        let writable_ok = layout
            .writable
            .iter()
            .all(|&(a, l)| mem.check_range(a, l as usize, Permissions::Write));
        if !writable_ok {
            return 0;
        }
        let mut buf = [0u8; MAX_REQUEST_SIZE + 1];
        let mut n = 0;
        let mut read_ok = readable_ok;
        if readable_ok {
            for &(addr, len) in &layout.readable {
                let take = (len as usize).min(buf.len() - n);
                if take > 0 && mem.read_slice(&mut buf[n..n + take], addr).is_err() {
                    read_ok = false;
                    break;
                }
                n += take;
            }
        }
        match self.answer(&buf[..n], read_ok, layout.writable_len()) {
            Answer::Untouched => 0,
            Answer::Write(bytes) => {
                if scatter(mem, &layout.writable, &bytes) {
                    bytes.len() as u32
                } else {
                    0
                }
            }
        }
    }

    /// Serve the request queue: pop the available chains, up to a queue's worth (so a driver
    /// that keeps it full cannot keep the caller here: whoever serves the queue looks again),
    /// execute each, publish the used entry. Returns whether the driver must be interrupted.
    pub fn process_request_queue<M, Q>(&self, mem: &M, queue: &mut Q) -> Result<bool, Error>
    where
        M: GuestMemory,
        Q: QueueT,
    {
        let mut used = false;
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match ChainLayout::from_descriptors(chain) {
                Some(layout) => self.process_chain(mem, &layout),
                None => 0,
            };
            queue.add_used(mem, head, len)?;
            used = true;
        }
        Ok(used && queue.needs_notification(mem)?)
    }

    /// Write pending fault records into event buffers the driver posted, one record per
    /// buffer. Buffers too small for a record (or not writable) are returned with used
    /// length 0 and the record waits for the next one. Returns whether to interrupt.
    pub fn process_event_queue<M, Q>(&self, mem: &M, queue: &mut Q) -> Result<bool, Error>
    where
        M: GuestMemory,
        Q: QueueT,
    {
        let mut used = false;
        while let Some(record) = self.front_fault() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = write_event(mem, chain, &record.encode());
            if written > 0 {
                self.pop_fault();
            }
            queue.add_used(mem, head, written)?;
            used = true;
        }
        Ok(used && queue.needs_notification(mem)?)
    }
}

fn write_event<M, T>(mem: &M, chain: virtio_queue::DescriptorChain<T>, record: &[u8]) -> u32
where
    M: GuestMemory + ?Sized,
    T: Deref,
    T::Target: GuestMemory,
{
    let Some(layout) = ChainLayout::from_descriptors(chain) else {
        return 0;
    };
    let fits = layout.readable.is_empty() && layout.writable_len() >= record.len() as u64;
    let ok = layout
        .writable
        .iter()
        .all(|&(a, l)| mem.check_range(a, l as usize, Permissions::Write));
    if fits && ok && scatter(mem, &layout.writable, record) {
        record.len() as u32
    } else {
        0
    }
}

/// Write `bytes` across the buffers from their start; false on a memory error.
fn scatter<M: GuestMemory + ?Sized>(mem: &M, bufs: &[(GuestAddress, u32)], bytes: &[u8]) -> bool {
    let mut off = 0;
    for &(addr, len) in bufs {
        if off == bytes.len() {
            break;
        }
        let take = (len as usize).min(bytes.len() - off);
        if mem.write_slice(&bytes[off..off + take], addr).is_err() {
            return false;
        }
        off += take;
    }
    off == bytes.len()
}
