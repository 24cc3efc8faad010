//! Explicit-state model check of 3PC (invariants 1 and 3): the coordinator
//! is the real transition table (`protocol::three_pc` through
//! `protocol::{next, on_result, on_timeout, on_abort}` on a real
//! `Transaction`), replicated — its state survives a leader's failover,
//! which only bumps the fencing term; participants are small state
//! machines that keep a tombstone and the highest fencing token, as the
//! SDK's server does. Three participants; faults: any call or answer lost,
//! the leader failing over (a deposed leader's call may still land), one
//! participant cut off from everyone and healed, the application's abort,
//! the deadline passing at any moment.
//!
//! Every reachable state is explored (breadth first, deduplicated).
//! Checked in every state: atomicity (never one branch committed and
//! another aborted), and that no branch commits before it pre-committed.
//! Checked of the whole graph: from every reachable state, once faults stop
//! (messages may still be lost; cuts heal), a state where the transaction
//! ended and no participant is in doubt is still reachable — no blocking.
//!
//! Two participant rules are checked. Tandem's: a participant in doubt asks
//! the cluster (Get with resolve) and applies its decision; undecided past
//! the deadline, the question decides abort. Classic 3PC's: a participant
//! that times out pre-committed commits, one that times out after voting
//! yes aborts. The checker must find the classic rule's partition
//! counterexample — the reason Tandem's participants ask instead.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use tandem_coordinator::codec;
use tandem_coordinator::model::command::BranchSpec;
use tandem_coordinator::model::types::{Fence, Op, Outcome, Protocol, RetryPolicy, TxOptions};
use tandem_coordinator::model::{ApplyContext, OpOutcome, Transaction, TxState};
use tandem_coordinator::protocol;

const N: usize = 3;
const BRANCHES: [&str; N] = ["p0", "p1", "p2"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Part {
    Init,
    VotedYes,
    VotedNo,
    PreCommitted,
    Committed,
    Aborted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// A participant in doubt asks the replicated coordinator.
    AskTheCluster,
    /// Classic 3PC: a participant decides on its own when it times out.
    CommitOnTimeout,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    tx: Transaction,
    parts: [Part; N],
    /// Highest fencing token each participant accepted.
    fences: [Fence; N],
    /// The latest call on its way to each participant (a deposed leader's
    /// may still land).
    inbound: [Option<(Op, Fence)>; N],
    cut: [bool; N],
    /// The leader's term; a failover starts the next one.
    term: u64,
    /// The next log index (entries that changed the transaction).
    index: u64,
    failovers_left: u8,
    cuts_left: u8,
    app_abort_left: u8,
}

/// A state's fingerprint (128 bits, as explicit-state checkers such as TLC
/// keep): what the explored set holds instead of whole states.
fn fingerprint(s: &State) -> u128 {
    // The transaction is hashed as its log encoding, made once for both
    // halves (encoding is most of a fingerprint's cost).
    let tx = codec::encode(&s.tx);
    let mut a = std::collections::hash_map::DefaultHasher::new();
    let mut b = std::collections::hash_map::DefaultHasher::new();
    0xa5u8.hash(&mut b);
    for h in [&mut a, &mut b] {
        tx.hash(h);
        s.hash(h);
    }
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
}

/// Everything but the transaction, which [`fingerprint`] hashes itself.
impl Hash for State {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.parts.hash(h);
        self.fences.hash(h);
        self.inbound.hash(h);
        self.cut.hash(h);
        (self.term, self.index).hash(h);
        (self.failovers_left, self.cuts_left, self.app_abort_left).hash(h);
    }
}

