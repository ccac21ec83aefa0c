//! File descriptors a client passes with a request (`SCM_RIGHTS`): the taps of `vm.add-net`,
//! as Kata Containers and libvirt send them.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

/// The descriptors that came with one request, owned until the VMM takes them (closed if it
/// never does). Clones share them: the first to take them has them.
#[derive(Clone, Default)]
pub struct Files(Arc<Mutex<Vec<OwnedFd>>>);

impl Files {
    pub fn new(files: Vec<OwnedFd>) -> Self {
        Files(Arc::new(Mutex::new(files)))
    }

    /// The descriptors, once: later calls find none.
    pub fn take(&self) -> Vec<OwnedFd> {
        std::mem::take(&mut *self.lock())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn numbers(&self) -> Vec<i32> {
        self.lock().iter().map(AsRawFd::as_raw_fd).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<OwnedFd>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Files{:?}", self.numbers())
    }
}

/// Equal when they hold the same descriptor numbers (for tests comparing requests).
impl PartialEq for Files {
    fn eq(&self, other: &Self) -> bool {
        self.numbers() == other.numbers()
    }
}

impl Eq for Files {}
