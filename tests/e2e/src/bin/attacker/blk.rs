//! The attack on a protected virtio-blk disk: maps one 1 MiB buffer for DMA (one MAP request
//! to the virtio-iommu), drives the device from user space through the VFIO regions (polling,
//! no interrupts), and then hands it requests whose buffers lie where the buffer's mapping does
//! not reach: an IOVA never mapped, the guest-physical address of one of its own pages (the
//! canary, which a device without an IOMMU would write straight into), an IOVA just unmapped,
//! the MSI window, a length of gigabytes, a descriptor chain that loops and one whose buffers
//! overlap. The disk must start with `WARDEN-ATTACK-DISK\n` repeated (the host writes it).

use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use crate::vfio::{
    get_u16, pinned_pages, put, put_desc, report, verdict, Canary, Container, Desc, Device,
    QueueLayout, DESC_F_NEXT, DESC_F_WRITE, FEATURES, IOVA, IOVA_NEVER_MAPPED, STATUS_NEEDS_RESET,
};

const BUFFER_LEN: usize = 1 << 20;
/// The second buffer, mapped, used once, then unmapped.
const IOVA_UNMAPPED_LATER: u64 = 0x5000_0000;
/// The x86 MSI doorbell window, which the virtio-iommu reserves.
const MSI_WINDOW: u64 = 0xfee0_0000;

/// Offsets of the ring, the request and the data inside the buffer.
pub const DESC: usize = 0x0000;
pub const AVAIL: usize = 0x1000;
pub const USED: usize = 0x2000;
pub const HEADER: usize = 0x3000;
pub const STATUS: usize = 0x3100;
const DATA: usize = 0x4000;
pub const QUEUE_SIZE: u16 = 16;
const SECTOR_BYTES: usize = 4096;

pub const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_S_OK: u8 = 0;
/// What the status byte holds until the device writes it.
const STATUS_UNWRITTEN: u8 = 0xee;

/// The disk's content, as the host wrote it.
const PATTERN: &[u8] = b"WARDEN-ATTACK-DISK\n";

/// The ring in the buffer, at the buffer's I/O virtual address.
fn layout() -> QueueLayout {
    QueueLayout {
        size: QUEUE_SIZE,
        desc: IOVA + DESC as u64,
        avail: IOVA + AVAIL as u64,
        used: IOVA + USED as u64,
    }
}

/// Reset, negotiate VERSION_1 + ACCESS_PLATFORM, and set queue 0 up in the buffer (mapped at
/// [`IOVA`]; its first 16 KiB are the ring's). The ring is cleared only once the reset is
/// complete: until then the device may still complete a request of its previous life and
/// write its used index there.
pub fn start(dev: &Device, ring: &mut [u8]) -> Result<(), String> {
    if !dev.negotiate(FEATURES)? {
        return Err("the device refused VERSION_1 + ACCESS_PLATFORM".into());
    }
    ring[..DATA].fill(0);
    dev.setup_queue(0, layout())?;
    if !dev.driver_ok()? {
        return Err("the device refused DRIVER_OK".into());
    }
    Ok(())
}

/// How the device answered a request.
#[derive(Debug, PartialEq)]
pub enum Answer {
    Completed { status: u8 },
    Ignored { needs_reset: bool },
}

