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
            let text = format!("{e:#}");
            eprintln!("error: {text}");
            if text.contains("h2 protocol error") || text.contains("http2 error") {
                eprintln!(
                    "hint: the node may serve TLS: pass --tls-ca (and --tls-cert/--tls-key if it asks for a client certificate)"
                );
            }
            ExitCode::FAILURE
        }
    }
}
