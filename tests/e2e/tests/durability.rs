//! No data lost when warden dies: the guest writes to a protected disk and `fsync`s, tells the
//! host through a second disk, and the host kills warden with SIGKILL at once. Whatever the
//! guest was told is written must be in the host image: a write completed to the guest is
//! never still sitting in warden (an engine's queue, a buffer) when the process goes. And
//! with FLUSH negotiated the guest is told the truth about the rest: the disk is a write-back
//! cache, so a write it did not flush is not taken as durable, and each fsync sends a FLUSH.
//! Under write-through (the guest's choice) every request that changes the image is stable
//! when it completes: DISCARD and WRITE_ZEROES as writes, each with its own host sync.

use e2e::Scenario;
use std::time::Duration;

/// The data disk, a signal disk, and a watcher that SIGKILLs warden as soon as the guest's
/// mark is in the signal disk's image.
const HOST_SETUP: &str = r#"dd if=/dev/zero of=data.img bs=1M count=64 2>/dev/null
dd if=/dev/zero of=signal.img bs=1M count=1 2>/dev/null
(
  set +e
  while ! pid=$(pidof warden); do usleep 100000; done
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(head -c 13 signal.img)" = WARDEN-SYNCED ]; then
      kill -KILL "$pid" && echo killed >killed.txt
      break
    fi
    usleep 20000
  done
) >/dev/null 2>&1 &"#;

