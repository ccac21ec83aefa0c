//! The VM's lifecycle in one process, on this machine's `/dev/kvm` (no guest image needed: the
//! "kernel" is a three-byte ELF that halts): an empty VMM takes `vm.create`, then boots and
//! shuts the VM down three times, pausing it once, reboots it and deletes it; after each
//! shutdown the process is back to the threads and file descriptors it had after the first,
//! so nothing of a VM outlives it (its vCPUs, device and hotplug threads, KVM's VM, the disk's
//! image and io_uring, the IOMMU's threads). Skipped, saying so, where there is no KVM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use vmm::options::{ApiSocket, MonitorTarget, SeccompMode, VmmOptions};
use vmm::VmmExit;

/// An ELF64 executable whose one segment, at 1 MiB (the entry), is `hlt; jmp .-1`.
fn halting_kernel(path: &Path) {
    const ENTRY: u64 = 0x10_0000;
    const CODE_OFFSET: u64 = 0x1000;
    let code = [0xf4u8, 0xeb, 0xfd];
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers right after this header
    elf.extend_from_slice(&0u64.to_le_bytes()); // no sections
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&64u16.to_le_bytes());
    elf.extend_from_slice(&56u16.to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes());
    elf.extend_from_slice(&[0; 6]);
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&CODE_OFFSET.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(&code);
    std::fs::write(path, elf).unwrap();
}

/// `method` on `endpoint` with `body`; the status and the body of the answer.
fn call(socket: &Path, method: &str, endpoint: &str, body: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {reply:?}"));
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

/// This process's threads, and its open descriptors but sockets (the API's connections close
/// on their own time).
fn footprint() -> (usize, usize) {
    let threads = std::fs::read_dir("/proc/self/task").unwrap().count();
    let files = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| !target.to_string_lossy().starts_with("socket:"))
        })
        .count();
    (threads, files)
}

fn state(socket: &Path) -> String {
    let (status, body) = call(socket, "GET", "vm.info", "");
    if status != 200 {
        return format!("{status}");
    }
    let key = "\"state\":\"";
    let start = body.find(key).map(|i| i + key.len()).expect("a state");
    body[start..].split('"').next().unwrap().to_string()
}

#[test]
fn a_vm_comes_and_goes_and_leaves_nothing_behind() {
    if let Err(err) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("SKIPPED: a_vm_comes_and_goes_and_leaves_nothing_behind needs /dev/kvm: {err}");
        return;
    }
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let dir = dir.as_path().to_path_buf();
    let kernel = dir.join("halt.elf");
    halting_kernel(&kernel);
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let socket: PathBuf = dir.join("api.sock");
    let events = dir.join("events");
    let options = VmmOptions {
        seccomp: SeccompMode::Off,
        api_socket: Some(ApiSocket::Path(socket.clone())),
        no_reboot: true,
        event_monitor: Some(MonitorTarget::Path(events.clone())),
    };
    let vmm = thread::spawn(move || vmm::run(None, &options));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }

    assert_eq!(state(&socket), "404", "no VM yet");
    let config = format!(
        r#"{{"cpus":{{"boot_vcpus":2,"max_vcpus":2}},"memory":{{"size":67108864}},"payload":{{"kernel":"{}"}},"disks":[{{"path":"{}","iommu":true}}],"serial":{{"mode":"Null"}},"console":{{"mode":"Off"}}}}"#,
        kernel.display(),
        image.display()
    );
    assert_eq!(call(&socket, "PUT", "vm.create", &config).0, 204);
    assert_eq!(state(&socket), "Created");
    assert_eq!(
        call(&socket, "PUT", "vm.create", &config).0,
        500,
        "created already"
    );

    let mut baseline = None;
    for round in 0..3 {
        assert_eq!(call(&socket, "PUT", "vm.boot", "").0, 204, "round {round}");
        assert_eq!(state(&socket), "Running");
        assert_eq!(
            call(&socket, "PUT", "vm.boot", "").0,
            500,
            "running already"
        );
        let (threads, _) = footprint();
        if round == 1 {
            assert_eq!(call(&socket, "PUT", "vm.pause", "").0, 204);
            assert_eq!(state(&socket), "Paused");
        }
        assert_eq!(call(&socket, "PUT", "vm.shutdown", "").0, 204);
        assert_eq!(state(&socket), "Created");
        let after = footprint();
        assert!(
            after.0 < threads,
            "its vCPU threads went: {threads} with the VM, {after:?} after"
        );
        match baseline {
            None => baseline = Some(after),
            Some(baseline) => assert_eq!(after, baseline, "round {round}: threads and fds"),
        }
    }
    assert_eq!(
        call(&socket, "PUT", "vm.shutdown", "").0,
        500,
        "not running"
    );
    assert_eq!(call(&socket, "PUT", "vm.boot", "").0, 204);
    assert_eq!(call(&socket, "PUT", "vm.reboot", "").0, 204);
    assert_eq!(state(&socket), "Running");
    assert_eq!(call(&socket, "PUT", "vm.delete", "").0, 204);
    assert_eq!(state(&socket), "404", "deleted");
    assert_eq!(footprint(), baseline.unwrap(), "after delete");
    assert_eq!(call(&socket, "PUT", "vm.reboot", "").0, 404);

    assert_eq!(call(&socket, "PUT", "vmm.shutdown", "").0, 204);
    assert_eq!(vmm.join().unwrap().unwrap(), VmmExit::ApiShutdown);

    // The event stream told it all, in order, as libvirt reads it.
    let stream = std::fs::read_to_string(&events).unwrap();
    let told: Vec<String> = stream
        .split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            let field = |name: &str| {
                let key = format!("\"{name}\": \"");
                let start = event.find(&key).map(|i| i + key.len()).expect(name);
                event[start..].split('"').next().unwrap().to_string()
            };
            format!("{}/{}", field("source"), field("event"))
        })
        .collect();
    let mut expected = vec!["vmm/starting".to_string()];
    for round in 0..3 {
        // The second vm.boot, refused, is told too, as Cloud Hypervisor tells it.
        expected.extend(["vm/booting", "vm/booted", "vm/booting"].map(String::from));
        if round == 1 {
            expected.extend(["vm/pausing", "vm/paused"].map(String::from));
        }
        expected.push("vm/shutdown".into());
    }
    expected.extend(
        [
            "vm/booting",
            "vm/booted",
            // As Cloud Hypervisor: no vm/shutdown within a reboot (libvirt would stop it).
            "vm/rebooting",
            "vm/rebooted",
            "vm/shutdown",
            "vm/deleted",
            "vm/rebooting",
            "vmm/shutdown",
        ]
        .map(String::from),
    );
    assert_eq!(told, expected, "{stream}");
}
