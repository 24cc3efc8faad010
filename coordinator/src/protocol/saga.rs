//! Saga: submitted whole, with its steps; each step has an action and a
//! compensation. Steps run in order (sequential) or as a dependency DAG
//! (concurrent, with a limit on steps in flight, which the driver enforces).
//!
//! Its transitions are the table [`TRANSITIONS`] below — one row per
//! (state, event, next state), checked against the code by the tests in
//! `protocol/mod.rs` (a row never reached, or a transition not in the
//! table, fails them).
//!
//! **Running ahead.** A step's success is not recorded on its own when the
//! next steps can start from it: the driver holds it back, starts them at
//! once, and records it with the answer that ends the hold (a failure, or
//! the last step's success) in one entry (`Command::OpResults`). A two-step
//! saga is then two entries — submitted, done — not three, and it waits for
//! one commit less. The driver runs **one step ahead of the log**, never
//! more: it holds a success only if that step's own dependencies are
//! recorded as succeeded. So, whatever a leader did before it died, a step
//! may have run only if each of its dependencies is recorded as succeeded
//! or may itself have run from recorded successes ([`Reach::OneAhead`]).
//!
//! **Which steps are compensated.** At the decision, every step whose action
//! may have run keeps its compensation pending; the others are skipped
//! (their action never ran and never will: after the decision no action
//! starts). Which steps may have run:
//! - one step beyond what the log says ([`Reach::OneAhead`]): a client's
//!   Abort and a Timeout (`Command::AbortV2`, `TimeoutV2`), and answers
//!   from a leader that does not know all that ran. (The older `Abort`,
//!   `Timeout` and `OpResult` keep their meaning — exactly what the log
//!   says — so logs written before sagas ran ahead replay as they applied.)
//!   An operator's repair never decides an undecided saga;
//! - exactly what the log says ([`Reach::Exact`]) when the decision is
//!   taken by the answers of the worker that drove the saga from its submit
//!   (`exact`, and the entry is of the submit's term, so no other leader
//!   drove it) — its held successes are in that entry, so every step it
//!   started is among those the log lets run.
//!
//! A compensation for an action that in fact never ran, or is still in
//! flight, reaches a participant before its action: the barrier makes it a
//! no-op and refuses the late action, and the fencing token (the decision's
//! entry, newer than the submit's) does too.
//!
//! **Order.** A compensation runs only after the compensations of every
//! step that depends on its step are done: reverse dependency order.
//! Compensations are retried until they succeed; one that keeps failing shows
//! in Get with its attempts and last error.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;

use super::Answer::{No, Unavailable, Yes};
use super::Event::{Abort, Answer, Timeout};
use super::{
    Call, Changed, Rules, Transition, decide, invalid_state, record, record_phase_two, row,
};
use crate::model::command::{ApplyContext, OpOutcome, Rejection, SagaStepSpec};
use crate::model::types::TxState::{Aborted, Aborting, Active, Committed};
use crate::model::types::{Branch, BranchOp, Op, OpState, Outcome, Transaction, TxState};
use crate::model::validate::{self, BRANCHES_HARD_MAX, InvalidInput};

/// Every transition, checked against the code by the tests. (A saga starts
/// Active, submitted whole; it has no Commit and no registration.)
pub const TRANSITIONS: &[Transition] = &[
    row(Active, Answer(Op::Action, Yes), Active),
    row(Active, Answer(Op::Action, Yes), Committed), // the last action: done, forward
    row(Active, Answer(Op::Action, No), Aborting),   // decision compensate
    row(Active, Answer(Op::Action, Unavailable), Active),
    row(Active, Answer(Op::Action, Unavailable), Aborting), // max_attempts: compensate
    row(Active, Abort, Aborting),
    row(Active, Timeout, Aborting),
    row(Aborting, Answer(Op::Compensate, Yes), Aborting),
    row(Aborting, Answer(Op::Compensate, Yes), Aborted),
    row(Aborting, Answer(Op::Compensate, No), Aborting), // refused: a hazard, retried
    row(Aborting, Answer(Op::Compensate, Unavailable), Aborting),
];

