//! The driver: on the leader only, it makes the calls the protocols ask for
//! and proposes what came back. It never decides — decisions are taken by
//! `apply` from the facts it proposes — so a deposed leader's late proposals
//! are harmless facts.
//!
//! One task drives every unfinished transaction: an event loop over the
//! pure per-transaction state ([`worker::WorkerState`], over the pure
//! [`plan::plan`]), the calls and proposals in flight (futures of this
//! task, not tasks), and one timer ordered by instant. Three kinds of event
//! reach it — a change from the feed, a call or proposal that ended, a
//! transaction's wake time — and each does the same thing: update that
//! transaction's state, ask it which calls to start, whether to propose a
//! timeout and when to look again, start them, and file the wake time.
//! The state is pure: the simulation drives the same one. An op that is
//! still open after its answer was recorded (pending, or refused in phase
//! two) is retried after [`crate::protocol::retry::backoff`]; failures are
//! recorded in the log sparsely ([`crate::protocol::retry::should_record`]),
//! not one entry per attempt. An undecided transaction past its deadline
//! gets a Timeout proposal.
//!
//! Why one loop and not a task per transaction (as before): each change
//! then cost a channel send, a task wake-up and hand-over between threads,
//! and each turn a timer entry registered and cleared in the runtime's
//! timer wheel — the largest share of the driver's own time at peak
//! (BENCHMARKS.md). Here a change is a map lookup, and a turn files its
//! wake time in an ordered map only when it is earlier than the one filed.
//!
//! On becoming leader the loop takes over every unfinished transaction
//! (`LeaderEvent::Lead`); on losing leadership everything in flight is
//! dropped. The commit point holds by construction: phase-two calls come
//! only from applied state, and a decision is applied only once committed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Instrument;

use crate::branch::{BranchCall, BranchTransport};
use crate::clock::Clock;
pub mod plan;
pub mod worker;

use plan::{Failing, Key};
use worker::{Flush, WorkerState};

use crate::model::command::{Applied, Command, OpOutcome};
use crate::model::types::{Op, Transaction};
use crate::protocol::Call;
use crate::raft::NodeError;
use crate::replica::Replica;
use crate::replica::feed::{LeaderEvent, LeaderFeed};

/// Calls in flight across all transactions; beyond it new calls wait.
pub const CALLS_IN_FLIGHT_MAX: usize = 8192;

/// Ended calls and proposals taken in one go after each event, so that a
/// busy feed never keeps them (or the timer) waiting.
const DRAIN_MAX: usize = 256;

/// Failpoints at the instants where a coordinator crash is most dangerous.
pub mod failpoints {
    /// After a prepare (2PC) or can-commit (3PC) answer arrived, before it
    /// is proposed.
    pub const DURING_PREPARE: &str = "driver-during-prepare";
    /// 3PC: one pre-commit acknowledged and recorded; others may not be.
    pub const AFTER_PRE_COMMIT: &str = "driver-after-pre-commit";
    /// Decision applied; no phase-two call has left yet.
    pub const BEFORE_FANOUT: &str = "driver-before-fanout";
    /// One phase-two call answered and recorded; others may not have left.
    pub const MID_FANOUT: &str = "driver-mid-fanout";
}

/// What every call and proposal in flight shares.
struct Shared<T: BranchTransport> {
    node: Replica,
    caller: Arc<T>,
    clock: Arc<dyn Clock>,
    calls: Semaphore,
}

/// A call or proposal in flight: which transaction it is for, and what it
/// reports when over.
type InFlight = BoxFuture<'static, (String, Done)>;

/// One unfinished transaction the driver drives.
struct Slot {
    state: WorkerState,
    /// Its wake time as filed in [`Driver::timers`] (`None`: not filed).
    timer: Option<(Instant, u64)>,
    /// Set when the driver lets go of it (it ended): its calls still out
    /// then propose nothing.
    released: Arc<AtomicBool>,
}

pub struct Driver<T: BranchTransport> {
    shared: Arc<Shared<T>>,
    slots: HashMap<String, Slot>,
    /// Wake times, earliest first; the number only tells equal instants
    /// apart.
    timers: BTreeMap<(Instant, u64), String>,
    filed: u64,
    in_flight: FuturesUnordered<InFlight>,
}

impl<T: BranchTransport> Driver<T> {
    pub fn new(node: Replica, caller: Arc<T>, clock: Arc<dyn Clock>) -> Driver<T> {
        Driver {
            shared: Arc::new(Shared {
                node,
                caller,
                clock,
                calls: Semaphore::new(CALLS_IN_FLIGHT_MAX),
            }),
            slots: HashMap::new(),
            timers: BTreeMap::new(),
            filed: 0,
            in_flight: FuturesUnordered::new(),
        }
    }

