//! Guest tool: `blk-discard DEVICE OFFSET LENGTH` discards LENGTH bytes at OFFSET of a block
//! device with `BLKDISCARD`, what `blkdiscard` does (busybox may lack it), and prints
//! `BLK-DISCARD=ok` or the error.

use std::ffi::CString;
use std::process::ExitCode;

/// `_IO(0x12, 119)` in `<linux/fs.h>`.
const BLKDISCARD: libc::c_ulong = 0x1277;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(device), Some(Ok(offset)), Some(Ok(len))) = (
        args.get(1),
        args.get(2).map(|a| a.parse::<u64>()),
        args.get(3).map(|a| a.parse::<u64>()),
    ) else {
        eprintln!("usage: blk-discard DEVICE OFFSET LENGTH");
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
    // SAFETY: BLKDISCARD reads two u64s from `range`.
    if unsafe { libc::ioctl(fd, BLKDISCARD, range.as_ptr()) } != 0 {
        println!("BLK-DISCARD={}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    println!("BLK-DISCARD=ok");
    ExitCode::SUCCESS
}
