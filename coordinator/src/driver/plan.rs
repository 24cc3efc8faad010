//! The driver's plan, pure: given a transaction, the calls in flight, when
//! failed ops may be retried, and the time, which calls to start now,
//! whether to propose a timeout, and when to look again. The worker in
//! `mod.rs` only carries it out.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::model::command::OpOutcome;
use crate::model::types::{Op, OpState, RepairAction, Transaction};
use crate::protocol::retry::{self, Recorded};
use crate::protocol::{self, Call};

/// A branch op, as the driver tracks it.
pub type Key = (String, Op);

/// A worker with nothing to wait for still looks again this often.
pub const IDLE_WAKE: Duration = Duration::from_secs(60);
/// A Timeout proposal that did not get in is proposed again after this.
pub const TIMEOUT_REPROPOSE: Duration = Duration::from_secs(1);

/// What the worker knows besides the transaction.
pub struct View<'a> {
    pub tx: &'a Transaction,
    pub in_flight: &'a HashSet<Key>,
    /// Failed ops may be called again from these instants on.
    pub retry_at: &'a HashMap<Key, Instant>,
    /// When the worker last proposed a Timeout.
    pub timeout_sent_at: Option<Instant>,
    /// When an undecided transaction is timed out ([`deadline_at`], fixed
    /// when the worker first saw it).
    pub deadline_at: Instant,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Calls to start now, in the protocol's order.
    pub start: Vec<Call>,
    /// Propose `Timeout`: the transaction is undecided past its deadline.
    pub propose_timeout: bool,
    /// When to look again if nothing else happens first.
    pub wake_at: Instant,
}

/// When a worker that first sees `tx` at `now`, with its wall clock at
/// `wall_ms`, times it out: the deadline's distance on that wall clock,
/// never more than the transaction's timeout, measured from then on by the
/// monotonic clock. So a wall clock that jumps afterwards changes nothing,
/// and a deadline stamped by a leader whose clock ran ahead delays a
/// timeout by no more than one timeout after the leader change — whatever
/// the clocks say (found by the simulation: RELIABILITY.md).
pub fn deadline_at(tx: &Transaction, now: Instant, wall_ms: i64) -> Instant {
    let left_ms = tx
        .deadline_ms
        .saturating_sub(wall_ms)
        .clamp(0, i64::from(tx.options.timeout_ms));
    now + Duration::from_millis(left_ms as u64)
}

/// The time a Timeout proposal carries: the leader's wall clock, or the
/// deadline if the monotonic measure ran out first (`apply` takes a
/// timeout only at or past the deadline it recorded).
pub fn timeout_stamp(tx: &Transaction, wall_ms: i64) -> i64 {
    wall_ms.max(tx.deadline_ms)
}

/// `now` is the worker's monotonic clock: deadlines, retries, re-proposals.
pub fn plan(view: &View, now: Instant) -> Plan {
    let tx = view.tx;
    let mut wake_at = now + IDLE_WAKE;
    let mut propose_timeout = false;
    if protocol::times_out(tx) {
        if view.deadline_at <= now {
            propose_timeout = view
                .timeout_sent_at
                .is_none_or(|at| now.duration_since(at) >= TIMEOUT_REPROPOSE);
            wake_at = wake_at.min(now + TIMEOUT_REPROPOSE);
        } else {
            wake_at = wake_at.min(view.deadline_at);
        }
    }

    // A saga's actions run at most `concurrency` at a time.
    let actions_max = match tx.options.concurrency {
        0 => usize::MAX,
        n => n as usize,
    };
    let mut actions = view
        .in_flight
        .iter()
        .filter(|(_, op)| *op == Op::Action)
        .count();
    let mut start = Vec::new();
    for call in protocol::next(tx) {
        let key = (call.branch_id.clone(), call.op);
        if view.in_flight.contains(&key) {
            continue;
        }
        if let Some(at) = view.retry_at.get(&key)
            && *at > now
        {
            wake_at = wake_at.min(*at);
            continue;
        }
        if call.op == Op::Action {
            if actions >= actions_max {
                continue;
            }
            actions += 1;
        }
        start.push(call);
    }
    Plan {
        start,
        propose_timeout,
        wake_at,
    }
}

