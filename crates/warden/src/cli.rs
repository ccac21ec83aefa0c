//! The command line, compatible with Cloud Hypervisor's: the VM's options parsed into a
//! [`VmConfig`] (each by its section's parser in `vm_config`, validated as `vm.create`'s body
//! is), and the VMM's own into [`VmmOptions`].

use std::path::{Path, PathBuf};

use clap::Parser;
use vm_config::options::KeyValues;
use vm_config::{
    ConfigError, ConsoleConfig, CpusConfig, DeviceConfig, DiskConfig, FsConfig, MemoryConfig,
    NetConfig, PayloadConfig, PlatformConfig, RngConfig, Section, SerialConfig, VmConfig,
    VsockConfig,
};
use vmm::options::{ApiSocket, MonitorTarget, VmmOptions};

/// The Cloud Hypervisor release whose command line and REST API warden follows.
pub const CLOUD_HYPERVISOR_VERSION: &str = "54.0.0";

#[derive(Parser, Debug)]
#[command(
    name = "warden",
    disable_version_flag = true,
    about = "A KVM virtual machine monitor with a virtual IOMMU (virtio-iommu).",
    after_help = "Devices tagged iommu=on sit behind a virtio-iommu (PCI 00:01.0) described by the ACPI VIOT table: every DMA they make is translated through the guest's MAP/UNMAP requests. Default: iommu=off."
)]
pub struct Cli {
    /// vCPUs: N, or boot=N[,max=M][,topology=1:M:1:1][,max_phys_bits=46][,nested=on]. max
    /// is recorded (no vCPU hotplug yet); nested=off hides VMX/SVM from the guest.
    #[arg(long, value_name = "boot=N", default_value = "boot=1")]
    cpus: String,

