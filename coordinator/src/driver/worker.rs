//! One transaction's worker without its task: what the driver keeps for a
//! transaction it drives — its latest version, the calls in flight, the
//! retries due, each op's failures so far, the deadline — and what each
//! event does to it. No I/O and no clock of its own (the time is given), so
//! the simulation drives the very bookkeeping the node's worker task
//! (`mod.rs`) does; the task only makes the calls and proposals it asks for.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::time::Instant;

use super::plan::{self, Failing, Key};
use crate::model::types::Transaction;
use crate::protocol::Call;

pub struct WorkerState {
    current: Arc<Transaction>,
    in_flight: HashSet<Key>,
    retry_at: HashMap<Key, Instant>,
    failing: HashMap<Key, Failing>,
    timeout_sent_at: Option<Instant>,
    /// On the monotonic clock, from when this worker first saw it.
    deadline_at: Instant,
    /// A phase-two call has left (for the failpoint before the first).
    fanned_out: bool,
    /// The last operator's repair already acted on.
    repairs_seen: u64,
}

/// What to do now, as [`WorkerState::next`] says.
pub struct Next {
    /// Propose a Timeout, stamped with this wall time.
    pub timeout: Option<i64>,
    /// Calls to start, each with its op's failures so far.
    pub start: Vec<(Call, Failing)>,
    /// The first call of phase two is among them: the decision is applied
    /// (so committed) and nothing of phase two has left yet.
    pub fanning_out: bool,
    /// Look again by then at the latest.
    pub wake_at: Instant,
}

impl WorkerState {
    /// A worker for `tx`, first seen at `now` (wall time `wall_ms`).
    pub fn new(tx: Arc<Transaction>, now: Instant, wall_ms: i64) -> WorkerState {
        WorkerState {
            deadline_at: plan::deadline_at(&tx, now, wall_ms),
            repairs_seen: plan::last_repair_index(&tx),
            current: tx,
            in_flight: HashSet::new(),
            retry_at: HashMap::new(),
            failing: HashMap::new(),
            timeout_sent_at: None,
            fanned_out: false,
        }
    }

    /// The newest version seen.
    pub fn current(&self) -> &Arc<Transaction> {
        &self.current
    }

    /// The transaction ended: the worker has nothing more to do.
    pub fn is_done(&self) -> bool {
        self.current.state.is_terminal()
    }

    /// A version of the transaction arrived (older ones are ignored).
    pub fn update(&mut self, tx: Arc<Transaction>) {
        if tx.version > self.current.version {
            self.current = tx;
        }
    }

    /// What to start now (`plan::plan` over this worker's state), noted as
    /// started: the calls as in flight, the timeout as sent.
    pub fn next(&mut self, now: Instant, wall_ms: i64) -> Next {
        // An operator's retry: the named ops are due now.
        let (asked, seen) = plan::retries_asked(&self.current, self.repairs_seen);
        self.repairs_seen = seen;
        for branch in asked {
            self.retry_at
                .retain(|(b, _), _| branch.as_deref().is_some_and(|id| id != b));
        }
        let plan = plan::plan(
            &plan::View {
                tx: &self.current,
                in_flight: &self.in_flight,
                retry_at: &self.retry_at,
                timeout_sent_at: self.timeout_sent_at,
                deadline_at: self.deadline_at,
            },
            now,
        );
        let timeout = plan.propose_timeout.then(|| {
            self.timeout_sent_at = Some(now);
            plan::timeout_stamp(&self.current, wall_ms)
        });
        let fanning_out = !plan.start.is_empty() && self.current.is_decided() && !self.fanned_out;
        self.fanned_out |= fanning_out;
        let start = plan
            .start
            .into_iter()
            .map(|call| {
                let key = (call.branch_id.clone(), call.op);
                let so_far = *self
                    .failing
                    .entry(key.clone())
                    .or_insert_with(|| Failing::from_log(&self.current, &key));
                self.in_flight.insert(key);
                (call, so_far)
            })
            .collect();
        Next {
            timeout,
            start,
            fanning_out,
            wake_at: plan.wake_at,
        }
    }