impl Answer {
    pub fn refused(&self) -> bool {
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
pub struct Driver {
    dev: Device,
    buf: &'static mut [u8],
    avail_idx: u16,
    used_idx: u16,
}

impl Driver {
    fn restart(&mut self) -> Result<(), String> {
        start(&self.dev, self.buf)?;
        self.avail_idx = 0;
        self.used_idx = 0;
        Ok(())
    }

    /// Writes the descriptors at the table's start and the request header, publishes
    /// descriptor 0 and waits for the used ring to move.
    fn submit(&mut self, kind: u32, sector: u64, descs: &[Desc]) -> Result<Answer, String> {
        self.publish(kind, sector, descs)?;
        self.answer()
    }

    /// Writes the descriptors at the table's start and the request header, publishes
    /// descriptor 0 and notifies the device, without waiting.
    pub fn publish(&mut self, kind: u32, sector: u64, descs: &[Desc]) -> Result<(), String> {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        put(self.buf, HEADER, &header);
        put(self.buf, STATUS, &[STATUS_UNWRITTEN]);
        for (i, d) in descs.iter().enumerate() {
            put_desc(self.buf, DESC, i, *d);
        }
        let slot = AVAIL + 4 + 2 * usize::from(self.avail_idx % QUEUE_SIZE);
        put(self.buf, slot, &0u16.to_le_bytes());
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        put(self.buf, AVAIL + 2, &self.avail_idx.to_le_bytes());
        fence(Ordering::SeqCst);
        self.dev.notify(0)
    }

    /// Whether the device has completed the request published last.
    pub fn completed(&self) -> bool {
        fence(Ordering::SeqCst);
        get_u16(self.buf, USED + 2) != self.used_idx
    }

    /// Waits up to 3 s for the request published last to complete.
    pub fn answer(&mut self) -> Result<Answer, String> {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.completed() {
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
    pub fn recover(&mut self, answer: &Answer) -> Result<(), String> {
        if matches!(answer, Answer::Ignored { .. }) || self.dev.status()? & STATUS_NEEDS_RESET != 0
        {
            self.restart()?;
        }
        Ok(())
    }

    /// A read of 4 KiB at `sector` into the mapped buffer: the data, or how the device
    /// answered instead (with its status register and ring indexes, for the log).
    fn read_back(&mut self, sector: u64) -> Result<Result<Vec<u8>, String>, String> {
        self.buf[DATA..DATA + SECTOR_BYTES].fill(0);
        let answer = self.request(BLK_T_IN, sector, IOVA + DATA as u64)?;
        if answer != (Answer::Completed { status: BLK_S_OK }) {
            return Ok(Err(format!(
                "{} device-status={:#x} avail-idx={} used-idx={} ring-used-idx={}",
                answer.describe(),
                self.dev.status()?,
                self.avail_idx,
                self.used_idx,
                get_u16(self.buf, USED + 2)
            )));
        }
        Ok(Ok(self.buf[DATA..DATA + SECTOR_BYTES].to_vec()))
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

/// Puts the disk at sysfs path `device` in a type1 container of its own, maps the ring's
/// buffer at [`IOVA`] and starts the device.
pub fn attach(device: &Path) -> Result<(Container, Driver), String> {
    let bdf = device.file_name().unwrap().to_string_lossy().into_owned();
    let container = Container::open(device)?;
    let buf = pinned_pages(BUFFER_LEN, 0)?;
    container.map(buf.as_ptr() as u64, IOVA, BUFFER_LEN)?;
    let mut driver = Driver {
        dev: Device::open(&container, &bdf)?,
        buf,
        avail_idx: 0,
        used_idx: 0,
    };
    driver.restart()?;
    Ok((container, driver))
}

/// Runs every check against the disk at sysfs path `device`.
pub fn run(device: &Path) -> Result<(), String> {
    let (container, mut driver) = attach(device)?;
    let canary = Canary::new(SECTOR_BYTES)?;
    let canary_gpa = canary.gpa;
    let later = pinned_pages(SECTOR_BYTES, 0)?;
    let pattern = disk_pattern(0);

    // The tool works: a read into the mapping returns what the host wrote.
    match driver.read_back(0)? {
        Ok(data) if data == pattern => report("BASELINE", "ok", "sector 0 read through the map"),
        Ok(_) => return Err("the baseline read returned other data".into()),
        Err(answer) => return Err(format!("the baseline read failed: {answer}")),
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
        let details = format!("iova={addr:#x} {}", answer.describe());
        report(name, verdict(answer.refused()), &details);
        driver.recover(&answer)?;
    }

    // A buffer mapped, used, unmapped: the device may no longer reach it.
    container.map(later.as_ptr() as u64, IOVA_UNMAPPED_LATER, SECTOR_BYTES)?;
    let used = driver.request(BLK_T_IN, 0, IOVA_UNMAPPED_LATER)?;
    if used != (Answer::Completed { status: BLK_S_OK }) || later[..] != pattern[..] {
        return Err(format!("a read into the second mapping failed: {used:?}"));
    }
    container.unmap(IOVA_UNMAPPED_LATER, SECTOR_BYTES)?;
    later.fill(0);
    let answer = driver.request(BLK_T_IN, 0, IOVA_UNMAPPED_LATER)?;
    let reached = later.iter().any(|&b| b != 0);
    let seen = verdict(answer.refused() && !reached);
    let details = format!("{} buffer-written={reached}", answer.describe());
    report("AFTER-UNMAP-READ", seen, &details);
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
    report(
        "GIGABYTES-READ",
        verdict(answer.refused()),
        &answer.describe(),
    );
    driver.recover(&answer)?;

    // A chain that loops back on itself.
    let mut looped = huge;
    looped[1].len = SECTOR_BYTES as u32;
    looped[2].flags |= DESC_F_NEXT;
    looped[2].next = 0;
    let answer = driver.submit(BLK_T_IN, 0, &looped)?;
    report(
        "LOOPED-CHAIN",
        verdict(answer.refused()),
        &answer.describe(),
    );
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
    canary.report("CANARY");
    match driver.read_back(8)? {
        Ok(data) if data == disk_pattern(8) => report("SECTOR-8", "intact", "the host's pattern"),
        Ok(_) => report("SECTOR-8", "CHANGED", "a refused write reached the disk"),
        Err(answer) => report("SECTOR-8", "FAILED", &format!("no read: {answer}")),
    }
    match driver.read_back(0)? {
        Ok(data) if data == pattern => report("RECOVERED", "ok", "sector 0 after a reset"),
        Ok(_) => report("RECOVERED", "FAILED", "sector 0 read back other data"),
        Err(answer) => report("RECOVERED", "FAILED", &format!("no read: {answer}")),
    }
    Ok(())
}
