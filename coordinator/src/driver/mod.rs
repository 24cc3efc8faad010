//! The driver: on the leader only, it makes the calls the protocols ask for
//! and proposes what came back. It never decides — decisions are taken by
//! `apply` from the facts it proposes — so a deposed leader's late proposals
//! are harmless facts.
//!
//! One worker task per unfinished transaction. A worker reads the latest
//! applied state of its transaction, asks its [`worker::WorkerState`] (over
//! the pure [`plan::plan`]) which calls to start, whether to propose a
//! timeout and when to look again, carries that out (calls run
//! concurrently), waits for a result, a change or its wake time, and
//! repeats until the transaction is terminal. The state is pure: the
//! simulation drives the same one. An op that is still open after its answer was recorded
//! (pending, or refused in phase two) is retried after
//! [`crate::protocol::retry::backoff`]; failures are recorded in the log sparsely
//! ([`crate::protocol::retry::should_record`]), not one entry per attempt. An undecided
//! transaction past its deadline gets a Timeout proposal.
//!
//! On becoming leader the loop hands over every unfinished transaction
//! (`LeaderEvent::Lead`); on losing leadership every worker is stopped.
//! The commit point holds by construction: phase-two calls come only from
//! applied state, and a decision is applied only once committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
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

pub struct Driver<T: BranchTransport> {
    node: Replica,
    caller: Arc<T>,
    clock: Arc<dyn Clock>,
    calls: Arc<Semaphore>,
    workers: HashMap<String, watch::Sender<Arc<Transaction>>>,
    tasks: JoinSet<()>,
}

impl<T: BranchTransport> Driver<T> {
    pub fn new(node: Replica, caller: Arc<T>, clock: Arc<dyn Clock>) -> Driver<T> {
        Driver {
            node,
            caller,
            clock,
            calls: Arc::new(Semaphore::new(CALLS_IN_FLIGHT_MAX)),
            workers: HashMap::new(),
            tasks: JoinSet::new(),
        }
    }

    pub async fn run(mut self, events: Arc<LeaderFeed>) {
        let mut leading = false;
        loop {
            // Reap every finished worker first, so the set does not grow
            // however busy the feed is (the select below prefers it).
            while self.tasks.try_join_next().is_some() {}
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
                        tracing::info!("driver: no longer leader; stopping every worker");
                        self.stop_all();
                    }
                    None => {
                        self.stop_all();
                        return;
                    }
                },
                // A worker ended while the feed was quiet.
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
    }

    fn stop_all(&mut self) {
        self.workers.clear();
        self.tasks.abort_all();
    }

    fn dispatch(&mut self, tx: Arc<Transaction>) {
        if tx.state.is_terminal() {
            // The worker sees it too and ends.
            if let Some(worker) = self.workers.remove(&tx.gid) {
                let _ = worker.send(tx);
            }
            return;
        }
        if let Some(worker) = self.workers.get(&tx.gid)
            && !worker.is_closed()
        {
            worker.send_if_modified(|current| {
                let newer = tx.version > current.version;
                if newer {
                    *current = tx.clone();
                }
                newer
            });
            return;
        }
        let (sender, receiver) = watch::channel(tx.clone());
        self.workers.insert(tx.gid.clone(), sender);
        let worker = Worker {
            node: self.node.clone(),
            caller: self.caller.clone(),
            clock: self.clock.clone(),
            calls: self.calls.clone(),
        };
        self.tasks.spawn(worker.run(receiver));
    }
}

struct Worker<T: BranchTransport> {
    node: Replica,
    caller: Arc<T>,
    clock: Arc<dyn Clock>,
    calls: Arc<Semaphore>,
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
    /// The answer goes back to the worker (`Done::Answered`) instead of
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

/// What a finished call or proposal task reports to its worker.
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

impl<T: BranchTransport> Clone for Worker<T> {
    fn clone(&self) -> Self {
        Worker {
            node: self.node.clone(),
            caller: self.caller.clone(),
            clock: self.clock.clone(),
            calls: self.calls.clone(),
        }
    }
}

impl<T: BranchTransport> Worker<T> {
    async fn run(self, mut updates: watch::Receiver<Arc<Transaction>>) {
        let first = updates.borrow_and_update().clone();
        let mut state = WorkerState::new(first, Instant::now(), self.clock.now_ms());
        // Polled by this task, not spawned: a call is a future of the
        // worker's, so it costs no task, no hand-over between threads and
        // no join (and ends with the worker when leadership is lost).
        let mut calls: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
        loop {
            if state.is_done() {
                return;
            }
            let next = state.next(Instant::now(), self.clock.now_ms());
            if let Some(now_ms) = next.timeout {
                let node = self.node.clone();
                let gid = state.current().gid.clone();
                calls.push(Box::pin(async move {
                    let command = Command::TimeoutV2 { gid, now_ms };
                    let tx = propose(&node, command).await;
                    Done::Over {
                        key: None,
                        tx,
                        failing: Failing::default(),
                    }
                }));
            }
            if next.fanning_out {
                fail::fail_point!(failpoints::BEFORE_FANOUT);
            }
            for (call, so_far) in next.start {
                let answers_back = state.records_answers_to(call.op);
                let spec = CallSpec::new(state.current(), call, answers_back);
                calls.push(Box::pin(self.clone().call(spec, so_far)));
            }
            tokio::select! {
                biased;
                changed = updates.changed() => {
                    if changed.is_err() {
                        // The driver stopped this worker (leadership lost).
                        return;
                    }
                    let tx = updates.borrow_and_update().clone();
                    state.update(tx);
                }
                Some(done) = calls.next(), if !calls.is_empty() => {
                    match done {
                        Done::Over { key, tx, failing } => {
                            state.finished(key, tx, failing, Instant::now());
                        }
                        Done::Answered { key, outcome, failing } => {
                            if let Some(flush) = state.answered(key, outcome, failing, Instant::now()) {
                                let gid = state.current().gid.clone();
                                calls.push(Box::pin(self.clone().flush(gid, flush)));
                            }
                        }
                        Done::Flushed { keys, tx } => state.flushed(keys, tx, Instant::now()),
                    }
                }
                _ = tokio::time::sleep_until(next.wake_at) => {}
            }
        }
    }

    /// Proposes a saga's answers together.
    async fn flush(self, gid: String, flush: Flush) -> Done {
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

    /// Makes one call and proposes what came back: a success or a phase-one
    /// "no" always; a failure that leaves the op open only when
    /// [`plan::to_record`] says the log needs it.
    async fn call(self, spec: CallSpec, mut failing: Failing) -> Done {
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
        let Ok(_permit) = self.calls.clone().acquire_owned().await else {
            return Done::Over {
                key,
                tx: None,
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
            return Done::Answered {
                key: (call.branch_id, call.op),
                outcome,
                failing,
            };
        }
        let Some(outcome) = outcome else {
            return Done::Over {
                key,
                tx: None,
                failing,
            };
        };
        let succeeded_phase_two = phase_two && outcome == OpOutcome::Succeeded;
        let pre_committed = call.op == Op::PreCommit && outcome == OpOutcome::Succeeded;
        let command = Command::OpResult {
            gid,
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
        Done::Over {
            key,
            tx: applied,
            failing,
        }
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
