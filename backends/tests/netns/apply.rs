//! Targeted changes (`Backend::apply`) against full reconciles. Whatever the changes (peers
//! added, given a new VTEP MAC or PublicIP, moved on or off a connected network, removed), the
//! kernel ends exactly as a full reconcile of the same peer set leaves it: a full reconcile right
//! after has nothing to change. And an apply touches only the peers it is given.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde_json::{json, Value};
use weft_backends::{Lease, PeerChanges};

use crate::harness::{lab, root_or_skip, Host};

const DEV: &str = "flannel.1";

/// xorshift64*: random enough for test data, reproducible from the seed in the failure message.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// A peer set that changes at random, as other hosts' leases would.
struct World {
    kind: &'static str,
    rng: Rng,
    peers: BTreeMap<Ipv4Net, Lease>,
    next_mac: u32,
    /// Where PublicIPs come from: the lab's underlay (directly connected), or elsewhere.
    connected_share: u64,
}

impl World {
    fn new(kind: &'static str, seed: u64, connected_share: u64) -> Self {
        Self {
            kind,
            rng: Rng(seed | 1),
            peers: BTreeMap::new(),
            next_mac: 1,
            connected_share,
        }
    }

    fn public_ip(&mut self) -> Ipv4Addr {
        if self.rng.below(100) < self.connected_share {
            // 192.168.100.1 is the host itself.
            Ipv4Addr::new(192, 168, 100, 2 + self.rng.below(250) as u8)
        } else {
            Ipv4Addr::new(
                10,
                99,
                self.rng.below(4) as u8,
                1 + self.rng.below(250) as u8,
            )
        }
    }

    fn lease(&mut self, subnet: Ipv4Net, public_ip: Ipv4Addr) -> Lease {
        let m = self.next_mac;
        self.next_mac += 1;
        let backend_data = (self.kind == "vxlan").then(|| {
            let mac = format!("02:00:00:00:{:02x}:{:02x}", m >> 8, m & 255);
            json!({"VNI": 1, "VtepMAC": mac}).into()
        });
        Lease {
            subnet,
            public_ip,
            backend_type: self.kind.into(),
            backend_data,
            ipv6: None,
        }
    }

    /// Up to `n` random changes, each peer at most once.
    fn change(&mut self, n: usize) -> PeerChanges {
        let mut batch: BTreeMap<Ipv4Net, Option<Lease>> = BTreeMap::new();
        for _ in 0..n {
            let existing: Vec<Ipv4Net> = self
                .peers
                .keys()
                .filter(|s| !batch.contains_key(s))
                .copied()
                .collect();
            let pick = |rng: &mut Rng| existing[rng.below(existing.len() as u64) as usize];
            match self.rng.below(4) {
                // 10.244.1.0/24 is the host's own lease.
                0 | 1 => {
                    let subnet =
                        Ipv4Net::new(Ipv4Addr::new(10, 244, 2 + self.rng.below(250) as u8, 0), 24)
                            .expect("subnet");
                    if batch.contains_key(&subnet) {
                        continue;
                    }
                    let ip = self.public_ip();
                    let l = self.lease(subnet, ip);
                    batch.insert(subnet, Some(l));
                }
                2 if !existing.is_empty() => {
                    let subnet = pick(&mut self.rng);
                    let old = self.peers[&subnet].clone();
                    // A new VTEP MAC (a restarted flanneld), a new PublicIP as well, or a new
                    // PublicIP alone (weft keeps its MAC: a host whose address changed).
                    let l = match self.rng.below(3) {
                        0 => self.lease(subnet, old.public_ip),
                        1 => {
                            let ip = self.public_ip();
                            self.lease(subnet, ip)
                        }
                        _ => Lease {
                            public_ip: self.public_ip(),
                            ..old
                        },
                    };
                    batch.insert(subnet, Some(l));
                }
                3 if !existing.is_empty() => {
                    batch.insert(pick(&mut self.rng), None);
                }
                _ => {}
            }
        }
        let mut changes = PeerChanges::default();
        for (subnet, lease) in batch {
            match lease {
                Some(l) => {
                    self.peers.insert(subnet, l.clone());
                    changes.upsert.push(l);
                }
                None => {
                    self.peers.remove(&subnet);
                    changes.remove.push(subnet);
                }
            }
        }
        changes
    }

    fn leases(&self) -> Vec<Lease> {
        self.peers.values().cloned().collect()
    }
}

