//! XA branches on real databases: PostgreSQL (`PREPARE TRANSACTION`,
//! `COMMIT/ROLLBACK PREPARED`, `pg_prepared_xacts`) and MariaDB/MySQL
//! (`XA START … END`, `XA PREPARE`, `XA COMMIT/ROLLBACK`, `XA RECOVER`).
//!
//! Xids encode the coordinator cluster (its id, minted by the cluster's
//! first leader and learnt with [`Client::cluster_id`]), the gid and the
//! branch, so a recovery scan touches only this cluster's xids — two
//! clusters sharing a database never resolve each other's branches.
//!
//! A helper acknowledges only what it has seen in the database: a prepare
//! once the database lists the branch as prepared, a commit once the branch
//! row (written inside the XA transaction) is visible as `committed`.
//! ARCHITECTURE.md lists the database behaviours this relies on; the tests
//! in `tests/xa_mariadb.rs` and `tests/xa_postgres.rs` pin each of them
//! against the real servers.
//!
//! Each branch also writes a row in `tandem_xa_branches` (see
//! `migrations/`): inside the XA transaction, in state `committed` — so the
//! row exists exactly when the branch committed — or, after a rollback, in
//! state `rolledback`: the tombstone that makes a late prepare of the same
//! branch fail on the primary key instead of leaving a prepared xid behind.
//! A rollback racing a prepare that is still running waits for its row lock
//! (bounded by a short lock timeout, then a transient error the coordinator
//! retries), and finds the xid prepared on the retry.
//!
//! [`recover`] resolves this cluster's prepared xids by asking the
//! coordinator: commit or roll back as decided; presumed abort for a gid the
//! coordinator does not know; an undecided gid past its deadline is aborted
//! first.

mod mysql;
mod postgres;

use std::future::Future;
use std::time::Duration;

use tandem_proto::v1 as pb;

pub use mysql::{HoldOptions, MySqlXa, PROBE_PACE, SessionProbe};
pub use postgres::PgXa;

use crate::client::{Client, Error};
use crate::participant::{BranchContext, BranchError, Fence, TwoPhaseResource};

/// A row of `tandem_xa_branches`: state, fence term, fence index.
type BranchRow = (String, i64, i64);

/// A prepared branch found in a database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedBranch {
    pub gid: String,
    pub branch_id: String,
}

/// What a recovery scan did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub committed: usize,
    pub rolled_back: usize,
    /// Undecided and not yet past their deadline: left for later.
    pub left: usize,
    /// Could not be resolved now (coordinator or database unreachable).
    pub errors: usize,
}

/// What a recovery scan needs from an XA helper.
pub trait XaStore: Send + Sync {
    fn prepared(&self) -> impl Future<Output = Result<Vec<PreparedBranch>, BranchError>> + Send;
    fn commit(&self, ctx: &BranchContext) -> impl Future<Output = Result<(), BranchError>> + Send;
    fn rollback(&self, ctx: &BranchContext)
    -> impl Future<Output = Result<(), BranchError>> + Send;
}

