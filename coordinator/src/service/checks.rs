//! Input checks of the client operations, pure: an input and the limits in,
//! the command to propose — or one clear error naming the gid — out. The
//! operations in `transactions.rs` run these before anything else, so bad
//! input never reaches the log; the fuzz targets (`fuzz/`) run them alone
//! and hold `apply` to accept whatever they let through.

use super::transactions::{
    BeginInput, MessageInput, OptionsInput, RegisterInput, RetryInput, SagaInput,
};
use super::{Result, ServiceError, invalid};
use crate::config::Limits;
use crate::model::command::{BranchSpec, SagaStepSpec};
use crate::model::{Command, Op, Protocol, RetryPolicy, TxOptions, validate};
use crate::protocol;

/// A new transaction's command, and what it will take in memory (for the
/// admission check against the unfinished transactions' budget).
#[derive(Debug)]
pub struct Proposal {
    pub command: Command,
    pub footprint_bytes: usize,
}

impl Proposal {
    pub fn gid(&self) -> &str {
        self.command.gid().unwrap_or_default()
    }
}

/// Begin: a valid gid, an implemented protocol, a payload and options
/// within their limits.
pub fn begin(limits: &Limits, input: BeginInput, now_ms: i64) -> Result<Proposal> {
    let gid = input.gid;
    validate::gid(&gid).map_err(|e| invalid(e.to_string()))?;
    let protocol = input.protocol.ok_or_else(|| {
        invalid(format!(
            "transaction {gid}: protocol is required (one of {})",
            Protocol::names()
        ))
    })?;
    if !protocol::is_implemented(protocol) {
        return Err(ServiceError::Unimplemented(format!(
            "transaction {gid}: protocol {protocol} is not implemented by this coordinator yet; use one of {}",
            implemented_protocol_names()
        )));
    }
    if protocol == Protocol::Msg {
        return Err(invalid(format!(
            "transaction {gid}: a message is prepared whole, with its destinations and check-back (PrepareMessage), not begun"
        )));
    }
    validate::payload(&gid, &input.payload, limits.payload_bytes_max)
        .map_err(|e| invalid(e.to_string()))?;
    let options = options(limits, &gid, input.options)?;
    let footprint_bytes = validate::tx_footprint(gid.len(), input.payload.len(), 0);
    within_tx_bytes(limits, &gid, footprint_bytes)?;
    Ok(Proposal {
        command: Command::Begin {
            gid,
            protocol,
            options,
            payload: input.payload,
            now_ms,
        },
        footprint_bytes,
    })
}

/// SubmitSaga: Begin's checks, each step's, and the steps as a whole (ids,
/// endpoints, `after` naming earlier steps, no cycle).
pub fn saga(limits: &Limits, input: SagaInput, now_ms: i64) -> Result<Proposal> {
    let gid = input.gid;
    validate::gid(&gid).map_err(|e| invalid(e.to_string()))?;
    validate::payload(&gid, &input.payload, limits.payload_bytes_max)
        .map_err(|e| invalid(e.to_string()))?;
    let options = options(limits, &gid, input.options)?;
    let mut steps: Vec<SagaStepSpec> = Vec::with_capacity(input.steps.len().min(1024));
    for step in input.steps {
        validate::payload(&gid, &step.payload, limits.payload_bytes_max)
            .map_err(|e| invalid(format!("{e} (step {})", step.branch_id)))?;
        if !input.concurrent && !step.after.is_empty() {
            return Err(invalid(format!(
                "transaction {gid}: step {} lists `after`, which only concurrent sagas may (set concurrent)",
                step.branch_id
            )));
        }
        let retry = match step.retry {
            Some(r) => Some(retry(
                limits,
                &gid,
                &format!("step {} retry", step.branch_id),
                Some(r),
                options.retry,
            )?),
            None => None,
        };
        let after = if input.concurrent {
            step.after
        } else {
            // Sequential: each step comes after the one before it.
            steps
                .last()
                .map(|prev| vec![prev.branch_id.clone()])
                .unwrap_or_default()
        };
        steps.push(SagaStepSpec {
            branch_id: step.branch_id,
            action: step.action,
            compensate: step.compensate,
            payload: step.payload,
            after,
            retry,
        });
    }
    protocol::saga::validate_steps(&gid, &steps).map_err(|e| invalid(e.to_string()))?;
    let branches_bytes = steps
        .iter()
        .map(|s| {
            let text = s.branch_id.len()
                + s.action.len()
                + s.compensate.len()
                + s.after.iter().map(String::len).sum::<usize>();
            validate::branch_footprint(text, s.payload.len())
        })
        .sum();
    let footprint_bytes = validate::tx_footprint(gid.len(), input.payload.len(), branches_bytes);
    within_tx_bytes(limits, &gid, footprint_bytes)?;
    Ok(Proposal {
        command: Command::SubmitSaga {
            gid,
            options,
            steps,
            payload: input.payload,
            now_ms,
        },
        footprint_bytes,
    })
}

