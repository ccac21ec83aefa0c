//! `--api-socket` (the control-plane issue): while the guest runs, the KVM host asks warden's
//! API for ping, info and counters, is refused a reboot, then presses the power button, and
//! the guest shuts itself down so warden exits 0. One boot.

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
printf 'READY' | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null
dd bs=24 count=1 of=/dev/null <&3 2>/dev/null
echo "API-GUEST-POWER-BUTTON=pressed"
"#;

/// The host's half, in the background while warden runs: once the guest is ready, one call
/// per endpoint, each answer kept as `STATUS BODY` in a file for the check.
const HOST_CLIENT: &str = r#"dd if=/dev/zero of=disk.img bs=1M count=8 2>/dev/null
(
  set +e
  n=0
  until [ "$(dd if=disk.img bs=512 skip=8 count=1 2>/dev/null | head -c 5)" = READY ]; do
    n=$((n + 1)); [ $n -gt 300 ] && exit 1
    sleep 1
  done
  "$API_CLIENT" api.sock GET /api/v1/vmm.ping >ping.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.info >info.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.counters >counters.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.reboot >reboot.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.add-disk '{"path":"disk.img","iommu":true}' >add-disk.txt
  "$API_CLIENT" api.sock GET /api/v1/vm.pause >wrong-method.txt
  "$API_CLIENT" api.sock PUT /api/v1/vm.power-button >power-button.txt
) >/dev/null 2>&1 &"#;

const HOST_CHECK: &str = r#"for f in ping info counters reboot add-disk wrong-method power-button; do
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
        .timeout(Duration::from_secs(240))
        .run()
    else {
        return;
    };

    assert_ne!(out.marker("API-GUEST-BUTTON"), Some("none"), "{out}");
    let (status, ping) = reply(&out, "ping");
    assert_eq!(status, 200, "{out}");
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"), "{out}");
    assert!(ping["pid"].as_i64().is_some_and(|pid| pid > 1), "{out}");
    assert!(ping["build_version"].is_string(), "{out}");

    let (status, info) = reply(&out, "info");
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

    let (status, counters) = reply(&out, "counters");
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
    // The exit report comes from the same counters, later: never behind the API's.
    let (exit_maps, exit_translations) = exit_totals(&out);
    assert!(api_maps <= exit_maps, "{api_maps} > {exit_maps}\n{out}");
    assert!(api_translations <= exit_translations, "{out}");

    assert_eq!(reply(&out, "reboot").0, 501, "{out}");
    let (status, refusal) = reply(&out, "add-disk");
    assert_eq!(status, 501, "{out}");
    assert_eq!(refusal["error"], "hotplug is not supported yet", "{out}");
    assert_eq!(reply(&out, "wrong-method").0, 405, "{out}");
    assert_eq!(reply(&out, "power-button").0, 204, "{out}");

    assert_eq!(
        out.marker("API-GUEST-POWER-BUTTON"),
        Some("pressed"),
        "{out}"
    );
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert_eq!(out.warden_exit, Some(0), "{out}");
}

/// The host's `API-REPLY NAME STATUS BODY` line for `name`: the status and the JSON body
/// (`Null` when there is none).
fn reply(out: &Outcome, name: &str) -> (u16, Value) {
    let prefix = format!("API-REPLY {name} ");
    let line = out
        .host_check_output()
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no reply to {name}\n{out}"));
    let (status, body) = line.split_once(' ').unwrap_or((line, ""));
    let status = status
        .parse()
        .unwrap_or_else(|_| panic!("{name}: no status in {line:?}\n{out}"));
    let body = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{name}: {e}: {body}\n{out}"))
    };
    (status, body)
}

/// Maps and translations from warden's exit report (`warden: virtio-iommu total: ...`).
fn exit_totals(out: &Outcome) -> (u64, u64) {
    let line = out
        .guest_output()
        .lines()
        .find_map(|l| l.split_once("warden: virtio-iommu total: "))
        .map(|(_, total)| total.trim())
        .unwrap_or_else(|| panic!("no virtio-iommu total on exit\n{out}"));
    let numbers: Vec<u64> = line
        .split(", ")
        .filter_map(|part| part.split(' ').next()?.parse().ok())
        .collect();
    match numbers.as_slice() {
        [maps, _unmaps, _bytes, _faults, translations] => (*maps, *translations),
        _ => panic!("unexpected total line {line:?}\n{out}"),
    }
}
