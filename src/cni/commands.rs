//! ADD, DEL, CHECK, STATUS and GC: weft-cni's part of each (the lease, the record of what was
//! delegated) around the delegate's part.

use serde_json::{Map, Value};
use tracing::warn;

use super::config::{result_addresses, NetConf};
use super::delegate::Delegate;
use super::error::{code, CniError};
use super::lease::NodeLease;
use super::store::{Attachment, Store};
use super::version;
use crate::escape::Escaped;

/// The delegate of `conf` and the version to speak to it. Only a 1.1.0 config costs a VERSION
/// query: every older version is one any bridge of the last years speaks.
fn delegate_for(conf: &NetConf, cni_path: &str) -> Result<(Delegate, &'static str), CniError> {
    let d = Delegate::find(&conf.delegate_type()?, cni_path)?;
    let v = if conf.cni_version == "1.1.0" {
        version::for_delegate(conf.cni_version, &d.supported_versions()?)?
    } else {
        conf.cni_version
    };
    Ok((d, v))
}

fn set_version(v: &mut Value, version: &str) {
    if let Some(o) = v.as_object_mut() {
        o.insert("cniVersion".into(), Value::from(version));
    }
}

fn to_bytes(m: Map<String, Value>) -> Vec<u8> {
    Value::Object(m).to_string().into_bytes()
}

/// ADD: render the delegate config from the lease, record it, delegate. A failed delegated ADD
/// is undone with a delegated DEL (as the spec asks) and its record removed once that worked.
pub fn add(conf: &NetConf, a: &Attachment, cni_path: &str) -> Result<Value, CniError> {
    let lease = NodeLease::read(&conf.subnet_file)?;
    let mut rendered = conf.render_delegate(&lease, conf.cni_version)?;
    let (d, v) = delegate_for(conf, cni_path)?;
    rendered.insert("cniVersion".into(), Value::from(v));
    let bytes = to_bytes(rendered);
    let store = Store::new(&conf.data_dir);
    store.save_new(a, &bytes)?;
    let added = d.run("ADD", &bytes, &[]).and_then(|out| {
        serde_json::from_slice::<Value>(&out)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                CniError::new(
                    code::DECODE_FAILURE,
                    format!("{} ADD: its result is not a JSON object", d.kind),
                )
                .with_details(
                    String::from_utf8_lossy(&out)
                        .chars()
                        .take(2000)
                        .collect::<String>(),
                )
            })
    });
    match added {
        Ok(mut result) => {
            set_version(&mut result, conf.cni_version);
            Ok(result)
        }
        Err(e) => {
            match d.run("DEL", &bytes, &[]).and_then(|_| store.remove(a)) {
                Ok(()) => {}
                // The record stays, so the runtime's DEL (which follows a failed ADD) retries.
                Err(undo) => warn!(
                    error = %undo,
                    record = %store.path(a).display(),
                    "undoing a failed ADD failed"
                ),
            }
            Err(e)
        }
    }
}

/// What ADD handed the delegate, read back from the record.
struct Recorded {
    delegate: Delegate,
    config: Map<String, Value>,
}

/// A record's contents as ADD writes them: the delegate config it rendered, a JSON object with
/// the plugin type; with it, that type. Err: why `bytes` are not such a config.
fn parse_record(bytes: &[u8]) -> Result<(Map<String, Value>, String), &'static str> {
    let saved: Map<String, Value> =
        serde_json::from_slice(bytes).map_err(|_| "not a JSON object")?;
    match saved.get("type") {
        Some(Value::String(t)) if !t.is_empty() && !t.contains('/') => {
            let kind = t.clone();
            Ok((saved, kind))
        }
        _ => Err("no plugin type"),
    }
}

/// The record of `a`, if any.
fn recorded(store: &Store, a: &Attachment, cni_path: &str) -> Result<Option<Recorded>, CniError> {
    let Some(bytes) = store.load(a)? else {
        return Ok(None);
    };
    let (config, kind) = parse_record(&bytes).map_err(|why| {
        CniError::new(
            code::DECODE_FAILURE,
            format!(
                "{}: {why}; delete the file to give up on this attachment",
                store.path(a).display()
            ),
        )
    })?;
    Ok(Some(Recorded {
        delegate: Delegate::find(&kind, cni_path)?,
        config,
    }))
}

