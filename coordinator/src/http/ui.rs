//! The web dashboard at `/ui`: server-rendered HTML (maud, escaped by
//! construction) with a little JavaScript, everything in the binary — no
//! build step. Two pages:
//!
//! * `/ui` — the cluster's members (role, term, commit/applied, health) and
//!   the transactions, filtered (state, protocol, changed within, stuck)
//!   or found by gid;
//! * `/ui/tx/{gid}` — one transaction as a timeline: branches and their
//!   ops (state, attempts, last error), the decision and its fencing
//!   token, the repairs (who, what, why), and the repair actions, each
//!   behind a confirm, calling the HTTP API.
//!
//! Pages refresh their live part every two seconds (a transaction page
//! stops once the transaction has finished).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;
use tandem_proto::v1 as pb;

use super::extract::{GidPath, QueryParams};
use super::types::{ProtocolName, StateName, TransactionJson, rfc3339};
use super::{ApiError, ApiState};
use crate::clock::ago;

const STYLE: &str = r#"
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:baseline}
header a{color:#fff;text-decoration:none;font-weight:600;font-size:16px}
main{padding:16px 20px;max-width:1400px}
h2{font-size:15px;margin:22px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%;box-shadow:0 1px 2px #0001}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e4e6ea;vertical-align:top}
th{background:#eef0f3;font-weight:600}
td.err{color:#a02020;max-width:520px;word-break:break-word}
.badge{display:inline-block;white-space:nowrap;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600;background:#e4e6ea}
.committed,.succeeded,.leader{background:#d5f2dc;color:#17602b}
.aborted,.failed,.unreachable{background:#f8d7d7;color:#8a1c1c}
.active,.preparing,.pre_committing,.pending{background:#dfe9fb;color:#1f4c9c}
.committing,.aborting,.refused{background:#fdebc8;color:#7a4b00}
.resolved,.heuristic{background:#f3d9f7;color:#6b1d7a}
.skipped{background:#eee;color:#666}
form.filters{display:flex;gap:10px;flex-wrap:wrap;align-items:center;margin-bottom:10px}
button{cursor:pointer;border:1px solid #8893a5;background:#fff;border-radius:4px;padding:2px 9px}
button.danger{border-color:#b33;color:#b33}
.muted{color:#6a7385}
dl{display:grid;grid-template-columns:max-content auto;gap:3px 14px;background:#fff;padding:10px 14px;box-shadow:0 1px 2px #0001}
dt{font-weight:600}
ol.timeline{background:#fff;padding:10px 10px 10px 34px;box-shadow:0 1px 2px #0001}
"#;

const SCRIPT: &str = r#"
async function refreshLive(){
  const parts=[...document.querySelectorAll('[data-live]')];
  if(parts.length===0||parts.every(p=>p.dataset.final==='true'))return;
  try{
    const r=await fetch(location.href,{headers:{'accept':'text/html'}});
    if(!r.ok)return;
    const doc=new DOMParser().parseFromString(await r.text(),'text/html');
    for(const part of parts){
      const fresh=doc.getElementById(part.id);
      if(fresh){part.replaceWith(fresh);}
    }
  }catch(e){}
}
setInterval(refreshLive,2000);
async function repair(gid,action,branch,needReason){
  const what=branch?`${action} branch ${branch} of ${gid}`:`${action} ${gid}`;
  let reason='';
  if(needReason){
    reason=prompt(`Why? (kept in the audit record)\n${what}`);
    if(!reason)return;
  }else if(!confirm(`Really ${what}?`)){return;}
  const body={reason:reason||'from the dashboard'};
  if(action!=='abort')body.by='dashboard';
  if(branch)body.branch_id=branch;
  const r=await fetch(`/v1/transactions/${encodeURIComponent(gid)}/${action}`,
    {method:'POST',headers:{'content-type':'application/json'},body:JSON.stringify(body)});
  const out=document.getElementById('result');
  if(r.ok){out.textContent=`${action}: done`;out.className='badge committed';}
  else{const p=await r.json();out.textContent=`${action} refused: ${p.detail}`;out.className='badge aborted';}
  await refreshLive();
}
"#;

fn page(title: &str, body: Markup) -> Response {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · Tandem" }
                    style { (PreEscaped(STYLE)) }
                }
                body {
                    header {
                        a href="/ui" { "Tandem" }
                        span.muted { "distributed transaction coordinator" }
                        a href="/openapi.json" style="font-size:13px;font-weight:400" { "API" }
                        a href="/metrics" style="font-size:13px;font-weight:400" { "metrics" }
                    }
                    main { (body) }
                    script { (PreEscaped(SCRIPT)) }
                }
            }
        }
        .into_string(),
    )
    .into_response()
}

fn badge(text: &str) -> Markup {
    html! { span class={"badge " (text)} { (text) } }
}

fn time(ms: i64) -> Markup {
    html! { span title=(rfc3339(ms)) { (ago(ms)) } }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Filters {
    state: Option<String>,
    protocol: Option<String>,
    since: Option<String>,
    stuck: Option<String>,
    gid: Option<String>,
    page_token: Option<String>,
}

const STATES: [&str; 7] = [
    "active",
    "preparing",
    "pre_committing",
    "committing",
    "aborting",
    "committed",
    "aborted",
];
const PROTOCOLS: [&str; 6] = ["saga", "tcc", "xa", "2pc", "3pc", "msg"];

/// `/ui`: members and transactions.
pub async fn overview(
    State(state): State<Arc<ApiState>>,
    QueryParams(filters): QueryParams<Filters>,
) -> Result<Response, ApiError> {
    if let Some(gid) = filters
        .gid
        .as_deref()
        .map(str::trim)
        .filter(|g| !g.is_empty())
    {
        let target = format!("/ui/tx/{}", url_escape(gid));
        return Ok(axum::response::Redirect::to(&target).into_response());
    }
    let cluster = state.cluster.status().await;
    let chosen = |text: &Option<String>| {
        text.as_deref()
            .filter(|t| !t.is_empty())
            .map(|t| serde_json::Value::String(t.to_string()))
    };
    let state_filter: Option<StateName> = chosen(&filters.state)
        .map(serde_json::from_value)
        .transpose()
        .map_err(|_| bad("state", &filters.state))?;
    let protocol_filter: Option<ProtocolName> = chosen(&filters.protocol)
        .map(serde_json::from_value)
        .transpose()
        .map_err(|_| bad("protocol", &filters.protocol))?;
    let since = filters.since.as_deref().filter(|s| !s.is_empty());
    let updated_since_ms = match since {
        None => 0,
        Some(text) => {
            let d = humantime::parse_duration(text).map_err(|_| bad("since", &filters.since))?;
            crate::clock::ms_ago(d)
        }
    };
    let stuck = filters.stuck.is_some();
    let request = pb::ListRequest {
        state: state_filter.map_or(0, |s| s.to_pb() as i32),
        protocol: protocol_filter.map_or(0, |p| p.to_pb() as i32),
        limit: 100,
        page_token: filters.page_token.clone().unwrap_or_default(),
        updated_since_ms,
        stuck,
    };
    let listed = call!(state, list, request)?;
    let txs: Vec<TransactionJson> = listed
        .transactions
        .iter()
        .map(TransactionJson::from_pb)
        .collect();
    let selected = |value: &str, current: &Option<String>| current.as_deref() == Some(value);
    let body = html! {
        div #live-members data-live="1" {
            h2 { "Cluster " span.muted { (cluster.cluster_id) } }
            table #members {
                tr { th { "node" } th { "address" } th { "role" } th { "term" } th { "commit" } th { "applied" } th { "health" } }
                @for n in &cluster.nodes {
                    tr {
                        td { (n.id) @if n.id == cluster.leader_id { " ★" } }
                        td { (n.address) }
                        td { (badge(&n.role)) }
                        td { (n.term) }
                        td { (n.commit) }
                        td { (n.applied) }
                        td {
                            @if n.error.is_empty() {
                                @let lag = n.commit.saturating_sub(n.applied);
                                @if lag == 0 { "ok" } @else { "applying (" (lag) " behind)" }
                            } @else { span.err { (n.error) } }
                        }
                    }
                }
            }
        }
        h2 { "Transactions" }
        form.filters method="get" action="/ui" {
            label { "state " select name="state" {
                option value="" { "any" }
                @for s in STATES { option value=(s) selected[selected(s, &filters.state)] { (s) } }
            } }
            label { "protocol " select name="protocol" {
                option value="" { "any" }
                @for p in PROTOCOLS { option value=(p) selected[selected(p, &filters.protocol)] { (p) } }
            } }
            label { "changed within " input name="since" size="5" placeholder="1h" value=(since.unwrap_or("")); }
            label { input type="checkbox" name="stuck" value="1" checked[stuck]; " stuck" }
            button type="submit" { "filter" }
            span.muted { "or" }
            input name="gid" placeholder="gid" size="28";
            button type="submit" { "open" }
        }
        div #live-txs data-live="1" {
            table #transactions {
                tr { th { "gid" } th { "protocol" } th { "state" } th { "branches" } th { "created" } th { "updated" } th { "notes" } }
                @if txs.is_empty() { tr { td colspan="7" .muted { "no transactions" } } }
                @for tx in &txs {
                    tr {
                        td { a href={"/ui/tx/" (url_escape(&tx.gid))} { (tx.gid) } }
                        td { (tx.protocol) }
                        td { (badge(&tx.state)) }
                        td { (tx.branches.len()) }
                        td { (time(tx.created_at_ms)) }
                        td { (time(tx.updated_at_ms)) }
                        td {
                            @if tx.heuristic { (badge("heuristic")) " " }
                            @if tx.heuristic_hazard { span.badge.refused { "hazard" } " " }
                            @if tx.stuck { span.badge.refused { "stuck" } }
                        }
                    }
                }
            }
            @if !listed.next_page_token.is_empty() {
                p { a href={"?page_token=" (url_escape(&listed.next_page_token))} { "next page →" } }
            }
        }
    };
    Ok(page("Transactions", body))
}

fn bad(name: &str, value: &Option<String>) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::BAD_REQUEST,
        "invalid-query",
        format!(
            "{name} {:?} is not one this page knows",
            value.as_deref().unwrap_or("")
        ),
    )
}

fn url_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// `/ui/tx/{gid}`: one transaction as a timeline, with the repairs.
pub async fn transaction(
    State(state): State<Arc<ApiState>>,
    GidPath(gid): GidPath,
) -> Result<Response, ApiError> {
    let request = pb::GetRequest {
        gid: gid.clone(),
        resolve: false,
    };
    let tx = match call!(state, get, request) {
        Ok(response) => TransactionJson::from_pb(&response.transaction.unwrap_or_default()),
        Err(e) => {
            let body = html! {
                h2 { "Transaction " (gid) }
                p.err { (e.detail) }
                p { a href="/ui" { "← all transactions" } }
            };
            return Ok((e.status, page(&gid, body)).into_response());
        }
    };
    let finished = matches!(tx.state.as_str(), "committed" | "aborted");
    let decided = tx.decision.is_some();
    let phase_two_op = tx
        .decision
        .as_ref()
        .and_then(|d| phase_two_op(&tx.protocol, &d.outcome));
    // The timeline: every dated event, oldest first.
    let mut events: Vec<(i64, Markup)> =
        vec![(tx.created_at_ms, html! { "began (" (tx.protocol) ")" })];
    for b in &tx.branches {
        for o in &b.ops {
            if o.state != "pending" || o.attempts > 0 {
                events.push((
                    o.updated_at_ms,
                    html! {
                        "branch " b { (b.branch_id) } " " (o.op) ": " (badge(&o.state))
                        @if o.attempts > 0 { " after " (o.attempts) " failed attempt" @if o.attempts != 1 { "s" } }
                    },
                ));
            }
        }
    }
    if let Some(d) = &tx.decision {
        events.push((
            d.decided_at_ms,
            html! { "decided " b { (d.outcome) } " — " (d.reason) " (fencing token " (d.term) "/" (d.index) ")" },
        ));
    }
    for r in &tx.repairs {
        events.push((
            r.at_ms,
            html! {
                @if r.action == "resolve" { (badge("heuristic")) " " }
                "repair " b { (r.action) } " "
                @if r.branch_id.is_empty() { "(every branch)" } @else { "of " (r.branch_id) }
                " by " (r.by) ": " (r.reason) " (entry " (r.index) ")"
            },
        ));
    }
    if let Some(at) = tx.finished_at_ms {
        events.push((at, html! { "finished " (badge(&tx.state)) }));
    }
    events.sort_by_key(|(at, _)| *at);
    let body = html! {
        p { a href="/ui" { "← all transactions" } " " span #result {} }
        div #live data-live="1" data-final=(finished) {
            h2 #title { "Transaction " (tx.gid) " " (badge(&tx.state))
                @if tx.heuristic { " " (badge("heuristic")) }
                @if tx.heuristic_hazard { " " span.badge.refused { "heuristic hazard" } }
            }
            dl {
                dt { "protocol" } dd { (tx.protocol) }
                dt { "created" } dd { (rfc3339(tx.created_at_ms)) " (" (ago(tx.created_at_ms)) ")" }
                @if !decided { dt { "deadline" } dd { (rfc3339(tx.deadline_ms)) " (" (ago(tx.deadline_ms)) ")" } }
                @if let Some(d) = &tx.decision {
                    dt { "decision" } dd { b { (d.outcome) } " at " (rfc3339(d.decided_at_ms)) " — " (d.reason) }
                    dt { "fencing token" } dd { "term " (d.term) ", index " (d.index) }
                }
                @if let Some(at) = tx.finished_at_ms { dt { "finished" } dd { (rfc3339(at)) " (" (ago(at)) ")" } }
                @if !tx.error.is_empty() { dt { "error" } dd.err { (tx.error) } }
                @if tx.heuristic { dt { "heuristic" } dd { "an operator resolved phase two by hand: not every participant acknowledged the outcome" } }
            }
            h2 { "Branches" }
            table #branches {
                tr { th { "branch" } th { "op" } th { "state" } th { "attempts" } th { "updated" } th { "endpoint" } th { "last error" } th { "repair" } }
                @for b in &tx.branches {
                    @for (i, o) in b.ops.iter().enumerate() {
                        tr {
                            td { @if i == 0 { b { (b.branch_id) } } }
                            td { (o.op) }
                            td {
                                @if finished && o.state == "pending" { span.badge.skipped { "not needed" } }
                                @else { (badge(&o.state)) }
                            }
                            td { (o.attempts) }
                            td { (time(o.updated_at_ms)) }
                            td.muted { (o.endpoint) }
                            @if matches!(o.state.as_str(), "pending" | "refused" | "failed") {
                                td.err { (o.last_error) }
                            } @else if !o.last_error.is_empty() {
                                td.muted { "before: " (o.last_error) }
                            } @else { td {} }
                            td {
                                @let open = matches!(o.state.as_str(), "pending" | "refused");
                                @if !finished && open && o.attempts > 0 {
                                    button.retry data-branch=(b.branch_id)
                                        onclick={"repair(" (js(&tx.gid)) ",'retry'," (js(&b.branch_id)) ",false)"} { "retry now" }
                                }
                                @if !finished && open && decided && phase_two_op == Some(o.op.as_str()) {
                                    " "
                                    button.danger.resolve data-branch=(b.branch_id)
                                        onclick={"repair(" (js(&tx.gid)) ",'resolve'," (js(&b.branch_id)) ",true)"} { "resolve by hand" }
                                }
                            }
                        }
                    }
                }
            }
            @if !finished {
                p {
                    button #retry-all onclick={"repair(" (js(&tx.gid)) ",'retry',null,false)"} { "retry every branch now" }
                    @if !decided {
                        " "
                        button.danger #abort onclick={"repair(" (js(&tx.gid)) ",'abort',null,true)"} { "abort" }
                    }
                }
            }
            h2 { "Timeline" }
            ol.timeline {
                @for (at, what) in &events {
                    li { span.muted title=(rfc3339(*at)) { (rfc3339(*at)) } " — " (what) }
                }
            }
        }
    };
    Ok(page(&tx.gid, body))
}

/// A string as a JavaScript literal inside an HTML attribute (maud
/// escapes the attribute; JSON escapes the string).
fn js(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

/// The op phase two sends, as the protocol says (the only ops a resolve
/// by hand applies to).
fn phase_two_op(protocol: &str, outcome: &str) -> Option<&'static str> {
    use crate::model::types::{Outcome, Protocol};
    let outcome = match outcome {
        "commit" => Outcome::Commit,
        "abort" => Outcome::Abort,
        _ => return None,
    };
    crate::protocol::phase_two_op(Protocol::from_name(protocol)?, outcome).map(|op| op.name())
}

/// `/ui/login`: where the dashboard asks for a token (when the node
/// requires one).
pub async fn login_page() -> Response {
    page(
        "Sign in",
        html! {
            h2 { "Sign in" }
            p.muted { "This node requires a token (reader to look, operator to repair)." }
            form method="post" action="/ui/login" {
                input type="password" name="token" size="48" placeholder="token" autofocus;
                " "
                button type="submit" { "sign in" }
            }
        },
    )
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

/// Keeps the token in a cookie only this site sends (HttpOnly,
/// SameSite=Strict; Secure over TLS) and opens the dashboard.
pub async fn login(
    State(state): State<Arc<ApiState>>,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let token = form.token.trim();
    let printable = !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic());
    if !printable {
        return (axum::http::StatusCode::BAD_REQUEST, login_page().await).into_response();
    }
    let secure = if state.tls.is_some() { "; Secure" } else { "" };
    let cookie = format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Strict{secure}",
        super::TOKEN_COOKIE
    );
    let mut response = axum::response::Redirect::to("/ui").into_response();
    if let Ok(value) = cookie.parse() {
        response
            .headers_mut()
            .insert(axum::http::header::SET_COOKIE, value);
    }
    response
}
