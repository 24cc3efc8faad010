//! TCC over three reservation services on three databases: flight
//! (PostgreSQL), hotel (MariaDB), payment (SQLite). Try holds, confirm
//! books (payment: charges), cancel releases. Payment declines at the
//! requested rate; the booking is then cancelled everywhere.
//!
//! Violations, counted from the databases: a confirmed booking with any
//! reservation not confirmed; a cancelled one with anything still held or
//! confirmed; any booking charged other than exactly once when confirmed
//! (never when cancelled).

use std::time::Duration;

use anyhow::bail;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tandem_sdk::barrier::{MySqlBarrier, PgBarrier, SqliteBarrier};
use tandem_sdk::participant::{BranchContext, BranchError, Tcc, TccResource};
use tandem_sdk::{Client, proto as pb};

use crate::services::{self, db, numbered, payload};

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Vec<String>,
    pub bookings: usize,
    pub concurrency: usize,
    /// Share of bookings whose payment declines.
    pub fail_rate: f64,
    pub pg_url: String,
    pub mysql_url: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub confirmed: u64,
    pub cancelled: u64,
    /// Bookings whose Begin never got an answer: nothing was tried for them.
    pub not_begun: u64,
    pub violations: u64,
}

#[derive(Serialize, Deserialize)]
struct Booking {
    run: String,
    amount: i64,
    decline: bool,
}

/// A reservation service: `table` holds one row per booking; `charges`
/// (payment only) gets a row per confirmation.
macro_rules! reservations {
    ($name:ident, $barrier:ty, $sql:expr) => {
        #[derive(Clone)]
        struct $name {
            barrier: $barrier,
            table: &'static str,
            /// Payment: refuse to hold when the booking says so, and charge
            /// on confirm.
            payment: bool,
        }

        impl $name {
            async fn exec(&self, ctx: &BranchContext, statements: Vec<(String, bool)>, booking: Booking) -> Result<(), BranchError> {
                let gid = ctx.gid.clone();
                self.barrier
                    .call(ctx, move |c| {
                        Box::pin(async move {
                            for (sql, with_amount) in statements {
                                let mut q = sqlx::query(&sql).bind(&booking.run).bind(&gid);
                                if with_amount {
                                    q = q.bind(booking.amount);
                                }
                                q.execute(&mut *c).await.map_err(db)?;
                            }
                            Ok(())
                        })
                    })
                    .await
            }
        }

        impl TccResource for $name {
            async fn try_(&self, ctx: &BranchContext, p: &[u8]) -> Result<(), BranchError> {
                let booking: Booking = payload(p)?;
                if self.payment && booking.decline {
                    return Err(BranchError::Failure("card declined".into()));
                }
                let sql = $sql(&format!("INSERT INTO {} (run, gid, status) VALUES (?, ?, 'held')", self.table));
                self.exec(ctx, vec![(sql, false)], booking).await
            }

            async fn confirm(&self, ctx: &BranchContext, p: &[u8]) -> Result<(), BranchError> {
                let booking: Booking = payload(p)?;
                let mut statements = vec![(
                    $sql(&format!("UPDATE {} SET status = 'confirmed' WHERE run = ? AND gid = ? AND status = 'held'", self.table)),
                    false,
                )];
                if self.payment {
                    statements.push(($sql("INSERT INTO travel_charges (run, gid, amount) VALUES (?, ?, ?)"), true));
                }
                self.exec(ctx, statements, booking).await
            }

            async fn cancel(&self, ctx: &BranchContext, p: &[u8]) -> Result<(), BranchError> {
                let booking: Booking = payload(p)?;
                let sql = $sql(&format!("UPDATE {} SET status = 'released' WHERE run = ? AND gid = ? AND status = 'held'", self.table));
                self.exec(ctx, vec![(sql, false)], booking).await
            }
        }
    };
}

reservations!(PgReservations, PgBarrier, numbered);
reservations!(MySqlReservations, MySqlBarrier, String::from);
reservations!(SqliteReservations, SqliteBarrier, String::from);

async fn status_pg(pool: &sqlx::PgPool, run: &str, gid: &str) -> anyhow::Result<Option<String>> {
    Ok(
        sqlx::query("SELECT status FROM travel_flights WHERE run = $1 AND gid = $2")
            .bind(run)
            .bind(gid)
            .fetch_optional(pool)
            .await?
            .map(|r| r.get(0)),
    )
}

async fn status_my(pool: &sqlx::MySqlPool, run: &str, gid: &str) -> anyhow::Result<Option<String>> {
    Ok(
        sqlx::query("SELECT status FROM travel_hotels WHERE run = ? AND gid = ?")
            .bind(run)
            .bind(gid)
            .fetch_optional(pool)
            .await?
            .map(|r| r.get(0)),
    )
}

async fn status_lite(
    pool: &sqlx::SqlitePool,
    run: &str,
    gid: &str,
) -> anyhow::Result<(Option<String>, i64)> {
    let status = sqlx::query("SELECT status FROM travel_payments WHERE run = ? AND gid = ?")
        .bind(run)
        .bind(gid)
        .fetch_optional(pool)
        .await?
        .map(|r| r.get(0));
    let charges: i64 = sqlx::query("SELECT COUNT(*) FROM travel_charges WHERE run = ? AND gid = ?")
        .bind(run)
        .bind(gid)
        .fetch_one(pool)
        .await?
        .get(0);
    Ok((status, charges))
}

