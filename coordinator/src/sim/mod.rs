//! Deterministic simulation of a whole coordinator cluster in one thread:
//! each node's real Raft loop (`raft::Loop`: raft-rs driven by the Ready
//! contract, proposals, reads, snapshots, membership changes) over a
//! simulated disk and network ([`io`]), the real state machine
//! (`Replicated::apply` of `StateMachine`, so every protocol's rules), each
//! node's real driver (`driver::Driver`, its event loop, the replica's
//! feed and handle) and service layer (`service::Transactions`, which the
//! clients' requests reach) on a tokio runtime whose paused clock only the
//! world moves, the SDK's fencing table in front of simulated participants,
//! and clients that retry ambiguous calls — all on one simulated clock and
//! network, with faults drawn from a seed. [`check`] then judges the run
//! from the participants' own records. The same seed gives the same run
//! (`TANDEM_SIM_TRACE=1` prints every event, to find where two differ).
//!
//! What is real and what is a model: ARCHITECTURE.md and RELIABILITY.md say
//! it in full. In short: the loop's thread (its shell), the raft-engine
//! files, the gRPC and HTTP transports and the databases are replaced by
//! [`io`], this file and `participant.rs`.

mod check;
mod io;
mod participant;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::StateRole;
use raft::eraftpb::{ConfState, Message, Snapshot};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::config::Limits;
use crate::driver::Driver;
use crate::model::command::{DestinationSpec, OpOutcome};
use crate::model::types::{Fence, Op, Protocol, Transaction};
use crate::raft::transport::PeerEvent;
use crate::raft::{Input, Loop, MembershipChange, NodeConfig, NodeHandle, Replicated};
use crate::replica::Retention;
use crate::service::{
    BeginInput, MessageInput, OptionsInput, RegisterInput, RetryInput, SagaInput, StepInput,
};
use crate::service::{ServiceError, Transactions};
use crate::state::StateMachine;
use io::{Disk, Ears, Heard, Net, Observers, OutCall, SimCaller, SimClock, Tears};
use participant::{Answer, Participant};

/// A node's real Raft loop, on the simulation's disk and network.
type Core = Loop<StateMachine, Observers, Disk, Net>;

/// What the simulated cluster's wall clocks read at time 0.
const EPOCH_MS: i64 = 1_800_000_000_000;
const TICK_MS: i64 = 10;
/// A client resends a request that got no answer after this long.
const CLIENT_RETRY_MS: i64 = 300;

/// How a run is shaped.
#[derive(Clone, Debug)]
pub struct Options {
    /// Founding voters.
    pub nodes: u64,
    /// Nodes that start empty and join when a membership change adds them
    /// (numbered after the founding ones).
    pub spares: u64,
    pub participants: usize,
    pub clients: usize,
    /// Agents that only read (Get), at random nodes, until the faults heal.
    pub readers: usize,
    /// Draw faults from the seed (otherwise a clean run).
    pub faults: bool,
    /// Faults stop here; after it the cluster must finish everything.
    pub heal_at_ms: i64,
    /// A run not done by here is blocked: a violation. Clock jumps do not
    /// stretch it: leaders time deadlines on their monotonic clocks.
    pub max_ms: i64,
    /// Scheduled faults left out, by their number (`#N` in
    /// [`Report::faults`]): what [`shrink`] removes. The seed still draws
    /// them, so every other fault stays as it was.
    pub skip_faults: BTreeSet<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            spares: 1,
            participants: 4,
            clients: 12,
            readers: 3,
            faults: true,
            heal_at_ms: 3_000,
            max_ms: 3_000 + 30_000,
            skip_faults: BTreeSet::new(),
        }
    }
}

/// What a run did and what the checker found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub violations: Vec<String>,
    pub txs: usize,
    pub committed: usize,
    pub aborted: usize,
    pub events: u64,
    pub sim_ms: i64,
    /// A hash of every event as it happened: equal for equal runs.
    pub trace: u64,
    /// Terms a node led (and its driver resumed them).
    pub leaders: u64,
    /// Gets answered (linearizable reads through a read index).
    pub reads: usize,
    /// Snapshots a node took in place of its state from the leader.
    pub snapshots_installed: usize,
    /// Snapshot writes the disk refused (a transient fault), each retried
    /// by the node after its wait.
    pub snapshots_failed: usize,
    /// Membership changes committed (joint consensus: entering and leaving
    /// count one each).
    pub membership_changes: usize,
    /// The members at the end, if any membership change committed.
    pub members: Option<Vec<u64>>,
    /// Leaders that applied their own removal and stepped down.
    pub removed_leaders: usize,
    /// Nodes that crashed in the middle of a log write.
    pub torn_writes: usize,
    /// Crashes that lost a write made without a sync (a commit index).
    pub unsynced_lost: usize,
    /// (committed, aborted) per protocol.
    pub by_protocol: BTreeMap<Protocol, (usize, usize)>,
    pub faults: Vec<String>,
    /// Faults the schedule drew (numbered from 0), skipped ones included.
    pub faults_scheduled: usize,
}

