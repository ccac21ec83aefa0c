//! Kata Containers' Go runtime (`src/runtime/virtcontainers/clh.go`) driving a VMM, replayed:
//! its command line, its calls in its order with its bodies (the generated OpenAPI client's
//! compact JSON with sorted keys and default fields) and header lines, its timeouts, and the
//! checks it makes on the replies. For the KVM host of the end-to-end tests
//! (`tests/orchestrators.rs`) and the start-up benchmark (`src/bin/startup-bench.rs`).
//!
//! `kata-replay VMM [--plain] [--boot-only] [--rootfs-iommu] [--sandbox] [--diagnose]`, run in a scratch directory with `L2_KERNEL` and
//! `L2_INITRAMFS` set, `rootfs.img` there and, unless `--boot-only` (which stops once the
//! guest's `/init` runs), `hot.img`. It starts
//! `VMM --api-socket clh-api.sock -v` as Kata does with `enable_debug` (the serial console
//! then on the VMM's stdout, which it copies to its own), in its IOMMU mode unless `--plain`:
//! `platform.iommu_segments: [0]`, `iommu: true` on the rng, console, nets and hot-plugged
//! disks, and `iommu=pt` on the command line. With `--sandbox`, the body is a sandbox's as Kata
//! sends it by default (`shared_fs = "virtio-fs"`): `num_pci_segments: 2`, the agent's `vsock`
//! (`clh.sock`, behind the IOMMU in its IOMMU mode) and the share (`fs`, tag `kataShared`, on
//! segment 1), its virtiofsd started first with Kata's arguments on the directory `share`
//! (`virtiofsd` on `PATH`); after boot the runtime dials its agent through the vsock
//! (`CONNECT 1024`, Kata's hybrid vsock dialer) until the agent answers, and once the guest
//! says `KATA-GUEST-FS-DONE` virtiofsd is killed (`KATA-VIRTIOFSD-KILLED`), as when it
//! crashes. Without `--sandbox` (the start-up benchmark), one segment, no vsock, no share.
//!
//! It prints `KATA-STEP <name> <status> <ms> <body>` per call, `KATA-TIME <step>=<ms>` (`ping`
//! from the VMM's start, the others from `vmm.ping`'s first answer), the VMM's peak RSS before
//! it stops, `KATA-FAIL <why>` where Kata would give up (then it kills the VMM), and exits
//! with the VMM's exit status.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use e2e::wire::{self, console::Lines, Reply};
use serde_json::{json, Value};

