//! A driver that keeps a protected disk's ring full for as long as it likes (every used
//! entry made available again at once, a write to guest memory that costs no exit), while a
//! second thread writes the hotplug controller's eject register for the disk's slot over and
//! over, as a guest may (`_EJ0` unasked, then for a slot already empty). warden must unplug
//! the disk (its worker stopping though the ring never empties), queue nothing per write,
//! and keep its API and its other devices answering.

use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::blk::{self, AVAIL, DESC, QUEUE_SIZE, USED};
use crate::vfio::{
    get_u16, pinned_pages, put, put_desc, Container, Desc, Device, DESC_F_NEXT, DESC_F_WRITE, IOVA,
};

const BUFFER_LEN: usize = 1 << 16;
const HEADER: usize = 0x3000;
const ID: usize = 0x3100;
const STATUS: usize = 0x3200;
const BLK_T_GET_ID: u32 = 8;
/// `VRING_USED_F_NO_NOTIFY`: the device is polling and wants no notification.
const USED_F_NO_NOTIFY: u16 = 1;
/// The PCI hotplug controller's eject register (`vmm::layout::PCI_HOTPLUG_PORT` and
/// `acpi::PCI_HOTPLUG_EJECT`).
const HOTPLUG_PORT: u16 = 0x3d0;
const EJECT_REGISTER: u16 = HOTPLUG_PORT + 8;
/// How long the eject register is written, from `eject_at` on.
const EJECT_FOR: Duration = Duration::from_secs(3);

/// Writes `value` to I/O port `port` (the process has `ioperm` for it).
fn outl(port: u16, value: u32) {
    // SAFETY: a port write the process was granted with ioperm; it touches no memory.
    unsafe { std::arch::asm!("out dx, eax", in("dx") port, in("eax") value) };
}

/// Floods the disk at sysfs path `device` for `seconds`, and from `eject_at` seconds on
/// writes its slot (`slot`) to the eject register for [`EJECT_FOR`].
pub fn run(device: &Path, seconds: u64, eject_at: u64, slot: u8) -> Result<(), String> {
    let bdf = device.file_name().unwrap().to_string_lossy().into_owned();
    let container = Container::open(device)?;
    let buf = pinned_pages(BUFFER_LEN, 0)?;
    container.map(buf.as_ptr() as u64, IOVA, BUFFER_LEN)?;
    let dev = Device::open(&container, &bdf)?;
    blk::start(&dev, buf)?;
    // Found once: once the disk is ejected its registers read as all ones.
    let notify = dev.notify_address(0)?;
    // One GET_ID request, made available again and again: the cheapest request there is.
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&BLK_T_GET_ID.to_le_bytes());
    put(buf, HEADER, &header);
    for (i, (at, len, flags)) in [
        (HEADER, 16, DESC_F_NEXT),
        (ID, 20, DESC_F_NEXT | DESC_F_WRITE),
        (STATUS, 1, DESC_F_WRITE),
    ]
    .into_iter()
    .enumerate()
    {
        let desc = Desc {
            addr: IOVA + at as u64,
            len,
            flags,
            next: i as u16 + 1,
        };
        put_desc(buf, DESC, i, desc);
    }

    // SAFETY: asks the kernel for access to the controller's ports; root in the guest.
    if unsafe { libc::ioperm(u64::from(HOTPLUG_PORT), 12, 1) } != 0 {
        return Err(crate::vfio::os_error("ioperm"));
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let ejecting = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let ejector = {
        let (ejecting, writes) = (Arc::clone(&ejecting), Arc::clone(&writes));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(eject_at));
            ejecting.store(true, Ordering::SeqCst);
            let until = Instant::now() + EJECT_FOR;
            while Instant::now() < until {
                outl(EJECT_REGISTER, 1 << slot);
                writes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let mut avail: u16 = 0;
    let (mut served, mut served_before_eject) = (0u64, None);
    let (mut last_used, mut moved_at) = (0u16, Instant::now());
    let mut kicks = 0u64;
    while Instant::now() < deadline {
        fence(Ordering::SeqCst);
        let used = get_u16(buf, USED + 2);
        if used != last_used {
            served += u64::from(used.wrapping_sub(last_used));
            (last_used, moved_at) = (used, Instant::now());
        }
        if ejecting.load(Ordering::SeqCst) && served_before_eject.is_none() {
            served_before_eject = Some(served);
        }
        if avail.wrapping_sub(used) < QUEUE_SIZE {
            while avail.wrapping_sub(used) < QUEUE_SIZE {
                put(
                    buf,
                    AVAIL + 4 + 2 * usize::from(avail % QUEUE_SIZE),
                    &[0, 0],
                );
                avail = avail.wrapping_add(1);
            }
            fence(Ordering::SeqCst);
            put(buf, AVAIL + 2, &avail.to_le_bytes());
        }
        // Notify only when the device asks for it and has stopped moving: otherwise the
        // ring is refilled behind its back, with no exit at all.
        let idle = moved_at.elapsed() > Duration::from_millis(1);
        if idle && get_u16(buf, USED) & USED_F_NO_NOTIFY == 0 && !ejecting.load(Ordering::SeqCst) {
            // Racing with the eject, a notification may find the disk gone.
            match dev.write(notify, &0u16.to_le_bytes()) {
                Err(err) if !ejecting.load(Ordering::SeqCst) => return Err(err),
                _ => kicks += 1,
            }
            moved_at = Instant::now();
        }
        std::hint::spin_loop();
    }
    ejector.join().map_err(|_| "the eject thread panicked")?;
    let after_eject = served_before_eject.map(|before| served - before);
    let still_moving = moved_at.elapsed() < Duration::from_secs(1);
    println!(
        "ATTACK-FLOOD=done chains={served} kicks={kicks} eject-writes={} served-after-eject={after_eject:?} still-served={still_moving}",
        writes.load(Ordering::Relaxed)
    );
    println!(
        "ATTACK-FLOOD-EJECT-WRITES={}",
        writes.load(Ordering::Relaxed)
    );
    println!("ATTACK-FLOOD-STILL-SERVED={still_moving}");
    Ok(())
}
