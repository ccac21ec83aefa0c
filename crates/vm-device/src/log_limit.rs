//! Logging that a guest cannot turn into a flood: device models log bad guest input at warn or
//! error level, and a guest can produce such input as fast as it likes.
//!
//! [`warn_limited!`](crate::warn_limited) and [`error_limited!`](crate::error_limited) are
//! `warn!` and `error!` with a budget per call site of [`BURST`] messages per [`INTERVAL`] (the
//! kernel's `printk_ratelimit` default); the first message logged after a suppression says how
//! many were dropped. [`Limited`] gives the same budget to the warnings and errors of crates
//! whose call sites warden does not own (virtio-queue's `error!`s on a bad ring).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

#[doc(hidden)]
pub use log;

/// Messages a call site may log per [`INTERVAL`].
pub const BURST: u32 = 10;
/// The window a call site's [`BURST`] is counted over.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// The budget of one call site.
pub struct RateLimit {
    window: Mutex<Window>,
}

struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new() -> Self {
        RateLimit {
            window: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a message at `now` may be logged; if so, how many were suppressed before it.
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if w.start
            .is_none_or(|start| now.saturating_duration_since(start) >= INTERVAL)
        {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < BURST {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// A logger that passes warnings and errors from `targets` (crate names, as in `RUST_LOG`)
/// through a budget per call site, and everything else straight to `inner`.
pub struct Limited<L> {
    inner: L,
    targets: &'static [&'static str],
    sites: Mutex<HashMap<(&'static str, u32), RateLimit>>,
}

impl<L: log::Log> Limited<L> {
    pub fn new(inner: L, targets: &'static [&'static str]) -> Self {
        Limited {
            inner,
            targets,
            sites: Mutex::new(HashMap::new()),
        }
    }

    fn limited(&self, record: &log::Record) -> bool {
        record.level() <= log::Level::Warn
            && self.targets.iter().any(|t| {
                record
                    .target()
                    .strip_prefix(t)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
    }
}

impl<L: log::Log> log::Log for Limited<L> {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if !self.inner.enabled(record.metadata()) || !self.limited(record) {
            return self.inner.log(record);
        }
        // Call sites are the other crate's, so a finite set of keys (log's macros give static
        // file names).
        let site = (
            record.file_static().unwrap_or(""),
            record.line().unwrap_or(0),
        );
        let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        match sites.entry(site).or_default().check(Instant::now()) {
            Some(0) => self.inner.log(record),
            Some(suppressed) => self.inner.log(
                &log::Record::builder()
                    .args(format_args!(
                        "{} ({suppressed} similar messages suppressed)",
                        record.args()
                    ))
                    .metadata(record.metadata().clone())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
            None => {}
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// `log!` at `level` within the call site's budget (see the module documentation).
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::RateLimit = $crate::log_limit::RateLimit::new();
        let level = $level;
        if $crate::log_limit::log::log_enabled!(level) {
            match LIMIT.check(::std::time::Instant::now()) {
                Some(0) => $crate::log_limit::log::log!(level, $($arg)+),
                Some(suppressed) => $crate::log_limit::log::log!(
                    level,
                    "{} ({suppressed} similar messages suppressed)",
                    format_args!($($arg)+)
                ),
                None => {}
            }
        }
    }};
}

/// `warn!` within the call site's budget (see [`crate::log_limit`]).
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!($crate::log_limit::log::Level::Warn, $($arg)+)
    };
}

/// `error!` within the call site's budget (see [`crate::log_limit`]).
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!($crate::log_limit::log::Level::Error, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_interval_then_the_count_of_what_was_dropped() {
        let limit = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(limit.check(t0), Some(0));
        }
        for i in 0..25 {
            assert_eq!(limit.check(t0 + Duration::from_millis(i)), None);
        }
        // Still within the interval: dropped.
        assert_eq!(limit.check(t0 + INTERVAL - Duration::from_millis(1)), None);
        // A new interval: the first message reports the 26 dropped, the next ones none.
        let t1 = t0 + INTERVAL;
        assert_eq!(limit.check(t1), Some(26));
        for _ in 1..BURST {
            assert_eq!(limit.check(t1), Some(0));
        }
        assert_eq!(limit.check(t1), None);
        // An older instant (another thread read the clock first) counts in the current window.
        assert_eq!(limit.check(t0), None);
    }

    /// Records what reaches the logger.
    struct Capture(Mutex<Vec<String>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            let mut lines = self.0.lock().unwrap();
            lines.push(format!("{} {}", record.level(), record.args()));
        }
        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

    #[test]
    fn each_call_site_has_its_own_budget() {
        let _ = log::set_logger(&CAPTURE);
        log::set_max_level(log::LevelFilter::Warn);
        for i in 0..3 * BURST {
            crate::warn_limited!("first site {i}");
            crate::error_limited!("second site {}", i);
        }
        let lines = CAPTURE.0.lock().unwrap().clone();
        let count = |prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(count("WARN first site"), BURST as usize);
        assert_eq!(count("ERROR second site"), BURST as usize);
    }

    #[test]
    fn limited_logger_budgets_only_the_named_crates() {
        let inner = Capture(Mutex::new(Vec::new()));
        let logger = Limited::new(inner, &["virtio_queue"]);
        let emit = |target: &str, level, line| {
            log::Log::log(
                &logger,
                &log::Record::builder()
                    .target(target)
                    .level(level)
                    .file_static(Some("queue.rs"))
                    .line(Some(line))
                    .args(format_args!("{target} {line}"))
                    .build(),
            )
        };
        for _ in 0..3 * BURST {
            emit("virtio_queue::queue", log::Level::Error, 1);
            emit("virtio_queue", log::Level::Error, 2);
            emit("virtio_queue", log::Level::Debug, 3);
            emit("virtio_queue_x", log::Level::Error, 4);
        }
        let lines = logger.inner.0.lock().unwrap().clone();
        let count = |line: &str| lines.iter().filter(|l| l.ends_with(line)).count();
        assert_eq!(count(" 1"), BURST as usize, "per call site");
        assert_eq!(count(" 2"), BURST as usize, "per call site");
        assert_eq!(count(" 3"), 3 * BURST as usize, "debug is not budgeted");
        assert_eq!(count(" 4"), 3 * BURST as usize, "another crate");
    }
}