    /// Guest RAM: size=SIZE[,file=PATH][,hugepages=on][,shared=on][,prefault=on][,thp=off]
    /// [,mergeable=on]. file= may name a directory such as a hugetlbfs mount
    /// (/dev/hugepages); hugepages=on uses an anonymous huge-page memfd; shared=on maps RAM
    /// shared (a memfd when anonymous); prefault=on populates it at start; thp (default on)
    /// asks for transparent huge pages; mergeable=on lets KSM merge its pages.
    #[arg(
        long,
        value_name = "size=512M[,file=PATH][,hugepages=on][,shared=on]",
        default_value = "size=512M"
    )]
    memory: String,

    /// Guest kernel: an ELF vmlinux (PVH or 64-bit entry) or a bzImage. Without it warden
    /// starts with no VM and waits for vm.create on --api-socket.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = "console=ttyS0")]
    cmdline: String,

    /// virtio-blk disk (repeatable):
    /// path=PATH[,readonly=on][,direct=on][,num_queues=1][,queue_size=256][,iommu=on].
    /// PATH is a raw image or a block device. Accepts iommu=on.
    #[arg(long, value_name = "path=PATH[,readonly=on][,iommu=on]")]
    disk: Vec<String>,

    /// virtio-rng entropy device: [src=PATH][,iommu=on]. Accepts iommu=on.
    #[arg(
        long,
        value_name = "src=PATH[,iommu=on]",
        default_value = "src=/dev/urandom"
    )]
    rng: String,

    /// COM1 8250 UART: off, null, tty or file=PATH. Does not DMA, so no iommu=.
    #[arg(long, value_name = "off|null|tty|file=PATH", default_value = "tty")]
    serial: String,

    /// virtio-console: off, null, tty or file=PATH[,iommu=on]. Accepts iommu=on.
    #[arg(
        long,
        value_name = "off|null|tty|file=PATH[,iommu=on]",
        default_value = "null"
    )]
    console: String,

    /// virtio-net on a tap device (repeatable):
    /// tap=NAME,mac=MAC[,ip=IP,mask=MASK][,num_queues=2][,queue_size=256][,iommu=on][,vhost=on].
    /// An empty or absent tap= creates a new tap vmtapN; an existing tap is opened. An empty or
    /// absent mac= picks a random locally administered MAC. ip=/mask= (default 255.255.255.0)
    /// configure the host end of the tap. num_queues counts receive and transmit queues (2 per
    /// pair). vhost=on: the kernel's vhost-net (/dev/vhost-net) moves the frames, behind the
    /// IOMMU too (device IOTLB). Accepts iommu=on.
    #[arg(
        long,
        value_name = "tap=NAME,mac=MAC[,ip=..,mask=..][,iommu=on][,vhost=on]"
    )]
    net: Vec<String>,

    /// VFIO passthrough of a host PCI device (repeatable): path=/sys/bus/pci/devices/..[,iommu=on][,id=ID].
    /// Accepts iommu=on: its DMA then follows the guest's IOMMU mappings; without, all guest
    /// RAM is mapped for it. The device must be bound to vfio-pci; warden needs root.
    #[arg(long, value_name = "path=SYSFS_PATH[,iommu=on][,id=ID]")]
    device: Vec<String>,

    /// virtio-vsock: cid=N,socket=PATH[,iommu=on][,id=ID][,pci_segment=N]. Host programs
    /// reach guest port P by connecting to the Unix socket PATH and writing "CONNECT P\n"
    /// (answered "OK <host port>\n"); the guest reaches host port P at the Unix socket
    /// PATH_P. PATH (at most 96 bytes) must not exist; warden removes it when the device goes.
    #[arg(
        long,
        value_name = "cid=N,socket=PATH[,iommu=on][,id=ID][,pci_segment=N]"
    )]
    vsock: Option<String>,

    /// virtio-fs share (repeatable): tag=TAG,socket=PATH[,num_queues=1][,queue_size=1024][,id=ID][,pci_segment=N].
    /// A vhost-user back end (virtiofsd) must listen at PATH; the guest mounts the share with
    /// `mount -t virtiofs TAG DIR`. Needs --memory shared=on (the back end maps guest RAM).
    /// Not behind the IOMMU: put it on a segment outside iommu_segments.
    #[arg(
        long,
        value_name = "tag=TAG,socket=PATH[,num_queues=N][,queue_size=N][,id=ID][,pci_segment=N]"
    )]
    fs: Vec<String>,

    /// Platform settings: iommu=on creates the virtio-iommu even when no device starts behind
    /// it, so that protected devices can be hot-plugged (`--api-socket`); iommu_segments=[0]
    /// puts every device of PCI segment 0 behind it; iommu_address_width=N (bits, default 64)
    /// bounds the addresses the guest may map through it; iommu_poll_us=N, the longest (in microseconds) the virtio-iommu
    /// polls its request queue after a request before waiting for a notification again, so
    /// that a guest's back-to-back MAPs need no VM exit (default 2000). The window adapts
    /// below it; 0 turns polling off. Polling uses a host CPU while the guest keeps sending
    /// requests.
    #[arg(
        long,
        value_name = "[iommu=on][,iommu_segments=[0]][,iommu_address_width=N][,iommu_poll_us=N]",
        default_value = "",
        hide_default_value = true
    )]
    platform: String,

    /// seccomp filters on every thread: true (a system call outside a thread's allow-list ends
    /// warden with one line naming the thread and the call), log (the kernel logs such calls
    /// and lets them run) or false (no filter).
    #[arg(long, value_name = "true|false|log", default_value = "true")]
    seccomp: String,

    /// Cloud Hypervisor's REST API (HTTP/1.1) on a Unix socket: path=PATH (a stale socket there
    /// is replaced) or fd=N (a listening socket warden inherits). E.g.
    /// curl --unix-socket PATH http://localhost/api/v1/vmm.ping
    #[arg(long, value_name = "path=PATH|fd=N")]
    api_socket: Option<String>,

    /// Cloud Hypervisor's event stream (pretty JSON events, a blank line after each: the VMM's
    /// and the VM's lifecycle, devices the guest released): path=PATH (a file, or a FIFO
    /// whose reader is waited for) or fd=N.
    #[arg(long, value_name = "path=PATH|fd=N")]
    event_monitor: Option<String>,

    /// Log level: error, warn, info, debug (every IOMMU request) or trace. RUST_LOG also works.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<log::LevelFilter>,

    /// Prints `cloud-hypervisor v54.0.0-warden.X.Y.Z`: the Cloud Hypervisor release whose
    /// command line and API warden follows (libvirt reads it, up to the first '-'), then
    /// warden's own version.
    #[arg(short = 'V', long)]
    pub version: bool,

    /// Write the log to this file instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// More log: -v info, -vv debug, -vvv trace (Cloud Hypervisor's flag); --log-level wins.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    verbose: u8,

    /// A guest's reset (reboot, panic, triple fault) ends warden (exit 1) instead of booting
    /// the VM again.
    #[arg(long)]
    no_reboot: bool,
}

