//! The command line, compatible with Cloud Hypervisor's, turned into a [`VmConfig`].

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use vmm::config::{
    ApiSocket, DeviceConfig, DiskConfig, MacAddr, MemoryBacking, MemoryConfig, NetConfig,
    OutputConfig, RngConfig, VmConfig,
};
use vmm::memory::MIN_MEMORY;

use crate::options::{parse_size, KeyValues, ParseResult};

/// The virtio-iommu's default longest poll window (see `--platform`): long enough to span a
/// whole 4 KiB read in the nested test host, where everything is emulated; on real hardware
/// the adaptive window stays far below it.
const DEFAULT_IOMMU_POLL: Duration = Duration::from_millis(2);

/// Largest vCPU count: xAPIC IDs are 8 bits and 0xff is the broadcast ID.
const MAX_CPUS: u8 = 254;

#[derive(Parser, Debug)]
#[command(
    name = "warden",
    version,
    about = "A KVM virtual machine monitor with a virtual IOMMU (virtio-iommu).",
    after_help = "Devices tagged iommu=on sit behind a virtio-iommu (PCI 00:01.0) described by the ACPI VIOT table: every DMA they make is translated through the guest's MAP/UNMAP requests. Default: iommu=off."
)]
pub struct Cli {
    /// Number of vCPUs: N or boot=N.
    #[arg(long, value_name = "boot=N", default_value = "boot=1")]
    cpus: String,

    /// Guest RAM: size=SIZE[,file=PATH][,hugepages=on][,shared=on]. file= may name a
    /// directory such as a hugetlbfs mount (/dev/hugepages); hugepages=on uses an anonymous
    /// huge-page memfd.
    #[arg(
        long,
        value_name = "size=512M[,file=PATH][,hugepages=on][,shared=on]",
        default_value = "size=512M"
    )]
    memory: String,

    /// Guest kernel: an ELF vmlinux (PVH or 64-bit entry) or a bzImage.
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

    /// Platform settings: iommu=on creates the virtio-iommu even when no device starts behind
    /// it, so that protected devices can be hot-plugged (`--api-socket`); iommu_poll_us=N, the longest (in microseconds) the virtio-iommu
    /// polls its request queue after a request before waiting for a notification again, so
    /// that a guest's back-to-back MAPs need no VM exit (default 2000). The window adapts
    /// below it; 0 turns polling off. Polling uses a host CPU while the guest keeps sending
    /// requests.
    #[arg(
        long,
        value_name = "[iommu=on][,iommu_poll_us=N]",
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

    /// Log level: error, warn, info, debug (every IOMMU request) or trace. RUST_LOG also works.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
}

/// A user error: the option it concerns and what is wrong, phrased as one line.
#[derive(Debug, PartialEq, Eq)]
pub struct CliError {
    pub option: &'static str,
    pub message: String,
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--{}: {}", self.option, self.message)
    }
}

fn in_option<T>(option: &'static str, result: ParseResult<T>) -> Result<T, CliError> {
    result.map_err(|message| CliError { option, message })
}

fn existing_file(option: &'static str, path: &Path) -> Result<(), CliError> {
    if path.exists() {
        Ok(())
    } else {
        Err(CliError {
            option,
            message: format!(
                "{} does not exist; give the path of an existing file",
                path.display()
            ),
        })
    }
}

