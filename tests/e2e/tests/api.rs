//! `--api-socket` (the control-plane issue): while the guest runs, the KVM host asks warden's
//! API for ping, info and counters, is refused a vCPU it cannot hot-add, hot-adds a disk behind the IOMMU
//! (which the guest finds in a new IOMMU group and reads back), removes it again, hot-adds a
//! net behind the IOMMU and moves 4 MiB each way across it (checksums on both sides), removes
//! it (its tap goes away), pauses the guest (a counter the guest keeps writing to its disk
//! stops) and resumes it, then presses the power button, and the guest shuts itself down so
//! warden exits 0. One boot.
//!
//! Host and guest take turns through sectors of the boot disk: the guest writes `READY` (8),
//! `HOTOK` (16, it has read the hot-added disk), `GONE` (24, the disk has left it), `NETOK`
//! (32, the transfers are done) and `COUNTING` (48, its counter runs, in sector 40).

use e2e::{Outcome, Scenario};
use serde_json::Value;
use std::time::Duration;

/// The guest's half: use the protected disk (so the virtio-iommu has mappings to count), tell
/// the host it is ready through the disk, then wait for the power button (any input event of
/// the "Power Button" device) and end.
const GUEST_SCRIPT: &str = r#"
wait_for /dev/vda
wait_for /sys/class/input/event0
button=
for dev in /sys/class/input/event*; do
    [ "$(cat "$dev/device/name")" = "Power Button" ] && button=/dev/input/${dev##*/}
done
echo "API-GUEST-BUTTON=${button:-none}"
wait_for "$button"
# Opened before the host is told, so that no press is missed.
exec 3<"$button"
head -c 4096 /dev/vda | wc -c >/dev/null
tell() { printf "$1" | dd of=/dev/vda bs=512 seek=$2 conv=notrunc,fsync 2>/dev/null; }
tell READY 8
# The host hot-adds a 32 MiB disk behind the IOMMU in slot 0x18.
hot=/sys/bus/pci/devices/0000:00:18.0
wait_for /dev/vdb
group_of() { basename "$(readlink "$1/iommu_group")"; }
# The boot disk, after the console at 00:02.0.
echo "API-GUEST-BOOT-GROUP=$(group_of /sys/bus/pci/devices/0000:00:03.0)"
hot_group=$(group_of $hot)
echo "API-GUEST-HOT-GROUP=${hot_group:-none}"
echo "API-GUEST-HOT-GROUP-DEVICES=$(ls /sys/kernel/iommu_groups/$hot_group/devices | tr '\n' ' ')"
echo "API-GUEST-HOT-MARKER=$(head -c 14 /dev/vdb)"
echo "API-GUEST-HOT-SUM=$(head -c 33554432 /dev/vdb | sha256sum | cut -d' ' -f1)"
tell HOTOK 16
# The host removes it: acpiphp unbinds the driver and runs _EJ0.
n=0
while [ -e /dev/vdb ] || [ -e $hot ]; do
    n=$((n + 1)); [ $n -gt 120 ] && break
    sleep 1
done
[ -e /dev/vdb ] || [ -e $hot ] && echo "API-GUEST-HOT-GONE=no" || echo "API-GUEST-HOT-GONE=yes"
[ -e /sys/kernel/iommu_groups/$hot_group/devices/0000:00:18.0 ] && echo "API-GUEST-HOT-GROUP-LEFT=no" || echo "API-GUEST-HOT-GROUP-LEFT=yes"
tell GONE 24
# The host hot-adds a net behind the IOMMU, in the slot the disk left; its tap's host end is
# 192.168.251.1.
wait_for /sys/class/net/eth0 120
net_pci=$(readlink -f /sys/class/net/eth0/device/..)
echo "API-GUEST-NET-PCI=${net_pci##*/}"
net_group=$(group_of "$net_pci")
echo "API-GUEST-NET-GROUP-DEVICES=$(ls /sys/kernel/iommu_groups/$net_group/devices | tr '\n' ' ')"
ip link set lo up
ip addr add 192.168.251.2/24 dev eth0
ip link set eth0 up
n=0
until [ "$(cat /sys/class/net/eth0/operstate)" = up ]; do
    n=$((n + 1)); [ $n -gt 100 ] && break
    usleep 100000
done
# 4 MiB: tens of MiB through a protected net are what the nested test host does not survive
# (tests/e2e/tests/net_soak.rs, docs/net-soak-investigation.md); this checks the hot-added net.
dd if=/dev/urandom of=/tmp/to-host.bin bs=1M count=4 2>/dev/null
echo "API-GUEST-NET-SENT-MD5=$(md5sum </tmp/to-host.bin | cut -d' ' -f1)"
printf '#!/bin/sh\nexec cat >/tmp/from-host.bin\n' >/tmp/recv.sh
chmod +x /tmp/recv.sh
# Refused until the host listens.
n=0
until nc 192.168.251.1 5001 </tmp/to-host.bin 2>/dev/null; do
    n=$((n + 1)); [ $n -gt 300 ] && break
    usleep 200000
done
nc 192.168.251.1 5002 -e /tmp/recv.sh
echo "API-GUEST-NET-RECEIVED-MD5=$(md5sum </tmp/from-host.bin | cut -d' ' -f1)"
tell NETOK 32
n=0
while [ -e /sys/class/net/eth0 ] || [ -e "$net_pci" ]; do
    n=$((n + 1)); [ $n -gt 120 ] && break
    sleep 1
done
[ -e /sys/class/net/eth0 ] || [ -e "$net_pci" ] && echo "API-GUEST-NET-GONE=no" || echo "API-GUEST-NET-GONE=yes"
# A counter the host reads from sector 40 while it pauses and resumes the guest, with the
# guest's uptime beside it: the clock the guest keeps time by (kvm-clock) stops for the pause.
echo "API-GUEST-CLOCKSOURCE=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
stamp() {
    printf '%010d %012s' $1 "$(cut -d' ' -f1 /proc/uptime)" | dd of=/dev/vda bs=512 seek=40 conv=notrunc,fsync 2>/dev/null
}
count() {
    i=0
    while :; do
        i=$((i + 1))
        stamp $i
    done
}
# The first value is on the disk before the host is told to read it.
stamp 0
count &
tell COUNTING 48
dd bs=24 count=1 of=/dev/null <&3 2>/dev/null
echo "API-GUEST-POWER-BUTTON=pressed"
"#;

/// The host's half, in the background while warden runs: once the guest is ready, one call
/// per endpoint, each answer kept as `STATUS BODY` in a file for the check.
const HOST_CLIENT: &str = r#"dd if=/dev/zero of=disk.img bs=1M count=8 2>/dev/null
dd if=/dev/urandom of=hot.img bs=1M count=32 2>/dev/null
printf 'HOTPLUG-MARKER' | dd of=hot.img conv=notrunc 2>/dev/null
sha256sum hot.img | cut -d' ' -f1 >hot.sum
dd if=/dev/urandom of=to-guest.bin bs=1M count=4 2>/dev/null
md5sum <to-guest.bin | cut -d' ' -f1 >to-guest.md5
printf '#!/bin/sh\nexec cat to-guest.bin\n' >send.sh
printf '#!/bin/sh\nexec cat >from-guest.bin\n' >recv.sh
chmod +x send.sh recv.sh
(
  set +e
  # The guest's count and uptime, then the host's uptime.
  counter() {
    echo "$(dd if=disk.img bs=512 skip=40 count=1 2>/dev/null | head -c 23) $(cut -d' ' -f1 /proc/uptime)" >counter-$1.txt
  }
  wait_sector() {
    n=0
    until [ "$(dd if=disk.img bs=512 skip=$1 count=1 2>/dev/null | head -c ${#2})" = "$2" ]; do
      n=$((n + 1)); [ $n -gt 300 ] && exit 1
      sleep 1
    done
  }
  wait_sector 8 READY
  "$API_CLIENT" api.sock GET /api/v1/vmm.ping >ping.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.info >info.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.counters >counters.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.resize '{"desired_vcpus":1}' >resize-same.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.resize '{"desired_vcpus":2}' >resize-more.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.add-disk '{"path":"missing.img","iommu":true}' >add-missing.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.add-disk '{"path":"hot.img","iommu":true,"id":"hot0"}' >add-disk.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.add-disk '{"path":"hot.img","id":"hot0"}' >add-same-id.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.info >info-hot.txt
  wait_sector 16 HOTOK
  "$API_CLIENT" api.sock GET /api/v1/vm.counters >counters-hot.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.remove-device '{"id":"_disk0"}' >remove-boot.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.remove-device '{"id":"hot0"}' >remove.txt
  wait_sector 24 GONE
  "$API_CLIENT" api.sock PUT /api/v1/vm.remove-device '{"id":"hot0"}' >remove-again.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.counters >counters-after.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.info >info-after.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.add-net \
    '{"tap":"hotnet0","ip":"192.168.251.1","mask":"255.255.255.0","iommu":true,"id":"hotnet"}' >add-net.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.add-net '{"tap":"hotnet0","id":"hotnet1"}' >add-net-busy.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.info >info-net.txt
  timeout 120 nc -l -p 5002 -e ./send.sh &
  timeout 120 nc -l -p 5001 -e ./recv.sh
  wait
  md5sum <from-guest.bin | cut -d' ' -f1 >from-guest.md5
  wait_sector 32 NETOK
  "$API_CLIENT" api.sock GET /api/v1/vm.counters >counters-net.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.remove-device '{"id":"hotnet"}' >remove-net.txt
  wait_sector 48 COUNTING
  # The answer came when the guest was asked; the net goes once it lets go.
  n=0
  while [ -e /sys/class/net/hotnet0 ] && [ $n -lt 100 ]; do n=$((n + 1)); sleep 0.1; done
  "$API_CLIENT" api.sock GET /api/v1/vm.counters >counters-net-gone.txt
  [ -e /sys/class/net/hotnet0 ] && echo no >tap-gone.txt || echo yes >tap-gone.txt
  counter running-1; sleep 2; counter running-2
  "$API_CLIENT" api.sock PUT /api/v1/vm.resume >resume-running.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.pause >pause.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.pause >pause-again.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.info >info-paused.txt
  # A write queued just before the pause may still land: read after it.
  sleep 1; counter paused-1; sleep 3; counter paused-2
  "$API_CLIENT" api.sock PUT /api/v1/vm.resume >resume.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.info >info-resumed.txt
  sleep 3; counter resumed
  "$API_CLIENT" api.sock GET /api/v1/vm.pause >wrong-method.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.power-button >power-button.txt
) >/dev/null 2>&1 &"#;

const HOST_CHECK: &str = r#"echo "API-HOST-HOT-SUM=$(cat hot.sum)"
echo "API-HOST-NET-SENT-MD5=$(cat to-guest.md5)"
echo "API-HOST-NET-RECEIVED-MD5=$(cat from-guest.md5 2>/dev/null)"
echo "API-HOST-TAP-GONE=$(cat tap-gone.txt 2>/dev/null)"
for c in running-1 running-2 paused-1 paused-2 resumed; do
  echo "API-HOST-COUNTER-$c=$(cat counter-$c.txt 2>/dev/null)"
done
for f in ping info counters resize-same resize-more add-missing add-disk add-same-id info-hot \
         counters-hot remove-boot remove remove-again counters-after info-after \
         add-net add-net-busy info-net counters-net remove-net counters-net-gone \
         resume-running pause pause-again info-paused resume info-resumed \
         wrong-method power-button; do
  echo "API-REPLY $f $(cat $f.txt 2>/dev/null)"
done"#;

#[test]
fn api_socket_answers_while_the_guest_runs_and_the_power_button_ends_it() {
    let Some(out) = Scenario::new("api_socket")
        .host_setup(HOST_CLIENT)
        .warden_args([
            "--cpus",
            "1",
            "--memory",
            "size=512M",
            "--disk",
            "path=disk.img,iommu=on",
            "--api-socket",
            "path=api.sock",
        ])
        .guest_script(GUEST_SCRIPT)
        .host_check(HOST_CHECK)
        .timeout(Duration::from_secs(600))
        .run()
    else {
        return;
    };

    assert_ne!(out.marker("API-GUEST-BUTTON"), Some("none"), "{out}");
    let (status, ping) = out.api_reply("ping");
    assert_eq!(status, 200, "{out}");
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"), "{out}");
    assert!(ping["pid"].as_i64().is_some_and(|pid| pid > 1), "{out}");
    assert!(ping["build_version"].is_string(), "{out}");

    let (status, info) = out.api_reply("info");
    assert_eq!(status, 200, "{out}");
    assert_eq!(info["state"], "Running", "{out}");
    assert_eq!(info["memory_actual_size"], 512u64 << 20, "{out}");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 1, "{out}");
    assert_eq!(info["config"]["disks"][0]["path"], "disk.img", "{out}");
    assert_eq!(info["config"]["disks"][0]["iommu"], true, "{out}");
    assert_eq!(info["config"]["iommu"], true, "{out}");
    assert_eq!(
        info["device_tree"]["virtio-iommu"]["pci_bdf"], "0000:00:01.0",
        "{out}"
    );
    assert!(
        info["device_tree"]["_disk0"]["pci_bdf"].is_string(),
        "{out}"
    );

    let (status, counters) = out.api_reply("counters");
    assert_eq!(status, 200, "{out}");
    let total = &counters["virtio-iommu"];
    let api_maps = total["maps"].as_u64().expect("a maps counter");
    let api_translations = total["translations"].as_u64().expect("translations");
    assert!(
        api_maps > 0,
        "the protected disk was used: {counters}\n{out}"
    );
    assert!(
        counters
            .as_object()
            .unwrap()
            .keys()
            .any(|id| id.starts_with("virtio-iommu-domain-")),
        "per-domain counters: {counters}\n{out}"
    );
    // The boot disk's own counters, under its vm.info id: the guest read it and wrote READY
    // with a flush.
    let disk = &counters["_disk0"];
    let names: Vec<&String> = disk
        .as_object()
        .expect("_disk0's counters")
        .keys()
        .collect();
    assert_eq!(
        names,
        [
            "discard_ops",
            "flush_ops",
            "host_syncs",
            "read_bytes",
            "read_ops",
            "write_bytes",
            "write_ops",
            "write_zeroes_ops"
        ],
        "{out}"
    );
    let at_least = |c: &Value, name: &str, n: u64| {
        let v = c[name].as_u64().unwrap_or(0);
        assert!(v >= n, "{name} = {v}, want >= {n}: {c}\n{out}");
    };
    at_least(disk, "read_bytes", 4096);
    at_least(disk, "read_ops", 1);
    at_least(disk, "write_bytes", 512);
    at_least(disk, "write_ops", 1);
    at_least(disk, "flush_ops", 1);
    at_least(disk, "host_syncs", 1);
    // The exit report comes from the same counters, later: never behind the API's.
    let (exit_maps, exit_translations) =
        (out.iommu_counter("maps"), out.iommu_counter("translations"));
    assert!(api_maps <= exit_maps, "{api_maps} > {exit_maps}\n{out}");
    assert!(api_translations <= exit_translations, "{out}");

    // What the VM has already is fine; a vCPU more is refused (no vCPU hotplug yet).
    assert_eq!(out.api_reply("resize-same").0, 204, "{out}");
    let (status, refusal) = out.api_reply("resize-more");
    assert_eq!(status, 500, "{out}");
    assert!(
        refusal[0].as_str().unwrap().contains("no vCPU hotplug"),
        "{out}"
    );
    check_hotplug(&out);
    check_hot_net(&out);
    check_pause(&out);
    assert_eq!(out.api_reply("wrong-method").0, 400, "{out}");
    assert_eq!(out.api_reply("power-button").0, 204, "{out}");

    assert_eq!(
        out.marker("API-GUEST-POWER-BUTTON"),
        Some("pressed"),
        "{out}"
    );
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert_eq!(out.warden_exit, Some(0), "{out}");
}