/// A user error, phrased as one line naming the option.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    #[error("{}", .0.for_command_line())]
    Config(ConfigError),
    #[error("--{option}: {} does not exist; {hint}", .path.display())]
    Missing {
        option: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("--{option}: {message}")]
    Vmm {
        option: &'static str,
        message: String,
    },
    #[error("cannot pick a random MAC address for a net ({0}); give one with mac=")]
    RandomMac(String),
}

impl From<ConfigError> for CliError {
    fn from(err: ConfigError) -> Self {
        CliError::Config(err)
    }
}

/// Each of a repeatable option's values, parsed; an error names which.
fn list<T>(
    texts: &[String],
    parse: fn(&str) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| parse(text).map_err(|e| e.at(i)))
        .collect()
}

/// What the command line asks of a file: that it exists, named by its option.
fn existing(option: &'static str, path: &Path, hint: &'static str) -> Result<(), CliError> {
    if path.exists() {
        Ok(())
    } else {
        Err(CliError::Missing {
            option,
            path: path.to_path_buf(),
            hint,
        })
    }
}

const A_FILE: &str = "give the path of an existing file";

/// What `--version` prints: see [`Cli::version`].
pub fn version_line() -> String {
    format!(
        "cloud-hypervisor v{CLOUD_HYPERVISOR_VERSION}-warden.{}",
        env!("CARGO_PKG_VERSION")
    )
}

impl Cli {
    /// The log level asked for, by `--log-level` or `-v`.
    pub fn log_level(&self) -> Option<log::LevelFilter> {
        self.log_level.or(match self.verbose {
            0 => None,
            1 => Some(log::LevelFilter::Info),
            2 => Some(log::LevelFilter::Debug),
            _ => Some(log::LevelFilter::Trace),
        })
    }

    /// Validates every option: the VM they describe (none without `--kernel`, when the API
    /// is to create it), validated and resolved as a `vm.create` body is, and the VMM's own
    /// settings.
    pub fn into_config(self) -> Result<(Option<VmConfig>, VmmOptions), CliError> {
        let options = VmmOptions {
            seccomp: self.seccomp.parse().map_err(|message| CliError::Vmm {
                option: "seccomp",
                message,
            })?,
            api_socket: self
                .api_socket
                .as_deref()
                .map(|text| {
                    path_or_fd("api-socket", text).map(|target| match target {
                        PathOrFd::Path(path) => ApiSocket::Path(path),
                        PathOrFd::Fd(fd) => ApiSocket::Fd(fd),
                    })
                })
                .transpose()?,
            no_reboot: self.no_reboot,
            event_monitor: self
                .event_monitor
                .as_deref()
                .map(|text| {
                    path_or_fd("event-monitor", text).map(|target| match target {
                        PathOrFd::Path(path) => MonitorTarget::Path(path),
                        PathOrFd::Fd(fd) => MonitorTarget::Fd(fd),
                    })
                })
                .transpose()?,
        };
        let Some(kernel) = self.kernel else {
            return match options.api_socket {
                Some(_) => Ok((None, options)),
                None => Err(CliError::Vmm {
                    option: "kernel",
                    message: "is required without --api-socket; give the guest kernel (vmlinux or bzImage)".into(),
                }),
            };
        };
        let (platform, iommu) = PlatformConfig::parse(&self.platform)?;
        let mut config = VmConfig {
            cpus: CpusConfig::parse(&self.cpus)?,
            memory: MemoryConfig::parse(&self.memory)?,
            payload: Some(PayloadConfig {
                kernel: Some(kernel),
                cmdline: Some(self.cmdline),
                initramfs: self.initramfs,
                ..Default::default()
            }),
            disks: list(&self.disk, DiskConfig::parse)?,
            net: list(&self.net, NetConfig::parse)?,
            rng: RngConfig::parse(&self.rng)?,
            serial: SerialConfig::parse(&self.serial)?,
            console: ConsoleConfig::parse(&self.console)?,
            devices: list(&self.device, DeviceConfig::parse)?,
            vsock: self.vsock.as_deref().map(VsockConfig::parse).transpose()?,
            fs: list(&self.fs, FsConfig::parse)?,
            iommu,
            platform: Some(platform),
            ..Default::default()
        };
        config.validate()?;
        let payload = config.payload();
        existing("kernel", payload.kernel(), A_FILE)?;
        if let Some(initramfs) = &payload.initramfs {
            existing("initramfs", initramfs, A_FILE)?;
        }
        for disk in &config.disks {
            existing("disk", disk.path(), A_FILE)?;
        }
        existing("rng", &config.rng.src, A_FILE)?;
        for device in &config.devices {
            existing(
                "device",
                device.path(),
                "give a host PCI device's sysfs path, e.g. path=/sys/bus/pci/devices/0000:01:00.0",
            )?;
        }
        config
            .resolve()
            .map_err(|err| CliError::RandomMac(err.to_string()))?;
        Ok((Some(config), options))
    }
}

