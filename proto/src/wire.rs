//! The words Tandem says on the wire besides the protobuf messages, defined
//! once for the coordinator and the SDK: the HTTP headers (and gRPC
//! metadata) of a participant call, the operation and protocol names, the
//! participant's HTTP route, the leader redirect key, and the fencing token.

use crate::v1 as pb;

/// HTTP headers (and gRPC metadata keys) carrying a call's identity.
pub mod headers {
    pub const GID: &str = "tandem-gid";
    pub const BRANCH_ID: &str = "tandem-branch-id";
    pub const OP: &str = "tandem-op";
    pub const PROTOCOL: &str = "tandem-protocol";
    pub const FENCE_TERM: &str = "tandem-fence-term";
    pub const FENCE_INDEX: &str = "tandem-fence-index";
    /// A delivered message's id (`{gid}/{branch_id}`): the same on every
    /// delivery of it, for consumers to deduplicate on.
    pub const MESSAGE_ID: &str = "tandem-message-id";
    /// When the coordinator signed the call (ms since the epoch).
    pub const TIMESTAMP: &str = "tandem-timestamp";
    /// HMAC-SHA256 of the call ([`super::signing`]), hex.
    pub const SIGNATURE: &str = "tandem-signature";
    /// Pipelined HTTP/1.1 (docs/http-participants.md). On a participant's
    /// answer: it takes up to this many calls in flight on one connection
    /// and runs them concurrently, answering in order. On the coordinator's
    /// request: the connection is a pipelined one.
    pub const PIPELINE: &str = "tandem-pipeline";
}

/// Pipelined HTTP/1.1 (`headers::PIPELINE`): what both ends read off a
/// message's head, parsed by httparse.
pub mod http1 {
    /// A header's value by (case-insensitive) name.
    pub fn header<'a>(headers: &[httparse::Header<'a>], name: &str) -> Option<&'a [u8]> {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// Whether the message ends its connection (`connection: close`).
    pub fn closes(headers: &[httparse::Header<'_>]) -> bool {
        header(headers, "connection").is_some_and(|v| {
            std::str::from_utf8(v).is_ok_and(|v| {
                v.split(',')
                    .any(|token| token.trim().eq_ignore_ascii_case("close"))
            })
        })
    }
}

/// Signed calls to participants: with a key shared by the cluster and its
/// participants, each call carries `tandem-timestamp` and
/// `tandem-signature` = hex HMAC-SHA256(key, `v1`, gid, branch id, op,
/// fence term, fence index, timestamp — each followed by a newline — then
/// the body). A participant recomputes it, refuses a mismatch, a timestamp
/// outside its window, and a signature it has already seen.
pub mod signing {
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    /// A key shorter than this is refused (by the node and the SDK).
    pub const KEY_BYTES_MIN: usize = 32;

    #[allow(clippy::too_many_arguments)]
    fn mac(
        key: &[u8],
        gid: &str,
        branch_id: &str,
        op: &str,
        fence_term: u64,
        fence_index: u64,
        timestamp_ms: i64,
        body: &[u8],
    ) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        for part in [
            "v1",
            gid,
            branch_id,
            op,
            &fence_term.to_string(),
            &fence_index.to_string(),
            &timestamp_ms.to_string(),
        ] {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac.update(body);
        mac
    }

    /// The signature of a call, hex.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        key: &[u8],
        gid: &str,
        branch_id: &str,
        op: &str,
        fence_term: u64,
        fence_index: u64,
        timestamp_ms: i64,
        body: &[u8],
    ) -> String {
        let bytes = mac(
            key,
            gid,
            branch_id,
            op,
            fence_term,
            fence_index,
            timestamp_ms,
            body,
        )
        .finalize()
        .into_bytes();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `signature` (hex) is the call's, compared in constant time.
    #[allow(clippy::too_many_arguments)]
    pub fn verify(
        key: &[u8],
        gid: &str,
        branch_id: &str,
        op: &str,
        fence_term: u64,
        fence_index: u64,
        timestamp_ms: i64,
        body: &[u8],
        signature: &str,
    ) -> bool {
        let Some(bytes) = decode_hex(signature) else {
            return false;
        };
        mac(
            key,
            gid,
            branch_id,
            op,
            fence_term,
            fence_index,
            timestamp_ms,
            body,
        )
        .verify_slice(&bytes)
        .is_ok()
    }

    fn decode_hex(text: &str) -> Option<Vec<u8>> {
        if text.len() != 64 {
            return None;
        }
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
            .collect()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_signature_covers_every_field_and_the_body() {
            let key = b"0123456789abcdef0123456789abcdef";
            let s = sign(key, "g", "b", "commit", 2, 9, 1000, b"{}");
            assert!(verify(key, "g", "b", "commit", 2, 9, 1000, b"{}", &s));
            for bad in [
                verify(key, "h", "b", "commit", 2, 9, 1000, b"{}", &s),
                verify(key, "g", "c", "commit", 2, 9, 1000, b"{}", &s),
                verify(key, "g", "b", "rollback", 2, 9, 1000, b"{}", &s),
                verify(key, "g", "b", "commit", 3, 9, 1000, b"{}", &s),
                verify(key, "g", "b", "commit", 2, 8, 1000, b"{}", &s),
                verify(key, "g", "b", "commit", 2, 9, 1001, b"{}", &s),
                verify(key, "g", "b", "commit", 2, 9, 1000, b"{ }", &s),
                verify(
                    b"another key, also 32 bytes long!",
                    "g",
                    "b",
                    "commit",
                    2,
                    9,
                    1000,
                    b"{}",
                    &s,
                ),
                verify(key, "g", "b", "commit", 2, 9, 1000, b"{}", "zz"),
            ] {
                assert!(!bad);
            }
        }
    }
}

