//! Command-line interface. The shapes of these commands and of their JSON
//! output are relied on by tooling: change them only compatibly.

/// `println!` for command output: a reader that went away (`tandem tx
/// list | head`) ends the command quietly, as Unix tools do, instead of a
/// panic. (SIGPIPE stays ignored, as Rust sets it: with its default action
/// a peer closing a socket would kill the process.)
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for command output; see [`outln`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

mod bench;
mod output;

pub fn write_out(text: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(text).and_then(|_| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write the output: {e}");
        std::process::exit(1);
    }
}

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tandem_coordinator::config::{ServeArgs, ServeConfig};

use tandem_coordinator::model::{Protocol, TxState};
use tandem_sdk::{Client, proto as pb};

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "Tandem: a Raft-replicated distributed transaction coordinator"
)]
pub struct Cli {
    /// Log output: human-readable lines or JSON objects.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "TANDEM_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing env-filter syntax), e.g. "info,raft=warn".
    #[arg(long, global = true, default_value = "info", env = "TANDEM_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a coordinator node (with no flags: a single node on 127.0.0.1:7070,
    /// data in ./tandem-data).
    Serve(Box<ServeArgs>),
    /// Inspect and change cluster membership.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Begin and inspect transactions.
    Tx {
        #[command(subcommand)]
        command: TxCommand,
    },
    /// Certificates for TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Measure throughput and latency against a running cluster.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Write a development CA and certificates: ca.pem, node-1.pem /
    /// node-1.key … node-N.pem / node-N.key, client.pem / client.key (for
    /// 127.0.0.1 and localhost). Not for production: use your own CA there.
    Dev {
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: u64,
    },
}

#[derive(Args, Debug, Clone)]
pub struct EndpointArg {
    /// Any node of the cluster, or a comma-separated list of them.
    #[arg(long, env = "TANDEM_ENDPOINT", default_value = "127.0.0.1:7070")]
    pub endpoint: String,
    /// Give up connecting to a node after this long, e.g. 2s.
    #[arg(long, env = "TANDEM_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Give up finding a node that takes the call after this long.
    #[arg(long, env = "TANDEM_RETRY_DEADLINE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub retry_deadline: Duration,
    /// The cluster's CA (PEM): talk TLS to it.
    #[arg(long, env = "TANDEM_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// A bearer token (from the node's --auth-tokens file, or a JWT).
    #[arg(long, env = "TANDEM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A client certificate (PEM) to present, with --tls-key.
    #[arg(long, env = "TANDEM_CLIENT_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "TANDEM_CLIENT_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl EndpointArg {
    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(self.builder()?.build()?)
    }

    /// The client these arguments describe, still to be built.
    pub fn builder(&self) -> anyhow::Result<tandem_sdk::ClientBuilder> {
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
        };
        let mut builder = Client::builder([self.endpoint.as_str()])
            .connect_timeout(self.connect_timeout)
            .retry_deadline(self.retry_deadline);
        if let Some(ca) = &self.tls_ca {
            builder = builder.tls_ca(read("--tls-ca", ca)?);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            builder = builder.tls_identity(read("--tls-cert", cert)?, read("--tls-key", key)?);
        }
        if let Some(token) = self
            .token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            builder = builder.token(token);
        }
        Ok(builder)
    }
}

/// A repair as the CLI asks for it; who did it is `$USER@host` unless given.
fn repair_request(
    gid: String,
    branch: Option<String>,
    reason: String,
    by: Option<String>,
) -> pb::RepairRequest {
    pb::RepairRequest {
        gid,
        branch_id: branch.unwrap_or_default(),
        reason,
        by: by.unwrap_or_else(operator_name),
    }
}

