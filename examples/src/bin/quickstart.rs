//! The smallest tour of a running coordinator: begin a transaction of each
//! protocol, read one back, list them. Last stdout line: a JSON summary.

use clap::Parser;
use tandem_sdk::{Client, new_gid, proto as pb};

#[derive(Parser)]
struct Args {
    /// Any node of the cluster, or a comma-separated list.
    #[arg(long, default_value = "127.0.0.1:7070")]
    endpoint: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::connect([args.endpoint.as_str()])?;
    let protocols = [
        pb::Protocol::Saga,
        pb::Protocol::Tcc,
        pb::Protocol::Xa,
        pb::Protocol::TwoPc,
        pb::Protocol::ThreePc,
        pb::Protocol::Msg,
    ];
    let mut gids = Vec::new();
    for protocol in protocols {
        let gid = format!("quickstart-{}", new_gid());
        let tx = client.begin(&gid, protocol).await?;
        // Begin is idempotent: the same gid again returns the same transaction.
        let again = client.begin(&gid, protocol).await?;
        assert_eq!(tx.created_at_ms, again.created_at_ms);
        println!("began {gid} ({})", protocol.as_str_name());
        gids.push(gid);
    }
    let first = client.get(&gids[0]).await?;
    println!(
        "read back {} in state {}",
        first.gid,
        pb::TxState::try_from(first.state).map_or("?", |s| s.as_str_name())
    );
    let page = client
        .list(pb::ListRequest {
            limit: 1000,
            ..Default::default()
        })
        .await?;
    println!(
        "{}",
        serde_json::json!({ "began": gids.len(), "listed": page.transactions.len() })
    );
    Ok(())
}
