//! Transactional messages end to end (invariant 7: delivered if and only if
//! the local transaction committed; at least once), against real `tandem`
//! processes, real PostgreSQL (the outbox), real NATS JetStream and
//! RabbitMQ, and a plain HTTP webhook:
//! the producer dying at each point (after Prepare; after its local commit,
//! before Submit; with its local transaction still running when the
//! check-back arrives), a broker cut off during delivery, the leader killed
//! mid-delivery, an unreachable check-back, bad input, and the broker
//! behaviours we rely on (JetStream's duplicate window, RabbitMQ returning
//! an unroutable message).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::proxy::Proxy;
use common::{Cluster, Options, wait_for};
use futures::future::BoxFuture;
use tandem_examples::sinks::{
    DEFAULT_AMQP_URL, DEFAULT_NATS_URL, JetStreamSink, RabbitSink, WebhookSink,
};
use tandem_proto::v1 as pb;
use tandem_sdk::Client;
use tandem_sdk::outbox::{OutboxError, PgOutbox};
use tandem_sdk::participant::{BranchError, ParticipantServer, serve};
use tokio::net::TcpListener;
use tonic::Code;

const LEADER_TIMEOUT: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_secs(60);
const ORDERS: &str = "msg_test_orders";

/// The three sinks of one test, each of its own.
struct Sinks {
    hook: WebhookSink,
    nats: JetStreamSink,
    rabbit: RabbitSink,
}

impl Sinks {
    async fn start() -> Sinks {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Sinks {
            hook: WebhookSink::start().await.expect("webhook"),
            nats: JetStreamSink::create(DEFAULT_NATS_URL, &format!("msgtest_{tag}"))
                .await
                .expect("JetStream stream"),
            rabbit: RabbitSink::create(DEFAULT_AMQP_URL, &format!("msgtest-{tag}"))
                .await
                .expect("RabbitMQ queue"),
        }
    }

    /// Every message id each sink has (the queue is drained into `taken`).
    async fn ids(&self, taken: &mut Vec<String>) -> [BTreeSet<String>; 3] {
        taken.extend(self.rabbit.drain().await.expect("drain queue"));
        [
            self.hook.ids().into_iter().collect(),
            self.nats
                .ids()
                .await
                .expect("stream ids")
                .into_iter()
                .collect(),
            taken.iter().cloned().collect(),
        ]
    }

    async fn delete(&self) {
        self.nats.delete().await;
        self.rabbit.delete().await;
    }
}

/// What each sink (webhook, NATS, RabbitMQ) must hold for messages
/// `gids`: destination `i` of a message has id `{gid}/{i}`.
fn ids_of<'a>(gids: impl IntoIterator<Item = &'a String>) -> [BTreeSet<String>; 3] {
    let mut expected: [BTreeSet<String>; 3] = Default::default();
    for gid in gids {
        for (i, set) in expected.iter_mut().enumerate() {
            set.insert(format!("{gid}/{}", i + 1));
        }
    }
    expected
}

async fn outbox() -> PgOutbox {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(tandem_examples::DEFAULT_PG_URL)
        .await
        .expect("PostgreSQL at 127.0.0.1:5432");
    tandem_examples::services::pg_ddl(
        &pool,
        &format!("CREATE TABLE IF NOT EXISTS {ORDERS} (gid VARCHAR(128) PRIMARY KEY)"),
    )
    .await
    .expect("orders table");
    PgOutbox::new(pool).await.expect("outbox migrations")
}

/// Serves the outbox's check-back on `listener`; its base URL.
fn serve_check_back(outbox: &PgOutbox, listener: TcpListener) -> String {
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let server = ParticipantServer::new(outbox.clone());
    tokio::spawn(serve(listener, server, std::future::pending()));
    base
}

async fn producer(outbox: &PgOutbox) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    serve_check_back(outbox, listener)
}

/// One test's world: a cluster with its leader, a client, the three sinks,
/// the outbox on PostgreSQL and its check-back served.
struct Run {
    cluster: Cluster,
    client: Client,
    sinks: Sinks,
    outbox: PgOutbox,
    check_back: String,
}