    /// A call (`key`) or a Timeout proposal (`None`) is over, at `now`:
    /// `tx` is the transaction after its proposal, if one was applied;
    /// `failing` the op's failures as the call counted them. One rule: an
    /// op still open once its answer is in the log is called again after
    /// the backoff — whatever the answer was (unavailable, refused, or a
    /// success whose proposal did not get in).
    pub fn finished(
        &mut self,
        key: Option<Key>,
        tx: Option<Arc<Transaction>>,
        failing: Failing,
        now: Instant,
    ) {
        if let Some(tx) = tx {
            self.update(tx);
        }
        let Some(key) = key else {
            return;
        };
        self.in_flight.remove(&key);
        match plan::retry_after(&self.current, &key, failing) {
            Some(wait) => {
                self.retry_at.insert(key.clone(), now + wait);
                self.failing.insert(key, failing);
            }
            None => {
                self.retry_at.remove(&key);
                self.failing.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::types::{Op, Protocol};
    use crate::protocol::tests::{at, spec, tx};
    use crate::protocol::{on_commit, on_register};

    fn keys(next: &Next) -> Vec<Key> {
        next.start
            .iter()
            .map(|(c, _)| (c.branch_id.clone(), c.op))
            .collect()
    }

    fn preparing_2pc() -> Arc<Transaction> {
        let mut t = tx(Protocol::TwoPc);
        on_register(&mut t, spec(Protocol::TwoPc, "a"), 1).unwrap();
        on_register(&mut t, spec(Protocol::TwoPc, "b"), 1).unwrap();
        on_commit(&mut t, at(2), 2).unwrap();
        Arc::new(t)
    }

    /// Idempotency (DESIGN §4): a call is not made twice at once; an op
    /// left open after its answer is called again only after its backoff.
    #[test]
    fn idempotency_a_call_in_flight_is_not_started_again_and_an_open_op_waits_its_backoff() {
        let t = preparing_2pc();
        let now = Instant::now();
        let wall = t.deadline_ms - 60_000;
        let mut w = WorkerState::new(t.clone(), now, wall);
        let first = w.next(now, wall);
        let a = ("a".to_string(), Op::Prepare);
        let b = ("b".to_string(), Op::Prepare);
        assert_eq!(keys(&first), vec![a.clone(), b.clone()]);
        assert!(first.timeout.is_none() && !first.fanning_out);
        assert!(keys(&w.next(now, wall)).is_empty(), "both in flight");
        // `a` timed out; its answer was not worth an entry: still open.
        let failing = Failing {
            attempts: 1,
            ..Failing::default()
        };
        w.finished(Some(a.clone()), None, failing, now);
        let wait = plan::retry_after(&t, &a, failing).expect("open");
        assert!(wait > Duration::ZERO);
        let early = w.next(now + wait - Duration::from_millis(1), wall);
        assert!(keys(&early).is_empty(), "not before its backoff");
        assert!(early.wake_at <= now + wait);
        assert_eq!(keys(&w.next(now + wait, wall)), vec![a]);
    }

    /// Commit point first (DESIGN §4): phase two starts only from an applied
    /// decision, and the fan-out is noted once (its failpoint fires once).
    #[test]
    fn commit_point_first_phase_two_starts_from_the_applied_decision_once() {
        let mut t = tx(Protocol::Tcc);
        on_register(&mut t, spec(Protocol::Tcc, "a"), 1).unwrap();
        let now = Instant::now();
        let wall = t.deadline_ms - 60_000;
        let mut w = WorkerState::new(Arc::new(t.clone()), now, wall);
        assert!(
            keys(&w.next(now, wall)).is_empty(),
            "undecided: no phase two"
        );
        on_commit(&mut t, at(2), 2).unwrap();
        t.version = 2;
        w.update(Arc::new(t.clone()));
        let fan = w.next(now, wall);
        assert_eq!(keys(&fan), vec![("a".to_string(), Op::Confirm)]);
        assert!(fan.fanning_out);
        w.finished(
            Some(("a".to_string(), Op::Confirm)),
            None,
            Failing::default(),
            now,
        );
        let again = w.next(now + Duration::from_secs(60), wall);
        assert_eq!(keys(&again), vec![("a".to_string(), Op::Confirm)]);
        assert!(!again.fanning_out, "the fan-out is noted once");
        // An older version never replaces a newer one.
        let mut old = t.clone();
        old.version = 1;
        w.update(Arc::new(old));
        assert_eq!(w.current().version, 2);
    }
}
