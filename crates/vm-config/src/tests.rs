use super::*;

/// Kata's `vm.create` body in its IOMMU mode (its Go runtime, clh.go), with one PCI segment
/// and without virtio-fs (`shared_fs = "none"`).
const KATA_IOMMU: &str = r#"{
  "console": {"iommu": true, "mode": "Off"},
  "cpus": {"boot_vcpus": 1, "kvm_hyperv": false, "max_vcpus": 2, "nested": true,
           "topology": {"cores_per_die": 2, "dies_per_package": 1, "packages": 1, "threads_per_core": 1}},
  "disks": [{"backing_files": false, "direct": false, "image_type": "Raw", "iommu": false, "num_queues": 1,
             "path": "/opt/kata/share/kata-containers/kata-containers.img", "queue_size": 128,
             "readonly": true, "sparse": true, "vhost_user": false}],
  "iommu": false,
  "landlock_enable": false,
  "memory": {"hotplug_method": "Acpi", "hotplug_size": 17179869184, "hugepages": false, "mergeable": false,
             "prefault": false, "shared": true, "size": 2147483648, "thp": true},
  "payload": {"cmdline": "root=/dev/vda1 ro rootfstype=ext4 panic=1 no_timer_check noreplace-smp iommu=pt quiet",
              "kernel": "/opt/kata/share/kata-containers/vmlinux.container"},
  "platform": {"iommu_segments": [0], "num_pci_segments": 1, "sev_snp": false, "tdx": false},
  "pvpanic": false,
  "rng": {"iommu": true, "src": "/dev/urandom"},
  "serial": {"iommu": false, "mode": "Off"},
  "vsock": {"cid": 3, "iommu": true, "socket": "/run/vc/vm/0123/clh.sock"},
  "watchdog": false
}"#;

/// libvirt's `vm.create` body (ch_monitor.c), with the console it can use today.
const LIBVIRT: &str = r#"{"console":{"mode":"Off"},"serial":{"mode":"Tty"},"cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":2147483648},"payload":{"kernel":"/var/lib/ch/vmlinux","cmdline":"console=ttyS0 root=/dev/vda1"},"disks":[{"path":"/var/lib/ch/disk.raw","id":"virtio-disk0"},{"path":"/var/lib/ch/seed.iso","readonly":true,"id":"virtio-disk1"}]}"#;

#[test]
fn katas_iommu_mode_puts_every_device_behind_the_iommu() {
    let mut config: VmConfig = serde_json::from_str(KATA_IOMMU).unwrap();
    config.validate().unwrap();
    config.resolve().unwrap();
    assert!(config.iommu);
    assert!(config.disks[0].iommu, "its root disk is on IOMMU segment 0");
    assert!(config.rng.iommu && config.console.iommu);
    assert_eq!(config.disks[0].id.as_deref(), Some("_disk0"));
    let vsock = config.vsock.as_ref().unwrap();
    assert_eq!((vsock.cid, vsock.iommu), (3, true));
    assert_eq!(vsock.id.as_deref(), Some("_vsock0"));
    assert_eq!(config.memory.hotplug_size, Some(16 << 30));
}

#[test]
fn katas_sandbox_takes_two_segments_and_virtio_fs_off_the_iommu_on_shared_ram() {
    let mut body: serde_json::Value = serde_json::from_str(KATA_IOMMU).unwrap();
    body["platform"]["num_pci_segments"] = 2.into();
    body["fs"] = serde_json::json!([{"tag":"kataShared","socket":"/run/v.sock","num_queues":1,"queue_size":1024,"pci_segment":1}]);
    let mut config: VmConfig = serde_json::from_value(body.clone()).unwrap();
    config.validate().unwrap();
    config.resolve().unwrap();
    let fs = &config.fs[0];
    assert_eq!((fs.tag.as_str(), fs.pci_segment), ("kataShared", 1));
    assert!(!fs.iommu, "segment 1 is not an IOMMU segment");
    assert_eq!(fs.id.as_deref(), Some("_fs0"));
    assert!(config.remove_device("_fs0") && config.fs.is_empty());
    // A device on a segment the machine lacks is refused, naming it.
    body["rng"]["pci_segment"] = 2.into();
    let config: VmConfig = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(
        config.validate().unwrap_err().to_string(),
        "rng.pci_segment: 2 is not from 0 to 1"
    );
    body["rng"]["pci_segment"] = 1.into();
    // vhost-user needs RAM the back end can map.
    body["memory"]["shared"] = false.into();
    let config: VmConfig = serde_json::from_value(body).unwrap();
    assert_eq!(
        config.validate().unwrap_err().to_string(),
        "memory.shared: virtio-fs needs guest RAM its vhost-user back end can map: set shared=on"
    );
}

