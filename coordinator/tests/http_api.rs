//! The HTTP/JSON API, `/metrics` and the repair commands end to end, on
//! real `tandem` processes. Invariants: atomicity and saga order (5) hold
//! the same whichever surface submitted the saga; bad input leaves no
//! trace; a repair is recorded and a heuristic outcome is never silent.

mod common;

use std::time::{Duration, Instant};

use common::participant::{StepRecorder, StepService};
use common::{Cluster, Options, metric, wait_for};
use serde_json::{Value, json};
use tandem_proto::wire::participant_endpoint;

const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn saga_body(gid: &str, base: &str, steps: &[&str]) -> Value {
    json!({
        "gid": gid,
        "steps": steps.iter().map(|s| json!({
            "branch_id": s,
            "action": participant_endpoint(base, "action"),
            "compensate": participant_endpoint(base, "compensate"),
            "payload": {"step": s},
        })).collect::<Vec<_>>(),
        "options": {"retry": {"initial_interval_ms": 20, "max_interval_ms": 200, "max_attempts": 20}},
        "wait": true,
        "wait_timeout_ms": 20000,
    })
}

async fn scrape(node_url: &str) -> String {
    http()
        .get(format!("{node_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Sagas submitted over HTTP to a follower run as over gRPC: 10 commit, 2
/// whose second step refuses are compensated in reverse order — checked
/// from the participant's own record — and every node's /metrics counts
/// exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saga_over_http_through_a_follower_and_exact_metrics() {
    let cluster = Cluster::start(3);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let follower = cluster.nodes.iter().find(|n| n.id != leader).unwrap();
    let service = StepService::start().await;
    let steps = ["a", "b", "c"];
    let client = http();
    for i in 0..12 {
        let gid = format!("http-saga-{i}");
        if i >= 10 {
            service
                .recorder
                .refuse
                .lock()
                .unwrap()
                .insert((gid.clone(), "b".to_string()));
        }
        let response = client
            .post(format!("{}/v1/sagas", follower.http_url()))
            .json(&saga_body(&gid, &service.saga, &steps))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        let body: Value = response.json().await.unwrap();
        let expected = if i >= 10 { "aborted" } else { "committed" };
        assert_eq!(body["transaction"]["state"], expected, "{body}");
        assert_eq!(body["created"], true);
        // The participant's own record, per saga.
        let effects = service.recorder.effects(&gid);
        let want: Vec<(String, String)> = if i >= 10 {
            vec![
                ("a".into(), "action".into()),
                ("a".into(), "compensate".into()),
            ]
        } else {
            steps
                .iter()
                .map(|s| (s.to_string(), "action".into()))
                .collect()
        };
        assert_eq!(effects, want, "{gid}");
        // A repeat is recognised, on another node.
        let again = client
            .post(format!("{}/v1/sagas", cluster.node(leader).http_url()))
            .json(&saga_body(&gid, &service.saga, &steps))
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 200);
        let again: Value = again.json().await.unwrap();
        assert_eq!(again["created"], false);
        assert_eq!(again["transaction"]["state"], expected);
    }
    // Every node applies every entry: each one's counters say the same.
    for node in &cluster.nodes {
        let url = node.http_url();
        let page = wait_for(Duration::from_secs(10), "counters to settle", || {
            let url = url.clone();
            async move {
                let page = scrape(&url).await;
                let done = metric(
                    &page,
                    r#"tandem_transactions_finished_total{protocol="saga",outcome="committed",heuristic="false"}"#,
                ) + metric(
                    &page,
                    r#"tandem_transactions_finished_total{protocol="saga",outcome="aborted",heuristic="false"}"#,
                );
                // The in-flight gauge follows the replica's status, which
                // is published a few milliseconds after the apply.
                let settled = metric(&page, "tandem_transactions_in_flight") == 0.0;
                (done >= 12.0 && settled).then_some(page)
            }
        })
        .await;
        assert_eq!(
            metric(&page, r#"tandem_transactions_begun_total{protocol="saga"}"#),
            12.0
        );
        assert_eq!(
            metric(
                &page,
                r#"tandem_transactions_finished_total{protocol="saga",outcome="committed",heuristic="false"}"#
            ),
            10.0
        );
        assert_eq!(
            metric(
                &page,
                r#"tandem_transactions_finished_total{protocol="saga",outcome="aborted",heuristic="false"}"#
            ),
            2.0
        );
        assert_eq!(metric(&page, "tandem_transactions_in_flight"), 0.0);
        assert!(metric(&page, "tandem_raft_term") >= 1.0);
    }
    // The leader made the calls: 10×3 + 2×1 actions succeeded, 2 refused;
    // a failed saga compensates every step that may have run — a refused
    // one too (the barrier makes that a no-op): 2×2 compensations.
    let page = scrape(&cluster.node(leader).http_url()).await;
    assert_eq!(
        metric(
            &page,
            r#"tandem_branch_call_seconds_count{op="action",result="ok"}"#
        ),
        32.0
    );
    assert_eq!(
        metric(
            &page,
            r#"tandem_branch_call_seconds_count{op="action",result="failed"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &page,
            r#"tandem_branch_call_seconds_count{op="compensate",result="ok"}"#
        ),
        4.0
    );
    // Reads and lists through a follower: linearizable, filtered.
    let listed: Value = client
        .get(format!(
            "{}/v1/transactions?state=aborted&protocol=saga&since=1h",
            follower.http_url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let gids: Vec<&str> = listed["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["gid"].as_str().unwrap())
        .collect();
    assert_eq!(gids, ["http-saga-10", "http-saga-11"]);
}

/// Bad input on every HTTP surface: a clear 4xx problem+json naming the
/// problem (and the gid where there is one), and nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_over_http_is_refused_with_a_problem_and_leaves_nothing() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let url = cluster.node(1).http_url();
    let client = http();
    let post = |path: &str, body: String, content_type: &str| {
        client
            .post(format!("{url}{path}"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let cases: Vec<(reqwest::Response, u16, &str)> = vec![
        (
            post("/v1/sagas", "{not json".into(), "application/json")
                .await
                .unwrap(),
            400,
            "key must be a string",
        ),
        (
            post(
                "/v1/sagas",
                json!({"gid": "g1", "steps": [], "extra": 1}).to_string(),
                "application/json",
            )
            .await
            .unwrap(),
            422,
            "unknown field `extra`",
        ),
        (
            post(
                "/v1/transactions",
                json!({"gid": "g2", "protocol": "paxos"}).to_string(),
                "application/json",
            )
            .await
            .unwrap(),
            422,
            "unknown variant `paxos`",
        ),
        (
            post(
                "/v1/transactions",
                json!({"gid": "g3", "protocol": "tcc"}).to_string(),
                "text/plain",
            )
            .await
            .unwrap(),
            415,
            "Content-Type: application/json",
        ),
        (
            post(
                "/v1/transactions",
                json!({"gid": "has space", "protocol": "tcc"}).to_string(),
                "application/json",
            )
            .await
            .unwrap(),
            400,
            "gid",
        ),
        (
            post(
                "/v1/sagas",
                json!({"gid": "g4", "steps": []}).to_string(),
                "application/json",
            )
            .await
            .unwrap(),
            400,
            "g4",
        ),
        (
            post(
                "/v1/transactions",
                json!({"gid": "g5", "protocol": "tcc", "payload": "x".repeat(10 << 20)})
                    .to_string(),
                "application/json",
            )
            .await
            .unwrap(),
            413,
            "length limit",
        ),
        (
            post(
                "/v1/transactions",
                json!({"gid": "g6", "protocol": "tcc", "payload": 1, "payload_base64": "AA=="})
                    .to_string(),
                "application/json",
            )
            .await
            .unwrap(),
            400,
            "not both",
        ),
        (
            client
                .get(format!("{url}/v1/transactions/nope"))
                .send()
                .await
                .unwrap(),
            404,
            "nope",
        ),
        (
            client
                .get(format!("{url}/v1/transactions?limit=0"))
                .send()
                .await
                .unwrap(),
            400,
            "limit",
        ),
        (
            client
                .get(format!("{url}/v1/transactions?colour=red"))
                .send()
                .await
                .unwrap(),
            400,
            "colour",
        ),
        (
            client
                .get(format!("{url}/v1/transactions?since=yesterday"))
                .send()
                .await
                .unwrap(),
            400,
            "since",
        ),
        (
            client
                .get(format!("{url}/v2/anything"))
                .send()
                .await
                .unwrap(),
            404,
            "/v2/anything",
        ),
        (
            client
                .delete(format!("{url}/v1/sagas"))
                .send()
                .await
                .unwrap(),
            405,
            "DELETE",
        ),
        (
            post(
                "/v1/transactions/nope/commit",
                String::new(),
                "application/json",
            )
            .await
            .unwrap(),
            404,
            "nope",
        ),
        (
            post(
                "/v1/transactions/nope/retry",
                String::new(),
                "application/json",
            )
            .await
            .unwrap(),
            404,
            "nope",
        ),
        (
            post(
                "/v1/transactions/nope/resolve",
                json!({"reason": ""}).to_string(),
                "application/json",
            )
            .await
            .unwrap(),
            400,
            "needs a reason",
        ),
    ];
    for (i, (response, status, needle)) in cases.into_iter().enumerate() {
        assert_eq!(response.status().as_u16(), status, "case {i}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "case {i}"
        );
        let problem: Value = response.json().await.unwrap();
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(needle), "case {i}: {detail}");
        assert_eq!(problem["status"], status);
        assert!(
            problem["type"]
                .as_str()
                .unwrap()
                .starts_with("urn:tandem:problem:")
        );
    }
    // A finished transaction cannot be repaired: 409, and it stays as it was.
    let done: Value = client
        .post(format!("{url}/v1/transactions"))
        .json(&json!({"gid": "done-1", "protocol": "tcc"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(done["transaction"]["state"], "active");
    let committed = client
        .post(format!("{url}/v1/transactions/done-1/commit"))
        .json(&json!({"wait": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(committed.status(), 200);
    for path in ["retry", "resolve"] {
        let response = client
            .post(format!("{url}/v1/transactions/done-1/{path}"))
            .json(&json!({"reason": "why not"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 409, "{path}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["gid"], "done-1");
        assert!(
            problem["detail"].as_str().unwrap().contains("finished"),
            "{problem}"
        );
    }
    let after: Value = client
        .get(format!("{url}/v1/transactions/done-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(after["transaction"]["repairs"], json!([]));
    // Nothing else was recorded.
    let listed: Value = client
        .get(format!("{url}/v1/transactions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let gids: Vec<&str> = listed["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["gid"].as_str().unwrap())
        .collect();
    assert_eq!(gids, ["done-1"]);
    // The document the API is described by parses and names every path.
    let doc: Value = client
        .get(format!("{url}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/v1/sagas",
        "/v1/transactions/{gid}/resolve",
        "/v1/transactions/{gid}/watch",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
}

/// A saga participant on a port it may not be listening on yet.
struct LateParticipant {
    recorder: StepRecorder,
    base: String,
    listener: Option<std::net::TcpListener>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LateParticipant {
    fn reserve() -> LateParticipant {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        LateParticipant {
            recorder: StepRecorder::default(),
            base,
            listener: Some(listener),
            task: None,
        }
    }

    /// Closes the port: calls are refused until `start`.
    fn down(&mut self) -> std::net::SocketAddr {
        let listener = self.listener.take().unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        address
    }

    async fn start(&mut self, address: std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let server = tandem_sdk::participant::ParticipantServer::new(
            tandem_sdk::participant::Saga(self.recorder.clone()),
        );
        self.task = Some(tokio::spawn(async move {
            let _ = tandem_sdk::participant::serve(listener, server, std::future::pending()).await;
        }));
    }
}

impl Drop for LateParticipant {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn cli(cluster: &Cluster, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(common::BIN)
        .args(args)
        .args(["--endpoint", &cluster.node(1).endpoint()])
        .env("USER", "oncall")
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// Repair. A step whose participant was down waits out a long backoff;
/// `tandem tx retry` once it is back finishes the saga at once, recorded.
/// A compensation whose participant is gone for good blocks an abort
/// until `tandem tx resolve` ends it — with the heuristic visible in Get,
/// the HTTP API and the metrics, and the audit record saying who and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_retry_finishes_a_stuck_branch_and_resolve_ends_with_a_visible_heuristic() {
    let cluster = Cluster::start_with(1, Options::default());
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let url = cluster.node(1).http_url();
    let client = http();

    // Retry.
    let mut late = LateParticipant::reserve();
    let address = late.down();
    let mut body = saga_body("stuck-1", &late.base, &["only"]);
    body["options"]["retry"] =
        json!({"initial_interval_ms": 60000, "max_interval_ms": 60000, "max_attempts": 1000});
    body["wait"] = json!(false);
    let response = client
        .post(format!("{url}/v1/sagas"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let grpc = cluster.client();
    wait_for(Duration::from_secs(10), "the first failed call", || async {
        let tx = grpc.get("stuck-1").await.ok()?;
        (tx.branches[0].ops[0].attempts >= 1).then_some(())
    })
    .await;
    late.start(address).await;
    let asked = Instant::now();
    let (ok, out) = cli(
        &cluster,
        &["tx", "retry", "stuck-1", "--reason", "participant is back"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("repair    retry (every branch) by oncall@"),
        "{out}"
    );
    wait_for(
        Duration::from_secs(5),
        "the saga to finish after the retry",
        || async {
            let tx = grpc.get("stuck-1").await.ok()?;
            (tx.state == tandem_proto::v1::TxState::Committed as i32).then_some(())
        },
    )
    .await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the 60 s backoff was waited out"
    );
    assert_eq!(
        late.recorder.effects("stuck-1"),
        [("only".to_string(), "action".to_string())]
    );

    // Resolve.
    let mut gone = LateParticipant::reserve();
    gone.down();
    let response = client
        .post(format!("{url}/v1/transactions"))
        .json(&json!({"gid": "tcc-gone", "protocol": "tcc"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let response = client
        .post(format!("{url}/v1/transactions/tcc-gone/branches"))
        .json(&json!({"branch_id": "b1", "ops": [
            {"op": "try", "endpoint": participant_endpoint(&gone.base, "try")},
            {"op": "confirm", "endpoint": participant_endpoint(&gone.base, "confirm")},
            {"op": "cancel", "endpoint": participant_endpoint(&gone.base, "cancel")},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    // Undecided: resolve is refused, abort is the way.
    let (ok, out) = cli(&cluster, &["tx", "resolve", "tcc-gone", "--reason", "x"]);
    assert!(!ok && out.contains("abort it instead"), "{out}");
    let (ok, out) = cli(
        &cluster,
        &["tx", "abort", "tcc-gone", "--reason", "app gave up"],
    );
    assert!(ok, "{out}");
    wait_for(Duration::from_secs(10), "a failed cancel", || async {
        let tx = grpc.get("tcc-gone").await.ok()?;
        let cancel = tx.branches[0].ops.iter().find(|o| o.op == "cancel")?;
        (cancel.attempts >= 1).then_some(())
    })
    .await;
    let (ok, out) = cli(
        &cluster,
        &[
            "tx",
            "resolve",
            "tcc-gone",
            "--branch",
            "b1",
            "--reason",
            "inventory db dropped",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("state     aborted"), "{out}");
    assert!(out.contains("HEURISTIC"), "{out}");
    // Get over gRPC…
    let tx = grpc.get("tcc-gone").await.unwrap();
    assert!(tx.heuristic);
    assert_eq!(tx.repairs.len(), 1);
    assert_eq!(tx.repairs[0].reason, "inventory db dropped");
    assert!(
        tx.repairs[0].by.starts_with("oncall@"),
        "{:?}",
        tx.repairs[0]
    );
    // …the HTTP API…
    let json: Value = client
        .get(format!("{url}/v1/transactions/tcc-gone"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["transaction"]["heuristic"], true);
    assert_eq!(json["transaction"]["state"], "aborted");
    assert_eq!(
        json["transaction"]["branches"][0]["ops"][2]["state"],
        "resolved"
    );
    assert_eq!(json["transaction"]["repairs"][0]["action"], "resolve");
    // …and the metrics.
    let page = scrape(&url).await;
    assert_eq!(
        metric(
            &page,
            r#"tandem_transactions_finished_total{protocol="tcc",outcome="aborted",heuristic="true"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(&page, r#"tandem_repairs_total{action="resolve"}"#),
        1.0
    );
    assert_eq!(
        metric(&page, r#"tandem_repairs_total{action="retry"}"#),
        1.0
    );
    // The participant never heard a thing; nothing it did is claimed.
    assert!(gone.recorder.effects("tcc-gone").is_empty());
}

/// `tandem tx submit-saga FILE` takes the HTTP API's saga document; `tx
/// watch` follows it to its end; `tx list --since` finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_submits_a_saga_from_a_json_file_and_watches_it() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let service = StepService::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("saga.json");
    let mut body = saga_body("file-saga", &service.saga, &["x", "y"]);
    body.as_object_mut().unwrap().remove("wait");
    body.as_object_mut().unwrap().remove("wait_timeout_ms");
    std::fs::write(&file, body.to_string()).unwrap();
    let (ok, out) = cli(
        &cluster,
        &["tx", "submit-saga", file.to_str().unwrap(), "--json"],
    );
    assert!(ok, "{out}");
    let submitted: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(submitted["gid"], "file-saga");
    let (ok, out) = cli(&cluster, &["tx", "watch", "file-saga", "--timeout", "20s"]);
    assert!(ok, "{out}");
    assert!(out.lines().last().unwrap().contains("committed"), "{out}");
    let (ok, out) = cli(
        &cluster,
        &["tx", "list", "--state", "committed", "--since", "1h"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("file-saga"), "{out}");
    let (ok, out) = cli(&cluster, &["tx", "list", "--stuck"]);
    assert!(ok, "{out}");
    assert!(out.contains("(no transactions)"), "{out}");
    // A document that is not a saga is refused before anything is sent.
    std::fs::write(&file, r#"{"gid": "x", "stepz": []}"#).unwrap();
    let (ok, out) = cli(&cluster, &["tx", "submit-saga", file.to_str().unwrap()]);
    assert!(!ok && out.contains("stepz"), "{out}");
}

/// A watch streams the transaction as it changes and ends once it has
/// finished: the last event is the terminal state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_every_change_until_the_end() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let service = StepService::start().await;
    *service.recorder.action_delay.lock().unwrap() = Duration::from_millis(300);
    let url = cluster.node(1).http_url();
    let client = http();
    let mut body = saga_body("watched", &service.saga, &["one", "two"]);
    body["wait"] = json!(false);
    let response = client
        .post(format!("{url}/v1/sagas"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let response = client
        .get(format!(
            "{url}/v1/transactions/watched/watch?timeout_ms=20000"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let started = Instant::now();
    let text = response.text().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the stream ended with the saga"
    );
    let states: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["state"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(states.len() >= 2, "{text}");
    assert_eq!(states.last().unwrap(), "committed", "{text}");
    assert!(
        states[..states.len() - 1].iter().all(|s| s == "active"),
        "{states:?}"
    );
    // An unknown gid: a problem, not a stream.
    let response = client
        .get(format!("{url}/v1/transactions/nope/watch"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}