const SOCKET: &str = "clh-api.sock";
/// The hybrid vsock's socket, where Kata puts it beside the API's.
const VSOCK_SOCKET: &str = "clh.sock";
/// virtiofsd's socket (`virtiofsd.sock` in the sandbox's directory) and the shared directory.
const VIRTIOFSD_SOCKET: &str = "virtiofsd.sock";
const SHARED_DIR: &str = "share";
/// `vSockPort`: where Kata's agent listens.
const AGENT_PORT: u32 = 1024;
/// `dial_timeout`'s default in Kata's configuration.
const AGENT_DIAL_TIMEOUT: Duration = Duration::from_secs(45);
/// `clhTimeout`: how long Kata waits for `vmm.ping` to answer.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(10);
/// `clhAPITimeout` as Kata stretches it for create and boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(10);
/// `clhHotPlugAPITimeout`.
const HOTPLUG_TIMEOUT: Duration = Duration::from_secs(5);
/// `getClhAPITimeout()`: info, pause, resume, resize.
const API_TIMEOUT: Duration = Duration::from_secs(1);
/// `clhStopSandboxTimeout`: the wait for the VMM to exit after `vmm.shutdown`.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// The guest's steps, generous for a nested test host.
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);
const TAP: &str = "tap0_kata";
const GUEST_MAC: &str = "52:54:00:4b:41:01";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(vmm) = args.first() else {
        eprintln!(
            "usage: kata-replay VMM [--plain] [--boot-only] [--rootfs-iommu] [--sandbox] [--diagnose]"
        );
        return ExitCode::from(2);
    };
    let mode = Mode {
        iommu: !args.iter().any(|a| a == "--plain"),
        boot_only: args.iter().any(|a| a == "--boot-only"),
        rootfs_iommu: args.iter().any(|a| a == "--rootfs-iommu"),
        sandbox: args.iter().any(|a| a == "--sandbox"),
        diagnose: args.iter().any(|a| a == "--diagnose"),
    };
    // `setupVirtiofsDaemon`: virtiofsd listens before the VMM starts.
    let virtiofsd = match mode.sandbox.then(start_virtiofsd).transpose() {
        Ok(virtiofsd) => virtiofsd,
        Err(why) => {
            println!("KATA-FAIL {why}");
            return ExitCode::from(3);
        }
    };
    let mut child = match Command::new(vmm)
        .args(["--api-socket", SOCKET, "-v"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(err) => {
            println!("KATA-FAIL cannot start {vmm}: {err}");
            return ExitCode::from(3);
        }
    };
    let started = Instant::now();
    let console = Lines::default();
    let stamped = mode.diagnose.then_some(started);
    console.follow(child.stdout.take().expect("piped"), stamped);
    let mut kata = Kata {
        console,
        started,
        ready: None,
        mode,
        virtiofsd,
    };
    let result = kata.run(&mut child);
    if let Some(mut virtiofsd) = kata.virtiofsd.take() {
        let _ = virtiofsd.kill();
        let _ = virtiofsd.wait();
    }
    if let Err(why) = &result {
        println!("KATA-FAIL {why}");
        let _ = child.kill();
    }
    let status = child.wait().ok().and_then(|s| s.code()).unwrap_or(137);
    println!("KATA-VMM-EXIT={status}");
    match result {
        Ok(()) => ExitCode::from(status as u8),
        Err(_) => ExitCode::from(1),
    }
}

#[derive(Clone, Copy)]
struct Mode {
    iommu: bool,
    boot_only: bool,
    /// The rootfs's own `iommu` flag true in the IOMMU mode, which Kata leaves false: Cloud
    /// Hypervisor refuses Kata's body at `vm.boot` ("Device is on an IOMMU PCI segment (0)
    /// but not placed behind IOMMU"), warden puts the rootfs behind the IOMMU either way.
    rootfs_iommu: bool,
    /// Two PCI segments and the agent's vsock, which the runtime then dials.
    sandbox: bool,
    /// For a benchmark's diagnosis: the console's lines stamped with the milliseconds since
    /// the VMM started, and the decompressor's messages on it (`earlyprintk`).
    diagnose: bool,
}

struct Kata {
    console: Lines,
    started: Instant,
    /// When `vmm.ping` first answered.
    ready: Option<Instant>,
    mode: Mode,
    /// The share's back end, until it is killed.
    virtiofsd: Option<Child>,
}

