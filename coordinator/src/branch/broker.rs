//! Brokers as message destinations: `nats://SUBJECT` (NATS JetStream) and
//! `amqp://EXCHANGE/ROUTING_KEY` (RabbitMQ). The broker addresses are the
//! node's (`--nats-url`, `--amqp-url`); a destination names only where in
//! the broker the message goes.
//!
//! A delivery succeeds only on the broker's own evidence that it stored the
//! message, never on a write that merely left this process:
//!
//! * **JetStream**: the stream's publish ack (the message is stored in a
//!   stream; `Nats-Msg-Id` is the message id, so JetStream's duplicate
//!   window drops a redelivery, and an ack marked duplicate is a success —
//!   it was stored before). No stream on the subject ("no responders") is
//!   a failure, retried until one exists: a plain NATS publish would be
//!   lost.
//! * **RabbitMQ**: publisher confirms on a confirm-mode channel, published
//!   `mandatory` and persistent (delivery mode 2) with `message_id` set. A
//!   nack, or an ack of a message the broker *returned* (no queue bound:
//!   it was dropped), is a failure, retried.
//!
//! Connections are made on first use and remade after a failure; a
//! broker that is down makes deliveries fail (transient, retried with
//! backoff) until it is back.

use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::{Mutex, OnceCell};

use super::BranchCall;
use crate::model::command::OpOutcome;

/// How long connecting to a broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the brokers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConfig {
    /// `nats://host:port`; credentials in the URL if needed.
    pub nats_url: String,
    /// `amqp://user:password@host:port/vhost`.
    pub amqp_url: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        }
    }
}

/// The node's broker connections.
pub struct Brokers {
    config: BrokerConfig,
    /// Once connected, the NATS client reconnects by itself.
    nats: OnceCell<async_nats::jetstream::Context>,
    amqp: Mutex<Amqp>,
}

#[derive(Default)]
struct Amqp {
    connection: Option<Connection>,
    channel: Option<lapin::Channel>,
}

impl Brokers {
    pub fn new(config: BrokerConfig) -> Brokers {
        Brokers {
            config,
            nats: OnceCell::new(),
            amqp: Mutex::new(Amqp::default()),
        }
    }

    async fn jetstream(&self) -> Result<&async_nats::jetstream::Context, String> {
        self.nats
            .get_or_try_init(|| async {
                let client = async_nats::ConnectOptions::new()
                    .connection_timeout(CONNECT_TIMEOUT)
                    .connect(self.config.nats_url.as_str())
                    .await
                    .map_err(|e| {
                        format!("cannot connect to NATS at {}: {e}", self.config.nats_url)
                    })?;
                Ok(async_nats::jetstream::new(client))
            })
            .await
    }

    /// Publishes to a JetStream subject and waits for the stream's ack.
    pub async fn publish_nats(&self, subject: &str, id: &str, call: &BranchCall<'_>) -> OpOutcome {
        let publish = async {
            let js = self.jetstream().await?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            headers.insert(tandem_proto::wire::headers::GID, call.gid);
            headers.insert(tandem_proto::wire::headers::BRANCH_ID, call.branch_id);
            let ack = js
                .publish_with_headers(subject.to_string(), headers, call.payload.clone())
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(call.timeout, publish).await {
            Ok(Ok(_ack)) => OpOutcome::Succeeded,
            Ok(Err(e)) => OpOutcome::Transient(super::truncate(&format!("nats://{subject}: {e}"))),
            Err(_) => OpOutcome::Transient(format!(
                "nats://{subject}: no JetStream ack within {:?}",
                call.timeout
            )),
        }
    }

    /// A confirm-mode channel, connecting (again) if there is none.
    async fn amqp_channel(&self) -> Result<lapin::Channel, String> {
        let mut amqp = self.amqp.lock().await;
        let connected = amqp
            .connection
            .as_ref()
            .is_some_and(|c| c.status().connected());
        if !connected {
            amqp.channel = None;
            amqp.connection = None;
            let connect =
                Connection::connect(&self.config.amqp_url, ConnectionProperties::default());
            let connection = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| format!("no AMQP connection within {CONNECT_TIMEOUT:?}"))?
                .map_err(|e| format!("cannot connect to AMQP: {e}"))?;
            amqp.connection = Some(connection);
        }
        if let Some(channel) = &amqp.channel
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let Some(connection) = &amqp.connection else {
            return Err("no AMQP connection".into());
        };
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("cannot open an AMQP channel: {e}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("cannot turn on publisher confirms: {e}"))?;
        amqp.channel = Some(channel.clone());
        Ok(channel)
    }

    /// Publishes to an exchange (persistent, mandatory) and waits for the
    /// broker's confirm.
    pub async fn publish_amqp(
        &self,
        exchange: &str,
        routing_key: &str,
        id: &str,
        call: &BranchCall<'_>,
    ) -> OpOutcome {
        let target = format!("amqp://{exchange}/{routing_key}");
        let publish = async {
            let short =
                |s: &str| ShortString::try_new(s.to_string()).map_err(|e| format!("{s:?}: {e}"));
            let channel = self.amqp_channel().await?;
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(short(id)?)
                .with_content_type(short(super::content_type(call.payload))?);
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            let confirm = channel
                .basic_publish(
                    short(exchange)?,
                    short(routing_key)?,
                    options,
                    call.payload,
                    properties,
                )
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            match confirm {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(returned)) => Err(format!(
                    "returned unroutable ({} {}): no queue is bound for it",
                    returned.reply_code, returned.reply_text
                )),
                Confirmation::Nack(_) => Err("the broker nacked it".to_string()),
                Confirmation::NotRequested => Err("the channel is not in confirm mode".to_string()),
            }
        };
        match tokio::time::timeout(call.timeout, publish).await {
            Ok(Ok(())) => OpOutcome::Succeeded,
            Ok(Err(e)) => OpOutcome::Transient(super::truncate(&format!("{target}: {e}"))),
            Err(_) => OpOutcome::Transient(format!(
                "{target}: no publisher confirm within {:?}",
                call.timeout
            )),
        }
    }
}
