//! Wire format of the virtio-iommu device (virtio v1.2, §5.13): constants, request and
//! response layouts, the fault record, probe properties and the config space.
//!
//! Everything here is plain little-endian byte (de)serialisation with explicit offsets, so the
//! layouts are visible in one place and no `unsafe` byte casting is needed. Nothing in this
//! module knows about device state.

/// Feature bit: `input_range` in the config space is valid.
pub const VIRTIO_IOMMU_F_INPUT_RANGE: u32 = 0;
/// Feature bit: `domain_range` in the config space is valid.
pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u32 = 1;
/// Feature bit: MAP and UNMAP requests are available.
pub const VIRTIO_IOMMU_F_MAP_UNMAP: u32 = 2;
/// Legacy feature bit superseded by BYPASS_CONFIG; never offered by this device.
pub const VIRTIO_IOMMU_F_BYPASS: u32 = 3;
/// Feature bit: PROBE requests are available.
pub const VIRTIO_IOMMU_F_PROBE: u32 = 4;
/// Feature bit: the MAP flag MMIO is available.
pub const VIRTIO_IOMMU_F_MMIO: u32 = 5;
/// Feature bit: the `bypass` config field and the ATTACH flag BYPASS are available.
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u32 = 6;

/// Request type ATTACH.
pub const VIRTIO_IOMMU_T_ATTACH: u8 = 1;
/// Request type DETACH.
pub const VIRTIO_IOMMU_T_DETACH: u8 = 2;
/// Request type MAP.
pub const VIRTIO_IOMMU_T_MAP: u8 = 3;
/// Request type UNMAP.
pub const VIRTIO_IOMMU_T_UNMAP: u8 = 4;
/// Request type PROBE.
pub const VIRTIO_IOMMU_T_PROBE: u8 = 5;

/// ATTACH flag: the domain is a bypass domain.
pub const VIRTIO_IOMMU_ATTACH_F_BYPASS: u32 = 1 << 0;
/// MAP flag: endpoints may read the range.
pub const VIRTIO_IOMMU_MAP_F_READ: u32 = 1 << 0;
/// MAP flag: endpoints may write the range.
pub const VIRTIO_IOMMU_MAP_F_WRITE: u32 = 1 << 1;
/// MAP flag: the range is device memory (only with VIRTIO_IOMMU_F_MMIO).
pub const VIRTIO_IOMMU_MAP_F_MMIO: u32 = 1 << 2;

/// Probe property type terminating the list.
pub const VIRTIO_IOMMU_PROBE_T_NONE: u16 = 0;
/// Probe property type RESV_MEM.
pub const VIRTIO_IOMMU_PROBE_T_RESV_MEM: u16 = 1;
/// RESV_MEM subtype: addresses that must not be mapped.
pub const VIRTIO_IOMMU_RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: MSI doorbell region.
pub const VIRTIO_IOMMU_RESV_MEM_T_MSI: u8 = 1;

/// Fault reason: internal error or anything not covered by the other reasons.
pub const VIRTIO_IOMMU_FAULT_R_UNKNOWN: u8 = 0;
/// Fault reason: access by an endpoint not attached to a domain.
pub const VIRTIO_IOMMU_FAULT_R_DOMAIN: u8 = 1;
/// Fault reason: address not mapped or mapped without the needed permission.
pub const VIRTIO_IOMMU_FAULT_R_MAPPING: u8 = 2;
/// Fault flag: the faulting access was a read.
pub const VIRTIO_IOMMU_FAULT_F_READ: u32 = 1 << 0;
/// Fault flag: the faulting access was a write.
pub const VIRTIO_IOMMU_FAULT_F_WRITE: u32 = 1 << 1;
/// Fault flag: `address` is valid.
pub const VIRTIO_IOMMU_FAULT_F_ADDRESS: u32 = 1 << 8;

