//! The smallest tour of a running coordinator: begin a transaction of each
//! protocol (a message is prepared, with its destination, rather than
//! begun), repeat a Begin to see it is idempotent, abort them, read one
//! back, list.

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tandem_sdk::{Client, new_gid, proto as pb};

#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Transactions begun, and the message prepared.
    pub began: usize,
    pub aborted: usize,
}

/// `say` gets one line per step, for a person to read.
pub async fn run(endpoints: &[String], mut say: impl FnMut(String)) -> anyhow::Result<Report> {
    let client = Client::connect(endpoints)?;
    let mut report = Report::default();
    let mut gids = Vec::new();
    for protocol in [
        pb::Protocol::Saga,
        pb::Protocol::Tcc,
        pb::Protocol::Xa,
        pb::Protocol::TwoPc,
        pb::Protocol::ThreePc,
    ] {
        let name = tandem_sdk::wire::protocols::name(protocol);
        let gid = format!("quickstart-{}", new_gid());
        let tx = client
            .begin(&gid, protocol)
            .await
            .with_context(|| format!("Begin {gid} ({name})"))?;
        // Begin is idempotent: the same gid again returns the same
        // transaction.
        let again = client.begin(&gid, protocol).await?;
        if tx.created_at_ms != again.created_at_ms {
            bail!("a repeated Begin of {gid} made a second transaction");
        }
        say(format!("began {gid} ({name})"));
        report.began += 1;
        gids.push(gid);
    }
    // A transactional message is prepared whole; nothing is delivered
    // until its producer submits it (or its check-back says committed).
    let message = client
        .message("http://127.0.0.1:9")
        .gid(&format!("quickstart-{}", new_gid()))
        .to(
            "nats://quickstart.events",
            br#"{"hello":"tandem"}"#.to_vec(),
        );
    message.prepare().await.context("PrepareMessage")?;
    say(format!(
        "prepared message {} (msg) to nats://quickstart.events; nothing is delivered before Submit",
        message.gid_str()
    ));
    report.began += 1;
    gids.push(message.gid_str().to_string());
    let first = client.get(&gids[0]).await?;
    say(format!(
        "read back {} in state {}",
        first.gid,
        pb::TxState::try_from(first.state).map_or("?", |s| s.as_str_name())
    ));
    // Nothing was enlisted: end them now rather than leave them to their
    // timeout.
    for gid in &gids {
        let tx = client
            .abort(gid, "quickstart: done", true, Duration::from_secs(10))
            .await?;
        if tx.state != pb::TxState::Aborted as i32 {
            bail!("{gid} did not abort (state {})", tx.state);
        }
        report.aborted += 1;
    }
    say(format!("aborted {} transactions", report.aborted));
    let page = client
        .list(pb::ListRequest {
            limit: 1000,
            ..Default::default()
        })
        .await?;
    say(format!(
        "the cluster lists {} transactions",
        page.transactions.len()
    ));
    Ok(report)
}