impl Report {
    /// Scheduled faults this run kept (the `#N` lines of [`Report::faults`]).
    pub fn faults_kept(&self) -> usize {
        self.faults.iter().filter(|f| f.starts_with('#')).count()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Addr {
    Node(u64),
    Part(usize),
    Client(usize),
    Reader(usize),
}

#[derive(Clone, Debug)]
enum Ev {
    Tick(u64),
    Raft(Box<Message>),
    Crash(u64),
    /// Crash whichever node leads now (if any); restart it after this long.
    CrashLeader(i64),
    Restart(u64),
    ClientWake(usize, u64),
    ClientReq {
        node: u64,
        client: usize,
        req: u64,
        request: Box<Request>,
    },
    ClientReply {
        client: usize,
        req: u64,
        reply: Answered,
    },
    /// A coordinator's call arrives at a participant.
    Call {
        part: usize,
        node: u64,
        call_id: u64,
        gid: String,
        branch_id: String,
        op: Op,
        fence: Fence,
    },
    CallReply {
        node: u64,
        call_id: u64,
        answer: Answer,
    },
    /// The application's own call (TCC try, XA prepare) arrives.
    AppCall {
        part: usize,
        client: usize,
        req: u64,
        gid: String,
        branch_id: String,
        op: Op,
    },
    AppReply {
        client: usize,
        req: u64,
        answer: Option<Answer>,
    },
    /// A reader's next Get (or its give-up on the last one).
    ReaderWake(usize, u64),
    GetReq {
        node: u64,
        reader: usize,
        req: u64,
        gid: String,
    },
    /// `None`: the node could not serve it (no leader known).
    GetReply {
        reader: usize,
        req: u64,
        seen: Option<Option<std::sync::Arc<Transaction>>>,
    },
    /// The end of a snapshot's own call, as the transport reports it.
    SnapshotSent {
        from: u64,
        to: u64,
        delivered: bool,
    },
    /// The transport could not reach a peer (its stream failed): told to
    /// the sender's loop, as `raft/transport.rs` reports it.
    Unreachable {
        from: u64,
        to: u64,
    },
    /// A snapshot the node took is durable (its writer thread's report),
    /// unless the node restarted since (`life`).
    SnapshotWritten {
        node: u64,
        life: u64,
        snapshot: Box<Snapshot>,
    },
    /// A snapshot's write failed (a transient disk fault): the loop hears
    /// of it as from its writer thread, unless the node restarted since.
    SnapshotFailed {
        node: u64,
        life: u64,
    },
    Cut(Addr, Addr, bool),
    /// The operator's next membership change (by its place in the plan):
    /// made at the leader as `raft/membership.rs` makes it, checked again
    /// until it is in effect.
    Membership(usize),
    ClockJump(u64, i64),
    PartDown(usize, i64),
    Heal,
}

impl Ev {
    fn kind(&self) -> u64 {
        match self {
            Ev::Tick(n) => 1 + (n << 8),
            Ev::Raft(m) => 3 + (m.to << 8) + ((m.get_msg_type() as u64) << 16),
            Ev::Crash(n) => 4 + (n << 8),
            Ev::Restart(n) => 5 + (n << 8),
            Ev::ClientWake(c, _) => 6 + ((*c as u64) << 8),
            Ev::ClientReq { node, .. } => 7 + (node << 8),
            Ev::ClientReply { client, .. } => 8 + ((*client as u64) << 8),
            Ev::Call { part, op, .. } => 9 + ((*part as u64) << 8) + ((*op as u64) << 16),
            Ev::CallReply { node, .. } => 10 + (node << 8),
            Ev::AppCall { part, .. } => 12 + ((*part as u64) << 8),
            Ev::AppReply { client, .. } => 13 + ((*client as u64) << 8),
            Ev::Cut(..) => 14,
            Ev::ClockJump(n, _) => 15 + (n << 8),
            Ev::PartDown(p, _) => 16 + ((*p as u64) << 8),
            Ev::Heal => 17,
            Ev::CrashLeader(_) => 18,
            Ev::ReaderWake(r, _) => 19 + ((*r as u64) << 8),
            Ev::GetReq { node, .. } => 20 + (node << 8),
            Ev::GetReply { reader, .. } => 21 + ((*reader as u64) << 8),
            Ev::SnapshotSent { from, .. } => 22 + (from << 8),
            Ev::Membership(i) => 23 + ((*i as u64) << 8),
            Ev::SnapshotWritten { node, .. } => 24 + (node << 8),
            Ev::Unreachable { from, .. } => 25 + (from << 8),
            Ev::SnapshotFailed { node, .. } => 26 + (node << 8),
        }
    }
}

/// A client's request to a node's service layer (`service::Transactions`),
/// as its API would pass it on.
#[derive(Clone, Debug)]
enum Request {
    Begin(BeginInput),
    Register(RegisterInput),
    Saga(SagaInput),
    Message(MessageInput),
    Commit(String),
    Abort(String, String),
}

impl Request {
    /// The operation's name in the checker's histories.
    fn name(&self) -> &'static str {
        match self {
            Request::Begin(_) => "Begin",
            Request::Register(_) => "RegisterBranch",
            Request::Saga(_) => "SubmitSaga",
            Request::Message(_) => "PrepareMessage",
            Request::Commit(_) => "Commit",
            Request::Abort(..) => "Abort",
        }
    }
}

/// What a client heard back from a node's service layer.
#[derive(Clone, Debug)]
enum Answered {
    /// Done: the transaction as the service returned it.
    Tx(Arc<Transaction>),
    /// Refused for good (the state did not allow it, bad input).
    Refused,
    /// Not here, or not known (not the leader, leadership changed, a wait
    /// that ran out): try again, elsewhere.
    Elsewhere,
}

impl Answered {
    fn of(result: crate::service::Result<Arc<Transaction>>) -> Answered {
        match result {
            Ok(tx) => Answered::Tx(tx),
            Err(ServiceError::Node(_) | ServiceError::TimedOut(_) | ServiceError::Exhausted(_)) => {
                Answered::Elsewhere
            }
            Err(_) => Answered::Refused,
        }
    }
}

/// A membership change an operator asks for.
#[derive(Clone, Copy, Debug)]
enum Change {
    AddLearner(u64),
    Promote(u64),
    Remove(u64),
}

struct Node {
    id: u64,
    /// What survives a crash: written before the messages that promise it,
    /// as the real loop fsyncs in its turn — unless the node crashes in
    /// the middle of that write (`Faults::torn`).
    disk: Disk,
    /// The node's Raft loop while it is up.
    core: Option<Core>,
    /// Starts of the node so far: a snapshot taken in an earlier life is
    /// not reported to this one.
    life: u64,
    /// What the loop sent and heard during a turn (drained after it).
    out: Arc<Mutex<Vec<(Message, bool)>>>,
    ears: Ears,
    /// The node's wall clock's jumps.
    offset_ms: Arc<AtomicI64>,
    /// The node's tasks on the simulation's runtime while it is up: its
    /// driver (`driver::Driver`) and the requests its service is serving.
    tasks: Option<tokio::task::JoinSet<()>>,
    /// The node's service layer (`service::Transactions`) while it is up.
    service: Option<Arc<Transactions>>,
    /// What the node's handle sends its loop (the driver's proposals).
    inputs: Option<crossbeam_channel::Receiver<Input<StateMachine>>>,
}

impl Node {
    /// The state machine, while the node is up.
    pub(crate) fn sm(&self) -> Option<&StateMachine> {
        self.core.as_ref().map(|c| c.machine())
    }

