//! weftd and weftctl reach an etcd that demands TLS client certificates, and one that demands a
//! user name and password (-etcd-cafile/-certfile/-keyfile, -etcd-username/-password).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{etcd_args, free_port, wait_for, weftctl_with, Etcd, WeftdSpec};

fn openssl(dir: &Path, args: &[&str]) {
    let out = weft_lab::cmd::output(
        Command::new("openssl").current_dir(dir).args(args),
        std::time::Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate.
fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=weft-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("ext");
    for name in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "san.ext",
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }
}

#[test]
fn tls_client_certificates_are_used() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = dir.path();
    make_pki(pki);
    let port = free_port();
    let peer = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let p = |f: &str| pki.join(f).display().to_string();
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut etcd = Command::new("etcd")
        .args(etcd_args("tls", &pki.join("data"), &url, &peer_url))
        .args([
            "--cert-file",
            &p("server.crt"),
            "--key-file",
            &p("server.key"),
        ])
        .args(["--trusted-ca-file", &p("ca.crt"), "--client-cert-auth"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd");
    let tls = [
        format!("-etcd-endpoints={url}"),
        format!("-etcd-cafile={}", p("ca.crt")),
        format!("-etcd-certfile={}", p("client.crt")),
        format!("-etcd-keyfile={}", p("client.key")),
    ];
    let tls_args: Vec<&str> = tls.iter().map(String::as_str).collect();
    let config = r#"{"Network":"10.92.0.0/16","Backend":{"Type":"alloc"}}"#;
    wait_for("weftctl over TLS", Duration::from_secs(20), || {
        let mut args = tls_args.clone();
        args.extend(["config", "set", "-"]);
        weftctl_with(&args, Some(config))
            .status
            .success()
            .then_some(())
    });
    // Without a client certificate etcd refuses.
    let plain = weftctl_with(&[&tls[0], &tls[1], "config", "get"], None);
    assert!(
        !plain.status.success(),
        "etcd must demand the client certificate"
    );

    let mut spec = WeftdSpec::new_raw(
        &url,
        "/coreos.com/network",
        Ipv4Addr::new(10, 99, 0, 1),
        &pki.join("host"),
    );
    for a in &tls[1..] {
        spec = spec.arg(a.as_str());
    }
    let a = spec.start();
    assert!(a.wait_subnet(Duration::from_secs(30)).starts_with("10.92."));
    drop(a);
    let _ = etcd.kill();
    let _ = etcd.wait();
}

/// Turns on etcd's authentication: `root` (etcd wants it before `auth enable`), and `weft`
/// (password `s3cret`) with read-write on the network prefix.
fn enable_auth(etcd: &Etcd) {
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "add", "weft:s3cret"],
        &["role", "add", "weft"],
        &[
            "role",
            "grant-permission",
            "weft",
            "--prefix=true",
            "readwrite",
            "/coreos.com/network/",
        ],
        &["user", "grant-role", "weft", "weft"],
        &["auth", "enable"],
    ] {
        let out = etcd.ctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn user_name_and_password_are_used() {
    let etcd = Etcd::start();
    enable_auth(&etcd);
    let ep = format!("-etcd-endpoints={}", etcd.endpoint);
    let config = r#"{"Network":"10.93.0.0/16","Backend":{"Type":"alloc"}}"#;
    let denied = weftctl_with(&[&ep, "config", "set", "-"], Some(config));
    assert!(!denied.status.success(), "anonymous writes are refused");
    let ok = weftctl_with(
        &[
            &ep,
            "-etcd-username=weft",
            "-etcd-password=s3cret",
            "config",
            "set",
            "-",
        ],
        Some(config),
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().expect("tmp");
    let a = WeftdSpec::new(
        &etcd,
        "/coreos.com/network",
        Ipv4Addr::new(10, 99, 0, 1),
        dir.path(),
    )
    .env("FLANNELD_ETCD_USERNAME", "weft")
    .env("FLANNELD_ETCD_PASSWORD", "s3cret")
    .start();
    assert!(a.wait_subnet(Duration::from_secs(30)).starts_with("10.93."));
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_password_file_authenticates_weftctl_and_weftd() {
    let etcd = Etcd::start();
    enable_auth(&etcd);
    let dir = tempfile::tempdir().expect("tmp");
    // As `echo s3cret > file` or an editor leaves it: one trailing newline, not the password's.
    let pw = dir.path().join("etcd-password");
    std::fs::write(&pw, "s3cret\n").expect("password file");
    let ep = format!("-etcd-endpoints={}", etcd.endpoint);
    let file = format!("-etcd-password-file={}", pw.display());
    let config = r#"{"Network":"10.94.0.0/16","Backend":{"Type":"alloc"}}"#;

    // The flags after the subcommand, as an operator types them.
    let set = weftctl_with(
        &["config", "set", "-", &ep, "-etcd-username=weft", &file],
        Some(config),
    );
    assert!(set.status.success(), "{}", text(&set));
    let get = weftctl_with(&[&ep, "config", "get", "-etcd-username=weft", &file], None);
    assert!(get.status.success(), "{}", text(&get));
    assert!(text(&get).contains("10.94.0.0/16"), "{}", text(&get));

    // Another password in the file: etcd refuses it (the file is what is sent).
    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "s3cret \n").expect("password file");
    let denied = weftctl_with(
        &[
            &ep,
            "-etcd-username=weft",
            &format!("-etcd-password-file={}", wrong.display()),
            "config",
            "get",
        ],
        None,
    );
    assert!(!denied.status.success(), "{}", text(&denied));
    assert!(
        text(&denied).contains("authentication failed"),
        "{}",
        text(&denied)
    );

    // weftd with the settings a unit's /etc/sysconfig/weftd gives it.
    let a = WeftdSpec::new(
        &etcd,
        "/coreos.com/network",
        Ipv4Addr::new(10, 99, 0, 1),
        &dir.path().join("host"),
    )
    .env("FLANNELD_ETCD_USERNAME", "weft")
    .env("FLANNELD_ETCD_PASSWORD_FILE", pw.display().to_string())
    .start();
    assert!(a.wait_subnet(Duration::from_secs(30)).starts_with("10.94."));
}

#[test]
fn weftd_stops_at_start_naming_a_password_file_it_cannot_use() {
    let dir = tempfile::tempdir().expect("tmp");
    let empty = dir.path().join("empty-password");
    std::fs::write(&empty, "\n").expect("password file");
    let missing = dir.path().join("no-such-password");
    for (file, why) in [(&empty, "is empty"), (&missing, "No such file")] {
        // Nothing listens there: weftd must stop before it ever tries etcd.
        let mut a = WeftdSpec::new_raw(
            "http://127.0.0.1:9",
            "/coreos.com/network",
            Ipv4Addr::new(10, 99, 0, 1),
            &dir.path().join("host"),
        )
        .arg("-etcd-username=weft")
        .arg(format!("-etcd-password-file={}", file.display()))
        .start();
        let status = a.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(2), "{}", a.log());
        let log = a.log();
        assert!(
            log.contains(&file.display().to_string()) && log.contains(why),
            "{log}"
        );
    }
}
