//! Sustained TCP through a protected virtio-net: 64 MiB each way, several rounds, with the
//! data checked on both ends, in the guest's default (lazy) IOMMU mode and in strict mode.
//! The guest must stay up throughout: this is the load under which a protected device once
//! took its guest down (a triple fault or a hang), which 4 MiB transfers never showed.
//!
//! The payload is a random 4 MiB block sent 16 times per round, so each side can compute
//! the checksum of what the other should have got without storing 64 MiB. Only the private
//! subnet 192.168.249.0/24 is used, on a tap that exists only inside the KVM host.

use e2e::{Outcome, Scenario};
use std::time::Duration;

/// Rounds per boot; each moves `BLOCKS` x 4 MiB up and then down.
const ROUNDS: usize = 3;
/// 4 MiB blocks per transfer: 64 MiB.
const BLOCKS: usize = 16;

/// Host side: the block, its expected stream checksum, and `serve.sh LABEL`, which waits for
/// the guest and then serves `ROUNDS` uploads (port 5001, checksummed as they arrive) and
/// downloads (port 5002), logging the checksum of each upload.
fn host_setup() -> String {
    format!(
        r#"dd if=/dev/urandom of=block.bin bs=1M count=4 2>/dev/null
cp block.bin /tmp/block.bin
i=0; while [ $i -lt {BLOCKS} ]; do cat block.bin; i=$((i + 1)); done | md5sum | cut -d' ' -f1 >expected.md5
echo "HOST-STREAM-MD5=$(cat expected.md5)"
printf '#!/bin/sh\ni=0; while [ $i -lt {BLOCKS} ]; do cat /tmp/block.bin; i=$((i + 1)); done\n' >send.sh
printf '#!/bin/sh\nmd5sum | cut -d" " -f1 >>"$PWD/received.md5"\n' >recv.sh
chmod +x send.sh recv.sh
cat >serve.sh <<'EOF'
label=$1
rm -f received.md5
n=0
until ping -c 1 -W 1 192.168.249.2 >/dev/null 2>&1; do
    n=$((n + 1)); [ "$n" -lt 600 ] || {{ echo "$label-HOST-PING=timeout"; exit 1; }}
done
r=0
while [ $r -lt {ROUNDS} ]; do
    nc -l -p 5001 -e ./recv.sh
    nc -l -p 5002 -e ./send.sh
    r=$((r + 1))
done
echo "$label-HOST-RECEIVED=$(tr '\n' ' ' <received.md5)"
EOF
sh ./serve.sh LAZY >serve-LAZY.log 2>&1 &
echo $! >serve.pid"#
    )
}

/// The guest: address, then `ROUNDS` rounds of upload and download, each download's checksum
/// compared with the block's stream checksum computed here.
fn guest_script() -> String {
    format!(
        r#"
MODE=$(sed -n 's/.*warden_soak=\([A-Z]*\).*/\1/p' /proc/cmdline)
echo "$MODE-IOMMU-POLICY=$(dmesg | sed -n 's/.*invalidation policy: \([a-z]*\) mode.*/\1/p')"
wait_for /sys/class/net/eth0 60
pci=$(readlink -f /sys/class/net/eth0/device/..)
echo "$MODE-NET-GROUP=$(ls "$(readlink -f "$pci/iommu_group")/devices" | tr '\n' ' ')"
ip link set lo up
ip addr add 192.168.249.2/24 dev eth0
ip link set eth0 up
n=0
until [ "$(cat /sys/class/net/eth0/operstate)" = up ]; do
    n=$((n + 1)); [ "$n" -lt 100 ] || {{ echo "$MODE-GUEST-OPERSTATE=down"; exit 1; }}
    usleep 100000
done
dd if=/dev/urandom of=/tmp/block.bin bs=1M count=4 2>/dev/null
send() {{ i=0; while [ $i -lt {BLOCKS} ]; do cat /tmp/block.bin; i=$((i + 1)); done; }}
echo "$MODE-GUEST-STREAM-MD5=$(send | md5sum | cut -d' ' -f1)"
printf '#!/bin/sh\nmd5sum | cut -d" " -f1 >>/tmp/received.md5\n' >/tmp/recv.sh
chmod +x /tmp/recv.sh
now() {{ cut -d' ' -f1 /proc/uptime; }}
r=0
while [ $r -lt {ROUNDS} ]; do
    n=0
    t0=$(now)
    until send | nc 192.168.249.1 5001 2>/dev/null; do
        n=$((n + 1)); [ "$n" -lt 600 ] || {{ echo "$MODE-GUEST-UPLOAD=refused"; exit 1; }}
        usleep 200000
        t0=$(now)
    done
    t1=$(now)
    echo "$MODE-ROUND-$r-UPLOADED"
    n=0
    until nc 192.168.249.1 5002 -e /tmp/recv.sh 2>/dev/null; do
        n=$((n + 1)); [ "$n" -lt 100 ] || {{ echo "$MODE-GUEST-DOWNLOAD=refused"; exit 1; }}
        usleep 200000
    done
    t2=$(now)
    echo "$MODE-ROUND-$r-SECONDS=up $(awk -v a=$t0 -v b=$t1 'BEGIN {{ print b - a }}') down $(awk -v a=$t1 -v b=$t2 'BEGIN {{ print b - a }}')"
    r=$((r + 1))
done
echo "$MODE-GUEST-RECEIVED=$(tr '\n' ' ' </tmp/received.md5)"
"#
    )
}

