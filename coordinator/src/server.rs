//! Assembles a node: storage and the Raft loop, the peer transport, and the
//! gRPC services (client API, cluster admin, health, reflection, and the
//! debug service in failpoint builds) on one listener.

use std::future::Future;
use std::time::Duration;

use tandem_proto::v1::cluster_server::ClusterServer;
use tandem_proto::v1::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use std::sync::Arc;

use crate::api::cluster::ClusterService;
use crate::branch::BranchCaller;
use crate::driver::Driver;

use crate::api::coordinator::CoordinatorService;
use crate::config::ServeConfig;
use crate::raft::transport::Transport;
use crate::raft::{self, Role, StartError};
use crate::replica::{self, Node};
use crate::service::{ClusterAdmin, Transactions};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("calling participants: {0}")]
    Participants(String),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Runs a node until `shutdown` resolves, then stops serving, lets the Raft
/// loop flush, and returns.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            address: config.listen.to_string(),
            source,
        })?;
    let http_listener = match config.http_listen {
        Some(address) => {
            Some(
                TcpListener::bind(address)
                    .await
                    .map_err(|source| ServeError::Bind {
                        address: format!("{address} (--http-listen)"),
                        source,
                    })?,
            )
        }
        None => None,
    };
    let metrics = crate::metrics::install();
    let node_config = config.node.clone();
    crate::raft::lane::enable_from_env();
    let transport = Transport::new(
        node_config.id,
        node_config.address.clone(),
        node_config.cluster_name.clone(),
        config.tls.clone(),
        tokio::runtime::Handle::current(),
    );
    tracing::info!(
        id = node_config.id,
        listen = %config.listen,
        address = %node_config.address,
        data_dir = %node_config.data_dir.display(),
        peers = ?node_config.peers,
        join = node_config.join,
        "starting tandem node"
    );
    let clock: Arc<dyn crate::clock::Clock> = Arc::new(crate::clock::SystemClock);
    let (observer, leader_events, replica) = replica::observer(config.retention, clock.clone());
    let (node, raft_thread) = raft::start(node_config, transport.clone(), observer)?;
    let replica = replica(node.clone());
    let driver = Driver::new(
        replica.clone(),
        Arc::new(
            BranchCaller::with_key(config.brokers.clone(), config.participant_key.clone())
                .with_tls(config.tls.as_deref(), config.participant_ca.as_deref())
                .map_err(ServeError::Participants)?,
        ),
        clock.clone(),
    );
    let driver_task = tokio::spawn(driver.run(leader_events));

    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(node.clone(), health));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let transactions = Transactions::new(replica.clone(), config.limits.clone(), clock.clone());
    let rate =
        crate::limits::ClientLimiter::new(config.client_rate_max, config.client_concurrency_max);
    let (http_stop, http_stopped) = tokio::sync::watch::channel(false);
    let http_task = http_listener.map(|listener| {
        tracing::info!(http_listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving the HTTP API");
        let state = Arc::new(crate::http::ApiState::new(
            transactions.clone(),
            metrics,
            config.tls.clone(),
        ));
        let router = crate::http::router(
            state,
            config.limits.tx_bytes_max + (1 << 20),
            config.auth.clone(),
            rate.clone(),
        );
        let mut stopped = http_stopped.clone();
        let tls = config.tls.clone();
        let connections_max = config.connections_max;
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = crate::http::serve(listener, router, stop, tls, connections_max).await {
                tracing::error!(error = %e, "HTTP API stopped");
            }
        })
    });
    tokio::spawn(count_leader_changes(node.clone()));
    // TLS is done here, not by tonic, so that a refused handshake (a peer
    // or client with a certificate from another CA) is logged, and a
    // connection that never completes one does not hold its place.
    let grpc_tls = match &config.tls {
        Some(tls) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            tls.rustls_grpc_server()
                .map_err(|e| ServeError::Tls(e.to_string()))?,
        ))),
        None => None,
    };
    let builder = tonic::transport::Server::builder();
    let router = builder
        .layer(crate::api::gate::GateLayer {
            auth: config.auth.clone(),
            limits: rate.clone(),
        })
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(
            CoordinatorServer::new(CoordinatorService::new(transactions))
                // A request may carry a whole transaction, and a little more
                // (the API then names what is over which limit).
                .max_decoding_message_size(config.limits.tx_bytes_max + (1 << 20)),
        )
        .add_service(ClusterServer::new(ClusterService::new(
            ClusterAdmin::new(replica.clone()).with_tls(config.tls.clone()),
        )))
        .add_service(transport.service())
        .add_service(health_service)
        .add_service(reflection);
    #[cfg(feature = "failpoints")]
    let router = router.add_service(tandem_proto::v1::debug_server::DebugServer::new(
        crate::api::debug::DebugService,
    ));
    // The builder's tcp_nodelay does not reach sockets of an incoming we
    // bind ourselves; without it, small replies wait on delayed ACKs.
    let incoming = crate::limits::limit_connections(
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        Arc::new(tokio::sync::Semaphore::new(config.connections_max)),
    );
    let stop = {
        let transport = transport.clone();
        async move {
            shutdown.await;
            let _ = http_stop.send(true);
            // Peers' streams never end by themselves.
            transport.close();
        }
    };
    // Peer-wire connections (raft/wire.rs) are taken off the port here:
    // by their first bytes in plaintext, by the protocol their TLS
    // handshake agreed on otherwise. The rest is tonic's.
    let served = match grpc_tls {
        None => {
            use futures::StreamExt;
            let transport = transport.clone();
            let speaking = incoming
                .map(move |io| {
                    let transport = transport.clone();
                    async move {
                        let io = crate::limits::first_bytes(io).await?;
                        if let Ok(tcp) = &io
                            && crate::raft::wire::starts_with_magic(tcp.get_ref()).await
                        {
                            let (tcp, place) = io.ok()?.into_parts();
                            transport.serve_wire_tcp(tcp, Some(place));
                            return None;
                        }
                        Some(io)
                    }
                })
                .buffer_unordered(crate::tls::HANDSHAKES_AT_ONCE)
                .filter_map(std::future::ready);
            router.serve_with_incoming_shutdown(speaking, stop).await
        }
        Some(acceptor) => {
            use futures::StreamExt;
            let transport = transport.clone();
            let secured = incoming
                .map(move |io| {
                    let acceptor = acceptor.clone();
                    let transport = transport.clone();
                    async move {
                        let io = crate::tls::accept(&acceptor, io).await?;
                        if let Ok(tls) = &io
                            && tls.get_ref().1.alpn_protocol() == Some(crate::raft::wire::ALPN)
                        {
                            let certs = tls.get_ref().1.peer_certificates().map(<[_]>::to_vec);
                            transport.serve_wire(io.ok()?, certs);
                            return None;
                        }
                        Some(io)
                    }
                })
                .buffer_unordered(crate::tls::HANDSHAKES_AT_ONCE)
                .filter_map(std::future::ready);
            router.serve_with_incoming_shutdown(secured, stop).await
        }
    };
    tracing::info!("gRPC server stopped; stopping the raft loop");
    node.shutdown();
    let _ = tokio::task::spawn_blocking(move || raft_thread.join()).await;
    driver_task.abort();
    if let Some(task) = http_task {
        // SSE watches end with their own timeout; do not wait on them.
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    served?;
    Ok(())
}

/// Counts the leader changes this node sees.
async fn count_leader_changes(node: Node) {
    let mut status = node.watch_status();
    let mut leader = status.borrow().leader_id;
    while status.changed().await.is_ok() {
        let now = status.borrow_and_update().leader_id;
        if now != leader {
            leader = now;
            crate::metrics::leader_changed();
        }
    }
}

/// SERVING while this node knows a leader (it can serve reads and redirect
/// writes), NOT_SERVING otherwise.
async fn report_health(node: Node, health: tonic_health::server::HealthReporter) {
    let mut status = node.watch_status();
    let mut serving = None;
    loop {
        let now = {
            let s = status.borrow_and_update();
            s.leader_id != 0 && s.role != Role::Detached
        };
        if serving != Some(now) {
            serving = Some(now);
            let state = if now {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status("", state).await;
            health
                .set_service_status("tandem.v1.Coordinator", state)
                .await;
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}
