//! Two-phase commit, driven by the coordinator: it asks every branch to
//! prepare, decides, then tells every branch.
//!
//! Its transitions are the table [`TRANSITIONS`] below — one row per
//! (state, event, next state), checked against the code by the tests in
//! `protocol/mod.rs` (a row never reached, or a transition not in the
//! table, fails them).
//!
//! Rollback goes to every branch, prepared or not: a participant treats a
//! rollback of something it never prepared as done, and keeps a tombstone so
//! a late prepare cannot revive it. Presumed abort: no decision, no commit.

use super::Answer::{No, Unavailable, Yes};
use super::Event::{Abort, Answer, Commit, Register, Timeout};
use super::{
    Call, Changed, Rules, Transition, decide, finish_if_done, pending_calls, phase_two_calls,
    record_phase_two, row, start_voting, vote,
};
use crate::model::command::{ApplyContext, OpOutcome, Rejection};
use crate::model::types::TxState::{Aborted, Aborting, Active, Committed, Committing, Preparing};
use crate::model::types::{Op, Outcome, Transaction, TxState};

/// (required, optional) operations of a 2PC branch.
pub const BRANCH_OPS: (&[Op], &[Op]) = (&[Op::Prepare, Op::Commit, Op::Rollback], &[]);

/// Every transition, checked against the code by the tests.
pub const TRANSITIONS: &[Transition] = &[
    row(Active, Register, Active),
    row(Active, Commit, Preparing),
    row(Active, Commit, Committed), // no branches: nothing to prepare
    row(Active, Abort, Aborting),
    row(Active, Abort, Aborted), // no branches: nothing to roll back
    row(Active, Timeout, Aborting),
    row(Active, Timeout, Aborted),
    row(Preparing, Answer(Op::Prepare, Yes), Preparing),
    row(Preparing, Answer(Op::Prepare, Yes), Committing), // the last yes: decision commit
    row(Preparing, Answer(Op::Prepare, No), Aborting),    // a no: decision abort
    row(Preparing, Answer(Op::Prepare, Unavailable), Preparing),
    row(Preparing, Answer(Op::Prepare, Unavailable), Aborting), // max_attempts: abort
    row(Preparing, Abort, Aborting),
    row(Preparing, Timeout, Aborting),
    row(Committing, Answer(Op::Commit, Yes), Committing),
    row(Committing, Answer(Op::Commit, Yes), Committed),
    row(Committing, Answer(Op::Commit, No), Committing), // refused: a hazard, retried
    row(Committing, Answer(Op::Commit, Unavailable), Committing),
    row(Aborting, Answer(Op::Rollback, Yes), Aborting),
    row(Aborting, Answer(Op::Rollback, Yes), Aborted),
    row(Aborting, Answer(Op::Rollback, No), Aborting),
    row(Aborting, Answer(Op::Rollback, Unavailable), Aborting),
];

/// Two-phase commit's rules.
pub struct TwoPc;

impl Rules for TwoPc {
    fn branch_ops(&self) -> (&'static [Op], &'static [Op]) {
        BRANCH_OPS
    }

    fn on_commit(
        &self,
        tx: &mut Transaction,
        ctx: ApplyContext,
        now_ms: i64,
    ) -> Result<Changed, Rejection> {
        start_voting(tx, ctx, now_ms)
    }

    fn on_result(
        &self,
        tx: &mut Transaction,
        branch_id: &str,
        op: Op,
        outcome: &OpOutcome,
        ctx: ApplyContext,
        now_ms: i64,
    ) -> Result<Changed, Rejection> {
        on_result(tx, branch_id, op, outcome, ctx, now_ms)
    }

    fn phase_two_op(&self, outcome: Outcome) -> Option<Op> {
        Some(match outcome {
            Outcome::Commit => Op::Commit,
            Outcome::Abort => Op::Rollback,
        })
    }

    fn next(&self, tx: &Transaction) -> Vec<Call> {
        match tx.state {
            TxState::Preparing => pending_calls(tx, Op::Prepare),
            _ => phase_two_calls(tx, self),
        }
    }

