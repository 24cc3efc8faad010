//! Operators' repairs, pure: what `tandem tx retry` and `tandem tx resolve`
//! do to a transaction, whatever its protocol. Each leaves an audit record
//! (what, which branch, why, by whom, when, which entry) in the
//! transaction's history.
//!
//! * **Retry** changes no op: the record itself is the signal. The driver
//!   sees a new Retry record and calls the named open ops at once instead
//!   of after their backoff. Allowed while the transaction has a call to
//!   make.
//! * **Resolve** closes open phase-two ops without their participant
//!   (`OpState::Resolved`): the decision stands, the coordinator stops
//!   calling, and the transaction finishes with a heuristic outcome that
//!   Get, the API, metrics and the dashboard show. Only after the decision:
//!   an undecided transaction is aborted instead, which is safe.

use super::{Changed, finish_if_done, invalid_state, next, phase_two_op};
use crate::model::command::{ApplyContext, Rejection};
use crate::model::types::{OpState, Repair, RepairAction, Transaction};
use crate::model::validate::{self, InvalidInput, REPAIR_TEXT_BYTES_MAX, REPAIRS_MAX};

/// Applies one repair; `branch_id` `None` means every branch it fits.
pub fn on_repair(
    tx: &mut Transaction,
    action: RepairAction,
    branch_id: Option<&str>,
    reason: &str,
    by: &str,
    ctx: ApplyContext,
    now_ms: i64,
) -> Result<Changed, Rejection> {
    if tx.state.is_terminal() {
        return Err(invalid_state(
            tx,
            format!("nothing to {}: it has finished", action.name()),
        ));
    }
    if let Some(id) = branch_id
        && tx.branch(id).is_none()
    {
        return Err(Rejection::Invalid(InvalidInput::Other {
            gid: tx.gid.clone(),
            problem: format!("it has no branch {id}"),
        }));
    }
    let named = |id: &str| branch_id.is_none_or(|b| b == id);
    match action {
        RepairAction::Retry => {
            if !next(tx).iter().any(|c| named(&c.branch_id)) {
                let what = match branch_id {
                    Some(id) => format!("branch {id} has no call waiting to be made"),
                    None => "no call is waiting to be made".to_string(),
                };
                return Err(invalid_state(tx, what));
            }
        }
        RepairAction::Resolve => {
            let Some(decision) = &tx.decision else {
                return Err(invalid_state(
                    tx,
                    "it is undecided: abort it instead (tandem tx abort); only phase two can be resolved by hand",
                ));
            };
            let Some(op) = phase_two_op(tx.protocol, decision.outcome) else {
                return Err(invalid_state(tx, "it has no phase two to resolve"));
            };
            let open: Vec<String> = tx
                .branches
                .iter()
                .filter(|b| named(&b.branch_id))
                .filter(|b| b.op(op).is_some_and(|o| o.state.is_open()))
                .map(|b| b.branch_id.clone())
                .collect();
            if open.is_empty() {
                let what = match branch_id {
                    Some(id) => format!("branch {id} has no open {op} to resolve"),
                    None => format!("no branch has an open {op} to resolve"),
                };
                return Err(invalid_state(tx, what));
            }
            if keep_room(tx).is_none() {
                return Err(invalid_state(
                    tx,
                    format!(
                        "it holds {REPAIRS_MAX} resolve records, the most it keeps; \
                         resolve its remaining branches at once (no branch named)"
                    ),
                ));
            }
            for id in &open {
                let o = tx
                    .branch_mut(id)
                    .and_then(|b| b.op_mut(op))
                    .expect("found above");
                o.state = OpState::Resolved;
                o.updated_at_ms = now_ms;
            }
        }
    }
    if let Some(oldest_retry) = keep_room(tx).flatten() {
        tx.repairs.remove(oldest_retry);
    }
    tx.repairs.push(Repair {
        action,
        branch_id: branch_id.unwrap_or_default().to_string(),
        reason: validate::truncate(reason, REPAIR_TEXT_BYTES_MAX).to_string(),
        by: validate::truncate(by, REPAIR_TEXT_BYTES_MAX).to_string(),
        at_ms: now_ms,
        index: ctx.index,
    });
    if action == RepairAction::Resolve {
        finish_if_done(tx, now_ms);
    }
    Ok(true)
}

