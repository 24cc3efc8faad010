//! XA: each branch does `XA START … XA END, XA PREPARE` (or PostgreSQL's
//! `PREPARE TRANSACTION`) inside the application's call to the participant,
//! after registering. The application's Commit is the vote "every branch
//! prepared"; the coordinator drives phase two through the participants.
//!
//! Its transitions are the table it shares with TCC
//! (`app_driven.rs`), of its own operations — checked against the code by
//! the tests in `protocol/mod.rs` (a row never reached, or a transition not
//! in the table, fails them).
//!
//! A participant that prepared and then lost contact resolves its xid by
//! asking the coordinator (the SDK's recovery scan): presumed abort for an
//! unknown gid or one past its deadline.

use super::app_driven::AppDriven;
use crate::model::types::Op;

/// (required, optional) operations of an XA branch. `prepare` happens in
/// the application's call, not the coordinator's.
pub const BRANCH_OPS: (&[Op], &[Op]) = (&[Op::Commit, Op::Rollback], &[]);

/// XA's rules: the application drives phase one, the coordinator phase
/// two; its transitions are [`super::app_driven::table`] of its ops.
pub const XA: AppDriven = AppDriven::new(BRANCH_OPS, Op::Commit, Op::Rollback);

#[cfg(test)]
mod tests {
    use super::super::tests::{at, spec, tx};
    use super::super::{next, on_abort, on_commit, on_register, on_result};
    use super::*;
    use crate::model::command::OpOutcome;
    use crate::model::types::{Outcome, Protocol, TxState};

    #[test]
    fn commit_decides_at_once_and_phase_two_commits_every_branch() {
        let mut t = tx(Protocol::Xa);
        on_register(&mut t, spec(Protocol::Xa, "pg"), 1).unwrap();
        on_register(&mut t, spec(Protocol::Xa, "maria"), 2).unwrap();
        assert!(next(&t).is_empty());
        on_commit(&mut t, at(3), 3).unwrap();
        assert_eq!(
            t.decision.as_ref().map(|d| (d.outcome, d.index)),
            Some((Outcome::Commit, 3))
        );
        let ops: Vec<_> = next(&t).into_iter().map(|c| c.op).collect();
        assert_eq!(ops, vec![Op::Commit, Op::Commit]);
        on_result(&mut t, "pg", Op::Commit, &OpOutcome::Succeeded, at(4), 4).unwrap();
        on_result(&mut t, "maria", Op::Commit, &OpOutcome::Succeeded, at(5), 5).unwrap();
        assert_eq!(t.state, TxState::Committed);
    }

    #[test]
    fn abort_rolls_back_every_branch() {
        let mut t = tx(Protocol::Xa);
        on_register(&mut t, spec(Protocol::Xa, "pg"), 1).unwrap();
        on_abort(&mut t, "transfer refused", at(2), 2).unwrap();
        let ops: Vec<_> = next(&t).into_iter().map(|c| c.op).collect();
        assert_eq!(ops, vec![Op::Rollback]);
        assert_eq!(t.error, "transfer refused");
        on_result(&mut t, "pg", Op::Rollback, &OpOutcome::Succeeded, at(3), 3).unwrap();
        assert_eq!(t.state, TxState::Aborted);
    }
}
