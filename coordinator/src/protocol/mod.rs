//! Protocol logic, pure: given a transaction and an event, what is its new
//! state; given a transaction, which participant calls should run now. No
//! I/O, no clocks — time arrives inside the events. `state::machine::apply`
//! calls the `on_*` functions; the driver calls [`next`].
//!
//! Each protocol is one file implementing [`Rules`], with its transitions as
//! one table (`TRANSITIONS`) that its tests check the code makes — no more,
//! no fewer; [`rules`] is the one place protocols are registered. The
//! mechanics they share (registering a branch, recording an answer,
//! deciding, finishing, aborting, timing out) live here.
//!
//! Adding a protocol: its file (rules and table), a line in [`rules`], its
//! role in the SDK.

use std::sync::Arc;

pub mod app_driven;
pub mod msg;
pub mod repair;
pub mod retry;
pub mod saga;
pub mod tcc;
pub mod three_pc;
pub mod two_pc;
pub mod xa;

use crate::model::command::{ApplyContext, BranchSpec, OpOutcome, Rejection};
use crate::model::types::{
    Branch, BranchOp, Decision, Fence, Op, OpState, Outcome, Protocol, Transaction, TxState,
};
use crate::model::validate::{self, BRANCHES_HARD_MAX};

/// A call the driver should make now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub branch_id: String,
    pub op: Op,
    pub endpoint: String,
    pub fence: Fence,
    /// How many times this op was tried before (for backoff).
    pub attempts: u32,
}

/// Whether an event changed the transaction (a repeat or a stale answer
/// changes nothing, and is not an error).
pub type Changed = bool;

/// A protocol's rules: what each event does to a transaction of it, and
/// which calls it wants under way.
pub trait Rules: Sync {
    /// The operations its branches must register, and may (none: branches
    /// are not registered one by one).
    fn branch_ops(&self) -> (&'static [Op], &'static [Op]);

    /// The application asks to commit (not yet asked before).
    fn on_commit(
        &self,
        tx: &mut Transaction,
        ctx: ApplyContext,
        now_ms: i64,
    ) -> Result<Changed, Rejection>;

    /// A participant answered an op the transaction has, before it ended.
    fn on_result(
        &self,
        tx: &mut Transaction,
        branch_id: &str,
        op: Op,
        outcome: &OpOutcome,
        ctx: ApplyContext,
        now_ms: i64,
    ) -> Result<Changed, Rejection>;

    /// The operation phase two sends for an outcome (none: nothing to send).
    fn phase_two_op(&self, outcome: Outcome) -> Option<Op>;

    /// The leader saw the deadline pass (`now_ms` at or past it is checked
    /// here): by default an undecided transaction aborts.
    fn on_timeout(
        &self,
        tx: &mut Transaction,
        ctx: ApplyContext,
        now_ms: i64,
    ) -> Result<Changed, Rejection> {
        abort_on_timeout(tx, ctx, now_ms)
    }

    /// Whether a `Timeout` would change the transaction once its deadline
    /// passed (the driver proposes one only then): by default, while it
    /// is undecided.
    fn times_out(&self, tx: &Transaction) -> bool {
        !tx.is_decided()
    }

    /// Whether a phase-one op that never answers makes the protocol give up
    /// after `max_attempts` (a 2PC vote does; a message's check-back is
    /// asked for ever).
    fn phase_one_gives_up(&self) -> bool {
        true
    }

    /// The calls that should be under way now: by default, phase two.
    fn next(&self, tx: &Transaction) -> Vec<Call> {
        phase_two_calls(tx, self)
    }

    /// Every transition the rules make, as one table.
    fn transitions(&self) -> &[Transition];
}

/// The rules of a protocol, if this coordinator drives it.
pub fn rules(protocol: Protocol) -> Option<&'static dyn Rules> {
    match protocol {
        Protocol::TwoPc => Some(&two_pc::TwoPc),
        Protocol::Xa => Some(&xa::XA),
        Protocol::Tcc => Some(&tcc::TCC),
        Protocol::Saga => Some(&saga::Saga),
        Protocol::ThreePc => Some(&three_pc::ThreePc),
        Protocol::Msg => Some(&msg::Msg),
    }
}

/// Whether Begin may start a transaction of this protocol.
pub fn is_implemented(protocol: Protocol) -> bool {
    rules(protocol).is_some()
}

/// What happened to a transaction, as a transition table names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    Register,
    Commit,
    Abort,
    Timeout,
    /// A participant answered `op`.
    Answer(Op, Answer),
}

/// A participant's answer, as the table cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Answer {
    Yes,
    /// A business "no" (phase one), a refusal (phase two).
    No,
    /// Unreachable, timed out, 5xx: to be retried.
    Unavailable,
}

impl Answer {
    pub fn of(outcome: &OpOutcome) -> Answer {
        match outcome {
            OpOutcome::Succeeded => Answer::Yes,
            OpOutcome::Failed(_) | OpOutcome::Retrying { refused: true, .. } => Answer::No,
            OpOutcome::Transient(_) | OpOutcome::Retrying { refused: false, .. } => {
                Answer::Unavailable
            }
        }
    }
}

