//! `forward` and `agents`: judged on `iptables-save` output (and on a dual-stack network
//! `ip6tables-save`'s too, for `forward`).
//!
//! `forward` (flannel #2116, #699): Docker sets FORWARD's policy to DROP, and RHEL's default
//! rules end FORWARD with a REJECT; either drops pod traffic between hosts unless something
//! accepts the cluster network first (weft's FLANNEL-FWD, with -iptables-forward-rules on). The
//! IPv6 network's traffic takes ip6tables' FORWARD, judged the same way.
//!
//! `agents`: weft and flanneld write the same chains (`FLANNEL-POSTRTG`, `FLANNEL-FWD`) with the
//! same rules, so a second agent shows as rules for another subnet of the same network, or as
//! rules (or jumps) that appear twice.

use std::collections::BTreeMap;

use std::net::IpAddr;

use ipnet::IpNet;

use super::facts::{network, network6, Facts};
use super::lease::{own_subnet, own_subnet6};
use super::{Finding, Outcome};

/// One `iptables-save` table: chain policies and rules in order.
#[derive(Debug, Default)]
struct Table {
    policies: BTreeMap<String, String>,
    /// `(chain, rule body after "-A <chain> ")`.
    rules: Vec<(String, String)>,
}

impl Table {
    fn parse(text: &str) -> Self {
        let mut t = Self::default();
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                let mut parts = decl.split_whitespace();
                if let (Some(chain), Some(policy)) = (parts.next(), parts.next()) {
                    t.policies.insert(chain.into(), policy.into());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                if let Some((chain, body)) = rule.split_once(' ') {
                    t.rules.push((chain.into(), body.into()));
                }
            }
        }
        t
    }

    fn chain(&self, name: &str) -> impl Iterator<Item = &str> + '_ {
        let name = name.to_string();
        self.rules
            .iter()
            .filter(move |(c, _)| *c == name)
            .map(|(_, b)| b.as_str())
    }
}

