//! Orders through a saga: order → (inventory ‖ payment) → shipping, on
//! PostgreSQL, MariaDB and SQLite; payment declines at --fail-rate.
//! Last stdout line: `{"completed":…, "compensated":…, "violations":…}`.

use clap::Parser;
use tandem_examples::{DEFAULT_MYSQL_URL, DEFAULT_PG_URL, saga_order};

#[derive(Parser)]
#[command(about = "Sagas across PostgreSQL, MariaDB and SQLite through Tandem")]
struct Args {
    /// Any coordinator node, or a comma-separated list.
    #[arg(long, default_value = "127.0.0.1:7070")]
    endpoint: String,
    #[arg(long, default_value_t = 100)]
    orders: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Share of orders whose payment declines (0 to 1).
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
    let report = saga_order::run(saga_order::Config {
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
        anyhow::bail!("{} sagas broke the saga invariant", report.violations);
    }
    Ok(())
}
