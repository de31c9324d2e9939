use serde_json::json;

use super::*;

const P: &str = "flannel.alpha.coreos.com";

fn node(v: Value) -> Node {
    serde_json::from_value(v).expect("a node")
}

/// A Node as flanneld leaves it: podCIDR and its four annotations.
fn flannel_node(name: &str, cidr: &str, ip: &str) -> Value {
    json!({
        "metadata": {
            "name": name,
            "resourceVersion": "812",
            "creationTimestamp": "2026-12-07T10:00:00Z",
            "annotations": {
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"c6:2b:1e:55:0d:7a\"}",
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/public-ip": ip,
                "node.alpha.kubernetes.io/ttl": "0",
            },
        },
        "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
        "status": { "images": [{"names": ["busybox"], "sizeBytes": 1}] },
    })
}

fn lease_of(n: &Value) -> Result<Lease, Unreadable> {
    match seen(&node(n.clone()), &Annotations::new(P)) {
        Seen::Lease(r) => r.value,
        Seen::NotLease(why) => panic!("not a lease: {why}"),
    }
}

#[test]
fn a_node_flanneld_annotated_is_a_lease_named_by_the_node_and_ranked_by_its_age() {
    let n = node(flannel_node("node-a", "10.244.3.0/24", "192.168.1.3"));
    let Seen::Lease(r) = seen(&n, &Annotations::new(P)) else {
        panic!("a lease")
    };
    assert_eq!(r.key, "node-a");
    assert_eq!(r.rank, 1_796_637_600, "2026-12-07T10:00:00Z in seconds");
    let l = r.value.expect("readable");
    assert_eq!(l.subnet.to_string(), "10.244.3.0/24");
    assert_eq!(l.attrs.public_ip.to_string(), "192.168.1.3");
    assert_eq!(l.attrs.backend_type, "vxlan");
    assert_eq!(
        l.attrs.backend_data,
        Some(json!({"VNI": 1, "VtepMAC": "c6:2b:1e:55:0d:7a"}))
    );
    assert_eq!(l.hold, Hold::Reserved, "never renewed or released");
}

#[test]
fn a_node_without_annotations_or_podcidr_is_no_lease_and_no_crash() {
    let names = Annotations::new(P);
    for v in [
        json!({"metadata": {"name": "bare"}}),
        json!({"metadata": {"name": "nulls", "annotations": null}, "spec": null}),
        json!({}),
    ] {
        assert!(matches!(seen(&node(v), &names), Seen::NotLease(_)));
    }
    let mut no_cidr = flannel_node("n", "10.244.3.0/24", "192.168.1.3");
    no_cidr["spec"] = json!({});
    assert_eq!(
        seen(&node(no_cidr), &names),
        Seen::NotLease("no podCIDR yet")
    );
    let mut other_agent = flannel_node("n", "10.244.3.0/24", "192.168.1.3");
    other_agent["metadata"]["annotations"]["flannel.alpha.coreos.com/kube-subnet-manager"] =
        json!("false");
    assert!(matches!(
        seen(&node(other_agent), &names),
        Seen::NotLease(_)
    ));
}

#[test]
fn bad_annotations_or_podcidrs_make_an_unreadable_record_that_names_the_problem() {
    let cases = [
        (
            "public-ip",
            json!("not-an-ip"),
            "public-ip \"not-an-ip\" is not an IPv4 address",
        ),
        ("backend-data", json!("{nope"), "backend-data is not JSON"),
    ];
    for (annotation, value, want) in cases {
        let mut v = flannel_node("n", "10.244.3.0/24", "192.168.1.3");
        v["metadata"]["annotations"][format!("{P}/{annotation}")] = value;
        let err = lease_of(&v).expect_err("unreadable").to_string();
        assert!(err.contains(want), "{err}");
    }
    let mut missing = flannel_node("n", "10.244.3.0/24", "192.168.1.3");
    missing["metadata"]["annotations"]
        .as_object_mut()
        .map(|a| a.remove(&format!("{P}/public-ip")));
    assert!(lease_of(&missing).is_err());
    for (cidr, want) in [
        ("10.244.3.7/24", "not a network address"),
        ("banana", "not a CIDR"),
        ("fd00::/64", "no IPv4 podCIDR"),
    ] {
        let v = flannel_node("n", cidr, "192.168.1.3");
        let err = lease_of(&v).expect_err(cidr).to_string();
        assert!(err.contains(want), "{cidr}: {err}");
    }
}

