//! Guest tool for the in-guest attacker test: what a compromised guest kernel or a malicious
//! user-space driver would do to a virtio-blk disk that sits behind warden's virtio-iommu.
//!
//! `attacker SYSFS_DEVICE_PATH`, with the disk already bound to vfio-pci: opens its group in a
//! fresh type1 container, maps one 1 MiB buffer for DMA (one MAP request to the virtio-iommu),
//! drives the device from user space through the VFIO regions (polling, no interrupts), and
//! then hands it requests whose buffers lie where the buffer's mapping does not reach: an IOVA
//! never mapped, the guest-physical address of one of its own pages (the canary, which a
//! device without an IOMMU would write straight into), an IOVA just unmapped, the MSI window,
//! a length of gigabytes, a descriptor chain that loops and one whose buffers overlap.
//!
//! One line per check, `ATTACK-<NAME>=<verdict> <details>`; a verdict is `refused`, `intact`,
//! `ok` or `survived`, anything else (`ALLOWED`, `CHANGED`, `FAILED`) is the attack getting
//! through. The disk must start with `WARDEN-ATTACK-DISK\n` repeated (the host writes it).
//! Exits 0 once every check has run, 1 if the tool itself could not run.

use std::ffi::CString;
use std::fs;
use std::os::raw::c_ulong;
use std::path::Path;
use std::process::ExitCode;
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

/// Where the DMA buffer sits for the device: clear of page 0 and of the x86 MSI window.
const IOVA: u64 = 1 << 30;
const BUFFER_LEN: usize = 1 << 20;
/// The second buffer, mapped, used once, then unmapped.
const IOVA_UNMAPPED_LATER: u64 = 0x5000_0000;
/// Never mapped by anyone: the type1 container starts empty.
const IOVA_NEVER_MAPPED: u64 = 0x8000_0000;
/// The x86 MSI doorbell window, which the virtio-iommu reserves.
const MSI_WINDOW: u64 = 0xfee0_0000;

/// Offsets of the ring, the request and the data inside the buffer.
const DESC: usize = 0x0000;
const AVAIL: usize = 0x1000;
const USED: usize = 0x2000;
const HEADER: usize = 0x3000;
const STATUS: usize = 0x3100;
const DATA: usize = 0x4000;
const QUEUE_SIZE: u16 = 16;
const SECTOR_BYTES: usize = 4096;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_S_OK: u8 = 0;
/// What the status byte holds until the device writes it.
const STATUS_UNWRITTEN: u8 = 0xee;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
/// VIRTIO_F_VERSION_1 and VIRTIO_F_ACCESS_PLATFORM, in the upper feature word.
const FEATURES_HIGH: u32 = 0b11;

/// The disk's content, as the host wrote it.
const PATTERN: &[u8] = b"WARDEN-ATTACK-DISK\n";
const CANARY_BYTE: u8 = 0xa5;

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

fn os_error(what: &str) -> String {
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
fn pinned_pages(len: usize, fill: u8) -> Result<&'static mut [u8], String> {
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
fn guest_physical(addr: *const u8) -> Result<u64, String> {
    let file = fs::File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    let mut entry = [0u8; 8];
    let offset = (addr as u64 / 4096) * 8;
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut entry, offset)
        .map_err(|e| format!("pagemap entry: {e}"))?;
    let entry = u64::from_le_bytes(entry);
    let pfn = entry & ((1 << 55) - 1);
    if entry >> 63 == 0 || pfn == 0 {
        return Err("canary page not present, or its PFN hidden".into());
    }
    Ok(pfn * 4096 + (addr as u64 % 4096))
}

