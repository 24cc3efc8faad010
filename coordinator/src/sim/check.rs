//! The independent checker: DESIGN.md §4 judged from what the participants
//! recorded, what the cluster acknowledged to clients, and the entries
//! replicas applied — the coordinator's own view is used only to know what
//! it claims to have decided.

use std::collections::BTreeMap;

use super::World;
use super::participant::BranchRecord;
use crate::model::types::{Outcome, Protocol, TxState};

pub(crate) fn check(world: &World) -> Vec<String> {
    let mut v = Vec::new();
    // Every branch's record, gathered per gid from every participant.
    let mut by_gid: BTreeMap<&str, Vec<(&str, &BranchRecord)>> = BTreeMap::new();
    for part in &world.parts {
        for ((gid, branch_id), rec) in &part.branches {
            by_gid.entry(gid).or_default().push((branch_id, rec));
            for what in &rec.violations {
                v.push(format!("{gid}/{branch_id}: {what}"));
            }
        }
    }
    // Only the members the last membership change left are held to every
    // rule: a removed node stops hearing from the cluster.
    // Every one of them is up by now (the faults healed).
    let mut up = Vec::new();
    for node in world.members() {
        match node.sm() {
            Some(sm) => up.push((node, sm)),
            None => v.push(format!("node {} is down at the end of the run", node.id)),
        }
    }
    let Some(&(_, final_sm)) = up.first() else {
        v.push("no member of the cluster is up".into());
        return v;
    };

    // A producer's outbox markers: did a message's local transaction commit?
    let mut markers: BTreeMap<&str, bool> = BTreeMap::new();
    for part in &world.parts {
        for (gid, committed) in &part.markers {
            markers.insert(gid, *committed);
        }
    }

    for (gid, recs) in &by_gid {
        let tx = final_sm.get(gid);
        let tx = tx.as_ref();
        let saga = tx.is_some_and(|t| t.protocol == Protocol::Saga);
        let msg = tx.is_some_and(|t| t.protocol == Protocol::Msg);
        // Messages: delivered only if the local transaction committed.
        if msg && markers.get(gid) != Some(&true) {
            for (b, rec) in recs {
                if let Some(at) = rec.committed_at {
                    v.push(format!(
                        "messages: {gid}/{b} delivered at {at}, but its local transaction did not commit ({:?})",
                        markers.get(gid)
                    ));
                }
            }
        }
        // Fencing: no forward op took effect after its branch was undone.
        for (b, rec) in recs {
            if let (Some(f), Some(u)) = (rec.forward_at, rec.undone_at)
                && f > u
            {
                v.push(format!(
                    "fencing: {gid}/{b}: forward op took effect at {f}, after its undo at {u}"
                ));
            }
        }
        // Atomicity: never one branch committed and another undone.
        if !saga && !msg {
            let committed = recs.iter().find(|(_, r)| r.committed_at.is_some());
            let undone = recs.iter().find(|(_, r)| r.undone_at.is_some());
            if let (Some((c, _)), Some((u, _))) = (committed, undone) {
                v.push(format!(
                    "atomicity: {gid}: branch {c} committed and branch {u} undone"
                ));
            }
        }
        // Commit only once every branch went forward (prepared, tried,
        // pre-committed): no branch commits before the last one is ready.
        if !saga
            && !msg
            && let Some(first_commit) = recs.iter().filter_map(|(_, r)| r.committed_at).min()
        {
            for (b, rec) in recs {
                if rec.forward_at.is_none_or(|f| f > first_commit) {
                    v.push(format!(
                        "atomicity: {gid}: a branch committed at {first_commit} before branch {b} was ready ({:?})",
                        rec.forward_at
                    ));
                }
            }
        }
        // Commit point first: every phase-two call names an entry that was
        // committed before the call arrived — the transaction's decision.
        let decision = tx.and_then(|t| t.decision.as_ref());
        for (b, rec) in recs {
            for (at, op, fence) in &rec.phase_two {
                match world.committed.get(&fence.index) {
                    Some((term, when)) if *term == fence.term && when <= at => {}
                    other => v.push(format!(
                        "commit point first: {gid}/{b}: {op} at {at} carries entry ({}, {}), committed {other:?}",
                        fence.term, fence.index
                    )),
                }
                if let Some(d) = decision
                    && (d.term, d.index) != (fence.term, fence.index)
                {
                    v.push(format!(
                        "commit point first: {gid}/{b}: {op} carries ({}, {}), the decision is ({}, {})",
                        fence.term, fence.index, d.term, d.index
                    ));
                }
            }
        }
    }

    // What the coordinator decided, against what the participants did.
    for &(node, sm) in &up {
        for gid in sm.active_gids() {
            let tx = sm.get(gid).expect("active");
            let ops: Vec<String> = tx
                .branches
                .iter()
                .flat_map(|b| {
                    b.ops.iter().map(move |o| {
                        format!("{}.{}={:?}x{}", b.branch_id, o.op, o.state, o.attempts)
                    })
                })
                .collect();
            v.push(format!(
                "no blocking: node {} still has {gid} ({}, {:?}, decided {:?}, deadline {}) unfinished: {}",
                node.id,
                tx.protocol,
                tx.state,
                tx.decision.as_ref().map(|d| d.outcome),
                tx.deadline_ms - super::EPOCH_MS,
                ops.join(" ")
            ));
        }
    }
    for client in &world.clients {
        let Some(tx) = final_sm.get(&client.gid) else {
            continue;
        };
        let gid = client.gid.as_str();
        let recs = by_gid.get(gid).map(Vec::as_slice).unwrap_or_default();
        let rec = |b: &str| recs.iter().find(|(id, _)| *id == b).map(|(_, r)| *r);
        let outcome = tx.decision.as_ref().map(|d| d.outcome);
        if tx.protocol == Protocol::Msg {
            // Delivered if the local transaction committed: the message
            // may not end dropped.
            let committed = markers.get(gid) == Some(&true);
            if committed && tx.state == TxState::Aborted {
                v.push(format!(
                    "messages: {gid}'s local transaction committed, and the message was dropped"
                ));
            }
        }
        for branch in &tx.branches {
            let b = branch.branch_id.as_str();
            if tx.protocol == Protocol::Msg && b == crate::protocol::msg::CHECK_BACK {
                continue;
            }
            let r = rec(b);
            let wrong = match (tx.protocol, tx.state, outcome) {
                (Protocol::Saga, TxState::Committed, _) => r
                    .is_none_or(|r| r.forward_at.is_none() || r.undone_at.is_some())
                    .then(|| {
                        format!("saga: {gid} committed but step {b} did not run exactly forward")
                    }),
                (Protocol::Saga, TxState::Aborted, _) => r
                    .is_some_and(|r| r.forward_at.is_some() && r.undone_at.is_none())
                    .then(|| {
                        format!("saga: {gid} compensated but step {b}'s action was not undone")
                    }),
                (_, TxState::Committed, Some(Outcome::Commit)) => r
                    .is_none_or(|r| r.committed_at.is_none())
                    .then(|| format!("atomicity: {gid} committed but branch {b} did not commit")),
                (_, TxState::Aborted, _) => r
                    .is_some_and(|r| r.committed_at.is_some())
                    .then(|| format!("atomicity: {gid} aborted but branch {b} committed")),
                _ => None,
            };
            v.extend(wrong);
        }
    }

    // Durability: everything acknowledged is there, on every node, and no
    // acknowledged decision was reversed.
    for ack in &world.acks {
        for &(node, sm) in &up {
            match sm.get(&ack.gid) {
                None => v.push(format!(
                    "durability: {} of {} was acknowledged; node {} does not have the transaction",
                    ack.command, ack.gid, node.id
                )),
                Some(tx) => {
                    let acked = ack
                        .tx
                        .decision
                        .as_ref()
                        .map(|d| (d.outcome, d.term, d.index));
                    let now = tx.decision.as_ref().map(|d| (d.outcome, d.term, d.index));
                    if acked.is_some() && acked != now {
                        v.push(format!(
                            "durability: {} of {} acknowledged the decision {acked:?}; node {} has {now:?}",
                            ack.command, ack.gid, node.id
                        ));
                    }
                }
            }
        }
    }

    linearizable(world, &mut v);

    // Replicas identical once healed.
    let encoded: Vec<(u64, u64, Vec<u8>)> = up
        .iter()
        .map(|(n, sm)| (n.id, n.applied(), sm.snapshot_source().encode()))
        .collect();
    for (id, applied, bytes) in &encoded[1..] {
        let (id0, applied0, bytes0) = &encoded[0];
        if applied != applied0 {
            v.push(format!(
                "replicas: node {id} applied {applied}, node {id0} {applied0}"
            ));
        } else if bytes != bytes0 {
            v.push(format!(
                "replicas: nodes {id} and {id0} applied the same {applied} entries and differ"
            ));
        }
    }
    v
}