    pub(crate) fn applied(&self) -> u64 {
        self.core.as_ref().map_or(0, |c| c.applied())
    }
}

/// Asks Get of random transactions at random nodes, all run long: its
/// answers, with the clients' acknowledged writes, are the history the
/// checker holds to linearizability.
#[derive(Default)]
struct Reader {
    req: u64,
    token: u64,
    invoked_ms: i64,
    gid: String,
    /// The current Get still awaits its answer.
    open: bool,
}

/// One completed client-visible operation on a transaction: when it was
/// first asked, when its answer arrived, and the transaction it showed
/// (`version` 0: absent).
#[derive(Clone, Debug)]
pub(crate) struct Observed {
    pub gid: String,
    pub what: &'static str,
    pub invoked_ms: i64,
    pub returned_ms: i64,
    pub version: u64,
    /// A digest of the whole transaction shown: one version, one content.
    pub digest: u64,
}

/// A step of a client's script.
#[derive(Clone, Debug)]
enum Step {
    Call(Request),
    App {
        branch_id: String,
        op: Op,
        part: usize,
    },
    Decide,
    /// The application is slow here (a long local transaction).
    Pause(i64),
}

struct Client {
    gid: String,
    protocol: Protocol,
    steps: Vec<Step>,
    /// The step under way.
    at: usize,
    /// Only the wake-up carrying the latest token acts, so retries never
    /// multiply.
    token: u64,
    /// The node it asks first.
    target: u64,
    app_failed: bool,
    app_tries: u32,
    done: bool,
    /// When the step under way was first sent (retries keep it): the
    /// invocation of the operation, for the linearizability check.
    invoked: Option<(usize, i64)>,
}

/// What the cluster acknowledged to a client: the checker holds it to it.
#[derive(Clone, Debug)]
pub(crate) struct Ack {
    pub gid: String,
    pub command: &'static str,
    pub tx: std::sync::Arc<Transaction>,
}

pub(crate) struct Faults {
    loss: f64,
    dup: f64,
    delay_max_ms: i64,
    disk_ms: i64,
    transient: f64,
    /// Crashes in the middle of a log write (before its fsync ended): the
    /// chance per write, and how many a run may have (drawn by the disks).
    torn: Arc<Mutex<Tears>>,
    cut: BTreeSet<(Addr, Addr)>,
    active: bool,
}

pub(crate) struct World {
    seed: u64,
    opts: Options,
    rng: StdRng,
    now: i64,
    seq: u64,
    queue: BTreeMap<(i64, u64), Ev>,
    nodes: Vec<Node>,
    parts: Vec<Participant>,
    clients: Vec<Client>,
    readers: Vec<Reader>,
    faults: Faults,
    next_call: u64,
    /// Calls the drivers made, not yet carried; and the answers awaited,
    /// by call.
    calls_out: Arc<Mutex<Vec<OutCall>>>,
    calls: BTreeMap<u64, oneshot::Sender<OpOutcome>>,
    /// Answers the nodes' services gave, not yet sent: (node, to, answer).
    answers: Arc<Mutex<Vec<(u64, Addr, Ev)>>>,
    /// The runtime's clock at time 0 (it is paused: only the world moves it).
    start: tokio::time::Instant,
    /// Terms a node led (and its driver resumed).
    leads: u64,
    /// `TANDEM_SIM_TRACE` is set: every event is printed as it happens.
    print_events: bool,
    /// Every committed entry seen applied: index → (term, when first).
    pub(crate) committed: BTreeMap<u64, (u64, i64)>,
    pub(crate) acks: Vec<Ack>,
    pub(crate) observed: Vec<Observed>,
    pub(crate) violations: Vec<String>,
    trace: u64,
    events: u64,
    fault_log: Vec<String>,
    /// Scheduled faults drawn so far (the next one's number).
    faults_scheduled: usize,
    /// Each node snapshots its state and compacts its log once it applied
    /// this many entries past its last snapshot (and the log's bytes rule
    /// allows), keeping this many entries behind it (drawn per seed).
    snapshot_every: Option<u64>,
    log_retain: u64,
    snapshots_installed: usize,
    snapshots_failed: usize,
    /// The operator's membership changes, made one after the other.
    plan: Vec<Change>,
    plan_at: usize,
    /// The membership after each committed conf change, by log index.
    pub(crate) conf_at: BTreeMap<u64, ConfState>,
}

fn address(id: u64) -> String {
    format!("node{id}.sim:7171")
}

/// The text of a Raft loop's configuration as a node's would be, on the
/// simulation's tick. The election timeout is one value: raft-rs draws the
/// randomized one from its own random source, which would make runs differ;
/// message delays break ties instead.
fn node_config(id: u64, founding: u64, snapshot_every: Option<u64>, log_retain: u64) -> NodeConfig {
    NodeConfig {
        id,
        cluster_name: "sim".into(),
        address: address(id),
        peers: (1..=founding).map(|id| (id, address(id))).collect(),
        join: id > founding,
        data_dir: PathBuf::new(),
        group: 1,
        tick: Duration::from_millis(TICK_MS as u64),
        election_ticks: 10,
        election_ticks_max: Some(11),
        heartbeat_ticks: 2,
        // A run never applies this many: no snapshots but those raft asks for.
        snapshot_interval_entries: snapshot_every.unwrap_or(1 << 40),
        log_retain_entries: log_retain,
        group_commit_gap: Duration::ZERO,
        group_commit_min_entries: 0,
    }
}

/// The simulated producer's local transaction, as a client step's branch.
const OUTBOX: &str = "outbox";

fn endpoint(part: usize) -> String {
    format!("http://p{part}.sim:80/tandem")
}

fn part_of(endpoint: &str) -> usize {
    endpoint
        .strip_prefix("http://p")
        .and_then(|s| s.split('.').next())
        .and_then(|n| n.parse().ok())
        .expect("simulated endpoints name their participant")
}

/// A stable 64-bit mix, for votes that a repeated call casts the same way.
fn mix(seed: u64, parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl World {
    fn new(seed: u64, opts: Options) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let faults = if opts.faults {
            Faults {
                loss: [0.0, 0.01, 0.05, 0.1][rng.random_range(0..4)],
                dup: [0.0, 0.0, 0.02, 0.05][rng.random_range(0..4)],
                delay_max_ms: [2, 10, 30][rng.random_range(0..3)],
                disk_ms: [0, 2, 8][rng.random_range(0..3)],
                transient: [0.0, 0.05, 0.2][rng.random_range(0..3)],
                torn: Tears::new(seed, [0.0, 0.0, 0.003, 0.01][rng.random_range(0..4)], 3),
                cut: BTreeSet::new(),
                active: true,
            }
        } else {
            Faults {
                loss: 0.0,
                dup: 0.0,
                delay_max_ms: 3,
                disk_ms: 0,
                transient: 0.0,
                torn: Tears::new(seed, 0.0, 0),
                cut: BTreeSet::new(),
                active: false,
            }
        };
        let parts = (0..opts.participants)
            .map(|_| Participant::default())
            .collect();
        let snapshot_every = [None, Some(25), Some(80)][rng.random_range(0..3)];
        let log_retain = [0, 1, 10][rng.random_range(0..3)];
        let voters: Vec<u64> = (1..=opts.nodes).collect();
        let nodes = (1..=opts.nodes + opts.spares)
            .map(|id| {
                // Founding members start from the bootstrap snapshot the
                // real store writes (index 1, the voters in it); a spare
                // starts empty and must be sent it, as a joining node is.
                let founding = id <= opts.nodes;
                let disk = Disk::new(founding.then_some(&voters[..]), faults.torn.clone());
                Node {
                    id,
                    disk,
                    core: None,
                    life: 0,
                    out: Default::default(),
                    ears: Ears::default(),
                    offset_ms: Default::default(),
                    tasks: None,
                    service: None,
                    inputs: None,
                }
            })
            .collect();
        let mut world = World {
            seed,
            opts,
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes,
            parts,
            clients: Vec::new(),
            readers: Vec::new(),
            faults,
            next_call: 1,
            calls_out: Default::default(),
            calls: BTreeMap::new(),
            answers: Default::default(),
            start: tokio::time::Instant::now(),
            leads: 0,
            print_events: std::env::var_os("TANDEM_SIM_TRACE").is_some(),
            committed: BTreeMap::new(),
            acks: Vec::new(),
            observed: Vec::new(),
            violations: Vec::new(),
            trace: 0xcbf2_9ce4_8422_2325,
            events: 0,
            fault_log: Vec::new(),
            faults_scheduled: 0,
            snapshot_every,
            log_retain,
            snapshots_installed: 0,
            snapshots_failed: 0,
            plan: Vec::new(),
            plan_at: 0,
            conf_at: BTreeMap::new(),
        };
        world.fault_log.push(format!(
            "loss {} dup {} delay<={}ms disk {}ms transient {} crash-mid-write {} snapshot every {:?} entries, {} kept",
            world.faults.loss,
            world.faults.dup,
            world.faults.delay_max_ms,
            world.faults.disk_ms,
            world.faults.transient,
            world.faults.torn.lock().expect("one thread").chance,
            world.snapshot_every,
            world.log_retain,
        ));
        for id in 1..=world.opts.nodes + world.opts.spares {
            world.start_node(id);
        }
        for id in 1..=world.opts.nodes + world.opts.spares {
            // Nodes tick out of phase, as real ones do.
            let phase = world.rng.random_range(0..TICK_MS);
            world.at(phase, Ev::Tick(id));
        }
        world.make_clients();
        for r in 0..world.opts.readers {
            world.readers.push(Reader::default());
            let start = world.rng.random_range(0..100);
            world.at(start, Ev::ReaderWake(r, 0));
        }
        if world.opts.faults {
            world.schedule_faults();
        }
        let heal = world.opts.heal_at_ms;
        world.at(heal, Ev::Heal);
        world
    }

    fn at(&mut self, when: i64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((when.max(self.now), self.seq), ev);
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random_bool(p)
    }

    /// Sends over the simulated network: maybe lost, delayed, duplicated.
    fn send(&mut self, from: Addr, to: Addr, ev: Ev, extra_ms: i64) {
        self.transmit(from, to, ev, extra_ms);
    }

    /// [`World::send`], saying whether it left (lost on the way: false).
    fn transmit(&mut self, from: Addr, to: Addr, ev: Ev, extra_ms: i64) -> bool {
        if self.faults.active {
            if self.faults.cut.contains(&(from, to)) {
                return false;
            }
            if self.chance(self.faults.loss) {
                return false;
            }
        }
        let delay = self.rng.random_range(1..=self.faults.delay_max_ms) + extra_ms;
        if self.faults.active && self.chance(self.faults.dup) {
            let again = self.rng.random_range(1..=self.faults.delay_max_ms * 3) + extra_ms;
            self.at(self.now + again, ev.clone());
        }
        self.at(self.now + delay, ev);
        true
    }

    fn instant(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.now as u64)
    }