#[test]
fn a_dual_stack_nodes_podcidrs_are_both_subnets_of_the_lease() {
    let mut v = flannel_node("n", "fd00:0:0:3::/64", "192.168.1.3");
    v["spec"]["podCIDRs"] = json!(["fd00:0:0:3::/64", "10.244.3.0/24"]);
    let l = lease_of(&v).expect("lease");
    assert_eq!(l.subnet.to_string(), "10.244.3.0/24");
    assert_eq!(
        l.ipv6_subnet.map(|n| n.to_string()).as_deref(),
        Some("fd00:0:0:3::/64")
    );
    // An IPv4-only node has none.
    let v4 = flannel_node("n", "10.244.3.0/24", "192.168.1.3");
    assert_eq!(lease_of(&v4).expect("lease").ipv6_subnet, None);
    // A bad IPv6 entry makes the record unreadable, as a bad IPv4 one does.
    let mut bad = v4.clone();
    bad["spec"]["podCIDRs"] = json!(["10.244.3.0/24", "fd00:0:0:3::7/64"]);
    let err = lease_of(&bad).expect_err("host bits").to_string();
    assert!(err.contains("not a network address"), "{err}");
}

#[test]
fn a_dual_stack_nodes_ipv6_annotations_are_read_as_flanneld_writes_them() {
    let mut v = flannel_node("n", "10.244.3.0/24", "192.168.1.3");
    v["spec"]["podCIDRs"] = json!(["10.244.3.0/24", "fd00:0:0:3::/64"]);
    let a = &mut v["metadata"]["annotations"];
    a[format!("{P}/public-ipv6")] = json!("fd00:199::3");
    a[format!("{P}/backend-v6-data")] = json!("{\"VNI\":1,\"VtepMAC\":\"c6:2b:1e:55:0d:7b\"}");
    let l = lease_of(&v).expect("lease");
    assert_eq!(l.attrs.public_ipv6, Some("fd00:199::3".parse().unwrap()));
    assert_eq!(
        l.attrs.backend_v6_data,
        Some(json!({"VNI": 1, "VtepMAC": "c6:2b:1e:55:0d:7b"}))
    );
    for (annotation, value, want) in [
        ("public-ipv6", "192.168.1.3", "is not an IPv6 address"),
        ("backend-v6-data", "{nope", "backend-v6-data is not JSON"),
    ] {
        let mut b = v.clone();
        b["metadata"]["annotations"][format!("{P}/{annotation}")] = json!(value);
        let err = lease_of(&b).expect_err(annotation).to_string();
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn a_dual_stack_publish_patch_adds_flanneld_s_ipv6_annotations() {
    let names = Annotations::new(P);
    let attrs = LeaseAttrs {
        public_ip: "192.168.1.3".parse().unwrap(),
        public_ipv6: Some("fd00:199::3".parse().unwrap()),
        backend_type: "host-gw".into(),
        backend_data: None,
        backend_v6_data: None,
    };
    let a = &publish_patch(&names, &attrs)["metadata"]["annotations"];
    assert_eq!(a[format!("{P}/public-ipv6")], "fd00:199::3");
    assert_eq!(
        a[format!("{P}/backend-v6-data")],
        "null",
        "host-gw's, as flanneld's"
    );
    let vxlan = LeaseAttrs {
        backend_type: "vxlan".into(),
        backend_v6_data: Some(json!({"VNI": 1, "VtepMAC": "c6:2b:1e:55:0d:7b"})),
        ..attrs.clone()
    };
    let a = &publish_patch(&names, &vxlan)["metadata"]["annotations"];
    assert_eq!(
        a[format!("{P}/backend-v6-data")],
        "{\"VNI\":1,\"VtepMAC\":\"c6:2b:1e:55:0d:7b\"}"
    );
    // Without a PublicIPv6 (IPv4-only), no IPv6 annotation at all.
    let v4 = LeaseAttrs {
        public_ipv6: None,
        ..attrs
    };
    let a = &publish_patch(&names, &v4)["metadata"]["annotations"];
    assert!(
        a.get(format!("{P}/public-ipv6")).is_none()
            && a.get(format!("{P}/backend-v6-data")).is_none()
    );
}

#[test]
fn host_gw_publishes_null_backend_data_which_reads_back_as_none() {
    let mut v = flannel_node("n", "10.244.3.0/24", "192.168.1.3");
    v["metadata"]["annotations"][format!("{P}/backend-data")] = json!("null");
    v["metadata"]["annotations"][format!("{P}/backend-type")] = json!("host-gw");
    assert_eq!(lease_of(&v).expect("lease").attrs.backend_data, None);
}

#[test]
fn the_publish_patch_is_flanneld_s_byte_for_byte() {
    let names = Annotations::new(P);
    let attrs = LeaseAttrs {
        public_ip: "192.168.1.3".parse().unwrap(),
        public_ipv6: None,
        backend_type: "vxlan".into(),
        backend_data: Some(json!({"VNI": 1, "VtepMAC": "c6:2b:1e:55:0d:7a"})),
        backend_v6_data: None,
    };
    assert_eq!(
        publish_patch(&names, &attrs).to_string(),
        concat!(
            r#"{"metadata":{"annotations":{"#,
            r#""flannel.alpha.coreos.com/backend-data":"{\"VNI\":1,\"VtepMAC\":\"c6:2b:1e:55:0d:7a\"}","#,
            r#""flannel.alpha.coreos.com/backend-type":"vxlan","#,
            r#""flannel.alpha.coreos.com/kube-subnet-manager":"true","#,
            r#""flannel.alpha.coreos.com/public-ip":"192.168.1.3"}}}"#
        )
    );
    let host_gw = LeaseAttrs {
        backend_type: "host-gw".into(),
        backend_data: None,
        ..attrs.clone()
    };
    assert_eq!(
        publish_patch(&names, &host_gw)["metadata"]["annotations"][format!("{P}/backend-data")],
        "null"
    );
    // What was published reads back as the same lease attributes.
    let mut v = flannel_node("n", "10.244.3.0/24", "0.0.0.0");
    v["metadata"]["annotations"] = publish_patch(&names, &attrs)["metadata"]["annotations"].clone();
    assert_eq!(lease_of(&v).expect("lease").attrs, attrs);
    assert!(publishes(&node(v.clone()), &names, &attrs));
    assert!(!publishes(&node(v), &names, &host_gw));
}

#[test]
fn another_prefix_reads_and_writes_only_its_own_annotations() {
    let names = Annotations::new("weft.example.com/");
    let v = flannel_node("n", "10.244.3.0/24", "192.168.1.3");
    assert!(matches!(seen(&node(v), &names), Seen::NotLease(_)));
    assert_eq!(names.key("public-ip"), "weft.example.com/public-ip");
}

#[test]
fn an_operators_public_ip_overwrite_is_read_and_checked() {
    let names = Annotations::new(P);
    let mut v = flannel_node("n", "10.244.3.0/24", "192.168.1.3");
    assert_eq!(public_ip_overwrite(&node(v.clone()), &names), Ok(None));
    v["metadata"]["annotations"][format!("{P}/public-ip-overwrite")] = json!("203.0.113.9");
    assert_eq!(
        public_ip_overwrite(&node(v.clone()), &names),
        Ok(Some("203.0.113.9".parse().unwrap()))
    );
    v["metadata"]["annotations"][format!("{P}/public-ip-overwrite")] = json!("x\u{1b}[2J");
    assert!(public_ip_overwrite(&node(v), &names).is_err());
}

#[test]
fn the_network_available_condition_is_flanneld_s() {
    let p = network_available_patch("2026-12-07T10:00:00Z");
    let c = &p["status"]["conditions"][0];
    assert_eq!(c["type"], "NetworkUnavailable");
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "FlannelIsUp");
}

mod prop {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// A Node is another host's data: any JSON at all is read without a panic, and
        /// whatever it holds becomes a lease, an unreadable record, or no lease.
        #[test]
        fn any_json_node_is_judged_without_panicking(text in ".{0,400}") {
            if let Ok(n) = serde_json::from_str::<Node>(&text) {
                let _ = seen(&n, &Annotations::new(P));
            }
        }

        #[test]
        fn any_annotation_values_are_judged_without_panicking(
            cidr in ".{0,24}", ip in ".{0,24}", data in ".{0,64}", kind in ".{0,12}",
        ) {
            let v = json!({
                "metadata": {"name": "n", "creationTimestamp": ip, "annotations": {
                    "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                    "flannel.alpha.coreos.com/public-ip": ip,
                    "flannel.alpha.coreos.com/backend-data": data,
                    "flannel.alpha.coreos.com/backend-type": kind,
                }},
                "spec": {"podCIDR": cidr},
            });
            let n = node(v);
            if let Seen::Lease(r) = seen(&n, &Annotations::new(P)) {
                if let Ok(l) = r.value {
                    prop_assert_eq!(l.subnet.trunc(), l.subnet);
                }
            }
        }
    }
}