    pub async fn run(mut self, events: Arc<LeaderFeed>) {
        let mut leading = false;
        let sleep = tokio::time::sleep_until(Instant::now());
        tokio::pin!(sleep);
        // When the sleep is set to go off. It is moved only earlier: a
        // wake time unfiled before it (its transaction ended) makes it go
        // off for nothing once, and it is set again then — not at every
        // transaction's end.
        let mut armed: Option<Instant> = None;
        loop {
            if let Some(&(first, _)) = self.timers.keys().next()
                && armed.is_none_or(|at| first < at)
            {
                sleep.as_mut().reset(first);
                armed = Some(first);
            }
            // In order, not at random: the simulation replays runs exactly.
            tokio::select! {
                biased;
                event = events.next() => match event {
                    Some(LeaderEvent::Lead { term, txs }) => {
                        self.stop_all();
                        leading = true;
                        tracing::info!(term, count = txs.len(), "driver: resuming transactions");
                        for tx in txs {
                            self.dispatch(tx);
                        }
                    }
                    Some(LeaderEvent::Changed(txs)) => {
                        if leading {
                            for tx in txs {
                                self.dispatch(tx);
                            }
                        }
                    }
                    Some(LeaderEvent::Follow) => {
                        leading = false;
                        tracing::info!("driver: no longer leader; stopping every transaction's calls");
                        self.stop_all();
                    }
                    None => {
                        self.stop_all();
                        return;
                    }
                },
                Some((gid, done)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.ended(gid, done);
                }
                () = &mut sleep, if armed.is_some() => armed = None,
            }
            // Whatever else is ready too: under load the feed is ready
            // almost always, and the branches after it must not starve.
            for _ in 0..DRAIN_MAX {
                match self.in_flight.next().now_or_never() {
                    Some(Some((gid, done))) => self.ended(gid, done),
                    _ => break,
                }
            }
            self.wake_due(Instant::now());
        }
    }

    /// Drops every transaction and everything in flight (leadership lost).
    fn stop_all(&mut self) {
        for slot in self.slots.values() {
            slot.released.store(true, Ordering::Relaxed);
        }
        self.slots.clear();
        self.timers.clear();
        self.in_flight = FuturesUnordered::new();
    }

    /// A version of a transaction from the feed.
    fn dispatch(&mut self, tx: Arc<Transaction>) {
        if tx.state.is_terminal() {
            self.release(&tx.gid);
            return;
        }
        let gid = tx.gid.clone();
        match self.slots.get_mut(&gid) {
            Some(slot) => slot.state.update(tx),
            None => {
                let state = WorkerState::new(tx, Instant::now(), self.shared.clock.now_ms());
                let slot = Slot {
                    state,
                    timer: None,
                    released: Arc::new(AtomicBool::new(false)),
                };
                self.slots.insert(gid.clone(), slot);
            }
        }
        self.turn(&gid);
    }

    /// A call or proposal of `gid`'s ended.
    fn ended(&mut self, gid: String, done: Done) {
        let Some(slot) = self.slots.get_mut(&gid) else {
            // It ended meanwhile (or leadership changed hands and back).
            return;
        };
        let now = Instant::now();
        match done {
            Done::Over { key, tx, failing } => slot.state.finished(key, tx, failing, now),
            Done::Answered {
                key,
                outcome,
                failing,
            } => {
                if let Some(flush) = slot.state.answered(key, outcome, failing, now) {
                    let shared = self.shared.clone();
                    let gid = gid.clone();
                    self.in_flight
                        .push(Box::pin(async move { shared.flush(gid, flush).await }));
                }
            }
            Done::Flushed { keys, tx } => slot.state.flushed(keys, tx, now),
        }
        self.turn(&gid);
    }

