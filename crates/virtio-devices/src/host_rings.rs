//! Where a data path outside warden's threads (the kernel's vhost-net, a vhost-user back end)
//! finds a queue's rings: by host address, which it takes on trust.

use net_util::RingAddresses;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::ActivateError;

/// Host addresses of `queue`'s rings in guest RAM. Such a data path writes the used ring at
/// the address it is given for as many entries as the ring has, checking at most that the
/// address is a user one (the kernel) or inside some region of the memory table (a back
/// end): each ring must lie whole inside one RAM region, or it would write past that region's
/// mapping into whatever of warden's memory follows it.
pub(crate) fn host_ring_addresses(
    ram: &GuestMemoryMmap,
    queue: &Queue,
    event_idx: bool,
) -> Result<RingAddresses, ActivateError> {
    let [desc_len, avail_len, used_len] = ring_lengths(queue.size(), event_idx);
    let host = |gpa: u64, len: u64, what: &'static str| {
        let slice = usize::try_from(len)
            .ok()
            .and_then(|len| ram.get_slice(GuestAddress(gpa), len).ok())
            .ok_or(ActivateError::RingOutsideRam {
                ring: what,
                gpa,
                len,
            })?;
        Ok::<u64, ActivateError>(slice.ptr_guard_mut().as_ptr() as u64)
    };
    Ok(RingAddresses {
        desc: host(queue.desc_table(), desc_len, "descriptor table")?,
        avail: host(queue.avail_ring(), avail_len, "available ring")?,
        used: host(queue.used_ring(), used_len, "used ring")?,
    })
}

/// Bytes of a split queue's descriptor table, available ring and used ring for `size`
/// entries (virtio 1.2 §2.7), with the event words EVENT_IDX adds.
pub(crate) fn ring_lengths(size: u16, event_idx: bool) -> [u64; 3] {
    let size = u64::from(size);
    let event = if event_idx { 2 } else { 0 };
    [16 * size, 4 + 2 * size + event, 4 + 8 * size + event]
}