impl Run {
    async fn start(cluster: Cluster) -> Run {
        cluster.wait_leader(LEADER_TIMEOUT).await;
        let client = cluster.client();
        let outbox = outbox().await;
        let check_back = producer(&outbox).await;
        Run {
            cluster,
            client,
            sinks: Sinks::start().await,
            outbox,
            check_back,
        }
    }
}

/// The business change: the order row, after `delay`, failing if `fail`.
fn place_order(
    gid: &str,
    delay: Duration,
    fail: bool,
) -> impl for<'c> FnOnce(&'c mut sqlx::PgConnection) -> BoxFuture<'c, Result<(), BranchError>>
+ Send
+ 'static {
    let gid = gid.to_string();
    move |conn| {
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            sqlx::query(&format!("INSERT INTO {ORDERS} (gid) VALUES ($1)"))
                .bind(&gid)
                .execute(&mut *conn)
                .await
                .map_err(|e| BranchError::Transient(e.to_string()))?;
            if fail {
                return Err(BranchError::Failure("out of stock".into()));
            }
            Ok(())
        })
    }
}

async fn order_exists(outbox: &PgOutbox, gid: &str) -> bool {
    sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {ORDERS} WHERE gid = $1"))
        .bind(gid)
        .fetch_one(outbox.pool())
        .await
        .expect("count orders")
        == 1
}

async fn terminal(client: &Client, gid: &str) -> pb::Transaction {
    wait_for(SETTLE, &format!("message {gid} to finish"), || async {
        let tx = client.get(gid).await.ok()?;
        let state = pb::TxState::try_from(tx.state).ok()?;
        matches!(state, pb::TxState::Committed | pb::TxState::Aborted).then_some(tx)
    })
    .await
}

fn state(tx: &pb::Transaction) -> pb::TxState {
    pb::TxState::try_from(tx.state).expect("state")
}

