//! Three-phase commit, driven by the coordinator: `can_commit` to every
//! branch (a vote); all yes → `pre_commit` to every branch; once every
//! pre-commit is acknowledged, the decision to commit — at that entry, the
//! commit point — then `do_commit`. A "no", exhausted retries or the
//! timeout before every pre-commit is acknowledged decide to abort, and
//! `abort` goes to every branch.
//!
//! Classic 3PC lets a participant that timed out in the pre-committed
//! state commit on its own, which breaks atomicity under a partition. Here
//! the coordinator is replicated, so a participant in doubt asks it
//! (the termination protocol: Get with `resolve`) and never decides alone.
//!
//! Its transitions are the table [`TRANSITIONS`] below, checked against
//! the code by the tests in `protocol/mod.rs`.

use super::Answer::{No, Unavailable, Yes};
use super::Event::{Abort, Answer, Commit, Register, Timeout};
use super::{
    Call, Changed, Rules, Transition, decide, finish_if_done, pending_calls, phase_two_calls,
    record_phase_two, row, start_voting, vote,
};
use crate::model::command::{ApplyContext, OpOutcome, Rejection};
use crate::model::types::TxState::{
    Aborted, Aborting, Active, Committed, Committing, PreCommitting, Preparing,
};
use crate::model::types::{Fence, Op, Outcome, Transaction, TxState};

/// (required, optional) operations of a 3PC branch.
pub const BRANCH_OPS: (&[Op], &[Op]) = (
    &[Op::CanCommit, Op::PreCommit, Op::DoCommit, Op::Abort],
    &[],
);

/// Every transition, checked against the code by the tests.
pub const TRANSITIONS: &[Transition] = &[
    row(Active, Register, Active),
    row(Active, Commit, Preparing),
    row(Active, Commit, Committed), // no branches: nothing to ask
    row(Active, Abort, Aborting),
    row(Active, Abort, Aborted), // no branches: nothing to abort
    row(Active, Timeout, Aborting),
    row(Active, Timeout, Aborted),
    row(Preparing, Answer(Op::CanCommit, Yes), Preparing),
    row(Preparing, Answer(Op::CanCommit, Yes), PreCommitting), // the last yes
    row(Preparing, Answer(Op::CanCommit, No), Aborting),
    row(Preparing, Answer(Op::CanCommit, Unavailable), Preparing),
    row(Preparing, Answer(Op::CanCommit, Unavailable), Aborting), // max_attempts
    row(Preparing, Abort, Aborting),
    row(Preparing, Timeout, Aborting),
    row(PreCommitting, Answer(Op::PreCommit, Yes), PreCommitting),
    row(PreCommitting, Answer(Op::PreCommit, Yes), Committing), // the last ack: decision commit
    row(PreCommitting, Answer(Op::PreCommit, No), Aborting),
    row(
        PreCommitting,
        Answer(Op::PreCommit, Unavailable),
        PreCommitting,
    ),
    row(PreCommitting, Answer(Op::PreCommit, Unavailable), Aborting), // max_attempts
    row(PreCommitting, Abort, Aborting),
    row(PreCommitting, Timeout, Aborting), // before every ack: abort
    row(Committing, Answer(Op::DoCommit, Yes), Committing),
    row(Committing, Answer(Op::DoCommit, Yes), Committed),
    row(Committing, Answer(Op::DoCommit, No), Committing), // refused: a hazard, retried
    row(Committing, Answer(Op::DoCommit, Unavailable), Committing),
    row(Aborting, Answer(Op::Abort, Yes), Aborting),
    row(Aborting, Answer(Op::Abort, Yes), Aborted),
    row(Aborting, Answer(Op::Abort, No), Aborting),
    row(Aborting, Answer(Op::Abort, Unavailable), Aborting),
];

/// Three-phase commit's rules.
pub struct ThreePc;

impl Rules for ThreePc {
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
        let phase = match op {
            Op::CanCommit => TxState::Preparing,
            Op::PreCommit => TxState::PreCommitting,
            _ => return Ok(record_phase_two(tx, branch_id, op, outcome, now_ms)),
        };
        if tx.state != phase {
            // A late answer of an earlier phase (or after the decision):
            // it changes nothing; what follows reaches the branch anyway.
            return Ok(false);
        }
        let what = match op {
            Op::CanCommit => "voted no",
            _ => "refused to pre-commit",
        };
        let Some(all) = vote(tx, branch_id, op, outcome, ctx, now_ms, what) else {
            return Ok(false);
        };
        if all && op == Op::CanCommit {
            // Every vote is yes: pre-commits carry this entry's token.
            tx.state = TxState::PreCommitting;
            tx.fence = fence(ctx);
        } else if all {
            decide(
                tx,
                Outcome::Commit,
                "every branch pre-committed".into(),
                ctx,
                now_ms,
            );
        }
        finish_if_done(tx, now_ms);
        Ok(true)
    }

    fn phase_two_op(&self, outcome: Outcome) -> Option<Op> {
        Some(match outcome {
            Outcome::Commit => Op::DoCommit,
            Outcome::Abort => Op::Abort,
        })
    }

    fn next(&self, tx: &Transaction) -> Vec<Call> {
        match tx.state {
            TxState::Preparing => pending_calls(tx, Op::CanCommit),
            TxState::PreCommitting => pending_calls(tx, Op::PreCommit),
            _ => phase_two_calls(tx, self),
        }
    }

    fn transitions(&self) -> &[Transition] {
        TRANSITIONS
    }
}

