//! A client's request, however odd: the service layer's input checks
//! (`service::checks`) refuse it with an error or build a command — never
//! a panic — and whatever they let through, `apply` takes without calling
//! it invalid: bad input must be refused before it reaches the log
//! (DESIGN §8: nothing rejected leaves a trace). One exception, by design:
//! which operations a branch must name depends on its transaction's
//! protocol, which only the state knows — `apply` refuses a mismatch (no
//! change), and this target holds it to refusing nothing else.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tandem_coordinator::config::Limits;
use tandem_coordinator::model::command::DestinationSpec;
use tandem_coordinator::model::{ApplyContext, Command, Op, Protocol, Rejection};
use tandem_coordinator::protocol::{branch_ops, is_implemented};
use tandem_coordinator::service::checks;
use tandem_coordinator::service::{
    BeginInput, MessageInput, OptionsInput, RegisterInput, RetryInput, SagaInput, StepInput,
};
use tandem_coordinator::state::StateMachine;

/// Text that is often valid (so requests get past the first check) and
/// sometimes anything at all, or long.
#[derive(Arbitrary, Debug)]
enum Text<'a> {
    Id(u8),
    Raw(&'a str),
    Long(u16, char),
}

impl Text<'_> {
    fn id(&self) -> String {
        match self {
            Text::Id(n) => format!("id-{n}"),
            Text::Raw(s) => s.to_string(),
            Text::Long(n, c) => c.to_string().repeat(usize::from(*n)),
        }
    }

    fn op(&self) -> String {
        match self {
            Text::Id(n) => Op::ALL[usize::from(*n) % Op::ALL.len()].name().to_string(),
            other => other.id(),
        }
    }

    fn destination(&self) -> String {
        match self {
            Text::Id(n) if n % 4 == 1 => format!("nats://orders.n{n}"),
            Text::Id(n) if n % 4 == 3 => format!("amqp://amq.direct/orders-{n}"),
            other => other.endpoint(),
        }
    }

    fn endpoint(&self) -> String {
        match self {
            Text::Id(n) if n % 2 == 0 => format!("http://127.0.0.1:{}/svc", 1000 + u16::from(*n)),
            Text::Id(n) => format!("grpc://127.0.0.1:{}", 1000 + u16::from(*n)),
            other => other.id(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Retry {
    initial_interval_ms: u32,
    max_interval_ms: u32,
    max_attempts: u32,
}

impl From<&Retry> for RetryInput {
    fn from(r: &Retry) -> Self {
        RetryInput {
            initial_interval_ms: r.initial_interval_ms,
            max_interval_ms: r.max_interval_ms,
            max_attempts: r.max_attempts,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Options {
    timeout_ms: u32,
    retry: Option<Retry>,
    branch_timeout_ms: u32,
    concurrency: u32,
}

impl From<&Options> for OptionsInput {
    fn from(o: &Options) -> Self {
        OptionsInput {
            timeout_ms: o.timeout_ms,
            retry: o.retry.as_ref().map(RetryInput::from),
            branch_timeout_ms: o.branch_timeout_ms,
            concurrency: o.concurrency,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Step<'a> {
    branch_id: Text<'a>,
    action: Text<'a>,
    compensate: Text<'a>,
    payload: &'a [u8],
    after: Vec<Text<'a>>,
    retry: Option<Retry>,
}

#[derive(Arbitrary, Debug)]
enum Request<'a> {
    Begin {
        gid: Text<'a>,
        protocol: Option<u8>,
        options: Options,
        payload: &'a [u8],
    },
    Saga {
        gid: Text<'a>,
        options: Options,
        steps: Vec<Step<'a>>,
        payload: &'a [u8],
        concurrent: bool,
    },
    Register {
        gid: Text<'a>,
        protocol: u8,
        branch_id: Text<'a>,
        ops: Vec<(Text<'a>, Text<'a>)>,
        payload: &'a [u8],
    },
    Abort {
        gid: Text<'a>,
        protocol: u8,
        reason: &'a str,
    },
    Message {
        gid: Text<'a>,
        options: Options,
        check_back: Text<'a>,
        destinations: Vec<(Text<'a>, Text<'a>, &'a [u8])>,
        payload: &'a [u8],
    },
}

fn protocol(n: u8) -> Protocol {
    let implemented: Vec<Protocol> = Protocol::ALL
        .into_iter()
        .filter(|p| is_implemented(*p))
        .collect();
    implemented[usize::from(n) % implemented.len()]
}

/// A machine where `gid` was begun with `protocol` (for Register, Abort).
fn begun(gid: &str, protocol: Protocol) -> Option<StateMachine> {
    let limits = Limits::default();
    let input = BeginInput {
        trace_parent: None,
        gid: gid.to_string(),
        protocol: Some(protocol),
        options: OptionsInput::default(),
        payload: Default::default(),
    };
    let proposal = checks::begin(&limits, input, 1).ok()?;
    let mut sm = StateMachine::new(Default::default());
    sm.apply(proposal.command, ApplyContext { index: 1, term: 1 })
        .expect("a checked Begin applies");
    Some(sm)
}

fn applies(sm: &mut StateMachine, command: Command, what: &str) {
    if let Err(e @ Rejection::Invalid(_)) = sm.apply(command, ApplyContext { index: 2, term: 1 }) {
        panic!("{what} passed the input checks and apply called it invalid: {e}");
    }
}

fuzz_target!(|request: Request<'_>| {
    let limits = Limits::default();
    match request {
        Request::Begin {
            gid,
            protocol,
            options,
            payload,
        } => {
            let input = BeginInput {
                trace_parent: None,
                gid: gid.id(),
                protocol: protocol.and_then(|n| Protocol::ALL.get(usize::from(n) % 8).copied()),
                options: (&options).into(),
                payload: payload.to_vec().into(),
            };
            if let Ok(p) = checks::begin(&limits, input, 1) {
                assert!(p.footprint_bytes <= limits.tx_bytes_max);
                let mut sm = StateMachine::new(Default::default());
                if let Err(e) = sm.apply(p.command, ApplyContext { index: 1, term: 1 }) {
                    panic!("a checked Begin was refused: {e}");
                }
            }
        }
        Request::Saga {
            gid,
            options,
            steps,
            payload,
            concurrent,
        } => {
            let input = SagaInput {
                trace_parent: None,
                gid: gid.id(),
                options: (&options).into(),
                steps: steps
                    .iter()
                    .map(|s| StepInput {
                        branch_id: s.branch_id.id(),
                        action: s.action.endpoint(),
                        compensate: s.compensate.endpoint(),
                        payload: s.payload.to_vec().into(),
                        after: s.after.iter().map(Text::id).collect(),
                        retry: s.retry.as_ref().map(RetryInput::from),
                    })
                    .collect(),
                payload: payload.to_vec().into(),
                concurrent,
                wait: None,
            };
            if let Ok(p) = checks::saga(&limits, input, 1) {
                assert!(p.footprint_bytes <= limits.tx_bytes_max);
                let mut sm = StateMachine::new(Default::default());
                if let Err(e) = sm.apply(p.command, ApplyContext { index: 1, term: 1 }) {
                    panic!("a checked saga was refused: {e}");
                }
            }
        }
        Request::Message {
            gid,
            options,
            check_back,
            destinations,
            payload,
        } => {
            let input = MessageInput {
                trace_parent: None,
                gid: gid.id(),
                options: (&options).into(),
                check_back: check_back.endpoint(),
                destinations: destinations
                    .iter()
                    .map(|(id, to, payload)| DestinationSpec {
                        branch_id: id.id(),
                        endpoint: to.destination(),
                        payload: payload.to_vec().into(),
                    })
                    .collect(),
                payload: payload.to_vec().into(),
            };
            if let Ok(p) = checks::message(&limits, input, 1) {
                assert!(p.footprint_bytes <= limits.tx_bytes_max);
                let mut sm = StateMachine::new(Default::default());
                if let Err(e) = sm.apply(p.command, ApplyContext { index: 1, term: 1 }) {
                    panic!("a checked message was refused: {e}");
                }
            }
        }
        Request::Register {
            gid,
            protocol: p,
            branch_id,
            ops,
            payload,
        } => {
            let gid = gid.id();
            let input = RegisterInput {
                gid: gid.clone(),
                branch_id: branch_id.id(),
                ops: ops.iter().map(|(op, e)| (op.op(), e.endpoint())).collect(),
                payload: payload.to_vec().into(),
            };
            let protocol = protocol(p);
            if let Ok(command) = checks::register(&limits, input, 2)
                && let Some(mut sm) = begun(&gid, protocol)
            {
                let Command::RegisterBranch { branch, .. } = &command else {
                    unreachable!("checks::register builds a RegisterBranch");
                };
                let (required, optional) = branch_ops(protocol);
                let fits = branch
                    .ops
                    .iter()
                    .all(|(op, _)| required.contains(op) || optional.contains(op))
                    && required
                        .iter()
                        .all(|op| branch.ops.iter().any(|(o, _)| o == op));
                if fits {
                    applies(&mut sm, command, "a RegisterBranch");
                }
            }
        }
        Request::Abort {
            gid,
            protocol: p,
            reason,
        } => {
            let gid = gid.id();
            if checks::abort(&gid, reason).is_ok()
                && let Some(mut sm) = begun(&gid, protocol(p))
            {
                let command = Command::Abort {
                    gid,
                    reason: reason.to_string(),
                    now_ms: 2,
                };
                applies(&mut sm, command, "an Abort");
            }
        }
    }
});
