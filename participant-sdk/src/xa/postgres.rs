//! XA on PostgreSQL: `BEGIN`, the work, the branch row, `PREPARE TRANSACTION
//! 'xid'`; later `COMMIT PREPARED` / `ROLLBACK PREPARED`. Needs
//! `max_prepared_transactions > 0`.
//!
//! The xid is `tdm:<cluster id, 16 hex>:<branch length>:<branch>:<gid>`, at
//! most 199 bytes (PostgreSQL's limit) — which bounds the gid and branch id.
//!
//! What this relies on (each pinned by `tests/xa_postgres.rs`): a
//! transaction prepared with `PREPARE TRANSACTION` belongs to no session
//! any more, survives the session's end, and any session of the same
//! database may `COMMIT PREPARED` it; a name that is not prepared makes
//! `COMMIT PREPARED` fail (never a silent OK). But `PREPARE TRANSACTION`
//! itself can answer without an error and prepare nothing (outside a
//! transaction block it only warns; in a failed one it rolls back): so a
//! prepare is acknowledged only once `pg_prepared_xacts` lists it, and a
//! commit only once the branch row is visible as `committed`.

use futures::future::BoxFuture;
use sqlx::{Connection, PgConnection, PgPool, Row};

use super::{
    BranchRow, Dialect, PreparedBranch, commit_by_row, late_prepare, rollback_by_row, transient,
};
use crate::client::ClusterId;
use crate::participant::{BranchContext, BranchError};

/// PostgreSQL's limit on a prepared transaction's name.
const XID_BYTES_MAX: usize = 199;
/// How long a rollback waits for a concurrent prepare's row lock.
const LOCK_TIMEOUT: &str = "2s";