/// PrepareMessage: Begin's checks, a check-back endpoint, and at least one
/// destination, each with a unique id, a supported scheme and a payload
/// within the limit.
pub fn message(limits: &Limits, input: MessageInput, now_ms: i64) -> Result<Proposal> {
    let gid = input.gid;
    validate::gid(&gid).map_err(|e| invalid(e.to_string()))?;
    validate::payload(&gid, &input.payload, limits.payload_bytes_max)
        .map_err(|e| invalid(e.to_string()))?;
    let options = options(limits, &gid, input.options)?;
    for d in &input.destinations {
        validate::payload(&gid, &d.payload, limits.payload_bytes_max)
            .map_err(|e| invalid(format!("{e} (destination {})", d.branch_id)))?;
    }
    protocol::msg::validate(&gid, &input.check_back, &input.destinations)
        .map_err(|e| invalid(e.to_string()))?;
    let branches_bytes: usize = input
        .destinations
        .iter()
        .map(|d| validate::branch_footprint(d.branch_id.len() + d.endpoint.len(), d.payload.len()))
        .sum::<usize>()
        + validate::branch_footprint(protocol::msg::CHECK_BACK.len() + input.check_back.len(), 0);
    let footprint_bytes = validate::tx_footprint(gid.len(), input.payload.len(), branches_bytes);
    within_tx_bytes(limits, &gid, footprint_bytes)?;
    Ok(Proposal {
        command: Command::PrepareMessage {
            gid,
            options,
            check_back: input.check_back,
            destinations: input.destinations,
            payload: input.payload,
            now_ms,
        },
        footprint_bytes,
    })
}

/// RegisterBranch: valid ids, known operations each named once, valid
/// endpoints, a branch that fits in a transaction.
pub fn register(limits: &Limits, input: RegisterInput, now_ms: i64) -> Result<Command> {
    let (gid, branch_id) = (input.gid, input.branch_id);
    validate::gid(&gid).map_err(|e| invalid(e.to_string()))?;
    validate::branch_id(&gid, &branch_id).map_err(|e| invalid(e.to_string()))?;
    validate::payload(&gid, &input.payload, limits.payload_bytes_max)
        .map_err(|e| invalid(e.to_string()))?;
    if input.ops.is_empty() {
        return Err(invalid(format!(
            "transaction {gid}: branch {branch_id} names no operations"
        )));
    }
    let mut ops: Vec<(Op, String)> = Vec::with_capacity(input.ops.len().min(Op::ALL.len()));
    for (name, endpoint) in input.ops {
        let op = Op::from_name(&name).ok_or_else(|| {
            invalid(format!(
                "transaction {gid}: branch {branch_id}: unknown operation {name:?}; expected one of {}",
                Op::ALL.map(|op| op.name()).join(", ")
            ))
        })?;
        validate::endpoint(&gid, &endpoint).map_err(|e| invalid(e.to_string()))?;
        if ops.iter().any(|(existing, _)| *existing == op) {
            return Err(invalid(format!(
                "transaction {gid}: branch {branch_id} names operation {op} twice"
            )));
        }
        ops.push((op, endpoint));
    }
    let text = branch_id.len() + ops.iter().map(|(_, e)| e.len()).sum::<usize>();
    let bytes = validate::branch_footprint(text, input.payload.len());
    if bytes > limits.tx_bytes_max {
        return Err(invalid(format!(
            "transaction {gid}: branch {branch_id} would take {bytes} bytes; the limit for a whole transaction is {} (--tx-bytes-max)",
            limits.tx_bytes_max
        )));
    }
    Ok(Command::RegisterBranch {
        gid,
        branch: BranchSpec {
            branch_id,
            ops,
            payload: input.payload,
        },
        now_ms,
    })
}

/// Abort: a valid gid and a reason within its limit.
pub fn abort(gid: &str, reason: &str) -> Result<()> {
    validate::gid(gid).map_err(|e| invalid(e.to_string()))?;
    if reason.len() > validate::REASON_BYTES_MAX {
        return Err(invalid(format!(
            "transaction {gid}: reason is {} bytes; the limit is {}",
            reason.len(),
            validate::REASON_BYTES_MAX
        )));
    }
    Ok(())
}

