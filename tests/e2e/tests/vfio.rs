//! VFIO passthrough for real, in the nested test host: QEMU gives L1 an emulated Intel IOMMU
//! and a virtio-blk-pci disk behind it; L1 binds the disk to vfio-pci and warden passes it to
//! L2, where the stock virtio_blk driver reads what this machine wrote into the image. That
//! only works if every DMA mapping reached L1's VFIO container correctly: with `iommu=on`
//! through L2's virtio-iommu MAP/UNMAP requests, without it from the all-RAM map at start.

use e2e::{Outcome, Scenario};
use std::time::Duration;

/// The passed-through disk's PCI address in L1 (QEMU `addr=0x5`).
const L1_DEVICE: &str = "/sys/bus/pci/devices/0000:00:05.0";
/// Its address in L2: after the virtio-iommu (01), console (02) and rng (03).
const L2_BDF: &str = "0000:00:04.0";

/// On this machine: 8 MiB of random data; the checksum of its first 4 MiB.
const IMAGE: &str = "dd if=/dev/urandom of=passthrough.img bs=1M count=8 2>/dev/null
echo \"HOST-DISK-MD5=$(head -c 4194304 passthrough.img | md5sum | cut -d' ' -f1)\"";

/// In L1: the IOMMU is on, the disk is bound to vfio-pci.
const BIND_IN_L1: &str = r#"dev=/sys/bus/pci/devices/0000:00:05.0
dmesg | grep -q 'DMAR: Intel(R) Virtualization Technology for Directed I/O' && echo L1-IOMMU=on
echo "L1-GROUP-DEVICES=$(ls "$(readlink -f $dev/iommu_group)/devices")"
echo vfio-pci >$dev/driver_override
if [ -e $dev/driver ]; then echo 0000:00:05.0 >$dev/driver/unbind; fi
echo 0000:00:05.0 >/sys/bus/pci/drivers_probe
echo "L1-DRIVER=$(basename "$(readlink $dev/driver)")"
echo "L1-DMA-ENTRY-LIMIT=$(cat /sys/module/vfio_iommu_type1/parameters/dma_entry_limit)""#;

/// In L2: topology, groups, then the disk read and a write read back with O_DIRECT.
const GUEST_READS: &str = r#"
wait_for /dev/vda 60
for dev in /sys/bus/pci/devices/*; do
    echo "PT-PCI ${dev##*/} $(cat "$dev/vendor") $(cat "$dev/device") $(basename "$(readlink "$dev/driver")")"
done
for group in /sys/kernel/iommu_groups/*; do
    [ -d "$group" ] && echo "PT-GROUP ${group##*/} $(ls "$group/devices")"
done
dmesg | grep virtio_iommu || true
md5() { md5sum | cut -d' ' -f1; }
echo "GUEST-DISK-MD5=$(head -c 4194304 /dev/vda | md5)"
dd if=/dev/urandom of=/tmp/written bs=1M count=2 2>/dev/null
echo "GUEST-WRITTEN-MD5=$(md5 </tmp/written)"
dd if=/tmp/written of=/dev/vda bs=1M seek=4 oflag=direct conv=fsync 2>/dev/null
echo "GUEST-REREAD-MD5=$(dd if=/dev/vda bs=1M skip=4 count=2 iflag=direct 2>/dev/null | md5)"
"#;

/// A scenario whose KVM host has the emulated IOMMU and the disk, bound to vfio-pci.
fn passthrough(name: &str, device_arg: &str) -> Scenario {
    Scenario::new(name)
        .qemu_setup(IMAGE)
        .l1_qemu_args([
            "-device",
            "intel-iommu,intremap=on",
            "-drive",
            "if=none,id=pt,file=passthrough.img,format=raw",
            "-device",
            "virtio-blk-pci,drive=pt,disable-legacy=on,iommu_platform=on,addr=0x5",
        ])
        .l1_cmdline("intel_iommu=on")
        .host_setup(BIND_IN_L1)
        .warden_args(["--memory", "size=512M", "--device", device_arg])
        .timeout(Duration::from_secs(300))
}

fn lines_with<'a>(out: &'a Outcome, prefix: &str) -> Vec<&'a str> {
    out.guest_output()
        .lines()
        .filter_map(|line| line.trim().strip_prefix(prefix))
        .collect()
}

