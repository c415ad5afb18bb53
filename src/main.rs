//! vubd's entry point: parse the command line, start serving, and run the
//! control loop until quit or a signal.

use std::process::ExitCode;
use vubd::cli::{self, Command, Invocation};
use vubd::daemon::process::{daemonize, forward_signals, Pidfile};
use vubd::daemon::{Daemon, StartError};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("VUBD_LOG", "warn")).init();
    match cli::parse_args(std::env::args().skip(1)) {
        Err(e) => {
            eprintln!("vubd: {e}");
            ExitCode::FAILURE
        }
        Ok(Command::Help) => {
            print!("{}", cli::help_text());
            ExitCode::SUCCESS
        }
        Ok(Command::ServeHelp) => {
            print!("{}", cli::serve_help_text());
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("vubd {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Run(inv)) => run(&inv),
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vubd: {msg}");
    ExitCode::FAILURE
}

/// A failed start-up step: the message, then its hint on a line of its
/// own, as qemu-storage-daemon prints them.
fn fail_start(e: &StartError) -> ExitCode {
    match &e.hint {
        Some(hint) => eprintln!("vubd: {e}\n{hint}"),
        None => eprintln!("vubd: {e}"),
    }
    ExitCode::FAILURE
}

fn run(inv: &Invocation) -> ExitCode {
    for w in &inv.warnings {
        log::warn!("{w}");
    }
    // Forking must happen before any thread exists.
    let ready = if inv.daemonize {
        match daemonize() {
            Ok(r) => Some(r),
            Err(e) => return fail(format!("--daemonize: {e}")),
        }
    } else {
        None
    };
    let mut daemon = Daemon::new();
    if let Err(e) = forward_signals(daemon.sender()) {
        return fail(format!("cannot handle signals: {e}"));
    }
    if let Err(e) = daemon.start(inv) {
        daemon.shutdown();
        return fail_start(&e);
    }
    // The pid file appears only once every socket accepts connections, so
    // scripts can wait for it.
    let pidfile = match inv.pidfile.as_deref().map(Pidfile::create).transpose() {
        Ok(p) => p,
        Err(e) => {
            daemon.shutdown();
            return fail(e);
        }
    };
    if let Some(ready) = ready {
        if let Err(e) = ready.ready() {
            log::warn!("--daemonize: {e}");
        }
    }
    log::info!("ready");
    daemon.run();
    daemon.shutdown();
    drop(pidfile);
    ExitCode::SUCCESS
}
