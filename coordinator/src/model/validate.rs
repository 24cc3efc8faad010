//! Input checks shared by the API (before proposing, so bad input never reaches
//! the log) and `apply` (so a command that got in anyway changes nothing).

/// Hard limits that hold on every node regardless of its configuration:
/// `apply` must not depend on per-node settings, or replicas could diverge.
pub const GID_BYTES_MAX: usize = 128;
pub const BRANCH_ID_BYTES_MAX: usize = 128;
pub const ENDPOINT_BYTES_MAX: usize = 2048;
/// Upper bound for any configurable payload limit.
pub const PAYLOAD_BYTES_HARD_MAX: usize = 4 * 1024 * 1024;
pub const BRANCHES_HARD_MAX: usize = 1024;
/// An abort reason (kept as the transaction's error).
pub const REASON_BYTES_MAX: usize = 1024;
/// Operators' repairs kept per transaction, and the length of their texts.
/// Not in the footprint (which is fixed when a transaction starts): at
/// most `REPAIRS_MAX * (REPAIR_TEXT_BYTES_MAX * 2 + 64)` bytes, about
/// 4 KiB, and only on transactions someone repaired.
pub const REPAIRS_MAX: usize = 8;
pub const REPAIR_TEXT_BYTES_MAX: usize = 256;
/// Gids in one Gc command.
pub const GC_BATCH_MAX: usize = 10_000;
/// A participant's error text kept per op (longer ones are cut).
pub const ERROR_BYTES_MAX: usize = 1024;
/// What one transaction may take in memory ([`crate::model::Transaction::footprint_bytes`]),
/// whatever a node's configuration says; the configurable, lower limit is
/// checked by the API before Begin and SubmitSaga.
pub const TX_BYTES_HARD_MAX: usize = 16 << 20;
/// A transaction's fixed cost in the footprint: the struct, and its error
/// and decision reason (each cut to `REASON_BYTES_MAX`).
pub const TX_OVERHEAD_BYTES: usize = 512 + 2 * REASON_BYTES_MAX;
/// A branch's fixed cost: the struct and the last error of each of its ops.
pub const BRANCH_OVERHEAD_BYTES: usize = 256 + 2 * ERROR_BYTES_MAX;

/// A finished transaction's fixed cost in what retention charges it
/// ([`crate::model::Transaction::retained_bytes`]): its sealed record
/// beyond its texts, its entries in the table and the Gc index, and the
/// node's other memory per finished transaction as measured
/// (`scripts/bench-memory.sh`: ~1,150 bytes for a two-step saga sealed,
/// charged ~1,500 with these), with a margin. Was 1,536 (and 256 per
/// branch) while a finished transaction was kept unsealed (~1.9 KiB).
pub const RETAINED_TX_BYTES: usize = 896;
/// A finished branch's fixed cost in the same: its ops' fields in the
/// record.
pub const RETAINED_BRANCH_BYTES: usize = 192;
/// An operator's repair record's fixed cost in the same.
pub const RETAINED_REPAIR_BYTES: usize = 64;

/// A branch's footprint: its fixed cost, its texts (id, endpoints, the ids
/// it comes after) and its payload.
pub fn branch_footprint(text_bytes: usize, payload_bytes: usize) -> usize {
    BRANCH_OVERHEAD_BYTES + text_bytes + payload_bytes
}

/// A transaction's footprint from its gid, payload and branches'
/// footprints.
pub fn tx_footprint(gid_bytes: usize, payload_bytes: usize, branches_bytes: usize) -> usize {
    TX_OVERHEAD_BYTES + gid_bytes + payload_bytes + branches_bytes
}

/// Cuts an error text to [`ERROR_BYTES_MAX`] at a character boundary.
pub fn truncate_error(text: &str) -> &str {
    truncate(text, ERROR_BYTES_MAX)
}