/// The log index of the newest repair record (0: none).
pub fn last_repair_index(tx: &Transaction) -> u64 {
    tx.repairs.last().map_or(0, |r| r.index)
}

/// Retries operators asked for after entry `seen`: for each, the branch it
/// names (`None`: every branch); and the newest record's index, to pass
/// next time.
pub fn retries_asked(tx: &Transaction, seen: u64) -> (Vec<Option<String>>, u64) {
    let asked = tx
        .repairs
        .iter()
        .filter(|r| r.index > seen && r.action == RepairAction::Retry)
        .map(|r| (!r.branch_id.is_empty()).then(|| r.branch_id.clone()))
        .collect();
    (asked, last_repair_index(tx).max(seen))
}

/// A failing op's attempts as the worker counts them, and what the log
/// already says (the worker records failures sparsely).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Failing {
    pub attempts: u32,
    pub recorded: Recorded,
}

impl Failing {
    /// Where the log left off for an op this worker has not called yet.
    pub fn from_log(tx: &Transaction, key: &(String, Op)) -> Failing {
        let op = tx.branch(&key.0).and_then(|b| b.op(key.1));
        let recorded = op.map_or_else(Recorded::default, |o| Recorded {
            attempts: o.attempts,
            refused: o.state == OpState::Refused,
            at_ms: o.updated_at_ms,
        });
        Failing {
            attempts: recorded.attempts,
            recorded,
        }
    }
}

pub fn is_open(tx: &Transaction, key: &(String, Op)) -> bool {
    tx.branch(&key.0)
        .and_then(|b| b.op(key.1))
        .is_some_and(|o| o.state.is_open())
}

/// Whether a call is its transaction's phase two (a "no" is then a
/// refusal, retried), and for phase one after how many attempts the
/// protocol gives up.
pub fn call_terms(tx: &Transaction, call: &Call) -> (bool, Option<u32>) {
    let phase_two = protocol::is_phase_two(tx, call.op);
    let gives_up = !phase_two && protocol::phase_one_gives_up(tx.protocol);
    let limit = gives_up.then(|| tx.retry_policy(&call.branch_id).max_attempts);
    (phase_two, limit)
}

/// What a call's answer becomes in the log, if anything: a success or a
/// phase-one "no" always; a failure that leaves the op open (unavailable, or
/// refused in phase two) only when [`retry::should_record`] says the log
/// needs it. Counts the failure in `failing`.
pub fn to_record(
    failing: &mut Failing,
    op: Op,
    answer: OpOutcome,
    phase_two: bool,
    attempts_limit: Option<u32>,
    now_ms: i64,
) -> Option<OpOutcome> {
    let (error, refused) = match answer {
        OpOutcome::Succeeded => return Some(OpOutcome::Succeeded),
        OpOutcome::Failed(error) if !phase_two => return Some(OpOutcome::Failed(error)),
        OpOutcome::Failed(e) => (format!("participant refused {op}: {e}"), true),
        OpOutcome::Transient(e) | OpOutcome::Retrying { error: e, .. } => (e, false),
    };
    failing.attempts += 1;
    if !retry::should_record(
        failing.recorded,
        failing.attempts,
        refused,
        attempts_limit,
        now_ms,
    ) {
        return None;
    }
    failing.recorded = Recorded {
        attempts: failing.attempts,
        refused,
        at_ms: now_ms,
    };
    Some(OpOutcome::Retrying {
        attempts: failing.attempts,
        error,
        refused,
    })
}