/// A repair's texts: a known gid shape, a branch id if one is named, and
/// reason and author within their limit; `reason_required` for a resolve
/// (a heuristic outcome must say why).
pub fn repair(
    gid: &str,
    branch_id: &str,
    reason: &str,
    by: &str,
    reason_required: bool,
) -> Result<()> {
    validate::gid(gid).map_err(|e| invalid(e.to_string()))?;
    if !branch_id.is_empty() {
        validate::branch_id(gid, branch_id).map_err(|e| invalid(e.to_string()))?;
    }
    if reason_required && reason.trim().is_empty() {
        return Err(invalid(format!(
            "transaction {gid}: a resolve needs a reason (why the participant can never acknowledge); it is kept in the audit record"
        )));
    }
    for (name, text) in [("reason", reason), ("by", by)] {
        if text.len() > validate::REPAIR_TEXT_BYTES_MAX {
            return Err(invalid(format!(
                "transaction {gid}: {name} is {} bytes; the limit is {}",
                text.len(),
                validate::REPAIR_TEXT_BYTES_MAX
            )));
        }
    }
    Ok(())
}

/// The protocols Begin accepts.
pub fn implemented_protocol_names() -> String {
    Protocol::ALL
        .into_iter()
        .filter(|p| protocol::is_implemented(*p))
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn within_tx_bytes(limits: &Limits, gid: &str, bytes: usize) -> Result<()> {
    if bytes > limits.tx_bytes_max {
        return Err(invalid(format!(
            "transaction {gid}: it would take {bytes} bytes (payloads, ids, endpoints and {} per branch); \
             the limit is {} (--tx-bytes-max)",
            validate::BRANCH_OVERHEAD_BYTES,
            limits.tx_bytes_max
        )));
    }
    Ok(())
}

fn over(gid: &str, what: &str, value: u32, max: u32) -> ServiceError {
    invalid(format!(
        "transaction {gid}: {what} {value} is over the limit {max}"
    ))
}

/// Fills in defaults and checks every option against its limit.
fn options(limits: &Limits, gid: &str, options: OptionsInput) -> Result<TxOptions> {
    let l = limits;
    let timeout_ms = match options.timeout_ms {
        0 => l.timeout_ms_default,
        v if v > l.timeout_ms_max => return Err(over(gid, "timeout_ms", v, l.timeout_ms_max)),
        v => v,
    };
    let branch_timeout_ms = match options.branch_timeout_ms {
        0 => l.branch_timeout_ms_default,
        v if v > l.branch_timeout_ms_max => {
            return Err(over(gid, "branch_timeout_ms", v, l.branch_timeout_ms_max));
        }
        v => v,
    };
    if options.concurrency as usize > validate::BRANCHES_HARD_MAX {
        return Err(over(
            gid,
            "concurrency",
            options.concurrency,
            validate::BRANCHES_HARD_MAX as u32,
        ));
    }
    Ok(TxOptions {
        timeout_ms,
        retry: retry(limits, gid, "retry", options.retry, l.retry_default)?,
        branch_timeout_ms,
        concurrency: options.concurrency,
    })
}

/// Fills a retry policy's zeros from `default` and checks its limits.
fn retry(
    limits: &Limits,
    gid: &str,
    what: &str,
    retry: Option<RetryInput>,
    default: RetryPolicy,
) -> Result<RetryPolicy> {
    let retry = retry.unwrap_or_default();
    let pick = |v: u32, default: u32| if v == 0 { default } else { v };
    let retry = RetryPolicy {
        initial_interval_ms: pick(retry.initial_interval_ms, default.initial_interval_ms),
        max_interval_ms: pick(retry.max_interval_ms, default.max_interval_ms),
        max_attempts: pick(retry.max_attempts, default.max_attempts),
    };
    if retry.max_interval_ms > limits.retry_interval_ms_max {
        return Err(over(
            gid,
            &format!("{what}.max_interval_ms"),
            retry.max_interval_ms,
            limits.retry_interval_ms_max,
        ));
    }
    if retry.initial_interval_ms > retry.max_interval_ms {
        return Err(invalid(format!(
            "transaction {gid}: {what}.initial_interval_ms {} is above {what}.max_interval_ms {}",
            retry.initial_interval_ms, retry.max_interval_ms
        )));
    }
    if retry.max_attempts > limits.retry_attempts_max {
        return Err(over(
            gid,
            &format!("{what}.max_attempts"),
            retry.max_attempts,
            limits.retry_attempts_max,
        ));
    }
    Ok(retry)
}
