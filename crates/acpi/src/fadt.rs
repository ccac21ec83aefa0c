//! The FADT of a hardware-reduced platform.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};

use crate::{aml_bytes, AcpiLayout, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// IA-PC boot architecture flags (ACPI 6.5, table 5.11).
pub(crate) const BOOT_ARCH_8042: u16 = 1 << 1;
pub(crate) const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
pub(crate) const BOOT_ARCH_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
/// Deliberately never set: Linux then does not register the CMOS RTC at 0x70, and the VMM
/// has one.
#[cfg(test)]
pub(crate) const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// "WARDENVM", the FADT's hypervisor vendor identity.
pub(crate) const HYPERVISOR_VENDOR_ID: u64 = u64::from_le_bytes(*b"WARDENVM");

/// A one-byte register in I/O space.
fn io_byte(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// The FADT's bytes, pointing at the DSDT through the 64-bit `X_DSDT` only.
pub(crate) fn build(layout: &AcpiLayout, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // No fixed-feature buttons (there are no fixed features at all).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // No SCI, PM1, GPE or PM timer blocks: hardware-reduced OSPMs ignore them, and they stay
    // zero. The sleep registers replace PM1 for S5.
    fadt.sleep_control_reg = io_byte(layout.sleep.control_port);
    fadt.sleep_status_reg = io_byte(layout.sleep.status_port);
    if let Some(reset) = layout.reset {
        fadt = fadt.flag(Flags::ResetRegSup);
        fadt.reset_reg = io_byte(reset.port);
        fadt.reset_value = reset.value;
    }
    // No VGA to probe; ASPM is meaningless on virtual links and Linux leaves it alone when
    // told. The CMOS RTC is present, so its "not present" bit stays clear.
    let mut boot_arch = BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_PCIE_ASPM_CONTROLS;
    if layout.i8042 {
        boot_arch |= BOOT_ARCH_8042;
    }
    fadt.iapc_boot_arch = boot_arch.into();
    fadt.hypervisor_vendor_identity = HYPERVISOR_VENDOR_ID.into();
    aml_bytes(&fadt.finalize())
}
