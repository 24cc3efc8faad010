//! Domain types ↔ `tandem.v1` wire types.

use tandem_proto::v1 as pb;

use crate::model::types::{
    Branch, BranchOp, Decision, OpState, Outcome, Protocol, Repair, RetryPolicy, Transaction,
    TxOptions, TxState,
};

pub fn protocol_to_pb(p: Protocol) -> pb::Protocol {
    match p {
        Protocol::Saga => pb::Protocol::Saga,
        Protocol::Tcc => pb::Protocol::Tcc,
        Protocol::Xa => pb::Protocol::Xa,
        Protocol::TwoPc => pb::Protocol::TwoPc,
        Protocol::ThreePc => pb::Protocol::ThreePc,
        Protocol::Msg => pb::Protocol::Msg,
    }
}

/// `None` for "unspecified"; `Err` for a number no protocol has.
pub fn protocol_from_pb(value: i32) -> Result<Option<Protocol>, String> {
    match pb::Protocol::try_from(value) {
        Ok(pb::Protocol::Unspecified) => Ok(None),
        Ok(pb::Protocol::Saga) => Ok(Some(Protocol::Saga)),
        Ok(pb::Protocol::Tcc) => Ok(Some(Protocol::Tcc)),
        Ok(pb::Protocol::Xa) => Ok(Some(Protocol::Xa)),
        Ok(pb::Protocol::TwoPc) => Ok(Some(Protocol::TwoPc)),
        Ok(pb::Protocol::ThreePc) => Ok(Some(Protocol::ThreePc)),
        Ok(pb::Protocol::Msg) => Ok(Some(Protocol::Msg)),
        Err(_) => Err(format!(
            "unknown protocol {value}; expected one of {}",
            Protocol::names()
        )),
    }
}

pub fn state_to_pb(s: TxState) -> pb::TxState {
    match s {
        TxState::Active => pb::TxState::Active,
        TxState::Preparing => pb::TxState::Preparing,
        TxState::PreCommitting => pb::TxState::PreCommitting,
        TxState::Committing => pb::TxState::Committing,
        TxState::Aborting => pb::TxState::Aborting,
        TxState::Committed => pb::TxState::Committed,
        TxState::Aborted => pb::TxState::Aborted,
    }
}

pub fn state_from_pb(value: i32) -> Result<Option<TxState>, String> {
    match pb::TxState::try_from(value) {
        Ok(pb::TxState::Unspecified) => Ok(None),
        Ok(pb::TxState::Active) => Ok(Some(TxState::Active)),
        Ok(pb::TxState::Preparing) => Ok(Some(TxState::Preparing)),
        Ok(pb::TxState::PreCommitting) => Ok(Some(TxState::PreCommitting)),
        Ok(pb::TxState::Committing) => Ok(Some(TxState::Committing)),
        Ok(pb::TxState::Aborting) => Ok(Some(TxState::Aborting)),
        Ok(pb::TxState::Committed) => Ok(Some(TxState::Committed)),
        Ok(pb::TxState::Aborted) => Ok(Some(TxState::Aborted)),
        Err(_) => Err(format!("unknown transaction state {value}")),
    }
}

fn op_state_to_pb(s: OpState) -> pb::OpState {
    match s {
        OpState::Pending => pb::OpState::Pending,
        OpState::Succeeded => pb::OpState::Succeeded,
        OpState::Failed => pb::OpState::Failed,
        OpState::Skipped => pb::OpState::Skipped,
        OpState::Refused => pb::OpState::Refused,
        OpState::Resolved => pb::OpState::Resolved,
    }
}

fn outcome_to_pb(o: Outcome) -> pb::Outcome {
    match o {
        Outcome::Commit => pb::Outcome::Commit,
        Outcome::Abort => pb::Outcome::Abort,
    }
}

fn retry_to_pb(r: &RetryPolicy) -> pb::RetryPolicy {
    pb::RetryPolicy {
        initial_interval_ms: r.initial_interval_ms,
        max_interval_ms: r.max_interval_ms,
        max_attempts: r.max_attempts,
    }
}

fn options_to_pb(o: &TxOptions) -> pb::TxOptions {
    pb::TxOptions {
        timeout_ms: o.timeout_ms,
        retry: Some(retry_to_pb(&o.retry)),
        branch_timeout_ms: o.branch_timeout_ms,
        concurrency: o.concurrency,
    }
}

fn decision_to_pb(d: &Decision) -> pb::Decision {
    pb::Decision {
        outcome: outcome_to_pb(d.outcome) as i32,
        term: d.term,
        index: d.index,
        decided_at_ms: d.decided_at_ms,
        reason: d.reason.clone(),
    }
}

fn op_to_pb(o: &BranchOp) -> pb::BranchOp {
    pb::BranchOp {
        op: o.op.name().to_string(),
        endpoint: o.endpoint.clone(),
        state: op_state_to_pb(o.state) as i32,
        attempts: o.attempts,
        last_error: o.last_error.clone(),
        updated_at_ms: o.updated_at_ms,
    }
}

fn branch_to_pb(b: &Branch) -> pb::Branch {
    pb::Branch {
        branch_id: b.branch_id.clone(),
        ops: b.ops.iter().map(op_to_pb).collect(),
        payload: b.payload.to_vec(),
        after: b.after.clone(),
        retry: b.retry.as_ref().map(retry_to_pb),
    }
}

pub fn tx_to_pb(tx: &Transaction) -> pb::Transaction {
    pb::Transaction {
        gid: tx.gid.clone(),
        protocol: protocol_to_pb(tx.protocol) as i32,
        state: state_to_pb(tx.state) as i32,
        created_at_ms: tx.created_at_ms,
        updated_at_ms: tx.updated_at_ms,
        deadline_ms: tx.deadline_ms,
        finished_at_ms: tx.finished_at_ms.unwrap_or(0),
        options: Some(options_to_pb(&tx.options)),
        branches: tx.branches.iter().map(|b| branch_to_pb(b)).collect(),
        payload: tx.payload.to_vec(),
        error: tx.error.clone(),
        decision: tx.decision.as_ref().map(decision_to_pb),
        heuristic_hazard: tx
            .branches
            .iter()
            .flat_map(|b| &b.ops)
            .any(|o| o.state == OpState::Refused),
        heuristic: tx.is_heuristic(),
        stuck: crate::state::machine::is_stuck(tx),
        repairs: tx.repairs.iter().map(repair_to_pb).collect(),
    }
}

fn repair_to_pb(r: &Repair) -> pb::Repair {
    pb::Repair {
        action: r.action.name().to_string(),
        branch_id: r.branch_id.clone(),
        reason: r.reason.clone(),
        by: r.by.clone(),
        at_ms: r.at_ms,
        index: r.index,
    }
}