/// The L1 side went as planned: without it nothing below means anything.
fn assert_l1_ready(out: &Outcome) {
    assert_eq!(out.marker("L1-IOMMU"), Some("on"), "{out}");
    assert_eq!(
        out.marker("L1-GROUP-DEVICES"),
        Some("0000:00:05.0"),
        "{out}"
    );
    assert_eq!(out.marker("L1-DRIVER"), Some("vfio-pci"), "{out}");
}

/// The disk read what this machine wrote, and a write came back.
fn assert_disk_works(out: &Outcome) {
    let host = out.marker("HOST-DISK-MD5").expect("host checksum");
    assert_eq!(out.marker("GUEST-DISK-MD5"), Some(host), "{out}");
    let written = out.marker("GUEST-WRITTEN-MD5").expect("guest checksum");
    assert_eq!(out.marker("GUEST-REREAD-MD5"), Some(written), "{out}");
}

fn vfio_stats(out: &Outcome) -> &str {
    out.guest_output()
        .lines()
        .find_map(|line| line.trim().strip_prefix("warden: vfio "))
        .unwrap_or_else(|| panic!("warden printed no VFIO statistics\n{out}"))
}

#[test]
fn passthrough_behind_the_virtio_iommu() {
    let arg = format!("path={L1_DEVICE},iommu=on,id=disk0");
    let Some(out) = passthrough("vfio_iommu_on", &arg)
        .guest_script(GUEST_READS)
        .run()
    else {
        return;
    };
    assert_l1_ready(&out);
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert!(
        lines_with(&out, "PT-PCI ")
            .contains(&format!("{L2_BDF} 0x1af4 0x1042 virtio-pci").as_str()),
        "the disk is at {L2_BDF} with virtio-pci bound\n{out}"
    );
    let groups: Vec<&str> = lines_with(&out, "PT-GROUP ")
        .into_iter()
        .filter_map(|line| line.split_once(' ').map(|(_, devices)| devices))
        .collect();
    assert!(
        groups.contains(&L2_BDF),
        "the passed-through disk has an IOMMU group of its own\n{out}"
    );
    assert_disk_works(&out);
    assert_eq!(out.warden_exit, Some(0), "{out}");
    let stats = vfio_stats(&out);
    assert!(stats.starts_with("disk0: "), "{stats}");
    let maps: u64 = stats["disk0: ".len()..]
        .split(" maps")
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable statistics {stats:?}"));
    assert!(
        maps > 10,
        "the guest's MAP requests became VFIO maps: {stats}\n{out}"
    );
}

#[test]
fn passthrough_with_all_ram_mapped() {
    let arg = format!("path={L1_DEVICE},id=disk0");
    let Some(out) = passthrough("vfio_all_ram", &arg)
        .guest_script(GUEST_READS)
        .run()
    else {
        return;
    };
    assert_l1_ready(&out);
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert!(
        lines_with(&out, "PT-PCI ")
            .contains(&format!("{L2_BDF} 0x1af4 0x1042 virtio-pci").as_str()),
        "{out}"
    );
    assert!(
        lines_with(&out, "PT-GROUP ").is_empty(),
        "no virtio-iommu, so no IOMMU groups\n{out}"
    );
    assert_disk_works(&out);
    assert_eq!(out.warden_exit, Some(0), "{out}");
    assert_eq!(
        vfio_stats(&out),
        "disk0: 1 maps, 0 unmaps, 536870912 bytes mapped, 1 entries live, 1 peak entries (limit 65535, 0 refused)",
        "all 512 MiB of RAM in one entry, mapped once\n{out}"
    );
}

