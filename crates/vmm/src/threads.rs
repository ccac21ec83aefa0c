//! The one place the VMM starts its threads (vCPUs, the API server, hotplug, statistics,
//! serial input): each is named, and confined to its kind's seccomp filter before it runs
//! anything else. Device threads are started by `virtio-devices` and confined by the hook
//! [`install_device_thread_hook`] gives it.

use std::sync::Arc;
use std::thread::{self, JoinHandle};

use sandbox::{Filters, ThreadKind};
use virtio_devices::DeviceThread;

use crate::error::VmmError;

/// Starts `body` on a thread named `name`, confined to `kind`'s filter (if filters are on).
pub(crate) fn spawn<T: Send + 'static>(
    name: impl Into<String>,
    kind: ThreadKind,
    filters: Option<Arc<Filters>>,
    body: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, VmmError> {
    let name = name.into();
    thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            confine(filters.as_deref(), kind);
            body()
        })
        .map_err(|source| VmmError::Io {
            what: format!("start the {name} thread"),
            source,
        })
}

/// Confines the calling thread to `kind`'s filter, if filters are on. A thread that cannot be
/// confined must not run at all, and has nobody to return an error to: warden exits.
pub(crate) fn confine(filters: Option<&Filters>, kind: ThreadKind) {
    if let Some(Err(err)) = filters.map(|f| f.install(kind)) {
        eprintln!("warden: {err}");
        std::process::exit(1);
    }
}

/// Has every device thread confine itself to its kind's filter as it starts.
pub(crate) fn install_device_thread_hook(filters: &Arc<Filters>) {
    let filters = Arc::clone(filters);
    virtio_devices::set_thread_start_hook(Box::new(move |kind| {
        confine(Some(&filters), device_thread_kind(kind));
    }));
}

fn device_thread_kind(kind: DeviceThread) -> ThreadKind {
    match kind {
        DeviceThread::Block => ThreadKind::Block,
        DeviceThread::Net => ThreadKind::Net,
        DeviceThread::Rng => ThreadKind::Rng,
        DeviceThread::Console => ThreadKind::Console,
        DeviceThread::IommuEvents => ThreadKind::IommuEvents,
        DeviceThread::IommuPoller => ThreadKind::IommuPoller,
        DeviceThread::Vsock => ThreadKind::Vsock,
        DeviceThread::Fs => ThreadKind::Fs,
    }
}
