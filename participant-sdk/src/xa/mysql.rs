//! XA on MariaDB/MySQL: `XA START`, the work, the branch row, `XA END`,
//! `XA PREPARE`; later `XA COMMIT` / `XA ROLLBACK`; `XA RECOVER` lists what
//! is prepared.
//!
//! The xid is (gtrid = gid, bqual = branch id, formatID = the cluster's
//! format id), written as hex literals so no character needs escaping.
//! MySQL limits gtrid and bqual to 64 bytes each.

use futures::future::BoxFuture;
use sqlx::{Connection, MySqlConnection, MySqlPool, Row};

use super::{BranchRow, PreparedBranch, XaStore, format_id, transient};
use crate::participant::{BranchContext, BranchError, TwoPhaseResource};

const PART_BYTES_MAX: usize = 64;
/// Seconds a rollback waits for a concurrent prepare's row lock.
const LOCK_WAIT_SECONDS: u32 = 2;

/// XA branches in one MariaDB/MySQL database, for one coordinator cluster.
#[derive(Clone)]
pub struct MySqlXa {
    pool: MySqlPool,
    format_id: i32,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl MySqlXa {
    /// XA branches in the database behind `pool`, for the coordinator
    /// cluster named `cluster_name`. Applies `migrations/mysql`.
    pub async fn new(pool: MySqlPool, cluster_name: &str) -> Result<MySqlXa, sqlx::Error> {
        sqlx::migrate!("../migrations/mysql").run(&pool).await?;
        Ok(MySqlXa {
            pool,
            format_id: format_id(cluster_name),
        })
    }

    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    fn xid(&self, gid: &str, branch_id: &str) -> Result<String, BranchError> {
        for (what, part) in [("gid", gid), ("branch id", branch_id)] {
            if part.len() > PART_BYTES_MAX {
                return Err(BranchError::Failure(format!(
                    "transaction {gid}: the {what} is {} bytes; MySQL XA allows {PART_BYTES_MAX}",
                    part.len()
                )));
            }
        }
        Ok(format!(
            "X'{}',X'{}',{}",
            hex(gid.as_bytes()),
            hex(branch_id.as_bytes()),
            self.format_id
        ))
    }

    fn prepared_xids<'a>(
        conn: &'a mut MySqlConnection,
        format_id: i32,
    ) -> BoxFuture<'a, Result<Vec<PreparedBranch>, BranchError>> {
        Box::pin(async move {
            // Through Executor directly: RawSql::fetch_all's generic executor
            // bound defeats rustc's Send proof inside spawned tasks.
            let rows = sqlx::Executor::fetch_all(&mut *conn, sqlx::raw_sql("XA RECOVER"))
                .await
                .map_err(transient)?;
            let mut out = Vec::new();
            for row in rows {
                let format: i64 = row.try_get(0).map_err(transient)?;
                if format != i64::from(format_id) {
                    continue;
                }
                let gtrid_len: i64 = row.try_get(1).map_err(transient)?;
                let data: Vec<u8> = match row.try_get::<Vec<u8>, _>(3) {
                    Ok(d) => d,
                    Err(_) => row.try_get::<String, _>(3).map_err(transient)?.into_bytes(),
                };
                let (gtrid, bqual) = data.split_at((gtrid_len as usize).min(data.len()));
                out.push(PreparedBranch {
                    gid: String::from_utf8_lossy(gtrid).into_owned(),
                    branch_id: String::from_utf8_lossy(bqual).into_owned(),
                });
            }
            Ok(out)
        })
    }

    fn is_prepared<'a>(
        &'a self,
        conn: &'a mut MySqlConnection,
        ctx: &'a BranchContext,
    ) -> BoxFuture<'a, Result<bool, BranchError>> {
        Box::pin(async move {
            Ok(Self::prepared_xids(conn, self.format_id)
                .await?
                .iter()
                .any(|p| p.gid == ctx.gid && p.branch_id == ctx.branch_id))
        })
    }

    fn row_state<'a>(
        conn: &'a mut MySqlConnection,
        ctx: &'a BranchContext,
    ) -> BoxFuture<'a, Result<Option<BranchRow>, BranchError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT state, fence_term, fence_index FROM tandem_xa_branches WHERE gid = ? AND branch_id = ?",
            )
            .bind(&ctx.gid)
            .bind(&ctx.branch_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(transient)?;
            Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
        })
    }

    /// Runs `work` inside `XA START … XA END` on one connection, records the
    /// branch, and prepares it. Repeating it for a branch already prepared or
    /// committed succeeds without running `work` again; after a rollback it
    /// is refused.
    pub async fn prepare<F>(&self, ctx: &BranchContext, work: F) -> Result<(), BranchError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<(), BranchError>>
            + Send
            + 'static,
    {
        let xid = self.xid(&ctx.gid, &ctx.branch_id)?;
        let this = self.clone();
        let ctx = ctx.clone();
        // Spawned so that a caller who gives up cannot cancel it half-way.
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
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<(), BranchError>>
            + Send
            + 'a,
    {
        Box::pin(async move {
            let mut conn = self.pool.acquire().await.map_err(transient)?;
            if self.is_prepared(&mut conn, ctx).await? {
                return Ok(());
            }
            match Self::row_state(&mut conn, ctx).await? {
                Some((state, ..)) if state == "committed" => return Ok(()),
                Some(_) => return Err(late_prepare(ctx)),
                None => {}
            }
            // A session that prepared an XA branch can do nothing else until it
            // ends: this connection leaves the pool for good.
            let mut conn = conn.detach();
            sqlx::Executor::execute(&mut conn, sqlx::raw_sql(&format!("XA START {xid}")))
                .await
                .map_err(transient)?;
            let result = async {
                work(&mut conn).await?;
                sqlx::query(
                    "INSERT INTO tandem_xa_branches (gid, branch_id, state, fence_term, fence_index) VALUES (?, ?, 'committed', ?, ?)",
                )
                .bind(&ctx.gid)
                .bind(&ctx.branch_id)
                .bind(ctx.fence.term as i64)
                .bind(ctx.fence.index as i64)
                .execute(&mut conn)
                .await
                .map_err(|e| match &e {
                    sqlx::Error::Database(d) if d.is_unique_violation() => late_prepare(ctx),
                    _ => transient(e),
                })?;
                sqlx::Executor::execute(&mut conn, sqlx::raw_sql(&format!("XA END {xid}")))
                    .await
                    .map_err(transient)?;
                sqlx::Executor::execute(&mut conn, sqlx::raw_sql(&format!("XA PREPARE {xid}")))
                    .await
                    .map_err(transient)?;
                Ok(())
            }
            .await;
            if result.is_err() {
                let _ = sqlx::Executor::execute(&mut conn, sqlx::raw_sql(&format!("XA END {xid}")))
                    .await;
                let _ = sqlx::Executor::execute(
                    &mut conn,
                    sqlx::raw_sql(&format!("XA ROLLBACK {xid}")),
                )
                .await;
            }
            // A prepared branch survives the disconnect (MariaDB ≥ 10.5, MySQL ≥ 5.7).
            let _ = conn.close().await;
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
            if self.is_prepared(&mut conn, ctx).await? {
                sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(&format!("XA COMMIT {xid}")))
                    .await
                    .map_err(transient)?;
                return Ok(());
            }
            match Self::row_state(&mut conn, ctx).await? {
                Some((state, ..)) if state == "committed" => Ok(()),
                Some(_) => Err(BranchError::Failure(format!(
                    "branch {} of transaction {} was rolled back; it cannot commit",
                    ctx.branch_id, ctx.gid
                ))),
                None => Err(BranchError::Failure(format!(
                    "branch {} of transaction {} was never prepared here",
                    ctx.branch_id, ctx.gid
                ))),
            }
        })
    }

    fn rollback_inner<'a>(
        &'a self,
        ctx: &'a BranchContext,
    ) -> BoxFuture<'a, Result<(), BranchError>> {
        Box::pin(async move {
            let xid = self.xid(&ctx.gid, &ctx.branch_id)?;
            let mut conn = self.pool.acquire().await.map_err(transient)?;
            if let Some((state, term, index)) = Self::row_state(&mut conn, ctx).await? {
                if state == "committed" {
                    return Err(BranchError::Failure(format!(
                        "branch {} of transaction {} is committed; it cannot roll back",
                        ctx.branch_id, ctx.gid
                    )));
                }
                if (term as u64, index as u64) > (ctx.fence.term, ctx.fence.index) {
                    return Err(BranchError::Failure("stale fencing token".into()));
                }
                return Ok(());
            }
            if self.is_prepared(&mut conn, ctx).await? {
                sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(&format!("XA ROLLBACK {xid}")))
                    .await
                    .map_err(transient)?;
            }
            sqlx::Executor::execute(
                &mut *conn,
                sqlx::raw_sql(&format!(
                    "SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_SECONDS}"
                )),
            )
            .await
            .map_err(transient)?;
            let mut tx = conn.begin().await.map_err(transient)?;
            let inserted = sqlx::query(
                "INSERT IGNORE INTO tandem_xa_branches (gid, branch_id, state, fence_term, fence_index) VALUES (?, ?, 'rolledback', ?, ?)",
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
                return Err(BranchError::Transient(
                    "branch row changed during rollback; retry".into(),
                ));
            }
            Ok(())
        })
    }
}

fn late_prepare(ctx: &BranchContext) -> BranchError {
    BranchError::Failure(format!(
        "branch {} of transaction {} was already rolled back; late prepare refused",
        ctx.branch_id, ctx.gid
    ))
}

impl XaStore for MySqlXa {
    async fn prepared(&self) -> Result<Vec<PreparedBranch>, BranchError> {
        let mut conn = self.pool.acquire().await.map_err(transient)?;
        Self::prepared_xids(&mut conn, self.format_id).await
    }

    async fn commit(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        self.commit_inner(ctx).await
    }

    async fn rollback(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        self.rollback_inner(ctx).await
    }
}

/// Serves commit and rollback for the coordinator; XA branches prepare in
/// the application's call ([`MySqlXa::prepare`]).
impl TwoPhaseResource for MySqlXa {
    async fn prepare(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), BranchError> {
        Err(BranchError::Failure(format!(
            "transaction {}: XA branches prepare in the application's call, not on the coordinator's request",
            ctx.gid
        )))
    }

    async fn commit(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        self.commit_inner(ctx).await
    }

    async fn rollback(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        self.rollback_inner(ctx).await
    }
}