/// The saga's rules.
pub struct Saga;

impl Rules for Saga {
    fn branch_ops(&self) -> (&'static [Op], &'static [Op]) {
        (&[], &[])
    }

    fn on_commit(
        &self,
        tx: &mut Transaction,
        _ctx: ApplyContext,
        _now_ms: i64,
    ) -> Result<Changed, Rejection> {
        Err(invalid_state(
            tx,
            "a saga is not committed: it finishes by itself when every step succeeded",
        ))
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
        match outcome {
            Outcome::Abort => Some(Op::Compensate),
            // A saga that went forward is done when its last action is.
            Outcome::Commit => None,
        }
    }

    fn next(&self, tx: &Transaction) -> Vec<Call> {
        next(tx)
    }

    fn transitions(&self) -> &[Transition] {
        TRANSITIONS
    }
}

/// Checks a saga's steps: at least one, unique valid ids, valid endpoints,
/// dependencies that exist and form no cycle.
pub fn validate_steps(gid: &str, steps: &[SagaStepSpec]) -> Result<(), InvalidInput> {
    let other = |problem: String| InvalidInput::Other {
        gid: gid.to_string(),
        problem,
    };
    if steps.is_empty() {
        return Err(other("a saga needs at least one step".into()));
    }
    if steps.len() > BRANCHES_HARD_MAX {
        return Err(other(format!(
            "a saga has at most {BRANCHES_HARD_MAX} steps, not {}",
            steps.len()
        )));
    }
    let mut ids = BTreeSet::new();
    for step in steps {
        validate::branch_id(gid, &step.branch_id)?;
        if !ids.insert(step.branch_id.as_str()) {
            return Err(other(format!("step id {} is used twice", step.branch_id)));
        }
        validate::endpoint(gid, &step.action)?;
        validate::endpoint(gid, &step.compensate)?;
    }
    if steps.iter().all(|s| s.after.is_empty()) {
        // Sequential: no dependency to check, no cycle possible.
        return Ok(());
    }
    for step in steps {
        for dep in &step.after {
            if !ids.contains(dep.as_str()) {
                return Err(other(format!(
                    "step {} comes after {dep}, which is not a step of this saga",
                    step.branch_id
                )));
            }
            if *dep == step.branch_id {
                return Err(other(format!("step {} comes after itself", step.branch_id)));
            }
        }
    }
    // Kahn's algorithm: whatever is left has a cycle.
    let mut indegree: BTreeMap<&str, usize> = steps
        .iter()
        .map(|s| (s.branch_id.as_str(), s.after.len()))
        .collect();
    let mut ready: VecDeque<&str> = indegree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(id, _)| *id)
        .collect();
    let mut done = 0;
    while let Some(id) = ready.pop_front() {
        done += 1;
        for step in steps.iter().filter(|s| s.after.iter().any(|d| d == id)) {
            let d = indegree
                .get_mut(step.branch_id.as_str())
                .expect("known step");
            *d -= 1;
            if *d == 0 {
                ready.push_back(&step.branch_id);
            }
        }
    }
    if done < steps.len() {
        let stuck: Vec<&str> = indegree
            .iter()
            .filter(|(_, d)| **d > 0)
            .map(|(id, _)| *id)
            .collect();
        return Err(other(format!(
            "the steps' dependencies form a cycle among {}",
            stuck.join(", ")
        )));
    }
    Ok(())
}

/// The saga's branches as submitted, every op pending.
pub fn branches(steps: Vec<SagaStepSpec>, now_ms: i64) -> Vec<Arc<Branch>> {
    let op = |op, endpoint| BranchOp {
        op,
        endpoint,
        state: OpState::Pending,
        attempts: 0,
        last_error: String::new(),
        updated_at_ms: now_ms,
    };
    steps
        .into_iter()
        .map(|s| {
            Arc::new(Branch {
                branch_id: s.branch_id,
                ops: vec![op(Op::Action, s.action), op(Op::Compensate, s.compensate)],
                payload: s.payload,
                after: s.after,
                retry: s.retry,
            })
        })
        .collect()
}