/// virtiofsd as `virtiofsd.go` starts it (`virtio_fs_cache = auto`, Kata's default extra
/// arguments), but for the nested host's bare initramfs: `--sandbox none`, and its log on
/// stderr rather than a syslog there is none of. Returns once its socket is there.
fn start_virtiofsd() -> Result<Child, String> {
    std::fs::create_dir_all(SHARED_DIR).map_err(|e| format!("cannot make {SHARED_DIR}: {e}"))?;
    let mut child = Command::new("virtiofsd")
        .args(["--cache=auto", "--sandbox=none"])
        .arg(format!("--shared-dir={SHARED_DIR}"))
        .arg(format!("--socket-path={VIRTIOFSD_SOCKET}"))
        .args(["--thread-pool-size=1", "--announce-submounts"])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start virtiofsd: {e}"))?;
    let started = Instant::now();
    while !std::path::Path::new(VIRTIOFSD_SOCKET).exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("virtiofsd exited: {status}"));
        }
        if started.elapsed() > LAUNCH_TIMEOUT {
            let _ = child.kill();
            return Err("virtiofsd never listened".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

impl Kata {
    fn run(&mut self, child: &mut Child) -> Result<(), String> {
        let mut api = self.wait_for_vmm(child)?;
        self.time("ping", self.started);
        let body = self.create_body()?;
        let reply = self.call(
            &mut api,
            "create",
            put("vm.create", &body, false),
            BOOT_TIMEOUT,
        )?;
        success(&reply, "vm.create")?;
        self.time("create", self.ready.expect("set"));
        let state = self.state(&mut api, "info-created")?;
        if state != "Created" {
            return Err(format!(
                "VM state is not 'Created' after 'CreateVM': {state}"
            ));
        }
        if !self.mode.boot_only {
            self.add_net_before_boot()?;
        }
        let reply = self.call(&mut api, "boot", put_empty("vm.boot"), BOOT_TIMEOUT)?;
        success(&reply, "vm.boot")?;
        self.time("boot", self.ready.expect("set"));
        let state = self.state(&mut api, "info-running")?;
        if state != "Running" {
            return Err(format!("VM state is not 'Running' after 'BootVM': {state}"));
        }
        let init = self.console.wait_for("WARDEN-L2-INIT", GUEST_TIMEOUT);
        init.ok_or("the guest's /init never ran")?;
        self.time("init", self.ready.expect("set"));
        if self.mode.sandbox {
            self.dial_agent()?;
            self.kill_virtiofsd()?;
        }
        if !self.mode.boot_only {
            self.hotplug(&mut api)?;
            self.control(&mut api)?;
        }
        self.stop(&mut api, child)
    }

    /// `isClhRunning`: `vmm.ping` every 10 ms (a second each) until it answers.
    fn wait_for_vmm(&mut self, child: &mut Child) -> Result<UnixStream, String> {
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("the VMM exited before answering: {status}"));
            }
            if let Ok(mut stream) = UnixStream::connect(SOCKET) {
                let sent = wire::send(&stream, &[&get("vmm.ping")], &[]);
                if let Ok(reply) = sent.and_then(|()| wire::read_reply(&mut stream, API_TIMEOUT)) {
                    // The generated client decodes the body, which needs the JSON type.
                    if reply.status < 300 && is_json(&reply) {
                        self.ready = Some(Instant::now());
                        self.step("ping", &reply, Duration::ZERO);
                        return Ok(stream);
                    }
                }
            }
            if self.started.elapsed() > LAUNCH_TIMEOUT {
                return Err("Failed to connect to API (timeout 10s)".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `vm.create`'s body as `clh.go` builds it with `enable_debug` (serial `Tty`).
    fn create_body(&self) -> Result<String, String> {
        let env = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
        let iommu = self.mode.iommu;
        // `clhKernelParams`, with `iommu=pt` after them in the IOMMU mode; `console=ttyS0`
        // is the debug console's.
        let mut cmdline = String::from("console=ttyS0 panic=1 no_timer_check noreplace-smp");
        if iommu {
            cmdline += " iommu=pt";
        }
        if self.mode.diagnose {
            cmdline += " earlyprintk=ttyS0";
        }
        let segments = if self.mode.sandbox { 2 } else { 1 };
        let mut platform = json!({"num_pci_segments": segments, "sev_snp": false, "tdx": false});
        if iommu {
            platform["iommu_segments"] = json!([0]);
        }
        let max_vcpus = available_cpus();
        let body = json!({
            "console": {"iommu": iommu, "mode": "Off"},
            // The image rootfs: read-only, and its own flag false even in the IOMMU mode.
            "disks": [{
                "backing_files": false, "direct": false, "image_type": "Raw",
                "iommu": iommu && self.mode.rootfs_iommu,
                "num_queues": 1, "path": "rootfs.img", "queue_size": 128, "readonly": true,
                "sparse": true, "vhost_user": false
            }],
            "cpus": {
                "boot_vcpus": 1, "kvm_hyperv": false, "max_vcpus": max_vcpus, "nested": true,
                "topology": {"cores_per_die": max_vcpus, "dies_per_package": 1, "packages": 1,
                             "threads_per_core": 1}
            },
            "iommu": false,
            "landlock_enable": false,
            "memory": {
                "hotplug_method": "Acpi", "hotplug_size": 2u64 << 30, "hugepages": false,
                "mergeable": false, "prefault": false, "shared": true, "size": 512u64 << 20,
                "thp": true
            },
            "payload": {
                "cmdline": cmdline,
                "initramfs": env("L2_INITRAMFS")?,
                "kernel": env("L2_KERNEL")?
            },
            "platform": platform,
            "pvpanic": false,
            "rng": {"iommu": iommu, "src": "/dev/urandom"},
            "serial": {"iommu": false, "mode": "Tty"},
            "watchdog": false
        });
        let mut body = body;
        if self.mode.sandbox {
            body["vsock"] = json!({"cid": 3, "iommu": iommu, "socket": VSOCK_SOCKET});
            body["fs"] = json!([{
                "num_queues": 1, "pci_segment": 1, "queue_size": 1024,
                "socket": VIRTIOFSD_SOCKET, "tag": "kataShared"
            }]);
        }
        Ok(body.to_string())
    }

    /// `vmAddNetPutRequest`: a new connection, the whole request in one `sendmsg` with the
    /// tap's one descriptor (`createLink` opens it without `IFF_MULTI_QUEUE`).
    fn add_net_before_boot(&mut self) -> Result<(), String> {
        let taps = wire::open_tap(TAP, 1, "192.168.249.1/24")
            .map_err(|err| format!("cannot open the tap: {err}"))?;
        let body = json!({
            "iommu": self.mode.iommu, "ip": "192.168.249.1", "mac": GUEST_MAC,
            "mask": "255.255.255.0", "num_queues": 2, "offload_csum": true, "offload_tso": true,
            "offload_ufo": true, "queue_size": 256, "vhost_mode": "Client", "vhost_user": false
        })
        .to_string();
        let request = format!(
            "PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Length: {}\r\nContent-Type: application/json\r\n\r\n{body}",
            body.len()
        );
        let mut stream = UnixStream::connect(SOCKET).map_err(|e| format!("add-net: {e}"))?;
        let fds: Vec<i32> = taps.iter().map(|t| t.as_raw_fd()).collect();
        let start = Instant::now();
        wire::send(&stream, &[request.as_bytes()], &fds).map_err(|e| format!("add-net: {e}"))?;
        // Kata closes its copies once sent.
        drop(taps);
        // No deadline on this path in clh.go; a generous one here.
        let reply =
            wire::read_reply(&mut stream, GUEST_TIMEOUT).map_err(|e| format!("add-net: {e}"))?;
        self.step("add-net", &reply, start.elapsed());
        if reply.status != 200 && reply.status != 204 {
            return Err(format!("vm.add-net: status {}", reply.status));
        }
        Ok(())
    }

    /// Once the guest is up: a disk hot-plugged (`hotplugAddBlockDevice`'s body), used by
    /// the guest, and removed (`HotplugRemoveDevice`), each call within Kata's 5 s.
    fn hotplug(&mut self, api: &mut UnixStream) -> Result<(), String> {
        self.console
            .wait_for("KATA-GUEST-READY", GUEST_TIMEOUT)
            .ok_or("the guest never got ready")?;
        let body = json!({
            "backing_files": false, "direct": false, "image_type": "Raw",
            "iommu": self.mode.iommu, "num_queues": 1, "path": "hot.img", "queue_size": 1024,
            "readonly": false, "sparse": true, "vhost_user": false
        })
        .to_string();
        let reply = self.call(
            api,
            "add-disk",
            put("vm.add-disk", &body, true),
            HOTPLUG_TIMEOUT,
        )?;
        success(&reply, "vm.add-disk")?;
        let added = reply.json().filter(|_| is_json(&reply));
        let added = added.ok_or("vm.add-disk: no PciDeviceInfo")?;
        let id = added["id"]
            .as_str()
            .ok_or("vm.add-disk: no id")?
            .to_string();
        let bdf = added["bdf"].as_str().ok_or("vm.add-disk: no bdf")?;
        // Kata turns `0000:00:DD.0` into the PCI path it gives its agent.
        let slot = bdf
            .strip_prefix("0000:00:")
            .and_then(|rest| rest.strip_suffix(".0"))
            .filter(|slot| slot.len() == 2 && u8::from_str_radix(slot, 16).is_ok())
            .ok_or_else(|| format!("vm.add-disk: unexpected bdf {bdf}"))?;
        println!("KATA-HOT-SLOT={slot}");
        self.console
            .wait_for("KATA-GUEST-HOT-DONE", GUEST_TIMEOUT)
            .ok_or("the guest never finished with the hot-plugged disk")?;
        let body = json!({ "id": id }).to_string();
        let reply = self.call(
            api,
            "remove-device",
            put("vm.remove-device", &body, false),
            HOTPLUG_TIMEOUT,
        )?;
        success(&reply, "vm.remove-device")?;
        self.console
            .wait_for("KATA-GUEST-HOT-GONE", GUEST_TIMEOUT)
            .ok_or("the hot-plugged disk never left the guest")?;
        Ok(())
    }

    /// The agent's channel as Kata's hybrid vsock dialer opens it: `CONNECT 1024` on the VMM's
    /// socket, an answer starting `OK` within 10 s, redialled until `dial_timeout` (45 s); then
    /// a line each way through it.
    fn dial_agent(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let mut tries = 0;
        loop {
            tries += 1;
            match dial(AGENT_PORT) {
                Ok((hello, echo)) => {
                    println!(
                        "KATA-AGENT {} {tries} {hello} echo={echo}",
                        started.elapsed().as_millis()
                    );
                    return Ok(());
                }
                Err(err) if started.elapsed() > AGENT_DIAL_TIMEOUT => {
                    return Err(format!(
                        "the agent never answered on vsock port {AGENT_PORT}: {err}"
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Kills the share's back end once the guest has used it, as a crash would.
    fn kill_virtiofsd(&mut self) -> Result<(), String> {
        self.console
            .wait_for("KATA-GUEST-FS-DONE", GUEST_TIMEOUT)
            .ok_or("the guest never finished with the share")?;
        let mut virtiofsd = self.virtiofsd.take().ok_or("no virtiofsd")?;
        if let Ok(Some(status)) = virtiofsd.try_wait() {
            return Err(format!("virtiofsd had exited already: {status}"));
        }
        virtiofsd
            .kill()
            .and_then(|()| virtiofsd.wait())
            .map_err(|e| format!("cannot kill virtiofsd: {e}"))?;
        println!("KATA-VIRTIOFSD-KILLED");
        Ok(())
    }

    /// `ResizeVCPUs` to what the VM has (vCPU hotplug is not warden's yet), then
    /// `PauseVM` / `ResumeVM`.
    fn control(&mut self, api: &mut UnixStream) -> Result<(), String> {
        let info = self.call(api, "info-resize", get("vm.info"), API_TIMEOUT)?;
        let vcpus = info
            .json()
            .and_then(|i| i["config"]["cpus"]["boot_vcpus"].as_u64())
            .ok_or("vm.info: no boot_vcpus")?;
        let body = json!({ "desired_vcpus": vcpus }).to_string();
        let reply = self.call(api, "resize", put("vm.resize", &body, false), API_TIMEOUT)?;
        success(&reply, "vm.resize")?;
        for name in ["vm.pause", "vm.resume"] {
            let reply = self.call(api, &name[3..], put_empty(name), API_TIMEOUT)?;
            success(&reply, name)?;
        }
        Ok(())
    }

    /// `terminate`: `vmm.ping`, `vmm.shutdown`, then up to 3 s for the process to go
    /// before SIGKILL.
    fn stop(&mut self, api: &mut UnixStream, child: &mut Child) -> Result<(), String> {
        if let Some(peak) = peak_rss_kib(child.id()) {
            println!("KATA-PEAK-RSS-KIB={peak}");
        }
        let reply = self.call(api, "ping-stop", get("vmm.ping"), API_TIMEOUT)?;
        success(&reply, "vmm.ping")?;
        let reply = self.call(api, "shutdown", put_empty("vmm.shutdown"), API_TIMEOUT)?;
        success(&reply, "vmm.shutdown")?;
        let start = Instant::now();
        while start.elapsed() < STOP_TIMEOUT {
            if let Ok(Some(_)) = child.try_wait() {
                println!("KATA-STOPPED-MS={}", start.elapsed().as_millis());
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("the VMM was still running 3 s after vmm.shutdown: SIGKILL".into())
    }

    fn state(&mut self, api: &mut UnixStream, name: &str) -> Result<String, String> {
        let reply = self.call(api, name, get("vm.info"), API_TIMEOUT)?;
        success(&reply, "vm.info")?;
        let info = reply.json().ok_or("vm.info: not JSON")?;
        Ok(info["state"].as_str().unwrap_or_default().to_string())
    }

    /// One call on Kata's keep-alive connection, within `timeout`.
    fn call(
        &self,
        api: &mut UnixStream,
        name: &str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Reply, String> {
        let start = Instant::now();
        wire::send(api, &[&request], &[]).map_err(|e| format!("{name}: {e}"))?;
        let reply = wire::read_reply(api, timeout).map_err(|e| format!("{name}: {e}"))?;
        self.step(name, &reply, start.elapsed());
        Ok(reply)
    }

    fn step(&self, name: &str, reply: &Reply, took: Duration) {
        println!(
            "KATA-STEP {name} {} {} {}",
            reply.status,
            took.as_millis(),
            reply.body_text()
        );
    }

    fn time(&self, step: &str, since: Instant) {
        println!(
            "KATA-TIME {step}={:.1}",
            since.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// The generated client's GET (it asks for JSON).
fn get(path: &str) -> Vec<u8> {
    format!(
        "GET /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: OpenAPI-Generator/1.0.0/go\r\n\
         Accept: application/json\r\nAccept-Encoding: gzip\r\n\r\n"
    )
    .into_bytes()
}

/// The generated client's PUT with a JSON body; `answers_json` where the reply has one
/// (`vm.add-disk`, `vm.add-device`).
fn put(path: &str, body: &str, answers_json: bool) -> Vec<u8> {
    let accept = if answers_json {
        "Accept: application/json\r\n"
    } else {
        ""
    };
    format!(
        "PUT /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: OpenAPI-Generator/1.0.0/go\r\n\
         Content-Length: {}\r\nContent-Type: application/json\r\n{accept}Accept-Encoding: gzip\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The generated client's PUT without a body.
fn put_empty(path: &str) -> Vec<u8> {
    format!(
        "PUT /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: OpenAPI-Generator/1.0.0/go\r\n\
         Content-Length: 0\r\nAccept-Encoding: gzip\r\n\r\n"
    )
    .into_bytes()
}

/// Go's generated client: any status under 300 succeeds.
fn success(reply: &Reply, call: &str) -> Result<(), String> {
    if reply.status < 300 {
        Ok(())
    } else {
        Err(format!(
            "{call}: error: {} reason: {}",
            reply.status,
            reply.body_text()
        ))
    }
}

/// The generated client decodes a body only with a JSON content type (`undefined response
/// type` otherwise).
fn is_json(reply: &Reply) -> bool {
    reply.body.is_empty()
        || reply
            .header("content-type")
            .is_some_and(|t| t.contains("json"))
}

/// The VMM's peak resident set so far (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `default_maxvcpus = 0`: the host's CPUs.
fn available_cpus() -> Value {
    let count = std::thread::available_parallelism().map_or(1, |n| n.get());
    json!(count)
}

/// One dial of the agent: `CONNECT port`, `OK ...`, the agent's greeting, and a line echoed.
fn dial(port: u32) -> Result<(String, String), String> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = UnixStream::connect(VSOCK_SOCKET).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with("OK") {
        return Err(format!("answered {line:?}"));
    }
    let mut hello = String::new();
    reader.read_line(&mut hello).map_err(|e| e.to_string())?;
    stream
        .write_all(b"kata-ping\n")
        .map_err(|e| e.to_string())?;
    let mut echo = String::new();
    reader.read_line(&mut echo).map_err(|e| e.to_string())?;
    Ok((hello.trim().to_string(), echo.trim().to_string()))
}
