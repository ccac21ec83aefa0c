//! The command line, compatible with Cloud Hypervisor's, turned into a [`VmConfig`].

use std::path::{Path, PathBuf};

use clap::Parser;
use vmm::config::{
    DeviceConfig, DiskConfig, MemoryBacking, MemoryConfig, OutputConfig, RngConfig, VmConfig,
};
use vmm::memory::MIN_MEMORY;

use crate::options::{parse_size, KeyValues, ParseResult};

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

    /// virtio-blk disk (repeatable): path=PATH[,readonly=on][,iommu=on]. Accepts iommu=on.
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

    /// virtio-net on a tap device: tap=NAME,mac=MAC[,ip=IP,mask=MASK][,num_queues=N][,queue_size=N][,iommu=on].
    /// Accepts iommu=on. Not implemented yet: refused with a message.
    #[arg(long, value_name = "tap=NAME,mac=MAC[,ip=..,mask=..][,iommu=on]")]
    net: Vec<String>,

    /// VFIO passthrough of a host PCI device (repeatable): path=/sys/bus/pci/devices/..[,iommu=on][,id=ID].
    /// Accepts iommu=on: its DMA then follows the guest's IOMMU mappings; without, all guest
    /// RAM is mapped for it. The device must be bound to vfio-pci; warden needs root.
    #[arg(long, value_name = "path=SYSFS_PATH[,iommu=on][,id=ID]")]
    device: Vec<String>,

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
        if let Some(net) = self.net.first() {
            in_option("net", parse_net(net))?;
            return Err(CliError {
                option: "net",
                message: "virtio-net is not implemented yet; remove --net".into(),
            });
        }
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
            rng: Some(rng),
            serial,
            console,
            console_iommu,
            devices,
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

fn parse_disk(text: &str) -> ParseResult<DiskConfig> {
    let kv = KeyValues::parse(text, &["path", "readonly", "iommu"])?;
    let path = kv
        .get("path")
        .filter(|path| !path.is_empty())
        .ok_or("path= is required, e.g. --disk path=disk.img")?;
    Ok(DiskConfig {
        path: PathBuf::from(path),
        readonly: kv.switch("readonly")?,
        iommu: kv.switch("iommu")?,
    })
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

/// Checks `--net`'s syntax so that a typo is reported as such, not as "not implemented".
fn parse_net(text: &str) -> ParseResult<()> {
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
            "id",
        ],
    )?;
    if let Some(mac) = kv.get("mac").filter(|mac| !mac.is_empty()) {
        let octets: Vec<_> = mac.split(':').collect();
        if octets.len() != 6
            || octets
                .iter()
                .any(|o| o.len() != 2 || u8::from_str_radix(o, 16).is_err())
        {
            return Err(format!(
                "mac={mac} is not a MAC address like 52:54:00:12:34:56"
            ));
        }
    }
    for key in ["num_queues", "queue_size"] {
        if let Some(value) = kv.get(key) {
            value
                .parse::<u16>()
                .map_err(|_| format!("{key}={value} is not a number"))?;
        }
    }
    kv.switch("iommu")?;
    Ok(())
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
    fn net_is_parsed_then_refused() {
        assert_eq!(
            error(&["--net", "tap=,mac=,iommu=on"]),
            "--net: virtio-net is not implemented yet; remove --net"
        );
        assert!(error(&["--net", "tap=,mac=zz"]).starts_with("--net: mac=zz is not a MAC address"));
        assert!(error(&["--net", "tapp=x"]).starts_with("--net: unknown key 'tapp'"));
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
    }
}
