//! The replicated state machine: the transaction table and the cluster's
//! member addresses. `apply` is a pure function of (state, command) — no
//! clocks, randomness or I/O — so every replica that applies the same log holds
//! the same table.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

use imbl::OrdMap;
use serde::Deserialize;

use crate::model::command::{Applied, ApplyContext, ApplyResult, Command, Rejection};
use crate::model::types::{Branch, Fence, Op, Protocol, Transaction, TxOptions, TxState};
use crate::model::validate::{self, GC_BATCH_MAX, PAYLOAD_BYTES_HARD_MAX};
use crate::protocol;

use super::stored::Stored;

/// Unfinished transactions `apply` accepts at most, whatever a node's
/// configuration says (the configurable, lower limit is checked before
/// proposing).
pub const ACTIVE_HARD_MAX: usize = 4_000_000;

/// Entries a List page may scan before it returns what it found, so a filter
/// that matches little cannot make one call walk the whole table.
pub const LIST_SCAN_MAX: usize = 100_000;

type TxTable = OrdMap<String, Stored>;

#[derive(Clone, Debug, Default)]
pub struct StateMachine {
    /// Every transaction by gid, the finished ones sealed ([`Stored`]). A
    /// persistent map: cloning it for a read view or a snapshot is O(1),
    /// so neither blocks the Raft loop.
    txs: TxTable,
    /// Gids of unfinished transactions: what the driver resumes on becoming
    /// leader, and what the admission limit counts. Derived from `txs`.
    active: BTreeSet<String>,
    /// Terminal transactions by finish time, oldest first, for Gc, each
    /// with what it is charged ([`Transaction::retained_bytes`] when it was
    /// filed): computed once, not again at each Gc look or at its removal.
    /// Derived.
    finished: BTreeMap<(i64, String), usize>,
    /// Sum of the footprints of unfinished transactions (the API's budget
    /// `--active-bytes-max`). Derived.
    active_bytes: usize,
    /// Sum of the footprints of finished ones still kept (collected beyond
    /// `--finished-bytes-max`). Derived.
    finished_bytes: usize,
    /// Raft node id → gRPC address of every member, replicated with the
    /// membership changes that introduced them.
    members: BTreeMap<u64, String>,
    /// Minted by the cluster's first leader (`Command::InitCluster`); `None`
    /// until that entry is applied.
    cluster_id: Option<uuid::Uuid>,
    /// Where a finishing transaction is encoded before it is sealed: one
    /// buffer, reused, so a seal allocates only what it keeps.
    scratch: Vec<u8>,
}

impl StateMachine {
    pub fn new(members: BTreeMap<u64, String>) -> StateMachine {
        StateMachine {
            members,
            ..StateMachine::default()
        }
    }

    pub fn apply(&mut self, command: Command, ctx: ApplyContext) -> ApplyResult {
        self.apply_traced(command, ctx, None)
    }

    /// [`StateMachine::apply`] for a command that came with a trace
    /// context (`Command::Traced`): a transaction it creates keeps it.
    fn apply_traced(
        &mut self,
        command: Command,
        ctx: ApplyContext,
        trace_parent: Option<String>,
    ) -> ApplyResult {
        match command {
            Command::Traced {
                trace_parent: inner,
                command,
            } => match trace_parent {
                None => self.apply_traced(*command, ctx, Some(inner)),
                Some(_) => Err(Rejection::Invalid(validate::InvalidInput::Other {
                    gid: command.gid().unwrap_or_default().to_string(),
                    problem: "a traced command inside another".into(),
                })),
            },
            Command::Begin {
                gid,
                protocol,
                options,
                payload,
                now_ms,
            } => {
                validate::gid(&gid)?;
                validate::payload(&gid, &payload, PAYLOAD_BYTES_HARD_MAX)?;
                if !protocol::is_implemented(protocol) || protocol == Protocol::Msg {
                    return Err(Rejection::Invalid(validate::InvalidInput::Other {
                        gid,
                        problem: format!("protocol {protocol} does not start with Begin"),
                    }));
                }
                if let Some(stored) = self.txs.get(&gid) {
                    if stored.protocol() != protocol {
                        return Err(Rejection::ProtocolMismatch {
                            gid,
                            existing: stored.protocol(),
                            requested: protocol,
                        });
                    }
                    return Ok(Applied::Begun {
                        tx: stored.transaction(),
                        created: false,
                    });
                }
                let tx = NewTx {
                    trace_parent: trace_parent.clone().unwrap_or_default(),
                    gid,
                    protocol,
                    options,
                    payload,
                    branches: Vec::new(),
                };
                self.create(tx, ctx, now_ms)
            }
            Command::SubmitSaga {
                gid,
                options,
                steps,
                payload,
                now_ms,
            } => {
                validate::gid(&gid)?;
                validate::payload(&gid, &payload, PAYLOAD_BYTES_HARD_MAX)?;
                for step in &steps {
                    validate::payload(&gid, &step.payload, PAYLOAD_BYTES_HARD_MAX)?;
                }
                protocol::saga::validate_steps(&gid, &steps)?;
                let same = |tx: &Transaction| {
                    tx.branches.len() == steps.len()
                        && tx.branches.iter().zip(&steps).all(|(b, s)| {
                            b.branch_id == s.branch_id
                                && b.after == s.after
                                && b.payload == s.payload
                                && b.op(Op::Action).is_some_and(|o| o.endpoint == s.action)
                                && b.op(Op::Compensate)
                                    .is_some_and(|o| o.endpoint == s.compensate)
                        })
                };
                if let Some(repeat) = self.repeat(
                    &gid,
                    Protocol::Saga,
                    same,
                    "a saga with this gid was already submitted with other steps",
                ) {
                    return repeat;
                }
                let tx = NewTx {
                    trace_parent: trace_parent.clone().unwrap_or_default(),
                    gid,
                    protocol: Protocol::Saga,
                    options,
                    payload,
                    branches: protocol::saga::branches(steps, now_ms),
                };
                self.create(tx, ctx, now_ms)
            }
            Command::RegisterBranch {
                gid,
                branch,
                now_ms,
            } => {
                validate::payload(&gid, &branch.payload, PAYLOAD_BYTES_HARD_MAX)?;
                self.update(&gid, ctx, now_ms, |tx| {
                    protocol::on_register(tx, branch, now_ms)
                })
            }
            Command::Commit { gid, now_ms } => {
                self.update(&gid, ctx, now_ms, |tx| protocol::on_commit(tx, ctx, now_ms))
            }
            Command::Abort {
                gid,
                reason,
                now_ms,
            } => self.update(&gid, ctx, now_ms, |tx| {
                protocol::on_abort(tx, &reason, ctx, now_ms)
            }),
            Command::OpResult {
                gid,
                branch_id,
                op,
                outcome,
                now_ms,
            } => self.update(&gid, ctx, now_ms, |tx| {
                protocol::on_result(tx, &branch_id, op, &outcome, ctx, now_ms)
            }),
            Command::OpResults {
                gid,
                results,
                exact,
                now_ms,
            } => self.update(&gid, ctx, now_ms, |tx| {
                protocol::on_results(tx, &results, exact, ctx, now_ms)
            }),
            Command::AbortV2 {
                gid,
                reason,
                now_ms,
            } => self.update(&gid, ctx, now_ms, |tx| {
                protocol::on_abort_v2(tx, &reason, ctx, now_ms)
            }),
            Command::TimeoutV2 { gid, now_ms } => self.update(&gid, ctx, now_ms, |tx| {
                protocol::on_timeout_v2(tx, ctx, now_ms)
            }),
            Command::Timeout { gid, now_ms } => self.update(&gid, ctx, now_ms, |tx| {
                protocol::on_timeout(tx, ctx, now_ms)
            }),
            Command::Gc { gids } => {
                let mut removed = 0;
                for gid in gids.iter().take(GC_BATCH_MAX) {
                    let terminal = self.txs.get(gid).is_some_and(|s| s.state().is_terminal());
                    if terminal {
                        self.remove(gid);
                        removed += 1;
                    }
                }
                Ok(Applied::Collected { removed })
            }
            Command::InitCluster { cluster_id } => {
                let cluster_id = *self.cluster_id.get_or_insert(cluster_id);
                Ok(Applied::ClusterId { cluster_id })
            }
            Command::PrepareMessage {
                gid,
                options,
                check_back,
                destinations,
                payload,
                now_ms,
            } => {
                validate::gid(&gid)?;
                validate::payload(&gid, &payload, PAYLOAD_BYTES_HARD_MAX)?;
                for d in &destinations {
                    validate::payload(&gid, &d.payload, PAYLOAD_BYTES_HARD_MAX)?;
                }
                protocol::msg::validate(&gid, &check_back, &destinations)?;
                if let Some(repeat) = self.repeat(
                    &gid,
                    Protocol::Msg,
                    |tx| protocol::msg::same(tx, &check_back, &destinations),
                    "a message with this gid was already prepared with other destinations or check-back",
                ) {
                    return repeat;
                }
                let tx = NewTx {
                    trace_parent: trace_parent.clone().unwrap_or_default(),
                    gid,
                    protocol: Protocol::Msg,
                    options,
                    payload,
                    branches: protocol::msg::branches(check_back, destinations, now_ms),
                };
                self.create(tx, ctx, now_ms)
            }
            Command::Repair {
                gid,
                action,
                branch_id,
                reason,
                by,
                now_ms,
            } => self.update(&gid, ctx, now_ms, |tx| {
                protocol::repair::on_repair(
                    tx,
                    action,
                    branch_id.as_deref(),
                    &reason,
                    &by,
                    ctx,
                    now_ms,
                )
            }),
        }
    }