    /// Turns every transaction whose wake time has come.
    fn wake_due(&mut self, now: Instant) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let gid = entry.remove();
            if let Some(slot) = self.slots.get_mut(&gid) {
                slot.timer = None;
            }
            self.turn(&gid);
        }
    }

    /// One turn of `gid`'s: what to start now, started; its wake time filed.
    fn turn(&mut self, gid: &str) {
        let Some(slot) = self.slots.get_mut(gid) else {
            return;
        };
        if slot.state.is_done() {
            self.release(gid);
            return;
        }
        let next = slot.state.next(Instant::now(), self.shared.clock.now_ms());
        if let Some(now_ms) = next.timeout {
            let shared = self.shared.clone();
            let gid = gid.to_string();
            self.in_flight.push(Box::pin(async move {
                let command = Command::TimeoutV2 {
                    gid: gid.clone(),
                    now_ms,
                };
                let tx = propose(&shared.node, command).await;
                let over = Done::Over {
                    key: None,
                    tx,
                    failing: Failing::default(),
                };
                (gid, over)
            }));
        }
        if next.fanning_out {
            fail::fail_point!(failpoints::BEFORE_FANOUT);
        }
        for (call, so_far) in next.start {
            let answers_back = slot.state.records_answers_to(call.op);
            let spec = CallSpec::new(slot.state.current(), call, answers_back);
            let shared = self.shared.clone();
            let released = slot.released.clone();
            self.in_flight
                .push(Box::pin(shared.call(spec, so_far, released)));
        }
        // A wake filed earlier stays: the turn it brings files the next one.
        if slot.timer.is_none_or(|(at, _)| next.wake_at < at) {
            if let Some(old) = slot.timer.take() {
                self.timers.remove(&old);
            }
            self.filed += 1;
            let key = (next.wake_at, self.filed);
            self.timers.insert(key, gid.to_string());
            slot.timer = Some(key);
        }
    }

    /// Lets go of `gid` (it ended): its wake time unfiled, its calls still
    /// out told to propose nothing.
    fn release(&mut self, gid: &str) {
        if let Some(slot) = self.slots.remove(gid) {
            slot.released.store(true, Ordering::Relaxed);
            if let Some(key) = slot.timer {
                self.timers.remove(&key);
            }
        }
    }
}

/// What a call task needs: copied out of the transaction, so that a call in
/// flight keeps no version of the transaction alive (a saga of a thousand
/// steps has a thousand calls in flight, and a new version per answer).
struct CallSpec {
    gid: String,
    protocol: crate::model::types::Protocol,
    call: Call,
    payload: crate::model::types::Payload,
    timeout: Duration,
    /// The op is the transaction's phase two: a "no" is a refusal.
    phase_two: bool,
    /// Phase one gives up after this many attempts (the protocol decides).
    attempts_limit: Option<u32>,
    /// The transaction's trace context (`None`: it has none).
    trace_parent: Option<String>,
    /// The answer goes back to the driver (`Done::Answered`) instead of
    /// being proposed by the call.
    answers_back: bool,
}

impl CallSpec {
    fn new(tx: &Transaction, call: Call, answers_back: bool) -> CallSpec {
        let (phase_two, attempts_limit) = plan::call_terms(tx, &call);
        CallSpec {
            gid: tx.gid.clone(),
            protocol: tx.protocol,
            payload: tx
                .branch(&call.branch_id)
                .map(|b| b.payload.clone())
                .unwrap_or_default(),
            timeout: Duration::from_millis(u64::from(tx.options.branch_timeout_ms)),
            phase_two,
            attempts_limit,
            trace_parent: (!tx.trace_parent.is_empty()).then(|| tx.trace_parent.clone()),
            answers_back,
            call,
        }
    }
}

/// What a finished call or proposal reports to the driver.
enum Done {
    /// A call or a Timeout proposal is over.
    Over {
        /// The call this was; `None` for a Timeout proposal.
        key: Option<Key>,
        /// The transaction after the proposal, when it was applied.
        tx: Option<Arc<Transaction>>,
        /// The op's failures so far, as this worker counts them.
        failing: Failing,
    },
    /// A saga action answered; the worker records it (`None`: the answer
    /// is not worth an entry).
    Answered {
        key: Key,
        outcome: Option<OpOutcome>,
        failing: Failing,
    },
    /// Answers proposed together are in (`tx`) or not (`None`).
    Flushed {
        keys: Vec<(Key, Failing)>,
        tx: Option<Arc<Transaction>>,
    },
}

impl<T: BranchTransport> Shared<T> {
    /// Proposes a saga's answers together.
    async fn flush(self: Arc<Self>, gid: String, flush: Flush) -> (String, Done) {
        let Flush {
            results,
            keys,
            exact,
        } = flush;
        let command = Command::OpResults {
            gid: gid.clone(),
            results,
            exact,
            now_ms: self.clock.now_ms(),
        };
        let tx = propose(&self.node, command).await;
        (gid, Done::Flushed { keys, tx })
    }