/// A transactional message's id at one destination: stable across
/// redeliveries, leader changes and restarts (NATS `Nats-Msg-Id`, AMQP
/// `message_id`, the `tandem-message-id` header).
pub fn message_id(gid: &str, branch_id: &str) -> String {
    format!("{gid}/{branch_id}")
}

/// Operation names: the `op` field, the `tandem-op` header, and the last
/// segment of a participant's HTTP route.
pub mod ops {
    pub const PREPARE: &str = "prepare";
    pub const COMMIT: &str = "commit";
    pub const ROLLBACK: &str = "rollback";
    pub const TRY: &str = "try";
    pub const CONFIRM: &str = "confirm";
    pub const CANCEL: &str = "cancel";
    pub const ACTION: &str = "action";
    pub const COMPENSATE: &str = "compensate";
    /// 3PC: phase one (a vote), phase two (acknowledged, still undecided),
    /// the commit, and the abort.
    pub const CAN_COMMIT: &str = "can_commit";
    pub const PRE_COMMIT: &str = "pre_commit";
    pub const DO_COMMIT: &str = "do_commit";
    pub const ABORT: &str = "abort";
    /// Transactional messages: the coordinator asks the producer whether
    /// its local transaction committed (the check-back), and delivers the
    /// message to a destination.
    pub const QUERY_PREPARED: &str = "query_prepared";
    pub const DELIVER: &str = "deliver";

    pub const ALL: [&str; 14] = [
        PREPARE,
        COMMIT,
        ROLLBACK,
        TRY,
        CONFIRM,
        CANCEL,
        ACTION,
        COMPENSATE,
        CAN_COMMIT,
        PRE_COMMIT,
        DO_COMMIT,
        ABORT,
        QUERY_PREPARED,
        DELIVER,
    ];
}

/// Protocol names, as the CLI, the `tandem-protocol` header and messages
/// say them.
pub mod protocols {
    use super::pb;

    pub const SAGA: &str = "saga";
    pub const TCC: &str = "tcc";
    pub const XA: &str = "xa";
    pub const TWO_PC: &str = "2pc";
    pub const THREE_PC: &str = "3pc";
    pub const MSG: &str = "msg";

    /// The name of a protocol enum value; empty for an unknown one.
    pub fn name(protocol: pb::Protocol) -> &'static str {
        match protocol {
            pb::Protocol::Saga => SAGA,
            pb::Protocol::Tcc => TCC,
            pb::Protocol::Xa => XA,
            pb::Protocol::TwoPc => TWO_PC,
            pb::Protocol::ThreePc => THREE_PC,
            pb::Protocol::Msg => MSG,
            pb::Protocol::Unspecified => "",
        }
    }
}

/// A participant served over HTTP takes operation `op` at `POST {base}{HTTP_ROUTE_PREFIX}{op}`.
pub const HTTP_ROUTE_PREFIX: &str = "/tandem/";

/// Where a participant served by the SDK at `base` (`http(s)://host:port`
/// or `grpc://host:port`) takes operation `op`: its route under `base` over
/// HTTP, `base` itself over gRPC (the op travels in the message).
pub fn participant_endpoint(base: &str, op: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.starts_with("grpc://") {
        base.to_string()
    } else {
        format!("{base}{HTTP_ROUTE_PREFIX}{op}")
    }
}

/// gRPC metadata key carrying the leader's address when a node redirects a
/// call.
pub const LEADER_METADATA_KEY: &str = "tandem-leader";

/// A coordinator leader's fencing token: the term and log index of the entry
/// a call acts on. Ordered by term, then index; a participant refuses a call
/// whose token is older than one it accepted for the same gid.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Fence {
    pub term: u64,
    pub index: u64,
}