    /// A transaction started whole (a saga, a message) that `gid` may
    /// already name: the one there if it is the same (`same`), a refusal
    /// if it is another (`other` says how), `None` if the gid is new.
    fn repeat(
        &self,
        gid: &str,
        protocol: Protocol,
        same: impl FnOnce(&Transaction) -> bool,
        other: &str,
    ) -> Option<ApplyResult> {
        let stored = self.txs.get(gid)?;
        if stored.protocol() != protocol {
            return Some(Err(Rejection::ProtocolMismatch {
                gid: gid.to_string(),
                existing: stored.protocol(),
                requested: protocol,
            }));
        }
        let tx = stored.transaction();
        Some(if !same(&tx) {
            Err(Rejection::Invalid(validate::InvalidInput::Other {
                gid: gid.to_string(),
                problem: other.to_string(),
            }))
        } else {
            Ok(Applied::Begun { tx, created: false })
        })
    }

    /// Records a new transaction, active from this entry on.
    fn create(&mut self, new: NewTx, ctx: ApplyContext, now_ms: i64) -> ApplyResult {
        if self.active.len() >= ACTIVE_HARD_MAX {
            return Err(Rejection::TooManyActive {
                active: self.active.len(),
            });
        }
        let tx = Transaction {
            gid: new.gid,
            protocol: new.protocol,
            state: TxState::Active,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            deadline_ms: now_ms.saturating_add(i64::from(new.options.timeout_ms)),
            finished_at_ms: None,
            options: new.options,
            branches: new.branches,
            payload: new.payload,
            error: String::new(),
            decision: None,
            fence: Fence {
                term: ctx.term,
                index: ctx.index,
            },
            version: ctx.index,
            commit_requested: false,
            repairs: Vec::new(),
            trace_parent: new.trace_parent,
        };
        check_footprint(&tx)?;
        let tx = Arc::new(tx);
        // New: the caller found no transaction with this gid.
        debug_assert!(!self.txs.contains_key(&tx.gid));
        self.account(&tx);
        self.active.insert(tx.gid.clone());
        let stored = Stored::keep(tx.clone(), &mut self.scratch);
        self.txs.insert(tx.gid.clone(), stored);
        Ok(Applied::Begun { tx, created: true })
    }

    /// Applies `change` to a copy of the transaction; stores the copy only if
    /// something changed, so a repeat leaves the table (and `version`) as is.
    fn update(
        &mut self,
        gid: &str,
        ctx: ApplyContext,
        now_ms: i64,
        change: impl FnOnce(&mut Transaction) -> Result<protocol::Changed, Rejection>,
    ) -> ApplyResult {
        // One walk down the table: the slot found is the one replaced.
        let slot = self.txs.get_mut(gid).ok_or_else(|| Rejection::NotFound {
            gid: gid.to_string(),
        })?;
        let current = slot.transaction();
        let mut tx = (*current).clone();
        if !change(&mut tx)? {
            return Ok(Applied::Updated { tx: current });
        }
        if tx.branches.len() != current.branches.len() {
            check_footprint(&tx)?;
        }
        tx.version = ctx.index;
        tx.updated_at_ms = now_ms;
        let tx = Arc::new(tx);
        // In place: no key to clone, and the indexes change only when the
        // transaction finishes (it never becomes unfinished again).
        *slot = Stored::keep(tx.clone(), &mut self.scratch);
        self.unaccount(&current);
        self.account(&tx);
        debug_assert!(
            current.finished_at_ms.is_none() || current.finished_at_ms == tx.finished_at_ms
        );
        if let Some(at) = tx.finished_at_ms {
            if current.finished_at_ms.is_none() {
                self.active.remove(gid);
            }
            // Filed anew when a finished one changes (an operator's repair):
            // its charge replaced.
            self.file_finished(at, &tx);
        }
        Ok(Applied::Updated { tx })
    }

