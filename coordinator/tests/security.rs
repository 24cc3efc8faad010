//! Transport security on real processes: plaintext only on loopback unless
//! asked for; a cluster with `tandem certs dev` certificates runs sagas
//! through a leader kill over mutual TLS; clients without the CA, and peers
//! whose certificate is from another CA or names another member, are
//! refused.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::participant::StepService;
use common::submissions::{one_step, open, submission};
use common::{BIN, Cluster, Options, free_port, wait_for};
use tandem_proto::v1 as pb;
use tandem_proto::v1::raft_transport_client::RaftTransportClient;
use tandem_sdk::{Client, Step};

const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `sagas` on a `SubmitSagas` stream (in one message), with `token`
/// if any, and returns every answer by id (the saga's index).
async fn on_a_stream(
    client: &mut tandem_proto::v1::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    token: Option<&str>,
    sagas: Vec<pb::SubmitSagaRequest>,
) -> Result<std::collections::BTreeMap<u64, pb::SagaAnswer>, tonic::Status> {
    let count = sagas.len();
    let message = pb::SubmitSagasRequest {
        submissions: sagas
            .into_iter()
            .enumerate()
            .map(|(i, saga)| submission(i as u64, Some(saga)))
            .collect(),
    };
    let (sender, mut answers) = open(client, token).await?;
    sender.send(message).await.unwrap();
    let mut got = std::collections::BTreeMap::new();
    while got.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(30), answers.message())
            .await
            .expect("answers within 30 s")?
            .expect("the stream stays open");
        for answer in message.answers {
            got.insert(answer.id, answer);
        }
    }
    drop(sender);
    Ok(got)
}