/// The seed's "faster mappings" claim, measured through the whole chain: in L2, a device
/// behind warden's virtio-iommu is bound to vfio-pci and `vfio-map` maps a 64 MiB buffer with
/// one `VFIO_IOMMU_MAP_DMA`, from 4 KiB pages (in a fresh guest, and with the guest's memory
/// fragmented as after a long run) and from 2 MiB huge pages. L2's type1 driver sends one MAP
/// request per physically contiguous run; warden turns each into one VFIO mapping in L1. The
/// device is QEMU's `edu` (no L2 driver, so no other DMA traffic): warden's totals are the
/// buffer's, plus one 8 KiB MAP/UNMAP pair type1 makes when the container is set up (its
/// fine-grained super page probe).
#[test]
fn huge_pages_need_far_fewer_mappings() {
    let mut rows = Vec::new();
    for mode in ["4k", "4k-fragmented", "2m"] {
        let hugepages = if mode == "2m" {
            "echo 40 >/proc/sys/vm/nr_hugepages\necho \"L2-HUGEPAGES=$(cat /proc/sys/vm/nr_hugepages)\"\n"
        } else {
            ""
        };
        let script = format!(
            r#"dev=/sys/bus/pci/devices/{L2_BDF}
echo vfio-pci >$dev/driver_override
echo {L2_BDF} >/sys/bus/pci/drivers_probe
echo "L2-DRIVER=$(basename "$(readlink $dev/driver)")"
echo "L2-GROUP-DEVICES=$(ls "$(readlink -f $dev/iommu_group)/devices")"
# The virtio-iommu offers no interrupt remapping on x86, which type1 insists on unless told
# otherwise; the device's MSIs are still remapped by L1's IOMMU.
echo 1 >/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts
{hugepages}vfio-map $dev {mode} 64 &
pid=$!
while [ ! -e /tmp/vfio-map.done ]; do kill -0 $pid; usleep 100000; done
"#
        );
        let Some(out) = Scenario::new(&format!("vfio_map_{mode}"))
            .l1_qemu_args([
                "-device",
                "intel-iommu,intremap=on",
                "-device",
                "edu,addr=0x6",
            ])
            .l1_cmdline("intel_iommu=on")
            .host_setup(&BIND_IN_L1.replace("00:05.0", "00:06.0"))
            .warden_args([
                "--memory",
                "size=512M",
                "--device",
                "path=/sys/bus/pci/devices/0000:00:06.0,iommu=on,id=edu",
            ])
            .guest_tool("vfio-map")
            .guest_script(&script)
            .timeout(Duration::from_secs(400))
            .run()
        else {
            return;
        };
        assert_eq!(out.marker("L1-DRIVER"), Some("vfio-pci"), "{out}");
        assert_eq!(out.marker("L2-DRIVER"), Some("vfio-pci"), "{out}");
        assert_eq!(out.marker("L2-GROUP-DEVICES"), Some(L2_BDF), "{out}");
        assert_eq!(out.guest_script_exit(), Some(0), "{out}");
        let ms = out
            .marker(&format!("VFIO-MAP-{}", mode.to_uppercase()))
            .and_then(|v| v.strip_prefix("mapped ms="))
            .unwrap_or_else(|| panic!("vfio-map did not map\n{out}"))
            .to_string();
        let requests = out.iommu_counter("maps");
        let vfio = vfio_stats(&out)
            .strip_prefix("edu: ")
            .expect("stats for edu");
        let field = |name: &str| -> u64 {
            let end = vfio.find(name).expect(name);
            let start = vfio[..end - 1].rfind(' ').map_or(0, |i| i + 1);
            vfio[start..end - 1].parse().expect(name)
        };
        let bytes = field("bytes mapped");
        assert!(
            (64 << 20..(64 << 20) + (64 << 10)).contains(&bytes),
            "the buffer, and no more than type1's probe, went to VFIO: {bytes}\n{out}"
        );
        rows.push((mode, requests, field("peak entries"), ms));
    }
    eprintln!("| buffer pages | MAP requests | VFIO entries (peak) | VFIO_IOMMU_MAP_DMA in L2 |");
    eprintln!("| --- | --- | --- | --- |");
    for (mode, requests, entries, ms) in &rows {
        eprintln!("| {mode} | {requests} | {entries} | {ms} ms |");
    }
    // 32 huge pages at most, plus type1's probe.
    let (fragmented, huge) = (rows[1].1, rows[2].1);
    assert!(
        huge <= 33,
        "64 MiB of 2 MiB pages is at most 32 runs: {rows:?}"
    );
    assert!(
        fragmented >= 256 * huge,
        "scattered 4 KiB pages need at least 256 times the MAP requests: {rows:?}"
    );
}

/// On this machine: a 48 MiB image for the hot-plugged disk, and the checksum of its first
/// 32 MiB.
const HOT_IMAGE: &str = "dd if=/dev/urandom of=passthrough.img bs=1M count=48 2>/dev/null
echo \"HOST-DISK-MD5=$(head -c 33554432 passthrough.img | md5sum | cut -d' ' -f1)\"";

