//! weft-cni, the CNI plugin that turns this node's lease into pod addresses, as flannel's CNI
//! plugin does: it reads subnet.env and delegates to the standard `bridge` plugin with
//! `host-local` IPAM over the lease. CNI spec 1.1 (ADD, DEL, CHECK, STATUS, GC, VERSION); 0.3.1,
//! 0.4.0 and 1.0.0 configs too. Synchronous: a runtime runs it once per pod and command.
//!
//! Improvements over flannel's plugin: CHECK checks; DEL removes its record only when the
//! delegate's DEL worked; a failed ADD leaves no record behind; a second ADD of an attachment
//! is refused instead of overwriting the first one's record; a missing subnet.env is a CNI
//! error ("try again later") naming the file; a dataDir that is not root's alone is refused,
//! and GC touches only the records weft-cni wrote for its network.

mod commands;
pub mod config;
pub mod delegate;
pub mod error;
pub mod lease;
pub mod store;
pub mod version;

use serde_json::{json, Value};

use config::NetConf;
use error::{code, CniError};
use store::Attachment;

/// What weft-cni prints on stdout and whether it exits 0.
#[derive(Debug)]
pub struct Reply {
    pub stdout: Vec<u8>,
    pub success: bool,
}

impl Reply {
    fn ok(v: Option<Value>) -> Self {
        Self {
            stdout: v
                .map(|v| format!("{v:#}\n").into_bytes())
                .unwrap_or_default(),
            success: true,
        }
    }

    fn error(e: &CniError, version: &str) -> Self {
        Self {
            stdout: format!("{:#}\n", e.to_json(version)).into_bytes(),
            success: false,
        }
    }
}

/// The version to answer in: the input's own when weft-cni speaks it, else the newest.
fn answer_version(stdin: &[u8]) -> &'static str {
    let v: Option<String> = serde_json::from_slice::<Value>(stdin).ok().and_then(|v| {
        config::get_ci(v.as_object()?, "cniVersion")?
            .as_str()
            .map(String::from)
    });
    version::check_supported(v.as_deref()).unwrap_or(version::LATEST)
}

/// One invocation: `env` reads the CNI_* variables, `stdin` is the network config.
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Reply {
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    let command = var("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        let v = answer_version(stdin);
        return Reply::ok(Some(
            json!({"cniVersion": v, "supportedVersions": version::SUPPORTED}),
        ));
    }
    let reply_version = answer_version(stdin);
    match dispatch(&command, &var, stdin) {
        Ok(v) => Reply::ok(v),
        Err(e) => Reply::error(&e, reply_version),
    }
}

