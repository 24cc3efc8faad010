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
//!
//! One check-back per message waits at a time: the coordinator asks again
//! when its call times out, and a second question while the first still
//! waits for a local transaction is answered "try later" at once, instead
//! of holding a second database connection.

use futures::future::BoxFuture;

use crate::barrier::{Local, MySqlBarrier, PgBarrier, SqliteBarrier};
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

/// The messages whose check-back is under way.
#[derive(Clone, Default)]
struct Asking(std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

/// One check-back under way; done when dropped.
struct AskingGuard {
    asking: Asking,
    gid: String,
}

impl Asking {
    fn start(&self, gid: &str) -> Option<AskingGuard> {
        let fresh = self.0.lock().expect("asking lock").insert(gid.to_string());
        fresh.then(|| AskingGuard {
            asking: self.clone(),
            gid: gid.to_string(),
        })
    }
}

impl Drop for AskingGuard {
    fn drop(&mut self) {
        self.asking.0.lock().expect("asking lock").remove(&self.gid);
    }
}

macro_rules! outbox {
    (
        $(#[$doc:meta])*
        $name:ident, $barrier:ty, $pool:ty, $conn:ty
    ) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name {
            barrier: $barrier,
            /// Messages whose check-back is waiting right now (for a local
            /// transaction in flight): at most one per message, so a
            /// coordinator asking again holds no second connection.
            asking: Asking,
        }

        impl $name {
            /// The outbox in the database behind `pool`; applies the
            /// migrations that create the barrier table.
            pub async fn new(pool: $pool) -> Result<Self, sqlx::Error> {
                Ok($name {
                    barrier: <$barrier>::new(pool).await?,
                    asking: Asking::default(),
                })
            }

            pub fn pool(&self) -> &$pool {
                self.barrier.pool()
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
                let barrier = self.barrier.clone();
                let gid = gid.to_string();
                // Spawned: a caller that gives up must not cancel it with a
                // local transaction open on a pooled connection.
                let ended = tokio::spawn(async move {
                    barrier
                        .local(move |conn| {
                            Box::pin(async move {
                                // First: the marker's key is held from here on,
                                // so a check-back arriving now waits for this
                                // transaction.
                                let key = (gid.as_str(), MARKER_BRANCH, MARKER_OP);
                                if !<$barrier>::insert(conn, key, COMMITTED).await? {
                                    return Err(BranchError::Failure(format!(
                                        "message {gid}: the check-back already marked it rolled back"
                                    )));
                                }
                                business(conn).await
                            })
                        })
                        .await
                })
                .await
                .map_err(|e| OutboxError::Unknown(e.to_string()))?;
                match ended {
                    Local::Committed(()) => Ok(()),
                    Local::RolledBack(e) => Err(OutboxError::RolledBack(e)),
                    Local::Unknown(e) => Err(OutboxError::Unknown(e)),
                }
            }

            /// The check-back's answer for `gid`: `Ok` if its local
            /// transaction committed; a business failure if it rolled back
            /// — and if there is no marker yet, one saying so is written
            /// first, so that it can no longer commit.
            pub async fn check_back(&self, gid: &str) -> Result<(), BranchError> {
                let Some(asking) = self.asking.start(gid) else {
                    return Err(BranchError::Transient(format!(
                        "message {gid}: a check-back is already waiting for its local transaction"
                    )));
                };
                let barrier = self.barrier.clone();
                let key_gid = gid.to_string();
                let ended = tokio::spawn(async move {
                    // Held until the answer is in, even if the caller gave up.
                    let _asking = asking;
                    barrier
                        .local(move |conn| {
                            Box::pin(async move {
                                let key = (key_gid.as_str(), MARKER_BRANCH, MARKER_OP);
                                if <$barrier>::insert(conn, key, ROLLED_BACK).await? {
                                    return Ok(ROLLED_BACK.to_string());
                                }
                                <$barrier>::reason(conn, key).await
                            })
                        })
                        .await
                })
                .await
                .map_err(transient)?;
                match ended {
                    Local::Committed(reason) if reason == COMMITTED => Ok(()),
                    Local::Committed(_) => Err(BranchError::Failure(format!(
                        "message {gid}: its local transaction rolled back"
                    ))),
                    Local::RolledBack(e) => Err(e),
                    Local::Unknown(e) => Err(transient(e)),
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
    /// The outbox on PostgreSQL (the barrier table, `migrations/postgres`).
    PgOutbox, PgBarrier, sqlx::PgPool, sqlx::PgConnection
);

outbox!(
    /// The outbox on MariaDB/MySQL (the barrier table, `migrations/mysql`).
    MySqlOutbox, MySqlBarrier, sqlx::MySqlPool, sqlx::MySqlConnection
);

outbox!(
    /// The outbox on SQLite (the barrier table, `migrations/sqlite`):
    /// transactions take the write lock at once, so a check-back waits for
    /// a local transaction in flight (the pool's busy timeout).
    SqliteOutbox, SqliteBarrier, sqlx::SqlitePool, sqlx::SqliteConnection
);
