use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;

use vmm_sys_util::tempfile::TempFile;

use super::*;

fn file(len: usize) -> (TempFile, Arc<File>) {
    let temp = TempFile::new().unwrap();
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    temp.as_file().write_all_at(&pattern, 0).unwrap();
    let file = Arc::new(temp.as_file().try_clone().unwrap());
    (temp, file)
}

fn engines(file: &Arc<File>) -> Vec<Engine> {
    let uring = Engine::new(Arc::clone(file), 64).unwrap();
    assert_eq!(
        uring.kind(),
        EngineKind::IoUring,
        "this host allows io_uring"
    );
    vec![uring, Engine::synchronous(Arc::clone(file)).unwrap()]
}

/// Waits until `count` completions arrived.
fn collect(engine: &mut Engine, count: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    engine.submit().unwrap();
    while out.len() < count {
        engine.wait(&mut out).unwrap();
    }
    out
}

fn segments(buf: &mut [u8], size: usize) -> IoVecs {
    IoVecs::new(buf.chunks_mut(size).map(|c| (c.as_mut_ptr(), c.len())))
}

/// More segments than one system call takes, each a few bytes: the engine continues the
/// transfer until every byte moved.
#[test]
fn reads_and_writes_of_more_than_uio_maxiov_segments_complete_whole() {
    let (temp, file) = file(64 * 1024);
    for mut engine in engines(&file) {
        let mut data: Vec<u8> = (0..3000 * 7).map(|i| (i % 13) as u8).collect();
        let expected = data.clone();
        let buffers = segments(&mut data, 7);
        // SAFETY: `data` outlives the completion collected below.
        unsafe {
            engine.push(
                1,
                Op::Write {
                    offset: 100,
                    buffers,
                },
            )
        }
        .unwrap();
        let done = collect(&mut engine, 1);
        assert_eq!(done[0].token, 1);
        done[0].result.as_ref().unwrap();
        let mut back = vec![0u8; expected.len()];
        temp.as_file().read_exact_at(&mut back, 100).unwrap();
        assert_eq!(back, expected);

        let mut read = vec![0u8; expected.len()];
        let buffers = segments(&mut read, 5);
        // SAFETY: as above.
        unsafe {
            engine.push(
                2,
                Op::Read {
                    offset: 100,
                    buffers,
                },
            )
        }
        .unwrap();
        collect(&mut engine, 1)[0].result.as_ref().unwrap();
        assert_eq!(read, expected);
        assert_eq!(engine.in_flight(), 0);
    }
}

/// io_uring keeps every pushed operation in flight at once, and reports each by its token.
#[test]
fn many_operations_in_flight_each_reported_once() {
    let (_temp, file) = file(64 * 4096);
    let mut engine = Engine::new(Arc::clone(&file), 64).unwrap();
    let mut bufs = vec![[0u8; 4096]; 64];
    for (i, buf) in bufs.iter_mut().enumerate() {
        let buffers = IoVecs::new([(buf.as_mut_ptr(), buf.len())]);
        let offset = (63 - i as u64) * 4096;
        // SAFETY: `bufs` outlives the completions collected below.
        unsafe { engine.push(i as u64, Op::Read { offset, buffers }) }.unwrap();
    }
    assert_eq!(engine.in_flight(), 64);
    let done = collect(&mut engine, 64);
    let tokens: BTreeSet<u64> = done.iter().map(|c| c.token).collect();
    assert_eq!(tokens, (0..64).collect());
    assert!(done.iter().all(|c| c.result.is_ok()));
    for (i, buf) in bufs.iter().enumerate() {
        let offset = (63 - i) * 4096;
        assert_eq!(buf[0], (offset % 251) as u8, "read {i}");
    }
}

#[test]
fn a_read_past_the_end_of_the_file_fails() {
    let (_temp, file) = file(4096);
    for mut engine in engines(&file) {
        let mut buf = [0u8; 512];
        let buffers = IoVecs::new([(buf.as_mut_ptr(), buf.len())]);
        // SAFETY: `buf` outlives the completion.
        unsafe {
            engine.push(
                9,
                Op::Read {
                    offset: 3840,
                    buffers,
                },
            )
        }
        .unwrap();
        let done = collect(&mut engine, 1);
        let err = done[0].result.as_ref().unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::UnexpectedEof,
            "{:?}",
            engine.kind()
        );
    }
}

#[test]
fn punch_hole_and_sync() {
    let (temp, file) = file(64 * 1024);
    for mut engine in engines(&file) {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: no memory involved.
        unsafe {
            engine
                .push(
                    1,
                    Op::Fallocate {
                        mode,
                        offset: 8192,
                        len: 8192,
                    },
                )
                .unwrap();
            engine.push(2, Op::SyncData).unwrap();
        }
        let done = collect(&mut engine, 2);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        let mut hole = vec![0xffu8; 8192];
        temp.as_file().read_exact_at(&mut hole, 8192).unwrap();
        assert!(hole.iter().all(|&b| b == 0));
        assert_eq!(temp.as_file().metadata().unwrap().len(), 64 * 1024);
    }
}

/// The fallback does the I/O at push time and still signals its completion fd, so an epoll
/// loop written for io_uring serves it unchanged.
#[test]
fn the_synchronous_engine_signals_its_completion_fd() {
    let (_temp, file) = file(4096);
    let mut engine = Engine::synchronous(file).unwrap();
    assert_eq!(engine.kind(), EngineKind::Synchronous);
    let mut buf = [0u8; 512];
    let buffers = IoVecs::new([(buf.as_mut_ptr(), buf.len())]);
    // SAFETY: `buf` outlives the completion.
    unsafe {
        engine.push(
            5,
            Op::Read {
                offset: 512,
                buffers,
            },
        )
    }
    .unwrap();
    let mut count = 0u64;
    // SAFETY: reads 8 bytes into `count`.
    let n = unsafe { libc::read(engine.completion_fd(), (&mut count as *mut u64).cast(), 8) };
    assert_eq!(n, 8);
    let mut out = Vec::new();
    engine.reap(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(buf[0], (512 % 251) as u8);
}

/// The ring refuses what the engine never asks of it: another opcode, or a file other than
/// its own (what a thread confined by seccomp could otherwise reach through the ring).
#[test]
fn the_ring_refuses_other_operations_and_files() {
    let (_temp, file) = file(4096);
    let Engine::IoUring(mut engine) = Engine::new(file, 8).unwrap() else {
        panic!("this host allows io_uring");
    };
    let path = c"/etc/hostname";
    let open = io_uring::opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), path.as_ptr())
        .build()
        .user_data(1);
    let mut buf = [0u8; 16];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let stdin_read = io_uring::opcode::Readv::new(io_uring::types::Fd(0), iov.as_ptr(), 1)
        .build()
        .user_data(2);
    for entry in [open, stdin_read] {
        // SAFETY: `path` and `buf` outlive the submission, which is waited for.
        unsafe { engine.ring.submission().push(&entry).unwrap() };
        engine.ring.submit_and_wait(1).unwrap();
        let cqe = engine.ring.completion().next().unwrap();
        assert_eq!(cqe.result(), -libc::EACCES, "entry {}", cqe.user_data());
    }
}
