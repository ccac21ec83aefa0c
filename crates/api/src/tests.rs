//! The server end to end over real Unix sockets, with a fake VMM.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::*;

/// Records what it was asked and answers like a running VM that cannot hotplug or reboot.
#[derive(Default)]
struct FakeVmm {
    requests: Mutex<Vec<Request>>,
    answered: Mutex<Vec<Request>>,
}

impl Vmm for FakeVmm {
    fn handle(&self, request: Request) -> Result<Response, ApiError> {
        self.requests.lock().unwrap().push(request.clone());
        match request {
            Request::Ping => Ok(Response::Ping(VmmPingResponse {
                build_version: "test".into(),
                version: "0.1.0".into(),
                pid: 42,
                features: vec!["kvm".into()],
            })),
            Request::Counters => Ok(Response::Counters(BTreeMap::from([(
                "virtio-iommu".to_string(),
                BTreeMap::from([("maps".to_string(), 7u64)]),
            )]))),
            Request::Info => Ok(Response::Info(Box::new(info()))),
            Request::Reboot => Err(ApiError::new(
                Refusal::NotImplemented,
                "warden does not restart guests",
            )),
            Request::AddDisk(_)
            | Request::AddNet(..)
            | Request::AddDevice(_)
            | Request::RemoveDevice(_) => Err(ApiError::new(
                Refusal::NotImplemented,
                "hotplug is not supported yet",
            )),
            _ => Ok(Response::Done),
        }
    }

    fn answered(&self, request: &Request) {
        self.answered.lock().unwrap().push(request.clone());
    }
}

fn info() -> VmInfo {
    VmInfo {
        config: vm_config::VmConfig {
            cpus: vm_config::CpusConfig {
                boot_vcpus: 2,
                max_vcpus: 2,
                ..Default::default()
            },
            payload: Some(vm_config::PayloadConfig {
                kernel: Some("vmlinuz".into()),
                cmdline: Some("console=ttyS0".into()),
                ..Default::default()
            }),
            disks: vec![vm_config::DiskConfig {
                path: Some("disk.img".into()),
                iommu: true,
                id: Some("_disk0".into()),
                ..Default::default()
            }],
            iommu: true,
            ..Default::default()
        },
        state: VmState::Running,
        memory_actual_size: 512 << 20,
        device_tree: BTreeMap::from([(
            "_disk0".to_string(),
            DeviceNode {
                id: "_disk0".into(),
                resources: vec![],
                children: vec![],
                pci_bdf: Some("0000:00:02.0".into()),
            },
        )]),
    }
}

struct TestServer {
    path: PathBuf,
    vmm: Arc<FakeVmm>,
}