/// Linearizability of every transaction's history of Begin, Register,
/// Commit, Abort, SubmitSaga and Get, from what callers were told and when.
/// A transaction's changes are totally ordered by the log, and every
/// version is the log index of the change that made it, so a history is
/// linearizable exactly when (a) an operation that started after another
/// had returned never shows an older version, (b) one version always shows
/// one content, and (c) every version shown is an entry that was committed.
/// (Operations on different transactions are independent: linearizability
/// is local, so one transaction at a time is enough.)
fn linearizable(world: &World, v: &mut Vec<String>) {
    let mut by_gid: BTreeMap<&str, Vec<&super::Observed>> = BTreeMap::new();
    for o in &world.observed {
        by_gid.entry(&o.gid).or_default().push(o);
    }
    for (gid, mut ops) in by_gid {
        let mut content: BTreeMap<u64, (u64, &str, i64)> = BTreeMap::new();
        for o in &ops {
            if o.version > 0 && !world.committed.contains_key(&o.version) {
                v.push(format!(
                    "linearizability: {gid}: {} answered at {} showed version {}, an entry never committed",
                    o.what, o.returned_ms, o.version
                ));
            }
            match content.get(&o.version) {
                Some((d, what, at)) if *d != o.digest => v.push(format!(
                    "linearizability: {gid}: version {} differs between {what} at {at} and {} at {}",
                    o.version, o.what, o.returned_ms
                )),
                Some(_) => {}
                None => {
                    content.insert(o.version, (o.digest, o.what, o.returned_ms));
                }
            }
        }
        // Sweep by invocation; `done` holds every op that returned before
        // the current one was invoked, and its newest version.
        let mut by_return = ops.clone();
        by_return.sort_by_key(|o| o.returned_ms);
        ops.sort_by_key(|o| o.invoked_ms);
        let mut newest: Option<&super::Observed> = None;
        let mut returned = by_return.iter().peekable();
        for o in ops {
            while let Some(r) = returned.next_if(|r| r.returned_ms < o.invoked_ms) {
                if newest.is_none_or(|n| r.version > n.version) {
                    newest = Some(r);
                }
            }
            if let Some(n) = newest
                && n.version > o.version
            {
                v.push(format!(
                    "linearizability: {gid}: {} invoked at {} showed version {}, but {} had returned version {} at {}",
                    o.what, o.invoked_ms, o.version, n.what, n.version, n.returned_ms
                ));
            }
        }
    }
}
