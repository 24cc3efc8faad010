//! `tandem bench`: closed-loop load against a running cluster. Reports
//! throughput and latency percentiles; it measures, it asserts nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use serde_json::json;
use tandem_sdk::Step;
use tandem_sdk::participant::{
    BranchContext, BranchError, ParticipantServer, Saga, SagaStep, Tcc, TccResource, ThreePhase,
    ThreePhaseResource, TwoPhase, TwoPhaseResource,
};
use tandem_sdk::proto as pb;

use super::EndpointArg;

/// How the load is shaped; shared by every workload.
#[derive(Args, Debug)]
pub struct Load {
    #[command(flatten)]
    endpoint: EndpointArg,
    /// Callers running at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Not counted: lets connections and the leader warm up.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Open loop: start this many transactions per second in all, spread
    /// over the callers, and measure latency from each one's scheduled start
    /// (so a stall is not hidden by callers waiting). Without it, each caller
    /// starts its next transaction as soon as the last one ends.
    #[arg(long)]
    rate: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also print when the calls slower than this many milliseconds
    /// ended, in 100 ms bins from the start of the measurement (its
    /// wall-clock time printed, to match the bins with the nodes' logs):
    /// a tail that comes in bursts is a stall (one pause holds every
    /// caller), one spread over the run is queueing.
    #[arg(long, value_name = "MS")]
    tail_ms: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Begin transactions (no branches).
    Begin {
        #[command(flatten)]
        load: Load,
        /// Size of each transaction's payload.
        #[arg(long, default_value_t = 0)]
        payload_bytes: usize,
    },
    /// Whole 2PC transactions: begin, register two branches on a no-op
    /// HTTP participant this command serves itself, commit and wait until
    /// both branches committed.
    #[command(name = "2pc")]
    TwoPc {
        #[command(flatten)]
        load: Load,
    },
    /// Whole 3PC transactions: begin, register two branches on a no-op
    /// HTTP participant this command serves itself, commit and wait until
    /// both branches committed (can_commit, pre_commit, do_commit each).
    #[command(name = "3pc")]
    ThreePc {
        #[command(flatten)]
        load: Load,
    },
    /// Two-step sequential sagas on a no-op HTTP participant this command
    /// serves itself; each call waits until the saga completed.
    Saga {
        #[command(flatten)]
        load: Load,
        /// Write every call the participant received to this file, one
        /// line each: `<unix time µs> <gid> <branch> <op>` (what
        /// scripts/bench-failover.sh reads to see when sagas moved again).
        #[arg(long)]
        call_log: Option<std::path::PathBuf>,
        /// Drive the same sagas through a DTM-compatible coordinator at this
        /// URL instead (a peer, for comparison: `POST /api/dtmsvr/submit`);
        /// a saga counts once its second step's action has been called.
        #[arg(long, value_name = "URL", conflicts_with = "call_log")]
        peer_dtm: Option<String>,
        /// Submit through Tandem's HTTP/JSON API at this URL (the leader's
        /// `--http-listen`, e.g. http://127.0.0.1:7181) instead of gRPC,
        /// with one keep-alive connection per caller.
        #[arg(long, value_name = "URL", conflicts_with_all = ["call_log", "peer_dtm"])]
        http_api: Option<String>,
        /// Submit each saga as a call of its own (`SubmitSaga`) instead of
        /// on the client's stream of submissions (`SubmitSagas`, the SDK's
        /// default).
        #[arg(long, conflicts_with_all = ["peer_dtm", "http_api"])]
        unary: bool,
    },
    /// Two-branch TCC transactions: begin, try both branches (a no-op HTTP
    /// participant this command serves), commit and wait for both confirms.
    Tcc {
        #[command(flatten)]
        load: Load,
    },
    /// Transactional messages to one no-op HTTP destination this command
    /// serves: prepare, then submit; latency runs from Submit to the
    /// delivery's arrival at the destination.
    Msg {
        #[command(flatten)]
        load: Load,
    },
    /// The state machine alone, no node: applies the log entries of this
    /// many two-step sagas (submission, then both steps' results, 64 in
    /// flight) as every replica applies them, decoding included, and
    /// prints the time per saga. Deterministic input, so under
    /// `valgrind --tool=callgrind` two builds compare by instructions.
    Apply {
        #[arg(long, default_value_t = 100_000)]
        sagas: usize,
    },
}