/// Three rounds of 16 MiB, each `fsync`ed as it is written (`conv=fsync`: the guest's page
/// cache written back and a FLUSH sent); then the mark, and a wait for the end.
const GUEST: &str = r#"
wait_for /dev/vda 60
wait_for /dev/vdb 60
for b in /sys/block/vd?; do
    case "$(cat $b/serial)" in
        data.img) data=/dev/${b##*/} ;;
        signal.img) signal=/dev/${b##*/} ;;
    esac
done
# With FLUSH negotiated the disk is a write-back cache: a completed write is not durable until
# flushed, and the guest knows it. A direct write without fsync sends no FLUSH; each fsync does.
stat=/sys/block/${data##*/}
echo "GUEST-WRITE-CACHE=$(cat $stat/queue/write_cache)"
flushes() { awk '{ print $16 }' $stat/stat; }
echo "GUEST-FLUSHES-0=$(flushes)"
dd if=/dev/urandom of=$data bs=1M seek=48 count=1 oflag=direct conv=notrunc 2>/dev/null
echo "GUEST-FLUSHES-UNSYNCED=$(flushes)"
for round in 0 1 2; do
    dd if=/dev/urandom of=/tmp/round.bin bs=1M count=16 2>/dev/null
    dd if=/tmp/round.bin of=$data bs=1M seek=$((16 * round)) conv=notrunc,fsync 2>/dev/null
    echo "GUEST-SYNCED-$round-MD5=$(md5sum </tmp/round.bin | cut -d' ' -f1)"
done
echo "GUEST-FLUSHES-SYNCED=$(flushes)"
printf WARDEN-SYNCED | dd of=$signal bs=512 conv=notrunc,fsync 2>/dev/null
echo GUEST-SIGNALLED=1
sleep 300
echo GUEST-NOT-KILLED=1
"#;

const HOST_CHECK: &str = r#"echo "HOST-KILLED=$(cat killed.txt)"
for round in 0 1 2; do
    echo "HOST-IMAGE-$round-MD5=$(dd if=data.img bs=1M skip=$((16 * round)) count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
done"#;

#[test]
fn writes_the_guest_synced_survive_sigkill() {
    let Some(out) = Scenario::new("durability")
        .host_setup(HOST_SETUP)
        .warden_args([
            "--memory",
            "size=512M",
            "--disk",
            "path=data.img,iommu=on",
            "--disk",
            "path=signal.img",
        ])
        .guest_script(GUEST)
        .host_check(HOST_CHECK)
        .timeout(Duration::from_secs(300))
        .run()
    else {
        return;
    };
    assert_eq!(out.marker("HOST-KILLED"), Some("killed"), "{out}");
    assert_eq!(
        out.warden_exit,
        Some(128 + 9),
        "warden died of SIGKILL\n{out}"
    );
    assert_eq!(out.marker("GUEST-NOT-KILLED"), None, "{out}");
    assert_eq!(
        out.marker("GUEST-WRITE-CACHE"),
        Some("write back"),
        "a completed write is not reported durable before a flush\n{out}"
    );
    let flushes = |key: &str| -> u64 {
        out.marker(&format!("GUEST-FLUSHES-{key}"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no flush count {key}\n{out}"))
    };
    assert_eq!(
        flushes("UNSYNCED"),
        flushes("0"),
        "a write without fsync sends no FLUSH\n{out}"
    );
    assert!(
        flushes("SYNCED") >= flushes("UNSYNCED") + 3,
        "each fsync'd round sent a FLUSH\n{out}"
    );
    for round in 0..3 {
        let synced = out.marker(&format!("GUEST-SYNCED-{round}-MD5"));
        assert!(synced.is_some(), "round {round}\n{out}");
        assert_eq!(
            out.marker(&format!("HOST-IMAGE-{round}-MD5")),
            synced,
            "round {round}: what the guest synced is in the image\n{out}"
        );
    }
}

/// The data disk full of 0xff, a signal disk, and a watcher that, once the guest's mark is in
/// the signal disk, reads warden's counters over the API and SIGKILLs it.
const HOST_SETUP_WRITE_THROUGH: &str = r#"tr '\0' '\377' </dev/zero | head -c 67108864 >data.img
dd if=/dev/zero of=signal.img bs=1M count=1 2>/dev/null
head -c 16777216 /dev/zero | md5sum | cut -d' ' -f1 >zeros.md5
(
  set +e
  while ! pid=$(pidof warden); do usleep 100000; done
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(head -c 13 signal.img)" = WARDEN-SYNCED ]; then
      "$API_CLIENT" api.sock GET /api/v1/vm.counters >counters.txt
      kill -KILL "$pid" && echo killed >killed.txt
      break
    fi
    usleep 20000
  done
) >/dev/null 2>&1 &"#;

/// The guest makes the data disk write-through, zeroes 16 MiB (WRITE_ZEROES) and discards the
/// next 16 MiB (DISCARD), then sends the mark. No FLUSH goes out under write-through.
const GUEST_WRITE_THROUGH: &str = r#"
wait_for /dev/vda 60
wait_for /dev/vdb 60
for b in /sys/block/vd?; do
    case "$(cat $b/serial)" in
        data.img) data=/dev/${b##*/} ;;
        signal.img) signal=/dev/${b##*/} ;;
    esac
done
stat=/sys/block/${data##*/}
# virtio_blk's own attribute writes the device's `writeback` (queue/write_cache would only
# change what the block layer believes).
echo "write through" >$stat/cache_type
echo "GUEST-CACHE-TYPE=$(cat $stat/cache_type)"
echo "GUEST-WRITE-CACHE=$(cat $stat/queue/write_cache)"
flushes() { awk '{ print $16 }' $stat/stat; }
echo "GUEST-FLUSHES-BEFORE=$(flushes)"
blk-discard -z $data 0 16777216 | sed 's/^/GUEST-ZEROES-/'
blk-discard $data 16777216 16777216 | sed 's/^/GUEST-DISCARD-/'
echo "GUEST-FLUSHES-AFTER=$(flushes)"
printf WARDEN-SYNCED | dd of=$signal bs=512 conv=notrunc,fsync 2>/dev/null
sleep 300
echo GUEST-NOT-KILLED=1
"#;

const HOST_CHECK_WRITE_THROUGH: &str = r#"echo "HOST-KILLED=$(cat killed.txt)"
echo "HOST-ZEROS-MD5=$(cat zeros.md5)"
echo "HOST-ZEROED-MD5=$(dd if=data.img bs=1M count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "HOST-DISCARDED-MD5=$(dd if=data.img bs=1M skip=16 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "HOST-REST-BYTE=$(dd if=data.img bs=1M skip=32 count=1 2>/dev/null | od -An -tx1 | head -1 | cut -d' ' -f2)"
echo "API-REPLY counters $(cat counters.txt 2>/dev/null)""#;

#[test]
fn discards_and_zeroings_under_write_through_are_stable_when_they_complete() {
    let Some(out) = Scenario::new("durability_write_through")
        .host_setup(HOST_SETUP_WRITE_THROUGH)
        .warden_args([
            "--memory",
            "size=512M",
            "--disk",
            "path=data.img,iommu=on",
            "--disk",
            "path=signal.img",
            "--api-socket",
            "path=api.sock",
        ])
        .guest_tool("blk-discard")
        .guest_script(GUEST_WRITE_THROUGH)
        .host_check(HOST_CHECK_WRITE_THROUGH)
        .timeout(Duration::from_secs(300))
        .run()
    else {
        return;
    };
    assert_eq!(out.marker("HOST-KILLED"), Some("killed"), "{out}");
    assert_eq!(
        out.marker("GUEST-WRITE-CACHE"),
        Some("write through"),
        "{out}"
    );
    assert_eq!(out.marker("GUEST-ZEROES-BLK-DISCARD"), Some("ok"), "{out}");
    assert_eq!(out.marker("GUEST-DISCARD-BLK-DISCARD"), Some("ok"), "{out}");
    assert_eq!(
        out.marker("GUEST-FLUSHES-AFTER"),
        out.marker("GUEST-FLUSHES-BEFORE"),
        "under write-through the guest sends no FLUSH\n{out}"
    );
    // What the guest was told is done is in the image, though warden died at once.
    let zeros = out.marker("HOST-ZEROS-MD5");
    assert!(zeros.is_some(), "{out}");
    assert_eq!(out.marker("HOST-ZEROED-MD5"), zeros, "WRITE_ZEROES\n{out}");
    assert_eq!(out.marker("HOST-DISCARDED-MD5"), zeros, "DISCARD\n{out}");
    assert_eq!(
        out.marker("HOST-REST-BYTE"),
        Some("ff"),
        "nothing else changed\n{out}"
    );
    // And each was made stable before it completed: the switch to write-through, the
    // zeroing and the discard each cost warden a host sync (there was no FLUSH to ask).
    let (status, counters) = out.api_reply("counters");
    assert_eq!(status, 200, "{out}");
    let disk = &counters["_disk0"];
    let count = |name: &str| {
        disk[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {disk}"))
    };
    assert_eq!(count("flush_ops"), 0, "{disk}\n{out}");
    assert!(
        count("write_zeroes_ops") >= 1 && count("discard_ops") >= 1,
        "{disk}"
    );
    assert!(
        count("host_syncs") >= 1 + count("write_zeroes_ops") + count("discard_ops"),
        "a host sync per discard and zeroing: {disk}\n{out}"
    );
}
