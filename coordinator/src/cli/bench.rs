//! `tandem bench`: closed-loop load against a running cluster. Reports
//! throughput and latency percentiles; it measures, it asserts nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use hdrhistogram::Histogram;
use serde_json::json;
use tandem_sdk::Step;
use tandem_sdk::participant::{
    BranchContext, BranchError, ParticipantServer, Saga, SagaStep, Tcc, TccResource, TwoPhase,
    TwoPhaseResource,
};
use tandem_sdk::proto as pb;

use super::EndpointArg;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Begin transactions as fast as `--concurrency` callers can.
    Begin {
        #[command(flatten)]
        endpoint: EndpointArg,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value = "10s")]
        duration: String,
        /// Not counted: lets connections and the leader warm up.
        #[arg(long, default_value = "2s")]
        warmup: String,
        #[arg(long, default_value_t = 0)]
        payload_bytes: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Whole 2PC transactions: begin, register two branches on a no-op
    /// HTTP participant this command serves itself, commit and wait until
    /// both branches committed.
    #[command(name = "2pc")]
    TwoPc {
        #[command(flatten)]
        endpoint: EndpointArg,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value = "10s")]
        duration: String,
        #[arg(long, default_value = "2s")]
        warmup: String,
        #[arg(long)]
        json: bool,
    },

    /// Two-step sequential sagas on a no-op HTTP participant this command
    /// serves itself; each call waits until the saga completed.
    Saga {
        #[command(flatten)]
        endpoint: EndpointArg,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value = "10s")]
        duration: String,
        #[arg(long, default_value = "2s")]
        warmup: String,
        #[arg(long)]
        json: bool,
    },
    /// Two-branch TCC transactions: begin, try both branches (a no-op HTTP
    /// participant this command serves), commit and wait for both confirms.
    Tcc {
        #[command(flatten)]
        endpoint: EndpointArg,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value = "10s")]
        duration: String,
        #[arg(long, default_value = "2s")]
        warmup: String,
        #[arg(long)]
        json: bool,
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

