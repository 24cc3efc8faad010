//! Waiting for a transaction to change (Commit and SubmitSaga with `wait`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::Node;
use crate::model::Transaction;
use crate::raft::NodeError;

/// How often a transaction waiter re-reads even without a change.
const WAIT_RECHECK: Duration = Duration::from_secs(1);

/// Transactions callers are waiting on, by gid. A caller declares its
/// interest before it proposes; from then on the loop keeps the latest
/// version of that transaction it applied and wakes the caller on every
/// change — so a waiter compares versions instead of reading, and cannot
/// miss a change that lands between two waits.
#[derive(Default)]
pub struct TxWatchers {
    watched: std::sync::Mutex<HashMap<String, Watched>>,
    /// Lets the loop skip the lock when nobody waits (the common case).
    count: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct Watched {
    /// Callers with interest in this gid (entries go when it drops to 0).
    interest: usize,
    latest: Option<Arc<Transaction>>,
    waiting: Vec<oneshot::Sender<Arc<Transaction>>>,
}

impl TxWatchers {
    pub(super) fn declare(&self, gid: &str) {
        let mut watched = self.watched.lock().expect("watchers lock");
        let entry = watched.entry(gid.to_string()).or_insert_with(|| {
            self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Watched::default()
        });
        entry.interest += 1;
    }

    fn withdraw(&self, gid: &str) {
        let mut watched = self.watched.lock().expect("watchers lock");
        if let Some(entry) = watched.get_mut(gid) {
            entry.interest -= 1;
            if entry.interest == 0 {
                watched.remove(gid);
                self.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// A receiver for the first version newer than `seen` — at once if the
    /// loop already applied one.
    fn after(&self, gid: &str, seen: u64) -> oneshot::Receiver<Arc<Transaction>> {
        let (tx, rx) = oneshot::channel();
        let mut watched = self.watched.lock().expect("watchers lock");
        let entry = watched.get_mut(gid).expect("interest is declared first");
        match &entry.latest {
            Some(latest) if latest.version > seen => {
                let _ = tx.send(latest.clone());
            }
            _ => entry.waiting.push(tx),
        }
        rx
    }

    pub(super) fn notify(&self, tx: &Arc<Transaction>) {
        if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return;
        }
        let mut watched = self.watched.lock().expect("watchers lock");
        if let Some(entry) = watched.get_mut(&tx.gid) {
            entry.latest = Some(tx.clone());
            for waiter in entry.waiting.drain(..) {
                let _ = waiter.send(tx.clone());
            }
        }
    }
}

/// Interest in one transaction's changes; withdrawn when dropped.
pub struct TxWatch {
    pub(super) node: Node,
    pub(super) watchers: Arc<TxWatchers>,
    pub(super) gid: String,
}

impl Drop for TxWatch {
    fn drop(&mut self) {
        self.watchers.withdraw(&self.gid);
    }
}

impl TxWatch {
    /// Waits until the transaction satisfies `done` or `timeout` passes,
    /// starting from `latest` (what the caller's own proposal returned);
    /// returns its latest state either way, or `None` if it was collected.
    pub async fn until(
        &self,
        mut latest: Arc<Transaction>,
        timeout: Duration,
        done: impl Fn(&Transaction) -> bool,
    ) -> Result<Option<Arc<Transaction>>, NodeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&latest) {
                return Ok(Some(latest));
            }
            let change = self.watchers.after(&self.gid, latest.version);
            // Re-check at least every second: a node cut off from the
            // cluster applies nothing; its read fails instead, and the
            // caller goes to another node.
            let step = deadline.min(tokio::time::Instant::now() + WAIT_RECHECK);
            match tokio::time::timeout_at(step, change).await {
                Ok(Ok(tx)) => {
                    if tx.version > latest.version {
                        latest = tx;
                    }
                }
                _ if tokio::time::Instant::now() >= deadline => return Ok(Some(latest)),
                _ => match self.node.read().await?.get(&self.gid) {
                    Some(tx) if tx.version >= latest.version => latest = tx,
                    Some(_) => {}
                    None => return Ok(None),
                },
            }
        }
    }
}