fn dev_certs(dir: &std::path::Path, nodes: u64) {
    let out = Command::new(BIN)
        .args(["certs", "dev", "--nodes", &nodes.to_string(), "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    for name in tandem_coordinator::tls::dev_file_names(nodes) {
        assert!(dir.join(&name).exists(), "{name}");
        assert!(listed.contains(&name), "{listed}");
    }
}

#[test]
fn plaintext_on_a_public_address_is_refused_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let started = Instant::now();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--http-listen",
            "off",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it exits at once"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve plaintext on 0.0.0.0"),
        "{err}"
    );
    assert!(
        err.contains("--insecure") && err.contains("tandem certs dev"),
        "{err}"
    );
    assert!(!dir.path().join("d").exists(), "nothing was written");

    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--http-listen",
            "off",
        ])
        .arg("--insecure")
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "with --insecure it serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_with_dev_certificates_runs_sagas_over_mutual_tls_through_a_leader_kill() {
    let certs = tempfile::tempdir().unwrap();
    dev_certs(certs.path(), 3);
    let mut cluster = Cluster::start_with(
        3,
        Options {
            tls: Some(certs.path().to_path_buf()),
            ..Options::default()
        },
    );
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let service = StepService::start().await;
    let client = cluster.client();
    let saga = |gid: &str| {
        client
            .saga()
            .gid(gid)
            .step(Step::service("a", &service.saga))
            .step(Step::service("b", &service.saga))
    };
    for i in 0..5 {
        let tx = saga(&format!("tls-{i}"))
            .submit_and_wait(Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(tx.state, pb::TxState::Committed as i32);
    }
    cluster.kill(leader);
    for i in 5..10 {
        let tx = saga(&format!("tls-{i}"))
            .submit_and_wait(Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            tx.state,
            pb::TxState::Committed as i32,
            "after the leader's death"
        );
    }
    for i in 0..10 {
        assert_eq!(
            service.recorder.effects(&format!("tls-{i}")).len(),
            2,
            "tls-{i}"
        );
    }

    let alive = cluster.nodes.iter().find(|n| n.id != leader).unwrap();
    // A plaintext client is refused.
    let plain = Client::builder([alive.endpoint()])
        .retry_deadline(Duration::from_secs(2))
        .build()
        .unwrap();
    assert!(plain.get("tls-0").await.is_err());
    // A client trusting another CA refuses the node.
    let other = tempfile::tempdir().unwrap();
    dev_certs(other.path(), 1);
    let stranger = Client::builder([alive.endpoint()])
        .tls_ca(std::fs::read_to_string(other.path().join("ca.pem")).unwrap())
        .retry_deadline(Duration::from_secs(2))
        .build()
        .unwrap();
    let e = stranger.get("tls-0").await.unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");
    // The HTTP API is HTTPS, with the cluster's CA.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.path().join("ca.pem")).unwrap())
        .unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let got: serde_json::Value = https
        .get(format!(
            "https://{}/v1/transactions/tls-9",
            alive.http_address
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["transaction"]["state"], "committed");
    assert!(
        reqwest::get(format!(
            "http://{}/v1/transactions/tls-9",
            alive.http_address
        ))
        .await
        .is_err(),
        "no plaintext HTTP"
    );
    // The nodes reached each other over the peer wire, under TLS, not
    // over the gRPC stream kept for older nodes.
    for node in &cluster.nodes {
        let log = std::fs::read_to_string(&node.log).unwrap();
        assert!(
            !log.contains("over its gRPC stream"),
            "node {}: {log}",
            node.id
        );
    }
}

/// Raft traffic: from a certificate of another CA, the handshake fails;
/// from the cluster's CA but naming another member (or a client), the
/// batch is refused — the node keeps its term and its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_traffic_needs_a_member_certificate_from_the_clusters_ca() {
    let certs = tempfile::tempdir().unwrap();
    dev_certs(certs.path(), 3);
    let cluster = Cluster::start_with(
        1,
        Options {
            tls: Some(certs.path().to_path_buf()),
            ..Options::default()
        },
    );
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let before = cluster.local_status(1).await.unwrap();
    let read = |dir: &std::path::Path, name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let peer = |dir: &std::path::Path, cert: &str, key: &str| tandem_coordinator::tls::Tls {
        cert_pem: read(dir, cert),
        key_pem: read(dir, key),
        ca_pem: read(certs.path(), "ca.pem"),
    };
    let address = cluster.node(1).address.clone();
    // A vote request claiming to be node 2, with a far higher term.
    let batch = |from: u64| {
        let mut m = raft::eraftpb::Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgRequestVote);
        m.from = from;
        m.to = 1;
        m.term = before.term + 100;
        pb::RaftBatch {
            cluster_name: cluster.name.clone(),
            from_id: from,
            from_address: "127.0.0.1:1".into(),
            messages: vec![protobuf::Message::write_to_bytes(&m).unwrap()],
        }
    };
    let send = |tls: tandem_coordinator::tls::Tls, from: u64| {
        let address = address.clone();
        let batch = batch(from);
        async move {
            let endpoint = tandem_coordinator::tls::endpoint(&address, Some(&tls)).unwrap();
            let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
            RaftTransportClient::new(channel)
                .send(batch)
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
    };
    let other = tempfile::tempdir().unwrap();
    dev_certs(other.path(), 2);
    let foreign = tandem_coordinator::tls::Tls {
        ca_pem: read(certs.path(), "ca.pem"),
        ..peer(other.path(), "node-2.pem", "node-2.key")
    };
    assert!(
        send(foreign.clone(), 2).await.is_err(),
        "another CA's certificate"
    );
    let e = send(peer(certs.path(), "node-3.pem", "node-3.key"), 2)
        .await
        .unwrap_err();
    assert!(
        e.contains("PermissionDenied") && e.contains("node-2"),
        "{e}"
    );
    let e = send(peer(certs.path(), "client.pem", "client.key"), 2)
        .await
        .unwrap_err();
    assert!(e.contains("PermissionDenied"), "{e}");
    // The same over the peer wire, at its handshake.
    let over_wire = |tls: tandem_coordinator::tls::Tls, from: u64| {
        let address = address.clone();
        let hello = pb::RaftBatch {
            messages: Vec::new(),
            ..batch(from)
        };
        async move {
            let connector = tandem_coordinator::raft::wire::TlsConnector::new(&tls).unwrap();
            tandem_coordinator::raft::wire::connect(&address, Some(&connector), &hello)
                .await
                .map(drop)
                .map_err(|e| format!("{e:?}"))
        }
    };
    let e = over_wire(foreign, 2).await.unwrap_err();
    assert!(e.starts_with("Unreachable") && e.contains("TLS"), "{e}");
    let e = over_wire(peer(certs.path(), "node-3.pem", "node-3.key"), 2)
        .await
        .unwrap_err();
    assert!(
        e.starts_with("Refused") && e.contains("PermissionDenied") && e.contains("node-2"),
        "{e}"
    );
    let e = over_wire(peer(certs.path(), "client.pem", "client.key"), 2)
        .await
        .unwrap_err();
    assert!(
        e.starts_with("Refused") && e.contains("PermissionDenied"),
        "{e}"
    );
    // A member's own certificate is admitted.
    over_wire(peer(certs.path(), "node-2.pem", "node-2.key"), 2)
        .await
        .unwrap();
    // The refusals are in the node's log: the other CA's handshake, and
    // the certificates that speak for another member.
    let log = std::fs::read_to_string(&cluster.node(1).log).unwrap();
    assert!(log.contains("refused raft traffic"), "{log}");
    assert!(log.contains("refused a TLS connection"), "{log}");
    let after = wait_for(Duration::from_secs(2), "a status", || {
        cluster.local_status(1)
    })
    .await;
    assert_eq!(after.term, before.term, "no forged vote moved the term");
    assert_eq!(after.role, "leader");
}

