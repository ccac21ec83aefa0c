//! A virtio-pci device driven from user space through VFIO, behind the guest's IOMMU: its
//! group in a fresh type1 container, DMA buffers mapped and unmapped there (each a MAP or
//! UNMAP request to warden's virtio-iommu), and the modern virtio registers reached through
//! the VFIO regions.

use std::ffi::CString;
use std::fs;
use std::os::raw::c_ulong;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

const VFIO_TYPE: c_ulong = b';' as c_ulong;
const VFIO_BASE: c_ulong = 100;
const fn io(nr: c_ulong) -> c_ulong {
    (VFIO_TYPE << 8) | (VFIO_BASE + nr)
}
const VFIO_GET_API_VERSION: c_ulong = io(0);
const VFIO_SET_IOMMU: c_ulong = io(2);
const VFIO_GROUP_SET_CONTAINER: c_ulong = io(4);
const VFIO_GROUP_GET_DEVICE_FD: c_ulong = io(6);
const VFIO_DEVICE_GET_REGION_INFO: c_ulong = io(8);
const VFIO_IOMMU_MAP_DMA: c_ulong = io(13);
const VFIO_IOMMU_UNMAP_DMA: c_ulong = io(14);
const VFIO_TYPE1V2_IOMMU: c_ulong = 3;
const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;

/// Common configuration offsets (virtio 1.2 §4.1.4.3).
const DRIVER_FEATURE_SELECT: u64 = 8;
const DRIVER_FEATURE: u64 = 12;
const DEVICE_STATUS: u64 = 20;
const QUEUE_SELECT: u64 = 22;
const QUEUE_SIZE: u64 = 24;
const QUEUE_ENABLE: u64 = 28;
const QUEUE_NOTIFY_OFF: u64 = 30;
const QUEUE_DESC: u64 = 32;
const QUEUE_DRIVER: u64 = 40;
const QUEUE_DEVICE: u64 = 48;

#[repr(C)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

pub fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn open(path: &str) -> Result<i32, String> {
    let c = CString::new(path).unwrap();
    // SAFETY: a valid C string; the descriptor is kept for the process's life.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR) };
    if fd < 0 {
        return Err(os_error(&format!("open {path}")));
    }
    Ok(fd)
}

/// An anonymous, locked mapping that stays where it is for the process's life.
pub fn pinned_pages(len: usize, fill: u8) -> Result<&'static mut [u8], String> {
    // SAFETY: a fresh anonymous mapping, never unmapped.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(os_error("mmap"));
    }
    // SAFETY: the mapping just made, `len` bytes long.
    if unsafe { libc::mlock(ptr, len) } != 0 {
        return Err(os_error("mlock"));
    }
    // SAFETY: as above; nothing else refers to it.
    let pages = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
    pages.fill(fill);
    Ok(pages)
}

/// The guest-physical address of the page holding `addr` (root may read PFNs).
pub fn guest_physical(addr: *const u8) -> Result<u64, String> {
    let file = fs::File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    let mut entry = [0u8; 8];
    let offset = (addr as u64 / 4096) * 8;
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut entry, offset)
        .map_err(|e| format!("pagemap entry: {e}"))?;
    let entry = u64::from_le_bytes(entry);
    let pfn = entry & ((1 << 55) - 1);
    if entry >> 63 == 0 || pfn == 0 {
        return Err("page not present, or its PFN hidden".into());
    }
    Ok(pfn * 4096 + (addr as u64 % 4096))
}

/// Where an attack's DMA buffer sits for the device: clear of page 0 and of the x86 MSI window.
pub const IOVA: u64 = 1 << 30;
/// Never mapped by anyone: a type1 container starts empty.
pub const IOVA_NEVER_MAPPED: u64 = 0x8000_0000;
/// VIRTIO_F_VERSION_1 and VIRTIO_F_ACCESS_PLATFORM.
pub const FEATURES: u64 = 0b11 << 32;
/// What a canary page holds.
pub const CANARY_BYTE: u8 = 0xa5;
/// A [`Driven`] device's DMA buffer: its rings, then its buffers.
const DRIVEN_BUFFER_LEN: usize = 1 << 20;
/// Each queue's entries in a [`Driven`] device.
pub const DRIVEN_QUEUE_SIZE: u16 = 16;