/// A participant that says yes to everything at once.
#[derive(Clone, Copy)]
struct NoOp;

impl SagaStep for NoOp {
    async fn action(&self, _: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        Ok(())
    }

    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        Ok(())
    }
}

impl TccResource for NoOp {
    async fn try_(&self, _: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        Ok(())
    }

    async fn confirm(&self, _: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        Ok(())
    }

    async fn cancel(&self, _: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        Ok(())
    }
}

impl ThreePhaseResource for NoOp {
    async fn can_commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        Ok(())
    }

    async fn pre_commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        Ok(())
    }

    async fn do_commit(&self, _: &BranchContext) -> Result<(), BranchError> {
        Ok(())
    }

    async fn abort(&self, _: &BranchContext) -> Result<(), BranchError> {
        Ok(())
    }

    async fn in_doubt(&self) -> Result<Vec<(String, String)>, BranchError> {
        Ok(Vec::new())
    }
}

impl TwoPhaseResource for NoOp {
    async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        Ok(())
    }

    async fn commit(&self, _: &BranchContext) -> Result<(), BranchError> {
        Ok(())
    }

    async fn rollback(&self, _: &BranchContext) -> Result<(), BranchError> {
        Ok(())
    }
}

/// A no-op saga participant that notes every call it receives: when, and
/// for which transaction, branch and op.
#[derive(Clone, Default)]
struct CallLog(Arc<std::sync::Mutex<Vec<Call>>>);

/// When (unix µs), gid, branch, op.
type Call = (u64, String, String, &'static str);

impl CallLog {
    fn note(&self, ctx: &BranchContext, op: &'static str) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let entry = (at, ctx.gid.clone(), ctx.branch_id.clone(), op);
        self.0.lock().expect("call log lock").push(entry);
    }

    fn write(&self, path: &std::path::Path) -> anyhow::Result<()> {
        use std::io::Write;
        let calls = std::mem::take(&mut *self.0.lock().expect("call log lock"));
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (at, gid, branch, op) in calls {
            writeln!(out, "{at} {gid} {branch} {op}")?;
        }
        out.flush()?;
        Ok(())
    }
}

impl SagaStep for CallLog {
    async fn action(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        self.note(ctx, "action");
        Ok(())
    }

    async fn compensate(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), BranchError> {
        self.note(ctx, "compensate");
        Ok(())
    }
}

/// Serves `handler` on a loopback port for the bench's lifetime; returns its
/// base URL.
async fn serve_participant<H: tandem_sdk::participant::Handler>(
    handler: H,
) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = ParticipantServer::new(handler);
    tokio::spawn(async move {
        let _ = tandem_sdk::participant::serve(listener, server, std::future::pending()).await;
    });
    Ok(base)
}

/// A producer whose every local transaction committed: the check-back
/// always says so (the bench submits, so it is asked only after a lost
/// Submit).
struct Committed;

impl tandem_sdk::participant::Handler for Committed {
    async fn handle(&self, _: tandem_sdk::participant::BranchRequest) -> Result<(), BranchError> {
        Ok(())
    }
}

/// Deliveries awaited, by message id.
type Awaited =
    Arc<std::sync::Mutex<std::collections::HashMap<String, tokio::sync::oneshot::Sender<Instant>>>>;

/// Tells whoever awaits `id` that it arrived (once).
fn arrived(awaited: &Awaited, id: &str) {
    if let Some(waiter) = awaited.lock().expect("awaited lock").remove(id) {
        let _ = waiter.send(Instant::now());
    }
}

