//! virtio-vsock behind the virtual IOMMU on the real Debian image, driven by socat in the
//! guest and, on the KVM host, by `src/bin/vsock-peer.rs` speaking Cloud Hypervisor's hybrid
//! vsock on the device's Unix socket: 64 MiB each way on connections the host opens (to guest
//! ports), 64 MiB each way on connections the guest opens (to host ports, the `SOCKET_<port>`
//! sockets), then four streams at once; every transfer checksummed on both sides.

use e2e::Scenario;
use std::time::Duration;

const MIB: usize = 64;

/// Port 5000 answers the sha256 of what it reads, 5001 sends the guest's blob, 5002 waits
/// for the host's "done"; meanwhile the guest sends its blob to host port 6000 and fetches
/// host port 6001's stream.
const GUEST: &str = r#"
head -c MIBM /dev/urandom >/dev/shm/blob
echo "VSOCK-GUEST-BLOB=$(sha256sum </dev/shm/blob | cut -c1-64)"
socat -t 60 VSOCK-LISTEN:5000,reuseaddr,fork SYSTEM:'sha256sum | cut -c1-64' &
socat -U VSOCK-LISTEN:5001,reuseaddr,fork OPEN:/dev/shm/blob &
dev=$(grep -l 0x1053 /sys/bus/pci/devices/*/device | head -n 1)
dev=${dev%/device}
echo "VSOCK-GUEST-PCI=${dev##*/}"
echo "VSOCK-GUEST-GROUP=$(ls "$dev/iommu_group/devices" | tr '\n' ' ')"
echo "VSOCK-GUEST-DRIVER=$(basename "$(readlink "$dev/driver")")"
socat -u OPEN:/dev/shm/blob VSOCK-CONNECT:2:6000 &
upload=$!
echo "VSOCK-GUEST-GOT-6001=$(socat -u VSOCK-CONNECT:2:6001 - | sha256sum | cut -c1-64)"
wait $upload && echo "VSOCK-GUEST-UPLOAD=done"
socat -u VSOCK-LISTEN:5002,reuseaddr - >/dev/null
echo VSOCK-GUEST-DONE
"#;

#[test]
fn vsock_behind_the_iommu_moves_data_both_ways_on_both_sides_connections() {
    let Some(out) = Scenario::new("vsock")
        .distro()
        .host_setup(&format!("vsock-peer v.sock {MIB} >peer.log 2>&1 &"))
        .warden_args([
            "--cpus",
            "1",
            "--memory",
            "size=512M",
            "--disk",
            "path=host-disk,iommu=on",
            "--vsock",
            "cid=3,socket=v.sock,iommu=on",
        ])
        .guest_script(&GUEST.replace("MIB", &MIB.to_string()))
        .host_check("cat peer.log; test ! -e v.sock && echo VSOCK-SOCKET-REMOVED")
        .timeout(Duration::from_secs(900))
        .run()
    else {
        return;
    };
    let marker = |key: &str| out.required_marker(key).to_string();
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert_eq!(marker("VSOCK-GUEST-DRIVER"), "virtio-pci", "{out}");
    assert_eq!(
        marker("VSOCK-GUEST-GROUP").trim(),
        marker("VSOCK-GUEST-PCI"),
        "the vsock sits alone in its IOMMU group\n{out}"
    );
    e2e::vsock::assert_peer_moved_data(&out, MIB);
    assert!(out.console.contains("VSOCK-SOCKET-REMOVED"), "{out}");
    assert_eq!(out.warden_exit, Some(0), "{out}");
}
