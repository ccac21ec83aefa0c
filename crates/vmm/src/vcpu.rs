//! vCPU state at reset (CPUID, MSRs, registers, LAPIC), the run loop, and the kick that gets
//! a vCPU out of the guest for `vm.pause`.

use std::cell::Cell;
use std::io;
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::Bus;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::EntryPoint;
use crate::events::ExitNotice;
use crate::events::GuestExit;
use crate::layout;
use crate::pause::PauseGate;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {what}: {source}")]
    Kvm {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: cannot write boot structures to guest RAM: {reason}")]
    Memory { id: u8, reason: String },
}

/// The guest's view of the machine's topology and address width, the same for every vCPU.
pub struct Topology {
    pub cpus: u8,
    /// The physical address width reported, at most the host's (CPUID 0x80000008).
    pub max_phys_bits: u8,
    /// Whether VMX or SVM stays in the guest's CPUID, so it can run guests of its own.
    pub nested: bool,
    /// KVM emulates the local APIC's TSC-deadline mode (`KVM_CAP_TSC_DEADLINE_TIMER`). Its
    /// supported CPUID need not say so (the mode depends on the in-kernel APIC), so VMMs set
    /// the bit from the capability; without it Linux times through the APIC's counter.
    pub tsc_deadline_timer: bool,
}

/// Makes `cpuid` (KVM's supported set) describe vCPU `id` of a machine with `topology`.
fn patch_cpuid(cpuid: &mut CpuId, id: u8, topology: &Topology) {
    const EBX_APIC_ID_SHIFT: u32 = 24;
    const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
    const EDX_HTT: u32 = 1 << 28;
    const ECX_HYPERVISOR: u32 = 1 << 31;
    const ECX_TSC_DEADLINE: u32 = 1 << 24;
    const ECX_VMX: u32 = 1 << 5;
    const EXT_ECX_SVM: u32 = 1 << 2;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                if !topology.nested {
                    entry.ecx &= !ECX_VMX;
                }
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(id) << EBX_APIC_ID_SHIFT)
                    | (u32::from(topology.cpus) << EBX_LOGICAL_COUNT_SHIFT);
                if topology.cpus > 1 {
                    entry.edx |= EDX_HTT;
                }
                entry.ecx |= ECX_HYPERVISOR;
                if topology.tsc_deadline_timer {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
            }
            // Extended topology: one thread per core, `cpus` cores per package.
            0xb | 0x1f => {
                let cores_shift = 32 - u32::from(topology.cpus.max(1) - 1).leading_zeros();
                (entry.eax, entry.ebx, entry.ecx) = match entry.index {
                    0 => (0, 1, 1 << 8),
                    1 => (cores_shift, u32::from(topology.cpus), (2 << 8) | 1),
                    level => (0, 0, level),
                };
                entry.edx = u32::from(id);
            }
            0x8000_0001 if !topology.nested => entry.ecx &= !EXT_ECX_SVM,
            0x8000_0008 => {
                let bits = (entry.eax & 0xff).min(u32::from(topology.max_phys_bits));
                entry.eax = (entry.eax & !0xff) | bits;
            }
            _ => {}
        }
    }
}

/// The MSRs Linux expects a freshly reset CPU to have.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

