//! Guest tool: `blk-discard [-z] DEVICE OFFSET LENGTH` discards LENGTH bytes at OFFSET of a
//! block device with `BLKDISCARD` (with `-z`, zeroes them with `BLKZEROOUT`, which a
//! virtio-blk with WRITE_ZEROES turns into that request), what `blkdiscard [-z]` does
//! (busybox's lacks `-z`), and prints `BLK-DISCARD=ok` or the error.

use std::ffi::CString;
use std::process::ExitCode;

/// `_IO(0x12, 119)` in `<linux/fs.h>`.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 127)`.
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let zero = args.get(1).is_some_and(|a| a == "-z");
    if zero {
        args.remove(1);
    }
    let (Some(device), Some(Ok(offset)), Some(Ok(len))) = (
        args.get(1),
        args.get(2).map(|a| a.parse::<u64>()),
        args.get(3).map(|a| a.parse::<u64>()),
    ) else {
        eprintln!("usage: blk-discard [-z] DEVICE OFFSET LENGTH");
        return ExitCode::from(2);
    };
    let Ok(path) = CString::new(device.as_str()) else {
        return ExitCode::from(2);
    };
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR) };
    if fd < 0 {
        println!("BLK-DISCARD=open: {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    let range = [offset, len];
    let request = if zero { BLKZEROOUT } else { BLKDISCARD };
    // SAFETY: both ioctls read two u64s from `range`.
    if unsafe { libc::ioctl(fd, request, range.as_ptr()) } != 0 {
        println!("BLK-DISCARD={}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    println!("BLK-DISCARD=ok");
    ExitCode::SUCCESS
}
