//! TCC: the application calls each participant's Try through the SDK, which
//! registers the branch (with its confirm and cancel) before calling Try.
//!
//! Its transitions are the table [`TRANSITIONS`] below — one row per
//! (state, event, next state), checked against the code by the tests in
//! `protocol/mod.rs` (a row never reached, or a transition not in the
//! table, fails them).
//!
//! Cancel goes to every registered branch, whether its Try ran, failed or
//! never arrived: the participant's barrier turns a cancel without a try into
//! a no-op and refuses the late try.

use super::Answer::{No, Unavailable, Yes};
use super::Event::{Abort, Answer, Commit, Register, Timeout};
use super::{Changed, Rules, Transition, commit_app_driven, record_phase_two, row};
use crate::model::command::{ApplyContext, OpOutcome, Rejection};
use crate::model::types::TxState::{Aborted, Aborting, Active, Committed, Committing};
use crate::model::types::{Op, Outcome, Transaction};

/// (required, optional) operations of a TCC branch; `try` is recorded for
/// visibility only — the application calls it.
pub const BRANCH_OPS: (&[Op], &[Op]) = (&[Op::Confirm, Op::Cancel], &[Op::Try]);

/// Every transition, checked against the code by the tests.
pub const TRANSITIONS: &[Transition] = &[
    row(Active, Register, Active),
    row(Active, Commit, Committing), // the decision: COMMIT_OP to every branch
    row(Active, Commit, Committed),  // no branches
    row(Active, Abort, Aborting),
    row(Active, Abort, Aborted), // no branches
    row(Active, Timeout, Aborting),
    row(Active, Timeout, Aborted),
    row(Committing, Answer(COMMIT_OP, Yes), Committing),
    row(Committing, Answer(COMMIT_OP, Yes), Committed),
    row(Committing, Answer(COMMIT_OP, No), Committing), // refused: a hazard, retried
    row(Committing, Answer(COMMIT_OP, Unavailable), Committing),
    row(Aborting, Answer(ABORT_OP, Yes), Aborting),
    row(Aborting, Answer(ABORT_OP, Yes), Aborted),
    row(Aborting, Answer(ABORT_OP, No), Aborting),
    row(Aborting, Answer(ABORT_OP, Unavailable), Aborting),
];

const COMMIT_OP: Op = Op::Confirm;
const ABORT_OP: Op = Op::Cancel;

/// TCC's rules: the application drives phase one, the coordinator phase two.
pub struct Tcc;

impl Rules for Tcc {
    fn branch_ops(&self) -> (&'static [Op], &'static [Op]) {
        BRANCH_OPS
    }

    fn on_commit(
        &self,
        tx: &mut Transaction,
        ctx: ApplyContext,
        now_ms: i64,
    ) -> Result<Changed, Rejection> {
        commit_app_driven(tx, ctx, now_ms)
    }

    fn on_result(
        &self,
        tx: &mut Transaction,
        branch_id: &str,
        op: Op,
        outcome: &OpOutcome,
        _ctx: ApplyContext,
        now_ms: i64,
    ) -> Result<Changed, Rejection> {
        // Only phase two is driven by the coordinator.
        Ok(record_phase_two(tx, branch_id, op, outcome, now_ms))
    }

    fn phase_two_op(&self, outcome: Outcome) -> Option<Op> {
        Some(match outcome {
            Outcome::Commit => COMMIT_OP,
            Outcome::Abort => ABORT_OP,
        })
    }

    fn transitions(&self) -> &'static [Transition] {
        TRANSITIONS
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, spec, tx};
    use super::super::{next, on_commit, on_register, on_result, on_timeout};
    use super::*;
    use crate::model::command::OpOutcome;
    use crate::model::types::{Protocol, TxState};

    #[test]
    fn timeout_before_commit_cancels_every_branch() {
        let mut t = tx(Protocol::Tcc);
        on_register(&mut t, spec(Protocol::Tcc, "flight"), 1).unwrap();
        on_register(&mut t, spec(Protocol::Tcc, "hotel"), 2).unwrap();
        on_timeout(&mut t, at(3), 2_000).unwrap();
        let ops: Vec<_> = next(&t).into_iter().map(|c| c.op).collect();
        assert_eq!(ops, vec![Op::Cancel, Op::Cancel]);
        on_result(
            &mut t,
            "flight",
            Op::Cancel,
            &OpOutcome::Succeeded,
            at(4),
            4,
        )
        .unwrap();
        on_result(&mut t, "hotel", Op::Cancel, &OpOutcome::Succeeded, at(5), 5).unwrap();
        assert_eq!(t.state, TxState::Aborted);
    }

    #[test]
    fn commit_confirms_every_branch() {
        let mut t = tx(Protocol::Tcc);
        on_register(&mut t, spec(Protocol::Tcc, "pay"), 1).unwrap();
        on_commit(&mut t, at(2), 2).unwrap();
        assert_eq!(next(&t)[0].op, Op::Confirm);
        on_result(&mut t, "pay", Op::Confirm, &OpOutcome::Succeeded, at(3), 3).unwrap();
        assert_eq!(t.state, TxState::Committed);
    }
}
