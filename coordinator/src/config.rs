//! `tandem serve` configuration: command-line flags, `TANDEM_*` environment
//! variables and an optional TOML file, resolved in that order of precedence
//! over the built-in defaults into one validated [`ServeConfig`]. The layers
//! are merged by `figment`; the flags and the file are one struct, so a
//! setting is named once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::branch::broker::BrokerConfig;
use crate::model::types::RetryPolicy;
use crate::model::validate::{PAYLOAD_BYTES_HARD_MAX, TX_BYTES_HARD_MAX};
use crate::raft::NodeConfig;
use crate::replica::Retention;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7080";
pub const DEFAULT_DATA_DIR: &str = "./tandem-data";
pub const DEFAULT_CLUSTER_NAME: &str = "tandem";

/// Flags of `tandem serve`. Every one can also come from the environment
/// (`TANDEM_<NAME>`) or the `--config` file (same names, snake_case). In
/// the file, unknown keys are an error, so a typo is not silently ignored.
#[derive(clap::Args, Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of these settings (flags and environment win).
    #[arg(long, env = "TANDEM_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's Raft id (non-zero). [default: 1]
    #[arg(long, env = "TANDEM_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Address to serve gRPC on. [default: 127.0.0.1:7070]
    #[arg(long, env = "TANDEM_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Address to serve the HTTP/JSON API, /metrics, /openapi.json and the
    /// dashboard (/ui) on; "off" for none. [default: 127.0.0.1:7080]
    #[arg(long, env = "TANDEM_HTTP_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<String>,
    /// Export traces over OTLP/gRPC to this collector, e.g.
    /// http://127.0.0.1:4317. [default: off]
    #[arg(long, env = "TANDEM_OTLP_ENDPOINT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Address peers and clients dial to reach this node. [default: --listen]
    #[arg(long, env = "TANDEM_ADVERTISE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Founding members as ID=HOST:PORT,…; this node must be one of them.
    /// [default: this node alone]
    #[arg(long, env = "TANDEM_PEERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<String>,
    /// Start with an empty data directory and wait to be added to a running
    /// cluster (`tandem cluster add`) instead of founding one.
    #[arg(long, env = "TANDEM_JOIN")]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
    /// Where the Raft log and snapshots live. [default: ./tandem-data]
    #[arg(long, env = "TANDEM_DATA_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Nodes refuse Raft traffic from another cluster name. [default: tandem]
    #[arg(long, env = "TANDEM_CLUSTER_NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// A follower that hears nothing from the leader this long (randomized up
    /// to twice this) starts an election. [default: 500]
    #[arg(long, env = "TANDEM_ELECTION_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub election_timeout_ms: Option<u64>,
    /// Leader heartbeat interval. [default: 100]
    #[arg(long, env = "TANDEM_HEARTBEAT_INTERVAL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Snapshot the state machine (and compact the log) after at least this
    /// many applied entries, and once the log written since the last
    /// snapshot is twice that snapshot's size. [default: 20000]
    #[arg(long, env = "TANDEM_SNAPSHOT_INTERVAL_ENTRIES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_interval_entries: Option<u64>,
    /// Group commit: least time between two fsyncs of the Raft log, in
    /// microseconds, once the load is high (see --group-commit-min-entries);
    /// what arrives meanwhile shares the next write. Trades up to this much
    /// latency per write under load for fewer device flushes and less CPU;
    /// 1000 is a good value on a machine short of CPU. [default: 0, off]
    #[arg(long, env = "TANDEM_GROUP_COMMIT_GAP_US")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_commit_gap_us: Option<u64>,
    /// The load at which the group-commit gap starts: it applies after a
    /// log write of at least this many entries (0: after every write).
    /// Light load writes one or two entries at a time and never waits.
    /// [default: 8]
    #[arg(long, env = "TANDEM_GROUP_COMMIT_MIN_ENTRIES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_commit_min_entries: Option<usize>,
    /// Log entries kept behind a snapshot for lagging followers. [default: 5000]
    #[arg(long, env = "TANDEM_LOG_RETAIN_ENTRIES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_retain_entries: Option<u64>,
    /// How long finished transactions stay readable before they are collected,
    /// e.g. "10m". [default: 10m]
    #[arg(long, env = "TANDEM_RETENTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// Finished transactions kept at most; the oldest are collected first.
    /// [default: 200000]
    #[arg(long, env = "TANDEM_FINISHED_MAX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_max: Option<usize>,
    /// Largest transaction or branch payload accepted. [default: 65536]
    #[arg(long, env = "TANDEM_PAYLOAD_BYTES_MAX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_bytes_max: Option<usize>,
    /// Largest transaction accepted, counted as its footprint: payloads,
    /// ids, endpoints and a fixed cost per branch (README, "Limits and
    /// memory"). At most 16 MiB. [default: 8388608]
    #[arg(long, env = "TANDEM_TX_BYTES_MAX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_bytes_max: Option<usize>,
    /// Footprint of all unfinished transactions together; Begin and
    /// SubmitSaga beyond it are refused with RESOURCE_EXHAUSTED.
    /// [default: 268435456]
    #[arg(long, env = "TANDEM_ACTIVE_BYTES_MAX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_bytes_max: Option<usize>,
    /// Footprint of the finished transactions kept for reading; the oldest
    /// are collected beyond it. [default: 67108864]
    #[arg(long, env = "TANDEM_FINISHED_BYTES_MAX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_bytes_max: Option<usize>,
    /// Unfinished transactions accepted at most; Begin beyond it is refused
    /// with RESOURCE_EXHAUSTED. [default: 1000000]
    #[arg(long, env = "TANDEM_ACTIVE_MAX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_max: Option<usize>,
    /// Timeout of a transaction that does not set one. [default: 60s]
    #[arg(long, env = "TANDEM_DEFAULT_TIMEOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_timeout: Option<String>,
    /// NATS server that `nats://SUBJECT` message destinations publish to
    /// (JetStream). [default: nats://127.0.0.1:4222]
    #[arg(long, env = "TANDEM_NATS_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// RabbitMQ that `amqp://EXCHANGE/ROUTING_KEY` message destinations
    /// publish to. [default: amqp://guest:guest@127.0.0.1:5672/%2f]
    #[arg(long, env = "TANDEM_AMQP_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_url: Option<String>,
    /// This node's certificate (PEM): TLS on the gRPC and HTTP ports, and
    /// its identity to peers (mutual TLS). With --tls-key and --tls-ca.
    #[arg(long, env = "TANDEM_TLS_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "TANDEM_TLS_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// The cluster's CA (PEM): peers' and clients' certificates must chain to it.
    #[arg(long, env = "TANDEM_TLS_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// Bearer tokens and their roles: a TOML file with a [tokens] table of
    /// "TOKEN" = "reader" | "app" | "operator". Every client call then needs one.
    #[arg(long, env = "TANDEM_AUTH_TOKENS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_tokens: Option<PathBuf>,
    /// Accept JWTs (claims `role` and `exp`) signed with this key: an HS256
    /// secret, or an RSA/EC public key in PEM (RS256/ES256).
    #[arg(long, env = "TANDEM_JWT_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_key: Option<PathBuf>,
    /// Sign every call to participants with this key (a file of at least 32
    /// bytes, shared with them): HMAC-SHA256 headers they verify.
    #[arg(long, env = "TANDEM_PARTICIPANT_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_key: Option<PathBuf>,
    /// Requests one client address may have in flight at once, over gRPC
    /// and HTTP; beyond it RESOURCE_EXHAUSTED / 429. 0: no limit.
    /// [default: 0 on loopback, 1000 on any other address]
    #[arg(long, env = "TANDEM_CLIENT_CONCURRENCY_MAX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_concurrency_max: Option<usize>,
    /// Connections the gRPC port and the HTTP port each hold at once; more
    /// wait to be accepted. [default: 10000]
    #[arg(long, env = "TANDEM_CONNECTIONS_MAX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections_max: Option<usize>,
    /// Trust this CA (PEM) too for HTTPS participants (the cluster's
    /// --tls-ca and the system's roots are trusted already).
    #[arg(long, env = "TANDEM_PARTICIPANT_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant_ca: Option<PathBuf>,
    /// Requests a second one client address may make (a burst of twice
    /// that), over gRPC and HTTP; beyond it RESOURCE_EXHAUSTED / 429.
    /// 0: no limit. [default: 0 on loopback, 5000 on any other address]
    #[arg(long, env = "TANDEM_CLIENT_RATE_MAX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_rate_max: Option<u32>,
    /// Serve plaintext on an address other than loopback (refused otherwise).
    #[arg(long, env = "TANDEM_INSECURE")]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

