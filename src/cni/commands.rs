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

/// The record of `a`, if any.
fn recorded(store: &Store, a: &Attachment, cni_path: &str) -> Result<Option<Recorded>, CniError> {
    let Some(bytes) = store.load(a)? else {
        return Ok(None);
    };
    let corrupt = |why: &str| {
        CniError::new(
            code::DECODE_FAILURE,
            format!(
                "{}: {why}; delete the file to give up on this attachment",
                store.path(a).display()
            ),
        )
    };
    let saved: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| corrupt("not a JSON object"))?;
    let kind = match saved.get("type") {
        Some(Value::String(t)) if !t.is_empty() && !t.contains('/') => t.clone(),
        _ => return Err(corrupt("no plugin type")),
    };
    Ok(Some(Recorded {
        delegate: Delegate::find(&kind, cni_path)?,
        config: saved,
    }))
}

/// DEL of a recorded attachment: the delegate's DEL with the config ADD used, then the record
/// goes. No record: nothing of ours to undo, success (DEL twice, DEL without ADD).
fn del_recorded(
    store: &Store,
    a: &Attachment,
    cni_path: &str,
    env: &[(&str, Option<&str>)],
) -> Result<(), CniError> {
    let Some(r) = recorded(store, a, cni_path)? else {
        return Ok(());
    };
    r.delegate.run("DEL", &to_bytes(r.config), env)?;
    store.remove(a)
}

pub fn del(conf: &NetConf, a: &Attachment, cni_path: &str) -> Result<(), CniError> {
    del_recorded(&Store::new(&conf.data_dir), a, cni_path, &[])
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

/// GC: every recorded attachment the runtime no longer lists gets the delegate's DEL (which
/// frees its address), then the delegate gets GC itself when it speaks 1.1.0. Keeps going
/// past failures and reports them all.
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
        if let Err(e) = del_recorded(&store, &a, cni_path, &env) {
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
