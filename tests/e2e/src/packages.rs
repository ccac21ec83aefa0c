//! The host's Debian packages: what the demo, the tests and the benchmarks need on this machine
//! (QEMU, the image builders' tools, iasl, ...), installed with apt the first time, so that
//! `cargo test --workspace` and `cargo run -p e2e --bin demo` set themselves up on a fresh
//! Debian machine.
//!
//! Installing needs root or password-less sudo; without either, one line names the
//! `apt-get install` command to run. Test binaries run one after another and their tests on
//! parallel threads, so the check and the install happen under a lock (a thread mutex and an
//! exclusive `flock` on a file, for other processes) and are idempotent: whoever comes second
//! finds everything installed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// A program this machine needs, and the Debian package that provides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tool {
    /// A command looked up in `PATH` (and the sbin directories, which a user's `PATH` may
    /// lack), or an absolute path to a file.
    pub program: &'static str,
    /// The Debian package that installs it.
    pub package: &'static str,
}

impl Tool {
    /// `program` from Debian package `package`.
    pub const fn new(program: &'static str, package: &'static str) -> Self {
        Tool { program, package }
    }

    fn present(&self) -> bool {
        if self.program.starts_with('/') {
            return Path::new(self.program).exists();
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(Into::into))
            .any(|dir| dir.join(self.program).is_file())
    }
}

/// guest/build.sh's tools (it downloads the kernels and busybox as .debs; nothing of theirs is
/// installed), and what linking the static warden for the nested host needs.
pub const GUEST_IMAGES: &[Tool] = &[
    Tool::new("zstd", "zstd"),
    Tool::new("cpio", "cpio"),
    Tool::new("modinfo", "kmod"),
    Tool::new("flock", "util-linux"),
    Tool::new("cc", "gcc"),
    Tool::new("/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev"),
];

/// The software KVM host, for a machine without hardware KVM.
pub const NESTED_HOST: &[Tool] = &[Tool::new("qemu-system-x86_64", "qemu-system-x86")];

/// guest/build-distro.sh's tools: the Debian tree, the partition table, the file system; and
/// debugfs, with which the harness reads and writes files in the image without mounting it.
pub const DISTRO_IMAGE: &[Tool] = &[
    Tool::new("mmdebstrap", "mmdebstrap"),
    Tool::new("sfdisk", "fdisk"),
    Tool::new("mke2fs", "e2fsprogs"),
    Tool::new("debugfs", "e2fsprogs"),
];

/// The benchmark's host end when warden runs on this machine (`src/bin/bench`): the iperf3
/// server, and busybox's `nc`, whose `-ll -e` serves the guest's CPU-time stamps. The nested
/// host has both already (guest/build.sh).
pub const BENCH_HOST: &[Tool] = &[
    Tool::new("iperf3", "iperf3"),
    Tool::new("busybox", "busybox"),
];

/// ACPICA's compiler, whose disassembler checks warden's ACPI tables.
pub const IASL: &[Tool] = &[Tool::new("iasl", "acpica-tools")];

static INSTALLING: Mutex<()> = Mutex::new(());

/// Makes sure every tool in `tools` is present, installing the missing ones' packages with
/// `apt-get` (saying so on stderr). Panics with one line naming the command to run when that
/// is impossible (not root and no password-less sudo) or fails.
pub fn ensure(tools: &[Tool]) {
    if let Err(why) = install(tools) {
        panic!("{why}");
    }
}

/// [`ensure`], but returns the one-line reason instead of panicking.
pub fn install(tools: &[Tool]) -> Result<(), String> {
    if missing(tools).is_empty() {
        return Ok(());
    }
    let command = |list: &str| format!("sudo apt-get install -y --no-install-recommends {list}");
    let Some(apt_get) = privilege() else {
        let list = missing(tools).join(" ");
        return Err(format!(
            "missing Debian packages {list}: run `{}` once (or run this command as root)",
            command(&list)
        ));
    };
    let _thread = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    // apt takes its own lock and fails rather than waits when another install holds it.
    let _process = crate::exclusive_lock("warden-e2e-apt.lock", "install lock");
    let packages = missing(tools);
    if packages.is_empty() {
        return Ok(()); // another thread or process installed them meanwhile
    }
    let list = packages.join(" ");
    say(&format!(
        "e2e: installing the Debian packages this needs (once): {list}"
    ));
    let apt = |args: &[&str]| {
        Command::new(apt_get[0])
            .args(&apt_get[1..])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // A fresh machine (a container, a cloud image) may have no package lists yet.
    if !apt(&["update", "-qq"]) {
        say("e2e: apt-get update failed; trying the install with the lists at hand");
    }
    let mut args = vec!["install", "-qq", "-y", "--no-install-recommends"];
    args.extend(packages.iter().copied());
    if apt(&args) && missing(tools).is_empty() {
        Ok(())
    } else {
        Err(format!(
            "installing {list} failed: run `{}` and look at its messages",
            command(&list)
        ))
    }
}

/// A line on stderr that the test harness doesn't capture (it captures `eprintln!` and shows
/// it only for failed tests), so that a user sees what the first run is doing.
pub(crate) fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The packages of the tools not present, each once, in order.
fn missing(tools: &[Tool]) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = Vec::new();
    for tool in tools.iter().filter(|t| !t.present()) {
        if !packages.contains(&tool.package) {
            packages.push(tool.package);
        }
    }
    packages
}

/// The command prefix that runs `apt-get` as root: none when we are root, `sudo -n` when sudo
/// works without a password, else `None`.
fn privilege() -> Option<Vec<&'static str>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Some(vec!["apt-get"]);
    }
    let sudo_works = Command::new("sudo")
        .args(["-n", "true"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    sudo_works.then(|| vec!["sudo", "-n", "apt-get"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_tools_need_nothing_and_missing_ones_name_their_package_once() {
        let tools = [
            Tool::new("sh", "dash"),
            Tool::new("/", "base-files"),
            Tool::new("warden-no-such-tool", "no-such-package"),
            Tool::new("/warden/no/such/file", "no-such-package"),
            Tool::new("warden-other-tool", "other-package"),
        ];
        assert_eq!(missing(&tools), ["no-such-package", "other-package"]);
        assert!(missing(&tools[..2]).is_empty());
    }
}