/// Limits and defaults the API applies before anything is proposed.
#[derive(Clone, Debug)]
pub struct Limits {
    pub payload_bytes_max: usize,
    /// One transaction's footprint.
    pub tx_bytes_max: usize,
    /// All unfinished transactions' footprints together.
    pub active_bytes_max: usize,
    pub active_max: usize,
    pub timeout_ms_default: u32,
    pub timeout_ms_max: u32,
    pub branch_timeout_ms_default: u32,
    pub branch_timeout_ms_max: u32,
    pub retry_default: RetryPolicy,
    pub retry_interval_ms_max: u32,
    pub retry_attempts_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            payload_bytes_max: 64 * 1024,
            tx_bytes_max: 8 << 20,
            active_bytes_max: 256 << 20,
            active_max: 1_000_000,
            timeout_ms_default: 60_000,
            timeout_ms_max: 24 * 3600 * 1000,
            branch_timeout_ms_default: 5_000,
            branch_timeout_ms_max: 300_000,
            retry_default: RetryPolicy {
                initial_interval_ms: 100,
                max_interval_ms: 10_000,
                max_attempts: 10,
            },
            retry_interval_ms_max: 3_600_000,
            retry_attempts_max: 1_000_000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// The HTTP API's address; `None`: off.
    pub http_listen: Option<SocketAddr>,
    /// Where traces go (OTLP/gRPC); `None`: tracing off.
    pub otlp_endpoint: Option<String>,
    /// Certificates for TLS; `None`: plaintext (loopback, or --insecure).
    pub tls: Option<std::sync::Arc<crate::tls::Tls>>,
    /// Tokens and roles; `None`: every client may do everything.
    pub auth: Option<std::sync::Arc<crate::auth::Auth>>,
    /// The key calls to participants are signed with.
    pub participant_key: Option<std::sync::Arc<[u8]>>,
    /// Requests a second per client address; 0: no limit.
    pub client_rate_max: u32,
    /// Requests in flight per client address; 0: no limit.
    pub client_concurrency_max: usize,
    /// Connections each port holds at once.
    pub connections_max: usize,
    /// An extra CA (PEM) for HTTPS participants.
    pub participant_ca: Option<String>,
    pub node: NodeConfig,
    pub limits: Limits,
    /// How long finished transactions are kept.
    pub retention: Retention,
    /// Where message destinations on brokers go.
    pub brokers: BrokerConfig,
}