/// One booking: try all three, confirm if every hold succeeded.
/// A booking: its gid once begun (`None`: Begin got no answer, so nothing
/// was tried), and the transaction as the last answer showed it.
async fn book(
    client: &Client,
    bases: &[String; 3],
    booking: Vec<u8>,
) -> (Option<String>, anyhow::Result<pb::Transaction>) {
    let options = pb::TxOptions {
        timeout_ms: 30_000,
        ..Default::default()
    };
    let tx = match client.begin_scope(pb::Protocol::Tcc, options).await {
        Ok(tx) => tx,
        Err(e) => return (None, Err(e.into())),
    };
    let mut refusal = None;
    for (branch, base) in ["flight", "hotel", "payment"].iter().zip(bases) {
        if let Err(e) = tx.try_branch(branch, base, booking.clone()).await {
            refusal = Some(e.to_string());
            break;
        }
    }
    let end = match refusal {
        None => tx.commit().await,
        Some(reason) => tx.abort(&reason).await,
    };
    (Some(tx.gid().to_string()), end.map_err(Into::into))
}

pub async fn run(config: Config) -> anyhow::Result<Report> {
    if !(0.0..=1.0).contains(&config.fail_rate) {
        bail!("--fail-rate must be between 0 and 1");
    }
    let pool_size = config.concurrency.clamp(4, 32) as u32;
    let pg = services::postgres(&config.pg_url, pool_size).await?;
    let my = services::mysql(&config.mysql_url, pool_size).await?;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let lite_path = std::env::temp_dir().join(format!("tandem-tcc-travel-{run}.db"));
    let lite = services::sqlite(&lite_path).await?;
    let table = |name: &str| {
        format!(
            "CREATE TABLE IF NOT EXISTS {name} (run VARCHAR(40), gid VARCHAR(128), status VARCHAR(16), PRIMARY KEY (run, gid))"
        )
    };
    services::pg_ddl(&pg, &table("travel_flights")).await?;
    sqlx::raw_sql(&table("travel_hotels")).execute(&my).await?;
    sqlx::raw_sql(&table("travel_payments"))
        .execute(&lite)
        .await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS travel_charges (run TEXT, gid TEXT, amount INTEGER)")
        .execute(&lite)
        .await?;

    let flights = services::serve(Tcc(PgReservations {
        barrier: PgBarrier::new(pg.clone()).await?,
        table: "travel_flights",
        payment: false,
    }))
    .await?;
    let hotels = services::serve(Tcc(MySqlReservations {
        barrier: MySqlBarrier::new(my.clone()).await?,
        table: "travel_hotels",
        payment: false,
    }))
    .await?;
    let payments = services::serve(Tcc(SqliteReservations {
        barrier: SqliteBarrier::new(lite.clone()).await?,
        table: "travel_payments",
        payment: true,
    }))
    .await?;
    let bases = [
        flights.base.clone(),
        hotels.base.clone(),
        payments.base.clone(),
    ];

    let client = Client::connect(&config.endpoints)?;
    let outcomes: Vec<_> = futures::stream::iter((0..config.bookings).map(|i| {
        let booking = serde_json::to_vec(&Booking {
            run: run.clone(),
            amount: 100 + i as i64,
            decline: rand::random_bool(config.fail_rate),
        })
        .expect("a booking serializes");
        book(&client, &bases, booking)
    }))
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
        let tx = match (gid, outcome) {
            (_, Ok(tx)) if ended(&tx) => tx,
            (None, _) => {
                report.not_begun += 1;
                continue;
            }
            // The answer was lost, or came before the end: ask until it ends.
            (Some(gid), other) => {
                match services::settle(&client, &gid, Duration::from_secs(90)).await {
                    services::Settled::Ended(tx) => *tx,
                    services::Settled::Absent | services::Settled::Unknown => {
                        tracing::warn!(%gid, answer = ?other.map(|t| t.state), "a booking did not end in time");
                        report.violations += 1;
                        continue;
                    }
                }
            }
        };
        let flight = status_pg(&pg, &run, &tx.gid).await?;
        let hotel = status_my(&my, &run, &tx.gid).await?;
        let (payment, charges) = status_lite(&lite, &run, &tx.gid).await?;
        let statuses = [flight, hotel, payment];
        let ok = match pb::TxState::try_from(tx.state) {
            Ok(pb::TxState::Committed) => {
                report.confirmed += 1;
                statuses.iter().all(|s| s.as_deref() == Some("confirmed")) && charges == 1
            }
            Ok(pb::TxState::Aborted) => {
                report.cancelled += 1;
                statuses
                    .iter()
                    .all(|s| s.is_none() || s.as_deref() == Some("released"))
                    && charges == 0
            }
            _ => false,
        };
        if !ok {
            tracing::warn!(gid = %tx.gid, ?statuses, charges, state = tx.state, "booking violates the invariant");
            report.violations += 1;
        }
    }
    lite.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", lite_path.display()));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            crate::services::numbered("a = ? AND b = ?"),
            "a = $1 AND b = $2"
        );
    }
}
