//! Runs the deterministic simulation over many seeds, or replays one.
//!
//!     tandem-sim --seeds 1000 [--start 0]
//!     tandem-sim --seed 42 [--verbose] [--skip-faults 0,3]
//!
//! Prints a line per failing seed with the command that replays it, then
//! shrinks the first failing seed's fault schedule (the scheduled faults it
//! can do without) and prints the command that replays the smaller run, and
//! last one JSON line: `{"seeds":N,"failed":M,"first_failure":S|null}`.

use clap::Parser;
use tandem_coordinator::sim::{self, Options};

/// As the node's binary: each seed builds and drops a cluster, and glibc's
/// malloc spent a quarter of the run in the kernel giving memory back.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Deterministic simulation of a Tandem cluster under faults")]
struct Args {
    /// How many seeds to run, from --start.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Run just this seed (a replay).
    #[arg(long)]
    seed: Option<u64>,
    /// Print each seed's report and faults.
    #[arg(long)]
    verbose: bool,
    /// Run without faults.
    #[arg(long)]
    no_faults: bool,
    /// Leave out these scheduled faults (their `#N` in the fault list), as
    /// a shrunk replay does.
    #[arg(long, value_delimiter = ',')]
    skip_faults: Vec<usize>,
    /// Do not shrink the first failing seed.
    #[arg(long)]
    no_shrink: bool,
}

fn main() {
    let args = Args::parse();
    let opts = Options {
        faults: !args.no_faults,
        skip_faults: args.skip_faults.iter().copied().collect(),
        ..Options::default()
    };
    let replay = |seed: u64, opts: &Options| {
        let mut command = format!("bash scripts/simulate.sh --seed {seed}");
        if !opts.faults {
            command += " --no-faults";
        }
        if !opts.skip_faults.is_empty() {
            let skipped: Vec<String> = opts.skip_faults.iter().map(usize::to_string).collect();
            command += &format!(" --skip-faults {}", skipped.join(","));
        }
        command
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.start..args.start + args.seeds).collect(),
    };
    let mut failed = 0u64;
    let mut first_failure: Option<u64> = None;
    for &seed in &seeds {
        let report = sim::run(seed, &opts);
        if args.verbose || args.seed.is_some() {
            eprintln!(
                "seed {seed}: {} transactions ({} committed, {} aborted), {} leaders, {} reads, {} snapshots installed, {} snapshot writes failed, {} membership changes (members {:?}), {} leaders removed under their feet, {} crashes mid-write, {} unsynced writes lost, {} events, {} ms simulated, trace {:016x}",
                report.txs,
                report.committed,
                report.aborted,
                report.leaders,
                report.reads,
                report.snapshots_installed,
                report.snapshots_failed,
                report.membership_changes,
                report.members,
                report.removed_leaders,
                report.torn_writes,
                report.unsynced_lost,
                report.events,
                report.sim_ms,
                report.trace
            );
            for f in &report.faults {
                eprintln!("  fault: {f}");
            }
        }
        if !report.violations.is_empty() {
            failed += 1;
            first_failure.get_or_insert(seed);
            for v in report.violations.iter().take(10) {
                println!("seed {seed}: {v}");
            }
            println!("replay: {}", replay(seed, &opts));
        }
    }
    if let Some(seed) = first_failure.filter(|_| !args.no_shrink)
        && let Some((shrunk, report)) = sim::shrink(seed, &opts)
    {
        println!(
            "shrunk seed {seed}: {} of its {} scheduled faults still fail it ({})",
            report.faults_kept(),
            report.faults_scheduled,
            report.violations.first().map_or("", String::as_str)
        );
        for f in &report.faults {
            println!("  fault: {f}");
        }
        println!("replay: {}", replay(seed, &shrunk));
    }
    println!(
        "{}",
        serde_json::json!({
            "seeds": seeds.len(),
            "failed": failed,
            "first_failure": first_failure,
        })
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