/// A no-op HTTP destination that tells whoever awaits a message id that it
/// arrived; its URL.
async fn serve_destination(awaited: Awaited) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/deliver", listener.local_addr()?);
    let app = axum::Router::new().route(
        "/deliver",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let awaited = awaited.clone();
            async move {
                let id = headers
                    .get(tandem_sdk::wire::headers::MESSAGE_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                arrived(&awaited, id);
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Apply { sagas } => {
            apply_sagas(sagas);
            Ok(())
        }
        BenchCommand::Begin {
            load,
            payload_bytes,
        } => {
            let client = load.endpoint.client()?;
            let payload = vec![b'x'; payload_bytes];
            load.run("begin", move || {
                let client = client.clone();
                let request = pb::BeginRequest {
                    gid: tandem_sdk::new_gid(),
                    protocol: pb::Protocol::Saga as i32,
                    payload: payload.clone(),
                    ..Default::default()
                };
                async move { client.begin_with(request).await.map(|_| ()) }
            })
            .await
        }
        BenchCommand::TwoPc { load } => {
            let base = serve_participant(TwoPhase(NoOp)).await?;
            let ops = ["prepare", "commit", "rollback"];
            coordinator_driven(&load, "2pc", pb::Protocol::TwoPc, &base, &ops).await
        }
        BenchCommand::ThreePc { load } => {
            let base = serve_participant(ThreePhase(NoOp)).await?;
            let ops = ["can_commit", "pre_commit", "do_commit", "abort"];
            coordinator_driven(&load, "3pc", pb::Protocol::ThreePc, &base, &ops).await
        }
        BenchCommand::Saga {
            load,
            peer_dtm: Some(dtm),
            ..
        } => dtm_sagas(&load, &dtm).await,
        BenchCommand::Saga {
            load,
            http_api: Some(api),
            ..
        } => http_sagas(&load, &api).await,
        BenchCommand::Saga {
            load,
            call_log,
            unary,
            ..
        } => {
            let client = load.endpoint.builder()?.submit_stream(!unary).build()?;
            let calls = CallLog::default();
            let base = match &call_log {
                None => serve_participant(Saga(NoOp)).await?,
                Some(_) => serve_participant(Saga(calls.clone())).await?,
            };
            let ran = load
                .run("saga", move || {
                    let (client, base) = (client.clone(), base.clone());
                    async move {
                        let saga = client
                            .saga()
                            .step(Step::service("a", &base))
                            .step(Step::service("b", &base));
                        committed(saga.submit_and_wait(Duration::from_secs(30)).await?)
                    }
                })
                .await;
            if let Some(path) = call_log {
                calls.write(&path)?;
            }
            ran
        }
        BenchCommand::Msg { load } => {
            let client = load.endpoint.client()?;
            let check_back = serve_participant(Committed).await?;
            let awaited: Awaited = Arc::default();
            let destination = serve_destination(awaited.clone()).await?;
            load.run_from("msg", move || {
                let (client, awaited) = (client.clone(), awaited.clone());
                let (check_back, destination) = (check_back.clone(), destination.clone());
                async move {
                    let message = client.message(&check_back).to(&destination, Vec::new());
                    let gid = message.gid_str().to_string();
                    message.prepare().await?;
                    let (arrived, arrival) = tokio::sync::oneshot::channel();
                    let id = tandem_sdk::wire::message_id(&gid, "1");
                    awaited
                        .lock()
                        .expect("awaited lock")
                        .insert(id.clone(), arrived);
                    let submitted = Instant::now();
                    let result = client.submit(&gid).await;
                    let delivered = match result {
                        Ok(_) => tokio::time::timeout(Duration::from_secs(30), arrival).await,
                        Err(e) => {
                            awaited.lock().expect("awaited lock").remove(&id);
                            return Err(e);
                        }
                    };
                    match delivered {
                        Ok(Ok(_)) => Ok(submitted),
                        _ => {
                            awaited.lock().expect("awaited lock").remove(&id);
                            Err(tandem_sdk::Error::Unavailable {
                                elapsed: Duration::from_secs(30),
                                last: format!("message {gid} not delivered within 30 s"),
                            })
                        }
                    }
                }
            })
            .await
        }
        BenchCommand::Tcc { load } => {
            let client = load.endpoint.client()?;
            let base = serve_participant(Tcc(NoOp)).await?;
            load.run("tcc", move || {
                let (client, base) = (client.clone(), base.clone());
                async move {
                    let tx = client
                        .begin_scope(pb::Protocol::Tcc, pb::TxOptions::default())
                        .await?;
                    tx.try_branch("a", &base, Vec::new()).await?;
                    tx.try_branch("b", &base, Vec::new()).await?;
                    committed(tx.commit().await?)
                }
            })
            .await
        }
    }
}

/// Two-step sagas through a DTM-compatible coordinator (the peer in
/// BENCHMARKS.md): submit, then wait until the no-op participant served
/// here receives the second step's action. The peer finishes its own
/// bookkeeping after that, so this favours it slightly.
async fn dtm_sagas(load: &Load, dtm: &str) -> anyhow::Result<()> {
    let awaited: Awaited = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let notify = awaited.clone();
    let app = axum::Router::new()
        .route(
            "/step/{step}",
            axum::routing::post(
                move |axum::extract::Path(step): axum::extract::Path<String>,
                      query: axum::extract::Query<std::collections::HashMap<String, String>>| {
                    let awaited = notify.clone();
                    async move {
                        if step == "b"
                            && let Some(gid) = query.get("gid")
                        {
                            arrived(&awaited, gid);
                        }
                        axum::Json(json!({ "dtm_result": "SUCCESS" }))
                    }
                },
            ),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(load.concurrency)
        .build()?;
    let submit = format!("{}/api/dtmsvr/submit", dtm.trim_end_matches('/'));
    let steps: serde_json::Value = ["a", "b"]
        .iter()
        .map(|s| json!({ "action": format!("{base}/step/{s}"), "compensate": format!("{base}/step/undo-{s}") }))
        .collect();
    load.run("saga (peer: DTM-compatible)", move || {
        let (http, submit, awaited) = (http.clone(), submit.clone(), awaited.clone());
        let steps = steps.clone();
        async move {
            let gid = tandem_sdk::new_gid();
            let (arrived, arrival) = tokio::sync::oneshot::channel();
            awaited
                .lock()
                .expect("awaited lock")
                .insert(gid.clone(), arrived);
            let body = json!({ "gid": gid, "trans_type": "saga", "steps": steps });
            let finished = match http.post(&submit).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    match tokio::time::timeout(Duration::from_secs(30), arrival).await {
                        Ok(Ok(_)) => Ok(()),
                        _ => Err(format!("saga {gid} not finished within 30 s")),
                    }
                }
                Ok(r) => Err(format!("submit of {gid} answered {}", r.status())),
                Err(e) => Err(format!("submit of {gid}: {e}")),
            };
            awaited.lock().expect("awaited lock").remove(&gid);
            finished.map_err(failed)
        }
    })
    .await
}