impl TestServer {
    fn start(limits: Limits) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "warden-api-test-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let vmm = Arc::new(FakeVmm::default());
        let served = Arc::clone(&vmm);
        thread::spawn(move || serve(listener, &*served, &limits));
        TestServer { path, vmm }
    }

    fn connect(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    /// Sends `request` and reads until the server closes: status, headers and body.
    fn exchange(&self, request: &[u8]) -> Reply {
        let mut stream = self.connect();
        stream.write_all(request).unwrap();
        read_reply(&mut stream)
    }

    fn call(&self, method: &str, endpoint: &str, body: &str) -> Reply {
        self.exchange(
            format!(
                "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    }

    fn requests(&self) -> Vec<Request> {
        self.vmm.requests.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    /// The one-line message of an error reply: Cloud Hypervisor's array of messages, one here.
    fn error(&self) -> String {
        assert!(!self.body.contains('\n'), "one line: {self:?}");
        let messages = self.json();
        assert_eq!(messages.as_array().map(Vec::len), Some(1), "{self:?}");
        messages[0]
            .as_str()
            .unwrap_or_else(|| panic!("an error body: {self:?}"))
            .to_string()
    }
}

/// Reads to EOF and splits the reply.
fn read_reply(stream: &mut UnixStream) -> Reply {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    split_reply(&String::from_utf8(raw).unwrap())
}

/// Reads one reply on a kept-alive connection: its head, then `Content-Length` bytes.
fn read_one_reply(stream: &mut UnixStream) -> Reply {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut raw = Vec::new();
    let mut byte = [0u8];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "{raw:?}");
        raw.push(byte[0]);
    }
    let head = String::from_utf8(raw.clone()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |n| n.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    raw.extend_from_slice(&body);
    split_reply(&String::from_utf8(raw).unwrap())
}

fn split_reply(text: &str) -> Reply {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("a reply: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head:?}"));
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn server() -> TestServer {
    TestServer::start(Limits::default())
}

#[test]
fn ping_answers_the_vmm_ping_response() {
    let server = server();
    let reply = server.call("GET", "vmm.ping", "");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.head.contains("Content-Type: application/json"));
    let ping = reply.json();
    assert_eq!(ping["version"], "0.1.0");
    assert_eq!(ping["build_version"], "test");
    assert_eq!(ping["pid"], 42);
    assert_eq!(ping["features"], serde_json::json!(["kvm"]));
    assert_eq!(server.requests(), [Request::Ping]);
}

#[test]
fn info_has_config_state_memory_and_device_tree() {
    let server = server();
    let reply = server.call("GET", "vm.info", "");
    assert_eq!(reply.status, 200, "{reply:?}");
    let info = reply.json();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["memory_actual_size"], 512u64 << 20);
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2);
    assert_eq!(info["config"]["payload"]["kernel"], "vmlinuz");
    assert_eq!(info["config"]["disks"][0]["path"], "disk.img");
    assert_eq!(info["config"]["disks"][0]["iommu"], true);
    assert_eq!(info["device_tree"]["_disk0"]["pci_bdf"], "0000:00:02.0");
    let back: VmInfo = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(back, self::info());
}

#[test]
fn counters_are_device_to_name_to_value() {
    let server = server();
    let reply = server.call("GET", "vm.counters", "");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.json(),
        serde_json::json!({"virtio-iommu": {"maps": 7}})
    );
}

#[test]
fn actions_answer_204_and_reach_the_vmm() {
    let server = server();
    for (endpoint, request) in [
        ("vm.shutdown", Request::Shutdown),
        ("vm.power-button", Request::PowerButton),
        ("vm.pause", Request::Pause),
        ("vm.resume", Request::Resume),
        ("vmm.shutdown", Request::VmmShutdown),
    ] {
        let reply = server.call("PUT", endpoint, "");
        assert_eq!(reply.status, 204, "{endpoint}: {reply:?}");
        assert_eq!(reply.body, "", "{endpoint}");
        assert!(!reply.head.contains("Content-Length"), "{endpoint}");
        assert_eq!(server.requests().last(), Some(&request), "{endpoint}");
    }
}

#[test]
fn a_refusal_of_the_vmm_keeps_its_status_and_reason() {
    let server = server();
    let reply = server.call("PUT", "vm.reboot", "");
    assert_eq!(reply.status, 501, "{reply:?}");
    assert_eq!(reply.error(), "warden does not restart guests");
    assert_eq!(
        *server.vmm.answered.lock().unwrap(),
        [],
        "refused: no action"
    );
}