/// Cuts a text to at most `max` bytes at a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("gid is empty")]
    EmptyGid,
    #[error("gid {gid_prefix}… is {len} bytes; the limit is {max}")]
    GidTooLong {
        gid_prefix: String,
        len: usize,
        max: usize,
    },
    #[error("gid {gid:?} has a character other than printable ASCII (no spaces)")]
    GidCharacters { gid: String },
    #[error("transaction {gid}: payload is {len} bytes; the limit is {max}")]
    PayloadTooLarge { gid: String, len: usize, max: usize },
    #[error("transaction {gid}: {problem}")]
    Other { gid: String, problem: String },
}

/// A gid is 1..=128 bytes of printable ASCII without spaces, so it can travel
/// in HTTP headers, gRPC metadata and XA xids unchanged.
pub fn gid(gid: &str) -> Result<(), InvalidInput> {
    if gid.is_empty() {
        return Err(InvalidInput::EmptyGid);
    }
    if gid.len() > GID_BYTES_MAX {
        let prefix: String = gid.chars().take(16).collect();
        return Err(InvalidInput::GidTooLong {
            gid_prefix: prefix,
            len: gid.len(),
            max: GID_BYTES_MAX,
        });
    }
    if !gid.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(InvalidInput::GidCharacters {
            gid: gid.to_string(),
        });
    }
    Ok(())
}

/// A branch id: like a gid, at most [`BRANCH_ID_BYTES_MAX`] bytes.
pub fn branch_id(gid: &str, branch_id: &str) -> Result<(), InvalidInput> {
    let problem = if branch_id.is_empty() {
        "branch id is empty".to_string()
    } else if branch_id.len() > BRANCH_ID_BYTES_MAX {
        format!(
            "branch id is {} bytes; the limit is {BRANCH_ID_BYTES_MAX}",
            branch_id.len()
        )
    } else if !branch_id.bytes().all(|b| b.is_ascii_graphic()) {
        format!("branch id {branch_id:?} has a character other than printable ASCII (no spaces)")
    } else {
        return Ok(());
    };
    Err(InvalidInput::Other {
        gid: gid.to_string(),
        problem,
    })
}

/// An endpoint is `grpc://HOST:PORT` or `http(s)://HOST[:PORT][/PATH]`.
pub fn endpoint(gid: &str, endpoint: &str) -> Result<(), InvalidInput> {
    endpoint_split_by(gid, endpoint, split_endpoint)
}

/// An endpoint's scheme, host, port (if it names one) and path.
type EndpointParts<'a> = (&'a str, &'a str, Option<&'a str>, &'a str);

/// [`endpoint`]'s checks, with the endpoint taken apart by `split`.
fn endpoint_split_by(
    gid: &str,
    endpoint: &str,
    split: fn(&str) -> Option<EndpointParts<'_>>,
) -> Result<(), InvalidInput> {
    let bad = |why: &str| InvalidInput::Other {
        gid: gid.to_string(),
        problem: format!(
            "endpoint {endpoint:?} is malformed: {why} (expected grpc://HOST:PORT or http(s)://HOST[:PORT]/PATH)"
        ),
    };
    if endpoint.len() > ENDPOINT_BYTES_MAX {
        return Err(bad("too long"));
    }
    // A fold without an early exit, so the compiler checks many bytes at once.
    if !endpoint
        .bytes()
        .fold(true, |ok, b| ok & b.is_ascii_graphic())
    {
        return Err(bad("it has spaces or non-ASCII characters"));
    }
    let (scheme, host, port, path) = split(endpoint).ok_or_else(|| bad("no scheme"))?;
    let host_ok = !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
        });
    if !host_ok {
        return Err(bad("bad host"));
    }
    if let Some(port) = port
        && !port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return Err(bad("bad port"));
    }
    match scheme {
        "grpc" if port.is_none() => Err(bad("grpc endpoints need a port")),
        "grpc" if !path.is_empty() && path != "/" => Err(bad("grpc endpoints take no path")),
        "grpc" | "http" | "https" => Ok(()),
        _ => Err(bad("unsupported scheme")),
    }
}

