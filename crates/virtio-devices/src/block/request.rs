//! A descriptor chain read as a virtio-blk request (virtio 1.2 §5.2.6): validated in full,
//! status byte included, and its buffers translated, before any data moves.

use std::io;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_iommu::Footprint;
use vm_device::warn_limited;
use vm_memory::{GuestAddress, Permissions};

use super::image::Disk;
use super::{ID_LEN, MAX_DISCARD_SECTORS, SECTOR_SIZE};
use crate::buffers::{self, AccessError, Buffer, Chain, Slice};
use crate::DeviceMemory;

/// Most pieces (RAM regions, IOMMU mappings) one request's data may be in: what a queue holds
/// in flight in all is bounded by its own budget, which a request alone must fit.
pub(super) const MAX_SEGMENTS: usize = 1 << 16;

/// `struct virtio_blk_req` header: type, reserved (ioprio), sector.
const HEADER_LEN: u64 = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
const SEGMENT_LEN: u64 = 16;

/// A host address inside guest memory that the request was granted (translated with the
/// access it is used for, under the request's `DmaGuard`).
#[derive(Clone, Copy, Debug)]
pub(super) struct GuestPtr(pub(super) *mut u8);

// SAFETY: a plain address into guest RAM, which the worker's memory handle keeps mapped; the
// request holding it is moved between threads only as part of the worker, never shared.
unsafe impl Send for GuestPtr {}

/// A stretch of guest memory one transfer reads or writes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Segment {
    pub(super) ptr: GuestPtr,
    pub(super) len: usize,
}

impl Segment {
    fn of<M: vm_memory::GuestMemory>(slice: &Slice<'_, M>) -> Self {
        Segment {
            // With the mmap backend a slice's pointer is its address in the mapping, valid
            // as long as the memory is; the guard only exists for mappings made per access.
            ptr: GuestPtr(slice.ptr_guard_mut().as_ptr()),
            len: slice.len(),
        }
    }
}

/// What a request asks of the image.
#[derive(Debug)]
pub(super) enum Action {
    /// Nothing left to do (GET_ID, or a refused request): complete with `status`, `written`
    /// data bytes in the chain.
    Done {
        status: u8,
        written: u32,
    },
    /// Fill `segments` (device-writable, `len` bytes in all) from the image at `offset`.
    Read {
        offset: u64,
        segments: Vec<Segment>,
        len: u64,
    },
    /// Write `segments` (device-readable) to the image at `offset`.
    Write {
        offset: u64,
        segments: Vec<Segment>,
        len: u64,
    },
    Flush,
    /// Deallocate (`zero == false`) or zero `len` bytes at `offset`; `unmap` allows zeroing
    /// by deallocation.
    Discard {
        offset: u64,
        len: u64,
        zero: bool,
        unmap: bool,
    },
}

impl Action {
    /// The pieces of guest memory the request's data is in.
    pub(super) fn segments(&self) -> usize {
        match self {
            Action::Read { segments, .. } | Action::Write { segments, .. } => segments.len(),
            Action::Done { .. } | Action::Flush | Action::Discard { .. } => 0,
        }
    }
}

/// A request ready to carry out.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) status: StatusByte,
    pub(super) action: Action,
}

/// Where a request's status byte is: its address in the device's address space (an I/O
/// virtual address behind the IOMMU), and its host address as translated under the
/// request's `DmaGuard` while it holds one.
#[derive(Clone, Copy, Debug)]
pub(super) struct StatusByte {
    pub(super) at: GuestAddress,
    pub(super) ptr: Option<GuestPtr>,
}

impl StatusByte {
    /// Writes `status`, translating the byte again (under a transfer of its own) if the
    /// request gave its translation up; `false` if it is no longer writable.
    pub(super) fn write<M: DeviceMemory>(&self, mem: &M, status: u8) -> bool {
        let _dma;
        let ptr = match self.ptr {
            Some(ptr) => ptr,
            None => {
                _dma = mem.begin_dma_within(Footprint::of([(self.at.0, 1)]));
                let byte = [Buffer {
                    addr: self.at,
                    len: 1,
                    writable: true,
                }];
                match buffers::slices(mem, &byte, 0, 1, Permissions::Write) {
                    Ok(slices) => Segment::of::<M>(&slices[0]).ptr,
                    Err(err) => {
                        warn_limited!("virtio-blk: status byte at {:#x}: {err}", self.at.0);
                        return false;
                    }
                }
            }
        };
        // SAFETY: the byte was translated for writing under a DmaGuard still held (the
        // request's, or the one just taken), into guest RAM the worker keeps mapped.
        unsafe { ptr.0.write_volatile(status) };
        true
    }
}

