//! The peer rules as specifications, then the property that the set is a function of what is
//! stored, whatever the order of events.

use super::*;

const P: &str = "/p/subnets/";
const OWN_MAC: &str = "02:00:00:00:00:01";

fn key(name: &str) -> String {
    format!("{P}{name}")
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// vxlan's VtepMAC `s` as the peer set indexes it.
fn mac(s: &str) -> Identity {
    let m: weft_backends::mac::Mac = s.parse().unwrap();
    Identity::new(vtep_mac_kind(), &m.0)
}

fn vtep_mac_kind() -> &'static IdentityKind {
    weft_backends::kind("vxlan")
        .and_then(|k| k.identity_kind)
        .unwrap()
}

/// Rejected for a VtepMAC that is missing or unusable, with this reason.
fn bad_mac(reason: &Option<Reason>, says: &str) -> bool {
    matches!(reason, Some(Reason::BadIdentity { kind: Some(k), reason })
        if *k == vtep_mac_kind() && reason.contains(says))
}

/// This host: 10.60.52.0/24 at 10.199.0.11 (also 192.168.9.9), VTEP MAC 02:00:00:00:00:01.
fn own_at(subnet: &str) -> Own {
    let n = net(subnet);
    Own {
        key: key(&format!("{}-{}", n.addr(), n.prefix_len())),
        subnet: n,
        ipv6_subnet: None,
        identity: Some(mac(OWN_MAC)),
        identity6: None,
    }
}

fn local() -> HashSet<IpAddr> {
    [ip("10.199.0.11"), ip("192.168.9.9")]
        .map(IpAddr::V4)
        .into()
}

/// Network 10.60.0.0/16 with SubnetLen 24.
fn set_with(own: Own) -> PeerSet {
    PeerSet::new(net("10.60.0.0/16"), 24, own, local())
}

fn set() -> PeerSet {
    set_with(own_at("10.60.52.0/24"))
}

fn vxlan(public_ip: &str, vtep: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{vtep}"}}}}"#
    )
}

