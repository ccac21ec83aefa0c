//! The few PC legacy devices a Linux guest expects: COM1, the CMOS clock, the i8042 reset line,
//! the ACPI sleep registers that turn `poweroff` into an exit, and the event register of the
//! power button the VMM presses.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use vm_device::BusDevice;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::events::{ExitNotice, GuestExit};
use crate::layout;

/// Raises the serial line's interrupt by writing its irqfd.
pub struct IrqfdTrigger(pub EventFd);

impl Trigger for IrqfdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The 16550A UART on COM1, from `vm-superio`, as a port-bus device.
pub struct SerialPort(pub Serial<IrqfdTrigger, NoEvents, Box<dyn Write + Send>>);

impl BusDevice for SerialPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if let (Some(byte), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *byte = self.0.read(offset);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(&byte), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(err) = self.0.write(offset, byte) {
                log::debug!("serial write: {err:?}");
            }
        }
    }
}

/// The CMOS real-time clock at ports 0x70/0x71, read-only wall-clock time in BCD.
///
/// Without it Linux waits for an RTC at boot and starts with the epoch as its date.
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Cmos {
            index: 0,
            nvram: [0; 128],
        }
    }
}

impl Cmos {
    fn register(&self, index: u8) -> u8 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (year, month, day) = civil_from_days((now / 86_400) as i64);
        let seconds_of_day = now % 86_400;
        let bcd = |v: u64| (((v / 10) << 4) | (v % 10)) as u8;
        match index {
            0x00 => bcd(seconds_of_day % 60),
            0x02 => bcd(seconds_of_day / 60 % 60),
            0x04 => bcd(seconds_of_day / 3600),
            0x06 => bcd(((now / 86_400 + 4) % 7) + 1),
            0x07 => bcd(day),
            0x08 => bcd(month),
            0x09 => bcd(year % 100),
            0x32 => bcd(year / 100),
            // Status A: no update in progress. B: 24-hour mode, BCD. D: battery good.
            0x0a => 0x26,
            0x0b => 0x02,
            0x0c => 0x00,
            0x0d => 0x80,
            _ => self.nvram[usize::from(index & 0x7f)],
        }
    }
}

/// Converts days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year as u64, month as u64, day as u64)
}

impl BusDevice for Cmos {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let Some(byte) = data.first_mut() else { return };
        *byte = match offset {
            0 => self.index,
            _ => self.register(self.index),
        };
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask; it has no effect here.
            0 => self.index = byte & 0x7f,
            _ => self.nvram[usize::from(self.index)] = byte,
        }
    }
}

/// Just enough of the i8042 controller for its CPU-reset command, which Linux uses to reboot.
pub struct I8042 {
    exits: ExitNotice,
}

impl I8042 {
    pub fn new(exits: ExitNotice) -> Self {
        I8042 { exits }
    }
}

const I8042_COMMAND_OFFSET: u64 = 4;
const I8042_RESET_CPU: u8 = 0xfe;

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing pending.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND_OFFSET && data.first() == Some(&I8042_RESET_CPU) {
            self.exits.send(GuestExit::Reset("i8042 reset"));
        }
    }
}

/// The FADT's reset register: the guest writes [`layout::ACPI_RESET_VALUE`] to reboot.
pub struct AcpiReset {
    exits: ExitNotice,
}

impl AcpiReset {
    pub fn new(exits: ExitNotice) -> Self {
        AcpiReset { exits }
    }
}

impl BusDevice for AcpiReset {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        if data.first() == Some(&layout::ACPI_RESET_VALUE) {
            self.exits.send(GuestExit::Reset("ACPI reset"));
        }
    }
}

/// The ACPI hardware-reduced sleep control register (and its status register right after it).
///
/// The DSDT's `_S5_` package gives [`acpi::SLEEP_TYPE_S5`]; Linux powers off by writing
/// `SLP_TYP << 2 | SLP_EN` to the control register.
pub struct AcpiSleep {
    exits: ExitNotice,
}

impl AcpiSleep {
    pub fn new(exits: ExitNotice) -> Self {
        AcpiSleep { exits }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Status: never asleep, never woken.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if offset == 0 && acpi::requested_sleep_type(value) == Some(acpi::SLEEP_TYPE_S5) {
            self.exits.send(GuestExit::Poweroff);
        }
    }
}