#[test]
fn libvirts_body_keeps_its_ids_and_gets_cloud_hypervisors_defaults() {
    let mut config: VmConfig = serde_json::from_str(LIBVIRT).unwrap();
    config.validate().unwrap();
    config.resolve().unwrap();
    assert!(!config.iommu);
    assert_eq!(config.disks[1].id.as_deref(), Some("virtio-disk1"));
    assert_eq!(config.disks[0].queue_size, 128);
    assert_eq!(config.rng.src, std::path::PathBuf::from("/dev/urandom"));
    assert_eq!(config.cpus.max_phys_bits, 46);
}

#[test]
fn an_empty_body_has_cloud_hypervisors_defaults_and_needs_a_kernel() {
    let config: VmConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(config.serial.mode, ConsoleMode::Null);
    assert_eq!(config.console.mode, ConsoleMode::Tty);
    assert_eq!(config.memory.size, 512 << 20);
    assert_eq!(config.cpus.boot_vcpus, 1);
    assert_eq!(
        config.validate().unwrap_err().to_string(),
        "payload.kernel is required"
    );
}

#[test]
fn ids_are_unique_and_the_iommus_are_reserved() {
    let mut config: VmConfig = serde_json::from_str(LIBVIRT).unwrap();
    config.net.push(NetConfig {
        id: Some("virtio-disk0".into()),
        ..Default::default()
    });
    assert_eq!(
        config.validate().unwrap_err().to_string(),
        "net[0].id: id \"virtio-disk0\" is used twice"
    );
    config.net[0].id = Some("virtio-iommu-domain-1".into());
    assert!(config
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("net[0].id: \"virtio-iommu-domain-1\""));
}

#[test]
fn resolved_ids_take_the_first_free_number_and_nets_get_a_local_mac() {
    let mut config = VmConfig {
        disks: vec![
            DiskConfig {
                path: Some("/a".into()),
                id: Some("_disk0".into()),
                ..Default::default()
            },
            DiskConfig {
                path: Some("/b".into()),
                ..Default::default()
            },
        ],
        net: vec![NetConfig::default()],
        ..Default::default()
    };
    config.resolve().unwrap();
    assert_eq!(config.disks[1].id.as_deref(), Some("_disk1"));
    let mac = config.net[0].mac.unwrap();
    assert!(!mac.is_multicast() && mac.octets()[0] & 2 == 2);
    assert_eq!(config.net[0].id.as_deref(), Some("_net0"));
}

/// What `vm.info` gives back parses as what a client sent: the shape round-trips.
#[test]
fn a_resolved_config_round_trips_through_json() {
    let mut config: VmConfig = serde_json::from_str(KATA_IOMMU).unwrap();
    config.resolve().unwrap();
    let json = serde_json::to_string(&config).unwrap();
    let back: VmConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        value["cpus"]["max_phys_bits"], 46,
        "Kata's Rust runtime requires it"
    );
    assert_eq!(value["disks"][0]["iommu"], true);
}

#[test]
fn both_terminals_cannot_be_the_tty() {
    let mut config: VmConfig = serde_json::from_str(LIBVIRT).unwrap();
    config.console.mode = ConsoleMode::Tty;
    assert!(config
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("console.mode: only one of serial and console"));
}
