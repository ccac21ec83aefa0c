//! Multi-queue virtio-net end to end: a guest with two vCPUs and two nets of two queue pairs
//! each (`num_queues=4`), one behind the virtual IOMMU and one plain, in one boot. The guest's
//! driver asks for both pairs through the control queue; on each net, a TCP upload and a
//! download run from each vCPU at once (the guest's transmit queue follows the CPU, the tap
//! returns each flow on the queue it came from), two rounds, checksums on both ends; every
//! pair's receive and transmit interrupts must have fired. The same boot again with
//! `vhost=on` on both nets: the kernel's vhost-net moves the frames, through its device IOTLB
//! behind the IOMMU.
//!
//! Only the private subnets 192.168.249.0/24 (protected) and 192.168.250.0/24 (plain) are
//! used, on taps that exist only inside the KVM host.

use e2e::Scenario;
use std::time::Duration;

/// Megabytes each flow moves per round, and the rounds.
const FLOW_MIB: u32 = 8;
const ROUNDS: u32 = 2;

/// The two nets: label, subnet's third octet, first port. Each net's flows use the four
/// ports from there: uploads from vCPU 0 and 1, then downloads to vCPU 0 and 1.
const NETS: [(&str, u32, u32); 2] = [("PROT", 249, 5001), ("PLAIN", 250, 5011)];