fn not_committed(tx: &pb::Transaction) -> tandem_sdk::Error {
    tandem_sdk::Error::Unavailable {
        elapsed: Duration::ZERO,
        last: format!("transaction {} ended in state {}", tx.gid, tx.state),
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

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Begin {
            endpoint,
            concurrency,
            duration,
            warmup,
            payload_bytes,
            json,
        } => {
            let duration = humantime::parse_duration(&duration).context("--duration")?;
            let warmup = humantime::parse_duration(&warmup).context("--warmup")?;
            let client = endpoint.client()?;
            let payload = vec![b'x'; payload_bytes];
            let report = closed_loop(concurrency, warmup, duration, move || {
                let client = client.clone();
                let request = pb::BeginRequest {
                    gid: tandem_sdk::new_gid(),
                    protocol: pb::Protocol::Saga as i32,
                    payload: payload.clone(),
                    ..Default::default()
                };
                async move { client.begin_with(request).await.map(|_| ()) }
            })
            .await;
            report.print("begin", concurrency, json);
        }
        BenchCommand::TwoPc {
            endpoint,
            concurrency,
            duration,
            warmup,
            json,
        } => {
            let duration = humantime::parse_duration(&duration).context("--duration")?;
            let warmup = humantime::parse_duration(&warmup).context("--warmup")?;
            let client = endpoint.client()?;
            let base = serve_participant(TwoPhase(NoOp)).await?;
            let ops: Vec<(String, String)> = ["prepare", "commit", "rollback"]
                .iter()
                .map(|op| (op.to_string(), format!("{base}/tandem/{op}")))
                .collect();
            let ops = std::sync::Arc::new(ops);
            let report = closed_loop(concurrency, warmup, duration, move || {
                let (client, ops) = (client.clone(), ops.clone());
                async move {
                    let gid = tandem_sdk::new_gid();
                    client
                        .begin_with(pb::BeginRequest {
                            gid: gid.clone(),
                            protocol: pb::Protocol::TwoPc as i32,
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
                    let tx = client.commit(&gid, true, Duration::from_secs(30)).await?;
                    if tx.state != pb::TxState::Committed as i32 {
                        return Err(not_committed(&tx));
                    }
                    Ok(())
                }
            })
            .await;
            report.print("2pc", concurrency, json);
        }
        BenchCommand::Saga {
            endpoint,
            concurrency,
            duration,
            warmup,
            json,
        } => {
            let duration = humantime::parse_duration(&duration).context("--duration")?;
            let warmup = humantime::parse_duration(&warmup).context("--warmup")?;
            let client = endpoint.client()?;
            let base = serve_participant(Saga(NoOp)).await?;
            let report = closed_loop(concurrency, warmup, duration, move || {
                let (client, base) = (client.clone(), base.clone());
                async move {
                    let tx = client
                        .saga()
                        .step(Step::service("a", &base))
                        .step(Step::service("b", &base))
                        .submit_and_wait(Duration::from_secs(30))
                        .await?;
                    if tx.state != pb::TxState::Committed as i32 {
                        return Err(not_committed(&tx));
                    }
                    Ok(())
                }
            })
            .await;
            report.print("saga", concurrency, json);
        }
        BenchCommand::Tcc {
            endpoint,
            concurrency,
            duration,
            warmup,
            json,
        } => {
            let duration = humantime::parse_duration(&duration).context("--duration")?;
            let warmup = humantime::parse_duration(&warmup).context("--warmup")?;
            let client = endpoint.client()?;
            let base = serve_participant(Tcc(NoOp)).await?;
            let report = closed_loop(concurrency, warmup, duration, move || {
                let (client, base) = (client.clone(), base.clone());
                async move {
                    let tx = client
                        .begin_scope(pb::Protocol::Tcc, pb::TxOptions::default())
                        .await?;
                    tx.try_branch("a", &base, Vec::new()).await?;
                    tx.try_branch("b", &base, Vec::new()).await?;
                    let done = tx.commit().await?;
                    if done.state != pb::TxState::Committed as i32 {
                        return Err(not_committed(&done));
                    }
                    Ok(())
                }
            })
            .await;
            report.print("tcc", concurrency, json);
        }
    }
    Ok(())
}

pub struct Report {
    ok: u64,
    errors: u64,
    elapsed: Duration,
    histogram: Histogram<u64>,
    last_error: Option<String>,
}

impl Report {
    fn print(&self, what: &str, concurrency: usize, as_json: bool) {
        let rate = self.ok as f64 / self.elapsed.as_secs_f64();
        let us = |q: f64| self.histogram.value_at_quantile(q) as f64 / 1000.0;
        if as_json {
            println!(
                "{}",
                json!({
                    "bench": what,
                    "concurrency": concurrency,
                    "ok": self.ok,
                    "errors": self.errors,
                    "seconds": self.elapsed.as_secs_f64(),
                    "per_second": rate,
                    "p50_ms": us(0.5),
                    "p99_ms": us(0.99),
                    "p999_ms": us(0.999),
                    "max_ms": self.histogram.max() as f64 / 1000.0,
                })
            );
        } else {
            println!(
                "{what}: {rate:.0}/s over {:.1}s with {concurrency} callers; {} ok, {} errors\n\
                 latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                self.elapsed.as_secs_f64(),
                self.ok,
                self.errors,
                us(0.5),
                us(0.99),
                us(0.999),
                self.histogram.max() as f64 / 1000.0
            );
        }
        if let Some(e) = &self.last_error {
            eprintln!("last error: {e}");
        }
    }
}

/// Runs `concurrency` callers, each calling `op` back to back; counts only
/// the calls that start after `warmup` and end before `warmup + duration`.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    op: F,
) -> Report
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), tandem_sdk::Error>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + duration;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let op = op.clone();
        let stop = stop.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut last_error = None;
            while !stop.load(Ordering::Relaxed) {
                let began = Instant::now();
                let result = op().await;
                let ended = Instant::now();
                if began < measure_from || ended > stop_at {
                    continue;
                }
                match result {
                    Ok(()) => {
                        let _ = histogram.record(ended.duration_since(began).as_micros() as u64);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        last_error = Some(e.to_string());
                    }
                }
            }
            (histogram, last_error)
        }));
    }
    tokio::time::sleep_until((stop_at).into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut last_error = None;
    for task in tasks {
        if let Ok((h, e)) = task.await {
            let _ = histogram.add(h);
            last_error = last_error.or(e);
        }
    }
    Report {
        ok: histogram.len(),
        errors: errors.load(Ordering::Relaxed),
        elapsed: duration,
        histogram,
        last_error,
    }
}
