//! Helpers shared by the SDK's tests against the real databases.

use std::time::{Duration, Instant};

use tandem_sdk::participant::{BranchContext, Fence};
use tandem_sdk::xa::XaStore;

/// Runs `CREATE TABLE IF NOT EXISTS …`, again after a pause if it fails:
/// PostgreSQL's `IF NOT EXISTS` does not hold against a concurrent
/// creator (a unique violation on `pg_type`), and the tests of one binary
/// create their tables at once against a new database.
pub async fn create_table<'p, DB>(pool: &'p sqlx::Pool<DB>, sql: &'static str)
where
    DB: sqlx::Database,
    &'p sqlx::Pool<DB>: sqlx::Executor<'p, Database = DB>,
{
    for attempt in 1.. {
        match sqlx::raw_sql(sql).execute(pool).await {
            Ok(_) => return,
            Err(e) if attempt < 5 => {
                eprintln!("{sql}: {e}; again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{sql}: {e}"),
        }
    }
}

pub fn ctx(gid: &str, branch: &str) -> BranchContext {
    BranchContext {
        gid: gid.into(),
        branch_id: branch.into(),
        op: "prepare".into(),
        protocol: "xa".into(),
        fence: Fence::default(),
    }
}

/// Runs `call` until it ends or `limit` has passed, and drops it there;
/// how long it took if it ended. Finer than a tokio timer (whose grain is
/// 1 ms): it polls until the instant.
pub async fn within(limit: Duration, call: impl Future<Output = ()>) -> Option<Duration> {
    let started = Instant::now();
    let deadline = started + limit;
    let mut call = std::pin::pin!(call);
    std::future::poll_fn(|cx| {
        if call.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Some(started.elapsed()));
        }
        if Instant::now() >= deadline {
            return std::task::Poll::Ready(None);
        }
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// 300 commits (one in three) and rollbacks of new branches of `xa`, each
/// given up at an instant spread over the length of a whole call (the
/// fastest call that ended so far, five rollbacks first: on a machine
/// whose speed drifts, as under the whole suite, a length measured once
/// left too few calls cut); after each, `probe(step)` checks what it left
/// behind. More than 100 must have been cut short.
pub async fn give_up_at_every_instant(
    xa: &impl XaStore,
    branch: &str,
    mut probe: impl AsyncFnMut(u32),
) {
    let mut whole = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        xa.rollback(&ctx(&tandem_sdk::new_gid(), branch))
            .await
            .unwrap();
        whole = whole.min(started.elapsed());
    }
    let mut cut = 0;
    for step in 0..300u32 {
        let c = ctx(&tandem_sdk::new_gid(), branch);
        let call = async {
            if step % 3 == 0 {
                let _ = xa.commit(&c).await;
            } else {
                let _ = xa.rollback(&c).await;
            }
        };
        match within(whole * step / 250, call).await {
            Some(took) => whole = whole.min(took),
            None => cut += 1,
        }
        probe(step).await;
    }
    assert!(cut > 100, "only {cut} of 300 calls were cut short");
}
