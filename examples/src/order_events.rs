//! An order service that writes orders in PostgreSQL and publishes
//! `OrderPlaced` — to NATS JetStream, RabbitMQ and an HTTP webhook — through
//! Tandem's transactional messages and the SDK's outbox: the order row and
//! the message, both or neither.
//!
//! At `--fail-rate`, an order goes wrong on purpose, one of three ways:
//! its business check fails (the local transaction rolls back and the
//! message is aborted); the producer "crashes" right after Prepare (no local
//! commit, no Submit: the check-back must drop it); or it "crashes" after
//! its local commit, before Submit (the check-back must deliver it).
//!
//! Checked after the run, from PostgreSQL and from what the three consumers
//! read back (unique message ids): every committed order was delivered to
//! all three, no rolled-back order to any.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use rand::Rng;
use serde::Serialize;
use tandem_sdk::outbox::{OutboxError, PgOutbox};
use tandem_sdk::participant::BranchError;
use tandem_sdk::{Client, proto as pb};

use crate::services;
use crate::sinks::{JetStreamSink, RabbitSink, WebhookSink};

/// How long a message waits for Submit before its check-back is asked.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the run waits for every message to finish.
const SETTLE: Duration = Duration::from_secs(120);

pub struct Config {
    pub endpoints: Vec<String>,
    pub orders: usize,
    pub concurrency: usize,
    pub fail_rate: f64,
    pub pg_url: String,
    pub nats_url: String,
    pub amqp_url: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Delivered {
    pub nats: u64,
    pub rabbitmq: u64,
    pub http: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub orders_committed: u64,
    pub orders_rolled_back: u64,
    /// Orders whose message Prepare got no answer: the producer gave up
    /// before its local transaction. Had the Prepare landed, the
    /// check-back finds no order and drops the message; a delivery for
    /// one counts in `for_rolled_back`.
    pub not_prepared: u64,
    /// Unique message ids each consumer read.
    pub delivered: Delivered,
    /// Deliveries of orders that are not in the database.
    pub for_rolled_back: u64,
    /// (order, consumer) pairs of committed orders not delivered.
    pub missing: u64,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.for_rolled_back == 0 && self.missing == 0
    }
}

/// What happens to one order.
#[derive(Clone, Copy, Debug)]
enum Fate {
    Placed,
    /// The business check fails: rollback, abort.
    Declined,
    /// Dies after Prepare, before its local commit.
    CrashBeforeCommit,
    /// Dies after its local commit, before Submit.
    CrashBeforeSubmit,
}

const ORDERS_TABLE: &str = "order_events_orders";

fn place(
    gid: &str,
    declined: bool,
) -> impl for<'c> FnOnce(&'c mut sqlx::PgConnection) -> BoxFuture<'c, Result<(), BranchError>>
+ Send
+ 'static {
    let gid = gid.to_string();
    move |conn| {
        Box::pin(async move {
            sqlx::query(&format!(
                "INSERT INTO {ORDERS_TABLE} (gid, item, qty) VALUES ($1, 'book', 1)"
            ))
            .bind(&gid)
            .execute(&mut *conn)
            .await
            .map_err(services::db)?;
            if declined {
                return Err(BranchError::Failure("out of stock".into()));
            }
            Ok(())
        })
    }
}

async fn one(
    client: &Client,
    outbox: &PgOutbox,
    message: tandem_sdk::MessageBuilder,
    fate: Fate,
) -> anyhow::Result<Option<String>> {
    let gid = message.gid_str().to_string();
    match fate {
        Fate::Placed | Fate::Declined => {
            match outbox
                .publish(
                    client,
                    &message,
                    place(&gid, matches!(fate, Fate::Declined)),
                )
                .await
            {
                Ok(_) | Err(OutboxError::RolledBack(_)) => {}
                // Not prepared: nothing ran, nothing to check.
                Err(OutboxError::Prepare(e)) => {
                    tracing::warn!(%gid, error = %e, "not prepared");
                    return Ok(None);
                }
                Err(e @ OutboxError::Unknown(_)) => {
                    tracing::warn!(%gid, error = %e, "the check-back settles it");
                }
            }
        }
        Fate::CrashBeforeCommit | Fate::CrashBeforeSubmit => {
            if let Err(e) = message.prepare().await {
                tracing::warn!(%gid, error = %e, "not prepared");
                return Ok(None);
            }
            if matches!(fate, Fate::CrashBeforeCommit) {
                return Ok(Some(gid));
            }
            match outbox.commit_local(&gid, place(&gid, false)).await {
                Ok(()) => {}
                // The coordinator's check-back came first (this producer
                // was slower than the check-back's delay: a paused node, a
                // loaded machine) and marked the message rolled back, so
                // the order cannot commit any more — an outcome, not an
                // error: the tally below expects no delivery for it.
                Err(OutboxError::RolledBack(e)) => {
                    tracing::warn!(%gid, error = %e, "rolled back: the check-back was first");
                }
                Err(e @ OutboxError::Unknown(_)) => {
                    tracing::warn!(%gid, error = %e, "the check-back settles it");
                }
                Err(e) => return Err(anyhow::anyhow!("{gid}: {e}")),
            }
        }
    }
    Ok(Some(gid))
}