/// Why a request failed: an unknown type or flag is unsupported, the rest an I/O error.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error("request is shorter than its header")]
    ShortHeader,
    #[error("a device-readable descriptor follows a device-writable one")]
    Misordered,
    #[error("request carries data in the wrong direction")]
    WrongDirection,
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{count} are beyond the capacity of {capacity}")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("discard/write-zeroes data of {0} bytes is not one segment")]
    Segments(u64),
    #[error("discard/write-zeroes flags {0:#x} are not supported")]
    Flags(u32),
    #[error("discard/write-zeroes of {0} sectors exceeds the maximum of {MAX_DISCARD_SECTORS}")]
    TooManySectors(u32),
    #[error("cannot access the request's buffers: {0}")]
    Buffers(#[from] AccessError),
    #[error("image I/O failed: {0}")]
    Io(#[from] io::Error),
}

impl RequestError {
    pub(super) fn status(&self) -> u8 {
        match self {
            // virtio 1.2 §5.2.6.2: unknown types, unknown flags, UNMAP on a discard, and
            // (this device supports one) more than one segment.
            RequestError::Unsupported(_) | RequestError::Flags(_) | RequestError::Segments(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Reads and validates the request in `chain`. `None` if it has no reachable, device-writable
/// status byte: such a request is not carried out, and is completed with nothing written.
pub(super) fn parse<M: DeviceMemory>(disk: &Disk, mem: &M, chain: &Chain) -> Option<Request> {
    let (head, chain) = (chain.head, &chain.buffers);
    // The status byte is the last byte of the last descriptor, which must be writable.
    let Some(status_desc) = chain.last().filter(|b| b.writable && b.len > 0) else {
        warn_limited!("virtio-blk: request {head} has no writable status byte; dropping it");
        return None;
    };
    let status_offset = u64::from(status_desc.len) - 1;
    // Cannot wrap: `slices` below refuses a descriptor whose range does.
    let status_at = GuestAddress(status_desc.addr.0.wrapping_add(status_offset));
    let status = buffers::slices(
        mem,
        std::slice::from_ref(status_desc),
        status_offset,
        1,
        Permissions::Write,
    );
    let Some(status) = status.ok().and_then(|s| s.first().map(Segment::of::<M>)) else {
        warn_limited!("virtio-blk: request {head}: status byte not accessible; dropping it");
        return None;
    };
    let action = action(disk, mem, chain).unwrap_or_else(|err| {
        warn_limited!("virtio-blk: request {head} failed: {err}");
        Action::Done {
            status: err.status(),
            written: 0,
        }
    });
    Some(Request {
        status: StatusByte {
            at: status_at,
            ptr: Some(status.ptr),
        },
        action,
    })
}

/// What a chain whose last descriptor holds the status byte asks for.
fn action<M: DeviceMemory>(disk: &Disk, mem: &M, chain: &[Buffer]) -> Result<Action, RequestError> {
    let split = chain.iter().position(|b| b.writable).unwrap_or(chain.len());
    let (readable, writable) = chain.split_at(split);
    if writable.iter().any(|b| !b.writable) {
        return Err(RequestError::Misordered);
    }
    let out_len = buffers::total_len(readable);
    // The status byte (checked by the caller) is not data.
    let in_len = buffers::total_len(writable).saturating_sub(1);
    if out_len < HEADER_LEN {
        return Err(RequestError::ShortHeader);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    buffers::read_into(mem, readable, 0, &mut header)?;
    let request_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let out_data = out_len - HEADER_LEN;

    let writes = |request_type| {
        matches!(
            request_type,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
        )
    };
    if writes(request_type) && disk.readonly {
        return Err(RequestError::ReadOnly);
    }
    match request_type {
        VIRTIO_BLK_T_IN => {
            if out_data != 0 {
                return Err(RequestError::WrongDirection);
            }
            let offset = check_range(disk, sector, in_len)?;
            let segments = segments(mem, writable, 0, in_len, Permissions::Write)?;
            Ok(Action::Read {
                offset,
                segments,
                len: in_len,
            })
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            let offset = check_range(disk, sector, out_data)?;
            let segments = segments(mem, readable, HEADER_LEN, out_data, Permissions::Read)?;
            Ok(Action::Write {
                offset,
                segments,
                len: out_data,
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Action::Flush),
        VIRTIO_BLK_T_GET_ID => {
            let len = ID_LEN.min(usize::try_from(in_len).unwrap_or(ID_LEN));
            buffers::write_from(mem, writable, 0, &disk.serial[..len])?;
            Ok(Action::Done {
                status: VIRTIO_BLK_S_OK as u8,
                written: len as u32,
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if in_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            if out_data != SEGMENT_LEN {
                return Err(RequestError::Segments(out_data));
            }
            let mut segment = [0u8; SEGMENT_LEN as usize];
            buffers::read_into(mem, readable, HEADER_LEN, &mut segment)?;
            let sector = u64::from_le_bytes(segment[0..8].try_into().unwrap());
            let sectors = u32::from_le_bytes(segment[8..12].try_into().unwrap());
            let flags = u32::from_le_bytes(segment[12..16].try_into().unwrap());
            let zero = request_type == VIRTIO_BLK_T_WRITE_ZEROES;
            // Discard knows no flag; write-zeroes knows UNMAP.
            let known = if zero {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !known != 0 {
                return Err(RequestError::Flags(flags));
            }
            if sectors > MAX_DISCARD_SECTORS {
                return Err(RequestError::TooManySectors(sectors));
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let offset = check_range(disk, sector, len)?;
            Ok(Action::Discard {
                offset,
                len,
                zero,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            })
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// The host addresses of `len` bytes of `buffers` from `offset` on, each translated for
/// `access`: all of them, or an error before anything moved.
fn segments<M: DeviceMemory>(
    mem: &M,
    buffers: &[Buffer],
    offset: u64,
    len: u64,
    access: Permissions,
) -> Result<Vec<Segment>, AccessError> {
    Ok(
        buffers::slices_at_most(mem, buffers, offset, len, access, MAX_SEGMENTS)?
            .iter()
            .map(Segment::of::<M>)
            .collect(),
    )
}

/// Checks that `len` bytes at `sector` are whole sectors inside the disk; returns the byte
/// offset in the image.
fn check_range(disk: &Disk, sector: u64, len: u64) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(len));
    }
    let count = len / SECTOR_SIZE;
    match sector.checked_add(count) {
        // capacity <= u64::MAX / 512, so the byte offset cannot overflow.
        Some(end) if end <= disk.capacity => Ok(sector * SECTOR_SIZE),
        _ => Err(RequestError::OutOfRange {
            sector,
            count,
            capacity: disk.capacity,
        }),
    }
}