/// A file the VMM opens, or one it inherited.
enum PathOrFd {
    Path(PathBuf),
    Fd(i32),
}

/// `option`'s `path=PATH`, `fd=N`, or a bare path, as Cloud Hypervisor takes them.
fn path_or_fd(option: &'static str, text: &str) -> Result<PathOrFd, CliError> {
    let refuse = |message: String| CliError::Vmm { option, message };
    if !text.contains('=') && !text.is_empty() {
        return Ok(PathOrFd::Path(PathBuf::from(text)));
    }
    let kv = KeyValues::parse(Section::Vm, text, &["path", "fd"]).map_err(|err| {
        refuse(match err.problem {
            vm_config::Problem::Syntax(message) => message,
            other => other.to_string(),
        })
    })?;
    match (kv.get("path"), kv.get("fd")) {
        (Some(path), None) if !path.is_empty() => Ok(PathOrFd::Path(PathBuf::from(path))),
        (None, Some(fd)) => fd
            .parse::<i32>()
            .ok()
            .filter(|&fd| fd > 2)
            .map(PathOrFd::Fd)
            .ok_or_else(|| {
                refuse(format!(
                    "fd={fd} is not a descriptor number above 2 (stdio)"
                ))
            }),
        _ => Err(refuse("give exactly one of path=PATH or fd=N".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_config::{ConsoleMode, MemoryBacking};
    use vmm::options::SeccompMode;

    fn parsed(args: &[&str]) -> Result<(VmConfig, VmmOptions), CliError> {
        let mut argv = vec!["warden", "--kernel", "/proc/self/exe"];
        argv.extend_from_slice(args);
        let (config, options) = Cli::try_parse_from(argv)
            .expect("clap accepts")
            .into_config()?;
        Ok((config.expect("a kernel was given"), options))
    }

    fn config(args: &[&str]) -> Result<VmConfig, CliError> {
        parsed(args).map(|(config, _)| config)
    }

    fn error(args: &[&str]) -> String {
        parsed(args).unwrap_err().to_string()
    }

    #[test]
    fn the_seed_command_line_parses() {
        let exe = std::env::current_exe().unwrap();
        let disk = format!("path={},iommu=on", exe.display());
        let config = config(&[
            "--cpus",
            "1",
            "--memory",
            "size=512M",
            "--cmdline",
            "console=ttyS0 root=/dev/vda",
            "--disk",
            &disk,
            "--rng",
            "iommu=on",
        ])
        .unwrap();
        assert_eq!(config.cpus.boot_vcpus, 1);
        assert_eq!(config.memory.size, 512 << 20);
        assert_eq!(config.memory.backing(), MemoryBacking::Anonymous);
        assert_eq!(config.disks.len(), 1);
        assert!(config.disks[0].iommu);
        assert!(!config.disks[0].readonly);
        assert_eq!(config.disks[0].id.as_deref(), Some("_disk0"));
        assert!(config.rng.iommu);
        assert!(config.iommu);
        assert_eq!(config.serial.mode, ConsoleMode::Tty);
        assert_eq!(config.console.mode, ConsoleMode::Null);
    }

    /// The command line is a `vm.create` body by another route: the same model, the same
    /// shape in `vm.info`.
    #[test]
    fn the_command_line_and_vm_create_build_the_same_config() {
        let from_cli =
            config(&["--cpus", "2", "--memory", "size=1G", "--cmdline", "quiet"]).unwrap();
        let mut from_api: VmConfig = serde_json::from_value(serde_json::json!({
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "memory": {"size": 1u64 << 30},
            "payload": {"kernel": "/proc/self/exe", "cmdline": "quiet"},
            "serial": {"mode": "Tty"},
            "console": {"mode": "Null"},
            "platform": {}
        }))
        .unwrap();
        from_api.validate().unwrap();
        from_api.resolve().unwrap();
        assert_eq!(from_cli, from_api);
    }

    /// libvirt's parser: the output starts with `cloud-hypervisor `, has no '/', and its
    /// version is what follows the `v`, up to the first '-'.
    #[test]
    fn the_version_reads_as_libvirt_parses_cloud_hypervisors() {
        let line = version_line();
        let version = line.strip_prefix("cloud-hypervisor v").unwrap();
        assert!(!line.contains('/'));
        assert_eq!(version.split('-').next(), Some(CLOUD_HYPERVISOR_VERSION));
        assert!(line.ends_with(env!("CARGO_PKG_VERSION")));
        assert!(Cli::try_parse_from(["warden", "-V"]).unwrap().version);
    }

    #[test]
    fn cpus_both_forms() {
        assert_eq!(config(&["--cpus", "boot=4"]).unwrap().cpus.boot_vcpus, 4);
        let cpus = config(&["--cpus", "boot=2,max=4"]).unwrap().cpus;
        assert_eq!((cpus.boot_vcpus, cpus.max_vcpus), (2, 4));
        assert_eq!(
            error(&["--cpus", "0"]),
            "--cpus: boot_vcpus: 0 is not from 1 to 254"
        );
        assert_eq!(
            error(&["--cpus", "boot=x"]),
            "--cpus: boot: x is not a number"
        );
        assert!(error(&["--cpus", "cores=2"]).starts_with("--cpus: unknown key 'cores'"));
    }

    #[test]
    fn seccomp_is_on_unless_turned_off_or_to_logging() {
        let mode = |args: &[&str]| parsed(args).map(|(_, o)| o.seccomp);
        assert_eq!(mode(&[]), Ok(SeccompMode::Enforce));
        assert_eq!(mode(&["--seccomp", "true"]), Ok(SeccompMode::Enforce));
        assert_eq!(mode(&["--seccomp", "log"]), Ok(SeccompMode::Log));
        assert_eq!(mode(&["--seccomp", "false"]), Ok(SeccompMode::Off));
        assert_eq!(
            error(&["--seccomp", "on"]),
            "--seccomp: `on`: expected true, false or log"
        );
    }

    #[test]
    fn platform_iommu_poll_window_and_segments() {
        let platform = |args: &[&str]| config(args).map(|c| c.platform());
        assert_eq!(platform(&[]).unwrap().iommu_poll_us(), 2000);
        assert!(!config(&[]).unwrap().iommu);
        let iommu = config(&["--platform", "iommu=on,iommu_poll_us=7"]).unwrap();
        assert!(iommu.iommu);
        assert_eq!(iommu.platform().iommu_poll_us(), 7);
        assert!(error(&["--platform", "iommu=yes"]).starts_with("--platform: iommu: "));
        assert_eq!(
            platform(&["--platform", "iommu_poll_us=0"])
                .unwrap()
                .iommu_poll_us(),
            0
        );
        assert_eq!(
            error(&["--platform", "iommu_poll_us=fast"]),
            "--platform: iommu_poll_us: fast is not a number"
        );
        assert!(error(&["--platform", "iommu_poll_us=1000001"]).contains("from 0 to 1000000"));
        assert!(error(&["--platform", "poll=1"]).starts_with("--platform: unknown key 'poll'"));
        let exe = std::env::current_exe().unwrap();
        let segment = config(&[
            "--platform",
            "iommu_segments=[0]",
            "--disk",
            &format!("path={}", exe.display()),
        ])
        .unwrap();
        assert!(segment.iommu && segment.disks[0].iommu && segment.rng.iommu);
        let two = config(&[
            "--platform",
            "num_pci_segments=2",
            "--disk",
            &format!("path={},pci_segment=1", exe.display()),
        ])
        .unwrap();
        assert_eq!(two.disks[0].pci_segment, 1);
        assert_eq!(
            error(&[
                "--platform",
                "num_pci_segments=2",
                "--disk",
                &format!("path={},pci_segment=2", exe.display()),
            ]),
            "--disk: pci_segment: 2 is not from 0 to 1"
        );
        assert!(error(&["--platform", "num_pci_segments=17"]).contains("is not from 1 to 16"));
    }

    #[test]
    fn memory_backings() {
        let m = config(&["--memory", "size=8G,file=/dev/hugepages"])
            .unwrap()
            .memory;
        assert_eq!(
            m.backing(),
            MemoryBacking::File(Path::new("/dev/hugepages"))
        );
        assert_eq!(m.size, 8 << 30);
        let m = config(&[
            "--memory",
            "size=1G,hugepages=on,shared=on,prefault=on,thp=off",
        ])
        .unwrap()
        .memory;
        assert_eq!(m.backing(), MemoryBacking::Hugepages);
        assert!(m.shared && m.prefault && !m.thp);
        assert!(error(&["--memory", "size=1M"]).starts_with("--memory: size: 1048576 is too small"));
        assert_eq!(
            error(&["--memory", "file=/x"]),
            "--memory: size is required"
        );
        assert!(error(&["--memory", "size=1G,file=/x,hugepages=on"]).contains("exclude each other"));
    }

    #[test]
    fn missing_files_name_their_option() {
        let err = error(&["--disk", "path=/no/such/disk.img"]);
        assert_eq!(
            err,
            "--disk: /no/such/disk.img does not exist; give the path of an existing file"
        );
        assert!(error(&["--initramfs", "/no/initrd"])
            .starts_with("--initramfs: /no/initrd does not exist"));
        assert!(error(&["--rng", "src=/no/rng"]).starts_with("--rng: /no/rng does not exist"));
        let err = Cli::try_parse_from(["warden"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(
            err.to_string().starts_with("--kernel: is required"),
            "{err}"
        );
    }

    #[test]
    fn outputs() {
        let c = config(&["--serial", "file=/tmp/s.log", "--console", "off"]).unwrap();
        assert_eq!(c.serial.mode, ConsoleMode::File);
        assert_eq!(c.serial.file.as_deref(), Some(Path::new("/tmp/s.log")));
        assert_eq!(c.console.mode, ConsoleMode::Off);
        assert!(error(&["--console", "tty"]).contains("only one of serial and console can be Tty"));
        assert!(error(&["--serial", "tty,iommu=on"]).starts_with("--serial: unknown key 'iommu'"));
        assert!(error(&["--serial", "tty,off"]).contains("exactly one of"));
        assert!(config(&["--serial", "null", "--console", "tty,iommu=on"]).is_ok());
        assert_eq!(
            config(&["--serial", "pty"]).unwrap().serial.mode,
            ConsoleMode::Pty
        );
        assert_eq!(
            error(&["--serial", "socket=/tmp/s"]),
            "--serial: mode: Socket is not supported by warden"
        );
    }

    #[test]
    fn devices() {
        let c = config(&[
            "--device",
            "path=/proc/self,iommu=on,id=nic0",
            "--device",
            "path=/proc",
        ])
        .unwrap();
        assert_eq!(c.devices[0].id.as_deref(), Some("nic0"));
        assert!(c.devices[0].iommu && !c.devices[1].iommu);
        assert_eq!(c.devices[1].id.as_deref(), Some("_vfio0"));
        assert!(c.iommu);
        assert_eq!(
            error(&["--device", "path=/sys/bus/pci/devices/0000:ff:00.0,iommu=on"]),
            "--device: /sys/bus/pci/devices/0000:ff:00.0 does not exist; give a host PCI device's sysfs path, e.g. path=/sys/bus/pci/devices/0000:01:00.0"
        );
        assert_eq!(
            error(&["--device", "iommu=on"]),
            "--device: path is required"
        );
        assert_eq!(
            error(&["--device", "path=/proc,iommu=yes"]),
            "--device: iommu: yes is not on or off"
        );
    }

    #[test]
    fn shares_need_shared_memory_and_a_tag() {
        let c = config(&[
            "--memory",
            "size=512M,shared=on",
            "--platform",
            "num_pci_segments=2",
            "--fs",
            "tag=share,socket=/run/fs.sock,pci_segment=1",
        ])
        .unwrap();
        assert_eq!(
            (
                c.fs[0].tag.as_str(),
                c.fs[0].pci_segment,
                c.fs[0].queue_size
            ),
            ("share", 1, 1024)
        );
        assert_eq!(c.fs[0].id.as_deref(), Some("_fs0"));
        assert_eq!(
            error(&["--fs", "tag=share,socket=/run/fs.sock"]),
            "--memory: shared: virtio-fs needs guest RAM its vhost-user back end can map: set shared=on"
        );
        assert_eq!(
            error(&[
                "--memory",
                "size=512M,shared=on",
                "--fs",
                "socket=/run/fs.sock"
            ]),
            "--fs: tag is required"
        );
    }

    #[test]
    fn net_defaults_pick_a_new_tap_and_a_random_local_mac() {
        let c = config(&["--net", "tap=,mac=,iommu=on", "--net", "tap=tap1"]).unwrap();
        assert!(c.iommu);
        let [first, second] = c.net.as_slice() else {
            panic!("two nets: {:?}", c.net)
        };
        assert_eq!(first.tap, None);
        assert!(first.iommu);
        assert_eq!(first.host_ipv4(), None);
        assert_eq!(first.queue_size, 256);
        let macs = [first.mac.unwrap(), second.mac.unwrap()];
        for mac in macs {
            assert_eq!(
                mac.octets()[0] & 0x03,
                0x02,
                "unicast, locally administered: {mac}"
            );
        }
        assert_ne!(macs[0], macs[1]);
        assert_eq!(second.tap.as_deref(), Some("tap1"));
        assert_eq!(
            (first.id.as_deref(), second.id.as_deref()),
            (Some("_net0"), Some("_net1"))
        );
        assert!(!second.iommu);
        assert!(!config(&["--net", "tap=tap1"]).unwrap().iommu);
    }

    #[test]
    fn net_options_are_parsed() {
        let c = config(&[
            "--net",
            "tap=vmtap7,mac=52:54:00:AB:cd:01,ip=192.168.249.1,mask=255.255.0.0,num_queues=2,queue_size=1024,id=n0",
        ])
        .unwrap();
        let net = &c.net[0];
        assert_eq!(net.tap.as_deref(), Some("vmtap7"));
        assert_eq!(net.mac.unwrap().to_string(), "52:54:00:ab:cd:01");
        assert_eq!(
            net.host_ipv4()
                .map(|(ip, mask)| (ip.to_string(), mask.to_string())),
            Some(("192.168.249.1".into(), "255.255.0.0".into()))
        );
        assert_eq!((net.queue_pairs(), net.queue_size), (1, 1024));
        assert_eq!(net.id.as_deref(), Some("n0"));
        assert!(!net.vhost);
        let c = config(&["--net", "num_queues=8,vhost=on"]).unwrap();
        assert_eq!(c.net[0].queue_pairs(), 4);
        assert!(c.net[0].vhost);
    }

    #[test]
    fn net_errors_name_the_option_and_the_field() {
        for (arg, expected) in [
            (
                "tap=,mac=zz",
                "--net: mac: \"zz\" is not a MAC address like 52:54:00:12:34:56",
            ),
            (
                "mac=52:54:00:12:34",
                "--net: mac: \"52:54:00:12:34\" is not a MAC address",
            ),
            (
                "mac=01:00:5e:00:00:01",
                "--net: mac: 01:00:5e:00:00:01 is a multicast address",
            ),
            ("tapp=x", "--net: unknown key 'tapp'"),
            ("tap=a/b", "--net: tap: \"a/b\" is not an interface name"),
            (
                "tap=waytoolongtapname",
                "--net: tap: \"waytoolongtapname\" is not",
            ),
            (
                "ip=fe80::1",
                "--net: ip: \"fe80::1\" is not an IPv4 address",
            ),
            ("ip=nope", "--net: ip: \"nope\" is not an IPv4 address"),
            (
                "ip=10.0.0.1,mask=255.0.255.0",
                "--net: mask: 255.0.255.0 is not a netmask",
            ),
            ("mask=255.255.255.0", "--net: mask needs ip"),
            (
                "num_queues=3",
                "--net: num_queues: 3 is not an even number from 2 to 32",
            ),
            ("num_queues=0", "--net: num_queues: 0 is not an even number"),
            (
                "num_queues=34",
                "--net: num_queues: 34 is not an even number",
            ),
            ("num_queues=x", "--net: num_queues: x is not a number"),
            (
                "queue_size=100",
                "--net: queue_size: 100 is not a power of two",
            ),
            (
                "queue_size=70000",
                "--net: queue_size: 70000 is not a number",
            ),
            ("iommu=yes", "--net: iommu: yes is not on or off"),
        ] {
            let err = error(&["--net", arg]);
            assert!(err.starts_with(expected), "{arg}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        assert_eq!(
            error(&["--net", "tap=t0", "--net", "tap=t0"]),
            "--net: tap: \"t0\" is given twice; each net needs its own tap"
        );
    }

    #[test]
    fn api_socket_by_path_or_descriptor() {
        let socket = |text: &str| parsed(&["--api-socket", text]).map(|(_, o)| o.api_socket);
        assert_eq!(parsed(&[]).unwrap().1.api_socket, None);
        assert_eq!(
            socket("path=/run/warden.sock"),
            Ok(Some(ApiSocket::Path("/run/warden.sock".into())))
        );
        assert_eq!(
            socket("/tmp/api.sock"),
            Ok(Some(ApiSocket::Path("/tmp/api.sock".into())))
        );
        assert_eq!(socket("fd=7"), Ok(Some(ApiSocket::Fd(7))));
        assert_eq!(
            error(&["--api-socket", "fd=1"]),
            "--api-socket: fd=1 is not a descriptor number above 2 (stdio)"
        );
        assert_eq!(
            error(&["--api-socket", "path=/a,fd=4"]),
            "--api-socket: give exactly one of path=PATH or fd=N"
        );
        assert_eq!(
            error(&["--api-socket", "path="]),
            "--api-socket: give exactly one of path=PATH or fd=N"
        );
        assert!(error(&["--api-socket", "sock=/a"]).starts_with("--api-socket: unknown key 'sock'"));
        let monitor = |text: &str| parsed(&["--event-monitor", text]).map(|(_, o)| o.event_monitor);
        assert_eq!(
            monitor("path=/run/events"),
            Ok(Some(MonitorTarget::Path("/run/events".into())))
        );
        assert_eq!(monitor("fd=9"), Ok(Some(MonitorTarget::Fd(9))));
        assert_eq!(
            error(&["--event-monitor", "fd=0"]),
            "--event-monitor: fd=0 is not a descriptor number above 2 (stdio)"
        );
    }

    #[test]
    fn disk_options() {
        let exe = std::env::current_exe().unwrap();
        let c = config(&["--disk", &format!("path={},readonly=on", exe.display())]).unwrap();
        assert!(c.disks[0].readonly);
        assert!(!c.disks[0].iommu);
        assert_eq!(
            error(&["--disk", "readonly=on"]),
            "--disk: path is required"
        );
        assert_eq!(
            error(&["--disk", "path=/x,iommu=yes"]),
            "--disk: iommu: yes is not on or off"
        );
        let c = config(&[
            "--disk",
            &format!(
                "path={},direct=on,num_queues=4,queue_size=128",
                exe.display()
            ),
        ])
        .unwrap();
        assert!(c.disks[0].direct);
        assert_eq!((c.disks[0].num_queues, c.disks[0].queue_size), (4, 128));
        let plain = config(&["--disk", &format!("path={}", exe.display())]).unwrap();
        assert!(!plain.disks[0].direct);
        assert_eq!(
            (plain.disks[0].num_queues, plain.disks[0].queue_size),
            (1, 256)
        );
        for (bad, message) in [
            ("num_queues=0", "num_queues: 0 is not from 1 to 64"),
            ("num_queues=65", "num_queues: 65 is not from 1 to 64"),
            ("num_queues=two", "num_queues: two is not a number"),
            ("queue_size=100", "queue_size: 100 is not a power of two"),
            ("queue_size=65536", "queue_size: 65536 is not a number"),
            ("direct=maybe", "direct: maybe is not on or off"),
        ] {
            let err = error(&["--disk", &format!("path={},{bad}", exe.display())]);
            assert!(err.starts_with(&format!("--disk: {message}")), "{err}");
        }
    }
}