fn initial() -> State {
    let mut tx = Transaction {
        gid: "g".into(),
        protocol: Protocol::ThreePc,
        state: TxState::Active,
        created_at_ms: 0,
        updated_at_ms: 0,
        deadline_ms: 1_000,
        finished_at_ms: None,
        options: TxOptions {
            timeout_ms: 1_000,
            retry: RetryPolicy {
                initial_interval_ms: 10,
                max_interval_ms: 100,
                max_attempts: 1_000,
            },
            branch_timeout_ms: 100,
            concurrency: 0,
        },
        branches: Vec::new(),
        payload: Default::default(),
        error: String::new(),
        decision: None,
        fence: Fence::default(),
        version: 1,
        commit_requested: false,
        repairs: Vec::new(),
        trace_parent: String::new(),
    };
    let (ops, _) = protocol::branch_ops(Protocol::ThreePc);
    for b in BRANCHES {
        let spec = BranchSpec {
            branch_id: b.into(),
            ops: ops
                .iter()
                .map(|op| (*op, format!("http://{b}/{op}")))
                .collect(),
            payload: Default::default(),
        };
        protocol::on_register(&mut tx, spec, 0).expect("register");
    }
    let ctx = ApplyContext { index: 1, term: 1 };
    protocol::on_commit(&mut tx, ctx, 0).expect("commit");
    State {
        tx,
        parts: [Part::Init; N],
        fences: [Fence::default(); N],
        inbound: [None; N],
        cut: [false; N],
        term: 1,
        index: 2,
        failovers_left: 1,
        cuts_left: 1,
        app_abort_left: 1,
    }
}

impl State {
    /// Applies a command to the replicated transaction at the next entry.
    fn apply(
        &mut self,
        f: impl FnOnce(
            &mut Transaction,
            ApplyContext,
        ) -> Result<bool, tandem_coordinator::model::Rejection>,
    ) {
        let ctx = ApplyContext {
            index: self.index,
            term: self.term,
        };
        let before = self.tx.state;
        // An entry that only records an answer leaves no trace the protocol
        // reads back (fences are taken where the state changes), so only
        // those take a new index: runs that differ only in how many such
        // entries they wrote are one state.
        if let Ok(true) = f(&mut self.tx, ctx)
            && self.tx.state != before
        {
            self.index += 1;
        }
    }

    /// The transaction ended and no participant is left in doubt.
    fn done(&self) -> bool {
        self.tx.state.is_terminal()
            && self
                .parts
                .iter()
                .all(|p| !matches!(p, Part::VotedYes | Part::PreCommitted))
    }

    fn violation(&self) -> Option<String> {
        let committed = self.parts.iter().position(|p| *p == Part::Committed);
        let aborted = self.parts.iter().position(|p| *p == Part::Aborted);
        if let (Some(c), Some(a)) = (committed, aborted) {
            return Some(format!(
                "atomicity: p{c} committed and p{a} aborted ({:?}, coordinator {:?})",
                self.parts, self.tx.state
            ));
        }
        None
    }
}

/// A participant handles a call, as the SDK's server and a resource do:
/// stale tokens and forward ops after an abort are refused. `vote`: its
/// answer to a first can-commit. Ok(yes or no), or Err: something that must
/// never happen.
fn handle(s: &mut State, p: usize, op: Op, fence: Fence, vote: bool) -> Result<bool, String> {
    if fence < s.fences[p] {
        return Ok(false);
    }
    s.fences[p] = fence;
    let part = s.parts[p];
    let (next, yes) = match (op, part) {
        (Op::CanCommit | Op::PreCommit, Part::Aborted) => (part, false),
        (Op::CanCommit, Part::Init) if vote => (Part::VotedYes, true),
        (Op::CanCommit, Part::Init) => (Part::VotedNo, false),
        (Op::CanCommit, Part::VotedNo) => (part, false),
        (Op::CanCommit, _) => (part, true),
        (Op::PreCommit, Part::VotedNo) => (part, false),
        (Op::PreCommit, Part::Committed) => (part, true),
        (Op::PreCommit, _) => (Part::PreCommitted, true),
        (Op::DoCommit, Part::PreCommitted | Part::Committed) => (Part::Committed, true),
        (Op::DoCommit, other) => return Err(format!("p{p}: do_commit while {other:?}")),
        (Op::Abort, Part::Committed) => return Err(format!("p{p}: abort after commit")),
        (Op::Abort, _) => (Part::Aborted, true),
        (other, _) => return Err(format!("p{p}: unexpected op {other}")),
    };
    s.parts[p] = next;
    Ok(yes)
}