/// Two-step sagas submitted through the HTTP/JSON API (`POST /v1/sagas`
/// with `wait`), to compare its cost per request with gRPC's.
async fn http_sagas(load: &Load, api: &str) -> anyhow::Result<()> {
    let base = serve_participant(Saga(NoOp)).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(load.concurrency)
        .http1_only()
        .build()?;
    let submit = format!("{}/v1/sagas", api.trim_end_matches('/'));
    let steps: serde_json::Value = ["a", "b"]
        .iter()
        .map(|s| {
            json!({
                "branch_id": s,
                "action": tandem_sdk::wire::participant_endpoint(&base, tandem_sdk::wire::ops::ACTION),
                "compensate": tandem_sdk::wire::participant_endpoint(&base, tandem_sdk::wire::ops::COMPENSATE),
            })
        })
        .collect();
    load.run("saga (HTTP/JSON API)", move || {
        let (http, submit, steps) = (http.clone(), submit.clone(), steps.clone());
        async move {
            let gid = tandem_sdk::new_gid();
            let body =
                json!({ "gid": gid, "steps": steps, "wait": true, "wait_timeout_ms": 30_000 });
            let response = http
                .post(&submit)
                .json(&body)
                .send()
                .await
                .map_err(|e| failed(format!("submit of {gid}: {e}")))?;
            let status = response.status();
            let answer: serde_json::Value = response
                .json()
                .await
                .map_err(|e| failed(format!("answer to {gid}: {e}")))?;
            match answer["transaction"]["state"].as_str() {
                Some("committed") if status.is_success() => Ok(()),
                _ => Err(failed(format!("saga {gid}: {status} {answer}"))),
            }
        }
    })
    .await
}

