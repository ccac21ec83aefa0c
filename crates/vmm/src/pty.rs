//! Pseudo-terminals for a serial port or console in `Pty` mode, as Cloud Hypervisor makes them
//! for libvirt: warden holds the master side; the path of the other side goes into the VM's
//! configuration (`vm.info`'s `serial.file` / `console.file`) for a client such as
//! `virsh console` to open. A pty lives as long as the configuration (through `vm.shutdown`,
//! `vm.boot` and reboots, so a client's path stays valid) and ends with `vm.delete`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use sandbox::{Filters, ThreadKind};
use vm_config::{ConsoleMode, VmConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::error::VmmError;
use crate::legacy::SerialPort;
use crate::terminal::feed_serial;
use crate::threads;

/// One pseudo-terminal.
pub(crate) struct Pty {
    /// Non-blocking: a guest must never wait for a client that reads slowly or not at all.
    master: File,
    /// Held open, so that the master neither reports a hang-up while no client is attached
    /// nor throws away what the guest wrote meanwhile (the client reads it when it comes).
    _peer: File,
    path: PathBuf,
}

impl Pty {
    pub(crate) fn open() -> io::Result<Pty> {
        let master = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open("/dev/ptmx")?;
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads an int, which `unlock` is, on the master just opened.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut number: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes an unsigned int, which `number` is.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut number) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/pts/{number}"));
        let peer = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)?;
        make_raw(&peer)?;
        Ok(Pty {
            master,
            _peer: peer,
            path,
        })
    }

    /// Where a client opens it.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// What the guest writes, for the client; dropped, as on a serial line nobody listens to,
    /// when the pty's buffer is full.
    pub(crate) fn output(&self) -> io::Result<Box<dyn Write + Send>> {
        Ok(Box::new(PtyOutput(self.master.try_clone()?)))
    }

    /// What the client types, for a device that watches it (the virtio-console).
    pub(crate) fn input(&self) -> io::Result<OwnedFd> {
        self.master.as_fd().try_clone_to_owned()
    }
}

