//! The rules XA and TCC share: the application drives phase one (it calls
//! each participant itself, after registering the branch), its Commit is the
//! decision, and the coordinator drives phase two to every registered
//! branch. The two protocols differ only in their operations' names; each
//! file (`xa.rs`, `tcc.rs`) names them and gets this table and these rules.

use super::Answer::{No, Unavailable, Yes};
use super::Event::{Abort, Answer, Commit, Register, Timeout};
use super::{Changed, Rules, Transition, commit_app_driven, record_phase_two, row};
use crate::model::command::{ApplyContext, OpOutcome, Rejection};
use crate::model::types::TxState::{Aborted, Aborting, Active, Committed, Committing};
use crate::model::types::{Op, Outcome, Transaction};

/// Every transition of an application-driven protocol whose phase two is
/// `commit` or `undo`.
pub const fn table(commit: Op, undo: Op) -> [Transition; 15] {
    [
        row(Active, Register, Active),
        row(Active, Commit, Committing), // the decision: `commit` to every branch
        row(Active, Commit, Committed),  // no branches
        row(Active, Abort, Aborting),
        row(Active, Abort, Aborted), // no branches
        row(Active, Timeout, Aborting),
        row(Active, Timeout, Aborted),
        row(Committing, Answer(commit, Yes), Committing),
        row(Committing, Answer(commit, Yes), Committed),
        row(Committing, Answer(commit, No), Committing), // refused: a hazard, retried
        row(Committing, Answer(commit, Unavailable), Committing),
        row(Aborting, Answer(undo, Yes), Aborting),
        row(Aborting, Answer(undo, Yes), Aborted),
        row(Aborting, Answer(undo, No), Aborting),
        row(Aborting, Answer(undo, Unavailable), Aborting),
    ]
}

/// An application-driven protocol: its branches' operations, and the
/// table they make.
pub struct AppDriven {
    /// (required, optional) operations a branch registers.
    branch_ops: (&'static [Op], &'static [Op]),
    /// Phase two after a commit decision.
    commit: Op,
    /// Phase two after an abort decision.
    undo: Op,
    /// [`table`] of `commit` and `undo`.
    transitions: [Transition; 15],
}

impl AppDriven {
    pub const fn new(branch_ops: (&'static [Op], &'static [Op]), commit: Op, undo: Op) -> Self {
        AppDriven {
            branch_ops,
            commit,
            undo,
            transitions: table(commit, undo),
        }
    }
}

impl Rules for AppDriven {
    fn branch_ops(&self) -> (&'static [Op], &'static [Op]) {
        self.branch_ops
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
            Outcome::Commit => self.commit,
            Outcome::Abort => self.undo,
        })
    }

    fn transitions(&self) -> &[Transition] {
        &self.transitions
    }
}
