//! Orders through 3PC: stock in PostgreSQL, payment in MariaDB, each a
//! `ThreePhaseResource` over its database. `can_commit` votes (a declined
//! order votes no, on purpose, at `--fail-rate`); `pre_commit` writes the
//! branch's row as `pre_committed` (durable, not yet an effect);
//! `do_commit` turns it `committed` and applies the effect in the same
//! local transaction; `abort` leaves an `aborted` row (a tombstone that
//! refuses a late pre-commit). Each service runs the termination task,
//! which resolves a branch left pre-committed by asking the cluster.
//!
//! Checked after the run, from the databases: every committed order has
//! both rows committed, every aborted one neither; stock and balance moved
//! by exactly the committed orders; nothing left pre-committed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tandem_sdk::participant::{
    BranchContext, BranchError, ThreePhase, ThreePhaseResource, spawn_termination,
};
use tandem_sdk::{Client, proto as pb};

use crate::services::{self, db, numbered, payload};

pub const INITIAL_STOCK: i64 = 1_000_000;
pub const INITIAL_BALANCE: i64 = 1_000_000_000;

pub struct Config {
    pub endpoints: Vec<String>,
    pub orders: usize,
    pub concurrency: usize,
    /// Share of orders one of the two services votes no on.
    pub fail_rate: f64,
    pub pg_url: String,
    pub mysql_url: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub committed: u64,
    pub aborted: u64,
    /// Orders the coordinator never had (their Begin did not take effect):
    /// nothing was tried for them.
    pub not_begun: u64,
    /// Orders whose two databases disagree, or disagree with the
    /// coordinator, plus totals that do not add up.
    pub violations: u64,
}

#[derive(Serialize, Deserialize)]
struct Order {
    qty: i64,
    amount: i64,
    /// Which service votes no ("stock", "payment"), if any.
    decline: Option<String>,
}

#[derive(Clone)]
enum Db {
    Pg(sqlx::PgPool),
    My(sqlx::MySqlPool),
}

/// Runs `$body` in a local transaction `$tx` of either database; `$q`
/// turns a `?` SQL text into the database's own placeholders.
macro_rules! in_tx {
    ($db:expr, |$tx:ident, $q:ident| $body:block) => {
        match $db {
            Db::Pg(pool) => {
                let mut $tx = pool.begin().await.map_err(db)?;
                let $q = |sql: &str| numbered(sql);
                let out = $body;
                $tx.commit().await.map_err(db)?;
                out
            }
            Db::My(pool) => {
                let mut $tx = pool.begin().await.map_err(db)?;
                let $q = |sql: &str| sql.to_string();
                let out = $body;
                $tx.commit().await.map_err(db)?;
                out
            }
        }
    };
}

/// The branch's row, locked for the rest of the local transaction.
macro_rules! locked_row {
    ($tx:ident, $q:ident, $service:expr, $ctx:expr) => {
        sqlx::query(&$q(STATUS_SQL))
            .bind(&$service.run)
            .bind(&$ctx.gid)
            .bind(&$ctx.branch_id)
            .fetch_optional(&mut *$tx)
            .await
            .map_err(db)?
    };
}

/// A service: its name (the branch id), its database, the run it belongs
/// to, and the effect a committed branch applies.
#[derive(Clone)]
struct Service {
    name: &'static str,
    db: Db,
    run: String,
    /// `UPDATE … SET x = x - ? WHERE run = ?`, bound with the amount.
    effect_sql: &'static str,
}

impl Service {
    fn amount(&self, order: &Order) -> i64 {
        if self.name == "stock" {
            order.qty
        } else {
            order.amount
        }
    }
}

const STATUS_SQL: &str = "SELECT status, amount FROM three_phase_branches WHERE run = ? AND gid = ? AND branch = ? FOR UPDATE";
const INSERT_SQL: &str =
    "INSERT INTO three_phase_branches (run, gid, branch, status, amount) VALUES (?, ?, ?, ?, ?)";
const SET_SQL: &str =
    "UPDATE three_phase_branches SET status = ? WHERE run = ? AND gid = ? AND branch = ?";

impl ThreePhaseResource for Service {
    async fn can_commit(&self, _ctx: &BranchContext, body: &[u8]) -> Result<(), BranchError> {
        let order: Order = payload(body)?;
        if order.decline.as_deref() == Some(self.name) {
            return Err(BranchError::Failure(format!("{} declines", self.name)));
        }
        Ok(())
    }