/// The device's VFIO regions and where the virtio structures sit in them.
struct Device {
    fd: i32,
    config: u64,
    common: u64,
    notify: u64,
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

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::pread(self.fd, buf.as_mut_ptr().cast(), buf.len(), offset as i64) };
        if n != buf.len() as isize {
            return Err(os_error(&format!("pread at {offset:#x}")));
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), String> {
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

    /// Opens the device and finds its common and notify structures from its capabilities.
    fn open(group_fd: i32, bdf: &str) -> Result<Device, String> {
        let name = CString::new(bdf).unwrap();
        // SAFETY: a valid C string.
        let fd = unsafe { libc::ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, name.as_ptr()) };
        if fd < 0 {
            return Err(os_error("VFIO_GROUP_GET_DEVICE_FD"));
        }
        let config = Self::region(fd, VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut dev = Device {
            fd,
            config,
            common: 0,
            notify: 0,
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
        let common = common.ok_or("no virtio common configuration capability")?;
        let (notify_base, multiplier) = notify.ok_or("no virtio notify capability")?;
        dev.common = common;
        let mut off = [0u8; 2];
        dev.write(common + 22, &0u16.to_le_bytes())?;
        dev.read(common + 30, &mut off)?;
        dev.notify = notify_base + u64::from(u16::from_le_bytes(off)) * multiplier;
        Ok(dev)
    }

    fn status(&self) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.read(self.common + 20, &mut b)?;
        Ok(b[0])
    }

    fn set_status(&self, status: u8) -> Result<(), String> {
        self.write(self.common + 20, &[status])
    }

    /// Reset, negotiate VERSION_1 + ACCESS_PLATFORM, and set queue 0 up in the buffer.
    fn start(&self, ring: &mut [u8]) -> Result<(), String> {
        self.set_status(0)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.status()? != 0 {
            if Instant::now() > deadline {
                return Err("the device does not finish its reset".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        ring[..DATA].fill(0);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)?;
        let c = self.common;
        self.write(c + 8, &0u32.to_le_bytes())?;
        self.write(c + 12, &0u32.to_le_bytes())?;
        self.write(c + 8, &1u32.to_le_bytes())?;
        self.write(c + 12, &FEATURES_HIGH.to_le_bytes())?;
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)?;
        if self.status()? & STATUS_FEATURES_OK == 0 {
            return Err("the device refused VERSION_1 + ACCESS_PLATFORM".into());
        }
        self.write(c + 22, &0u16.to_le_bytes())?;
        self.write(c + 24, &QUEUE_SIZE.to_le_bytes())?;
        self.write(c + 32, &(IOVA + DESC as u64).to_le_bytes())?;
        self.write(c + 40, &(IOVA + AVAIL as u64).to_le_bytes())?;
        self.write(c + 48, &(IOVA + USED as u64).to_le_bytes())?;
        self.write(c + 28, &1u16.to_le_bytes())?;
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
    }
}

/// One descriptor as the attacker writes it.
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// How the device answered a request.
#[derive(Debug, PartialEq)]
enum Answer {
    Completed { status: u8 },
    Ignored { needs_reset: bool },
}

impl Answer {
    fn refused(&self) -> bool {
        !matches!(self, Answer::Completed { status: BLK_S_OK })
    }

    fn describe(&self) -> String {
        match self {
            Answer::Completed { status } => format!("status={status}"),
            Answer::Ignored { needs_reset } => {
                format!("no-completion needs-reset={needs_reset}")
            }
        }
    }
}

/// The driver: the device, its DMA buffer and the ring's position.
struct Driver {
    dev: Device,
    buf: &'static mut [u8],
    avail_idx: u16,
    used_idx: u16,
}

impl Driver {
    fn put<const N: usize>(&mut self, at: usize, bytes: [u8; N]) {
        for (i, b) in bytes.into_iter().enumerate() {
            // SAFETY: inside the buffer; volatile because the device reads it.
            unsafe { std::ptr::write_volatile(&mut self.buf[at + i], b) };
        }
    }

    fn get_u16(&self, at: usize) -> u16 {
        // SAFETY: inside the buffer; volatile because the device writes it.
        let (a, b) = unsafe {
            (
                std::ptr::read_volatile(&self.buf[at]),
                std::ptr::read_volatile(&self.buf[at + 1]),
            )
        };
        u16::from_le_bytes([a, b])
    }

    fn restart(&mut self) -> Result<(), String> {
        self.dev.start(self.buf)?;
        self.avail_idx = 0;
        self.used_idx = 0;
        Ok(())
    }

    /// Writes the descriptors at the table's start and the request header, publishes
    /// descriptor 0 and waits for the used ring to move.
    fn submit(&mut self, kind: u32, sector: u64, descs: &[Desc]) -> Result<Answer, String> {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.put(HEADER, header);
        self.put(STATUS, [STATUS_UNWRITTEN]);
        for (i, d) in descs.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
            raw[14..].copy_from_slice(&d.next.to_le_bytes());
            self.put(DESC + 16 * i, raw);
        }
        let slot = AVAIL + 4 + 2 * usize::from(self.avail_idx % QUEUE_SIZE);
        self.put(slot, 0u16.to_le_bytes());
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.put(AVAIL + 2, self.avail_idx.to_le_bytes());
        fence(Ordering::SeqCst);
        self.dev.write(self.dev.notify, &0u16.to_le_bytes())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            fence(Ordering::SeqCst);
            if self.get_u16(USED + 2) != self.used_idx {
                self.used_idx = self.used_idx.wrapping_add(1);
                // SAFETY: inside the buffer.
                let status = unsafe { std::ptr::read_volatile(&self.buf[STATUS]) };
                return Ok(Answer::Completed { status });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let needs_reset = self.dev.status()? & STATUS_NEEDS_RESET != 0;
        Ok(Answer::Ignored { needs_reset })
    }

    /// A well-formed request of one 4 KiB block whose data buffer is at `data`.
    fn request(&mut self, kind: u32, sector: u64, data: u64) -> Result<Answer, String> {
        let write = if kind == BLK_T_IN { DESC_F_WRITE } else { 0 };
        self.submit(
            kind,
            sector,
            &[
                Desc {
                    addr: IOVA + HEADER as u64,
                    len: 16,
                    flags: DESC_F_NEXT,
                    next: 1,
                },
                Desc {
                    addr: data,
                    len: SECTOR_BYTES as u32,
                    flags: DESC_F_NEXT | write,
                    next: 2,
                },
                Desc {
                    addr: IOVA + STATUS as u64,
                    len: 1,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            ],
        )
    }

    /// After a refused request the device may want a reset (or have dropped the request):
    /// start afresh so the next check begins from a clean queue.
    fn recover(&mut self, answer: &Answer) -> Result<(), String> {
        if matches!(answer, Answer::Ignored { .. }) || self.dev.status()? & STATUS_NEEDS_RESET != 0
        {
            self.restart()?;
        }
        Ok(())
    }

    /// A read of 4 KiB at `sector` into the mapped buffer; `None` unless it succeeded.
    fn read_back(&mut self, sector: u64) -> Result<Option<Vec<u8>>, String> {
        self.buf[DATA..DATA + SECTOR_BYTES].fill(0);
        let answer = self.request(BLK_T_IN, sector, IOVA + DATA as u64)?;
        if answer != (Answer::Completed { status: BLK_S_OK }) {
            return Ok(None);
        }
        Ok(Some(self.buf[DATA..DATA + SECTOR_BYTES].to_vec()))
    }
}

/// The 4 KiB the host wrote at 512-byte sector `sector`.
fn disk_pattern(sector: u64) -> Vec<u8> {
    let skip = (sector as usize * 512) % PATTERN.len();
    PATTERN
        .iter()
        .copied()
        .cycle()
        .skip(skip)
        .take(SECTOR_BYTES)
        .collect()
}

fn report(name: &str, verdict: &str, details: &str) {
    println!("ATTACK-{name}={verdict} {details}");
}

fn map(container: i32, vaddr: u64, iova: u64, size: usize) -> Result<(), String> {
    let map = DmaMap {
        argsz: std::mem::size_of::<DmaMap>() as u32,
        flags: 3,
        vaddr,
        iova,
        size: size as u64,
    };
    // SAFETY: the memory stays mapped for the process's life.
    if unsafe { libc::ioctl(container, VFIO_IOMMU_MAP_DMA, &map) } < 0 {
        return Err(os_error("VFIO_IOMMU_MAP_DMA"));
    }
    Ok(())
}

fn run(device: &Path) -> Result<(), String> {
    let group = fs::read_link(device.join("iommu_group"))
        .map_err(|e| format!("{}: no IOMMU group: {e}", device.display()))?;
    let group = group.file_name().unwrap().to_string_lossy().into_owned();
    let bdf = device.file_name().unwrap().to_string_lossy().into_owned();
    let container = open("/dev/vfio/vfio")?;
    let group_fd = open(&format!("/dev/vfio/{group}"))?;
    // SAFETY: plain ioctls on descriptors we own, with arguments that outlive them.
    unsafe {
        if libc::ioctl(container, VFIO_GET_API_VERSION) < 0
            || libc::ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, &container) < 0
            || libc::ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU) < 0
        {
            return Err(os_error("setting up the type1 container"));
        }
    }
    let buf = pinned_pages(BUFFER_LEN, 0)?;
    map(container, buf.as_ptr() as u64, IOVA, BUFFER_LEN)?;
    let canary = pinned_pages(SECTOR_BYTES, CANARY_BYTE)?;
    let canary_gpa = guest_physical(canary.as_ptr())?;
    let later = pinned_pages(SECTOR_BYTES, 0)?;

    let mut driver = Driver {
        dev: Device::open(group_fd, &bdf)?,
        buf,
        avail_idx: 0,
        used_idx: 0,
    };
    driver.restart()?;
    let pattern = disk_pattern(0);

    // The tool works: a read into the mapping returns what the host wrote.
    match driver.read_back(0)? {
        Some(data) if data == pattern => report("BASELINE", "ok", "sector 0 read through the map"),
        Some(_) => return Err("the baseline read returned other data".into()),
        None => return Err("the baseline read failed".into()),
    }

    // Reads (the device writes guest memory) and writes (it reads guest memory) to places
    // outside the grant.
    let outside: [(&str, u32, u64); 5] = [
        ("NEVER-MAPPED-READ", BLK_T_IN, IOVA_NEVER_MAPPED),
        ("NEVER-MAPPED-WRITE", BLK_T_OUT, IOVA_NEVER_MAPPED),
        ("CANARY-READ", BLK_T_IN, canary_gpa),
        ("CANARY-WRITE", BLK_T_OUT, canary_gpa),
        ("MSI-WINDOW-READ", BLK_T_IN, MSI_WINDOW),
    ];
    for (name, kind, addr) in outside {
        // Writes target sector 8, which must keep the host's pattern.
        let answer = driver.request(kind, 8, addr)?;
        let verdict = if answer.refused() {
            "refused"
        } else {
            "ALLOWED"
        };
        report(
            name,
            verdict,
            &format!("iova={addr:#x} {}", answer.describe()),
        );
        driver.recover(&answer)?;
    }

    // A buffer mapped, used, unmapped: the device may no longer reach it.
    map(
        container,
        later.as_ptr() as u64,
        IOVA_UNMAPPED_LATER,
        SECTOR_BYTES,
    )?;
    let used = driver.request(BLK_T_IN, 0, IOVA_UNMAPPED_LATER)?;
    if used != (Answer::Completed { status: BLK_S_OK }) || later[..] != pattern[..] {
        return Err(format!("a read into the second mapping failed: {used:?}"));
    }
    let unmap = DmaUnmap {
        argsz: std::mem::size_of::<DmaUnmap>() as u32,
        flags: 0,
        iova: IOVA_UNMAPPED_LATER,
        size: SECTOR_BYTES as u64,
    };
    // SAFETY: the argument outlives the call.
    if unsafe { libc::ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) } < 0 {
        return Err(os_error("VFIO_IOMMU_UNMAP_DMA"));
    }
    later.fill(0);
    let answer = driver.request(BLK_T_IN, 0, IOVA_UNMAPPED_LATER)?;
    let reached = later.iter().any(|&b| b != 0);
    let verdict = if answer.refused() && !reached {
        "refused"
    } else {
        "ALLOWED"
    };
    let details = format!("{} buffer-written={reached}", answer.describe());
    report("AFTER-UNMAP-READ", verdict, &details);
    driver.recover(&answer)?;

    // A data buffer that starts in the mapping and claims 4 GiB.
    let huge = [
        Desc {
            addr: IOVA + HEADER as u64,
            len: 16,
            flags: DESC_F_NEXT,
            next: 1,
        },
        Desc {
            addr: IOVA + DATA as u64,
            len: 0xffff_f000,
            flags: DESC_F_NEXT | DESC_F_WRITE,
            next: 2,
        },
        Desc {
            addr: IOVA + STATUS as u64,
            len: 1,
            flags: DESC_F_WRITE,
            next: 0,
        },
    ];
    let answer = driver.submit(BLK_T_IN, 0, &huge)?;
    let verdict = if answer.refused() {
        "refused"
    } else {
        "ALLOWED"
    };
    report("GIGABYTES-READ", verdict, &answer.describe());
    driver.recover(&answer)?;

    // A chain that loops back on itself.
    let mut looped = huge;
    looped[1].len = SECTOR_BYTES as u32;
    looped[2].flags |= DESC_F_NEXT;
    looped[2].next = 0;
    let answer = driver.submit(BLK_T_IN, 0, &looped)?;
    let verdict = if answer.refused() {
        "refused"
    } else {
        "ALLOWED"
    };
    report("LOOPED-CHAIN", verdict, &answer.describe());
    driver.recover(&answer)?;

    // Buffers that overlap the ring itself: inside the grant, so the device may write there,
    // but it must neither crash nor reach beyond the mapping.
    let mut overlap = looped;
    overlap[1].addr = IOVA + DESC as u64;
    overlap[1].len = (USED + 0x1000) as u32;
    overlap[2].flags = DESC_F_WRITE;
    overlap[2].addr = IOVA + DESC as u64;
    let answer = driver.submit(BLK_T_IN, 0, &overlap)?;
    report("OVERLAPPING-BUFFERS", "survived", &answer.describe());
    driver.restart()?;

    // Nothing reached the canary, sector 8 still holds the host's data, and the device
    // still serves a well-formed request after all that.
    if canary.iter().all(|&b| b == CANARY_BYTE) {
        report("CANARY", "intact", &format!("gpa={canary_gpa:#x}"));
    } else {
        report("CANARY", "CHANGED", &format!("gpa={canary_gpa:#x}"));
    }
    match driver.read_back(8)? {
        Some(data) if data == disk_pattern(8) => report("SECTOR-8", "intact", "the host's pattern"),
        Some(_) => report("SECTOR-8", "CHANGED", "a refused write reached the disk"),
        None => report("SECTOR-8", "FAILED", "could not read it back"),
    }
    match driver.read_back(0)? {
        Some(data) if data == pattern => report("RECOVERED", "ok", "sector 0 after a reset"),
        _ => report("RECOVERED", "FAILED", "the device no longer serves"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, device] = args.as_slice() else {
        eprintln!("usage: attacker SYSFS_DEVICE_PATH");
        return ExitCode::from(2);
    };
    match run(Path::new(device)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            println!("ATTACK-ERROR={err}");
            ExitCode::FAILURE
        }
    }
}