/// Tokens and roles, over gRPC (the CLI) and HTTP (through a follower,
/// which forwards the credential to the leader), and JWTs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_and_roles_guard_every_surface() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[tokens]\n\"reader-token-0123456789\" = \"reader\"\n\"app-token-0123456789ab\" = \"app\"\n\"operator-token-01234567\" = \"operator\"\n",
    )
    .unwrap();
    let secret = "jwt-secret-of-at-least-thirty-two-bytes";
    let jwt_key = dir.path().join("jwt.key");
    std::fs::write(&jwt_key, secret).unwrap();
    let cluster = Cluster::start_with(
        3,
        Options {
            extra: vec![
                "--auth-tokens".into(),
                tokens.to_string_lossy().into(),
                "--jwt-key".into(),
                jwt_key.to_string_lossy().into(),
            ],
            ..Options::default()
        },
    );
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let endpoints = cluster.endpoints().join(",");
    let cli = |args: &[&str], token: Option<&str>| {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .args(["--endpoint", &endpoints, "--retry-deadline", "3s"])
            .env_remove("TANDEM_TOKEN");
        if let Some(token) = token {
            command.env("TANDEM_TOKEN", token);
        }
        let out = command.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = cli(
        &["tx", "begin", "--protocol", "tcc", "--gid", "auth-1"],
        None,
    );
    assert!(
        !ok && err.contains("unauthenticated") && err.contains("requires a token"),
        "{err}"
    );
    let (ok, err) = cli(
        &["tx", "begin", "--protocol", "tcc", "--gid", "auth-1"],
        Some("reader-token-0123456789"),
    );
    assert!(
        !ok && err.contains("permission denied") && err.contains("app role"),
        "{err}"
    );
    let (ok, err) = cli(
        &["tx", "begin", "--protocol", "tcc", "--gid", "auth-1"],
        Some("app-token-0123456789ab"),
    );
    assert!(ok, "{err}");
    let (ok, err) = cli(&["tx", "get", "auth-1"], Some("reader-token-0123456789"));
    assert!(ok, "{err}");
    let (ok, err) = cli(
        &["cluster", "remove", "--id", "3"],
        Some("app-token-0123456789ab"),
    );
    assert!(
        !ok && err.contains("permission denied") && err.contains("operator"),
        "{err}"
    );
    let (ok, err) = cli(&["tx", "retry", "auth-1"], Some("app-token-0123456789ab"));
    assert!(!ok && err.contains("permission denied"), "{err}");
    let (ok, err) = cli(&["tx", "get", "auth-1"], Some("forged-token-0123456789"));
    assert!(!ok && err.contains("unknown token"), "{err}");

    // JWTs: a fresh one works, an expired one is refused.
    use jsonwebtoken::{EncodingKey, Header, encode};
    let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let jwt = |role: &str, exp: u64| {
        encode(
            &Header::default(),
            &serde_json::json!({"role": role, "exp": exp}),
            &key,
        )
        .unwrap()
    };
    let (ok, err) = cli(&["tx", "get", "auth-1"], Some(&jwt("reader", now + 300)));
    assert!(ok, "{err}");
    let (ok, err) = cli(&["tx", "get", "auth-1"], Some(&jwt("operator", now - 600)));
    assert!(!ok && err.contains("expired"), "{err}");

    // A stream of submissions needs the app role, like SubmitSaga, and
    // its token is checked again with every message: one that expires
    // while the stream is open stops being honoured.
    let service = StepService::start().await;
    let mut grpc = tandem_proto::v1::coordinator_client::CoordinatorClient::connect(format!(
        "http://{}",
        cluster.node(leader).address
    ))
    .await
    .unwrap();
    let refused = on_a_stream(
        &mut grpc,
        Some("reader-token-0123456789"),
        vec![one_step("auth-s0", &service.saga)],
    )
    .await
    .expect_err("a reader may not submit");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    let short_lived = jwt("app", now + 1);
    let (sender, mut answers) = open(&mut grpc, Some(&short_lived)).await.unwrap();
    let submit = |id: u64, gid: &str| pb::SubmitSagasRequest {
        submissions: vec![submission(id, Some(one_step(gid, &service.saga)))],
    };
    sender.send(submit(1, "auth-s1")).await.unwrap();
    let first = answers.message().await.unwrap().unwrap().answers.remove(0);
    assert_eq!(first.code, 0, "{}", first.message);
    // Past its expiry and the nodes' leeway (5 s).
    tokio::time::sleep(Duration::from_secs(1 + 5 + 1)).await;
    sender.send(submit(2, "auth-s2")).await.unwrap();
    let second = answers.message().await.unwrap().unwrap().answers.remove(0);
    assert_eq!(second.code, tonic::Code::Unauthenticated as i32);
    assert!(second.message.contains("expired"), "{}", second.message);
    let (ok, err) = cli(&["tx", "get", "auth-s2"], Some("reader-token-0123456789"));
    assert!(
        !ok && err.contains("not found"),
        "refused, not stored: {err}"
    );

    // HTTP, through a follower: 401 / 403 / 2xx; the follower forwards the
    // credential with the request.
    let follower = cluster.nodes.iter().find(|n| n.id != leader).unwrap();
    let url = follower.http_url();
    let http = reqwest::Client::new();
    let begin = |token: Option<&str>, gid: &str| {
        let mut request = http
            .post(format!("{url}/v1/transactions"))
            .json(&serde_json::json!({"gid": gid, "protocol": "saga"}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let r = begin(None, "auth-2").await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    assert_eq!(
        begin(Some("reader-token-0123456789"), "auth-2")
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        begin(Some("app-token-0123456789ab"), "auth-2")
            .await
            .unwrap()
            .status(),
        201
    );
    let r = http
        .post(format!("{url}/v1/transactions"))
        .bearer_auth(jwt("app", now + 300))
        .json(&serde_json::json!({"gid": "auth-3", "protocol": "tcc"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r = http
        .post(format!("{url}/v1/transactions/auth-3/retry"))
        .bearer_auth("app-token-0123456789ab")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401, "metrics need a reader");
    let r = http
        .get(format!("{url}/metrics"))
        .bearer_auth("reader-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The dashboard asks for a token, then keeps it in a cookie.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = browser.get(format!("{url}/ui")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/login");
    let r = browser
        .post(format!("{url}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=reader-token-0123456789")
        .send()
        .await
        .unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let r = browser
        .get(format!("{url}/ui"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = browser
        .post(format!("{url}/v1/transactions/auth-3/resolve"))
        .header("cookie", &pair)
        .json(&serde_json::json!({"reason": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a reader's cookie cannot repair");
    // Open without a token: the OpenAPI document.
    assert_eq!(
        http.get(format!("{url}/openapi.json"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Signed calls: a participant holding the cluster's key accepts the
/// coordinator's calls, and refuses unsigned, forged, stale and replayed
/// ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_with_the_key_refuses_forged_and_replayed_calls() {
    use tandem_proto::wire::{headers, participant_endpoint, signing};
    let dir = tempfile::tempdir().unwrap();
    let key = "participant-key-of-at-least-32-bytes!";
    let key_file = dir.path().join("participant.key");
    std::fs::write(&key_file, key).unwrap();
    let cluster = Cluster::start_with(
        1,
        Options {
            extra: vec![
                "--participant-key".into(),
                key_file.to_string_lossy().into(),
            ],
            ..Options::default()
        },
    );
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let recorder = common::participant::StepRecorder::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tandem_sdk::participant::ParticipantServer::new(tandem_sdk::participant::Saga(
        recorder.clone(),
    ))
    .with_key(key);
    let task = tokio::spawn(async move {
        let _ = tandem_sdk::participant::serve(listener, server, std::future::pending()).await;
    });

    // The coordinator's calls are accepted.
    let tx = cluster
        .client()
        .saga()
        .gid("signed-1")
        .step(Step::service("only", &base))
        .submit_and_wait(Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(tx.state, pb::TxState::Committed as i32);
    assert_eq!(recorder.effects("signed-1").len(), 1);

    let http = reqwest::Client::new();
    let url = participant_endpoint(&base, "action");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let call = |signature: Option<(i64, String)>| {
        let mut request = http
            .post(&url)
            .header(headers::GID, "forged-1")
            .header(headers::BRANCH_ID, "only")
            .header(headers::OP, "action")
            .header(headers::FENCE_TERM, "1")
            .header(headers::FENCE_INDEX, "1")
            .body("{}");
        if let Some((at, signature)) = signature {
            request = request
                .header(headers::TIMESTAMP, at.to_string())
                .header(headers::SIGNATURE, signature);
        }
        request.send()
    };
    let sign =
        |key: &[u8], at: i64| signing::sign(key, "forged-1", "only", "action", 1, 1, at, b"{}");
    let refused = |reason: &'static str| {
        move |r: reqwest::Response| async move {
            assert_eq!(r.status(), 401);
            let text = r.text().await.unwrap();
            assert!(text.contains(reason), "{text}");
        }
    };
    refused("unsigned")(call(None).await.unwrap()).await;
    refused("bad signature")(
        call(Some((
            now,
            sign(b"some-other-key-that-is-32-bytes-long", now),
        )))
        .await
        .unwrap(),
    )
    .await;
    refused("window")(
        call(Some((now - 600_000, sign(key.as_bytes(), now - 600_000))))
            .await
            .unwrap(),
    )
    .await;
    let valid = Some((now, sign(key.as_bytes(), now)));
    assert_eq!(call(valid.clone()).await.unwrap().status(), 200);
    refused("replayed")(call(valid).await.unwrap()).await;
    assert!(
        recorder.effects("forged-1").len() == 1,
        "only the genuine call ran"
    );
    task.abort();
}

/// One client flooding a node is held back (429 over HTTP, RESOURCE_EXHAUSTED
/// over gRPC) while another client's sagas keep finishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_client_is_held_back_and_another_is_not() {
    let cluster = Cluster::start_with(
        1,
        Options {
            extra: vec!["--client-rate-max".into(), "50".into()],
            ..Options::default()
        },
    );
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let service = StepService::start().await;
    let url = cluster.node(1).http_url();
    // The flood comes from 127.0.0.2; the well-behaved client from 127.0.0.1.
    let flooder = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let flood = tokio::spawn({
        let url = url.clone();
        async move {
            let mut refused = 0;
            let mut retry_after = false;
            for _ in 0..20 {
                let calls = (0..25).map(|_| flooder.get(format!("{url}/v1/transactions")).send());
                for r in futures::future::join_all(calls).await {
                    let r = r.unwrap();
                    if r.status() == 429 {
                        refused += 1;
                        retry_after |= r.headers().contains_key("retry-after");
                    }
                }
            }
            (refused, retry_after)
        }
    });
    let client = cluster.client();
    for i in 0..10 {
        let tx = client
            .saga()
            .gid(&format!("calm-{i}"))
            .step(Step::service("a", &service.saga))
            .submit_and_wait(Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(tx.state, pb::TxState::Committed as i32, "calm-{i}");
    }
    let (refused, retry_after) = flood.await.unwrap();
    assert!(
        refused > 100,
        "the flood was held back: {refused} of 500 refused"
    );
    assert!(retry_after);
    // Over gRPC too.
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.node(1).address))
            .unwrap()
            .local_address(Some(std::net::IpAddr::from([127, 0, 0, 3])));
    let mut grpc = tandem_proto::v1::coordinator_client::CoordinatorClient::new(
        endpoint.connect().await.unwrap(),
    );
    let mut exhausted = None;
    for _ in 0..300 {
        if let Err(status) = grpc.list(pb::ListRequest::default()).await {
            exhausted = Some(status);
            break;
        }
    }
    let status = exhausted.expect("the gRPC flood was held back");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("127.0.0.3"),
        "{}",
        status.message()
    );
    // On a stream of submissions, each submission is held to the rate as
    // its own call would be; those refused store nothing.
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.node(1).address))
            .unwrap()
            .local_address(Some(std::net::IpAddr::from([127, 0, 0, 4])));
    let mut grpc = tandem_proto::v1::coordinator_client::CoordinatorClient::new(
        endpoint.connect().await.unwrap(),
    );
    let sagas = (0..300)
        .map(|i| one_step(&format!("flood-{i}"), &service.saga))
        .collect();
    let answers = on_a_stream(&mut grpc, None, sagas)
        .await
        .expect("the stream");
    let refused: Vec<u64> = answers
        .values()
        .filter(|a| a.code == tonic::Code::ResourceExhausted as i32)
        .map(|a| a.id)
        .collect();
    assert!(
        refused.len() > 100,
        "held back: {} of 300 refused",
        refused.len()
    );
    let first = &answers[&refused[0]];
    assert!(first.message.contains("127.0.0.4"), "{}", first.message);
    for answer in answers.values() {
        let gid = format!("flood-{}", answer.id);
        let held = client.get(&gid).await;
        if refused.contains(&answer.id) {
            assert!(held.is_err(), "{gid} was refused and stored");
        } else {
            assert_eq!(answer.code, 0, "{gid}: {}", answer.message);
            assert_eq!(held.unwrap().state, pb::TxState::Committed as i32, "{gid}");
        }
    }
}

/// HTTPS to participants: a participant that asks for a client certificate
/// from the cluster's CA gets the node's, and its calls go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_participants_get_the_nodes_client_certificate() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = tempfile::tempdir().unwrap();
    dev_certs(certs.path(), 3);
    let cluster = Cluster::start_with(
        1,
        Options {
            tls: Some(certs.path().to_path_buf()),
            ..Options::default()
        },
    );
    cluster.wait_leader(LEADER_TIMEOUT).await;

    // The participant: HTTPS with node-3's certificate, requiring a client
    // certificate signed by the cluster's CA.
    let read = |name: &str| std::fs::read(certs.path().join(name)).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read("ca.pem")) {
        roots.add(cert.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            CertificateDer::pem_slice_iter(&read("node-3.pem"))
                .map(|c| c.unwrap())
                .collect(),
            PrivateKeyDer::from_pem_slice(&read("node-3.key")).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let recorder = common::participant::StepRecorder::default();
    let router = tandem_sdk::participant::ParticipantServer::new(tandem_sdk::participant::Saga(
        recorder.clone(),
    ))
    .router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", listener.local_addr().unwrap());
    let handshakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = tokio::spawn({
        let handshakes = handshakes.clone();
        async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (acceptor, router, handshakes) =
                    (acceptor.clone(), router.clone(), handshakes.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let presented = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .is_some_and(|c| !c.is_empty());
                    if presented {
                        handshakes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        }
    });
    let tx = cluster
        .client()
        .saga()
        .gid("https-1")
        .step(Step::service("only", &base))
        .submit_and_wait(Duration::from_secs(20))
        .await
        .unwrap();
    server.abort();
    assert_eq!(tx.state, pb::TxState::Committed as i32, "{tx:?}");
    assert_eq!(recorder.effects("https-1").len(), 1);
    assert!(handshakes.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

/// Connections a port holds are bounded: past the limit a new client
/// waits until one closes; an idle connection does not keep its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_and_idle_ones_do_not_hold_their_place() {
    let cluster = Cluster::start_with(
        1,
        Options {
            extra: vec!["--connections-max".into(), "2".into()],
            ..Options::default()
        },
    );
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let address = cluster.node(1).http_address.clone();
    let url = format!("{}/openapi.json", cluster.node(1).http_url());
    // A fresh connection per request, so that only the test's own idle
    // connections hold places.
    let fetch = || async {
        reqwest::Client::builder()
            .timeout(Duration::from_millis(800))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
            .get(&url)
            .send()
            .await
    };
    let idle_a = tokio::net::TcpStream::connect(&address).await.unwrap();
    let idle_b = tokio::net::TcpStream::connect(&address).await.unwrap();
    assert!(fetch().await.is_err(), "both places are taken");
    drop(idle_a);
    let answered = wait_for(Duration::from_secs(5), "a place", || async {
        fetch().await.ok().map(|r| r.status())
    })
    .await;
    assert_eq!(answered, 200, "a closed connection gives its place back");
    drop(idle_b);
    // Two connections that send nothing take both places — until the node
    // drops them for it (its read timeout is 10 s).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _silent_a = tokio::net::TcpStream::connect(&address).await.unwrap();
    let _silent_b = tokio::net::TcpStream::connect(&address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fetch().await.is_err(), "both places are taken");
    tokio::time::sleep(Duration::from_secs(11)).await;
    let r = fetch().await;
    assert!(r.as_ref().is_ok_and(|r| r.status() == 200), "{r:?}");
}
