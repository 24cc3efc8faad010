//! Nemesis on real processes (invariants 1, 3, 4, 5, 6, 7): three `tandem`
//! nodes run the XA bank (PostgreSQL ⇄ MariaDB), the saga orders
//! (PostgreSQL, MariaDB, SQLite), the TCC bookings (the same three), the
//! 3PC orders (PostgreSQL, MariaDB) and the order events (transactional
//! messages from a PostgreSQL outbox to NATS JetStream, RabbitMQ and a
//! webhook), one workload after another, while a nemesis strikes one node
//! at a time, half a second to a second and a half apart: kill -9 and
//! restart, SIGSTOP past the election timeout, cut off from everyone (each
//! node runs in a network namespace of its own and its link goes down:
//! peers, clients and participants lose it alike), or cut off from its
//! peers only (the transport failpoint); or the brokers go away for every
//! node at once (the nodes reach them through forwarders the nemesis cuts).
//! Where the machine allows no namespaces, nodes run on loopback and the
//! transport failpoint stands in for both. Every run is checked from the
//! databases' own rows — money per account and every transfer's branch
//! rows, every saga step done or compensated, every reservation confirmed
//! or released, every 3PC order's two rows agreeing with its outcome and
//! nothing left pre-committed, every committed order's message read by all
//! three consumers and no rolled-back one's by any — and, once the faults
//! heal, every transaction ends and every node holds the same ones.
//! `scripts/nemesis.sh` runs the long version.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::netns::Net;
use common::proxy::Proxy;
use common::{Cluster, unfinished, wait_for};
use rand::Rng;
use tandem_examples::sinks::{DEFAULT_AMQP_URL, DEFAULT_NATS_URL};
use tandem_examples::{
    DEFAULT_MYSQL_URL, DEFAULT_PG_URL, order_events, saga_order, tcc_travel, three_phase, xa_bank,
};

const LEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Transactions per workload run.
const RUN_TXS: usize = 200;
/// Workloads, taken in turn.
const WORKLOADS: usize = 5;

/// One workload run, as its own checks saw it.
#[derive(Debug)]
enum Run {
    Xa(xa_bank::Report),
    Saga(saga_order::Report),
    Tcc(tcc_travel::Report),
    ThreePc(three_phase::Report),
    Messages(order_events::Report),
}

impl Run {
    /// (committed, aborted): transactions that ended, checked.
    fn ended(&self) -> (u64, u64) {
        match self {
            Run::Xa(r) => (r.committed, r.aborted),
            Run::Saga(r) => (r.completed, r.compensated),
            Run::Tcc(r) => (r.confirmed, r.cancelled),
            Run::ThreePc(r) => (r.committed, r.aborted),
            Run::Messages(r) => (r.orders_committed, r.orders_rolled_back),
        }
    }

    /// Every invariant its checks know held, and every transaction begun
    /// was accounted for.
    fn assert_holds(&self, run: usize) {
        let (ended, not_begun) = match self {
            Run::Xa(r) => {
                assert!(r.holds(), "run {run}: {r:?}");
                assert_eq!(r.unknown, 0, "run {run}: {r:?}");
                (r.committed + r.aborted, 0)
            }
            Run::Saga(r) => {
                assert_eq!(r.violations, 0, "run {run}: {r:?}");
                (r.completed + r.compensated, r.not_submitted)
            }
            Run::Tcc(r) => {
                assert_eq!(r.violations, 0, "run {run}: {r:?}");
                (r.confirmed + r.cancelled, r.not_begun)
            }
            Run::ThreePc(r) => {
                assert_eq!(r.violations, 0, "run {run}: {r:?}");
                (r.committed + r.aborted, r.not_begun)
            }
            Run::Messages(r) => {
                assert!(r.is_ok(), "run {run}: {r:?}");
                (r.orders_committed + r.orders_rolled_back, r.not_prepared)
            }
        };
        assert_eq!(
            ended + not_begun,
            RUN_TXS as u64,
            "run {run}: every transaction accounted for: {self:?}"
        );
    }
}