#[test]
fn the_vmm_hears_of_an_accepted_request_once_its_answer_is_sent() {
    let server = server();
    let mut stream = server.connect();
    stream
        .write_all(b"PUT /api/v1/vmm.shutdown HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut reply = [0u8; 12];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"HTTP/1.1 204");
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.vmm.answered.lock().unwrap().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(*server.vmm.answered.lock().unwrap(), [Request::VmmShutdown]);
}

#[test]
fn hotplug_bodies_are_parsed_with_ch_defaults_and_handed_on() {
    let server = server();
    let reply = server.call(
        "PUT",
        "vm.add-disk",
        r#"{"path":"/tmp/d.img","iommu":true,"id":"hot0"}"#,
    );
    assert_eq!(reply.status, 501, "{reply:?}");
    assert_eq!(reply.error(), "hotplug is not supported yet");
    server.call(
        "PUT",
        "vm.add-net",
        r#"{"tap":"vmtap9","mac":"52:54:00:12:34:56","ip":"10.0.0.1","mask":"255.255.255.0"}"#,
    );
    server.call(
        "PUT",
        "vm.add-device",
        r#"{"path":"/sys/bus/pci/devices/0000:01:00.0","iommu":true}"#,
    );
    server.call(
        "PUT",
        "vm.add-vsock",
        r#"{"cid":3,"socket":"/run/v.sock","iommu":true}"#,
    );
    // Kata's Rust runtime's body: Cloud Hypervisor's defaults fill the rest.
    server.call(
        "PUT",
        "vm.add-fs",
        r#"{"tag":"kataShared","socket":"/run/fs.sock","pci_segment":1}"#,
    );
    server.call("PUT", "vm.remove-device", r#"{"id":"hot0"}"#);
    let requests = server.requests();
    let [Request::AddDisk(disk), Request::AddNet(net, files), Request::AddDevice(device), Request::AddVsock(vsock), Request::AddFs(fs), Request::RemoveDevice(remove)] =
        requests.as_slice()
    else {
        panic!("six hotplug requests: {requests:?}")
    };
    assert_eq!((vsock.cid, vsock.iommu), (3, true));
    assert_eq!(
        (
            fs.tag.as_str(),
            fs.num_queues,
            fs.queue_size,
            fs.pci_segment
        ),
        ("kataShared", 1, 1024, 1)
    );
    assert_eq!(disk.path(), std::path::Path::new("/tmp/d.img"));
    assert!(disk.iommu && !disk.readonly);
    assert_eq!((disk.num_queues, disk.queue_size), (1, 128));
    assert_eq!(net.tap.as_deref(), Some("vmtap9"));
    assert!(files.is_empty(), "no descriptors came");
    assert_eq!((net.num_queues, net.queue_size), (2, 256));
    assert!(net.offload_csum);
    assert!(device.iommu);
    assert_eq!(remove.id.as_deref(), Some("hot0"));
}

#[test]
fn malformed_or_unacceptable_bodies_are_400_with_the_reason() {
    let server = server();
    for (endpoint, body, reason) in [
        (
            "vm.add-disk",
            "",
            "vm.add-disk needs a DiskConfig JSON body",
        ),
        (
            "vm.add-disk",
            "{\"path\":",
            "vm.add-disk: not a DiskConfig: EOF",
        ),
        ("vm.add-disk", "[1,2]", "not a DiskConfig: invalid type"),
        (
            "vm.add-disk",
            r#"{"path":"/d","readonly":"yes"}"#,
            "invalid type: string",
        ),
        (
            "vm.add-disk",
            r#"{"readonly":true}"#,
            "disks.path is required",
        ),
        (
            "vm.add-disk",
            r#"{"path":"/d","vhost_user":true}"#,
            "vhost_user is not supported",
        ),
        (
            "vm.add-disk",
            r#"{"path":"/d","num_queues":65}"#,
            "num_queues: 65 is not from 1 to 64",
        ),
        (
            "vm.add-disk",
            r#"{"path":"/d","queue_size":100}"#,
            "queue_size: 100 is not a power of two",
        ),
        (
            "vm.add-disk",
            r#"{"path":"/d","id":"a b"}"#,
            "disks.id: \"a b\" must be",
        ),
        (
            "vm.add-net",
            r#"{"ip":"fe80::1"}"#,
            "net.ip: \"fe80::1\" is not an IPv4 address",
        ),
        (
            "vm.add-net",
            r#"{"ip":"10.0.0.1","mask":"255.0.255.0"}"#,
            "is not a netmask",
        ),
        (
            "vm.add-net",
            r#"{"mac":"01:00:5e:00:00:01"}"#,
            "is a multicast address",
        ),
        (
            "vm.add-net",
            r#"{"mac":"52:54:00:12:34"}"#,
            "is not a MAC address",
        ),
        ("vm.add-net", r#"{"tap":"a/b"}"#, "is not an interface name"),
        (
            "vm.add-vsock",
            r#"{"cid":2,"socket":"/v"}"#,
            "vsock.cid: 2 is not from 3 to 4294967294",
        ),
        ("vm.add-vsock", r#"{"cid":3}"#, "missing field `socket`"),
        (
            "vm.add-net",
            r#"{"num_queues":3}"#,
            "num_queues: 3 is not an even number from 2 to 32",
        ),
        ("vm.add-net", r#"{"mtu":9000}"#, "mtu is not supported"),
        ("vm.add-device", "{}", "devices.path is required"),
        (
            "vm.add-device",
            r#"{"path":"sys/x"}"#,
            "is not an absolute sysfs path",
        ),
        ("vm.remove-device", "{}", "VmRemoveDevice: id is required"),
        ("vm.remove-device", "\"x\"", "not a VmRemoveDevice"),
    ] {
        let reply = server.call("PUT", endpoint, body);
        assert_eq!(reply.status, 400, "{endpoint} {body}: {reply:?}");
        let error = reply.error();
        assert!(error.contains(reason), "{endpoint} {body}: {error}");
    }
    assert_eq!(server.requests(), [], "nothing malformed reaches the VMM");
}

#[test]
fn wrong_methods_are_400_with_allow_and_unknown_paths_404() {
    let server = server();
    let reply = server.call("PUT", "vmm.ping", "");
    assert_eq!(reply.status, 400, "Cloud Hypervisor's status: {reply:?}");
    assert!(reply.head.contains("Allow: GET"), "{reply:?}");
    assert_eq!(reply.error(), "/api/v1/vmm.ping takes GET, not PUT");
    let reply = server.call("GET", "vm.shutdown", "");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(reply.head.contains("Allow: PUT"), "{reply:?}");
    let reply = server.call("POST", "vm.add-disk", "{}");
    assert_eq!(reply.status, 400, "{reply:?}");
    let reply = server.call("GET", "vmm.ping", "");
    assert!(!reply.head.contains("Allow:"), "{reply:?}");
    assert_eq!(
        server.requests(),
        [Request::Ping],
        "only the right call arrived"
    );
    for endpoint in ["vm.snapshot", "vm.ping", ""] {
        let reply = server.call("GET", endpoint, "");
        assert_eq!(reply.status, 404, "{endpoint}: {reply:?}");
        assert!(reply.error().starts_with("no endpoint /api/v1/"));
    }
    let reply = server.exchange(b"GET /vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(reply.status, 404, "{reply:?}");
    assert_eq!(server.requests(), [Request::Ping]);
}

#[test]
fn a_malformed_request_line_is_400_and_closes() {
    let server = server();
    let reply = server.exchange(b"GET\x01 / HTTP/1.1\r\n\r\n");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(reply.head.contains("Connection: close"));
    assert!(reply.error().starts_with("malformed request"));
    let reply = server.exchange(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: many\r\n\r\n");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.error(), "Content-Length is not a number");
    let reply = server.exchange(
        b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert_eq!(reply.status, 411, "{reply:?}");
}

#[test]
fn oversized_headers_are_431_and_oversized_bodies_413_and_both_close() {
    let server = TestServer::start(Limits {
        max_header_bytes: 1024,
        max_body_bytes: 2048,
        ..Limits::default()
    });
    // Headers that never end: the server stops reading past its limit.
    let mut stream = server.connect();
    let mut request = b"GET /api/v1/vmm.ping HTTP/1.1\r\n".to_vec();
    request.extend(std::iter::repeat_n(b'x', 4096));
    stream.write_all(&request).unwrap();
    let reply = read_reply(&mut stream);
    assert_eq!(reply.status, 431, "{reply:?}");
    assert!(reply.head.contains("Connection: close"));
    let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
    let reply = server.exchange(format!("GET /api/v1/vmm.ping HTTP/1.1\r\n{many}\r\n").as_bytes());
    assert_eq!(reply.status, 431, "{reply:?}");
    // A body announced too large is refused before it is sent.
    let mut stream = server.connect();
    stream
        .write_all(b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n")
        .unwrap();
    let reply = read_reply(&mut stream);
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(
        reply.error(),
        "request body of 1000000 bytes exceeds 2048 bytes"
    );
    assert_eq!(server.requests(), []);
}

#[test]
fn a_client_stuck_in_a_request_stalls_nobody_and_is_timed_out() {
    let server = TestServer::start(Limits {
        request_timeout: Duration::from_millis(500),
        ..Limits::default()
    });
    let started = Instant::now();
    // One that sends half a request and stops, and one whose answer is never read because it
    // never finishes its body.
    let mut half = server.connect();
    half.write_all(b"GET /api/v1/vmm.pi").unwrap();
    let mut no_body = server.connect();
    no_body
        .write_all(b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        .unwrap();
    let reply = server.call("GET", "vmm.ping", "");
    assert_eq!(reply.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "answered while the others wait: {:?}",
        started.elapsed()
    );
    for stream in [&mut half, &mut no_body] {
        let reply = read_reply(stream);
        assert_eq!(reply.status, 408, "{reply:?}");
    }
    assert!(started.elapsed() >= Duration::from_millis(500));
}

/// Kata's runtime keeps one connection for the VMM's whole life, and its Go runtime reuses
/// idle ones: a connection between requests is never timed out.
#[test]
fn a_kept_alive_connection_may_wait_between_requests_as_long_as_it_likes() {
    let server = TestServer::start(Limits {
        request_timeout: Duration::from_millis(200),
        ..Limits::default()
    });
    let mut stream = server.connect();
    // Silent from the start, then between requests, each time past the request timeout.
    for _ in 0..2 {
        thread::sleep(Duration::from_millis(500));
        stream
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            .unwrap();
        let reply = read_one_reply(&mut stream);
        assert_eq!(reply.status, 200, "{reply:?}");
    }
}

#[test]
fn two_clients_interleaved_each_get_their_answer() {
    let server = server();
    let mut first = server.connect();
    let mut second = server.connect();
    first.write_all(b"GET /api/v1/vm.coun").unwrap();
    second.write_all(b"GET /api/v1/vmm.pi").unwrap();
    thread::sleep(Duration::from_millis(50));
    second
        .write_all(b"ng HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let ping = read_one_reply(&mut second);
    first
        .write_all(b"ters HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let counters = read_one_reply(&mut first);
    assert_eq!(ping.json()["pid"], 42);
    assert_eq!(counters.json()["virtio-iommu"]["maps"], 7);
}

#[test]
fn a_kept_alive_connection_serves_pipelined_requests_in_order() {
    let server = server();
    let mut stream = server.connect();
    stream
        .write_all(
            b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\nPUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET /api/v1/vm.counters HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let statuses: Vec<&str> = raw
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &raw[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "204", "200"], "{raw}");
    assert_eq!(
        server.requests(),
        [Request::Ping, Request::Pause, Request::Counters]
    );
}

#[test]
fn http_1_0_closes_after_the_answer_and_queries_are_ignored() {
    let server = server();
    let reply = server.exchange(b"GET /api/v1/vmm.ping?verbose=1 HTTP/1.0\r\n\r\n");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.head.contains("Connection: close"));
}

#[test]
fn a_new_client_takes_the_place_of_the_one_idle_the_longest() {
    let server = TestServer::start(Limits {
        max_connections: 2,
        ..Limits::default()
    });
    let mut oldest = server.connect();
    thread::sleep(Duration::from_millis(50));
    let mut newer = server.connect();
    newer
        .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(read_one_reply(&mut newer).status, 200);
    // Both places are taken by idle clients: the third is served once the oldest has been
    // idle for a second.
    let reply = server.call("GET", "vmm.ping", "");
    assert_eq!(reply.status, 200, "{reply:?}");
    // In the place of the oldest, which was closed without a word; the newer one stays.
    let mut rest = Vec::new();
    oldest
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(oldest.read_to_end(&mut rest).unwrap(), 0);
    newer
        .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(read_one_reply(&mut newer).status, 200);
}

#[test]
fn more_clients_than_the_limit_wait_their_turn() {
    let server = TestServer::start(Limits {
        max_connections: 2,
        request_timeout: Duration::from_millis(300),
        ..Limits::default()
    });
    // Two clients in the middle of requests hold both places until they time out.
    let _busy: Vec<UnixStream> = (0..2)
        .map(|_| {
            let mut stream = server.connect();
            stream.write_all(b"GET /api/v1/vmm.pi").unwrap();
            stream
        })
        .collect();
    let started = Instant::now();
    let reply = server.call("GET", "vmm.ping", "");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(started.elapsed() >= Duration::from_millis(200), "it waited");
}

/// The status line as Cloud Hypervisor's server writes it, with no reason phrase: its client
/// reads the rest of the line as the number. Errors are its array of messages.
#[test]
fn status_lines_and_error_bodies_are_cloud_hypervisors() {
    let server = server();
    let reply = server.call("GET", "vmm.ping", "");
    assert!(reply.head.starts_with("HTTP/1.1 200 \r\n"), "{reply:?}");
    let reply = server.call("GET", "vm.nothing", "");
    assert!(reply.head.starts_with("HTTP/1.1 404 \r\n"), "{reply:?}");
    assert!(reply.json().is_array(), "{reply:?}");
}

/// A client that asks before sending its body (`Expect: 100-continue`, as curl does for
/// larger bodies) is told to go on once, and then answered.
#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let server = server();
    let mut stream = server.connect();
    let body = r#"{"path":"/images/hot.img"}"#;
    stream
        .write_all(
            format!(
                "PUT /api/v1/vm.add-disk HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
    let mut interim = [0u8; 17];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 \r\n\r\n");
    stream.write_all(body.as_bytes()).unwrap();
    let reply = read_reply(&mut stream);
    assert_eq!(reply.status, 501, "the fake's answer: {reply:?}");
    let requests = server.requests();
    let [Request::AddDisk(disk)] = requests.as_slice() else {
        panic!("the body arrived and was parsed: {requests:?}")
    };
    assert_eq!(disk.path(), std::path::Path::new("/images/hot.img"));
}

/// Sends `request` in one `sendmsg` with `count` descriptors (ends of pipes), as Kata's
/// `vm.add-net` does, and reads the answer.
fn send_with_files(server: &TestServer, request: &str, count: usize) -> Reply {
    use std::os::fd::{AsRawFd, FromRawFd};
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let pipes: Vec<(std::fs::File, std::fs::File)> = (0..count)
        .map(|_| {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors pipe makes, owned right below.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: both are fresh descriptors owned by nobody else.
            unsafe {
                (
                    std::fs::File::from_raw_fd(fds[0]),
                    std::fs::File::from_raw_fd(fds[1]),
                )
            }
        })
        .collect();
    let raw: Vec<i32> = pipes.iter().map(|(r, _)| r.as_raw_fd()).collect();
    let mut stream = server.connect();
    let sent = stream.send_with_fds(&[request.as_bytes()], &raw).unwrap();
    assert_eq!(sent, request.len());
    read_reply(&mut stream)
}

/// A tap passed as a descriptor reaches the VMM with its `vm.add-net`; a request with more
/// descriptors than any needs is refused.
#[test]
fn descriptors_passed_with_add_net_reach_the_vmm_and_too_many_are_refused() {
    let server = server();
    let body = r#"{"mac":"aa:bb:cc:dd:ee:01","num_queues":4}"#;
    let request = format!(
        "PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let reply = send_with_files(&server, &request, 2);
    assert_eq!(reply.status, 501, "the fake's answer: {reply:?}");
    let requests = server.requests();
    let [Request::AddNet(net, files)] = requests.as_slice() else {
        panic!("one add-net: {requests:?}")
    };
    assert_eq!(net.num_queues, 4);
    assert_eq!(files.len(), 2, "{files:?}");

    let reply = send_with_files(&server, &request, 17);
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply.error().contains("more than 16 file descriptors"),
        "{reply:?}"
    );
    assert_eq!(server.requests().len(), 1, "nothing more reached the VMM");
}