/// In L1, once the disk is bound: a signal disk, and a client that waits for the guest, adds
/// the disk behind the IOMMU (then again, which the busy group refuses), reads info and
/// counters, removes it once the guest has used it, and presses the power button once the
/// guest has seen it go. Cloud Hypervisor's `ch-remote` adds and removes it where there is
/// one (its exit status 0 is written as the 2xx it stands for), `$API_CLIENT` otherwise.
const HOTPLUG_CLIENT: &str = r#"dd if=/dev/zero of=signal.img bs=1M count=1 2>/dev/null
(
  set +e
  wait_sector() {
    n=0
    until [ "$(dd if=signal.img bs=512 skip=$1 count=1 2>/dev/null | head -c ${#2})" = "$2" ]; do
      n=$((n + 1)); [ $n -gt 400 ] && exit 1
      sleep 1
    done
  }
  # NAME STATUS ARGS: ch-remote ARGS, its output in NAME.txt as `$API_CLIENT` writes it.
  chr() {
    name=$1 status=$2; shift 2
    if ch-remote --api-socket api.sock "$@" >chr.out 2>chr.err; then
      echo "$status $(cat chr.out)" >$name.txt
    else
      echo "0 ch-remote failed: $(cat chr.err)" >$name.txt
    fi
  }
  wait_sector 8 READY
  if command -v ch-remote >/dev/null; then
    chr add 200 add-device path=/sys/bus/pci/devices/0000:00:05.0,iommu=on,id=pt0
  else
    "$API_CLIENT" api.sock PUT /api/v1/vm.add-device \
      '{"path":"/sys/bus/pci/devices/0000:00:05.0","iommu":true,"id":"pt0"}' >add.txt
  fi
  "$API_CLIENT" api.sock PUT /api/v1/vm.add-device \
    '{"path":"/sys/bus/pci/devices/0000:00:05.0","id":"pt1"}' >add-again.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.info >info.txt
  wait_sector 16 HOTOK
  "$API_CLIENT" api.sock GET /api/v1/vm.counters >counters.txt
  if command -v ch-remote >/dev/null; then
    chr remove 204 remove-device pt0
  else
    "$API_CLIENT" api.sock PUT /api/v1/vm.remove-device '{"id":"pt0"}' >remove.txt
  fi
  wait_sector 24 GONE
  "$API_CLIENT" api.sock GET /api/v1/vm.counters >counters-after.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.power-button >power-button.txt
) >/dev/null 2>&1 &"#;