impl Cli {
    /// Validates every option and builds the machine description.
    pub fn into_config(self) -> Result<VmConfig, CliError> {
        let cpus = in_option("cpus", parse_cpus(&self.cpus))?;
        let memory = in_option("memory", parse_memory(&self.memory))?;
        let kernel = self.kernel.ok_or(CliError {
            option: "kernel",
            message: "is required; give the guest kernel (vmlinux or bzImage)".into(),
        })?;
        existing_file("kernel", &kernel)?;
        if let Some(initramfs) = &self.initramfs {
            existing_file("initramfs", initramfs)?;
        }
        let disks = self
            .disk
            .iter()
            .map(|text| in_option("disk", parse_disk(text)))
            .collect::<Result<Vec<_>, _>>()?;
        for disk in &disks {
            existing_file("disk", &disk.path)?;
        }
        let rng = in_option("rng", parse_rng(&self.rng))?;
        existing_file("rng", &rng.src)?;
        let (serial, _) = in_option("serial", parse_output(&self.serial, false))?;
        let (console, console_iommu) = in_option("console", parse_output(&self.console, true))?;
        if serial == OutputConfig::Tty && console == OutputConfig::Tty {
            return Err(CliError {
                option: "console",
                message: "only one of --serial and --console can be tty; set the other to null, off or file=PATH".into(),
            });
        }
        let nets = self
            .net
            .iter()
            .map(|text| in_option("net", parse_net(text)))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, net) in nets.iter().enumerate() {
            if !net.tap.is_empty() && nets[..i].iter().any(|other| other.tap == net.tap) {
                return Err(CliError {
                    option: "net",
                    message: format!(
                        "tap={} is given twice; each --net needs its own tap",
                        net.tap
                    ),
                });
            }
        }
        let (iommu_poll, platform_iommu) = in_option("platform", parse_platform(&self.platform))?;
        let seccomp = in_option("seccomp", self.seccomp.parse())?;
        let api_socket = self
            .api_socket
            .as_deref()
            .map(|text| in_option("api-socket", parse_api_socket(text)))
            .transpose()?;
        let devices = self
            .device
            .iter()
            .map(|text| in_option("device", parse_device(text)))
            .collect::<Result<Vec<_>, _>>()?;
        for device in &devices {
            if !device.path.exists() {
                return Err(CliError {
                    option: "device",
                    message: format!(
                        "{} does not exist; give a host PCI device's sysfs path, e.g. path=/sys/bus/pci/devices/0000:01:00.0",
                        device.path.display()
                    ),
                });
            }
        }
        Ok(VmConfig {
            cpus,
            memory,
            kernel,
            initramfs: self.initramfs,
            cmdline: self.cmdline,
            disks,
            nets,
            rng: Some(rng),
            serial,
            console,
            console_iommu,
            devices,
            iommu_poll,
            platform_iommu,
            seccomp,
            api_socket,
        })
    }
}

fn parse_cpus(text: &str) -> ParseResult<u8> {
    let count = match text.parse::<u64>() {
        Ok(count) => count,
        Err(_) => {
            let kv = KeyValues::parse(text, &["boot"])?;
            let boot = kv.get("boot").ok_or("give boot=N or N")?;
            boot.parse::<u64>()
                .map_err(|_| format!("boot={boot} is not a number"))?
        }
    };
    u8::try_from(count)
        .ok()
        .filter(|&count| (1..=MAX_CPUS).contains(&count))
        .ok_or_else(|| format!("{count} vCPUs is out of range; give 1 to {MAX_CPUS}"))
}

fn parse_memory(text: &str) -> ParseResult<MemoryConfig> {
    let kv = KeyValues::parse(text, &["size", "file", "hugepages", "shared"])?;
    let size = parse_size(kv.get("size").ok_or("size= is required, e.g. size=512M")?)?;
    if size < MIN_MEMORY {
        return Err(format!(
            "size={size} is too small; give at least {}M",
            MIN_MEMORY >> 20
        ));
    }
    let backing = match (kv.get("file"), kv.switch("hugepages")?) {
        (Some(_), true) => {
            return Err("file= and hugepages=on exclude each other; for huge pages from a hugetlbfs mount give file=/dev/hugepages alone".into())
        }
        (Some(""), false) => return Err("file= needs a path".into()),
        (Some(path), false) => MemoryBacking::File(PathBuf::from(path)),
        (None, true) => MemoryBacking::Hugepages,
        (None, false) => MemoryBacking::Anonymous,
    };
    Ok(MemoryConfig {
        size,
        backing,
        shared: kv.switch("shared")?,
    })
}

