//! A minimal writer for the "newc" cpio format, the one the Linux initramfs unpacker reads.
//!
//! The harness appends a small archive (the scenario's scripts, warden, L2's kernel) to the
//! cached base initramfs of each guest instead of rebuilding it: Linux unpacks concatenated
//! archives one after another. Writing the few entries directly avoids a staging directory and
//! pins the modes and owners the guests need.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Writes a newc archive entry by entry; [`Writer::finish`] adds the trailer.
pub struct Writer<W: Write> {
    out: W,
    next_ino: u32,
    /// Bytes written so far, to keep every header and body 4-byte aligned.
    offset: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer {
            out,
            next_ino: 1,
            offset: 0,
        }
    }

    /// A directory, owned by root, mode 0755.
    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.header(name, 0o040_755, 2, 0)
    }

    /// A regular file holding `data`, owned by root.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.header(name, 0o100_000 | perm, 1, data.len() as u64)?;
        self.write(data)?;
        self.pad()
    }

    /// A regular file with the contents of `src` (streamed: L2's ELF kernel is ~60 MB).
    pub fn file_from(&mut self, name: &str, perm: u32, src: &Path) -> io::Result<()> {
        let mut f = File::open(src)?;
        let len = f.metadata()?.len();
        self.header(name, 0o100_000 | perm, 1, len)?;
        let copied = io::copy(&mut f, &mut self.out)?;
        if copied != len {
            return Err(io::Error::other(format!(
                "{} changed while archiving",
                src.display()
            )));
        }
        self.offset += copied;
        self.pad()
    }

    /// Writes the trailer entry and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 1, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, name: &str, mode: u32, nlink: u32, size: u64) -> io::Result<()> {
        let size = u32::try_from(size)
            .map_err(|_| io::Error::other(format!("{name}: too large for a newc cpio entry")))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        // Fields: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
        // namesize check; the name is NUL-terminated.
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.offset += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.offset % 4) % 4;
        self.write(&[0; 3][..n as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_terminated() {
        let mut w = Writer::new(Vec::new());
        w.dir("e2e").unwrap();
        w.file("e2e/a", 0o755, b"hello").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        // Header (110) + "e2e\0" (4) = 114, padded to 116: the file's header starts there.
        assert_eq!(&bytes[116..122], b"070701");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("e2e/a\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
    }
}
