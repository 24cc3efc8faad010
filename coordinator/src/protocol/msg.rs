//! Transactional messages: "write my row and publish the event, both or
//! neither" (DESIGN §3, invariant 7).
//!
//! A message is prepared whole ([`branches`]): one branch per destination,
//! with op `deliver`, and one branch [`CHECK_BACK`] with op
//! `query_prepared`, the producer's check-back. Then:
//!
//! * the producer commits its local transaction (with a marker row) and
//!   calls Submit (`Commit`): the decision *deliver*;
//! * or calls Abort: the decision *drop* (nothing to send);
//! * or says nothing by the deadline (it crashed, or lost the reply): the
//!   `Timeout` does **not** abort, it starts asking the check-back
//!   (`Preparing`). Committed (yes) → deliver; rolled back (a business no)
//!   → drop; no answer → asked again with backoff, for ever, visibly (its
//!   attempts and last error in Get) — a message is never dropped because
//!   its producer was unreachable (RocketMQ gives up after 15 checks).
//!
//! Delivery is phase two: every destination is called until it
//! acknowledges (a refusal is retried as a hazard, like any phase two). The
//! message id (`wire::message_id`, gid and branch) is the same on every
//! attempt, so consumers and brokers deduplicate on it.
//!
//! Its transitions are the table [`TRANSITIONS`], checked against the code
//! by the tests in `protocol/mod.rs`.

use std::sync::Arc;

use super::Answer::{No, Unavailable, Yes};
use super::Event::{Abort, Answer, Commit, Timeout};
use super::{
    Call, Changed, Rules, Transition, decide, invalid_state, pending_calls, phase_two_calls,
    record, record_phase_two, row,
};
use crate::model::command::{ApplyContext, DestinationSpec, OpOutcome, Rejection};
use crate::model::types::TxState::{Aborted, Active, Committed, Committing, Preparing};
use crate::model::types::{Branch, BranchOp, Fence, Op, OpState, Outcome, Transaction, TxState};
use crate::model::validate::{self, BRANCHES_HARD_MAX, InvalidInput};

/// The branch that holds the producer's check-back (a name destinations
/// may not take).
pub const CHECK_BACK: &str = "check-back";

/// A message id (`{gid}/{destination}`) fits an AMQP short string.
pub const MESSAGE_ID_BYTES_MAX: usize = 255;

/// Every transition, checked against the code by the tests.
pub const TRANSITIONS: &[Transition] = &[
    row(Active, Commit, Committing), // Submit: deliver
    row(Active, Abort, Aborted),     // drop: nothing to send
    row(Active, Timeout, Preparing), // no Submit in time: ask the check-back
    row(Preparing, Answer(Op::QueryPrepared, Yes), Committing), // committed: deliver
    row(Preparing, Answer(Op::QueryPrepared, No), Aborted), // rolled back: drop
    row(Preparing, Answer(Op::QueryPrepared, Unavailable), Preparing), // ask again, for ever
    row(Preparing, Commit, Committing), // a late Submit
    row(Preparing, Abort, Aborted),  // a late Abort
    row(Committing, Answer(Op::Deliver, Yes), Committing),
    row(Committing, Answer(Op::Deliver, Yes), Committed),
    row(Committing, Answer(Op::Deliver, No), Committing), // refused: a hazard, retried
    row(Committing, Answer(Op::Deliver, Unavailable), Committing),
];

/// The message rules.
pub struct Msg;

impl Rules for Msg {
    fn branch_ops(&self) -> (&'static [Op], &'static [Op]) {
        // Prepared whole: no branch is registered on its own.
        (&[], &[])
    }

