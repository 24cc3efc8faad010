//! The sub-transaction barrier on the real PostgreSQL, MariaDB and SQLite
//! (invariant 6, idempotency): repeated calls, a cancel before its try and
//! then the late try, and concurrent duplicates — the business effect
//! happens exactly once, or not at all for a cancelled try.

use tandem_sdk::participant::{BranchContext, BranchError, Fence};

#[allow(dead_code)]
mod common;

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

fn ctx(gid: &str, op: &str) -> BranchContext {
    BranchContext {
        gid: gid.to_string(),
        branch_id: "b1".into(),
        op: op.to_string(),
        protocol: "tcc".into(),
        fence: Fence::default(),
    }
}

/// One barrier suite per database. The business change appends a row to
/// `tandem_test_effects` (no key: a second run shows as a second row).
macro_rules! suite {
    ($module:ident, $barrier:ty, $conn:ty, $setup:expr, $insert:literal, $count:literal, $mark:literal, $unmark:literal) => {
        mod $module {
            use super::*;
            use futures::future::BoxFuture;
            use sqlx::Row;

            async fn barrier() -> $barrier {
                let pool = $setup.await;
                crate::common::create_table(
                    &pool,
                    "CREATE TABLE IF NOT EXISTS tandem_test_effects (gid VARCHAR(64) NOT NULL, op VARCHAR(16) NOT NULL)",
                )
                .await;
                <$barrier>::new(pool).await.expect("barrier migrations")
            }

            fn effect(gid: String, op: &'static str) -> impl for<'c> FnOnce(&'c mut $conn) -> BoxFuture<'c, Result<(), BranchError>> + Send + 'static {
                move |conn| {
                    Box::pin(async move {
                        sqlx::query($insert)
                            .bind(gid)
                            .bind(op)
                            .execute(&mut *conn)
                            .await
                            .map_err(|e| BranchError::Transient(e.to_string()))?;
                        Ok(())
                    })
                }
            }

            async fn count(b: &$barrier, gid: &str, op: &str) -> i64 {
                sqlx::query($count)
                    .bind(gid)
                    .bind(op)
                    .fetch_one(b.pool())
                    .await
                    .expect("count")
                    .get::<i64, _>(0)
            }

            async fn call(b: &$barrier, gid: &str, op: &'static str) -> Result<(), BranchError> {
                b.call(&ctx(gid, op), effect(gid.to_string(), op)).await
            }

            #[tokio::test]
            async fn idempotency_repeated_try_confirm_cancel_take_effect_once() {
                let b = barrier().await;
                let gid = uuid::Uuid::now_v7().to_string();
                for _ in 0..3 {
                    call(&b, &gid, "try").await.expect("try");
                }
                for _ in 0..2 {
                    call(&b, &gid, "confirm").await.expect("confirm");
                }
                assert_eq!(count(&b, &gid, "try").await, 1);
                assert_eq!(count(&b, &gid, "confirm").await, 1);

                let other = uuid::Uuid::now_v7().to_string();
                call(&b, &other, "try").await.unwrap();
                call(&b, &other, "cancel").await.unwrap();
                call(&b, &other, "cancel").await.unwrap();
                assert_eq!(count(&b, &other, "cancel").await, 1, "the undo ran once");
            }

            #[tokio::test]
            async fn idempotency_cancel_before_try_is_a_no_op_and_the_late_try_is_refused() {
                let b = barrier().await;
                let gid = uuid::Uuid::now_v7().to_string();
                call(&b, &gid, "cancel").await.expect("cancel before try succeeds");
                assert_eq!(count(&b, &gid, "cancel").await, 0, "nothing to undo");
                let late = call(&b, &gid, "try").await.unwrap_err();
                assert!(matches!(late, BranchError::Failure(_)), "{late:?}");
                assert!(late.to_string().contains("already undone by cancel"), "{late}");
                assert_eq!(count(&b, &gid, "try").await, 0, "no hanging reservation");
                // Same for a saga step's action after its compensation.
                let step = uuid::Uuid::now_v7().to_string();
                call(&b, &step, "compensate").await.unwrap();
                assert!(call(&b, &step, "action").await.is_err());
                assert_eq!(count(&b, &step, "action").await, 0);
            }

            #[tokio::test]
            async fn idempotency_concurrent_duplicates_take_effect_once() {
                let b = barrier().await;
                let gid = uuid::Uuid::now_v7().to_string();
                let calls = (0..8).map(|_| {
                    let (b, gid) = (b.clone(), gid.clone());
                    tokio::spawn(async move { call(&b, &gid, "action").await })
                });
                for result in futures::future::join_all(calls).await {
                    result.expect("task").expect("every duplicate succeeds");
                }
                assert_eq!(count(&b, &gid, "action").await, 1);
            }

            #[tokio::test]
            async fn a_failed_business_change_leaves_no_barrier_row() {
                let b = barrier().await;
                let gid = uuid::Uuid::now_v7().to_string();
                let failing = b
                    .call(&ctx(&gid, "action"), |_conn| {
                        Box::pin(async { Err(BranchError::Failure("out of stock".into())) })
                    })
                    .await;
                assert_eq!(failing, Err(BranchError::Failure("out of stock".into())));
                // The retry runs the change: the first attempt left nothing behind.
                call(&b, &gid, "action").await.unwrap();
                assert_eq!(count(&b, &gid, "action").await, 1);
            }

            /// No blocking (DESIGN.md §4, 3) across a rolling upgrade: a
            /// database where a later SDK recorded a migration this one
            /// does not know still takes this SDK's barrier (sqlx refuses
            /// such a database by default: `VersionMissing`).
            #[tokio::test]
            async fn no_blocking_the_barrier_starts_on_a_database_a_later_sdk_migrated() {
                const LATER: i64 = 9_000_000_000_003;
                let b = barrier().await;
                sqlx::query($mark).bind(LATER).execute(b.pool()).await.unwrap();
                let started = <$barrier>::new(b.pool().clone()).await;
                sqlx::query($unmark).bind(LATER).execute(b.pool()).await.unwrap();
                started.expect("the barrier starts on a database with a later migration");
            }
        }
    };
}

suite!(
    postgres,
    tandem_sdk::barrier::PgBarrier,
    sqlx::PgConnection,
    async {
        sqlx::PgPool::connect(PG_URL)
            .await
            .expect("PostgreSQL (run scripts/prepare-services.sh)")
    },
    "INSERT INTO tandem_test_effects (gid, op) VALUES ($1, $2)",
    "SELECT COUNT(*)::BIGINT FROM tandem_test_effects WHERE gid = $1 AND op = $2",
    "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
     VALUES ($1, 'from a later sdk', TRUE, '\\x00', 0) ON CONFLICT DO NOTHING",
    "DELETE FROM _sqlx_migrations WHERE version = $1"
);

suite!(
    mariadb,
    tandem_sdk::barrier::MySqlBarrier,
    sqlx::MySqlConnection,
    async {
        sqlx::MySqlPool::connect(MYSQL_URL)
            .await
            .expect("MariaDB (run scripts/prepare-services.sh)")
    },
    "INSERT INTO tandem_test_effects (gid, op) VALUES (?, ?)",
    "SELECT COUNT(*) FROM tandem_test_effects WHERE gid = ? AND op = ?",
    "INSERT IGNORE INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
     VALUES (?, 'from a later sdk', TRUE, X'00', 0)",
    "DELETE FROM _sqlx_migrations WHERE version = ?"
);

suite!(
    sqlite,
    tandem_sdk::barrier::SqliteBarrier,
    sqlx::SqliteConnection,
    async {
        // One file per test, kept for the process's life.
        let dir = Box::leak(Box::new(tempfile::tempdir().expect("temp dir")));
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("barrier.db"))
            .create_if_missing(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        sqlx::SqlitePool::connect_with(options)
            .await
            .expect("SQLite")
    },
    "INSERT INTO tandem_test_effects (gid, op) VALUES (?, ?)",
    "SELECT COUNT(*) FROM tandem_test_effects WHERE gid = ? AND op = ?",
    "INSERT OR IGNORE INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
     VALUES (?, 'from a later sdk', TRUE, X'00', 0)",
    "DELETE FROM _sqlx_migrations WHERE version = ?"
);