    fn make_clients(&mut self) {
        let n = self.opts.clients;
        for c in 0..n {
            let protocol = [
                Protocol::TwoPc,
                Protocol::Xa,
                Protocol::Tcc,
                Protocol::Saga,
                Protocol::ThreePc,
                Protocol::Msg,
            ][self.rng.random_range(0..6)];
            let gid = format!("g{c}");
            // Clients ask a node's service layer (`service::Transactions`)
            // as its API would: input checks, the leader check, the
            // leader's clock stamped in, waiting for a 2PC decision.
            let options = OptionsInput {
                timeout_ms: self.rng.random_range(1_000..=4_000),
                retry: Some(RetryInput {
                    initial_interval_ms: 20,
                    max_interval_ms: 400,
                    max_attempts: 6,
                }),
                branch_timeout_ms: 200,
                concurrency: 0,
            };
            let parts = self.opts.participants;
            let mut steps = Vec::new();
            let begin = || {
                Request::Begin(BeginInput {
                    trace_parent: None,
                    gid: gid.clone(),
                    protocol: Some(protocol),
                    options,
                    payload: Default::default(),
                })
            };
            let branches = self.rng.random_range(1..=3usize);
            let register = |b: usize, ops: &[Op]| {
                let part = (c + b) % parts;
                Request::Register(RegisterInput {
                    gid: gid.clone(),
                    branch_id: format!("b{b}"),
                    ops: ops
                        .iter()
                        .map(|op| (op.name().to_string(), endpoint(part)))
                        .collect(),
                    payload: Default::default(),
                })
            };
            match protocol {
                Protocol::TwoPc | Protocol::ThreePc => {
                    let (ops, _) = crate::protocol::branch_ops(protocol);
                    steps.push(Step::Call(begin()));
                    for b in 0..branches {
                        steps.push(Step::Call(register(b, ops)));
                    }
                    steps.push(Step::Decide);
                }
                Protocol::Xa | Protocol::Tcc => {
                    let (forward, ops): (Op, &[Op]) = if protocol == Protocol::Xa {
                        (Op::Prepare, &[Op::Commit, Op::Rollback])
                    } else {
                        (Op::Try, &[Op::Try, Op::Confirm, Op::Cancel])
                    };
                    steps.push(Step::Call(begin()));
                    for b in 0..branches {
                        steps.push(Step::Call(register(b, ops)));
                        steps.push(Step::App {
                            branch_id: format!("b{b}"),
                            op: forward,
                            part: (c + b) % parts,
                        });
                    }
                    steps.push(Step::Decide);
                }
                Protocol::Saga => {
                    let concurrent = self.rng.random_bool(0.5);
                    let mut specs: Vec<StepInput> = Vec::new();
                    for b in 0..branches + 1 {
                        let part = (c + b) % parts;
                        // Sequential sagas name no `after`: the checks chain
                        // each step to the one before.
                        let after = match (concurrent, b) {
                            (false, _) | (_, 0) => Vec::new(),
                            (true, b) => (0..b)
                                .filter(|_| self.rng.random_bool(0.5))
                                .map(|a| format!("s{a}"))
                                .collect(),
                        };
                        specs.push(StepInput {
                            branch_id: format!("s{b}"),
                            action: endpoint(part),
                            compensate: endpoint(part),
                            payload: Default::default(),
                            after,
                            retry: None,
                        });
                    }
                    let mut options = options;
                    options.concurrency = if concurrent { 2 } else { 0 };
                    let input = SagaInput {
                        trace_parent: None,
                        gid: gid.clone(),
                        options,
                        steps: specs,
                        payload: Default::default(),
                        concurrent,
                        wait: None,
                    };
                    steps.push(Step::Call(Request::Saga(input)));
                }
                Protocol::Msg => {
                    // The producer serves the check-back; each destination
                    // is another participant.
                    let producer = c % parts;
                    let destinations = (0..branches)
                        .map(|b| DestinationSpec {
                            branch_id: format!("d{b}"),
                            endpoint: endpoint((c + b + 1) % parts),
                            payload: Default::default(),
                        })
                        .collect();
                    let input = MessageInput {
                        trace_parent: None,
                        gid: gid.clone(),
                        options,
                        check_back: endpoint(producer),
                        destinations,
                        payload: Default::default(),
                    };
                    steps.push(Step::Call(Request::Message(input)));
                    // Sometimes the local transaction takes longer than the
                    // message's timeout: the check-back races it.
                    if self.rng.random_bool(0.3) {
                        let slow =
                            i64::from(options.timeout_ms) + self.rng.random_range(-500..1_500);
                        steps.push(Step::Pause(slow.max(0)));
                    }
                    steps.push(Step::App {
                        branch_id: OUTBOX.into(),
                        op: Op::Commit,
                        part: producer,
                    });
                    steps.push(Step::Decide);
                }
            }
            let start = self.rng.random_range(0..2_000);
            let target = self.rng.random_range(1..=self.opts.nodes);
            self.clients.push(Client {
                gid,
                protocol,
                steps,
                at: 0,
                token: 0,
                target,
                app_failed: false,
                app_tries: 0,
                done: false,
                invoked: None,
            });
            self.at(start, Ev::ClientWake(c, 0));
        }
    }

    /// Numbers a scheduled fault; false if the options skip it (it is then
    /// neither logged nor scheduled, but was drawn like the rest).
    fn scheduled(&mut self, what: String) -> bool {
        let number = self.faults_scheduled;
        self.faults_scheduled += 1;
        if self.opts.skip_faults.contains(&number) {
            return false;
        }
        self.fault_log.push(format!("#{number} {what}"));
        true
    }

    fn schedule_faults(&mut self) {
        let heal = self.opts.heal_at_ms;
        let nodes = self.opts.nodes;
        for _ in 0..self.rng.random_range(0..=3) {
            let node = self.rng.random_range(1..=nodes);
            let at = self.rng.random_range(0..heal);
            let back = at + self.rng.random_range(50..1_000);
            if self.scheduled(format!("crash node {node} at {at}, restart at {back}")) {
                self.at(at, Ev::Crash(node));
                self.at(back.min(heal), Ev::Restart(node));
            }
        }
        for _ in 0..self.rng.random_range(0..=4) {
            let at = self.rng.random_range(0..heal);
            let down = self.rng.random_range(20..800);
            if self.scheduled(format!("crash the leader at {at}, restart after {down} ms")) {
                self.at(at, Ev::CrashLeader(down));
            }
        }
        for _ in 0..self.rng.random_range(0..=3) {
            let at = self.rng.random_range(0..heal);
            let until = at + self.rng.random_range(100..1_500);
            let a = self.rng.random_range(1..=nodes);
            let b = self.rng.random_range(1..=nodes);
            if a == b {
                continue;
            }
            let both = self.rng.random_bool(0.5);
            let what = format!(
                "cut {a}->{b}{} from {at} to {until}",
                if both { " both ways" } else { "" }
            );
            if !self.scheduled(what) {
                continue;
            }
            for (x, y) in [(a, b), (b, a)].into_iter().take(if both { 2 } else { 1 }) {
                self.at(at, Ev::Cut(Addr::Node(x), Addr::Node(y), true));
                self.at(until, Ev::Cut(Addr::Node(x), Addr::Node(y), false));
            }
        }
        for _ in 0..self.rng.random_range(0..=2) {
            let node = self.rng.random_range(1..=nodes);
            let at = self.rng.random_range(0..heal);
            let jump = self.rng.random_range(100_000..500_000)
                * if self.rng.random_bool(0.5) { 1 } else { -1 };
            if self.scheduled(format!("clock of node {node} jumps {jump} ms at {at}")) {
                self.at(at, Ev::ClockJump(node, jump));
            }
        }
        // Half the runs replace a node, as an operator does: add a spare as
        // a learner, promote it, remove one voter (perhaps the spare again,
        // perhaps the leader, which hands over first).
        if self.opts.spares > 0 && self.rng.random_bool(0.5) {
            let spare = nodes + 1;
            let gone = self.rng.random_range(1..=spare);
            let first = self.rng.random_range(0..heal);
            for change in [
                Change::AddLearner(spare),
                Change::Promote(spare),
                Change::Remove(gone),
            ] {
                if self.scheduled(format!("{change:?}, the changes start at {first}")) {
                    self.plan.push(change);
                }
            }
            if !self.plan.is_empty() {
                self.at(first, Ev::Membership(0));
            }
        }
        for _ in 0..self.rng.random_range(0..=3) {
            let part = self.rng.random_range(0..self.opts.participants);
            let at = self.rng.random_range(0..heal);
            let len = self.rng.random_range(50..1_000);
            if self.scheduled(format!("participant {part} down at {at} for {len} ms")) {
                self.at(at, Ev::PartDown(part, at + len));
            }
        }
    }

