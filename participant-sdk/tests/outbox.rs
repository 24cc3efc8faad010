//! The outbox's local half on the real PostgreSQL, MariaDB and SQLite
//! (invariant 7: a message is delivered if and only if its local
//! transaction committed): the business change and the marker commit
//! together or not at all, and the check-back is decisive — it answers from
//! the marker, writes "rolled back" when there is none (a late local
//! transaction then fails), and waits for a local transaction still in
//! flight, ending exactly one way. No coordinator is needed for this half.

use std::time::Duration;

use tandem_sdk::outbox::OutboxError;
use tandem_sdk::participant::BranchError;

#[allow(dead_code)]
mod common;

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

macro_rules! suite {
    ($module:ident, $outbox:ty, $conn:ty, $setup:expr, $insert:literal, $count:literal) => {
        mod $module {
            use super::*;
            use futures::future::BoxFuture;
            use sqlx::Row;

            async fn outbox() -> $outbox {
                let pool = $setup.await;
                crate::common::create_table(
                    &pool,
                    "CREATE TABLE IF NOT EXISTS tandem_test_orders (gid VARCHAR(64) NOT NULL)",
                )
                .await;
                <$outbox>::new(pool).await.expect("outbox migrations")
            }

            /// The order row, after `delay`; then fails if `fail`.
            fn order(
                gid: &str,
                delay: Duration,
                fail: bool,
            ) -> impl for<'c> FnOnce(&'c mut $conn) -> BoxFuture<'c, Result<(), BranchError>>
            + Send
            + 'static {
                let gid = gid.to_string();
                move |conn| {
                    Box::pin(async move {
                        tokio::time::sleep(delay).await;
                        sqlx::query($insert)
                            .bind(gid)
                            .execute(&mut *conn)
                            .await
                            .map_err(|e| BranchError::Transient(e.to_string()))?;
                        if fail {
                            return Err(BranchError::Failure("declined".into()));
                        }
                        Ok(())
                    })
                }
            }

            async fn orders(o: &$outbox, gid: &str) -> i64 {
                sqlx::query($count)
                    .bind(gid)
                    .fetch_one(o.pool())
                    .await
                    .expect("count")
                    .get::<i64, _>(0)
            }

            fn gid() -> String {
                uuid::Uuid::now_v7().to_string()
            }

            #[tokio::test]
            async fn messages_check_back_answers_committed_after_a_local_commit() {
                let o = outbox().await;
                let g = gid();
                o.commit_local(&g, order(&g, Duration::ZERO, false)).await.expect("commit");
                assert_eq!(o.check_back(&g).await, Ok(()));
                assert_eq!(o.check_back(&g).await, Ok(()), "asked again: the same");
                assert_eq!(orders(&o, &g).await, 1);
            }

            #[tokio::test]
            async fn messages_check_back_without_a_marker_rolls_back_for_good() {
                let o = outbox().await;
                let g = gid();
                let answer = o.check_back(&g).await;
                assert!(matches!(&answer, Err(BranchError::Failure(m)) if m.contains("rolled back")), "{answer:?}");
                let late = o.commit_local(&g, order(&g, Duration::ZERO, false)).await;
                assert!(matches!(late, Err(OutboxError::RolledBack(_))), "{late:?}");
                assert_eq!(orders(&o, &g).await, 0, "the late local transaction left nothing");
                assert!(o.check_back(&g).await.is_err(), "still rolled back");
            }

            #[tokio::test]
            async fn messages_a_failed_business_change_leaves_no_marker() {
                let o = outbox().await;
                let g = gid();
                let failed = o.commit_local(&g, order(&g, Duration::ZERO, true)).await;
                assert!(matches!(failed, Err(OutboxError::RolledBack(BranchError::Failure(_)))), "{failed:?}");
                assert_eq!(orders(&o, &g).await, 0);
                assert!(o.check_back(&g).await.is_err(), "no marker: rolled back");
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn messages_a_second_check_back_does_not_wait_beside_the_first() {
                let o = outbox().await;
                let g = gid();
                let local = {
                    let (o, g) = (o.clone(), g.clone());
                    tokio::spawn(async move {
                        o.commit_local(&g, order(&g, Duration::from_millis(800), false)).await
                    })
                };
                tokio::time::sleep(Duration::from_millis(200)).await;
                let first = {
                    let (o, g) = (o.clone(), g.clone());
                    tokio::spawn(async move { o.check_back(&g).await })
                };
                tokio::time::sleep(Duration::from_millis(100)).await;
                let asked = std::time::Instant::now();
                let second = o.check_back(&g).await;
                assert!(
                    matches!(&second, Err(BranchError::Transient(m)) if m.contains("already waiting")),
                    "{second:?}"
                );
                assert!(asked.elapsed() < Duration::from_millis(300), "answered at once");
                local.await.expect("local task").expect("local commit");
                assert_eq!(first.await.expect("first"), Ok(()));
                assert_eq!(o.check_back(&g).await, Ok(()), "asked again once done: the answer");
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn messages_check_back_waits_for_a_local_transaction_in_flight() {
                let o = outbox().await;
                for fail in [false, true] {
                    let g = gid();
                    let local = {
                        let (o, g) = (o.clone(), g.clone());
                        tokio::spawn(async move {
                            o.commit_local(&g, order(&g, Duration::from_millis(800), fail)).await
                        })
                    };
                    // The local transaction holds its marker by now.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let asked = std::time::Instant::now();
                    let answer = o.check_back(&g).await;
                    let waited = asked.elapsed();
                    let local = local.await.expect("local task");
                    assert!(
                        waited >= Duration::from_millis(400),
                        "{g}: the check-back answered after {waited:?}, without waiting for the local transaction"
                    );
                    let committed = orders(&o, &g).await == 1;
                    assert_eq!(committed, !fail, "{g}: {local:?}");
                    assert_eq!(answer.is_ok(), committed, "{g}: check-back {answer:?}, local {local:?}");
                }
            }
        }
    };
}

suite!(
    postgres,
    tandem_sdk::outbox::PgOutbox,
    sqlx::PgConnection,
    async {
        sqlx::PgPool::connect(PG_URL)
            .await
            .expect("PostgreSQL (run scripts/prepare-services.sh)")
    },
    "INSERT INTO tandem_test_orders (gid) VALUES ($1)",
    "SELECT COUNT(*)::BIGINT FROM tandem_test_orders WHERE gid = $1"
);

suite!(
    mariadb,
    tandem_sdk::outbox::MySqlOutbox,
    sqlx::MySqlConnection,
    async {
        sqlx::MySqlPool::connect(MYSQL_URL)
            .await
            .expect("MariaDB (run scripts/prepare-services.sh)")
    },
    "INSERT INTO tandem_test_orders (gid) VALUES (?)",
    "SELECT COUNT(*) FROM tandem_test_orders WHERE gid = ?"
);

suite!(
    sqlite,
    tandem_sdk::outbox::SqliteOutbox,
    sqlx::SqliteConnection,
    async {
        let dir = Box::leak(Box::new(tempfile::tempdir().expect("temp dir")));
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("outbox.db"))
            .create_if_missing(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        sqlx::SqlitePool::connect_with(options)
            .await
            .expect("SQLite")
    },
    "INSERT INTO tandem_test_orders (gid) VALUES (?)",
    "SELECT COUNT(*) FROM tandem_test_orders WHERE gid = ?"
);