/// The one Raft group a node runs today (its key in the log engine).
const RAFT_GROUP: u64 = 1;

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

fn err(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

impl ServeConfig {
    pub fn resolve(args: ServeArgs) -> Result<ServeConfig, ConfigError> {
        let args = merge(args)?;
        let id = args.id.unwrap_or(1);
        if id == 0 {
            return Err(err("--id must be non-zero"));
        }
        let listen_text = args.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_text.parse().map_err(|e| {
            err(format!(
                "--listen {listen_text:?} is not an IP:PORT address: {e}"
            ))
        })?;
        let http_text = args
            .http_listen
            .unwrap_or_else(|| DEFAULT_HTTP_LISTEN.to_string());
        let http_listen = match http_text.as_str() {
            "off" => None,
            text => Some(text.parse::<SocketAddr>().map_err(|e| {
                err(format!(
                    "--http-listen {text:?} is not an IP:PORT address (or \"off\"): {e}"
                ))
            })?),
        };
        if http_listen.is_some_and(|h| h == listen) {
            return Err(err(format!(
                "--http-listen and --listen are both {listen}; give each its own port"
            )));
        }
        let otlp_endpoint = args.otlp_endpoint.filter(|e| !e.is_empty());
        if let Some(endpoint) = &otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(err(format!(
                "--otlp-endpoint {endpoint:?} must be an http:// or https:// URL (OTLP over gRPC, e.g. http://127.0.0.1:4317)"
            )));
        }
        let tls = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => {
                Some(crate::tls::Tls::load(cert, key, ca).map_err(|e| err(e.to_string()))?)
            }
            _ => {
                return Err(err(
                    "--tls-cert, --tls-key and --tls-ca go together (`tandem certs dev --out DIR` writes a development set)",
                ));
            }
        };
        if tls.is_none() && !args.insecure {
            for (flag, address) in [("--listen", Some(listen)), ("--http-listen", http_listen)] {
                if let Some(address) = address
                    && !address.ip().is_loopback()
                {
                    return Err(err(format!(
                        "refusing to serve plaintext on {address} ({flag}): anyone who reaches it could \
                         run transactions and change the cluster. Give --tls-cert, --tls-key and --tls-ca \
                         (`tandem certs dev --out DIR` writes a development set), or --insecure to accept it"
                    )));
                }
            }
        }
        let auth = crate::auth::Auth::load(args.auth_tokens.as_deref(), args.jwt_key.as_deref())
            .map_err(err)?;
        // On loopback every client is this machine: per-address limits
        // would only throttle the one application there.
        let loopback_only =
            listen.ip().is_loopback() && http_listen.is_none_or(|h| h.ip().is_loopback());
        let participant_key = match &args.participant_key {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err(format!("--participant-key {}: {e}", path.display())))?;
                let key = text.trim();
                if key.len() < tandem_proto::wire::signing::KEY_BYTES_MIN {
                    return Err(err(format!(
                        "--participant-key {}: the key must be at least {} bytes",
                        path.display(),
                        tandem_proto::wire::signing::KEY_BYTES_MIN
                    )));
                }
                Some(std::sync::Arc::from(key.as_bytes()))
            }
        };
        let address = args.advertise.unwrap_or(listen_text);
        check_host_port("--advertise", &address)?;
        let peers = match args.peers {
            Some(text) => parse_peers(&text)?,
            None => BTreeMap::from([(id, address.clone())]),
        };
        let join = args.join;
        if let Some(own) = peers.get(&id)
            && *own != address
        {
            return Err(err(format!(
                "--peers gives node {id} the address {own}, but it serves on {address} (set --advertise)"
            )));
        }
        // 500 ms: five heartbeats. With 1 s a leader killed at load left
        // sagas waiting up to 3–5.6 s; with 500 ms at most 1.4 s, inside
        // the 2 s promise (BENCHMARKS.md, "A leader killed at load").
        let election_ms = args.election_timeout_ms.unwrap_or(500);
        let heartbeat_ms = args.heartbeat_interval_ms.unwrap_or(100);
        if heartbeat_ms == 0 || election_ms < 3 * heartbeat_ms {
            return Err(err(format!(
                "--election-timeout-ms ({election_ms}) must be at least three heartbeat intervals ({heartbeat_ms}, non-zero)"
            )));
        }
        // Ticks of at most 50ms keep timing precise for short timeouts.
        let tick_ms = heartbeat_ms.min(50);
        let retention = parse_duration("--retention", args.retention.as_deref().unwrap_or("10m"))?;
        let default_timeout = parse_duration(
            "--default-timeout",
            args.default_timeout.as_deref().unwrap_or("60s"),
        )?;
        let mut limits = Limits::default();
        limits.payload_bytes_max = args.payload_bytes_max.unwrap_or(limits.payload_bytes_max);
        if limits.payload_bytes_max > PAYLOAD_BYTES_HARD_MAX {
            return Err(err(format!(
                "--payload-bytes-max {} is over the hard limit {PAYLOAD_BYTES_HARD_MAX}",
                limits.payload_bytes_max
            )));
        }
        limits.tx_bytes_max = args.tx_bytes_max.unwrap_or(limits.tx_bytes_max);
        if limits.tx_bytes_max > TX_BYTES_HARD_MAX {
            return Err(err(format!(
                "--tx-bytes-max {} is over the hard limit {TX_BYTES_HARD_MAX}",
                limits.tx_bytes_max
            )));
        }
        if limits.payload_bytes_max > limits.tx_bytes_max {
            return Err(err(format!(
                "--payload-bytes-max {} is over --tx-bytes-max {}",
                limits.payload_bytes_max, limits.tx_bytes_max
            )));
        }
        limits.active_bytes_max = args.active_bytes_max.unwrap_or(limits.active_bytes_max);
        if limits.active_bytes_max < limits.tx_bytes_max {
            return Err(err(format!(
                "--active-bytes-max {} is under --tx-bytes-max {}: not even one transaction would fit",
                limits.active_bytes_max, limits.tx_bytes_max
            )));
        }
        limits.active_max = args.active_max.unwrap_or(limits.active_max);
        let timeout_ms = u32::try_from(default_timeout.as_millis())
            .ok()
            .filter(|ms| *ms > 0 && *ms <= limits.timeout_ms_max)
            .ok_or_else(|| err("--default-timeout must be between 1ms and 24h"))?;
        limits.timeout_ms_default = timeout_ms;
        let snapshot_interval_entries = args.snapshot_interval_entries.unwrap_or(20_000);
        if snapshot_interval_entries == 0 {
            return Err(err("--snapshot-interval-entries must be non-zero"));
        }
        let cluster_name = args
            .cluster_name
            .unwrap_or_else(|| DEFAULT_CLUSTER_NAME.to_string());
        if cluster_name.is_empty() || cluster_name.len() > 64 {
            return Err(err("--cluster-name must be 1 to 64 bytes"));
        }
        let node = NodeConfig {
            id,
            cluster_name,
            address,
            peers,
            join,
            data_dir: args
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            tick: Duration::from_millis(tick_ms),
            election_ticks: (election_ms / tick_ms) as usize,
            election_ticks_max: None,
            heartbeat_ticks: (heartbeat_ms / tick_ms).max(1) as usize,
            snapshot_interval_entries,
            log_retain_entries: args.log_retain_entries.unwrap_or(5_000),
            group_commit_gap: Duration::from_micros(
                args.group_commit_gap_us.unwrap_or(0).min(100_000),
            ),
            group_commit_min_entries: args.group_commit_min_entries.unwrap_or(8),
            group: RAFT_GROUP,
        };
        let retention = Retention {
            age: retention,
            count_max: args.finished_max.unwrap_or(200_000),
            bytes_max: args.finished_bytes_max.unwrap_or(64 << 20),
        };
        let defaults = BrokerConfig::default();
        let brokers = BrokerConfig {
            nats_url: args.nats_url.unwrap_or(defaults.nats_url),
            amqp_url: args.amqp_url.unwrap_or(defaults.amqp_url),
        };
        for (flag, url, scheme) in [
            ("--nats-url", &brokers.nats_url, "nats://"),
            ("--amqp-url", &brokers.amqp_url, "amqp://"),
        ] {
            if !url.starts_with(scheme) {
                return Err(err(format!("{flag} {url:?} must start with {scheme}")));
            }
        }
        Ok(ServeConfig {
            listen,
            http_listen,
            otlp_endpoint,
            tls,
            auth,
            participant_key,
            participant_ca: match &args.participant_ca {
                None => None,
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .map_err(|e| err(format!("--participant-ca {}: {e}", path.display())))?,
                ),
            },
            client_rate_max: args
                .client_rate_max
                .unwrap_or(if loopback_only { 0 } else { 5_000 }),
            client_concurrency_max: args.client_concurrency_max.unwrap_or(if loopback_only {
                0
            } else {
                1_000
            }),
            connections_max: match args.connections_max.unwrap_or(10_000) {
                0 => return Err(err("--connections-max must be at least 1")),
                n => n,
            },
            node,
            limits,
            retention,
            brokers,
        })
    }
}

