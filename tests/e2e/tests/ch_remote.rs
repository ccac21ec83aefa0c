//! Cloud Hypervisor's own client, `ch-remote` (a static v54 build, found as
//! [`e2e::peer_binary`] says), drives warden from an empty VMM (`--api-socket` alone, as Kata
//! and libvirt start it) through the VM's whole life: `create` from a JSON file (state
//! `Created`), `boot` (`Running`), ping, info and counters; two rounds of hot-adding a disk
//! behind the IOMMU, which the guest reads whole and overwrites with data of its own (24 MiB
//! each way, checksums on both sides), then removing it; a hot-added net behind the IOMMU that
//! the guest pings the host across, removed again; pause and resume; two refusals, whose
//! messages it must print; a virtio-fs share hot-added (`add-fs`), which the guest mounts,
//! reads and writes; `shutdown` (warden stays, state `Created`), `boot` again (the guest
//! boots a second time), `reboot` (a third), `delete` (`vm.info` then has no VM) and
//! `shutdown-vmm`, which ends warden (exit 0). `ch-remote` reads replies more strictly than
//! curl (a status line with a reason phrase was an error to it), so this is what "Cloud
//! Hypervisor's clients work unchanged" rests on.
//!
//! Host and guest take turns through sectors of the boot disk: the guest writes `READY` (8),
//! `HOTn` (8 + 8n: round n's disk is read and written), `GONEn` (40 + 8n: it has left the
//! guest), `NETUP` (64: the host answered pings over the hot-added net), `NETGONE` (72),
//! `BOOT2` (80), `BOOT3` (88) and `FSDONE` (104: the hot-added share was mounted, read and
//! written); sector 100 tells each boot which one it is.
//!
//! The share's virtiofsd serves one connection and exits; the host starts it again each
//! time, as a supervisor would, so that the later boots (which build the share again) find
//! one listening.

use e2e::{Outcome, Scenario};
use serde_json::Value;
use std::time::Duration;

/// Bytes of each hot-added disk: read whole by the guest, then overwritten by it.
const HOT_DISK_MIB: usize = 24;

const GUEST_SCRIPT: &str = r#"
wait_for /dev/vda
tell() { printf "$1" | dd of=/dev/vda bs=512 seek=$2 conv=notrunc,fsync 2>/dev/null; }
# The net on the tap the host passed as a descriptor: up, and pings across it counted.
fdnet_pings() {
    wait_for /sys/class/net/eth0 120
    ip addr add 192.168.252.2/24 dev eth0
    ip link set eth0 up
    n=0
    until ping -c 1 -W 1 192.168.252.1 >/dev/null 2>&1; do
        n=$((n + 1)); [ $n -gt 60 ] && break
        usleep 200000
    done
    ping -c 3 -W 5 192.168.252.1 | grep -c 'bytes from'
}
# The share (tag chrfs) mounted once it is there, and the host's greeting read from it.
share_hello() {
    mkdir -p /mnt/share
    n=0
    until mount -t virtiofs chrfs /mnt/share 2>/dev/null; do
        n=$((n + 1)); [ $n -gt 120 ] && return
        sleep 1
    done
    cat /mnt/share/hello
}
case "$(dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 6)" in
PHASE1)
    echo CHR-GUEST-SECOND-BOOT=yes
    echo "CHR-GUEST-SECOND-VSOCKS=$(grep -l 0x1053 /sys/bus/pci/devices/*/device | wc -l)"
    echo "CHR-GUEST-SECOND-FDNET-PINGS=$(fdnet_pings)"
    echo "CHR-GUEST-SECOND-FS=$(share_hello)"
    tell PHASE2 100
    tell BOOT2 80
    sleep 600
    ;;
PHASE2)
    echo CHR-GUEST-THIRD-BOOT=yes
    echo "CHR-GUEST-THIRD-VSOCKS=$(grep -l 0x1053 /sys/bus/pci/devices/*/device | wc -l)"
    echo "CHR-GUEST-THIRD-FDNET-PINGS=$(fdnet_pings)"
    echo "CHR-GUEST-THIRD-FS=$(share_hello)"
    tell PHASE3 100
    tell BOOT3 88
    sleep 600
    ;;
