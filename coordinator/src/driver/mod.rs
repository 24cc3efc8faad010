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
//! timeout and when to look again, start them, and file the wake time. A
//! call only answers: the loop proposes what it brought back, so an answer
//! for a transaction that ended meanwhile finds no slot and is dropped.
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

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
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

/// A transaction's number in the loop, never reused: what a call or
/// proposal in flight says it was for. One that comes back after its
/// transaction ended finds no slot, and nothing is done with it.
type SlotId = u64;

/// A call or proposal in flight: which transaction it is for, and what it
/// reports when over.
type InFlight = BoxFuture<'static, (SlotId, Done)>;

/// One unfinished transaction the driver drives.
struct Slot {
    /// Its gid, shared with its calls in flight.
    gid: Arc<str>,
    state: WorkerState,
    /// Its wake time as filed in [`Driver::timers`] (`None`: not filed).
    timer: Option<Instant>,
}

pub struct Driver<T: BranchTransport> {
    shared: Arc<Shared<T>>,
    /// The slot of each unfinished transaction, by gid (for the feed).
    ids: HashMap<String, SlotId>,
    slots: HashMap<SlotId, Slot>,
    next_id: SlotId,
    /// Wake times, earliest first (a slot has at most one).
    timers: BTreeSet<(Instant, SlotId)>,
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
            ids: HashMap::new(),
            slots: HashMap::new(),
            next_id: 0,
            timers: BTreeSet::new(),
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
            if let Some(&(first, _)) = self.timers.first()
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
                Some((id, done)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.ended(id, done);
                }
                () = &mut sleep, if armed.is_some() => armed = None,
            }
            // Whatever else is ready too: under load the feed is ready
            // almost always, and the branches after it must not starve.
            for _ in 0..DRAIN_MAX {
                match self.in_flight.next().now_or_never() {
                    Some(Some((id, done))) => self.ended(id, done),
                    _ => break,
                }
            }
            self.wake_due(Instant::now());
        }
    }

    /// Drops every transaction and everything in flight (leadership lost).
    fn stop_all(&mut self) {
        self.ids.clear();
        self.slots.clear();
        self.timers.clear();
        self.in_flight = FuturesUnordered::new();
    }

    /// A version of a transaction from the feed.
    fn dispatch(&mut self, tx: Arc<Transaction>) {
        let known = self.ids.get(&tx.gid).copied();
        if tx.state.is_terminal() {
            if let Some(id) = known {
                self.release(id);
            }
            return;
        }
        let id = match known {
            Some(id) => {
                if let Some(slot) = self.slots.get_mut(&id) {
                    slot.state.update(tx);
                }
                id
            }
            None => {
                let id = self.next_id;
                self.next_id += 1;
                let gid: Arc<str> = Arc::from(tx.gid.as_str());
                self.ids.insert(tx.gid.clone(), id);
                let state = WorkerState::new(tx, Instant::now(), self.shared.clock.now_ms());
                let slot = Slot {
                    gid,
                    state,
                    timer: None,
                };
                self.slots.insert(id, slot);
                id
            }
        };
        self.turn(id);
    }

    /// A call or proposal of slot `id`'s ended.
    fn ended(&mut self, id: SlotId, done: Done) {
        let Some(slot) = self.slots.get_mut(&id) else {
            // It ended meanwhile (or leadership changed hands and back):
            // what came back is not proposed.
            return;
        };
        let now = Instant::now();
        match done {
            Done::Answered {
                key,
                outcome,
                failing,
            } if slot.state.records_answers_to(key.1) => {
                if let Some(flush) = slot.state.answered(key, outcome, failing, now) {
                    let shared = self.shared.clone();
                    let gid = slot.gid.to_string();
                    self.in_flight.push(Box::pin(
                        async move { (id, shared.flush(gid, flush).await) },
                    ));
                }
            }
            Done::Answered {
                key,
                outcome: Some(outcome),
                failing,
            } => {
                let shared = self.shared.clone();
                let gid = slot.gid.to_string();
                let phase_two = crate::protocol::is_phase_two(slot.state.current(), key.1);
                self.in_flight.push(Box::pin(async move {
                    let done = shared.record(gid, key, outcome, failing, phase_two).await;
                    (id, done)
                }));
            }
            Done::Answered {
                key,
                outcome: None,
                failing,
            } => slot.state.finished(Some(key), None, failing, now),
            Done::Over { key, tx, failing } => {
                let tx = landed(&slot.gid, tx);
                slot.state.finished(key, tx, failing, now);
            }
            Done::Flushed { keys, tx } => {
                let tx = landed(&slot.gid, tx);
                slot.state.flushed(keys, tx, now);
            }
        }
        self.turn(id);
    }

    /// Turns every transaction whose wake time has come.
    fn wake_due(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(slot) = self.slots.get_mut(&id) {
                slot.timer = None;
            }
            self.turn(id);
        }
    }

    /// One turn of slot `id`'s: what to start now, started; its wake time
    /// filed.
    fn turn(&mut self, id: SlotId) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        if slot.state.is_done() {
            self.release(id);
            return;
        }
        let next = slot.state.next(Instant::now(), self.shared.clock.now_ms());
        if let Some(now_ms) = next.timeout {
            let shared = self.shared.clone();
            let gid = slot.gid.to_string();
            self.in_flight.push(Box::pin(async move {
                let command = Command::TimeoutV2 { gid, now_ms };
                let tx = propose(&shared.node, command).await;
                let over = Done::Over {
                    key: None,
                    tx,
                    failing: Failing::default(),
                };
                (id, over)
            }));
        }
        if next.fanning_out {
            fail::fail_point!(failpoints::BEFORE_FANOUT);
        }
        for (call, so_far) in next.start {
            let spec = CallSpec::new(&slot.gid, slot.state.current(), call);
            let shared = self.shared.clone();
            self.in_flight.push(Box::pin(
                async move { (id, shared.call(spec, so_far).await) },
            ));
        }
        // A wake filed earlier stays: the turn it brings files the next one.
        if slot.timer.is_none_or(|at| next.wake_at < at) {
            if let Some(old) = slot.timer.take() {
                self.timers.remove(&(old, id));
            }
            self.timers.insert((next.wake_at, id));
            slot.timer = Some(next.wake_at);
        }
    }

    /// Lets go of slot `id` (its transaction ended): its wake time unfiled;
    /// what its calls still out bring back finds no slot.
    fn release(&mut self, id: SlotId) {
        if let Some(slot) = self.slots.remove(&id) {
            self.ids.remove(&*slot.gid);
            if let Some(at) = slot.timer {
                self.timers.remove(&(at, id));
            }
        }
    }
}

