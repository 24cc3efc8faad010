//! TCC end to end: a failed try cancels every branch, a timeout before
//! commit cancels every branch, and a confirm interrupted by the leader's
//! death completes — each effect exactly once, as the participants saw it.

mod common;

use std::time::Duration;

use common::participant::StepService;
use common::{Cluster, wait_for};
use tandem_proto::v1 as pb;

const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn state(tx: &pb::Transaction) -> pb::TxState {
    pb::TxState::try_from(tx.state).unwrap_or(pb::TxState::Unspecified)
}

fn pair(branch: &str, op: &str) -> (String, String) {
    (branch.to_string(), op.to_string())
}

fn options(timeout_ms: u32) -> pb::TxOptions {
    pb::TxOptions {
        timeout_ms,
        retry: Some(pb::RetryPolicy {
            initial_interval_ms: 20,
            max_interval_ms: 200,
            max_attempts: 50,
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomicity_a_failed_try_cancels_every_branch() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let service = StepService::start().await;
    let client = cluster.client();
    let tx = client
        .begin_scope(pb::Protocol::Tcc, options(30_000))
        .await
        .unwrap();
    service
        .recorder
        .refuse
        .lock()
        .unwrap()
        .insert((tx.gid().to_string(), "hotel".into()));
    tx.try_branch("flight", &service.tcc, b"seat 12A".to_vec())
        .await
        .expect("flight try");
    let refused = tx
        .try_branch("hotel", &service.tcc, Vec::new())
        .await
        .expect_err("hotel refuses");
    assert!(
        refused.to_string().contains("hotel refused on purpose"),
        "{refused}"
    );
    let done = tx.abort(&refused.to_string()).await.expect("abort");
    assert_eq!(state(&done), pb::TxState::Aborted);
    assert_eq!(
        service.recorder.effects(tx.gid()),
        vec![pair("flight", "try"), pair("flight", "cancel")],
        "the flight is released; the hotel had nothing to release"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_blocking_a_timeout_before_commit_cancels_every_branch() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let service = StepService::start().await;
    let client = cluster.client();
    let tx = client
        .begin_scope(pb::Protocol::Tcc, options(800))
        .await
        .unwrap();
    tx.try_branch("flight", &service.tcc, Vec::new())
        .await
        .unwrap();
    tx.try_branch("hotel", &service.tcc, Vec::new())
        .await
        .unwrap();
    // The application never commits.
    let done = wait_for(Duration::from_secs(10), "the timeout", || async {
        client
            .get(tx.gid())
            .await
            .ok()
            .filter(|t| state(t) == pb::TxState::Aborted)
    })
    .await;
    assert!(done.error.starts_with("timed out"), "{}", done.error);
    let mut effects = service.recorder.effects(tx.gid());
    effects.sort();
    assert_eq!(
        effects,
        vec![
            pair("flight", "cancel"),
            pair("flight", "try"),
            pair("hotel", "cancel"),
            pair("hotel", "try")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_blocking_a_confirm_interrupted_by_a_leader_kill_completes() {
    let mut cluster = Cluster::start(3);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let service = StepService::start().await;
    let client = cluster.client();
    let tx = client
        .begin_scope(pb::Protocol::Tcc, options(30_000))
        .await
        .unwrap();
    for branch in ["flight", "hotel", "payment"] {
        tx.try_branch(branch, &service.tcc, Vec::new())
            .await
            .unwrap();
    }
    // The leader dies after the first confirm is answered and recorded,
    // while the payment's confirm is still on its way.
    service
        .recorder
        .confirm_delay
        .lock()
        .unwrap()
        .insert("payment".into(), Duration::from_millis(1_500));
    cluster
        .set_failpoint(leader, "driver-mid-fanout", "panic")
        .await;
    let committing = {
        let client = client.clone();
        let gid = tx.gid().to_string();
        tokio::spawn(async move { client.commit(&gid, true, Duration::from_secs(20)).await })
    };
    assert!(
        cluster.wait_dead(leader, Duration::from_secs(10)).await,
        "the failpoint never fired"
    );
    let done = committing
        .await
        .unwrap()
        .expect("commit through the failover");
    assert_eq!(state(&done), pb::TxState::Committed);
    let confirms: Vec<_> = service
        .recorder
        .effects(tx.gid())
        .into_iter()
        .filter(|(_, op)| op == "confirm")
        .collect();
    assert_eq!(
        confirms.len(),
        3,
        "every branch confirmed exactly once: {confirms:?}"
    );
}
