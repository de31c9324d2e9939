//! The lab's own parts that later suites build on: a host cut off from etcd, and a multi-member
//! etcd that survives losing one member. Needs root.

use std::time::Duration;

use weft_lab::topology::wait_port;
use weft_lab::{require_root, wait_for, Lab};

#[test]
fn a_cut_off_host_cannot_reach_etcd_but_still_reaches_the_other_hosts() {
    if !require_root("a_cut_off_host_cannot_reach_etcd_but_still_reaches_the_other_hosts") {
        return;
    }
    let lab = Lab::with_hosts(2, 1500);
    let etcd = lab.etcd_ips();
    let (h0, h1) = (&lab.hosts[0], &lab.hosts[1]);
    let short = Duration::from_secs(1);
    assert!(wait_port(&h0.ns, etcd[0], 2379, short), "etcd reachable");

    h0.cut_off(&etcd);
    assert!(!wait_port(&h0.ns, etcd[0], 2379, short), "etcd cut off");
    assert!(
        h0.ns
            .exec(&["ping", "-c1", "-W1", &h1.addr().to_string()])
            .0,
        "the other host still answers"
    );

    h0.reconnect(&etcd);
    assert!(
        wait_port(&h0.ns, etcd[0], 2379, short),
        "etcd reachable again"
    );
}

#[test]
fn a_three_member_etcd_keeps_serving_with_one_member_down() {
    if !require_root("a_three_member_etcd_keeps_serving_with_one_member_down") {
        return;
    }
    let mut lab = Lab::with_hosts(0, 1500);
    lab.start_etcd(3);
    assert_eq!(lab.etcd_ips().len(), 3);
    lab.etcd().put("/k", "before");

    // Losing a member (perhaps the leader) costs at most an election; then the two left serve.
    lab.etcd_mut().kill_member(0);
    wait_for(
        "the two members left to take a write",
        Duration::from_secs(30),
        || {
            lab.etcd()
                .ctl(&["put", "/k", "during"])
                .status
                .success()
                .then_some(())
        },
    );
    wait_for("the write to be read back", Duration::from_secs(30), || {
        (lab.etcd().get("/k").as_deref() == Some("during")).then_some(())
    });

    lab.etcd_mut().start_member(0);
    lab.etcd().put("/k", "after");
    assert_eq!(lab.etcd().get("/k").as_deref(), Some("after"));
}
