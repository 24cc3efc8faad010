//! The dashboard in a real browser (Debian's chromium, headless, through
//! playwright — clients/python/dashboard_check.py): the overview shows the
//! members and a saga that just ran, its timeline shows the decision, and a
//! branch stuck behind a long backoff is retried through the page — the
//! saga finishes and the repair is recorded. Screenshots of every page go
//! to target/ci-artifacts/.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::participant::{StepRecorder, StepService};
use common::{Cluster, wait_for};
use serde_json::json;
use tandem_proto::wire::participant_endpoint;

const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn saga(
    gid: &str,
    base: &str,
    steps: &[&str],
    initial_interval_ms: u32,
    wait: bool,
) -> serde_json::Value {
    json!({
        "gid": gid,
        "steps": steps.iter().map(|s| json!({
            "branch_id": s,
            "action": participant_endpoint(base, "action"),
            "compensate": participant_endpoint(base, "compensate"),
            "payload": {"step": s},
        })).collect::<Vec<_>>(),
        "options": {"retry": {"initial_interval_ms": initial_interval_ms, "max_interval_ms": initial_interval_ms, "max_attempts": 1000}},
        "wait": wait,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_in_a_browser_shows_a_saga_and_retries_a_stuck_branch() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "chromium is needed at {chromium}: run scripts/prepare-services.sh"
    );
    let cluster = Cluster::start(3);
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    // The browser talks to a follower: pages forward like the API.
    let url = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .unwrap()
        .http_url();
    let http = reqwest::Client::new();
    let service = StepService::start().await;
    let response = http
        .post(format!("{url}/v1/sagas"))
        .json(&saga(
            "order-1001",
            &service.saga,
            &["reserve", "charge", "ship"],
            50,
            true,
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    // A saga whose participant is down, retried only every 10 minutes.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = reserved.local_addr().unwrap();
    drop(reserved);
    let base = format!("http://{address}");
    let response = http
        .post(format!("{url}/v1/sagas"))
        .json(&saga("order-1002", &base, &["reserve"], 600_000, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let grpc = cluster.client();
    wait_for(Duration::from_secs(10), "the first failed call", || async {
        let tx = grpc.get("order-1002").await.ok()?;
        (tx.branches[0].ops[0].attempts >= 1).then_some(())
    })
    .await;
    // The participant comes back; only a retry gets the saga moving now.
    let recorder = StepRecorder::default();
    let listener = tokio::net::TcpListener::bind(address).await.unwrap();
    let server = tandem_sdk::participant::ParticipantServer::new(tandem_sdk::participant::Saga(
        recorder.clone(),
    ));
    let participant = tokio::spawn(async move {
        let _ = tandem_sdk::participant::serve(listener, server, std::future::pending()).await;
    });

    // A TCC whose participant is gone for good, aborted and resolved by
    // hand: the heuristic must show in the page.
    let gone = format!("http://{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    });
    let post = |path: String, body: serde_json::Value| {
        let http = http.clone();
        async move {
            let r = http.post(path).json(&body).send().await.unwrap();
            assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        }
    };
    post(
        format!("{url}/v1/transactions"),
        json!({"gid": "order-1003", "protocol": "tcc"}),
    )
    .await;
    post(
        format!("{url}/v1/transactions/order-1003/branches"),
        json!({"branch_id": "stock", "ops": [
            {"op": "try", "endpoint": participant_endpoint(&gone, "try")},
            {"op": "confirm", "endpoint": participant_endpoint(&gone, "confirm")},
            {"op": "cancel", "endpoint": participant_endpoint(&gone, "cancel")},
        ]}),
    )
    .await;
    post(
        format!("{url}/v1/transactions/order-1003/abort"),
        json!({"reason": "gave up"}),
    )
    .await;
    post(
        format!("{url}/v1/transactions/order-1003/resolve"),
        json!({"reason": "stock db dropped", "by": "oncall"}),
    )
    .await;

    let shots = repo().join("target/ci-artifacts");
    let script = repo().join("clients/python/dashboard_check.py");
    let output = tokio::task::spawn_blocking({
        let (url, shots) = (url.clone(), shots.clone());
        move || {
            Command::new("python3")
                .arg(script)
                .args([
                    "--url",
                    &url,
                    "--done",
                    "order-1001",
                    "--stuck",
                    "order-1002",
                ])
                .args(["--branch", "reserve", "--heuristic", "order-1003"])
                .args(["--shots", shots.to_str().unwrap()])
                .args(["--chromium", &chromium])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    participant.abort();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // What the coordinator and the participant say.
    let tx = grpc.get("order-1002").await.unwrap();
    assert_eq!(tx.state, tandem_proto::v1::TxState::Committed as i32);
    assert_eq!(tx.repairs.len(), 1);
    assert_eq!(tx.repairs[0].action, "retry");
    assert_eq!(tx.repairs[0].branch_id, "reserve");
    assert_eq!(tx.repairs[0].by, "dashboard");
    assert_eq!(
        recorder.effects("order-1002"),
        [("reserve".to_string(), "action".to_string())]
    );
    for name in ["overview", "saga", "stuck", "retried", "heuristic"] {
        assert!(
            shots.join(format!("dashboard-{name}.png")).exists(),
            "{name}"
        );
    }
}
