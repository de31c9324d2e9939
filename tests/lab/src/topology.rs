//! The simulated cluster: a switch namespace with bridge `br0`, hosts plugged into it by veth
//! (`eth0` inside the host), each host with a container namespace behind `cni0`, and outsiders.
//!
//! Default addressing (`Lab::with_hosts`): the switch is 10.199.0.1/24 and runs etcd; host `i` is
//! 10.199.0.(11+i)/24 with a default route via the switch. Tests that need other underlays
//! (several L2 segments, MTU 9000) call `add_host` with their own.
//!
//! Every underlay also has IPv6 (when the kernel has it): an IPv4 address a.b.c.d/24 comes with
//! fd00:a:b:c::d/64 ([`underlay_ip6`]), the octets' decimal digits written as the groups, so
//! 10.199.0.11 is fd00:10:199::11 and the switch fd00:10:199::1. Like the IPv4 plan this is
//! fixed, and safe because every lab has its own namespaces; distinct IPv4 segments get distinct
//! /64s.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use tempfile::TempDir;

use crate::etcd::Etcd;
use crate::kube::KubeApi;
use crate::netns::{unique_prefix, Netns};

/// The switch's address: etcd (and a lab's kube-apiserver) listens here, and it stands for
/// "outside the cluster network".
pub const SWITCH_IP: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 1);

/// The switch's IPv6 address: [`underlay_ip6`] of [`SWITCH_IP`].
pub const SWITCH_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x199, 0, 0, 0, 0, 0x1);

/// The IPv6 underlay address that goes with IPv4 underlay address `v4`: a.b.c.d is fd00:a:b:c::d,
/// each octet's decimal digits read as hex, so the two read alike and never collide.
pub fn underlay_ip6(v4: Ipv4Addr) -> Ipv6Addr {
    let g = |o: u8| u16::from_str_radix(&o.to_string(), 16).expect("decimal digits are hex");
    let [a, b, c, d] = v4.octets();
    Ipv6Addr::new(0xfd00, g(a), g(b), g(c), 0, 0, 0, g(d))
}

/// Whether the kernel has IPv6 (not booted with ipv6.disable=1): without it the lab is IPv4 only,
/// so IPv4 tests still run there.
pub fn have_ipv6() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

/// IPv6 on in `ns`, for devices there now and made later; `forwarding` for a router (a host).
fn ipv6_on(ns: &Netns, forwarding: bool) {
    if !have_ipv6() {
        return;
    }
    let mut args = vec![
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=0",
        "net.ipv6.conf.default.disable_ipv6=0",
    ];
    if forwarding {
        args.push("net.ipv6.conf.all.forwarding=1");
    }
    ns.must(&args);
}

/// The first host address of a lease: the bridge's (docker0, cni0) and FLANNEL_SUBNET's.
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// The address the lab gives a host's container: the lease's second host address.
pub fn container_ip(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 2)
}

/// [`gateway`] for an IPv6 lease: its first address after the network's (on cni0).
pub fn gateway6(subnet: Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(subnet.network()) + 1)
}

/// [`container_ip`] for an IPv6 lease: its second address after the network's.
pub fn container_ip6(subnet: Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(subnet.network()) + 2)
}

/// One simulated host.
pub struct Host {
    pub ns: Netns,
    pub container: Netns,
    /// The underlay address and prefix on `eth0`.
    pub underlay: Ipv4Net,
    /// The IPv6 underlay address on `eth0` ([`underlay_ip6`] of `underlay`, /64); not there when
    /// the kernel has no IPv6 ([`have_ipv6`]).
    pub underlay6: Ipv6Net,
    /// A private directory (subnet.env, daemon.json, logs).
    pub dir: PathBuf,
}

impl Host {
    /// The host's underlay address.
    pub fn addr(&self) -> Ipv4Addr {
        self.underlay.addr()
    }

