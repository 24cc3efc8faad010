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

/// Turns transparent huge pages off for this process (Linux), before the
/// node has allocated much. mimalloc asks for huge pages on its arenas
/// (`madvise`), and each first touch of one zeroes 2 MiB: memory the
/// allocator purges and takes back is zeroed again, 2 MiB at a time, on
/// whichever thread touches it. A follower spent ~5 % of its CPU there,
/// and with them off a 3-node cluster's p99 at 5,500 sagas/s (open loop)
/// fell from 27–44 ms to 12–17 ms, throughput and memory unchanged
/// (BENCHMARKS.md, fifteenth session). It is what `MIMALLOC_ALLOW_THP=0`
/// does.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a plain system call with integer arguments; it sets a
        // flag on this process's memory map (kept across fork and exec).
        // A kernel that refuses it only leaves huge pages on: no error.
        let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
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
