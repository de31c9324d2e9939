//! Simulated hosts running real weftd: the shared lab (`weft-lab`: a switch namespace with etcd,
//! hosts on its bridge, a container namespace behind `cni0` on each host) plus a weftd process per
//! host. Everything is removed in Drop, also when a test fails.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::harness::{wait_for, Weftd, WeftdSpec};

pub use weft_lab::{require_root, SWITCH_IP};

pub const PREFIX: &str = "/coreos.com/network";

/// A lab host and the weftd running on it, if any.
pub struct Host {
    /// Before `lab`: weftd is killed before its namespace goes.
    weftd: Option<Weftd>,
    pub lab: weft_lab::Host,
}

weft_lab::extends!(Host => lab: weft_lab::Host);

impl Host {
    pub fn subnet_env(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("subnet.env")).ok()
    }

    pub fn env_var(&self, key: &str) -> Option<String> {
        let env = self.subnet_env()?;
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
    }

    /// The lease, e.g. `10.244.5.0/24`, waiting for subnet.env.
    pub fn wait_subnet(&self) -> ipnet::Ipv4Net {
        wait_for(
            &format!("subnet.env of {}", self.ns.name),
            Duration::from_secs(30),
            || {
                self.assert_running();
                let gw: ipnet::Ipv4Net = self.env_var("FLANNEL_SUBNET")?.parse().ok()?;
                Some(gw.trunc())
            },
        )
    }

    /// The container's address: the second host address of the lease.
    pub fn container_ip(&self) -> Ipv4Addr {
        weft_lab::topology::container_ip(self.wait_subnet())
    }

    /// The IPv6 lease of a dual-stack host, e.g. `fd00:247:0:5::/64`, waiting for subnet.env.
    pub fn wait_subnet6(&self) -> ipnet::Ipv6Net {
        wait_for(
            &format!("FLANNEL_IPV6_SUBNET of {}", self.ns.name),
            Duration::from_secs(30),
            || {
                self.assert_running();
                let gw: ipnet::Ipv6Net = self.env_var("FLANNEL_IPV6_SUBNET")?.parse().ok()?;
                Some(gw.trunc())
            },
        )
    }

    /// The container's IPv6 address: the second address of the IPv6 lease.
    pub fn container_ip6(&self) -> std::net::Ipv6Addr {
        weft_lab::topology::container_ip6(self.wait_subnet6())
    }

    /// Every weftd log of this host (one file across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("weftd.log")).unwrap_or_default()
    }

    /// Waits until the log holds `needle` (weftd still running).
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(
            &format!("{needle:?} in {}'s log", self.ns.name),
            timeout,
            || {
                self.assert_running();
                self.log().contains(needle).then_some(())
            },
        );
    }

    pub fn assert_running(&self) {
        if let Some(w) = &self.weftd {
            w.assert_running();
        }
    }

    /// SIGTERM and wait: weftd's clean exit.
    pub fn stop(&mut self) {
        if let Some(mut w) = self.weftd.take() {
            let status = w.terminate();
            assert!(status.success(), "weftd exit status {status}");
        }
    }

    /// Freezes or thaws weftd (SIGSTOP, SIGCONT).
    pub fn freeze(&self, frozen: bool) {
        if let Some(w) = &self.weftd {
            w.freeze(frozen);
        }
    }

    /// SIGKILL: a crash; the lease stays until its TTL runs out.
    pub fn kill(&mut self) {
        if let Some(mut w) = self.weftd.take() {
            w.kill();
        }
    }
}

pub struct Topology {
    pub hosts: Vec<Host>,
    pub lab: weft_lab::Lab,
}

weft_lab::extends!(Topology => lab: weft_lab::Lab);

impl Topology {
    /// The lab's standard cluster: a switch with etcd and `n` hosts (no weftd yet); `mtu` is the
    /// underlay MTU.
    pub fn new(n: usize, mtu: u32) -> Self {
        let mut lab = weft_lab::Lab::with_hosts(n, mtu);
        let hosts = std::mem::take(&mut lab.hosts)
            .into_iter()
            .map(|lab| Host { weftd: None, lab })
            .collect();
        Topology { hosts, lab }
    }

    pub fn etcdctl(&self, args: &[&str]) -> String {
        self.etcd().ctl_ok(args)
    }

    pub fn set_config(&self, json: &str) {
        self.etcd().put(&format!("{PREFIX}/config"), json);
    }

    /// Starts weftd on host `i` with extra flags.
    pub fn start(&mut self, i: usize, extra: &[&str]) {
        self.start_with(i, extra, &[]);
    }

    /// Starts weftd on host `i` with extra flags and environment.
    pub fn start_with(&mut self, i: usize, extra: &[&str], env: &[(&str, &str)]) {
        self.start_spec(i, |spec| {
            spec.args = extra.iter().map(|a| a.to_string()).collect();
            spec.env = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        });
    }

