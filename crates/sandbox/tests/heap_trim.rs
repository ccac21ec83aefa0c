//! A confined thread may give its freed heap back to the host: glibc opens
//! `/proc/sys/vm/overcommit_memory` the first time any thread's own heap shrinks, which no list
//! allows, so the sandbox must have had glibc read it before confining anyone. Run in a child
//! process (this file's `main` runs itself again), since a forbidden call ends the process.

use std::hint::black_box;
use std::process::Command;

use sandbox::{Filters, Mode, ThreadKind};

const CHILD: &str = "SANDBOX_HEAP_TRIM_CHILD";

fn main() {
    if std::env::var_os(CHILD).is_some() {
        free_a_heap_top_in_a_confined_thread();
        return;
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let out = Command::new(exe)
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a confined thread freeing its heap's top ended the process ({}): {stderr}",
        out.status
    );
    println!("test a_confined_thread_may_shrink_its_heap ... ok");
}

fn free_a_heap_top_in_a_confined_thread() {
    let filters = Filters::new(Mode::Enforce)
        .expect("filters compile")
        .expect("a filtering mode");
    std::thread::spawn(move || {
        filters.install(ThreadKind::Block).expect("confine");
        // 64 pieces of 32 KiB: below glibc's mmap threshold, so from this thread's own heap;
        // freed last to first, they leave a top far past the 128 KiB trim threshold.
        let pieces: Vec<Vec<u8>> = (0..64)
            .map(|_| black_box(Vec::with_capacity(32 << 10)))
            .collect();
        for piece in pieces.into_iter().rev() {
            drop(black_box(piece));
        }
    })
    .join()
    .expect("the confined thread ran to its end");
}
