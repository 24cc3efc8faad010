//! Bugs put in on purpose, so that the simulation's checker shows it can
//! fail (`tests/simulation.rs`). Compiled only with the `injected-bug`
//! feature, never into a real build. One build holds every bug; at most one
//! is on in a process, chosen once: by [`select`] (a test, first thing), else
//! by `TANDEM_INJECT_BUG=<name>` in the environment, else by an
//! `inject-bug-<name>` feature. One build instead of one per bug: CI built
//! the simulation five times before (about 25 s each).

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// 2PC commits on the first yes (`protocol/two_pc.rs`).
    CommitOnFirstVote,
    /// The leader applies and answers before an entry commits (the loop's
    /// `propose`).
    ApplyBeforeCommit,
    /// A node answers Get from its own state without a read index.
    StaleRead,
    /// A message is delivered at its timeout instead of asking the
    /// check-back (`protocol/msg.rs`).
    DeliverOnTimeout,
    /// The Raft loop sends its acknowledgements and votes before its log
    /// write is durable.
    AckBeforeDurable,
}

impl Bug {
    pub const ALL: [Bug; 5] = [
        Bug::CommitOnFirstVote,
        Bug::ApplyBeforeCommit,
        Bug::StaleRead,
        Bug::DeliverOnTimeout,
        Bug::AckBeforeDurable,
    ];

    /// As in the feature's name after `inject-bug-`.
    pub fn name(self) -> &'static str {
        match self {
            Bug::CommitOnFirstVote => "commit-on-first-vote",
            Bug::ApplyBeforeCommit => "apply-before-commit",
            Bug::StaleRead => "stale-read",
            Bug::DeliverOnTimeout => "deliver-on-timeout",
            Bug::AckBeforeDurable => "ack-before-durable",
        }
    }
}

static ON: OnceLock<Option<Bug>> = OnceLock::new();

/// Turns `bug` on for this process. Panics if another was chosen already.
pub fn select(bug: Bug) {
    let on = *ON.get_or_init(|| Some(bug));
    assert_eq!(on, Some(bug), "one injected bug per process");
}

/// Whether `bug` is the one on.
pub fn on(bug: Bug) -> bool {
    *ON.get_or_init(chosen) == Some(bug)
}

fn chosen() -> Option<Bug> {
    if let Ok(name) = std::env::var("TANDEM_INJECT_BUG") {
        let bug = Bug::ALL.into_iter().find(|b| b.name() == name);
        assert!(bug.is_some(), "TANDEM_INJECT_BUG={name}: no such bug");
        return bug;
    }
    let features = [
        cfg!(feature = "inject-bug-commit-on-first-vote"),
        cfg!(feature = "inject-bug-apply-before-commit"),
        cfg!(feature = "inject-bug-stale-read"),
        cfg!(feature = "inject-bug-deliver-on-timeout"),
        cfg!(feature = "inject-bug-ack-before-durable"),
    ];
    Bug::ALL
        .into_iter()
        .zip(features)
        .find_map(|(bug, on)| on.then_some(bug))
}