/// `cfmakeraw` on the client's side: bytes pass as they are, both ways.
fn make_raw(peer: &File) -> io::Result<()> {
    // SAFETY: termios is plain data, filled in by tcgetattr before any use.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open and `termios` a valid termios to fill in.
    if unsafe { libc::tcgetattr(peer.as_raw_fd(), &mut termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `termios` is valid; cfmakeraw only edits its flags.
    unsafe { libc::cfmakeraw(&mut termios) };
    // SAFETY: the fd is open and `termios` a valid termios.
    if unsafe { libc::tcsetattr(peer.as_raw_fd(), libc::TCSANOW, &termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct PtyOutput(File);

impl Write for PtyOutput {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self.0.write(bytes) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(bytes.len()),
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The configuration's pseudo-terminals, and the thread that feeds what the serial one's
/// client types to the serial port of whichever VM runs (held weakly, as terminal input is).
#[derive(Default)]
pub(crate) struct Ptys {
    serial: Option<SerialPty>,
    console: Option<Pty>,
}

struct SerialPty {
    pty: Pty,
    port: Arc<Mutex<Weak<Mutex<SerialPort>>>>,
    stop: Arc<EventFd>,
}

impl Drop for SerialPty {
    fn drop(&mut self) {
        // Its thread sees this, or the master's end, and returns.
        let _ = self.stop.write(1);
    }
}

impl Ptys {
    /// Opens a pty for each device of `config` in `Pty` mode and writes its path there.
    pub(crate) fn open(
        config: &mut VmConfig,
        filters: Option<Arc<Filters>>,
    ) -> Result<Ptys, VmmError> {
        let opened = |what: &str| {
            Pty::open().map_err(|source| VmmError::Io {
                what: format!("{what}: cannot open a pseudo-terminal"),
                source,
            })
        };
        let mut ptys = Ptys::default();
        if config.serial.mode == ConsoleMode::Pty {
            let pty = opened("serial")?;
            config.serial.file = Some(pty.path().to_owned());
            ptys.serial = Some(SerialPty::start(pty, filters)?);
        }
        if config.console.mode == ConsoleMode::Pty {
            let pty = opened("console")?;
            config.console.file = Some(pty.path().to_owned());
            ptys.console = Some(pty);
        }
        Ok(ptys)
    }

    pub(crate) fn serial(&self) -> Option<&Pty> {
        self.serial.as_ref().map(|serial| &serial.pty)
    }

    pub(crate) fn console(&self) -> Option<&Pty> {
        self.console.as_ref()
    }

    /// Sends what the serial pty's client types to `port` from now on.
    pub(crate) fn attach_serial(&self, port: &Arc<Mutex<SerialPort>>) {
        if let Some(serial) = &self.serial {
            *vm_device::lock(&serial.port) = Arc::downgrade(port);
        }
    }
}

impl SerialPty {
    fn start(pty: Pty, filters: Option<Arc<Filters>>) -> Result<SerialPty, VmmError> {
        let io_error = |what: &str| {
            let what = what.to_string();
            move |source| VmmError::Io { what, source }
        };
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(io_error("serial pty"))?);
        let port: Arc<Mutex<Weak<Mutex<SerialPort>>>> = Arc::default();
        let master = pty.master.try_clone().map_err(io_error("serial pty"))?;
        let (target, stopped) = (Arc::clone(&port), Arc::clone(&stop));
        threads::spawn("serial-pty", ThreadKind::SerialInput, filters, move || {
            feed_from(master, &stopped, &target)
        })?;
        Ok(SerialPty { pty, port, stop })
    }
}

/// Reads the master until `stop` is signalled, feeding the port attached last.
fn feed_from(mut master: File, stop: &EventFd, port: &Mutex<Weak<Mutex<SerialPort>>>) {
    let mut buffer = [0u8; 64];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is an array of two pollfds, alive for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 || fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return;
        }
        match master.read(&mut buffer) {
            Ok(0) => return,
            Ok(count) => {
                let target = vm_device::lock(port).upgrade();
                if let Some(target) = target {
                    feed_serial(&target, &buffer[..count]);
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_guest_writes_reaches_the_client_and_what_it_types_comes_back() {
        let pty = Pty::open().expect("a pty");
        let mut client = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(pty.path())
            .expect("the client's side");
        let mut output = pty.output().unwrap();
        output.write_all(b"guest says\r\n").unwrap();
        let mut read = [0u8; 12];
        client.read_exact(&mut read).unwrap();
        assert_eq!(&read, b"guest says\r\n", "raw: no translation");
        client.write_all(b"typed").unwrap();
        let mut input = File::from(pty.input().unwrap());
        let mut typed = [0u8; 5];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut got = 0;
        while got < typed.len() && std::time::Instant::now() < deadline {
            match input.read(&mut typed[got..]) {
                Ok(n) => got += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(err) => panic!("{err}"),
            }
        }
        assert_eq!(&typed, b"typed");
    }

    #[test]
    fn a_guest_nobody_listens_to_never_blocks() {
        let pty = Pty::open().expect("a pty");
        let mut output = pty.output().unwrap();
        // Far more than a pty buffers: with a blocking master this would never return.
        for _ in 0..4096 {
            output.write_all(&[b'x'; 1024]).unwrap();
        }
    }

    #[test]
    fn the_configuration_names_each_pty() {
        let mut config = VmConfig::default();
        config.serial.mode = ConsoleMode::Pty;
        config.console.mode = ConsoleMode::Pty;
        let ptys = Ptys::open(&mut config, None).unwrap();
        let serial = config.serial.file.clone().unwrap();
        let console = config.console.file.clone().unwrap();
        assert_ne!(serial, console);
        assert_eq!(ptys.serial().unwrap().path(), serial);
        assert_eq!(ptys.console().unwrap().path(), console);
        assert!(serial.starts_with("/dev/pts"));
    }
}
