//! Kubernetes deployment (deploy/kubernetes/weft.yml in etcd mode, weft-kube.yml in kube mode,
//! deploy/image/): both manifests validate strictly and offline against the Kubernetes schemas
//! and carry what their DaemonSet needs (tests/k8s-validate.sh); the image, built with a real dockerd and no registry, runs each
//! init step and weftd itself the way the DaemonSet does, on simulated hosts: host networking,
//! only NET_ADMIN and NET_RAW, a read-only root, /run/flannel and /dev/net/tun from the host;
//! pods then get addresses through the weft-cni and conflist it installed, and ping across hosts.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_lab::dockerd::{docker_cli, require_docker, Dockerd};

use crate::harness::{wait_for, weftctl, Etcd};
use crate::netns::{Topology, PREFIX, SWITCH_IP};

/// The manifests' health port (`-healthz-port`, the probes' port).
const HEALTH_PORT: u16 = 9473;
/// The ConfigMap's net-conf.json.
const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const IMAGE: &str = "weft:k8s-test";
/// The lab's etcd, by a name only the containers' /etc/hosts knows.
const ETCD_NAME: &str = "etcd.weft.test";
const T: Duration = Duration::from_secs(30);
/// Debian's containernetworking-plugins.
const CNI_PLUGINS: &str = "/usr/lib/cni";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn manifests_validate_strictly_offline_and_their_network_config_is_accepted() {
    // Needs python3 (with venv) and PyPI for kubernetes-validate, not root; run with the rest.
    if !weft_lab::require_tools(
        "manifests_validate_strictly_offline_and_their_network_config_is_accepted",
        &["python3"],
    ) {
        return;
    }
    let out_dir = tempfile::tempdir().expect("tmp");
    let kube_dir = tempfile::tempdir().expect("tmp");
    let out = weft_lab::cmd::output(
        Command::new("bash")
            .arg(repo().join("tests/k8s-validate.sh"))
            .arg("--extract")
            .arg(out_dir.path())
            .arg("--extract-kube")
            .arg(kube_dir.path()),
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "k8s-validate.sh:\n{}", text(&out));
    // Both manifests went through the schemas and their property checks.
    for line in [
        "weft.yml is valid (strict)",
        "weft-kube.yml is valid (strict)",
        "weft.yml: every property the issue lists is there",
        "weft-kube.yml: RBAC, NODE_NAME, net-conf.json, no etcd: as required",
    ] {
        assert!(text(&out).contains(line), "no {line:?} in\n{}", text(&out));
    }

    // The ConfigMaps' net-conf.json, stored the way the write-network-config init container does
    // (weft.yml), and checked by the same parser weftd reads --net-config-path with (weft-kube.yml).
    let etcd = Etcd::start();
    for (dir, prefix) in [(out_dir.path(), "/k8s"), (kube_dir.path(), "/k8s-kube")] {
        let net_conf = dir.join("net-conf.json");
        let net_conf = net_conf.to_str().expect("utf-8 path");
        let out = weftctl(
            &etcd,
            prefix,
            &["config", "set", "--if-absent", net_conf],
            None,
        );
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains(&format!("backend vxlan, stored at {prefix}/config")),
            "{}",
            text(&out)
        );
    }
}

/// One simulated host's side of the DaemonSet's hostPath volumes and ConfigMap.
struct NodeDirs {
    run: PathBuf,
    cni_bin: PathBuf,
    net_d: PathBuf,
    cfg: PathBuf,
    lock: PathBuf,
}

impl NodeDirs {
    fn new(host_dir: &Path, net_conf: &str) -> Self {
        let d = NodeDirs {
            run: host_dir.join("run-flannel"),
            cni_bin: host_dir.join("opt-cni-bin"),
            net_d: host_dir.join("etc-cni-net.d"),
            cfg: host_dir.join("weft-cfg"),
            lock: host_dir.join("xtables.lock"),
        };
        for dir in [&d.run, &d.cni_bin, &d.net_d, &d.cfg] {
            std::fs::create_dir_all(dir).expect("node dir");
        }
        std::fs::write(&d.lock, "").expect("xtables.lock");
        std::fs::write(d.cfg.join("net-conf.json"), net_conf).expect("net-conf.json");
        d
    }

    fn subnet_env(&self) -> Option<String> {
        std::fs::read_to_string(self.run.join("subnet.env")).ok()
    }
}

