//! A saga over four services on three databases:
//!
//! ```text
//! order (PostgreSQL) → inventory (MariaDB) ┐
//!                    → payment (SQLite)     ┘→ shipping (PostgreSQL)
//! ```
//!
//! Payment declines at the requested rate; the saga then compensates what
//! ran, in reverse order. Every service writes through the barrier, so
//! repeated, late or out-of-order calls take effect once.
//!
//! Violations are counted from the databases, not from the coordinator: a
//! completed saga must have its order placed, stock reserved, payment
//! charged and shipment made; a compensated one none of them left standing;
//! and the stock must add up.

use std::time::Duration;

use anyhow::bail;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tandem_sdk::barrier::{MySqlBarrier, PgBarrier, SqliteBarrier};
use tandem_sdk::participant::{BranchContext, BranchError, Saga, SagaStep};
use tandem_sdk::{Client, Step, proto as pb};

use crate::services::{self, db, payload};

const INITIAL_STOCK: i64 = 1_000_000;

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Vec<String>,
    pub orders: usize,
    pub concurrency: usize,
    /// Share of orders whose payment declines.
    pub fail_rate: f64,
    pub pg_url: String,
    pub mysql_url: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub completed: u64,
    pub compensated: u64,
    /// Submissions that never took effect (their answer lost, and the
    /// coordinator has no such saga): checked to have left nothing behind.
    pub not_submitted: u64,
    pub violations: u64,
}

/// What every step receives.
#[derive(Serialize, Deserialize)]
struct Order {
    run: String,
    qty: i64,
    amount: i64,
    decline: bool,
}

#[derive(Clone)]
struct Orders(PgBarrier);

impl SagaStep for Orders {
    async fn action(&self, ctx: &BranchContext, p: &[u8]) -> Result<(), BranchError> {
        let o: Order = payload(p)?;
        let gid = ctx.gid.clone();
        self.0
            .call(ctx, move |c| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO saga_orders (run, gid, status) VALUES ($1, $2, 'placed')",
                    )
                    .bind(o.run)
                    .bind(gid)
                    .execute(&mut *c)
                    .await
                    .map_err(db)?;
                    Ok(())
                })
            })
            .await
    }

    async fn compensate(&self, ctx: &BranchContext, p: &[u8]) -> Result<(), BranchError> {
        let o: Order = payload(p)?;
        let gid = ctx.gid.clone();
        self.0
            .call(ctx, move |c| {
                Box::pin(async move {
                    sqlx::query(
                        "UPDATE saga_orders SET status = 'cancelled' WHERE run = $1 AND gid = $2",
                    )
                    .bind(o.run)
                    .bind(gid)
                    .execute(&mut *c)
                    .await
                    .map_err(db)?;
                    Ok(())
                })
            })
            .await
    }
}

#[derive(Clone)]
struct Inventory(MySqlBarrier);

impl SagaStep for Inventory {
    async fn action(&self, ctx: &BranchContext, p: &[u8]) -> Result<(), BranchError> {
        let o: Order = payload(p)?;
        let gid = ctx.gid.clone();
        self.0
            .call(ctx, move |c| {
                Box::pin(async move {
                    let taken = sqlx::query("UPDATE saga_stock SET stock = stock - ? WHERE run = ? AND stock >= ?")
                        .bind(o.qty)
                        .bind(&o.run)
                        .bind(o.qty)
                        .execute(&mut *c)
                        .await
                        .map_err(db)?;
                    if taken.rows_affected() == 0 {
                        return Err(BranchError::Failure("out of stock".into()));
                    }
                    sqlx::query("INSERT INTO saga_reservations (run, gid, qty, released) VALUES (?, ?, ?, 0)")
                        .bind(&o.run)
                        .bind(gid)
                        .bind(o.qty)
                        .execute(&mut *c)
                        .await
                        .map_err(db)?;
                    Ok(())
                })
            })
            .await
    }

    async fn compensate(&self, ctx: &BranchContext, p: &[u8]) -> Result<(), BranchError> {
        let o: Order = payload(p)?;
        let gid = ctx.gid.clone();
        self.0
            .call(ctx, move |c| {
                Box::pin(async move {
                    let released = sqlx::query(
                        "UPDATE saga_reservations SET released = 1 WHERE run = ? AND gid = ? AND released = 0",
                    )
                    .bind(&o.run)
                    .bind(gid)
                    .execute(&mut *c)
                    .await
                    .map_err(db)?;
                    if released.rows_affected() == 1 {
                        sqlx::query("UPDATE saga_stock SET stock = stock + ? WHERE run = ?")
                            .bind(o.qty)
                            .bind(&o.run)
                            .execute(&mut *c)
                            .await
                            .map_err(db)?;
                    }
                    Ok(())
                })
            })
            .await
    }
}

#[derive(Clone)]
struct Payment(SqliteBarrier);

