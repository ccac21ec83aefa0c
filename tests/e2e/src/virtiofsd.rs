//! virtiofsd, the vhost-user back end of virtio-fs, from crates.io: built once as a static
//! binary (the nested KVM host has no shared libraries) into `~/.cache/warden/virtiofsd`
//! (`WARDEN_VIRTIOFSD_CACHE`), or the file `WARDEN_VIRTIOFSD` names.

use std::path::PathBuf;
use std::process::Command;

use crate::packages::{self, Tool};

/// The release the tests were written against.
const VERSION: &str = "1.14.0";

/// Its build needs libseccomp and libcap-ng, linked statically.
const BUILD_DEPENDENCIES: &[Tool] = &[
    Tool::new("/usr/lib/x86_64-linux-gnu/libseccomp.a", "libseccomp-dev"),
    Tool::new("/usr/lib/x86_64-linux-gnu/libcap-ng.a", "libcap-ng-dev"),
    Tool::new("/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev"),
];

/// The static virtiofsd, built the first time (a few minutes). Panics if that fails.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WARDEN_VIRTIOFSD") {
        return path.into();
    }
    let root = std::env::var_os("WARDEN_VIRTIOFSD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/warden/virtiofsd")
        })
        .join(VERSION);
    let binary = root.join("bin/virtiofsd");
    let _lock = crate::exclusive_lock("warden-e2e-virtiofsd.lock", "virtiofsd build lock");
    if binary.is_file() {
        return binary;
    }
    packages::ensure(BUILD_DEPENDENCIES);
    packages::say(&format!(
        "e2e: building virtiofsd {VERSION} from crates.io (once, a few minutes)"
    ));
    let libs = "/usr/lib/x86_64-linux-gnu";
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "install",
            "--quiet",
            "--locked",
            "virtiofsd",
            "--version",
            VERSION,
        ])
        .arg("--root")
        .arg(&root)
        .args(["--target", crate::STATIC_TARGET])
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", root.join("build"))
        .env("LIBSECCOMP_LINK_TYPE", "static")
        .env("LIBSECCOMP_LIB_PATH", libs)
        .env("LIBCAPNG_LINK_TYPE", "static")
        .env("LIBCAPNG_LIB_PATH", libs)
        .status()
        .expect("cannot run cargo install");
    assert!(
        status.success() && binary.is_file(),
        "building virtiofsd failed ({status})"
    );
    let _ = std::fs::remove_dir_all(root.join("build"));
    binary
}
