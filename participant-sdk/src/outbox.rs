//! The outbox, without an outbox table: a transactional message whose
//! local part is one marker row in the barrier table, written in the same
//! local transaction as the business change, on PostgreSQL, MariaDB/MySQL
//! and SQLite.
//!
//! [`PgOutbox::publish`] (and its MySQL and SQLite twins):
//!
//! 1. prepares the message at the coordinator (nothing is delivered yet);
//! 2. runs the business change and inserts the marker row
//!    `(gid, "outbox", "msg")` with reason `committed`, in **one** local
//!    transaction, and commits it;
//! 3. submits the message: the decision to deliver.
//!
//! If the business change fails, the local transaction rolls back and the
//! message is aborted (dropped). If the producer dies anywhere in between,
//! the coordinator asks the check-back after the message's timeout, and
//! the outbox (as a participant [`crate::participant::Handler`], op
//! `query_prepared`) answers from the marker row:
//!
//! * a `committed` marker → committed: deliver;
//! * no marker → it **inserts one with reason `rolled_back` first**, then
//!   answers rolled back: drop. A local transaction still in flight holds
//!   the marker's key (it inserted the row first thing), so the check-back's
//!   insert waits for it: if it commits, the check-back finds its marker
//!   (committed); if it rolls back, the check-back's marker goes in and the
//!   local transaction can never commit afterwards (its own insert would
//!   conflict). The check-back is decisive, never "maybe".

use futures::future::BoxFuture;

use crate::client::{Client, Error, MessageBuilder};
use crate::participant::{BranchError, BranchRequest, Handler, ops};

/// The marker row's branch and op in the barrier table.
pub const MARKER_BRANCH: &str = "outbox";
pub const MARKER_OP: &str = "msg";
/// The marker's reasons.
pub const COMMITTED: &str = "committed";
pub const ROLLED_BACK: &str = "rolled_back";

/// What publishing did, when it did not fully succeed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The coordinator did not take the message: nothing ran locally.
    #[error("the message was not prepared: {0}")]
    Prepare(Error),
    /// The business change failed: the local transaction rolled back and
    /// the message was dropped (or will be, by the check-back).
    #[error("the local transaction rolled back: {0}")]
    RolledBack(BranchError),
    /// The local commit's outcome is unknown (the connection broke during
    /// COMMIT): the check-back settles it.
    #[error("the local commit's outcome is unknown (the check-back will settle it): {0}")]
    Unknown(String),
}

/// A message published: its gid, and whether Submit reached the
/// coordinator (if not, the check-back delivers it after its timeout —
/// the local transaction committed either way).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub gid: String,
    pub submitted: bool,
}

fn transient(e: impl std::fmt::Display) -> BranchError {
    BranchError::Transient(e.to_string())
}