/// Room for one more record: `Some(None)` if there is room, `Some(Some(i))`
/// if the oldest retry record (at `i`) must give way, `None` if every kept
/// record is a resolve.
fn keep_room(tx: &Transaction) -> Option<Option<usize>> {
    if tx.repairs.len() < REPAIRS_MAX {
        return Some(None);
    }
    tx.repairs
        .iter()
        .position(|r| r.action == RepairAction::Retry)
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::command::OpOutcome;
    use crate::model::types::{BranchOp, Op, Outcome, Protocol, TxState};
    use crate::protocol::tests::tx;
    use crate::protocol::{decide, on_result};

    fn ctx(index: u64) -> ApplyContext {
        ApplyContext { index, term: 1 }
    }

    /// A 2PC transaction decided commit, its two branches' commits open.
    fn committing() -> Transaction {
        let mut t = tx(Protocol::TwoPc);
        for id in ["a", "b"] {
            let branch = crate::model::types::Branch {
                branch_id: id.into(),
                ops: [Op::Prepare, Op::Commit, Op::Rollback]
                    .into_iter()
                    .map(|op| BranchOp {
                        op,
                        endpoint: format!("http://p/{op}"),
                        state: OpState::Pending,
                        attempts: 0,
                        last_error: String::new(),
                        updated_at_ms: 0,
                    })
                    .collect(),
                payload: Default::default(),
                after: vec![],
                retry: None,
            };
            t.branches.push(std::sync::Arc::new(branch));
        }
        for b in t.branches.iter_mut() {
            std::sync::Arc::make_mut(b)
                .op_mut(Op::Prepare)
                .unwrap()
                .state = OpState::Succeeded;
        }
        t.state = TxState::Preparing;
        decide(&mut t, Outcome::Commit, "votes".into(), ctx(5), 10);
        t
    }

    #[test]
    fn fencing_resolve_closes_phase_two_by_hand_and_finishes_with_a_heuristic() {
        let mut t = committing();
        on_repair(
            &mut t,
            RepairAction::Resolve,
            Some("a"),
            "db gone",
            "ops",
            ctx(6),
            20,
        )
        .unwrap();
        assert_eq!(t.state, TxState::Committing, "b is still open");
        assert_eq!(
            t.branch("a").unwrap().op(Op::Commit).unwrap().state,
            OpState::Resolved
        );
        assert!(t.is_heuristic());
        // b answers: the transaction finishes, still marked heuristic.
        on_result(&mut t, "b", Op::Commit, &OpOutcome::Succeeded, ctx(7), 30).unwrap();
        assert_eq!(t.state, TxState::Committed);
        assert!(t.is_heuristic());
        assert_eq!(t.repairs.len(), 1);
        let r = &t.repairs[0];
        assert_eq!(
            (
                r.action,
                r.branch_id.as_str(),
                r.reason.as_str(),
                r.by.as_str(),
                r.at_ms,
                r.index
            ),
            (RepairAction::Resolve, "a", "db gone", "ops", 20, 6)
        );
        // A late answer from a's participant changes nothing.
        assert_eq!(
            on_result(&mut t, "a", Op::Commit, &OpOutcome::Succeeded, ctx(8), 40),
            Ok(false)
        );
    }

    #[test]
    fn no_blocking_resolve_without_a_branch_closes_every_open_op_at_once() {
        let mut t = committing();
        on_repair(
            &mut t,
            RepairAction::Resolve,
            None,
            "gone",
            "ops",
            ctx(6),
            20,
        )
        .unwrap();
        assert_eq!(t.state, TxState::Committed);
        assert_eq!(t.finished_at_ms, Some(20));
    }

    #[test]
    fn atomicity_an_undecided_or_finished_transaction_is_not_resolved() {
        let mut t = committing();
        t.decision = None;
        t.state = TxState::Preparing;
        let e = on_repair(&mut t, RepairAction::Resolve, None, "x", "ops", ctx(6), 20).unwrap_err();
        assert!(e.to_string().contains("abort it instead"), "{e}");
        assert!(t.repairs.is_empty());

        let mut t = committing();
        on_repair(&mut t, RepairAction::Resolve, None, "x", "ops", ctx(6), 20).unwrap();
        let before = t.clone();
        for action in [RepairAction::Resolve, RepairAction::Retry] {
            let e = on_repair(&mut t, action, None, "x", "ops", ctx(7), 30).unwrap_err();
            assert!(e.to_string().contains("it has finished"), "{e}");
        }
        assert_eq!(t, before, "a refused repair changes nothing");
    }

    #[test]
    fn a_repair_names_an_existing_branch_with_something_to_do() {
        let mut t = committing();
        let e = on_repair(
            &mut t,
            RepairAction::Retry,
            Some("zz"),
            "",
            "ops",
            ctx(6),
            20,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no branch zz"), "{e}");
        on_result(&mut t, "a", Op::Commit, &OpOutcome::Succeeded, ctx(6), 20).unwrap();
        let e = on_repair(
            &mut t,
            RepairAction::Retry,
            Some("a"),
            "",
            "ops",
            ctx(7),
            20,
        )
        .unwrap_err();
        assert!(e.to_string().contains("branch a has no call"), "{e}");
        let e = on_repair(
            &mut t,
            RepairAction::Resolve,
            Some("a"),
            "",
            "ops",
            ctx(7),
            20,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no open commit"), "{e}");
        on_repair(
            &mut t,
            RepairAction::Retry,
            Some("b"),
            "back up",
            "ops",
            ctx(8),
            30,
        )
        .unwrap();
        assert_eq!(t.repairs.last().unwrap().action, RepairAction::Retry);
        assert_eq!(t.state, TxState::Committing, "a retry changes no op");
    }

    #[test]
    fn the_history_is_bounded_and_retries_give_way_first() {
        let mut t = committing();
        for i in 0..(REPAIRS_MAX as u64 + 5) {
            on_repair(
                &mut t,
                RepairAction::Retry,
                None,
                &format!("r{i}"),
                "ops",
                ctx(10 + i),
                20,
            )
            .unwrap();
        }
        assert_eq!(t.repairs.len(), REPAIRS_MAX);
        assert_eq!(
            t.repairs.last().unwrap().reason,
            format!("r{}", REPAIRS_MAX + 4)
        );
        on_repair(
            &mut t,
            RepairAction::Resolve,
            Some("a"),
            &"x".repeat(1000),
            "ops",
            ctx(99),
            20,
        )
        .unwrap();
        assert_eq!(t.repairs.len(), REPAIRS_MAX);
        assert_eq!(
            t.repairs.last().unwrap().reason.len(),
            REPAIR_TEXT_BYTES_MAX
        );
    }
}