/// The steps whose action succeeded. Built once per question, so that
/// answering it for every step stays linear in the saga's size (a saga may
/// have a thousand steps, and the question is asked on every answer).
pub fn succeeded(tx: &Transaction) -> HashSet<&str> {
    tx.branches
        .iter()
        .filter(|b| {
            b.op(Op::Action)
                .is_some_and(|o| o.state == OpState::Succeeded)
        })
        .map(|b| b.branch_id.as_str())
        .collect()
}

/// A step may run (or may have run) once all its dependencies succeeded.
fn runnable(succeeded: &HashSet<&str>, branch: &Branch) -> bool {
    branch
        .after
        .iter()
        .all(|dep| succeeded.contains(dep.as_str()))
}

fn next(tx: &Transaction) -> Vec<Call> {
    let call = |b: &Branch, op: Op| {
        let o = b.op(op).expect("saga branches have both ops");
        Call {
            branch_id: b.branch_id.clone(),
            op,
            endpoint: o.endpoint.clone(),
            fence: tx.fence,
            attempts: o.attempts,
        }
    };
    match tx.state {
        TxState::Active => {
            let succeeded = succeeded(tx);
            tx.branches
                .iter()
                .filter(|b| {
                    b.op(Op::Action)
                        .is_some_and(|o| o.state == OpState::Pending)
                        && runnable(&succeeded, b)
                })
                .map(|b| call(b, Op::Action))
                .collect()
        }
        TxState::Aborting => {
            // Steps some step depends on whose compensation is not done yet:
            // their own compensation waits (reverse dependency order).
            let awaited: HashSet<&str> = tx
                .branches
                .iter()
                .filter(|d| {
                    !d.op(Op::Compensate)
                        .is_some_and(|o| o.state.is_closed_in_phase_two())
                })
                .flat_map(|d| d.after.iter().map(String::as_str))
                .collect();
            tx.branches
                .iter()
                .filter(|b| b.op(Op::Compensate).is_some_and(|o| o.state.is_open()))
                .filter(|b| !awaited.contains(b.branch_id.as_str()))
                .map(|b| call(b, Op::Compensate))
                .collect()
        }
        _ => Vec::new(),
    }
}

/// How far beyond the log's successes a step's action may have run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Steps whose dependencies are all recorded as succeeded.
    Exact,
    /// Those, and the steps whose dependencies are all among those: a
    /// driver runs at most one step ahead of the log.
    OneAhead,
}

/// The steps whose action may have run, by id.
fn may_have_run(tx: &Transaction, reach: Reach) -> HashSet<&str> {
    let succeeded = succeeded(tx);
    let exact: HashSet<&str> = tx
        .branches
        .iter()
        .filter(|b| runnable(&succeeded, b))
        .map(|b| b.branch_id.as_str())
        .collect();
    match reach {
        Reach::Exact => exact,
        Reach::OneAhead => tx
            .branches
            .iter()
            .filter(|b| runnable(&exact, b))
            .map(|b| b.branch_id.as_str())
            .collect(),
    }
}

/// At the decision to compensate: the compensations of every step that
/// may have run (as far as `reach`) are pending, the others skipped. Called
/// again in the decision's own entry (nothing was called yet) with another
/// reach, it moves the difference.
pub fn mark_compensations(tx: &mut Transaction, reach: Reach) {
    let may: Vec<bool> = {
        let may = may_have_run(tx, reach);
        tx.branches
            .iter()
            .map(|b| may.contains(b.branch_id.as_str()))
            .collect()
    };
    for (branch, may) in tx.branches.iter_mut().zip(may) {
        let state = branch.op(Op::Compensate).map(|o| o.state);
        let to = match (may, state) {
            (false, Some(OpState::Pending)) => OpState::Skipped,
            (true, Some(OpState::Skipped)) => OpState::Pending,
            _ => continue,
        };
        if let Some(o) = Arc::make_mut(branch).op_mut(Op::Compensate) {
            o.state = to;
        }
    }
}