/// XA branches in one PostgreSQL database, for one coordinator cluster.
#[derive(Clone)]
pub struct PgXa {
    pool: PgPool,
    /// `tdm:<cluster id, 16 hex>:`, the start of every xid of this cluster.
    prefix: String,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl PgXa {
    /// XA branches in the database behind `pool`, for the coordinator
    /// cluster `cluster` ([`crate::Client::cluster_id`]). Applies
    /// `migrations/postgres`.
    pub async fn new(pool: PgPool, cluster: ClusterId) -> Result<PgXa, sqlx::Error> {
        crate::barrier::tolerant(sqlx::migrate!("../migrations/postgres"))
            .run(&pool)
            .await?;
        Ok(PgXa {
            pool,
            prefix: format!("tdm:{}:", cluster.short_hex()),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn xid(&self, gid: &str, branch_id: &str) -> Result<String, BranchError> {
        let xid = format!("{}{}:{branch_id}:{gid}", self.prefix, branch_id.len());
        if xid.len() > XID_BYTES_MAX {
            return Err(BranchError::Failure(format!(
                "transaction {gid}: gid and branch id {branch_id} are too long for a PostgreSQL xid ({} bytes; the limit is {XID_BYTES_MAX})",
                xid.len()
            )));
        }
        Ok(xid)
    }

    fn parse_xid(&self, xid: &str) -> Option<PreparedBranch> {
        let rest = xid.strip_prefix(&self.prefix)?;
        let (len, rest) = rest.split_once(':')?;
        let len: usize = len.parse().ok()?;
        let branch_id = rest.get(..len)?;
        let gid = rest.get(len..)?.strip_prefix(':')?;
        Some(PreparedBranch {
            gid: gid.to_string(),
            branch_id: branch_id.to_string(),
        })
    }

    fn is_prepared<'a>(
        conn: &'a mut PgConnection,
        xid: &'a str,
    ) -> BoxFuture<'a, Result<bool, BranchError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 AND database = current_database()",
            )
            .bind(xid)
            .fetch_optional(&mut *conn)
            .await
            .map_err(transient)?;
            Ok(row.is_some())
        })
    }

    fn row_state<'a>(
        conn: &'a mut PgConnection,
        ctx: &'a BranchContext,
    ) -> BoxFuture<'a, Result<Option<BranchRow>, BranchError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT state, fence_term, fence_index FROM tandem_xa_branches WHERE gid = $1 AND branch_id = $2",
            )
            .bind(&ctx.gid)
            .bind(&ctx.branch_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(transient)?;
            Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
        })
    }

    /// Runs `work` in a new transaction on one connection, records the
    /// branch, and prepares it under this branch's xid. Repeating it for a
    /// branch already prepared or committed succeeds without running `work`
    /// again; after a rollback it is refused.
    pub async fn prepare<F>(&self, ctx: &BranchContext, work: F) -> Result<(), BranchError>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<(), BranchError>>
            + Send
            + 'static,
    {
        let xid = self.xid(&ctx.gid, &ctx.branch_id)?;
        let this = self.clone();
        let ctx = ctx.clone();
        // Spawned so that a caller who gives up (a dropped HTTP request)
        // cannot cancel it half-way with a transaction open on a pooled
        // connection.
        tokio::spawn(async move { this.prepare_inner(&ctx, &xid, work).await })
            .await
            .map_err(transient)?
    }

    /// Boxed with an explicit `Send` bound: rustc cannot prove the future
    /// of an `async fn` that borrows a sqlx connection `Send` for any
    /// lifetime inside `tokio::spawn`.
    fn prepare_inner<'a, F>(
        &'a self,
        ctx: &'a BranchContext,
        xid: &'a str,
        work: F,
    ) -> BoxFuture<'a, Result<(), BranchError>>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<(), BranchError>>
            + Send
            + 'a,
    {
        Box::pin(async move {
            let mut conn = self.pool.acquire().await.map_err(transient)?;
            if Self::is_prepared(&mut conn, xid).await? {
                return Ok(());
            }
            match Self::row_state(&mut conn, ctx).await? {
                Some((state, ..)) if state == "committed" => return Ok(()),
                Some(_) => return Err(late_prepare(ctx)),
                None => {}
            }
            sqlx::Executor::execute(&mut *conn, sqlx::raw_sql("BEGIN"))
                .await
                .map_err(transient)?;
            let result = async {
                work(&mut conn).await?;
                sqlx::query(
                    "INSERT INTO tandem_xa_branches (gid, branch_id, state, fence_term, fence_index) VALUES ($1, $2, 'committed', $3, $4)",
                )
                .bind(&ctx.gid)
                .bind(&ctx.branch_id)
                .bind(ctx.fence.term as i64)
                .bind(ctx.fence.index as i64)
                .execute(&mut *conn)
                .await
                .map_err(|e| match &e {
                    sqlx::Error::Database(d) if d.is_unique_violation() => late_prepare(ctx),
                    _ => transient(e),
                })?;
                sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(&format!("PREPARE TRANSACTION {}", quote(xid))))
                    .await
                    .map_err(transient)?;
                // Evidence: PREPARE TRANSACTION can answer without an error
                // and prepare nothing (no transaction block open any more,
                // or a failed one it rolled back).
                if !Self::is_prepared(&mut conn, xid).await? {
                    return Err(BranchError::Transient(format!(
                        "branch {} of transaction {}: PREPARE TRANSACTION answered but nothing is prepared \
                         (did the work end the transaction itself?)",
                        ctx.branch_id, ctx.gid
                    )));
                }
                Ok(())
            }
            .await;
            if result.is_err()
                && sqlx::Executor::execute(&mut *conn, sqlx::raw_sql("ROLLBACK"))
                    .await
                    .is_err()
            {
                // Never hand a connection in an unknown state back to the pool.
                let _ = conn.detach().close().await;
            }
            result
        })
    }

    fn commit_inner<'a>(
        &'a self,
        ctx: &'a BranchContext,
    ) -> BoxFuture<'a, Result<(), BranchError>> {
        Box::pin(async move {
            let xid = self.xid(&ctx.gid, &ctx.branch_id)?;
            let mut conn = self.pool.acquire().await.map_err(transient)?;
            if Self::is_prepared(&mut conn, &xid).await? {
                sqlx::Executor::execute(
                    &mut *conn,
                    sqlx::raw_sql(&format!("COMMIT PREPARED {}", quote(&xid))),
                )
                .await
                .map_err(transient)?;
                // Evidence: the branch row, written inside the prepared
                // transaction, is visible.
                return match Self::row_state(&mut conn, ctx).await? {
                    Some((state, ..)) if state == "committed" => Ok(()),
                    other => Err(BranchError::Transient(format!(
                        "branch {} of transaction {}: COMMIT PREPARED answered OK but the branch row is {}; \
                         the commit is not acknowledged",
                        ctx.branch_id,
                        ctx.gid,
                        other.map_or_else(
                            || "absent".to_string(),
                            |(s, ..)| format!("in state {s}")
                        )
                    ))),
                };
            }
            commit_by_row(ctx, Self::row_state(&mut conn, ctx).await?)
        })
    }

    fn rollback_inner<'a>(
        &'a self,
        ctx: &'a BranchContext,
    ) -> BoxFuture<'a, Result<(), BranchError>> {
        Box::pin(async move {
            let xid = self.xid(&ctx.gid, &ctx.branch_id)?;
            let mut conn = self.pool.acquire().await.map_err(transient)?;
            if let Some(done) = rollback_by_row(ctx, Self::row_state(&mut conn, ctx).await?) {
                return done;
            }
            if Self::is_prepared(&mut conn, &xid).await? {
                sqlx::Executor::execute(
                    &mut *conn,
                    sqlx::raw_sql(&format!("ROLLBACK PREPARED {}", quote(&xid))),
                )
                .await
                .map_err(transient)?;
            }
            // The tombstone. A prepare still running holds this key's lock: wait
            // briefly, then let the coordinator retry (it will find it prepared).
            let mut tx = conn.begin().await.map_err(transient)?;
            sqlx::Executor::execute(
                &mut *tx,
                sqlx::raw_sql(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")),
            )
            .await
            .map_err(transient)?;
            let inserted = sqlx::query(
                "INSERT INTO tandem_xa_branches (gid, branch_id, state, fence_term, fence_index) VALUES ($1, $2, 'rolledback', $3, $4) ON CONFLICT (gid, branch_id) DO NOTHING",
            )
            .bind(&ctx.gid)
            .bind(&ctx.branch_id)
            .bind(ctx.fence.term as i64)
            .bind(ctx.fence.index as i64)
            .execute(&mut *tx)
            .await
            .map_err(transient)?;
            tx.commit().await.map_err(transient)?;
            if inserted.rows_affected() == 0 {
                // Someone else's row appeared meanwhile: look again next time.
                return Err(BranchError::Transient(
                    "branch row changed during rollback; retry".into(),
                ));
            }
            Ok(())
        })
    }
}

impl Dialect for PgXa {
    const LISTING: &'static str = "pg_prepared_xacts";

    async fn scan(&self) -> Result<(Vec<PreparedBranch>, Vec<String>), BranchError> {
        let rows =
            sqlx::query("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
                .fetch_all(&self.pool)
                .await
                .map_err(transient)?;
        let mut ours = Vec::new();
        let mut others = Vec::new();
        for row in rows {
            let xid: String = row.get(0);
            match self.parse_xid(&xid) {
                Some(branch) => ours.push(branch),
                None => others.push(xid),
            }
        }
        Ok((ours, others))
    }

    async fn commit_prepared(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        self.commit_inner(ctx).await
    }

    async fn rollback_prepared(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        self.rollback_inner(ctx).await
    }
}
