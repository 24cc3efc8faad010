//! Sagas end to end (invariant 5): every saga ends with every action done,
//! or every action that ran compensated after it, in reverse order — checked
//! from what the participants recorded, not from the coordinator's view.

mod common;

use std::time::{Duration, Instant};

use common::participant::StepService;
use common::{Cluster, wait_for};
use tandem_proto::v1 as pb;
use tandem_sdk::{Client, Step};
use tonic::Code;

const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn state(tx: &pb::Transaction) -> pb::TxState {
    pb::TxState::try_from(tx.state).unwrap_or(pb::TxState::Unspecified)
}

fn pair(branch: &str, op: &str) -> (String, String) {
    (branch.to_string(), op.to_string())
}

/// A sequential saga over `steps`, on the recorder at `base`.
fn sequential(client: &Client, base: &str, steps: &[&str]) -> tandem_sdk::SagaBuilder {
    let mut saga = client.saga().retry(pb::RetryPolicy {
        initial_interval_ms: 20,
        max_interval_ms: 200,
        max_attempts: 50,
    });
    for step in steps {
        saga = saga.step(Step::service(step, base));
    }
    saga
}

/// What the participants must have seen for a sequential saga over `steps`
/// that failed at `failed` (None: succeeded).
fn expected_effects(steps: &[&str], failed: Option<usize>) -> Vec<(String, String)> {
    match failed {
        None => steps.iter().map(|s| pair(s, "action")).collect(),
        Some(k) => {
            let mut out: Vec<_> = steps[..k].iter().map(|s| pair(s, "action")).collect();
            out.extend(steps[..k].iter().rev().map(|s| pair(s, "compensate")));
            out
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saga_500_concurrent_sagas_complete_or_compensate_in_reverse_order() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let service = StepService::start().await;
    let client = cluster.client();
    let steps = ["s0", "s1", "s2", "s3"];
    let mut sagas = Vec::new();
    for i in 0..500usize {
        let saga = sequential(&client, &service.saga, &steps);
        let gid = saga.gid_str().to_string();
        // Two in five fail, at a step that depends on the saga.
        let failed = (i % 5 < 2).then_some(i % steps.len());
        if let Some(k) = failed {
            service
                .recorder
                .refuse
                .lock()
                .unwrap()
                .insert((gid.clone(), steps[k].to_string()));
        }
        sagas.push((gid, failed, saga));
    }
    let expected: Vec<(String, Option<usize>)> =
        sagas.iter().map(|(g, f, _)| (g.clone(), *f)).collect();
    let results = futures::stream::iter(
        sagas
            .into_iter()
            .map(|(_, _, saga)| saga.submit_and_wait(Duration::from_secs(30))),
    )
    .buffer_unordered(64)
    .collect::<Vec<_>>()
    .await;
    for result in results {
        let tx = result.expect("submit");
        assert!(
            matches!(state(&tx), pb::TxState::Committed | pb::TxState::Aborted),
            "{} not terminal",
            tx.gid
        );
    }
    for (gid, failed) in expected {
        let tx = client.get(&gid).await.unwrap();
        let effects = service.recorder.effects(&gid);
        assert_eq!(effects, expected_effects(&steps, failed), "saga {gid}");
        match failed {
            None => assert_eq!(state(&tx), pb::TxState::Committed),
            Some(k) => {
                assert_eq!(state(&tx), pb::TxState::Aborted);
                assert_eq!(
                    tx.error,
                    format!("step s{k} failed: s{k} refused on purpose"),
                    "business error kept"
                );
            }
        }
    }
}

use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saga_dag_respects_dependencies_and_the_concurrency_limit() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let service = StepService::start().await;
    *service.recorder.action_delay.lock().unwrap() = Duration::from_millis(150);
    let client = cluster.client();
    let dag = |limit: u32| {
        client
            .saga()
            .concurrent(limit)
            .step(Step::service("order", &service.saga))
            .step(Step::service("inventory", &service.saga).after(&["order"]))
            .step(Step::service("payment", &service.saga).after(&["order"]))
            .step(Step::service("shipping", &service.saga).after(&["inventory", "payment"]))
    };
    for (limit, expected_max) in [(1, 1), (0, 2)] {
        let runs: Vec<_> = (0..5).map(|_| dag(limit)).collect();
        let gids: Vec<String> = runs.iter().map(|s| s.gid_str().to_string()).collect();
        let results = futures::future::join_all(
            runs.into_iter()
                .map(|s| s.submit_and_wait(Duration::from_secs(30))),
        )
        .await;
        for r in results {
            assert_eq!(state(&r.expect("submit")), pb::TxState::Committed);
        }
        for gid in gids {
            let effects = service.recorder.effects(&gid);
            let at = |b: &str| effects.iter().position(|e| e.0 == b).expect("step ran");
            assert!(
                at("order") < at("inventory") && at("order") < at("payment"),
                "{effects:?}"
            );
            assert!(
                at("shipping") > at("inventory") && at("shipping") > at("payment"),
                "{effects:?}"
            );
            let max = service.recorder.log.lock().unwrap().max_running[&gid];
            assert_eq!(max, expected_max, "saga {gid} with concurrency {limit}");
        }
    }
}

/// A saga failing at its last step compensates in reverse; the leader is
/// killed once mid-saga and once mid-compensation. No forward step takes
/// effect after compensation began, each step is compensated exactly once,
/// and all finish within 5 s of the last election.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saga_leader_killed_mid_saga_and_mid_compensation() {
    let mut cluster = Cluster::start(3);
    let (first_leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let service = StepService::start().await;
    *service.recorder.action_delay.lock().unwrap() = Duration::from_millis(150);
    *service.recorder.undo_delay.lock().unwrap() = Duration::from_millis(150);
    let client = cluster.client();
    let steps = ["a", "b", "c", "d"];
    let mut gids = Vec::new();
    for i in 0..20 {
        let saga = sequential(&client, &service.saga, &steps);
        let gid = saga.gid_str().to_string();
        if i % 2 == 0 {
            service
                .recorder
                .refuse
                .lock()
                .unwrap()
                .insert((gid.clone(), "d".into()));
        }
        saga.submit().await.expect("submit");
        gids.push(gid);
    }
    // Mid-saga.
    tokio::time::sleep(Duration::from_millis(250)).await;
    cluster.kill(first_leader);
    let (second_leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    cluster.restart(first_leader);
    // Mid-compensation.
    wait_for(
        Duration::from_secs(20),
        "compensations to begin",
        || async {
            let log = service.recorder.log.lock().unwrap();
            log.events
                .iter()
                .any(|e| e.op == "compensate" && e.effect)
                .then_some(())
        },
    )
    .await;
    cluster.kill(second_leader);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let elected = Instant::now();
    for gid in &gids {
        wait_for(
            Duration::from_secs(5),
            &format!("{gid} to finish"),
            || async {
                client
                    .get(gid)
                    .await
                    .ok()
                    .filter(|t| matches!(state(t), pb::TxState::Committed | pb::TxState::Aborted))
            },
        )
        .await;
    }
    let took = elected.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "finished {took:?} after the last election"
    );

    for (i, gid) in gids.iter().enumerate() {
        let effects = service.recorder.effects(gid);
        let expected = expected_effects(&steps, (i % 2 == 0).then_some(3));
        assert_eq!(effects, expected, "saga {gid}");
        // No forward effect after the first compensation, whatever a deposed
        // leader may have sent late.
        let log = service.recorder.log.lock().unwrap();
        let events: Vec<_> = log.events.iter().filter(|e| &e.gid == gid).collect();
        if let Some(first) = events.iter().position(|e| e.op == "compensate") {
            assert!(
                events[first..]
                    .iter()
                    .all(|e| e.op != "action" || !e.effect),
                "a forward step took effect after compensation began in {gid}: {events:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_sagas_with_cycles_no_steps_bad_endpoints_or_duplicate_ids_store_nothing() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let client = cluster.client();
    let base = "http://127.0.0.1:1";
    let cases: Vec<(tandem_sdk::SagaBuilder, &str)> = vec![
        (client.saga(), "at least one step"),
        (
            client
                .saga()
                .concurrent(0)
                .step(Step::service("a", base).after(&["b"]))
                .step(Step::service("b", base).after(&["a"])),
            "cycle",
        ),
        (
            client.saga().step(Step::new("a", "nonsense", "http://h/c")),
            "malformed",
        ),
        (
            client
                .saga()
                .step(Step::service("a", base))
                .step(Step::service("a", base)),
            "used twice",
        ),
        (
            client.saga().step(Step::service("a", base).after(&["z"])),
            "only concurrent sagas",
        ),
    ];
    for (saga, expected) in cases {
        let gid = saga.gid_str().to_string();
        let err = saga.submit().await.expect_err("bad saga accepted");
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
        assert!(
            err.to_string().contains(expected) && err.to_string().contains(&gid),
            "{err}"
        );
        let missing = client.get(&gid).await.expect_err("nothing stored");
        assert_eq!(missing.code(), Some(Code::NotFound));
    }
}

/// Memory stays bounded (the limits in README "Limits and memory" hold): one
/// saga of 1,000 steps that all run at once, each with a 4 KiB payload,
/// whose participants are unreachable — every action fails and is retried,
/// the saga decides to compensate, and every compensation is retried. The
/// node's resident memory is sampled from /proc throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_memory_a_1000_step_saga_with_unreachable_participants() {
    const RSS_BOUND: u64 = 300 << 20;
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let client = cluster.client();
    // Nothing listens on the discard port: every call is refused at once.
    let dead = "http://127.0.0.1:9";
    let mut saga = client
        .saga()
        .concurrent(0)
        .timeout(Duration::from_secs(600))
        .retry(pb::RetryPolicy {
            initial_interval_ms: 50,
            max_interval_ms: 1_000,
            max_attempts: 8,
        });
    for i in 0..1_000 {
        let payload: Vec<u8> = (0..4096u32)
            .map(|b| (b.wrapping_mul(31) ^ i) as u8)
            .collect();
        saga = saga.step(
            Step::new(
                &format!("s{i}"),
                &format!("{dead}/action/{i}"),
                &format!("{dead}/compensate/{i}"),
            )
            .payload(payload),
        );
    }
    let gid = saga.gid_str().to_string();
    let submitted = saga.submit().await.expect("a saga within the limits");
    assert_eq!(submitted.branches.len(), 1_000);
    let mut peak = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(40) {
        peak = peak.max(cluster.rss_bytes(1).expect("node running"));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let tx = client.get(&gid).await.unwrap();
    assert_eq!(state(&tx), pb::TxState::Aborting, "compensating, forever");
    let compensations: u32 = tx
        .branches
        .iter()
        .filter_map(|b| b.ops.iter().find(|o| o.op == "compensate"))
        .map(|o| o.attempts)
        .sum();
    eprintln!(
        "peak RSS {} MiB; {} compensation attempts recorded",
        peak >> 20,
        compensations
    );
    assert!(compensations >= 1_000, "compensations are being retried");
    assert!(
        peak < RSS_BOUND,
        "peak RSS {} MiB is over the bound {} MiB",
        peak >> 20,
        RSS_BOUND >> 20
    );
}

/// Invariants 5 and 6 on the SDK's stream of submissions (`SubmitSagas`,
/// its default) through a leader kill: every answer a caller got is its
/// own saga's (the gid it submitted, matched by the stream's ids), says
/// Committed, and is what the cluster and the participants hold — each
/// action done exactly once, whichever node or path (stream, or the call
/// the SDK falls back to) finally took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saga_answers_on_the_submission_stream_are_each_their_own_through_a_leader_kill() {
    let mut cluster = Cluster::start(3);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let service = StepService::start().await;
    let client = cluster.client();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let (client, base, stop) = (client.clone(), service.saga.clone(), stop.clone());
            tokio::spawn(async move {
                let mut answered = Vec::new();
                // Bounded: at most this many sagas per caller.
                for _ in 0..2_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let saga = sequential(&client, &base, &["a", "b"]);
                    let gid = saga.gid_str().to_string();
                    let tx = saga
                        .submit_and_wait(Duration::from_secs(20))
                        .await
                        .unwrap_or_else(|e| panic!("saga {gid}: {e}"));
                    answered.push((gid, tx));
                }
                answered
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    cluster.kill(leader);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = Vec::new();
    for caller in callers {
        answered.extend(caller.await.expect("caller"));
    }
    assert!(answered.len() > 100, "only {} sagas ran", answered.len());
    for (gid, tx) in &answered {
        assert_eq!(&tx.gid, gid, "a caller was answered with another saga");
        assert_eq!(state(tx), pb::TxState::Committed, "saga {gid}");
        let held = client.get(gid).await.expect("get");
        assert_eq!(state(&held), pb::TxState::Committed, "saga {gid} as held");
        assert_eq!(
            service.recorder.effects(gid),
            expected_effects(&["a", "b"], None),
            "saga {gid}"
        );
    }
}

/// Invariants 5 and 1 when pipelined connections break: the participant's
/// server (the SDK's `serve`, which announces pipelining) is killed three
/// times with calls in flight on its pipelined connections, and comes back
/// on the same port each time. Every saga still commits, and each step took
/// effect exactly once: no call passed for answered without an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saga_a_participant_killed_mid_pipeline_loses_no_step() {
    use tandem_sdk::participant::{ParticipantServer, Saga};
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let recorder = common::participant::StepRecorder::default();
    *recorder.action_delay.lock().unwrap() = Duration::from_millis(20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let base = format!("http://{address}");
    let serve = |listener| {
        let server = ParticipantServer::new(Saga(recorder.clone()));
        tokio::spawn(tandem_sdk::participant::serve(
            listener,
            server,
            std::future::pending(),
        ))
    };
    let mut server = serve(listener);
    let client = cluster.client();
    let steps = ["s0", "s1"];
    let sagas: Vec<_> = (0..1_500)
        .map(|_| sequential(&client, &base, &steps))
        .collect();
    let gids: Vec<String> = sagas.iter().map(|s| s.gid_str().to_string()).collect();
    let running = tokio::spawn(
        futures::stream::iter(
            sagas
                .into_iter()
                .map(|saga| saga.submit_and_wait(Duration::from_secs(60))),
        )
        .buffer_unordered(64)
        .collect::<Vec<_>>(),
    );
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.abort();
        let _ = server.await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let again = tokio::net::TcpListener::bind(address).await;
        server = serve(again.expect("the same port again"));
    }
    for result in running.await.unwrap() {
        let tx = result.expect("submit");
        assert_eq!(state(&tx), pb::TxState::Committed, "{}", tx.gid);
    }
    for gid in &gids {
        let effects = recorder.effects(gid);
        assert_eq!(effects, expected_effects(&steps, None), "saga {gid}");
    }
    // The kills cut calls short: a handler dropped mid-action never counted
    // itself out.
    let cut = recorder
        .log
        .lock()
        .unwrap()
        .running
        .values()
        .filter(|n| **n > 0)
        .count();
    assert!(cut > 0, "no kill hit a call in flight");
    server.abort();
}