/// Who did a repair, for its audit record: `$USER@host`.
fn operator_name() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host} (cli)")
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Every node's id, address, role, term, commit and applied index.
    Status {
        #[command(flatten)]
        endpoint: EndpointArg,
        #[arg(long)]
        json: bool,
    },
    /// Add a node (started with --join): as a learner, promoted to voter once
    /// it has caught up.
    Add {
        #[command(flatten)]
        endpoint: EndpointArg,
        #[arg(long)]
        id: u64,
        /// HOST:PORT the new node serves on.
        #[arg(long)]
        address: String,
        /// Leave it a learner.
        #[arg(long)]
        learner_only: bool,
    },
    /// Remove a node from the cluster.
    Remove {
        #[command(flatten)]
        endpoint: EndpointArg,
        #[arg(long)]
        id: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum TxCommand {
    /// Begin a transaction and print its gid.
    Begin {
        #[command(flatten)]
        endpoint: EndpointArg,
        /// tcc, xa, 2pc or 3pc (a saga is submitted whole, a message
        /// prepared whole: through the API or the SDK).
        #[arg(long)]
        protocol: String,
        /// The gid; generated when omitted.
        #[arg(long)]
        gid: Option<String>,
        /// Abort if not decided within this long, e.g. 30s.
        #[arg(long)]
        timeout: Option<String>,
        /// Opaque payload kept with the transaction (UTF-8 text).
        #[arg(long)]
        payload: Option<String>,
    },
    /// Ask to commit a transaction; for a message, submit it (deliver).
    /// Safe to repeat: prints the transaction as the request left it.
    Commit {
        gid: String,
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Wait until it has ended (or this long passed), e.g. 30s.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Abort an undecided transaction (a saga compensates; a message is
    /// dropped — for one whose producer never answers its check-back).
    Abort {
        gid: String,
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Why, kept as the transaction's error.
        #[arg(long, default_value = "aborted by an operator")]
        reason: String,
        /// Wait until it has ended (or this long passed), e.g. 30s.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Submit a saga described in a JSON file ("-" for stdin), the same
    /// document `POST /v1/sagas` takes: {"gid": …, "steps": [{"branch_id",
    /// "action", "compensate", "payload"}, …]}. Safe to repeat.
    SubmitSaga {
        /// The JSON file.
        file: std::path::PathBuf,
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Wait until it has ended (or this long passed), e.g. 30s.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Repair: call a stuck transaction's open ops now instead of after
    /// their backoff (its participant is back). Recorded in its history.
    Retry {
        gid: String,
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Only this branch.
        #[arg(long)]
        branch: Option<String>,
        /// Why, for the audit record.
        #[arg(long, default_value = "")]
        reason: String,
        /// Who, for the audit record. [default: $USER@host]
        #[arg(long)]
        by: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Repair: mark a decided transaction's open phase-two ops done by hand
    /// because their participant can never acknowledge. It ends with a
    /// HEURISTIC outcome, shown everywhere. Undecided: use `abort` instead.
    Resolve {
        gid: String,
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Only this branch.
        #[arg(long)]
        branch: Option<String>,
        /// Why the participant can never acknowledge (required; kept).
        #[arg(long)]
        reason: String,
        /// Who, for the audit record. [default: $USER@host]
        #[arg(long)]
        by: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Follow one transaction: print each change until it has ended.
    Watch {
        gid: String,
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Stop after this long, e.g. 5m.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// One JSON object per change.
        #[arg(long)]
        json: bool,
    },
    /// Show one transaction.
    Get {
        gid: String,
        #[command(flatten)]
        endpoint: EndpointArg,
        #[arg(long)]
        json: bool,
    },
    /// List transactions, ordered by gid.
    List {
        #[command(flatten)]
        endpoint: EndpointArg,
        /// active, preparing, committing, aborting, committed or aborted.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        protocol: Option<String>,
        /// Page size (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue after this gid (a previous page's next token).
        #[arg(long)]
        page_token: Option<String>,
        /// Only those changed within this long, e.g. 1h.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Only unfinished ones with an op that failed 5 times or more.
        #[arg(long)]
        stuck: bool,
        #[arg(long)]
        json: bool,
    },
}

/// Logs to stderr (the filter applies to them), and with `otlp` spans
/// to that collector (every span at info and above, whatever the log
/// filter). Call inside the runtime: the exporter needs it.
fn init_logging(
    format: LogFormat,
    filter: &str,
    otlp: Option<&str>,
) -> anyhow::Result<Option<tandem_coordinator::telemetry::Telemetry>> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Human => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let (otel, guard) = match otlp {
        Some(endpoint) => {
            let (layer, guard) = tandem_coordinator::telemetry::layer(endpoint, "tandem")
                .map_err(anyhow::Error::msg)?;
            let level = tracing_subscriber::filter::LevelFilter::INFO;
            (Some(layer.with_filter(level)), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .init();
    Ok(guard)
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = ServeConfig::resolve(*args)?;
            let _telemetry = init_logging(
                cli.log_format,
                &cli.log_level,
                config.otlp_endpoint.as_deref(),
            )?;
            if let Some(endpoint) = &config.otlp_endpoint {
                tracing::info!(%endpoint, "exporting traces");
            }
            serve(config).await
        }
        command => {
            init_logging(cli.log_format, &cli.log_level, None)?;
            match command {
                Command::Cluster { command } => cluster(command).await,
                Command::Tx { command } => tx(command).await,
                Command::Bench { command } => bench::run(command).await,
                Command::Certs {
                    command: CertsCommand::Dev { out, nodes },
                } => {
                    let written = tandem_coordinator::tls::write_dev_certs(&out, nodes)?;
                    for path in written {
                        outln!("{}", path.display());
                    }
                    Ok(())
                }
                Command::Serve(_) => unreachable!("matched above"),
            }
        }
    }
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    // Fail-stop: a node that hit a bug (or a failpoint's panic) must not limp
    // on with half its tasks dead; its peers carry on and it restarts clean.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(%info, "panic; aborting the process");
        default_hook(info);
        std::process::abort();
    }));
    tandem_coordinator::server::serve(config, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
    }
}

async fn cluster(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Status { endpoint, json } => {
            let status = endpoint.client()?.cluster_status().await?;
            if json {
                outln!("{}", output::cluster_json(&status));
            } else {
                out!("{}", output::cluster_table(&status));
            }
        }
        ClusterCommand::Add {
            endpoint,
            id,
            address,
            learner_only,
        } => {
            let m = endpoint
                .client()?
                .add_node(id, &address, learner_only)
                .await?;
            outln!("voters {:?} learners {:?}", m.voters, m.learners);
        }
        ClusterCommand::Remove { endpoint, id } => {
            let m = endpoint.client()?.remove_node(id).await?;
            outln!("voters {:?} learners {:?}", m.voters, m.learners);
        }
    }
    Ok(())
}

fn parse_protocol(name: &str) -> anyhow::Result<pb::Protocol> {
    let protocol = Protocol::from_name(name).with_context(|| {
        format!(
            "unknown protocol {name:?}; expected one of {}",
            Protocol::names()
        )
    })?;
    Ok(tandem_coordinator::api::convert::protocol_to_pb(protocol))
}

fn parse_state(name: &str) -> anyhow::Result<pb::TxState> {
    let state = TxState::from_name(name).with_context(|| {
        format!(
            "unknown state {name:?}; expected one of {}",
            TxState::ALL.map(|s| s.name()).join(", ")
        )
    })?;
    Ok(tandem_coordinator::api::convert::state_to_pb(state))
}

fn print_tx(tx: &pb::Transaction, json: bool) {
    if json {
        outln!("{}", output::tx_json(tx));
    } else {
        out!("{}", output::tx_text(tx));
    }
}

/// Runs `work`; while it takes long and stderr is a terminal, says so
/// there every second (stdout stays clean for scripts).
async fn progress<T>(label: &str, waiting: bool, work: impl std::future::Future<Output = T>) -> T {
    use std::io::IsTerminal;
    if !waiting || !std::io::stderr().is_terminal() {
        return work.await;
    }
    let started = tokio::time::Instant::now();
    let mut work = std::pin::pin!(work);
    let mut tick =
        tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    loop {
        tokio::select! {
            out = &mut work => {
                eprint!("\r\x1b[K");
                return out;
            }
            _ = tick.tick() => {
                eprint!("\r\x1b[K{label}… {}s", started.elapsed().as_secs());
            }
        }
    }
}

/// Prints a transaction, then each change, until it has ended or
/// `timeout` passed (polling: a change between two looks is shown as the
/// state after it).
async fn watch(client: &Client, gid: &str, timeout: Duration, json: bool) -> anyhow::Result<()> {
    const POLL: Duration = Duration::from_millis(250);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut shown: Option<pb::Transaction> = None;
    loop {
        let tx = client.get(gid).await?;
        if shown.as_ref() != Some(&tx) {
            if json {
                outln!("{}", output::tx_json(&tx));
            } else {
                out!("{}", output::watch_line(&tx));
            }
            shown = Some(tx.clone());
        }
        let ended = matches!(
            pb::TxState::try_from(tx.state),
            Ok(pb::TxState::Committed | pb::TxState::Aborted)
        );
        if ended {
            return Ok(());
        }
        if tokio::time::Instant::now() + POLL > deadline {
            bail!("transaction {gid} has not ended within {timeout:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn tx(command: TxCommand) -> anyhow::Result<()> {
    match command {
        TxCommand::Begin {
            endpoint,
            protocol,
            gid,
            timeout,
            payload,
        } => {
            let protocol = parse_protocol(&protocol)?;
            let timeout_ms = match timeout {
                Some(t) => {
                    let d = humantime::parse_duration(&t)
                        .with_context(|| format!("--timeout {t:?} is not a duration like 30s"))?;
                    u32::try_from(d.as_millis()).context("--timeout is too long")?
                }
                None => 0,
            };
            let gid = gid.unwrap_or_else(tandem_sdk::new_gid);
            let request = pb::BeginRequest {
                gid,
                protocol: protocol as i32,
                options: Some(pb::TxOptions {
                    timeout_ms,
                    ..Default::default()
                }),
                payload: payload.unwrap_or_default().into_bytes(),
            };
            let response = endpoint.client()?.begin_with(request).await?;
            let tx = response.transaction.unwrap_or_default();
            outln!("{}", tx.gid);
        }
        TxCommand::Commit {
            gid,
            endpoint,
            wait,
            json,
        } => {
            let client = endpoint.client()?;
            let tx = progress(
                &format!("waiting for {gid} to finish"),
                wait.is_some(),
                client.commit(&gid, wait.is_some(), wait.unwrap_or_default()),
            )
            .await?;
            print_tx(&tx, json);
        }
        TxCommand::Abort {
            gid,
            endpoint,
            reason,
            wait,
            json,
        } => {
            let client = endpoint.client()?;
            let tx = progress(
                &format!("waiting for {gid} to finish aborting"),
                wait.is_some(),
                client.abort(&gid, &reason, wait.is_some(), wait.unwrap_or_default()),
            )
            .await?;
            print_tx(&tx, json);
        }
        TxCommand::SubmitSaga {
            file,
            endpoint,
            wait,
            json,
        } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading the saga from stdin")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let body: tandem_coordinator::http::types::SagaBody = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a saga document", file.display()))?;
            let mut request = body
                .to_pb()
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            if let Some(wait) = wait {
                request.wait = true;
                request.wait_timeout_ms = wait.as_millis().min(u32::MAX as u128) as u32;
            }
            let client = endpoint.client()?;
            let waiting = request.wait;
            let response = progress(
                &format!("waiting for saga {} to finish", request.gid),
                waiting,
                client.submit_saga_with(request.clone()),
            )
            .await?;
            print_tx(&response.transaction.unwrap_or_default(), json);
        }
        TxCommand::Retry {
            gid,
            endpoint,
            branch,
            reason,
            by,
            json,
        } => {
            let request = repair_request(gid, branch, reason, by);
            print_tx(&endpoint.client()?.retry_now(request).await?, json);
        }
        TxCommand::Resolve {
            gid,
            endpoint,
            branch,
            reason,
            by,
            json,
        } => {
            let request = repair_request(gid, branch, reason, by);
            print_tx(&endpoint.client()?.resolve_by_hand(request).await?, json);
        }
        TxCommand::Watch {
            gid,
            endpoint,
            timeout,
            json,
        } => {
            watch(&endpoint.client()?, &gid, timeout, json).await?;
        }
        TxCommand::Get {
            gid,
            endpoint,
            json,
        } => {
            let tx = endpoint.client()?.get(&gid).await?;
            print_tx(&tx, json);
        }
        TxCommand::List {
            endpoint,
            state,
            protocol,
            limit,
            page_token,
            since,
            stuck,
            json,
        } => {
            let updated_since_ms = match since {
                Some(d) => tandem_coordinator::clock::ms_ago(d),
                None => 0,
            };
            let request = pb::ListRequest {
                updated_since_ms,
                stuck,
                state: state
                    .as_deref()
                    .map(parse_state)
                    .transpose()?
                    .map_or(0, |s| s as i32),
                protocol: protocol
                    .as_deref()
                    .map(parse_protocol)
                    .transpose()?
                    .map_or(0, |p| p as i32),
                limit,
                page_token: page_token.unwrap_or_default(),
            };
            if limit == 0 {
                bail!("--limit must be at least 1");
            }
            let page = endpoint.client()?.list(request).await?;
            if json {
                outln!("{}", output::list_json(&page));
            } else {
                out!("{}", output::list_text(&page));
            }
        }
    }
    Ok(())
}