/// Most request queues a disk takes: each is a thread and an io_uring.
const MAX_DISK_QUEUES: u16 = 64;

fn parse_disk(text: &str) -> ParseResult<DiskConfig> {
    let kv = KeyValues::parse(
        text,
        &[
            "path",
            "readonly",
            "iommu",
            "direct",
            "num_queues",
            "queue_size",
        ],
    )?;
    let path = kv
        .get("path")
        .filter(|path| !path.is_empty())
        .ok_or("path= is required, e.g. --disk path=disk.img")?;
    let number = |key: &str, default: u16| -> ParseResult<u16> {
        kv.get(key).map_or(Ok(default), |value| {
            value
                .parse::<u16>()
                .map_err(|_| format!("{key}={value} is not a number"))
        })
    };
    let num_queues = number("num_queues", 1)?;
    if !(1..=MAX_DISK_QUEUES).contains(&num_queues) {
        return Err(format!(
            "num_queues={num_queues} is not from 1 to {MAX_DISK_QUEUES}; give e.g. num_queues=2"
        ));
    }
    let queue_size = number("queue_size", DiskConfig::DEFAULT_QUEUE_SIZE)?;
    if !queue_size.is_power_of_two() || queue_size < 2 {
        return Err(format!(
            "queue_size={queue_size} is not a power of two from 2 to 32768; give e.g. queue_size=256"
        ));
    }
    Ok(DiskConfig {
        path: PathBuf::from(path),
        readonly: kv.switch("readonly")?,
        iommu: kv.switch("iommu")?,
        direct: kv.switch("direct")?,
        num_queues,
        queue_size,
    })
}

/// Longest accepted poll window: a second of spinning is surely a typo.
const MAX_IOMMU_POLL_US: u64 = 1_000_000;

/// `--platform`: the poll window, and whether to create the virtio-iommu even if no device
/// starts behind it (so that protected devices can be hot-plugged).
fn parse_platform(text: &str) -> ParseResult<(Duration, bool)> {
    let kv = KeyValues::parse(text, &["iommu_poll_us", "iommu"])?;
    let iommu = kv.switch("iommu")?;
    let Some(value) = kv.get("iommu_poll_us") else {
        return Ok((DEFAULT_IOMMU_POLL, iommu));
    };
    let poll = value
        .parse::<u64>()
        .ok()
        .filter(|&us| us <= MAX_IOMMU_POLL_US)
        .map(Duration::from_micros)
        .ok_or_else(|| {
            format!("iommu_poll_us={value} is not a number of microseconds from 0 to {MAX_IOMMU_POLL_US}")
        })?;
    Ok((poll, iommu))
}

fn parse_rng(text: &str) -> ParseResult<RngConfig> {
    let kv = KeyValues::parse(text, &["src", "iommu"])?;
    Ok(RngConfig {
        src: PathBuf::from(
            kv.get("src")
                .filter(|s| !s.is_empty())
                .unwrap_or("/dev/urandom"),
        ),
        iommu: kv.switch("iommu")?,
    })
}

/// Parses `off|null|tty|file=PATH`, with `,iommu=on` where the device does DMA.
fn parse_output(text: &str, dma: bool) -> ParseResult<(OutputConfig, bool)> {
    let known: &[&str] = if dma {
        &["off", "null", "tty", "file", "iommu"]
    } else {
        &["off", "null", "tty", "file"]
    };
    let kv = KeyValues::parse(text, known)?;
    let modes: Vec<OutputConfig> = [
        kv.get("off").map(|_| OutputConfig::Off),
        kv.get("null").map(|_| OutputConfig::Null),
        kv.get("tty").map(|_| OutputConfig::Tty),
        kv.get("file")
            .map(|path| OutputConfig::File(PathBuf::from(path))),
    ]
    .into_iter()
    .flatten()
    .collect();
    match modes.as_slice() {
        [OutputConfig::File(path)] if path.as_os_str().is_empty() => {
            Err("file= needs a path".into())
        }
        [mode] => Ok((mode.clone(), dma && kv.switch("iommu")?)),
        _ => Err(format!(
            "'{text}' must name exactly one of off, null, tty or file=PATH"
        )),
    }
}