fn fence(ctx: ApplyContext) -> Fence {
    Fence {
        term: ctx.term,
        index: ctx.index,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, spec, tx};
    use super::super::{next, on_abort, on_commit, on_register, on_result, on_timeout};
    use super::*;
    use crate::model::types::Protocol;

    fn pair() -> Transaction {
        let mut t = tx(Protocol::ThreePc);
        on_register(&mut t, spec(Protocol::ThreePc, "a"), 1).unwrap();
        on_register(&mut t, spec(Protocol::ThreePc, "b"), 1).unwrap();
        t
    }

    fn calls(t: &Transaction) -> Vec<(String, Op)> {
        next(t).into_iter().map(|c| (c.branch_id, c.op)).collect()
    }

    fn yes(t: &mut Transaction, b: &str, op: Op, index: u64) -> Changed {
        on_result(t, b, op, &OpOutcome::Succeeded, at(index), index as i64).unwrap()
    }

    #[test]
    fn commit_point_is_the_entry_of_the_last_pre_commit_ack() {
        let mut t = pair();
        assert!(calls(&t).is_empty(), "nothing is asked before Commit");
        on_commit(&mut t, at(10), 10).unwrap();
        assert_eq!(t.state, TxState::Preparing);
        let both = |op| vec![("a".to_string(), op), ("b".to_string(), op)];
        assert_eq!(calls(&t), both(Op::CanCommit));
        yes(&mut t, "a", Op::CanCommit, 11);
        assert_eq!(calls(&t), vec![("b".into(), Op::CanCommit)]);
        yes(&mut t, "b", Op::CanCommit, 12);
        assert_eq!(t.state, TxState::PreCommitting);
        assert!(!t.is_decided(), "pre-committing is not a decision");
        assert_eq!(calls(&t), both(Op::PreCommit));
        assert!(
            next(&t)
                .iter()
                .all(|c| c.fence == Fence { term: 2, index: 12 })
        );
        yes(&mut t, "a", Op::PreCommit, 13);
        assert_eq!(t.state, TxState::PreCommitting);
        yes(&mut t, "b", Op::PreCommit, 14);
        assert_eq!(t.state, TxState::Committing);
        let d = t.decision.clone().unwrap();
        assert_eq!((d.outcome, d.index), (Outcome::Commit, 14));
        assert_eq!(calls(&t), both(Op::DoCommit));
        assert!(
            next(&t)
                .iter()
                .all(|c| c.fence == Fence { term: 2, index: 14 })
        );
        yes(&mut t, "a", Op::DoCommit, 15);
        yes(&mut t, "b", Op::DoCommit, 16);
        assert_eq!(t.state, TxState::Committed);
        assert!(calls(&t).is_empty());
    }

    #[test]
    fn atomicity_a_timeout_before_every_pre_commit_ack_aborts_every_branch() {
        let mut t = pair();
        on_commit(&mut t, at(10), 10).unwrap();
        yes(&mut t, "a", Op::CanCommit, 11);
        yes(&mut t, "b", Op::CanCommit, 12);
        yes(&mut t, "a", Op::PreCommit, 13);
        let deadline = t.deadline_ms;
        on_timeout(&mut t, at(14), deadline).unwrap();
        assert_eq!(t.state, TxState::Aborting);
        let both = vec![("a".to_string(), Op::Abort), ("b".to_string(), Op::Abort)];
        assert_eq!(calls(&t), both, "the pre-committed branch is aborted too");
        // A late pre-commit ack cannot change the decision.
        assert!(!yes(&mut t, "b", Op::PreCommit, 15));
        assert_eq!(t.decision.as_ref().unwrap().outcome, Outcome::Abort);
    }

    #[test]
    fn atomicity_a_no_vote_or_a_refused_pre_commit_aborts() {
        for op in [Op::CanCommit, Op::PreCommit] {
            let mut t = pair();
            on_commit(&mut t, at(10), 10).unwrap();
            if op == Op::PreCommit {
                yes(&mut t, "a", Op::CanCommit, 11);
                yes(&mut t, "b", Op::CanCommit, 12);
            }
            on_result(&mut t, "b", op, &OpOutcome::Failed("no".into()), at(13), 13).unwrap();
            assert_eq!(t.state, TxState::Aborting, "{op}");
            assert_eq!(t.decision.as_ref().unwrap().index, 13);
        }
    }

    #[test]
    fn a_late_can_commit_answer_changes_nothing_once_pre_committing() {
        let mut t = pair();
        on_commit(&mut t, at(10), 10).unwrap();
        yes(&mut t, "a", Op::CanCommit, 11);
        yes(&mut t, "b", Op::CanCommit, 12);
        let before = t.clone();
        assert!(!yes(&mut t, "a", Op::CanCommit, 13));
        assert_eq!(t, before);
        on_abort(&mut t, "the application gave up", at(14), 14).unwrap();
        assert_eq!(t.state, TxState::Aborting);
    }
}