/// The disk hot-added behind the IOMMU: where it landed, what the guest made of it, the
/// refusals around it, and its removal.
fn check_hotplug(out: &Outcome) {
    let (status, missing) = out.api_reply("add-missing");
    assert_eq!(status, 400, "{out}");
    assert!(
        missing[0].as_str().unwrap().contains("missing.img"),
        "{out}"
    );
    let (status, added) = out.api_reply("add-disk");
    assert_eq!(status, 200, "{out}");
    assert_eq!(added["id"], "hot0", "{out}");
    assert_eq!(
        added["bdf"], "0000:00:18.0",
        "the first protected hotplug slot\n{out}"
    );
    assert_eq!(out.api_reply("add-same-id").0, 409, "{out}");
    let (_, info) = out.api_reply("info-hot");
    assert_eq!(
        info["device_tree"]["hot0"]["pci_bdf"], "0000:00:18.0",
        "{out}"
    );

    // The guest: its own IOMMU group, the host's bytes through translation.
    let hot_group = out.marker("API-GUEST-HOT-GROUP").expect("a group");
    assert_ne!(hot_group, "none", "{out}");
    let boot_group = out.marker("API-GUEST-BOOT-GROUP").unwrap_or_default();
    assert!(!boot_group.is_empty(), "the boot disk is in a group\n{out}");
    assert_ne!(hot_group, boot_group, "{out}");
    assert_eq!(
        out.marker("API-GUEST-HOT-GROUP-DEVICES").map(str::trim),
        Some("0000:00:18.0"),
        "alone in its group\n{out}"
    );
    assert_eq!(
        out.marker("API-GUEST-HOT-MARKER"),
        Some("HOTPLUG-MARKER"),
        "{out}"
    );
    let host_sum = out.marker("API-HOST-HOT-SUM").expect("the host's checksum");
    assert_eq!(host_sum.len(), 64, "{out}");
    assert_eq!(
        out.marker("API-GUEST-HOT-SUM"),
        Some(host_sum),
        "32 MiB read back\n{out}"
    );

    // The reads went through the IOMMU: its domain has mappings.
    let (_, counters) = out.api_reply("counters-hot");
    let live_domains = |counters: &Value| -> Vec<String> {
        counters
            .as_object()
            .unwrap()
            .keys()
            .filter(|id| id.starts_with("virtio-iommu-domain-") && !id.ends_with("-destroyed"))
            .cloned()
            .collect()
    };
    let hot = &counters["hot0"];
    let read = hot["read_bytes"].as_u64().unwrap_or(0);
    assert!(
        read >= 32 << 20,
        "the hot disk counted the guest's 32 MiB: {hot}\n{out}"
    );
    assert!(hot["read_ops"].as_u64().unwrap_or(0) > 0, "{out}");
    let before = live_domains(&counters);
    assert!(
        before.len() >= 2,
        "the boot disk's and the hot disk's domains: {counters}\n{out}"
    );

    let (status, refusal) = out.api_reply("remove-boot");
    assert_eq!(status, 400, "{out}");
    assert!(refusal[0].as_str().unwrap().contains("at boot"), "{out}");
    assert_eq!(out.api_reply("remove").0, 204, "{out}");
    assert_eq!(out.api_reply("remove-again").0, 404, "{out}");
    assert_eq!(out.marker("API-GUEST-HOT-GONE"), Some("yes"), "{out}");
    assert_eq!(out.marker("API-GUEST-HOT-GROUP-LEFT"), Some("yes"), "{out}");
    let (_, info) = out.api_reply("info-after");
    assert!(info["device_tree"]["hot0"].is_null(), "{out}");

    // Its domain was detached and destroyed; its counters stay, final.
    let (_, after) = out.api_reply("counters-after");
    assert!(
        after.get("hot0").is_none(),
        "a removed disk counts no more\n{out}"
    );
    let (_, first) = out.api_reply("counters");
    for (name, value) in first["_disk0"].as_object().unwrap() {
        assert!(
            after["_disk0"][name].as_u64() >= value.as_u64(),
            "_disk0 {name} never goes back\n{out}"
        );
    }
    let gone: Vec<&String> = before
        .iter()
        .filter(|id| after.get(id.as_str()).is_none())
        .collect();
    assert_eq!(
        gone.len(),
        1,
        "one domain left: {counters} then {after}\n{out}"
    );
    let destroyed = &after[format!("{}-destroyed", gone[0])];
    assert!(
        destroyed["maps"].as_u64().is_some_and(|maps| maps > 0),
        "the destroyed domain keeps its counters: {after}\n{out}"
    );
}

