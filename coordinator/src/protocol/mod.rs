//! Protocol logic, pure: given a transaction and an event, what is its new
//! state; given a transaction, which participant calls should run now. No
//! I/O, no clocks — time arrives inside the events. `state::machine::apply`
//! calls the `on_*` functions; the driver calls [`next`].
//!
//! Each protocol has its module with its transition table in its doc comment;
//! the mechanics they share (recording an answer, deciding, finishing) live
//! here.

use std::sync::Arc;

pub mod retry;
pub mod saga;
pub mod tcc;
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

/// The operations a protocol's branches must register, and may.
pub fn branch_ops(protocol: Protocol) -> (&'static [Op], &'static [Op]) {
    match protocol {
        Protocol::TwoPc => two_pc::BRANCH_OPS,
        Protocol::Xa => xa::BRANCH_OPS,
        Protocol::Tcc => tcc::BRANCH_OPS,
        Protocol::Saga | Protocol::ThreePc | Protocol::Msg => (&[], &[]),
    }
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
    let changed = match tx.protocol {
        Protocol::TwoPc => two_pc::on_commit(tx, ctx, now_ms),
        Protocol::Xa => xa::on_commit(tx, ctx, now_ms),
        Protocol::Tcc => tcc::on_commit(tx, ctx, now_ms),
        Protocol::Saga => Err(invalid_state(
            tx,
            "a saga is not committed: it finishes by itself when every step succeeded",
        )),
        Protocol::ThreePc | Protocol::Msg => Err(unsupported(tx, "commit")),
    }?;
    tx.commit_requested |= changed;
    Ok(changed)
}

pub fn on_abort(
    tx: &mut Transaction,
    reason: &str,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    match tx.protocol {
        Protocol::TwoPc | Protocol::Xa | Protocol::Tcc | Protocol::Saga => {}
        Protocol::ThreePc | Protocol::Msg => return Err(unsupported(tx, "abort")),
    }
    match tx.state {
        TxState::Active | TxState::Preparing => {
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

/// Aborts an undecided transaction whose deadline has passed.
pub fn on_timeout(
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
    match tx.protocol {
        Protocol::TwoPc => two_pc::on_result(tx, branch_id, op, outcome, ctx, now_ms),
        Protocol::Xa | Protocol::Tcc => {
            // Only phase two is driven by the coordinator.
            Ok(record_phase_two(tx, branch_id, op, outcome, now_ms))
        }
        Protocol::Saga => saga::on_result(tx, branch_id, op, outcome, ctx, now_ms),
        Protocol::ThreePc | Protocol::Msg => Err(unsupported(tx, "branch results")),
    }
}

/// The calls that should be under way for this transaction now.
pub fn next(tx: &Transaction) -> Vec<Call> {
    if tx.protocol == Protocol::Saga {
        return saga::next(tx);
    }
    match tx.state {
        TxState::Preparing if tx.protocol == Protocol::TwoPc => pending_calls(tx, Op::Prepare),
        TxState::Committing | TxState::Aborting => {
            let outcome = tx.decision.as_ref().map(|d| d.outcome);
            match outcome.and_then(|o| phase_two_op(tx.protocol, o)) {
                Some(op) => pending_calls(tx, op),
                None => Vec::new(),
            }
        }
        _ => Vec::new(),
    }
}

/// The operation phase two sends for an outcome.
pub fn phase_two_op(protocol: Protocol, outcome: Outcome) -> Option<Op> {
    match (protocol, outcome) {
        (Protocol::TwoPc | Protocol::Xa, Outcome::Commit) => Some(Op::Commit),
        (Protocol::TwoPc | Protocol::Xa, Outcome::Abort) => Some(Op::Rollback),
        (Protocol::Tcc, Outcome::Commit) => Some(Op::Confirm),
        (Protocol::Tcc, Outcome::Abort) => Some(Op::Cancel),
        (Protocol::Saga, Outcome::Abort) => Some(Op::Compensate),
        // A saga that went forward is done when its last action is.
        (Protocol::Saga, Outcome::Commit) => None,
        (Protocol::ThreePc | Protocol::Msg, _) => None,
    }
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
        saga::mark_compensations(tx);
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
        Some(op) => tx.branches.iter().all(|b| {
            b.op(op)
                .is_none_or(|o| matches!(o.state, OpState::Succeeded | OpState::Skipped))
        }),
        // Nothing to send after the decision (a saga gone forward).
        None => tx.protocol == Protocol::Saga,
    };

    if done {
        tx.state = match decision.outcome {
            Outcome::Commit => TxState::Committed,
            Outcome::Abort => TxState::Aborted,
        };
        tx.finished_at_ms = Some(now_ms);
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
        TxState::Preparing | TxState::Aborting | TxState::Aborted => Err(invalid_state(
            tx,
            format!("cannot commit: it was aborted ({})", tx.error),
        )),
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
    fn sagas_and_unimplemented_protocols_refuse_branch_commands() {
        let mut t = tx(Protocol::ThreePc);
        assert!(on_register(&mut t, spec(Protocol::Xa, "b"), 1).is_err());
        assert!(on_commit(&mut t, at(2), 2).is_err());
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
}
