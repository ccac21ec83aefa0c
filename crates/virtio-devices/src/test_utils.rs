//! Driver-side helpers for tests: real split queues laid out in guest memory.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::iommu::{Error as IommuError, IotlbIterator, IovaRange};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Iommu, IommuMemory, Iotlb,
    Permissions,
};

use virtio_iommu::inflight::InflightDma;
use virtio_iommu::{DmaFence, DmaGuard, FaultReason, Footprint, MappedBlock, MappingLookup};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::buffers::{self, Chain, ChainRules};
use crate::VirtioInterrupt;

/// Guest RAM for tests: 1 MiB at 0. The driver's rings sit at the bottom, so buffers go at
/// 0x10000 and above.
pub(crate) fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// Polls `done` for up to five seconds; whether it became true.
pub(crate) fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// One buffer of a chain as the driver builds it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Desc {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) writable: bool,
}

/// A buffer the device reads.
pub(crate) fn ro(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: false,
    }
}

/// A buffer the device writes.
pub(crate) fn wo(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: true,
    }
}

/// The driver side of one split queue, laid out as virtio 1.2 §2.7 has it: the descriptor
/// table at `base`, the available ring after it, the used ring after that (4-aligned). Not
/// virtio-queue's `MockSplitQueue`, whose used ring starts inside its available ring.
pub(crate) struct Driver<'a, M: GuestMemory> {
    mem: &'a M,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    size: u16,
    /// Device side used by [`Driver::chain`] to hand chains straight to request handlers.
    device_side: Queue,
}

impl<'a, M: GuestMemory> Driver<'a, M> {
    /// Lays out a queue of `size` entries at guest address `base`, its rings zeroed.
    pub(crate) fn new(mem: &'a M, base: u64, size: u16) -> Self {
        let entries = u64::from(size);
        let desc = GuestAddress(base);
        let avail = desc.unchecked_add(16 * entries);
        let used = GuestAddress((avail.0 + 6 + 2 * entries).next_multiple_of(4));
        let end = used.0 + 6 + 8 * entries;
        mem.write_slice(&vec![0u8; (end - avail.0) as usize], avail)
            .unwrap();
        let mut driver = Driver {
            mem,
            desc,
            avail,
            used,
            next_desc: 0,
            size,
            device_side: Queue::new(size).unwrap(),
        };
        driver.device_side = driver.queue();
        driver
    }

    /// Makes `descs` available and pops them as the device would, for calling a device's
    /// per-chain handler directly.
    pub(crate) fn chain(&mut self, descs: &[Desc]) -> Chain {
        self.add(descs);
        let head = self
            .device_side
            .pop_descriptor_chain(self.mem)
            .unwrap()
            .head_index();
        let rules = ChainRules {
            indirect: true,
            max_descriptors: self.size,
        };
        buffers::walk(self.mem, self.desc, self.size, head, rules).unwrap()
    }

    /// A device-side queue configured the way the transport would hand it over.
    pub(crate) fn queue(&self) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        let split = |addr: GuestAddress| (Some(addr.0 as u32), Some((addr.0 >> 32) as u32));
        let (lo, hi) = split(self.desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        queue.set_used_ring_address(lo, hi);
        queue.set_ready(true);
        queue
    }

    /// Activates single-queue `dev` on this queue with `features` accepted, as the transport
    /// would; returns the queue's notifier and the interrupt the device raises.
    pub(crate) fn activate(
        &self,
        dev: &mut dyn crate::VirtioDevice,
        features: u64,
    ) -> (EventFd, Arc<FakeInterrupt>) {
        let notifier = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(FakeInterrupt::default());
        dev.ack_features(features);
        dev.activate(
            vec![crate::ActivatedQueue {
                index: 0,
                queue: self.queue(),
                notifier: notifier.try_clone().unwrap(),
            }],
            interrupt.clone(),
        )
        .unwrap();
        (notifier, interrupt)
    }