/// The ports that take uploads (vCPU 0's and 1's of each net), space-separated.
fn upload_ports() -> String {
    NETS.iter()
        .map(|(_, _, first)| format!("{} {}", first, first + 1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Host side, before the boot: the download payload, and a listener per port serving its
/// rounds (an upload's checksum is appended to `up-PORT.md5`).
fn host_setup() -> String {
    let ports = upload_ports();
    let down_ports = NETS
        .iter()
        .map(|(_, _, first)| format!("{} {}", first + 2, first + 3))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        r#"dd if=/dev/urandom of=to-guest.bin bs=1M count={FLOW_MIB} 2>/dev/null
echo "HOST-SENT-MD5=$(md5sum <to-guest.bin | cut -d' ' -f1)"
printf '#!/bin/sh\nexec cat to-guest.bin\n' >send.sh
chmod +x send.sh
for port in {ports}; do
    printf '#!/bin/sh\nmd5sum | cut -d" " -f1 >>up-%s.md5\n' $port >recv-$port.sh
    chmod +x recv-$port.sh
    (for round in $(seq {ROUNDS}); do nc -l -p $port -e ./recv-$port.sh; done) &
done
for port in {down_ports}; do
    (for round in $(seq {ROUNDS}); do nc -l -p $port -e ./send.sh; done) &
done"#
    )
}

/// With `vhost=on`, in the background while warden runs: how many of the kernel's vhost-net
/// workers there are (`vhost-TID`, one per instance, named after the thread that opened it;
/// threads of warden's, or kernel threads where vhost runs them so; nothing else in the KVM
/// host uses vhost), the most seen, written as it grows.
const VHOST_WATCH: &str = r#"
(max=0 n=0
while [ $n -lt 3000 ]; do
    n=$((n + 1))
    if pidof warden >/dev/null; then
        # grep -c fails when it counts none, which would end this `sh -e` subshell.
        count=$(cat /proc/[0-9]*/task/*/comm 2>/dev/null | grep -c '^vhost-' || true)
        if [ "$count" -gt "$max" ]; then max=$count; echo $max >vhost-threads; fi
        [ "$max" -ge 4 ] && break
    fi
    usleep 200000
done) &"#;

/// After warden exits: each upload port's checksums, one line per round.
fn host_check() -> String {
    let ports = upload_ports();
    format!(
        r#"for port in {ports}; do
    echo "UP-$port=$(cat up-$port.md5 2>/dev/null | tr '\n' ' ')"
done"#
    )
}

/// The guest: finds which interface is which by its IOMMU group, brings both up, records
/// their queues and interrupt counts, runs every flow, and reports checksums and counts.
fn guest_script() -> String {
    let nets = NETS
        .iter()
        .map(|(label, subnet, port)| format!("{label}:{subnet}:{port}"))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        r#"
md5() {{ md5sum | cut -d' ' -f1; }}
dd if=/dev/urandom of=/tmp/up.bin bs=1M count={FLOW_MIB} 2>/dev/null
echo "GUEST-SENT-MD5=$(md5 </tmp/up.bin)"
echo "GUEST-CPUS=$(grep -c ^processor /proc/cpuinfo)"
wait_for /sys/class/net/eth1 60
ip link set lo up
for dev in /sys/class/net/eth*; do
    name=${{dev##*/}}
    pci=$(readlink -f "$dev/device/..")
    if [ -e "$pci/iommu_group" ]; then label=PROT; subnet=249; else label=PLAIN; subnet=250; fi
    virtio=$(basename "$(readlink -f "$dev/device")")
    echo "$label-IF=$name $virtio ${{pci##*/}}"
    echo "$label-FEATURES=$(cat "$dev/device/features")"
    echo "$label-QUEUES=$(ls "$dev/queues" | tr '\n' ' ')"
    echo "$virtio" >/tmp/virtio-$label
    ip addr add 192.168.$subnet.2/24 dev "$name"
    ip link set "$name" up
done
# Until the link watch sees the carrier the interfaces drop what they send; then the host's
# ends need their first frames (see net.rs).
for net in {nets}; do
    subnet=$(echo "$net" | cut -d: -f2)
    n=0
    until ping -c 1 -W 1 192.168.$subnet.1 >/dev/null 2>&1; do
        n=$((n + 1)); [ "$n" -lt 90 ] || {{ echo "PING-$subnet=timeout"; exit 1; }}
    done
done
# The sum of an interrupt's per-CPU counts, by its name (virtio2-input.0).
irqs() {{
    awk -v name="$1" '$NF == name {{ s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s }}' /proc/interrupts
}}
queue_irqs() {{
    for label in PROT PLAIN; do
        v=$(cat /tmp/virtio-$label)
        for q in input.0 input.1 output.0 output.1; do
            echo "$label-$q $(irqs "$v-$q")"
        done
    done
}}
queue_irqs >/tmp/irqs-before
for round in $(seq {ROUNDS}); do
    for net in {nets}; do
        label=$(echo "$net" | cut -d: -f1)
        subnet=$(echo "$net" | cut -d: -f2)
        port=$(echo "$net" | cut -d: -f3)
        for cpu in 0 1; do
            up=$((port + cpu))
            down=$((port + 2 + cpu))
            recv=/tmp/recv-$label-$cpu.sh
            printf '#!/bin/sh\nexec cat >/tmp/down-%s-%s.bin\n' $label $cpu >$recv
            chmod +x $recv
            taskset $((1 << cpu)) sh -c "nc 192.168.$subnet.1 $up </tmp/up.bin; nc 192.168.$subnet.1 $down -e $recv" &
        done
    done
    wait
    for label in PROT PLAIN; do
        for cpu in 0 1; do
            echo "$label-DOWN-$round-$cpu=$(md5 </tmp/down-$label-$cpu.bin)"
        done
    done
done
queue_irqs >/tmp/irqs-after
while read -r key before; do
    after=$(grep "^$key " /tmp/irqs-after | cut -d' ' -f2)
    echo "IRQS-$key=$((after - before))"
done </tmp/irqs-before
dmesg | grep -i 'queue pairs' || true
"#
    )
}

#[test]
fn two_queue_pairs_carry_traffic_on_every_pair_with_and_without_the_iommu() {
    two_nets_of_two_pairs("net_multi_queue", false);
}

