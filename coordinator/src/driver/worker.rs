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
