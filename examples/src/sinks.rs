//! Consumers that count what was delivered: a JetStream stream and a
//! RabbitMQ queue of the run's own, read back by message id (`Nats-Msg-Id`,
//! AMQP `message_id`), and a plain HTTP webhook (`tandem-message-id`). The
//! examples and the test suite read deliveries through these, so
//! "delivered" means stored by the broker (or answered 2xx by the hook) and
//! read back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

/// The local NATS and RabbitMQ.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A JetStream stream of the run's own, on subjects `{name}.>`.
pub struct JetStreamSink {
    js: jetstream::Context,
    name: String,
}

impl JetStreamSink {
    /// Creates the stream (file storage, the default two-minute duplicate
    /// window: a redelivery with the same `Nats-Msg-Id` is dropped).
    pub async fn create(url: &str, name: &str) -> anyhow::Result<JetStreamSink> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(url)
            .await
            .with_context(|| format!("connect to NATS at {url}"))?;
        let js = jetstream::new(client);
        js.create_stream(jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{name}.>")],
            max_age: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .with_context(|| format!("create JetStream stream {name} (is NATS running with -js?)"))?;
        Ok(JetStreamSink {
            js,
            name: name.to_string(),
        })
    }

    /// The destination of subject `{name}.{leaf}`.
    pub fn destination(&self, leaf: &str) -> String {
        format!("nats://{}.{leaf}", self.name)
    }

    /// The message id of every message the stream stored, in order.
    pub async fn ids(&self) -> anyhow::Result<Vec<String>> {
        let mut stream = self.js.get_stream(&self.name).await?;
        let last = stream.info().await?.state.last_sequence;
        let mut ids = Vec::new();
        for sequence in 1..=last {
            let Ok(message) = stream.get_raw_message(sequence).await else {
                continue;
            };
            if let Some(id) = message.headers.get("Nats-Msg-Id") {
                ids.push(id.as_str().to_string());
            }
        }
        Ok(ids)
    }

    /// Publishes straight to the stream (not through Tandem), for tests
    /// that pin JetStream's own behaviour.
    pub async fn publish(&self, leaf: &str, id: &str, payload: &[u8]) -> anyhow::Result<bool> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        let ack = self
            .js
            .publish_with_headers(
                format!("{}.{leaf}", self.name),
                headers,
                payload.to_vec().into(),
            )
            .await?
            .await?;
        Ok(ack.duplicate)
    }

    pub async fn delete(&self) {
        let _ = self.js.delete_stream(&self.name).await;
    }
}

/// A RabbitMQ queue of the run's own, bound to `amq.direct` under its name.
pub struct RabbitSink {
    _connection: Connection,
    channel: lapin::Channel,
    queue: String,
}

impl RabbitSink {
    pub async fn create(url: &str, queue: &str) -> anyhow::Result<RabbitSink> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .with_context(|| format!("connect to RabbitMQ at {url}"))?;
        let channel = connection.create_channel().await?;
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.into(),
                "amq.direct".into(),
                queue.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(RabbitSink {
            _connection: connection,
            channel,
            queue: queue.to_string(),
        })
    }

    /// The destination that routes to this queue.
    pub fn destination(&self) -> String {
        format!("amqp://amq.direct/{}", self.queue)
    }

    /// Takes every message waiting in the queue; their message ids.
    pub async fn drain(&self) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await?
        {
            let id = message
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default();
            ids.push(id);
        }
        Ok(ids)
    }

    pub async fn delete(&self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

/// A plain HTTP webhook (no SDK): records the message id of every POST it
/// answers 2xx; while `failing`, answers 503 and records nothing.
#[derive(Clone)]
pub struct WebhookSink {
    pub url: String,
    received: Arc<Mutex<Vec<String>>>,
    failing: Arc<AtomicBool>,
}

impl WebhookSink {
    pub async fn start() -> anyhow::Result<WebhookSink> {
        let listener = crate::services::participant_listener().await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let sink = WebhookSink {
            url,
            received: Arc::default(),
            failing: Arc::default(),
        };
        let state = sink.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let state = state.clone();
                async move {
                    if state.failing.load(Ordering::SeqCst) {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let id = headers
                        .get(tandem_sdk::wire::headers::MESSAGE_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    state.received.lock().expect("webhook lock").push(id);
                    axum::http::StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(sink)
    }

    /// Every message id received, repeats included, in order.
    pub fn ids(&self) -> Vec<String> {
        self.received.lock().expect("webhook lock").clone()
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }
}