/// Starts from a reconciled set of peers, applies random batches, and after each checks that a
/// full reconcile of the same set leaves the kernel exactly as it is (dump and notifications).
fn applies_match_full_reconciles(
    config: Value,
    kind: &'static str,
    connected_share: u64,
    dump: impl Fn(&Host) -> Value,
) {
    for seed in [1, 7, 2024] {
        let (lab, _) = lab(1, config.clone());
        let h = &lab.hosts[0];
        let mut world = World::new(kind, seed, connected_share);
        world.change(40);
        h.reconcile(&world.leases()).expect("first reconcile");
        for round in 0..10 {
            let n = 1 + world.rng.below(30) as usize;
            let changes = world.change(n);
            h.apply(&changes)
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: apply: {e:?}"));
            assert!(
                !h.needs_reconcile(),
                "seed {seed} round {round}: a clean apply needs no full pass"
            );
            let applied = dump(h);
            let (result, events) = h.reconcile_watching(&world.leases());
            let events = written(events);
            result.unwrap_or_else(|e| panic!("seed {seed} round {round}: reconcile: {e:?}"));
            assert_eq!(applied, dump(h), "seed {seed} round {round}: {changes:#?}");
            assert!(
                events.is_empty(),
                "seed {seed} round {round}: the full reconcile after apply changed the kernel: \
                 {events:#?}\nafter {changes:#?}"
            );
        }
    }
}

/// The notifications of state someone wrote: not the entries the kernel learns by itself (the
/// container bridge's FDB, ARP on the underlay), which come and go as packets flow.
fn written(events: Vec<String>) -> Vec<String> {
    let learned = ["Reachable", "Stale", "Delay", "Probe", "Incomplete"];
    events
        .into_iter()
        .filter(|e| !learned.iter().any(|s| e.contains(&format!("state: {s}"))))
        .collect()
}

#[test]
fn vxlan_applies_leave_the_kernel_as_a_full_reconcile_does() {
    if !root_or_skip("apply::vxlan_applies_leave_the_kernel_as_a_full_reconcile_does") {
        return;
    }
    applies_match_full_reconciles(json!({"Type": "vxlan"}), "vxlan", 30, |h| {
        h.ns.kernel_dump(DEV)
    });
}

#[test]
fn vxlan_direct_routing_applies_leave_the_kernel_as_a_full_reconcile_does() {
    if !root_or_skip(
        "apply::vxlan_direct_routing_applies_leave_the_kernel_as_a_full_reconcile_does",
    ) {
        return;
    }
    // Peers move on and off the host's own network: overlay entries become a direct route and
    // back.
    let config = json!({"Type": "vxlan", "DirectRouting": true});
    applies_match_full_reconciles(config, "vxlan", 50, |h| h.ns.kernel_dump(DEV));
}

#[test]
fn host_gw_applies_leave_the_kernel_as_a_full_reconcile_does() {
    if !root_or_skip("apply::host_gw_applies_leave_the_kernel_as_a_full_reconcile_does") {
        return;
    }
    applies_match_full_reconciles(
        json!({"Type": "host-gw"}),
        "host-gw",
        100,
        |h| json!({"routes": h.ns.routes_json(), "nexthops": h.ns.nexthops_json()}),
    );
}

#[test]
fn an_apply_touches_only_the_peers_it_is_given() {
    if !root_or_skip("apply::an_apply_touches_only_the_peers_it_is_given") {
        return;
    }
    let (lab, _) = lab(1, json!({"Type": "vxlan"}));
    let h = &lab.hosts[0];
    let mut world = World::new("vxlan", 5, 0);
    world.change(300);
    h.reconcile(&world.leases()).expect("reconcile");

    let add = world.change(1);
    let (result, events) = h.apply_watching(&add);
    let events = written(events);
    result.expect("apply");
    // One neighbour, one FDB entry, one route: nothing about the other peers.
    assert_eq!(events.len(), 3, "{add:#?}\n{events:#?}");

    let (result, events) = h.apply_watching(&PeerChanges::default());
    let events = written(events);
    result.expect("apply");
    assert!(events.is_empty(), "nothing to change: {events:#?}");
}

