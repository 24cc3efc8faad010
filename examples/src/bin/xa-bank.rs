//! Moves money between accounts in PostgreSQL and accounts in MariaDB with
//! XA transactions through a Tandem coordinator, some failing on purpose.
//! Checks money per account pair and every transfer's branch rows against
//! the coordinator's outcome. Last stdout line: `{"committed":…,
//! "aborted":…, "sum_before":…, "sum_after":…, "accounts_broken":…,
//! "transfers_broken":…}`; exits non-zero if any invariant is broken.

use clap::Parser;
use tandem_examples::{DEFAULT_MYSQL_URL, DEFAULT_PG_URL, xa_bank};

#[derive(Parser)]
#[command(about = "XA transfers between PostgreSQL and MariaDB through Tandem")]
struct Args {
    /// Any coordinator node, or a comma-separated list.
    #[arg(long, default_value = "127.0.0.1:7070")]
    endpoint: String,
    #[arg(long, default_value_t = 100)]
    transfers: usize,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Share of transfers that fail a prepare on purpose (0 to 1).
    #[arg(long, default_value_t = 0.1)]
    fail_rate: f64,
    #[arg(long, default_value = DEFAULT_PG_URL)]
    pg_url: String,
    #[arg(long, default_value = DEFAULT_MYSQL_URL)]
    mysql_url: String,
    /// Accounts in each database.
    #[arg(long, default_value_t = 100)]
    accounts: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tandem_examples::init_logging();
    let args = Args::parse();
    let report = xa_bank::run(xa_bank::Config {
        endpoints: args.endpoint.split(',').map(str::to_string).collect(),
        transfers: args.transfers,
        concurrency: args.concurrency,
        fail_rate: args.fail_rate,
        pg_url: args.pg_url,
        mysql_url: args.mysql_url,
        accounts: args.accounts,
    })
    .await?;
    println!(
        "prepared xids left: {}; transfers with unknown outcome: {}",
        report.prepared_left, report.unknown
    );
    for broken in report
        .accounts_broken
        .iter()
        .chain(&report.transfers_broken)
    {
        println!("VIOLATION {broken}");
    }
    println!(
        "{}",
        serde_json::json!({
            "committed": report.committed,
            "aborted": report.aborted,
            "sum_before": report.sum_before,
            "sum_after": report.sum_after,
            "accounts_broken": report.accounts_broken.len(),
            "transfers_broken": report.transfers_broken.len(),
        })
    );
    if !report.holds() {
        anyhow::bail!("invariant broken: {report:?}");
    }
    Ok(())
}