/// After a call ended and what it recorded (if anything) is applied: how
/// long until the op is called again. One rule: an op still open once its
/// answer is in the log is retried after the backoff, whatever the answer
/// was (unavailable, refused, or a success whose proposal did not get in);
/// a closed one never (`None`).
pub fn retry_after(tx: &Transaction, key: &Key, failing: Failing) -> Option<Duration> {
    if !is_open(tx, key) {
        return None;
    }
    let attempts = failing.attempts.max(1);
    let policy = tx.retry_policy(&key.0);
    let seed = retry::jitter_seed(&tx.gid, &key.0, attempts);
    Some(retry::backoff(policy, attempts, seed))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::command::SagaStepSpec;
    use crate::model::types::{Protocol, TxState};
    use crate::protocol::tests::{at, spec, tx};
    use crate::protocol::{on_commit, on_register};

    fn saga(steps: usize, concurrency: u32) -> Transaction {
        let mut t = tx(Protocol::Saga);
        t.options.concurrency = concurrency;
        t.branches = protocol::saga::branches(
            (0..steps)
                .map(|i| SagaStepSpec {
                    branch_id: format!("s{i}"),
                    action: format!("http://svc/{i}/action"),
                    compensate: format!("http://svc/{i}/compensate"),
                    payload: Default::default(),
                    after: Vec::new(),
                    retry: None,
                })
                .collect(),
            0,
        );
        t
    }

    fn ids(plan: &Plan) -> Vec<(String, Op)> {
        plan.start
            .iter()
            .map(|c| (c.branch_id.clone(), c.op))
            .collect()
    }

    struct Case {
        name: &'static str,
        tx: Transaction,
        in_flight: Vec<Key>,
        /// (key, ms from now)
        retry_in_ms: Vec<(Key, u64)>,
        timeout_sent_ms_ago: Option<u64>,
        wall_ms: i64,
        start: Vec<Key>,
        propose_timeout: bool,
        wake_in_ms: u64,
    }

    fn key(branch: &str, op: Op) -> Key {
        (branch.to_string(), op)
    }

    #[test]
    fn the_plan_starts_what_is_due_and_wakes_for_what_is_not() {
        let mut two_pc = tx(Protocol::TwoPc);
        on_register(&mut two_pc, spec(Protocol::TwoPc, "a"), 1).unwrap();
        on_register(&mut two_pc, spec(Protocol::TwoPc, "b"), 1).unwrap();
        on_commit(&mut two_pc, at(2), 2).unwrap();
        assert_eq!(two_pc.state, TxState::Preparing);
        let cases = [
            Case {
                name: "prepares go to every branch, deadline 1 s away",
                tx: two_pc.clone(),
                in_flight: vec![],
                retry_in_ms: vec![],
                timeout_sent_ms_ago: None,
                wall_ms: 0,
                start: vec![key("a", Op::Prepare), key("b", Op::Prepare)],
                propose_timeout: false,
                wake_in_ms: 1_000,
            },
            Case {
                name: "a call in flight is not started twice",
                tx: two_pc.clone(),
                in_flight: vec![key("a", Op::Prepare)],
                retry_in_ms: vec![],
                timeout_sent_ms_ago: None,
                wall_ms: 0,
                start: vec![key("b", Op::Prepare)],
                propose_timeout: false,
                wake_in_ms: 1_000,
            },
            Case {
                name: "a failed op waits for its retry time, and the worker wakes then",
                tx: two_pc.clone(),
                in_flight: vec![],
                retry_in_ms: vec![(key("b", Op::Prepare), 250)],
                timeout_sent_ms_ago: None,
                wall_ms: 0,
                start: vec![key("a", Op::Prepare)],
                propose_timeout: false,
                wake_in_ms: 250,
            },
            Case {
                name: "past the deadline, undecided: propose a timeout",
                tx: two_pc.clone(),
                in_flight: vec![key("a", Op::Prepare), key("b", Op::Prepare)],
                retry_in_ms: vec![],
                timeout_sent_ms_ago: None,
                wall_ms: 1_000,
                start: vec![],
                propose_timeout: true,
                wake_in_ms: 1_000,
            },
            Case {
                name: "a timeout proposed 200 ms ago is not proposed again yet",
                tx: two_pc.clone(),
                in_flight: vec![key("a", Op::Prepare), key("b", Op::Prepare)],
                retry_in_ms: vec![],
                timeout_sent_ms_ago: Some(200),
                wall_ms: 5_000,
                start: vec![],
                propose_timeout: false,
                wake_in_ms: 1_000,
            },
            Case {
                name: "a saga runs at most `concurrency` actions",
                tx: saga(5, 2),
                in_flight: vec![key("s0", Op::Action)],
                retry_in_ms: vec![],
                timeout_sent_ms_ago: None,
                wall_ms: 0,
                start: vec![key("s1", Op::Action)],
                propose_timeout: false,
                wake_in_ms: 1_000,
            },
            Case {
                name: "an action waiting for its retry does not hold a slot",
                tx: saga(3, 1),
                in_flight: vec![],
                retry_in_ms: vec![(key("s0", Op::Action), 40)],
                timeout_sent_ms_ago: None,
                wall_ms: 0,
                start: vec![key("s1", Op::Action)],
                propose_timeout: false,
                wake_in_ms: 40,
            },
        ];
        let now = Instant::now();
        for case in cases {
            let in_flight: HashSet<Key> = case.in_flight.into_iter().collect();
            let retry_at: HashMap<Key, Instant> = case
                .retry_in_ms
                .into_iter()
                .map(|(k, ms)| (k, now + Duration::from_millis(ms)))
                .collect();
            let view = View {
                tx: &case.tx,
                in_flight: &in_flight,
                retry_at: &retry_at,
                timeout_sent_at: case
                    .timeout_sent_ms_ago
                    .map(|ms| now - Duration::from_millis(ms)),
                deadline_at: deadline_at(&case.tx, now, case.wall_ms),
            };
            let plan = plan(&view, now);
            assert_eq!(ids(&plan), case.start, "{}", case.name);
            assert_eq!(plan.propose_timeout, case.propose_timeout, "{}", case.name);
            assert_eq!(
                plan.wake_at,
                now + Duration::from_millis(case.wake_in_ms),
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn a_decided_transaction_never_times_out_and_sends_only_phase_two() {
        let mut t = tx(Protocol::Tcc);
        on_register(&mut t, spec(Protocol::Tcc, "a"), 1).unwrap();
        on_commit(&mut t, at(2), 2).unwrap();
        let t = Arc::new(t);
        let (in_flight, retry_at) = (HashSet::new(), HashMap::new());
        let view = View {
            tx: &t,
            in_flight: &in_flight,
            retry_at: &retry_at,
            timeout_sent_at: None,
            deadline_at: Instant::now(),
        };
        let now = Instant::now();
        let plan = plan(&view, now);
        assert!(!plan.propose_timeout);
        assert_eq!(ids(&plan), vec![key("a", Op::Confirm)]);
        assert_eq!(plan.wake_at, now + IDLE_WAKE);
    }

    #[test]
    fn no_blocking_a_timeout_is_measured_on_the_monotonic_clock_from_first_sight() {
        let mut two_pc = tx(Protocol::TwoPc);
        on_register(&mut two_pc, spec(Protocol::TwoPc, "a"), 1).unwrap();
        let timeout = u64::from(two_pc.options.timeout_ms);
        let now = Instant::now();
        let ms = Duration::from_millis;
        // Seen 300 ms before the deadline on this leader's clock.
        let wall = two_pc.deadline_ms - 300;
        assert_eq!(deadline_at(&two_pc, now, wall), now + ms(300));
        // Stamped by a leader whose clock ran 500 s ahead: one timeout at most.
        let behind = two_pc.deadline_ms - 500_000;
        assert_eq!(deadline_at(&two_pc, now, behind), now + ms(timeout));
        // Seen after the deadline (this clock is ahead): due now.
        assert_eq!(deadline_at(&two_pc, now, two_pc.deadline_ms + 5), now);
        // Once fixed, the wall clock no longer matters: the plan takes none.
        let (in_flight, retry_at) = (HashSet::new(), HashMap::new());
        let view = View {
            tx: &two_pc,
            in_flight: &in_flight,
            retry_at: &retry_at,
            timeout_sent_at: None,
            deadline_at: now + ms(300),
        };
        assert!(!plan(&view, now + ms(299)).propose_timeout);
        assert!(plan(&view, now + ms(300)).propose_timeout);
        // The proposal carries a time `apply` takes.
        assert_eq!(timeout_stamp(&two_pc, behind), two_pc.deadline_ms);
        assert_eq!(timeout_stamp(&two_pc, wall + 900), wall + 900);
    }
}