/// Whole transactions of a protocol the coordinator drives (2PC, 3PC):
/// begin, two branches on the no-op participant at `base`, commit and wait
/// until both branches committed.
async fn coordinator_driven(
    load: &Load,
    what: &str,
    protocol: pb::Protocol,
    base: &str,
    ops: &[&str],
) -> anyhow::Result<()> {
    let client = load.endpoint.client()?;
    let ops: Arc<Vec<(String, String)>> = Arc::new(
        ops.iter()
            .map(|op| (op.to_string(), format!("{base}/tandem/{op}")))
            .collect(),
    );
    load.run(what, move || {
        let (client, ops) = (client.clone(), ops.clone());
        async move {
            let gid = tandem_sdk::new_gid();
            client
                .begin_with(pb::BeginRequest {
                    gid: gid.clone(),
                    protocol: protocol as i32,
                    ..Default::default()
                })
                .await?;
            let refs: Vec<(&str, &str)> =
                ops.iter().map(|(o, e)| (o.as_str(), e.as_str())).collect();
            for branch in ["a", "b"] {
                client
                    .register_branch(&gid, branch, &refs, Vec::new())
                    .await?;
            }
            committed(client.commit(&gid, true, Duration::from_secs(30)).await?)
        }
    })
    .await
}

/// A transaction that ended other than committed counts as an error.
fn committed(tx: pb::Transaction) -> Result<(), tandem_sdk::Error> {
    if tx.state == pb::TxState::Committed as i32 {
        return Ok(());
    }
    Err(failed(format!(
        "transaction {} ended in state {}",
        tx.gid, tx.state
    )))
}

/// A call the bench counts as an error, and why.
fn failed(last: String) -> tandem_sdk::Error {
    tandem_sdk::Error::Unavailable {
        elapsed: Duration::ZERO,
        last,
    }
}

impl Load {
    async fn run<F, Fut>(&self, what: &str, op: F) -> anyhow::Result<()>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), tandem_sdk::Error>> + Send,
    {
        let op = Arc::new(op);
        self.run_from(what, move || {
            let call = op();
            async move { call.await.map(|()| None::<Instant>) }
        })
        .await
    }

    /// Like [`Load::run`], for calls whose latency starts at an instant
    /// they return (`Some`) rather than when they began (`None`).
    async fn run_from<F, Fut, T>(&self, what: &str, op: F) -> anyhow::Result<()>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<T, tandem_sdk::Error>> + Send,
        T: Into<Option<Instant>>,
    {
        anyhow::ensure!(self.concurrency > 0, "--concurrency must be at least 1");
        anyhow::ensure!(self.rate != Some(0), "--rate must be at least 1 per second");
        let op = move || {
            let call = op();
            async move { call.await.map(Into::into) }
        };
        let tail = self.tail_ms.map(Duration::from_millis);
        let report = drive(
            self.concurrency,
            self.rate,
            self.warmup,
            self.duration,
            tail,
            op,
        )
        .await;
        report.print(what, self.concurrency, self.rate, self.json);
        Ok(())
    }
}

pub struct Report {
    ok: u64,
    errors: u64,
    elapsed: Duration,
    histogram: Histogram<u64>,
    last_error: Option<String>,
    /// With `--tail-ms`: when each slower call ended (from the start of
    /// the measurement), at most [`TAIL_KEPT_MAX`] of them.
    tail: Option<(Duration, Vec<Duration>)>,
    /// The wall-clock time the measurement started, so the tail's bins
    /// can be matched with the nodes' logs and traces.
    measured_from: std::time::SystemTime,
}

/// Slow calls `--tail-ms` keeps per caller.
const TAIL_KEPT_MAX: usize = 10_000;