/// Size of `struct virtio_iommu_req_head`.
pub const HEAD_SIZE: usize = 4;
/// Size of `struct virtio_iommu_req_tail`.
pub const TAIL_SIZE: usize = 4;
/// Device-readable size of an ATTACH request (head included).
pub const ATTACH_SIZE: usize = HEAD_SIZE + 16;
/// Device-readable size of a DETACH request (head included).
pub const DETACH_SIZE: usize = HEAD_SIZE + 16;
/// Device-readable size of a MAP request (head included).
pub const MAP_SIZE: usize = HEAD_SIZE + 32;
/// Device-readable size of an UNMAP request (head included).
pub const UNMAP_SIZE: usize = HEAD_SIZE + 24;
/// Device-readable size of a PROBE request (head included).
pub const PROBE_SIZE: usize = HEAD_SIZE + 4 + 64;
/// Largest device-readable part of any known request.
pub const MAX_REQUEST_SIZE: usize = PROBE_SIZE;
/// Size of `struct virtio_iommu_fault`.
pub const FAULT_SIZE: usize = 24;
/// Size of a probe property header.
pub const PROPERTY_HEADER_SIZE: usize = 4;
/// Size of a RESV_MEM property, header included.
pub const RESV_MEM_PROPERTY_SIZE: usize = PROPERTY_HEADER_SIZE + 20;
/// Size of `struct virtio_iommu_config`.
pub const CONFIG_SIZE: usize = 40;
/// Offset of `bypass` in the config space, the only driver-writable field.
pub const CONFIG_BYPASS_OFFSET: usize = 36;

/// Request status codes (`virtio_iommu_req_tail.status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// Request succeeded.
    Ok = 0,
    /// Virtio communication error.
    IoErr = 1,
    /// Unsupported request.
    Unsupp = 2,
    /// Internal device error.
    DevErr = 3,
    /// Invalid parameters.
    Inval = 4,
    /// Out-of-range parameters.
    Range = 5,
    /// Entry not found.
    NoEnt = 6,
    /// Bad address.
    Fault = 7,
    /// Insufficient resources.
    NoMem = 8,
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// ATTACH request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachRequest {
    /// Domain to attach to (created if absent).
    pub domain: u32,
    /// Endpoint being attached.
    pub endpoint: u32,
    /// `VIRTIO_IOMMU_ATTACH_F_*` flags.
    pub flags: u32,
    /// Must be zero; a non-zero value makes the device answer INVAL.
    pub reserved: [u8; 4],
}

/// DETACH request body (its reserved bytes are ignored by the device, so not kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetachRequest {
    /// Domain the endpoint is expected to be attached to.
    pub domain: u32,
    /// Endpoint being detached.
    pub endpoint: u32,
}

/// MAP request body. The IOVA range is inclusive: `[virt_start, virt_end]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRequest {
    /// Target domain.
    pub domain: u32,
    /// First IOVA of the mapping.
    pub virt_start: u64,
    /// Last IOVA of the mapping (inclusive).
    pub virt_end: u64,
    /// Guest-physical address `virt_start` maps to.
    pub phys_start: u64,
    /// `VIRTIO_IOMMU_MAP_F_*` flags.
    pub flags: u32,
}

/// UNMAP request body. The IOVA range is inclusive; reserved bytes are ignored (spec: MAY).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmapRequest {
    /// Target domain.
    pub domain: u32,
    /// First IOVA of the range.
    pub virt_start: u64,
    /// Last IOVA of the range (inclusive).
    pub virt_end: u64,
}

/// PROBE request body (reserved padding is ignored by the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeRequest {
    /// Endpoint whose properties are requested.
    pub endpoint: u32,
}

/// A decoded request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// ATTACH.
    Attach(AttachRequest),
    /// DETACH.
    Detach(DetachRequest),
    /// MAP.
    Map(MapRequest),
    /// UNMAP.
    Unmap(UnmapRequest),
    /// PROBE.
    Probe(ProbeRequest),
}

/// Why the device-readable part could not be decoded into a [`Request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than a request head: the type is unknown.
    NoHead,
    /// The type byte names no known request.
    UnknownType(u8),
    /// Known type, but the readable part is shorter or longer than that type's layout.
    BadSize {
        /// Request type from the head.
        kind: u8,
        /// Bytes the layout requires.
        expected: usize,
        /// Bytes the driver provided.
        actual: usize,
    },
}

/// Device-readable size of a request of type `kind`, if the type is known.
pub fn request_size(kind: u8) -> Option<usize> {
    match kind {
        VIRTIO_IOMMU_T_ATTACH => Some(ATTACH_SIZE),
        VIRTIO_IOMMU_T_DETACH => Some(DETACH_SIZE),
        VIRTIO_IOMMU_T_MAP => Some(MAP_SIZE),
        VIRTIO_IOMMU_T_UNMAP => Some(UNMAP_SIZE),
        VIRTIO_IOMMU_T_PROBE => Some(PROBE_SIZE),
        _ => None,
    }
}

