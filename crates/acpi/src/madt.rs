//! The MADT: local APICs, the IOAPIC, the ISA timer override and the LINT1 NMI.

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{Aml, AmlSink};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use crate::{aml_bytes, AcpiLayout, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// MADT structure types (ACPI 6.5, table 5.45) that acpi_tables 0.2.1 has no builder for.
const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const TYPE_LOCAL_APIC_NMI: u8 = 4;

/// MPS INTI flags: polarity in bits 0..2, trigger mode in bits 2..4.
const MPS_INTI_CONFORMS: u16 = 0;
const MPS_INTI_ACTIVE_HIGH: u16 = 0b01;
const MPS_INTI_EDGE: u16 = 0b01 << 2;

/// Processor UID meaning "all processors" in a Local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;

/// Remaps an ISA IRQ to a GSI (ACPI 6.5, 5.2.12.5).
#[repr(C)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    /// 0: ISA.
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// Which local APIC input is wired to NMI (ACPI 6.5, 5.2.12.7).
#[repr(C)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// The MADT's bytes.
pub(crate) fn build(layout: &AcpiLayout) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout.lapic_address),
    );
    // The MADT's PCAT_COMPAT flag stays clear: a hardware-reduced guest uses no 8259 PIC.
    for cpu in 0..layout.cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    let ioapic = layout.ioapic;
    madt.add_structure(IoApic::new(ioapic.id, ioapic.address, ioapic.gsi_base));
    // The PIT's IRQ0 arrives on IOAPIC pin 2, as on every PC. No SCI override: a
    // hardware-reduced platform has no SCI.
    madt.add_structure(InterruptSourceOverride {
        kind: TYPE_INTERRUPT_SOURCE_OVERRIDE,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2.into(),
        flags: MPS_INTI_CONFORMS.into(),
    });
    madt.add_structure(LocalApicNmi {
        kind: TYPE_LOCAL_APIC_NMI,
        length: 6,
        processor_uid: ALL_PROCESSORS,
        flags: (MPS_INTI_ACTIVE_HIGH | MPS_INTI_EDGE).into(),
        lint: 1,
    });
    aml_bytes(&madt)
}