fn message(
    client: &Client,
    check_back: &str,
    sinks: &Sinks,
    timeout: Duration,
) -> tandem_sdk::MessageBuilder {
    client
        .message(check_back)
        .timeout(timeout)
        .to(&sinks.hook.url, br#"{"event":"OrderPlaced"}"#.to_vec())
        .to(&sinks.nats.destination("placed"), b"placed".to_vec())
        .to(&sinks.rabbit.destination(), b"placed".to_vec())
}

/// Waits until every sink holds exactly `expected` (unique ids).
async fn wait_delivered(sinks: &Sinks, taken: &mut Vec<String>, expected: &[BTreeSet<String>; 3]) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let got = sinks.ids(taken).await;
        if got == *expected {
            return;
        }
        for (name, (got, want)) in ["webhook", "nats", "rabbitmq"]
            .iter()
            .zip(got.iter().zip(expected))
        {
            let strange: Vec<_> = got.difference(want).collect();
            assert!(
                strange.is_empty(),
                "{name} received ids it must not: {strange:?}"
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered within {SETTLE:?}: hook {} nats {} rabbitmq {} of {}",
            got[0].len(),
            got[1].len(),
            got[2].len(),
            expected[0].len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_producer_dead_after_prepare_is_dropped_after_check_back_and_cannot_commit_late() {
    let Run {
        cluster: _cluster,
        client,
        sinks,
        outbox,
        check_back,
    } = Run::start(Cluster::start(1)).await;

    let msg = message(&client, &check_back, &sinks, Duration::from_millis(500));
    let gid = msg.gid_str().to_string();
    msg.prepare().await.expect("prepare");
    // The producer dies here: no local commit, no Submit.
    let tx = terminal(&client, &gid).await;
    assert_eq!(state(&tx), pb::TxState::Aborted, "{tx:?}");
    assert!(tx.error.contains("rolled back"), "{}", tx.error);

    // Its local transaction, arriving late, can no longer commit.
    let late = outbox
        .commit_local(&gid, place_order(&gid, Duration::ZERO, false))
        .await;
    assert!(
        matches!(&late, Err(OutboxError::RolledBack(BranchError::Failure(m))) if m.contains("already marked it rolled back")),
        "{late:?}"
    );
    assert!(!order_exists(&outbox, &gid).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut taken = Vec::new();
    let got = sinks.ids(&mut taken).await;
    assert!(
        got.iter().all(BTreeSet::is_empty),
        "delivered a dropped message: {got:?}"
    );
    sinks.delete().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_producer_dead_after_local_commit_before_submit_is_delivered_after_check_back() {
    let Run {
        cluster: _cluster,
        client,
        sinks,
        outbox,
        check_back,
    } = Run::start(Cluster::start(1)).await;

    let msg = message(&client, &check_back, &sinks, Duration::from_millis(500));
    let gid = msg.gid_str().to_string();
    msg.prepare().await.expect("prepare");
    outbox
        .commit_local(&gid, place_order(&gid, Duration::ZERO, false))
        .await
        .expect("local commit");
    // The producer dies here: no Submit.
    let tx = terminal(&client, &gid).await;
    assert_eq!(state(&tx), pb::TxState::Committed, "{tx:?}");
    assert!(
        tx.decision
            .as_ref()
            .is_some_and(|d| d.reason.contains("check-back")),
        "{tx:?}"
    );
    assert!(order_exists(&outbox, &gid).await);
    wait_delivered(&sinks, &mut Vec::new(), &ids_of([&gid])).await;
    sinks.delete().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_local_transaction_in_flight_at_check_back_ends_exactly_one_way() {
    let Run {
        cluster: _cluster,
        client,
        sinks,
        outbox,
        check_back,
    } = Run::start(Cluster::start(1)).await;

    // Each local transaction holds its marker while the check-back comes
    // (the message times out after 300 ms; the business takes 2 s), then
    // commits or rolls back. No Submit and no Abort: the check-back alone
    // decides, after waiting for the local transaction.
    let mut runs = Vec::new();
    for fail in [false, true, false, true] {
        let msg = message(&client, &check_back, &sinks, Duration::from_millis(300));
        let gid = msg.gid_str().to_string();
        msg.prepare().await.expect("prepare");
        let outbox = outbox.clone();
        let local_gid = gid.clone();
        let local = tokio::spawn(async move {
            outbox
                .commit_local(
                    &local_gid,
                    place_order(&local_gid, Duration::from_secs(2), fail),
                )
                .await
        });
        runs.push((gid, fail, local));
    }
    let mut committed_gids = Vec::new();
    let mut taken = Vec::new();
    for (gid, fail, local) in runs {
        let local = local.await.expect("local task");
        assert_eq!(local.is_ok(), !fail, "{gid}: {local:?}");
        let tx = terminal(&client, &gid).await;
        let committed = order_exists(&outbox, &gid).await;
        assert_eq!(committed, !fail, "{gid}");
        let want = if committed {
            pb::TxState::Committed
        } else {
            pb::TxState::Aborted
        };
        assert_eq!(
            state(&tx),
            want,
            "{gid}: local committed = {committed}: {tx:?}"
        );
        assert!(
            tx.decision
                .as_ref()
                .is_some_and(|d| d.reason.contains("check-back")),
            "{gid}: decided by the check-back: {tx:?}"
        );
        if committed {
            committed_gids.push(gid);
        }
    }
    wait_delivered(&sinks, &mut taken, &ids_of(&committed_gids)).await;
    sinks.delete().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_brokers_cut_off_during_delivery_then_back_lose_nothing() {
    let nats = Proxy::start("127.0.0.1:4222").await;
    let amqp = Proxy::start("127.0.0.1:5672").await;
    let cluster = Cluster::start_with(
        1,
        Options {
            extra: vec![
                "--nats-url".into(),
                format!("nats://{}", nats.addr),
                "--amqp-url".into(),
                format!("amqp://guest:guest@{}/%2f", amqp.addr),
            ],
            ..Options::default()
        },
    );
    let Run {
        cluster: _cluster,
        client,
        sinks,
        outbox,
        check_back,
    } = Run::start(cluster).await;

    let publish = |n: usize| {
        let (client, outbox, check_back) = (client.clone(), outbox.clone(), check_back.clone());
        let msgs: Vec<_> = (0..n)
            .map(|_| message(&client, &check_back, &sinks, Duration::from_secs(30)))
            .collect();
        async move {
            let mut gids = Vec::new();
            for msg in msgs {
                let gid = msg.gid_str().to_string();
                let published = outbox
                    .publish(&client, &msg, place_order(&gid, Duration::ZERO, false))
                    .await
                    .expect("publish");
                assert!(published.submitted);
                gids.push(gid);
            }
            gids
        }
    };
    let mut gids = publish(5).await;
    let mut taken = Vec::new();
    wait_delivered(&sinks, &mut taken, &ids_of(&gids)).await;

    // Both brokers cut off, with connections already made.
    nats.cut();
    amqp.cut();
    let later = publish(20).await;
    gids.extend(later.iter().cloned());
    let stuck = wait_for(SETTLE, "a delivery to fail visibly", || async {
        let tx = client.get(&later[0]).await.ok()?;
        let failing: Vec<_> = tx
            .branches
            .iter()
            .filter(|b| {
                b.ops
                    .iter()
                    .any(|o| o.attempts > 0 && !o.last_error.is_empty())
            })
            .map(|b| b.branch_id.clone())
            .collect();
        (failing.len() >= 2).then_some((tx, failing))
    })
    .await;
    assert_eq!(state(&stuck.0), pb::TxState::Committing, "{:?}", stuck.0);
    assert_eq!(
        stuck.1,
        vec!["2".to_string(), "3".to_string()],
        "the brokers' destinations"
    );
    assert!(
        !sinks.hook.ids().is_empty(),
        "the webhook is not behind the cut and keeps receiving"
    );

    nats.restore();
    amqp.restore();
    for gid in &gids {
        let tx = terminal(&client, gid).await;
        assert_eq!(state(&tx), pb::TxState::Committed, "{tx:?}");
    }
    wait_delivered(&sinks, &mut taken, &ids_of(&gids)).await;
    sinks.delete().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_leader_killed_mid_delivery_delivers_all_with_duplicates_only_of_the_same_id() {
    let Run {
        mut cluster,
        client,
        sinks,
        outbox,
        check_back,
    } = Run::start(Cluster::start(3)).await;
    let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;

    let total = 60;
    let producer_task = {
        let (client, outbox) = (client.clone(), outbox.clone());
        let msgs: Vec<_> = (0..total)
            .map(|_| message(&client, &check_back, &sinks, Duration::from_secs(5)))
            .collect();
        tokio::spawn(async move {
            let mut gids = Vec::new();
            for msg in msgs {
                let gid = msg.gid_str().to_string();
                match outbox
                    .publish(&client, &msg, place_order(&gid, Duration::ZERO, false))
                    .await
                {
                    // Not prepared (the leader was down too long): nothing
                    // ran locally; not part of the run.
                    Err(OutboxError::Prepare(_)) => {}
                    Err(e) => panic!("{gid}: {e}"),
                    Ok(_) => gids.push(gid),
                }
            }
            gids
        })
    };
    wait_for(SETTLE, "deliveries under way", || async {
        (sinks.hook.ids().len() >= 20).then_some(())
    })
    .await;
    cluster.kill(leader);
    let gids = producer_task.await.expect("producer");
    assert!(
        gids.len() >= total / 2,
        "{} of {total} published",
        gids.len()
    );
    for gid in &gids {
        let tx = terminal(&client, gid).await;
        assert_eq!(state(&tx), pb::TxState::Committed, "{tx:?}");
        assert!(order_exists(&outbox, gid).await);
    }
    let mut taken = Vec::new();
    wait_delivered(&sinks, &mut taken, &ids_of(&gids)).await;
    // JetStream dropped redeliveries within its window: one stored per id.
    let stored = sinks.nats.ids().await.expect("stream ids");
    assert_eq!(stored.len(), gids.len(), "JetStream holds each id once");
    sinks.delete().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_unreachable_check_back_keeps_the_message_prepared_and_visible_until_it_answers() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let client = cluster.client();
    let sinks = Sinks::start().await;
    let outbox = outbox().await;
    let port = common::free_port();
    let check_back = format!("http://127.0.0.1:{port}");

    let msg =
        message(&client, &check_back, &sinks, Duration::from_millis(300)).retry(pb::RetryPolicy {
            initial_interval_ms: 50,
            max_interval_ms: 200,
            max_attempts: 3,
        });
    let gid = msg.gid_str().to_string();
    msg.prepare().await.expect("prepare");
    outbox
        .commit_local(&gid, place_order(&gid, Duration::ZERO, false))
        .await
        .expect("local commit");
    // Far past max_attempts (3): still prepared, still asking, visibly.
    let tx = wait_for(SETTLE, "the check-back to fail 8 times", || async {
        let tx = client.get(&gid).await.ok()?;
        let check = tx.branches.iter().find(|b| b.branch_id == "check-back")?;
        (check.ops[0].attempts >= 8).then_some(tx)
    })
    .await;
    assert_eq!(state(&tx), pb::TxState::Preparing, "{tx:?}");
    let check = tx
        .branches
        .iter()
        .find(|b| b.branch_id == "check-back")
        .unwrap();
    assert!(!check.ops[0].last_error.is_empty(), "{check:?}");
    let mut taken = Vec::new();
    assert!(sinks.ids(&mut taken).await.iter().all(BTreeSet::is_empty));

    // The producer comes back.
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("rebind");
    serve_check_back(&outbox, listener);
    let tx = terminal(&client, &gid).await;
    assert_eq!(state(&tx), pb::TxState::Committed, "{tx:?}");
    wait_delivered(&sinks, &mut taken, &ids_of([&gid])).await;
    sinks.delete().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_bad_input_gets_a_clear_status_and_leaves_no_state() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let client = cluster.client();
    let check_back = "http://127.0.0.1:9/";
    let code_and_text = |e: tandem_sdk::Error| (e.code(), e.to_string());

    let cases: Vec<(tandem_sdk::MessageBuilder, &str)> = vec![
        (
            client
                .message(check_back)
                .gid("bad-scheme")
                .to("kafka://orders", b"x".to_vec()),
            "malformed",
        ),
        (
            client.message(check_back).gid("no-destination"),
            "at least one destination",
        ),
        (
            client
                .message(check_back)
                .gid("too-big")
                .to("nats://orders", vec![0u8; 64 * 1024 + 1]),
            "the limit is",
        ),
        (
            client
                .message("")
                .gid("no-check-back")
                .to("nats://orders", b"x".to_vec()),
            "malformed",
        ),
    ];
    for (msg, why) in cases {
        let gid = msg.gid_str().to_string();
        let (code, text) = code_and_text(msg.prepare().await.unwrap_err());
        assert_eq!(code, Some(Code::InvalidArgument), "{gid}: {text}");
        assert!(text.contains(&gid) && text.contains(why), "{gid}: {text}");
        let missing = client.get(&gid).await.unwrap_err();
        assert_eq!(missing.code(), Some(Code::NotFound), "{gid} left state");
    }

    let (code, text) = code_and_text(client.submit("never-prepared").await.unwrap_err());
    assert_eq!(code, Some(Code::NotFound), "{text}");
    assert!(text.contains("never-prepared"), "{text}");

    let dropped = client
        .message(check_back)
        .gid("dropped")
        .to("nats://orders", b"x".to_vec());
    dropped.prepare().await.expect("prepare");
    client
        .abort_message("dropped", "local rollback")
        .await
        .expect("abort");
    let before = client.get("dropped").await.expect("get");
    let (code, text) = code_and_text(client.submit("dropped").await.unwrap_err());
    assert_eq!(code, Some(Code::FailedPrecondition), "{text}");
    assert!(
        text.contains("dropped") && text.contains("cannot submit"),
        "{text}"
    );
    assert_eq!(
        client.get("dropped").await.expect("get"),
        before,
        "no state change"
    );

    let (code, text) = code_and_text(
        client
            .begin("begun-msg", pb::Protocol::Msg)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Some(Code::InvalidArgument), "{text}");
    assert!(text.contains("PrepareMessage"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_broker_semantics_jetstream_dedups_by_id_and_an_unroutable_or_streamless_publish_is_not_acknowledged()
 {
    // JetStream's duplicate window, relied on for at-least-once without
    // duplicates in the stream: the same Nats-Msg-Id twice is stored once.
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let direct = JetStreamSink::create(DEFAULT_NATS_URL, &format!("msgpin_{tag}"))
        .await
        .expect("stream");
    assert!(!direct.publish("x", "id-1", b"a").await.expect("first"));
    assert!(
        direct.publish("x", "id-1", b"a").await.expect("second"),
        "marked duplicate"
    );
    assert_eq!(direct.ids().await.expect("ids"), vec!["id-1".to_string()]);
    direct.delete().await;

    // Through Tandem: a RabbitMQ routing key no queue is bound to (the
    // broker returns the message and acks it) and a subject no stream
    // takes are failures, retried, until a queue and a stream exist.
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let client = cluster.client();
    let outbox = outbox().await;
    let check_back = producer(&outbox).await;
    let queue = format!("msgpin-{tag}");
    let stream = format!("msgpin2_{tag}");
    let msg = client
        .message(&check_back)
        .to(&format!("amqp://amq.direct/{queue}"), b"x".to_vec())
        .to(&format!("nats://{stream}.x"), b"x".to_vec())
        .retry(pb::RetryPolicy {
            initial_interval_ms: 50,
            max_interval_ms: 300,
            max_attempts: 3,
        });
    let gid = msg.gid_str().to_string();
    outbox
        .publish(&client, &msg, place_order(&gid, Duration::ZERO, false))
        .await
        .expect("publish");
    let tx = wait_for(SETTLE, "both deliveries to fail", || async {
        let tx = client.get(&gid).await.ok()?;
        let errors: Vec<String> = tx
            .branches
            .iter()
            .filter(|b| b.branch_id != "check-back")
            .map(|b| b.ops[0].last_error.clone())
            .collect();
        errors.iter().all(|e| !e.is_empty()).then_some((tx, errors))
    })
    .await;
    assert_eq!(state(&tx.0), pb::TxState::Committing);
    assert!(tx.1[0].contains("unroutable"), "{:?}", tx.1);
    assert!(tx.1[1].contains(&stream), "{:?}", tx.1);

    let rabbit = RabbitSink::create(DEFAULT_AMQP_URL, &queue)
        .await
        .expect("queue");
    let nats = JetStreamSink::create(DEFAULT_NATS_URL, &stream)
        .await
        .expect("stream");
    let tx = terminal(&client, &gid).await;
    assert_eq!(state(&tx), pb::TxState::Committed, "{tx:?}");
    assert_eq!(
        rabbit.drain().await.expect("drain"),
        vec![format!("{gid}/1")]
    );
    assert_eq!(nats.ids().await.expect("ids"), vec![format!("{gid}/2")]);
    rabbit.delete().await;
    nats.delete().await;
}

/// A destination served over gRPC by the SDK's participant server: the
/// `deliver` call carries the gid, the destination's id, the payload and the
/// decision's fencing token, and a repeat is recognisable by them.
#[tokio::test(flavor = "multi_thread")]
async fn messages_grpc_destination_receives_deliver_with_its_identity() {
    use std::sync::{Arc, Mutex};
    use tandem_sdk::participant::{BranchRequest, Handler};

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<BranchRequest>>>);
    impl Handler for Recorder {
        async fn handle(&self, request: BranchRequest) -> Result<(), BranchError> {
            self.0.lock().expect("recorder").push(request);
            Ok(())
        }
    }

    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let client = cluster.client();
    let outbox = outbox().await;
    let check_back = producer(&outbox).await;
    let recorder = Recorder::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let grpc = format!("grpc://{}", listener.local_addr().expect("address"));
    tokio::spawn(serve(
        listener,
        ParticipantServer::new(recorder.clone()),
        std::future::pending(),
    ));

    let msg = client
        .message(&check_back)
        .to_named("billing", &grpc, b"invoice".to_vec());
    let gid = msg.gid_str().to_string();
    outbox
        .publish(&client, &msg, place_order(&gid, Duration::ZERO, false))
        .await
        .expect("publish");
    let tx = terminal(&client, &gid).await;
    assert_eq!(state(&tx), pb::TxState::Committed, "{tx:?}");
    let calls = recorder.0.lock().expect("recorder").clone();
    assert!(!calls.is_empty());
    let decision = tx.decision.expect("decided");
    for call in calls {
        assert_eq!(
            (
                call.ctx.gid.as_str(),
                call.ctx.branch_id.as_str(),
                call.ctx.op.as_str()
            ),
            (gid.as_str(), "billing", "deliver")
        );
        assert_eq!(call.ctx.protocol, "msg");
        assert_eq!(&call.payload[..], b"invoice");
        assert_eq!(
            (call.ctx.fence.term, call.ctx.fence.index),
            (decision.term, decision.index),
            "the decision's token"
        );
    }
}