impl Request {
    /// Decode the whole device-readable part of a request (head included). The reserved bytes
    /// of the head are ignored, as the spec requires.
    pub fn decode(bytes: &[u8]) -> Result<Request, DecodeError> {
        if bytes.len() < HEAD_SIZE {
            return Err(DecodeError::NoHead);
        }
        let kind = bytes[0];
        let expected = request_size(kind).ok_or(DecodeError::UnknownType(kind))?;
        if bytes.len() != expected {
            return Err(DecodeError::BadSize {
                kind,
                expected,
                actual: bytes.len(),
            });
        }
        let b = &bytes[HEAD_SIZE..];
        Ok(match kind {
            VIRTIO_IOMMU_T_ATTACH => Request::Attach(AttachRequest {
                domain: le32(b, 0),
                endpoint: le32(b, 4),
                flags: le32(b, 8),
                reserved: [b[12], b[13], b[14], b[15]],
            }),
            VIRTIO_IOMMU_T_DETACH => Request::Detach(DetachRequest {
                domain: le32(b, 0),
                endpoint: le32(b, 4),
            }),
            VIRTIO_IOMMU_T_MAP => Request::Map(MapRequest {
                domain: le32(b, 0),
                virt_start: le64(b, 4),
                virt_end: le64(b, 12),
                phys_start: le64(b, 20),
                flags: le32(b, 28),
            }),
            VIRTIO_IOMMU_T_UNMAP => Request::Unmap(UnmapRequest {
                domain: le32(b, 0),
                virt_start: le64(b, 4),
                virt_end: le64(b, 12),
            }),
            _ => Request::Probe(ProbeRequest {
                endpoint: le32(b, 0),
            }),
        })
    }

    /// Encode the device-readable part, as a driver would (tests, fuzzing, tools).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(MAX_REQUEST_SIZE);
        match self {
            Request::Attach(r) => {
                v.extend_from_slice(&[VIRTIO_IOMMU_T_ATTACH, 0, 0, 0]);
                v.extend_from_slice(&r.domain.to_le_bytes());
                v.extend_from_slice(&r.endpoint.to_le_bytes());
                v.extend_from_slice(&r.flags.to_le_bytes());
                v.extend_from_slice(&r.reserved);
            }
            Request::Detach(r) => {
                v.extend_from_slice(&[VIRTIO_IOMMU_T_DETACH, 0, 0, 0]);
                v.extend_from_slice(&r.domain.to_le_bytes());
                v.extend_from_slice(&r.endpoint.to_le_bytes());
                v.extend_from_slice(&[0; 8]);
            }
            Request::Map(r) => {
                v.extend_from_slice(&[VIRTIO_IOMMU_T_MAP, 0, 0, 0]);
                v.extend_from_slice(&r.domain.to_le_bytes());
                v.extend_from_slice(&r.virt_start.to_le_bytes());
                v.extend_from_slice(&r.virt_end.to_le_bytes());
                v.extend_from_slice(&r.phys_start.to_le_bytes());
                v.extend_from_slice(&r.flags.to_le_bytes());
            }
            Request::Unmap(r) => {
                v.extend_from_slice(&[VIRTIO_IOMMU_T_UNMAP, 0, 0, 0]);
                v.extend_from_slice(&r.domain.to_le_bytes());
                v.extend_from_slice(&r.virt_start.to_le_bytes());
                v.extend_from_slice(&r.virt_end.to_le_bytes());
                v.extend_from_slice(&[0; 4]);
            }
            Request::Probe(r) => {
                v.extend_from_slice(&[VIRTIO_IOMMU_T_PROBE, 0, 0, 0]);
                v.extend_from_slice(&r.endpoint.to_le_bytes());
                v.extend_from_slice(&[0; 64]);
            }
        }
        v
    }
}

/// Encode a request tail: status then three zeroed reserved bytes.
pub fn encode_tail(status: Status) -> [u8; TAIL_SIZE] {
    [status as u8, 0, 0, 0]
}

