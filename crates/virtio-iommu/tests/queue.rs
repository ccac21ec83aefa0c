//! Request and event queues end to end through virtio-queue: descriptor layouts, used
//! lengths, out-of-RAM buffers and fault delivery.

mod common;

use common::*;
use virtio_iommu::protocol::*;
use virtio_iommu::{Access, IommuConfig, Status};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const NEXT: u16 = 1;
const WRITE: u16 = 2;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// Descriptors for chains given as lists of (addr, len, writable).
fn chains(list: &[&[(u64, u32, bool)]]) -> Vec<RawDescriptor> {
    let mut out = Vec::new();
    for chain in list {
        for (i, &(addr, len, w)) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let flags = if w { WRITE } else { 0 } | if last { 0 } else { NEXT };
            let next = if last { 0 } else { out.len() as u16 + 1 };
            out.push(RawDescriptor::from(SplitDescriptor::new(
                addr, len, flags, next,
            )));
        }
    }
    out
}

fn used(vq: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let e = vq.used().ring().ref_at(i).unwrap().load();
    (e.id(), e.len())
}

#[test]
fn requests_split_across_descriptors() {
    let mem = memory();
    let d = device();
    let attach = Request::Attach(AttachRequest {
        domain: 3,
        endpoint: 1,
        flags: 0,
        reserved: [0; 4],
    })
    .encode();
    let map = Request::Map(MapRequest {
        domain: 3,
        virt_start: 0x1000,
        virt_end: 0x1fff,
        phys_start: 0x8000,
        flags: RW,
    })
    .encode();
    // ATTACH in 3 pieces (1 + 7 + 12 bytes) and a plain tail.
    mem.write_slice(&attach[..1], GuestAddress(0x1_0000))
        .unwrap();
    mem.write_slice(&attach[1..8], GuestAddress(0x1_0100))
        .unwrap();
    mem.write_slice(&attach[8..], GuestAddress(0x1_0200))
        .unwrap();
    // MAP in one piece plus an empty descriptor, tail split 1 + 3.
    mem.write_slice(&map, GuestAddress(0x2_0000)).unwrap();
    let descs = chains(&[
        &[
            (0x1_0000, 1, false),
            (0x1_0100, 7, false),
            (0x1_0200, 12, false),
            (0x1_1000, 4, true),
        ],
        &[
            (0x2_0000, 36, false),
            (0x2_0800, 0, false),
            (0x2_1000, 1, true),
            (0x2_2000, 3, true),
        ],
    ]);
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    mem.write_obj(0xffu8, GuestAddress(0x1_1000)).unwrap();
    assert!(d.process_request_queue(&mem, &mut q).unwrap());
    assert_eq!(used(&vq, 0), (0, 4));
    assert_eq!(used(&vq, 1), (4, 4));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1_1000)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2_1000)).unwrap(), 0);
    assert_eq!(d.endpoint_domain(1), Some(3));
    assert!(d.translate(1, 0x1000, 4, Access::Read).is_ok());
    // Nothing more to do: no interrupt.
    assert!(!d.process_request_queue(&mem, &mut q).unwrap());
}