/// Pinned pages of [`CANARY_BYTE`] mapped for no device: what a device without an IOMMU
/// would reach at their guest-physical address `gpa`.
pub struct Canary {
    page: &'static mut [u8],
    pub gpa: u64,
}

impl Canary {
    pub fn new(len: usize) -> Result<Canary, String> {
        let page = pinned_pages(len, CANARY_BYTE)?;
        let gpa = guest_physical(page.as_ptr())?;
        Ok(Canary { page, gpa })
    }

    /// Whether every byte is still the canary's.
    pub fn intact(&self) -> bool {
        self.page.iter().all(|&b| b == CANARY_BYTE)
    }

    /// Reports check `name`: `intact`, or `CHANGED` if a device wrote the canary.
    pub fn report(&self, name: &str) {
        let verdict = if self.intact() { "intact" } else { "CHANGED" };
        report(name, verdict, &format!("gpa={:#x}", self.gpa));
    }
}

/// A virtio device driven from user space, as every attack but the disk's drives one: its
/// group in a container of its own (whose descriptors stay open for the process's life), and
/// 1 MiB of pinned memory mapped for it at [`IOVA`] that holds its rings (16 entries, a queue
/// at each of `queue_bases`) in its first `rings_len` bytes and its buffers after them. Each
/// attack module adds its device's operations.
pub struct Driven {
    pub dev: Device,
    pub buf: &'static mut [u8],
    rings: Rings,
    rings_len: usize,
    /// The device, in errors.
    what: &'static str,
}

impl Driven {
    /// Takes the device at sysfs path `device` (bound to vfio-pci); [`Driven::start`] starts it.
    pub fn attach(
        device: &Path,
        queue_bases: &'static [usize],
        rings_len: usize,
        what: &'static str,
    ) -> Result<Driven, String> {
        let bdf = device.file_name().unwrap().to_string_lossy().into_owned();
        let container = Container::open(device)?;
        let buf = pinned_pages(DRIVEN_BUFFER_LEN, 0)?;
        container.map(buf.as_ptr() as u64, IOVA, DRIVEN_BUFFER_LEN)?;
        Ok(Driven {
            dev: Device::open(&container, &bdf)?,
            buf,
            rings: Rings::new(IOVA, queue_bases, DRIVEN_QUEUE_SIZE),
            rings_len,
            what,
        })
    }

    /// Resets the device, negotiates [`FEATURES`] and sets every queue up afresh.
    pub fn start(&mut self) -> Result<(), String> {
        self.rings
            .start(&self.dev, self.buf, (FEATURES, self.rings_len), self.what)
    }

    /// Offers the buffers `parts` (address, length), each with the flags given, on `queue` as
    /// one chain and waits up to `wait` for the device to use it: the length it wrote, `None`
    /// if it never returned the chain.
    pub fn submit(
        &mut self,
        queue: u16,
        parts: (&[(u64, usize)], u16),
        wait: Duration,
    ) -> Result<Option<u32>, String> {
        self.rings.submit(self.buf, &self.dev, queue, parts, wait)
    }
}

/// The device's group in a type1 container of its own: what it may reach is what is mapped
/// here.
pub struct Container {
    fd: i32,
    group: i32,
}

impl Container {
    /// Opens the IOMMU group of the device at sysfs path `device` (bound to vfio-pci).
    pub fn open(device: &Path) -> Result<Container, String> {
        let group = fs::read_link(device.join("iommu_group"))
            .map_err(|e| format!("{}: no IOMMU group: {e}", device.display()))?;
        let group = group.file_name().unwrap().to_string_lossy().into_owned();
        let fd = open("/dev/vfio/vfio")?;
        let group = open(&format!("/dev/vfio/{group}"))?;
        // SAFETY: plain ioctls on descriptors we own, with arguments that outlive them.
        unsafe {
            if libc::ioctl(fd, VFIO_GET_API_VERSION) < 0
                || libc::ioctl(group, VFIO_GROUP_SET_CONTAINER, &fd) < 0
                || libc::ioctl(fd, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU) < 0
            {
                return Err(os_error("setting up the type1 container"));
            }
        }
        Ok(Container { fd, group })
    }