    async fn pre_commit(&self, ctx: &BranchContext, body: &[u8]) -> Result<(), BranchError> {
        let order: Order = payload(body)?;
        let amount = self.amount(&order);
        in_tx!(&self.db, |tx, q| {
            let row = locked_row!(tx, q, self, ctx);
            match row.map(|r| r.get::<String, _>(0)).as_deref() {
                None => {
                    sqlx::query(&q(INSERT_SQL))
                        .bind(&self.run)
                        .bind(&ctx.gid)
                        .bind(&ctx.branch_id)
                        .bind("pre_committed")
                        .bind(amount)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                Some("aborted") => {
                    return Err(BranchError::Failure("already aborted".into()));
                }
                Some(_) => {}
            }
        });
        Ok(())
    }

    async fn do_commit(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        in_tx!(&self.db, |tx, q| {
            let row = locked_row!(tx, q, self, ctx);
            let Some(row) = row else {
                return Err(BranchError::Failure("never pre-committed".into()));
            };
            let (status, amount): (String, i64) = (row.get(0), row.get(1));
            match status.as_str() {
                "committed" => {}
                "pre_committed" => {
                    sqlx::query(&q(SET_SQL))
                        .bind("committed")
                        .bind(&self.run)
                        .bind(&ctx.gid)
                        .bind(&ctx.branch_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    sqlx::query(&q(self.effect_sql))
                        .bind(amount)
                        .bind(&self.run)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                other => return Err(BranchError::Failure(format!("cannot commit: {other}"))),
            }
        });
        Ok(())
    }

    async fn abort(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        in_tx!(&self.db, |tx, q| {
            let row = locked_row!(tx, q, self, ctx);
            match row.map(|r| r.get::<String, _>(0)).as_deref() {
                None => {
                    // The tombstone: a late pre-commit finds it.
                    sqlx::query(&q(INSERT_SQL))
                        .bind(&self.run)
                        .bind(&ctx.gid)
                        .bind(&ctx.branch_id)
                        .bind("aborted")
                        .bind(0i64)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                Some("pre_committed") => {
                    sqlx::query(&q(SET_SQL))
                        .bind("aborted")
                        .bind(&self.run)
                        .bind(&ctx.gid)
                        .bind(&ctx.branch_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                Some("committed") => {
                    return Err(BranchError::Failure("already committed".into()));
                }
                Some(_) => {}
            }
        });
        Ok(())
    }

    async fn in_doubt(&self) -> Result<Vec<(String, String)>, BranchError> {
        let sql = "SELECT gid, branch FROM three_phase_branches WHERE run = ? AND status = 'pre_committed'";
        let rows = match &self.db {
            Db::Pg(pool) => sqlx::query(&numbered(sql))
                .bind(&self.run)
                .fetch_all(pool)
                .await
                .map_err(db)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
            Db::My(pool) => sqlx::query(sql)
                .bind(&self.run)
                .fetch_all(pool)
                .await
                .map_err(db)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        };
        Ok(rows)
    }
}

/// A branch's status in a database (None: no row).
async fn status(service: &Service, gid: &str) -> anyhow::Result<Option<String>> {
    let sql = "SELECT status FROM three_phase_branches WHERE run = ? AND gid = ? AND branch = ?";
    Ok(match &service.db {
        Db::Pg(pool) => sqlx::query(&numbered(sql))
            .bind(&service.run)
            .bind(gid)
            .bind(service.name)
            .fetch_optional(pool)
            .await?
            .map(|r| r.get(0)),
        Db::My(pool) => sqlx::query(sql)
            .bind(&service.run)
            .bind(gid)
            .bind(service.name)
            .fetch_optional(pool)
            .await?
            .map(|r| r.get(0)),
    })
}

async fn order(
    client: &Client,
    bases: &[(String, &'static str); 2],
    body: Vec<u8>,
) -> (String, anyhow::Result<pb::Transaction>) {
    let gid = tandem_sdk::new_gid();
    let result = async {
        client
            .begin_with(pb::BeginRequest {
                gid: gid.clone(),
                protocol: pb::Protocol::ThreePc as i32,
                options: Some(pb::TxOptions {
                    timeout_ms: 30_000,
                    ..Default::default()
                }),
                payload: Vec::new(),
            })
            .await?;
        for (base, name) in bases {
            let ops: Vec<(&str, String)> = ["can_commit", "pre_commit", "do_commit", "abort"]
                .into_iter()
                .map(|op| (op, format!("{base}/tandem/{op}")))
                .collect();
            let ops: Vec<(&str, &str)> = ops.iter().map(|(o, e)| (*o, e.as_str())).collect();
            client
                .register_branch(&gid, name, &ops, body.clone())
                .await?;
        }
        Ok(client.commit(&gid, true, Duration::from_secs(60)).await?)
    }
    .await;
    (gid, result)
}

pub async fn run(config: Config) -> anyhow::Result<Report> {
    if !(0.0..=1.0).contains(&config.fail_rate) {
        bail!("--fail-rate must be between 0 and 1");
    }
    let pool_size = config.concurrency.clamp(4, 32) as u32;
    let pg = services::postgres(&config.pg_url, pool_size).await?;
    let my = services::mysql(&config.mysql_url, pool_size).await?;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let branches = "CREATE TABLE IF NOT EXISTS three_phase_branches (run VARCHAR(40), gid VARCHAR(128), branch VARCHAR(32), status VARCHAR(16) NOT NULL, amount BIGINT NOT NULL, PRIMARY KEY (run, gid, branch))";
    services::pg_ddl(&pg, branches).await?;
    sqlx::raw_sql(branches).execute(&my).await?;
    services::pg_ddl(
        &pg,
        "CREATE TABLE IF NOT EXISTS three_phase_stock (run VARCHAR(40) PRIMARY KEY, stock BIGINT NOT NULL)",
    )
    .await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS three_phase_balances (run VARCHAR(40) PRIMARY KEY, balance BIGINT NOT NULL)")
        .execute(&my)
        .await?;
    sqlx::query("INSERT INTO three_phase_stock (run, stock) VALUES ($1, $2)")
        .bind(&run)
        .bind(INITIAL_STOCK)
        .execute(&pg)
        .await?;
    sqlx::query("INSERT INTO three_phase_balances (run, balance) VALUES (?, ?)")
        .bind(&run)
        .bind(INITIAL_BALANCE)
        .execute(&my)
        .await?;

    let stock = Service {
        name: "stock",
        db: Db::Pg(pg.clone()),
        run: run.clone(),
        effect_sql: "UPDATE three_phase_stock SET stock = stock - ? WHERE run = ?",
    };
    let payment = Service {
        name: "payment",
        db: Db::My(my.clone()),
        run: run.clone(),
        effect_sql: "UPDATE three_phase_balances SET balance = balance - ? WHERE run = ?",
    };
    let client = Client::connect(&config.endpoints)?;
    let stock_server = services::serve(ThreePhase(stock.clone())).await?;
    let payment_server = services::serve(ThreePhase(payment.clone())).await?;
    // Each service resolves what it holds in doubt by asking the cluster.
    let terminations = [
        spawn_termination(
            Arc::new(stock.clone()),
            client.clone(),
            Duration::from_secs(5),
        ),
        spawn_termination(
            Arc::new(payment.clone()),
            client.clone(),
            Duration::from_secs(5),
        ),
    ];
    let bases = [
        (stock_server.base.clone(), "stock"),
        (payment_server.base.clone(), "payment"),
    ];
    let outcomes: Vec<_> = futures::stream::iter((0..config.orders).map(|i| {
        let decline =
            rand::random_bool(config.fail_rate).then(|| ["stock", "payment"][i % 2].to_string());
        let body = serde_json::to_vec(&Order {
            qty: 1 + (i % 5) as i64,
            amount: 100 + i as i64,
            decline,
        })
        .expect("an order serializes");
        order(&client, &bases, body)
    }))
    .buffer_unordered(config.concurrency.max(1))
    .collect()
    .await;

    let mut report = Report::default();
    for (gid, outcome) in outcomes {
        let tx = match outcome {
            Ok(tx)
                if tx.state == pb::TxState::Committed as i32
                    || tx.state == pb::TxState::Aborted as i32 =>
            {
                tx
            }
            other => match services::settle(&client, &gid, Duration::from_secs(90)).await {
                services::Settled::Ended(tx) => *tx,
                services::Settled::Absent => {
                    report.not_begun += 1;
                    continue;
                }
                services::Settled::Unknown => {
                    tracing::warn!(%gid, answer = ?other.map(|t| t.state), "an order did not end in time");
                    report.violations += 1;
                    continue;
                }
            },
        };
        let rows = [status(&stock, &gid).await?, status(&payment, &gid).await?];
        let committed = tx.state == pb::TxState::Committed as i32;
        let agree = if committed {
            rows.iter().all(|s| s.as_deref() == Some("committed"))
        } else {
            rows.iter().all(|s| s.as_deref() != Some("committed"))
        };
        if !agree {
            tracing::warn!(%gid, ?rows, state = tx.state, "an order's databases disagree");
            report.violations += 1;
        }
        if committed {
            report.committed += 1;
        } else {
            report.aborted += 1;
        }
    }
    // Totals: each database moved by exactly its committed branches.
    let pg_moved: i64 = sqlx::query(
        "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM three_phase_branches WHERE run = $1 AND status = 'committed'",
    )
    .bind(&run)
    .fetch_one(&pg)
    .await?
    .get(0);
    let my_moved: i64 = sqlx::query(
        "SELECT CAST(COALESCE(SUM(amount), 0) AS SIGNED) FROM three_phase_branches WHERE run = ? AND status = 'committed'",
    )
    .bind(&run)
    .fetch_one(&my)
    .await?
    .get(0);
    let (qty, amount) = (pg_moved, my_moved);
    let stock_now: i64 = sqlx::query("SELECT stock FROM three_phase_stock WHERE run = $1")
        .bind(&run)
        .fetch_one(&pg)
        .await?
        .get(0);
    let balance_now: i64 = sqlx::query("SELECT balance FROM three_phase_balances WHERE run = ?")
        .bind(&run)
        .fetch_one(&my)
        .await?
        .get(0);
    if stock_now + qty != INITIAL_STOCK || balance_now + amount != INITIAL_BALANCE {
        tracing::warn!(stock_now, qty, balance_now, amount, "totals do not add up");
        report.violations += 1;
    }
    let left = stock.in_doubt().await.map_err(anyhow::Error::msg)?.len()
        + payment.in_doubt().await.map_err(anyhow::Error::msg)?.len();
    if left > 0 {
        tracing::warn!(left, "branches left pre-committed");
        report.violations += 1;
    }
    for t in terminations {
        t.abort();
    }
    Ok(report)
}