esac
group_devices() { ls "/sys/kernel/iommu_groups/$(basename "$(readlink "$1/iommu_group")")/devices" | tr '\n' ' '; }
gone() {
    n=0
    while [ -e "$1" ] || [ -e "$2" ]; do
        n=$((n + 1)); [ $n -gt 120 ] && break
        sleep 1
    done
    [ -e "$1" ] || [ -e "$2" ] && echo no || echo yes
}
head -c 4096 /dev/vda >/dev/null
tell READY 8
hot=/sys/bus/pci/devices/0000:00:18.0
for round in 1 2; do
    wait_for /dev/vdb 120
    echo "CHR-GUEST-$round-GROUP-DEVICES=$(group_devices $hot)"
    echo "CHR-GUEST-$round-READ-SUM=$(sha256sum </dev/vdb | cut -d' ' -f1)"
    dd if=/dev/urandom of=/tmp/out bs=1M count=HOT_DISK_MIB 2>/dev/null
    echo "CHR-GUEST-$round-WROTE-SUM=$(sha256sum </tmp/out | cut -d' ' -f1)"
    dd if=/tmp/out of=/dev/vdb bs=1M conv=fsync 2>/dev/null
    rm /tmp/out
    tell "HOT$round" $((8 + 8 * round))
    echo "CHR-GUEST-$round-GONE=$(gone /dev/vdb $hot)"
    tell "GONE$round" $((40 + 8 * round))
done
wait_for /sys/class/net/eth0 120
net_pci=$(readlink -f /sys/class/net/eth0/device/..)
echo "CHR-GUEST-NET-PCI=${net_pci##*/}"
echo "CHR-GUEST-NET-GROUP-DEVICES=$(group_devices "$net_pci")"
ip addr add 192.168.250.2/24 dev eth0
ip link set eth0 up
n=0
until ping -c 1 -W 1 192.168.250.1 >/dev/null 2>&1; do
    n=$((n + 1)); [ $n -gt 60 ] && break
    usleep 200000
done
echo "CHR-GUEST-NET-PINGS=$(ping -c 3 -W 5 192.168.250.1 | grep -c 'bytes from')"
tell NETUP 64
echo "CHR-GUEST-NET-GONE=$(gone /sys/class/net/eth0 "$net_pci")"
tell NETGONE 72
echo "CHR-GUEST-FDNET-PINGS=$(fdnet_pings)"
echo "CHR-GUEST-FDNET-MAC=$(cat /sys/class/net/eth0/address)"
tell PHASE1 100
tell FDNETUP 96
echo "CHR-GUEST-FS=$(share_hello)"
echo from-the-guest >/mnt/share/guest && sync && echo CHR-GUEST-FS-WROTE=yes
tell FSDONE 104
# The host shuts the VM down, then boots it again.
sleep 600
"#;

/// The host's half, in the background while warden runs: `chr NAME ARGS` runs `ch-remote
/// ARGS` and keeps its stdout, stderr and exit status as `NAME.out`, `NAME.err`, `NAME.rc`.
const HOST_CLIENT: &str = r#"dd if=/dev/zero of=disk.img bs=1M count=8 2>/dev/null
mkdir share
echo from-the-host >share/hello
(
  until [ -e fs.stop ]; do
    virtiofsd --socket-path=fs.sock --shared-dir=share --sandbox=none >>virtiofsd.log 2>&1
    sleep 0.2
  done
) &
cat >vm.json <<EOF
{"cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": 536870912, "shared": true},
 "payload": {"kernel": "$L2_KERNEL", "initramfs": "$L2_INITRAMFS", "cmdline": "console=ttyS0 panic=-1"},
 "disks": [{"path": "disk.img", "iommu": true}],
 "serial": {"mode": "Tty"}, "console": {"mode": "Off"}}
