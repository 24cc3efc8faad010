//! The sub-transaction barrier: makes every participant call safe to receive
//! more than once, late, or out of order, on PostgreSQL, MariaDB/MySQL and
//! SQLite.
//!
//! `barrier.call(&ctx, |conn| business)` runs the business change and the
//! barrier rows in **one local transaction**:
//!
//! * every op writes its row `(gid, branch_id, op)`; if the row is already
//!   there, the op already happened: it succeeds without running again;
//! * an undo (`cancel`, `compensate`, `rollback`) first writes the row of its
//!   forward op (`try`, `action`, `prepare`) with itself as the reason: if
//!   that succeeds, the forward op never ran, so the undo is a no-op — and
//!   the forward op, arriving late, finds its row taken by the undo and is
//!   refused (no hanging reservation);
//! * concurrent duplicates serialize on the primary key: one does the work,
//!   the others see its row once it commits.
//!
//! If the business change fails, the whole local transaction — barrier rows
//! included — rolls back, so a retry starts clean.

use futures::future::BoxFuture;

use crate::participant::{BranchContext, BranchError, ops};

/// The forward op an undo cancels.
fn origin_of(op: &str) -> Option<&'static str> {
    match op {
        ops::CANCEL => Some(ops::TRY),
        ops::COMPENSATE => Some(ops::ACTION),
        ops::ROLLBACK => Some(ops::PREPARE),
        _ => None,
    }
}

/// The SDK's migrations as a rolling upgrade needs them run: those a later
/// SDK already applied to the database are no error — both versions run
/// against it meanwhile, and sqlx would otherwise refuse
/// (`VersionMissing`). The SDK's schema changes only ever add.
pub(crate) fn tolerant(mut migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

fn transient(e: impl std::fmt::Display) -> BranchError {
    BranchError::Transient(e.to_string())
}

/// How a local transaction ended.
pub(crate) enum Local<T> {
    Committed(T),
    /// Rolled back (or never begun): the error that made it so.
    RolledBack(BranchError),
    /// COMMIT failed on the way (the connection broke): it may have
    /// committed or not.
    Unknown(String),
}

/// What the barrier decided before the business change.
enum Gate {
    /// Run the business change.
    Run,
    /// Already done (a repeat), or an undo of something that never ran.
    Skip,
}

fn refused(ctx: &BranchContext, reason: &str) -> BranchError {
    BranchError::Failure(format!(
        "branch {} of transaction {}: {} refused, the branch was already undone by {reason}",
        ctx.branch_id, ctx.gid, ctx.op
    ))
}

macro_rules! barrier {
    (
        $(#[$doc:meta])*
        $name:ident, $pool:ty, $conn:ty, $migrations:literal,
        begin: $begin:literal,
        insert: $insert:literal,
        select: $select:literal
    ) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name {
            pool: $pool,
        }

        impl $name {
            /// The barrier in the database behind `pool`; applies the
            /// migrations that create its table.
            pub async fn new(pool: $pool) -> Result<Self, sqlx::Error> {
                $crate::barrier::tolerant(sqlx::migrate!($migrations))
                    .run(&pool)
                    .await?;
                Ok($name { pool })
            }

            pub fn pool(&self) -> &$pool {
                &self.pool
            }

            /// Runs `business` at most once for `ctx` (gid, branch, op), in
            /// one local transaction with the barrier rows. See the module
            /// documentation for what happens to repeats and late calls.
            pub async fn call<F>(&self, ctx: &BranchContext, business: F) -> Result<(), BranchError>
            where
                F: for<'c> FnOnce(&'c mut $conn) -> BoxFuture<'c, Result<(), BranchError>> + Send + 'static,
            {
                let this = self.clone();
                let ctx = ctx.clone();
                // Spawned: a caller that gives up must not cancel it with a
                // local transaction open on a pooled connection.
                tokio::spawn(async move { this.run(ctx, business).await })
                    .await
                    .map_err(transient)?
            }

            /// Writes the row `(gid, branch_id, op)` with `reason`; whether
            /// it was not there yet (a concurrent uncommitted insert of the
            /// same key is waited for).
            pub(crate) fn insert<'a>(
                conn: &'a mut $conn,
                key: (&'a str, &'a str, &'a str),
                reason: &'a str,
            ) -> BoxFuture<'a, Result<bool, BranchError>> {
                Box::pin(async move {
                    let done = sqlx::query($insert)
                        .bind(key.0)
                        .bind(key.1)
                        .bind(key.2)
                        .bind(reason)
                        .execute(&mut *conn)
                        .await
                        .map_err(transient)?;
                    Ok(done.rows_affected() == 1)
                })
            }

            /// The reason of the row `(gid, branch_id, op)`, which exists.
            pub(crate) fn reason<'a>(
                conn: &'a mut $conn,
                key: (&'a str, &'a str, &'a str),
            ) -> BoxFuture<'a, Result<String, BranchError>> {
                Box::pin(async move {
                    use sqlx::Row;
                    let row = sqlx::query($select)
                        .bind(key.0)
                        .bind(key.1)
                        .bind(key.2)
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(transient)?;
                    row.try_get::<String, _>(0).map_err(transient)
                })
            }

            fn gate<'a>(conn: &'a mut $conn, ctx: &'a BranchContext) -> BoxFuture<'a, Result<Gate, BranchError>> {
                Box::pin(async move {
                    let op = ctx.op.as_str();
                    let key = |op| (ctx.gid.as_str(), ctx.branch_id.as_str(), op);
                    if let Some(origin) = origin_of(op) {
                        if Self::insert(conn, key(origin), op).await? {
                            // The forward op never ran: nothing to undo. Its
                            // row is now taken, so it will be refused.
                            Self::insert(conn, key(op), op).await?;
                            return Ok(Gate::Skip);
                        }
                    }
                    if Self::insert(conn, key(op), op).await? {
                        return Ok(Gate::Run);
                    }
                    let reason = Self::reason(conn, key(op)).await?;
                    if reason == op {
                        Ok(Gate::Skip)
                    } else {
                        Err(refused(ctx, &reason))
                    }
                })
            }

            async fn run<F>(&self, ctx: BranchContext, business: F) -> Result<(), BranchError>
            where
                F: for<'c> FnOnce(&'c mut $conn) -> BoxFuture<'c, Result<(), BranchError>> + Send + 'static,
            {
                let ended = self
                    .local(move |conn| {
                        Box::pin(async move {
                            match Self::gate(conn, &ctx).await? {
                                Gate::Skip => Ok(()),
                                Gate::Run => business(conn).await,
                            }
                        })
                    })
                    .await;
                match ended {
                    Local::Committed(()) => Ok(()),
                    Local::RolledBack(e) => Err(e),
                    Local::Unknown(e) => Err(BranchError::Transient(e)),
                }
            }

            /// Runs `body` in one local transaction on one pooled
            /// connection: COMMIT if it returns `Ok`, ROLLBACK otherwise. A
            /// connection whose COMMIT or ROLLBACK failed is never handed
            /// back to the pool.
            pub(crate) fn local<'a, T, F>(&'a self, body: F) -> BoxFuture<'a, Local<T>>
            where
                T: Send + 'a,
                F: for<'c> FnOnce(&'c mut $conn) -> BoxFuture<'c, Result<T, BranchError>> + Send + 'a,
            {
                Box::pin(async move {
                    let mut conn = match self.pool.acquire().await {
                        Ok(conn) => conn,
                        Err(e) => return Local::RolledBack(transient(e)),
                    };
                    if let Err(e) = sqlx::Executor::execute(&mut *conn, sqlx::raw_sql($begin)).await {
                        return Local::RolledBack(transient(e));
                    }
                    match body(&mut conn).await {
                        Ok(value) => match sqlx::Executor::execute(&mut *conn, sqlx::raw_sql("COMMIT")).await {
                            Ok(_) => Local::Committed(value),
                            Err(e) => {
                                let _ = conn.detach();
                                Local::Unknown(e.to_string())
                            }
                        },
                        Err(e) => {
                            if sqlx::Executor::execute(&mut *conn, sqlx::raw_sql("ROLLBACK")).await.is_err() {
                                let _ = conn.detach();
                            }
                            Local::RolledBack(e)
                        }
                    }
                })
            }
        }
    };
}

