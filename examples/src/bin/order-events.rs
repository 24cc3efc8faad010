//! Orders in PostgreSQL, `OrderPlaced` to NATS JetStream, RabbitMQ and an
//! HTTP webhook through Tandem's transactional messages; some orders fail
//! or "crash" on purpose at --fail-rate. Last stdout line:
//! `{"orders_committed":…, "orders_rolled_back":…, "not_prepared":…, "delivered":{"nats":…,
//! "rabbitmq":…, "http":…}, "for_rolled_back":…, "missing":…}` (unique
//! message ids); exit non-zero unless for_rolled_back and missing are 0.

use clap::Parser;
use tandem_examples::sinks::{DEFAULT_AMQP_URL, DEFAULT_NATS_URL};
use tandem_examples::{DEFAULT_PG_URL, order_events};

#[derive(Parser)]
#[command(about = "Orders and their events, both or neither, through Tandem")]
struct Args {
    /// Any coordinator node, or a comma-separated list.
    #[arg(long, default_value = "127.0.0.1:7070")]
    endpoint: String,
    #[arg(long, default_value_t = 100)]
    orders: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Share of orders that fail or crash on purpose (0 to 1).
    #[arg(long, default_value_t = 0.2)]
    fail_rate: f64,
    #[arg(long, default_value = DEFAULT_PG_URL)]
    pg_url: String,
    /// The NATS server the consumer reads (the coordinator publishes to its
    /// own --nats-url).
    #[arg(long, default_value = DEFAULT_NATS_URL)]
    nats_url: String,
    /// The RabbitMQ the consumer reads (the coordinator publishes to its
    /// own --amqp-url).
    #[arg(long, default_value = DEFAULT_AMQP_URL)]
    amqp_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tandem_examples::init_logging();
    let args = Args::parse();
    let report = order_events::run(order_events::Config {
        endpoints: args.endpoint.split(',').map(str::to_string).collect(),
        orders: args.orders,
        concurrency: args.concurrency,
        fail_rate: args.fail_rate,
        pg_url: args.pg_url,
        nats_url: args.nats_url,
        amqp_url: args.amqp_url,
    })
    .await?;
    println!("{}", serde_json::to_string(&report)?);
    if !report.is_ok() {
        anyhow::bail!(
            "{} deliveries of rolled-back orders, {} deliveries missing",
            report.for_rolled_back,
            report.missing
        );
    }
    Ok(())
}
