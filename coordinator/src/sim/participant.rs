//! Simulated participants: each keeps, per branch, what it did and when —
//! the records the checker judges by (never the coordinator's view). In
//! front of them sits the SDK's own fencing table ([`Fences`]), the same
//! code a real participant server runs.

use std::collections::BTreeMap;

use tandem_sdk::participant::{BranchContext, BranchError, Fences};

use crate::model::types::{Fence, Op};

/// What a participant answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// A business "no" (or a refusal): final in phase one.
    No(String),
    /// Try again later.
    Unavailable,
}

/// One branch as its participant saw it.
#[derive(Clone, Debug, Default)]
pub struct BranchRecord {
    /// When the forward op (prepare, try, action) took effect.
    pub forward_at: Option<i64>,
    /// The forward op's vote, once cast (a repeat answers the same).
    pub vote: Option<bool>,
    /// When a commit or confirm took effect.
    pub committed_at: Option<i64>,
    /// When the undo (rollback, cancel, compensate) took effect.
    pub undone_at: Option<i64>,
    /// Every phase-two op received and accepted: (time, op, fence).
    pub phase_two: Vec<(i64, Op, Fence)>,
    /// Things that must never happen, seen as they happened.
    pub violations: Vec<String>,
}

/// One participant service.
#[derive(Default)]
pub struct Participant {
    fences: Fences,
    pub branches: BTreeMap<(String, String), BranchRecord>,
    /// As a message producer: the outbox marker of each message's local
    /// transaction (true: committed with it; false: the check-back found
    /// none and wrote "rolled back", so it can never commit).
    pub markers: BTreeMap<String, bool>,
    /// Down (answers nothing) until this time.
    pub down_until: i64,
}

/// The op that takes effect (a 3PC branch's vote, `can_commit`, does not:
/// its `pre_commit` does).
fn is_forward(op: Op) -> bool {
    matches!(op, Op::Prepare | Op::Try | Op::Action | Op::PreCommit)
}

fn is_undo(op: Op) -> bool {
    matches!(op, Op::Rollback | Op::Cancel | Op::Compensate | Op::Abort)
}

impl Participant {
    /// A producer's local transaction for message `gid`: the business
    /// change (`yes`: it succeeds) and the marker, atomically — unless the
    /// check-back already marked the message rolled back.
    pub fn local_commit(&mut self, now: i64, gid: &str, yes: bool) -> Option<Answer> {
        if now < self.down_until {
            return None;
        }
        match self.markers.get(gid) {
            Some(true) => Some(Answer::Ok),
            Some(false) => Some(Answer::No("the check-back marked it rolled back".into())),
            None if yes => {
                self.markers.insert(gid.to_string(), true);
                Some(Answer::Ok)
            }
            None => Some(Answer::No("the business change failed".into())),
        }
    }

    /// Handles a call at `now`; `yes` is the business vote the forward op
    /// casts the first time. `None`: the participant is down (no answer).
    pub fn handle(
        &mut self,
        now: i64,
        gid: &str,
        branch_id: &str,
        op: Op,
        fence: Fence,
        yes: bool,
    ) -> Option<Answer> {
        if now < self.down_until {
            return None;
        }
        let ctx = BranchContext {
            gid: gid.to_string(),
            branch_id: branch_id.to_string(),
            op: op.name().to_string(),
            protocol: String::new(),
            fence,
        };
        if let Err(e) = self.fences.admit(&ctx) {
            return Some(match e {
                BranchError::Failure(m) => Answer::No(m),
                BranchError::Transient(_) => Answer::Unavailable,
            });
        }
        let rec = self
            .branches
            .entry((gid.to_string(), branch_id.to_string()))
            .or_default();
        if op == Op::QueryPrepared {
            // Decisive: no marker yet means rolled back, written now.
            let committed = *self.markers.entry(gid.to_string()).or_insert(false);
            return Some(if committed {
                Answer::Ok
            } else {
                Answer::No("rolled back".into())
            });
        }
        if op == Op::Deliver {
            rec.phase_two.push((now, op, fence));
            rec.committed_at.get_or_insert(now);
            return Some(Answer::Ok);
        }
        if op == Op::CanCommit {
            if rec.undone_at.is_some() {
                return Some(Answer::No("already undone".into()));
            }
            let vote = *rec.vote.get_or_insert(yes);
            return Some(if vote {
                Answer::Ok
            } else {
                Answer::No("cannot commit".into())
            });
        }
        if op == Op::PreCommit && rec.vote != Some(true) {
            rec.violations
                .push(format!("pre_commit at {now} without a yes vote"));
            return Some(Answer::No("never voted yes".into()));
        }
        if is_forward(op) {
            if rec.undone_at.is_some() {
                // The tombstone: a late forward op never takes effect.
                return Some(Answer::No("already undone".into()));
            }
            let vote = *rec.vote.get_or_insert(yes);
            if !vote {
                return Some(Answer::No(format!("{op} refused")));
            }
            rec.forward_at.get_or_insert(now);
            return Some(Answer::Ok);
        }
        rec.phase_two.push((now, op, fence));
        if is_undo(op) {
            if rec.committed_at.is_some() {
                rec.violations
                    .push(format!("{op} at {now} after the branch committed"));
                return Some(Answer::No("committed; cannot undo".into()));
            }
            rec.undone_at.get_or_insert(now);
            return Some(Answer::Ok);
        }
        // commit / confirm
        if rec.undone_at.is_some() {
            rec.violations
                .push(format!("{op} at {now} after the branch was undone"));
            return Some(Answer::No("undone; cannot commit".into()));
        }
        if rec.forward_at.is_none() {
            rec.violations.push(format!(
                "{op} at {now} of a branch that never prepared or tried"
            ));
            return Some(Answer::No("nothing to commit".into()));
        }
        rec.committed_at.get_or_insert(now);
        Some(Answer::Ok)
    }
}