    /// An unfinished transaction is charged its footprint (everything it
    /// may still record); a finished one what it holds, when it is filed
    /// among the finished ([`StateMachine::file_finished`]).
    fn account(&mut self, tx: &Transaction) {
        if tx.finished_at_ms.is_none() {
            self.active_bytes += tx.footprint_bytes();
        }
    }

    fn unaccount(&mut self, tx: &Transaction) {
        if tx.finished_at_ms.is_none() {
            self.active_bytes -= tx.footprint_bytes();
        }
    }

    /// Files `tx`, finished at `at`, for Gc, charged what it holds.
    fn file_finished(&mut self, at: i64, tx: &Transaction) {
        let charged = tx.retained_bytes();
        self.finished_bytes += charged;
        if let Some(before) = self.finished.insert((at, tx.gid.clone()), charged) {
            self.finished_bytes -= before;
        }
    }

    /// Takes `gid`, finished at `at`, out of the Gc index, and its charge
    /// with it.
    fn unfile_finished(&mut self, at: i64, gid: String) {
        if let Some(charged) = self.finished.remove(&(at, gid)) {
            self.finished_bytes -= charged;
        }
    }

    /// Puts a transaction in the table, keeping the derived indexes in step.
    fn insert(&mut self, tx: Arc<Transaction>) {
        if let Some(old) = self.txs.get(&tx.gid).cloned() {
            if let Some(open) = old.open() {
                self.unaccount(open);
            }
            if let Some(at) = old.finished_at_ms() {
                self.unfile_finished(at, tx.gid.clone());
            }
        }
        self.account(&tx);
        match tx.finished_at_ms {
            Some(at) => {
                self.active.remove(&tx.gid);
                self.file_finished(at, &tx);
            }
            None => {
                self.active.insert(tx.gid.clone());
            }
        }
        let gid = tx.gid.clone();
        self.txs.insert(gid, Stored::keep(tx, &mut self.scratch));
    }

    fn remove(&mut self, gid: &str) {
        if let Some(old) = self.txs.remove(gid) {
            if let Some(open) = old.open() {
                self.unaccount(open);
            }
            self.active.remove(gid);
            if let Some(at) = old.finished_at_ms() {
                self.unfile_finished(at, gid.to_string());
            }
        }
    }

    /// The transaction `gid` names; a finished one is decoded (a copy).
    pub fn get(&self, gid: &str) -> Option<Arc<Transaction>> {
        self.txs.get(gid).map(Stored::transaction)
    }

    pub fn members(&self) -> &BTreeMap<u64, String> {
        &self.members
    }

    pub fn cluster_id(&self) -> Option<uuid::Uuid> {
        self.cluster_id
    }

    /// Records a member's address (added by a membership change) or forgets a
    /// removed member. Called when a conf-change entry is applied.
    pub fn set_member(&mut self, id: u64, address: Option<String>) {
        match address {
            Some(address) => {
                self.members.insert(id, address);
            }
            None => {
                self.members.remove(&id);
            }
        }
    }

    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// Footprint of the unfinished transactions, in bytes.
    pub fn active_bytes(&self) -> usize {
        self.active_bytes
    }

    /// Footprint of the finished transactions still kept, in bytes.
    pub fn finished_bytes(&self) -> usize {
        self.finished_bytes
    }

    pub fn len(&self) -> usize {
        self.txs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }

    /// Unfinished transactions that look stuck ([`is_stuck`]).
    pub fn stuck_count(&self) -> usize {
        self.active
            .iter()
            .filter_map(|gid| self.txs.get(gid).and_then(Stored::open))
            .filter(|tx| is_stuck(tx))
            .count()
    }

    /// Unfinished gids, for the driver to resume.
    pub fn active_gids(&self) -> impl Iterator<Item = &String> {
        self.active.iter()
    }

    /// Terminal transactions to collect: every one finished before
    /// `finished_before_ms`, and the oldest beyond `finished_max` or beyond
    /// `finished_bytes_max` of what they hold; at most `limit`.
    pub fn gc_candidates(
        &self,
        finished_before_ms: i64,
        finished_max: usize,
        finished_bytes_max: usize,
        limit: usize,
    ) -> Vec<String> {
        let excess = self.finished.len().saturating_sub(finished_max);
        let mut bytes_left = self.finished_bytes;
        self.finished
            .iter()
            .enumerate()
            .take_while(|(i, ((at, _), charged))| {
                let collect =
                    *i < excess || *at < finished_before_ms || bytes_left > finished_bytes_max;
                if collect {
                    bytes_left -= **charged;
                }
                collect
            })
            .take(limit.min(GC_BATCH_MAX))
            .map(|(_, ((_, gid), _))| gid.clone())
            .collect()
    }

    /// A consistent, immutable copy of the table for readers, in O(1).
    pub fn view(&self, applied_index: u64) -> ReadView {
        ReadView {
            txs: self.txs.clone(),
            applied_index,
        }
    }

    /// What a snapshot needs, copied in O(1) so it can be encoded off the
    /// Raft loop while the loop goes on applying.
    pub fn snapshot_source(&self) -> SnapshotSource {
        SnapshotSource {
            members: self.members.clone(),
            cluster_id: self.cluster_id,
            txs: self.txs.clone(),
            size_hint: SNAPSHOT_HEAD_BYTES + self.active_bytes + self.finished_bytes,
        }
    }

    pub fn decode_snapshot(data: &[u8]) -> Result<StateMachine, crate::codec::DecodeError> {
        use crate::codec::{FORMAT_V1, FORMAT_V2, decode_any, decode_body};
        let snapshot: SnapshotIn = match decode_any(data)? {
            (FORMAT_V1, body) => {
                let v1: SnapshotInV1 = decode_body(body)?;
                SnapshotIn {
                    members: v1.members,
                    cluster_id: None,
                    txs: v1.txs.into_iter().map(Transaction::from).collect(),
                }
            }
            (FORMAT_V2, body) => {
                let v2: SnapshotInV2 = decode_body(body)?;
                SnapshotIn {
                    members: v2.members,
                    cluster_id: v2.cluster_id,
                    txs: v2.txs.into_iter().map(Transaction::from).collect(),
                }
            }
            (_, body) => decode_body(body)?,
        };
        let mut machine = StateMachine::new(snapshot.members);
        machine.cluster_id = snapshot.cluster_id;
        for tx in snapshot.txs {
            machine.insert(Arc::new(tx));
        }
        Ok(machine)
    }
}

