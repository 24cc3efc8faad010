//! The smallest tour of a running coordinator: begin a transaction of each
//! protocol, read one back, abort them, list. Last stdout line: a JSON
//! summary.

use clap::Parser;
use tandem_examples::quickstart;

#[derive(Parser)]
struct Args {
    /// Any node of the cluster, or a comma-separated list.
    #[arg(long, default_value = "127.0.0.1:7070")]
    endpoint: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tandem_examples::init_logging();
    let args = Args::parse();
    let endpoints: Vec<String> = args.endpoint.split(',').map(str::to_string).collect();
    let report = quickstart::run(&endpoints, |line| println!("{line}")).await?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