    fn run(mut self, rt: &tokio::runtime::Runtime) -> Report {
        let mut last_check = 0;
        while let Some(((when, seq), ev)) = self.queue.pop_first() {
            self.now = when;
            // The runtime's clock follows the world's (timers due by now fire).
            let to = self.instant();
            rt.block_on(async move {
                let now = tokio::time::Instant::now();
                if to > now {
                    tokio::time::advance(to - now).await;
                }
            });
            self.events += 1;
            for v in [when as u64, seq, ev.kind()] {
                self.trace ^= v;
                self.trace = self.trace.wrapping_mul(0x0100_0000_01b3);
            }
            if self.events.is_multiple_of(200_000) && std::env::var_os("TANDEM_SIM_DEBUG").is_some()
            {
                eprintln!(
                    "t={} events={} queue={} next={:?}",
                    self.now,
                    self.events,
                    self.queue.len(),
                    ev.kind() & 0xff
                );
            }
            if self.print_events {
                eprintln!("{when} {seq} {:?}", ev);
            }
            self.handle(ev);
            self.settle(rt);
            if self.now >= self.opts.heal_at_ms + 500 && self.now - last_check >= 100 {
                last_check = self.now;
                if self.quiescent() {
                    break;
                }
            }
            if self.now >= self.opts.max_ms {
                self.violations.push(format!(
                    "no blocking: not every transaction ended {} ms after the faults healed",
                    self.opts.max_ms - self.opts.heal_at_ms,
                ));
                break;
            }
        }
        let mut report = Report {
            seed: self.seed,
            events: self.events,
            sim_ms: self.now,
            trace: self.trace,
            ..Default::default()
        };
        report.violations = std::mem::take(&mut self.violations);
        report.violations.extend(check::check(&self));
        let sm = self.members().find_map(Node::sm);
        for c in &self.clients {
            if let Some(tx) = sm.and_then(|sm| sm.get(&c.gid)) {
                report.txs += 1;
                let counts = report.by_protocol.entry(tx.protocol).or_default();
                match tx.state {
                    crate::model::types::TxState::Committed => {
                        report.committed += 1;
                        counts.0 += 1;
                    }
                    crate::model::types::TxState::Aborted => {
                        report.aborted += 1;
                        counts.1 += 1;
                    }
                    _ => {}
                }
            }
        }
        report.reads = self.observed.iter().filter(|o| o.what == "Get").count();
        report.snapshots_installed = self.snapshots_installed;
        report.snapshots_failed = self.snapshots_failed;
        report.membership_changes = self.conf_at.len();
        report.members = self
            .conf_at
            .values()
            .next_back()
            .map(|_| self.members().map(|n| n.id).collect());
        report.removed_leaders = self
            .fault_log
            .iter()
            .filter(|f| f.contains("its own removal"))
            .count();
        report.torn_writes = self
            .fault_log
            .iter()
            .filter(|f| f.contains("crashed mid-write"))
            .count();
        report.unsynced_lost = self
            .fault_log
            .iter()
            .filter(|f| f.contains("without a sync"))
            .count();
        report.faults = self.fault_log;
        report.faults_scheduled = self.faults_scheduled;
        report.leaders = self.leads;
        report
    }

    /// Every client done, every node up and caught up, every transaction ended.
    fn quiescent(&self) -> bool {
        if !self.clients.iter().all(|c| c.done) {
            return false;
        }
        let commit = self.committed.keys().next_back().copied().unwrap_or(0);
        self.members()
            .all(|n| n.applied() == commit && n.sm().is_some_and(|sm| sm.active_count() == 0))
    }

    fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Tick(id) => {
                self.turn(id, Vec::new(), true);
                self.at(self.now + TICK_MS, Ev::Tick(id));
            }
            Ev::Raft(m) => {
                let to = m.to;
                self.turn(to, vec![Input::Peer(PeerEvent::Raft(vec![*m]))], false);
            }
            Ev::Crash(id) => {
                let node = self.node(id);
                let lost = node.disk.crash();
                node.core = None;
                // Its tasks die with it: no answer leaves a dead node.
                if let Some(mut tasks) = node.tasks.take() {
                    tasks.abort_all();
                }
                node.service = None;
                node.inputs = None;
                node.out.lock().expect("one thread").clear();
                node.ears.0.lock().expect("one thread").clear();
                if lost {
                    self.fault_log.push(format!(
                        "node {id} crashed at {} and lost what it wrote without a sync",
                        self.now
                    ));
                }
            }
            Ev::CrashLeader(down) => {
                let leader = (1..=self.nodes.len() as u64).find(|&id| {
                    self.nodes[(id - 1) as usize]
                        .core
                        .as_ref()
                        .is_some_and(|c| c.raft().state == StateRole::Leader)
                });
                if let Some(id) = leader
                    && self.faults.active
                {
                    self.handle(Ev::Crash(id));
                    let back = (self.now + down).min(self.opts.heal_at_ms);
                    self.at(back, Ev::Restart(id));
                }
            }
            Ev::Restart(id) => {
                if self.node(id).core.is_none() {
                    self.start_node(id);
                }
            }
            Ev::ClientWake(c, req) => self.client_step(c, req),
            Ev::ClientReq {
                node,
                client,
                req,
                request,
            } => self.client_request(node, client, req, *request),
            Ev::ClientReply { client, req, reply } => self.client_reply(client, req, reply),
            Ev::Call {
                part,
                node,
                call_id,
                gid,
                branch_id,
                op,
                fence,
            } => {
                let answer = self.participant(part, &gid, &branch_id, op, fence);
                if let Some(answer) = answer {
                    let reply = Ev::CallReply {
                        node,
                        call_id,
                        answer,
                    };
                    self.send(Addr::Part(part), Addr::Node(node), reply, 0);
                }
            }
            Ev::CallReply {
                node,
                call_id,
                answer,
            } => {
                // To the call's task, if its node is still the one that
                // made it (a restarted node's driver is another).
                if let Some(reply) = self.calls.remove(&call_id)
                    && self.node(node).tasks.is_some()
                {
                    let _ = reply.send(match answer {
                        Answer::Ok => OpOutcome::Succeeded,
                        Answer::No(m) => OpOutcome::Failed(m),
                        Answer::Unavailable => OpOutcome::Transient("unavailable".into()),
                    });
                }
            }
            Ev::AppCall {
                part,
                client,
                req,
                gid,
                branch_id,
                op,
            } => {
                let answer = if branch_id == OUTBOX {
                    self.local_commit(part, &gid)
                } else {
                    self.participant(part, &gid, &branch_id, op, Fence::default())
                };
                self.send(
                    Addr::Part(part),
                    Addr::Client(client),
                    Ev::AppReply {
                        client,
                        req,
                        answer,
                    },
                    0,
                );
            }
            Ev::AppReply {
                client,
                req,
                answer,
            } => self.app_reply(client, req, answer),
            Ev::ReaderWake(r, token) => self.reader_step(r, token),
            Ev::GetReq {
                node,
                reader,
                req,
                gid,
            } => self.get_request(node, reader, req, gid),
            Ev::GetReply { reader, req, seen } => self.get_reply(reader, req, seen),
            Ev::SnapshotSent {
                from,
                to,
                delivered,
            } => {
                let delivered = delivered && self.node(to).core.is_some();
                let event = PeerEvent::SnapshotSent { to, delivered };
                self.turn(from, vec![Input::Peer(event)], false);
            }
            Ev::Unreachable { from, to } => {
                self.turn(from, vec![Input::Peer(PeerEvent::Unreachable(to))], false);
            }
            Ev::SnapshotWritten {
                node,
                life,
                snapshot,
            } => {
                if self.node(node).life == life {
                    self.turn(node, vec![Input::SnapshotWritten(snapshot)], false);
                }
            }
            Ev::SnapshotFailed { node, life } => {
                if self.node(node).life == life {
                    let error = "simulated: the snapshot's write failed".to_string();
                    self.turn(node, vec![Input::SnapshotFailed(error)], false);
                }
            }
            Ev::Membership(i) => self.membership(i),
            Ev::Cut(a, b, on) => {
                if on && self.faults.active {
                    self.faults.cut.insert((a, b));
                } else {
                    self.faults.cut.remove(&(a, b));
                }
            }
            Ev::ClockJump(id, ms) => {
                if self.faults.active {
                    self.node(id).offset_ms.fetch_add(ms, Ordering::Relaxed);
                }
            }
            Ev::PartDown(p, until) => {
                if self.faults.active {
                    self.parts[p].down_until = until;
                }
            }
            Ev::Heal => {
                self.faults.active = false;
                self.faults.cut.clear();
                self.faults.loss = 0.0;
                self.faults.dup = 0.0;
                self.faults.transient = 0.0;
                self.faults.torn.lock().expect("one thread").chance = 0.0;
                self.faults.disk_ms = 0;
                for n in &mut self.nodes {
                    n.offset_ms.store(0, Ordering::Relaxed);
                }
                for p in &mut self.parts {
                    p.down_until = 0;
                }
                for id in 1..=self.nodes.len() as u64 {
                    self.handle(Ev::Restart(id));
                }
            }
        }
    }

    /// A producer's local transaction with its outbox marker.
    fn local_commit(&mut self, part: usize, gid: &str) -> Option<Answer> {
        if self.faults.active && self.chance(self.faults.transient) {
            return Some(Answer::Unavailable);
        }
        let yes = !mix(self.seed, &[gid, OUTBOX]).is_multiple_of(10);
        let now = self.now;
        self.parts[part].local_commit(now, gid, yes)
    }

    fn participant(
        &mut self,
        part: usize,
        gid: &str,
        branch_id: &str,
        op: Op,
        fence: Fence,
    ) -> Option<Answer> {
        if self.faults.active && self.chance(self.faults.transient) {
            return Some(Answer::Unavailable);
        }
        let yes = !mix(self.seed, &[gid, branch_id]).is_multiple_of(10);
        let now = self.now;
        self.parts[part].handle(now, gid, branch_id, op, fence, yes)
    }

    /// Starts (or restarts) a node's Raft loop from its disk alone: the
    /// state machine is its snapshot's, then the committed entries after
    /// it are applied again — as a node's process starts.
    fn start_node(&mut self, id: u64) {
        let (founding, every, retain) = (self.opts.nodes, self.snapshot_every, self.log_retain);
        let (start, calls_out) = (self.start, self.calls_out.clone());
        let node = self.node(id);
        let machine = restore(&node.disk.snapshot());
        let net = Net {
            out: node.out.clone(),
            disk: node.disk.clone(),
        };
        let clock: Arc<dyn Clock> = Arc::new(SimClock {
            start,
            epoch_ms: EPOCH_MS,
            offset_ms: node.offset_ms.clone(),
        });
        // As a node's process wires itself (`server.rs`): the replica's
        // observer in the loop, the replica over the loop's handle, the
        // driver over the replica and the feed.
        let retention = Retention {
            age: Duration::from_secs(3_600),
            count_max: 200_000,
            bytes_max: 64 << 20,
        };
        let (replica, feed, make_replica) = crate::replica::observer(retention, clock.clone());
        let observers = Observers {
            replica,
            ears: node.ears.clone(),
        };
        let config = node_config(id, founding, every, retain);
        let (core, status) = Loop::new(config, node.disk.clone(), machine, net, observers)
            .expect("a simulated node starts");
        let (inputs, inputs_rx) = crossbeam_channel::bounded(crate::raft::node::INPUT_QUEUE_MAX);
        let replica = make_replica(NodeHandle::simulated(inputs, status, id));
        let caller = Arc::new(SimCaller {
            node: id,
            out: calls_out,
        });
        let service = Transactions::new(replica.clone(), Limits::default(), clock.clone());
        let driver = Driver::new(replica, caller, clock);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(driver.run(feed));
        node.tasks = Some(tasks);
        node.service = Some(Arc::new(service));
        node.inputs = Some(inputs_rx);
        node.core = Some(core);
        node.life += 1;
        self.after_turn(id);
    }

    /// One turn of a node's Raft loop, as its thread runs one: the inputs,
    /// a tick if one is due, then the end of the turn (the Ready contract,
    /// reads, snapshots). Then the world delivers what the turn sent.
    fn turn(&mut self, id: u64, inputs: Vec<Input<StateMachine>>, tick: bool) {
        let now = std::time::Instant::from(self.instant());
        let node = self.node(id);
        let Some(core) = node.core.as_mut() else {
            return;
        };
        node.disk.begin_turn();
        for input in inputs {
            core.handle(input);
        }
        if tick {
            core.tick(now);
        }
        let ended = core.end_turn();
        let job = core.take_snapshot_job();
        self.after_turn(id);
        if ended.is_err() {
            // The node died while its write was under way: what it sent
            // before the write is out; the write is kept or lost whole;
            // nothing that waits for the fsync happens.
            let kept = self.node(id).disk.take_torn().unwrap_or(false);
            let back = (self.now + self.rng.random_range(50..600)).min(self.opts.heal_at_ms);
            self.fault_log.push(format!(
                "node {id} crashed mid-write at {}, the write {}, restart at {back}",
                self.now,
                if kept { "kept" } else { "lost" }
            ));
            self.handle(Ev::Crash(id));
            self.at(back, Ev::Restart(id));
            return;
        }
        if let Some(job) = job {
            // The snapshot thread encodes and writes it; the loop hears of
            // it a little later — or hears that the disk refused it.
            // Drawn from the seed and the snapshot, not from the run's
            // generator: the fault leaves every other draw of a run as it
            // was (seeds chosen for what they exercise keep it).
            let index = job.snapshot.get_metadata().index;
            let draw = mix(
                self.seed,
                &["snapshot", &id.to_string(), &index.to_string()],
            );
            if self.faults.active && ((draw % 1000) as f64) < self.faults.transient * 1000.0 {
                let life = self.node(id).life;
                let took = 1 + self.faults.disk_ms;
                self.snapshots_failed += 1;
                self.at(self.now + took, Ev::SnapshotFailed { node: id, life });
                return;
            }
            let mut snapshot = job.snapshot;
            snapshot.set_data((job.encode)().into());
            let life = self.node(id).life;
            let took = self.rng.random_range(1..=1 + self.faults.disk_ms);
            let ev = Ev::SnapshotWritten {
                node: id,
                life,
                snapshot: Box::new(snapshot),
            };
            self.at(self.now + took, ev);
        }
    }

    /// Delivers what a node's turn sent: its peer messages (those sent
    /// after a synced write waited for the disk), what its observer heard
    /// (to the checker), and the answers its waiters got.
    fn after_turn(&mut self, id: u64) {
        let disk_ms = self.faults.disk_ms;
        let idx = (id - 1) as usize;
        let broken = self.nodes[idx].disk.take_broken();
        self.violations.extend(broken);
        let out = std::mem::take(&mut *self.nodes[idx].out.lock().expect("one thread"));
        for (m, after_sync) in out {
            self.send_raft(id, m, if after_sync { disk_ms } else { 0 });
        }
        let heard = std::mem::take(&mut *self.nodes[idx].ears.0.lock().expect("one thread"));
        for h in heard {
            self.heard(id, h);
        }
    }

    /// What a node's loop told its observer, held to the replicas' rules.
    fn heard(&mut self, id: u64, heard: Heard) {
        match heard {
            Heard::Entry { index, term } => match self.committed.get(&index) {
                Some((seen, _)) if *seen != term => self.violations.push(format!(
                    "replicas disagree: node {id} applied entry {index} of term {term}, another of term {seen}"
                )),
                Some(_) => {}
                None => {
                    self.committed.insert(index, (term, self.now));
                }
            },
            Heard::Membership {
                index,
                conf: None,
                ..
            } => self.violations.push(format!(
                "membership: node {id} refused the committed conf change at {index}"
            )),
            Heard::Membership {
                index,
                conf: Some(conf),
                stepped_down,
            } => {
                if stepped_down {
                    self.fault_log.push(format!(
                        "node {id} applied its own removal at {index} while leading, and stepped down"
                    ));
                }
                match self.conf_at.get(&index) {
                    Some(seen) if *seen != conf => self.violations.push(format!(
                        "replicas disagree: node {id} has membership {conf:?} after entry {index}, another {seen:?}"
                    )),
                    Some(_) => {}
                    None => {
                        self.conf_at.insert(index, conf);
                    }
                }
            }
            Heard::Restored => self.snapshots_installed += 1,
            Heard::Lead => self.leads += 1,
        }
    }

    fn send_raft(&mut self, from: u64, m: Message, extra_ms: i64) {
        let to = m.to;
        if self
            .nodes
            .get((to - 1) as usize)
            .is_some_and(|n| n.core.is_none())
        {
            // A down peer refuses the connection: the stream fails and the
            // transport says so (a cut link only loses what it carries).
            let when = self.now + extra_ms + self.rng.random_range(1..=5);
            self.at(when, Ev::Unreachable { from, to });
        }
        let snapshot = m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
        let left = self.transmit(
            Addr::Node(from),
            Addr::Node(to),
            Ev::Raft(Box::new(m)),
            extra_ms,
        );
        if snapshot {
            // A snapshot travels in its own call, whose end the sender
            // hears of: delivered, or failed (then raft sends it again).
            let back = self.now + extra_ms + 2 * self.faults.delay_max_ms + 1;
            let ev = Ev::SnapshotSent {
                from,
                to,
                delivered: left,
            };
            self.at(back, ev);
        }
    }

    /// The nodes of the membership the last committed change left (the
    /// founding voters if none): those the checker holds to every rule.
    fn members(&self) -> impl Iterator<Item = &Node> {
        let founding = self.opts.nodes;
        let conf = self.conf_at.values().next_back();
        self.nodes.iter().filter(move |n| match conf {
            None => n.id <= founding,
            Some(c) => [&c.voters, &c.learners, &c.voters_outgoing, &c.learners_next]
                .iter()
                .any(|ids| ids.contains(&n.id)),
        })
    }

    /// The operator's membership change at `i` in the plan, asked of the
    /// leader's loop as `tandem cluster` asks it (the loop makes it one at
    /// a time, by joint consensus, and has a leader it would remove hand
    /// over first), then asked again until it is in effect; then the next.
    fn membership(&mut self, i: usize) {
        if i != self.plan_at || i >= self.plan.len() {
            return;
        }
        let again = self.now + 100;
        let Some(leader) = (1..=self.nodes.len() as u64).find(|&id| self.leading(id)) else {
            self.at(again, Ev::Membership(i));
            return;
        };
        let conf = self.nodes[(leader - 1) as usize]
            .core
            .as_ref()
            .expect("a leading node is up")
            .conf_state()
            .clone();
        let voter = |id: u64| conf.voters.contains(&id);
        let learner = |id: u64| conf.learners.contains(&id);
        let joint = !conf.voters_outgoing.is_empty();
        // (the change to ask for, or whether the plan moves on: in effect or refused)
        let change = match self.plan[i] {
            Change::AddLearner(id) if voter(id) || learner(id) => Err(true),
            Change::AddLearner(id) => Ok(MembershipChange::AddLearner {
                id,
                address: address(id),
            }),
            Change::Promote(id) if voter(id) && !joint => Err(true),
            Change::Promote(id) if !learner(id) && !voter(id) => Err(false),
            Change::Promote(id) => Ok(MembershipChange::Promote { id }),
            Change::Remove(id) if !voter(id) && !learner(id) && !joint => Err(true),
            Change::Remove(id) if conf.voters == [id] => Err(false),
            Change::Remove(id) => Ok(MembershipChange::Remove { id }),
        };
        let change = match change {
            Err(in_effect) => {
                if !in_effect {
                    self.fault_log
                        .push(format!("{:?} refused at {}", self.plan[i], self.now));
                }
                self.plan_at += 1;
                if self.plan_at < self.plan.len() {
                    let next = self.now + self.rng.random_range(50..800);
                    self.at(next, Ev::Membership(self.plan_at));
                }
                return;
            }
            Ok(change) => change,
        };
        // Its answer does not matter: the plan looks at the membership.
        let (reply, _) = oneshot::channel();
        self.turn(
            leader,
            vec![Input::ChangeMembership { change, reply }],
            false,
        );
        self.at(again, Ev::Membership(i));
    }

    /// Leader, and has applied an entry of its own term (its state holds
    /// every committed entry): the real loop's condition to start driving.
    fn leading(&self, id: u64) -> bool {
        self.nodes[(id - 1) as usize]
            .core
            .as_ref()
            .is_some_and(|c| c.leading())
    }

    // ---- the drivers' calls, and the runtime they run on ----

    /// Lets the nodes' tasks (drivers) run until they wait on something
    /// the world must do: what they proposed reaches their loops, the
    /// calls they made leave for their participants. Bounded: work left
    /// over goes on at the next event.
    fn settle(&mut self, rt: &tokio::runtime::Runtime) {
        for _ in 0..64 {
            rt.block_on(tokio::task::yield_now());
            let mut moved = false;
            for id in 1..=self.nodes.len() as u64 {
                let inputs: Vec<Input<StateMachine>> = match &self.node(id).inputs {
                    Some(rx) => rx.try_iter().collect(),
                    None => Vec::new(),
                };
                if !inputs.is_empty() {
                    moved = true;
                    self.turn(id, inputs, false);
                }
            }
            let out = std::mem::take(&mut *self.calls_out.lock().expect("one thread"));
            moved |= !out.is_empty();
            for call in out {
                self.carry_call(call);
            }
            let answers = std::mem::take(&mut *self.answers.lock().expect("one thread"));
            moved |= !answers.is_empty();
            for (node, to, answer) in answers {
                self.send(Addr::Node(node), to, answer, 0);
            }
            if !moved {
                return;
            }
        }
    }

    /// A driver's call leaves for its participant over the network.
    fn carry_call(&mut self, call: OutCall) {
        if self.node(call.node).tasks.is_none() {
            return;
        }
        let call_id = self.next_call;
        self.next_call += 1;
        self.calls.insert(call_id, call.reply);
        let part = part_of(&call.endpoint);
        let ev = Ev::Call {
            part,
            node: call.node,
            call_id,
            gid: call.gid,
            branch_id: call.branch_id,
            op: call.op,
            fence: call.fence,
        };
        self.send(Addr::Node(call.node), Addr::Part(part), ev, 0);
    }

    // ---- clients ----

    /// Sends the client's current step (again, if `at` is still current:
    /// an unanswered call is retried, its result being ambiguous).
    fn client_step(&mut self, c: usize, token: u64) {
        let client = &self.clients[c];
        if client.done || client.token != token {
            return;
        }
        let at = client.at as u64;
        if client.invoked.is_none_or(|(step, _)| step != client.at) {
            let now = self.now;
            let client = &mut self.clients[c];
            client.invoked = Some((client.at, now));
        }
        let client = &self.clients[c];
        let Some(step) = client.steps.get(client.at).cloned() else {
            self.clients[c].done = true;
            return;
        };
        let step = match step {
            Step::Decide => {
                let gid = client.gid.clone();
                let draw = self.rng.random_range(0..100);
                let request = match (client.protocol, client.app_failed, draw) {
                    // A producer submits after its local commit and aborts
                    // after its local rollback — or dies first, and the
                    // check-back settles it.
                    (Protocol::Msg, false, 0..80) => Request::Commit(gid),
                    (Protocol::Msg, true, 0..80) => {
                        Request::Abort(gid, "the local transaction rolled back".into())
                    }
                    (Protocol::Msg, _, _) => {
                        self.clients[c].done = true;
                        return;
                    }
                    (Protocol::TwoPc | Protocol::ThreePc, _, 0..90) | (_, false, 0..80) => {
                        Request::Commit(gid)
                    }
                    (_, _, 0..95) => Request::Abort(gid, "the application gave up".into()),
                    // Abandoned: the deadline must end it.
                    _ => {
                        self.clients[c].done = true;
                        return;
                    }
                };
                // Retries resend the same decision.
                let client = &mut self.clients[c];
                let at = client.at;
                client.steps[at] = Step::Call(request.clone());
                Step::Call(request)
            }
            s => s,
        };
        let client = &self.clients[c];
        match step {
            Step::Call(request) => {
                let node = client.target;
                self.send(
                    Addr::Client(c),
                    Addr::Node(node),
                    Ev::ClientReq {
                        node,
                        client: c,
                        req: at,
                        request: Box::new(request),
                    },
                    0,
                );
            }
            Step::App {
                branch_id,
                op,
                part,
                ..
            } => {
                let gid = client.gid.clone();
                self.send(
                    Addr::Client(c),
                    Addr::Part(part),
                    Ev::AppCall {
                        part,
                        client: c,
                        req: at,
                        gid,
                        branch_id,
                        op,
                    },
                    0,
                );
            }
            Step::Decide => unreachable!("turned into a proposal above"),
            Step::Pause(ms) => {
                self.clients[c].at += 1;
                let wake = self.client_wake(c);
                self.at(self.now + ms, wake);
                return;
            }
        }
        let wake = self.client_wake(c);
        self.at(self.now + CLIENT_RETRY_MS, wake);
    }

    /// The client's next wake-up; any earlier one is void.
    fn client_wake(&mut self, c: usize) -> Ev {
        let client = &mut self.clients[c];
        client.token += 1;
        Ev::ClientWake(c, client.token)
    }

    /// The client's step is done: on to the next one.
    fn client_next(&mut self, c: usize) {
        self.clients[c].at += 1;
        let wake = self.client_wake(c);
        self.at(self.now, wake);
    }

    /// Serves a request at node `id` as its API would: `work`, given the
    /// node's service layer, runs as a task of the node, and the answer it
    /// makes goes to `to` — unless the node dies first (or is down).
    fn serve<F>(&mut self, id: u64, to: Addr, work: impl FnOnce(Arc<Transactions>) -> F)
    where
        F: std::future::Future<Output = Ev> + Send + 'static,
    {
        let answers = self.answers.clone();
        let node = self.node(id);
        let (Some(service), Some(tasks)) = (node.service.clone(), node.tasks.as_mut()) else {
            return;
        };
        let work = work(service);
        tasks.spawn(async move {
            let answer = work.await;
            answers.lock().expect("one thread").push((id, to, answer));
        });
    }

    /// A client's request reaches a node's service layer.
    fn client_request(&mut self, id: u64, c: usize, req: u64, request: Request) {
        self.serve(id, Addr::Client(c), |service| async move {
            let result = match request {
                Request::Begin(input) => service.begin(input).await.map(|(tx, _)| tx),
                Request::Register(input) => service.register(input).await,
                Request::Saga(input) => service.submit_saga(input).await.map(|(tx, _)| tx),
                Request::Message(input) => service.prepare_message(input).await.map(|(tx, _)| tx),
                // A 2PC or 3PC commit answers with the decision; a client
                // waits for it at most this long, then asks again.
                Request::Commit(gid) => service.commit(gid, false, Duration::from_secs(1)).await,
                Request::Abort(gid, reason) => service.abort(gid, reason, None).await,
            };
            Ev::ClientReply {
                client: c,
                req,
                reply: Answered::of(result),
            }
        });
    }

    fn client_reply(&mut self, c: usize, req: u64, reply: Answered) {
        let nodes = self.nodes.len() as u64;
        let client = &mut self.clients[c];
        if client.done || client.at as u64 != req {
            return;
        }
        let Step::Call(request) = &client.steps[client.at] else {
            return;
        };
        let name = request.name();
        match reply {
            Answered::Elsewhere => {
                // Not the leader, or not known: try another node soon.
                client.target = client.target % nodes + 1;
                let wake = self.client_wake(c);
                self.at(self.now + 20, wake);
            }
            Answered::Tx(tx) => {
                self.observed.push(Observed {
                    gid: client.gid.clone(),
                    what: name,
                    invoked_ms: client.invoked.map_or(self.now, |(_, t)| t),
                    returned_ms: self.now,
                    version: tx.version,
                    digest: digest(&tx),
                });
                self.acks.push(Ack {
                    gid: client.gid.clone(),
                    command: name,
                    tx,
                });
                if matches!(name, "Commit" | "Abort" | "SubmitSaga") {
                    client.done = true;
                } else {
                    self.client_next(c);
                }
            }
            // Refused (for example a register after the deadline aborted
            // it): the application stops here.
            Answered::Refused => client.done = true,
        }
    }

    fn app_reply(&mut self, c: usize, req: u64, answer: Option<Answer>) {
        let client = &mut self.clients[c];
        if client.done || client.at as u64 != req {
            return;
        }
        match answer {
            Some(Answer::Ok) => {}
            Some(Answer::No(_)) => client.app_failed = true,
            Some(Answer::Unavailable) | None => {
                client.app_tries += 1;
                if client.app_tries < 5 {
                    let wake = self.client_wake(c);
                    self.at(self.now + 50, wake);
                    return;
                }
                if client.protocol == Protocol::Msg {
                    // A producer that does not know whether its local
                    // transaction committed must neither submit nor abort
                    // (the outbox's `Unknown`): it stops, and the
                    // check-back decides. (Aborting here was a bug of this
                    // model's producer that the checker caught.)
                    client.done = true;
                    return;
                }
                client.app_failed = true;
            }
        }
        client.app_tries = 0;
        if client.app_failed {
            // A failed forward op: straight to the decision (which aborts).
            client.at = client.steps.len() - 2;
        }
        self.client_next(c);
    }
}