/// A reserved IOVA region reported to the driver with a RESV_MEM probe property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservedRegion {
    /// `VIRTIO_IOMMU_RESV_MEM_T_*` subtype.
    pub subtype: u8,
    /// First reserved IOVA.
    pub start: u64,
    /// Last reserved IOVA (inclusive).
    pub end: u64,
}

impl ReservedRegion {
    /// The x86 MSI doorbell window, which the driver must leave unmapped so interrupts work.
    pub const X86_MSI: ReservedRegion = ReservedRegion {
        subtype: VIRTIO_IOMMU_RESV_MEM_T_MSI,
        start: 0xfee0_0000,
        end: 0xfeef_ffff,
    };

    /// Append this region as a RESV_MEM property.
    pub fn encode_property(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&VIRTIO_IOMMU_PROBE_T_RESV_MEM.to_le_bytes());
        out.extend_from_slice(
            &((RESV_MEM_PROPERTY_SIZE - PROPERTY_HEADER_SIZE) as u16).to_le_bytes(),
        );
        out.extend_from_slice(&[self.subtype, 0, 0, 0]);
        out.extend_from_slice(&self.start.to_le_bytes());
        out.extend_from_slice(&self.end.to_le_bytes());
    }

    /// Decode the properties area of a PROBE response, as a driver would. Stops at a NONE
    /// property or at the end; ignores unknown types and malformed trailing bytes.
    pub fn decode_properties(props: &[u8]) -> Vec<ReservedRegion> {
        let mut regions = Vec::new();
        let mut off = 0usize;
        while off + PROPERTY_HEADER_SIZE <= props.len() {
            let kind = le16(props, off) & 0xfff;
            let len = usize::from(le16(props, off + 2));
            if kind == VIRTIO_IOMMU_PROBE_T_NONE {
                break;
            }
            let value = off + PROPERTY_HEADER_SIZE;
            if kind == VIRTIO_IOMMU_PROBE_T_RESV_MEM && len >= 20 && value + 20 <= props.len() {
                regions.push(ReservedRegion {
                    subtype: props[value],
                    start: le64(props, value + 4),
                    end: le64(props, value + 12),
                });
            }
            off = value + len;
        }
        regions
    }
}

/// A FAULT record written to the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// `VIRTIO_IOMMU_FAULT_R_*` reason.
    pub reason: u8,
    /// `VIRTIO_IOMMU_FAULT_F_*` flags.
    pub flags: u32,
    /// Faulting endpoint.
    pub endpoint: u32,
    /// Faulting address, valid when `flags` has `VIRTIO_IOMMU_FAULT_F_ADDRESS`.
    pub address: u64,
}

impl FaultRecord {
    /// Wire encoding; reserved fields are zero as the spec asks.
    pub fn encode(&self) -> [u8; FAULT_SIZE] {
        let mut b = [0u8; FAULT_SIZE];
        b[0] = self.reason;
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.endpoint.to_le_bytes());
        b[16..24].copy_from_slice(&self.address.to_le_bytes());
        b
    }

    /// Decode a record (driver side; used by tests and tools).
    pub fn decode(b: &[u8; FAULT_SIZE]) -> FaultRecord {
        FaultRecord {
            reason: b[0],
            flags: le32(b, 4),
            endpoint: le32(b, 8),
            address: le64(b, 16),
        }
    }
}

/// `struct virtio_iommu_config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigSpace {
    /// Supported page sizes; the lowest set bit is the mapping granule.
    pub page_size_mask: u64,
    /// Inclusive IOVA range the device translates.
    pub input_range: (u64, u64),
    /// Inclusive range of valid domain IDs.
    pub domain_range: (u32, u32),
    /// Size of the properties area of PROBE requests.
    pub probe_size: u32,
    /// Whether unattached endpoints bypass translation (0 or 1).
    pub bypass: u8,
}