/// Packs a GDT descriptor.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The hidden part of a segment register loaded from GDT entry `index`.
fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let granularity = ((entry >> 55) & 1) as u8;
    let mut limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    if granularity == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the boot GDT and, for 64-bit entry, identity page tables for the first GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: EntryPoint) -> Result<(), String> {
    let code = match entry {
        EntryPoint::Linux64 { .. } => 0xa09b,
        EntryPoint::Pvh { .. } => 0xc09b,
    };
    let gdt = [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ];
    for (index, descriptor) in gdt.iter().enumerate() {
        mem.write_obj(
            *descriptor,
            GuestAddress(layout::BOOT_GDT_START + index as u64 * 8),
        )
        .map_err(|err| err.to_string())?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(|err| err.to_string())?;
    if let EntryPoint::Linux64 { .. } = entry {
        mem.write_obj(layout::PDPTE_START | 0x03, GuestAddress(layout::PML4_START))
            .map_err(|err| err.to_string())?;
        mem.write_obj(layout::PDE_START | 0x03, GuestAddress(layout::PDPTE_START))
            .map_err(|err| err.to_string())?;
        for index in 0..512u64 {
            mem.write_obj(
                (index << 21) | 0x83,
                GuestAddress(layout::PDE_START + index * 8),
            )
            .map_err(|err| err.to_string())?;
        }
    }
    Ok(())
}

thread_local! {
    /// The calling vCPU thread's `kvm_run` while it is in its run loop (null elsewhere), for
    /// the kick's signal handler.
    static KVM_RUN_AREA: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick's handler: sets `immediate_exit` in the thread's `kvm_run`. Interrupting
/// `KVM_RUN` is the signal's work; the flag is for a kick that arrives just before it, while
/// the vCPU emulates an exit: KVM then returns `EINTR` at once instead of entering the guest,
/// so no kick is lost between the vCPU's look at the pause gate and its `KVM_RUN`.
extern "C" fn on_kick(_signal: libc::c_int) {
    let _ = KVM_RUN_AREA.try_with(|area| {
        let run = area.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's kvm_run mapping, live for the whole run loop (the
            // pointer is cleared before the loop's VcpuFd goes away); the kernel reads the
            // byte on the next KVM_RUN.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick's handler for the process, before any thread is confined (no list
/// allows `rt_sigaction`). `SA_RESTART` keeps the signal from failing other system calls a
/// vCPU makes; `KVM_RUN` returns `EINTR` regardless.
pub fn install_kick_handler() -> io::Result<()> {
    // SAFETY: sigaction is plain data, zero is a valid initial value for each field.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_kick as *const () as usize;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: `action` is a valid sigaction whose handler has the plain signature.
    if unsafe { libc::sigaction(sandbox::vcpu_kick_signal(), &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Kicks vCPU thread `tid` of process `pid` out of the guest.
pub fn kick(pid: i32, tid: i32) -> io::Result<()> {
    // SAFETY: tgkill takes three integers; the signal's handler only sets a flag.
    let sent = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sandbox::vcpu_kick_signal()) };
    if sent != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One vCPU, configured and ready to run.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Sets CPUID, MSRs, FPU and LAPIC; the boot vCPU (id 0) also gets the entry registers.
    /// Application processors stay in wait-for-SIPI until the guest starts them.
    pub fn configure(
        id: u8,
        fd: VcpuFd,
        supported_cpuid: &CpuId,
        topology: &Topology,
        entry: EntryPoint,
    ) -> Result<Self, VcpuError> {
        let kvm = |what| move |source| VcpuError::Kvm { id, what, source };
        let mut cpuid = supported_cpuid.clone();
        patch_cpuid(&mut cpuid, id, topology);
        fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;

        let msrs = Msrs::from_entries(&boot_msrs()).expect("boot MSR list fits a KVM MSR array");
        let written = fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        if written != msrs.as_slice().len() {
            log::warn!(
                "vCPU {id}: KVM accepted {written} of {} boot MSRs",
                msrs.as_slice().len()
            );
        }
        fd.set_fpu(&kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        })
        .map_err(kvm("set FPU"))?;
        Self::configure_lapic(&fd).map_err(kvm("set LAPIC"))?;

        if id == 0 {
            Self::set_entry_registers(&fd, entry).map_err(kvm("set boot registers"))?;
        }
        Ok(Vcpu { id, fd })
    }

    /// LINT0 receives the PIC's ExtINT and LINT1 the NMI, as on a PC.
    fn configure_lapic(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const DELIVERY_MODE_EXTINT: u32 = 0x7;
        const DELIVERY_MODE_NMI: u32 = 0x4;
        let mut lapic = fd.get_lapic()?;
        for (offset, mode) in [
            (APIC_LVT0, DELIVERY_MODE_EXTINT),
            (APIC_LVT1, DELIVERY_MODE_NMI),
        ] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, byte) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[offset + i] = *byte as _;
            }
        }
        fd.set_lapic(&lapic)
    }

    fn set_entry_registers(fd: &VcpuFd, entry: EntryPoint) -> Result<(), kvm_ioctls::Error> {
        let mut sregs = fd.get_sregs()?;
        let code_flags = match entry {
            EntryPoint::Linux64 { .. } => 0xa09b,
            EntryPoint::Pvh { .. } => 0xc09b,
        };
        let code = segment_from_gdt(gdt_entry(code_flags, 0, 0xfffff), 1);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        let tss = segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), 3);
        sregs.gdt.base = layout::BOOT_GDT_START;
        sregs.gdt.limit = 4 * 8 - 1;
        sregs.idt.base = layout::BOOT_IDT_START;
        sregs.idt.limit = 7;
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = tss;

        let mut regs = kvm_regs {
            rflags: 0x2,
            ..Default::default()
        };
        match entry {
            EntryPoint::Linux64 { entry } => {
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
                sregs.cr3 = layout::PML4_START;
                sregs.cr4 = X86_CR4_PAE;
                sregs.efer = EFER_LME | EFER_LMA;
                regs.rip = entry.0;
                regs.rsp = layout::BOOT_STACK_POINTER;
                regs.rbp = layout::BOOT_STACK_POINTER;
                regs.rsi = layout::ZERO_PAGE_START;
            }
            EntryPoint::Pvh { entry } => {
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
                regs.rip = entry.0;
                regs.rbx = layout::PVH_INFO_START;
            }
        }
        fd.set_sregs(&sregs)?;
        fd.set_regs(&regs)
    }

    /// Runs until the guest stops this vCPU; reports why on `exits`. Before each entry into
    /// the guest it passes `gate`, where it waits while the VM is paused.
    pub fn id(&self) -> u8 {
        self.id
    }

    pub fn run(mut self, pio: Arc<Bus>, mmio: Arc<Bus>, exits: ExitNotice, gate: &PauseGate) {
        let id = self.id;
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_AREA.with(|area| area.set(run));
        gate.enter(tid);
        let reason = loop {
            if !gate.pass() {
                // The VM is going away: nothing to report.
                break None;
            }
            let exit = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !pio.write(u64::from(port), data) {
                        log::trace!("vCPU {id}: unclaimed port write {port:#x}");
                    }
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        log::debug!("vCPU {id}: unclaimed MMIO read {addr:#x}");
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !mmio.write(addr, data) {
                        log::debug!("vCPU {id}: unclaimed MMIO write {addr:#x}");
                    }
                    None
                }
                Ok(VcpuExit::Hlt) => None,
                Ok(VcpuExit::Shutdown) => Some(GuestExit::Reset("triple fault")),
                Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::Poweroff,
                    KVM_SYSTEM_EVENT_RESET => GuestExit::Reset("system reset"),
                    KVM_SYSTEM_EVENT_CRASH => GuestExit::Crash("guest crashed".into()),
                    other => GuestExit::Crash(format!("system event {other}")),
                }),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(GuestExit::Crash(format!(
                    "vCPU {id}: VM entry failed (reason {reason:#x}) on host CPU {cpu}"
                ))),
                Ok(VcpuExit::InternalError) => {
                    Some(GuestExit::Crash(format!("vCPU {id}: KVM internal error")))
                }
                Ok(other) => Some(GuestExit::Crash(format!(
                    "vCPU {id}: unexpected exit {other:?}"
                ))),
                // A kick (or a kick's flag, set before KVM_RUN): cleared before the gate is
                // looked at, so a kick after this look is seen on the next KVM_RUN.
                Err(err) if err.errno() == libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(err) if err.errno() == libc::EAGAIN => None,
                Err(err) => Some(GuestExit::Crash(format!(
                    "vCPU {id}: KVM_RUN failed: {err}"
                ))),
            };
            if exit.is_some() {
                break exit;
            }
        };
        gate.leave(tid);
        KVM_RUN_AREA.with(|area| area.set(std::ptr::null_mut()));
        if let Some(reason) = reason {
            exits.send(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kick_sets_immediate_exit_in_its_threads_kvm_run_and_is_harmless_elsewhere() {
        install_kick_handler().unwrap();
        // SAFETY: kvm_run is plain data for which all zeroes is valid.
        let mut run: Box<kvm_run> = Box::new(unsafe { std::mem::zeroed() });
        let (pid, tid) = (std::process::id() as i32, unsafe { libc::gettid() });
        // Outside a run loop the handler has nothing to set.
        kick(pid, tid).unwrap();
        KVM_RUN_AREA.with(|area| area.set(&mut *run));
        // A signal a thread sends itself is handled before tgkill returns.
        kick(pid, tid).unwrap();
        KVM_RUN_AREA.with(|area| area.set(std::ptr::null_mut()));
        // SAFETY: the handler wrote the byte with a volatile write; read it the same way.
        let flag = unsafe { std::ptr::addr_of!(run.immediate_exit).read_volatile() };
        assert_eq!(flag, 1, "the next KVM_RUN returns at once");
        let err = kick(pid, i32::MAX).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }

    #[test]
    fn the_tsc_deadline_timer_is_offered_when_kvm_emulates_it() {
        use kvm_bindings::kvm_cpuid_entry2;
        let leaf_one = kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        };
        for offered in [false, true] {
            let mut cpuid = CpuId::from_entries(&[leaf_one]).unwrap();
            let topology = Topology {
                cpus: 1,
                max_phys_bits: 46,
                nested: false,
                tsc_deadline_timer: offered,
            };
            patch_cpuid(&mut cpuid, 0, &topology);
            let ecx = cpuid.as_slice()[0].ecx;
            assert_eq!(ecx & (1 << 24) != 0, offered, "{ecx:#x}");
            assert_ne!(ecx & (1 << 31), 0, "the hypervisor bit");
        }
    }

    #[test]
    fn gdt_round_trip_for_64bit_code() {
        let segment = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(segment.selector, 8);
        assert_eq!(segment.l, 1, "long mode");
        assert_eq!(segment.db, 0);
        assert_eq!(segment.type_, 0xb);
        assert_eq!(segment.present, 1);
        assert_eq!(segment.limit, 0xffff_ffff);
        assert_eq!(segment.base, 0);
    }

    #[test]
    fn gdt_round_trip_for_32bit_data() {
        let segment = segment_from_gdt(gdt_entry(0xc093, 0x1234_5678, 0xfffff), 2);
        assert_eq!(segment.base, 0x1234_5678);
        assert_eq!(segment.db, 1);
        assert_eq!(segment.l, 0);
        assert_eq!(segment.type_, 0x3);
        assert_eq!(segment.s, 1);
    }

    #[test]
    fn identity_tables_map_the_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(
            &mem,
            EntryPoint::Linux64 {
                entry: GuestAddress(0x100200),
            },
        )
        .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress(layout::PDE_START + 511 * 8))
            .unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPTE_START | 3);
    }
}