    /// The host's IPv6 underlay address.
    pub fn addr6(&self) -> Ipv6Addr {
        self.underlay6.addr()
    }

    /// Puts the container behind `cni0` with the second address of `subnet`, as Docker or the
    /// CNI bridge plugin would; `mtu` for the bridge and the veth (None: the kernel's default).
    /// Replaces an earlier wiring, so a new lease can be wired again.
    pub fn wire_container(&self, subnet: Ipv4Net, mtu: Option<u32>) {
        let gw = gateway(subnet);
        let len = subnet.prefix_len();
        let mtu = mtu.map(|m| format!("mtu {m}")).unwrap_or_default();
        let _ = self.ns.try_ip("link del cni0");
        let _ = self.container.try_ip("link del eth0");
        self.ns.ip(&format!("link add cni0 {mtu} type bridge"));
        self.ns.ip(&format!("addr add {gw}/{len} dev cni0"));
        self.ns.ip("link set cni0 up");
        self.ns.ip(&format!(
            "link add vc {mtu} type veth peer name eth0 {mtu} netns {}",
            self.container.name
        ));
        self.ns.ip("link set vc master cni0 up");
        self.container
            .ip(&format!("addr add {}/{len} dev eth0", container_ip(subnet)));
        self.container.ip("link set eth0 up");
        self.container.ip(&format!("route add default via {gw}"));
    }

    /// [`Host::wire_container`] for both families: also [`gateway6`] of `subnet6` on `cni0`, the
    /// container at [`container_ip6`] with a default IPv6 route via it. IPv6 needs `mtu` >= 1280.
    pub fn wire_container_dual(&self, subnet: Ipv4Net, subnet6: Ipv6Net, mtu: Option<u32>) {
        self.wire_container(subnet, mtu);
        let gw = gateway6(subnet6);
        let len = subnet6.prefix_len();
        // nodad: usable at once, not tentative for a second.
        self.ns.ip(&format!("addr add {gw}/{len} dev cni0 nodad"));
        self.container.ip(&format!(
            "addr add {}/{len} dev eth0 nodad",
            container_ip6(subnet6)
        ));
        self.container.ip(&format!("-6 route add default via {gw}"));
    }

    /// Whether one ping from this host's container reaches `to`.
    pub fn ping(&self, to: Ipv4Addr) -> bool {
        self.container
            .exec(&["ping", "-c1", "-W1", &to.to_string()])
            .0
    }

    /// [`Host::ping`] over IPv6.
    pub fn ping6(&self, to: Ipv6Addr) -> bool {
        self.container
            .exec(&["ping", "-6", "-c1", "-W1", &to.to_string()])
            .0
    }

    /// Cuts this host off from `ips` (etcd) while it still reaches every other host: a /32
    /// blackhole beats the connected route.
    pub fn cut_off(&self, ips: &[Ipv4Addr]) {
        for ip in ips {
            self.ns.ip(&format!("route replace blackhole {ip}/32"));
        }
    }

    /// Ends a [`Host::cut_off`].
    pub fn reconnect(&self, ips: &[Ipv4Addr]) {
        for ip in ips {
            let _ = self.ns.try_ip(&format!("route del blackhole {ip}/32"));
        }
    }
}