impl ConfigSpace {
    /// Wire encoding of the whole config space.
    pub fn encode(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..8].copy_from_slice(&self.page_size_mask.to_le_bytes());
        b[8..16].copy_from_slice(&self.input_range.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.input_range.1.to_le_bytes());
        b[24..28].copy_from_slice(&self.domain_range.0.to_le_bytes());
        b[28..32].copy_from_slice(&self.domain_range.1.to_le_bytes());
        b[32..36].copy_from_slice(&self.probe_size.to_le_bytes());
        b[CONFIG_BYPASS_OFFSET] = self.bypass;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_sizes_match_the_spec_layouts() {
        // head(4) + domain, endpoint, flags, reserved[4]
        assert_eq!(ATTACH_SIZE, 20);
        // head(4) + domain, endpoint, reserved[8]
        assert_eq!(DETACH_SIZE, 20);
        // head(4) + domain(4) + virt_start(8) + virt_end(8) + phys_start(8) + flags(4)
        assert_eq!(MAP_SIZE, 36);
        // head(4) + domain(4) + virt_start(8) + virt_end(8) + reserved[4]
        assert_eq!(UNMAP_SIZE, 28);
        // head(4) + endpoint(4) + reserved[64]
        assert_eq!(PROBE_SIZE, 72);
    }

    #[test]
    fn map_roundtrip_is_little_endian() {
        let req = Request::Map(MapRequest {
            domain: 0x0102_0304,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0xa000,
            flags: VIRTIO_IOMMU_MAP_F_READ,
        });
        let bytes = req.encode();
        assert_eq!(bytes.len(), MAP_SIZE);
        assert_eq!(&bytes[0..8], &[3, 0, 0, 0, 4, 3, 2, 1]);
        assert_eq!(&bytes[8..16], &0x1000u64.to_le_bytes());
        assert_eq!(Request::decode(&bytes), Ok(req));
    }

    #[test]
    fn every_request_roundtrips() {
        let reqs = [
            Request::Attach(AttachRequest {
                domain: 1,
                endpoint: 8,
                flags: 1,
                reserved: [0, 0, 0, 9],
            }),
            Request::Detach(DetachRequest {
                domain: 1,
                endpoint: 8,
            }),
            Request::Unmap(UnmapRequest {
                domain: 7,
                virt_start: 0,
                virt_end: u64::MAX,
            }),
            Request::Probe(ProbeRequest { endpoint: 0x10 }),
        ];
        for r in reqs {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn decode_rejects_short_long_and_unknown() {
        assert_eq!(Request::decode(&[1, 0]), Err(DecodeError::NoHead));
        assert_eq!(
            Request::decode(&[9, 0, 0, 0]),
            Err(DecodeError::UnknownType(9))
        );
        let mut attach = Request::Attach(AttachRequest {
            domain: 1,
            endpoint: 2,
            flags: 0,
            reserved: [0; 4],
        })
        .encode();
        assert!(matches!(
            Request::decode(&attach[..19]),
            Err(DecodeError::BadSize {
                expected: 20,
                actual: 19,
                ..
            })
        ));
        attach.push(0);
        assert!(matches!(
            Request::decode(&attach),
            Err(DecodeError::BadSize { actual: 21, .. })
        ));
    }

    #[test]
    fn fault_and_property_encoding() {
        let f = FaultRecord {
            reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
            flags: VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS,
            endpoint: 0x18,
            address: 0xdead_b000,
        };
        let b = f.encode();
        assert_eq!(b[0], 2);
        assert_eq!(&b[1..4], &[0, 0, 0]);
        assert_eq!(&b[12..16], &[0, 0, 0, 0]);
        assert_eq!(FaultRecord::decode(&b), f);

        let mut props = Vec::new();
        ReservedRegion::X86_MSI.encode_property(&mut props);
        assert_eq!(props.len(), RESV_MEM_PROPERTY_SIZE);
        assert_eq!(&props[0..4], &[1, 0, 20, 0]);
        props.resize(64, 0);
        assert_eq!(
            ReservedRegion::decode_properties(&props),
            vec![ReservedRegion::X86_MSI]
        );
    }

    #[test]
    fn config_layout_offsets() {
        let c = ConfigSpace {
            page_size_mask: 0x1000,
            input_range: (1, 2),
            domain_range: (3, 4),
            probe_size: 5,
            bypass: 1,
        };
        let b = c.encode();
        assert_eq!(b[1], 0x10);
        assert_eq!(b[8], 1);
        assert_eq!(b[16], 2);
        assert_eq!(b[24], 3);
        assert_eq!(b[28], 4);
        assert_eq!(b[32], 5);
        assert_eq!(b[36], 1);
        assert_eq!(&b[37..], &[0, 0, 0]);
    }
}