/// A rule body split into words, a double-quoted string (a comment) being one word.
fn words(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in body.chars() {
        match ch {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The rule's `-j`/`-g` target.
fn target(w: &[String]) -> Option<&str> {
    w.windows(2)
        .find(|p| p[0] == "-j" || p[0] == "-g")
        .map(|p| p[1].as_str())
}

/// What a rule matches on, besides comments and its target (with the target's options).
/// `None` when it matches on something doctor does not judge (a port, a state, a mark, …).
fn simple_matches(w: &[String]) -> Option<Vec<(&str, &str)>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < w.len() {
        match w[i].as_str() {
            "-m" if w.get(i + 1).map(String::as_str) == Some("comment") => i += 4,
            "-j" | "-g" => break,
            o @ ("-s" | "-d" | "-i" | "-o") => {
                out.push((o, w.get(i + 1)?.as_str()));
                i += 2;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// A rule's `-s`/`-d` value, of either family (a single address: its /32 or /128).
fn net_of(s: &str) -> Option<IpNet> {
    (s.parse().ok()).or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// An interface pattern that names (or may name) a pod or overlay device.
fn pod_device(d: &str) -> bool {
    let d = d.strip_suffix('+').unwrap_or(d);
    ["flannel", "cni0", "docker0", "veth"]
        .iter()
        .any(|p| p.starts_with(d) || d.starts_with(p))
}

/// Whether `rule` accepts traffic of `network`: an ACCEPT on `-s`/`-d` inside it, or a bare
/// jump to a chain with such an ACCEPT (weft's FLANNEL-FWD).
fn accepts(t: &Table, rule: &str, network: IpNet) -> bool {
    let w = words(rule);
    let Some(m) = simple_matches(&w) else {
        return false;
    };
    let on_network = |m: &[(&str, &str)]| {
        !m.is_empty()
            && m.iter().all(|(o, v)| {
                (*o == "-s" || *o == "-d") && net_of(v).is_some_and(|n| network.contains(&n))
            })
    };
    match target(&w) {
        Some("ACCEPT") => on_network(&m),
        Some(chain) if m.is_empty() && t.policies.contains_key(chain) => t.chain(chain).any(|r| {
            let w = words(r);
            target(&w) == Some("ACCEPT") && simple_matches(&w).is_some_and(|m| on_network(&m))
        }),
        _ => false,
    }
}

/// Whether `rule` drops or rejects everything, or everything of pods and the overlay.
fn drops_pod_traffic(rule: &str, network: IpNet) -> bool {
    let w = words(rule);
    if !matches!(target(&w), Some("DROP" | "REJECT")) || w.iter().any(|x| x == "!") {
        return false;
    }
    simple_matches(&w).is_some_and(|m| {
        m.iter().all(|(o, v)| match *o {
            "-s" | "-d" => net_of(v).is_some_and(|n| n.contains(&network) || network.contains(&n)),
            _ => pod_device(v),
        })
    })
}

fn tables(f: &Facts) -> Result<(Table, Table, IpNet), Outcome> {
    let ipt = f
        .iptables
        .as_ref()
        .map_err(|e| Outcome::skip(format!("cannot read the rules: {e}")))?;
    let network = network(f).ok_or_else(|| {
        Outcome::skip(format!(
            "needs the network ({} or subnet.env)",
            f.store_name()
        ))
    })?;
    Ok((
        Table::parse(&ipt.filter),
        Table::parse(&ipt.nat),
        network.into(),
    ))
}

/// `forward`: pod traffic between hosts gets through FORWARD.
pub fn forward(f: &Facts) -> Outcome {
    let mut out = forwarding(f);
    match forward_rules(f) {
        Outcome::Ran(found) => out.extend(found),
        Outcome::Skipped(why) if out.is_empty() => return Outcome::Skipped(why),
        Outcome::Skipped(_) => {}
    }
    out.into()
}

/// The kernel forwards pod traffic at all: IPv4, and IPv6 on a dual-stack network (weft sets
/// neither; Docker sets IPv4's, nothing sets IPv6's).
fn forwarding(f: &Facts) -> Vec<Finding> {
    let Ok(k) = &f.kernel else {
        return Vec::new();
    };
    let dual = network6(f).is_some();
    let mut out = Vec::new();
    for (off, family, key) in [
        (
            k.ipv4_forwarding == Some(false),
            "IPv4",
            "net.ipv4.ip_forward",
        ),
        (
            dual && k.ipv6_forwarding == Some(false),
            "IPv6",
            "net.ipv6.conf.all.forwarding",
        ),
    ] {
        if off {
            out.push(Finding::new(
                format!(
                    "{key} is 0: this host forwards no {family} pod traffic to or from other hosts"
                ),
                format!("`sysctl -w {key}=1`, and set it in /etc/sysctl.d/ so that it stays"),
            ));
        }
    }
    out
}

/// One family's rules, for messages: the tool that writes them, and where they are said to be.
struct Family {
    tool: &'static str,
    place: &'static str,
}

const IPV4: Family = Family {
    tool: "iptables",
    place: "",
};

const IPV6: Family = Family {
    tool: "ip6tables",
    place: " in ip6tables",
};

/// FORWARD's rules and policy let the cluster network through: iptables' for IPv4, and
/// ip6tables' for the IPv6 network of a dual-stack one.
fn forward_rules(f: &Facts) -> Outcome {
    let (filter, _, network) = match tables(f) {
        Ok(t) => t,
        Err(o) => return o,
    };
    let mut out = forward_path(&IPV4, &filter, network);
    match (network6(f), &f.ip6tables) {
        (Some(network6), Some(Ok(t))) => {
            out.extend(forward_path(&IPV6, &Table::parse(&t.filter), network6.into()));
        }
        // IPv4's were readable: say what is missing rather than skip what was judged.
        (Some(network6), Some(Err(e))) => out.push(Finding::warning(
            format!("the IPv6 rules cannot be read ({e}): whether FORWARD lets {network6} through is not checked"),
            "install ip6tables (weftd needs it too, for its rules on a dual-stack network) and run \
             doctor as root",
        )),
        _ => {}
    }
    out.into()
}

/// Whether one family's FORWARD (its `filter` table) lets `network` through: accepted before
/// any rule that drops it, or a policy that does not.
fn forward_path(family: &Family, filter: &Table, network: IpNet) -> Vec<Finding> {
    let Family { tool, place } = family;
    for (i, rule) in filter.chain("FORWARD").enumerate() {
        if accepts(filter, rule, network) {
            return Vec::new();
        }
        if drops_pod_traffic(rule, network) {
            return vec![Finding::new(
                format!(
                    "FORWARD rule {}{place} `-A FORWARD {rule}` drops pod traffic before anything \
                     accepts the cluster network {network} (flannel #2116)",
                    i + 1
                ),
                format!(
                    "accept the network above it (`{tool} -I FORWARD {} -s {network} -j \
                     ACCEPT` and the same with -d), or remove it",
                    i + 1
                ),
            )];
        }
    }
    match filter.policies.get("FORWARD").map(String::as_str) {
        Some(p @ ("DROP" | "REJECT")) => vec![Finding::new(
            format!(
                "FORWARD's policy{place} is {p} (Docker sets it) and no rule accepts the cluster \
                 network {network}: pods on other hosts are unreachable (flannel #699)"
            ),
            format!(
                "run weftd with -iptables-forward-rules=true (the default), or `{tool} -P \
                 FORWARD ACCEPT`"
            ),
        )],
        _ => Vec::new(),
    }
}

/// `agents`: nothing but this weftd writes this network's rules into flannel's chains, in
/// iptables and, on a dual-stack network, in ip6tables.
pub fn agents(f: &Facts) -> Outcome {
    let (filter, nat, network) = match tables(f) {
        Ok(t) => t,
        Err(o) => return o,
    };
    let own = own_subnet(f).map(IpNet::V4);
    let mut out = agents_in(&IPV4, (&filter, &nat), network, own);
    if let (Some(network6), Some(Ok(t))) = (network6(f), &f.ip6tables) {
        let (filter, nat) = (Table::parse(&t.filter), Table::parse(&t.nat));
        let own6 = own_subnet6(f).map(IpNet::V6);
        out.extend(agents_in(&IPV6, (&filter, &nat), network6.into(), own6));
    }
    out.into()
}

/// One family's flannel chains: no rule twice, one jump each, no rules of another lease of
/// `network` than this host's `own`.
fn agents_in(
    family: &Family,
    (filter, nat): (&Table, &Table),
    network: IpNet,
    own: Option<IpNet>,
) -> Vec<Finding> {
    let place = family.place;
    let stop_other = "stop the other agent (`systemctl disable --now flanneld`, or the second \
                      weftd); weftd then keeps one set of rules";
    let mut out = Vec::new();
    for (table, chain, parent) in [
        (nat, "FLANNEL-POSTRTG", "POSTROUTING"),
        (filter, "FLANNEL-FWD", "FORWARD"),
    ] {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for r in table.chain(chain) {
            *seen.entry(r).or_default() += 1;
        }
        for (rule, n) in seen.iter().filter(|(_, n)| **n > 1) {
            out.push(Finding::new(
                format!(
                    "`-A {chain} {rule}` is in {chain}{place} {n} times: two agents append to it"
                ),
                stop_other,
            ));
        }
        let jumps = table
            .chain(parent)
            .filter(|r| target(&words(r)) == Some(chain))
            .count();
        if jumps > 1 {
            out.push(Finding::new(
                format!("{parent}{place} jumps to {chain} {jumps} times: two agents add the jump"),
                stop_other,
            ));
        }
    }
    if let Some(own) = own {
        let mut others: Vec<IpNet> = Vec::new();
        for r in nat.chain("FLANNEL-POSTRTG") {
            let w = words(r);
            for p in w.windows(2).filter(|p| p[0] == "-s" || p[0] == "-d") {
                if let Some(n) = net_of(&p[1]) {
                    if n != network && n != own && network.contains(&n) && !others.contains(&n) {
                        others.push(n);
                    }
                }
            }
        }
        for n in others {
            out.push(Finding::new(
                format!(
                    "FLANNEL-POSTRTG{place} has rules for {n} of {network}, but this host's \
                     lease is {own}: another agent with another lease (flanneld?) writes the \
                     same chains, and the two rewrite each other's rules"
                ),
                stop_other,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::facts::Iptables;
    use super::super::testing::{self, problems_of, FILTER, NAT};
    use super::*;

    fn with(filter: &str, nat: &str) -> Facts {
        let mut f = testing::healthy();
        f.iptables = Ok(Iptables {
            filter: filter.into(),
            nat: nat.into(),
        });
        f
    }

    fn texts(o: Outcome) -> Vec<String> {
        problems_of(o).into_iter().map(|f| f.problem).collect()
    }

    #[test]
    fn words_keep_quoted_comments_whole() {
        assert_eq!(
            words("-s 10.0.0.0/8 -m comment --comment \"flanneld forward\" -j ACCEPT"),
            [
                "-s",
                "10.0.0.0/8",
                "-m",
                "comment",
                "--comment",
                "flanneld forward",
                "-j",
                "ACCEPT"
            ]
        );
    }

    #[test]
    fn docker_policy_drop_with_weft_rules_is_fine() {
        assert_eq!(texts(forward(&testing::healthy())), Vec::<String>::new());
        assert_eq!(texts(agents(&testing::healthy())), Vec::<String>::new());
    }

    #[test]
    fn a_kernel_that_does_not_forward_is_named_and_ipv6_only_on_a_dual_stack_network() {
        let mut f = testing::healthy();
        if let Ok(k) = &mut f.kernel {
            k.ipv4_forwarding = Some(false);
            k.ipv6_forwarding = Some(false);
        }
        let p = texts(forward(&f));
        assert_eq!(
            p.len(),
            1,
            "IPv6 is none of an IPv4 network's business: {p:?}"
        );
        assert!(p[0].starts_with("net.ipv4.ip_forward is 0"), "{p:?}");
        testing::cluster(&mut f).config = crate::config::NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/48","Backend":{"Type":"vxlan"}}"#,
        )
        .map_err(|e| e.to_string());
        let p = texts(forward(&f));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[1].starts_with("net.ipv6.conf.all.forwarding is 0"),
            "{p:?}"
        );
        // Unknown (no IPv6 in the kernel, an unreadable file): nothing said.
        if let Ok(k) = &mut f.kernel {
            k.ipv4_forwarding = None;
            k.ipv6_forwarding = None;
        }
        assert_eq!(texts(forward(&f)), Vec::<String>::new());
    }

    #[test]
    fn policy_drop_without_forward_rules_drops_pod_traffic() {
        let filter = FILTER.replace(
            "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n",
            "",
        );
        let p = texts(forward(&with(&filter, NAT)));
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("FORWARD's policy is DROP"), "{p:?}");
        // With policy ACCEPT nothing is dropped.
        let accept = filter.replace(":FORWARD DROP", ":FORWARD ACCEPT");
        assert_eq!(texts(forward(&with(&accept, NAT))), Vec::<String>::new());
    }

    #[test]
    fn a_reject_before_the_weft_jump_drops_pod_traffic() {
        let filter = FILTER.replace(
            "-A FORWARD -m comment --comment \"flanneld forward\"",
            "-A FORWARD -j REJECT --reject-with icmp-host-prohibited\n-A FORWARD -m comment --comment \"flanneld forward\"",
        );
        let p = texts(forward(&with(&filter, NAT)));
        assert_eq!(p, ["FORWARD rule 3 `-A FORWARD -j REJECT --reject-with icmp-host-prohibited` drops pod traffic before anything accepts the cluster network 10.244.0.0/16 (flannel #2116)"]);
        // After the jump it no longer matters; a rule that matches a port is not judged.
        let after = FILTER.replace("COMMIT", "-A FORWARD -j REJECT\nCOMMIT");
        assert_eq!(texts(forward(&with(&after, NAT))), Vec::<String>::new());
        let port = filter.replace("-j REJECT --reject", "-p tcp --dport 22 -j REJECT --reject");
        assert_eq!(texts(forward(&with(&port, NAT))), Vec::<String>::new());
        let cni = filter.replace("-A FORWARD -j REJECT", "-A FORWARD -o cni0 -j DROP");
        assert_eq!(texts(forward(&with(&cni, NAT))).len(), 1);
    }

    /// [`testing::dual_stack`]'s host with ip6tables' filter table edited by `edit`.
    fn dual_with(edit: impl Fn(&str) -> String) -> Facts {
        let mut f = testing::dual_stack();
        if let Some(Ok(t)) = &mut f.ip6tables {
            t.filter = edit(&t.filter);
        }
        f
    }

    #[test]
    fn a_dual_stack_networks_ipv6_forward_path_is_judged_in_ip6tables() {
        assert_eq!(texts(forward(&testing::dual_stack())), Vec::<String>::new());
        let no_jump = dual_with(|t| {
            t.replace(
                "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n",
                "",
            )
        });
        let p = problems_of(forward(&no_jump));
        assert_eq!(
            p.iter().map(|f| f.problem.as_str()).collect::<Vec<_>>(),
            ["FORWARD's policy in ip6tables is DROP (Docker sets it) and no rule accepts the cluster network fd00:244::/48: pods on other hosts are unreachable (flannel #699)"]
        );
        assert!(p[0].fix.contains("`ip6tables -P FORWARD ACCEPT`"), "{p:?}");
    }

    #[test]
    fn a_reject_before_the_weft_jump_in_ip6tables_drops_ipv6_pod_traffic() {
        let f = dual_with(|t| {
            t.replace(
                "-A FORWARD -m comment --comment \"flanneld forward\"",
                "-A FORWARD -j REJECT --reject-with icmp6-adm-prohibited\n-A FORWARD -m comment --comment \"flanneld forward\"",
            )
        });
        let p = problems_of(forward(&f));
        assert_eq!(
            p.iter().map(|f| f.problem.as_str()).collect::<Vec<_>>(),
            ["FORWARD rule 3 in ip6tables `-A FORWARD -j REJECT --reject-with icmp6-adm-prohibited` drops pod traffic before anything accepts the cluster network fd00:244::/48 (flannel #2116)"]
        );
        assert!(
            p[0].fix.contains(
                "`ip6tables -I FORWARD 3 -s fd00:244::/48 -j ACCEPT` and the same with -d"
            ),
            "{p:?}"
        );
        // An ACCEPT of the IPv6 network (or of a part of it, by address) before it lets it through.
        let accepted = dual_with(|t| {
            t.replace(
                "-A FORWARD -j DOCKER-USER",
                "-A FORWARD -s fd00:244::/48 -j ACCEPT\n-A FORWARD -d fd00:244:0:1::5 -j ACCEPT\n-A FORWARD -j REJECT",
            )
        });
        assert_eq!(texts(forward(&accepted)), Vec::<String>::new());
    }

    #[test]
    fn ipv4_rules_do_not_let_the_ipv6_network_through() {
        // ip6tables as iptables is: weft's rules for 10.244.0.0/16, none for fd00:244::/48.
        let f = dual_with(|_| FILTER.to_string());
        let p = texts(forward(&f));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("FORWARD's policy in ip6tables is DROP"),
            "{p:?}"
        );
    }

    #[test]
    fn unreadable_ip6tables_is_a_warning_beside_judged_ipv4_rules() {
        let mut f = testing::dual_stack();
        f.ip6tables = Some(Err("ip6tables-save -t filter: not found".into()));
        let found = problems_of(forward(&f));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].warning, "{found:?}");
        assert_eq!(found[0].problem, "the IPv6 rules cannot be read (ip6tables-save -t filter: not found): whether FORWARD lets fd00:244::/48 through is not checked");
        // On an IPv4 network ip6tables is not read, and nothing is said of it.
        let mut f = testing::healthy();
        f.ip6tables = Some(Err("not read".into()));
        assert_eq!(problems_of(forward(&f)), vec![]);
    }

    #[test]
    fn a_second_agents_subnet_and_duplicated_rules_are_named() {
        let nat = NAT.replace(
            "COMMIT",
            "-A FLANNEL-POSTRTG -s 10.244.9.0/24 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\n\
             -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\nCOMMIT",
        );
        let filter = FILTER.replace(
            "COMMIT",
            "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\nCOMMIT",
        );
        let p = texts(agents(&with(&filter, &nat)));
        assert_eq!(
            p,
            [
                "POSTROUTING jumps to FLANNEL-POSTRTG 2 times: two agents add the jump",
                "`-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT` is in FLANNEL-FWD 2 times: two agents append to it",
                "FLANNEL-POSTRTG has rules for 10.244.9.0/24 of 10.244.0.0/16, but this host's lease is 10.244.1.0/24: another agent with another lease (flanneld?) writes the same chains, and the two rewrite each other's rules",
            ]
        );
    }

    #[test]
    fn a_second_agent_in_ip6tables_is_named_there() {
        let healthy = testing::dual_stack();
        assert_eq!(texts(agents(&healthy)), Vec::<String>::new());
        let mut f = testing::dual_stack();
        if let Some(Ok(t)) = &mut f.ip6tables {
            t.nat = t.nat.replace(
                "COMMIT",
                "-A FLANNEL-POSTRTG -s fd00:244:0:9::/64 -d fd00:244::/48 -m comment --comment \"flanneld masq\" -j RETURN\n\
                 -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\nCOMMIT",
            );
        }
        assert_eq!(
            texts(agents(&f)),
            [
                "POSTROUTING in ip6tables jumps to FLANNEL-POSTRTG 2 times: two agents add the jump",
                "FLANNEL-POSTRTG in ip6tables has rules for fd00:244:0:9::/64 of fd00:244::/48, but this host's lease is fd00:244:0:1::/64: another agent with another lease (flanneld?) writes the same chains, and the two rewrite each other's rules",
            ]
        );
    }

    #[test]
    fn another_networks_rules_are_not_a_second_agent() {
        let nat = NAT.replace(
            "COMMIT",
            "-A FLANNEL-POSTRTG -s 10.245.3.0/24 -d 10.245.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\nCOMMIT",
        );
        assert_eq!(texts(agents(&with(FILTER, &nat))), Vec::<String>::new());
    }

    #[test]
    fn unreadable_rules_skip() {
        let mut f = testing::healthy();
        f.iptables = Err("iptables-save: not found".into());
        assert!(matches!(forward(&f), Outcome::Skipped(_)));
    }
}