/// What a call needs: copied out of the transaction, so that a call in
/// flight keeps no version of the transaction alive (a saga of a thousand
/// steps has a thousand calls in flight, and a new version per answer).
struct CallSpec {
    gid: Arc<str>,
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
}

impl CallSpec {
    fn new(gid: &Arc<str>, tx: &Transaction, call: Call) -> CallSpec {
        let (phase_two, attempts_limit) = plan::call_terms(tx, &call);
        CallSpec {
            gid: gid.clone(),
            protocol: tx.protocol,
            payload: tx
                .branch(&call.branch_id)
                .map(|b| b.payload.clone())
                .unwrap_or_default(),
            timeout: Duration::from_millis(u64::from(tx.options.branch_timeout_ms)),
            phase_two,
            attempts_limit,
            trace_parent: (!tx.trace_parent.is_empty()).then(|| tx.trace_parent.clone()),
            call,
        }
    }
}

/// What a finished call or proposal reports to the driver's loop.
enum Done {
    /// A call answered: what to record of it (`None`: nothing is worth an
    /// entry), and the op's failures so far. The loop proposes it — unless
    /// the transaction ended meanwhile.
    Answered {
        key: Key,
        outcome: Option<OpOutcome>,
        failing: Failing,
    },
    /// A call's answer or a Timeout was proposed.
    Over {
        /// The call this was; `None` for a Timeout proposal.
        key: Option<Key>,
        /// How the proposal went.
        tx: Proposed,
        /// The op's failures so far, as this worker counts them.
        failing: Failing,
    },
    /// Saga answers proposed together.
    Flushed {
        keys: Vec<(Key, Failing)>,
        tx: Proposed,
    },
}

