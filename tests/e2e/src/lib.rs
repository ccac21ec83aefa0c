//! End-to-end test harness for warden (work in progress).