/// A switch, its hosts and outsiders, and optionally etcd on the switch.
pub struct Lab {
    pub prefix: String,
    pub hosts: Vec<Host>,
    pub outsiders: Vec<Netns>,
    /// A kube-apiserver on the switch ([`Lab::start_kube`]); dropped before the namespaces.
    pub kube: Option<KubeApi>,
    /// Dropped before the namespaces (field order): etcd runs inside the switch.
    pub etcd: Option<Etcd>,
    pub switch: Netns,
    pub dir: TempDir,
    /// Hosts made so far, for unique port names.
    made: std::cell::Cell<usize>,
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Lab {
    /// A switch with bridge `br0` (addresses [`SWITCH_IP`]/24 and [`SWITCH_IP6`]/64) and nothing on
    /// it.
    pub fn new() -> Self {
        let prefix = unique_prefix();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .expect("lab dir");
        let switch = Netns::new(format!("{prefix}sw"));
        ipv6_on(&switch, false);
        switch.ip("link add br0 type bridge");
        switch.ip(&format!("addr add {SWITCH_IP}/24 dev br0"));
        if have_ipv6() {
            switch.ip(&format!("addr add {SWITCH_IP6}/64 dev br0 nodad"));
        }
        switch.ip("link set br0 up");
        Self {
            prefix,
            hosts: Vec::new(),
            outsiders: Vec::new(),
            kube: None,
            etcd: None,
            switch,
            dir,
            made: Default::default(),
        }
    }

    /// `n` hosts at 10.199.0.(11+i)/24 and fd00:10:199::(11+i)/64 with underlay MTU `mtu`,
    /// default routes of both families via the switch, and a one-member etcd on the switch.
    pub fn with_hosts(n: usize, mtu: u32) -> Self {
        let mut lab = Self::new();
        lab.switch.ip(&format!("link set br0 mtu {mtu}"));
        for i in 0..n {
            let addr = Ipv4Addr::new(10, 199, 0, 11 + i as u8);
            lab.add_host(&format!("{addr}/24"), mtu);
            let ns = &lab.hosts[i].ns;
            ns.ip(&format!("route add default via {SWITCH_IP}"));
            // As for IPv4: weftd's interface choice follows the default route.
            if have_ipv6() {
                ns.ip(&format!("-6 route add default via {SWITCH_IP6}"));
            }
        }
        lab.start_etcd(1);
        lab
    }

    /// Adds a host with `underlay` (CIDR) and its [`underlay_ip6`]/64 on `eth0` and forwarding on
    /// (both families); its container is wired later with [`Host::wire_container`].
    pub fn add_host(&mut self, underlay: &str, mtu: u32) -> &Host {
        let h = self.new_host(underlay, mtu);
        self.hosts.push(h);
        self.hosts.last().expect("just pushed")
    }

    /// Makes a host as [`Lab::add_host`] does but hands it to the caller, for suites that keep
    /// hosts in their own wrapper (its namespaces are still removed when it is dropped).
    pub fn new_host(&self, underlay: &str, mtu: u32) -> Host {
        let i = self.made.get();
        self.made.set(i + 1);
        let ns = Netns::new(format!("{}h{i}", self.prefix));
        let container = Netns::new(format!("{}c{i}", self.prefix));
        ipv6_on(&ns, true);
        ipv6_on(&container, false);
        self.plug(&ns, &format!("p{i}"), underlay, mtu);
        ns.must(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let dir = self.dir.path().join(&ns.name);
        std::fs::create_dir_all(&dir).expect("host dir");
        let underlay: Ipv4Net = underlay.parse().expect("underlay CIDR");
        Host {
            ns,
            container,
            underlay,
            underlay6: Ipv6Net::new(underlay_ip6(underlay.addr()), 64).expect("a /64"),
            dir,
        }
    }

    /// A machine outside the cluster on the switch, with `addr` (CIDR) and its [`underlay_ip6`]/64
    /// on eth0.
    pub fn add_outsider(&mut self, addr: &str) -> &Netns {
        let k = self.outsiders.len();
        let ns = Netns::new(format!("{}o{k}", self.prefix));
        ipv6_on(&ns, false);
        self.plug(&ns, &format!("o{k}"), addr, 1500);
        self.outsiders.push(ns);
        &self.outsiders[k]
    }

    fn plug(&self, ns: &Netns, port: &str, addr: &str, mtu: u32) {
        ns.ip(&format!(
            "link add eth0 mtu {mtu} type veth peer name {port} netns {}",
            self.switch.name
        ));
        self.switch
            .ip(&format!("link set {port} mtu {mtu} master br0 up"));
        ns.ip(&format!("addr add {addr} dev eth0"));
        if have_ipv6() {
            let v4: Ipv4Net = addr.parse().expect("underlay CIDR");
            let v6 = underlay_ip6(v4.addr());
            ns.ip(&format!("addr add {v6}/64 dev eth0 nodad"));
        }
        ns.ip("link set eth0 up");
    }

    /// etcd on the switch with `members` members (10.199.0.1, .2, …), replacing any before.
    pub fn start_etcd(&mut self, members: usize) -> &Etcd {
        self.etcd = None;
        let ips: Vec<Ipv4Addr> = (0..members)
            .map(|k| Ipv4Addr::new(10, 199, 0, 1 + k as u8))
            .collect();
        for ip in &ips[1..] {
            self.switch.ip(&format!("addr replace {ip}/24 dev br0"));
        }
        self.etcd = Some(Etcd::start_in(&self.switch, &ips));
        self.etcd()
    }

    pub fn etcd(&self) -> &Etcd {
        self.etcd.as_ref().expect("the lab has no etcd")
    }

    pub fn etcd_mut(&mut self) -> &mut Etcd {
        self.etcd.as_mut().expect("the lab has no etcd")
    }

    /// A [`KubeApi`] on the switch (replacing any before), kept in the lab and dropped before
    /// its namespaces.
    pub fn start_kube(&mut self, users: &[&str]) -> &KubeApi {
        self.kube = None;
        self.kube = Some(KubeApi::start(self, users));
        self.kube()
    }

    pub fn kube(&self) -> &KubeApi {
        self.kube.as_ref().expect("the lab has no kube-apiserver")
    }

    pub fn kube_mut(&mut self) -> &mut KubeApi {
        self.kube.as_mut().expect("the lab has no kube-apiserver")
    }

    /// The etcd members' addresses, for `-etcd-endpoints` and [`Host::cut_off`].
    pub fn etcd_ips(&self) -> Vec<Ipv4Addr> {
        self.etcd()
            .endpoint
            .split(',')
            .filter_map(|u| u.trim_start_matches("http://").split(':').next())
            .filter_map(|ip| ip.parse().ok())
            .collect()
    }
}

impl Drop for Lab {
    /// A failing test prints the end of its hosts' logs (weftd's, flanneld's: every `*.log` in a
    /// host's directory), which go with the lab's directory; etcd prints its own as it goes.
    /// Before the fields are dropped, but after a suite's own hosts (their processes killed, their
    /// logs still here).
    fn drop(&mut self) {
        crate::logs::print_if_panicking(self.dir.path(), 2);
    }
}

/// Whether a TCP server at `ip:port` answers from inside `ns` within `limit`.
pub fn wait_port(ns: &Netns, ip: Ipv4Addr, port: u16, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        let ok = ns.run_in(|| {
            std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_millis(200))
                .is_ok()
        });
        if ok {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_underlay_address_reads_like_its_ipv4_one() {
        assert_eq!(underlay_ip6(SWITCH_IP), SWITCH_IP6);
        let h: Ipv6Addr = "fd00:10:199::11".parse().expect("v6");
        assert_eq!(underlay_ip6(Ipv4Addr::new(10, 199, 0, 11)), h);
        let o: Ipv6Addr = "fd00:192:168:100::255".parse().expect("v6");
        assert_eq!(underlay_ip6(Ipv4Addr::new(192, 168, 100, 255)), o);
    }

    #[test]
    fn an_ipv6_lease_puts_the_gateway_and_the_container_where_ipv4_does() {
        let net: Ipv6Net = "fd42:244:0:3::/64".parse().expect("v6 net");
        assert_eq!(
            gateway6(net),
            "fd42:244:0:3::1".parse::<Ipv6Addr>().expect("v6")
        );
        assert_eq!(
            container_ip6(net),
            "fd42:244:0:3::2".parse::<Ipv6Addr>().expect("v6")
        );
    }
}