/// Takes an endpoint apart at its first `://`, the first `/` after it and
/// the authority's last `:` (unless that is inside an IPv6 literal's
/// brackets). Every replica runs this on every step it applies: byte
/// scans, not `str` pattern searchers (whose set-up cost more than the
/// rest of the checks).
fn split_endpoint(endpoint: &str) -> Option<EndpointParts<'_>> {
    let at = endpoint.as_bytes().windows(3).position(|w| w == b"://")?;
    let (scheme, rest) = (&endpoint[..at], &endpoint[at + 3..]);
    let (authority, path) = match rest.bytes().position(|b| b == b'/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, port) = match authority.bytes().rposition(|b| b == b':') {
        Some(i) if !authority[..i].ends_with(']') || authority.starts_with('[') => {
            (&authority[..i], Some(&authority[i + 1..]))
        }
        _ => (authority, None),
    };
    Some((scheme, host, port, path))
}

/// A broker name (NATS subject, AMQP exchange or routing key) is at most
/// this long (AMQP's short string is 255 bytes).
pub const BROKER_NAME_BYTES_MAX: usize = 255;

/// A message destination: a participant endpoint ([`endpoint`]),
/// `nats://SUBJECT` (a JetStream subject, no wildcards) or
/// `amqp://EXCHANGE/ROUTING_KEY` (an empty exchange is the default one,
/// which routes by queue name: `amqp:///QUEUE`).
pub fn destination(gid: &str, destination: &str) -> Result<(), InvalidInput> {
    let bad = |why: &str| InvalidInput::Other {
        gid: gid.to_string(),
        problem: format!(
            "destination {destination:?} is malformed: {why} (expected http(s)://HOST[:PORT]/PATH, grpc://HOST:PORT, nats://SUBJECT or amqp://EXCHANGE/ROUTING_KEY)"
        ),
    };
    let name_ok = |name: &str, extra: &[u8]| {
        name.len() <= BROKER_NAME_BYTES_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b) || extra.contains(&b))
    };
    if let Some(subject) = destination.strip_prefix("nats://") {
        let tokens_ok = !subject.is_empty() && subject.split('.').all(|t| !t.is_empty());
        return if !tokens_ok || !name_ok(subject, b"") {
            Err(bad(
                "a NATS subject is dot-separated tokens of letters, digits, '-' and '_' (no wildcards)",
            ))
        } else {
            Ok(())
        };
    }
    if let Some(rest) = destination.strip_prefix("amqp://") {
        let Some((exchange, routing_key)) = rest.split_once('/') else {
            return Err(bad("an AMQP destination names EXCHANGE/ROUTING_KEY"));
        };
        if !name_ok(exchange, b":") {
            return Err(bad(
                "an exchange name is letters, digits, '-', '_', '.' and ':'",
            ));
        }
        if routing_key.is_empty() && exchange.is_empty() {
            return Err(bad("the default exchange needs a routing key (the queue)"));
        }
        if !name_ok(routing_key, b"/:#*") {
            return Err(bad(
                "a routing key is letters, digits and '-_.:/#*', at most 255 bytes",
            ));
        }
        return Ok(());
    }
    endpoint(gid, destination).map_err(|_| bad("not a participant endpoint either"))
}