EOF
for r in 1 2; do
  dd if=/dev/urandom of=hot$r.img bs=1M count=HOT_DISK_MIB 2>/dev/null
  sha256sum hot$r.img | cut -d' ' -f1 >hot$r.before
done
(
  set +e
  chr() { name=$1; shift; ch-remote --api-socket api.sock "$@" >$name.out 2>$name.err; echo $? >$name.rc; }
  wait_sector() {
    n=0
    until [ "$(dd if=disk.img bs=512 skip=$1 count=1 2>/dev/null | head -c ${#2})" = "$2" ]; do
      n=$((n + 1)); [ $n -gt 300 ] && exit 1
      sleep 1
    done
  }
  for n in $(seq 50); do [ -S api.sock ] && break; sleep 0.1; done
  chr ping ping
  chr info-none info
  chr create create vm.json
  chr info-created info
  chr boot boot
  wait_sector 8 READY
  chr info info
  chr add-missing add-disk path=missing.img,iommu=on
  chr remove-unknown remove-device nothing
  for r in 1 2; do
    chr add-$r add-disk path=hot$r.img,iommu=on,id=hot$r
    wait_sector $((8 + 8 * r)) HOT$r
    chr counters-$r counters
    chr remove-$r remove-device hot$r
    wait_sector $((40 + 8 * r)) GONE$r
    sha256sum hot$r.img | cut -d' ' -f1 >hot$r.after
  done
  chr add-net add-net tap=chr0,ip=192.168.250.1,mask=255.255.255.0,iommu=on,id=hotnet
  chr info-net info
  wait_sector 64 NETUP
  chr remove-net remove-device hotnet
  wait_sector 72 NETGONE
  # A tap opened here, passed to warden as a descriptor; it stays through the boots below.
  name=add-fdnet
  tap-fd chrfd0 1 192.168.252.1/24 ch-remote --api-socket api.sock \
    add-net "fd=[3],mac=52:54:00:aa:bb:01,num_queues=2,iommu=on,id=fdnet" >$name.out 2>$name.err
  echo $? >$name.rc
  chr info-fdnet info
  wait_sector 96 FDNETUP
  # The vsock stays in the configuration: the later boots build it again on the same socket.
  chr add-vsock add-vsock cid=3,socket=v.sock,iommu=on
  chr info-vsock info
  chr add-vsock-again add-vsock cid=4,socket=w.sock
  # The share stays in the configuration too: the later boots connect to a new virtiofsd.
  chr add-fs add-fs tag=chrfs,socket=fs.sock
  chr info-fs info
  wait_sector 104 FSDONE
  chr pause pause
  chr info-paused info
  chr resume resume
  chr info-resumed info
  chr shutdown-vm shutdown
  chr info-shut info
  chr ping-shut ping
  chr boot-again boot
  wait_sector 80 BOOT2
  chr info-again info
  chr reboot reboot
  wait_sector 88 BOOT3
  chr info-rebooted info
  chr delete delete
  chr info-deleted info
  chr shutdown shutdown-vmm
  touch fs.stop
  pkill virtiofsd
) >/dev/null 2>&1 &"#;

const HOST_CHECK: &str = r#"echo "CHR-HOST-FS-GUEST=$(cat share/guest 2>/dev/null)"
for r in 1 2; do
  echo "CHR-HOST-$r-BEFORE=$(cat hot$r.before)"
  echo "CHR-HOST-$r-AFTER=$(cat hot$r.after 2>/dev/null)"
done
for f in ping info-none create info-created boot info add-missing remove-unknown add-1 \
         counters-1 remove-1 add-2 counters-2 remove-2 add-net info-net remove-net add-fdnet \
         info-fdnet add-vsock info-vsock add-vsock-again add-fs info-fs pause \
         info-paused resume info-resumed shutdown-vm info-shut ping-shut boot-again info-again \
         reboot info-rebooted delete info-deleted shutdown; do
  echo "CHR-RC $f $(cat $f.rc 2>/dev/null)"
  echo "CHR-OUT $f $(tr '\n' ' ' <$f.out 2>/dev/null)"
  echo "CHR-ERR $f $(tr '\n' ' ' <$f.err 2>/dev/null)"