    /// Maps `size` bytes at `vaddr` for the device at `iova`, readable and writable.
    pub fn map(&self, vaddr: u64, iova: u64, size: usize) -> Result<(), String> {
        let map = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: 3,
            vaddr,
            iova,
            size: size as u64,
        };
        // SAFETY: the memory stays mapped for the process's life.
        if unsafe { libc::ioctl(self.fd, VFIO_IOMMU_MAP_DMA, &map) } < 0 {
            return Err(os_error("VFIO_IOMMU_MAP_DMA"));
        }
        Ok(())
    }

    pub fn unmap(&self, iova: u64, size: usize) -> Result<(), String> {
        let unmap = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova,
            size: size as u64,
        };
        // SAFETY: the argument outlives the call.
        if unsafe { libc::ioctl(self.fd, VFIO_IOMMU_UNMAP_DMA, &unmap) } < 0 {
            return Err(os_error("VFIO_IOMMU_UNMAP_DMA"));
        }
        Ok(())
    }
}

/// One split queue as the driver lays it out: table, available and used rings at I/O
/// virtual addresses.
#[derive(Clone, Copy)]
pub struct QueueLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The device's VFIO regions and where the virtio structures sit in them.
pub struct Device {
    fd: i32,
    config: u64,
    common: u64,
    /// The notify structure's start and its multiplier.
    notify: (u64, u64),
}

