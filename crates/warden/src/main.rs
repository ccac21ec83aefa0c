//! `warden`: parse the command line, run the VMM (and the VM the command line describes, if
//! any), and exit with how it ended.

mod cli;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use vmm::VmmExit;

/// Exit code for a wrong command line, a missing file or a host set up wrongly for the request.
const EXIT_USAGE: u8 = 2;
/// Exit code when the guest did not power off cleanly, or the VMM failed while running.
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let rendered = err.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid command line");
            eprintln!(
                "warden: {}; see warden --help",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if cli.version {
        println!("{}", cli::version_line());
        return ExitCode::SUCCESS;
    }
    if let Err(err) = init_logging(cli.log_level(), cli.log_file.as_deref()) {
        eprintln!("warden: --log-file: {err}");
        return ExitCode::from(EXIT_USAGE);
    }
    let (config, options) = match cli.into_config() {
        Ok(parsed) => parsed,
        Err(err) => {
            eprintln!("warden: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match vmm::run(config, &options) {
        Ok(VmmExit::Poweroff) => ExitCode::SUCCESS,
        Ok(VmmExit::ApiShutdown) => {
            eprintln!("warden: shut down through the API (vmm.shutdown)");
            ExitCode::SUCCESS
        }
        Ok(VmmExit::Signal(signal)) => {
            eprintln!("warden: stopped by signal {signal}");
            ExitCode::SUCCESS
        }
        Ok(VmmExit::Reset(why)) => {
            eprintln!("warden: the guest asked for a reset ({why}): it rebooted or panicked; --no-reboot ends warden instead of booting it again");
            ExitCode::from(EXIT_FAILURE)
        }
        Ok(VmmExit::Crash(why)) => {
            eprintln!("warden: the guest stopped abnormally: {why}");
            ExitCode::from(EXIT_FAILURE)
        }
        Err(err) => {
            eprintln!("warden: {err}");
            ExitCode::from(if err.is_user_error() {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            })
        }
    }
}

/// Crates whose warnings and errors a guest can trigger at will but whose call sites are not
/// warden's (virtio-queue logs each bad ring access): they get the same per-call-site budget
/// as warden's own `warn_limited!`.
const LIMITED_CRATES: &[&str] = &["virtio_queue"];

/// The log at `level` (or `RUST_LOG`'s, else warnings), on stderr or in `file`.
fn init_logging(level: Option<log::LevelFilter>, file: Option<&Path>) -> std::io::Result<()> {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    if let Some(level) = level {
        builder.filter_level(level);
    }
    if let Some(path) = file {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        builder.target(env_logger::Target::Pipe(Box::new(file)));
    }
    let logger = builder.build();
    let max_level = logger.filter();
    let limited = vm_device::log_limit::Limited::new(logger, LIMITED_CRATES);
    if log::set_boxed_logger(Box::new(limited)).is_ok() {
        log::set_max_level(max_level);
    }
    Ok(())
}