/// A row of a protocol's table: in state `from`, event `on` leads to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Transition {
    pub from: TxState,
    pub on: Event,
    pub to: TxState,
}

/// A row, for the tables.
pub const fn row(from: TxState, on: Event, to: TxState) -> Transition {
    Transition { from, on, to }
}

/// The operations a protocol's branches must register, and may.
pub fn branch_ops(protocol: Protocol) -> (&'static [Op], &'static [Op]) {
    rules(protocol).map_or((&[], &[]), |r| r.branch_ops())
}

fn unsupported(tx: &Transaction, what: &str) -> Rejection {
    Rejection::InvalidState {
        gid: tx.gid.clone(),
        state: tx.state,
        what: format!(
            "{what} is not supported for protocol {} by this coordinator",
            tx.protocol
        ),
    }
}

fn invalid_state(tx: &Transaction, what: impl Into<String>) -> Rejection {
    Rejection::InvalidState {
        gid: tx.gid.clone(),
        state: tx.state,
        what: what.into(),
    }
}

/// Enlists a branch while the transaction is active.
pub fn on_register(
    tx: &mut Transaction,
    spec: BranchSpec,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    let (required, optional) = branch_ops(tx.protocol);
    if required.is_empty() {
        return Err(unsupported(tx, "registering branches"));
    }
    validate::branch_id(&tx.gid, &spec.branch_id)?;
    let other = |problem: String| {
        Rejection::Invalid(validate::InvalidInput::Other {
            gid: tx.gid.clone(),
            problem,
        })
    };
    for (op, endpoint) in &spec.ops {
        if !required.contains(op) && !optional.contains(op) {
            return Err(other(format!(
                "branch {}: operation {op} is not part of protocol {}",
                spec.branch_id, tx.protocol
            )));
        }
        validate::endpoint(&tx.gid, endpoint)?;
    }
    for op in required {
        if !spec.ops.iter().any(|(o, _)| o == op) {
            return Err(other(format!(
                "branch {}: protocol {} needs an endpoint for {op}",
                spec.branch_id, tx.protocol
            )));
        }
    }
    if let Some(existing) = tx.branch(&spec.branch_id) {
        let same = existing.payload == spec.payload
            && existing.ops.len() == spec.ops.len()
            && spec
                .ops
                .iter()
                .all(|(op, ep)| existing.op(*op).is_some_and(|o| &o.endpoint == ep));
        return if same {
            Ok(false)
        } else {
            Err(other(format!(
                "branch {} is already registered with other endpoints or payload",
                spec.branch_id
            )))
        };
    }
    if tx.state != TxState::Active {
        return Err(invalid_state(
            tx,
            format!("cannot register branch {} after phase one", spec.branch_id),
        ));
    }
    if tx.branches.len() >= BRANCHES_HARD_MAX {
        return Err(other(format!(
            "it already has {} branches, the limit",
            tx.branches.len()
        )));
    }
    tx.branches.push(Arc::new(Branch {
        branch_id: spec.branch_id,
        ops: spec
            .ops
            .into_iter()
            .map(|(op, endpoint)| BranchOp {
                op,
                endpoint,
                state: OpState::Pending,
                attempts: 0,
                last_error: String::new(),
                updated_at_ms: now_ms,
            })
            .collect(),
        payload: spec.payload,
        after: Vec::new(),
        retry: None,
    }));
    Ok(true)
}

pub fn on_commit(
    tx: &mut Transaction,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    if tx.commit_requested {
        // A repeat: answer with whatever the first request led to.
        return Ok(false);
    }
    let Some(rules) = rules(tx.protocol) else {
        return Err(unsupported(tx, "commit"));
    };
    let changed = rules.on_commit(tx, ctx, now_ms)?;
    tx.commit_requested |= changed;
    Ok(changed)
}

pub fn on_abort(
    tx: &mut Transaction,
    reason: &str,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    if !is_implemented(tx.protocol) {
        return Err(unsupported(tx, "abort"));
    }
    match tx.state {
        TxState::Active | TxState::Preparing | TxState::PreCommitting => {
            let reason = if reason.is_empty() {
                "aborted by the application".to_string()
            } else {
                reason.to_string()
            };
            decide(tx, Outcome::Abort, reason, ctx, now_ms);
            Ok(true)
        }
        TxState::Aborting | TxState::Aborted => Ok(false),
        TxState::Committing | TxState::Committed => Err(invalid_state(
            tx,
            "cannot abort: the decision to commit is already recorded",
        )),
    }
}

/// The deadline of a transaction passed, as the leader saw it.
pub fn on_timeout(
    tx: &mut Transaction,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    match rules(tx.protocol) {
        Some(rules) => rules.on_timeout(tx, ctx, now_ms),
        None => Err(unsupported(tx, "timeouts")),
    }
}

/// Whether the driver should propose a `Timeout` once the deadline passed.
pub fn times_out(tx: &Transaction) -> bool {
    rules(tx.protocol).is_some_and(|r| r.times_out(tx))
}