#[test]
fn vhost_net_carries_traffic_on_every_pair_with_and_without_the_iommu() {
    two_nets_of_two_pairs("net_multi_queue_vhost", true);
}

/// One boot with the two nets, warden's data path or (`vhost`) the kernel's.
fn two_nets_of_two_pairs(name: &str, vhost: bool) {
    let nets = NETS.map(|(label, subnet, _)| {
        let iommu = if label == "PROT" { ",iommu=on" } else { "" };
        let vhost = if vhost { ",vhost=on" } else { "" };
        format!("tap=,mac=,ip=192.168.{subnet}.1,mask=255.255.255.0,num_queues=4{iommu}{vhost}")
    });
    let (watch, threads) = if vhost {
        (VHOST_WATCH, "\necho \"VHOST-THREADS=$(cat vhost-threads)\"")
    } else {
        ("", "")
    };
    let Some(out) = Scenario::new(name)
        .host_setup(&format!("{}{watch}", host_setup()))
        .warden_args([
            "--cpus",
            "2",
            "--cmdline",
            "console=ttyS0 panic=-1",
            "--net",
            &nets[0],
            "--net",
            &nets[1],
        ])
        .guest_script(&guest_script())
        .host_check(&format!("{}{threads}", host_check()))
        .timeout(Duration::from_secs(600))
        .run()
    else {
        return;
    };
    assert_eq!(out.warden_exit, Some(0), "{out}");
    assert_eq!(out.marker("GUEST-CPUS"), Some("2"), "{out}");
    assert!(
        !out.guest_output()
            .contains("Fail to set num of queue pairs"),
        "the driver's VQ_PAIRS_SET was refused\n{out}"
    );

    let sent = out.marker("GUEST-SENT-MD5").expect("guest checksum");
    let downloaded = out.marker("HOST-SENT-MD5").expect("host checksum");
    for (label, _, first_port) in NETS {
        let features = out.feature_bits(&format!("{label}-FEATURES"));
        // CTRL_VQ and MQ, as well as VERSION_1.
        for bit in [17, 22, 32] {
            assert!(
                features.contains(&bit),
                "{label}: feature {bit}: {features:?}\n{out}"
            );
        }
        assert_eq!(
            features.contains(&33),
            label == "PROT",
            "{label}: VIRTIO_F_ACCESS_PLATFORM only behind the IOMMU\n{out}"
        );
        assert_eq!(
            out.marker(&format!("{label}-QUEUES")),
            Some("rx-0 rx-1 tx-0 tx-1"),
            "{label}: the driver uses both pairs\n{out}"
        );
        for cpu in 0..2 {
            let port = first_port + cpu;
            let uploads = out
                .marker(&format!("UP-{port}"))
                .unwrap_or_else(|| panic!("{label}: no uploads on port {port}\n{out}"));
            assert_eq!(
                uploads.split_whitespace().collect::<Vec<_>>(),
                vec![sent; ROUNDS as usize],
                "{label}: vCPU {cpu}'s uploads\n{out}"
            );
            for round in 1..=ROUNDS {
                assert_eq!(
                    out.marker(&format!("{label}-DOWN-{round}-{cpu}")),
                    Some(downloaded),
                    "{label}: vCPU {cpu}'s download in round {round}\n{out}"
                );
            }
        }
        for queue in ["input.0", "input.1", "output.0", "output.1"] {
            let fired: u64 = out
                .marker(&format!("IRQS-{label}-{queue}"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{label}: no count for {queue}\n{out}"));
            assert!(
                fired > 0,
                "{label}: queue {queue} carried nothing ({fired} interrupts)\n{out}"
            );
        }
    }

    assert_eq!(
        out.iommu_counter("faults"),
        0,
        "the guest's own DMA never faults\n{out}"
    );
    if vhost {
        assert_eq!(
            out.marker("VHOST-THREADS"),
            Some("4"),
            "a vhost-net kernel thread per pair of each net\n{out}"
        );
    }
}
