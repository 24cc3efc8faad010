//! Transactional messages: prepare, then commit the local transaction and
//! submit — or abort. The outbox helpers ([`crate::outbox`]) do the local
//! part and answer the coordinator's check-back.

use std::time::Duration;

use tandem_proto::v1 as pb;
use tandem_proto::wire::{self, ops};

use super::{Client, Error, new_gid};

/// A message being built: its destinations and the producer's check-back.
#[derive(Clone)]
pub struct MessageBuilder {
    client: Client,
    request: pb::PrepareMessageRequest,
}

impl MessageBuilder {
    /// Chooses the gid (default: a new UUID v7).
    pub fn gid(mut self, gid: &str) -> MessageBuilder {
        self.request.gid = gid.to_string();
        self
    }

    pub fn gid_str(&self) -> &str {
        &self.request.gid
    }

    /// Adds a destination, named by its position (`1`, `2`, …): the
    /// message id it is delivered with is `{gid}/{position}`.
    /// `destination`: `http(s)://…`, `grpc://…`, `nats://SUBJECT`,
    /// `amqp://EXCHANGE/ROUTING_KEY`.
    pub fn to(self, destination: &str, payload: impl Into<Vec<u8>>) -> MessageBuilder {
        let id = (self.request.destinations.len() + 1).to_string();
        self.to_named(&id, destination, payload)
    }

    /// Adds a destination with its own id (unique within the message).
    pub fn to_named(
        mut self,
        id: &str,
        destination: &str,
        payload: impl Into<Vec<u8>>,
    ) -> MessageBuilder {
        self.request.destinations.push(pb::Destination {
            branch_id: id.to_string(),
            endpoint: destination.to_string(),
            payload: payload.into(),
        });
        self
    }

    /// How long the coordinator waits for Submit before asking the
    /// check-back (default: the coordinator's default timeout).
    pub fn timeout(mut self, timeout: Duration) -> MessageBuilder {
        self.options().timeout_ms = timeout.as_millis().min(u32::MAX as u128) as u32;
        self
    }

    /// Backoff of deliveries and check-backs (they are never given up on).
    pub fn retry(mut self, retry: pb::RetryPolicy) -> MessageBuilder {
        self.options().retry = Some(retry);
        self
    }

    /// Deadline of one delivery or check-back call.
    pub fn branch_timeout(mut self, timeout: Duration) -> MessageBuilder {
        self.options().branch_timeout_ms = timeout.as_millis().min(u32::MAX as u128) as u32;
        self
    }

    fn options(&mut self) -> &mut pb::TxOptions {
        self.request.options.get_or_insert_with(Default::default)
    }

    /// Registers the message, prepared: nothing is delivered until Submit
    /// or the check-back decides. Safe to repeat.
    pub async fn prepare(&self) -> Result<pb::Transaction, Error> {
        let request = self.request.clone();
        let response = self
            .client
            .call(|ch| {
                let request = request.clone();
                async move { super::coordinator(ch).prepare_message(request).await }
            })
            .await?;
        Ok(response.transaction.unwrap_or_default())
    }
}

impl Client {
    /// Starts building a message whose check-back is served by the SDK's
    /// participant server at `check_back_base` (`http://host:port` or
    /// `grpc://host:port`; op `query_prepared`).
    pub fn message(&self, check_back_base: &str) -> MessageBuilder {
        MessageBuilder {
            client: self.clone(),
            request: pb::PrepareMessageRequest {
                gid: new_gid(),
                check_back: wire::participant_endpoint(check_back_base, ops::QUERY_PREPARED),
                ..Default::default()
            },
        }
    }

    /// Submits a prepared message (its local transaction committed): the
    /// decision to deliver. Safe to repeat; FAILED_PRECONDITION if it was
    /// dropped (aborted, or the check-back said rolled back).
    pub async fn submit(&self, gid: &str) -> Result<pb::Transaction, Error> {
        self.commit(gid, false, Duration::ZERO).await
    }

    /// Drops a prepared message (its local transaction rolled back). Safe
    /// to repeat; FAILED_PRECONDITION once it was submitted.
    pub async fn abort_message(&self, gid: &str, reason: &str) -> Result<pb::Transaction, Error> {
        self.abort(gid, reason, false, Duration::ZERO).await
    }
}
