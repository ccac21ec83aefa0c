//! Multi-queue virtio-blk end to end (issue 13, the disk): one boot with a protected and a
//! plain disk of two queues each, 2 vCPUs; writers and readers pinned to each CPU move 32 MiB
//! per disk with checksums on both sides of the VM, every queue of both disks takes
//! interrupts, and a discard gives blocks of the host image back.

use e2e::{Outcome, Scenario};
use std::time::Duration;

/// 96 MiB images of allocated zeroes (so a discard has blocks to give back).
const HOST_SETUP: &str = "for disk in protected plain; do
    dd if=/dev/zero of=$disk.img bs=1M count=96 2>/dev/null
    sync
    echo \"HOST-$disk-BLOCKS-BEFORE=$(stat -c %b $disk.img)\"
done";

/// Guest side: four 8 MiB payloads, written to each disk by four processes pinned
/// alternately to CPU 0 and 1, read back the same way after dropping caches; then 32 MiB
/// discarded on each disk.
const GUEST_SCRIPT: &str = r#"
wait_for /dev/vda
wait_for /dev/vdb
for disk in /sys/block/vd*; do
    pci=$(readlink -f "$disk/device/..")
    if [ -e "$pci/iommu_group" ]; then protected=${disk##*/}; else plain=${disk##*/}; fi
done
if command -v taskset >/dev/null; then
    echo MQ-TASKSET=present
    pin() { taskset -c "$@"; }
else
    echo MQ-TASKSET=absent
    pin() { shift; "$@"; }
fi
md5() { md5sum | cut -d' ' -f1; }
for i in 0 1 2 3; do
    dd if=/dev/urandom of=/tmp/payload$i bs=1M count=8 2>/dev/null
    echo "MQ-PAYLOAD-$i-MD5=$(md5 </tmp/payload$i)"
done
for name in protected plain; do
    eval dev=\$$name
    echo "MQ-$name-QUEUES=$(ls /sys/block/$dev/mq | wc -l)"
    for i in 0 1 2 3; do
        pin $((i % 2)) dd if=/tmp/payload$i of=/dev/$dev bs=1M seek=$((i * 8)) oflag=direct conv=fsync 2>/dev/null &
    done
    wait
done
echo 3 >/proc/sys/vm/drop_caches
for name in protected plain; do
    eval dev=\$$name
    for i in 0 1 2 3; do
        ( pin $((i % 2)) dd if=/dev/$dev bs=1M skip=$((i * 8)) count=8 iflag=direct 2>/dev/null | md5 >/tmp/read-$name-$i ) &
    done
    wait
    for i in 0 1 2 3; do echo "MQ-$name-READ-$i-MD5=$(cat /tmp/read-$name-$i)"; done
    virtio=$(basename "$(readlink -f /sys/block/$dev/device)")
    for q in 0 1; do
        count=$(grep "$virtio-req.$q" /proc/interrupts | awk '{ s = 0; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; print s }')
        echo "MQ-$name-IRQS-$q=${count:-0}"
    done
    echo "MQ-$name-DISCARD-MAX=$(cat /sys/block/$dev/queue/discard_max_bytes)"
    blk-discard /dev/$dev $((64 << 20)) $((32 << 20)) | sed "s/^/MQ-$name-/"
    echo 3 >/proc/sys/vm/drop_caches
    echo "MQ-$name-DISCARDED-MD5=$(dd if=/dev/$dev bs=1M skip=64 count=32 iflag=direct 2>/dev/null | md5)"
done
echo "MQ-ZEROES-MD5=$(head -c 33554432 /dev/zero | md5)"
"#;

const HOST_CHECK: &str = "md5() { md5sum | cut -d' ' -f1; }
for disk in protected plain; do
    for i in 0 1 2 3; do
        echo \"HOST-$disk-$i-MD5=$(dd if=$disk.img bs=1M skip=$((i * 8)) count=8 2>/dev/null | md5)\"
    done
    echo \"HOST-$disk-BLOCKS-AFTER=$(stat -c %b $disk.img)\"
done";

fn number(out: &Outcome, key: &str) -> u64 {
    out.marker(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} missing or not a number\n{out}"))
}

#[test]
fn two_queue_disks_protected_and_plain_keep_data_and_discard() {
    let Some(out) = Scenario::new("blk_multi_queue")
        .host_setup(HOST_SETUP)
        .guest_tool("blk-discard")
        .warden_args([
            "--cpus",
            "2",
            "--memory",
            "size=512M",
            "--disk",
            "path=protected.img,iommu=on,num_queues=2",
            "--disk",
            "path=plain.img,num_queues=2,queue_size=128",
        ])
        .guest_script(GUEST_SCRIPT)
        .host_check(HOST_CHECK)
        .timeout(Duration::from_secs(420))
        .run()
    else {
        return;
    };
    assert_eq!(out.guest_script_exit(), Some(0), "{out}");
    assert_eq!(out.warden_exit, Some(0), "{out}");
    assert_eq!(
        out.marker("MQ-TASKSET"),
        Some("present"),
        "busybox has no taskset: the processes are not pinned\n{out}"
    );
    for disk in ["protected", "plain"] {
        assert_eq!(
            out.marker(&format!("MQ-{disk}-QUEUES")),
            Some("2"),
            "{disk}: the guest sees two queues\n{out}"
        );
        for i in 0..4 {
            let payload = out
                .marker(&format!("MQ-PAYLOAD-{i}-MD5"))
                .unwrap_or_else(|| panic!("payload {i} checksum\n{out}"));
            assert_eq!(
                out.marker(&format!("MQ-{disk}-READ-{i}-MD5")),
                Some(payload),
                "{disk}: region {i} read back in the guest\n{out}"
            );
            assert_eq!(
                out.marker(&format!("HOST-{disk}-{i}-MD5")),
                Some(payload),
                "{disk}: region {i} in the host image\n{out}"
            );
        }
        for q in 0..2 {
            assert!(
                number(&out, &format!("MQ-{disk}-IRQS-{q}")) > 0,
                "{disk}: queue {q} was used\n{out}"
            );
        }
        assert!(number(&out, &format!("MQ-{disk}-DISCARD-MAX")) > 0, "{out}");
        assert_eq!(
            out.marker(&format!("MQ-{disk}-BLK-DISCARD")),
            Some("ok"),
            "{out}"
        );
        assert_eq!(
            out.marker(&format!("MQ-{disk}-DISCARDED-MD5")),
            out.marker("MQ-ZEROES-MD5"),
            "{disk}: a discarded range reads as zeroes\n{out}"
        );
        let before = number(&out, &format!("HOST-{disk}-BLOCKS-BEFORE"));
        let after = number(&out, &format!("HOST-{disk}-BLOCKS-AFTER"));
        // 32 MiB discarded: 65536 blocks of 512 bytes given back, give or take metadata.
        assert!(
            after + 60_000 < before,
            "{disk}: st_blocks {before} -> {after}: the discard punched no hole\n{out}"
        );
    }
}