    fn transitions(&self) -> &[Transition] {
        TRANSITIONS
    }
}

fn on_result(
    tx: &mut Transaction,
    branch_id: &str,
    op: Op,
    outcome: &OpOutcome,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    if op != Op::Prepare {
        return Ok(record_phase_two(tx, branch_id, op, outcome, now_ms));
    }
    if tx.state != TxState::Preparing {
        // A prepare answer after the decision: the decision stands, and phase
        // two reaches this branch anyway.
        return Ok(false);
    }
    let Some(all_prepared) = vote(tx, branch_id, op, outcome, ctx, now_ms, "voted no") else {
        return Ok(false);
    };
    // The bug the simulation must catch (tests/simulation.rs).
    #[cfg(feature = "injected-bug")]
    let all_prepared = all_prepared
        || (crate::injected::on(crate::injected::Bug::CommitOnFirstVote)
            && outcome == &OpOutcome::Succeeded
            && tx.branches.len() > 1);
    if all_prepared {
        decide(
            tx,
            Outcome::Commit,
            "every branch prepared".into(),
            ctx,
            now_ms,
        );
    }
    finish_if_done(tx, now_ms);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, spec, tx};
    use super::super::{next, on_abort, on_commit, on_register, on_result, on_timeout};
    use super::*;
    use crate::model::types::Protocol;
    use crate::model::types::{Fence, OpState};

    fn prepared_pair() -> Transaction {
        let mut t = tx(Protocol::TwoPc);
        on_register(&mut t, spec(Protocol::TwoPc, "a"), 1).unwrap();
        on_register(&mut t, spec(Protocol::TwoPc, "b"), 1).unwrap();
        t
    }

    fn calls(t: &Transaction) -> Vec<(String, Op)> {
        next(t).into_iter().map(|c| (c.branch_id, c.op)).collect()
    }

    #[test]
    fn commit_point_is_the_entry_of_the_last_prepare() {
        let mut t = prepared_pair();
        assert!(calls(&t).is_empty(), "nothing is called before Commit");
        on_commit(&mut t, at(10), 10).unwrap();
        assert_eq!(t.state, TxState::Preparing);
        assert_eq!(
            calls(&t),
            vec![("a".into(), Op::Prepare), ("b".into(), Op::Prepare)]
        );
        assert!(
            next(&t)
                .iter()
                .all(|c| c.fence == Fence { term: 2, index: 10 })
        );

        on_result(&mut t, "a", Op::Prepare, &OpOutcome::Succeeded, at(11), 11).unwrap();
        assert_eq!(t.state, TxState::Preparing);
        assert_eq!(calls(&t), vec![("b".into(), Op::Prepare)]);
        on_result(&mut t, "b", Op::Prepare, &OpOutcome::Succeeded, at(12), 12).unwrap();
        assert_eq!(t.state, TxState::Committing);
        let decision = t.decision.clone().unwrap();
        assert_eq!((decision.outcome, decision.index), (Outcome::Commit, 12));
        // Phase two carries the decision's token.
        assert_eq!(
            calls(&t),
            vec![("a".into(), Op::Commit), ("b".into(), Op::Commit)]
        );
        assert!(
            next(&t)
                .iter()
                .all(|c| c.fence == Fence { term: 2, index: 12 })
        );

        on_result(&mut t, "a", Op::Commit, &OpOutcome::Succeeded, at(13), 13).unwrap();
        on_result(
            &mut t,
            "b",
            Op::Commit,
            &OpOutcome::Transient("down".into()),
            at(14),
            14,
        )
        .unwrap();
        assert_eq!(t.state, TxState::Committing);
        assert_eq!(t.branch("b").unwrap().op(Op::Commit).unwrap().attempts, 1);
        on_result(&mut t, "b", Op::Commit, &OpOutcome::Succeeded, at(15), 15).unwrap();
        assert_eq!(t.state, TxState::Committed);
        assert_eq!(t.finished_at_ms, Some(15));
        assert!(calls(&t).is_empty());
    }

    #[test]
    fn atomicity_a_no_vote_rolls_back_every_branch() {
        let mut t = prepared_pair();
        on_commit(&mut t, at(10), 10).unwrap();
        on_result(&mut t, "a", Op::Prepare, &OpOutcome::Succeeded, at(11), 11).unwrap();
        on_result(
            &mut t,
            "b",
            Op::Prepare,
            &OpOutcome::Failed("insufficient funds".into()),
            at(12),
            12,
        )
        .unwrap();
        assert_eq!(t.state, TxState::Aborting);
        assert_eq!(t.error, "branch b voted no: insufficient funds");
        assert_eq!(
            calls(&t),
            vec![("a".into(), Op::Rollback), ("b".into(), Op::Rollback)]
        );
        on_result(&mut t, "a", Op::Rollback, &OpOutcome::Succeeded, at(13), 13).unwrap();
        on_result(&mut t, "b", Op::Rollback, &OpOutcome::Succeeded, at(14), 14).unwrap();
        assert_eq!(t.state, TxState::Aborted);
    }

    #[test]
    fn atomicity_a_late_prepare_answer_cannot_change_the_decision() {
        let mut t = prepared_pair();
        on_commit(&mut t, at(10), 10).unwrap();
        on_timeout(&mut t, at(11), 5_000).unwrap();
        assert_eq!(t.state, TxState::Aborting);
        for branch in ["a", "b"] {
            assert_eq!(
                on_result(
                    &mut t,
                    branch,
                    Op::Prepare,
                    &OpOutcome::Succeeded,
                    at(12),
                    12
                ),
                Ok(false)
            );
        }
        assert_eq!(t.decision.as_ref().unwrap().outcome, Outcome::Abort);
        // A commit answer is not what phase two asked for: ignored too.
        assert_eq!(
            on_result(&mut t, "a", Op::Commit, &OpOutcome::Succeeded, at(13), 13),
            Ok(false)
        );
    }

    #[test]
    fn prepare_gives_up_after_max_attempts_and_aborts() {
        let mut t = prepared_pair();
        on_commit(&mut t, at(10), 10).unwrap();
        for i in 0..3 {
            assert_eq!(t.state, TxState::Preparing, "attempt {i}");
            on_result(
                &mut t,
                "a",
                Op::Prepare,
                &OpOutcome::Transient("refused".into()),
                at(11 + i),
                11,
            )
            .unwrap();
        }
        assert_eq!(t.state, TxState::Aborting);
        assert!(
            t.error.contains("did not answer prepare after 3 attempts"),
            "{}",
            t.error
        );
    }

    #[test]
    fn prepare_gives_up_when_a_sparse_failure_record_reaches_max_attempts() {
        let mut t = prepared_pair();
        on_commit(&mut t, at(10), 10).unwrap();
        let retrying = |attempts| OpOutcome::Retrying {
            attempts,
            error: "503".into(),
            refused: false,
        };
        assert_eq!(
            on_result(&mut t, "a", Op::Prepare, &retrying(1), at(11), 11),
            Ok(true)
        );
        assert_eq!(
            on_result(&mut t, "a", Op::Prepare, &retrying(1), at(12), 12),
            Ok(false),
            "a repeated count is stale"
        );
        assert_eq!(t.state, TxState::Preparing);
        assert_eq!(
            on_result(&mut t, "a", Op::Prepare, &retrying(3), at(13), 13),
            Ok(true)
        );
        assert_eq!(t.state, TxState::Aborting, "3 attempts is the limit");
        assert!(
            t.error.contains("did not answer prepare after 3 attempts"),
            "{}",
            t.error
        );
    }

    #[test]
    fn a_refusal_recorded_sparsely_marks_the_hazard_and_success_clears_it() {
        let mut t = prepared_pair();
        on_commit(&mut t, at(10), 10).unwrap();
        for b in ["a", "b"] {
            on_result(&mut t, b, Op::Prepare, &OpOutcome::Succeeded, at(11), 11).unwrap();
        }
        assert_eq!(t.state, TxState::Committing);
        let refused = OpOutcome::Retrying {
            attempts: 4,
            error: "participant refused commit: no".into(),
            refused: true,
        };
        assert_eq!(
            on_result(&mut t, "a", Op::Commit, &refused, at(12), 12),
            Ok(true)
        );
        let op = t.branch("a").unwrap().op(Op::Commit).unwrap().clone();
        assert_eq!((op.state, op.attempts), (OpState::Refused, 4));
        assert!(
            calls(&t).contains(&("a".into(), Op::Commit)),
            "still called"
        );
        on_result(&mut t, "a", Op::Commit, &OpOutcome::Succeeded, at(13), 13).unwrap();
        on_result(&mut t, "b", Op::Commit, &OpOutcome::Succeeded, at(14), 14).unwrap();
        assert_eq!(t.state, TxState::Committed);
        assert!(
            t.branches
                .iter()
                .all(|b| b.op(Op::Commit).unwrap().state == OpState::Succeeded)
        );
    }

    #[test]
    fn phase_two_never_gives_up_and_shows_the_last_error() {
        let mut t = prepared_pair();
        on_abort(&mut t, "user cancelled", at(10), 10).unwrap();
        for i in 0..10 {
            on_result(
                &mut t,
                "a",
                Op::Rollback,
                &OpOutcome::Failed("db down".into()),
                at(11 + i),
                11,
            )
            .unwrap();
        }
        let op = t.branch("a").unwrap().op(Op::Rollback).unwrap().clone();
        assert_eq!(t.state, TxState::Aborting);
        assert_eq!(
            op.state,
            OpState::Refused,
            "a refusal is a hazard, kept open"
        );
        assert_eq!(op.attempts, 10);
        assert_eq!(op.last_error, "participant refused rollback: db down");
        assert_eq!(
            calls(&t),
            vec![("a".into(), Op::Rollback), ("b".into(), Op::Rollback)]
        );
    }

    #[test]
    fn commit_and_abort_are_idempotent_and_contradictions_refused() {
        // The rule itself (`protocol::on_commit` answers a repeat before it).
        let mut t = prepared_pair();
        assert_eq!(TwoPc.on_commit(&mut t, at(10), 10), Ok(true));
        assert_eq!(TwoPc.on_commit(&mut t, at(11), 11), Ok(false));
        assert_eq!(
            on_abort(&mut t, "", at(12), 12),
            Ok(true),
            "abort while preparing"
        );
        assert_eq!(on_abort(&mut t, "", at(13), 13), Ok(false));
        let e = TwoPc.on_commit(&mut t, at(14), 14).unwrap_err();
        assert_eq!(
            e.to_string(),
            "transaction g is aborting: cannot commit: it was aborted (aborted by the application)"
        );
    }

    #[test]
    fn idempotency_a_repeated_commit_returns_an_abort_its_votes_caused() {
        let mut t = prepared_pair();
        super::super::on_commit(&mut t, at(10), 10).unwrap();
        on_result(
            &mut t,
            "a",
            Op::Prepare,
            &OpOutcome::Failed("no".into()),
            at(11),
            11,
        )
        .unwrap();
        assert_eq!(t.state, TxState::Aborting);
        // The client's retry of the same Commit after a lost reply.
        assert_eq!(super::super::on_commit(&mut t, at(12), 12), Ok(false));
        // But committing what the application itself aborted is refused.
        let mut u = prepared_pair();
        on_abort(&mut u, "no thanks", at(10), 10).unwrap();
        assert!(super::super::on_commit(&mut u, at(11), 11).is_err());
    }

    #[test]
    fn an_empty_transaction_commits_at_once() {
        let mut t = tx(Protocol::TwoPc);
        on_commit(&mut t, at(3), 3).unwrap();
        assert_eq!(t.state, TxState::Committed);
    }
}
