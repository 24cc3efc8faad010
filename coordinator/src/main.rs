//! The `tandem` binary: runs a coordinator node (`serve`) and talks to a
//! cluster (`cluster`, `tx`, `bench`).

mod cli;

/// The node allocates per request and per log entry; glibc's malloc showed
/// as a quarter of its CPU under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;

use cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, cli::Command::Serve(_)) {
        // A command whose reader went away (`tandem tx list | head`) ends
        // quietly, as Unix tools do, instead of failing to print. The node
        // (`serve`) keeps Rust's default: a write to a closed socket is an
        // error it handles, not a signal that ends it.
        // SAFETY: at the start of main, before any thread exists; resetting
        // a signal to its default action installs no handler code.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