fn volume(host: &Path, inside: &str, ro: bool) -> String {
    format!(
        "--volume={}:{inside}{}",
        host.display(),
        if ro { ":ro" } else { "" }
    )
}

/// `docker run` as the DaemonSet's containers run: the host's network, no capabilities but
/// `caps`, no privilege gain, a read-only root, etcd (by name) from FLANNELD_ETCD_ENDPOINTS.
fn run_args(caps: &[&str], extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "--network=host",
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
    ]
    .map(String::from)
    .to_vec();
    a.extend(caps.iter().map(|c| format!("--cap-add={c}")));
    // etcd by name, as a cluster's endpoints often are: glibc's resolver works in the scratch
    // image (nsswitch.conf; the files source is built into libc.so.6).
    a.push(format!("--add-host={ETCD_NAME}:{SWITCH_IP}"));
    a.push(format!(
        "--env=FLANNELD_ETCD_ENDPOINTS=http://{ETCD_NAME}:2379"
    ));
    a.extend_from_slice(extra);
    a
}

fn docker_run(d: &Dockerd, args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    d.docker(&args)
}

/// Builds the image with deploy/image/build.sh against `d` from this test build's binaries;
/// returns the script's size line.
fn build_image(d: &Dockerd, bins: &Path) -> String {
    let out = weft_lab::cmd::output(
        Command::new("bash")
            .arg(repo().join("deploy/image/build.sh"))
            .args(["--docker-host", &d.host_uri(), "--tag", IMAGE, "--bin-dir"])
            .arg(bins)
            .env("DOCKER", docker_cli()),
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "build.sh:\n{}", text(&out));
    let size = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(size.starts_with(&format!("image {IMAGE}: ")), "{size}");
    size
}

/// Debian's containernetworking-plugins (bridge, host-local, portmap), or a visible skip (a
/// failure under CI=true).
fn require_cni_plugins(test: &str) -> bool {
    let missing: Vec<&str> = ["bridge", "host-local", "portmap"]
        .into_iter()
        .filter(|p| !Path::new(CNI_PLUGINS).join(p).is_file())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("needs {missing:?} in {CNI_PLUGINS} (containernetworking-plugins)");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} {why}, and CI=true"
    );
    // Straight to stderr: libtest would swallow eprintln! of a passing test.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    false
}

/// CNI ADD of the installed conflist for `id` into host `h`'s pod namespace, plugin after plugin
/// as libcni runs it (each gets the list's name and version, and the previous result), with
/// weft-cni taken from the node's /opt/cni/bin. Only the files move: simulated hosts share one
/// filesystem, so subnet.env and the plugins' data dirs are pointed at this host's directories.
/// The pod's address.
fn cni_add(h: &weft_lab::Host, node: &NodeDirs, id: &str) -> std::net::Ipv4Addr {
    let list: Value = serde_json::from_slice(
        &std::fs::read(node.net_d.join("10-weft.conflist")).expect("installed conflist"),
    )
    .expect("conflist JSON");
    let mut prev: Option<Value> = None;
    for mut conf in list["plugins"].as_array().expect("plugins").clone() {
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if conf["type"] == "weft-cni" {
            conf["subnetFile"] = json!(node.run.join("subnet.env"));
            conf["dataDir"] = json!(h.dir.join("cni-data"));
            conf["ipam"] = json!({"dataDir": h.dir.join("ipam")});
        }
        if let Some(p) = prev.take() {
            conf["prevResult"] = p;
        }
        let kind = conf["type"].as_str().expect("type").to_string();
        let bin = if kind == "weft-cni" {
            node.cni_bin.join("weft-cni")
        } else {
            Path::new(CNI_PLUGINS).join(&kind)
        };
        let out = weft_lab::cmd::output_with_input(
            h.ns.command(bin.to_str().expect("utf-8 path"))
                .env("CNI_COMMAND", "ADD")
                .env("CNI_CONTAINERID", id)
                .env("CNI_NETNS", h.container.path())
                .env("CNI_IFNAME", "eth0")
                .env(
                    "CNI_PATH",
                    format!("{}:{CNI_PLUGINS}", node.cni_bin.display()),
                ),
            Some(conf.to_string().as_bytes()),
            weft_lab::cmd::TIMEOUT,
        );
        assert!(out.status.success(), "{kind} ADD:\n{}", text(&out));
        prev = Some(serde_json::from_slice(&out.stdout).expect("a CNI result"));
    }
    let result = prev.expect("a result");
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.parse::<ipnet::Ipv4Net>().ok())
        .unwrap_or_else(|| panic!("no IPv4 address in {result}"))
        .addr()
}