/// Every successor of `s`, and whether the step is a fault.
fn successors(s: &State, rule: Rule) -> Vec<(State, bool, Result<(), String>)> {
    let mut out = Vec::new();
    let ok = Ok(());
    // The leader's driver sends what the protocol's `next` asks for.
    for call in protocol::next(&s.tx) {
        let p = BRANCHES
            .iter()
            .position(|b| *b == call.branch_id)
            .expect("a branch");
        if s.cut[p] || s.inbound[p] == Some((call.op, call.fence)) {
            continue;
        }
        let mut n = s.clone();
        n.inbound[p] = Some((call.op, call.fence));
        out.push((n, false, ok.clone()));
    }
    for (p, branch) in BRANCHES.iter().enumerate() {
        if let Some((op, fence)) = s.inbound[p]
            && !s.cut[p]
        {
            for vote in [true, false] {
                // Only a first can-commit is a vote that can go either way.
                let first_vote = op == Op::CanCommit && s.parts[p] == Part::Init;
                if !(vote || first_vote) {
                    continue;
                }
                // The answer arrives and is recorded, or is lost (a fault).
                for answer_lost in [false, true] {
                    let mut n = s.clone();
                    n.inbound[p] = None;
                    match handle(&mut n, p, op, fence, vote) {
                        Err(v) => out.push((n, false, Err(v))),
                        Ok(yes) => {
                            if !answer_lost {
                                let outcome = if yes {
                                    OpOutcome::Succeeded
                                } else {
                                    OpOutcome::Failed("no".into())
                                };
                                n.apply(|tx, ctx| {
                                    protocol::on_result(tx, branch, op, &outcome, ctx, 1)
                                });
                            }
                            out.push((n, answer_lost, ok.clone()));
                        }
                    }
                }
            }
        }
        // Faults: a call lost.
        if s.inbound[p].is_some() {
            let mut n = s.clone();
            n.inbound[p] = None;
            out.push((n, true, ok.clone()));
        }
        // A participant cut off from everyone, and healed.
        if !s.cut[p] && s.cuts_left > 0 {
            let mut n = s.clone();
            n.cut[p] = true;
            n.cuts_left -= 1;
            out.push((n, true, ok.clone()));
        }
        if s.cut[p] {
            let mut n = s.clone();
            n.cut[p] = false;
            out.push((n, false, ok.clone()));
        }
        // A participant in doubt.
        let in_doubt = matches!(s.parts[p], Part::VotedYes | Part::PreCommitted);
        match rule {
            Rule::AskTheCluster if in_doubt && !s.cut[p] => {
                match s.tx.decision.as_ref().map(|d| {
                    (
                        d.outcome,
                        Fence {
                            term: d.term,
                            index: d.index,
                        },
                    )
                }) {
                    Some((outcome, fence)) => {
                        let mut n = s.clone();
                        let op = match outcome {
                            Outcome::Commit => Op::DoCommit,
                            Outcome::Abort => Op::Abort,
                        };
                        let r = handle(&mut n, p, op, fence, true).map(|_| ());
                        out.push((n, false, r));
                    }
                    None => {
                        // Undecided: past the deadline, the question decides.
                        let mut n = s.clone();
                        let deadline = n.tx.deadline_ms;
                        n.apply(|tx, ctx| protocol::on_timeout(tx, ctx, deadline));
                        out.push((n, false, ok.clone()));
                    }
                }
            }
            Rule::CommitOnTimeout if in_doubt => {
                let mut n = s.clone();
                n.parts[p] = match s.parts[p] {
                    Part::PreCommitted => Part::Committed,
                    _ => Part::Aborted,
                };
                out.push((n, true, ok.clone()));
            }
            _ => {}
        }
    }
    // The deadline passes (any moment: clocks are not trusted).
    if !s.tx.is_decided() {
        let mut n = s.clone();
        let deadline = n.tx.deadline_ms;
        n.apply(|tx, ctx| protocol::on_timeout(tx, ctx, deadline));
        out.push((n, false, ok.clone()));
    }
    if s.app_abort_left > 0 && !s.tx.is_decided() {
        let mut n = s.clone();
        n.app_abort_left -= 1;
        n.apply(|tx, ctx| protocol::on_abort(tx, "the application", ctx, 1));
        out.push((n, true, ok.clone()));
    }
    // The leader fails over: the transaction is replicated; the next
    // leader's calls carry a higher term. Calls in flight may still land.
    if s.failovers_left > 0 {
        let mut n = s.clone();
        n.failovers_left -= 1;
        n.term += 1;
        out.push((n, true, ok));
    }
    out
}

