//! Text and JSON renderings of API answers for the CLI.

use serde_json::{Value, json};
use tandem_coordinator::clock::ago;
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
        Ok(pb::TxState::PreCommitting) => "pre_committing",
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
        Ok(pb::OpState::Resolved) => "resolved",
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
        "heuristic": tx.heuristic,
        "repairs": tx.repairs.iter().map(|r| json!({
            "action": r.action,
            "branch_id": r.branch_id,
            "reason": r.reason,
            "by": r.by,
            "at_ms": r.at_ms,
            "index": r.index,
        })).collect::<Vec<_>>(),
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

/// An instant as RFC 3339 and how long ago (or ahead) it is: "2026-12-03T17:05:20.123Z (3s ago)".
pub fn when(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    format!(
        "{} ({})",
        tandem_coordinator::http::types::rfc3339(ms),
        ago(ms)
    )
}

/// One line per change, for `tx watch`.
pub fn watch_line(tx: &pb::Transaction) -> String {
    let ops: Vec<String> = tx
        .branches
        .iter()
        .flat_map(|b| {
            b.ops
                .iter()
                .filter(|o| o.state != pb::OpState::Pending as i32 || o.attempts > 0)
                .map(move |o| {
                    let tries = if o.attempts > 0 {
                        format!(" x{}", o.attempts)
                    } else {
                        String::new()
                    };
                    format!("{}/{}={}{tries}", b.branch_id, o.op, op_state_name(o.state))
                })
        })
        .collect();
    format!(
        "{}  {} {:<10} {}{}\n",
        tandem_coordinator::http::types::rfc3339(tandem_coordinator::clock::now_ms()),
        tx.gid,
        state_name(tx.state),
        ops.join(" "),
        if tx.heuristic { "  HEURISTIC" } else { "" }
    )
}

pub fn tx_text(tx: &pb::Transaction) -> String {
    let mut out = format!(
        "gid       {}\nprotocol  {}\nstate     {}\ncreated   {}\nupdated   {}\n",
        tx.gid,
        protocol_name(tx.protocol),
        state_name(tx.state),
        when(tx.created_at_ms),
        when(tx.updated_at_ms),
    );
    if tx.decision.is_none() {
        out += &format!("deadline  {}\n", when(tx.deadline_ms));
    }
    if tx.finished_at_ms != 0 {
        out += &format!("finished  {}\n", when(tx.finished_at_ms));
    }
    if let Some(d) = &tx.decision {
        out += &format!(
            "decision  {} at term {} index {}, {} ({})\n",
            outcome_name(d.outcome),
            d.term,
            d.index,
            ago(d.decided_at_ms),
            d.reason
        );
    }
    if !tx.error.is_empty() {
        out += &format!("error     {}\n", tx.error);
    }
    if tx.heuristic_hazard {
        out += "HAZARD    a branch refused phase two after voting yes; retrying — look at the participant\n";
    }
    if tx.heuristic {
        out += "HEURISTIC an operator resolved phase two by hand: not every participant acknowledged the outcome\n";
    }
    let mut table = table([
        "BRANCH",
        "OP",
        "STATE",
        "ATTEMPTS",
        "UPDATED",
        "ENDPOINT",
        "LAST ERROR",
    ]);
    for b in &tx.branches {
        for o in &b.ops {
            table.add_row(vec![
                b.branch_id.clone(),
                o.op.clone(),
                op_state_name(o.state).to_string(),
                o.attempts.to_string(),
                if o.updated_at_ms > 0 {
                    ago(o.updated_at_ms)
                } else {
                    "-".into()
                },
                o.endpoint.clone(),
                o.last_error.clone(),
            ]);
        }
    }
    if !tx.branches.is_empty() {
        out += &format!("{table}\n");
    }
    for r in &tx.repairs {
        out += &format!(
            "repair    {} {} by {} {} (entry {}): {}\n",
            r.action,
            if r.branch_id.is_empty() {
                "(every branch)"
            } else {
                &r.branch_id
            },
            r.by,
            ago(r.at_ms),
            r.index,
            r.reason
        );
    }
    out
}

/// A table without outer decoration, columns as wide as their content.
fn table<const N: usize>(header: [&str; N]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.to_vec());
    table
}

pub fn list_json(page: &pb::ListResponse) -> String {
    json!({
        "transactions": page.transactions.iter().map(tx_value).collect::<Vec<_>>(),
        "next_page_token": (!page.next_page_token.is_empty()).then_some(&page.next_page_token),
    })
    .to_string()
}

pub fn list_text(page: &pb::ListResponse) -> String {
    let mut table = table(["GID", "PROTOCOL", "STATE", "CREATED", "UPDATED", "NOTE"]);
    for tx in &page.transactions {
        let note = if tx.heuristic {
            "HEURISTIC"
        } else if tx.heuristic_hazard {
            "HAZARD"
        } else {
            ""
        };
        table.add_row(vec![
            tx.gid.clone(),
            protocol_name(tx.protocol).to_string(),
            state_name(tx.state).to_string(),
            ago(tx.created_at_ms),
            ago(tx.updated_at_ms),
            note.to_string(),
        ]);
    }
    let mut out = if page.transactions.is_empty() {
        "(no transactions)\n".to_string()
    } else {
        format!("{table}\n")
    };
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
    let mut table = table([
        "ID", "ADDRESS", "ROLE", "TERM", "COMMIT", "APPLIED", "ERROR",
    ]);
    for n in &status.nodes {
        table.add_row(vec![
            n.id.to_string(),
            n.address.clone(),
            n.role.clone(),
            n.term.to_string(),
            n.commit.to_string(),
            n.applied.to_string(),
            n.error.clone(),
        ]);
    }
    format!(
        "cluster {cluster_id}\nleader {}\n{table}\n",
        status.leader_id
    )
}