/// Undoes a recorded attachment: the delegate's DEL with the config ADD used, then the record
/// goes.
fn undo(
    store: &Store,
    a: &Attachment,
    r: Recorded,
    env: &[(&str, Option<&str>)],
) -> Result<(), CniError> {
    r.delegate.run("DEL", &to_bytes(r.config), env)?;
    store.remove(a)
}

/// DEL of a recorded attachment. No record: nothing of ours to undo, success (DEL twice, DEL
/// without ADD).
fn del_recorded(store: &Store, a: &Attachment, cni_path: &str) -> Result<(), CniError> {
    match recorded(store, a, cni_path)? {
        Some(r) => undo(store, a, r, &[]),
        None => Ok(()),
    }
}

/// GC's record of `a`: one weft-cni wrote for this network, else None and a log line. GC acts
/// on no attachment the runtime named, so a file merely named like a record (dataDir may be
/// shared: with another tool, or with another network's weft-cni) is left as it is.
fn gc_record(
    conf: &NetConf,
    store: &Store,
    a: &Attachment,
    cni_path: &str,
) -> Result<Option<Recorded>, CniError> {
    let Some(bytes) = store.load(a)? else {
        return Ok(None);
    };
    let path = store.path(a).to_string_lossy().into_owned();
    let (config, kind) = match parse_record(&bytes) {
        Ok(r) => r,
        Err(why) => {
            warn!(file = %Escaped(&path), "GC: not a weft-cni record ({why}): left alone");
            return Ok(None);
        }
    };
    // ADD always writes these: the version spoken to the delegate, the network's name (which
    // the delegate's own keys cannot override) and the IPAM section.
    let ours = config.get("cniVersion").is_some_and(Value::is_string)
        && config.get("name").and_then(Value::as_str) == Some(conf.name.as_str())
        && config.get("ipam").is_some_and(Value::is_object);
    if !ours {
        warn!(
            file = %Escaped(&path),
            network = %conf.name,
            "GC: not a weft-cni record of this network: left alone"
        );
        return Ok(None);
    }
    Ok(Some(Recorded {
        delegate: Delegate::find(&kind, cni_path)?,
        config,
    }))
}

pub fn del(conf: &NetConf, a: &Attachment, cni_path: &str) -> Result<(), CniError> {
    del_recorded(&Store::new(&conf.data_dir), a, cni_path)
}

/// CHECK: the pod's addresses (prevResult) must be in this node's current lease, and the
/// delegate's CHECK (interface, addresses, IPAM reservation) must pass.
pub fn check(conf: &NetConf, a: &Attachment, cni_path: &str) -> Result<(), CniError> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult"))?;
    let addrs = result_addresses(prev)?;
    if addrs.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "prevResult lists no address",
        ));
    }
    let lease = NodeLease::read(&conf.subnet_file)?;
    if let Some(ip) = addrs.iter().find(|ip| !lease.holds(**ip)) {
        let subnets: Vec<String> = lease.subnets.iter().map(|s| s.to_string()).collect();
        return Err(CniError::new(
            code::NOT_IN_LEASE,
            format!(
                "the pod's address {ip} is outside this node's lease {} ({})",
                subnets.join(", "),
                conf.subnet_file.display()
            ),
        ));
    }
    let store = Store::new(&conf.data_dir);
    let Recorded {
        delegate: d,
        config: mut saved,
    } = recorded(&store, a, cni_path)?.ok_or_else(|| {
        CniError::new(
            code::INTERNAL,
            format!(
                "no record of this attachment ({}): it was never added",
                store.path(a).display()
            ),
        )
    })?;
    let mut prev = prev.clone();
    if let Some(v) = saved.get("cniVersion").and_then(Value::as_str) {
        set_version(&mut prev, v);
    }
    saved.insert("prevResult".into(), prev);
    d.run("CHECK", &to_bytes(saved), &[])?;
    Ok(())
}

/// STATUS: ready when subnet.env is complete and the delegate is installed (and, when it speaks
/// 1.1.0, when its own STATUS says so).
pub fn status(conf: &NetConf, cni_path: &str) -> Result<(), CniError> {
    let unavailable = |e: CniError| CniError {
        code: code::NOT_AVAILABLE,
        ..e
    };
    let lease = NodeLease::read(&conf.subnet_file).map_err(unavailable)?;
    let rendered = conf.render_delegate(&lease, conf.cni_version)?;
    let d = Delegate::find(&conf.delegate_type()?, cni_path).map_err(unavailable)?;
    let speaks = d.supported_versions().map_err(unavailable)?;
    if speaks.iter().any(|v| v == "1.1.0") {
        d.run("STATUS", &to_bytes(rendered), &[])?;
    }
    Ok(())
}