async fn workload(run: usize, endpoints: Vec<String>) -> Run {
    let (pg_url, mysql_url) = (DEFAULT_PG_URL.to_string(), DEFAULT_MYSQL_URL.to_string());
    let result = match run % WORKLOADS {
        0 => xa_bank::run(xa_bank::Config {
            endpoints,
            transfers: RUN_TXS,
            concurrency: 16,
            fail_rate: 0.1,
            pg_url,
            mysql_url,
            accounts: 50,
        })
        .await
        .map(Run::Xa),
        1 => saga_order::run(saga_order::Config {
            endpoints,
            orders: RUN_TXS,
            concurrency: 16,
            fail_rate: 0.2,
            pg_url,
            mysql_url,
        })
        .await
        .map(Run::Saga),
        2 => tcc_travel::run(tcc_travel::Config {
            endpoints,
            bookings: RUN_TXS,
            concurrency: 16,
            fail_rate: 0.2,
            pg_url,
            mysql_url,
        })
        .await
        .map(Run::Tcc),
        3 => three_phase::run(three_phase::Config {
            endpoints,
            orders: RUN_TXS,
            concurrency: 16,
            fail_rate: 0.2,
            pg_url,
            mysql_url,
        })
        .await
        .map(Run::ThreePc),
        _ => order_events::run(order_events::Config {
            endpoints,
            orders: RUN_TXS,
            concurrency: 16,
            fail_rate: 0.2,
            pg_url,
            nats_url: DEFAULT_NATS_URL.into(),
            amqp_url: DEFAULT_AMQP_URL.into(),
        })
        .await
        .map(Run::Messages),
    };
    result.unwrap_or_else(|e| panic!("run {run}: {e:#}"))
}

