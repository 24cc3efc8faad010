//! The 3PC termination protocol, participant side: a branch in doubt (it
//! pre-committed and heard nothing) asks the replicated coordinator for
//! its transaction's outcome and applies it — never guesses. Asking is
//! also what ends an abandoned transaction: the cluster aborts one that is
//! undecided past its deadline when a participant asks (`Client::resolve`).

use std::sync::Arc;
use std::time::Duration;

use tandem_proto::v1 as pb;
use tandem_proto::wire::protocols;

use super::{BranchContext, BranchError, Fence, ThreePhaseResource, ops};
use crate::client::{Client, Error};

/// What one termination pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TerminationReport {
    pub committed: u64,
    pub aborted: u64,
    /// Still undecided (before the deadline): asked again next pass.
    pub undecided: u64,
    /// The cluster or the resource could not be reached: next pass.
    pub errors: u64,
}

/// Resolves every branch the resource holds in doubt, once.
pub async fn terminate<R: ThreePhaseResource>(
    resource: &R,
    client: &Client,
) -> Result<TerminationReport, BranchError> {
    let mut report = TerminationReport::default();
    for (gid, branch_id) in resource.in_doubt().await? {
        match settle(resource, client, &gid, &branch_id).await {
            Ok(Some(true)) => report.committed += 1,
            Ok(Some(false)) => report.aborted += 1,
            Ok(None) => report.undecided += 1,
            Err(e) => {
                tracing::warn!(%gid, branch = %branch_id, error = %e, "cannot resolve a branch in doubt yet");
                report.errors += 1;
            }
        }
    }
    if report != TerminationReport::default() {
        tracing::info!(?report, "3PC termination pass");
    }
    Ok(report)
}

/// Runs [`terminate`] every `every`, until the task is dropped or aborted.
pub fn spawn_termination<R: ThreePhaseResource>(
    resource: Arc<R>,
    client: Client,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = terminate(resource.as_ref(), &client).await {
                tracing::warn!(error = %e, "3PC termination pass failed");
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// Some(true): committed; Some(false): aborted; None: still undecided.
async fn settle<R: ThreePhaseResource>(
    resource: &R,
    client: &Client,
    gid: &str,
    branch_id: &str,
) -> Result<Option<bool>, BranchError> {
    let ctx = |op: &str, fence: Fence| BranchContext {
        gid: gid.to_string(),
        branch_id: branch_id.to_string(),
        op: op.to_string(),
        protocol: protocols::THREE_PC.to_string(),
        fence,
    };
    let tx = match client.resolve(gid).await {
        Ok(tx) => tx,
        Err(Error::Status(s)) if s.code() == tonic::Code::NotFound => {
            // Presumed abort: the cluster never decided to commit it (a
            // transaction is collected only after every branch acknowledged
            // its phase two, which a branch in doubt never did).
            resource.abort(&ctx(ops::ABORT, Fence::default())).await?;
            return Ok(Some(false));
        }
        Err(e) => return Err(BranchError::Transient(e.to_string())),
    };
    let Some(decision) = tx.decision.as_ref() else {
        return Ok(None);
    };
    let fence = Fence {
        term: decision.term,
        index: decision.index,
    };
    if decision.outcome == pb::Outcome::Commit as i32 {
        resource.do_commit(&ctx(ops::DO_COMMIT, fence)).await?;
        Ok(Some(true))
    } else {
        resource.abort(&ctx(ops::ABORT, fence)).await?;
        Ok(Some(false))
    }
}