    fn on_commit(
        &self,
        tx: &mut Transaction,
        ctx: ApplyContext,
        now_ms: i64,
    ) -> Result<Changed, Rejection> {
        match tx.state {
            TxState::Active | TxState::Preparing => {
                decide(
                    tx,
                    Outcome::Commit,
                    "submitted by the producer".into(),
                    ctx,
                    now_ms,
                );
                Ok(true)
            }
            TxState::Committing | TxState::Committed => Ok(false),
            TxState::PreCommitting | TxState::Aborting | TxState::Aborted => Err(invalid_state(
                tx,
                format!("cannot submit: the message was dropped ({})", tx.error),
            )),
        }
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
        match op {
            Op::QueryPrepared if tx.state == TxState::Preparing => {
                if !record(tx, branch_id, op, outcome, now_ms) {
                    return Ok(false);
                }
                match outcome {
                    OpOutcome::Succeeded => decide(
                        tx,
                        Outcome::Commit,
                        "the check-back says the local transaction committed".into(),
                        ctx,
                        now_ms,
                    ),
                    OpOutcome::Failed(error) => decide(
                        tx,
                        Outcome::Abort,
                        format!("the check-back says the local transaction rolled back: {error}"),
                        ctx,
                        now_ms,
                    ),
                    // Asked again after the backoff; never given up on.
                    OpOutcome::Transient(_) | OpOutcome::Retrying { .. } => {}
                }
                Ok(true)
            }
            // A check-back answer after a Submit or Abort decided: stale.
            Op::QueryPrepared => Ok(false),
            _ => Ok(record_phase_two(tx, branch_id, op, outcome, now_ms)),
        }
    }

    fn on_timeout(
        &self,
        tx: &mut Transaction,
        ctx: ApplyContext,
        now_ms: i64,
    ) -> Result<Changed, Rejection> {
        if tx.state != TxState::Active || now_ms < tx.deadline_ms {
            return Ok(false);
        }
        #[cfg(feature = "injected-bug")]
        if crate::injected::on(crate::injected::Bug::DeliverOnTimeout) {
            // The bug: presume the producer committed instead of asking.
            decide(
                tx,
                Outcome::Commit,
                "delivered at the timeout".into(),
                ctx,
                now_ms,
            );
            return Ok(true);
        }
        tx.state = TxState::Preparing;
        tx.fence = Fence {
            term: ctx.term,
            index: ctx.index,
        };
        Ok(true)
    }

    fn times_out(&self, tx: &Transaction) -> bool {
        tx.state == TxState::Active
    }

    fn phase_one_gives_up(&self) -> bool {
        false
    }

    fn phase_two_op(&self, outcome: Outcome) -> Option<Op> {
        match outcome {
            Outcome::Commit => Some(Op::Deliver),
            // Dropped: nothing was sent, nothing to take back.
            Outcome::Abort => None,
        }
    }

    fn next(&self, tx: &Transaction) -> Vec<Call> {
        match tx.state {
            TxState::Preparing => pending_calls(tx, Op::QueryPrepared),
            _ => phase_two_calls(tx, self),
        }
    }

    fn transitions(&self) -> &[Transition] {
        TRANSITIONS
    }
}

/// Checks a message's check-back and destinations: at least one
/// destination, unique valid ids (not [`CHECK_BACK`]), valid destinations
/// and a valid check-back endpoint.
pub fn validate(
    gid: &str,
    check_back: &str,
    destinations: &[DestinationSpec],
) -> Result<(), InvalidInput> {
    let other = |problem: String| InvalidInput::Other {
        gid: gid.to_string(),
        problem,
    };
    if destinations.is_empty() {
        return Err(other("a message needs at least one destination".into()));
    }
    if destinations.len() >= BRANCHES_HARD_MAX {
        return Err(other(format!(
            "a message has at most {} destinations, not {}",
            BRANCHES_HARD_MAX - 1,
            destinations.len()
        )));
    }
    if check_back.is_empty() {
        return Err(other(
            "a message needs a check-back endpoint: the coordinator asks it whether the local transaction committed when no Submit arrives".into(),
        ));
    }
    validate::endpoint(gid, check_back).map_err(|e| match e {
        InvalidInput::Other { gid, problem } => InvalidInput::Other {
            gid,
            problem: format!("check-back: {problem}"),
        },
        e => e,
    })?;
    let mut ids = std::collections::BTreeSet::new();
    for d in destinations {
        validate::branch_id(gid, &d.branch_id)?;
        if d.branch_id == CHECK_BACK {
            return Err(other(format!(
                "destination id {CHECK_BACK:?} is reserved for the check-back"
            )));
        }
        if !ids.insert(d.branch_id.as_str()) {
            return Err(other(format!(
                "destination id {} appears twice",
                d.branch_id
            )));
        }
        let id = tandem_proto::wire::message_id(gid, &d.branch_id);
        if id.len() > MESSAGE_ID_BYTES_MAX {
            return Err(other(format!(
                "destination {}: the message id {id:?} is {} bytes; brokers take at most {MESSAGE_ID_BYTES_MAX} (shorten the gid or the destination id)",
                d.branch_id,
                id.len()
            )));
        }
        validate::destination(gid, &d.endpoint)?;
    }
    Ok(())
}

