//! VFIO passthrough's reading of the host device's configuration space
//! (`vfio::fuzzing`): the capability list the guest sees, with MSI unlinked, and the MSI-X
//! capability's fields.
//!
//! Input layout: byte 0 = which capability IDs are hidden (bit 0 MSI, 0x05, as warden hides
//! it; bit 1 also vendor-specific, 0x09; bit 2 also PCI Express, 0x10); then the first 256
//! bytes of configuration space (zero past the input's end), so that lists loop, point into
//! the header or near the end (0xfc), and MSI-X capabilities run past the end. Warden reads
//! nothing past those 256 bytes: the bus answers the extended space of a function with zeros.
//!
//! Asserts: building the view terminates; the list the guest walks (as Linux does, from the
//! pointer at 0x34, down to an offset below 0x40) visits no capability twice and none hidden;
//! when the device's own list does not loop it is exactly that list without the hidden ones,
//! in order; the view changes no byte but the list pointers; writes are dropped for hidden
//! capabilities and never for visible ones; the MSI-X capability warden emulates is the first
//! one the guest finds; its fields are read exactly when its 12 bytes fit, as the capability
//! encodes them.

use vfio::fuzzing::{self, GuestView};

const POINTER: usize = 0x34;
const MSIX: u8 = 0x11;

/// A list walk over `byte` as Linux's `pci_find_capability` does, stopping at an offset
/// already visited; the offsets and whether the walk looped.
fn walk(byte: impl Fn(usize) -> u8) -> (Vec<usize>, bool) {
    let mut visited = Vec::new();
    let mut at = usize::from(byte(POINTER) & !3);
    while at >= 0x40 {
        if visited.contains(&at) {
            return (visited, true);
        }
        visited.push(at);
        at = usize::from(byte(at + 1) & !3);
    }
    (visited, false)
}

/// One input; any byte string is valid.
pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let mut hide = vec![0x05];
    if which & 2 != 0 {
        hide.push(0x09);
    }
    if which & 4 != 0 {
        hide.push(0x10);
    }
    if which & 1 == 0 {
        hide.remove(0);
    }
    let mut config = [0u8; 256];
    let len = rest.len().min(256);
    config[..len].copy_from_slice(&rest[..len]);

    let view = GuestView::new(&config, &hide);
    let reg = |r: usize| u32::from_le_bytes(config[r * 4..r * 4 + 4].try_into().unwrap());
    let guest: Vec<u8> = (0..64)
        .flat_map(|r| view.read(r, reg(r)).to_le_bytes())
        .collect();

    let (device_list, device_loops) = walk(|at| config[at]);
    let (guest_list, guest_loops) = walk(|at| guest[at]);
    assert!(!guest_loops, "the guest's list loops: {guest_list:x?}");
    for &at in &guest_list {
        assert!(
            !hide.contains(&config[at]),
            "hidden capability at {at:#x} linked"
        );
        assert!(
            !view.drops_writes(at / 4),
            "writes to visible {at:#x} dropped"
        );
    }
    for &at in device_list.iter().filter(|&&at| hide.contains(&config[at])) {
        assert!(view.drops_writes(at / 4), "writes to hidden {at:#x} kept");
    }
    if !device_loops {
        let visible: Vec<usize> = device_list
            .iter()
            .copied()
            .filter(|&at| !hide.contains(&config[at]))
            .collect();
        assert_eq!(guest_list, visible, "the guest's list");
    }
    for (at, (&before, &after)) in config.iter().zip(&guest).enumerate() {
        if before != after {
            let pointer = at == POINTER || device_list.contains(&at.wrapping_sub(1));
            assert!(pointer, "byte {at:#x} changed but is no list pointer");
        }
    }

    let first_msix = guest_list.iter().copied().find(|&at| config[at] == MSIX);
    if first_msix.is_some() {
        assert_eq!(view.msix(), first_msix, "the MSI-X capability emulated");
    }
    if let Some(at) = view.msix() {
        assert_eq!(config[at], MSIX);
        let fields = fuzzing::msix_fields(&config, at);
        assert_eq!(fields.is_some(), at + 12 <= 256, "MSI-X at {at:#x}");
        if let Some((vectors, table, pba)) = fields {
            let dword = |o: usize| reg(o / 4);
            let control = u16::from_le_bytes([config[at + 2], config[at + 3]]);
            assert_eq!(vectors, usize::from(control & 0x7ff) + 1);
            assert_eq!(table, ((dword(at + 4) & 7) as usize, dword(at + 4) & !7));
            assert_eq!(pba, ((dword(at + 8) & 7) as usize, dword(at + 8) & !7));
        }
    }
}