/// How a proposal went: the transaction after it, or why it did not get in.
type Proposed = Result<Arc<Transaction>, Missed>;

enum Missed {
    /// Applied, but it changed no transaction (cannot happen for the
    /// driver's commands; kept total).
    NoTransaction,
    /// `apply` refused it.
    Refused(String),
    /// It did not get into the log (not leader, overloaded, shutting down).
    NotIn(NodeError),
}

impl<T: BranchTransport> Shared<T> {
    /// Proposes a saga's answers together.
    async fn flush(self: Arc<Self>, gid: String, flush: Flush) -> Done {
        let Flush {
            results,
            keys,
            exact,
        } = flush;
        let command = Command::OpResults {
            gid,
            results,
            exact,
            now_ms: self.clock.now_ms(),
        };
        let tx = propose(&self.node, command).await;
        Done::Flushed { keys, tx }
    }

    /// Proposes one call's answer (a success or a phase-one "no" always; a
    /// failure that leaves the op open only when [`plan::to_record`] says
    /// the log needs it). `phase_two`: the op is the transaction's phase
    /// two (for the failpoint after one such answer is in).
    async fn record(
        self: Arc<Self>,
        gid: String,
        key: Key,
        outcome: OpOutcome,
        failing: Failing,
        phase_two: bool,
    ) -> Done {
        let op = key.1;
        let succeeded = outcome == OpOutcome::Succeeded;
        let command = Command::OpResult {
            gid,
            branch_id: key.0.clone(),
            op,
            outcome,
            now_ms: self.clock.now_ms(),
        };
        let tx = propose(&self.node, command).await;
        if tx.is_ok() && succeeded {
            if phase_two {
                fail::fail_point!(failpoints::MID_FANOUT);
            }
            if op == Op::PreCommit {
                fail::fail_point!(failpoints::AFTER_PRE_COMMIT);
            }
        }
        Done::Over {
            key: Some(key),
            tx,
            failing,
        }
    }

    /// Makes one call; what came back goes to the loop, which proposes it.
    async fn call(self: Arc<Self>, spec: CallSpec, mut failing: Failing) -> Done {
        let CallSpec {
            gid,
            protocol,
            call,
            payload,
            timeout,
            phase_two,
            attempts_limit,
            trace_parent,
        } = spec;
        let Ok(_permit) = self.calls.acquire().await else {
            return Done::Answered {
                key: (call.branch_id, call.op),
                outcome: None,
                failing,
            };
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
                    gid = %&*gid,
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
        Done::Answered {
            key: (call.branch_id, call.op),
            outcome,
            failing,
        }
    }
}

/// Proposes a command: the transaction after it, or why not (the worker
/// looks again either way).
async fn propose(node: &Replica, command: Command) -> Proposed {
    match node.propose(command).await {
        Ok(Ok(Applied::Updated { tx } | Applied::Begun { tx, .. })) => Ok(tx),
        Ok(Ok(Applied::Collected { .. } | Applied::ClusterId { .. })) => Err(Missed::NoTransaction),
        Ok(Err(rejection)) => Err(Missed::Refused(rejection.to_string())),
        Err(e) => Err(Missed::NotIn(e)),
    }
}

/// What a proposal of `gid`'s left: the transaction after it, if applied;
/// why not, logged.
fn landed(gid: &str, proposed: Proposed) -> Option<Arc<Transaction>> {
    match proposed {
        Ok(tx) => Some(tx),
        Err(Missed::NoTransaction | Missed::NotIn(NodeError::NotLeader { .. })) => None,
        Err(Missed::Refused(rejection)) => {
            tracing::warn!(%gid, %rejection, "the driver's proposal was refused");
            None
        }
        Err(Missed::NotIn(e)) => {
            tracing::debug!(%gid, error = %e, "the driver's proposal did not get in");
            None
        }
    }
}
