//! The demo's networks: two layer-2 networks in 198.18.0.0/15, each a bridge in a "switch"
//! namespace of its own (nothing in the root namespace), and the nodes joined to them by veth
//! pairs. Nothing routes between the networks: the gateway's namespace has a leg in each with
//! IP forwarding off (a new namespace's default), so network B reaches network A only through
//! the gateway's listeners.
//!
//! Every namespace is named `vmesh-demo-<pid>-<node>`, so parallel runs do not collide, and is
//! deleted when the [`Topology`] is dropped (also on a panic or an error).

use std::net::Ipv4Addr;

use vmesh_test_support::netns;

/// One of the two networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    /// The mesh's name for it (Istio's `topology.istio.io/network`).
    pub name: &'static str,
    /// Short tag used in namespace names.
    pub tag: &'static str,
    /// The /24 it numbers from: `198.18.N.0/24`.
    pub third_octet: u8,
}

impl Network {
    pub fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.third_octet, host)
    }
}

/// A node's leg in one network.
#[derive(Debug, Clone, Copy)]
pub struct Leg {
    pub network: Network,
    pub host: u8,
}

impl Leg {
    pub fn addr(&self) -> Ipv4Addr {
        self.network.addr(self.host)
    }
}

/// A namespace standing for one machine.
#[derive(Debug, Clone)]
pub struct Node {
    /// Short name (`cp`, `gw`, `vm-a1`, ...).
    pub name: String,
    /// Its namespace.
    pub ns: String,
    pub legs: Vec<Leg>,
}

impl Node {
    /// The node's address in `network`, if it has a leg there.
    pub fn addr_in(&self, network: Network) -> Option<Ipv4Addr> {
        self.legs
            .iter()
            .find(|l| l.network == network)
            .map(Leg::addr)
    }

    /// The first leg's address.
    pub fn addr(&self) -> Ipv4Addr {
        self.legs
            .first()
            .map(Leg::addr)
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
    }
}

/// Namespaces of one run; all deleted on drop.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    switches: Vec<String>,
    nodes: Vec<Node>,
}

/// The prefix of every namespace a run with this pid creates.
pub fn prefix_for(pid: u32) -> String {
    format!("vmesh-demo-{pid}-")
}

impl Topology {
    /// An empty topology for this process.
    pub fn new() -> Topology {
        Topology {
            prefix: prefix_for(std::process::id()),
            switches: Vec::new(),
            nodes: Vec::new(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn switch_ns(&self, network: Network) -> String {
        format!("{}sw-{}", self.prefix, network.tag)
    }

    /// Adds a network: its switch namespace with bridge `br0`.
    pub fn add_network(&mut self, network: Network) {
        let sw = self.switch_ns(network);
        // Recorded before it exists, so a failure half-way still deletes it.
        self.switches.push(sw.clone());
        netns::add(&sw);
        netns::run("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        netns::run("ip", &["-n", &sw, "link", "set", "br0", "up"]);
    }

    /// Adds a node with a leg in each of `legs`' networks (interfaces `eth0`, `eth1`, ...).
    /// With `default_route`, its first leg is also the default route: connections to
    /// addresses no network has (VIPs, ClusterIPs) need a route before the capture rules can
    /// redirect them; they reach nobody else.
    pub fn add_node(&mut self, name: &str, legs: &[Leg], default_route: bool) -> Node {
        let node = Node {
            name: name.to_string(),
            ns: format!("{}{name}", self.prefix),
            legs: legs.to_vec(),
        };
        self.nodes.push(node.clone());
        netns::add(&node.ns);
        for (i, leg) in legs.iter().enumerate() {
            let sw = self.switch_ns(leg.network);
            let inside = format!("eth{i}");
            // The switch's end is named after the node (at most 15 bytes).
            let port: String = format!("p-{name}").chars().take(15).collect();
            netns::run(
                "ip",
                &[
                    "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", &inside,
                    "netns", &node.ns,
                ],
            );
            netns::run("ip", &["-n", &sw, "link", "set", &port, "master", "br0"]);
            netns::run("ip", &["-n", &sw, "link", "set", &port, "up"]);
            let cidr = format!("{}/24", leg.addr());
            netns::run(
                "ip",
                &["-n", &node.ns, "addr", "add", &cidr, "dev", &inside],
            );
            netns::run("ip", &["-n", &node.ns, "link", "set", &inside, "up"]);
            if default_route && i == 0 {
                netns::run(
                    "ip",
                    &["-n", &node.ns, "route", "add", "default", "dev", &inside],
                );
            }
        }
        node
    }

    /// Every namespace this run created, switches included.
    pub fn namespaces(&self) -> Vec<String> {
        self.switches
            .iter()
            .cloned()
            .chain(self.nodes.iter().map(|n| n.ns.clone()))
            .collect()
    }

    /// Deletes every namespace (idempotent).
    pub fn teardown(&mut self) {
        for ns in self.namespaces() {
            netns::delete(&ns);
        }
        self.nodes.clear();
        self.switches.clear();
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.teardown();
    }
}
