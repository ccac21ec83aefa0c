//! Descriptor chains seen as byte streams, with every access checked and translated.
//!
//! Devices never trust a descriptor: addresses go through [`GuestMemory::get_slices`] with the
//! access the device is about to make, so an IOMMU (or the end of guest RAM) can refuse it, and
//! all slices of a transfer are obtained before any byte moves, so a refused buffer leaves guest
//! memory untouched.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BS;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileSlice};

/// Why a chain's buffers could not be accessed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AccessError {
    /// The requested window goes past the end of the chain's buffers.
    #[error("access goes past the end of the descriptor chain")]
    OutsideChain,
    /// A descriptor's address range wraps around the address space.
    #[error("descriptor address range wraps around")]
    Wraps,
    /// The memory (or the IOMMU in front of it) refused the access.
    #[error(transparent)]
    Memory(#[from] GuestMemoryError),
}

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Buffer {
    pub(crate) addr: GuestAddress,
    pub(crate) len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub(crate) writable: bool,
}

/// The descriptors of a chain, in chain order.
pub(crate) fn collect<M>(chain: DescriptorChain<M>) -> Vec<Buffer>
where
    M: Deref,
    M::Target: GuestMemory,
{
    chain
        .map(|desc| Buffer {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        })
        .collect()
}

/// Total length of `buffers`; u64 cannot overflow for a chain of at most 2^16 descriptors.
pub(crate) fn total_len(buffers: &[Buffer]) -> u64 {
    buffers.iter().map(|b| u64::from(b.len)).sum()
}

/// A guest memory slice as the memory type `M` hands it out.
pub(crate) type Slice<'a, M> = VolatileSlice<'a, BS<'a, <M as GuestMemory>::Bitmap>>;

/// Slices covering `len` bytes of `buffers`, starting `offset` bytes into them, each obtained
/// for `access`. Fails if the window is not inside the buffers, if an address range wraps, or if
/// any part is not accessible.
pub(crate) fn slices<'a, M: GuestMemory>(
    mem: &'a M,
    buffers: &[Buffer],
    mut offset: u64,
    mut len: u64,
    access: Permissions,
) -> Result<Vec<Slice<'a, M>>, AccessError> {
    let mut out = Vec::new();
    for buffer in buffers {
        if len == 0 {
            break;
        }
        let buffer_len = u64::from(buffer.len);
        if offset >= buffer_len {
            offset -= buffer_len;
            continue;
        }
        let count = (buffer_len - offset).min(len);
        let start = buffer
            .addr
            .0
            .checked_add(offset)
            .filter(|start| start.checked_add(count).is_some())
            .ok_or(AccessError::Wraps)?;
        // `count` fits in usize: it is at most a u32 descriptor length.
        for slice in mem.get_slices(GuestAddress(start), count as usize, access)? {
            out.push(slice?);
        }
        offset = 0;
        len -= count;
    }
    if len != 0 {
        return Err(AccessError::OutsideChain);
    }
    Ok(out)
}

/// Copies `buf.len()` bytes starting `offset` bytes into `buffers` (device-readable) into `buf`.
pub(crate) fn read_into<M: GuestMemory>(
    mem: &M,
    buffers: &[Buffer],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), AccessError> {
    let mut done = 0;
    for slice in slices(mem, buffers, offset, buf.len() as u64, Permissions::Read)? {
        done += slice.copy_to(&mut buf[done..]);
    }
    Ok(())
}

/// Copies `data` into `buffers` (device-writable) starting `offset` bytes into them.
pub(crate) fn write_from<M: GuestMemory>(
    mem: &M,
    buffers: &[Buffer],
    offset: u64,
    data: &[u8],
) -> Result<(), AccessError> {
    let mut done = 0;
    for slice in slices(mem, buffers, offset, data.len() as u64, Permissions::Write)? {
        slice.copy_from(&data[done..]);
        done += slice.len();
    }
    Ok(())
}