/// A transaction over the hard footprint limit is refused, whatever the
/// API let through.
fn check_footprint(tx: &Transaction) -> Result<(), Rejection> {
    let bytes = tx.footprint_bytes();
    if bytes > validate::TX_BYTES_HARD_MAX {
        return Err(Rejection::Invalid(validate::InvalidInput::Other {
            gid: tx.gid.clone(),
            problem: format!(
                "the transaction would take {bytes} bytes; the limit is {}",
                validate::TX_BYTES_HARD_MAX
            ),
        }));
    }
    Ok(())
}

/// What a new transaction starts with.
struct NewTx {
    /// W3C trace context the transaction's work continues (empty: none).
    trace_parent: String,
    gid: String,
    protocol: Protocol,
    options: TxOptions,
    payload: crate::model::types::Payload,
    branches: Vec<Arc<Branch>>,
}

/// Room for a snapshot's members and cluster id beside its transactions.
const SNAPSHOT_HEAD_BYTES: usize = 4096;

/// The state as of one applied index, ready to be encoded for a snapshot.
pub struct SnapshotSource {
    members: BTreeMap<u64, String>,
    cluster_id: Option<uuid::Uuid>,
    txs: TxTable,
    /// What the transactions are counted to hold in memory: more than
    /// their encoding (fixed overheads are counted, varints are short),
    /// so the encoding fits without the buffer growing.
    size_hint: usize,
}

impl SnapshotSource {
    /// Format 3 (format 1 had no cluster id, format 2 no repair records),
    /// laid out as [`SnapshotIn`] reads it: the members, the cluster id,
    /// then the transactions as a sequence. postcard writes a struct as
    /// its fields in order and a sequence as its length then its elements,
    /// so the head goes out as one tuple and each transaction as its own
    /// record — a sealed one's bytes copied as they are, not re-encoded.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size_hint.max(1));
        out.push(crate::codec::FORMAT_V3);
        let head = (&self.members, self.cluster_id, self.txs.len());
        crate::codec::append(&head, &mut out);
        for stored in self.txs.values() {
            stored.encode_into(&mut out);
        }
        out
    }
}

#[derive(Deserialize)]
struct SnapshotIn {
    members: BTreeMap<u64, String>,
    cluster_id: Option<uuid::Uuid>,
    txs: Vec<Transaction>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct SnapshotInV2 {
    members: BTreeMap<u64, String>,
    cluster_id: Option<uuid::Uuid>,
    txs: Vec<TransactionV2>,
}

#[derive(Deserialize)]
struct SnapshotInV1 {
    members: BTreeMap<u64, String>,
    txs: Vec<TransactionV2>,
}

/// A transaction as snapshots of formats 1 and 2 laid it out: no repairs.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct TransactionV2 {
    gid: String,
    protocol: Protocol,
    state: TxState,
    created_at_ms: i64,
    updated_at_ms: i64,
    deadline_ms: i64,
    finished_at_ms: Option<i64>,
    options: TxOptions,
    branches: Vec<Arc<Branch>>,
    payload: crate::model::types::Payload,
    error: String,
    decision: Option<crate::model::types::Decision>,
    fence: Fence,
    version: u64,
    commit_requested: bool,
}

impl From<TransactionV2> for Transaction {
    fn from(t: TransactionV2) -> Transaction {
        Transaction {
            gid: t.gid,
            protocol: t.protocol,
            state: t.state,
            created_at_ms: t.created_at_ms,
            updated_at_ms: t.updated_at_ms,
            deadline_ms: t.deadline_ms,
            finished_at_ms: t.finished_at_ms,
            options: t.options,
            branches: t.branches,
            payload: t.payload,
            error: t.error,
            decision: t.decision,
            fence: t.fence,
            version: t.version,
            commit_requested: t.commit_requested,
            repairs: Vec::new(),
            trace_parent: String::new(),
        }
    }
}

/// What a reader sees: the table as of `applied_index`.
#[derive(Clone, Debug)]
pub struct ReadView {
    txs: TxTable,
    pub applied_index: u64,
}

/// A List filter; `None` matches everything.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub state: Option<TxState>,
    pub protocol: Option<Protocol>,
    /// Changed at or after this time (ms since the epoch).
    pub updated_since_ms: Option<i64>,
    /// Unfinished with an op failed at least [`STUCK_ATTEMPTS`] times.
    pub stuck: bool,
}

/// An op that failed this many times makes its transaction "stuck": shown
/// by `tandem tx list --stuck`, the dashboard and `tandem_transactions_stuck`.
pub const STUCK_ATTEMPTS: u32 = 5;

impl ListFilter {
    /// Looks at a sealed transaction without decoding it: a finished one
    /// is never stuck.
    fn matches(&self, stored: &Stored) -> bool {
        self.state.is_none_or(|s| s == stored.state())
            && self.protocol.is_none_or(|p| p == stored.protocol())
            && self
                .updated_since_ms
                .is_none_or(|t| stored.updated_at_ms() >= t)
            && (!self.stuck || stored.open().is_some_and(|tx| is_stuck(tx)))
    }
}

/// Unfinished, with an open op that failed at least [`STUCK_ATTEMPTS`] times.
pub fn is_stuck(tx: &Transaction) -> bool {
    !tx.state.is_terminal()
        && tx
            .branches
            .iter()
            .flat_map(|b| &b.ops)
            .any(|o| o.state.is_open() && o.attempts >= STUCK_ATTEMPTS)
}

pub struct ListPage {
    pub txs: Vec<Arc<Transaction>>,
    /// The gid to continue after; `None` when the table has been walked to the end.
    pub next_page_token: Option<String>,
}

impl ReadView {
    pub fn get(&self, gid: &str) -> Option<Arc<Transaction>> {
        self.txs.get(gid).map(Stored::transaction)
    }