/// The Generic Event Device's event register (see [`acpi::GenericEvents`]): the guest's
/// `_EVT` reads the pending events, which clears them.
pub struct GenericEvents<T: Trigger> {
    pending: u8,
    interrupt: T,
}

impl<T: Trigger> GenericEvents<T> {
    pub fn new(interrupt: T) -> Self {
        GenericEvents {
            pending: 0,
            interrupt,
        }
    }

    /// Marks `events` (`acpi::GED_*` bits) pending and raises the interrupt.
    pub fn raise(&mut self, events: u8) -> Result<(), T::E> {
        self.pending |= events;
        self.interrupt.trigger()
    }
}

impl<T: Trigger + Send> BusDevice for GenericEvents<T> {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(byte) = data.first_mut() {
            *byte = std::mem::take(&mut self.pending);
        }
    }

    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

/// Presses the guest's power button: an event for the guest's ACPI to hand to its OS, which
/// then shuts down as it sees fit (Linux's `button` driver reports KEY_POWER).
pub struct PowerButton<T: Trigger>(pub Arc<Mutex<GenericEvents<T>>>);

impl<T: Trigger> PowerButton<T> {
    pub fn press(&self) -> Result<(), T::E> {
        vm_device::lock(&self.0).raise(acpi::GED_POWER_BUTTON)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::testing::notice;

    #[test]
    fn a_press_raises_the_interrupt_and_reading_the_register_clears_it() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let events = Arc::new(Mutex::new(GenericEvents::new(IrqfdTrigger(
            irq.try_clone().unwrap(),
        ))));
        let button = PowerButton(Arc::clone(&events));
        let mut byte = [0xffu8];
        vm_device::lock(&events).read(0, 0, &mut byte);
        assert_eq!(byte[0], 0, "nothing pending");
        assert!(irq.read().is_err(), "no interrupt yet");
        button.press().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        vm_device::lock(&events).read(0, 0, &mut byte);
        assert_eq!(byte[0], acpi::GED_POWER_BUTTON);
        vm_device::lock(&events).read(0, 0, &mut byte);
        assert_eq!(byte[0], 0, "read once");
    }

    const SLP_EN: u8 = 1 << 5;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_417), (2025, 11, 25));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn cmos_reports_bcd_time_and_keeps_nvram() {
        let mut cmos = Cmos::default();
        let mut byte = [0u8];
        cmos.write(0x70, 0, &[0x0b]);
        cmos.read(0x70, 1, &mut byte);
        assert_eq!(byte[0], 0x02, "24-hour BCD mode");
        cmos.write(0x70, 0, &[0x80 | 0x09]);
        cmos.read(0x70, 1, &mut byte);
        assert!(
            byte[0] >> 4 <= 9 && byte[0] & 0xf <= 9,
            "year is BCD: {:#x}",
            byte[0]
        );
        cmos.write(0x70, 0, &[0x40]);
        cmos.write(0x70, 1, &[0xab]);
        cmos.read(0x70, 1, &mut byte);
        assert_eq!(byte[0], 0xab);
    }

    #[test]
    fn s5_write_powers_off_and_other_states_do_not() {
        let (tx, next) = notice();
        let mut sleep = AcpiSleep::new(tx);
        sleep.write(0, 0, &[(3 << 2) | SLP_EN]);
        sleep.write(0, 0, &[acpi::SLEEP_TYPE_S5 << 2]);
        assert_eq!(next(), None);
        sleep.write(0, 0, &[(acpi::SLEEP_TYPE_S5 << 2) | SLP_EN]);
        assert_eq!(next(), Some(GuestExit::Poweroff));
    }

    #[test]
    fn acpi_reset_value_resets() {
        let (tx, next) = notice();
        let mut reset = AcpiReset::new(tx);
        reset.write(0x3c2, 0, &[0x01]);
        assert_eq!(next(), None);
        reset.write(0x3c2, 0, &[layout::ACPI_RESET_VALUE]);
        assert_eq!(next(), Some(GuestExit::Reset("ACPI reset")));
    }

    #[test]
    fn i8042_reset_command_resets() {
        let (tx, next) = notice();
        let mut i8042 = I8042::new(tx);
        i8042.write(0x60, 0, &[I8042_RESET_CPU]);
        assert_eq!(next(), None);
        i8042.write(0x60, 4, &[I8042_RESET_CPU]);
        assert!(matches!(next(), Some(GuestExit::Reset(_))));
    }
}