/// GC: every attachment recorded for this network that the runtime no longer lists gets the
/// delegate's DEL (which frees its address), then the delegate gets GC itself when it speaks
/// 1.1.0. Keeps going past failures and reports them all.
pub fn gc(conf: &NetConf, cni_path: &str) -> Result<(), CniError> {
    let valid = conf.valid_attachments()?;
    let store = Store::new(&conf.data_dir);
    let mut errors = Vec::new();
    for a in store.list()? {
        if valid
            .iter()
            .any(|(id, ifname)| *id == a.container_id && *ifname == a.ifname)
        {
            continue;
        }
        let env = [
            ("CNI_CONTAINERID", Some(a.container_id.as_str())),
            ("CNI_IFNAME", Some(a.ifname.as_str())),
            ("CNI_NETNS", None),
        ];
        let undone = gc_record(conf, &store, &a, cni_path)
            .and_then(|r| r.map_or(Ok(()), |r| undo(&store, &a, r, &env)));
        if let Err(e) = undone {
            errors.push(e.context(format!("{}:{}", a.container_id, a.ifname)));
        }
    }
    // Without a lease there is no delegate config to forward; the stale records are done.
    if let Ok(lease) = NodeLease::read(&conf.subnet_file) {
        let forward = || -> Result<(), CniError> {
            let mut rendered = conf.render_delegate(&lease, conf.cni_version)?;
            let d = Delegate::find(&conf.delegate_type()?, cni_path)?;
            if !d.supported_versions()?.iter().any(|v| v == "1.1.0") {
                return Ok(());
            }
            if let Some(v) = conf.raw.get("cni.dev/valid-attachments") {
                rendered.insert("cni.dev/valid-attachments".into(), v.clone());
            }
            d.run("GC", &to_bytes(rendered), &[]).map(drop)
        };
        if let Err(e) = forward() {
            errors.push(e);
        }
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        n => {
            let all: Vec<String> = errors.iter().map(|e| e.msg.clone()).collect();
            Err(CniError::new(
                code::INTERNAL,
                format!("{n} GC failures: {}", all.join("; ")),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs;
    use std::path::Path;

    /// A CNI_PATH whose `fake` plugin succeeds at everything and prints nothing: a link to
    /// true(1), so no executable is written while other tests fork.
    fn fake_plugins(dir: &Path) -> String {
        let bin = dir.join("bin");
        fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink("/bin/true", bin.join("fake")).unwrap();
        bin.display().to_string()
    }

    fn record(network: &str) -> Vec<u8> {
        json!({"cniVersion": "1.0.0", "name": network, "type": "fake",
               "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.5.0/24"}]]}})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn gc_undoes_only_this_networks_records_and_leaves_every_other_file_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let cni_path = fake_plugins(tmp.path());
        let data = tmp.path().join("data");
        let conf = NetConf::parse(
            json!({
                "cniVersion": "1.1.0", "name": "cbr0", "type": "weft-cni",
                "subnetFile": tmp.path().join("no-subnet.env"), "dataDir": data,
                "cni.dev/valid-attachments": [{"containerID": "alive", "ifname": "eth0"}],
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let store = Store::new(&data);
        let at = |id: &str| Attachment::new(id, "eth0").unwrap();
        store.save_new(&at("gone"), &record("cbr0")).unwrap();
        store.save_new(&at("alive"), &record("cbr0")).unwrap();
        // Named like records, but not weft-cni's records of this network.
        let foreign: [(&str, &[u8]); 4] = [
            ("garbage:eth0", b"not JSON at all"),
            ("list:eth0", b"[1, 2]"),
            (
                "untyped:eth0",
                br#"{"cniVersion": "1.0.0", "name": "cbr0"}"#,
            ),
            ("othernet:eth0", &record("othernet")),
        ];
        for (name, bytes) in foreign {
            fs::write(data.join(name), bytes).unwrap();
        }
        fs::write(data.join("stray"), b"someone else's").unwrap();

        gc(&conf, &cni_path).unwrap();
        assert_eq!(store.load(&at("gone")).unwrap(), None, "undone and removed");
        assert!(store.load(&at("alive")).unwrap().is_some(), "still valid");
        for (name, bytes) in foreign {
            assert_eq!(fs::read(data.join(name)).unwrap(), bytes, "{name}");
        }
        assert_eq!(fs::read(data.join("stray")).unwrap(), b"someone else's");
    }
}
