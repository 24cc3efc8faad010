//! What the PostgreSQL XA helper relies on, pinned against the real server
//! (ARCHITECTURE.md, "What XA on the databases promises"), and the helper
//! itself under takeover pressure (invariant 1, atomicity: a branch
//! acknowledged as committed is committed). Needs
//! `max_prepared_transactions > 0` (scripts/prepare-services.sh sets 128).

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ctx, give_up_at_every_instant};
use futures::StreamExt;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};
use tandem_sdk::ClusterId;
use tandem_sdk::participant::{BranchContext, BranchError};
use tandem_sdk::xa::{PgXa, XaStore};

mod common;

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn pool(max: u32) -> PgPool {
    let pool = PgPoolOptions::new()
        .max_connections(max)
        .connect(URL)
        .await
        .expect("PostgreSQL (run scripts/prepare-services.sh)");
    common::create_table(
        &pool,
        "CREATE TABLE IF NOT EXISTS tandem_xa_probe (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)",
    )
    .await;
    pool
}

fn probe_id() -> i64 {
    (uuid::Uuid::new_v4().as_u128() as i64) & i64::MAX
}

async fn exec(conn: &mut PgConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(sql))
        .await
        .map(|_| ())
}

async fn is_prepared(pool: &PgPool, name: &str) -> bool {
    sqlx::query("SELECT 1 FROM pg_prepared_xacts WHERE gid = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .unwrap()
        .is_some()
}

async fn probe_rows(pool: &PgPool, probe: i64) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM tandem_xa_probe WHERE id = $1")
        .bind(probe)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The pressure that loses commits on MariaDB, at the database alone:
/// prepare on a fresh session, close it, commit from another at once. On
/// PostgreSQL the prepared transaction belongs to no session once PREPARE
/// TRANSACTION returns, so nothing is ever lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn atomicity_postgres_commit_prepared_from_another_session_after_close_loses_nothing() {
    const CYCLES: usize = 2_000;
    let pool = pool(16).await;
    let lost = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    futures::stream::iter(0..CYCLES)
        .for_each_concurrent(8, |_| {
            let (pool, lost) = (pool.clone(), lost.clone());
            async move {
                let probe = probe_id();
                let name = format!("probe-{}", uuid::Uuid::new_v4().simple());
                let mut a = PgConnection::connect(URL).await.unwrap();
                exec(&mut a, "BEGIN").await.unwrap();
                sqlx::query("INSERT INTO tandem_xa_probe (id, v) VALUES ($1, 1)")
                    .bind(probe)
                    .execute(&mut a)
                    .await
                    .unwrap();
                exec(&mut a, &format!("PREPARE TRANSACTION '{name}'"))
                    .await
                    .unwrap();
                a.close().await.unwrap();
                let mut b = pool.acquire().await.unwrap();
                exec(&mut b, &format!("COMMIT PREPARED '{name}'"))
                    .await
                    .unwrap();
                if probe_rows(&pool, probe).await != 1 {
                    lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
        .await;
    assert_eq!(lost.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn postgres_a_prepared_transaction_is_listed_at_once_and_survives_its_session() {
    let pool = pool(4).await;
    let probe = probe_id();
    let name = format!("probe-{}", uuid::Uuid::new_v4().simple());
    let mut a = PgConnection::connect(URL).await.unwrap();
    exec(&mut a, "BEGIN").await.unwrap();
    sqlx::query("INSERT INTO tandem_xa_probe (id, v) VALUES ($1, 1)")
        .bind(probe)
        .execute(&mut a)
        .await
        .unwrap();
    exec(&mut a, &format!("PREPARE TRANSACTION '{name}'"))
        .await
        .unwrap();
    // Listed at once, to every session; the preparing session is free again.
    assert!(is_prepared(&pool, &name).await);
    exec(&mut a, "SELECT 1").await.unwrap();
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(is_prepared(&pool, &name).await, "survives the session");
    assert_eq!(
        probe_rows(&pool, probe).await,
        0,
        "invisible until committed"
    );
    let mut b = pool.acquire().await.unwrap();
    exec(&mut b, &format!("COMMIT PREPARED '{name}'"))
        .await
        .unwrap();
    assert_eq!(probe_rows(&pool, probe).await, 1);
}

#[tokio::test]
async fn postgres_commit_prepared_of_a_name_not_prepared_is_an_error_not_a_silent_ok() {
    let pool = pool(2).await;
    let mut b = pool.acquire().await.unwrap();
    let err = exec(&mut b, "COMMIT PREPARED 'tandem-never-prepared'")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = exec(&mut b, "ROLLBACK PREPARED 'tandem-never-prepared'")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

/// The trap the helper guards against: PREPARE TRANSACTION that answers
/// without an error and prepares nothing.
#[tokio::test]
async fn postgres_prepare_transaction_can_answer_without_error_and_prepare_nothing() {
    let pool = pool(4).await;
    // Outside a transaction block: a warning, no error, nothing prepared.
    let name = format!("probe-{}", uuid::Uuid::new_v4().simple());
    let mut a = pool.acquire().await.unwrap();
    exec(&mut a, &format!("PREPARE TRANSACTION '{name}'"))
        .await
        .expect("no error");
    assert!(!is_prepared(&pool, &name).await);
    // In a failed block: it rolls back, again without an error.
    let name = format!("probe-{}", uuid::Uuid::new_v4().simple());
    exec(&mut a, "BEGIN").await.unwrap();
    assert!(exec(&mut a, "SELECT 1/0").await.is_err());
    exec(&mut a, &format!("PREPARE TRANSACTION '{name}'"))
        .await
        .expect("no error");
    assert!(!is_prepared(&pool, &name).await);
    drop(a);

    // The helper does not acknowledge such a prepare: work that ends the
    // transaction itself gets an error back, and nothing is prepared.
    let xa = PgXa::new(pool.clone(), ClusterId::from_uuid(uuid::Uuid::new_v4()))
        .await
        .unwrap();
    let gid = tandem_sdk::new_gid();
    let result = xa
        .prepare(&ctx(&gid, "pg"), |conn| {
            Box::pin(async move {
                exec(conn, "COMMIT")
                    .await
                    .map_err(|e| BranchError::Transient(e.to_string()))
            })
        })
        .await;
    assert!(result.is_err(), "{result:?}");
    assert!(xa.prepared().await.unwrap().is_empty());
}

/// Atomicity (no half-done work left behind): a prepare whose caller gives
/// up in the middle of its work — as when the coordinator's connection
/// breaks — still ends its transaction (`prepare` runs it on a task of its
/// own) before the pooled connection is used again; the next user of the
/// pool's only connection works normally.
#[tokio::test]
async fn atomicity_a_cancelled_prepare_leaves_no_transaction_on_the_pool() {
    let pool = pool(1).await;
    let xa = PgXa::new(pool.clone(), ClusterId::from_uuid(uuid::Uuid::new_v4()))
        .await
        .unwrap();
    let gid = tandem_sdk::new_gid();
    let c = ctx(&gid, "pg");
    let prepare = xa.prepare(&c, |conn| {
        Box::pin(async move {
            // A failed statement the work goes past, then a long wait.
            let _ = exec(conn, "SELECT 1/0").await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok(())
        })
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), prepare)
            .await
            .is_err(),
        "the prepare was to be cancelled mid-work"
    );
    sqlx::query("SELECT 1")
        .execute(&pool)
        .await
        .expect("the pool's connection is not left in the cancelled transaction");
    assert!(xa.prepared().await.unwrap().is_empty());
}

/// Atomicity (no half-done work left behind): commits and rollbacks whose
/// caller gives up at every instant of their work — as when a coordinator
/// node dies with calls in flight — never hand the pool a connection inside
/// a transaction. (sqlx's `begin` cancelled after `BEGIN` went out leaves
/// the session in a transaction its guard does not know about; the next
/// user of the connection then works inside it, and after one failed
/// statement every statement fails with "current transaction is aborted".)
#[tokio::test]
async fn atomicity_commits_and_rollbacks_given_up_at_any_instant_leave_no_transaction_on_the_pool()
{
    let pool = pool(1).await;
    let xa = PgXa::new(pool.clone(), ClusterId::from_uuid(uuid::Uuid::new_v4()))
        .await
        .unwrap();
    give_up_at_every_instant(&xa, "pg", async |step| {
        // The pool's only connection: outside any transaction, and working.
        // (SAVEPOINT is refused outside a transaction block.)
        let mut conn = pool.acquire().await.unwrap();
        match exec(&mut conn, "SAVEPOINT tandem_probe").await {
            Err(e)
                if e.to_string()
                    .contains("can only be used in transaction blocks") => {}
            Err(e) => panic!("step {step}: the pool's connection is in a failed transaction: {e}"),
            Ok(()) => {
                panic!("step {step}: the pool's connection was handed back inside a transaction")
            }
        }
    })
    .await;
}

async fn commit_until_done(xa: &PgXa, ctx: &BranchContext) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match XaStore::commit(xa, ctx).await {
            Ok(()) => return,
            Err(BranchError::Transient(e)) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "retrying");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("commit of {} failed: {e}", ctx.gid),
        }
    }
}

/// The helper: every branch prepared by one instance and committed by
/// another, 5,000 times; every row checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn atomicity_postgres_helper_loses_no_commit_in_5000_prepare_commit_cycles() {
    const CYCLES: usize = 5_000;
    let pool = pool(24).await;
    let cluster = ClusterId::from_uuid(uuid::Uuid::new_v4());
    let preparer = PgXa::new(pool.clone(), cluster).await.unwrap();
    let committer = PgXa::new(pool.clone(), cluster).await.unwrap();
    let done = Arc::new(std::sync::Mutex::new(Vec::new()));
    futures::stream::iter(0..CYCLES)
        .for_each_concurrent(8, |_| {
            let (preparer, committer, done) = (preparer.clone(), committer.clone(), done.clone());
            async move {
                let probe = probe_id();
                let c = ctx(&tandem_sdk::new_gid(), "pg");
                preparer
                    .prepare(&c, move |conn| {
                        Box::pin(async move {
                            sqlx::query("INSERT INTO tandem_xa_probe (id, v) VALUES ($1, 1)")
                                .bind(probe)
                                .execute(&mut *conn)
                                .await
                                .map_err(|e| BranchError::Transient(e.to_string()))?;
                            Ok(())
                        })
                    })
                    .await
                    .expect("prepare");
                commit_until_done(&committer, &c).await;
                done.lock().unwrap().push((c.gid, probe));
            }
        })
        .await;
    let done = done.lock().unwrap().clone();
    let mut missing = Vec::new();
    for (gid, probe) in &done {
        let state: Option<String> =
            sqlx::query("SELECT state FROM tandem_xa_branches WHERE gid = $1 AND branch_id = 'pg'")
                .bind(gid)
                .fetch_optional(&pool)
                .await
                .unwrap()
                .map(|r| r.get(0));
        if probe_rows(&pool, *probe).await != 1 || state.as_deref() != Some("committed") {
            missing.push(gid.clone());
        }
    }
    assert_eq!(done.len(), CYCLES);
    assert!(
        missing.is_empty(),
        "{} acknowledged commits are not in the database: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(committer.prepared().await.unwrap().is_empty());
}

/// No blocking across a rolling upgrade: a database that a later SDK has
/// migrated (a migration this one does not know is recorded as applied)
/// still lets this SDK's XA helper start — sqlx refuses such a database
/// by default (`VersionMissing`).
#[tokio::test]
async fn no_blocking_the_postgres_helper_starts_on_a_database_a_later_sdk_migrated() {
    const LATER: i64 = 9_000_000_000_002;
    let pool = pool(2).await;
    let cluster = ClusterId::from_uuid(uuid::Uuid::new_v4());
    PgXa::new(pool.clone(), cluster).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, 'from a later sdk', TRUE, '\\x00', 0) ON CONFLICT DO NOTHING",
    )
    .bind(LATER)
    .execute(&pool)
    .await
    .unwrap();
    let started = PgXa::new(pool.clone(), cluster).await;
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(LATER)
        .execute(&pool)
        .await
        .unwrap();
    started.expect("the helper starts on a database with a later migration");
}
