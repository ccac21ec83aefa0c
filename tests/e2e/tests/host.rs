//! Checks the harness itself, independently of what warden can boot: the KVM host has a
//! working `/dev/kvm` and runs the static warden binary, and every phase of a scenario runs.

use e2e::{Mode, Scenario};

#[test]
fn test_host_has_kvm() {
    let Some(out) = Scenario::new("host_has_kvm")
        .host_setup(
            "test -c /dev/kvm && echo HOST-KVM=present\n\
             if [ -d /sys/module/kvm_amd ]; then\n\
                 dmesg | grep -q 'kvm_amd: Nested Virtualization enabled' && echo HOST-NESTED=enabled\n\
             fi",
        )
        // No guest: this only proves the binary starts in the host and its status comes back.
        .warden_args(["--version"])
        .without_default_args()
        .host_check("echo HOST-CHECK=ran")
        .run()
    else {
        return;
    };
    assert_eq!(out.marker("HOST-KVM"), Some("present"), "{out}");
    if out.mode == Mode::Nested {
        assert_eq!(out.marker("HOST-NESTED"), Some("enabled"), "{out}");
    }
    assert_eq!(out.warden_exit, Some(0), "{out}");
    assert_eq!(out.host_check_exit(), Some(0), "{out}");
    assert_eq!(out.marker("HOST-CHECK"), Some("ran"), "{out}");
    eprintln!("{out}");
}
