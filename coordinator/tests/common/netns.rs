//! Test hosts in network namespaces: one namespace per node, each with a
//! veth pair into a bridge in the test's own namespace, on a /24 of
//! 10.77.0.0/16 chosen from the process id. The test process (clients,
//! participants) reaches the nodes through the bridge, and they reach it
//! at the bridge's address. Cutting a node takes its link down: it hears
//! nobody and nobody hears it — peers, clients and participants alike.
//! Everything is removed on drop (and leftovers of an earlier run of the
//! same process id first).

use std::process::Command;

pub struct Net {
    tag: String,
    subnet: u32,
    nodes: usize,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// `nodes` hosts, or why the machine does not allow them (no `ip`, no
    /// privilege to make namespaces).
    pub fn create(nodes: usize) -> Result<Net, String> {
        let pid = std::process::id();
        let net = Net {
            tag: format!("{}", pid % 100_000),
            subnet: 1 + pid % 250,
            nodes,
        };
        net.remove();
        net.build().inspect_err(|_| net.remove())?;
        Ok(net)
    }

    fn bridge(&self) -> String {
        format!("tnb{}", self.tag)
    }

    /// The namespace of node `id` (1-based).
    pub fn ns(&self, id: usize) -> String {
        format!("tnem{}-{id}", self.tag)
    }

    fn outer(&self, id: usize) -> String {
        format!("tv{}o{id}", self.tag)
    }

    fn inner(&self, id: usize) -> String {
        format!("tv{}i{id}", self.tag)
    }

    /// The address node `id` serves on, in its namespace.
    pub fn node_ip(&self, id: usize) -> String {
        format!("10.77.{}.{id}", self.subnet)
    }

    /// The test process's address on the bridge, where nodes reach it.
    pub fn host_ip(&self) -> String {
        format!("10.77.{}.254", self.subnet)
    }

    fn build(&self) -> Result<(), String> {
        let bridge = self.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.host_ip()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for id in 1..=self.nodes {
            let (ns, outer, inner) = (self.ns(id), self.outer(id), self.inner(id));
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "master", &bridge, "up"])?;
            let address = format!("{}/24", self.node_ip(id));
            ip(&["-n", &ns, "addr", "add", &address, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Node `id` hears nobody and nobody hears it.
    pub fn cut(&self, id: usize) {
        ip(&["link", "set", &self.outer(id), "down"]).expect("cut a node's link");
    }

    pub fn heal(&self, id: usize) {
        ip(&["link", "set", &self.outer(id), "up"]).expect("restore a node's link");
    }

    fn remove(&self) {
        for id in 1..=self.nodes {
            let _ = ip(&["link", "del", &self.outer(id)]);
            let _ = ip(&["netns", "del", &self.ns(id)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.remove();
    }
}
