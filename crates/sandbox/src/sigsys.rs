//! The report of a forbidden system call: one line on stderr naming the thread and the call,
//! then the process ends.
//!
//! The handler runs on the offending thread, under its filter, inside a signal: it only reads
//! what was prepared beforehand (the thread's name, the name tables) and makes no system call
//! but `write` and `exit_group`, which every allow-list holds.

use std::cell::Cell;
use std::sync::OnceLock;

use crate::lists::{Syscall, Value};
use crate::ThreadKind;

/// What warden exits with after a forbidden system call: what a shell reports for a process
/// killed by SIGSYS.
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

/// Longest thread name the kernel keeps (`PR_GET_NAME`), with its NUL.
const NAME_LEN: usize = 16;

thread_local! {
    /// This thread's kernel name and kind, recorded when its filter is installed.
    static THREAD: Cell<([u8; NAME_LEN], &'static str)> = const { Cell::new(([0; NAME_LEN], "")) };
}

struct Tables {
    syscalls: Vec<Syscall>,
    ioctls: Vec<Value>,
    prctl_options: Vec<Value>,
    socket_domains: Vec<Value>,
    fcntl_commands: Vec<Value>,
}

static TABLES: OnceLock<Tables> = OnceLock::new();

/// Records the calling thread's name and kind for the report; called before its filter is
/// installed, since `PR_GET_NAME` may not be allowed after.
pub(crate) fn record_thread(kind: ThreadKind) {
    let mut name = [0u8; NAME_LEN];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into `name`, which has 16.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    THREAD.with(|t| t.set((name, kind.name())));
}

/// Installs the handler for the whole process (once), with the names it reports.
pub(crate) fn install_handler() -> std::io::Result<()> {
    TABLES.get_or_init(|| Tables {
        syscalls: crate::lists::named_syscalls().into_iter().collect(),
        ioctls: crate::lists::named_ioctls().into_iter().collect(),
        prctl_options: crate::lists::named_prctl_options().into_iter().collect(),
        socket_domains: crate::lists::named_socket_domains().into_iter().collect(),
        fcntl_commands: crate::lists::named_fcntl_commands().into_iter().collect(),
    });
    // SAFETY: sigaction is plain data, zero is a valid initial value for each field.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handle_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is a valid sigaction whose handler has the SA_SIGINFO signature.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The fields of a SIGSYS siginfo after the common header (`si_signo`, `si_errno`, `si_code`
/// and padding), as `<asm-generic/siginfo.h>` lays out `_sigsys`.
#[repr(C)]
struct SigsysInfo {
    _header: [i32; 4],
    _call_addr: *mut libc::c_void,
    syscall: i32,
    _arch: u32,
}

extern "C" fn handle_sigsys(_signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a SIGSYS siginfo, laid out as SigsysInfo.
    let syscall = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    // SAFETY: with SA_SIGINFO, `context` is the interrupted thread's ucontext.
    let registers = unsafe { &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    // The system call's first two arguments, in the registers of the x86_64 calling convention.
    let args = [
        registers[libc::REG_RDI as usize] as u64,
        registers[libc::REG_RSI as usize] as u64,
    ];
    let mut line = Line::default();
    describe(&mut line, i64::from(syscall), args);
    let text = line.finish();
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid for its length.
    unsafe {
        libc::write(libc::STDERR_FILENO, text.as_ptr().cast(), text.len());
        libc::_exit(EXIT_SECCOMP);
    }
}

/// Formats the report for `syscall` made by the calling thread with `args` (its first two
/// arguments), naming the argument the lists restrict if it is an `ioctl`, a `prctl` or a
/// `socket`.
fn describe(line: &mut Line, syscall: i64, args: [u64; 2]) {
    let (name, kind) = THREAD.with(Cell::get);
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    line.push(b"warden: seccomp: thread ");
    line.push(&name[..name_len]);
    line.push(b" (");
    line.push(kind.as_bytes());
    line.push(b") made system call ");
    let tables = TABLES.get();
    match tables.and_then(|t| t.syscalls.iter().find(|(nr, _)| *nr == syscall)) {
        Some((_, sys_name)) => line.push(sys_name.trim_start_matches("SYS_").as_bytes()),
        None => line.push(b"?"),
    }
    line.push(b" (");
    line.push_decimal(syscall as u64);
    line.push(b")");
    let restricted = match syscall {
        libc::SYS_ioctl => Some((&b" request 0x"[..], args[1], tables.map(|t| &t.ioctls[..]))),
        libc::SYS_prctl => Some((
            &b" option 0x"[..],
            args[0],
            tables.map(|t| &t.prctl_options[..]),
        )),
        libc::SYS_socket => Some((
            &b" domain 0x"[..],
            args[0],
            tables.map(|t| &t.socket_domains[..]),
        )),
        libc::SYS_fcntl => Some((
            &b" command 0x"[..],
            args[1],
            tables.map(|t| &t.fcntl_commands[..]),
        )),
        _ => None,
    };
    if let Some((label, arg, names)) = restricted {
        // The filter compares only the low 32 bits, which is all the kernel reads.
        let value = arg as u32;
        line.push(label);
        line.push_hex(u64::from(value));
        if let Some((_, name)) = names.and_then(|n| n.iter().find(|(v, _)| *v == value)) {
            line.push(b" ");
            line.push(name.as_bytes());
        }
    }
    line.push(b", which its allow-list forbids; exiting (--seccomp log only logs, false disables)");
}

/// A fixed buffer for the report: no allocation in a signal handler.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    /// Appends what fits, keeping room for the newline [`Line::finish`] adds.
    fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - 1 - self.len;
        let take = bytes.len().min(room);
        self.buf[self.len..self.len + take].copy_from_slice(&bytes[..take]);
        self.len += take;
    }

    /// The line, newline-terminated.
    fn finish(&mut self) -> &[u8] {
        self.buf[self.len] = b'\n';
        &self.buf[..=self.len]
    }

    fn push_decimal(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[start..]);
    }

    fn push_hex(&mut self, value: u64) {
        let mut digits = [0u8; 16];
        let mut start = digits.len();
        let mut rest = value;
        loop {
            start -= 1;
            digits[start] = b"0123456789abcdef"[(rest & 0xf) as usize];
            rest >>= 4;
            if rest == 0 {
                break;
            }
        }
        self.push(&digits[start..]);
    }

    #[cfg(test)]
    fn as_str(&mut self) -> &str {
        std::str::from_utf8(self.finish()).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_thread_kind_call_and_ioctl_request() {
        install_handler().unwrap();
        std::thread::Builder::new()
            .name("vcpu7".into())
            .spawn(|| {
                record_thread(ThreadKind::Vcpu);
                let mut line = Line::default();
                describe(&mut line, libc::SYS_connect, [2, 2]);
                assert_eq!(
                    line.as_str(),
                    "warden: seccomp: thread vcpu7 (vcpu) made system call connect (42), which its allow-list forbids; exiting (--seccomp log only logs, false disables)\n"
                );
                let mut line = Line::default();
                describe(&mut line, libc::SYS_socket, [libc::AF_NETLINK as u64, 3]);
                assert!(
                    line.as_str()
                        .contains("made system call socket (41) domain 0x10,"),
                    "{}",
                    line.as_str()
                );
                let mut line = Line::default();
                describe(&mut line, libc::SYS_ioctl, [7, 0xffff_ffff_0000_ae80]);
                assert!(
                    line.as_str()
                        .contains("made system call ioctl (16) request 0xae80 KVM_RUN,"),
                    "{}",
                    line.as_str()
                );
                let mut line = Line::default();
                describe(&mut line, libc::SYS_prctl, [libc::PR_SET_DUMPABLE as u64, 0]);
                assert!(
                    line.as_str()
                        .contains("made system call prctl (157) option 0x4,"),
                    "{}",
                    line.as_str()
                );
                let mut line = Line::default();
                describe(&mut line, 999, [0, 0]);
                assert!(line.as_str().contains("system call ? (999),"), "{}", line.as_str());
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn an_overlong_report_is_cut_but_ends_its_line() {
        let mut line = Line::default();
        line.push(&[b'x'; 300]);
        line.push(b"more");
        let text = line.finish();
        assert_eq!(text.len(), 256);
        assert_eq!(text[254..], *b"x\n");
    }
}
