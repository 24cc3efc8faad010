//! Text and JSON renderings of API answers for the CLI.

use serde_json::{Value, json};
use tandem_sdk::proto as pb;

fn protocol_name(value: i32) -> &'static str {
    match pb::Protocol::try_from(value) {
        Ok(pb::Protocol::Unspecified) | Err(_) => "unspecified",
        Ok(protocol) => tandem_proto::wire::protocols::name(protocol),
    }
}

fn state_name(value: i32) -> &'static str {
    match pb::TxState::try_from(value) {
        Ok(pb::TxState::Active) => "active",
        Ok(pb::TxState::Preparing) => "preparing",
        Ok(pb::TxState::Committing) => "committing",
        Ok(pb::TxState::Aborting) => "aborting",
        Ok(pb::TxState::Committed) => "committed",
        Ok(pb::TxState::Aborted) => "aborted",
        _ => "unspecified",
    }
}

fn op_state_name(value: i32) -> &'static str {
    match pb::OpState::try_from(value) {
        Ok(pb::OpState::Pending) => "pending",
        Ok(pb::OpState::Succeeded) => "succeeded",
        Ok(pb::OpState::Failed) => "failed",
        Ok(pb::OpState::Skipped) => "skipped",
        Ok(pb::OpState::Refused) => "refused",
        _ => "unspecified",
    }
}

fn outcome_name(value: i32) -> &'static str {
    match pb::Outcome::try_from(value) {
        Ok(pb::Outcome::Commit) => "commit",
        Ok(pb::Outcome::Abort) => "abort",
        _ => "unspecified",
    }
}

pub fn tx_value(tx: &pb::Transaction) -> Value {
    let options = tx.options.unwrap_or_default();
    let retry = options.retry.unwrap_or_default();
    json!({
        "gid": tx.gid,
        "protocol": protocol_name(tx.protocol),
        "state": state_name(tx.state),
        "created_at_ms": tx.created_at_ms,
        "updated_at_ms": tx.updated_at_ms,
        "deadline_ms": tx.deadline_ms,
        "finished_at_ms": (tx.finished_at_ms != 0).then_some(tx.finished_at_ms),
        "options": {
            "timeout_ms": options.timeout_ms,
            "branch_timeout_ms": options.branch_timeout_ms,
            "retry": {
                "initial_interval_ms": retry.initial_interval_ms,
                "max_interval_ms": retry.max_interval_ms,
                "max_attempts": retry.max_attempts,
            },
        },
        "payload": String::from_utf8_lossy(&tx.payload),
        "error": tx.error,
        "heuristic_hazard": tx.heuristic_hazard,
        "decision": tx.decision.as_ref().map(|d| json!({
            "outcome": outcome_name(d.outcome),
            "term": d.term,
            "index": d.index,
            "decided_at_ms": d.decided_at_ms,
            "reason": d.reason,
        })),
        "branches": tx.branches.iter().map(|b| json!({
            "branch_id": b.branch_id,
            "after": b.after,
            "ops": b.ops.iter().map(|o| json!({
                "op": o.op,
                "endpoint": o.endpoint,
                "state": op_state_name(o.state),
                "attempts": o.attempts,
                "last_error": o.last_error,
                "updated_at_ms": o.updated_at_ms,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

pub fn tx_json(tx: &pb::Transaction) -> String {
    tx_value(tx).to_string()
}

pub fn tx_text(tx: &pb::Transaction) -> String {
    let mut out = format!(
        "gid       {}\nprotocol  {}\nstate     {}\ncreated   {}\ndeadline  {}\n",
        tx.gid,
        protocol_name(tx.protocol),
        state_name(tx.state),
        tx.created_at_ms,
        tx.deadline_ms
    );
    if let Some(d) = &tx.decision {
        out += &format!(
            "decision  {} at term {} index {} ({})\n",
            outcome_name(d.outcome),
            d.term,
            d.index,
            d.reason
        );
    }
    if !tx.error.is_empty() {
        out += &format!("error     {}\n", tx.error);
    }
    if tx.heuristic_hazard {
        out += "HAZARD    a branch refused phase two after voting yes; retrying — look at the participant\n";
    }
    for b in &tx.branches {
        out += &format!("branch    {}\n", b.branch_id);
        for o in &b.ops {
            out += &format!(
                "  {:<10} {:<9} attempts {:<3} {} {}\n",
                o.op,
                op_state_name(o.state),
                o.attempts,
                o.endpoint,
                o.last_error
            );
        }
    }
    out
}

pub fn list_json(page: &pb::ListResponse) -> String {
    json!({
        "transactions": page.transactions.iter().map(tx_value).collect::<Vec<_>>(),
        "next_page_token": (!page.next_page_token.is_empty()).then_some(&page.next_page_token),
    })
    .to_string()
}

pub fn list_text(page: &pb::ListResponse) -> String {
    let mut out = String::new();
    for tx in &page.transactions {
        out += &format!(
            "{}  {:<5} {}\n",
            tx.gid,
            protocol_name(tx.protocol),
            state_name(tx.state)
        );
    }
    if !page.next_page_token.is_empty() {
        out += &format!("(more: --page-token {})\n", page.next_page_token);
    }
    out
}

pub fn cluster_json(status: &pb::ClusterStatusResponse) -> String {
    json!({
        "cluster_id": status.cluster_id,
        "leader": status.leader_id,
        "voters": status.voters,
        "learners": status.learners,
        "nodes": status.nodes.iter().map(|n| {
            let mut v = json!({
                "id": n.id,
                "address": n.address,
                "role": n.role,
                "term": n.term,
                "commit": n.commit,
                "applied": n.applied,
            });
            if !n.error.is_empty() {
                v["error"] = json!(n.error);
            }
            v
        }).collect::<Vec<_>>(),
    })
    .to_string()
}

pub fn cluster_table(status: &pb::ClusterStatusResponse) -> String {
    let cluster_id = if status.cluster_id.is_empty() {
        "(not minted yet)"
    } else {
        status.cluster_id.as_str()
    };
    let mut out = format!(
        "cluster {cluster_id}\nleader {}\n{:<4} {:<22} {:<13} {:>6} {:>10} {:>10}\n",
        status.leader_id, "ID", "ADDRESS", "ROLE", "TERM", "COMMIT", "APPLIED"
    );
    for n in &status.nodes {
        out += &format!(
            "{:<4} {:<22} {:<13} {:>6} {:>10} {:>10}{}\n",
            n.id,
            n.address,
            n.role,
            n.term,
            n.commit,
            n.applied,
            if n.error.is_empty() {
                String::new()
            } else {
                format!("  ({})", n.error)
            }
        );
    }
    out
}
