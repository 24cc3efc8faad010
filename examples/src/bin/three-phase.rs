//! Orders through 3PC: stock in PostgreSQL, payment in MariaDB; one of the
//! two declines an order at --fail-rate. Last stdout line:
//! `{"committed":…, "aborted":…, "violations":…}` (violations: orders whose
//! two databases disagree, or totals that do not add up); exit non-zero on
//! any violation.

use clap::Parser;
use tandem_examples::{DEFAULT_MYSQL_URL, DEFAULT_PG_URL, three_phase};

#[derive(Parser)]
#[command(about = "3PC orders across PostgreSQL and MariaDB through Tandem")]
struct Args {
    /// Any coordinator node, or a comma-separated list.
    #[arg(long, default_value = "127.0.0.1:7070")]
    endpoint: String,
    #[arg(long, default_value_t = 100)]
    orders: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Share of orders one service votes no on (0 to 1).
    #[arg(long, default_value_t = 0.2)]
    fail_rate: f64,
    #[arg(long, default_value = DEFAULT_PG_URL)]
    pg_url: String,
    #[arg(long, default_value = DEFAULT_MYSQL_URL)]
    mysql_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tandem_examples::init_logging();
    let args = Args::parse();
    let report = three_phase::run(three_phase::Config {
        endpoints: args.endpoint.split(',').map(str::to_string).collect(),
        orders: args.orders,
        concurrency: args.concurrency,
        fail_rate: args.fail_rate,
        pg_url: args.pg_url,
        mysql_url: args.mysql_url,
    })
    .await?;
    println!("{}", serde_json::to_string(&report)?);
    if report.violations > 0 {
        anyhow::bail!("{} orders broke 3PC's atomicity", report.violations);
    }
    Ok(())
}