#[test]
fn an_apply_never_overwrites_a_foreign_route_and_tries_again_later() {
    if !root_or_skip("apply::an_apply_never_overwrites_a_foreign_route_and_tries_again_later") {
        return;
    }
    let (lab, _) = lab(1, json!({"Type": "vxlan"}));
    let h = &lab.hosts[0];
    let mut world = World::new("vxlan", 9, 0);
    world.change(5);
    h.reconcile(&world.leases()).expect("reconcile");
    // An administrator's route to the subnet a new peer is about to lease.
    h.ns.ip("route add 10.244.77.0/24 dev cni0");
    let peer = world.lease(
        "10.244.77.0/24".parse().expect("subnet"),
        Ipv4Addr::new(10, 99, 0, 9),
    );
    world.peers.insert(peer.subnet, peer.clone());
    let add = PeerChanges {
        upsert: vec![peer],
        remove: vec![],
    };

    let errs = h.apply(&add).expect_err("the destination is held");
    assert!(errs.iter().any(|e| e.contains("not installed")), "{errs:?}");
    let held = h.ns.route("10.244.77.0/24").expect("route");
    assert_eq!(held["dev"], "cni0", "the foreign route stays: {held}");
    // A route weft did not know of: only a full pass can tell flanneld's from another's.
    assert!(h.needs_reconcile());
    let errs = h.reconcile(&world.leases()).expect_err("still held");
    assert!(errs.iter().any(|e| e.contains("cni0")), "{errs:?}");
    assert!(
        !h.needs_reconcile(),
        "a conflict the full pass judged is retried by apply, not by more full passes"
    );
    assert_eq!(h.ns.route("10.244.77.0/24").expect("route")["dev"], "cni0");

    // Once it is gone, the periodic retry (an empty apply) puts weft's route in.
    h.ns.ip("route del 10.244.77.0/24 dev cni0");
    h.apply(&PeerChanges::default()).expect("retry");
    let r = h.ns.route("10.244.77.0/24").expect("route");
    assert_eq!(
        (r["dev"].as_str(), r["protocol"].as_str()),
        (Some(DEV), Some("87"))
    );
    h.assert_reconcile_is_a_no_op(&world.leases(), || h.ns.kernel_dump(DEV));
}

/// Lets the backend wait on its events for a moment, as the agent always does: udp publishes a
/// table `apply` held back within 10 ms.
fn wait_on_events(h: &Host) {
    h.agent.with_backend(|b| {
        Box::pin(async move {
            let _ = tokio::time::timeout(Duration::from_millis(50), b.event()).await;
        })
    });
}

#[test]
fn udp_peers_come_and_go_by_apply_without_touching_the_kernel() {
    if !root_or_skip("apply::udp_peers_come_and_go_by_apply_without_touching_the_kernel") {
        return;
    }
    let (lab, leases) = lab(3, json!({"Type": "udp"}));
    lab.reconcile_all(&leases);
    let (h1, h2, h3) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    h1.reconcile(&[leases[1].clone()]).expect("reconcile");
    assert!(!h1.reaches(h3));

    // A burst: the second apply comes within 10 ms of the first table.
    let add = PeerChanges {
        upsert: vec![leases[2].clone()],
        remove: vec![],
    };
    let (result, events) = h1.apply_watching(&add);
    result.expect("apply");
    assert!(written(events).is_empty(), "udp's peers live in userspace");
    let gone = PeerChanges {
        upsert: vec![],
        remove: vec![leases[1].subnet],
    };
    h1.apply(&gone).expect("apply");
    h1.apply(&add).expect("the same again changes nothing");
    wait_on_events(h1);
    assert!(h1.reaches(h3));
    assert!(!h1.reaches(h2));

    h1.apply(&PeerChanges {
        upsert: vec![leases[1].clone()],
        remove: vec![],
    })
    .expect("apply");
    wait_on_events(h1);
    lab.assert_full_mesh();
}

#[test]
fn two_peers_swapping_vtep_macs_in_one_batch_keep_both() {
    if !root_or_skip("apply::two_peers_swapping_vtep_macs_in_one_batch_keep_both") {
        return;
    }
    let (lab, _) = lab(1, json!({"Type": "vxlan"}));
    let h = &lab.hosts[0];
    let mut world = World::new("vxlan", 3, 0);
    // From nothing, every change is an add.
    world.change(20);
    let (a, b) = {
        let mut it = world.peers.values();
        (it.next().cloned(), it.next().cloned())
    };
    let (Some(mut a), Some(mut b)) = (a, b) else {
        panic!("two peers: {:?}", world.peers)
    };
    h.reconcile(&world.leases()).expect("reconcile");
    // Two flanneld restarts whose MACs cross: in the end no MAC is used twice, but each new MAC
    // is the other peer's old one.
    std::mem::swap(&mut a.backend_data, &mut b.backend_data);
    for p in [&a, &b] {
        world.peers.insert(p.subnet, p.clone());
    }
    h.apply(&PeerChanges {
        upsert: vec![a, b],
        remove: vec![],
    })
    .expect("both peers keep their place");
    assert!(!h.needs_reconcile());
    h.assert_reconcile_is_a_no_op(&world.leases(), || h.ns.kernel_dump(DEV));
}
