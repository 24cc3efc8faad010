//! The saga and TCC examples on a 3-node cluster and the real databases:
//! their invariants, checked from the databases' own rows, hold with
//! failures injected (invariants 1, 5, 6).

mod common;

use std::time::Duration;

use common::Cluster;
use tandem_examples::sinks::{DEFAULT_AMQP_URL, DEFAULT_NATS_URL};
use tandem_examples::{
    DEFAULT_MYSQL_URL, DEFAULT_PG_URL, order_events, quickstart, saga_order, tcc_travel,
    three_phase,
};

const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saga_order_completes_or_compensates_on_every_database() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let report = saga_order::run(saga_order::Config {
        endpoints: cluster.endpoints(),
        orders: 200,
        concurrency: 16,
        fail_rate: 0.3,
        pg_url: DEFAULT_PG_URL.into(),
        mysql_url: DEFAULT_MYSQL_URL.into(),
    })
    .await
    .expect("saga-order");
    assert_eq!(report.violations, 0, "{report:?}");
    assert_eq!(report.completed + report.compensated, 200, "{report:?}");
    assert!(report.completed > 0 && report.compensated > 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcc_travel_confirms_or_cancels_every_reservation() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let report = tcc_travel::run(tcc_travel::Config {
        endpoints: cluster.endpoints(),
        bookings: 200,
        concurrency: 16,
        fail_rate: 0.3,
        pg_url: DEFAULT_PG_URL.into(),
        mysql_url: DEFAULT_MYSQL_URL.into(),
    })
    .await
    .expect("tcc-travel");
    assert_eq!(report.violations, 0, "{report:?}");
    assert_eq!(report.confirmed + report.cancelled, 200, "{report:?}");
    assert!(report.confirmed > 0 && report.cancelled > 0, "{report:?}");
}

/// 3PC orders across PostgreSQL and MariaDB on 3 nodes: each order's two
/// rows agree with each other and with the coordinator, and the totals
/// moved by exactly the committed orders (invariants 1 and 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_phase_orders_commit_or_abort_on_both_databases() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let report = three_phase::run(three_phase::Config {
        endpoints: cluster.endpoints(),
        orders: 200,
        concurrency: 16,
        fail_rate: 0.3,
        pg_url: DEFAULT_PG_URL.into(),
        mysql_url: DEFAULT_MYSQL_URL.into(),
    })
    .await
    .expect("three-phase");
    assert_eq!(report.violations, 0, "{report:?}");
    assert_eq!(report.committed + report.aborted, 200, "{report:?}");
    assert!(report.committed > 0 && report.aborted > 0, "{report:?}");
}

/// Orders and their events on 3 nodes, with failures and producer crashes
/// at 30 %: every committed order delivered to NATS, RabbitMQ and the
/// webhook, no rolled-back one to any (invariant 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_events_delivers_exactly_the_committed_orders_to_every_consumer() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let report = order_events::run(order_events::Config {
        endpoints: cluster.endpoints(),
        orders: 200,
        concurrency: 16,
        fail_rate: 0.3,
        pg_url: DEFAULT_PG_URL.into(),
        nats_url: DEFAULT_NATS_URL.into(),
        amqp_url: DEFAULT_AMQP_URL.into(),
    })
    .await
    .expect("order-events");
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(
        report.orders_committed + report.orders_rolled_back,
        200,
        "{report:?}"
    );
    assert!(
        report.orders_committed > 0 && report.orders_rolled_back > 0,
        "{report:?}"
    );
    let d = &report.delivered;
    assert!(
        [d.nats, d.rabbitmq, d.http]
            .iter()
            .all(|n| *n == report.orders_committed),
        "{report:?}"
    );
}

/// The README's first command runs this tour: every protocol begins
/// (idempotently; a message is prepared), and nothing is left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_begins_every_implemented_protocol_and_leaves_nothing_open() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let report = quickstart::run(&cluster.endpoints(), |line| eprintln!("{line}"))
        .await
        .expect("quickstart");
    assert_eq!(report.began, 6, "{report:?}");
    assert_eq!(report.aborted, 6, "{report:?}");
}
