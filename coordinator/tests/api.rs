//! The client API's contract: bad input is refused with INVALID_ARGUMENT
//! naming the problem and leaves nothing behind; followers redirect to the
//! leader; the CLI's shape (exit codes, JSON) holds.

mod common;

use std::process::Command;
use std::time::Duration;

use common::submissions::{one_step, open, submission};
use common::{BIN, Cluster, Options, list_all_from};
use tandem_proto::v1 as pb;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tonic::Code;

const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

async fn raw_client(endpoint: &str) -> CoordinatorClient<tonic::transport::Channel> {
    CoordinatorClient::connect(format!("http://{endpoint}"))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_naming_the_problem_and_stores_nothing() {
    let options = Options {
        extra: vec!["--payload-bytes-max".into(), "1024".into()],
        ..Options::default()
    };
    let cluster = Cluster::start_with(1, options);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let endpoint = cluster.node(1).endpoint();
    let mut client = raw_client(&endpoint).await;
    let begin = |gid: &str, protocol: i32, payload: usize| pb::BeginRequest {
        gid: gid.to_string(),
        protocol,
        payload: vec![b'x'; payload],
        ..Default::default()
    };
    let saga = pb::Protocol::Saga as i32;
    let cases = [
        (begin("", saga, 0), "gid is empty"),
        (
            begin(&"g".repeat(129), saga, 0),
            "is 129 bytes; the limit is 128",
        ),
        (begin("has space", saga, 0), "printable ASCII"),
        (
            begin("g-unknown", 99, 0),
            "transaction g-unknown: unknown protocol 99",
        ),
        (
            begin("g-none", 0, 0),
            "transaction g-none: protocol is required",
        ),
        (
            begin("g-big", saga, 1025),
            "transaction g-big: payload is 1025 bytes; the limit is 1024",
        ),
    ];
    for (request, expected) in cases {
        let status = client
            .begin(request)
            .await
            .expect_err("bad input must be refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains(expected),
            "message {:?} should contain {expected:?}",
            status.message()
        );
    }
    let mut too_long_timeout = begin("g-timeout", saga, 0);
    too_long_timeout.options = Some(pb::TxOptions {
        timeout_ms: u32::MAX,
        ..Default::default()
    });
    let status = client
        .begin(too_long_timeout)
        .await
        .expect_err("over the limit");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("timeout_ms"),
        "{}",
        status.message()
    );
    // A message is prepared whole, never begun: refused, no state left.
    let status = client
        .begin(begin("g-msg", pb::Protocol::Msg as i32, 0))
        .await
        .expect_err("a message is prepared, not begun");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status
            .message()
            .starts_with("transaction g-msg: a message is prepared whole"),
        "{}",
        status.message()
    );

    assert!(
        list_all_from(&endpoint).await.is_empty(),
        "refused Begins left state behind"
    );
    let status = client
        .get(pb::GetRequest {
            gid: "nope".into(),
            resolve: false,
        })
        .await
        .expect_err("unknown gid");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "transaction nope not found");
    // At the limit is fine.
    client
        .begin(begin("g-ok", saga, 1024))
        .await
        .expect("payload at the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_redirect_writes_with_the_leaders_address() {
    let cluster = Cluster::start(3);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let mut client = raw_client(&cluster.node(follower).endpoint()).await;
    let status = client
        .begin(pb::BeginRequest {
            gid: "redirected".into(),
            protocol: pb::Protocol::Saga as i32,
            ..Default::default()
        })
        .await
        .expect_err("a follower does not take writes");
    let leader_address = cluster.node(leader).address.clone();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status
            .metadata()
            .get(tandem_proto::LEADER_METADATA_KEY)
            .and_then(|v| v.to_str().ok()),
        Some(leader_address.as_str())
    );
    assert!(
        status.message().contains(&leader_address),
        "{}",
        status.message()
    );
    // Nothing was stored by the refused call; the SDK, given only the
    // follower, follows the redirect.
    assert!(
        list_all_from(&cluster.node(leader).endpoint())
            .await
            .is_empty()
    );
    let sdk = tandem_sdk::Client::connect([cluster.node(follower).endpoint()]).expect("client");
    sdk.begin("redirected", pb::Protocol::Saga)
        .await
        .expect("SDK follows the redirect");
}