/// The net hot-added behind the IOMMU: its slot and group, the data across it both ways, the
/// tap refused to a second net, and its removal (the tap warden created goes away).
fn check_hot_net(out: &Outcome) {
    let (status, added) = out.api_reply("add-net");
    assert_eq!(status, 200, "{out}");
    assert_eq!(added["id"], "hotnet", "{out}");
    assert_eq!(
        added["bdf"], "0000:00:18.0",
        "the protected slot the disk left\n{out}"
    );
    let (status, busy) = out.api_reply("add-net-busy");
    assert_eq!(status, 409, "{out}");
    assert!(busy[0].as_str().unwrap().contains("hotnet0"), "{out}");
    let (_, info) = out.api_reply("info-net");
    assert_eq!(
        info["device_tree"]["hotnet"]["pci_bdf"], "0000:00:18.0",
        "{out}"
    );
    let net = info["config"]["net"]
        .as_array()
        .and_then(|nets| nets.iter().find(|n| n["id"] == "hotnet"))
        .unwrap_or_else(|| panic!("hotnet in vm.info's nets\n{out}"));
    assert_eq!(net["tap"], "hotnet0", "{out}");
    assert_eq!(net["iommu"], true, "{out}");
    assert!(info["device_tree"]["hotnet1"].is_null(), "{out}");

    assert_eq!(
        out.marker("API-GUEST-NET-PCI"),
        Some("0000:00:18.0"),
        "{out}"
    );
    assert_eq!(
        out.marker("API-GUEST-NET-GROUP-DEVICES").map(str::trim),
        Some("0000:00:18.0"),
        "alone in its IOMMU group\n{out}"
    );
    let md5 = |key: &str| {
        let sum = out.marker(key).unwrap_or_default();
        assert_eq!(sum.len(), 32, "{key}: {sum:?}\n{out}");
        sum
    };
    assert_eq!(
        md5("API-GUEST-NET-SENT-MD5"),
        md5("API-HOST-NET-RECEIVED-MD5"),
        "4 MiB guest to host\n{out}"
    );
    assert_eq!(
        md5("API-HOST-NET-SENT-MD5"),
        md5("API-GUEST-NET-RECEIVED-MD5"),
        "4 MiB host to guest\n{out}"
    );
    assert_ne!(
        md5("API-HOST-NET-SENT-MD5"),
        md5("API-GUEST-NET-SENT-MD5"),
        "two different payloads\n{out}"
    );

    // Its DMA went through the IOMMU: a domain of its own, with mappings.
    let (_, counters) = out.api_reply("counters-net");
    let mapped_domains = counters
        .as_object()
        .unwrap()
        .iter()
        .filter(|(id, c)| {
            id.starts_with("virtio-iommu-domain-")
                && !id.ends_with("-destroyed")
                && c["maps"].as_u64().is_some_and(|maps| maps > 0)
        })
        .count();
    assert!(
        mapped_domains >= 2,
        "the boot disk's and the net's domains: {counters}\n{out}"
    );

    // What it moved, in its own counters: 4 MiB each way and the frames around them.
    let net = &counters["hotnet"];
    for name in ["rx_bytes", "tx_bytes"] {
        let bytes = net[name].as_u64().unwrap_or(0);
        assert!(bytes >= 4 << 20, "hotnet {name} = {bytes}: {net}\n{out}");
    }
    for name in ["rx_frames", "tx_frames"] {
        assert!(net[name].as_u64().unwrap_or(0) > 0, "{name}: {net}\n{out}");
    }

    assert_eq!(out.api_reply("remove-net").0, 204, "{out}");
    let (_, gone) = out.api_reply("counters-net-gone");
    assert!(gone.get("hotnet").is_none(), "{gone}\n{out}");
    assert_eq!(out.marker("API-GUEST-NET-GONE"), Some("yes"), "{out}");
    assert_eq!(
        out.marker("API-HOST-TAP-GONE"),
        Some("yes"),
        "the tap closed\n{out}"
    );
}