pub fn payload(gid: &str, payload: &[u8], max: usize) -> Result<(), InvalidInput> {
    let max = max.min(PAYLOAD_BYTES_HARD_MAX);
    if payload.len() > max {
        return Err(InvalidInput::PayloadTooLarge {
            gid: gid.to_string(),
            len: payload.len(),
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_accepts_printable_ascii_up_to_the_limit() {
        assert_eq!(gid("order-42:a/b@c"), Ok(()));
        assert_eq!(gid(&"g".repeat(GID_BYTES_MAX)), Ok(()));
    }

    #[test]
    fn gid_rejects_empty_long_and_odd_characters() {
        assert_eq!(gid(""), Err(InvalidInput::EmptyGid));
        assert!(matches!(
            gid(&"g".repeat(GID_BYTES_MAX + 1)),
            Err(InvalidInput::GidTooLong { len: 129, .. })
        ));
        assert!(matches!(
            gid("a b"),
            Err(InvalidInput::GidCharacters { .. })
        ));
        assert!(matches!(gid("é"), Err(InvalidInput::GidCharacters { .. })));
        assert!(matches!(
            gid("a\nb"),
            Err(InvalidInput::GidCharacters { .. })
        ));
    }

    #[test]
    fn endpoints_accept_grpc_and_http_and_name_what_is_wrong() {
        for ok in [
            "grpc://127.0.0.1:9000",
            "grpc://svc-a:9000/",
            "http://localhost/tandem/prepare",
            "https://pay.example.com:8443/tcc",
            "http://[::1]:8080/x",
        ] {
            assert_eq!(endpoint("g", ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("127.0.0.1:9000", "no scheme"),
            ("ftp://h:1", "unsupported scheme"),
            ("grpc://h", "need a port"),
            ("grpc://h:1/path", "no path"),
            ("http://:80/x", "bad host"),
            ("http://h:99999/x", "bad port"),
            ("http://h /x", "spaces"),
        ] {
            let e = endpoint("g7", bad).unwrap_err().to_string();
            assert!(
                e.contains(why) && e.starts_with("transaction g7"),
                "{bad}: {e}"
            );
        }
    }

    /// How `endpoint` took an endpoint apart before it scanned bytes (str
    /// pattern searches): the reference the byte scans must agree with.
    fn split_with_str_searches(endpoint: &str) -> Option<EndpointParts<'_>> {
        let (scheme, rest) = endpoint.split_once("://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
            _ => (authority, None),
        };
        Some((scheme, host, port, path))
    }

    proptest::proptest! {
        /// Invariant 1 (every replica applies the same log to the same
        /// table): `apply` validates endpoints, so nodes of two versions
        /// must accept and refuse exactly the same ones, in the same words.
        #[test]
        fn endpoint_checks_agree_with_the_str_search_version(
            scheme in "(grpc|https?|ftp|h|)(://|:/|//|:)?",
            host in "[a-z0-9:\\[\\]._@ -]{0,10}",
            port in "(:[0-9:]{0,6})?",
            path in "(/[a-z0-9:/.]{0,8})?",
            tail in "[a-z0-9:/\\[\\]._@ -]{0,6}",
        ) {
            let e = format!("{scheme}{host}{port}{path}{tail}");
            proptest::prop_assert_eq!(split_endpoint(&e), split_with_str_searches(&e));
            proptest::prop_assert_eq!(
                endpoint("g", &e),
                endpoint_split_by("g", &e, split_with_str_searches)
            );
        }
    }

    #[test]
    fn destinations_accept_endpoints_and_broker_names_and_name_what_is_wrong() {
        for ok in [
            "http://127.0.0.1:8080/hook",
            "grpc://svc:9000",
            "nats://orders.placed",
            "nats://a-b_c",
            "amqp://orders/placed.eu",
            "amqp:///order-queue",
            "amqp://amq.topic/x/y",
            "amqp://fanout/",
        ] {
            assert_eq!(destination("g", ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("kafka://topic", "not a participant endpoint"),
            ("nats://", "dot-separated"),
            ("nats://orders.*", "no wildcards"),
            ("nats://orders..x", "dot-separated"),
            ("nats://a b", "dot-separated"),
            ("amqp://exchange", "EXCHANGE/ROUTING_KEY"),
            ("amqp:///", "needs a routing key"),
            ("amqp://ex change/k", "exchange name"),
        ] {
            let e = destination("g8", bad).unwrap_err().to_string();
            assert!(
                e.contains(why) && e.starts_with("transaction g8"),
                "{bad}: {e}"
            );
        }
        let long = format!("nats://{}", "s".repeat(BROKER_NAME_BYTES_MAX + 1));
        assert!(destination("g", &long).is_err());
    }

    #[test]
    fn payload_limit_is_capped_by_the_hard_maximum() {
        assert_eq!(payload("g", &[0; 10], 10), Ok(()));
        assert!(payload("g", &[0; 11], 10).is_err());
        let big = vec![0; PAYLOAD_BYTES_HARD_MAX + 1];
        assert!(payload("g", &big, usize::MAX).is_err());
    }
}