impl World {
    // ---- readers ----

    fn reader_step(&mut self, r: usize, token: u64) {
        if self.readers[r].token != token || self.now > self.opts.heal_at_ms + 500 {
            return;
        }
        let gid = format!("g{}", self.rng.random_range(0..self.opts.clients.max(1)));
        let node = self.rng.random_range(1..=self.opts.nodes);
        let now = self.now;
        let reader = &mut self.readers[r];
        reader.req += 1;
        reader.token += 1;
        reader.invoked_ms = now;
        reader.gid = gid.clone();
        reader.open = true;
        let (req, token) = (reader.req, reader.token);
        self.send(
            Addr::Reader(r),
            Addr::Node(node),
            Ev::GetReq {
                node,
                reader: r,
                req,
                gid,
            },
            0,
        );
        // No answer by then: given up (it says nothing about the history).
        self.at(now + 200, Ev::ReaderWake(r, token));
    }

    /// A reader's Get reaches a node: its service reads (a linearizable
    /// read through the leader's read index, on any member).
    fn get_request(&mut self, id: u64, reader: usize, req: u64, gid: String) {
        self.serve(id, Addr::Reader(reader), |service| async move {
            let seen = match service.get(&gid).await {
                Ok(tx) => Some(Some(tx)),
                Err(ServiceError::NotFound { .. }) => Some(None),
                Err(_) => None,
            };
            Ev::GetReply { reader, req, seen }
        });
    }

