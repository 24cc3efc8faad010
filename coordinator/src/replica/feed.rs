//! The driver's feed: what the replica tells the leader-only executor.

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::Transaction;

/// What the leader-only executor (the driver) hears from the loop.
#[derive(Debug)]
pub enum LeaderEvent {
    /// This node leads `term` and has applied everything committed before
    /// it: here is every unfinished transaction to resume.
    Lead {
        term: u64,
        txs: Vec<Arc<Transaction>>,
    },
    /// Transactions changed while this node leads: the latest version of
    /// each, in the order they first changed since the driver last looked.
    Changed(Vec<Arc<Transaction>>),
    /// This node no longer leads: stop everything.
    Follow,
}

/// The loop's feed to the driver, coalesced: at most one pending version
/// per transaction (the latest), so a driver that falls behind costs one
/// version per unfinished transaction, never a queue of them. A change of
/// leadership supersedes every pending change (Lead carries every
/// unfinished transaction as of that moment; Follow stops everything).
#[derive(Default)]
pub struct LeaderFeed {
    state: std::sync::Mutex<FeedState>,
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct FeedState {
    leadership: Option<LeaderEvent>,
    changed: HashMap<String, Arc<Transaction>>,
    order: Vec<String>,
    closed: bool,
}

impl LeaderFeed {
    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().expect("leader feed lock")
    }

    pub(super) fn leadership(&self, event: LeaderEvent) {
        let mut state = self.lock();
        state.changed.clear();
        state.order.clear();
        state.leadership = Some(event);
        drop(state);
        self.ready.notify_one();
    }

    pub(super) fn changed(&self, tx: Arc<Transaction>) {
        let mut state = self.lock();
        if state.changed.insert(tx.gid.clone(), tx.clone()).is_none() {
            state.order.push(tx.gid.clone());
        }
        drop(state);
        self.ready.notify_one();
    }

    /// Ends the feed: [`LeaderFeed::next`] returns `None` once drained.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// The next event: a change of leadership first, then the changes that
    /// came after it.
    pub async fn next(&self) -> Option<LeaderEvent> {
        loop {
            {
                let mut state = self.lock();
                if let Some(event) = state.leadership.take() {
                    return Some(event);
                }
                if !state.order.is_empty() {
                    let order = std::mem::take(&mut state.order);
                    let mut changed = std::mem::take(&mut state.changed);
                    let txs = order
                        .into_iter()
                        .filter_map(|g| changed.remove(&g))
                        .collect();
                    return Some(LeaderEvent::Changed(txs));
                }
                if state.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }
}