/// Whether the protocol gives up on a phase-one op after `max_attempts`.
pub fn phase_one_gives_up(protocol: Protocol) -> bool {
    rules(protocol).is_none_or(|r| r.phase_one_gives_up())
}

/// Aborts an undecided transaction whose deadline has passed.
fn abort_on_timeout(
    tx: &mut Transaction,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    if tx.is_decided() || now_ms < tx.deadline_ms {
        return Ok(false);
    }
    let reason = format!(
        "timed out after {} ms without a decision",
        tx.options.timeout_ms
    );
    decide(tx, Outcome::Abort, reason, ctx, now_ms);
    Ok(true)
}

pub fn on_result(
    tx: &mut Transaction,
    branch_id: &str,
    op: Op,
    outcome: &OpOutcome,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    if tx.branch(branch_id).and_then(|b| b.op(op)).is_none() {
        return Err(Rejection::Invalid(validate::InvalidInput::Other {
            gid: tx.gid.clone(),
            problem: format!("branch {branch_id} has no operation {op}"),
        }));
    }
    if tx.state.is_terminal() {
        return Ok(false);
    }
    let Some(rules) = rules(tx.protocol) else {
        return Err(unsupported(tx, "branch results"));
    };
    rules.on_result(tx, branch_id, op, outcome, ctx, now_ms)
}

/// A saga's answers recorded in one entry (`Command::OpResults`), in order;
/// if they decide to compensate, and they come from the worker that drove
/// the saga since its submit (`exact`, and this entry is of the submit's
/// term: no other leader drove it), only what may have run from the log is
/// compensated (`saga::Reach::Exact`). All or nothing: one refused answer
/// refuses the entry.
pub fn on_results(
    tx: &mut Transaction,
    results: &[(String, Op, OpOutcome)],
    exact: bool,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    if tx.protocol != Protocol::Saga {
        return Err(unsupported(tx, "answers recorded together"));
    }
    if results.len() > BRANCHES_HARD_MAX {
        return Err(Rejection::Invalid(validate::InvalidInput::Other {
            gid: tx.gid.clone(),
            problem: format!(
                "at most {} answers are recorded together, not {}",
                BRANCHES_HARD_MAX,
                results.len()
            ),
        }));
    }
    let alone = tx.state == TxState::Active && tx.fence.term == ctx.term;
    let mut changed = false;
    for (branch_id, op, outcome) in results {
        changed |= on_result(tx, branch_id, *op, outcome, ctx, now_ms)?;
    }
    if !(exact && alone) {
        count_one_step_ahead(tx, ctx);
    }
    Ok(changed)
}

/// [`on_abort`], for `Command::AbortV2`: a saga it decides compensates one
/// step beyond the recorded successes (a driver may have run that far).
pub fn on_abort_v2(
    tx: &mut Transaction,
    reason: &str,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    let changed = on_abort(tx, reason, ctx, now_ms)?;
    count_one_step_ahead(tx, ctx);
    Ok(changed)
}

/// [`on_timeout`], for `Command::TimeoutV2` (see [`on_abort_v2`]).
pub fn on_timeout_v2(
    tx: &mut Transaction,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    let changed = on_timeout(tx, ctx, now_ms)?;
    count_one_step_ahead(tx, ctx);
    Ok(changed)
}

/// If this entry decided to compensate a saga, its compensations reach one
/// step beyond the recorded successes (`saga::Reach::OneAhead`) instead of
/// exactly them. Nothing was called yet at the decision's own entry, so
/// the marks can still change. `decide` has already asked whether the saga
/// finished; it cannot have, for a saga with steps: the exact reach always
/// holds its first steps, whose compensations start pending. The terminal
/// check only keeps an empty saga's outcome as it is.
fn count_one_step_ahead(tx: &mut Transaction, ctx: ApplyContext) {
    let decided_here = tx
        .decision
        .as_ref()
        .is_some_and(|d| d.index == ctx.index && d.outcome == Outcome::Abort);
    if tx.protocol == Protocol::Saga && decided_here && !tx.state.is_terminal() {
        saga::mark_compensations(tx, saga::Reach::OneAhead);
    }
}

/// The calls that should be under way for this transaction now.
pub fn next(tx: &Transaction) -> Vec<Call> {
    rules(tx.protocol).map_or_else(Vec::new, |r| r.next(tx))
}

/// Phase two's calls, once decided: every branch's open phase-two op.
fn phase_two_calls(tx: &Transaction, rules: &(impl Rules + ?Sized)) -> Vec<Call> {
    match tx.state {
        TxState::Committing | TxState::Aborting => {
            let outcome = tx.decision.as_ref().map(|d| d.outcome);
            match outcome.and_then(|o| rules.phase_two_op(o)) {
                Some(op) => pending_calls(tx, op),
                None => Vec::new(),
            }
        }
        _ => Vec::new(),
    }
}