    /// Starts weftd on host `i` as `adjust` makes its spec.
    pub fn start_spec(&mut self, i: usize, adjust: impl FnOnce(&mut WeftdSpec)) {
        let endpoint = self.etcd().endpoint.clone();
        let h = &mut self.hosts[i];
        assert!(h.weftd.is_none(), "weftd already runs on {}", h.ns.name);
        let mut spec = WeftdSpec::on_host(&endpoint, PREFIX, &h.ns.name, &h.dir);
        adjust(&mut spec);
        h.weftd = Some(spec.start());
    }

    /// Gives host `i`'s container an address in its lease behind `cni0`, with subnet.env's MTU.
    pub fn wire_container(&self, i: usize) {
        let h = &self.hosts[i];
        let subnet = h.wait_subnet();
        let mtu = h
            .env_var("FLANNEL_MTU")
            .and_then(|m| m.parse().ok())
            .expect("FLANNEL_MTU");
        h.wire_container(subnet, Some(mtu));
    }

    /// `n` hosts of a dual-stack network `config` with weftd (`extra` flags) on those in `weft`,
    /// their containers wired for both families; `None` (a visible skip, a failure under
    /// CI=true) without root or IPv6. Named after the running test.
    pub fn dual_stack(n: usize, config: &str, weft: &[usize], extra: &[&str]) -> Option<Self> {
        Self::dual_stack_with(n, config, weft, |t, i| t.start(i, extra))
    }

    /// [`Topology::dual_stack`] with weftd started on host `i` by `start(topology, i)` (a
    /// backend's own flags and environment).
    pub fn dual_stack_with(
        n: usize,
        config: &str,
        weft: &[usize],
        start: impl Fn(&mut Topology, usize),
    ) -> Option<Self> {
        let name = std::thread::current()
            .name()
            .unwrap_or("dual_stack")
            .to_string();
        if !require_root(&name) || !weft_lab::require_ipv6(&name) {
            return None;
        }
        let mut t = Topology::new(n, 1500);
        t.set_config(config);
        for &i in weft {
            start(&mut t, i);
        }
        for &i in weft {
            t.wire_container_dual(i);
        }
        Some(t)
    }

    /// weft's (protocol 87) IPv6 routes on host `i`, as "dst gateway dev".
    pub fn routes6(&self, i: usize) -> Vec<String> {
        weft_lab::json::rows(
            &self.hosts[i].ns.ip_json("-6 route show proto 87"),
            &["dst", "gateway", "dev"],
        )
    }

    /// Host `i`'s dual-stack lease as etcd holds it, under flannel's dual-stack key (JSON null
    /// when there is none).
    pub fn lease_dual(&self, i: usize) -> serde_json::Value {
        let h = &self.hosts[i];
        let key = weft_lab::flannel::lease_key_dual(PREFIX, h.wait_subnet(), h.wait_subnet6());
        let text = self.etcdctl(&["get", "--print-value-only", &key]);
        serde_json::from_str(text.trim()).unwrap_or_default()
    }

    /// [`Topology::wire_container`] for both families of a dual-stack lease.
    pub fn wire_container_dual(&self, i: usize) {
        let h = &self.hosts[i];
        let (subnet, subnet6) = (h.wait_subnet(), h.wait_subnet6());
        let mtu = h.env_var("FLANNEL_MTU").and_then(|m| m.parse().ok());
        h.wire_container_dual(subnet, subnet6, mtu);
    }

    /// Waits until every listed container reaches every other one over IPv6.
    pub fn assert_full_mesh6(&self, hosts: &[usize]) {
        for &a in hosts {
            for &b in hosts {
                if a != b {
                    let to = self.hosts[b].container_ip6();
                    wait_for(
                        &format!("{}'s container to reach {to}", self.hosts[a].ns.name),
                        Duration::from_secs(20),
                        || self.hosts[a].ping6(to).then_some(()),
                    );
                }
            }
        }
    }

    /// Whether one ping from host `from`'s container reaches `to`.
    pub fn ping(&self, from: usize, to: Ipv4Addr) -> bool {
        self.hosts[from].ping(to)
    }

    /// Waits until every listed container reaches every other one.
    pub fn assert_full_mesh(&self, hosts: &[usize]) {
        for &a in hosts {
            for &b in hosts {
                if a != b {
                    let to = self.hosts[b].container_ip();
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while !self.ping(a, to) {
                        assert!(
                            Instant::now() < deadline,
                            "container of {} cannot reach {to} ({}); log of {}:\n{}",
                            self.hosts[a].ns.name,
                            self.hosts[b].ns.name,
                            self.hosts[a].ns.name,
                            self.hosts[a].log()
                        );
                    }
                }
            }
        }
    }
}
