//! Feeds arbitrary descriptor layouts and request bytes through the request queue, then
//! exercises translation and the event queue with the resulting state.
//!
//! Input layout: byte 0 = descriptor count (1..=16); then 8 bytes per descriptor
//! (addr selector u16, len u16, flags u8, next u8, 2 bytes of translate probes); the rest is
//! copied to the data area the descriptors point into. Addresses may fall outside guest RAM.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_iommu::{
    Access, EndpointConfig, EndpointIommu, ExternalMapper, IommuConfig, MapPerms, MapperError,
    VirtioIommu,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};

const DATA: u64 = 0x1_0000;
const MEM_SIZE: usize = 0x2_0000;
const QUEUE_SIZE: u16 = 16;

/// A mapper that fails every `period`-th call, to drive the rollback paths.
struct FlakyMapper {
    calls: AtomicU32,
    period: u32,
}

impl FlakyMapper {
    fn call(&self) -> Result<(), MapperError> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        if n % self.period == self.period - 1 {
            Err(MapperError::NoResources)
        } else {
            Ok(())
        }
    }
}

impl ExternalMapper for FlakyMapper {
    fn map(&self, _: u64, _: u64, _: u64, _: MapPerms) -> Result<(), MapperError> {
        self.call()
    }
    fn unmap(&self, _: u64, _: u64) -> Result<(), MapperError> {
        self.call()
    }
    fn set_identity(&self, _: bool) -> Result<(), MapperError> {
        self.call()
    }
}

/// One input; any byte string is valid.
pub fn run(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % QUEUE_SIZE as u8) + 1;
    if rest.len() < n * 8 {
        return;
    }
    let (descs, payload) = rest.split_at(n * 8);

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let payload = &payload[..payload.len().min(MEM_SIZE - DATA as usize)];
    mem.write_slice(payload, GuestAddress(DATA)).unwrap();

    let dev = Arc::new(
        VirtioIommu::new(IommuConfig {
            max_mappings_per_domain: 64,
            max_domains: 4,
            ..Default::default()
        })
        .unwrap(),
    );
    for ep in 0..3 {
        dev.add_endpoint(ep, EndpointConfig::default()).unwrap();
    }
    // Endpoint 3 mirrors into a mapper failing every 2nd..9th call (chosen by the input).
    let mapper = Arc::new(FlakyMapper {
        calls: AtomicU32::new(0),
        period: u32::from(n as u8 % 8) + 2,
    });
    let _ = dev.add_endpoint(
        3,
        EndpointConfig {
            reserved_regions: None,
            mapper: Some(mapper),
        },
    );
    dev.ack_features(dev.features());

    let mut raw = Vec::with_capacity(n);
    let mut probes = Vec::with_capacity(n);
    for d in descs.chunks_exact(8) {
        let addr = DATA + u64::from(u16::from_le_bytes([d[0], d[1]])) * 4;
        let len = u32::from(u16::from_le_bytes([d[2], d[3]]));
        raw.push(RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            u16::from(d[4] & 0x7),
            u16::from(d[5]) % QUEUE_SIZE,
        )));
        probes.push(u64::from(u16::from_le_bytes([d[6], d[7]])) << 12);
    }
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    if vq.add_desc_chains(&raw, 0).is_err() {
        return;
    }
    let Ok(mut q) = vq.create_queue::<Queue>() else {
        return;
    };
    let _ = dev.process_request_queue(&mem, &mut q);

    // Whatever state the requests built must translate without panicking.
    let iommu_mem = IommuMemory::new(
        mem.clone(),
        EndpointIommu::new(dev.clone(), 0).unwrap(),
        true,
        (),
    );
    for (i, iova) in probes.into_iter().enumerate() {
        let ep = i as u32 % 5;
        let _ = dev.translate(ep, iova, 0x2000, Access::Write);
        let mut b = [0u8; 8];
        let _ = iommu_mem.read_slice(&mut b, GuestAddress(iova));
    }

    // Drain faults into an event queue made of the same descriptors.
    let evq = MockSplitQueue::create(&mem, GuestAddress(0x8000), QUEUE_SIZE);
    if evq.add_desc_chains(&raw, 0).is_ok() {
        if let Ok(mut q) = evq.create_queue::<Queue>() {
            let _ = dev.process_event_queue(&mem, &mut q);
        }
    }
    let _ = dev.stats();
    dev.reset();
}
