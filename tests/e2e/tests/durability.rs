//! No data lost when warden dies: the guest writes to a protected disk and `fsync`s, tells the
//! host through a second disk, and the host kills warden with SIGKILL at once. Whatever the
//! guest was told is written must be in the host image: a write completed to the guest is
//! never still sitting in warden (an engine's queue, a buffer) when the process goes. And
//! with FLUSH negotiated the guest is told the truth about the rest: the disk is a write-back
//! cache, so a write it did not flush is not taken as durable, and each fsync sends a FLUSH.

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