/// The operation phase two sends for an outcome.
pub fn phase_two_op(protocol: Protocol, outcome: Outcome) -> Option<Op> {
    rules(protocol).and_then(|r| r.phase_two_op(outcome))
}

/// Whether `op` is this transaction's phase two (a refusal of it is a
/// heuristic hazard, not a business "no").
pub fn is_phase_two(tx: &Transaction, op: Op) -> bool {
    tx.decision
        .as_ref()
        .and_then(|d| phase_two_op(tx.protocol, d.outcome))
        == Some(op)
}

fn pending_calls(tx: &Transaction, op: Op) -> Vec<Call> {
    tx.branches
        .iter()
        .filter_map(|b| {
            let o = b.op(op)?;
            o.state.is_open().then(|| Call {
                branch_id: b.branch_id.clone(),
                op,
                endpoint: o.endpoint.clone(),
                fence: tx.fence,
                attempts: o.attempts,
            })
        })
        .collect()
}

/// Records the decision at this entry: the commit point.
fn decide(tx: &mut Transaction, outcome: Outcome, reason: String, ctx: ApplyContext, now_ms: i64) {
    let reason = validate::truncate(&reason, validate::REASON_BYTES_MAX).to_string();
    assert!(
        tx.decision.is_none(),
        "transaction {} decided twice (at {} and {})",
        tx.gid,
        tx.decision.as_ref().map_or(0, |d| d.index),
        ctx.index
    );
    tx.state = match outcome {
        Outcome::Commit => TxState::Committing,
        Outcome::Abort => TxState::Aborting,
    };
    if outcome == Outcome::Abort {
        tx.error = reason.clone();
    }
    tx.decision = Some(Decision {
        outcome,
        term: ctx.term,
        index: ctx.index,
        decided_at_ms: now_ms,
        reason,
    });
    tx.fence = Fence {
        term: ctx.term,
        index: ctx.index,
    };
    if tx.protocol == Protocol::Saga && outcome == Outcome::Abort {
        // What the log says may have run. Commands written since sagas run
        // ahead widen it by one step (`on_abort_v2`, `on_timeout_v2`,
        // `on_results`); the older ones keep this meaning on replay.
        saga::mark_compensations(tx, saga::Reach::Exact);
    }
    finish_if_done(tx, now_ms);
}

/// Records an answer to an op that is still open. Returns whether it
/// changed anything (answers for a closed op, and counts the log already
/// has, are stale repeats). In phase one a business "no" closes the op
/// (`Failed`); in phase two (`phase_two`) it is a refusal: the op stays
/// open, marked `Refused` — a heuristic hazard — and is retried.
fn record_answer(
    tx: &mut Transaction,
    branch_id: &str,
    op: Op,
    outcome: &OpOutcome,
    phase_two: bool,
    now_ms: i64,
) -> Changed {
    if !tx
        .branch(branch_id)
        .and_then(|b| b.op(op))
        .is_some_and(|o| o.state.is_open())
    {
        return false;
    }
    let Some(o) = tx.branch_mut(branch_id).and_then(|b| b.op_mut(op)) else {
        return false;
    };
    match outcome {
        OpOutcome::Succeeded => o.state = OpState::Succeeded,
        OpOutcome::Failed(error) if phase_two => {
            o.state = OpState::Refused;
            o.attempts += 1;
            o.last_error =
                validate::truncate_error(&format!("participant refused {op}: {error}")).to_string();
        }
        OpOutcome::Failed(error) => {
            o.state = OpState::Failed;
            o.attempts += 1;
            o.last_error = validate::truncate_error(error).to_string();
        }
        OpOutcome::Transient(error) => {
            o.attempts += 1;
            o.last_error = validate::truncate_error(error).to_string();
        }
        OpOutcome::Retrying {
            attempts,
            error,
            refused,
        } => {
            let refused = *refused && phase_two;
            if *attempts <= o.attempts && !(refused && o.state != OpState::Refused) {
                return false;
            }
            o.attempts = o.attempts.max(*attempts);
            o.last_error = validate::truncate_error(error).to_string();
            if refused {
                o.state = OpState::Refused;
            }
        }
    }
    o.updated_at_ms = now_ms;
    true
}

/// Records a phase-one answer.
fn record(
    tx: &mut Transaction,
    branch_id: &str,
    op: Op,
    outcome: &OpOutcome,
    now_ms: i64,
) -> Changed {
    record_answer(tx, branch_id, op, outcome, false, now_ms)
}

/// Records a phase-two answer and finishes the transaction when every branch
/// has acknowledged. Phase two never gives up: a participant that voted yes
/// (or ran its action) and now refuses is a heuristic hazard, kept visible
/// (`Refused`) and retried with backoff until it acknowledges.
fn record_phase_two(
    tx: &mut Transaction,
    branch_id: &str,
    op: Op,
    outcome: &OpOutcome,
    now_ms: i64,
) -> Changed {
    if !is_phase_two(tx, op) {
        return false;
    }
    let changed = record_answer(tx, branch_id, op, outcome, true, now_ms);
    if changed {
        finish_if_done(tx, now_ms);
    }
    changed
}