barrier!(
    /// The barrier on PostgreSQL (`migrations/postgres`).
    PgBarrier, sqlx::PgPool, sqlx::PgConnection, "../migrations/postgres",
    begin: "BEGIN",
    insert: "INSERT INTO tandem_barrier (gid, branch_id, op, reason) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    select: "SELECT reason FROM tandem_barrier WHERE gid = $1 AND branch_id = $2 AND op = $3"
);

barrier!(
    /// The barrier on MariaDB/MySQL (`migrations/mysql`).
    MySqlBarrier, sqlx::MySqlPool, sqlx::MySqlConnection, "../migrations/mysql",
    begin: "BEGIN",
    insert: "INSERT IGNORE INTO tandem_barrier (gid, branch_id, op, reason) VALUES (?, ?, ?, ?)",
    select: "SELECT reason FROM tandem_barrier WHERE gid = ? AND branch_id = ? AND op = ?"
);

barrier!(
    /// The barrier on SQLite (`migrations/sqlite`). Transactions take the
    /// write lock at once (`BEGIN IMMEDIATE`), so concurrent calls wait for
    /// each other (the pool's busy timeout) instead of failing on upgrade.
    SqliteBarrier, sqlx::SqlitePool, sqlx::SqliteConnection, "../migrations/sqlite",
    begin: "BEGIN IMMEDIATE",
    insert: "INSERT OR IGNORE INTO tandem_barrier (gid, branch_id, op, reason) VALUES (?, ?, ?, ?)",
    select: "SELECT reason FROM tandem_barrier WHERE gid = ? AND branch_id = ? AND op = ?"
);
