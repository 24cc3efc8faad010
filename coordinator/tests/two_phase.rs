//! 2PC end to end against a real cluster and recording participants (one
//! over HTTP, one over gRPC): atomicity, commit point and no blocking when
//! the leader dies at each risky instant; timeouts; idempotent retries; bad
//! input.

mod common;

use std::time::{Duration, Instant};

use common::participant::{Effect, TestParticipant};
use common::{Cluster, wait_for};
use tandem_proto::v1 as pb;
use tandem_sdk::Client;
use tonic::Code;

const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn two_pc(timeout_ms: u32) -> pb::BeginRequest {
    pb::BeginRequest {
        gid: tandem_sdk::new_gid(),
        protocol: pb::Protocol::TwoPc as i32,
        options: Some(pb::TxOptions {
            timeout_ms,
            retry: Some(pb::RetryPolicy {
                initial_interval_ms: 50,
                max_interval_ms: 500,
                max_attempts: 20,
            }),
            branch_timeout_ms: 2_000,
            ..Default::default()
        }),

        payload: Vec::new(),
    }
}

async fn register_pair(client: &Client, gid: &str, http: &TestParticipant, grpc: &TestParticipant) {
    register_pair_at(client, gid, &http.http, &grpc.grpc).await;
}

/// Branch `a` over HTTP at `http`, branch `b` over gRPC at `grpc`.
async fn register_pair_at(client: &Client, gid: &str, http: &str, grpc: &str) {
    for (branch, base) in [("a", http), ("b", grpc)] {
        let endpoints: Vec<(&str, String)> = ["prepare", "commit", "rollback"]
            .into_iter()
            .map(|op| {
                let endpoint = if base.starts_with("grpc://") {
                    base.to_string()
                } else {
                    format!("{base}/tandem/{op}")
                };
                (op, endpoint)
            })
            .collect();
        let ops: Vec<(&str, &str)> = endpoints.iter().map(|(o, e)| (*o, e.as_str())).collect();
        client
            .register_branch(gid, branch, &ops, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("register {branch} of {gid}: {e}"));
    }
}

fn state(tx: &pb::Transaction) -> pb::TxState {
    pb::TxState::try_from(tx.state).unwrap_or(pb::TxState::Unspecified)
}

/// Waits until every gid is terminal; returns when the last one became so.
async fn wait_terminal(
    client: &Client,
    gids: &[String],
    timeout: Duration,
) -> Vec<pb::Transaction> {
    let mut done = Vec::new();
    for gid in gids {
        let tx = wait_for(timeout, &format!("{gid} to finish"), || async {
            client
                .get(gid)
                .await
                .ok()
                .filter(|t| matches!(state(t), pb::TxState::Committed | pb::TxState::Aborted))
        })
        .await;
        done.push(tx);
    }
    done
}

/// Checks, from the participants' own records, that every transaction ended
/// the same way on both branches, as the coordinator says, and that no
/// commit was applied twice.
fn check_participants(txs: &[pb::Transaction], a: &TestParticipant, b: &TestParticipant) {
    for tx in txs {
        let outcome = TestParticipant::outcome_of(&[a, b], &tx.gid);
        match state(tx) {
            pb::TxState::Committed => {
                assert_eq!(
                    outcome,
                    Some(Effect::Committed),
                    "{} committed but branches say {outcome:?}",
                    tx.gid
                )
            }
            pb::TxState::Aborted => assert!(
                matches!(outcome, None | Some(Effect::RolledBack)),
                "{} aborted but branches say {outcome:?}",
                tx.gid
            ),
            other => panic!("{} is not terminal: {other:?}", tx.gid),
        }
    }
    for p in [a, b] {
        let l = p.recorder.ledger.lock().unwrap();
        assert!(
            l.commits_applied.values().all(|n| *n == 1),
            "a commit was applied twice: {:?}",
            l.commits_applied
        );
    }
}

