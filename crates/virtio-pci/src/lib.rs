//! The modern virtio-pci transport.
