//! libvirt's Cloud Hypervisor driver (`src/ch/`) driving a VMM, replayed: `--version` parsed
//! as `ch_conf.c` parses it, the API socket bound and listening before the VMM starts
//! (`--api-socket fd=N`), the event monitor on a FIFO it opens for reading and frames as
//! `ch_events.c` does, `vm.create` with the body `ch_monitor.c` builds (PTY serial and console,
//! a disk named `virtio-disk0`), `vm.add-net` on a fresh connection in one `sendmsg` with the
//! tap's descriptor and its 500 ms reply deadline, curl's requests for the rest, `vm.info`'s
//! PTY path opened as `virsh console` opens it (the guest's console is read from there), a
//! live disk attach and detach, `vm.reboot` (with `vm.info` again on `vm:rebooted`),
//! `vm.pause`/`vm.resume`, `vm.shutdown`, and the stop libvirt makes on `vm:shutdown`:
//! SIGTERM, 10 s, SIGKILL. For the KVM host of the end-to-end tests (`tests/orchestrators.rs`).
//!
//! `libvirt-replay VMM`, in a scratch directory with `L2_KERNEL` and `L2_INITRAMFS` set and
//! `disk.img` and `hot.img` there. Prints `LIBVIRT-STEP <name> <status> <ms> <body>` per call,
//! `LIBVIRT-EVENT <source>:<event>` per event, `LIBVIRT-FAIL <why>` where libvirt would fail
//! the domain, and `LIBVIRT-STOP=...` for how the VMM ended.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use e2e::wire::{self, console::Lines, Reply};

const SOCKET: &str = "dom-socket";
const FIFO: &str = "dom-event-monitor-fifo";
/// `PKT_TIMEOUT_MS`: how long libvirt polls for `vm.add-net`'s reply.
const ADD_NET_TIMEOUT: Duration = Duration::from_millis(500);
/// libvirt sets no timeout on its curl calls; a bound so a hung VMM fails the run.
const CURL_TIMEOUT: Duration = Duration::from_secs(30);
/// `virProcessKillPainfully`: SIGTERM, then this long before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);
const TAP: &str = "vnet0";
const GUEST_MAC: &str = "52:54:00:12:34:56";

fn main() -> ExitCode {
    let Some(vmm) = std::env::args().nth(1) else {
        eprintln!("usage: libvirt-replay VMM");
        return ExitCode::from(2);
    };
    match run(&vmm) {
        Ok(code) => ExitCode::from(code),
        Err(why) => {
            println!("LIBVIRT-FAIL {why}");
            ExitCode::from(1)
        }
    }
}

fn run(vmm: &str) -> Result<u8, String> {
    let version = probe_version(vmm)?;
    println!("LIBVIRT-VERSION={version}");
    // CH_MULTIFD_IN_ADDNET (22.0) gates networking; 40.0 brings every capability.
    if version < 40_000_000 {
        return Err(format!("version {version} lacks the capabilities of 40.0"));
    }
    let listener = api_socket()?;
    make_fifo()?;
    let mut child = spawn(vmm, listener.as_raw_fd())?;
    drop(listener);
    let events = Events::default();
    let pid = child.id() as i32;
    let result =
        open_events(&events, pid).and_then(|()| Domain::new(events.clone()).start_to_stop());
    let stop = stop_process(&mut child, &events, result.is_ok());
    println!("LIBVIRT-EVENTS={}", events.names().join(" "));
    result?;
    stop
}

