//! The virtio-vsock packet header (virtio 1.2 §5.10.6), which `virtio-bindings` does not
//! carry: 44 little-endian bytes ahead of every packet's payload, in both directions.

/// Bytes of [`Header`] on the wire.
pub(crate) const HEADER_LEN: usize = 44;
/// The host's address, the only peer a guest reaches through this device.
pub(crate) const HOST_CID: u64 = 2;
/// Stream sockets, the only type offered (no `VIRTIO_VSOCK_F_SEQPACKET`).
pub(crate) const TYPE_STREAM: u16 = 1;
/// `SHUTDOWN` flags: the sender will receive no more, send no more.
pub(crate) const SHUTDOWN_RCV: u32 = 1;
pub(crate) const SHUTDOWN_SEND: u32 = 2;
pub(crate) const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// What a packet is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    fn code(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }

    fn from_code(code: u16) -> Option<Op> {
        Some(match code {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`. `op` is kept raw: a guest may send any value, and an unknown
/// one is answered (with a reset), not dropped at parse time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) src_cid: u64,
    pub(crate) dst_cid: u64,
    pub(crate) src_port: u32,
    pub(crate) dst_port: u32,
    /// Payload bytes after the header.
    pub(crate) len: u32,
    pub(crate) kind: u16,
    pub(crate) op: u16,
    pub(crate) flags: u32,
    /// The sender's receive buffer, and how much of it its reader has consumed so far: the
    /// credit the receiver of this header may use (§5.10.6.3).
    pub(crate) buf_alloc: u32,
    pub(crate) fwd_cnt: u32,
}

impl Header {
    /// A stream header of `op` with no payload; the caller fills in the rest.
    pub(crate) fn new(op: Op) -> Self {
        Header {
            kind: TYPE_STREAM,
            op: op.code(),
            ..Default::default()
        }
    }

    pub(crate) fn op(&self) -> Option<Op> {
        Op::from_code(self.op)
    }

    pub(crate) fn parse(bytes: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        out[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        out[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        out[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..30].copy_from_slice(&self.kind.to_le_bytes());
        out[30..32].copy_from_slice(&self.op.to_le_bytes());
        out[32..36].copy_from_slice(&self.flags.to_le_bytes());
        out[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        out[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_at_the_offsets_the_spec_gives() {
        let header = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1111_2222,
            dst_port: 1024,
            len: 4096,
            kind: TYPE_STREAM,
            op: Op::Rw.code(),
            flags: SHUTDOWN_SEND,
            buf_alloc: 256 << 10,
            fwd_cnt: 7,
        };
        let bytes = header.encode();
        assert_eq!(bytes[0], 3);
        assert_eq!(bytes[8], 2);
        assert_eq!(&bytes[20..24], &1024u32.to_le_bytes());
        assert_eq!(&bytes[28..32], &[1, 0, 5, 0]);
        assert_eq!(&bytes[40..44], &7u32.to_le_bytes());
        assert_eq!(Header::parse(&bytes), header);
        assert_eq!(header.op(), Some(Op::Rw));
        assert_eq!(Header { op: 0, ..header }.op(), None);
        assert_eq!(Header { op: 8, ..header }.op(), None);
    }
}
