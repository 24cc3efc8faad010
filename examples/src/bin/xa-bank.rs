//! Moves money between accounts in PostgreSQL and accounts in MariaDB with
//! XA transactions through a Tandem coordinator, some failing on purpose.
//! Last stdout line: `{"committed":…, "aborted":…, "sum_before":…, "sum_after":…}`.

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
    /// The coordinator cluster's --cluster-name (xids carry it).
    #[arg(long, default_value = "tandem")]
    cluster_name: String,
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
        cluster_name: args.cluster_name,
        accounts: args.accounts,
    })
    .await?;
    println!(
        "prepared xids left: {}; transfers with unknown outcome: {}",
        report.prepared_left, report.unknown
    );
    println!(
        "{}",
        serde_json::json!({
            "committed": report.committed,
            "aborted": report.aborted,
            "sum_before": report.sum_before,
            "sum_after": report.sum_after,
        })
    );
    if report.sum_before != report.sum_after || report.prepared_left > 0 {
        anyhow::bail!("invariant broken: {report:?}");
    }
    Ok(())
}