impl SagaStep for Payment {
    async fn action(&self, ctx: &BranchContext, p: &[u8]) -> Result<(), BranchError> {
        let o: Order = payload(p)?;
        if o.decline {
            return Err(BranchError::Failure("card declined".into()));
        }
        let gid = ctx.gid.clone();
        self.0
            .call(ctx, move |c| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO saga_payments (run, gid, amount, refunded) VALUES (?, ?, ?, 0)")
                        .bind(o.run)
                        .bind(gid)
                        .bind(o.amount)
                        .execute(&mut *c)
                        .await
                        .map_err(db)?;
                    Ok(())
                })
            })
            .await
    }

    async fn compensate(&self, ctx: &BranchContext, p: &[u8]) -> Result<(), BranchError> {
        let o: Order = payload(p)?;
        let gid = ctx.gid.clone();
        self.0
            .call(ctx, move |c| {
                Box::pin(async move {
                    sqlx::query("UPDATE saga_payments SET refunded = 1 WHERE run = ? AND gid = ?")
                        .bind(o.run)
                        .bind(gid)
                        .execute(&mut *c)
                        .await
                        .map_err(db)?;
                    Ok(())
                })
            })
            .await
    }
}

#[derive(Clone)]
struct Shipping(PgBarrier);

impl SagaStep for Shipping {
    async fn action(&self, ctx: &BranchContext, p: &[u8]) -> Result<(), BranchError> {
        let o: Order = payload(p)?;
        let gid = ctx.gid.clone();
        self.0
            .call(ctx, move |c| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO saga_shipments (run, gid, cancelled) VALUES ($1, $2, false)",
                    )
                    .bind(o.run)
                    .bind(gid)
                    .execute(&mut *c)
                    .await
                    .map_err(db)?;
                    Ok(())
                })
            })
            .await
    }

    async fn compensate(&self, ctx: &BranchContext, p: &[u8]) -> Result<(), BranchError> {
        let o: Order = payload(p)?;
        let gid = ctx.gid.clone();
        self.0
            .call(ctx, move |c| {
                Box::pin(async move {
                    sqlx::query(
                        "UPDATE saga_shipments SET cancelled = true WHERE run = $1 AND gid = $2",
                    )
                    .bind(o.run)
                    .bind(gid)
                    .execute(&mut *c)
                    .await
                    .map_err(db)?;
                    Ok(())
                })
            })
            .await
    }
}

/// What the databases say about one saga.
#[derive(Debug, Default)]
struct Effects {
    order_placed: bool,
    reserved: bool,
    charged: bool,
    shipped: bool,
    /// Any effect present and not undone.
    anything_standing: bool,
}

async fn effects(
    pg: &sqlx::PgPool,
    my: &sqlx::MySqlPool,
    lite: &sqlx::SqlitePool,
    run: &str,
    gid: &str,
) -> anyhow::Result<Effects> {
    let order: Option<String> =
        sqlx::query("SELECT status FROM saga_orders WHERE run = $1 AND gid = $2")
            .bind(run)
            .bind(gid)
            .fetch_optional(pg)
            .await?
            .map(|r| r.get(0));
    let reserved: Option<i64> = sqlx::query(
        "SELECT CAST(released AS SIGNED) FROM saga_reservations WHERE run = ? AND gid = ?",
    )
    .bind(run)
    .bind(gid)
    .fetch_optional(my)
    .await?
    .map(|r| r.get(0));
    let refunded: Option<i64> =
        sqlx::query("SELECT refunded FROM saga_payments WHERE run = ? AND gid = ?")
            .bind(run)
            .bind(gid)
            .fetch_optional(lite)
            .await?
            .map(|r| r.get(0));
    let shipment: Option<bool> =
        sqlx::query("SELECT cancelled FROM saga_shipments WHERE run = $1 AND gid = $2")
            .bind(run)
            .bind(gid)
            .fetch_optional(pg)
            .await?
            .map(|r| r.get(0));
    let e = Effects {
        order_placed: order.as_deref() == Some("placed"),
        reserved: reserved == Some(0),
        charged: refunded == Some(0),
        shipped: shipment == Some(false),
        anything_standing: false,
    };
    Ok(Effects {
        anything_standing: e.order_placed || e.reserved || e.charged || e.shipped,
        ..e
    })
}

