//! The flags as flanneld's operators type them, and weftctl's as operators type theirs.

use super::*;

fn parse(args: &[&str]) -> Result<DaemonArgs, clap::Error> {
    let argv = std::iter::once("weftd")
        .chain(args.iter().copied())
        .map(OsString::from);
    DaemonArgs::try_parse_args(argv)
}

#[test]
fn one_or_two_dashes_with_or_without_equals() {
    let a = parse(&[
        "-etcd-endpoints=http://10.0.0.1:2379",
        "--etcd-prefix",
        "/p",
        "-iface",
        "eth1",
        "--iface=10.0.0.9",
        "-ip-masq",
        "-subnet-lease-ttl=90m",
        "-public-ip",
        "1.2.3.4",
    ])
    .unwrap();
    assert_eq!(a.etcd.etcd_endpoints, ["http://10.0.0.1:2379"]);
    assert_eq!(a.etcd.prefix(), "/p");
    assert_eq!(a.iface, ["eth1", "10.0.0.9"]);
    assert!(a.ip_masq);
    assert_eq!(a.subnet_lease_ttl, Duration::from_secs(5400));
    assert_eq!(a.public_ip, Some("1.2.3.4".parse().unwrap()));
}

#[test]
fn defaults_are_flanneds() {
    let a = parse(&[]).unwrap();
    assert_eq!(
        a.etcd.etcd_endpoints,
        ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
    );
    assert_eq!(a.etcd.prefix(), "/coreos.com/network");
    assert_eq!(a.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
    assert_eq!(a.subnet_lease_renew_margin, 60);
    assert_eq!(a.subnet_lease_ttl, Duration::from_secs(24 * 3600));
    assert!(!a.ip_masq);
    assert!(a.iptables_forward_rules);
    assert_eq!(a.healthz_port, 0);
    assert_eq!(
        a.daemon_json(),
        Some(std::path::Path::new("/etc/docker/daemon.json"))
    );
    assert_eq!(
        parse(&["--docker-daemon-json="]).unwrap().daemon_json(),
        None
    );
}

#[test]
fn booleans_take_an_explicit_value() {
    assert!(!parse(&["-ip-masq=false"]).unwrap().ip_masq);
    assert!(
        !parse(&["-iptables-forward-rules=false"])
            .unwrap()
            .iptables_forward_rules
    );
}

#[test]
fn iface_can_reach_and_net_config_path_are_flanneds() {
    let a = parse(&[
        "-iface-can-reach=10.1.2.3",
        "--net-config-path",
        "/etc/kube-flannel/net-conf.json",
    ])
    .unwrap();
    assert_eq!(a.iface_can_reach, Some(Ipv4Addr::new(10, 1, 2, 3)));
    assert_eq!(
        a.net_config_path,
        Some(PathBuf::from("/etc/kube-flannel/net-conf.json"))
    );
    assert!(parse(&["-iface-can-reach=eth0"]).is_err());
}

#[test]
fn unknown_flags_are_errors() {
    let e = parse(&["-no-such-flag=1"]).unwrap_err();
    assert!(e.to_string().contains("--no-such-flag"), "{e}");
}

fn refused(args: &[&str]) -> String {
    match parse(args) {
        Ok(a) => panic!("{args:?} accepted: {a:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_absurd_lease_ttl_is_a_clean_error_not_a_panic() {
    let e = refused(&["--subnet-lease-ttl=99999999999999999999h"]);
    assert!(e.contains("too long a duration"), "{e}");
    let e = refused(&["--subnet-lease-ttl=9000000001s"]);
    assert!(e.contains("etcd's maximum lease TTL"), "{e}");
    assert!(parse(&["--subnet-lease-ttl=9000000000s"]).is_ok());
}

#[test]
fn a_lease_ttl_below_etcds_minimum_is_refused() {
    for short in ["0s", "1s", "1999ms"] {
        let e = refused(&[&format!("--subnet-lease-ttl={short}")]);
        assert!(e.contains("etcd's minimum lease TTL"), "{short}: {e}");
    }
    assert_eq!(
        parse(&["--subnet-lease-ttl=2s"]).unwrap().subnet_lease_ttl,
        Duration::from_secs(2)
    );
}

#[test]
fn a_given_renew_margin_must_be_shorter_than_the_ttl() {
    let e = refused(&["--subnet-lease-ttl=1h", "--subnet-lease-renew-margin=60"]);
    assert!(
        e.contains("must be less than --subnet-lease-ttl (3600s)"),
        "{e}"
    );
    let a = parse(&["--subnet-lease-ttl=1h", "--subnet-lease-renew-margin=59"]).unwrap();
    assert_eq!(a.subnet_lease_renew_margin, 59);
    // The default margin is not the operator's choice: a short TTL renews at a third of it.
    assert!(parse(&["--subnet-lease-ttl=2s"]).is_ok());
}

#[test]
fn the_renew_margin_is_bounded_so_it_cannot_overflow() {
    for bad in ["0", "18446744073709551615", "150000001", "-1", "soon"] {
        refused(&[&format!("--subnet-lease-renew-margin={bad}")]);
    }
    let a = parse(&[
        "--subnet-lease-ttl=9000000000s",
        &format!(
            "--subnet-lease-renew-margin={}",
            MAX_RENEW_MARGIN_MINUTES - 1
        ),
    ])
    .unwrap();
    assert!(a.subnet_lease_renew_margin.checked_mul(60).is_some());
}

#[test]
fn the_firewall_resync_is_bounded() {
    refused(&["--iptables-resync=86401"]);
    refused(&["--iptables-resync=-5"]);
    assert_eq!(
        parse(&["--iptables-resync=86400"]).unwrap().iptables_resync,
        86400
    );
}

#[test]
fn tls_and_auth_flags_come_in_pairs() {
    let e = refused(&["-etcd-keyfile=/k.pem"]);
    assert!(e.contains("--etcd-certfile"), "{e}");
    let e = refused(&["-etcd-certfile=/c.pem"]);
    assert!(e.contains("--etcd-keyfile"), "{e}");
    let e = refused(&["-etcd-username=weft"]);
    assert!(e.contains("--etcd-password"), "{e}");
    let e = refused(&["-etcd-password=secret"]);
    assert!(e.contains("--etcd-username"), "{e}");
    assert!(parse(&["-etcd-keyfile=/k.pem", "-etcd-certfile=/c.pem"]).is_ok());
    assert!(parse(&["-etcd-username=weft", "-etcd-password=secret"]).is_ok());
    assert!(
        parse(&["-etcd-cafile=/ca.pem"]).is_ok(),
        "a CA alone is fine"
    );
    // weftctl shares the etcd flags and their pairing.
    let ctl = crate::ctl::CtlArgs::try_parse_args(
        ["weftctl", "-etcd-keyfile=/k.pem", "leases"].map(OsString::from),
    );
    assert!(ctl.is_err());
}

#[test]
fn a_repeated_flag_takes_its_last_value_as_flanneld_does() {
    let a = parse(&[
        "--subnet-file=/run/a.env",
        "-etcd-endpoints=http://10.0.0.1:2379,http://10.0.0.2:2379",
        "-etcd-prefix=/a",
        "-public-ip=10.0.0.1",
        "-healthz-port=8471",
        "-subnet-lease-ttl=2h",
        "--subnet-file=/run/b.env",
        "-etcd-endpoints=http://10.0.0.3:2379",
        "-etcd-prefix",
        "/b",
        "-public-ip",
        "10.0.0.2",
        "-healthz-port=8472",
        "-subnet-lease-ttl=3h",
    ])
    .unwrap();
    assert_eq!(a.subnet_file, PathBuf::from("/run/b.env"));
    assert_eq!(a.etcd.etcd_endpoints, ["http://10.0.0.3:2379"]);
    assert_eq!(a.etcd.prefix(), "/b");
    assert_eq!(a.public_ip, Some(Ipv4Addr::new(10, 0, 0, 2)));
    assert_eq!(a.healthz_port, 8472);
    assert_eq!(a.subnet_lease_ttl, Duration::from_secs(3 * 3600));
}

#[test]
fn a_units_fixed_flags_followed_by_flannel_options_that_repeat_one_start_weftd() {
    // What weftd.service's ExecStart builds from /etc/sysconfig/flanneld.
    let fixed = [
        "-etcd-endpoints=http://10.0.0.1:2379",
        "-etcd-prefix=/coreos.com/network",
    ];
    let flannel_options = "-iface=eth1 -etcd-prefix=/site/network -ip-masq";
    let argv: Vec<&str> = fixed
        .into_iter()
        .chain(flannel_options.split(' '))
        .collect();
    let a = parse(&argv).unwrap();
    assert_eq!(a.etcd.prefix(), "/site/network");
    assert_eq!(a.etcd.etcd_endpoints, ["http://10.0.0.1:2379"]);
    assert_eq!(a.iface, ["eth1"]);
    assert!(a.ip_masq);
}

#[test]
fn a_repeated_boolean_takes_its_last_value_however_it_is_written() {
    let masq = |args: &[&str]| parse(args).unwrap().ip_masq;
    assert!(!masq(&["--ip-masq", "--ip-masq=false"]));
    assert!(masq(&["--ip-masq=false", "-ip-masq"]));
    assert!(masq(&["-ip-masq=false", "-ip-masq=true"]));
    assert!(masq(&["-ip-masq", "-ip-masq"]));
    let forward = |args: &[&str]| parse(args).unwrap().iptables_forward_rules;
    assert!(!forward(&[
        "-iptables-forward-rules",
        "-iptables-forward-rules=false"
    ]));
    assert!(forward(&[
        "-iptables-forward-rules=false",
        "--iptables-forward-rules"
    ]));
    let random = parse(&[
        "-ip-masq-fully-random-disable=true",
        "-ip-masq-fully-random-disable=0",
    ])
    .unwrap();
    assert!(!random.ip_masq_fully_random_disable);
    assert!(!parse(&["-version", "-version=false"]).unwrap().version);
}

#[test]
fn a_repeated_v_takes_its_last_level() {
    assert_eq!(parse(&["-v=2", "-v=4"]).unwrap().verbosity, 4);
    assert_eq!(parse(&["-v", "6", "--v=1"]).unwrap().verbosity, 1);
    assert_eq!(parse(&["--v", "5", "-v", "3"]).unwrap().verbosity, 3);
}

#[test]
fn iface_and_iface_regex_accumulate_when_repeated() {
    let a = parse(&[
        "-iface=eth0",
        "--iface",
        "10.0.0.9",
        "-iface-regex=^en",
        "-iface-regex=^eth",
    ])
    .unwrap();
    assert_eq!(a.iface, ["eth0", "10.0.0.9"]);
    assert_eq!(a.iface_regex, ["^en", "^eth"]);
}

/// The environment is the whole process's and the other tests parse in parallel: a test that
/// sets FLANNELD_* runs its body again in a child process of this test binary.
const CHILD: &str = "WEFT_FLAGS_TEST_CHILD";

fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// Runs test `name` alone in a child process with exactly these FLANNELD_* variables; panics
/// unless it passed.
fn run_child(name: &str, env: &[(&str, &str)]) {
    let exe = std::env::current_exe().expect("the test binary");
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        &format!("flags::tests::{name}"),
        "--exact",
        "--test-threads=1",
    ])
    .env(CHILD, "1");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLANNELD_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .envs(env.iter().copied())
        .output()
        .expect("run the test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{name} in a child process:\n{text}"
    );
}

#[test]
fn flanneld_variables_rank_below_the_command_line_even_when_a_flag_is_repeated() {
    if !is_child() {
        return run_child(
            "flanneld_variables_rank_below_the_command_line_even_when_a_flag_is_repeated",
            &[
                ("FLANNELD_SUBNET_FILE", "/run/env.env"),
                ("FLANNELD_IFACE", "eth9"),
                ("FLANNELD_IP_MASQ", "true"),
                ("FLANNELD_V", "2"),
                ("FLANNELD_ETCD_PREFIX", "/env"),
            ],
        );
    }
    let from_env = parse(&[]).unwrap();
    assert_eq!(from_env.subnet_file, PathBuf::from("/run/env.env"));
    assert_eq!(from_env.iface, ["eth9"]);
    assert!(from_env.ip_masq);
    assert_eq!(from_env.verbosity, 2);
    assert_eq!(from_env.etcd.prefix(), "/env");
    let a = parse(&[
        "--subnet-file=/run/a.env",
        "--subnet-file=/run/b.env",
        "-iface=eth0",
        "-iface=eth1",
        "-ip-masq",
        "-ip-masq=false",
        "-v=4",
        "-v=5",
        "-etcd-prefix=/a",
        "-etcd-prefix=/b",
    ])
    .unwrap();
    assert_eq!(a.subnet_file, PathBuf::from("/run/b.env"));
    assert_eq!(
        a.iface,
        ["eth0", "eth1"],
        "the command line's list replaces the variable's"
    );
    assert!(!a.ip_masq);
    assert_eq!(a.verbosity, 5);
    assert_eq!(a.etcd.prefix(), "/b");
    // weftctl alike, before and after its subcommand.
    let ctl = ctl(&["-etcd-prefix=/a", "leases", "-etcd-prefix=/c"]).unwrap();
    assert_eq!(ctl.etcd.prefix(), "/c");
    assert_eq!(self::ctl(&["leases"]).unwrap().etcd.prefix(), "/env");
}

fn ctl(args: &[&str]) -> Result<crate::ctl::CtlArgs, clap::Error> {
    let argv = std::iter::once("weftctl")
        .chain(args.iter().copied())
        .map(OsString::from);
    crate::ctl::CtlArgs::try_parse_args(argv)
}

/// Every weftctl subcommand, as an operator types it (with its own arguments).
const SUBCOMMANDS: &[&[&str]] = &[
    &["config", "set", "-"],
    &["config", "set", "--if-absent", "net.json"],
    &["config", "get"],
    &["leases"],
    &["docker-opts", "-d", "-"],
    &["status", "--bridge", "cni0"],
    &["doctor", "-iface=eth1"],
    &["install-file", "/a", "/b", "0644"],
];

#[test]
fn weftctl_takes_the_etcd_flags_before_or_after_every_subcommand() {
    let etcd = [
        "-etcd-endpoints=http://10.0.0.1:2379",
        "--etcd-prefix=/site/network",
        "-etcd-cafile=/ca.pem",
        "-etcd-certfile=/c.pem",
        "-etcd-keyfile=/k.pem",
        "-etcd-username=weft",
        "-etcd-password-file=/pw",
    ];
    for sub in SUBCOMMANDS {
        // Before the subcommand, at its end, and (for config set/get) between its words.
        let mut placements = vec![[&etcd[..], sub].concat(), [&sub[..], &etcd[..]].concat()];
        if sub[0] == "config" {
            placements.push([&sub[..1], &etcd[..], &sub[1..]].concat());
        }
        for argv in placements {
            let a = ctl(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(a.etcd.etcd_endpoints, ["http://10.0.0.1:2379"], "{argv:?}");
            assert_eq!(a.etcd.prefix(), "/site/network", "{argv:?}");
            assert_eq!(
                a.etcd.etcd_cafile,
                Some(PathBuf::from("/ca.pem")),
                "{argv:?}"
            );
            assert_eq!(
                a.etcd.etcd_certfile,
                Some(PathBuf::from("/c.pem")),
                "{argv:?}"
            );
            assert_eq!(
                a.etcd.etcd_keyfile,
                Some(PathBuf::from("/k.pem")),
                "{argv:?}"
            );
            assert_eq!(a.etcd.etcd_username.as_deref(), Some("weft"), "{argv:?}");
            assert_eq!(
                a.etcd.etcd_password_file,
                Some(PathBuf::from("/pw")),
                "{argv:?}"
            );
        }
    }
    // The subcommand's own arguments are still its own.
    let a = ctl(&["doctor", "-etcd-prefix=/p", "-iface=eth1", "-iface=eth2"]).unwrap();
    match a.command {
        crate::ctl::Command::Doctor(d) => assert_eq!(d.iface, ["eth1", "eth2"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn weftctl_takes_the_last_of_an_etcd_flag_given_on_both_sides_of_a_subcommand() {
    let a = ctl(&[
        "-etcd-endpoints=http://a:2379",
        "config",
        "-etcd-endpoints=http://b:2379,http://c:2379",
        "get",
        "-etcd-prefix=/x",
        "-etcd-prefix=/y",
    ])
    .unwrap();
    assert_eq!(a.etcd.etcd_endpoints, ["http://b:2379", "http://c:2379"]);
    assert_eq!(a.etcd.prefix(), "/y");
}

#[test]
fn weftctl_repeated_subcommand_flags_take_the_last_value() {
    let a = ctl(&[
        "docker-opts",
        "-k",
        "A",
        "-k",
        "DOCKER_NETWORK_OPTIONS",
        "-f",
        "/a",
        "-f",
        "/b",
        "-i",
        "-i",
    ])
    .unwrap();
    match a.command {
        crate::ctl::Command::DockerOpts {
            key,
            env_file,
            individual,
            ..
        } => {
            assert_eq!(key, "DOCKER_NETWORK_OPTIONS");
            assert_eq!(env_file, PathBuf::from("/b"));
            assert!(individual);
        }
        other => panic!("{other:?}"),
    }
    let a = ctl(&["status", "--subnet-file=/a", "-f", "/b"]).unwrap();
    match a.command {
        crate::ctl::Command::Status(s) => assert_eq!(s.subnet_file, PathBuf::from("/b")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn weftctl_checks_the_etcd_pairs_across_the_subcommand() {
    assert!(ctl(&[
        "-etcd-username=weft",
        "config",
        "get",
        "-etcd-password-file=/pw"
    ])
    .is_ok());
    assert!(ctl(&["-etcd-keyfile=/k.pem", "leases", "-etcd-certfile=/c.pem"]).is_ok());
    let e = ctl(&["-etcd-username=weft", "leases"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--etcd-password-file"), "{e}");
    let e = ctl(&["leases", "-etcd-certfile=/c.pem"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--etcd-keyfile"), "{e}");
    let e = ctl(&[
        "-etcd-password=s3cret",
        "doctor",
        "-etcd-username=weft",
        "-etcd-password-file=/pw",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot be used together"), "{e}");
}

/// What `weftctl <argv> --help` prints.
fn ctl_help(argv: &[&str]) -> String {
    let e = ctl(&[argv, &["--help"]].concat()).expect_err("--help prints help");
    assert_eq!(e.kind(), ErrorKind::DisplayHelp);
    e.to_string()
}

#[test]
fn weftctl_help_says_which_subcommands_read_the_etcd_flags() {
    let doctor = ctl_help(&["doctor"]);
    assert!(doctor.contains("--etcd-endpoints"), "{doctor}");
    assert!(doctor.contains("--etcd-password-file"), "{doctor}");
    assert!(doctor.contains("Reads the etcd flags"), "{doctor}");
    let set = ctl_help(&["config", "set"]);
    assert!(set.contains("Reads the etcd flags"), "{set}");
    let opts = ctl_help(&["docker-opts"]);
    assert!(opts.contains("Reads no etcd flag"), "{opts}");
    let install = ctl_help(&["install-file"]);
    assert!(install.contains("Reads no etcd flag"), "{install}");
    let top = ctl_help(&[]);
    assert!(top.contains("before or after the subcommand"), "{top}");
}

#[test]
fn weftd_help_lists_its_flags_and_no_subcommand() {
    let help = parse(&["--help"])
        .expect_err("--help prints help")
        .to_string();
    assert!(help.starts_with("weft agent"), "{help}");
    assert!(!help.contains("Commands:"), "{help}");
    assert!(help.contains("--etcd-password-file <FILE>"), "{help}");
}

fn password_file(dir: &std::path::Path, content: &str) -> PathBuf {
    let path = dir.join("etcd-password");
    std::fs::write(&path, content).expect("write the password file");
    path
}

fn with_password_file(path: &std::path::Path) -> EtcdArgs {
    let arg = format!("-etcd-password-file={}", path.display());
    parse(&["-etcd-username=weft", &arg]).unwrap().etcd
}

#[test]
fn the_password_file_is_its_content_less_one_trailing_newline() {
    let dir = tempfile::tempdir().expect("tmp");
    for (content, password) in [
        ("s3cret", "s3cret"),
        ("s3cret\n", "s3cret"),
        ("s3cret\r\n", "s3cret"),
        ("s3cret\n\n", "s3cret\n"),
        (" s3 cret \t\n", " s3 cret \t"),
    ] {
        let args = with_password_file(&password_file(dir.path(), content));
        assert_eq!(
            args.password().unwrap().as_deref(),
            Some(password),
            "{content:?}"
        );
    }
}

#[test]
fn the_password_file_is_read_again_at_every_connection() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = password_file(dir.path(), "old\n");
    let args = with_password_file(&path);
    password_file(dir.path(), "rotated\n");
    assert_eq!(args.password().unwrap().as_deref(), Some("rotated"));
}

#[test]
fn without_a_password_flag_there_is_no_password() {
    assert_eq!(parse(&[]).unwrap().etcd.password().unwrap(), None);
    let a = parse(&["-etcd-username=weft", "-etcd-password=s3cret"]).unwrap();
    assert_eq!(a.etcd.password().unwrap().as_deref(), Some("s3cret"));
}

#[test]
fn an_empty_or_missing_password_file_stops_weftd_naming_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    for content in ["", "\n"] {
        let path = password_file(dir.path(), content);
        let e = refused(&[
            "-etcd-username=weft",
            &format!("-etcd-password-file={}", path.display()),
        ]);
        assert!(
            e.contains(&format!(
                "the etcd password file {} is empty",
                path.display()
            )),
            "{e}"
        );
    }
    let missing = dir.path().join("no-such-file");
    let e = refused(&[
        "-etcd-username=weft",
        &format!("-etcd-password-file={}", missing.display()),
    ]);
    assert!(
        e.contains(&format!(
            "read the etcd password file {}",
            missing.display()
        )),
        "{e}"
    );
    assert!(e.contains("No such file"), "{e}");
    // weftctl reads it when it connects, with the same words.
    let args = ctl(&[
        "-etcd-username=weft",
        &format!("-etcd-password-file={}", missing.display()),
        "leases",
    ])
    .unwrap();
    let e = format!("{:#}", args.etcd.password().unwrap_err());
    assert!(
        e.contains(&format!(
            "read the etcd password file {}",
            missing.display()
        )),
        "{e}"
    );
}

#[test]
fn the_password_file_needs_a_user_name_and_excludes_the_password_flag() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = format!(
        "-etcd-password-file={}",
        password_file(dir.path(), "s3cret\n").display()
    );
    let e = refused(&[&file]);
    assert!(
        e.contains("--etcd-password-file needs --etcd-username"),
        "{e}"
    );
    let e = refused(&["-etcd-username=weft", "-etcd-password=s3cret", &file]);
    assert!(e.contains("cannot be used together"), "{e}");
    let e = refused(&["-etcd-username=weft"]);
    assert!(
        e.contains("--etcd-username needs --etcd-password-file"),
        "{e}"
    );
    let a = parse(&["-etcd-username=weft", &file]).unwrap();
    assert_eq!(a.etcd.password().unwrap().as_deref(), Some("s3cret"));
}

#[test]
fn flanneld_etcd_password_file_is_read_from_the_environment() {
    if !is_child() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = password_file(dir.path(), "s3cret\n");
        return run_child(
            "flanneld_etcd_password_file_is_read_from_the_environment",
            &[
                ("FLANNELD_ETCD_USERNAME", "weft"),
                ("FLANNELD_ETCD_PASSWORD_FILE", &path.display().to_string()),
            ],
        );
    }
    let a = parse(&[]).unwrap();
    assert_eq!(a.etcd.etcd_username.as_deref(), Some("weft"));
    assert_eq!(a.etcd.password().unwrap().as_deref(), Some("s3cret"));
    // With the password flag too: which one was meant is not weftd's guess.
    let e = refused(&["-etcd-password=other"]);
    assert!(e.contains("FLANNELD_ETCD_PASSWORD_FILE"), "{e}");
    assert!(
        ctl(&["leases"])
            .unwrap()
            .etcd
            .password()
            .unwrap()
            .as_deref()
            == Some("s3cret")
    );
}

#[test]
fn durations_parse_like_go() {
    assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert!(parse_duration("soon").is_err());
    assert!(parse_duration("10").is_err());
}

#[test]
fn kube_mode_takes_flanneld_s_flags_and_reads_net_conf_json_from_kube_flannel_s_place() {
    let a = parse(&[
        "-kube-subnet-mgr",
        "-kube-api-url=https://10.0.0.1:6443",
        "--kubeconfig-file=/etc/weft/kubeconfig",
        "-set-node-network-unavailable=false",
    ])
    .unwrap();
    assert!(a.kube.kube_subnet_mgr);
    assert_eq!(
        a.kube.kube_api_url.as_deref(),
        Some("https://10.0.0.1:6443")
    );
    assert_eq!(
        a.kube.kubeconfig_file,
        Some(PathBuf::from("/etc/weft/kubeconfig"))
    );
    assert!(!a.kube.set_node_network_unavailable);
    assert_eq!(a.kube.kube_annotation_prefix, "flannel.alpha.coreos.com");
    assert_eq!(
        a.net_config_path,
        Some(PathBuf::from("/etc/kube-flannel/net-conf.json"))
    );
    let etcd_mode = parse(&[]).unwrap();
    assert!(!etcd_mode.kube.kube_subnet_mgr);
    assert!(etcd_mode.kube.set_node_network_unavailable);
    assert_eq!(
        etcd_mode.net_config_path, None,
        "etcd mode reads etcd's config"
    );
    let own = parse(&["-kube-subnet-mgr", "-net-config-path=/tmp/n.json"]).unwrap();
    assert_eq!(own.net_config_path, Some(PathBuf::from("/tmp/n.json")));
}

#[test]
fn an_annotation_prefix_the_api_would_refuse_is_refused_at_start() {
    assert!(parse(&["-kube-annotation-prefix=weft.example.com"]).is_ok());
    for bad in ["Weft.io", "weft..io", "-weft.io", "weft.io/x", ""] {
        let e = refused(&[&format!("-kube-annotation-prefix={bad}")]);
        assert!(e.contains("DNS subdomain"), "{bad:?}: {e}");
    }
}
