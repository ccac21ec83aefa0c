//! The terminal as the guest's serial line: raw mode while the guest runs, and keystrokes fed
//! to COM1 from a thread of their own.

use std::io::{self, IsTerminal, Read};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread;
use std::time::Duration;

use sandbox::{Filters, ThreadKind};

use crate::error::VmmError;
use crate::legacy::SerialPort;
use crate::threads;

/// The terminal on stdin in raw mode, restored to what it was when dropped.
pub(crate) struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Switches stdin to raw mode; `None` when stdin is not a terminal.
    pub(crate) fn enter() -> Option<Self> {
        if !io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios is plain data, filled in by tcgetattr before any use.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is open and `saved` is a valid termios to fill in.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios; cfmakeraw only edits its flags.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd 0 is open and `raw` is a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: fd 0 is open and `saved` is the termios it had before.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

/// Terminal input for the serial port of whichever VM runs. One thread for the process reads
/// stdin (a read on a terminal cannot be called off, so it outlives each VM) and feeds the
/// port attached last; the port is held weakly, so a VM that ends takes its port with it and
/// input meanwhile is dropped.
#[derive(Clone)]
pub(crate) struct SerialInput {
    port: Arc<Mutex<Weak<Mutex<SerialPort>>>>,
    started: Arc<OnceLock<()>>,
    filters: Option<Arc<Filters>>,
}

impl SerialInput {
    pub(crate) fn new(filters: Option<Arc<Filters>>) -> Self {
        SerialInput {
            port: Arc::new(Mutex::new(Weak::new())),
            started: Arc::new(OnceLock::new()),
            filters,
        }
    }

    /// Sends terminal input to `port` from now on, starting the reading thread the first
    /// time.
    pub(crate) fn attach(&self, port: Arc<Mutex<SerialPort>>) -> Result<(), VmmError> {
        *vm_device::lock(&self.port) = Arc::downgrade(&port);
        if self.started.get().is_some() {
            return Ok(());
        }
        let target = Arc::clone(&self.port);
        threads::spawn(
            "serial-input",
            ThreadKind::SerialInput,
            self.filters.clone(),
            move || {
                let mut buffer = [0u8; 64];
                let mut stdin = io::stdin();
                while let Ok(count) = stdin.read(&mut buffer) {
                    if count == 0 {
                        break;
                    }
                    let port = vm_device::lock(&target).upgrade();
                    if let Some(port) = port {
                        feed_serial(&port, &buffer[..count]);
                    }
                }
            },
        )?;
        let _ = self.started.set(());
        Ok(())
    }
}

pub(crate) fn feed_serial(port: &Mutex<SerialPort>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let taken = vm_device::lock(port).0.enqueue_raw_bytes(bytes);
        match taken {
            Ok(0) => break, // loopback mode: the UART takes no input
            Ok(n) => bytes = &bytes[n..],
            Err(vm_superio::serial::Error::FullFifo) => thread::sleep(Duration::from_millis(1)),
            Err(err) => {
                log::debug!("serial input dropped: {err:?}");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_superio::Serial;

    use super::*;
    use crate::legacy::IrqfdTrigger;

    #[test]
    fn serial_input_longer_than_the_fifo_waits_instead_of_being_dropped() {
        use vm_device::BusDevice;
        let irq = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let port = Arc::new(Mutex::new(SerialPort(Serial::new(
            IrqfdTrigger(irq),
            Box::new(io::sink()),
        ))));
        let input: Vec<u8> = (0..200u8).collect();
        let feeder = {
            let (port, input) = (Arc::clone(&port), input.clone());
            thread::spawn(move || feed_serial(&port, &input))
        };
        // The guest's side: read the data register (offset 0) while the line status register
        // (offset 5) says data is ready (bit 0).
        let mut received = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while received.len() < input.len() && std::time::Instant::now() < deadline {
            let mut port = vm_device::lock(&port);
            let mut status = [0u8];
            port.read(0, 5, &mut status);
            if status[0] & 1 != 0 {
                let mut byte = [0u8];
                port.read(0, 0, &mut byte);
                received.push(byte[0]);
            } else {
                drop(port);
                thread::yield_now();
            }
        }
        feeder.join().unwrap();
        assert_eq!(received, input);
    }
}