/// The guest's counter (sector 40) advances while it runs, stands still while it is paused,
/// and advances again once resumed; the state transitions answer as Cloud Hypervisor's
/// description says.
fn check_pause(out: &Outcome) {
    // The guest's count and uptime, the host's uptime when it read them.
    let sample = |name: &str| -> (u64, f64, f64) {
        let text = out
            .marker(&format!("API-HOST-COUNTER-{name}"))
            .unwrap_or_default();
        let fields: Vec<&str> = text.split_whitespace().collect();
        let parsed = match fields.as_slice() {
            [count, guest, host] => {
                (|| Some((count.parse().ok()?, guest.parse().ok()?, host.parse().ok()?)))()
            }
            _ => None,
        };
        parsed.unwrap_or_else(|| panic!("counter {name}: {text:?}\n{out}"))
    };
    let counter = |name: &str| sample(name).0;
    let (running_1, running_2) = (counter("running-1"), counter("running-2"));
    assert!(
        running_1 > 0 && running_2 > running_1,
        "the guest counts\n{out}"
    );

    // Cloud Hypervisor's status for a call in the wrong state.
    let (status, refusal) = out.api_reply("resume-running");
    assert_eq!(status, 500, "{out}");
    assert!(refusal[0].as_str().unwrap().contains("not paused"), "{out}");
    assert_eq!(out.api_reply("pause").0, 204, "{out}");
    assert_eq!(out.api_reply("pause-again").0, 500, "{out}");
    assert_eq!(out.api_reply("info-paused").1["state"], "Paused", "{out}");
    let (paused_1, paused_2) = (counter("paused-1"), counter("paused-2"));
    assert!(paused_1 >= running_2, "{out}");
    assert_eq!(
        paused_1, paused_2,
        "no guest progress in 3 s of pause\n{out}"
    );
    assert_eq!(out.api_reply("resume").0, 204, "{out}");
    assert_eq!(out.api_reply("info-resumed").1["state"], "Running", "{out}");
    assert!(
        counter("resumed") > paused_2,
        "the guest counts again after the resume\n{out}"
    );

    // The guest's clock stood still for the pause (~4 s): between the last sample before it
    // and the first after it, the host's uptime ran on by that much more than the guest's.
    assert_eq!(
        out.marker("API-GUEST-CLOCKSOURCE"),
        Some("kvm-clock"),
        "{out}"
    );
    let ((_, guest_before, host_before), (_, guest_after, host_after)) =
        (sample("running-2"), sample("resumed"));
    let unseen = (host_after - host_before) - (guest_after - guest_before);
    assert!(
        unseen >= 2.5,
        "the guest saw {:.2} s of the host's {:.2} s pass\n{out}",
        guest_after - guest_before,
        host_after - host_before
    );
    assert!(
        !out.guest_output().contains("KVM_GET_CLOCK")
            && !out.guest_output().contains("KVM_SET_CLOCK"),
        "the clock was read and set back without a warning\n{out}"
    );
}