fn dispatch(
    command: &str,
    var: &impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    let required: &[&str] = match command {
        "ADD" | "CHECK" => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
        "DEL" => &["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
        "GC" => &["CNI_PATH"],
        "STATUS" => &[],
        "" => {
            return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set"));
        }
        other => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("unknown CNI_COMMAND {other:?}"),
            ))
        }
    };
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|k| var(k).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "required environment variables missing: {}",
                missing.join(", ")
            ),
        ));
    }
    let conf = NetConf::parse(stdin)?;
    version::allows(conf.cni_version, command)?;
    let cni_path = var("CNI_PATH").unwrap_or_default();
    let attachment = || {
        Attachment::new(
            &var("CNI_CONTAINERID").unwrap_or_default(),
            &var("CNI_IFNAME").unwrap_or_default(),
        )
    };
    match command {
        "ADD" => commands::add(&conf, &attachment()?, &cni_path).map(Some),
        "DEL" => commands::del(&conf, &attachment()?, &cni_path).map(|()| None),
        "CHECK" => commands::check(&conf, &attachment()?, &cni_path).map(|()| None),
        "STATUS" => commands::status(&conf, &cni_path).map(|()| None),
        _ => commands::gc(&conf, &cni_path).map(|()| None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Runs weft-cni with `vars` as its environment; (exit success, stdout as JSON or Null).
    fn invoke(vars: &[(&str, &str)], stdin: &str) -> (bool, Value) {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let r = run(|k| env.get(k).cloned(), stdin.as_bytes());
        let out = if r.stdout.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&r.stdout).expect("stdout is JSON")
        };
        (r.success, out)
    }

    fn vars<'a>(command: &'a str, path: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "pod1"),
            ("CNI_NETNS", "/var/run/netns/pod1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", path),
        ]
    }

    fn config(version: &str, dir: &std::path::Path) -> String {
        json!({
            "cniVersion": version, "name": "cbr0", "type": "weft-cni",
            "subnetFile": dir.join("subnet.env"), "dataDir": dir.join("data"),
        })
        .to_string()
    }

    #[test]
    fn version_answers_in_the_configs_version_with_the_supported_list() {
        let (ok, out) = invoke(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#);
        assert!(ok);
        assert_eq!(
            out,
            json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
        let (_, out) = invoke(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(out["cniVersion"], "1.1.0", "no input: the newest");
    }

    #[test]
    fn a_missing_subnet_env_is_a_cni_error_naming_the_file_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (ok, out) = invoke(&vars("ADD", "/nonexistent"), &config("1.0.0", dir.path()));
        assert!(!ok);
        assert_eq!(out["code"], code::TRY_AGAIN_LATER);
        assert_eq!(out["cniVersion"], "1.0.0");
        let msg = out["msg"].as_str().unwrap();
        assert!(
            msg.contains(&dir.path().join("subnet.env").display().to_string()),
            "{msg}"
        );
        assert!(!dir.path().join("data").exists(), "nothing recorded");
    }

    #[test]
    fn an_incomplete_subnet_env_names_the_file_and_the_missing_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("subnet.env"),
            "FLANNEL_NETWORK=10.244.0.0/16\n",
        )
        .unwrap();
        let (ok, out) = invoke(&vars("ADD", "/nonexistent"), &config("0.3.1", dir.path()));
        assert!(!ok);
        assert_eq!(out["code"], code::INVALID_CONFIG);
        let msg = out["msg"].as_str().unwrap();
        assert!(
            msg.contains("subnet.env") && msg.contains("FLANNEL_MTU"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_delegate_is_reported_before_anything_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("subnet.env"),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let empty = tempfile::tempdir().unwrap();
        let path = empty.path().display().to_string();
        let (ok, out) = invoke(&vars("ADD", &path), &config("1.0.0", dir.path()));
        assert!(!ok);
        assert!(
            out["msg"]
                .as_str()
                .unwrap()
                .contains("\"bridge\" not found"),
            "{out}"
        );
        assert!(!dir.path().join("data").exists());
    }

    #[test]
    fn del_without_a_record_succeeds_with_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let (ok, out) = invoke(&vars("DEL", "/nonexistent"), &config("1.0.0", dir.path()));
        assert!(ok, "{out}");
        assert_eq!(out, Value::Null);
    }

    #[test]
    fn environment_errors_name_the_variables() {
        let dir = tempfile::tempdir().unwrap();
        let conf = config("1.0.0", dir.path());
        let (ok, out) = invoke(&[], &conf);
        assert!(!ok);
        assert_eq!(out["code"], code::INVALID_ENV);
        let (_, out) = invoke(&[("CNI_COMMAND", "ADD")], &conf);
        assert_eq!(out["code"], code::INVALID_ENV);
        let msg = out["msg"].as_str().unwrap();
        for v in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"] {
            assert!(msg.contains(v), "{msg}");
        }
        let (_, out) = invoke(&[("CNI_COMMAND", "FROB")], &conf);
        assert!(out["msg"].as_str().unwrap().contains("FROB"));
        let mut bad = vars("DEL", "/x");
        bad[1] = ("CNI_CONTAINERID", "../../etc/passwd");
        let (ok, out) = invoke(&bad, &conf);
        assert!(!ok);
        assert_eq!(out["code"], code::INVALID_ENV);
        assert!(out["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
    }

    #[test]
    fn commands_newer_than_the_config_version_are_refused_with_code_1() {
        let dir = tempfile::tempdir().unwrap();
        for (version, command) in [("0.3.1", "CHECK"), ("1.0.0", "STATUS"), ("1.0.0", "GC")] {
            let (ok, out) = invoke(&vars(command, "/x"), &config(version, dir.path()));
            assert!(!ok);
            assert_eq!(
                out["code"],
                code::INCOMPATIBLE_VERSION,
                "{version} {command}"
            );
            assert_eq!(out["cniVersion"], version);
        }
        let (ok, out) = invoke(&vars("ADD", "/x"), &config("0.2.0", dir.path()));
        assert!(!ok);
        assert_eq!(out["code"], code::INCOMPATIBLE_VERSION);
        assert_eq!(
            out["cniVersion"], "1.1.0",
            "an unknown version is answered in the newest"
        );
    }

    #[test]
    fn status_without_subnet_env_says_not_available() {
        let dir = tempfile::tempdir().unwrap();
        let (ok, out) = invoke(&[("CNI_COMMAND", "STATUS")], &config("1.1.0", dir.path()));
        assert!(!ok);
        assert_eq!(out["code"], code::NOT_AVAILABLE);
        assert!(out["msg"].as_str().unwrap().contains("subnet.env"), "{out}");
    }

    #[test]
    fn check_needs_a_prev_result_in_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("subnet.env"),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let (ok, out) = invoke(&vars("CHECK", "/x"), &config("1.0.0", dir.path()));
        assert!(!ok);
        assert!(out["msg"].as_str().unwrap().contains("prevResult"), "{out}");

        let mut conf: Value = serde_json::from_str(&config("1.0.0", dir.path())).unwrap();
        conf["prevResult"] = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.9.2/24"}]});
        let (ok, out) = invoke(&vars("CHECK", "/x"), &conf.to_string());
        assert!(!ok);
        assert_eq!(out["code"], code::NOT_IN_LEASE);
        let msg = out["msg"].as_str().unwrap();
        assert!(
            msg.contains("10.244.9.2") && msg.contains("10.244.5.0/24"),
            "{msg}"
        );
    }
}