/// Whether the driver, holding `held` successes besides those `tx`
/// records (`succeeded`, from [`succeeded`], built once by the caller: the
/// question is asked for every step), may start `step`'s action now: its
/// dependencies all succeeded, and those it holds depend only on recorded
/// successes (one step ahead of the log, never more).
pub fn may_start_ahead(
    tx: &Transaction,
    succeeded: &HashSet<&str>,
    held: &HashSet<&str>,
    step: &Branch,
) -> bool {
    step.after.iter().all(|dep| {
        succeeded.contains(dep.as_str())
            || (held.contains(dep.as_str())
                && tx.branch(dep).is_some_and(|d| runnable(succeeded, d)))
    })
}

fn on_result(
    tx: &mut Transaction,
    branch_id: &str,
    op: Op,
    outcome: &OpOutcome,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    if op == Op::Compensate {
        return Ok(record_phase_two(tx, branch_id, op, outcome, now_ms));
    }
    if tx.state != TxState::Active {
        // An action's answer after the decision: its compensation (if it
        // may have run) is already pending.
        return Ok(false);
    }
    if !record(tx, branch_id, op, outcome, now_ms) {
        return Ok(false);
    }
    let attempts = tx
        .branch(branch_id)
        .expect("recorded above")
        .op(Op::Action)
        .expect("saga branches have an action")
        .attempts;
    let max_attempts = tx.retry_policy(branch_id).max_attempts;
    match outcome {
        OpOutcome::Failed(error) => {
            decide(
                tx,
                Outcome::Abort,
                format!("step {branch_id} failed: {error}"),
                ctx,
                now_ms,
            );
        }
        OpOutcome::Transient(error) | OpOutcome::Retrying { error, .. }
            if attempts >= max_attempts =>
        {
            let reason = format!("step {branch_id} failed {attempts} times: {error}");
            decide(tx, Outcome::Abort, reason, ctx, now_ms);
        }
        OpOutcome::Transient(_) | OpOutcome::Retrying { .. } => {}
        OpOutcome::Succeeded => {
            let all_done = tx.branches.iter().all(|b| {
                b.op(Op::Action)
                    .is_some_and(|o| o.state == OpState::Succeeded)
            });
            if all_done {
                decide(
                    tx,
                    Outcome::Commit,
                    "every step succeeded".into(),
                    ctx,
                    now_ms,
                );
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::super::tests::saga_step as step;
    use super::super::tests::{at, tx};
    use super::super::{
        on_abort, on_abort_v2, on_result as on_any_result, on_results, on_timeout, on_timeout_v2,
    };
    use super::*;
    use crate::model::types::Protocol;

    /// order → (inventory ‖ payment) → shipping
    fn dag() -> Transaction {
        let mut t = tx(Protocol::Saga);
        t.branches = branches(
            vec![
                step("order", &[]),
                step("inventory", &["order"]),
                step("payment", &["order"]),
                step("shipping", &["inventory", "payment"]),
            ],
            0,
        );
        t
    }

    fn calls(t: &Transaction) -> Vec<(String, Op)> {
        next(t).into_iter().map(|c| (c.branch_id, c.op)).collect()
    }

    fn ok(t: &mut Transaction, id: &str, op: Op, index: u64) {
        on_any_result(t, id, op, &OpOutcome::Succeeded, at(index), index as i64).unwrap();
    }

    #[test]
    fn validation_refuses_cycles_duplicates_unknown_deps_and_empty_sagas() {
        assert_eq!(
            validate_steps("g", &[step("a", &[]), step("b", &["a"])]),
            Ok(())
        );
        let e = |steps: &[SagaStepSpec]| validate_steps("g", steps).unwrap_err().to_string();
        assert!(e(&[]).contains("at least one step"));
        assert!(e(&[step("a", &[]), step("a", &[])]).contains("used twice"));
        assert!(e(&[step("a", &["zz"])]).contains("not a step"));
        assert!(e(&[step("a", &["a"])]).contains("after itself"));
        let cycle = e(&[
            step("a", &["c"]),
            step("b", &["a"]),
            step("c", &["b"]),
            step("d", &[]),
        ]);
        assert!(cycle.contains("cycle among a, b, c"), "{cycle}");
        let mut bad = step("a", &[]);
        bad.compensate = "nope".into();
        assert!(e(&[bad]).contains("malformed"));
    }

    #[test]
    fn saga_actions_follow_the_dag_and_finish_forward() {
        let mut t = dag();
        assert_eq!(calls(&t), vec![("order".into(), Op::Action)]);
        ok(&mut t, "order", Op::Action, 2);
        assert_eq!(
            calls(&t),
            vec![
                ("inventory".into(), Op::Action),
                ("payment".into(), Op::Action)
            ]
        );
        ok(&mut t, "payment", Op::Action, 3);
        assert_eq!(
            calls(&t),
            vec![("inventory".into(), Op::Action)],
            "shipping waits for inventory"
        );
        ok(&mut t, "inventory", Op::Action, 4);
        assert_eq!(calls(&t), vec![("shipping".into(), Op::Action)]);
        ok(&mut t, "shipping", Op::Action, 5);
        assert_eq!(t.state, TxState::Committed);
        assert_eq!(t.decision.as_ref().unwrap().outcome, Outcome::Commit);
        assert!(calls(&t).is_empty());
    }

    fn shipping_compensation(t: &Transaction) -> OpState {
        t.branch("shipping")
            .unwrap()
            .op(Op::Compensate)
            .unwrap()
            .state
    }

    fn declined() -> (String, Op, OpOutcome) {
        (
            "payment".into(),
            Op::Action,
            OpOutcome::Failed("card declined".into()),
        )
    }

    /// Saga (DESIGN §4): the driver's held successes and the failure that
    /// ends the hold land in one entry; from the worker that drove the saga
    /// since its submit, that entry knows every step that ran — the steps
    /// it let run are compensated, no more.
    #[test]
    fn saga_failure_compensates_what_may_have_run_in_reverse_order() {
        let mut t = dag();
        t.fence.term = at(2).term; // submitted in this term
        ok(&mut t, "order", Op::Action, 2);
        let inventory = ("inventory".to_string(), Op::Action, OpOutcome::Succeeded);
        assert_eq!(
            on_results(&mut t, &[inventory, declined()], true, at(4), 4),
            Ok(true)
        );
        assert_eq!(t.state, TxState::Aborting);
        assert_eq!(t.error, "step payment failed: card declined");
        assert_eq!(t.fence.index, 4, "compensations carry the decision's token");
        // Shipping never became runnable: skipped. Order is compensated last.
        let shipping = t
            .branch("shipping")
            .unwrap()
            .op(Op::Compensate)
            .unwrap()
            .state;
        assert_eq!(shipping, OpState::Skipped);
        assert_eq!(
            calls(&t),
            vec![
                ("inventory".into(), Op::Compensate),
                ("payment".into(), Op::Compensate)
            ]
        );
        ok(&mut t, "inventory", Op::Compensate, 5);
        assert_eq!(
            calls(&t),
            vec![("payment".into(), Op::Compensate)],
            "order waits for payment"
        );
        ok(&mut t, "payment", Op::Compensate, 6);
        assert_eq!(calls(&t), vec![("order".into(), Op::Compensate)]);
        ok(&mut t, "order", Op::Compensate, 7);
        assert_eq!(t.state, TxState::Aborted);
    }

    /// Saga (DESIGN §4): a decision that cannot know what a driver started
    /// ahead of the log — a client's abort, a timeout, answers from another
    /// term's leader or from a worker that lost some — compensates one step
    /// beyond the recorded successes; never two.
    #[test]
    fn saga_a_decision_that_cannot_know_what_ran_ahead_compensates_one_step_beyond() {
        // Nothing recorded: order may have run, and one step beyond it.
        let mut t = dag();
        on_abort_v2(&mut t, "user cancelled", at(3), 3).unwrap();
        let pending = |t: &Transaction| -> Vec<String> {
            t.branches
                .iter()
                .filter(|b| b.op(Op::Compensate).unwrap().state == OpState::Pending)
                .map(|b| b.branch_id.clone())
                .collect()
        };
        assert_eq!(pending(&t), vec!["order", "inventory", "payment"]);
        assert_eq!(shipping_compensation(&t), OpState::Skipped);

        let mut t = dag();
        ok(&mut t, "order", Op::Action, 2);
        t.deadline_ms = 0;
        on_timeout_v2(&mut t, at(3), 3).unwrap();
        assert_eq!(t.state, TxState::Aborting);
        assert_eq!(shipping_compensation(&t), OpState::Pending, "timeout");

        for (exact, submit_term) in [(true, 1), (false, 2)] {
            let mut t = dag();
            t.fence.term = submit_term;
            ok(&mut t, "order", Op::Action, 2);
            let inventory = ("inventory".to_string(), Op::Action, OpOutcome::Succeeded);
            on_results(&mut t, &[inventory, declined()], exact, at(4), 4).unwrap();
            assert_eq!(
                shipping_compensation(&t),
                OpState::Pending,
                "exact {exact}, submitted in term {submit_term}"
            );
        }
    }

    /// Replay: an Abort or Timeout written before sagas ran ahead keeps
    /// its meaning — exactly the steps the log lets run — so a log from
    /// then replays as it was applied (every replica, from any snapshot,
    /// reaches the same state).
    #[test]
    fn saga_old_abort_and_timeout_entries_replay_with_their_old_meaning() {
        let mut t = dag();
        ok(&mut t, "order", Op::Action, 2);
        on_abort(&mut t, "user cancelled", at(3), 3).unwrap();
        assert_eq!(shipping_compensation(&t), OpState::Skipped, "abort");
        let mut t = dag();
        ok(&mut t, "order", Op::Action, 2);
        t.deadline_ms = 0;
        on_timeout(&mut t, at(3), 3).unwrap();
        assert_eq!(shipping_compensation(&t), OpState::Skipped, "timeout");
    }

    /// An answer for a step the saga does not have refuses the whole
    /// entry (the state machine keeps its copy only when nothing is refused).
    #[test]
    fn saga_answers_recorded_together_are_refused_together() {
        let mut t = dag();
        let results = [
            ("order".to_string(), Op::Action, OpOutcome::Succeeded),
            ("nope".to_string(), Op::Action, OpOutcome::Succeeded),
        ];
        let refused = on_results(&mut t, &results, true, at(2), 2).unwrap_err();
        assert!(refused.to_string().contains("nope"), "{refused}");
    }

    #[test]
    fn saga_no_forward_step_after_compensation_began() {
        let mut t = dag();
        ok(&mut t, "order", Op::Action, 2);
        on_abort(&mut t, "user cancelled", at(3), 3).unwrap();
        assert!(calls(&t).iter().all(|(_, op)| *op == Op::Compensate));
        // A late success of an in-flight action changes nothing.
        assert_eq!(
            on_any_result(
                &mut t,
                "inventory",
                Op::Action,
                &OpOutcome::Succeeded,
                at(4),
                4
            ),
            Ok(false)
        );
        assert!(calls(&t).iter().all(|(_, op)| *op == Op::Compensate));
    }

    #[test]
    fn saga_exhausted_action_retries_compensate_and_compensations_never_give_up() {
        let mut t = dag();
        t.fence.term = at(2).term; // submitted in this term
        for i in 0..3 {
            let failed = (
                "order".to_string(),
                Op::Action,
                OpOutcome::Transient("503".into()),
            );
            on_results(&mut t, &[failed], true, at(2 + i), 2).unwrap();
        }
        assert_eq!(t.state, TxState::Aborting);
        assert!(t.error.contains("failed 3 times"), "{}", t.error);
        for i in 0..20 {
            on_any_result(
                &mut t,
                "order",
                Op::Compensate,
                &OpOutcome::Transient("down".into()),
                at(10 + i),
                10,
            )
            .unwrap();
        }
        let c = t
            .branch("order")
            .unwrap()
            .op(Op::Compensate)
            .unwrap()
            .clone();
        assert_eq!((c.state, c.attempts), (OpState::Pending, 20));
        assert_eq!(calls(&t), vec![("order".into(), Op::Compensate)]);
    }
}