/// In L2: tell the host, find the hot-added disk at slot 0x18 in an IOMMU group of its own,
/// read 32 MiB, write and read back two rounds of 8 MiB with O_DIRECT, wait for it to go,
/// then for the power button.
const HOTPLUG_GUEST: &str = r#"
wait_for /dev/vda 60
wait_for /sys/class/input/event0
for dev in /sys/class/input/event*; do
    [ "$(cat "$dev/device/name")" = "Power Button" ] && button=/dev/input/${dev##*/}
done
exec 3<"$button"
tell() { printf "$1" | dd of=/dev/vda bs=512 seek=$2 conv=notrunc,fsync 2>/dev/null; }
tell READY 8
hot=/sys/bus/pci/devices/0000:00:18.0
wait_for /dev/vdb 120
echo "HOT-DRIVER=$(basename "$(readlink $hot/driver)")"
group=$(basename "$(readlink $hot/iommu_group)")
echo "HOT-GROUP-DEVICES=$(ls /sys/kernel/iommu_groups/$group/devices | tr '\n' ' ')"
md5() { md5sum | cut -d' ' -f1; }
echo "GUEST-DISK-MD5=$(dd if=/dev/vdb bs=1M count=32 iflag=direct 2>/dev/null | md5)"
for round in 0 1; do
    dd if=/dev/urandom of=/tmp/written bs=1M count=8 2>/dev/null
    echo "GUEST-WRITTEN-$round-MD5=$(md5 </tmp/written)"
    dd if=/tmp/written of=/dev/vdb bs=1M seek=$((32 + 8 * round)) oflag=direct conv=notrunc,fsync 2>/dev/null
    echo "GUEST-REREAD-$round-MD5=$(dd if=/dev/vdb bs=1M skip=$((32 + 8 * round)) count=8 iflag=direct 2>/dev/null | md5)"
done
tell HOTOK 16
n=0
while [ -e /dev/vdb ] || [ -e $hot ]; do
    n=$((n + 1)); [ $n -gt 120 ] && break
    sleep 1
done
[ -e $hot ] && echo "HOT-GONE=no" || echo "HOT-GONE=yes"
tell GONE 24
dd bs=24 count=1 of=/dev/null <&3 2>/dev/null
echo "HOT-POWER-BUTTON=pressed"
"#;

const HOTPLUG_CHECK: &str = r#"for f in add add-again info counters remove counters-after power-button; do
  echo "API-REPLY $f $(cat $f.txt 2>/dev/null)"
done"#;

/// `vm.add-device` while the guest runs, behind the IOMMU: the VM starts without any
/// passed-through or protected device (`--platform iommu=on` makes the virtio-iommu), the
/// disk arrives in slot 0x18 in an IOMMU group of its own, the guest's virtio_blk reads what
/// this machine wrote and writes what reads back (every DMA through its MAP requests, turned
/// into L1 VFIO maps), and `vm.remove-device` takes it away again.
#[test]
fn passthrough_hot_added_behind_the_virtio_iommu_and_removed() {
    let mut scenario = passthrough("vfio_hotplug", "");
    if let Some(ch_remote) = e2e::peer_binary(
        "ch-remote",
        "WARDEN_CH_REMOTE",
        "vfio_hotplug's add-device through ch-remote (api-client instead)",
    ) {
        scenario = scenario.host_binary(&ch_remote);
    }
    let Some(out) = scenario
        .qemu_setup(HOT_IMAGE)
        .host_setup(&format!("{BIND_IN_L1}\n{HOTPLUG_CLIENT}"))
        .warden_args([
            "--memory",
            "size=512M",
            "--platform",
            "iommu=on",
            "--disk",
            "path=signal.img",
            "--api-socket",
            "path=api.sock",
        ])
        .guest_script(HOTPLUG_GUEST)
        .host_check(HOTPLUG_CHECK)
        .timeout(Duration::from_secs(400))
        .run()
    else {
        return;
    };
    assert_l1_ready(&out);
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    let (status, added) = out.api_reply("add");
    assert_eq!(status, 200, "{added}\n{out}");
    assert_eq!(added["id"], "pt0", "{added}");
    assert_eq!(added["bdf"], "0000:00:18.0", "{added}");
    let (status, again) = out.api_reply("add-again");
    assert_eq!(status, 400, "the group is in use: {again}\n{out}");
    let error = again[0].as_str().unwrap_or_default();
    assert!(error.contains("is busy"), "{again}");
    let (_, info) = out.api_reply("info");
    assert_eq!(
        info["device_tree"]["pt0"]["pci_bdf"], "0000:00:18.0",
        "{info}"
    );

    assert_eq!(out.marker("HOT-DRIVER"), Some("virtio-pci"), "{out}");
    assert_eq!(
        out.marker("HOT-GROUP-DEVICES"),
        Some("0000:00:18.0"),
        "an IOMMU group of its own\n{out}"
    );
    let host = out.marker("HOST-DISK-MD5").expect("host checksum");
    assert_eq!(
        out.marker("GUEST-DISK-MD5"),
        Some(host),
        "32 MiB read\n{out}"
    );
    for round in 0..2 {
        let written = out.marker(&format!("GUEST-WRITTEN-{round}-MD5"));
        assert!(written.is_some(), "{out}");
        assert_eq!(
            out.marker(&format!("GUEST-REREAD-{round}-MD5")),
            written,
            "round {round}\n{out}"
        );
    }
    let (_, counters) = out.api_reply("counters");
    let maps = counters["pt0"]["maps"].as_u64().unwrap_or(0);
    assert!(
        maps > 10,
        "the guest's MAP requests became VFIO maps: {counters}\n{out}"
    );
    assert_eq!(out.api_reply("remove").0, 204, "{out}");
    assert_eq!(out.marker("HOT-GONE"), Some("yes"), "{out}");
    let (_, after) = out.api_reply("counters-after");
    assert!(after.is_object(), "{after}");
    assert_eq!(after.get("pt0"), None, "gone with it: {after}");
    assert_eq!(out.api_reply("power-button").0, 204, "{out}");
    assert_eq!(out.marker("HOT-POWER-BUTTON"), Some("pressed"), "{out}");
    assert_eq!(out.warden_exit, Some(0), "{out}");
}