    /// Makes `descs` available as one chain; returns its head index.
    pub(crate) fn add(&mut self, descs: &[Desc]) -> u16 {
        // Descriptors are reused from the table's start once it is used up, as a driver
        // reuses those the device returned.
        if usize::from(self.next_desc) + descs.len() > usize::from(self.size) {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let next = if last { 0 } else { head + i as u16 + 1 };
            self.write_desc(self.desc, head + i as u16, d, !last, next);
        }
        self.publish(head);
        self.next_desc += descs.len() as u16;
        head
    }

    /// Makes available one descriptor pointing at an indirect table of `descs`, written at
    /// guest address `table` (virtio 1.2 §2.7.5.3); returns its head index.
    pub(crate) fn add_indirect(&mut self, table: u64, descs: &[Desc]) -> u16 {
        for (i, d) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let next = if last { 0 } else { i as u16 + 1 };
            self.write_desc(GuestAddress(table), i as u16, d, !last, next);
        }
        if self.next_desc >= self.size {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        let raw = Descriptor::new(
            table,
            16 * descs.len() as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        self.mem
            .write_obj(
                RawDescriptor::from(raw),
                self.desc.unchecked_add(16 * u64::from(head)),
            )
            .unwrap();
        self.publish(head);
        self.next_desc += 1;
        head
    }

    fn write_desc(&self, table: GuestAddress, index: u16, d: &Desc, more: bool, next: u16) {
        let mut flags = if d.writable { VRING_DESC_F_WRITE } else { 0 } as u16;
        if more {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let raw = RawDescriptor::from(Descriptor::new(d.addr, d.len, flags, next));
        self.mem
            .write_obj(raw, table.unchecked_add(16 * u64::from(index)))
            .unwrap();
    }

    /// Puts `head` in the available ring's next entry and publishes it.
    fn publish(&self, head: u16) {
        let idx = self.avail_idx();
        let entry = self.avail.unchecked_add(4 + 2 * u64::from(idx % self.size));
        self.mem.write_obj(head, entry).unwrap();
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// Entries the device put in the used ring so far, as (head, len).
    pub(crate) fn used(&self) -> Vec<(u32, u32)> {
        let count: u16 = self.mem.read_obj(self.used.unchecked_add(2)).unwrap();
        (0..count)
            .map(|i| {
                let at = self.used.unchecked_add(4 + 8 * u64::from(i % self.size));
                let elem: VirtqUsedElem = self.mem.read_obj(at).unwrap();
                (elem.id(), elem.len())
            })
            .collect()
    }

    /// The used ring's flags: `VRING_USED_F_NO_NOTIFY` while the device asks for no
    /// notifications.
    pub(crate) fn used_flags(&self) -> u16 {
        self.mem.read_obj(self.used).unwrap()
    }

    /// The driver's available index: how many chains it made available so far.
    pub(crate) fn avail_idx(&self) -> u16 {
        self.mem.read_obj(self.avail.unchecked_add(2)).unwrap()
    }

    /// Sets the available index without making chains available, as a broken driver would.
    pub(crate) fn set_avail_idx(&self, value: u16) {
        self.mem
            .write_obj(value, self.avail.unchecked_add(2))
            .unwrap();
    }

    /// `avail_event` (EVENT_IDX): the device wants a notification once the available index
    /// passes it.
    pub(crate) fn avail_event(&self) -> u16 {
        let addr = self.used.unchecked_add(4 + 8 * u64::from(self.size));
        self.mem.read_obj(addr).unwrap()
    }

    /// Sets `used_event` (EVENT_IDX): the driver wants an interrupt once the used index passes it.
    pub(crate) fn set_used_event(&self, value: u16) {
        let addr = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
        self.mem.write_obj(value, addr).unwrap();
    }
}

/// Records the interrupts a device raises.
#[derive(Default)]
pub(crate) struct FakeInterrupt {
    queue_counts: Mutex<Vec<usize>>,
    changed: Condvar,
    needs_reset: AtomicUsize,
}

impl FakeInterrupt {
    /// How many times the device reported that it needs a reset.
    pub(crate) fn needs_reset_count(&self) -> usize {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// How many times queue `index` was signalled.
    pub(crate) fn count(&self, index: usize) -> usize {
        self.queue_counts
            .lock()
            .unwrap()
            .get(index)
            .copied()
            .unwrap_or(0)
    }

    /// Waits up to five seconds for queue `index` to have been signalled `at_least` times.
    pub(crate) fn wait_for(&self, index: usize, at_least: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut counts = self.queue_counts.lock().unwrap();
        loop {
            if counts.get(index).copied().unwrap_or(0) >= at_least {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            counts = self.changed.wait_timeout(counts, deadline - now).unwrap().0;
        }
    }
}

impl VirtioInterrupt for FakeInterrupt {
    fn notify_queue(&self, queue_index: usize) -> io::Result<()> {
        let mut counts = self.queue_counts.lock().unwrap();
        if counts.len() <= queue_index {
            counts.resize(queue_index + 1, 0);
        }
        counts[queue_index] += 1;
        self.changed.notify_all();
        Ok(())
    }

    fn notify_config(&self) -> io::Result<()> {
        Ok(())
    }

    fn needs_reset(&self) -> io::Result<()> {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// An IOMMU that translates only what the test mapped, like a guest that mapped its DMA buffers
/// through the virtual IOMMU and nothing else.
#[derive(Debug, Default)]
pub(crate) struct TestIommu {
    iotlb: RwLock<Iotlb>,
    pub(crate) dma: Arc<InflightDma>,
    /// Translations of buffers (at or above [`BUFFERS_START`]) made while no transfer was in
    /// flight: an access an UNMAP would not have waited for.
    pub(crate) unguarded: AtomicUsize,
}

/// Where [`Driver`]'s rings end and tests' buffers begin.
pub(crate) const BUFFERS_START: u64 = 0x1_0000;

impl DmaFence for TestIommu {
    fn begin_dma(&self, footprint: Footprint) -> DmaGuard {
        self.dma.begin(footprint)
    }
}

/// Whole mappings are the pages the test mapped, one at a time, with the rights asked for.
impl MappingLookup for TestIommu {
    fn with_mapping(
        &self,
        iova: u64,
        read: bool,
        write: bool,
        fill: &mut dyn FnMut(MappedBlock),
    ) -> Result<(), FaultReason> {
        let page = iova & !0xfff;
        let access = match (read, write) {
            (true, true) => Permissions::ReadWrite,
            (false, true) => Permissions::Write,
            _ => Permissions::Read,
        };
        let refused = FaultReason::Mapping;
        let mut pieces = self
            .translate(GuestAddress(page), 0x1000, access)
            .map_err(|_| refused)?;
        let piece = pieces.next().ok_or(refused)?;
        fill(MappedBlock {
            first: page,
            last: page + 0xfff,
            gpa: piece.base.0,
            read,
            write,
        });
        Ok(())
    }
}

impl TestIommu {
    /// Maps `len` bytes at I/O virtual address `iova` to guest-physical `phys` with `perm`.
    pub(crate) fn map(&self, iova: u64, phys: u64, len: usize, perm: Permissions) {
        self.iotlb
            .write()
            .unwrap()
            .set_mapping(GuestAddress(iova), GuestAddress(phys), len, perm)
            .unwrap();
    }
}

impl Iommu for TestIommu {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let last = iova.0.saturating_add(length.max(1) as u64 - 1);
        if iova.0 >= BUFFERS_START && !self.dma.touched(iova.0, last) {
            self.unguarded.fetch_add(1, Ordering::SeqCst);
        }
        Iotlb::lookup(self.iotlb.read().unwrap(), iova, length, access).map_err(|fails| {
            IommuError::CannotResolve {
                iova_range: IovaRange { base: iova, length },
                reason: format!("not mapped for {access:?}: {fails:?}"),
            }
        })
    }
}

/// Memory seen through [`TestIommu`], with the bottom 64 KiB (where [`Driver`] puts its rings)
/// identity-mapped read-write and nothing else.
pub(crate) fn iommu_memory() -> IommuMemory<GuestMemoryMmap, TestIommu> {
    let mem = IommuMemory::new(guest_memory(), TestIommu::default(), true, ());
    mem.iommu()
        .map(0, 0, BUFFERS_START as usize, Permissions::ReadWrite);
    mem
}
