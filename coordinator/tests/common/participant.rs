//! An in-memory 2PC participant for cluster tests: records every call it
//! receives and the effect each branch ended with, so tests can check
//! atomicity (no gid with one branch committed and another rolled back) and
//! idempotency (no effect applied twice) from the participants' side.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_sdk::participant::{
    BranchContext, BranchError, ParticipantServer, TwoPhase, TwoPhaseResource,
};
use tokio::net::TcpListener;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    Prepared,
    Committed,
    RolledBack,
}

#[derive(Default)]
pub struct Ledger {
    /// Every call in arrival order: (gid, branch, op).
    pub calls: Vec<(String, String, String)>,
    /// The state of each (gid, branch).
    pub effects: BTreeMap<(String, String), Effect>,
    /// Times a commit effect was applied per branch (must stay ≤ 1).
    pub commits_applied: BTreeMap<(String, String), u32>,
}

#[derive(Clone, Default)]
pub struct Recorder {
    pub ledger: Arc<Mutex<Ledger>>,
    /// Gids whose prepare votes no.
    pub vote_no: Arc<Mutex<HashSet<String>>>,
    /// Delay before answering a prepare.
    pub prepare_delay: Arc<Mutex<Duration>>,
}

impl TwoPhaseResource for Recorder {
    async fn prepare(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), BranchError> {
        let delay = *self.prepare_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut l = self.ledger.lock().unwrap();
        l.calls
            .push((ctx.gid.clone(), ctx.branch_id.clone(), "prepare".into()));
        if self.vote_no.lock().unwrap().contains(&ctx.gid) {
            return Err(BranchError::Failure("vote no".into()));
        }
        let key = (ctx.gid.clone(), ctx.branch_id.clone());
        match l.effects.get(&key) {
            Some(Effect::RolledBack) => Err(BranchError::Failure("already rolled back".into())),
            Some(_) => Ok(()),
            None => {
                l.effects.insert(key, Effect::Prepared);
                Ok(())
            }
        }
    }

    async fn commit(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        let mut l = self.ledger.lock().unwrap();
        l.calls
            .push((ctx.gid.clone(), ctx.branch_id.clone(), "commit".into()));
        let key = (ctx.gid.clone(), ctx.branch_id.clone());
        match l.effects.get(&key) {
            Some(Effect::Committed) => Ok(()),
            Some(Effect::Prepared) => {
                l.effects.insert(key.clone(), Effect::Committed);
                *l.commits_applied.entry(key).or_default() += 1;
                Ok(())
            }
            other => Err(BranchError::Failure(format!(
                "commit of a branch in state {other:?}"
            ))),
        }
    }

    async fn rollback(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        let mut l = self.ledger.lock().unwrap();
        l.calls
            .push((ctx.gid.clone(), ctx.branch_id.clone(), "rollback".into()));
        let key = (ctx.gid.clone(), ctx.branch_id.clone());
        match l.effects.get(&key) {
            Some(Effect::Committed) => Err(BranchError::Failure(
                "rollback of a committed branch".into(),
            )),
            _ => {
                l.effects.insert(key, Effect::RolledBack);
                Ok(())
            }
        }
    }
}

/// A running recording participant.
pub struct TestParticipant {
    pub recorder: Recorder,
    /// http://127.0.0.1:PORT
    pub http: String,
    /// grpc://127.0.0.1:PORT (same server)
    pub grpc: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestParticipant {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestParticipant {
    pub async fn start() -> TestParticipant {
        let recorder = Recorder::default();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind participant");
        let address = listener.local_addr().expect("address");
        let server = ParticipantServer::new(TwoPhase(recorder.clone()));
        let task = tokio::spawn(async move {
            let _ = tandem_sdk::participant::serve(listener, server, std::future::pending()).await;
        });
        TestParticipant {
            recorder,
            http: format!("http://{address}"),
            grpc: format!("grpc://{address}"),
            task,
        }
    }

    /// Checks atomicity across `participants` for `gid`: every branch that
    /// saw phase two ended the same way. Returns that outcome.
    pub fn outcome_of(participants: &[&TestParticipant], gid: &str) -> Option<Effect> {
        let mut seen = None;
        for p in participants {
            let l = p.recorder.ledger.lock().unwrap();
            for ((g, _), effect) in &l.effects {
                if g != gid {
                    continue;
                }
                let effect = *effect;
                match seen {
                    None => seen = Some(effect),
                    Some(s) if s == effect => {}
                    Some(s) => panic!("atomicity broken for {gid}: {s:?} and {effect:?}"),
                }
            }
        }
        seen
    }
}

/// What a saga or TCC participant did, in one global order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub gid: String,
    pub branch: String,
    pub op: String,
    /// False when the call was a no-op (a repeat, or an undo of nothing).
    pub effect: bool,
}

#[derive(Default)]
pub struct StepLog {
    pub events: Vec<Event>,
    /// (gid, branch) → done by its forward op (action/try) and not undone.
    done: HashSet<(String, String)>,
    /// (gid, branch) → undone (or undone before it ever ran).
    undone: HashSet<(String, String)>,
    confirmed: HashSet<(String, String)>,
    /// Actions of a gid running right now, and the most seen at once.
    pub running: BTreeMap<String, usize>,
    pub max_running: BTreeMap<String, usize>,
}

/// An in-memory saga step / TCC resource with barrier semantics, recording
/// every call's effect. Behaviour is chosen per (gid, branch) by the test.
#[derive(Clone, Default)]
pub struct StepRecorder {
    pub log: Arc<Mutex<StepLog>>,
    /// (gid, branch) whose forward op is refused (a business "no").
    pub refuse: Arc<Mutex<HashSet<(String, String)>>>,
    /// How long a forward op takes.
    pub action_delay: Arc<Mutex<Duration>>,
    /// How long an undo takes.
    pub undo_delay: Arc<Mutex<Duration>>,
    /// How long a confirm of the named branch takes.
    pub confirm_delay: Arc<Mutex<HashMap<String, Duration>>>,
}

impl StepRecorder {
    fn key(ctx: &BranchContext) -> (String, String) {
        (ctx.gid.clone(), ctx.branch_id.clone())
    }