/// Runs `count` 2PC transactions (every fourth votes no on branch b) while
/// the leader dies: killed right after the Begins (`failpoint` None) or by
/// a failpoint that panics it at a risky instant. Checks atomicity on the
/// participants and that everything finishes within 5 s of the new leader's
/// election.
async fn leader_dies(failpoint: Option<&str>) {
    let mut cluster = Cluster::start(3);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let a = TestParticipant::start().await;
    let b = TestParticipant::start().await;
    let client = cluster.client();
    let count = 12;
    let mut gids = Vec::new();
    for i in 0..count {
        let request = two_pc(30_000);
        if i % 4 == 3 {
            b.recorder
                .vote_no
                .lock()
                .unwrap()
                .insert(request.gid.clone());
        }
        client.begin_with(request.clone()).await.expect("begin");
        gids.push(request.gid);
    }
    match failpoint {
        Some(name) => cluster.set_failpoint(leader, name, "panic").await,
        None => cluster.kill(leader),
    }
    let mut tasks = Vec::new();
    for gid in &gids {
        let (client, gid) = (client.clone(), gid.clone());
        let (http, grpc) = (a.http.clone(), b.grpc.clone());
        tasks.push(tokio::spawn(async move {
            register_pair_at(&client, &gid, &http, &grpc).await;
            // Commit (2PC: returns once decided); retried by the SDK through
            // the leader's death.
            client
                .commit(&gid, false, Duration::from_secs(20))
                .await
                .expect("commit")
        }));
    }
    if failpoint.is_some() {
        assert!(
            cluster.wait_dead(leader, Duration::from_secs(20)).await,
            "the failpoint never fired"
        );
    }
    let (new_leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let elected = Instant::now();
    assert_ne!(new_leader, leader);
    for task in tasks {
        task.await.expect("transaction task");
    }
    let txs = wait_terminal(&client, &gids, Duration::from_secs(5)).await;
    let took = elected.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "transactions finished {took:?} after the new leader's election"
    );
    check_participants(&txs, &a, &b);
    let aborted = txs
        .iter()
        .filter(|t| state(t) == pb::TxState::Aborted)
        .count();
    assert!(
        aborted >= count / 4,
        "the no votes must abort ({aborted} aborted)"
    );
    assert!(aborted < count, "some must commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_blocking_leader_killed_after_begin() {
    leader_dies(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn atomicity_holds_when_leader_dies_during_prepare() {
    leader_dies(Some("driver-during-prepare")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn atomicity_holds_when_leader_dies_after_decision_before_fanout() {
    leader_dies(Some("driver-before-fanout")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn atomicity_holds_when_leader_dies_in_the_middle_of_fanout() {
    leader_dies(Some("driver-mid-fanout")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_blocking_an_uncommitted_transaction_aborts_at_its_timeout() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let (a, b) = (
        TestParticipant::start().await,
        TestParticipant::start().await,
    );
    let client = cluster.client();
    let request = two_pc(800);
    client.begin_with(request.clone()).await.expect("begin");
    register_pair(&client, &request.gid, &a, &b).await;
    // Never committed.
    let txs = wait_terminal(
        &client,
        std::slice::from_ref(&request.gid),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(state(&txs[0]), pb::TxState::Aborted);
    assert_eq!(txs[0].error, "timed out after 800 ms without a decision");
    for p in [&a, &b] {
        let l = p.recorder.ledger.lock().unwrap();
        let ops: Vec<&str> = l.calls.iter().map(|(_, _, op)| op.as_str()).collect();
        assert_eq!(
            ops,
            ["rollback"],
            "every branch is rolled back, none prepared"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_commit_repeated_after_a_lost_reply_returns_the_decided_outcome() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let (a, b) = (
        TestParticipant::start().await,
        TestParticipant::start().await,
    );
    let client = cluster.client();
    let request = two_pc(30_000);
    client.begin_with(request.clone()).await.expect("begin");
    let gid = request.gid.clone();
    register_pair(&client, &gid, &a, &b).await;
    // The first reply is lost after the commit took effect; the SDK retries.
    cluster
        .set_failpoint(1, "api-commit-lose-reply", "1*return")
        .await;
    let tx = client
        .commit(&gid, true, Duration::from_secs(10))
        .await
        .expect("commit despite the lost reply");
    assert_eq!(state(&tx), pb::TxState::Committed);
    // Again, explicitly: same outcome, nothing runs twice.
    let calls_before = a.recorder.ledger.lock().unwrap().calls.len()
        + b.recorder.ledger.lock().unwrap().calls.len();
    let again = client
        .commit(&gid, true, Duration::from_secs(10))
        .await
        .expect("repeat commit");
    assert_eq!(state(&again), pb::TxState::Committed);
    assert_eq!(again.decision, tx.decision);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls_after = a.recorder.ledger.lock().unwrap().calls.len()
        + b.recorder.ledger.lock().unwrap().calls.len();
    assert_eq!(
        calls_before, calls_after,
        "a repeated commit called participants again"
    );
    check_participants(&[tx], &a, &b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_gid_and_state_and_changes_nothing() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let (a, b) = (
        TestParticipant::start().await,
        TestParticipant::start().await,
    );
    let client = cluster.client();
    let ok_ops = [
        ("prepare", "http://127.0.0.1:1/p"),
        ("commit", "http://127.0.0.1:1/c"),
        ("rollback", "http://127.0.0.1:1/r"),
    ];

    let code = |e: tandem_sdk::Error| (e.code(), e.to_string());

    // Register on an unknown gid.
    let (c, m) = code(
        client
            .register_branch("ghost", "a", &ok_ops, Vec::new())
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Some(Code::NotFound));
    assert!(m.contains("transaction ghost not found"), "{m}");

    // Malformed endpoint.
    let request = two_pc(30_000);
    let gid = request.gid.clone();
    client.begin_with(request).await.expect("begin");
    let bad = [
        ("prepare", "not-a-url"),
        ("commit", "http://h/c"),
        ("rollback", "http://h/r"),
    ];
    let (c, m) = code(
        client
            .register_branch(&gid, "a", &bad, Vec::new())
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Some(Code::InvalidArgument));
    assert!(m.contains(&gid) && m.contains("malformed"), "{m}");
    let missing = [("prepare", "http://h/p")];
    let (c, m) = code(
        client
            .register_branch(&gid, "a", &missing, Vec::new())
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Some(Code::InvalidArgument));
    assert!(m.contains("needs an endpoint for commit"), "{m}");
    assert!(
        client.get(&gid).await.unwrap().branches.is_empty(),
        "refused registrations stored nothing"
    );

    // Register after the decision; abort after commit.
    register_pair(&client, &gid, &a, &b).await;
    let committed = client
        .commit(&gid, true, Duration::from_secs(10))
        .await
        .expect("commit");
    assert_eq!(state(&committed), pb::TxState::Committed);
    let (c, m) = code(
        client
            .register_branch(&gid, "late", &ok_ops, Vec::new())
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Some(Code::FailedPrecondition));
    assert!(
        m.contains(&format!("transaction {gid} is committed")),
        "{m}"
    );
    let (c, m) = code(
        client
            .abort(&gid, "too late", false, Duration::ZERO)
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Some(Code::FailedPrecondition));
    assert!(
        m.contains(&format!("transaction {gid} is committed: cannot abort")),
        "{m}"
    );
    let after = client.get(&gid).await.unwrap();
    assert_eq!(
        after.updated_at_ms, committed.updated_at_ms,
        "refusals changed the transaction"
    );

    // Commit after abort.
    let request = two_pc(30_000);
    let gid = request.gid.clone();
    client.begin_with(request).await.expect("begin");
    client
        .abort(&gid, "changed my mind", true, Duration::from_secs(5))
        .await
        .expect("abort");
    let (c, m) = code(
        client
            .commit(&gid, false, Duration::ZERO)
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Some(Code::FailedPrecondition));
    assert!(
        m.contains(&format!(
            "transaction {gid} is aborted: cannot commit: it was aborted (changed my mind)"
        )),
        "{m}"
    );
}

/// A participant that votes yes and then refuses (409) to commit, until
/// told to accept; it records when each commit arrived.
#[derive(Clone, Default)]
struct RefusesCommit {
    commits: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
    accept: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl tandem_sdk::participant::TwoPhaseResource for RefusesCommit {
    async fn prepare(
        &self,
        _: &tandem_sdk::participant::BranchContext,
        _: &[u8],
    ) -> Result<(), tandem_sdk::participant::BranchError> {
        Ok(())
    }

    async fn commit(
        &self,
        _: &tandem_sdk::participant::BranchContext,
    ) -> Result<(), tandem_sdk::participant::BranchError> {
        self.commits.lock().unwrap().push(Instant::now());
        if self.accept.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err(tandem_sdk::participant::BranchError::Failure(
                "not today".into(),
            ))
        }
    }

    async fn rollback(
        &self,
        _: &tandem_sdk::participant::BranchContext,
    ) -> Result<(), tandem_sdk::participant::BranchError> {
        Ok(())
    }
}

/// Atomicity (a refused phase two stays decided) and no hot loop: a
/// participant that answers 409 to commit after voting yes is retried with
/// the policy's backoff — checked from its own call log — the hazard shows
/// in Get, the log does not get an entry per attempt, and once the
/// participant accepts the transaction commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomicity_a_refused_commit_is_retried_with_backoff_and_flagged_as_a_hazard() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let client = cluster.client();
    let participant = RefusesCommit::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tandem_sdk::participant::ParticipantServer::new(
        tandem_sdk::participant::TwoPhase(participant.clone()),
    );
    tokio::spawn(async move {
        let _ = tandem_sdk::participant::serve(listener, server, std::future::pending()).await;
    });
    let (initial, max) = (100u64, 800u64);
    let mut request = two_pc(600_000);
    request.options.as_mut().unwrap().retry = Some(pb::RetryPolicy {
        initial_interval_ms: initial as u32,
        max_interval_ms: max as u32,
        max_attempts: 3,
    });
    let gid = request.gid.clone();
    client.begin_with(request).await.unwrap();
    let ops: Vec<(String, String)> = ["prepare", "commit", "rollback"]
        .iter()
        .map(|op| (op.to_string(), format!("{base}/tandem/{op}")))
        .collect();
    let refs: Vec<(&str, &str)> = ops.iter().map(|(o, e)| (o.as_str(), e.as_str())).collect();
    client
        .register_branch(&gid, "a", &refs, Vec::new())
        .await
        .unwrap();
    let commit_index_before = cluster.local_status(1).await.unwrap().commit;
    client.commit(&gid, false, Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;

    let calls = participant.commits.lock().unwrap().clone();
    // Backoff: attempt n+1 waits at least half of min(initial·2^(n-1), max).
    for (n, pair) in calls.windows(2).enumerate() {
        let full = (initial << n).min(max);
        let gap = pair[1].duration_since(pair[0]).as_millis() as u64;
        assert!(
            gap + 25 >= full / 2,
            "commit {} came {gap} ms after the previous one; the policy asks for at least {} ms",
            n + 2,
            full / 2
        );
    }
    assert!(
        (5..=20).contains(&calls.len()),
        "{} commits in 6 s: not the policy's pace",
        calls.len()
    );
    let tx = client.get(&gid).await.unwrap();
    assert_eq!(state(&tx), pb::TxState::Committing);
    assert!(tx.heuristic_hazard, "the refusal shows in Get");
    let commit = tx.branches[0]
        .ops
        .iter()
        .find(|o| o.op == "commit")
        .unwrap();
    assert_eq!(commit.state, pb::OpState::Refused as i32);
    assert!(
        commit
            .last_error
            .contains("participant refused commit: not today"),
        "{}",
        commit.last_error
    );
    assert!(commit.attempts >= 1 && commit.attempts as usize <= calls.len());
    // Not an entry per attempt: the decision, then the first refusal and
    // the attempts at powers of two.
    let entries = cluster.local_status(1).await.unwrap().commit - commit_index_before;
    assert!(
        (entries as usize) < calls.len(),
        "{entries} log entries for {} attempts",
        calls.len()
    );

    participant
        .accept
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let done = client
        .commit(&gid, true, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(state(&done), pb::TxState::Committed);
    assert!(!done.heuristic_hazard);
}
