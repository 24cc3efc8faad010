//! One transaction's worker: what the driver keeps for a transaction it
//! drives — its latest version, the calls in flight, the retries due, each
//! op's failures so far, the deadline — and what each event does to it. No
//! I/O and no clock of its own (the time is given); the driver's event loop
//! (`mod.rs`) only makes the calls and proposals it asks for.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::time::Instant;

use super::plan::{self, Failing, Key};
use crate::model::command::OpOutcome;
use crate::model::types::{Op, OpState, Protocol, Transaction, TxState};
use crate::protocol::{Call, saga};

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
    /// Saga: action successes answered and not yet proposed, in the order
    /// they came — the worker runs one step ahead of the log
    /// (`protocol::saga`, "Running ahead").
    held: Vec<Key>,
    /// `current` with the held successes in it: what the plan reads while
    /// some are held.
    ahead: Option<Arc<Transaction>>,
    /// Proposals of answers under way. Nothing is held meanwhile, and a
    /// proposal made while another is under way does not claim to be exact:
    /// if the earlier one does not get in, the later one would decide
    /// without the successes it carried.
    flushing: usize,
    /// Held answers were lost (their proposal did not get in): this worker
    /// no longer knows every step it started, so it never claims to.
    inexact: bool,
}

/// Answers to propose together (`Command::OpResults`).
#[derive(Debug, PartialEq)]
pub struct Flush {
    pub results: Vec<(String, Op, OpOutcome)>,
    /// The ops they answer, each with its failures so far.
    pub keys: Vec<(Key, Failing)>,
    /// Every step this worker started ahead of the log is among them.
    pub exact: bool,
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
            held: Vec::new(),
            ahead: None,
            flushing: 0,
            inexact: false,
        }
    }

    /// Whether the worker records the answers to `op` itself (a saga's
    /// actions: held, or proposed together — [`WorkerState::answered`]),
    /// instead of the driver proposing each as it comes.
    pub fn records_answers_to(&self, op: Op) -> bool {
        self.current.protocol == Protocol::Saga && op == Op::Action
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
            self.refresh_ahead();
        }
    }

    /// Recomputes `ahead` from `current` and the held successes. Once the
    /// saga is decided they are moot: its decision counted one step beyond
    /// the log, or came from this worker's own answers.
    fn refresh_ahead(&mut self) {
        let current = &self.current;
        if current.state != TxState::Active {
            self.held.clear();
        }
        self.held.retain(|(b, op)| {
            current
                .branch(b)
                .and_then(|b| b.op(*op))
                .is_some_and(|o| o.state == OpState::Pending)
        });
        self.ahead = (!self.held.is_empty()).then(|| {
            let mut tx = (**current).clone();
            for (b, op) in &self.held {
                if let Some(o) = tx.branch_mut(b).and_then(|b| b.op_mut(*op)) {
                    o.state = OpState::Succeeded;
                }
            }
            Arc::new(tx)
        });
    }

    /// A saga action's answer came back (`None`: not worth recording). A
    /// success that lets further steps start now, from a step whose own
    /// dependencies are recorded, is held; anything else is proposed
    /// together with what is held.
    pub fn answered(
        &mut self,
        key: Key,
        outcome: Option<OpOutcome>,
        failing: Failing,
        now: Instant,
    ) -> Option<Flush> {
        let Some(outcome) = outcome else {
            self.finished(Some(key), None, failing, now);
            return None;
        };
        if outcome == OpOutcome::Succeeded && self.may_hold(&key) {
            self.in_flight.remove(&key);
            self.retry_at.remove(&key);
            self.failing.remove(&key);
            self.held.push(key);
            self.refresh_ahead();
            return None;
        }
        let mut results = Vec::with_capacity(self.held.len() + 1);
        let mut keys = Vec::with_capacity(self.held.len() + 1);
        for key in self.held.drain(..) {
            results.push((key.0.clone(), key.1, OpOutcome::Succeeded));
            // Not called again while the proposal is under way.
            self.in_flight.insert(key.clone());
            keys.push((key, Failing::default()));
        }
        results.push((key.0.clone(), key.1, outcome));
        keys.push((key, failing));
        self.ahead = None;
        let exact = !self.inexact && self.flushing == 0;
        self.flushing += 1;
        Some(Flush {
            results,
            keys,
            exact,
        })
    }

    /// Whether to hold `key`'s success: nothing is being proposed, no
    /// proposal's outcome is unknown (one that timed out may still land,
    /// exact, and must then have carried every success held before it), the
    /// saga is undecided, the step's dependencies are recorded as succeeded
    /// (so the worker stays one step ahead of the log), and holding it lets
    /// a step start that could not start from the log.
    fn may_hold(&self, key: &Key) -> bool {
        let tx = &self.current;
        if self.flushing > 0
            || self.inexact
            || tx.state != TxState::Active
            || !self.records_answers_to(key.1)
        {
            return false;
        }
        let Some(step) = tx.branch(&key.0) else {
            return false;
        };
        let succeeded = saga::succeeded(tx);
        if !saga::may_start_ahead(tx, &succeeded, &HashSet::new(), step) {
            return false;
        }
        let mut held: HashSet<&str> = self.held.iter().map(|(b, _)| b.as_str()).collect();
        held.insert(&key.0);
        tx.branches.iter().any(|b| {
            // Cheapest first: only a step after something held is a candidate.
            b.after.iter().any(|d| held.contains(d.as_str()))
                && !held.contains(b.branch_id.as_str())
                && b.op(Op::Action)
                    .is_some_and(|o| o.state == OpState::Pending)
                && saga::may_start_ahead(tx, &succeeded, &held, b)
                && !self.in_flight.contains(&(b.branch_id.clone(), Op::Action))
        })
    }

    /// The proposal of a [`Flush`] is over: `tx` is the transaction after
    /// it, if it was applied.
    pub fn flushed(
        &mut self,
        keys: Vec<(Key, Failing)>,
        tx: Option<Arc<Transaction>>,
        now: Instant,
    ) {
        self.flushing -= 1;
        if tx.is_none() {
            self.inexact = true;
        }
        for (key, failing) in keys {
            self.finished(Some(key), tx.clone(), failing, now);
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
                tx: self.ahead.as_ref().unwrap_or(&self.current),
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

    fn saga(steps: &[(&str, &[&str])]) -> Transaction {
        let mut t = tx(Protocol::Saga);
        let specs = steps
            .iter()
            .map(|(id, after)| crate::protocol::tests::saga_step(id, after))
            .collect();
        t.branches = saga::branches(specs, 0);
        t
    }

    fn action(id: &str) -> Key {
        (id.to_string(), Op::Action)
    }

    fn yes(id: &str) -> (String, Op, OpOutcome) {
        (id.to_string(), Op::Action, OpOutcome::Succeeded)
    }

    /// Saga (DESIGN §4), running ahead: a success that lets the next step
    /// start is held, the next step starts at once, and the answer that
    /// ends the hold is proposed with it — a two-step saga's answers are
    /// one entry, claimed exact.
    #[test]
    fn saga_a_success_that_lets_the_next_step_start_is_held_and_proposed_with_the_next_answer() {
        let t = Arc::new(saga(&[("a", &[]), ("b", &["a"])]));
        let now = Instant::now();
        let wall = t.deadline_ms - 60_000;
        let mut w = WorkerState::new(t, now, wall);
        assert_eq!(keys(&w.next(now, wall)), vec![action("a")]);
        let none = Failing::default();
        assert_eq!(
            w.answered(action("a"), Some(OpOutcome::Succeeded), none, now),
            None
        );
        assert_eq!(keys(&w.next(now, wall)), vec![action("b")], "at once");
        let flush = w
            .answered(action("b"), Some(OpOutcome::Succeeded), none, now)
            .expect("the last step ends the hold");
        assert_eq!(flush.results, vec![yes("a"), yes("b")], "held first");
        assert!(flush.exact);
        assert!(
            keys(&w.next(now, wall)).is_empty(),
            "both wait for the entry"
        );
    }

    /// Saga (DESIGN §4): the worker runs one step ahead of the log, never
    /// two — what the decision counts on when it cannot know what ran.
    #[test]
    fn saga_the_worker_runs_one_step_ahead_of_the_log_never_two() {
        let mut t = saga(&[("a", &[]), ("b", &["a"]), ("c", &["b"])]);
        let now = Instant::now();
        let wall = t.deadline_ms - 60_000;
        let mut w = WorkerState::new(Arc::new(t.clone()), now, wall);
        let none = Failing::default();
        w.next(now, wall);
        assert_eq!(
            w.answered(action("a"), Some(OpOutcome::Succeeded), none, now),
            None
        );
        assert_eq!(keys(&w.next(now, wall)), vec![action("b")]);
        // b's own dependency is only held: b's success is not.
        let flush = w
            .answered(action("b"), Some(OpOutcome::Succeeded), none, now)
            .expect("not held");
        assert_eq!(flush.results, vec![yes("a"), yes("b")]);
        assert!(keys(&w.next(now, wall)).is_empty(), "c waits for the log");
        for (id, _, outcome) in &flush.results {
            crate::protocol::on_result(&mut t, id, Op::Action, outcome, at(3), 3).unwrap();
        }
        t.version = 3;
        w.flushed(flush.keys, Some(Arc::new(t)), now);
        assert_eq!(keys(&w.next(now, wall)), vec![action("c")]);
    }

    /// Saga (DESIGN §4): answers proposed while others are under way do not
    /// claim to be exact — if the earlier proposal (carrying held
    /// successes) does not get in, the later one must not decide as if
    /// nothing had run ahead.
    #[test]
    fn saga_answers_proposed_while_others_are_under_way_are_not_exact() {
        let t = Arc::new(saga(&[("a", &[]), ("b", &["a"]), ("c", &["a"])]));
        let now = Instant::now();
        let wall = t.deadline_ms - 60_000;
        let mut w = WorkerState::new(t, now, wall);
        let none = Failing::default();
        w.next(now, wall);
        assert_eq!(
            w.answered(action("a"), Some(OpOutcome::Succeeded), none, now),
            None
        );
        assert_eq!(keys(&w.next(now, wall)), vec![action("b"), action("c")]);
        let first = w
            .answered(action("b"), Some(OpOutcome::Succeeded), none, now)
            .unwrap();
        assert_eq!(first.results, vec![yes("a"), yes("b")]);
        assert!(first.exact);
        let no = Some(OpOutcome::Failed("no".into()));
        let second = w.answered(action("c"), no, none, now).unwrap();
        assert!(!second.exact, "the first may not get in");
    }

    /// A proposal of held answers whose outcome is unknown (refused, or
    /// timed out — it may still land) leaves the worker not knowing all it
    /// started: it never claims exact again, never holds again (an exact
    /// proposal landing late must have carried every success held before
    /// it), and the answers' ops are called again.
    #[test]
    fn saga_held_answers_lost_make_the_worker_inexact_and_are_asked_again() {
        let t = Arc::new(saga(&[("a", &[]), ("b", &["a"])]));
        let now = Instant::now();
        let wall = t.deadline_ms - 60_000;
        let mut w = WorkerState::new(t, now, wall);
        let none = Failing::default();
        w.next(now, wall);
        w.answered(action("a"), Some(OpOutcome::Succeeded), none, now);
        w.next(now, wall);
        let no = Some(OpOutcome::Failed("no".into()));
        let flush = w.answered(action("b"), no.clone(), none, now).unwrap();
        assert!(flush.exact);
        w.flushed(flush.keys, None, now);
        let later = now + Duration::from_secs(60);
        assert_eq!(keys(&w.next(later, wall)), vec![action("a")]);
        let flush = w
            .answered(action("a"), Some(OpOutcome::Succeeded), none, later)
            .expect("not held again");
        assert_eq!(flush.results, vec![yes("a")]);
        assert!(!flush.exact);
        assert!(keys(&w.next(later, wall)).is_empty(), "b waits for the log");
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
