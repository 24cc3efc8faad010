//! A TCP proxy on loopback that a test can cut and restore: "block the
//! broker's port" without stopping a broker other tests share. Cut, it
//! drops every connection it carries and refuses new ones.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards a new loopback port to `target`, open.
    pub async fn start(target: &str) -> Proxy {
        Proxy::start_on("127.0.0.1", target).await
    }

    /// Forwards a new port on `host` (a local address, such as the bridge
    /// of `netns::Net` that namespaced nodes reach) to `target`, open.
    pub async fn start_on(host: &str, target: &str) -> Proxy {
        let listener = TcpListener::bind((host, 0)).await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (open, _) = watch::channel(true);
        let open = Arc::new(open);
        let target = target.to_string();
        let state = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if !*state.borrow() {
                    drop(client);
                    continue;
                }
                let mut cut = state.subscribe();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Proxy { addr, open, task }
    }

    /// Drops every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
