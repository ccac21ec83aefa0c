//! Descriptor chains seen as byte streams, with every access checked and translated.
//!
//! Devices never trust a descriptor: addresses go through [`GuestMemory::get_slices`] with the
//! access the device is about to make, so an IOMMU (or the end of guest RAM) can refuse it, and
//! all slices of a transfer are obtained before any byte moves, so a refused buffer leaves guest
//! memory untouched.

use virtio_iommu::Footprint;
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::BS;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileSlice,
};

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
    /// The window is in more pieces (RAM regions, IOMMU mappings) than the caller takes.
    #[error("access is split into more than {0} pieces")]
    TooFragmented(usize),
}

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Buffer {
    pub(crate) addr: GuestAddress,
    pub(crate) len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub(crate) writable: bool,
}

/// What a chain may be: whether the driver may use indirect tables (it accepted
/// `VIRTIO_RING_F_INDIRECT_DESC`), and how many descriptors it may have in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChainRules {
    pub(crate) indirect: bool,
    pub(crate) max_descriptors: u16,
}

/// Why a chain was not taken as it is: each is a driver error, and the chain is returned
/// unused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ChainError {
    #[error("it refers to an indirect table, which was not negotiated")]
    IndirectNotNegotiated,
    #[error("it has an indirect table that is malformed, nested or not last")]
    BadIndirectTable,
    #[error("it has more than the {0} descriptors a request may have")]
    TooLong(u16),
    #[error("it loops or leaves its descriptor table")]
    Broken,
    #[error("its buffers add up to more than 4 GiB")]
    TooLarge,
    #[error("a descriptor cannot be read")]
    Unreadable,
}

/// A chain the driver made available, read and checked: its head, to return it, and its
/// buffers in chain order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Chain {
    pub(crate) head: u16,
    pub(crate) buffers: Vec<Buffer>,
}

impl Chain {
    /// The I/O addresses a transfer of this chain may touch: its buffers.
    pub(crate) fn footprint(&self) -> Footprint {
        Footprint::of(
            self.buffers
                .iter()
                .map(|buffer| (buffer.addr.0, u64::from(buffer.len))),
        )
    }
}

/// Reads the chain at `head` of the descriptor table at `table` (`size` entries), following
/// one indirect table where `rules` allow it, and refusing a chain longer than `rules` allow
/// before it is all read.
///
/// virtio-queue's `DescriptorChain` follows indirect tables whatever was negotiated and
/// bounds a chain only by its table (an indirect table has up to 65535 entries, reusable by
/// every head): a driver could make each request hold a megabyte of descriptors. So the walk
/// is done here, with the same checks plus those two.
pub(crate) fn walk<M: GuestMemory>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
    rules: ChainRules,
) -> Result<Chain, ChainError> {
    const DESCRIPTOR: u64 = std::mem::size_of::<Descriptor>() as u64;
    let (mut table, mut size, mut index) = (table, size, head);
    // Descriptors each table may still yield: a chain visits each entry at most once.
    let mut ttl = size;
    let mut indirect = false;
    let mut total = 0u32;
    let mut buffers = Vec::new();
    loop {
        if index >= size || ttl == 0 {
            return Err(ChainError::Broken);
        }
        ttl -= 1;
        let at = table
            .checked_add(u64::from(index) * DESCRIPTOR)
            .ok_or(ChainError::Broken)?;
        let desc: Descriptor = mem.read_obj(at).map_err(|_| ChainError::Unreadable)?;
        if desc.refers_to_indirect_table() {
            if !rules.indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
            // One level, as the last descriptor, a whole number of entries (virtio 1.2
            // §2.7.5.3.1).
            let entries = u64::from(desc.len()) / DESCRIPTOR;
            if indirect
                || desc.has_next()
                || u64::from(desc.len()) % DESCRIPTOR != 0
                || entries == 0
                || entries > u64::from(u16::MAX)
            {
                return Err(ChainError::BadIndirectTable);
            }
            (table, size, index, indirect) = (desc.addr(), entries as u16, 0, true);
            ttl = size;
            continue;
        }
        if buffers.len() == usize::from(rules.max_descriptors) {
            return Err(ChainError::TooLong(rules.max_descriptors));
        }
        total = total.checked_add(desc.len()).ok_or(ChainError::TooLarge)?;
        buffers.push(Buffer {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        });
        if !desc.has_next() {
            return Ok(Chain { head, buffers });
        }
        index = desc.next();
    }
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
    offset: u64,
    len: u64,
    access: Permissions,
) -> Result<Vec<Slice<'a, M>>, AccessError> {
    slices_at_most(mem, buffers, offset, len, access, usize::MAX)
}

/// [`slices`], failing once the window needs more than `max` pieces (what the caller holds
/// per request is then bounded whatever the guest's mappings look like).
pub(crate) fn slices_at_most<'a, M: GuestMemory>(
    mem: &'a M,
    buffers: &[Buffer],
    mut offset: u64,
    mut len: u64,
    access: Permissions,
    max: usize,
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
            if out.len() == max {
                return Err(AccessError::TooFragmented(max));
            }
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