/// Parses `--net`; an empty or absent `mac=` gets a random locally administered address.
fn parse_net(text: &str) -> ParseResult<NetConfig> {
    let kv = KeyValues::parse(
        text,
        &[
            "tap",
            "mac",
            "ip",
            "mask",
            "num_queues",
            "queue_size",
            "iommu",
            "vhost",
            "id",
        ],
    )?;
    let given = |key: &str| kv.get(key).filter(|value| !value.is_empty());

    let tap = kv.get("tap").unwrap_or_default();
    net_util::validate_tap_name(tap).map_err(|err| err.to_string())?;

    let mac = match given("mac") {
        Some(text) => {
            let mac: MacAddr = text
                .parse()
                .map_err(|_| format!("mac={text} is not a MAC address like 52:54:00:12:34:56"))?;
            if mac.is_multicast() {
                return Err(format!(
                    "mac={text} is a multicast address; give a unicast one (even first octet), or mac= for a random one"
                ));
            }
            mac
        }
        None => MacAddr::random_local()
            .map_err(|err| format!("cannot pick a random MAC ({err}); give one with mac="))?,
    };

    let ipv4 = |key: &str, value: &str| {
        value
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{key}={value} is not an IPv4 address like 192.168.249.1"))
    };
    let ip = given("ip").map(|ip| ipv4("ip", ip)).transpose()?;
    let mask = given("mask").map(|mask| ipv4("mask", mask)).transpose()?;
    if let Some(mask) = mask {
        // A netmask is ones then zeroes.
        if u32::from(mask).leading_ones() + u32::from(mask).trailing_zeros() != 32 {
            return Err(format!(
                "mask={mask} is not a netmask; give one like 255.255.255.0"
            ));
        }
    }
    let host_ipv4 = match (ip, mask) {
        (Some(ip), mask) => Some((ip, mask.unwrap_or(Ipv4Addr::new(255, 255, 255, 0)))),
        (None, Some(_)) => {
            return Err("mask= needs ip=, the address of the host end of the tap".into())
        }
        (None, None) => None,
    };

    let number = |key: &str, default: u16| -> ParseResult<u16> {
        given(key).map_or(Ok(default), |value| {
            value
                .parse::<u16>()
                .map_err(|_| format!("{key}={value} is not a number"))
        })
    };
    // Cloud Hypervisor counts queues: a receive and a transmit queue per pair.
    let num_queues = number("num_queues", 2)?;
    let max_queues = 2 * NetConfig::MAX_QUEUE_PAIRS;
    if !num_queues.is_multiple_of(2) || !(2..=max_queues).contains(&num_queues) {
        return Err(format!(
            "num_queues={num_queues} is not an even number from 2 to {max_queues} (a receive and a transmit queue per pair); give e.g. num_queues=4"
        ));
    }
    let queue_size = number("queue_size", NetConfig::DEFAULT_QUEUE_SIZE)?;
    if !queue_size.is_power_of_two() || queue_size < 2 {
        return Err(format!(
            "queue_size={queue_size} is not a power of two from 2 to 32768; give e.g. queue_size=256"
        ));
    }

    Ok(NetConfig {
        tap: tap.to_string(),
        mac,
        host_ipv4,
        queue_pairs: num_queues / 2,
        queue_size,
        iommu: kv.switch("iommu")?,
        vhost: kv.switch("vhost")?,
    })
}