#[test]
fn bad_layouts_and_out_of_ram_buffers() {
    let mem = memory();
    let d = device();
    let attach = Request::Attach(AttachRequest {
        domain: 1,
        endpoint: 1,
        flags: 0,
        reserved: [0; 4],
    })
    .encode();
    mem.write_slice(&attach, GuestAddress(0x1_0000)).unwrap();
    mem.write_slice(&[0xee; 4], GuestAddress(0x3_0000)).unwrap();
    let descs = chains(&[
        // readable after writable: untouched
        &[
            (0x1_0000, 10, false),
            (0x3_0000, 4, true),
            (0x1_000a, 10, false),
        ],
        // readable part outside guest RAM: FAULT
        &[
            (0x1_0000, 10, false),
            (0x4000_0000, 10, false),
            (0x3_1000, 4, true),
        ],
        // tail outside guest RAM: untouched
        &[(0x1_0000, 20, false), (0x4000_0000, 4, true)],
        // no writable part: untouched
        &[(0x1_0000, 20, false)],
        // short request: INVAL
        &[(0x1_0000, 19, false), (0x3_2000, 4, true)],
    ]);
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    d.process_request_queue(&mem, &mut q).unwrap();
    assert_eq!(used(&vq, 0).1, 0);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x3_0000)).unwrap(),
        0xeeee_eeee
    );
    assert_eq!(used(&vq, 1).1, 4);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x3_1000)).unwrap(),
        Status::Fault as u8
    );
    assert_eq!(used(&vq, 2).1, 0);
    assert_eq!(used(&vq, 3).1, 0);
    assert_eq!(used(&vq, 4).1, 4);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x3_2000)).unwrap(),
        Status::Inval as u8
    );
    assert_eq!(d.endpoint_domain(1), None, "no request was executed");
}

#[test]
fn probe_through_the_queue() {
    let mem = memory();
    let d = device_with(IommuConfig {
        probe_size: 64,
        ..Default::default()
    });
    let probe = Request::Probe(ProbeRequest { endpoint: 2 }).encode();
    mem.write_slice(&probe, GuestAddress(0x1_0000)).unwrap();
    mem.write_slice(&[0xcc; 68], GuestAddress(0x2_0000))
        .unwrap();
    let descs = chains(&[&[
        (0x1_0000, 72, false),
        (0x2_0000, 30, true),
        (0x2_0100, 38, true),
    ]]);
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    d.process_request_queue(&mem, &mut q).unwrap();
    assert_eq!(used(&vq, 0).1, 68);
    let mut props = vec![0u8; 64];
    mem.read_slice(&mut props[..30], GuestAddress(0x2_0000))
        .unwrap();
    mem.read_slice(&mut props[30..], GuestAddress(0x2_0100))
        .unwrap();
    assert_eq!(
        ReservedRegion::decode_properties(&props),
        vec![ReservedRegion::X86_MSI]
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x2_0100 + 34)).unwrap(),
        Status::Ok as u8
    );
}

#[test]
fn faults_are_delivered_to_event_buffers() {
    let mem = memory();
    let d = device_with(IommuConfig {
        boot_bypass: false,
        ..Default::default()
    });
    assert!(d.translate(1, 0x5000, 4, Access::Write).is_err());
    assert!(d.translate(2, 0x6000, 4, Access::Read).is_err());
    let vq = MockSplitQueue::new(&mem, 16);
    // First buffer too small (kept fault), second split in two, third whole.
    let descs = chains(&[
        &[(0x3_0000, 16, true)],
        &[(0x3_1000, 10, true), (0x3_2000, 14, true)],
        &[(0x3_3000, 24, true)],
        &[(0x3_4000, 24, true)],
    ]);
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(d.process_event_queue(&mem, &mut q).unwrap());
    assert_eq!(used(&vq, 0).1, 0);
    assert_eq!(used(&vq, 1).1, 24);
    assert_eq!(used(&vq, 2).1, 24);
    assert_eq!(d.pending_faults(), 0);
    assert_eq!(q.next_avail(), 3, "fourth buffer kept for later faults");
    let mut rec = [0u8; FAULT_SIZE];
    mem.read_slice(&mut rec[..10], GuestAddress(0x3_1000))
        .unwrap();
    mem.read_slice(&mut rec[10..], GuestAddress(0x3_2000))
        .unwrap();
    let f = FaultRecord::decode(&rec);
    assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_DOMAIN);
    assert_eq!((f.endpoint, f.address), (1, 0x5000));
    assert_eq!(
        f.flags,
        VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS
    );
    mem.read_slice(&mut rec, GuestAddress(0x3_3000)).unwrap();
    assert_eq!(FaultRecord::decode(&rec).endpoint, 2);
    // No pending fault: buffers stay with the device.
    assert!(!d.process_event_queue(&mem, &mut q).unwrap());
    assert_eq!(q.next_avail(), 3);
}