fn udp(public_ip: &str) -> String {
    format!(r#"{{"PublicIP":"{public_ip}"}}"#)
}

/// A put of `value` at `subnets/<name>`, created at revision `rev`.
fn put(name: &str, rev: i64, value: &str) -> Change {
    Change::Put(crate::registry::etcd::decode(
        key(name),
        P,
        value.as_bytes(),
        rev,
        rev,
        0,
    ))
}

fn del(name: &str) -> Change {
    Change::Delete(key(name))
}

/// The accepted peers as (key name, PublicIP).
fn peers(s: &PeerSet) -> Vec<(String, Ipv4Addr)> {
    s.peers()
        .map(|(k, l)| (k.trim_start_matches(P).to_string(), l.attrs.public_ip))
        .collect()
}

fn names(list: &[Peer]) -> Vec<&str> {
    list.iter().map(|p| p.key.trim_start_matches(P)).collect()
}

/// The reason `name` is rejected for, if it is.
fn reason(s: &PeerSet, name: &str) -> Option<Reason> {
    match s.verdict(&key(name))? {
        Verdict::Rejected(r) => Some(r),
        _ => None,
    }
}

/// Dual-stack: also fd00:60::/48 with /64 subnets; this host also holds fd00:60:0:34::/64 and
/// has fd00:199::11.
fn dual_set() -> PeerSet {
    let own = Own {
        key: key("10.60.52.0-24&fd00:60:0:34::-64"),
        ipv6_subnet: Some("fd00:60:0:34::/64".parse().unwrap()),
        ..own_at("10.60.52.0/24")
    };
    let mut local = local();
    local.insert("fd00:199::11".parse().unwrap());
    PeerSet::new(net("10.60.0.0/16"), 24, own, local).with_ipv6(Some(Ipv6Scope {
        network: "fd00:60::/48".parse().unwrap(),
        subnet_len: 64,
    }))
}

fn udp6(public_ip: &str, public_ipv6: &str) -> String {
    format!(r#"{{"PublicIP":"{public_ip}","PublicIPv6":"{public_ipv6}","BackendType":"host-gw"}}"#)
}

#[test]
fn a_dual_stack_peer_reaches_the_data_plane_with_both_subnets() {
    let mut s = dual_set();
    let d = s.apply(put(
        "10.60.7.0-24&fd00:60:0:7::-64",
        5,
        &udp6("10.199.0.12", "fd00:199::12"),
    ));
    assert_eq!(names(&d.added), ["10.60.7.0-24&fd00:60:0:7::-64"]);
    let l = s
        .backend_peer(&key("10.60.7.0-24&fd00:60:0:7::-64"))
        .unwrap();
    let v6 = l.ipv6.expect("the IPv6 side");
    assert_eq!(v6.subnet.to_string(), "fd00:60:0:7::/64");
    assert_eq!(v6.public_ip, Some("fd00:199::12".parse().unwrap()));
    // A host leasing IPv4 only (an older config, a flanneld without IPv6) is an IPv4 peer.
    s.apply(put("10.60.8.0-24", 6, &udp("10.199.0.13")));
    assert_eq!(s.backend_peer(&key("10.60.8.0-24")).unwrap().ipv6, None);
    // And a peer may publish no PublicIPv6: its subnet is known, unreachable.
    let d = s.apply(put("10.60.9.0-24&fd00:60:0:9::-64", 7, &udp("10.199.0.14")));
    assert_eq!(d.added.len(), 1);
}

#[test]
fn the_ipv6_side_is_judged_by_the_ipv4_sides_rules() {
    let mut s = dual_set();
    let cases = [
        (
            "10.60.7.0-24&fd00:61:0:7::-64",
            "fd00:199::12",
            Reason::OutsideNetwork("fd00:60::/48".parse::<Ipv6Net>().unwrap().into()),
        ),
        (
            "10.60.7.0-24&fd00:60:0:7::-80",
            "fd00:199::12",
            Reason::WrongLength {
                len: 80,
                want: 64,
                v6: true,
            },
        ),
        (
            "10.60.7.0-24&fd00:60:0:34::-64",
            "fd00:199::12",
            Reason::OverlapsOwn("fd00:60:0:34::/64".parse::<Ipv6Net>().unwrap().into()),
        ),
        (
            "10.60.7.0-24&fd00:60:0:7::-64",
            "fe80::12",
            Reason::PublicIpNotUnicast("fe80::12".parse::<IpAddr>().unwrap()),
        ),
        (
            "10.60.7.0-24&fd00:60:0:7::-64",
            "ff02::1",
            Reason::PublicIpNotUnicast("ff02::1".parse::<IpAddr>().unwrap()),
        ),
        (
            "10.60.7.0-24&fd00:60:0:7::-64",
            "fd00:199::11",
            Reason::PublicIpLocal("fd00:199::11".parse::<IpAddr>().unwrap()),
        ),
    ];
    for (name, v6, want) in cases {
        let d = s.apply(put(name, 5, &udp6("10.199.0.12", v6)));
        assert_eq!(reason(&s, name).as_ref(), Some(&want), "{name} {v6}");
        assert!(d.added.is_empty(), "{name} {v6}");
        s.apply(del(name));
    }
    assert_eq!(
        Reason::WrongLength {
            len: 80,
            want: 64,
            v6: true
        }
        .to_string(),
        "a /80 is not a subnet of this network (IPv6SubnetLen 64)"
    );
    assert_eq!(
        Reason::PublicIpLocal("fd00:199::11".parse::<IpAddr>().unwrap()).to_string(),
        "PublicIPv6 fd00:199::11 is an address of this host"
    );
}

#[test]
fn of_two_leases_holding_one_ipv6_subnet_the_older_wins_and_the_other_follows_when_it_goes() {
    let mut s = dual_set();
    s.apply(put(
        "10.60.7.0-24&fd00:60:0:7::-64",
        5,
        &udp6("10.199.0.12", "fd00:199::12"),
    ));
    let d = s.apply(put(
        "10.60.8.0-24&fd00:60:0:7::-64",
        9,
        &udp6("10.199.0.13", "fd00:199::13"),
    ));
    assert!(d.added.is_empty());
    assert_eq!(
        reason(&s, "10.60.8.0-24&fd00:60:0:7::-64"),
        Some(Reason::SubnetTaken(
            "fd00:60:0:7::/64".parse::<Ipv6Net>().unwrap().into()
        ))
    );
    let d = s.apply(del("10.60.7.0-24&fd00:60:0:7::-64"));
    assert_eq!(names(&d.added), ["10.60.8.0-24&fd00:60:0:7::-64"]);
}

#[test]
fn keys_differing_only_in_their_ipv6_part_contend_for_the_ipv4_subnet() {
    let mut s = dual_set();
    s.apply(put("10.60.7.0-24", 5, &udp("10.199.0.12")));
    s.apply(put(
        "10.60.7.0-24&fd00:60:0:7::-64",
        9,
        &udp6("10.199.0.13", "fd00:199::13"),
    ));
    assert_eq!(peers(&s), [("10.60.7.0-24".into(), ip("10.199.0.12"))]);
    assert_eq!(
        reason(&s, "10.60.7.0-24&fd00:60:0:7::-64"),
        Some(Reason::SubnetTaken(net("10.60.7.0/24").into()))
    );
}

fn vxlan6(public_ip: &str, vtep: &str, vtep6: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":"fd00:199::99","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{vtep}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{vtep6}"}}}}"#
    )
}

#[test]
fn the_ipv6_devices_vtep_mac_is_held_by_the_older_lease_and_never_this_hosts() {
    let mut s = dual_set();
    s.apply(put(
        "10.60.7.0-24&fd00:60:0:7::-64",
        5,
        &vxlan6("10.199.0.12", "02:00:00:00:00:07", "02:00:00:00:06:07"),
    ));
    // Another IPv6 device behind the same MAC: the older lease keeps it.
    let d = s.apply(put(
        "10.60.8.0-24&fd00:60:0:8::-64",
        9,
        &vxlan6("10.199.0.13", "02:00:00:00:00:08", "02:00:00:00:06:07"),
    ));
    assert!(d.added.is_empty());
    assert_eq!(
        reason(&s, "10.60.8.0-24&fd00:60:0:8::-64"),
        Some(Reason::IdentityTaken(mac("02:00:00:00:06:07")))
    );
    assert_eq!(
        d.rejected[0].holder.as_deref(),
        Some(&*key("10.60.7.0-24&fd00:60:0:7::-64"))
    );
    // One host's IPv4 MAC on another's IPv6 device is another device: no clash.
    let d = s.apply(put(
        "10.60.9.0-24&fd00:60:0:9::-64",
        10,
        &vxlan6("10.199.0.14", "02:00:00:00:00:09", "02:00:00:00:00:07"),
    ));
    assert_eq!(d.added.len(), 1, "{d:?}");
    // This host's own IPv6 MAC, and BackendV6Data without a usable one.
    let own = Own {
        identity6: Some(mac("02:00:00:00:06:01")),
        ..s.own().clone()
    };
    let mut b = s.edit();
    b.set_own(own);
    b.finish();
    s.apply(put(
        "10.60.10.0-24&fd00:60:0:a::-64",
        11,
        &vxlan6("10.199.0.15", "02:00:00:00:00:0a", "02:00:00:00:06:01"),
    ));
    assert_eq!(
        reason(&s, "10.60.10.0-24&fd00:60:0:a::-64"),
        Some(Reason::IdentityOwn(mac("02:00:00:00:06:01")))
    );
    s.apply(put(
        "10.60.11.0-24&fd00:60:0:b::-64",
        12,
        &vxlan6("10.199.0.16", "02:00:00:00:00:0b", "ff:ff:ff:ff:ff:ff"),
    ));
    let r = reason(&s, "10.60.11.0-24&fd00:60:0:b::-64");
    assert!(
        matches!(&r, Some(Reason::BadIdentity { reason, .. }) if reason.starts_with("BackendV6Data")),
        "{r:?}"
    );
}

#[test]
fn on_an_ipv4_network_a_leases_ipv6_side_is_not_judged() {
    let mut s = set();
    s.apply(put(
        "10.60.7.0-24&fd00:60:0:7::-64",
        5,
        &udp6("10.199.0.12", "fe80::1"),
    ));
    s.apply(put(
        "10.60.8.0-24&fd00:60:0:7::-64",
        6,
        &udp6("10.199.0.13", "fd00:199::13"),
    ));
    assert_eq!(s.len(), 2, "no IPv6 side to judge or to contend for");
}

#[test]
fn a_well_formed_lease_of_another_host_is_a_peer() {
    let mut s = set();
    let d = s.apply(put(
        "10.60.7.0-24",
        5,
        &vxlan("10.199.0.12", "02:00:00:00:00:07"),
    ));
    assert_eq!(names(&d.added), ["10.60.7.0-24"]);
    assert!(d.rejected.is_empty());
    let d = s.apply(put("10.60.8.0-24", 6, &udp("10.199.0.13")));
    assert_eq!(names(&d.added), ["10.60.8.0-24"]);
    assert_eq!(
        peers(&s),
        [
            ("10.60.7.0-24".into(), ip("10.199.0.12")),
            ("10.60.8.0-24".into(), ip("10.199.0.13"))
        ]
    );
}

#[test]
fn a_longer_prefix_inside_this_hosts_subnet_captures_nothing() {
    // Issue 9, defect 2: a /25 inside our /24 would beat the bridge's connected route.
    let mut s = set();
    let d = s.apply(put("10.60.52.128-25", 5, &udp("10.199.0.12")));
    assert!(d.added.is_empty());
    assert_eq!(
        d.rejected[0].reason,
        Reason::WrongLength {
            len: 25,
            want: 24,
            v6: false
        }
    );
    assert!(s.is_empty());
}

#[test]
fn a_subnet_of_another_length_or_outside_the_network_is_refused() {
    let mut s = set();
    s.apply(put("10.60.0.0-16", 1, &udp("10.199.0.12")));
    s.apply(put("10.60.6.0-23", 2, &udp("10.199.0.12")));
    s.apply(put("10.61.7.0-24", 3, &udp("10.199.0.12")));
    s.apply(put("0.0.0.0-0", 4, &udp("10.199.0.12")));
    assert_eq!(
        reason(&s, "10.60.0.0-16"),
        Some(Reason::WrongLength {
            len: 16,
            want: 24,
            v6: false
        })
    );
    assert_eq!(
        reason(&s, "10.60.6.0-23"),
        Some(Reason::WrongLength {
            len: 23,
            want: 24,
            v6: false
        })
    );
    let outside = Some(Reason::OutsideNetwork(net("10.60.0.0/16").into()));
    assert_eq!(reason(&s, "10.61.7.0-24"), outside);
    assert_eq!(reason(&s, "0.0.0.0-0"), outside);
    assert!(s.is_empty());
}

#[test]
fn a_subnet_overlapping_this_hosts_is_refused_whatever_the_lengths() {
    // This host still holds a /23 from before SubnetLen became 24.
    let mut s = set_with(own_at("10.60.52.0/23"));
    let d = s.apply(put("10.60.53.0-24", 5, &udp("10.199.0.12")));
    assert_eq!(
        d.rejected[0].reason,
        Reason::OverlapsOwn(net("10.60.52.0/23").into())
    );
    assert_eq!(
        d.rejected[0].holder.as_deref(),
        Some("/p/subnets/10.60.52.0-23")
    );
    s.apply(put("10.60.54.0-24", 6, &udp("10.199.0.12")));
    assert_eq!(peers(&s), [("10.60.54.0-24".into(), ip("10.199.0.12"))]);
}

#[test]
fn the_public_ip_must_be_a_unicast_address_of_another_host() {
    let mut s = set();
    for (i, bad) in [
        "0.0.0.0",
        "0.1.2.3",
        "127.0.0.1",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("10.60.{i}.0-24");
        s.apply(put(&name, 1, &vxlan(bad, "02:00:00:00:00:07")));
        assert_eq!(
            reason(&s, &name),
            Some(Reason::PublicIpNotUnicast(ip(bad).into())),
            "{bad}"
        );
    }
    // Any address of this host, not only the one it publishes.
    s.apply(put("10.60.20.0-24", 1, &udp("192.168.9.9")));
    assert_eq!(
        reason(&s, "10.60.20.0-24"),
        Some(Reason::PublicIpLocal(ip("192.168.9.9").into()))
    );
    assert!(s.is_empty());
}

#[test]
fn a_vxlan_lease_needs_a_unicast_non_zero_vtep_mac_that_is_not_ours() {
    let mut s = set();
    let no_mac = r#"{"PublicIP":"10.199.0.12","BackendType":"vxlan","BackendData":{"VNI":1}}"#;
    s.apply(put("10.60.1.0-24", 1, no_mac));
    s.apply(put(
        "10.60.2.0-24",
        2,
        &vxlan("10.199.0.12", "00:00:00:00:00:00"),
    ));
    s.apply(put(
        "10.60.3.0-24",
        3,
        &vxlan("10.199.0.12", "ff:ff:ff:ff:ff:ff"),
    ));
    s.apply(put("10.60.4.0-24", 4, &vxlan("10.199.0.12", "not-a-mac")));
    s.apply(put("10.60.5.0-24", 5, &vxlan("10.199.0.12", OWN_MAC)));
    assert!(bad_mac(
        &reason(&s, "10.60.1.0-24"),
        "BackendData has no VtepMAC"
    ));
    for name in ["10.60.2.0-24", "10.60.3.0-24"] {
        assert!(bad_mac(&reason(&s, name), "is not a unicast address"));
    }
    assert!(bad_mac(&reason(&s, "10.60.4.0-24"), "invalid MAC address"));
    assert_eq!(
        reason(&s, "10.60.5.0-24"),
        Some(Reason::IdentityOwn(mac(OWN_MAC)))
    );
    assert!(s.is_empty());
    // Other backends publish no MAC and need none.
    s.apply(put("10.60.6.0-24", 6, &udp("10.199.0.12")));
    assert_eq!(s.len(), 1);
}

#[test]
fn of_two_leases_with_one_vtep_mac_the_newer_is_refused_not_the_higher_subnet() {
    let m = "02:00:00:00:00:09";
    let mut s = set();
    s.apply(put("10.60.9.0-24", 5, &vxlan("10.199.0.19", m)));
    let d = s.apply(put("10.60.1.0-24", 7, &vxlan("10.199.0.21", m)));
    assert!(d.added.is_empty(), "{d:?}");
    assert_eq!(d.rejected[0].reason, Reason::IdentityTaken(mac(m)));
    assert_eq!(
        d.rejected[0].holder.as_deref(),
        Some("/p/subnets/10.60.9.0-24")
    );
    assert_eq!(peers(&s), [("10.60.9.0-24".into(), ip("10.199.0.19"))]);

    // The same two leases arriving the other way round end the same way.
    let mut t = set();
    t.apply(put("10.60.1.0-24", 7, &vxlan("10.199.0.21", m)));
    let d = t.apply(put("10.60.9.0-24", 5, &vxlan("10.199.0.19", m)));
    assert_eq!(names(&d.added), ["10.60.9.0-24"]);
    assert_eq!(names(&d.removed), ["10.60.1.0-24"]);
    assert_eq!(peers(&t), peers(&s));
}

#[test]
fn leases_created_in_one_revision_are_ranked_by_key() {
    let m = "02:00:00:00:00:09";
    let mut s = set();
    s.apply(put("10.60.9.0-24", 5, &vxlan("10.199.0.19", m)));
    s.apply(put("10.60.10.0-24", 5, &vxlan("10.199.0.20", m)));
    // "…10.60.10.0-24" < "…10.60.9.0-24" as text.
    assert_eq!(peers(&s), [("10.60.10.0-24".into(), ip("10.199.0.20"))]);
}

#[test]
fn when_the_winner_goes_the_refused_lease_becomes_a_peer() {
    let m = "02:00:00:00:00:09";
    let mut s = set();
    s.apply(put("10.60.9.0-24", 5, &vxlan("10.199.0.19", m)));
    s.apply(put("10.60.1.0-24", 7, &vxlan("10.199.0.21", m)));
    s.apply(put("10.60.2.0-24", 8, &vxlan("10.199.0.22", m)));
    let d = s.apply(del("10.60.9.0-24"));
    assert_eq!(names(&d.removed), ["10.60.9.0-24"]);
    assert_eq!(names(&d.added), ["10.60.1.0-24"]);
    // The winner changing its MAC away frees the MAC just the same.
    let d = s.apply(put(
        "10.60.1.0-24",
        7,
        &vxlan("10.199.0.21", "02:00:00:00:00:0a"),
    ));
    assert_eq!(names(&d.changed), ["10.60.1.0-24"]);
    assert_eq!(names(&d.added), ["10.60.2.0-24"]);
    assert_eq!(s.len(), 2);
}

#[test]
fn an_alias_key_never_replaces_or_removes_the_real_peer() {
    // Issue 9, defect 3: keys once read as the same subnet as 10.60.7.0-24.
    let real = vxlan("10.199.0.12", "02:00:00:00:00:07");
    let evil = vxlan("10.199.0.66", "02:00:00:00:00:66");
    let mut s = set();
    s.apply(put("10.60.7.0-24", 5, &real));
    for (rev, alias) in [
        "10.60.7.0-24&x",
        "10.60.7.0-024",
        "10.60.7.0-+24",
        "010.60.7.0-24",
        "10.60.7.1-24",
    ]
    .into_iter()
    .enumerate()
    {
        let d = s.apply(put(alias, 10 + rev as i64, &evil));
        assert_eq!(d.peer_changes(), 0, "{alias}");
        assert_eq!(
            d.rejected[0].reason,
            Reason::Unreadable(Unreadable::Key(alias.into()))
        );
        let d = s.apply(del(alias));
        assert!(d.is_empty(), "{alias}: {d:?}");
        assert_eq!(peers(&s), [("10.60.7.0-24".into(), ip("10.199.0.12"))]);
    }
}

#[test]
fn of_two_keys_naming_one_subnet_the_older_wins() {
    // Not possible with flannel's one key spelling; a decoder of dual-stack keys would make it so.
    let lease = |public_ip: &str| Lease {
        subnet: net("10.60.7.0/24"),
        ipv6_subnet: None,
        attrs: crate::lease::LeaseAttrs::parse(udp(public_ip).as_bytes()).unwrap(),
        hold: crate::registry::etcd::hold(0),
        version: 1,
    };
    let record = |k: &str, rev: i64, public_ip: &str| Record {
        key: key(k),
        rank: rev,
        value: Ok(lease(public_ip)),
    };
    let mut s = set();
    s.apply(Change::Put(record(
        "10.60.7.0-24&fc00::-64",
        9,
        "10.199.0.66",
    )));
    let d = s.apply(Change::Put(record("10.60.7.0-24", 5, "10.199.0.12")));
    assert_eq!(names(&d.added), ["10.60.7.0-24"]);
    assert_eq!(names(&d.removed), ["10.60.7.0-24&fc00::-64"]);
    assert_eq!(
        d.rejected[0].reason,
        Reason::SubnetTaken(net("10.60.7.0/24").into())
    );
    let d = s.apply(del("10.60.7.0-24"));
    assert_eq!(names(&d.added), ["10.60.7.0-24&fc00::-64"]);
}

#[test]
fn this_hosts_key_is_never_a_peer_but_what_it_holds_is_kept() {
    let mut s = set();
    let d = s.apply(put("10.60.52.0-24", 3, &udp("10.199.0.99")));
    assert!(d.is_empty());
    assert_eq!(s.verdict(&key("10.60.52.0-24")), Some(Verdict::Own));
    let held = s.get(&key("10.60.52.0-24")).unwrap();
    assert_eq!(
        held.value.as_ref().unwrap().attrs.public_ip,
        ip("10.199.0.99")
    );
}

#[test]
fn a_renewal_changes_nothing_and_new_attributes_are_a_change() {
    let mut s = set();
    s.apply(put("10.60.7.0-24", 5, &udp("10.199.0.12")));
    let renewed = crate::registry::etcd::decode(
        key("10.60.7.0-24"),
        P,
        udp("10.199.0.12").as_bytes(),
        5,
        9,
        77,
    );
    assert!(s.apply(Change::Put(renewed)).is_empty());
    let d = s.apply(put("10.60.7.0-24", 5, &udp("10.199.0.13")));
    assert_eq!(names(&d.changed), ["10.60.7.0-24"]);
    assert_eq!(d.changed[0].public_ip, ip("10.199.0.13"));
    assert_eq!(
        s.peer(&key("10.60.7.0-24")).map(|l| l.attrs.public_ip),
        Some(ip("10.199.0.13"))
    );
    // What the data plane is given: the same lease.
    assert_eq!(
        s.backend_peer(&key("10.60.7.0-24")),
        s.peer(&key("10.60.7.0-24")).map(|l| l.to_backend())
    );
    let all: Vec<_> = s.peers().map(|(_, l)| l.to_backend()).collect();
    assert_eq!(s.backend_peers().collect::<Vec<_>>(), all);
}

#[test]
fn a_rejection_is_reported_once_until_its_reason_changes() {
    let mut s = set();
    let d = s.apply(put("10.60.7.0-24", 5, "[]"));
    assert_eq!(d.rejected.len(), 1);
    // The same garbage again: already known.
    let d = s.apply(put("10.60.7.0-24", 5, "[] "));
    assert!(d.rejected.is_empty(), "{d:?}");
    let d = s.apply(put("10.60.7.0-24", 5, &udp("255.255.255.255")));
    assert_eq!(
        d.rejected[0].reason,
        Reason::PublicIpNotUnicast(ip("255.255.255.255").into())
    );
}

#[test]
fn a_batch_reports_only_its_net_effect() {
    let mut s = set();
    s.apply(put("10.60.7.0-24", 5, &udp("10.199.0.12")));
    let mut b = s.edit();
    b.apply(del("10.60.7.0-24"));
    b.apply(put("10.60.7.0-24", 8, &udp("10.199.0.12")));
    b.apply(put("10.60.8.0-24", 9, &udp("10.199.0.13")));
    b.apply(del("10.60.8.0-24"));
    assert!(b.finish().is_empty());
}

#[test]
fn a_listing_reports_what_it_added_changed_and_removed() {
    let mut s = set();
    s.apply(put("10.60.1.0-24", 1, &udp("10.199.0.1")));
    s.apply(put("10.60.2.0-24", 2, &udp("10.199.0.2")));
    s.apply(put("10.60.3.0-24", 3, &udp("10.199.0.3")));
    let listing = [
        put("10.60.1.0-24", 1, &udp("10.199.0.1")),
        put("10.60.2.0-24", 2, &udp("10.199.0.22")),
        put("10.60.4.0-24", 4, &udp("10.199.0.4")),
        put("garbage", 5, &udp("10.199.0.5")),
    ]
    .map(|c| match c {
        Change::Put(r) => r,
        Change::Delete(_) => unreachable!(),
    });
    let d = s.replace_all(listing.clone());
    assert_eq!(names(&d.added), ["10.60.4.0-24"]);
    assert_eq!(names(&d.changed), ["10.60.2.0-24"]);
    assert_eq!(names(&d.removed), ["10.60.3.0-24"]);
    assert_eq!(d.rejected.len(), 1);
    assert_eq!(s.stored(), 4);
    assert!(s.replace_all(listing).is_empty());
}

#[test]
fn a_new_local_address_refuses_the_peer_using_it_until_it_goes() {
    let mut s = set();
    s.apply(put("10.60.7.0-24", 5, &udp("10.199.0.12")));
    let mut more = local();
    more.insert(ip("10.199.0.12").into());
    let mut b = s.edit();
    b.set_local_addrs(more);
    let d = b.finish();
    assert_eq!(names(&d.removed), ["10.60.7.0-24"]);
    assert_eq!(
        d.rejected[0].reason,
        Reason::PublicIpLocal(ip("10.199.0.12").into())
    );
    let mut b = s.edit();
    b.set_local_addrs(local());
    assert_eq!(names(&b.finish().added), ["10.60.7.0-24"]);
}

#[test]
fn a_new_own_lease_judges_every_lease_again() {
    let mut s = set();
    s.apply(put("10.60.52.0-24", 1, &udp("10.199.0.11")));
    s.apply(put("10.60.7.0-24", 5, &udp("10.199.0.12")));
    // This host moved to 10.60.7.0/24 (say the other lease was its own old one, re-published);
    // its old key is now an ordinary lease again, judged like any other.
    let mut b = s.edit();
    b.set_own(own_at("10.60.7.0/24"));
    let d = b.finish();
    assert_eq!(names(&d.removed), ["10.60.7.0-24"]);
    assert!(d.added.is_empty());
    assert_eq!(
        reason(&s, "10.60.52.0-24"),
        Some(Reason::PublicIpLocal(ip("10.199.0.11").into()))
    );
    assert_eq!(s.verdict(&key("10.60.7.0-24")), Some(Verdict::Own));
}

#[test]
fn a_lease_is_given_back_exactly_as_it_was_read() {
    // Kept compact (BackendData as text, known types without an allocation): nothing lost.
    let values = [
        vxlan("10.199.0.12", "02:00:00:00:00:07"),
        udp("10.199.0.13"),
        r#"{"PublicIP":"10.199.0.14","PublicIPv6":"fc00::1","BackendType":"wireguard","BackendData":{"PublicKey":"k=","Nested":{"n":[1,2.5,-3,null,true]}}}"#.to_string(),
        r#"{"PublicIP":"10.199.0.15","BackendType":"host-gw","BackendData":null}"#.to_string(),
    ];
    for v in values {
        let r = crate::registry::etcd::decode(key("10.60.7.0-24"), P, v.as_bytes(), 5, 6, 7);
        let lease = r.value.clone().expect("readable");
        let stored = Compact::new(lease.clone());
        assert_eq!(stored.lease(), lease, "{v}");
        assert_eq!(stored.backend_lease(), lease.to_backend(), "{v}");
    }
}

mod property {
    //! Any sequence of puts and deletes of any keys and values (garbage, aliases, overlaps,
    //! duplicate MACs), applied in batches of any size, with this host's lease and addresses
    //! changing in between, ends in the set a fresh listing of the final state gives; that set
    //! obeys every rule; and the diffs, replayed, rebuild it.

    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::lease::LeaseAttrs;
    use crate::registry::etcd::parse_subnet_key;

    /// Key names: this host's, good ones, aliases of them, other lengths, outside, garbage.
    /// Key names that can be peers (the first two are also this host's at times), and others:
    /// aliases, other lengths, outside the network, garbage.
    const GOOD_NAMES: &[&str] = &[
        "10.60.53.0-24",
        "10.60.1.0-24",
        "10.60.2.0-24",
        "10.60.3.0-24",
    ];
    const BAD_NAMES: &[&str] = &[
        "10.60.52.0-24",
        "10.60.1.0-24&x",
        "10.60.1.0-024",
        "10.60.1.1-24",
        "10.60.52.128-25",
        "10.60.52.0-23",
        "10.60.0.0-16",
        "10.61.1.0-24",
        "garbage",
    ];
    /// PublicIPs of other hosts (10.199.0.13 is this host's at times), and others.
    const GOOD_IPS: &[&str] = &["10.199.0.12", "10.199.0.13", "10.199.0.14"];
    const BAD_IPS: &[&str] = &[
        "10.199.0.11",
        "255.255.255.255",
        "0.0.0.0",
        "127.0.0.1",
        "224.0.0.5",
    ];
    /// VTEP MACs: two usable ones (so they are often shared), this host's, and unusable ones.
    const GOOD_MACS: &[&str] = &["02:00:00:00:00:02", "02:00:00:00:00:03"];
    const BAD_MACS: &[&str] = &[OWN_MAC, "00:00:00:00:00:00", "01:00:5e:00:00:01", "nope"];
    /// This host's leases over time: it may be re-leased, also with another length.
    const OWNS: &[&str] = &["10.60.52.0/24", "10.60.53.0/24", "10.60.52.0/23"];

    #[derive(Debug, Clone)]
    enum Op {
        Put(String, Vec<u8>),
        Delete(String),
        Own(usize),
        /// Whether 10.199.0.13 is one of this host's addresses.
        Local(bool),
        /// Ends a batch.
        Flush,
    }

    fn pick(
        good: &'static [&'static str],
        bad: &'static [&'static str],
    ) -> impl Strategy<Value = &'static str> + Clone {
        prop_oneof![
            4 => proptest::sample::select(good),
            1 => proptest::sample::select(bad),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => pick(GOOD_NAMES, BAD_NAMES).prop_map(str::to_string),
            1 => "[0-9.&+-]{0,16}",
        ]
    }

    fn value() -> impl Strategy<Value = Vec<u8>> {
        let ip = pick(GOOD_IPS, BAD_IPS);
        let mac = pick(GOOD_MACS, BAD_MACS);
        prop_oneof![
            6 => (ip.clone(), mac).prop_map(|(i, m)| vxlan(i, m).into_bytes()),
            2 => ip.prop_map(|i| udp(i).into_bytes()),
            1 => proptest::collection::vec(any::<u8>(), 0..24),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (name(), value()).prop_map(|(n, v)| Op::Put(n, v)),
            3 => name().prop_map(Op::Delete),
            1 => (0..OWNS.len()).prop_map(Op::Own),
            1 => any::<bool>().prop_map(Op::Local),
            2 => Just(Op::Flush),
        ]
    }

    /// etcd's side: values and create revisions as a real store keeps them.
    #[derive(Default)]
    struct Etcd {
        revision: i64,
        /// Create revision, mod revision and value of each key name.
        keys: BTreeMap<String, (i64, i64, Vec<u8>)>,
    }

    impl Etcd {
        fn put(&mut self, k: &str, v: Vec<u8>) -> Record {
            self.revision += 1;
            let rev = self.revision;
            let created = self.keys.get(k).map_or(rev, |e| e.0);
            self.keys.insert(k.to_string(), (created, rev, v));
            self.record(k)
        }

        fn record(&self, k: &str) -> Record {
            let (created, modified, v) = &self.keys[k];
            crate::registry::etcd::decode(key(k), P, v, *created, *modified, 1)
        }

        fn listing(&self) -> Vec<Record> {
            self.keys.keys().map(|k| self.record(k)).collect()
        }
    }

    fn locals(extra: bool) -> HashSet<IpAddr> {
        let mut l = local();
        if extra {
            l.insert(ip("10.199.0.13").into());
        }
        l
    }

    /// Applies a diff to what a data plane would hold: each peer's subnet and attributes, the
    /// lease of a peer added or changed being the set's ([`PeerSet::peer`]), as the agent reads it.
    fn replay(mirror: &mut BTreeMap<String, (Ipv4Net, LeaseAttrs)>, d: &Diff, s: &PeerSet) {
        let view = |p: &Peer| {
            let l = s
                .peer(&p.key)
                .expect("an added or changed peer is in the set");
            assert_eq!((l.subnet, l.attrs.public_ip), (p.subnet, p.public_ip));
            (l.subnet, l.attrs)
        };
        for p in &d.removed {
            let old = mirror.remove(&p.key).expect("removed");
            assert_eq!((old.0, old.1.public_ip), (p.subnet, p.public_ip), "removed");
        }
        for p in &d.changed {
            let old = mirror.insert(p.key.clone(), view(p));
            assert!(old.is_some_and(|o| o != view(p)), "changed");
        }
        for p in &d.added {
            assert!(mirror.insert(p.key.clone(), view(p)).is_none(), "added");
        }
    }

    fn view_of(s: &PeerSet) -> BTreeMap<String, (Ipv4Net, LeaseAttrs)> {
        s.peers()
            .map(|(k, l)| (k.to_string(), (l.subnet, l.attrs.clone())))
            .collect()
    }

    fn verdicts(s: &PeerSet, keys: &[String]) -> Vec<Option<Verdict>> {
        keys.iter().map(|k| s.verdict(k)).collect()
    }

    /// Every rule, checked on the accepted set directly rather than through the module's code.
    fn assert_rules(s: &PeerSet, own: &Own, local: &HashSet<IpAddr>, etcd: &Etcd) {
        let accepted: Vec<(&str, Lease)> = s.peers().collect();
        for (k, l) in &accepted {
            let name = k.trim_start_matches(P);
            assert_eq!(
                parse_subnet_key(name),
                Some((l.subnet, None)),
                "{k}: canonical key"
            );
            assert_eq!(l.subnet.prefix_len(), 24, "{k}: SubnetLen");
            assert!(net("10.60.0.0/16").contains(&l.subnet), "{k}: inside");
            assert!(
                !own.subnet.contains(&l.subnet) && !l.subnet.contains(&own.subnet),
                "{k}: overlaps own"
            );
            let pip = l.attrs.public_ip;
            assert!(weft_backends::iface::is_unicast_host(pip), "{k}: {pip}");
            assert!(!local.contains(&pip.into()), "{k}: local {pip}");
            if l.attrs.backend_type == "vxlan" {
                let m = l.identity().expect("a good MAC");
                assert_ne!(Some(m), own.identity, "{k}: own MAC");
            }
        }
        for (i, (a, la)) in accepted.iter().enumerate() {
            for (b, lb) in &accepted[i + 1..] {
                assert!(
                    !la.subnet.contains(&lb.subnet) && !lb.subnet.contains(&la.subnet),
                    "{a} overlaps {b}"
                );
                let (ma, mb) = (la.identity(), lb.identity());
                if la.attrs.backend_type == "vxlan" && lb.attrs.backend_type == "vxlan" {
                    assert_ne!(ma, mb, "{a} and {b} share a MAC");
                }
            }
        }
        // The older of two contenders for one MAC is the one kept.
        for (k, v) in etcd.keys.keys().map(|k| (key(k), s.verdict(&key(k)))) {
            if let Some(Verdict::Rejected(Reason::IdentityTaken(m))) = v {
                let mine = etcd.keys[k.trim_start_matches(P)].0;
                let holder = accepted.iter().find(|(_, l)| {
                    l.attrs.backend_type == "vxlan" && l.identity().as_ref() == Some(&m)
                });
                if let Some((hk, _)) = holder {
                    let theirs = etcd.keys[hk.trim_start_matches(P)].0;
                    assert!((theirs, *hk) < (mine, k.as_str()), "{hk} is newer than {k}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_peer_set_is_a_function_of_what_is_stored(ops in proptest::collection::vec(op(), 0..80)) {
            let mut etcd = Etcd::default();
            let mut own = own_at(OWNS[0]);
            let mut extra = false;
            let mut s = set_with(own.clone());
            let mut mirror = BTreeMap::new();
            let mut edit = s.edit();
            for op in ops {
                match op {
                    Op::Put(n, v) => edit.apply(Change::Put(etcd.put(&n, v))),
                    Op::Delete(n) => {
                        etcd.revision += 1;
                        etcd.keys.remove(&n);
                        edit.apply(Change::Delete(key(&n)));
                    }
                    Op::Own(i) => {
                        own = own_at(OWNS[i]);
                        edit.set_own(own.clone());
                    }
                    Op::Local(x) => {
                        extra = x;
                        edit.set_local_addrs(locals(x));
                    }
                    Op::Flush => {
                        let d = edit.finish();
                        replay(&mut mirror, &d, &s);
                        prop_assert_eq!(&mirror, &view_of(&s));
                        for r in &d.rejected {
                            prop_assert_eq!(s.verdict(&r.key), Some(Verdict::Rejected(r.reason.clone())));
                        }
                        edit = s.edit();
                    }
                }
            }
            let d = edit.finish();
            replay(&mut mirror, &d, &s);
            prop_assert_eq!(&mirror, &view_of(&s));

            let mut fresh = set_with(own.clone());
            let mut b = fresh.edit();
            b.set_local_addrs(locals(extra));
            b.replace_all(etcd.listing());
            let d = b.finish();
            prop_assert_eq!(view_of(&fresh), view_of(&s));
            let keys: Vec<String> = etcd.keys.keys().map(|k| key(k)).collect();
            prop_assert_eq!(verdicts(&fresh, &keys), verdicts(&s, &keys));
            prop_assert_eq!(fresh.stored(), s.stored());
            prop_assert_eq!(d.added.len(), fresh.len());
            // Relisting what is already known changes nothing.
            prop_assert!(s.replace_all(etcd.listing()).is_empty());
            // The compact copy each lease is kept as gives back the lease stored.
            let given: Vec<_> = s.peers().map(|(_, l)| l.to_backend()).collect();
            prop_assert_eq!(&s.backend_peers().collect::<Vec<_>>(), &given);
            // The counts by type, kept as peers come and go, are those of the accepted set.
            for (t, n) in s.count_by_type() {
                let known = ["", "vxlan", "host-gw", "udp", "alloc"];
                let counted = given.iter().filter(|l| {
                    if t == "other" { !known.contains(&l.backend_type.as_str()) } else { l.backend_type == t }
                }).count();
                prop_assert_eq!(n, counted, "{}", t);
            }
            assert_rules(&s, &own, &locals(extra), &etcd);
        }
    }
}