    /// Makes one call and proposes what came back: a success or a phase-one
    /// "no" always; a failure that leaves the op open only when
    /// [`plan::to_record`] says the log needs it — unless the driver let go
    /// of the transaction meanwhile (`released`: it ended).
    async fn call(
        self: Arc<Self>,
        spec: CallSpec,
        mut failing: Failing,
        released: Arc<AtomicBool>,
    ) -> (String, Done) {
        let CallSpec {
            gid,
            protocol,
            call,
            payload,
            timeout,
            phase_two,
            attempts_limit,
            trace_parent,
            answers_back,
        } = spec;
        let key = Some((call.branch_id.clone(), call.op));
        let Ok(_permit) = self.calls.acquire().await else {
            let over = Done::Over {
                key,
                tx: None,
                failing,
            };
            return (gid, over);
        };
        // One span per call, a child of the transaction's context; its
        // context goes to the participant (none made when tracing is off:
        // the transaction's context passes on as it is).
        let span = crate::telemetry::child_span(
            || {
                tracing::info_span!(
                    "tandem.branch_call",
                    otel.name = %format_args!("{} {}", call.op.name(), call.branch_id),
                    otel.kind = "client",
                    gid = %gid,
                    branch = %call.branch_id,
                    op = call.op.name(),
                    attempt = failing.attempts + 1,
                    fence = %format_args!("{}/{}", call.fence.term, call.fence.index),
                    otel.status_code = tracing::field::Empty,
                )
            },
            trace_parent.as_deref(),
        );
        let traceparent = crate::telemetry::traceparent_for(&span, trace_parent.as_deref());
        let started = std::time::Instant::now();
        let outcome = self
            .caller
            .call(BranchCall {
                gid: &gid,
                branch_id: &call.branch_id,
                op: call.op,
                protocol,
                endpoint: &call.endpoint,
                payload: &payload,
                fence: call.fence,
                timeout,
                traceparent: traceparent.as_deref(),
            })
            .instrument(span.clone())
            .await;
        if !span.is_none() {
            span.record(
                "otel.status_code",
                if outcome == OpOutcome::Succeeded {
                    "ok"
                } else {
                    "error"
                },
            );
        }
        drop(span);
        crate::metrics::branch_call(call.op, &outcome, started.elapsed());
        if matches!(call.op, Op::Prepare | Op::CanCommit) {
            fail::fail_point!(failpoints::DURING_PREPARE);
        }
        if outcome != OpOutcome::Succeeded {
            tracing::debug!(%gid, branch = %call.branch_id, op = %call.op,
                attempts = failing.attempts + 1, answer = ?outcome, "call failed");
        }
        let outcome = plan::to_record(
            &mut failing,
            call.op,
            outcome,
            phase_two,
            attempts_limit,
            self.clock.now_ms(),
        );
        if answers_back {
            let answered = Done::Answered {
                key: (call.branch_id, call.op),
                outcome,
                failing,
            };
            return (gid, answered);
        }
        let outcome = outcome.filter(|_| !released.load(Ordering::Relaxed));
        let Some(outcome) = outcome else {
            let over = Done::Over {
                key,
                tx: None,
                failing,
            };
            return (gid, over);
        };
        let succeeded_phase_two = phase_two && outcome == OpOutcome::Succeeded;
        let pre_committed = call.op == Op::PreCommit && outcome == OpOutcome::Succeeded;
        let command = Command::OpResult {
            gid: gid.clone(),
            branch_id: call.branch_id.clone(),
            op: call.op,
            outcome,
            now_ms: self.clock.now_ms(),
        };
        let applied = propose(&self.node, command).await;
        if succeeded_phase_two && applied.is_some() {
            fail::fail_point!(failpoints::MID_FANOUT);
        }
        if pre_committed && applied.is_some() {
            fail::fail_point!(failpoints::AFTER_PRE_COMMIT);
        }
        let over = Done::Over {
            key,
            tx: applied,
            failing,
        };
        (gid, over)
    }
}

/// Proposes a command; the transaction after it, or `None` if it did not
/// get in (not leader, overloaded, refused — the worker will look again).
async fn propose(node: &Replica, command: Command) -> Option<Arc<Transaction>> {
    let gid = command.gid().unwrap_or_default().to_string();
    match node.propose(command).await {
        Ok(Ok(Applied::Updated { tx } | Applied::Begun { tx, .. })) => Some(tx),
        Ok(Ok(Applied::Collected { .. } | Applied::ClusterId { .. })) => None,
        Ok(Err(rejection)) => {
            tracing::warn!(%gid, %rejection, "the driver's proposal was refused");
            None
        }
        Err(NodeError::NotLeader { .. }) => None,
        Err(e) => {
            tracing::debug!(%gid, error = %e, "the driver's proposal did not get in");
            None
        }
    }
}