fn finish_if_done(tx: &mut Transaction, now_ms: i64) {
    let Some(decision) = &tx.decision else { return };
    let done = match phase_two_op(tx.protocol, decision.outcome) {
        Some(op) => tx
            .branches
            .iter()
            .all(|b| b.op(op).is_none_or(|o| o.state.is_closed_in_phase_two())),
        // Nothing to send after the decision (a saga gone forward).
        None => true,
    };

    if done {
        tx.state = match decision.outcome {
            Outcome::Commit => TxState::Committed,
            Outcome::Abort => TxState::Aborted,
        };
        tx.finished_at_ms = Some(now_ms);
    }
}

/// A commit request common to the protocols whose votes the coordinator
/// collects (2PC, 3PC): no branches decides at once; otherwise voting
/// starts, its calls carrying this entry's token.
fn start_voting(
    tx: &mut Transaction,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    match tx.state {
        TxState::Active if tx.branches.is_empty() => {
            decide(
                tx,
                Outcome::Commit,
                "no branches to ask".into(),
                ctx,
                now_ms,
            );
            Ok(true)
        }
        TxState::Active => {
            tx.state = TxState::Preparing;
            tx.fence = Fence {
                term: ctx.term,
                index: ctx.index,
            };
            Ok(true)
        }
        TxState::Preparing | TxState::PreCommitting | TxState::Committing | TxState::Committed => {
            Ok(false)
        }
        TxState::Aborting | TxState::Aborted => Err(invalid_state(
            tx,
            format!("cannot commit: it was aborted ({})", tx.error),
        )),
    }
}

/// A phase-one answer common to 2PC's prepare and 3PC's can-commit and
/// pre-commit, recorded while `tx` is in the phase: a no, or no answer
/// after `max_attempts`, decides abort (`what` says what was refused).
/// Whether every branch has now answered yes to `op`; `None` if the answer
/// changed nothing.
fn vote(
    tx: &mut Transaction,
    branch_id: &str,
    op: Op,
    outcome: &OpOutcome,
    ctx: ApplyContext,
    now_ms: i64,
    what: &str,
) -> Option<bool> {
    if !record(tx, branch_id, op, outcome, now_ms) {
        return None;
    }
    let attempts = tx
        .branch(branch_id)
        .and_then(|b| b.op(op))
        .map_or(0, |o| o.attempts);
    match outcome {
        OpOutcome::Failed(error) => {
            let reason = format!("branch {branch_id} {what}: {error}");
            decide(tx, Outcome::Abort, reason, ctx, now_ms);
            Some(false)
        }
        OpOutcome::Transient(error) | OpOutcome::Retrying { error, .. }
            if attempts >= tx.options.retry.max_attempts =>
        {
            let reason = format!(
                "branch {branch_id} did not answer {op} after {attempts} attempts: {error}"
            );
            decide(tx, Outcome::Abort, reason, ctx, now_ms);
            Some(false)
        }
        OpOutcome::Transient(_) | OpOutcome::Retrying { .. } => Some(false),
        OpOutcome::Succeeded => Some(
            tx.branches
                .iter()
                .all(|b| b.op(op).is_some_and(|o| o.state == OpState::Succeeded)),
        ),
    }
}

