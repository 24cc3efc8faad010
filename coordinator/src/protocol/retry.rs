//! Retrying a branch op: when the next attempt is due, and which failures
//! are worth a log entry. Pure; the driver is the only caller, and this is
//! the only place either is computed.
//!
//! What a failure means is not decided here but by the op's state after the
//! protocol recorded it: an op that is still open (pending, or refused in
//! phase two) is retried, whatever the answer was; a closed one is not.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::model::types::RetryPolicy;

/// A failing op is recorded in the log at least this often, so that Get
/// shows a recent error and attempt count.
pub const RECORD_INTERVAL_MS: i64 = 30_000;

/// How long to wait before attempt `attempts + 1`, after `attempts` failed:
/// `initial × 2^(attempts-1)`, capped at `max`, less a jitter of up to half
/// of it (so the retries of many transactions spread out). The jitter comes
/// from `seed` (for example a hash of the gid, branch and attempt), so the
/// same failure always waits the same time — which a simulation needs, and a
/// new leader resuming from a recorded attempt count gets the same answer.
///
/// The schedule is `backon`'s exponential backoff (the one the transport and
/// the SDK use): from half the initial interval to half the cap, with its
/// jitter of up to the same again, seeded — so each wait lies in
/// `[full / 2, full]`.
pub fn backoff(policy: RetryPolicy, attempts: u32, seed: u64) -> Duration {
    if attempts == 0 {
        return Duration::ZERO;
    }
    let initial = u64::from(policy.initial_interval_ms.max(1));
    let max = u64::from(policy.max_interval_ms).max(initial);
    // Past 2^40 × initial every schedule has long reached its cap.
    let step = (attempts - 1).min(40) as usize;
    let wait = ExponentialBuilder::new()
        .with_min_delay(Duration::from_micros(initial * 500))
        .with_max_delay(Duration::from_micros(max * 500))
        .with_jitter()
        .with_jitter_seed(seed)
        .without_max_times()
        .build()
        .nth(step)
        .expect("an unbounded schedule never ends");
    wait.min(Duration::from_millis(max))
}

/// What the log already says about a failing op.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    pub attempts: u32,
    pub refused: bool,
    /// When the driver last recorded it (its own clock).
    pub at_ms: i64,
}

/// Whether the driver proposes a failure of an op that has now failed
/// `attempts` times: the first failure; a change between "unavailable" and
/// "refused"; reaching `limit` (phase one gives up there — the protocol
/// decides to abort, and only from an entry); powers of two; and at least
/// every [`RECORD_INTERVAL_MS`]. So a branch that stays down for an hour at
/// the policy's largest interval costs a few hundred entries, not one per
/// attempt, and a leader that takes over resumes from an attempt count at
/// most half the truth.
pub fn should_record(
    recorded: Recorded,
    attempts: u32,
    refused: bool,
    limit: Option<u32>,
    now_ms: i64,
) -> bool {
    attempts > recorded.attempts
        && (recorded.attempts == 0
            || refused != recorded.refused
            || limit.is_some_and(|l| attempts >= l)
            || attempts.is_power_of_two()
            || now_ms - recorded.at_ms >= RECORD_INTERVAL_MS)
}

/// A 64-bit mix of the op's identity and attempt, for [`backoff`]'s jitter.
pub fn jitter_seed(gid: &str, branch_id: &str, attempts: u32) -> u64 {
    // FNV-1a: stable across processes and versions (std's hasher is not
    // guaranteed to be).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in gid
        .bytes()
        .chain([0])
        .chain(branch_id.bytes())
        .chain(attempts.to_le_bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        initial_interval_ms: 100,
        max_interval_ms: 2_000,
        max_attempts: 10,
    };

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitters_within_half() {
        assert_eq!(
            backoff(POLICY, 0, 7),
            Duration::ZERO,
            "first attempt at once"
        );
        for (attempts, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (5, 1_600),
            (6, 2_000),
            (40, 2_000),
        ] {
            for seed in [0, 1, 99, u64::MAX] {
                let wait = backoff(POLICY, attempts, seed).as_millis() as u64;
                // ms, rounded down: allow the one lost below full / 2.
                assert!(
                    wait <= full && wait + 1 >= full - full / 2,
                    "attempt {attempts}, seed {seed}: {wait} ms not in [{}, {full}]",
                    full - full / 2
                );
            }
        }
        assert_eq!(
            backoff(POLICY, 3, 5),
            backoff(POLICY, 3, 5),
            "deterministic"
        );
        let spread: std::collections::BTreeSet<_> =
            (0..64).map(|seed| backoff(POLICY, 5, seed)).collect();
        assert!(spread.len() > 16, "the jitter spreads retries: {spread:?}");
    }

    #[test]
    fn failures_are_recorded_sparsely_but_never_lose_a_decision() {
        let at = |attempts, refused, at_ms| Recorded {
            attempts,
            refused,
            at_ms,
        };
        // The first failure, always.
        assert!(should_record(at(0, false, 0), 1, false, None, 0));
        // Powers of two, not the attempts between.
        assert!(should_record(at(1, false, 0), 2, false, None, 1));
        assert!(!should_record(at(2, false, 0), 3, false, None, 1));
        assert!(should_record(at(2, false, 0), 4, false, None, 1));
        assert!(!should_record(at(64, false, 0), 100, false, None, 1));
        // A refusal is news; so is reaching the phase-one limit.
        assert!(should_record(at(5, false, 0), 6, true, None, 1));
        assert!(should_record(at(8, false, 0), 10, false, Some(10), 1));
        // And time: at least every RECORD_INTERVAL_MS.
        assert!(should_record(
            at(64, false, 0),
            100,
            false,
            None,
            RECORD_INTERVAL_MS
        ));
        // Never a step back.
        assert!(!should_record(
            at(8, false, 0),
            8,
            true,
            Some(1),
            RECORD_INTERVAL_MS
        ));

        // Over an hour of failures every 2 s, a handful of entries.
        let (mut recorded, mut entries) = (Recorded::default(), 0);
        for attempts in 1..=1_800u32 {
            let now = i64::from(attempts) * 2_000;
            if should_record(recorded, attempts, false, None, now) {
                entries += 1;
                recorded = at(attempts, false, now);
            }
        }
        assert!(entries <= 135, "{entries} entries for 1,800 attempts");
    }
}