#[test]
fn atomicity_nemesis_kills_pauses_and_isolation_under_every_protocols_load() {
    let net = match Net::create(3) {
        Ok(net) => {
            // The examples' participants listen where the namespaced nodes
            // reach them; set before any thread exists.
            unsafe { std::env::set_var("TANDEM_PARTICIPANT_HOST", net.host_ip()) };
            Some(net)
        }
        Err(why) => {
            eprintln!("nemesis: no network namespaces ({why}); nodes on loopback");
            None
        }
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(nemesis(net));
}

async fn nemesis(net: Option<Net>) {
    // scripts/nemesis.sh runs the long version through these.
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (faults_target, runs_max) = (
        env("TANDEM_NEMESIS_FAULTS", 12),
        env("TANDEM_NEMESIS_RUNS", 21),
    );
    // Keep every finished transaction (the default budget collects the
    // oldest beyond 64 MiB), so the tables can be compared at the end.
    let mut extra = vec!["--finished-bytes-max".into(), (1u64 << 30).to_string()];
    // Nodes in namespaces reach the brokers (which listen on loopback)
    // through forwarders on the bridge; cutting a node cuts its broker
    // connections too.
    let mut forwarders = Vec::new();
    if let Some(net) = &net {
        let nats = Proxy::start_on(&net.host_ip(), "127.0.0.1:4222").await;
        let amqp = Proxy::start_on(&net.host_ip(), "127.0.0.1:5672").await;
        extra.extend([
            "--nats-url".into(),
            format!("nats://{}", nats.addr),
            "--amqp-url".into(),
            format!("amqp://guest:guest@{}/%2f", amqp.addr),
        ]);
        forwarders.extend([nats, amqp]);
    }
    let options = common::Options {
        extra,
        hosts: net
            .as_ref()
            .map(|net| (1..=3).map(|i| (net.ns(i), net.node_ip(i))).collect())
            .unwrap_or_default(),
        ..common::Options::default()
    };
    let mut cluster = Cluster::start_with(3, options);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let endpoints = cluster.endpoints();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let work = tokio::spawn(async move {
        let mut runs = Vec::new();
        // At least one run of each workload, then until the nemesis is done.
        for run in 0..runs_max {
            if run >= WORKLOADS && stopped.load(Ordering::Relaxed) {
                break;
            }
            runs.push(workload(run, endpoints.clone()).await);
        }
        runs
    });
    let started = std::time::Instant::now();
    let mut faults = Vec::new();
    let time_max = Duration::from_secs(120 + 5 * faults_target as u64);
    while faults.len() < faults_target && !work.is_finished() && started.elapsed() < time_max {
        let (pause_ms, node, kind, hold_ms) = {
            let mut rng = rand::rng();
            (
                rng.random_range(500..1_500),
                rng.random_range(1..=3u64),
                rng.random_range(0..5),
                rng.random_range(1_200..2_500),
            )
        };
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        let hold = Duration::from_millis(hold_ms);
        match kind {
            0 => {
                cluster.kill(node);
                tokio::time::sleep(hold).await;
                cluster.restart(node);
                faults.push(format!("kill {node}"));
            }
            1 => {
                cluster.pause(node);
                tokio::time::sleep(hold).await;
                cluster.resume(node);
                faults.push(format!("pause {node} {hold_ms} ms"));
            }
            2 if net.is_some() => {
                let net = net.as_ref().expect("namespaces");
                net.cut(node as usize);
                tokio::time::sleep(hold).await;
                net.heal(node as usize);
                faults.push(format!("unplug {node} {hold_ms} ms"));
            }
            // The brokers go away for every node at once, for longer than
            // a publish waits for its ack (the 5 s branch timeout; a
            // shorter outage the broker clients ride out by reconnecting):
            // deliveries time out and must be retried, none lost.
            4 if !forwarders.is_empty() => {
                let outage = hold + Duration::from_secs(5);
                forwarders.iter().for_each(Proxy::cut);
                tokio::time::sleep(outage).await;
                forwarders.iter().for_each(Proxy::restore);
                faults.push(format!("brokers {} ms", outage.as_millis()));
            }
            _ => {
                cluster
                    .set_failpoint(node, "transport-isolate", "return")
                    .await;
                tokio::time::sleep(hold).await;
                cluster
                    .set_failpoint(node, "transport-isolate", "off")
                    .await;
                faults.push(format!("isolate {node} {hold_ms} ms"));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let runs = work.await.expect("the workload");
    for (i, run) in runs.iter().enumerate() {
        run.assert_holds(i);
    }
    assert!(
        faults.len() >= faults_target.min(10),
        "the nemesis struck only {faults:?}"
    );
    let count = |f: fn(&Run) -> bool| runs.iter().filter(|r| f(r)).count();
    eprintln!(
        "nemesis: {} faults ({} kills, {} pauses, {} unplugged, {} isolations, {} broker outages); {} runs of {RUN_TXS} ({} xa, {} saga, {} tcc, {} 3pc, {} messages); {} committed, {} aborted",
        faults.len(),
        faults.iter().filter(|f| f.starts_with("kill")).count(),
        faults.iter().filter(|f| f.starts_with("pause")).count(),
        faults.iter().filter(|f| f.starts_with("unplug")).count(),
        faults.iter().filter(|f| f.starts_with("isolate")).count(),
        faults.iter().filter(|f| f.starts_with("brokers")).count(),
        runs.len(),
        count(|r| matches!(r, Run::Xa(_))),
        count(|r| matches!(r, Run::Saga(_))),
        count(|r| matches!(r, Run::Tcc(_))),
        count(|r| matches!(r, Run::ThreePc(_))),
        count(|r| matches!(r, Run::Messages(_))),
        runs.iter().map(|r| r.ended().0).sum::<u64>(),
        runs.iter().map(|r| r.ended().1).sum::<u64>(),
    );
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let client = cluster.client();
    wait_for(Duration::from_secs(60), "every transaction ended", || {
        let client = client.clone();
        async move { unfinished(&client).await.is_empty().then_some(()) }
    })
    .await;
    // Each node's own table. A node that has not yet heard from the leader
    // since the heal answers UNAVAILABLE ("retry"), as it should: retry,
    // for a bounded time.
    let mut tables = Vec::new();
    for endpoint in cluster.endpoints() {
        let what = format!("{endpoint} to answer a List");
        let mut gids = wait_for(Duration::from_secs(20), &what, || {
            let endpoint = endpoint.clone();
            async move { common::try_list_all_from(&endpoint).await.ok() }
        })
        .await;
        gids.sort();
        tables.push(gids);
    }
    let ended: u64 = runs.iter().map(|r| r.ended().0 + r.ended().1).sum();
    assert!(
        tables[0].len() as u64 >= ended,
        "{} transactions listed, {ended} ended",
        tables[0].len()
    );
    assert!(
        tables.iter().all(|t| *t == tables[0]),
        "nodes hold different transactions after {faults:?}"
    );
    drop(forwarders);
}