/// The branches of a prepared message: every destination, then the
/// check-back.
pub fn branches(
    check_back: String,
    destinations: Vec<DestinationSpec>,
    now_ms: i64,
) -> Vec<Arc<Branch>> {
    let op = |op, endpoint| BranchOp {
        op,
        endpoint,
        state: OpState::Pending,
        attempts: 0,
        last_error: String::new(),
        updated_at_ms: now_ms,
    };
    let mut branches: Vec<Arc<Branch>> = destinations
        .into_iter()
        .map(|d| {
            Arc::new(Branch {
                branch_id: d.branch_id,
                ops: vec![op(Op::Deliver, d.endpoint)],
                payload: d.payload,
                after: Vec::new(),
                retry: None,
            })
        })
        .collect();
    branches.push(Arc::new(Branch {
        branch_id: CHECK_BACK.to_string(),
        ops: vec![op(Op::QueryPrepared, check_back)],
        payload: Default::default(),
        after: Vec::new(),
        retry: None,
    }));
    branches
}

/// Whether a message already recorded is the one `check_back` and
/// `destinations` describe (a repeated Prepare).
pub fn same(tx: &Transaction, check_back: &str, destinations: &[DestinationSpec]) -> bool {
    tx.branches.len() == destinations.len() + 1
        && tx.branches.iter().zip(destinations).all(|(b, d)| {
            b.branch_id == d.branch_id
                && b.payload == d.payload
                && b.op(Op::Deliver).is_some_and(|o| o.endpoint == d.endpoint)
        })
        && tx
            .branch(CHECK_BACK)
            .and_then(|b| b.op(Op::QueryPrepared))
            .is_some_and(|o| o.endpoint == check_back)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, tx};
    use super::super::{next, on_abort, on_commit, on_result, on_timeout};
    use super::*;
    use crate::model::types::Protocol;

    fn message(destinations: usize) -> Transaction {
        let mut t = tx(Protocol::Msg);
        t.branches = branches(
            "http://producer/tandem/query_prepared".into(),
            (0..destinations)
                .map(|i| DestinationSpec {
                    branch_id: format!("d{i}"),
                    endpoint: format!("nats://orders.d{i}"),
                    payload: Default::default(),
                })
                .collect(),
            0,
        );
        t
    }

    fn ops(t: &Transaction) -> Vec<(String, Op)> {
        next(t).into_iter().map(|c| (c.branch_id, c.op)).collect()
    }

    #[test]
    fn messages_submit_delivers_to_every_destination_once_acknowledged() {
        let mut t = message(2);
        assert!(ops(&t).is_empty(), "nothing leaves before the decision");
        on_commit(&mut t, at(2), 2).unwrap();
        assert_eq!(t.state, TxState::Committing);
        assert_eq!(
            ops(&t),
            vec![("d0".into(), Op::Deliver), ("d1".into(), Op::Deliver)]
        );
        on_result(&mut t, "d0", Op::Deliver, &OpOutcome::Succeeded, at(3), 3).unwrap();
        let busy = OpOutcome::Transient("broker down".into());
        on_result(&mut t, "d1", Op::Deliver, &busy, at(4), 4).unwrap();
        assert_eq!(ops(&t), vec![("d1".into(), Op::Deliver)]);
        on_result(&mut t, "d1", Op::Deliver, &OpOutcome::Succeeded, at(5), 5).unwrap();
        assert_eq!(t.state, TxState::Committed);
    }

    #[test]
    fn messages_timeout_asks_the_check_back_and_never_gives_up() {
        let mut t = message(1);
        assert_eq!(
            on_timeout(&mut t, at(2), 999),
            Ok(false),
            "before the deadline"
        );
        assert_eq!(on_timeout(&mut t, at(3), 2_000), Ok(true));
        assert_eq!(t.state, TxState::Preparing);
        assert!(!t.is_decided(), "a timeout decides nothing for a message");
        assert_eq!(ops(&t), vec![(CHECK_BACK.into(), Op::QueryPrepared)]);
        for i in 0..100u32 {
            let answer = OpOutcome::Retrying {
                attempts: i + 1,
                error: "connection refused".into(),
                refused: false,
            };
            on_result(&mut t, CHECK_BACK, Op::QueryPrepared, &answer, at(4), 4).unwrap();
        }
        assert_eq!(
            t.state,
            TxState::Preparing,
            "far past max_attempts: still asking"
        );
        let op = t.branch(CHECK_BACK).unwrap().op(Op::QueryPrepared).unwrap();
        assert_eq!(
            (op.attempts, op.last_error.as_str()),
            (100, "connection refused")
        );
        on_result(
            &mut t,
            CHECK_BACK,
            Op::QueryPrepared,
            &OpOutcome::Succeeded,
            at(5),
            5,
        )
        .unwrap();
        assert_eq!(t.state, TxState::Committing);
        assert_eq!(ops(&t), vec![("d0".into(), Op::Deliver)]);
    }

    #[test]
    fn messages_check_back_rolled_back_drops_and_refuses_a_late_submit() {
        let mut t = message(1);
        on_timeout(&mut t, at(2), 2_000).unwrap();
        let no = OpOutcome::Failed("no marker: rolled back".into());
        on_result(&mut t, CHECK_BACK, Op::QueryPrepared, &no, at(3), 3).unwrap();
        assert_eq!(t.state, TxState::Aborted);
        assert!(ops(&t).is_empty(), "nothing is delivered");
        let late = on_commit(&mut t, at(4), 4).unwrap_err().to_string();
        assert!(late.contains("cannot submit"), "{late}");
    }

    #[test]
    fn messages_abort_drops_at_once_and_submit_after_it_is_refused() {
        let mut t = message(3);
        assert_eq!(on_abort(&mut t, "local rollback", at(2), 2), Ok(true));
        assert_eq!(t.state, TxState::Aborted);
        assert!(on_commit(&mut t, at(3), 3).is_err());
        assert_eq!(on_abort(&mut t, "again", at(4), 4), Ok(false), "idempotent");
    }

    #[test]
    fn messages_late_submit_while_asking_decides_and_a_stale_check_back_changes_nothing() {
        let mut t = message(1);
        on_timeout(&mut t, at(2), 2_000).unwrap();
        on_commit(&mut t, at(3), 3).unwrap();
        assert_eq!(t.state, TxState::Committing);
        let no = OpOutcome::Failed("rolled back".into());
        assert_eq!(
            on_result(&mut t, CHECK_BACK, Op::QueryPrepared, &no, at(4), 4),
            Ok(false)
        );
        assert_eq!(t.state, TxState::Committing);
        assert_eq!(
            on_commit(&mut t, at(5), 5),
            Ok(false),
            "Submit is idempotent"
        );
    }

    #[test]
    fn messages_prepare_checks_name_the_problem() {
        let d = |id: &str, endpoint: &str| DestinationSpec {
            branch_id: id.into(),
            endpoint: endpoint.into(),
            payload: Default::default(),
        };
        let cb = "http://p/tandem/query_prepared";
        let cases: [(&str, Vec<DestinationSpec>, &str); 5] = [
            (cb, vec![], "at least one destination"),
            ("", vec![d("a", "nats://x")], "check-back endpoint"),
            (cb, vec![d("a", "kafka://x")], "malformed"),
            (cb, vec![d("a", "nats://x"), d("a", "nats://y")], "twice"),
            (cb, vec![d(CHECK_BACK, "nats://x")], "reserved"),
        ];
        for (check_back, destinations, why) in cases {
            let e = validate("m1", check_back, &destinations)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why) && e.contains("m1"), "{why}: {e}");
        }
        assert_eq!(validate("m1", cb, &[d("a", "amqp://ex/rk")]), Ok(()));
    }
}