pub async fn run(config: Config) -> anyhow::Result<Report> {
    if !(0.0..=1.0).contains(&config.fail_rate) {
        bail!("--fail-rate must be between 0 and 1");
    }
    let pool_size = config.concurrency.clamp(4, 32) as u32;
    let pg = services::postgres(&config.pg_url, pool_size).await?;
    let my = services::mysql(&config.mysql_url, pool_size).await?;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let lite_path = std::env::temp_dir().join(format!("tandem-saga-order-{run}.db"));
    let lite = services::sqlite(&lite_path).await?;
    services::pg_ddl(
        &pg,
        "CREATE TABLE IF NOT EXISTS saga_orders (run VARCHAR(40), gid VARCHAR(128), status VARCHAR(16), PRIMARY KEY (run, gid));
         CREATE TABLE IF NOT EXISTS saga_shipments (run VARCHAR(40), gid VARCHAR(128), cancelled BOOLEAN, PRIMARY KEY (run, gid));",
    )
    .await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS saga_stock (run VARCHAR(40) PRIMARY KEY, stock BIGINT NOT NULL);
         CREATE TABLE IF NOT EXISTS saga_reservations (run VARCHAR(40), gid VARCHAR(128), qty BIGINT, released TINYINT, PRIMARY KEY (run, gid));",
    )
    .execute(&my)
    .await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS saga_payments (run TEXT, gid TEXT, amount INTEGER, refunded INTEGER, PRIMARY KEY (run, gid))")
        .execute(&lite)
        .await?;
    sqlx::query("INSERT INTO saga_stock (run, stock) VALUES (?, ?)")
        .bind(&run)
        .bind(INITIAL_STOCK)
        .execute(&my)
        .await?;

    let orders = services::serve(Saga(Orders(PgBarrier::new(pg.clone()).await?))).await?;
    let inventory = services::serve(Saga(Inventory(MySqlBarrier::new(my.clone()).await?))).await?;
    let payment = services::serve(Saga(Payment(SqliteBarrier::new(lite.clone()).await?))).await?;
    let shipping = services::serve(Saga(Shipping(PgBarrier::new(pg.clone()).await?))).await?;

    let client = Client::connect(&config.endpoints)?;
    let submit = |i: usize| {
        let decline = rand::random_bool(config.fail_rate);
        let order = serde_json::to_vec(&Order {
            run: run.clone(),
            qty: 1 + (i % 5) as i64,
            amount: 10 + (i % 90) as i64,
            decline,
        })
        .expect("an order serializes");
        let saga = client
            .saga()
            .concurrent(0)
            .retry(pb::RetryPolicy {
                initial_interval_ms: 50,
                max_interval_ms: 1_000,
                max_attempts: 20,
            })
            .step(Step::service("order", &orders.base).payload(order.clone()))
            .step(
                Step::service("inventory", &inventory.base)
                    .payload(order.clone())
                    .after(&["order"]),
            )
            .step(
                Step::service("payment", &payment.base)
                    .payload(order.clone())
                    .after(&["order"]),
            )
            .step(
                Step::service("shipping", &shipping.base)
                    .payload(order)
                    .after(&["inventory", "payment"]),
            );
        let gid = saga.gid_str().to_string();
        async move { (gid, saga.submit_and_wait(Duration::from_secs(60)).await) }
    };
    let outcomes: Vec<_> = futures::stream::iter((0..config.orders).map(submit))
        .buffer_unordered(config.concurrency.max(1))
        .collect()
        .await;

    let mut report = Report::default();
    for (gid, outcome) in outcomes {
        let ended = |tx: &pb::Transaction| {
            matches!(
                pb::TxState::try_from(tx.state),
                Ok(pb::TxState::Committed | pb::TxState::Aborted)
            )
        };
        let tx = match outcome {
            Ok(tx) if ended(&tx) => tx,
            // The answer was lost, or came before the end: ask until it ends.
            other => match services::settle(&client, &gid, Duration::from_secs(90)).await {
                services::Settled::Ended(tx) => *tx,
                services::Settled::Absent => {
                    let e = effects(&pg, &my, &lite, &run, &gid).await?;
                    report.not_submitted += 1;
                    if e.anything_standing {
                        tracing::warn!(%gid, ?e, "a saga never submitted left effects");
                        report.violations += 1;
                    }
                    continue;
                }
                services::Settled::Unknown => {
                    tracing::warn!(%gid, answer = ?other.map(|t| t.state), "a saga did not end in time");
                    report.violations += 1;
                    continue;
                }
            },
        };
        let e = effects(&pg, &my, &lite, &run, &tx.gid).await?;
        match pb::TxState::try_from(tx.state) {
            Ok(pb::TxState::Committed) => {
                report.completed += 1;
                if !(e.order_placed && e.reserved && e.charged && e.shipped) {
                    tracing::warn!(gid = %tx.gid, ?e, "completed saga with missing effects");
                    report.violations += 1;
                }
            }
            Ok(pb::TxState::Aborted) => {
                report.compensated += 1;
                if e.anything_standing {
                    tracing::warn!(gid = %tx.gid, ?e, "compensated saga with effects left standing");
                    report.violations += 1;
                }
            }
            _ => {
                tracing::warn!(gid = %tx.gid, state = tx.state, "saga not finished in time");
                report.violations += 1;
            }
        }
    }
    // Stock must add up: what is reserved and not released is what is gone.
    let stock: i64 = sqlx::query("SELECT stock FROM saga_stock WHERE run = ?")
        .bind(&run)
        .fetch_one(&my)
        .await?
        .get(0);
    let held: i64 = sqlx::query("SELECT CAST(COALESCE(SUM(qty), 0) AS SIGNED) FROM saga_reservations WHERE run = ? AND released = 0")
        .bind(&run)
        .fetch_one(&my)
        .await?
        .get(0);
    if stock + held != INITIAL_STOCK {
        tracing::warn!(stock, held, "stock does not add up");
        report.violations += 1;
    }
    lite.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", lite_path.display()));
    }
    Ok(report)
}
