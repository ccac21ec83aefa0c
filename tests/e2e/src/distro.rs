//! The Debian 12 disk image (`guest/build-distro.sh`): a real distribution for the demo, the
//! tests and the benchmarks, and the two things the harness does to a copy of it without
//! mounting it (debugfs, on the root file system at its offset): put a scenario script in, and
//! read back what the guest wrote.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::packages;

/// Where the scenario script goes in the image; the image's `warden-scenario.service` runs it
/// once the boot is complete (see guest/build-distro.sh).
pub const SCENARIO_PATH: &str = "/usr/local/sbin/warden-scenario";

/// The guest kernel command line for the image: its root file system is partition 3 of the
/// first disk. `panic=-1` turns a guest panic into a reboot, which warden reports and exits 1.
pub const DISTRO_CMDLINE: &str = "console=ttyS0 root=/dev/vda3 panic=-1";

/// The built image, in its cache directory (`~/.cache/warden/distro`).
#[derive(Clone, Debug)]
pub struct DistroImage {
    /// The GPT disk image (1 GiB, sparse): never written by the harness, which copies it.
    pub disk: PathBuf,
    /// The image's kernel (bzImage) and initramfs-tools initrd, for `--kernel`/`--initramfs`.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Byte offset of the ext4 root file system (partition 3) in `disk`.
    pub root_offset: u64,
}

impl DistroImage {
    /// Installs the image builders' packages if needed and runs `guest/build-distro.sh`
    /// (a minute or two the first time, under a second when cached). Panics if it fails.
    pub fn build() -> Self {
        packages::ensure(packages::GUEST_IMAGES);
        packages::ensure(packages::DISTRO_IMAGE);
        let dir = crate::run_build_script("guest/build-distro.sh");
        let offset =
            std::fs::read_to_string(dir.join("root-offset")).expect("read the image's root-offset");
        DistroImage {
            disk: dir.join("disk.img"),
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            root_offset: offset.trim().parse().expect("root-offset is a number"),
        }
    }
}

/// debugfs's name for the file system at `offset` in `image`.
fn fs_spec(image: &Path, offset: u64) -> String {
    format!("{}?offset={offset}", image.display())
}

/// Reads file `path` from the ext4 file system at `offset` in `image`; `None` if it is not
/// there. (debugfs reports a missing file on stderr and exits 0, so stderr decides.)
pub fn read_file(image: &Path, offset: u64, path: &str) -> Option<Vec<u8>> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(fs_spec(image, offset))
        .output()
        .expect("cannot run debugfs (Debian package e2fsprogs)");
    let complaint = String::from_utf8_lossy(&out.stderr)
        .lines()
        .any(|line| !line.starts_with("debugfs "));
    (out.status.success() && !complaint).then_some(out.stdout)
}

/// Writes `contents` as the new executable file `path` (its directory must exist) into the
/// ext4 file system at `offset` in `image`, and checks it reads back.
pub fn write_file(image: &Path, offset: u64, path: &str, contents: &[u8], scratch: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let local = scratch.join("debugfs-write.tmp");
    std::fs::write(&local, contents).expect("write debugfs's source file");
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o755))
        .expect("chmod debugfs's source file");
    let status = Command::new("debugfs")
        .args(["-w", "-R", &format!("write {} {path}", local.display())])
        .arg(fs_spec(image, offset))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("cannot run debugfs (Debian package e2fsprogs)");
    assert!(status.success(), "debugfs write {path} failed ({status})");
    assert_eq!(
        read_file(image, offset, path).as_deref(),
        Some(contents),
        "{path} did not read back from {} after debugfs wrote it",
        image.display()
    );
}