pub async fn run(config: Config) -> anyhow::Result<Report> {
    let client = Client::connect(config.endpoints.iter().map(String::as_str))?;
    let pool = services::postgres(&config.pg_url, config.concurrency as u32 + 4).await?;
    services::pg_ddl(
        &pool,
        &format!(
            "CREATE TABLE IF NOT EXISTS {ORDERS_TABLE} (gid VARCHAR(128) PRIMARY KEY, item TEXT NOT NULL, qty INT NOT NULL)"
        ),
    )
    .await?;
    let outbox = PgOutbox::new(pool.clone()).await?;
    let check_back = services::serve(outbox.clone()).await?;

    let run = uuid::Uuid::new_v4().simple().to_string();
    let hook = WebhookSink::start().await?;
    let nats = JetStreamSink::create(&config.nats_url, &format!("orders_{run}")).await?;
    let rabbit = RabbitSink::create(&config.amqp_url, &format!("orders-{run}")).await?;
    let report = async {
        // In a block of its own: the thread's generator is not `Send`, and
        // must be gone before the first await.
        let plans: Vec<(tandem_sdk::MessageBuilder, Fate)> = {
            let mut rng = rand::rng();
            (0..config.orders)
                .map(|_| {
                    let fate = if rng.random_bool(config.fail_rate.clamp(0.0, 1.0)) {
                        match rng.random_range(0..3) {
                            0 => Fate::Declined,
                            1 => Fate::CrashBeforeCommit,
                            _ => Fate::CrashBeforeSubmit,
                        }
                    } else {
                        Fate::Placed
                    };
                    let event = br#"{"event":"OrderPlaced","item":"book","qty":1}"#.to_vec();
                    let message = client
                        .message(&check_back.base)
                        .timeout(MESSAGE_TIMEOUT)
                        .to_named("nats", &nats.destination("placed"), event.clone())
                        .to_named("rabbitmq", &rabbit.destination(), event.clone())
                        .to_named("http", &hook.url, event);
                    (message, fate)
                })
                .collect()
        };
        let results: Vec<anyhow::Result<Option<String>>> = futures::stream::iter(plans)
            .map(|(message, fate)| {
                let (client, outbox) = (&client, &outbox);
                async move { one(client, outbox, message, fate).await }
            })
            .buffer_unordered(config.concurrency.max(1))
            .collect()
            .await;
        let mut gids = Vec::new();
        for result in results {
            if let Some(gid) = result? {
                gids.push(gid);
            }
        }
        settle(&client, &gids).await?;
        let committed: BTreeSet<String> = sqlx::query_scalar::<_, String>(&format!(
            "SELECT gid FROM {ORDERS_TABLE} WHERE gid = ANY($1)"
        ))
        .bind(&gids)
        .fetch_all(&pool)
        .await?
        .into_iter()
        .collect();
        // Give deliveries decided last a moment to be read back.
        let mut taken = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let report = loop {
            taken.extend(rabbit.drain().await?);
            let sets = [
                (
                    "nats",
                    nats.ids().await?.into_iter().collect::<BTreeSet<_>>(),
                ),
                ("rabbitmq", taken.iter().cloned().collect()),
                ("http", hook.ids().into_iter().collect()),
            ];
            let report = tally(config.orders, &gids, &committed, &sets);
            if report.is_ok() || tokio::time::Instant::now() > deadline {
                break report;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        anyhow::Ok(report)
    }
    .await;
    nats.delete().await;
    rabbit.delete().await;
    report
}

/// Waits until every message is committed (delivered) or aborted (dropped).
async fn settle(client: &Client, gids: &[String]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + SETTLE;
    for gid in gids {
        loop {
            let state = client
                .get(gid)
                .await
                .ok()
                .and_then(|tx| pb::TxState::try_from(tx.state).ok());
            if matches!(state, Some(pb::TxState::Committed | pb::TxState::Aborted)) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("message {gid} still {state:?} after {SETTLE:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Counts from the database's committed orders and each consumer's ids
/// (`{gid}/{consumer}`); `gids` are the prepared of the `orders` placed.
fn tally(
    orders: usize,
    gids: &[String],
    committed: &BTreeSet<String>,
    sets: &[(&str, BTreeSet<String>); 3],
) -> Report {
    let ours: BTreeSet<&str> = gids.iter().map(String::as_str).collect();
    let mut report = Report {
        orders_committed: committed.len() as u64,
        orders_rolled_back: (gids.len() - committed.len()) as u64,
        not_prepared: (orders - gids.len()) as u64,
        ..Report::default()
    };
    for (name, ids) in sets {
        let count = ids.len() as u64;
        match *name {
            "nats" => report.delivered.nats = count,
            "rabbitmq" => report.delivered.rabbitmq = count,
            _ => report.delivered.http = count,
        }
        for id in ids {
            let gid = id.rsplit_once('/').map_or(id.as_str(), |(g, _)| g);
            if !ours.contains(gid) || !committed.contains(gid) {
                report.for_rolled_back += 1;
            }
        }
        report.missing += committed
            .iter()
            .filter(|gid| !ids.contains(&format!("{gid}/{name}")))
            .count() as u64;
    }
    report
}