/// `chExtractVersion`: `VMM --version` with `LC_ALL=C`; `cloud-hypervisor ` then, past the
/// last `/` and one `v`, `major[.minor[.micro]]` up to the first `-`.
fn probe_version(vmm: &str) -> Result<u64, String> {
    let out = Command::new(vmm)
        .arg("--version")
        .env("LC_ALL", "C")
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {vmm} --version: {e}"))?;
    if !out.status.success() {
        return Err(format!("{vmm} --version: {}", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rest = text
        .strip_prefix("cloud-hypervisor ")
        .ok_or("Unexpected output of cloud-hypervisor binary")?;
    let rest = rest.rsplit_once('/').map_or(rest, |(_, after)| after);
    let rest = rest.strip_prefix('v').unwrap_or(rest);
    let rest = rest.split('-').next().unwrap_or_default();
    let mut parts = [0u64; 3];
    for (index, part) in rest.split('.').take(3).enumerate() {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        parts[index] = digits
            .parse()
            .map_err(|_| format!("Unable to parse cloud-hypervisor version: {rest}"))?;
        if digits.len() != part.len() {
            break;
        }
    }
    let version = parts[0] * 1_000_000 + parts[1] * 1000 + parts[2];
    if version < 15_000_000 {
        return Err(format!(
            "Cloud-Hypervisor version is too old (v15.0 is the minimum): {rest}"
        ));
    }
    Ok(version)
}

/// `chMonitorCreateSocket`: bound and listening (backlog 1), mode 0664.
fn api_socket() -> Result<UnixListener, String> {
    let _ = std::fs::remove_file(SOCKET);
    let listener = UnixListener::bind(SOCKET).map_err(|e| format!("bind {SOCKET}: {e}"))?;
    // SAFETY: listen on a socket this function owns.
    if unsafe { libc::listen(listener.as_raw_fd(), 1) } != 0 {
        return Err(format!("listen: {}", io::Error::last_os_error()));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(SOCKET, std::fs::Permissions::from_mode(0o664))
        .map_err(|e| format!("chmod {SOCKET}: {e}"))?;
    Ok(listener)
}

fn make_fifo() -> Result<(), String> {
    let _ = std::fs::remove_file(FIFO);
    let path = CString::new(FIFO).expect("no NUL");
    // SAFETY: mkfifo with a NUL-terminated path.
    if unsafe { libc::mkfifo(path.as_ptr(), 0o600) } != 0 {
        return Err(format!("mkfifo: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// `virCHMonitorNew`'s command: `VMM --api-socket fd=N --event-monitor path=FIFO`, the
/// socket passed as is, stdin `/dev/null`, a session of its own, output to the domain log
/// (here our stdout).
fn spawn(vmm: &str, socket: RawFd) -> Result<Child, String> {
    let mut command = Command::new(vmm);
    command
        .args(["--api-socket", &format!("fd={socket}")])
        .args(["--event-monitor", &format!("path={FIFO}")])
        .stdin(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls: fcntl and setsid.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(socket, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::setsid();
            Ok(())
        });
    }
    command
        .spawn()
        .map_err(|e| format!("cannot start {vmm}: {e}"))
}

/// What came through the event monitor, in order, as `source:event`, and whether the
/// VMM is being stopped already (the first of the event thread and a failure stops it).
#[derive(Clone, Default)]
struct Events(Arc<(Mutex<Vec<String>>, Condvar)>, Arc<AtomicBool>);

impl Events {
    /// SIGTERM to `pid` unless it was sent already.
    fn stop(&self, pid: i32) {
        if !self.1.swap(true, Ordering::SeqCst) {
            // SAFETY: kill on the pid of our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    fn names(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().clone()
    }

    fn push(&self, name: String) {
        println!("LIBVIRT-EVENT {name}");
        self.0 .0.lock().unwrap().push(name);
        self.0 .1.notify_all();
    }

    /// Waits for the `nth` (from 1) `name`.
    fn wait(&self, name: &str, nth: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut seen = self.0 .0.lock().unwrap();
        loop {
            if seen.iter().filter(|e| *e == name).count() >= nth {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            seen = self.0 .1.wait_timeout(seen, left).unwrap().0;
        }
    }
}

/// A blocking open for reading, which returns once the VMM opened the FIFO for writing; then
/// `virCHEventHandlerLoop`'s reads on a thread, which stops the VMM (`pid`) on a
/// `vm:shutdown` or `vmm:shutdown`, whenever it comes.
fn open_events(events: &Events, pid: i32) -> Result<(), String> {
    let (opened_tx, opened) = std::sync::mpsc::channel();
    let events = events.clone();
    std::thread::spawn(move || match File::open(FIFO) {
        Ok(fifo) => {
            let _ = opened_tx.send(Ok(()));
            read_events(fifo, &events, pid);
        }
        Err(err) => {
            let _ = opened_tx.send(Err(err.to_string()));
        }
    });
    match opened.recv_timeout(Duration::from_secs(10)) {
        Ok(result) => result.map_err(|e| format!("open the event monitor: {e}")),
        Err(_) => Err("the VMM never opened the event monitor FIFO for writing".into()),
    }
}

/// `virCHProcessEvents`: reads of at most `PIPE_BUF - 1` bytes; each balanced top-level
/// `{...}` is one event, which must have `source` and `event` (otherwise libvirt stops
/// reading events for good).
fn read_events(mut fifo: File, events: &Events, pid: i32) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = [0u8; 4095];
    loop {
        match fifo.read(&mut buffer) {
            // No writer (yet, or any more): libvirt sleeps a second and reads again.
            Ok(0) => std::thread::sleep(Duration::from_secs(1)),
            Ok(count) => pending.extend_from_slice(&buffer[..count]),
            Err(_) => return,
        }
        let mut depth = 0usize;
        let mut start = None;
        let mut consumed = 0;
        for (index, byte) in pending.iter().enumerate() {
            match byte {
                b'{' => {
                    if depth == 0 {
                        start = Some(index);
                    }
                    depth += 1;
                }
                b'}' if depth > 0 => {
                    depth -= 1;
                    if depth == 0 {
                        let object = &pending[start.expect("opened")..=index];
                        let Ok(value) = serde_json::from_slice::<serde_json::Value>(object) else {
                            println!("LIBVIRT-FAIL an event is not JSON");
                            return;
                        };
                        let (Some(source), Some(event)) =
                            (value["source"].as_str(), value["event"].as_str())
                        else {
                            println!("LIBVIRT-FAIL an event lacks source or event");
                            return;
                        };
                        let name = format!("{source}:{event}");
                        if name == "vm:shutdown" || name == "vmm:shutdown" {
                            // `virCHEventStopProcess` → `virProcessKillPainfully`.
                            events.stop(pid);
                        }
                        events.push(name);
                        consumed = index + 1;
                    }
                }
                _ => {}
            }
        }
        pending.drain(..consumed);
    }
}

/// The domain's life from `vm.create` to `vm.shutdown`.
struct Domain {
    /// libvirt's one curl handle, whose connection curl keeps alive.
    curl: Option<UnixStream>,
    events: Events,
    console: Lines,
    console_path: Option<String>,
    /// The console's PTY as `virsh console` types into it.
    keyboard: Option<File>,
}

impl Domain {
    fn new(events: Events) -> Self {
        Domain {
            curl: None,
            events,
            console: Lines::default(),
            console_path: None,
            keyboard: None,
        }
    }

    fn start_to_stop(&mut self) -> Result<(), String> {
        let kernel = std::env::var("L2_KERNEL").map_err(|_| "L2_KERNEL is not set")?;
        let initramfs = std::env::var("L2_INITRAMFS").map_err(|_| "L2_INITRAMFS is not set")?;
        // `virCHMonitorBuildVMJson`, keys in its order.
        let body = format!(
            r#"{{"console":{{"mode":"Pty"}},"serial":{{"mode":"Pty"}},"cpus":{{"boot_vcpus":1,"max_vcpus":1}},"memory":{{"size":536870912}},"payload":{{"kernel":"{kernel}","cmdline":"console=ttyS0 panic=-1","initramfs":"{initramfs}"}},"disks":[{{"path":"disk.img","id":"virtio-disk0"}}],"rng":{{"src":"/dev/urandom"}}}}"#
        );
        self.curl_put("create", "vm.create", Some(&body))?;
        self.add_net()?;
        self.curl_put("boot", "vm.boot", None)?;
        self.update_info("info")?;
        self.wait_guest("LIBVIRT-GUEST-READY")?;
        // Live attach and detach of a disk (`chDomainAttachDeviceLive`).
        self.curl_put(
            "add-disk",
            "vm.add-disk",
            Some(r#"{"path":"hot.img","id":"virtio-disk1"}"#),
        )?;
        self.wait_guest("LIBVIRT-GUEST-HOT-DONE")?;
        self.curl_put(
            "remove-device",
            "vm.remove-device",
            Some(r#"{"id":"virtio-disk1"}"#),
        )?;
        self.wait_guest("LIBVIRT-GUEST-REBOOT-READY")?;
        self.curl_put("reboot", "vm.reboot", None)?;
        if !self.events.wait("vm:rebooted", 1, GUEST_TIMEOUT) {
            return Err("no vm:rebooted event".into());
        }
        self.update_info("info-rebooted")?;
        self.wait_guest("LIBVIRT-GUEST-SECOND-BOOT")?;
        self.curl_put("pause", "vm.pause", None)?;
        self.curl_put("resume", "vm.resume", None)?;
        // Typed at the console: the resumed guest reads it.
        let keyboard = self.keyboard.as_mut().ok_or("no console")?;
        keyboard
            .write_all(b"resumed\r")
            .map_err(|e| format!("type at the console: {e}"))?;
        self.wait_guest("LIBVIRT-GUEST-TYPED=resumed")?;
        self.curl_put("shutdown", "vm.shutdown", None)
    }

    /// `virCHMonitorPut` (and `virCHMonitorCreateVM`): curl's PUT, success only 200 or 204.
    fn curl_put(&mut self, name: &str, path: &str, body: Option<&str>) -> Result<(), String> {
        let request = match body {
            Some(body) => format!(
                "PUT /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
            None => format!(
                "PUT /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
                 Content-Length: 0\r\n\r\n"
            ),
        };
        let reply = self.curl(name, &request)?;
        if reply.status != 200 && reply.status != 204 {
            return Err(format!(
                "Invalid HTTP response code from CH: {}",
                reply.status
            ));
        }
        Ok(())
    }

    /// One request on curl's kept-alive connection (opened again if the VMM closed it).
    fn curl(&mut self, name: &str, request: &str) -> Result<Reply, String> {
        let start = Instant::now();
        let mut stream = match self.curl.take() {
            Some(stream) => stream,
            None => UnixStream::connect(SOCKET).map_err(|e| format!("{name}: {e}"))?,
        };
        wire::send(&stream, &[request.as_bytes()], &[]).map_err(|e| format!("{name}: {e}"))?;
        let reply =
            wire::read_reply(&mut stream, CURL_TIMEOUT).map_err(|e| format!("{name}: {e}"))?;
        let closes = reply
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        if !closes {
            self.curl = Some(stream);
        }
        println!(
            "LIBVIRT-STEP {name} {} {} {}",
            reply.status,
            start.elapsed().as_millis(),
            reply.body_text()
        );
        Ok(reply)
    }

    /// `chProcessAddNetworkDevice`: its own connection, the request in one `sendmsg` with the
    /// tap's descriptor, a 500 ms poll and one `recv` of at most 1023 bytes, whose first line
    /// must read `HTTP/1.x 200` or `204`.
    fn add_net(&mut self) -> Result<(), String> {
        let taps = wire::open_tap(TAP, 1, "192.168.253.1/24")
            .map_err(|e| format!("cannot open the tap: {e}"))?;
        let body = format!(r#"{{"id":"net0","mac":"{GUEST_MAC}","iommu":true,"num_queues":2}}"#);
        let request = format!(
            "PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut stream = UnixStream::connect(SOCKET).map_err(|e| format!("add-net: {e}"))?;
        let fds: Vec<RawFd> = taps.iter().map(|t| t.as_raw_fd()).collect();
        let start = Instant::now();
        wire::send(&stream, &[request.as_bytes()], &fds).map_err(|e| format!("add-net: {e}"))?;
        drop(taps);
        let mut poll = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, alive for the call.
        let ready = unsafe { libc::poll(&mut poll, 1, ADD_NET_TIMEOUT.as_millis() as i32) };
        if ready <= 0 {
            return Err(format!("Poll on sock {} timed out", stream.as_raw_fd()));
        }
        let mut buffer = [0u8; 1023];
        let count = stream
            .read(&mut buffer)
            .map_err(|e| format!("add-net: {e}"))?;
        let text = String::from_utf8_lossy(&buffer[..count]).into_owned();
        let code: Option<u16> = text
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(1..))
            .and_then(|rest| rest.trim_start().get(..3))
            .and_then(|code| code.parse().ok());
        println!(
            "LIBVIRT-STEP add-net {} {} {}",
            code.unwrap_or(0),
            start.elapsed().as_millis(),
            text.replace(['\r', '\n'], " ")
        );
        match code {
            Some(200 | 204) => Ok(()),
            _ => Err(format!("Unexpected response from CH: {text}")),
        }
    }

    /// `virCHProcessUpdateInfo`: `vm.info`, then the serial PTY's path from
    /// `config.serial.file`, opened as `virsh console` would (once per path).
    fn update_info(&mut self, name: &str) -> Result<(), String> {
        let request =
            "GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
                       Content-Type: application/json\r\n\r\n";
        let reply = self.curl(name, request)?;
        let info = reply.json().ok_or("vm.info: not JSON")?;
        for device in ["serial", "console"] {
            let file = info["config"][device]["file"].as_str().unwrap_or_default();
            println!("LIBVIRT-{}-PTY={file}", device.to_uppercase());
        }
        let serial = info["config"]["serial"]["file"]
            .as_str()
            .ok_or("vm.info: no config.serial.file")?
            .to_string();
        if self.console_path.as_deref() != Some(serial.as_str()) {
            let pty = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(&serial)
                .map_err(|e| format!("open the console {serial}: {e}"))?;
            self.keyboard = Some(pty.try_clone().map_err(|e| format!("console: {e}"))?);
            self.console.follow(pty, None);
            self.console_path = Some(serial);
        }
        Ok(())
    }

    fn wait_guest(&self, marker: &str) -> Result<(), String> {
        self.console
            .wait_for(marker, GUEST_TIMEOUT)
            .map(|_| ())
            .ok_or_else(|| format!("the guest never printed {marker}"))
    }
}

/// The end of `virProcessKillPainfully` (SIGTERM, SIGKILL after 10 s), which the event
/// thread starts on `vm:shutdown` and this starts on a failure. Returns the exit code to
/// report: 0 when the VMM went within 10 s of the `vm:shutdown` that followed `vm.shutdown`.
fn stop_process(child: &mut Child, events: &Events, shut_down: bool) -> Result<u8, String> {
    let event_seen = shut_down && events.wait("vm:shutdown", 1, Duration::from_secs(30));
    events.stop(child.id() as i32);
    let start = Instant::now();
    while start.elapsed() < TERM_GRACE {
        if let Ok(Some(status)) = child.try_wait() {
            let how = status
                .signal()
                .map_or(format!("exit {}", status.code().unwrap_or(-1)), |s| {
                    format!("signal {s}")
                });
            println!(
                "LIBVIRT-STOP={how} after {} ms",
                start.elapsed().as_millis()
            );
            let _ = std::io::stdout().flush();
            return match (shut_down, event_seen) {
                (false, _) => Ok(1),
                (true, false) => Err("no vm:shutdown event after vm.shutdown".into()),
                (true, true) => Ok(0),
            };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    println!("LIBVIRT-STOP=SIGKILL");
    Err("the VMM outlived SIGTERM by 10 s".into())
}