    fn push(log: &mut StepLog, ctx: &BranchContext, effect: bool) {
        log.events.push(Event {
            gid: ctx.gid.clone(),
            branch: ctx.branch_id.clone(),
            op: ctx.op.clone(),
            effect,
        });
    }

    async fn forward(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        {
            let mut l = self.log.lock().unwrap();
            let running = l.running.entry(ctx.gid.clone()).or_default();
            *running += 1;
            let now = *running;
            let max = l.max_running.entry(ctx.gid.clone()).or_default();
            *max = (*max).max(now);
        }
        let delay = *self.action_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut l = self.log.lock().unwrap();
        *l.running.get_mut(&ctx.gid).expect("counted above") -= 1;
        let key = Self::key(ctx);
        if l.undone.contains(&key) {
            Self::push(&mut l, ctx, false);
            return Err(BranchError::Failure("already undone".into()));
        }
        if self.refuse.lock().unwrap().contains(&key) {
            Self::push(&mut l, ctx, false);
            return Err(BranchError::Failure(format!(
                "{} refused on purpose",
                ctx.branch_id
            )));
        }
        let effect = l.done.insert(key);
        Self::push(&mut l, ctx, effect);
        Ok(())
    }

    async fn undo(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        let delay = *self.undo_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut l = self.log.lock().unwrap();
        let key = Self::key(ctx);
        let effect = !l.undone.contains(&key) && l.done.remove(&key);
        l.undone.insert(key);
        Self::push(&mut l, ctx, effect);
        Ok(())
    }

    async fn confirm(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        let delay = self
            .confirm_delay
            .lock()
            .unwrap()
            .get(&ctx.branch_id)
            .copied();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut l = self.log.lock().unwrap();
        let key = Self::key(ctx);
        if !l.done.contains(&key) {
            return Err(BranchError::Failure("confirm without a try".into()));
        }
        let effect = l.confirmed.insert(key);
        Self::push(&mut l, ctx, effect);
        Ok(())
    }

    /// The effects recorded for `gid`, in order: (branch, op).
    pub fn effects(&self, gid: &str) -> Vec<(String, String)> {
        self.log
            .lock()
            .unwrap()
            .events
            .iter()
            .filter(|e| e.gid == gid && e.effect)
            .map(|e| (e.branch.clone(), e.op.clone()))
            .collect()
    }
}

impl tandem_sdk::participant::SagaStep for StepRecorder {
    async fn action(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        self.forward(ctx).await
    }

    async fn compensate(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        self.undo(ctx).await
    }
}

impl tandem_sdk::participant::TccResource for StepRecorder {
    async fn try_(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        self.forward(ctx).await
    }

    async fn confirm(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        StepRecorder::confirm(self, ctx).await
    }

    async fn cancel(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        self.undo(ctx).await
    }
}

/// A running recorder, served as a saga participant and a TCC participant
/// (the same recorder behind both).
pub struct StepService {
    pub recorder: StepRecorder,
    /// Base URL of the saga server (action, compensate).
    pub saga: String,
    /// Base URL of the TCC server (try, confirm, cancel).
    pub tcc: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for StepService {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl StepService {
    pub async fn start() -> StepService {
        let recorder = StepRecorder::default();
        let mut tasks = Vec::new();
        let saga_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tcc_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let saga = format!("http://{}", saga_listener.local_addr().unwrap());
        let tcc = format!("http://{}", tcc_listener.local_addr().unwrap());
        let saga_server = ParticipantServer::new(tandem_sdk::participant::Saga(recorder.clone()));
        let tcc_server = ParticipantServer::new(tandem_sdk::participant::Tcc(recorder.clone()));
        tasks.push(tokio::spawn(async move {
            let _ =
                tandem_sdk::participant::serve(saga_listener, saga_server, std::future::pending())
                    .await;
        }));
        tasks.push(tokio::spawn(async move {
            let _ =
                tandem_sdk::participant::serve(tcc_listener, tcc_server, std::future::pending())
                    .await;
        }));
        StepService {
            recorder,
            saga,
            tcc,
            tasks,
        }
    }
}
