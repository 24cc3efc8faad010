//! Role traits — what a participant implements for each protocol — and the
//! adapters that turn them into a [`Handler`].

use std::future::Future;

use super::{BranchContext, BranchError, BranchRequest, Handler, ops};

/// A 2PC or XA resource. For 2PC the coordinator calls `prepare` (with the
/// payload registered for the branch); for XA the application's own call
/// prepared already, and only `commit` / `rollback` come from the
/// coordinator.
///
/// `rollback` must succeed for a branch that never prepared (and then make
/// sure it never will); `commit` and `rollback` must be idempotent.
pub trait TwoPhaseResource: Send + Sync + 'static {
    fn prepare(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
    fn commit(&self, ctx: &BranchContext) -> impl Future<Output = Result<(), BranchError>> + Send;
    fn rollback(&self, ctx: &BranchContext)
    -> impl Future<Output = Result<(), BranchError>> + Send;
}

/// Serves a [`TwoPhaseResource`]: prepare, commit, rollback.
pub struct TwoPhase<R>(pub R);

impl<R: TwoPhaseResource> Handler for TwoPhase<R> {
    async fn handle(&self, request: BranchRequest) -> Result<(), BranchError> {
        let ctx = &request.ctx;
        match ctx.op.as_str() {
            ops::PREPARE => self.0.prepare(ctx, &request.payload).await,
            ops::COMMIT => self.0.commit(ctx).await,
            ops::ROLLBACK => self.0.rollback(ctx).await,
            other => Err(BranchError::Failure(format!(
                "operation {other} is not served by a two-phase resource"
            ))),
        }
    }
}

/// A 3PC resource. The coordinator calls `can_commit` (a vote: could this
/// branch commit? answer [`BranchError::Failure`] for no), then
/// `pre_commit` (make the change ready and durable but not visible — what
/// a prepare is elsewhere), then, once the cluster has decided, `do_commit`;
/// or `abort`, at any point before. `abort` must succeed for a branch that
/// never pre-committed (the server then refuses a late pre-commit);
/// `do_commit` and `abort` must be idempotent.
///
/// A branch in doubt — it voted or pre-committed, and heard nothing — must
/// never decide alone (that is classic 3PC's flaw: under a partition one
/// side commits by timeout while the other aborts). [`in_doubt`] lists such
/// branches, and the termination task ([`super::terminate`]) asks the
/// cluster for each one's outcome and applies it.
///
/// [`in_doubt`]: ThreePhaseResource::in_doubt
pub trait ThreePhaseResource: Send + Sync + 'static {
    fn can_commit(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
    fn pre_commit(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
    fn do_commit(
        &self,
        ctx: &BranchContext,
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
    fn abort(&self, ctx: &BranchContext) -> impl Future<Output = Result<(), BranchError>> + Send;
    /// The branches this resource holds in doubt — pre-committed, neither
    /// committed nor aborted — as (gid, branch id).
    fn in_doubt(&self) -> impl Future<Output = Result<Vec<(String, String)>, BranchError>> + Send;
}

/// Serves a [`ThreePhaseResource`]: can_commit, pre_commit, do_commit, abort.
pub struct ThreePhase<R>(pub R);

impl<R: ThreePhaseResource> Handler for ThreePhase<R> {
    async fn handle(&self, request: BranchRequest) -> Result<(), BranchError> {
        let ctx = &request.ctx;
        match ctx.op.as_str() {
            ops::CAN_COMMIT => self.0.can_commit(ctx, &request.payload).await,
            ops::PRE_COMMIT => self.0.pre_commit(ctx, &request.payload).await,
            ops::DO_COMMIT => self.0.do_commit(ctx).await,
            ops::ABORT => self.0.abort(ctx).await,
            other => Err(BranchError::Failure(format!(
                "operation {other} is not served by a three-phase resource"
            ))),
        }
    }
}

/// A TCC participant. The application calls `try_` through the SDK (which
/// registered the branch first); the coordinator then calls `confirm` or
/// `cancel`. `cancel` must succeed for a try that never ran (and make sure a
/// late try is refused); all three must be idempotent. The barrier gives all
/// of that: wrap each in `barrier.call`.
pub trait TccResource: Send + Sync + 'static {
    /// Reserves (the "try" phase; `try` is a Rust keyword).
    fn try_(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
    fn confirm(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
    fn cancel(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
}

/// Serves a [`TccResource`]: try, confirm, cancel.
pub struct Tcc<R>(pub R);

impl<R: TccResource> Handler for Tcc<R> {
    async fn handle(&self, request: BranchRequest) -> Result<(), BranchError> {
        let ctx = &request.ctx;
        match ctx.op.as_str() {
            ops::TRY => self.0.try_(ctx, &request.payload).await,
            ops::CONFIRM => self.0.confirm(ctx, &request.payload).await,
            ops::CANCEL => self.0.cancel(ctx, &request.payload).await,
            other => Err(BranchError::Failure(format!(
                "operation {other} is not served by a TCC resource"
            ))),
        }
    }
}

/// A saga step: the coordinator calls `action`, and `compensate` if the saga
/// fails. `compensate` may arrive before (or instead of) `action`: it must
/// then do nothing, and the late action must be refused — the barrier gives
/// that (wrap both in `barrier.call`). Both must be idempotent.
pub trait SagaStep: Send + Sync + 'static {
    /// Answer [`BranchError::Failure`] for a business "no": the saga then
    /// compensates. Transient errors are retried.
    fn action(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
    fn compensate(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
}

/// Serves a [`SagaStep`]: action, compensate.
pub struct Saga<R>(pub R);

impl<R: SagaStep> Handler for Saga<R> {
    async fn handle(&self, request: BranchRequest) -> Result<(), BranchError> {
        let ctx = &request.ctx;
        match ctx.op.as_str() {
            ops::ACTION => self.0.action(ctx, &request.payload).await,
            ops::COMPENSATE => self.0.compensate(ctx, &request.payload).await,
            other => Err(BranchError::Failure(format!(
                "operation {other} is not served by a saga step"
            ))),
        }
    }
}