#[test]
fn the_image_runs_the_daemonsets_steps_and_weftd_on_two_hosts_vxlan() {
    let name = "the_image_runs_the_daemonsets_steps_and_weftd_on_two_hosts_vxlan";
    if require_docker(name) && require_cni_plugins(name) {
        daemonset_on_two_hosts(VXLAN);
    }
}

/// udp in the unprivileged container: /proc/sys is read-only there, so flannel0's settings must
/// come through netlink.
#[test]
fn the_image_runs_the_daemonsets_steps_and_weftd_on_two_hosts_udp() {
    let name = "the_image_runs_the_daemonsets_steps_and_weftd_on_two_hosts_udp";
    if require_docker(name) && require_cni_plugins(name) {
        daemonset_on_two_hosts(r#"{"Network":"10.247.0.0/16","Backend":{"Type":"udp"}}"#);
    }
}

/// Two simulated hosts, each with its own dockerd, run what the DaemonSet runs from an image
/// built there, with `net_conf` as the ConfigMap's network config: the init steps, then weftd
/// (lease, subnet.env, readiness, firewall), then pods through weft-cni ping across, and a
/// SIGTERM keeps the leases.
fn daemonset_on_two_hosts(net_conf: &str) {
    let network: ipnet::Ipv4Net = serde_json::from_str::<Value>(net_conf).expect("JSON")["Network"]
        .as_str()
        .and_then(|n| n.parse().ok())
        .expect("Network");
    let bins = Path::new(env!("CARGO_BIN_EXE_weftd"))
        .parent()
        .expect("target dir");
    let t = Topology::new(2, 1500);
    let mut docker: Vec<Dockerd> = (0..2).map(|_| Dockerd::new()).collect();
    let mut nodes = Vec::new();
    for (i, d) in docker.iter_mut().enumerate() {
        let h = &t.hosts[i];
        let daemon_json = d.dir().join("daemon.json");
        std::fs::write(&daemon_json, "{}").expect("daemon.json");
        // Host networking only: no docker0, and Docker leaves the host's firewall to weftd.
        d.start(
            &h.ns,
            &daemon_json,
            true,
            &["--bridge=none".into(), "--iptables=false".into()],
        );
        let size = build_image(d, bins);
        eprintln!("{size}");
        let node = NodeDirs::new(&h.dir, net_conf);

        // Init container write-network-config: the first node stores the config, the second
        // keeps it.
        let out = docker_run(
            d,
            &run_args(
                &[],
                &[
                    "--rm".into(),
                    volume(&node.cfg, "/etc/weft/cfg", true),
                    "--entrypoint=/usr/bin/weftctl".into(),
                    IMAGE.into(),
                    "config".into(),
                    "set".into(),
                    "--if-absent".into(),
                    "/etc/weft/cfg/net-conf.json".into(),
                ],
            ),
        );
        assert!(out.status.success(), "config set:\n{}", text(&out));
        let want = if i == 0 {
            "stored at"
        } else {
            "exists: kept it"
        };
        assert!(text(&out).contains(want), "{}", text(&out));

        // Init containers install-cni-plugin and install-cni.
        std::fs::copy(
            repo().join("config/cni-conflist.json"),
            node.cfg.join("cni-conf.json"),
        )
        .expect("conflist");
        let installs = [
            ("/usr/bin/weft-cni", "weft-cni", 0o755),
            ("/etc/weft/cfg/cni-conf.json", "10-weft.conflist", 0o644),
        ];
        for (src, name, mode) in installs {
            let dst_dir = if name == "weft-cni" {
                ("/opt/cni/bin", &node.cni_bin)
            } else {
                ("/etc/cni/net.d", &node.net_d)
            };
            let out = docker_run(
                d,
                &run_args(
                    &[],
                    &[
                        "--rm".into(),
                        volume(&node.cfg, "/etc/weft/cfg", true),
                        volume(dst_dir.1, dst_dir.0, false),
                        "--entrypoint=/usr/bin/weftctl".into(),
                        IMAGE.into(),
                        "install-file".into(),
                        src.into(),
                        format!("{}/{name}", dst_dir.0),
                        format!("{mode:04o}"),
                    ],
                ),
            );
            assert!(out.status.success(), "install-file {src}:\n{}", text(&out));
            let installed = dst_dir.1.join(name);
            let meta = std::fs::metadata(&installed).expect("installed file");
            assert_eq!(meta.permissions().mode() & 0o7777, mode, "{name}");
            let left: Vec<_> = std::fs::read_dir(dst_dir.1).expect("ls").collect();
            assert_eq!(left.len(), 1, "no temporary file left in {}", dst_dir.0);
        }

        // The weft container itself.
        let out = docker_run(
            d,
            &run_args(
                &["NET_ADMIN", "NET_RAW"],
                &[
                    "--detach".into(),
                    "--name=weft".into(),
                    volume(&node.run, "/run/flannel", false),
                    volume(&node.lock, "/run/xtables.lock", false),
                    volume(Path::new("/dev/net/tun"), "/dev/net/tun", false),
                    IMAGE.into(),
                    "-ip-masq".into(),
                    format!("-healthz-port={HEALTH_PORT}"),
                    "--docker-daemon-json=".into(),
                ],
            ),
        );
        assert!(out.status.success(), "docker run weft:\n{}", text(&out));
        let logs = || text(&d.docker(&["logs", "weft"]));

        // A lease, and subnet.env written on the host's side of the mount.
        let deadline = Instant::now() + T;
        let subnet: ipnet::Ipv4Net = loop {
            let env = node.subnet_env().unwrap_or_default();
            let gw = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET="));
            if let Some(net) = gw.and_then(|g| g.parse::<ipnet::Ipv4Net>().ok()) {
                break net.trunc();
            }
            assert!(
                Instant::now() < deadline,
                "no subnet.env from the weft container on {} in {T:?}; its log:\n{}",
                h.ns.name,
                logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(network.contains(&subnet), "{subnet} outside {network}");
        let lease = t.etcd().get(&format!(
            "{PREFIX}/subnets/{}-{}",
            subnet.network(),
            subnet.prefix_len()
        ));
        assert!(
            lease
                .as_deref()
                .is_some_and(|l| l.contains(&format!("\"PublicIP\":\"{}\"", h.addr()))),
            "lease of {subnet} in etcd: {lease:?}"
        );

        // The readiness probe, from the host (the kubelet probes a host-network pod there).
        wait_for(&format!("/readyz 200 on {}", h.ns.name), T, || {
            let status = h
                .ns
                .run_in(|| crate::health::get_with_body(HEALTH_PORT, "/readyz").map(|(s, _)| s));
            status.filter(|s| s.contains(" 200 ")).map(|_| ())
        });
        let healthz =
            h.ns.run_in(|| crate::health::get_with_body(HEALTH_PORT, "/healthz"));
        assert!(
            healthz.as_ref().is_some_and(|(s, _)| s.contains(" 200 ")),
            "/healthz: {healthz:?}\n{}",
            logs()
        );

        // iptables from the image wrote flannel's rules into the host's tables.
        let (ok, nat, _) = h.ns.exec(&["iptables-save", "-t", "nat"]);
        assert!(
            ok && nat.contains("-A POSTROUTING") && nat.contains("FLANNEL-POSTRTG"),
            "nat table:\n{nat}\nweft log:\n{}",
            logs()
        );
        nodes.push((node, subnet));
    }

    // Pods through the weft-cni and conflist the init containers installed, run as the
    // kubelet's runtime would: they get addresses from their hosts' leases and reach each other
    // over the data plane the containerised weftd built.
    let mut pods = Vec::new();
    for (i, (node, subnet)) in nodes.iter().enumerate() {
        let h = &t.hosts[i];
        let ip = cni_add(h, node, &format!("pod{i}"));
        assert!(subnet.contains(&ip), "pod {ip} outside the lease {subnet}");
        pods.push(ip);
    }
    for (a, b) in [(0, 1), (1, 0)] {
        let to = pods[b];
        wait_for(&format!("host {a}'s pod to reach {to}"), T, || {
            t.hosts[a].ping(to).then_some(())
        });
    }

    // A rolling update stops the pod with SIGTERM: weftd exits 0 and keeps its lease.
    for d in &docker {
        d.docker_ok(&["stop", "--time=20", "weft"]);
        assert_eq!(
            d.docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", "weft"]),
            "0"
        );
    }
    for (_, subnet) in &nodes {
        let key = format!(
            "{PREFIX}/subnets/{}-{}",
            subnet.network(),
            subnet.prefix_len()
        );
        assert!(t.etcd().get(&key).is_some(), "{key} kept after SIGTERM");
    }
    for d in &mut docker {
        d.stop();
    }
}