impl Device {
    fn region(fd: i32, index: u32) -> Result<u64, String> {
        let mut info = RegionInfo {
            argsz: std::mem::size_of::<RegionInfo>() as u32,
            flags: 0,
            index,
            cap_offset: 0,
            size: 0,
            offset: 0,
        };
        // SAFETY: the argument outlives the call.
        if unsafe { libc::ioctl(fd, VFIO_DEVICE_GET_REGION_INFO, &mut info) } < 0 {
            return Err(os_error(&format!("region {index} info")));
        }
        Ok(info.offset)
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::pread(self.fd, buf.as_mut_ptr().cast(), buf.len(), offset as i64) };
        if n != buf.len() as isize {
            return Err(os_error(&format!("pread at {offset:#x}")));
        }
        Ok(())
    }

    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), String> {
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::pwrite(self.fd, buf.as_ptr().cast(), buf.len(), offset as i64) };
        if n != buf.len() as isize {
            return Err(os_error(&format!("pwrite at {offset:#x}")));
        }
        Ok(())
    }

    fn config_u8(&self, at: u64) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.read(self.config + at, &mut b)?;
        Ok(b[0])
    }

    fn config_u32(&self, at: u64) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.read(self.config + at, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Opens device `bdf` of `container`'s group, turns on decoding and bus mastering, and
    /// finds its common and notify structures from its capabilities.
    pub fn open(container: &Container, bdf: &str) -> Result<Device, String> {
        let name = CString::new(bdf).unwrap();
        // SAFETY: a valid C string.
        let fd = unsafe { libc::ioctl(container.group, VFIO_GROUP_GET_DEVICE_FD, name.as_ptr()) };
        if fd < 0 {
            return Err(os_error("VFIO_GROUP_GET_DEVICE_FD"));
        }
        let config = Self::region(fd, VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut dev = Device {
            fd,
            config,
            common: 0,
            notify: (0, 0),
        };
        // Memory and I/O decoding, and bus mastering: the device may now DMA.
        let mut command = [0u8; 2];
        dev.read(config + 4, &mut command)?;
        let command = u16::from_le_bytes(command) | 0x7;
        dev.write(config + 4, &command.to_le_bytes())?;

        let (mut common, mut notify) = (None, None);
        let mut cap = u64::from(dev.config_u8(0x34)?);
        for _ in 0..48 {
            if cap == 0 {
                break;
            }
            if dev.config_u8(cap)? == 0x09 {
                let cfg_type = dev.config_u8(cap + 3)?;
                let bar = u32::from(dev.config_u8(cap + 4)?);
                let offset = u64::from(dev.config_u32(cap + 8)?);
                let at = Self::region(fd, bar)? + offset;
                match cfg_type {
                    1 => common = Some(at),
                    2 => notify = Some((at, u64::from(dev.config_u32(cap + 16)?))),
                    _ => {}
                }
            }
            cap = u64::from(dev.config_u8(cap + 1)?);
        }
        dev.common = common.ok_or("no virtio common configuration capability")?;
        dev.notify = notify.ok_or("no virtio notify capability")?;
        Ok(dev)
    }

    fn common_write(&self, at: u64, bytes: &[u8]) -> Result<(), String> {
        self.write(self.common + at, bytes)
    }

    pub fn status(&self) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.read(self.common + DEVICE_STATUS, &mut b)?;
        Ok(b[0])
    }

    pub fn set_status(&self, status: u8) -> Result<(), String> {
        self.common_write(DEVICE_STATUS, &[status])
    }

    /// Resets the device and waits until it says it is reset.
    pub fn reset(&self) -> Result<(), String> {
        self.set_status(0)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.status()? != 0 {
            if Instant::now() > deadline {
                return Err("the device does not finish its reset".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Resets the device and offers `features`; whether the device took them (FEATURES_OK
    /// still set when read back).
    pub fn negotiate(&self, features: u64) -> Result<bool, String> {
        self.reset()?;
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)?;
        for (select, half) in [(0u32, features as u32), (1, (features >> 32) as u32)] {
            self.common_write(DRIVER_FEATURE_SELECT, &select.to_le_bytes())?;
            self.common_write(DRIVER_FEATURE, &half.to_le_bytes())?;
        }
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)?;
        Ok(self.status()? & STATUS_FEATURES_OK != 0)
    }

    /// Sets queue `index` up at `layout` and enables it.
    pub fn setup_queue(&self, index: u16, layout: QueueLayout) -> Result<(), String> {
        self.common_write(QUEUE_SELECT, &index.to_le_bytes())?;
        self.common_write(QUEUE_SIZE, &layout.size.to_le_bytes())?;
        self.common_write(QUEUE_DESC, &layout.desc.to_le_bytes())?;
        self.common_write(QUEUE_DRIVER, &layout.avail.to_le_bytes())?;
        self.common_write(QUEUE_DEVICE, &layout.used.to_le_bytes())?;
        self.common_write(QUEUE_ENABLE, &1u16.to_le_bytes())
    }

    /// Sets DRIVER_OK after FEATURES_OK; whether the device took it.
    pub fn driver_ok(&self) -> Result<bool, String> {
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.set_status(status | STATUS_DRIVER_OK)?;
        Ok(self.status()? & STATUS_DRIVER_OK != 0)
    }

    /// Where queue `index`'s notifications go.
    pub fn notify_address(&self, index: u16) -> Result<u64, String> {
        self.common_write(QUEUE_SELECT, &index.to_le_bytes())?;
        let mut off = [0u8; 2];
        self.read(self.common + QUEUE_NOTIFY_OFF, &mut off)?;
        Ok(self.notify.0 + u64::from(u16::from_le_bytes(off)) * self.notify.1)
    }

    /// Notifies queue `index`.
    pub fn notify(&self, index: u16) -> Result<(), String> {
        let at = self.notify_address(index)?;
        self.write(at, &index.to_le_bytes())
    }
}

/// One descriptor as the attacker writes it.
#[derive(Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// Writes `value` at `at` of `buf`, volatile: the device reads it.
pub fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: inside the buffer; volatile because the device reads it.
        unsafe { std::ptr::write_volatile(&mut buf[at + i], b) };
    }
}

/// Reads a little-endian u16 at `at` of `buf`, volatile: the device writes it.
pub fn get_u16(buf: &[u8], at: usize) -> u16 {
    // SAFETY: inside the buffer; volatile because the device writes it.
    let (a, b) = unsafe {
        (
            std::ptr::read_volatile(&buf[at]),
            std::ptr::read_volatile(&buf[at + 1]),
        )
    };
    u16::from_le_bytes([a, b])
}

/// Writes descriptor `index` of the table at offset `table` of `buf`.
pub fn put_desc(buf: &mut [u8], table: usize, index: usize, d: Desc) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&d.addr.to_le_bytes());
    raw[8..12].copy_from_slice(&d.len.to_le_bytes());
    raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
    raw[14..].copy_from_slice(&d.next.to_le_bytes());
    put(buf, table + 16 * index, &raw);
}

/// The driver's side of queues laid out in its DMA buffer (mapped at I/O virtual address
/// `iova`), one at each of `bases`: the descriptor table there, the available ring 0x1000 after
/// it, the used ring 0x2000 after it; the next available and used index of each.
struct Rings {
    iova: u64,
    bases: &'static [usize],
    size: u16,
    avail: Vec<u16>,
    used: Vec<u16>,
}