impl Report {
    fn print(&self, what: &str, concurrency: usize, rate: Option<u32>, as_json: bool) {
        let per_second = self.ok as f64 / self.elapsed.as_secs_f64();
        let ms = |q: f64| self.histogram.value_at_quantile(q) as f64 / 1000.0;
        let max_ms = self.histogram.max() as f64 / 1000.0;
        if as_json {
            outln!(
                "{}",
                json!({
                    "bench": what,
                    "concurrency": concurrency,
                    "target_rate": rate,
                    "ok": self.ok,
                    "errors": self.errors,
                    "seconds": self.elapsed.as_secs_f64(),
                    "per_second": per_second,
                    "p50_ms": ms(0.5),
                    "p99_ms": ms(0.99),
                    "p999_ms": ms(0.999),
                    "max_ms": max_ms,
                })
            );
        } else {
            let shape = match rate {
                Some(rate) => format!("open loop at {rate}/s over {concurrency} callers"),
                None => format!("closed loop with {concurrency} callers"),
            };
            outln!(
                "{what}: {per_second:.0}/s over {:.1}s, {shape}; {} ok, {} errors\n\
                 latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {max_ms:.2}",
                self.elapsed.as_secs_f64(),
                self.ok,
                self.errors,
                ms(0.5),
                ms(0.99),
                ms(0.999),
            );
        }
        if let Some(e) = &self.last_error {
            eprintln!("last error: {e}");
        }
        if let Some((over, ended)) = &self.tail {
            let mut bins = std::collections::BTreeMap::<u128, usize>::new();
            for at in ended {
                *bins.entry(at.as_millis() / 100).or_default() += 1;
            }
            let bins: Vec<String> = bins
                .iter()
                .map(|(bin, n)| format!("{:.1}s:{n}", *bin as f64 / 10.0))
                .collect();
            eprintln!(
                "calls over {} ms: {}, ended in (100 ms bins from {}) {}",
                over.as_millis(),
                ended.len(),
                humantime::format_rfc3339_millis(self.measured_from),
                bins.join(" ")
            );
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// Runs `concurrency` callers calling `op`. Closed loop (`rate` None): each
/// caller calls again as soon as its last call ended, and latency is the
/// call's own time. Open loop: caller `i` starts its calls on a fixed
/// schedule, `rate / concurrency` per second, and latency runs from the
/// scheduled start, so time spent behind schedule counts. Only calls
/// scheduled after `warmup` that end before `warmup + duration` count.
async fn drive<F, Fut>(
    concurrency: usize,
    rate: Option<u32>,
    warmup: Duration,
    duration: Duration,
    tail: Option<Duration>,
    op: F,
) -> Report
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Option<Instant>, tandem_sdk::Error>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let measure_from = start + warmup;
    let measured_from = std::time::SystemTime::now() + warmup;
    let stop_at = measure_from + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    // Open loop: caller i's k-th call is due at start + (i + k·n) / rate.
    let pace = rate.map(|rate| Duration::from_secs_f64(1.0 / f64::from(rate)));
    let mut tasks = Vec::with_capacity(concurrency);
    for caller in 0..concurrency {
        let op = op.clone();
        let stop = stop.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut histogram = histogram();
            let mut last_error = None;
            let mut slow = Vec::new();
            let mut due = pace.map(|p| start + p * caller as u32);
            while !stop.load(Ordering::Relaxed) {
                if let Some(at) = due {
                    if at >= stop_at {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                }
                let began = due.unwrap_or_else(Instant::now);
                let result = op().await;
                let ended = Instant::now();
                due = due.zip(pace).map(|(at, p)| at + p * concurrency as u32);
                if began < measure_from || ended > stop_at {
                    continue;
                }
                match result {
                    Ok(from) => {
                        let from = from.unwrap_or(began).max(began);
                        let took = ended.duration_since(from);
                        let _ = histogram.record(took.as_micros() as u64);
                        if tail.is_some_and(|over| took > over) && slow.len() < TAIL_KEPT_MAX {
                            slow.push(ended.duration_since(measure_from));
                        }
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        last_error = Some(e.to_string());
                    }
                }
            }
            (histogram, last_error, slow)
        }));
    }
    tokio::time::sleep_until(stop_at.into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = histogram();
    let mut last_error = None;
    let mut slow = Vec::new();
    for task in tasks {
        if let Ok((h, e, s)) = task.await {
            let _ = total.add(h);
            last_error = last_error.or(e);
            slow.extend(s);
        }
    }
    Report {
        ok: total.len(),
        errors: errors.load(Ordering::Relaxed),
        elapsed: duration,
        histogram: total,
        last_error,
        tail: tail.map(|over| (over, slow)),
        measured_from,
    }
}

/// `tandem bench apply`: the entries of `sagas` two-step sagas, encoded
/// as the leader proposes them, applied through the replica's own entry
/// point. The gids are UUIDv7s a few per millisecond, as the SDK mints
/// them (their leading digits shared, as in the table); a read view is
/// taken every 64 entries, as readers and the status publisher do.
fn apply_sagas(sagas: usize) {
    use tandem_coordinator::model::command::{Command, OpOutcome, SagaStepSpec};
    use tandem_coordinator::model::types::{Op, RetryPolicy, TxOptions};
    use tandem_coordinator::raft::replicated::Replicated;
    use tandem_coordinator::state::StateMachine;

    const IN_FLIGHT: usize = 64;
    let start_ms: i64 = 1_790_000_000_000;
    let gid = |i: usize| {
        let ms = start_ms as u64 + (i / 8) as u64;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(ms << 16 | 0x7000).to_be_bytes());
        // UUIDv7's random bits, from a fixed mix of `i` (splitmix64).
        let mut z = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        id[6] |= (z >> 56) as u8 & 0x0f;
        id[7] = (z >> 48) as u8;
        id[8..]
            .copy_from_slice(&(0x8000_0000_0000_0000 | (z & 0x3fff_ffff_ffff_ffff)).to_be_bytes());
        uuid::Uuid::from_bytes(id).to_string()
    };
    let endpoint = |op: &str| format!("http://127.0.0.1:40123/tandem/saga/{op}");
    let options = TxOptions {
        timeout_ms: 60_000,
        retry: RetryPolicy {
            initial_interval_ms: 100,
            max_interval_ms: 10_000,
            max_attempts: 0,
        },
        branch_timeout_ms: 10_000,
        concurrency: 0,
    };
    let submit = |i: usize| Command::SubmitSaga {
        gid: gid(i),
        options,
        steps: ["a", "b"]
            .iter()
            .map(|id| SagaStepSpec {
                branch_id: (*id).to_string(),
                action: endpoint("action"),
                compensate: endpoint("compensate"),
                payload: Default::default(),
                after: Vec::new(),
                retry: None,
            })
            .collect(),
        payload: Default::default(),
        now_ms: start_ms + (i / 8) as i64,
    };
    let results = |i: usize| Command::OpResults {
        gid: gid(i),
        results: ["a", "b"]
            .iter()
            .map(|id| ((*id).to_string(), Op::Action, OpOutcome::Succeeded))
            .collect(),
        exact: true,
        now_ms: start_ms + (i / 8) as i64 + 3,
    };
    let mut entries = Vec::with_capacity(sagas * 2);
    for i in 0..sagas + IN_FLIGHT {
        if i < sagas {
            entries.push(tandem_coordinator::codec::encode(&submit(i)));
        }
        if i >= IN_FLIGHT {
            entries.push(tandem_coordinator::codec::encode(&results(i - IN_FLIGHT)));
        }
    }
    let mut machine = <StateMachine as Replicated>::founding(Default::default());
    let mut view = None;
    let started = std::time::Instant::now();
    for (n, data) in entries.iter().enumerate() {
        let index = n as u64 + 1;
        let output = Replicated::apply(&mut machine, data, index, 2);
        assert!(output.is_ok(), "entry {index}: {output:?}");
        if index.is_multiple_of(64) {
            view = Some(Replicated::view(&machine, index));
        }
    }
    let elapsed = started.elapsed();
    drop(view);
    assert_eq!(machine.active_count(), 0, "every saga finished");
    println!(
        "apply: {sagas} sagas ({} entries) in {:.3}s, {:.2} µs per saga",
        entries.len(),
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / sagas as f64
    );
}