struct Explored {
    states: usize,
    edges: usize,
    violation: Option<String>,
    blocked: usize,
}

fn explore(rule: Rule, states_max: usize) -> Explored {
    let start = initial();
    let mut ids: HashMap<u128, u32> = HashMap::new();
    // States waiting to be expanded; expanded ones are dropped (only their
    // fingerprints and whether they are done stay).
    let mut queue: VecDeque<(u32, State)> = VecDeque::new();
    let mut done: Vec<bool> = Vec::new();
    // Reverse edges of the steps that are not faults (for "can still finish").
    let mut back: Vec<Vec<u32>> = Vec::new();
    ids.insert(fingerprint(&start), 0);
    done.push(start.done());
    back.push(Vec::new());
    queue.push_back((0, start));
    let mut edges = 0;
    while let Some((id, s)) = queue.pop_front() {
        if let Some(v) = s.violation() {
            return Explored {
                states: done.len(),
                edges,
                violation: Some(v),
                blocked: 0,
            };
        }
        for (n, fault, result) in successors(&s, rule) {
            edges += 1;
            if let Err(v) = result {
                return Explored {
                    states: done.len(),
                    edges,
                    violation: Some(v),
                    blocked: 0,
                };
            }
            let key = fingerprint(&n);
            let nid = match ids.get(&key) {
                Some(nid) => *nid,
                None => {
                    let nid = done.len() as u32;
                    assert!(
                        (nid as usize) < states_max,
                        "the state space passed {states_max}"
                    );
                    ids.insert(key, nid);
                    done.push(n.done());
                    back.push(Vec::new());
                    queue.push_back((nid, n));
                    nid
                }
            };
            if !fault {
                back[nid as usize].push(id);
            }
        }
    }
    // No blocking: every state reaches a done state without faults.
    let mut can_finish: HashSet<u32> = (0..done.len() as u32)
        .filter(|i| done[*i as usize])
        .collect();
    let mut stack: Vec<u32> = can_finish.iter().copied().collect();
    while let Some(id) = stack.pop() {
        for &prev in &back[id as usize] {
            if can_finish.insert(prev) {
                stack.push(prev);
            }
        }
    }
    Explored {
        states: done.len(),
        edges,
        violation: None,
        blocked: done.len() - can_finish.len(),
    }
}

#[test]
fn model_3pc_asking_the_cluster_is_atomic_and_never_blocks() {
    let e = explore(Rule::AskTheCluster, 5_000_000);
    eprintln!(
        "3PC, participants ask the cluster: {} states, {} transitions explored",
        e.states, e.edges
    );
    assert_eq!(e.violation, None);
    assert_eq!(
        e.blocked, 0,
        "states from which the transaction cannot finish"
    );
    assert!(
        e.states > 10_000,
        "the model explored only {} states",
        e.states
    );
}

#[test]
fn model_3pc_commit_on_timeout_breaks_atomicity_under_a_partition() {
    let e = explore(Rule::CommitOnTimeout, 5_000_000);
    eprintln!(
        "3PC, classic commit-on-timeout: counterexample after {} states: {:?}",
        e.states, e.violation
    );
    let v = e
        .violation
        .expect("the checker must find the classic rule's counterexample");
    assert!(
        v.contains("atomicity") || v.contains("abort after commit"),
        "{v}"
    );
}
