//! TCC: the application calls each participant's Try through the SDK, which
//! registers the branch (with its confirm and cancel) before calling Try.
//!
//! | state      | event                                  | next state | effect |
//! |------------|----------------------------------------|------------|--------|
//! | Active     | RegisterBranch                         | Active     | branch enlisted |
//! | Active     | Commit                                 | Committing | **decision confirm** at this entry |
//! | Active     | Abort (a failed Try), Timeout          | Aborting   | decision cancel |
//! | Committing | every `confirm` acknowledged           | Committed  | |
//! | Aborting   | every `cancel` acknowledged            | Aborted    | |
//!
//! Cancel goes to every registered branch, whether its Try ran, failed or
//! never arrived: the participant's barrier turns a cancel without a try into
//! a no-op and refuses the late try.

use super::{Changed, commit_app_driven};
use crate::model::command::{ApplyContext, Rejection};
use crate::model::types::{Op, Transaction};

/// (required, optional) operations of a TCC branch; `try` is recorded for
/// visibility only — the application calls it.
pub const BRANCH_OPS: (&[Op], &[Op]) = (&[Op::Confirm, Op::Cancel], &[Op::Try]);

pub fn on_commit(
    tx: &mut Transaction,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    commit_app_driven(tx, ctx, now_ms)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, spec, tx};
    use super::super::{next, on_register, on_result, on_timeout};
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