macro_rules! outbox {
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
            /// The outbox in the database behind `pool`; applies the
            /// migrations that create the barrier table.
            pub async fn new(pool: $pool) -> Result<Self, sqlx::Error> {
                sqlx::migrate!($migrations).run(&pool).await?;
                Ok($name { pool })
            }

            pub fn pool(&self) -> &$pool {
                &self.pool
            }

            /// Prepares `message`, runs `business` with the marker row in
            /// one local transaction, then submits. See the module
            /// documentation for every way this can end.
            pub async fn publish<F>(
                &self,
                client: &Client,
                message: &MessageBuilder,
                business: F,
            ) -> Result<Published, OutboxError>
            where
                F: for<'c> FnOnce(&'c mut $conn) -> BoxFuture<'c, Result<(), BranchError>> + Send + 'static,
            {
                let gid = message.gid_str().to_string();
                message.prepare().await.map_err(OutboxError::Prepare)?;
                match self.commit_local(&gid, business).await {
                    Ok(()) => {}
                    Err(OutboxError::RolledBack(e)) => {
                        // Best effort: if it is lost, the check-back drops it.
                        if let Err(abort) = client.abort_message(&gid, &e.to_string()).await {
                            tracing::warn!(%gid, error = %abort, "abort of the message failed; the check-back will drop it");
                        }
                        return Err(OutboxError::RolledBack(e));
                    }
                    Err(e) => return Err(e),
                }
                let submitted = match client.submit(&gid).await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(%gid, error = %e, "submit failed; the check-back will deliver it");
                        false
                    }
                };
                Ok(Published { gid, submitted })
            }

            /// Step 2 alone: `business` and the `committed` marker of `gid`
            /// in one local transaction.
            pub async fn commit_local<F>(&self, gid: &str, business: F) -> Result<(), OutboxError>
            where
                F: for<'c> FnOnce(&'c mut $conn) -> BoxFuture<'c, Result<(), BranchError>> + Send + 'static,
            {
                let this = self.clone();
                let gid = gid.to_string();
                // Spawned: a caller that gives up must not cancel it with a
                // local transaction open on a pooled connection.
                tokio::spawn(async move { this.run_local(&gid, business).await })
                    .await
                    .map_err(|e| OutboxError::Unknown(e.to_string()))?
            }

            async fn run_local<F>(&self, gid: &str, business: F) -> Result<(), OutboxError>
            where
                F: for<'c> FnOnce(&'c mut $conn) -> BoxFuture<'c, Result<(), BranchError>> + Send,
            {
                let rolled_back = |e: BranchError| OutboxError::RolledBack(e);
                let mut conn = self.pool.acquire().await.map_err(|e| rolled_back(transient(e)))?;
                sqlx::Executor::execute(&mut *conn, sqlx::raw_sql($begin))
                    .await
                    .map_err(|e| rolled_back(transient(e)))?;
                let result = async {
                    // First: the marker's key is held from here on, so a
                    // check-back arriving now waits for this transaction.
                    if !Self::insert(&mut conn, gid, COMMITTED).await? {
                        return Err(BranchError::Failure(format!(
                            "message {gid}: the check-back already marked it rolled back"
                        )));
                    }
                    business(&mut conn).await
                }
                .await;
                match result {
                    Ok(()) => match sqlx::Executor::execute(&mut *conn, sqlx::raw_sql("COMMIT")).await {
                        Ok(_) => Ok(()),
                        Err(e) => {
                            let _ = conn.detach();
                            Err(OutboxError::Unknown(e.to_string()))
                        }
                    },
                    Err(e) => {
                        if sqlx::Executor::execute(&mut *conn, sqlx::raw_sql("ROLLBACK")).await.is_err() {
                            // Never hand a connection in an unknown state back.
                            let _ = conn.detach();
                        }
                        Err(rolled_back(e))
                    }
                }
            }

            fn insert<'a>(conn: &'a mut $conn, gid: &'a str, reason: &'a str) -> BoxFuture<'a, Result<bool, BranchError>> {
                Box::pin(async move {
                    let done = sqlx::query($insert)
                        .bind(gid)
                        .bind(MARKER_BRANCH)
                        .bind(MARKER_OP)
                        .bind(reason)
                        .execute(&mut *conn)
                        .await
                        .map_err(transient)?;
                    Ok(done.rows_affected() == 1)
                })
            }

            /// The check-back's answer for `gid`: `Ok` if its local
            /// transaction committed; a business failure if it rolled back
            /// — and if there is no marker yet, one saying so is written
            /// first, so that it can no longer commit.
            pub async fn check_back(&self, gid: &str) -> Result<(), BranchError> {
                let this = self.clone();
                let gid = gid.to_string();
                tokio::spawn(async move { this.run_check_back(&gid).await })
                    .await
                    .map_err(transient)?
            }

            async fn run_check_back(&self, gid: &str) -> Result<(), BranchError> {
                let mut conn = self.pool.acquire().await.map_err(transient)?;
                sqlx::Executor::execute(&mut *conn, sqlx::raw_sql($begin))
                    .await
                    .map_err(transient)?;
                let answer = async {
                    if Self::insert(&mut conn, gid, ROLLED_BACK).await? {
                        return Ok(ROLLED_BACK.to_string());
                    }
                    use sqlx::Row;
                    let row = sqlx::query($select)
                        .bind(gid)
                        .bind(MARKER_BRANCH)
                        .bind(MARKER_OP)
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(transient)?;
                    row.try_get::<String, _>(0).map_err(transient)
                }
                .await;
                let end = if answer.is_ok() { "COMMIT" } else { "ROLLBACK" };
                if let Err(e) = sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(end)).await {
                    let _ = conn.detach();
                    return Err(transient(e));
                }
                match answer?.as_str() {
                    COMMITTED => Ok(()),
                    _ => Err(BranchError::Failure(format!(
                        "message {gid}: its local transaction rolled back"
                    ))),
                }
            }
        }

        /// Answers the coordinator's check-back (`query_prepared`).
        impl Handler for $name {
            async fn handle(&self, request: BranchRequest) -> Result<(), BranchError> {
                match request.ctx.op.as_str() {
                    ops::QUERY_PREPARED => self.check_back(&request.ctx.gid).await,
                    op => Err(BranchError::Failure(format!(
                        "this outbox answers only {}, not {op}",
                        ops::QUERY_PREPARED
                    ))),
                }
            }
        }
    };
}

outbox!(
    /// The outbox on PostgreSQL (`migrations/postgres`).
    PgOutbox, sqlx::PgPool, sqlx::PgConnection, "../migrations/postgres",
    begin: "BEGIN",
    insert: "INSERT INTO tandem_barrier (gid, branch_id, op, reason) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    select: "SELECT reason FROM tandem_barrier WHERE gid = $1 AND branch_id = $2 AND op = $3"
);

outbox!(
    /// The outbox on MariaDB/MySQL (`migrations/mysql`).
    MySqlOutbox, sqlx::MySqlPool, sqlx::MySqlConnection, "../migrations/mysql",
    begin: "BEGIN",
    insert: "INSERT IGNORE INTO tandem_barrier (gid, branch_id, op, reason) VALUES (?, ?, ?, ?)",
    select: "SELECT reason FROM tandem_barrier WHERE gid = ? AND branch_id = ? AND op = ?"
);

outbox!(
    /// The outbox on SQLite (`migrations/sqlite`): transactions take the
    /// write lock at once, so a check-back waits for a local transaction in
    /// flight (the pool's busy timeout).
    SqliteOutbox, sqlx::SqlitePool, sqlx::SqliteConnection, "../migrations/sqlite",
    begin: "BEGIN IMMEDIATE",
    insert: "INSERT OR IGNORE INTO tandem_barrier (gid, branch_id, op, reason) VALUES (?, ?, ?, ?)",
    select: "SELECT reason FROM tandem_barrier WHERE gid = ? AND branch_id = ? AND op = ?"
);