/// After the lazy boot: the same guest in strict mode, with the host side started afresh;
/// its markers are copied from its log into the console.
const HOST_CHECK: &str = r#"sleep 1
kill "$(cat serve.pid)" 2>/dev/null || true; killall nc 2>/dev/null || true
cat serve-LAZY.log
sh ./serve.sh STRICT >serve-STRICT.log 2>&1 &
echo $! >serve.pid
timeout 400 "$WARDEN" --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" \
    --cmdline 'console=ttyS0 panic=-1 iommu.strict=1 warden_soak=STRICT' \
    --net 'tap=,mac=,ip=192.168.249.1,mask=255.255.255.0,iommu=on' >strict-boot.log 2>&1 \
    && echo STRICT-WARDEN-EXIT=0 || echo STRICT-WARDEN-EXIT=$?
grep -a -E 'STRICT-|warden|WARN|ERROR|Oops|BUG|panic' strict-boot.log | tr -d '\r'
sleep 1
kill "$(cat serve.pid)" 2>/dev/null || true; killall nc 2>/dev/null || true
cat serve-STRICT.log"#;

/// Checks one boot's markers: every round's data arrived intact both ways.
fn check_boot(out: &Outcome, mode: &str) {
    let host = out.marker("HOST-STREAM-MD5").expect("host checksum");
    let guest = out
        .marker(&format!("{mode}-GUEST-STREAM-MD5"))
        .unwrap_or_else(|| panic!("{mode}: the guest never got going\n{out}"));
    let expected_down = [host; ROUNDS].join(" ");
    let expected_up = [guest; ROUNDS].join(" ");
    assert_eq!(
        out.marker(&format!("{mode}-GUEST-RECEIVED")),
        Some(expected_down.as_str()),
        "{mode}: downloads (host -> guest) lost or corrupted data\n{out}"
    );
    assert_eq!(
        out.marker(&format!("{mode}-HOST-RECEIVED")),
        Some(expected_up.as_str()),
        "{mode}: uploads (guest -> host) lost or corrupted data\n{out}"
    );
    for round in 0..ROUNDS {
        let times = out.marker(&format!("{mode}-ROUND-{round}-SECONDS"));
        eprintln!("{mode} round {round}: {times:?}");
    }
}

/// Known to fail: the guest still dies here (issue "a guest with a protected virtio-net dies
/// under sustained TCP") in every one of the 14 runs with a two-CPU nested host recorded in
/// `docs/net-soak-investigation.md` (13 triple faults, 1 hang). It is the reproduction, kept
/// out of the default run until the cause is fixed:
/// `cargo test -p e2e --test net_soak -- --ignored`.
#[test]
#[ignore = "reproduces the open protected-net guest death; see docs/net-soak-investigation.md"]
fn protected_net_survives_sustained_tcp_lazy_and_strict() {
    let Some(out) = Scenario::new("net_soak")
        .on_every_l1_cpu()
        .host_setup(&host_setup())
        .warden_args([
            "--cpus",
            "1",
            "--net",
            "tap=,mac=,ip=192.168.249.1,mask=255.255.255.0,iommu=on",
            "--cmdline",
            "console=ttyS0 panic=-1 warden_soak=LAZY",
        ])
        .guest_script(&guest_script())
        .host_check(HOST_CHECK)
        .timeout(Duration::from_secs(400))
        .run()
    else {
        return;
    };
    assert_eq!(out.warden_exit, Some(0), "lazy boot: the guest died\n{out}");
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert_eq!(out.marker("LAZY-IOMMU-POLICY"), Some("lazy"), "{out}");
    check_boot(&out, "LAZY");
    assert_eq!(
        out.marker("STRICT-WARDEN-EXIT"),
        Some("0"),
        "strict boot: the guest died\n{out}"
    );
    assert_eq!(out.marker("STRICT-IOMMU-POLICY"), Some("strict"), "{out}");
    check_boot(&out, "STRICT");
}