/// Reads a stream's answers until `ids` are all answered (bounded).
async fn answers_for(
    answers: &mut tonic::Streaming<pb::SubmitSagasResponse>,
    ids: &[u64],
) -> std::collections::HashMap<u64, pb::SagaAnswer> {
    let mut got = std::collections::HashMap::new();
    while got.len() < ids.len() {
        let message = tokio::time::timeout(Duration::from_secs(20), answers.message())
            .await
            .expect("answers within 20 s")
            .expect("the stream stays up")
            .expect("the stream stays open");
        for answer in message.answers {
            assert!(
                ids.contains(&answer.id),
                "an answer to no submission: {answer:?}"
            );
            assert!(got.insert(answer.id, answer).is_none(), "answered twice");
        }
    }
    got
}

/// The stream of submissions (`SubmitSagas`) answers each submission as its
/// own SubmitSaga call would: a saga runs and is idempotent for its gid
/// (invariant 6), bad input is INVALID_ARGUMENT naming the problem and
/// stores nothing, a follower answers UNAVAILABLE with the leader's
/// address and stores nothing, and a message over the limit ends the
/// stream with a status that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_on_a_stream_are_answered_as_their_calls_would_be() {
    let cluster = Cluster::start(3);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let service = common::participant::StepService::start().await;
    let saga = |gid: &str| one_step(gid, &service.saga);
    let mut client = raw_client(&cluster.node(leader).endpoint()).await;
    let (sender, mut answers) = open(&mut client, None).await.expect("the stream opens");
    sender
        .send(pb::SubmitSagasRequest {
            submissions: vec![
                submission(1, Some(saga("s-1"))),
                submission(2, Some(saga("has space"))),
                submission(3, None),
            ],
        })
        .await
        .unwrap();
    let got = answers_for(&mut answers, &[1, 2, 3]).await;
    let ok = got[&1].response.clone().expect("s-1 answered");
    assert_eq!(got[&1].code, 0);
    assert!(ok.created);
    let tx = ok.transaction.expect("its transaction");
    assert_eq!(tx.gid, "s-1");
    assert_eq!(tx.state, pb::TxState::Committed as i32);
    assert_eq!(got[&2].code, Code::InvalidArgument as i32);
    assert!(
        got[&2].message.contains("printable ASCII"),
        "{}",
        got[&2].message
    );
    assert_eq!(got[&3].code, Code::InvalidArgument as i32);
    assert_eq!(got[&3].message, "submission 3 has no saga");
    // The same saga again, on the same stream: the one already there.
    sender
        .send(pb::SubmitSagasRequest {
            submissions: vec![submission(4, Some(saga("s-1")))],
        })
        .await
        .unwrap();
    let again = answers_for(&mut answers, &[4]).await[&4].clone();
    let again = again.response.expect("answered");
    assert!(!again.created);
    assert_eq!(
        again.transaction.unwrap().state,
        pb::TxState::Committed as i32
    );
    assert_eq!(service.recorder.effects("s-1").len(), 1, "one action, once");
    // Over the limit: the stream ends saying why.
    sender
        .send(pb::SubmitSagasRequest {
            submissions: (0..1025)
                .map(|i| submission(100 + i, Some(saga(&format!("big-{i}")))))
                .collect(),
        })
        .await
        .unwrap();
    let status = loop {
        match answers.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("at most 1024"),
        "{}",
        status.message()
    );

    // A follower: UNAVAILABLE with the leader's address, nothing stored.
    let mut client = raw_client(&cluster.node(follower).endpoint()).await;
    let (sender, mut answers) = open(&mut client, None).await.expect("the stream opens");
    sender
        .send(pb::SubmitSagasRequest {
            submissions: vec![submission(7, Some(saga("s-follower")))],
        })
        .await
        .unwrap();
    let refused = answers_for(&mut answers, &[7]).await[&7].clone();
    assert_eq!(
        refused.code,
        Code::Unavailable as i32,
        "{}",
        refused.message
    );
    assert_eq!(refused.leader, cluster.node(leader).address);
    assert_eq!(
        list_all_from(&cluster.node(leader).endpoint()).await,
        vec!["s-1".to_string()],
        "only s-1 is stored"
    );
    // The SDK, given only the follower, follows the leader from the stream's answer.
    let sdk = tandem_sdk::Client::connect([cluster.node(follower).endpoint()]).expect("client");
    let tx = sdk
        .saga()
        .gid("s-sdk")
        .step(tandem_sdk::Step::service("a", &service.saga))
        .submit_and_wait(Duration::from_secs(10))
        .await
        .expect("the SDK follows the leader");
    assert_eq!(tx.state, pb::TxState::Committed as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_begin_get_list_and_cluster_status_keep_their_shape() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let endpoints = cluster.endpoints().join(",");
    let run = |args: &[&str]| {
        let output = Command::new(BIN).args(args).output().expect("run tandem");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).trim().to_string(),
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        )
    };

    let (ok, gid, _) = run(&[
        "tx",
        "begin",
        "--endpoint",
        &endpoints,
        "--protocol",
        "tcc",
        "--gid",
        "cli-1",
    ]);
    assert!(ok);
    assert_eq!(gid, "cli-1");
    let (ok, generated, _) = run(&["tx", "begin", "--endpoint", &endpoints, "--protocol", "2pc"]);
    assert!(ok && !generated.is_empty());

    let (ok, out, err) = run(&[
        "tx",
        "begin",
        "--endpoint",
        &endpoints,
        "--protocol",
        "saga",
        "--gid",
        "cli-1",
    ]);
    assert!(!ok, "a protocol clash must exit non-zero");
    assert!(out.is_empty());
    assert!(
        err.contains("cli-1") && err.contains("already exists"),
        "{err}"
    );
    let (ok, _, err) = run(&[
        "tx",
        "begin",
        "--endpoint",
        &endpoints,
        "--protocol",
        "bogus",
    ]);
    assert!(!ok && err.contains("unknown protocol"), "{err}");

    let (ok, out, _) = run(&["tx", "get", "cli-1", "--endpoint", &endpoints, "--json"]);
    assert!(ok);
    let tx: serde_json::Value = serde_json::from_str(&out).expect("tx get --json");
    assert_eq!(tx["gid"], "cli-1");
    assert_eq!(tx["protocol"], "tcc");
    assert_eq!(tx["state"], "active");

    let (ok, out, _) = run(&[
        "tx",
        "list",
        "--endpoint",
        &endpoints,
        "--state",
        "active",
        "--json",
    ]);
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&out).expect("tx list --json");
    assert_eq!(list["transactions"].as_array().map(Vec::len), Some(2));

    // Commit and abort from the command line: what an operator does with a
    // transaction its application left behind (a message whose producer
    // never answers its check-back, say).
    let (ok, out, err) = run(&["tx", "commit", "cli-1", "--endpoint", &endpoints, "--json"]);
    assert!(ok, "{err}");
    let tx: serde_json::Value = serde_json::from_str(&out).expect("tx commit --json");
    assert_eq!(tx["state"], "committed", "no branches: committed at once");
    let (ok, _, err) = run(&["tx", "abort", "cli-1", "--endpoint", &endpoints]);
    assert!(
        !ok && err.contains("cli-1") && err.contains("cannot abort"),
        "{err}"
    );
    let sdk = tandem_sdk::Client::connect(cluster.endpoints()).expect("client");
    sdk.message("http://127.0.0.1:9")
        .gid("cli-msg")
        .to("nats://cli.events", b"x".to_vec())
        .prepare()
        .await
        .expect("prepare a message");
    let (ok, out, err) = run(&[
        "tx",
        "abort",
        "cli-msg",
        "--endpoint",
        &endpoints,
        "--reason",
        "the producer is gone for good",
        "--wait",
        "10s",
        "--json",
    ]);
    assert!(ok, "{err}");
    let tx: serde_json::Value = serde_json::from_str(&out).expect("tx abort --json");
    assert_eq!(tx["state"], "aborted");
    assert_eq!(tx["error"], "the producer is gone for good");
    let (ok, _, err) = run(&["tx", "commit", "nope", "--endpoint", &endpoints]);
    assert!(
        !ok && err.contains("nope") && err.contains("not found"),
        "{err}"
    );

    let (ok, out, _) = run(&["cluster", "status", "--endpoint", &endpoints, "--json"]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&out).expect("cluster status --json");
    let leader = status["leader"].as_u64().expect("leader id");
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    for node in nodes {
        for key in ["id", "address", "role", "term", "commit", "applied"] {
            assert!(!node[key].is_null(), "node entry lacks {key}: {node}");
        }
    }
    let leaders: Vec<_> = nodes.iter().filter(|n| n["role"] == "leader").collect();
    assert_eq!(leaders.len(), 1);
    assert_eq!(leaders[0]["id"].as_u64(), Some(leader));
    let cluster_id = status["cluster_id"].as_str().expect("cluster id");
    assert!(uuid::Uuid::parse_str(cluster_id).is_ok(), "{cluster_id}");

    // A reader that stops early (`| head`) ends the command quietly, as it
    // does any Unix tool: no panic, no error message.
    common::begin_many(&cluster, "pipe", 400, 16).await;
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{BIN} tx list --endpoint {endpoints} --json --limit 1000 | head -c 10"
        ))
        .output()
        .expect("run a pipeline");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    assert_eq!(output.stdout.len(), 10);
}
