//! A global transaction as the application sees it: begin, enlist branches,
//! call them carrying the gid, then commit or abort.

use std::time::Duration;

use tandem_proto::v1 as pb;

use super::{Client, Error};
use tandem_proto::wire::{headers, ops, participant_endpoint};

/// How long `commit` and `abort` wait for the transaction to finish.
const END_WAIT: Duration = Duration::from_secs(30);

/// One global transaction. Dropping it without commit or abort leaves the
/// transaction to its timeout, which aborts it.
pub struct GlobalTx {
    pub(super) client: Client,
    pub(super) gid: String,
    pub(super) protocol: pb::Protocol,
}

impl GlobalTx {
    pub fn gid(&self) -> &str {
        &self.gid
    }

    pub fn protocol(&self) -> pb::Protocol {
        self.protocol
    }

    /// The operations the coordinator calls on a branch of this protocol.
    fn coordinator_ops(&self) -> &'static [&'static str] {
        match self.protocol {
            pb::Protocol::TwoPc => &[ops::PREPARE, ops::COMMIT, ops::ROLLBACK],
            pb::Protocol::ThreePc => {
                &[ops::CAN_COMMIT, ops::PRE_COMMIT, ops::DO_COMMIT, ops::ABORT]
            }
            pb::Protocol::Xa => &[ops::COMMIT, ops::ROLLBACK],
            pb::Protocol::Tcc => &[ops::CONFIRM, ops::CANCEL],
            _ => &[],
        }
    }

    /// Enlists a participant served by the SDK's `ParticipantServer` at
    /// `base` (`http://host:port` or `grpc://host:port`), with the operations
    /// this protocol needs.
    pub async fn enlist(&self, branch_id: &str, base: &str, payload: Vec<u8>) -> Result<(), Error> {
        let endpoints: Vec<(&str, String)> = self
            .coordinator_ops()
            .iter()
            .map(|op| (*op, participant_endpoint(base, op)))
            .collect();
        let ops: Vec<(&str, &str)> = endpoints.iter().map(|(op, e)| (*op, e.as_str())).collect();
        self.client
            .register_branch(&self.gid, branch_id, &ops, payload)
            .await?;
        Ok(())
    }

    /// Enlists a branch with explicit endpoints per operation.
    pub async fn register(
        &self,
        branch_id: &str,
        ops: &[(&str, &str)],
        payload: Vec<u8>,
    ) -> Result<(), Error> {
        self.client
            .register_branch(&self.gid, branch_id, ops, payload)
            .await?;
        Ok(())
    }

    /// TCC: enlists a participant served by the SDK at `base` (its try,
    /// confirm and cancel), then calls its Try with `payload`. A refusal is
    /// [`Error::BranchRefused`]: abort the transaction then (its cancel goes
    /// to every enlisted branch, this one included).
    pub async fn try_branch(
        &self,
        branch_id: &str,
        base: &str,
        payload: Vec<u8>,
    ) -> Result<(), Error> {
        let endpoints =
            [ops::TRY, ops::CONFIRM, ops::CANCEL].map(|op| (op, participant_endpoint(base, op)));
        let refs: Vec<(&str, &str)> = endpoints.iter().map(|(o, e)| (*o, e.as_str())).collect();
        let tx = self
            .client
            .register_branch(&self.gid, branch_id, &refs, payload.clone())
            .await?;
        let fence = tx.decision.as_ref().map(|d| (d.term, d.index));
        let (term, index) = fence.unwrap_or((0, 0));
        let refused = |message: String| Error::BranchRefused {
            branch_id: branch_id.to_string(),
            message,
        };
        let base = base.trim_end_matches('/');
        if base.starts_with("grpc://") {
            let channel = self.client.channel(&base.replacen("grpc://", "http://", 1));
            let mut participant = pb::participant_client::ParticipantClient::new(channel);
            participant
                .call(pb::BranchCallRequest {
                    gid: self.gid.clone(),
                    branch_id: branch_id.to_string(),
                    op: ops::TRY.to_string(),
                    payload,
                    fence_term: term,
                    fence_index: index,
                    protocol: pb::Protocol::Tcc as i32,
                })
                .await
                .map_err(|s| refused(s.message().to_string()))?;
            return Ok(());
        }
        let mut request = self
            .client
            .http()
            .post(participant_endpoint(base, ops::TRY))
            .body(payload);
        for (name, value) in self.headers(branch_id) {
            request = request.header(name, value);
        }
        request = request
            .header(headers::OP, ops::TRY)
            .header(headers::FENCE_TERM, term.to_string())
            .header(headers::FENCE_INDEX, index.to_string());
        let response = request.send().await.map_err(|e| refused(e.to_string()))?;
        if response.status().is_success() {
            Ok(())
        } else {
            let status = response.status();
            Err(refused(format!(
                "{status}: {}",
                response.text().await.unwrap_or_default()
            )))
        }
    }

    /// Headers that carry this transaction to a participant's own business
    /// endpoint (the XA and TCC helpers read them).
    pub fn headers(&self, branch_id: &str) -> [(&'static str, String); 3] {
        let protocol = tandem_proto::wire::protocols::name(self.protocol);
        [
            (headers::GID, self.gid.clone()),
            (headers::BRANCH_ID, branch_id.to_string()),
            (headers::PROTOCOL, protocol.to_string()),
        ]
    }

    /// Commits and waits until every branch has acknowledged. Returns the
    /// final transaction: committed, or aborted if phase one failed (2PC).
    pub async fn commit(&self) -> Result<pb::Transaction, Error> {
        self.client.commit(&self.gid, true, END_WAIT).await
    }

    /// Aborts and waits until every branch has rolled back.
    pub async fn abort(&self, reason: &str) -> Result<pb::Transaction, Error> {
        self.client.abort(&self.gid, reason, true, END_WAIT).await
    }
}