/// `path=PATH`, `fd=N`, or a bare path, as Cloud Hypervisor takes them.
fn parse_api_socket(text: &str) -> ParseResult<ApiSocket> {
    if !text.contains('=') && !text.is_empty() {
        return Ok(ApiSocket::Path(PathBuf::from(text)));
    }
    let kv = KeyValues::parse(text, &["path", "fd"])?;
    match (kv.get("path"), kv.get("fd")) {
        (Some(path), None) if !path.is_empty() => Ok(ApiSocket::Path(PathBuf::from(path))),
        (None, Some(fd)) => fd
            .parse::<i32>()
            .ok()
            .filter(|&fd| fd > 2)
            .map(ApiSocket::Fd)
            .ok_or_else(|| format!("fd={fd} is not a descriptor number above 2 (stdio)")),
        _ => Err("give exactly one of path=PATH or fd=N".into()),
    }
}

fn parse_device(text: &str) -> ParseResult<DeviceConfig> {
    let kv = KeyValues::parse(text, &["path", "iommu", "id"])?;
    let path = kv
        .get("path")
        .filter(|path| !path.is_empty())
        .ok_or("path= is required, e.g. path=/sys/bus/pci/devices/0000:01:00.0")?;
    Ok(DeviceConfig {
        path: PathBuf::from(path),
        iommu: kv.switch("iommu")?,
        id: kv.get("id").filter(|id| !id.is_empty()).map(String::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::config::SeccompMode;

    fn config(args: &[&str]) -> Result<VmConfig, CliError> {
        let mut argv = vec!["warden", "--kernel", "/proc/self/exe"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .expect("clap accepts")
            .into_config()
    }

    fn error(args: &[&str]) -> String {
        config(args).unwrap_err().to_string()
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
        assert_eq!(config.cpus, 1);
        assert_eq!(config.memory.size, 512 << 20);
        assert_eq!(config.memory.backing, MemoryBacking::Anonymous);
        assert_eq!(config.disks.len(), 1);
        assert!(config.disks[0].iommu);
        assert!(!config.disks[0].readonly);
        assert!(config.rng.unwrap().iommu);
        assert_eq!(config.serial, OutputConfig::Tty);
        assert_eq!(config.console, OutputConfig::Null);
    }

    #[test]
    fn cpus_both_forms() {
        assert_eq!(config(&["--cpus", "boot=4"]).unwrap().cpus, 4);
        assert_eq!(config(&["--cpus", "2"]).unwrap().cpus, 2);
        assert_eq!(
            error(&["--cpus", "0"]),
            "--cpus: 0 vCPUs is out of range; give 1 to 254"
        );
        assert!(error(&["--cpus", "boot=x"]).starts_with("--cpus: boot=x is not a number"));
        assert!(error(&["--cpus", "max=2"]).starts_with("--cpus: unknown key 'max'"));
    }

    #[test]
    fn seccomp_is_on_unless_turned_off_or_to_logging() {
        let mode = |args: &[&str]| config(args).map(|c| c.seccomp);
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
    fn iommu_poll_window() {
        assert_eq!(config(&[]).unwrap().iommu_poll, Duration::from_millis(2));
        let poll = |text| config(&["--platform", text]).map(|c| c.iommu_poll);
        assert!(!config(&[]).unwrap().platform_iommu);
        let iommu = config(&["--platform", "iommu=on,iommu_poll_us=7"]).unwrap();
        assert!(iommu.platform_iommu && iommu.needs_iommu());
        assert_eq!(iommu.iommu_poll, Duration::from_micros(7));
        assert!(error(&["--platform", "iommu=yes"]).starts_with("--platform: "));
        assert_eq!(poll("iommu_poll_us=0"), Ok(Duration::ZERO));
        assert_eq!(poll("iommu_poll_us=50"), Ok(Duration::from_micros(50)));
        assert_eq!(
            error(&["--platform", "iommu_poll_us=fast"]),
            "--platform: iommu_poll_us=fast is not a number of microseconds from 0 to 1000000"
        );
        assert!(error(&["--platform", "iommu_poll_us=1000001"]).contains("from 0 to 1000000"));
        assert!(error(&["--platform", "poll=1"]).starts_with("--platform: unknown key 'poll'"));
    }

    #[test]
    fn memory_backings() {
        let m = config(&["--memory", "size=8G,file=/dev/hugepages"])
            .unwrap()
            .memory;
        assert_eq!(m.backing, MemoryBacking::File("/dev/hugepages".into()));
        assert_eq!(m.size, 8 << 30);
        let m = config(&["--memory", "size=1G,hugepages=on,shared=on"])
            .unwrap()
            .memory;
        assert_eq!(m.backing, MemoryBacking::Hugepages);
        assert!(m.shared);
        assert!(error(&["--memory", "size=1M"]).starts_with("--memory: size=1048576 is too small"));
        assert!(error(&["--memory", "file=/x"]).starts_with("--memory: size= is required"));
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
        assert_eq!(err.option, "kernel");
    }

    #[test]
    fn outputs() {
        let c = config(&["--serial", "file=/tmp/s.log", "--console", "off"]).unwrap();
        assert_eq!(c.serial, OutputConfig::File("/tmp/s.log".into()));
        assert_eq!(c.console, OutputConfig::Off);
        assert!(
            error(&["--console", "tty"]).contains("only one of --serial and --console can be tty")
        );
        assert!(error(&["--serial", "tty,iommu=on"]).starts_with("--serial: unknown key 'iommu'"));
        assert!(error(&["--serial", "tty,off"]).contains("exactly one of"));
        assert!(config(&["--serial", "null", "--console", "tty,iommu=on"]).is_ok());
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
        assert_eq!(
            c.devices,
            [
                DeviceConfig {
                    path: "/proc/self".into(),
                    iommu: true,
                    id: Some("nic0".into())
                },
                DeviceConfig {
                    path: "/proc".into(),
                    iommu: false,
                    id: None
                }
            ]
        );
        assert!(c.needs_iommu());
        assert_eq!(c.devices[0].name(), "nic0");
        assert_eq!(
            error(&["--device", "path=/sys/bus/pci/devices/0000:ff:00.0,iommu=on"]),
            "--device: /sys/bus/pci/devices/0000:ff:00.0 does not exist; give a host PCI device's sysfs path, e.g. path=/sys/bus/pci/devices/0000:01:00.0"
        );
        assert!(error(&["--device", "iommu=on"]).starts_with("--device: path= is required"));
        assert!(error(&["--device", "path=/proc,iommu=yes"])
            .starts_with("--device: iommu=yes is not on or off"));
    }

    #[test]
    fn net_defaults_pick_a_new_tap_and_a_random_local_mac() {
        let c = config(&["--net", "tap=,mac=,iommu=on", "--net", "tap=tap1"]).unwrap();
        assert!(c.needs_iommu());
        let [first, second] = c.nets.as_slice() else {
            panic!("two nets: {:?}", c.nets)
        };
        assert_eq!(first.tap, "");
        assert!(first.iommu);
        assert_eq!(first.host_ipv4, None);
        assert_eq!(first.queue_size, 256);
        for mac in [first.mac, second.mac] {
            assert_eq!(
                mac.octets()[0] & 0x03,
                0x02,
                "unicast, locally administered: {mac}"
            );
        }
        assert_ne!(first.mac, second.mac);
        assert_eq!(second.tap, "tap1");
        assert!(!second.iommu);
        assert!(!config(&["--net", "tap=tap1"]).unwrap().needs_iommu());
    }

    #[test]
    fn net_options_are_parsed() {
        let c = config(&[
            "--net",
            "tap=vmtap7,mac=52:54:00:AB:cd:01,ip=192.168.249.1,mask=255.255.0.0,num_queues=2,queue_size=1024,id=n0",
        ])
        .unwrap();
        let net = &c.nets[0];
        assert_eq!(net.tap, "vmtap7");
        assert_eq!(net.mac.to_string(), "52:54:00:ab:cd:01");
        assert_eq!(
            net.host_ipv4,
            Some((
                Ipv4Addr::new(192, 168, 249, 1),
                Ipv4Addr::new(255, 255, 0, 0)
            ))
        );
        assert_eq!((net.queue_pairs, net.queue_size), (1, 1024));
        assert!(!net.vhost);
        let c = config(&["--net", "num_queues=8,vhost=on"]).unwrap();
        assert_eq!(c.nets[0].queue_pairs, 4);
        assert!(c.nets[0].vhost);
        let c = config(&["--net", "ip=10.0.0.1"]).unwrap();
        assert_eq!(
            c.nets[0].host_ipv4,
            Some((Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(255, 255, 255, 0)))
        );
    }

    #[test]
    fn net_errors_name_the_option_and_the_fix() {
        for (arg, expected) in [
            (
                "tap=,mac=zz",
                "--net: mac=zz is not a MAC address like 52:54:00:12:34:56",
            ),
            (
                "mac=52:54:00:12:34",
                "--net: mac=52:54:00:12:34 is not a MAC address",
            ),
            (
                "mac=01:00:5e:00:00:01",
                "--net: mac=01:00:5e:00:00:01 is a multicast address",
            ),
            ("tapp=x", "--net: unknown key 'tapp'"),
            ("tap=a/b", "--net: tap=\"a/b\" is not an interface name"),
            (
                "tap=waytoolongtapname",
                "--net: tap=\"waytoolongtapname\" is not",
            ),
            ("ip=fe80::1", "--net: ip=fe80::1 is not an IPv4 address"),
            (
                "ip=10.0.0.1,mask=255.0.255.0",
                "--net: mask=255.0.255.0 is not a netmask",
            ),
            ("mask=255.255.255.0", "--net: mask= needs ip="),
            (
                "num_queues=3",
                "--net: num_queues=3 is not an even number from 2 to 32",
            ),
            ("num_queues=0", "--net: num_queues=0 is not an even number"),
            (
                "num_queues=34",
                "--net: num_queues=34 is not an even number",
            ),
            ("num_queues=x", "--net: num_queues=x is not a number"),
            (
                "queue_size=100",
                "--net: queue_size=100 is not a power of two",
            ),
            (
                "queue_size=70000",
                "--net: queue_size=70000 is not a number",
            ),
            ("iommu=yes", "--net: iommu=yes is not on or off"),
        ] {
            let err = error(&["--net", arg]);
            assert!(err.starts_with(expected), "{arg}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        assert_eq!(
            error(&["--net", "tap=t0", "--net", "tap=t0"]),
            "--net: tap=t0 is given twice; each --net needs its own tap"
        );
    }

    #[test]
    fn api_socket_by_path_or_descriptor() {
        let socket = |text: &str| config(&["--api-socket", text]).map(|c| c.api_socket);
        assert_eq!(config(&[]).unwrap().api_socket, None);
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
    }

    #[test]
    fn disk_options() {
        let exe = std::env::current_exe().unwrap();
        let c = config(&["--disk", &format!("path={},readonly=on", exe.display())]).unwrap();
        assert!(c.disks[0].readonly);
        assert!(!c.disks[0].iommu);
        assert!(error(&["--disk", "readonly=on"]).starts_with("--disk: path= is required"));
        assert!(error(&["--disk", "path=/x,iommu=yes"])
            .starts_with("--disk: iommu=yes is not on or off"));
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
            ("num_queues=0", "num_queues=0 is not from 1 to 64"),
            ("num_queues=65", "num_queues=65 is not from 1 to 64"),
            ("num_queues=two", "num_queues=two is not a number"),
            ("queue_size=100", "queue_size=100 is not a power of two"),
            ("queue_size=65536", "queue_size=65536 is not a number"),
            ("direct=maybe", "direct=maybe is not on or off"),
        ] {
            let err = error(&["--disk", &format!("path={},{bad}", exe.display())]);
            assert!(err.starts_with(&format!("--disk: {message}")), "{err}");
        }
    }
}