done"#;

/// What `ch-remote NAME` did: its exit status, stdout and stderr (each on one line).
struct Call {
    rc: Option<i32>,
    out: String,
    err: String,
}

impl Call {
    fn of(outcome: &Outcome, name: &str) -> Call {
        let field = |kind: &str| {
            let prefix = format!("CHR-{kind} {name} ");
            let bare = format!("CHR-{kind} {name}");
            outcome
                .host_check_output()
                .lines()
                .map(str::trim)
                .find_map(|l| l.strip_prefix(&prefix).or((l == bare).then_some("")))
                .unwrap_or_else(|| panic!("no {kind} for {name}\n{outcome}"))
                .trim()
                .to_string()
        };
        Call {
            rc: field("RC").parse().ok(),
            out: field("OUT"),
            err: field("ERR"),
        }
    }

    /// The JSON it printed, after checking it succeeded.
    fn json(&self, name: &str, outcome: &Outcome) -> Value {
        self.succeeded(name, outcome);
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("{name}: {e}: {:?}\n{outcome}", self.out))
    }

    fn succeeded(&self, name: &str, outcome: &Outcome) {
        assert_eq!(
            self.rc,
            Some(0),
            "ch-remote {name}: {} {}\n{outcome}",
            self.out,
            self.err
        );
    }
}