    /// Transactions in gid order after `page_token`, at most `limit`, scanning
    /// at most [`LIST_SCAN_MAX`] entries.
    pub fn list(&self, filter: &ListFilter, limit: usize, page_token: Option<&str>) -> ListPage {
        let start = match page_token {
            Some(token) => Bound::Excluded(token.to_string()),
            None => Bound::Unbounded,
        };
        let mut txs = Vec::new();
        let mut last_seen = None;
        for (scanned, (gid, tx)) in self.txs.range((start, Bound::Unbounded)).enumerate() {
            if txs.len() == limit || scanned == LIST_SCAN_MAX {
                return ListPage {
                    txs,
                    next_page_token: last_seen,
                };
            }
            last_seen = Some(gid.clone());
            if filter.matches(tx) {
                txs.push(tx.transaction());
            }
        }
        ListPage {
            txs,
            next_page_token: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::command::SagaStepSpec;
    use crate::model::types::{RetryPolicy, TxOptions};

    fn ctx() -> ApplyContext {
        ApplyContext { index: 7, term: 2 }
    }

    fn prepare(gid: &str, check_back: &str, to: &str, payload: &'static [u8]) -> Command {
        Command::PrepareMessage {
            gid: gid.to_string(),
            options: options(),
            check_back: check_back.to_string(),
            destinations: vec![crate::model::command::DestinationSpec {
                branch_id: "d".into(),
                endpoint: to.to_string(),
                payload: bytes::Bytes::from_static(payload),
            }],
            payload: bytes::Bytes::new(),
            now_ms: 1,
        }
    }

    /// Idempotency (DESIGN §7) for messages: the same Prepare again is
    /// answered with the message there; one with another destination,
    /// payload or check-back is refused and changes nothing.
    #[test]
    fn idempotency_a_repeated_prepare_must_be_the_same_message() {
        let mut m = StateMachine::default();
        let first = prepare("msg-1", "http://p/check", "nats://orders", b"a");
        assert!(matches!(
            m.apply(first.clone(), ctx()),
            Ok(Applied::Begun { created: true, .. })
        ));
        let before = m.get("msg-1").unwrap().clone();
        assert!(matches!(
            m.apply(first, ctx()),
            Ok(Applied::Begun { created: false, .. })
        ));
        for other in [
            prepare("msg-1", "http://p/check", "nats://payments", b"a"),
            prepare("msg-1", "http://p/check", "nats://orders", b"b"),
            prepare("msg-1", "http://q/check", "nats://orders", b"a"),
        ] {
            let e = m.apply(other, ctx()).unwrap_err();
            assert!(e.to_string().contains("msg-1"), "{e}");
            assert!(
                e.to_string().contains("other destinations or check-back"),
                "{e}"
            );
        }
        let e = m
            .apply(begin("msg-1", Protocol::Saga, 1), ctx())
            .unwrap_err();
        assert!(matches!(e, Rejection::ProtocolMismatch { .. }), "{e}");
        assert_eq!(m.get("msg-1").unwrap(), before, "nothing changed");
    }

    /// Durability of a transaction's trace context: a traced Begin read back
    /// from the log (as a restarted node replays it) and through a snapshot
    /// gives the same transaction, context included.
    #[test]
    fn durability_a_traced_begin_keeps_its_context_through_the_log_and_snapshots() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let traced = Command::Traced {
            trace_parent: parent.into(),
            command: Box::new(begin("t-1", Protocol::Tcc, 5)),
        };
        let entry = crate::codec::encode(&traced);
        let replayed: Command = crate::codec::decode(&entry).unwrap();
        let mut m = StateMachine::default();
        m.apply(replayed, ctx()).unwrap();
        assert_eq!(m.get("t-1").unwrap().trace_parent, parent);
        let restored = StateMachine::decode_snapshot(&m.snapshot_source().encode()).unwrap();
        assert_eq!(restored.get("t-1").unwrap(), m.get("t-1").unwrap());
        // An untraced Begin has none; a traced command inside another is refused.
        m.apply(begin("t-2", Protocol::Tcc, 5), ctx()).unwrap();
        assert_eq!(m.get("t-2").unwrap().trace_parent, "");
        let nested = Command::Traced {
            trace_parent: parent.into(),
            command: Box::new(Command::Traced {
                trace_parent: parent.into(),
                command: Box::new(begin("t-3", Protocol::Tcc, 5)),
            }),
        };
        assert!(m.apply(nested, ctx()).is_err());
        assert!(m.get("t-3").is_none());
    }

    /// Durability across upgrades: a snapshot written before repair records
    /// existed (format 2) still restores, every transaction intact.
    #[test]
    fn durability_a_format_2_snapshot_restores() {
        let mut m = StateMachine::default();
        m.apply(begin("old", Protocol::Tcc, 5), ctx()).unwrap();
        let tx = m.get("old").unwrap().as_ref().clone();
        let old = SnapshotInV2 {
            members: BTreeMap::from([(1, "127.0.0.1:7070".to_string())]),
            cluster_id: Some(uuid::Uuid::from_u128(7)),
            txs: vec![TransactionV2 {
                gid: tx.gid.clone(),
                protocol: tx.protocol,
                state: tx.state,
                created_at_ms: tx.created_at_ms,
                updated_at_ms: tx.updated_at_ms,
                deadline_ms: tx.deadline_ms,
                finished_at_ms: tx.finished_at_ms,
                options: tx.options,
                branches: tx.branches.clone(),
                payload: tx.payload.clone(),
                error: tx.error.clone(),
                decision: tx.decision.clone(),
                fence: tx.fence,
                version: tx.version,
                commit_requested: tx.commit_requested,
            }],
        };
        let bytes = crate::codec::encode_as(crate::codec::FORMAT_V2, &old);
        let restored = StateMachine::decode_snapshot(&bytes).unwrap();
        assert_eq!(restored.get("old").unwrap().as_ref(), &tx);
        assert_eq!(restored.cluster_id(), Some(uuid::Uuid::from_u128(7)));
        // And today's format round-trips with repairs.
        let again = StateMachine::decode_snapshot(&restored.snapshot_source().encode()).unwrap();
        assert_eq!(again.get("old").unwrap().as_ref(), &tx);
    }

    fn options() -> TxOptions {
        TxOptions {
            timeout_ms: 1_000,
            retry: RetryPolicy {
                initial_interval_ms: 100,
                max_interval_ms: 1_000,
                max_attempts: 5,
            },
            branch_timeout_ms: 500,
            concurrency: 0,
        }
    }

    fn begin(gid: &str, protocol: Protocol, now_ms: i64) -> Command {
        Command::Begin {
            gid: gid.to_string(),
            protocol,
            options: options(),
            payload: bytes::Bytes::from_static(b"data"),
            now_ms,
        }
    }

    /// Marks a transaction terminal, as later protocol commands will.
    fn finish(machine: &mut StateMachine, gid: &str, at: i64) {
        let mut tx = (*machine.get(gid).unwrap()).clone();
        tx.state = TxState::Committed;
        tx.finished_at_ms = Some(at);
        machine.insert(Arc::new(tx));
    }

    #[test]
    fn durability_begin_records_the_transaction_with_leader_time() {
        let mut m = StateMachine::default();
        let Ok(Applied::Begun { tx, created }) = m.apply(begin("g1", Protocol::Saga, 5_000), ctx())
        else {
            panic!("begin refused")
        };
        assert!(created);
        assert_eq!(tx.state, TxState::Active);
        assert_eq!(tx.created_at_ms, 5_000);
        assert_eq!(tx.deadline_ms, 6_000);
        assert_eq!(tx.payload, &b"data"[..]);
        assert_eq!(m.active_count(), 1);
    }

    #[test]
    fn idempotency_repeated_begin_returns_the_same_transaction() {
        let mut m = StateMachine::default();
        let first = m.apply(begin("g1", Protocol::Tcc, 1), ctx()).unwrap();
        let again = m.apply(begin("g1", Protocol::Tcc, 99), ctx()).unwrap();
        let (Applied::Begun { tx: a, .. }, Applied::Begun { tx: b, created }) = (first, again)
        else {
            panic!("unexpected results")
        };
        assert!(!created);
        assert_eq!(a, b, "the repeat must not change the recorded transaction");
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn idempotency_begin_with_another_protocol_is_refused_and_changes_nothing() {
        let mut m = StateMachine::default();
        m.apply(begin("g1", Protocol::Tcc, 1), ctx()).unwrap();
        let before = m.get("g1");
        let err = m.apply(begin("g1", Protocol::Saga, 2), ctx()).unwrap_err();
        assert!(matches!(err, Rejection::ProtocolMismatch { .. }));
        assert_eq!(
            err.to_string(),
            "transaction g1 already exists with protocol tcc, not saga"
        );
        assert_eq!(m.get("g1"), before);
    }

    #[test]
    fn bad_input_begin_with_invalid_gid_or_payload_stores_nothing() {
        let mut m = StateMachine::default();
        assert!(m.apply(begin("", Protocol::Saga, 1), ctx()).is_err());
        assert!(
            m.apply(begin(&"x".repeat(129), Protocol::Saga, 1), ctx())
                .is_err()
        );
        let big = Command::Begin {
            gid: "g".into(),
            protocol: Protocol::Saga,
            options: options(),
            payload: vec![0; PAYLOAD_BYTES_HARD_MAX + 1].into(),
            now_ms: 1,
        };
        assert!(m.apply(big, ctx()).is_err());
        assert!(m.is_empty());
        assert_eq!(m.active_count(), 0);
    }

    #[test]
    fn gc_removes_only_terminal_transactions() {
        let mut m = StateMachine::default();
        for gid in ["a", "b", "c"] {
            m.apply(begin(gid, Protocol::Saga, 1), ctx()).unwrap();
        }
        finish(&mut m, "a", 10);
        finish(&mut m, "b", 20);
        let gc = Command::Gc {
            gids: vec!["a".into(), "c".into(), "missing".into()],
        };
        assert_eq!(m.apply(gc, ctx()), Ok(Applied::Collected { removed: 1 }));
        assert!(m.get("a").is_none());
        assert!(m.get("b").is_some(), "b was not named");
        assert!(
            m.get("c").is_some(),
            "c is active and must survive a Gc naming it"
        );
        assert_eq!(m.active_count(), 1);
    }

    #[test]
    fn gc_candidates_follow_retention_and_the_count_limit() {
        let mut m = StateMachine::default();
        for (i, gid) in ["a", "b", "c", "d"].iter().enumerate() {
            m.apply(begin(gid, Protocol::Saga, 1), ctx()).unwrap();
            finish(&mut m, gid, 10 * (i as i64 + 1));
        }
        // Retention: finished strictly before 25 → a (10), b (20).
        assert_eq!(m.gc_candidates(25, 100, usize::MAX, 100), vec!["a", "b"]);
        // Count limit: keep at most 1 → the three oldest go, whatever their age.
        assert_eq!(m.gc_candidates(0, 1, usize::MAX, 100), vec!["a", "b", "c"]);
        assert_eq!(m.gc_candidates(0, 1, usize::MAX, 2), vec!["a", "b"]);
        assert!(m.gc_candidates(0, 100, usize::MAX, 100).is_empty());
    }

    #[test]
    fn snapshot_round_trip_restores_table_members_and_indexes() {
        let mut m = StateMachine::new(BTreeMap::from([(1, "127.0.0.1:1".to_string())]));
        m.apply(begin("a", Protocol::Xa, 1), ctx()).unwrap();
        m.apply(begin("b", Protocol::Tcc, 2), ctx()).unwrap();
        finish(&mut m, "a", 7);
        let restored = StateMachine::decode_snapshot(&m.snapshot_source().encode()).unwrap();
        assert_eq!(restored.members(), m.members());
        assert_eq!(restored.get("a"), m.get("a"));
        assert_eq!(restored.get("b"), m.get("b"));
        assert_eq!(restored.active_count(), 1);
        assert_eq!(restored.gc_candidates(100, 100, usize::MAX, 100), vec!["a"]);
    }

    #[test]
    fn footprints_are_accounted_while_active_then_finished_and_gc_keeps_the_byte_budget() {
        let mut m = StateMachine::default();
        for gid in ["a", "b", "c"] {
            m.apply(begin(gid, Protocol::Saga, 1), ctx()).unwrap();
        }
        let one = m.get("a").unwrap().footprint_bytes();
        assert_eq!(one, validate::tx_footprint(1, 4, 0));
        assert_eq!((m.active_bytes(), m.finished_bytes()), (3 * one, 0));
        finish(&mut m, "a", 10);
        finish(&mut m, "b", 20);
        // Finished, each is charged what it holds, not what it might have.
        let kept = m.get("a").unwrap().retained_bytes();
        assert_eq!(kept, m.get("b").unwrap().retained_bytes());
        assert!(kept < one, "finished {kept} against a footprint of {one}");
        assert_eq!((m.active_bytes(), m.finished_bytes()), (one, 2 * kept));
        // Keep at most one transaction's worth: the oldest goes.
        assert_eq!(m.gc_candidates(0, 100, kept, 100), vec!["a"]);
        assert_eq!(m.gc_candidates(0, 100, 2 * kept, 100), Vec::<String>::new());
        m.apply(
            Command::Gc {
                gids: vec!["a".into()],
            },
            ctx(),
        )
        .unwrap();
        assert_eq!((m.active_bytes(), m.finished_bytes()), (one, kept));
        let restored = StateMachine::decode_snapshot(&m.snapshot_source().encode()).unwrap();
        assert_eq!(
            (restored.active_bytes(), restored.finished_bytes()),
            (one, kept),
            "derived from the table on restore"
        );
    }

    /// A finished transaction that changes (an operator's repair adds a
    /// record) is charged anew: the count and Gc's byte budget follow what
    /// it holds now, not what it held when it finished.
    #[test]
    fn a_finished_transaction_that_changes_is_charged_anew() {
        let mut m = StateMachine::default();
        for gid in ["a", "b"] {
            m.apply(begin(gid, Protocol::Saga, 1), ctx()).unwrap();
        }
        finish(&mut m, "a", 10);
        finish(&mut m, "b", 20);
        let kept = m.get("b").unwrap().retained_bytes();
        m.update("a", ctx(), 30, |tx| {
            tx.error = "x".repeat(500);
            Ok(true)
        })
        .unwrap();
        let grown = m.get("a").unwrap().retained_bytes();
        assert_eq!(grown, kept + 500);
        assert_eq!(m.finished_bytes(), grown + kept);
        // Within a budget of both as they are now, nothing goes; one byte
        // less, the oldest does.
        assert!(m.gc_candidates(0, 100, grown + kept, 100).is_empty());
        assert_eq!(m.gc_candidates(0, 100, grown + kept - 1, 100), vec!["a"]);
        m.apply(
            Command::Gc {
                gids: vec!["a".into()],
            },
            ctx(),
        )
        .unwrap();
        assert_eq!(m.finished_bytes(), kept);
    }

    /// The byte limits (`--active-bytes-max`, `--finished-bytes-max`) bound
    /// memory only if what is counted covers what is held; a snapshot is
    /// the table written out, so its encoding must fit in the count. The
    /// snapshot buffer is sized by it and must never have to grow.
    #[test]
    fn limits_a_snapshot_fits_in_the_bytes_the_table_is_counted_to_hold() {
        let mut m = StateMachine::new(BTreeMap::from([(1, "127.0.0.1:1".to_string())]));
        let step = |i: usize, len: usize| SagaStepSpec {
            branch_id: format!("step-{i}"),
            action: format!("http://127.0.0.1:8080/svc/{i}/action"),
            compensate: format!("http://127.0.0.1:8080/svc/{i}/compensate"),
            payload: vec![b'x'; len].into(),
            after: if i > 0 {
                vec![format!("step-{}", i - 1)]
            } else {
                Vec::new()
            },
            retry: None,
        };
        for n in 0..300usize {
            let gid = format!("saga-{n:06}-with-a-longer-gid-than-most");
            let command = Command::SubmitSaga {
                gid: gid.clone(),
                options: options(),
                steps: (0..1 + n % 5).map(|i| step(i, (n * 37) % 3000)).collect(),
                payload: vec![b'p'; n % 700].into(),
                now_ms: n as i64,
            };
            m.apply(command, ctx()).unwrap();
            if n % 3 == 0 {
                finish(&mut m, &gid, n as i64 + 1);
            }
        }
        let source = m.snapshot_source();
        let counted = source.size_hint;
        let encoded = source.encode();
        assert!(
            encoded.len() <= counted,
            "the snapshot takes {} bytes, the table is counted to hold {counted}",
            encoded.len()
        );
        assert_eq!(
            encoded.capacity(),
            counted,
            "the buffer grew while encoding"
        );
        let restored = StateMachine::decode_snapshot(&encoded).unwrap();
        assert_eq!(restored.len(), 300);
    }

    #[test]
    fn a_transaction_over_the_hard_footprint_is_refused() {
        let mut m = StateMachine::default();
        let step = |i: usize| SagaStepSpec {
            branch_id: format!("s{i}"),
            action: "http://svc/a".into(),
            compensate: "http://svc/c".into(),
            payload: vec![0u8; 1 << 20].into(),
            after: Vec::new(),
            retry: None,
        };
        let huge = Command::SubmitSaga {
            gid: "huge".into(),
            options: options(),
            steps: (0..20).map(step).collect(),
            payload: Default::default(),
            now_ms: 1,
        };
        let e = m.apply(huge, ctx()).unwrap_err().to_string();
        assert!(e.contains("the limit is 16777216"), "{e}");
        assert!(m.is_empty() && m.active_bytes() == 0);
    }

    #[test]
    fn the_first_cluster_id_applied_wins_and_survives_a_snapshot() {
        let mut m = StateMachine::default();
        let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        let init = |id| Command::InitCluster { cluster_id: id };
        assert_eq!(
            m.apply(init(a), ctx()),
            Ok(Applied::ClusterId { cluster_id: a })
        );
        assert_eq!(
            m.apply(init(b), ctx()),
            Ok(Applied::ClusterId { cluster_id: a }),
            "a second leader's mint must not rename the cluster"
        );
        let restored = StateMachine::decode_snapshot(&m.snapshot_source().encode()).unwrap();
        assert_eq!(restored.cluster_id(), Some(a));
    }

    #[test]
    fn a_format_1_snapshot_still_decodes_without_a_cluster_id() {
        #[derive(serde::Serialize)]
        struct V1<'a> {
            members: &'a BTreeMap<u64, String>,
            txs: Vec<Transaction>,
        }
        let mut m = StateMachine::new(BTreeMap::from([(1, "127.0.0.1:1".to_string())]));
        m.apply(begin("a", Protocol::Xa, 1), ctx()).unwrap();
        let old = crate::codec::encode(&V1 {
            members: m.members(),
            txs: vec![(*m.get("a").unwrap()).clone()],
        });
        let restored = StateMachine::decode_snapshot(&old).unwrap();
        assert_eq!(restored.cluster_id(), None);
        assert_eq!(restored.get("a"), m.get("a"));
        assert_eq!(restored.members(), m.members());
    }

    #[test]
    fn list_pages_in_gid_order_with_filters() {
        let mut m = StateMachine::default();
        for gid in ["a", "b", "c", "d", "e"] {
            let protocol = if gid < "c" {
                Protocol::Saga
            } else {
                Protocol::Tcc
            };
            m.apply(begin(gid, protocol, 1), ctx()).unwrap();
        }
        finish(&mut m, "d", 5);
        let view = m.view(9);
        let page = view.list(&ListFilter::default(), 2, None);
        let gids: Vec<_> = page.txs.iter().map(|t| t.gid.as_str()).collect();
        assert_eq!(gids, ["a", "b"]);
        let next = view.list(&ListFilter::default(), 2, page.next_page_token.as_deref());
        let gids: Vec<_> = next.txs.iter().map(|t| t.gid.as_str()).collect();
        assert_eq!(gids, ["c", "d"]);
        let filter = ListFilter {
            state: Some(TxState::Active),
            protocol: Some(Protocol::Tcc),
            ..ListFilter::default()
        };
        let page = view.list(&filter, 10, None);
        let gids: Vec<_> = page.txs.iter().map(|t| t.gid.as_str()).collect();
        assert_eq!(gids, ["c", "e"]);
        assert_eq!(page.next_page_token, None);
    }

    /// A two-step saga, submitted through `apply` and finished by its
    /// steps' results, as the driver proposes them.
    fn saga_through_apply(m: &mut StateMachine, gid: &str, now_ms: i64) -> Arc<Transaction> {
        use crate::model::command::OpOutcome;
        let steps = ["a", "b"]
            .iter()
            .map(|id| SagaStepSpec {
                branch_id: (*id).to_string(),
                action: format!("http://127.0.0.1:1/{id}/action"),
                compensate: format!("http://127.0.0.1:1/{id}/compensate"),
                payload: bytes::Bytes::from_static(b"step"),
                after: Vec::new(),
                retry: None,
            })
            .collect();
        let submit = Command::SubmitSaga {
            gid: gid.to_string(),
            options: options(),
            steps,
            payload: bytes::Bytes::from_static(b"saga"),
            now_ms,
        };
        m.apply(submit, ctx()).unwrap();
        let results = Command::OpResults {
            gid: gid.to_string(),
            results: ["a", "b"]
                .iter()
                .map(|id| ((*id).to_string(), Op::Action, OpOutcome::Succeeded))
                .collect(),
            exact: true,
            now_ms: now_ms + 3,
        };
        let Ok(Applied::Updated { tx }) = m.apply(results, ctx()) else {
            panic!("results refused")
        };
        tx
    }

    /// A finished transaction is kept sealed (its encoding); what reads it
    /// back — a status call, a List page, a repeated submission — must see
    /// exactly what the last change produced.
    #[test]
    fn durability_a_sealed_transaction_reads_back_as_it_finished() {
        let mut m = StateMachine::default();
        let finished = saga_through_apply(&mut m, "s1", 1_000);
        assert_eq!(finished.state, TxState::Committed);
        assert!(
            matches!(m.txs.get("s1"), Some(Stored::Sealed(_))),
            "a finished transaction is sealed"
        );
        assert_eq!(m.get("s1"), Some(finished.clone()));
        assert_eq!(m.view(1).get("s1"), Some(finished.clone()));
        let filter = ListFilter {
            state: Some(TxState::Committed),
            protocol: Some(Protocol::Saga),
            updated_since_ms: Some(finished.updated_at_ms),
            stuck: false,
        };
        assert_eq!(
            m.view(1).list(&filter, 10, None).txs,
            vec![finished.clone()]
        );
        let stuck = ListFilter {
            stuck: true,
            ..ListFilter::default()
        };
        assert!(m.view(1).list(&stuck, 10, None).txs.is_empty());
        // A repeated submission answers with the sealed transaction.
        let Ok(Applied::Begun { tx, created }) = m.apply(
            Command::SubmitSaga {
                gid: "s1".into(),
                options: options(),
                steps: finished
                    .branches
                    .iter()
                    .map(|b| SagaStepSpec {
                        branch_id: b.branch_id.clone(),
                        action: b.op(Op::Action).unwrap().endpoint.clone(),
                        compensate: b.op(Op::Compensate).unwrap().endpoint.clone(),
                        payload: b.payload.clone(),
                        after: Vec::new(),
                        retry: None,
                    })
                    .collect(),
                payload: bytes::Bytes::from_static(b"saga"),
                now_ms: 9_000,
            },
            ctx(),
        ) else {
            panic!("the repeat was refused")
        };
        assert!(!created);
        assert_eq!(tx, finished);
    }

    /// Sealing changes how a finished transaction is held, not the
    /// snapshot: the records written are byte for byte what format 3
    /// wrote before (serde over every transaction), so nodes of either
    /// build read each other's snapshots.
    #[test]
    fn durability_a_snapshot_with_sealed_transactions_keeps_format_3() {
        #[derive(serde::Serialize)]
        struct Format3<'a> {
            members: &'a BTreeMap<u64, String>,
            cluster_id: Option<uuid::Uuid>,
            txs: Vec<Arc<Transaction>>,
        }
        let mut m = StateMachine::new(BTreeMap::from([(1, "127.0.0.1:1".to_string())]));
        m.apply(
            Command::InitCluster {
                cluster_id: uuid::Uuid::from_u128(7),
            },
            ctx(),
        )
        .unwrap();
        for n in 0..40 {
            let gid = format!("g-{n:03}");
            match n % 3 {
                0 => {
                    saga_through_apply(&mut m, &gid, n);
                }
                1 => {
                    m.apply(begin(&gid, Protocol::Tcc, n), ctx()).unwrap();
                }
                _ => {
                    m.apply(begin(&gid, Protocol::Xa, n), ctx()).unwrap();
                    finish(&mut m, &gid, n + 1);
                }
            }
        }
        let sealed = m
            .txs
            .values()
            .filter(|s| matches!(s, Stored::Sealed(_)))
            .count();
        assert_eq!(sealed, 27, "the finished ones are sealed, the others open");
        let reference = Format3 {
            members: m.members(),
            cluster_id: m.cluster_id(),
            txs: m.txs.keys().map(|gid| m.get(gid).unwrap()).collect(),
        };
        let encoded = m.snapshot_source().encode();
        assert_eq!(
            encoded,
            crate::codec::encode_as(crate::codec::FORMAT_V3, &reference)
        );
        let restored = StateMachine::decode_snapshot(&encoded).unwrap();
        for gid in m.txs.keys() {
            assert_eq!(restored.get(gid), m.get(gid), "{gid}");
        }
        assert_eq!(restored.active_count(), m.active_count());
        assert_eq!(restored.finished_bytes(), m.finished_bytes());
        assert_eq!(restored.snapshot_source().encode(), encoded);
    }
}
