//! TCC: the application calls each participant's Try through the SDK, which
//! registers the branch (with its confirm and cancel) before calling Try.
//!
//! Its transitions are the table it shares with XA
//! (`app_driven.rs`), of its own operations — checked against the code by
//! the tests in `protocol/mod.rs` (a row never reached, or a transition not
//! in the table, fails them).
//!
//! Cancel goes to every registered branch, whether its Try ran, failed or
//! never arrived: the participant's barrier turns a cancel without a try into
//! a no-op and refuses the late try.

use super::app_driven::AppDriven;
use crate::model::types::Op;

/// (required, optional) operations of a TCC branch; `try` is recorded for
/// visibility only — the application calls it.
pub const BRANCH_OPS: (&[Op], &[Op]) = (&[Op::Confirm, Op::Cancel], &[Op::Try]);

/// TCC's rules: the application drives phase one, the coordinator phase
/// two; its transitions are [`super::app_driven::table`] of its ops.
pub const TCC: AppDriven = AppDriven::new(BRANCH_OPS, Op::Confirm, Op::Cancel);

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