    fn get_reply(&mut self, r: usize, req: u64, seen: Option<Option<std::sync::Arc<Transaction>>>) {
        let now = self.now;
        let reader = &mut self.readers[r];
        if reader.req != req || !reader.open {
            return;
        }
        reader.open = false;
        if let Some(tx) = seen {
            self.observed.push(Observed {
                gid: reader.gid.clone(),
                what: "Get",
                invoked_ms: reader.invoked_ms,
                returned_ms: now,
                version: tx.as_ref().map_or(0, |t| t.version),
                digest: tx.as_deref().map_or(0, digest),
            });
        }
        reader.token += 1;
        let token = reader.token;
        let gap = self.rng.random_range(10..60);
        self.at(now + gap, Ev::ReaderWake(r, token));
    }
}

/// The state a snapshot holds (none yet: a founding member's).
fn restore(snap: &Snapshot) -> StateMachine {
    if snap.get_metadata().index == 0 {
        return StateMachine::new(BTreeMap::new());
    }
    <StateMachine as Replicated>::restore(snap.get_data())
        .expect("a snapshot this build wrote decodes")
}

/// A transaction's whole content, folded to 64 bits.
fn digest(tx: &Transaction) -> u64 {
    mix(0, &[&format!("{tx:?}")])
}

/// Runs one seed.
pub fn run(seed: u64, opts: &Options) -> Report {
    // The nodes' tasks run on one thread, on a clock only the world moves.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    let _entered = rt.enter();
    World::new(seed, opts.clone()).run(&rt)
}

/// The invariant a violation names: the text before its first colon, or,
/// for one a participant recorded (`gid/branch: what`), before the colon
/// after that.
fn invariant_of(violation: &str) -> &str {
    let mut parts = violation.splitn(3, ':');
    let first = parts.next().unwrap_or(violation);
    match parts.next() {
        Some(second) if first.contains('/') => second.trim(),
        _ => first,
    }
}

/// Shrinks a failing seed's fault schedule: leaves out one scheduled fault
/// at a time and keeps it out if the run still violates the invariant the
/// full run violated first, pass after pass until no single fault can go
/// (at most one pass per fault). Returns the options that replay the
/// smaller run and its report; `None` if the seed does not fail. Only the
/// scheduled faults (crashes, cuts, clock jumps, participants down) shrink;
/// the seed's rates of loss, duplication, delay and torn writes stay.
pub fn shrink(seed: u64, opts: &Options) -> Option<(Options, Report)> {
    let mut report = run(seed, opts);
    let invariant = invariant_of(report.violations.first()?).to_string();
    let mut opts = opts.clone();
    for _ in 0..report.faults_scheduled {
        let mut removed = false;
        for number in 0..report.faults_scheduled {
            if opts.skip_faults.contains(&number) {
                continue;
            }
            let mut fewer = opts.clone();
            fewer.skip_faults.insert(number);
            let tried = run(seed, &fewer);
            if tried
                .violations
                .iter()
                .any(|v| invariant_of(v) == invariant)
            {
                (opts, report) = (fewer, tried);
                removed = true;
            }
        }
        if !removed {
            break;
        }
    }
    Some((opts, report))
}
