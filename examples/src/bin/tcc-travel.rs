//! Travel bookings through TCC: flight (PostgreSQL), hotel (MariaDB) and
//! payment (SQLite); payment declines at --fail-rate.
//! Last stdout line: `{"confirmed":…, "cancelled":…, "violations":…}`.

use clap::Parser;
use tandem_examples::{DEFAULT_MYSQL_URL, DEFAULT_PG_URL, tcc_travel};

#[derive(Parser)]
#[command(about = "TCC bookings across PostgreSQL, MariaDB and SQLite through Tandem")]
struct Args {
    /// Any coordinator node, or a comma-separated list.
    #[arg(long, default_value = "127.0.0.1:7070")]
    endpoint: String,
    #[arg(long, default_value_t = 100)]
    bookings: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Share of bookings whose payment declines (0 to 1).
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
    let report = tcc_travel::run(tcc_travel::Config {
        endpoints: args.endpoint.split(',').map(str::to_string).collect(),
        bookings: args.bookings,
        concurrency: args.concurrency,
        fail_rate: args.fail_rate,
        pg_url: args.pg_url,
        mysql_url: args.mysql_url,
    })
    .await?;
    println!("{}", serde_json::to_string(&report)?);
    if report.violations > 0 {
        anyhow::bail!("{} bookings broke the TCC invariant", report.violations);
    }
    Ok(())
}