#[test]
fn cloud_hypervisors_ch_remote_drives_warden() {
    let Some(ch_remote) = e2e::peer_binary("ch-remote", "WARDEN_CH_REMOTE", "ch_remote") else {
        return;
    };
    let mib = HOT_DISK_MIB.to_string();
    let Some(out) = Scenario::new("ch_remote")
        .host_binary(&ch_remote)
        .host_binary(&e2e::virtiofsd::binary())
        .host_setup(&HOST_CLIENT.replace("HOT_DISK_MIB", &mib))
        .without_default_args()
        .warden_args(["--api-socket", "path=api.sock"])
        .guest_script(&GUEST_SCRIPT.replace("HOT_DISK_MIB", &mib))
        .host_check(HOST_CHECK)
        .timeout(Duration::from_secs(600))
        .run()
    else {
        return;
    };
    let call = |name: &str| Call::of(&out, name);

    let ping = call("ping").json("ping", &out);
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"), "{out}");
    let none = call("info-none");
    assert_ne!(none.rc, Some(0), "no VM yet: {}\n{out}", none.out);
    assert!(
        none.err.contains("VM is not created"),
        "{}\n{out}",
        none.err
    );
    call("create").succeeded("create", &out);
    let created = call("info-created").json("info", &out);
    assert_eq!(created["state"], "Created", "{out}");
    assert_eq!(created["config"]["disks"][0]["id"], "_disk0", "{out}");
    call("boot").succeeded("boot", &out);
    let info = call("info").json("info", &out);
    assert_eq!(info["state"], "Running", "{out}");
    assert_eq!(info["config"]["disks"][0]["iommu"], true, "{out}");
    assert_eq!(info["config"]["iommu"], true, "{out}");
    assert_eq!(
        info["device_tree"]["virtio-iommu"]["pci_bdf"], "0000:00:01.0",
        "{out}"
    );

    // Refusals: a non-zero exit and warden's message in ch-remote's chain of errors.
    for (name, message) in [
        ("add-missing", "missing.img"),
        ("remove-unknown", "no device has id \"nothing\""),
    ] {
        let refused = call(name);
        assert_ne!(refused.rc, Some(0), "{name}: {}\n{out}", refused.out);
        assert!(
            refused.err.contains(message),
            "{name}: {}\n{out}",
            refused.err
        );
    }

    let mut maps = 0;
    for round in 1..=2 {
        let id = format!("hot{round}");
        let added = call(&format!("add-{round}")).json("add-disk", &out);
        assert_eq!(added["id"], id.as_str(), "{out}");
        assert_eq!(added["bdf"], "0000:00:18.0", "{out}");
        let marker = |key: &str| out.marker(&format!("CHR-{key}")).map(str::to_string);
        assert_eq!(
            marker(&format!("GUEST-{round}-GROUP-DEVICES")).as_deref(),
            Some("0000:00:18.0"),
            "a group of its own: {out}"
        );
        let before = marker(&format!("HOST-{round}-BEFORE"));
        assert!(before.as_ref().is_some_and(|s| s.len() == 64), "{out}");
        assert_eq!(
            marker(&format!("GUEST-{round}-READ-SUM")),
            before,
            "the guest read the host's data: {out}"
        );
        assert_eq!(
            marker(&format!("HOST-{round}-AFTER")),
            marker(&format!("GUEST-{round}-WROTE-SUM")),
            "the host has the guest's data: {out}"
        );
        let counters = call(&format!("counters-{round}")).json("counters", &out);
        let now = counters["virtio-iommu"]["maps"].as_u64().expect("maps");
        assert!(
            now > maps,
            "round {round} mapped through the IOMMU: {counters}\n{out}"
        );
        assert!(
            counters[&id]["read_bytes"].as_u64() >= Some((HOT_DISK_MIB as u64) << 20),
            "{counters}\n{out}"
        );
        maps = now;
        call(&format!("remove-{round}")).succeeded("remove-device", &out);
        assert_eq!(
            marker(&format!("GUEST-{round}-GONE")).as_deref(),
            Some("yes"),
            "{out}"
        );
    }

    let added = call("add-net").json("add-net", &out);
    assert_eq!(added["id"], "hotnet", "{out}");
    let info = call("info-net").json("info", &out);
    assert_eq!(info["config"]["net"][0]["tap"], "chr0", "{out}");
    assert_eq!(info["config"]["net"][0]["iommu"], true, "{out}");
    let bdf = added["bdf"].as_str().expect("a bdf");
    assert_eq!(out.marker("CHR-GUEST-NET-PCI"), Some(bdf), "{out}");
    assert_eq!(
        out.marker("CHR-GUEST-NET-GROUP-DEVICES"),
        Some(bdf),
        "{out}"
    );
    assert_eq!(out.marker("CHR-GUEST-NET-PINGS"), Some("3"), "{out}");
    call("remove-net").succeeded("remove-device", &out);
    assert_eq!(out.marker("CHR-GUEST-NET-GONE"), Some("yes"), "{out}");

    // A net on a tap passed as a descriptor (Kata's and libvirt's way): the guest pings
    // across it, and it stays in the configuration through vm.shutdown, vm.boot and
    // vm.reboot, its descriptor held by warden.
    let added = call("add-fdnet").json("add-net fd=[3]", &out);
    assert_eq!(added["id"], "fdnet", "{out}");
    let info = call("info-fdnet").json("info", &out);
    let fdnet = &info["config"]["net"][0];
    assert_eq!(fdnet["id"], "fdnet", "{out}");
    assert!(fdnet["fds"][0].as_i64().is_some_and(|fd| fd > 2), "{out}");
    assert!(fdnet.get("tap").is_none(), "{out}");
    assert_eq!(
        out.marker("CHR-GUEST-FDNET-MAC"),
        Some("52:54:00:aa:bb:01"),
        "{out}"
    );
    for boot in ["", "SECOND-", "THIRD-"] {
        assert_eq!(
            out.marker(&format!("CHR-GUEST-{boot}FDNET-PINGS")),
            Some("3"),
            "{boot}boot: {out}"
        );
    }

    // A vsock hot-added behind the IOMMU, listed, refused a second time, and built again
    // by the next boots (its socket removed with the device and bound anew).
    let added = call("add-vsock").json("add-vsock", &out);
    assert_eq!(added["id"], "_vsock0", "{out}");
    let slot = added["bdf"]
        .as_str()
        .and_then(|bdf| u8::from_str_radix(&bdf[8..10], 16).ok());
    assert!(
        slot.is_some_and(|slot| (0x18..0x1c).contains(&slot)),
        "a protected hotplug slot: {added}\n{out}"
    );
    let vsock = &call("info-vsock").json("info", &out)["config"]["vsock"];
    assert_eq!(
        (&vsock["cid"], &vsock["iommu"]),
        (&3.into(), &true.into()),
        "{out}"
    );
    let again = call("add-vsock-again");
    assert_ne!(again.rc, Some(0), "{out}");
    assert!(again.err.contains("takes one only"), "{}\n{out}", again.err);
    for boot in ["SECOND", "THIRD"] {
        assert_eq!(
            out.marker(&format!("CHR-GUEST-{boot}-VSOCKS")),
            Some("1"),
            "{boot} boot: {out}"
        );
    }

    // A share hot-added outside the IOMMU, mounted, read and written by the guest, and built
    // again by the next boots on a new virtiofsd.
    let added = call("add-fs").json("add-fs", &out);
    assert_eq!(added["id"], "_fs0", "{out}");
    let share = &call("info-fs").json("info", &out)["config"]["fs"][0];
    assert_eq!(
        (&share["tag"], &share["socket"]),
        (&"chrfs".into(), &"fs.sock".into()),
        "{out}"
    );
    assert_eq!(out.marker("CHR-GUEST-FS"), Some("from-the-host"), "{out}");
    assert_eq!(out.marker("CHR-GUEST-FS-WROTE"), Some("yes"), "{out}");
    assert_eq!(
        out.marker("CHR-HOST-FS-GUEST"),
        Some("from-the-guest"),
        "{out}"
    );
    for boot in ["SECOND", "THIRD"] {
        assert_eq!(
            out.marker(&format!("CHR-GUEST-{boot}-FS")),
            Some("from-the-host"),
            "{boot} boot: {out}"
        );
    }

    call("pause").succeeded("pause", &out);
    assert_eq!(
        call("info-paused").json("info", &out)["state"],
        "Paused",
        "{out}"
    );
    call("resume").succeeded("resume", &out);
    assert_eq!(
        call("info-resumed").json("info", &out)["state"],
        "Running",
        "{out}"
    );

    // vm.shutdown ends the VM, not warden: the configuration stays, and boots again.
    call("shutdown-vm").succeeded("shutdown", &out);
    let shut = call("info-shut").json("info", &out);
    assert_eq!(shut["state"], "Created", "{out}");
    assert_eq!(
        shut["config"]["disks"].as_array().map(Vec::len),
        Some(1),
        "{out}"
    );
    call("ping-shut").succeeded("ping", &out);
    call("boot-again").succeeded("boot", &out);
    assert_eq!(out.marker("CHR-GUEST-SECOND-BOOT"), Some("yes"), "{out}");
    assert_eq!(
        call("info-again").json("info", &out)["state"],
        "Running",
        "{out}"
    );
    call("reboot").succeeded("reboot", &out);
    assert_eq!(out.marker("CHR-GUEST-THIRD-BOOT"), Some("yes"), "{out}");
    assert_eq!(
        call("info-rebooted").json("info", &out)["state"],
        "Running",
        "{out}"
    );
    assert_eq!(
        out.guest_output().matches("WARDEN-L2-INIT").count(),
        3,
        "three boots in one warden\n{out}"
    );
    call("delete").succeeded("delete", &out);
    let deleted = call("info-deleted");
    assert_ne!(deleted.rc, Some(0), "{out}");
    assert!(
        deleted.err.contains("VM is not created"),
        "{}\n{out}",
        deleted.err
    );

    call("shutdown").succeeded("shutdown-vmm", &out);
    assert_eq!(out.warden_exit, Some(0), "shutdown-vmm ends warden: {out}");
}
