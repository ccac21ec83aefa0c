//! What the user asked for, already validated by the command line parser.

use std::net::Ipv4Addr;
use std::path::PathBuf;

pub use net_util::MacAddr;
pub use sandbox::Mode as SeccompMode;

/// The whole machine description the builder turns into a running VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub cpus: u8,
    pub memory: MemoryConfig,
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub rng: Option<RngConfig>,
    pub serial: OutputConfig,
    pub console: OutputConfig,
    /// Put the virtio-console behind the IOMMU.
    pub console_iommu: bool,
    /// Host PCI functions passed through with VFIO.
    pub devices: Vec<DeviceConfig>,
    /// Longest the virtio-iommu polls its request queue after a request; zero: never.
    pub iommu_poll: std::time::Duration,
    /// Create the virtio-iommu even if no device starts behind it (`--platform iommu=on`).
    pub platform_iommu: bool,
    /// What each thread's seccomp filter does with a system call outside its list.
    pub seccomp: SeccompMode,
    /// Where to serve Cloud Hypervisor's REST API, if anywhere.
    pub api_socket: Option<ApiSocket>,
}

/// The Unix socket of the API (`--api-socket`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiSocket {
    /// A path to bind (a stale socket nobody listens on is replaced).
    Path(PathBuf),
    /// A listening socket warden inherited.
    Fd(i32),
}

impl VmConfig {
    /// Whether any device asked for `iommu=on`: only then does the machine get a virtio-iommu.
    pub fn needs_iommu(&self) -> bool {
        self.platform_iommu
            || (self.console != OutputConfig::Off && self.console_iommu)
            || self.disks.iter().any(|disk| disk.iommu)
            || self.nets.iter().any(|net| net.iommu)
            || self.rng.as_ref().is_some_and(|rng| rng.iommu)
            || self.devices.iter().any(|device| device.iommu)
    }
}

/// Guest RAM and what backs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    pub size: u64,
    pub backing: MemoryBacking,
    /// Map the backing `MAP_SHARED` (visible to other processes mapping the same file).
    pub shared: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Private anonymous memory.
    Anonymous,
    /// A file, or an unlinked file created inside a directory (e.g. a hugetlbfs mount).
    File(PathBuf),
    /// A `memfd` with `MFD_HUGETLB`: huge pages without a mounted hugetlbfs.
    Hugepages,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub iommu: bool,
    /// O_DIRECT on the image.
    pub direct: bool,
    /// Request queues, each served by its own thread.
    pub num_queues: u16,
    /// Entries per request queue.
    pub queue_size: u16,
}

impl DiskConfig {
    pub const DEFAULT_QUEUE_SIZE: u16 = 256;
}

/// A virtio-net device on a tap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap to open, created if it does not exist; empty: a new tap `vmtapN`.
    pub tap: String,
    /// The guest's MAC address (the command line picks a random one when none is given).
    pub mac: MacAddr,
    /// Address and netmask for the host end of the tap, if warden is to set them.
    pub host_ipv4: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Receive and transmit queue pairs, each on a queue of the tap (`num_queues` / 2).
    pub queue_pairs: u16,
    /// Size of each receive and transmit queue.
    pub queue_size: u16,
    pub iommu: bool,
    /// The kernel's vhost-net moves the frames (an instance per pair), not warden's threads.
    pub vhost: bool,
}

impl NetConfig {
    /// Queue size unless `queue_size=` says otherwise (Cloud Hypervisor's default).
    pub const DEFAULT_QUEUE_SIZE: u16 = 256;
    /// The most queue pairs a net takes.
    pub const MAX_QUEUE_PAIRS: u16 = virtio_devices::net::MAX_QUEUE_PAIRS as u16;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RngConfig {
    pub src: PathBuf,
    pub iommu: bool,
}

/// Where a character device's output goes (and, for `Tty`, where input comes from).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputConfig {
    /// No device at all.
    Off,
    /// The device exists; what the guest writes is discarded.
    Null,
    Tty,
    File(PathBuf),
}

/// A host PCI function passed through with VFIO (`--device`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Its sysfs directory, e.g. `/sys/bus/pci/devices/0000:01:00.0`.
    pub path: PathBuf,
    /// Behind the virtio-iommu: its DMA mappings follow the guest's MAP/UNMAP requests instead
    /// of covering all guest RAM.
    pub iommu: bool,
    /// Names the device in messages and statistics; defaults to the path's last component.
    pub id: Option<String>,
}

impl DeviceConfig {
    /// The name messages use: `id=` if given, else the PCI address.
    pub fn name(&self) -> String {
        self.id.clone().unwrap_or_else(|| {
            self.path.file_name().map_or_else(
                || self.path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        })
    }
}