/// The file's settings under the flags and environment (which clap has
/// already merged: a flag wins over its variable).
fn merge(args: ServeArgs) -> Result<ServeArgs, ConfigError> {
    let Some(path) = args.config.clone() else {
        return Ok(args);
    };
    if !path.is_file() {
        return Err(err(format!("cannot read {}: no such file", path.display())));
    }
    Figment::new()
        .merge(Toml::file_exact(&path))
        .merge(Serialized::defaults(&args))
        .extract::<ServeArgs>()
        .map(|merged| ServeArgs {
            config: Some(path.clone()),
            ..merged
        })
        .map_err(|e| err(format!("{}: {e}", path.display())))
}

fn parse_duration(flag: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| {
        err(format!(
            "{flag} {text:?} is not a duration like 30s or 10m: {e}"
        ))
    })
}

fn check_host_port(flag: &str, text: &str) -> Result<(), ConfigError> {
    let ok = text
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if ok {
        Ok(())
    } else {
        Err(err(format!("{flag} {text:?} is not HOST:PORT")))
    }
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut peers = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, address) = part
            .split_once('=')
            .ok_or_else(|| err(format!("--peers entry {part:?} is not ID=HOST:PORT")))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|id| *id != 0)
            .ok_or_else(|| {
                err(format!(
                    "--peers entry {part:?} has a bad id (non-zero integer)"
                ))
            })?;
        check_host_port("--peers", address.trim())?;
        if peers.insert(id, address.trim().to_string()).is_some() {
            return Err(err(format!("--peers names node {id} twice")));
        }
    }
    if peers.is_empty() {
        return Err(err("--peers is empty"));
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_make_a_single_node_cluster() {
        let config = ServeConfig::resolve(ServeArgs::default()).unwrap();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.node.id, 1);
        assert_eq!(
            config.node.peers,
            BTreeMap::from([(1, DEFAULT_LISTEN.to_string())])
        );
        assert_eq!(config.node.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert!(!config.node.join);
    }

    #[test]
    fn peers_parse_and_must_agree_with_the_advertised_address() {
        let peers = parse_peers("1=127.0.0.1:1, 2=127.0.0.1:2").unwrap();
        assert_eq!(peers.len(), 2);
        assert!(parse_peers("1=127.0.0.1:1,1=127.0.0.1:2").is_err());
        assert!(parse_peers("x=127.0.0.1:1").is_err());
        assert!(parse_peers("1=nohost").is_err());
        let args = ServeArgs {
            id: Some(2),
            listen: Some("127.0.0.1:9000".into()),
            peers: Some("1=127.0.0.1:1,2=127.0.0.1:2".into()),
            ..Default::default()
        };
        let e = ServeConfig::resolve(args).unwrap_err().to_string();
        assert!(e.contains("--advertise"), "{e}");
    }

    #[test]
    fn file_settings_apply_below_flags_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tandem.toml");
        std::fs::write(
            &path,
            "id = 3\nlisten = \"127.0.0.1:7373\"\nretention = \"1m\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            listen: Some("127.0.0.1:7474".into()),
            ..Default::default()
        };
        let config = ServeConfig::resolve(args).unwrap();
        assert_eq!(config.node.id, 3);
        assert_eq!(config.listen.to_string(), "127.0.0.1:7474");
        assert_eq!(config.retention.age, Duration::from_secs(60));
        std::fs::write(&path, "join = true\ncluster_name = \"blue\"\n").unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            cluster_name: Some("green".into()),
            ..Default::default()
        };
        let config = ServeConfig::resolve(args).unwrap();
        assert!(
            config.node.join,
            "a file's true is not undone by an absent flag"
        );
        assert_eq!(config.node.cluster_name, "green", "the flag wins");
        let missing = ServeArgs {
            config: Some(dir.path().join("absent.toml")),
            ..Default::default()
        };
        let e = ServeConfig::resolve(missing).unwrap_err().to_string();
        assert!(e.contains("absent.toml"), "{e}");
        std::fs::write(&path, "idd = 3\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let e = ServeConfig::resolve(args).unwrap_err().to_string();
        assert!(e.contains("idd"), "{e}");
    }

    #[test]
    fn timing_must_leave_room_for_heartbeats() {
        let args = ServeArgs {
            election_timeout_ms: Some(200),
            heartbeat_interval_ms: Some(100),
            ..Default::default()
        };
        assert!(ServeConfig::resolve(args).is_err());
        let args = ServeArgs {
            election_timeout_ms: Some(500),
            heartbeat_interval_ms: Some(100),
            ..Default::default()
        };
        let config = ServeConfig::resolve(args).unwrap();
        assert_eq!(config.node.tick, Duration::from_millis(50));
        assert_eq!(config.node.election_ticks, 10);
        assert_eq!(config.node.heartbeat_ticks, 2);
    }
}