/// A phase-one commit request common to the protocols whose phase one the
/// application drives (XA, TCC): committing decides at once.
fn commit_app_driven(
    tx: &mut Transaction,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    match tx.state {
        TxState::Active => {
            decide(
                tx,
                Outcome::Commit,
                "committed by the application".into(),
                ctx,
                now_ms,
            );
            Ok(true)
        }
        TxState::Committing | TxState::Committed => Ok(false),
        TxState::Preparing | TxState::PreCommitting | TxState::Aborting | TxState::Aborted => Err(
            invalid_state(tx, format!("cannot commit: it was aborted ({})", tx.error)),
        ),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::types::{RetryPolicy, TxOptions};

    pub fn tx(protocol: Protocol) -> Transaction {
        Transaction {
            gid: "g".into(),
            protocol,
            state: TxState::Active,
            created_at_ms: 0,
            updated_at_ms: 0,
            deadline_ms: 1_000,
            finished_at_ms: None,
            options: TxOptions {
                timeout_ms: 1_000,
                retry: RetryPolicy {
                    initial_interval_ms: 10,
                    max_interval_ms: 100,
                    max_attempts: 3,
                },
                branch_timeout_ms: 100,
                concurrency: 0,
            },

            branches: Vec::new(),
            payload: Default::default(),
            error: String::new(),
            decision: None,
            fence: Fence::default(),
            version: 1,
            commit_requested: false,
            repairs: Vec::new(),
            trace_parent: String::new(),
        }
    }

    /// A saga step calling `http://svc/ID/...`, after the steps named.
    pub fn saga_step(id: &str, after: &[&str]) -> crate::model::command::SagaStepSpec {
        crate::model::command::SagaStepSpec {
            branch_id: id.into(),
            action: format!("http://svc/{id}/action"),
            compensate: format!("http://svc/{id}/compensate"),
            payload: Default::default(),
            after: after.iter().map(|s| s.to_string()).collect(),
            retry: None,
        }
    }

    pub fn spec(protocol: Protocol, branch_id: &str) -> BranchSpec {
        let (required, _) = branch_ops(protocol);
        BranchSpec {
            branch_id: branch_id.into(),
            ops: required
                .iter()
                .map(|op| (*op, format!("http://svc/{branch_id}/{op}")))
                .collect(),
            payload: Default::default(),
        }
    }

    pub fn at(index: u64) -> ApplyContext {
        ApplyContext { index, term: 2 }
    }

    #[test]
    fn registration_checks_ops_endpoints_and_state() {
        let mut t = tx(Protocol::Tcc);
        assert_eq!(on_register(&mut t, spec(Protocol::Tcc, "b1"), 1), Ok(true));
        assert_eq!(
            on_register(&mut t, spec(Protocol::Tcc, "b1"), 2),
            Ok(false),
            "same spec again"
        );
        let mut other = spec(Protocol::Tcc, "b1");
        other.ops[0].1 = "http://elsewhere/x".into();
        assert!(
            on_register(&mut t, other, 3).is_err(),
            "same id, other endpoints"
        );
        let missing = BranchSpec {
            branch_id: "b2".into(),
            ops: vec![(Op::Confirm, "http://svc/c".into())],
            payload: Default::default(),
        };
        let e = on_register(&mut t, missing, 4).unwrap_err().to_string();
        assert!(e.contains("needs an endpoint for cancel"), "{e}");
        let foreign = BranchSpec {
            branch_id: "b3".into(),
            ops: vec![
                (Op::Confirm, "http://svc/c".into()),
                (Op::Cancel, "http://svc/x".into()),
                (Op::Compensate, "http://svc/y".into()),
            ],
            payload: Default::default(),
        };
        assert!(
            on_register(&mut t, foreign, 5)
                .unwrap_err()
                .to_string()
                .contains("not part of protocol tcc")
        );
        let mut bad = spec(Protocol::Tcc, "b4");
        bad.ops[0].1 = "nonsense".into();
        assert!(
            on_register(&mut t, bad, 6)
                .unwrap_err()
                .to_string()
                .contains("malformed")
        );
        assert_eq!(t.branches.len(), 1, "refused registrations left no trace");

        on_commit(&mut t, at(7), 7).unwrap();
        let e = on_register(&mut t, spec(Protocol::Tcc, "late"), 8).unwrap_err();
        assert_eq!(
            e.to_string(),
            "transaction g is committing: cannot register branch late after phase one"
        );
    }

    #[test]
    fn sagas_and_messages_refuse_branch_commands() {
        let mut t = tx(Protocol::Msg);
        assert!(on_register(&mut t, spec(Protocol::Xa, "b"), 1).is_err());
        let mut t = tx(Protocol::Saga);
        assert!(on_register(&mut t, spec(Protocol::Xa, "b"), 1).is_err());
    }

    #[test]
    fn timeout_aborts_only_an_undecided_transaction_past_its_deadline() {
        let mut t = tx(Protocol::Xa);
        on_register(&mut t, spec(Protocol::Xa, "b"), 1).unwrap();
        assert_eq!(on_timeout(&mut t, at(2), 999), Ok(false), "not yet");
        assert_eq!(on_timeout(&mut t, at(3), 1_000), Ok(true));
        assert_eq!(t.state, TxState::Aborting);
        assert_eq!(t.error, "timed out after 1000 ms without a decision");
        assert_eq!(t.fence, Fence { term: 2, index: 3 });
        assert_eq!(
            on_timeout(&mut t, at(4), 5_000),
            Ok(false),
            "already decided"
        );
    }

    #[test]
    fn a_decision_is_never_taken_twice() {
        let mut t = tx(Protocol::Tcc);
        on_register(&mut t, spec(Protocol::Tcc, "b"), 1).unwrap();
        on_commit(&mut t, at(2), 2).unwrap();
        let decided = t.decision.clone();
        assert_eq!(on_commit(&mut t, at(3), 3), Ok(false));
        assert!(on_abort(&mut t, "no", at(4), 4).is_err());
        assert_eq!(on_timeout(&mut t, at(5), 10_000), Ok(false));
        assert_eq!(t.decision, decided);
    }

    /// Drives one transaction through the real rules (the functions `apply`
    /// calls), recording every transition that changed it.
    struct Recorder {
        tx: Transaction,
        index: u64,
        seen: std::collections::BTreeSet<Transition>,
    }

    impl Recorder {
        fn new(tx: Transaction) -> Recorder {
            Recorder {
                tx,
                index: 10,
                seen: Default::default(),
            }
        }

        fn step(
            &mut self,
            on: Event,
            now_ms: i64,
            f: impl FnOnce(&mut Transaction, ApplyContext, i64) -> Result<Changed, Rejection>,
        ) -> &mut Self {
            self.index += 1;
            let from = self.tx.state;
            if let Ok(true) = f(&mut self.tx, at(self.index), now_ms) {
                self.seen.insert(row(from, on, self.tx.state));
            }
            self
        }

        fn register(&mut self, branch: &str) -> &mut Self {
            let spec = spec(self.tx.protocol, branch);
            self.step(Event::Register, 1, |t, _, now| on_register(t, spec, now))
        }

        fn commit(&mut self) -> &mut Self {
            self.step(Event::Commit, 1, on_commit)
        }

        fn abort(&mut self) -> &mut Self {
            self.step(Event::Abort, 1, |t, ctx, now| on_abort(t, "no", ctx, now))
        }

        fn time_out(&mut self) -> &mut Self {
            let deadline = self.tx.deadline_ms;
            self.step(Event::Timeout, deadline, on_timeout)
        }

        fn answer(&mut self, branch: &str, op: Op, outcome: OpOutcome) -> &mut Self {
            let on = Event::Answer(op, Answer::of(&outcome));
            self.step(on, 1, |t, ctx, now| {
                on_result(t, branch, op, &outcome, ctx, now)
            })
        }
    }

    fn yes() -> OpOutcome {
        OpOutcome::Succeeded
    }
    fn no() -> OpOutcome {
        OpOutcome::Failed("no".into())
    }
    fn down() -> OpOutcome {
        OpOutcome::Transient("down".into())
    }

    /// The table and the code agree: every row is reached by a scenario,
    /// and no scenario makes a transition the table does not list.
    fn assert_table_matches(protocol: Protocol, recorders: &[&Recorder]) {
        let seen: std::collections::BTreeSet<Transition> = recorders
            .iter()
            .flat_map(|r| r.seen.iter().copied())
            .collect();
        let table: std::collections::BTreeSet<Transition> = rules(protocol)
            .expect("registered")
            .transitions()
            .iter()
            .copied()
            .collect();
        let unreached: Vec<_> = table.difference(&seen).collect();
        let undeclared: Vec<_> = seen.difference(&table).collect();
        assert!(
            unreached.is_empty() && undeclared.is_empty(),
            "{protocol}: rows never reached {unreached:#?}; transitions not in the table {undeclared:#?}"
        );
    }

    fn with(protocol: Protocol, branches: &[&str]) -> Recorder {
        let mut r = Recorder::new(tx(protocol));
        for b in branches {
            r.register(b);
        }
        r
    }

    #[test]
    fn two_pc_every_row_of_its_table_is_reached_and_nothing_else() {
        let p = Protocol::TwoPc;
        let (prep, commit, rollback) = (Op::Prepare, Op::Commit, Op::Rollback);
        let mut runs = [
            with(p, &[]),
            with(p, &[]),
            with(p, &[]),
            with(p, &["a", "b"]),
            with(p, &["a", "b"]),
            with(p, &["a"]),
            with(p, &["a"]),
            with(p, &["a"]),
            with(p, &["a"]),
            with(p, &["a"]),
        ];
        runs[0].commit();
        runs[1].abort();
        runs[2].time_out();
        runs[3]
            .commit()
            .answer("a", prep, down())
            .answer("a", prep, yes())
            .answer("b", prep, yes())
            .answer("a", commit, no())
            .answer("a", commit, down())
            .answer("a", commit, yes())
            .answer("b", commit, yes());
        runs[4]
            .commit()
            .answer("a", prep, no())
            .answer("a", rollback, no())
            .answer("a", rollback, down())
            .answer("a", rollback, yes())
            .answer("b", rollback, yes());
        runs[5]
            .commit()
            .answer("a", prep, down())
            .answer("a", prep, down())
            .answer("a", prep, down());
        runs[6].commit().abort();
        runs[7].commit().time_out();
        runs[8].abort();
        runs[9].time_out();
        assert_table_matches(p, &runs.iter().collect::<Vec<_>>());
    }

    fn app_driven_table_is_reached(p: Protocol, commit: Op, undo: Op) {
        let mut runs = [
            with(p, &[]),
            with(p, &[]),
            with(p, &[]),
            with(p, &["a", "b"]),
            with(p, &["a", "b"]),
            with(p, &["a"]),
        ];
        runs[0].commit();
        runs[1].abort();
        runs[2].time_out();
        runs[3]
            .commit()
            .answer("a", commit, no())
            .answer("a", commit, down())
            .answer("a", commit, yes())
            .answer("b", commit, yes());
        runs[4]
            .abort()
            .answer("a", undo, no())
            .answer("a", undo, down())
            .answer("a", undo, yes())
            .answer("b", undo, yes());
        runs[5].time_out();
        assert_table_matches(p, &runs.iter().collect::<Vec<_>>());
    }

    #[test]
    fn three_pc_every_row_of_its_table_is_reached_and_nothing_else() {
        let p = Protocol::ThreePc;
        let (can, pre, commit, abort) = (Op::CanCommit, Op::PreCommit, Op::DoCommit, Op::Abort);
        let mut runs = [
            with(p, &[]),
            with(p, &[]),
            with(p, &[]),
            with(p, &["a", "b"]),
            with(p, &["a", "b"]),
            with(p, &["a"]),
            with(p, &["a"]),
            with(p, &["a"]),
            with(p, &["a"]),
            with(p, &["a"]),
            with(p, &["a"]),
            with(p, &["a"]),
            with(p, &["a"]),
        ];
        runs[0].commit();
        runs[1].abort();
        runs[2].time_out();
        runs[3]
            .commit()
            .answer("a", can, down())
            .answer("a", can, yes())
            .answer("b", can, yes())
            .answer("a", pre, down())
            .answer("a", pre, yes())
            .answer("b", pre, yes())
            .answer("a", commit, no())
            .answer("a", commit, down())
            .answer("a", commit, yes())
            .answer("b", commit, yes());
        runs[4]
            .commit()
            .answer("a", can, no())
            .answer("a", abort, no())
            .answer("a", abort, down())
            .answer("a", abort, yes())
            .answer("b", abort, yes());
        runs[5]
            .commit()
            .answer("a", can, down())
            .answer("a", can, down())
            .answer("a", can, down());
        runs[6].commit().abort();
        runs[7].commit().time_out();
        runs[8].abort();
        runs[9].time_out();
        runs[10]
            .commit()
            .answer("a", can, yes())
            .answer("a", pre, no());
        runs[11]
            .commit()
            .answer("a", can, yes())
            .answer("a", pre, down())
            .answer("a", pre, down())
            .answer("a", pre, down());
        runs[12].commit().answer("a", can, yes()).abort();
        let mut timed_out = with(p, &["a"]);
        timed_out.commit().answer("a", can, yes()).time_out();
        let mut all: Vec<&Recorder> = runs.iter().collect();
        all.push(&timed_out);
        assert_table_matches(p, &all);
    }

    #[test]
    fn xa_every_row_of_its_table_is_reached_and_nothing_else() {
        app_driven_table_is_reached(Protocol::Xa, Op::Commit, Op::Rollback);
    }

    #[test]
    fn tcc_every_row_of_its_table_is_reached_and_nothing_else() {
        app_driven_table_is_reached(Protocol::Tcc, Op::Confirm, Op::Cancel);
    }

    #[test]
    fn saga_every_row_of_its_table_is_reached_and_nothing_else() {
        let two_steps = || {
            let mut t = tx(Protocol::Saga);
            t.branches = saga::branches(
                ["s0", "s1"]
                    .iter()
                    .map(|id| crate::model::command::SagaStepSpec {
                        branch_id: id.to_string(),
                        action: format!("http://svc/{id}/action"),
                        compensate: format!("http://svc/{id}/compensate"),
                        payload: Default::default(),
                        after: Vec::new(),
                        retry: None,
                    })
                    .collect(),
                0,
            );
            Recorder::new(t)
        };
        let (action, comp) = (Op::Action, Op::Compensate);
        let mut runs: Vec<Recorder> = (0..5).map(|_| two_steps()).collect();
        runs[0]
            .answer("s0", action, yes())
            .answer("s1", action, down())
            .answer("s1", action, yes());
        runs[1]
            .answer("s0", action, no())
            .answer("s0", comp, no())
            .answer("s0", comp, down())
            .answer("s0", comp, yes())
            .answer("s1", comp, yes());
        runs[2]
            .answer("s0", action, down())
            .answer("s0", action, down())
            .answer("s0", action, down());
        runs[3].abort();
        runs[4].time_out();
        assert_table_matches(Protocol::Saga, &runs.iter().collect::<Vec<_>>());
    }

    #[test]
    fn msg_every_row_of_its_table_is_reached_and_nothing_else() {
        let message = || {
            let mut t = tx(Protocol::Msg);
            t.branches = msg::branches(
                "http://producer/tandem/query_prepared".into(),
                ["a", "b"]
                    .iter()
                    .map(|id| crate::model::command::DestinationSpec {
                        branch_id: id.to_string(),
                        endpoint: format!("nats://orders.{id}"),
                        payload: Default::default(),
                    })
                    .collect(),
                0,
            );
            Recorder::new(t)
        };
        let (query, deliver, cb) = (Op::QueryPrepared, Op::Deliver, msg::CHECK_BACK);
        let mut runs: Vec<Recorder> = (0..5).map(|_| message()).collect();
        runs[0]
            .commit()
            .answer("a", deliver, yes())
            .answer("b", deliver, no())
            .answer("b", deliver, down())
            .answer("b", deliver, yes());
        runs[1].abort();
        runs[2]
            .time_out()
            .answer(cb, query, down())
            .answer(cb, query, yes());
        runs[3].time_out().answer(cb, query, no());
        runs[4].time_out().commit();
        let mut late_abort = message();
        late_abort.time_out().abort();
        let mut all: Vec<&Recorder> = runs.iter().collect();
        all.push(&late_abort);
        assert_table_matches(Protocol::Msg, &all);
    }

    #[test]
    fn every_protocol_has_rules() {
        for p in Protocol::ALL {
            assert!(is_implemented(p), "{p}");
        }
    }
}