impl Rings {
    fn new(iova: u64, bases: &'static [usize], size: u16) -> Self {
        Rings {
            iova,
            bases,
            size,
            avail: vec![0; bases.len()],
            used: vec![0; bases.len()],
        }
    }

    /// Queue `queue` where the device is told it is.
    fn layout(&self, queue: u16) -> QueueLayout {
        let base = self.iova + self.bases[usize::from(queue)] as u64;
        QueueLayout {
            size: self.size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }

    /// Resets `dev` (`what`, in errors), negotiates `features` and sets every queue up in
    /// `buf`, whose first `rings` bytes (the rings) are cleared once the reset is complete:
    /// until then the device may still complete a request of its previous life and write its
    /// used index there.
    fn start(
        &mut self,
        dev: &Device,
        buf: &mut [u8],
        (features, rings): (u64, usize),
        what: &str,
    ) -> Result<(), String> {
        if !dev.negotiate(features)? {
            return Err(format!("the {what} refused VERSION_1 + ACCESS_PLATFORM"));
        }
        buf[..rings].fill(0);
        for queue in 0..self.bases.len() as u16 {
            dev.setup_queue(queue, self.layout(queue))?;
        }
        if !dev.driver_ok()? {
            return Err(format!("the {what} refused DRIVER_OK"));
        }
        self.avail.fill(0);
        self.used.fill(0);
        Ok(())
    }

    /// Makes the buffers `parts` available on `queue` as one chain, notifies, and waits for
    /// it: see [`Driven::submit`].
    fn submit(
        &mut self,
        buf: &mut [u8],
        dev: &Device,
        queue: u16,
        (parts, flags): (&[(u64, usize)], u16),
        wait: Duration,
    ) -> Result<Option<u32>, String> {
        let descs: Vec<Desc> = parts
            .iter()
            .map(|&(addr, len)| Desc {
                addr,
                len: len as u32,
                flags,
                next: 0,
            })
            .collect();
        self.offer(buf, dev, queue, &descs)?;
        Ok(self.used(buf, queue, wait))
    }

    /// Makes the chain `descs` available on `queue` and notifies: its head is descriptor
    /// `avail % size` of the table, the rest follow it (wrapping), linked in order. The caller
    /// waits for each chain (or resets the device) before offering the next, so a chain's
    /// descriptors are free again by then.
    fn offer(
        &mut self,
        buf: &mut [u8],
        dev: &Device,
        queue: u16,
        descs: &[Desc],
    ) -> Result<(), String> {
        let q = usize::from(queue);
        let base = self.bases[q];
        let size = usize::from(self.size);
        let head = usize::from(self.avail[q]) % size;
        for (k, desc) in descs.iter().enumerate() {
            let index = (head + k) % size;
            let mut desc = *desc;
            if k + 1 < descs.len() {
                desc.flags |= DESC_F_NEXT;
                desc.next = ((index + 1) % size) as u16;
            }
            put_desc(buf, base, index, desc);
        }
        put(
            buf,
            base + 0x1000 + 4 + 2 * head,
            &(head as u16).to_le_bytes(),
        );
        fence(Ordering::SeqCst);
        self.avail[q] = self.avail[q].wrapping_add(1);
        put(buf, base + 0x1000 + 2, &self.avail[q].to_le_bytes());
        fence(Ordering::SeqCst);
        dev.notify(queue)
    }

    /// Waits up to `wait` for `queue` to return a chain: the length the device wrote.
    fn used(&mut self, buf: &[u8], queue: u16, wait: Duration) -> Option<u32> {
        let q = usize::from(queue);
        let used_ring = self.bases[q] + 0x2000;
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            fence(Ordering::SeqCst);
            if get_u16(buf, used_ring + 2) != self.used[q] {
                let entry = used_ring + 4 + 8 * usize::from(self.used[q] % self.size);
                let len =
                    u32::from(get_u16(buf, entry + 4)) | u32::from(get_u16(buf, entry + 6)) << 16;
                self.used[q] = self.used[q].wrapping_add(1);
                return Some(len);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }
}

/// A check's verdict: `refused` when the device kept out of what it was not granted.
pub fn verdict(refused: bool) -> &'static str {
    if refused {
        "refused"
    } else {
        "ALLOWED"
    }
}

pub fn report(name: &str, verdict: &str, details: &str) {
    println!("ATTACK-{name}={verdict} {details}");
}