/// What one database's XA dialect provides. The rest of an XA branch — its
/// side of the recovery scan ([`XaStore`]), its role as the coordinator's
/// phase-two resource ([`TwoPhaseResource`]), what both log and refuse — is
/// written once, over this. Prepare stays each dialect's own: what proves a
/// branch prepared, and who may finish it, differs between the databases
/// (ARCHITECTURE.md, "What XA on the databases promises").
pub trait Dialect: Clone + Send + Sync + 'static {
    /// Where the database lists its prepared transactions, for the log.
    const LISTING: &'static str;
    /// Every prepared transaction in the database: this cluster's branches,
    /// and the names of the others (other clusters, other applications).
    fn scan(
        &self,
    ) -> impl Future<Output = Result<(Vec<PreparedBranch>, Vec<String>), BranchError>> + Send;
    /// Commits a prepared branch; success only once its row shows `committed`.
    fn commit_prepared(
        &self,
        ctx: &BranchContext,
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
    /// Rolls a branch back (prepared or not) and leaves its tombstone.
    fn rollback_prepared(
        &self,
        ctx: &BranchContext,
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
}

impl<D: Dialect> XaStore for D {
    async fn prepared(&self) -> Result<Vec<PreparedBranch>, BranchError> {
        let (ours, others) = self.scan().await?;
        if !others.is_empty() {
            tracing::info!(
                count = others.len(),
                first = ?others.iter().take(5).collect::<Vec<_>>(),
                "{}: leaving alone prepared transactions of other clusters or applications",
                D::LISTING
            );
        }
        Ok(ours)
    }

    async fn commit(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        to_the_end(self, ctx, Outcome::Commit).await
    }

    async fn rollback(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        to_the_end(self, ctx, Outcome::Rollback).await
    }
}

/// Serves commit and rollback for the coordinator. XA branches prepare in
/// the application's call (`PgXa::prepare`, `MySqlXa::prepare`), so a
/// coordinator's `prepare` is refused.
impl<D: Dialect> TwoPhaseResource for D {
    async fn prepare(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), BranchError> {
        Err(BranchError::Failure(format!(
            "transaction {}: XA branches prepare in the application's call, not on the coordinator's request",
            ctx.gid
        )))
    }

    async fn commit(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        to_the_end(self, ctx, Outcome::Commit).await
    }

    async fn rollback(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        to_the_end(self, ctx, Outcome::Rollback).await
    }
}

#[derive(Clone, Copy)]
enum Outcome {
    Commit,
    Rollback,
}

/// Commits or rolls back on a task of its own, so that a caller who gives
/// up — a coordinator node that dies with the call in flight drops its HTTP
/// request — cannot cancel it half-way. A cancelled sqlx `begin` whose
/// `BEGIN` already went out hands the pool a connection inside a
/// transaction nobody ends; the next users of that connection then work
/// inside it, and fail with "current transaction is aborted" after the
/// first error. (Prepare is spawned by each dialect for the same reason.)
async fn to_the_end<D: Dialect>(
    dialect: &D,
    ctx: &BranchContext,
    outcome: Outcome,
) -> Result<(), BranchError> {
    let (dialect, ctx) = (dialect.clone(), ctx.clone());
    tokio::spawn(async move {
        match outcome {
            Outcome::Commit => dialect.commit_prepared(&ctx).await,
            Outcome::Rollback => dialect.rollback_prepared(&ctx).await,
        }
    })
    .await
    .map_err(transient)?
}

/// A commit of a branch that is not (or no longer) prepared: its row tells
/// what happened to it, and only a `committed` row is a success.
fn commit_by_row(ctx: &BranchContext, row: Option<BranchRow>) -> Result<(), BranchError> {
    match row {
        Some((state, ..)) if state == "committed" => Ok(()),
        Some(_) => Err(BranchError::Failure(format!(
            "branch {} of transaction {} was rolled back; it cannot commit",
            ctx.branch_id, ctx.gid
        ))),
        None => Err(BranchError::Failure(format!(
            "branch {} of transaction {} is neither prepared nor committed here",
            ctx.branch_id, ctx.gid
        ))),
    }
}

/// A rollback of a branch that already has a row: done before (its
/// tombstone), impossible (committed), or stale (a newer token wrote the
/// row). `None`: no row yet, the rollback goes on.
fn rollback_by_row(ctx: &BranchContext, row: Option<BranchRow>) -> Option<Result<(), BranchError>> {
    let (state, term, index) = row?;
    Some(if state == "committed" {
        Err(BranchError::Failure(format!(
            "branch {} of transaction {} is committed; it cannot roll back",
            ctx.branch_id, ctx.gid
        )))
    } else if (term as u64, index as u64) > (ctx.fence.term, ctx.fence.index) {
        Err(BranchError::Failure("stale fencing token".into()))
    } else {
        Ok(())
    })
}

/// A prepare that finds its branch's tombstone: the branch was undone first.
fn late_prepare(ctx: &BranchContext) -> BranchError {
    BranchError::Failure(format!(
        "branch {} of transaction {} was already rolled back; late prepare refused",
        ctx.branch_id, ctx.gid
    ))
}

fn transient(e: impl std::fmt::Display) -> BranchError {
    BranchError::Transient(e.to_string())
}

fn recovery_ctx(branch: &PreparedBranch, op: &str, tx: Option<&pb::Transaction>) -> BranchContext {
    let fence = tx
        .and_then(|t| t.decision.as_ref())
        .map(|d| Fence {
            term: d.term,
            index: d.index,
        })
        .unwrap_or_default();
    BranchContext {
        gid: branch.gid.clone(),
        branch_id: branch.branch_id.clone(),
        op: op.to_string(),
        protocol: "xa".to_string(),
        fence,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Resolves every prepared xid of this cluster in `store` by asking the
/// coordinator what was decided.
pub async fn recover<S: XaStore>(
    store: &S,
    client: &Client,
) -> Result<RecoveryReport, BranchError> {
    let mut report = RecoveryReport::default();
    for branch in store.prepared().await? {
        match resolve(store, client, &branch).await {
            Ok(Some(true)) => report.committed += 1,
            Ok(Some(false)) => report.rolled_back += 1,
            Ok(None) => report.left += 1,
            Err(e) => {
                tracing::warn!(gid = %branch.gid, branch = %branch.branch_id, error = %e, "cannot resolve a prepared xid yet");
                report.errors += 1;
            }
        }
    }
    if report != RecoveryReport::default() {
        tracing::info!(?report, "XA recovery scan");
    }
    Ok(report)
}

/// Some(true): committed; Some(false): rolled back; None: still undecided.
async fn resolve<S: XaStore>(
    store: &S,
    client: &Client,
    branch: &PreparedBranch,
) -> Result<Option<bool>, BranchError> {
    let tx = match client.get(&branch.gid).await {
        Ok(tx) => tx,
        Err(Error::Status(s)) if s.code() == tonic::Code::NotFound => {
            // Presumed abort: the coordinator never decided to commit it (or
            // collected it long after every branch acknowledged, which a
            // prepared branch never did).
            store
                .rollback(&recovery_ctx(branch, "rollback", None))
                .await?;
            return Ok(Some(false));
        }
        Err(e) => return Err(transient(e)),
    };
    let decided = tx.decision.as_ref().map(|d| d.outcome);
    let tx = match decided.map(pb::Outcome::try_from) {
        Some(Ok(_)) => tx,
        _ if tx.deadline_ms > now_ms() => return Ok(None),
        _ => match client
            .abort(
                &branch.gid,
                "participant recovery: undecided past its deadline",
                false,
                Duration::ZERO,
            )
            .await
        {
            Ok(tx) => tx,
            // Committed meanwhile: the refusal says so; read the decision.
            Err(Error::Status(s)) if s.code() == tonic::Code::FailedPrecondition => {
                client.get(&branch.gid).await.map_err(transient)?
            }
            Err(e) => return Err(transient(e)),
        },
    };
    match tx.decision.as_ref().map(|d| d.outcome()) {
        Some(pb::Outcome::Commit) => {
            store
                .commit(&recovery_ctx(branch, "commit", Some(&tx)))
                .await?;
            Ok(Some(true))
        }
        Some(pb::Outcome::Abort) => {
            store
                .rollback(&recovery_ctx(branch, "rollback", Some(&tx)))
                .await?;
            Ok(Some(false))
        }
        _ => Ok(None),
    }
}

/// Runs [`recover`] now and then every `interval` until the returned task
/// is aborted.
pub fn spawn_recovery<S>(
    store: S,
    client: Client,
    interval: Duration,
) -> tokio::task::JoinHandle<()>
where
    S: XaStore + 'static,
{
    tokio::spawn(async move {
        loop {
            if let Err(e) = recover(&store, &client).await {
                tracing::warn!(error = %e, "XA recovery scan failed");
            }
            tokio::time::sleep(interval).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use crate::client::ClusterId;

    #[test]
    fn format_ids_are_positive_and_differ_by_cluster() {
        let a = ClusterId::parse("0199a1b2-0000-4000-8000-000000000001").unwrap();
        let b = ClusterId::parse("7f99a1b2-0000-4000-8000-000000000001").unwrap();
        let zero = ClusterId::parse("00000000-0000-4000-8000-000000000001").unwrap();
        assert!(a.xa_format_id() > 0);
        assert_ne!(a.xa_format_id(), b.xa_format_id());
        assert_eq!(zero.xa_format_id(), 1, "0 is reserved; never used");
        assert_eq!(a.short_hex(), "0199a1b200004000");
    }
}
