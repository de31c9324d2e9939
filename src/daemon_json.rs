//! Docker's daemon.json gets `bip` and `mtu` from the lease, and on a dual-stack lease `"ipv6":
//! true` and `fixed-cidr-v6` (its IPv6 subnet). The file is the operator's: every other key keeps
//! its bytes and its place, so we edit the text in place rather than re-serializing, and a file
//! that is not a JSON object is never written. A file weftd cannot merge is never a reason to
//! exit either (that would stop lease renewal): it is reported once, on /readyz and in the log, and
//! retried until it is fixed.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnet::Ipv6Net;
use serde_json::{Map, Value};
use tracing::{info, warn};

use crate::escape::Escaped;
use crate::fsutil;
use crate::health::Readiness;

/// A UTF-8 byte order mark, which Windows editors put first and Docker accepts.
const BOM: &str = "\u{feff}";
/// How often a file that could not be merged is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// Serializes writers of daemon.json within weftd: a retry for an old lease must not write its
/// bip after a newer lease's (it checks under this lock that it is still current). It also holds
/// the stale `fixed-cidr-v6` last logged, so that one is said once, not at every lease.
static WRITES: Mutex<Option<String>> = Mutex::new(None);

/// What weftd sets in daemon.json: Docker's default bridge from the lease.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerNet {
    /// `bip`: the lease's first address with its prefix length (FLANNEL_SUBNET).
    pub bip: String,
    pub mtu: u32,
    /// A dual-stack lease's IPv6 subnet: `"ipv6": true` and `"fixed-cidr-v6"`. Docker wants the
    /// network (`fd00:60:0:5::/64`) and gives docker0 its first address, FLANNEL_IPV6_SUBNET's.
    /// Nothing more: `ip6tables` (and the `experimental` that Docker 20.10 needs for it) is the
    /// operator's choice, as `iptables` is.
    pub ipv6: Option<Ipv6Net>,
}

impl DockerNet {
    /// An IPv4-only lease.
    pub fn v4(bip: &str, mtu: u32) -> Self {
        DockerNet {
            bip: bip.to_string(),
            mtu,
            ipv6: None,
        }
    }

    /// The members weftd owns, in the order they are appended, as JSON text.
    fn members(&self) -> Vec<(&'static str, String)> {
        let mut m = vec![
            ("bip", Value::from(self.bip.as_str()).to_string()),
            ("mtu", self.mtu.to_string()),
        ];
        if let Some(subnet) = self.ipv6 {
            m.push(("ipv6", "true".to_string()));
            m.push((
                "fixed-cidr-v6",
                Value::from(subnet.trunc().to_string()).to_string(),
            ));
        }
        m
    }
}

/// "bip 10.5.7.1/24 and mtu 1450", with the IPv6 keys on a dual-stack lease.
impl fmt::Display for DockerNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ipv6 {
            None => write!(f, "bip {} and mtu {}", self.bip, self.mtu),
            Some(s) => write!(
                f,
                "bip {}, mtu {}, ipv6 true and fixed-cidr-v6 {}",
                self.bip,
                self.mtu,
                s.trunc()
            ),
        }
    }
}

/// A key weftd changed, with what the operator had there.
#[derive(Debug, Clone, PartialEq)]
pub struct Replaced {
    pub key: &'static str,
    pub old: String,
    pub new: String,
}

/// What [`update`] did to the file, for the log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Updated {
    /// Values the operator had that weftd replaced.
    pub replaced: Vec<Replaced>,
    /// Keys weftd appended.
    pub added: Vec<&'static str>,
    /// On an IPv4-only lease, a `fixed-cidr-v6` the file has (its JSON text), left as it is.
    pub stale_v6: Option<String>,
}

/// Top-level members of a JSON object: key, the byte range of its value, and the indentation of
/// its line.
struct Member {
    key: String,
    value: Range<usize>,
}

/// The top-level object of a daemon.json as Docker reads it: a leading BOM is skipped, and an
/// empty (or blank) file is an empty object.
pub fn parse(text: &str) -> Result<Map<String, Value>> {
    let body = text.strip_prefix(BOM).unwrap_or(text);
    if body.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str(body).context("not valid JSON")? {
        Value::Object(o) => Ok(o),
        _ => bail!("not a JSON object"),
    }
}

/// Returns the text with `bip` and `mtu` set, and which existing values were replaced.
/// `None` when the file already says exactly this. A leading BOM stays. (An IPv4-only lease:
/// [`merge_net`] with [`DockerNet::v4`].)
pub fn merge(text: &str, bip: &str, mtu: u32) -> Result<Option<(String, Vec<Replaced>)>> {
    merge_net(text, &DockerNet::v4(bip, mtu))
}

/// Returns the text with `net`'s members set, and which existing values were replaced; `None`
/// when the file already says exactly this. On an IPv4-only lease `ipv6` and `fixed-cidr-v6` are
/// not weftd's and stay as they are, like any other key.
pub fn merge_net(text: &str, net: &DockerNet) -> Result<Option<(String, Vec<Replaced>)>> {
    Ok(edit(text, net)?.map(|m| (m.text, m.replaced)))
}

struct Merged {
    text: String,
    replaced: Vec<Replaced>,
    added: Vec<&'static str>,
}

/// Whether the file's value `old` already says `new`. Text for text, as for bip, except
/// `fixed-cidr-v6`: one IPv6 network has many spellings (case, zeros compressed or not) that
/// Docker reads alike, and replacing one with another would ask for a Docker restart for nothing.
fn same(key: &str, old: &str, new: &str) -> bool {
    if old == new {
        return true;
    }
    let net = |s: &str| {
        serde_json::from_str::<String>(s)
            .ok()
            .and_then(|s| s.parse::<Ipv6Net>().ok())
    };
    key == "fixed-cidr-v6" && net(old).is_some() && net(old) == net(new)
}

fn edit(text: &str, net: &DockerNet) -> Result<Option<Merged>> {
    parse(text)?;
    let (bom, body) = match text.strip_prefix(BOM) {
        Some(rest) => (BOM, rest),
        None => ("", text),
    };
    let source = if body.trim().is_empty() { "{}" } else { body };
    let wanted = net.members();

    let (open, close, members) = scan(source)?;
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let mut replaced = Vec::new();
    let mut missing = Vec::new();
    for (key, new) in &wanted {
        let found: Vec<&Member> = members.iter().filter(|m| m.key == *key).collect();
        if found.is_empty() {
            missing.push((*key, new.clone()));
        }
        for m in found {
            let old = &source[m.value.clone()];
            if !same(key, old, new) {
                replaced.push(Replaced {
                    key,
                    old: old.to_string(),
                    new: new.clone(),
                });
                edits.push((m.value.clone(), new.clone()));
            }
        }
    }
    if edits.is_empty() && missing.is_empty() {
        return Ok(None);
    }

    if !missing.is_empty() {
        // New members go on their own lines, indented like the last existing one.
        let indent = members.last().map_or_else(
            || "  ".to_string(),
            |last| indent_before(source, last_key_start(source, last)),
        );
        let mut ins = String::new();
        for (key, value) in &missing {
            if !ins.is_empty() || !members.is_empty() {
                ins.push(',');
            }
            ins.push_str(&format!("\n{indent}\"{key}\": {value}"));
        }
        match members.last() {
            Some(last) => edits.push((last.value.end..last.value.end, ins)),
            None => {
                ins.push('\n');
                edits.push((open + 1..close, ins));
            }
        }
    }

    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = format!("{bom}{source}");
    for (range, with) in edits {
        out.replace_range(range.start + bom.len()..range.end + bom.len(), &with);
    }
    if body.trim().is_empty() {
        out.push('\n');
    }
    Ok(Some(Merged {
        text: out,
        replaced,
        added: missing.into_iter().map(|(k, _)| k).collect(),
    }))
}

/// Merges `net` into the file at `path` and writes it if anything changed: through a symlink,
/// keeping owner, group and mode, atomically and durably ([`fsutil::write_atomic`]).
pub fn update(path: &Path, net: &DockerNet) -> Result<Updated> {
    let text = fsutil::read_optional(path)?.unwrap_or_default();
    let cannot = || {
        format!(
            "{} cannot be parsed, so weftd leaves it untouched",
            path.display()
        )
    };
    let merged = edit(&text, net).with_context(cannot)?;
    // An IPv4-only lease and a fixed-cidr-v6 in the file: most likely weftd's own from an earlier
    // dual-stack network, but weftd cannot tell it from the operator's (Docker's IPv6 may be
    // wanted without weft), and removing keys from the operator's file is not weftd's to do.
    // It stays; the log says so, and what to do if it is stale.
    let stale_v6 = match net.ipv6 {
        Some(_) => None,
        None => parse(&text)
            .with_context(cannot)?
            .get("fixed-cidr-v6")
            .map(Value::to_string),
    };
    let Some(merged) = merged else {
        return Ok(Updated {
            stale_v6,
            ..Updated::default()
        });
    };
    fsutil::write_atomic(path, merged.text.as_bytes(), 0o644)?;
    Ok(Updated {
        replaced: merged.replaced,
        added: merged.added,
        stale_v6,
    })
}

/// Writes the lease's `bip`/`mtu` (and IPv6 keys) into daemon.json and never fails: when the
/// file cannot be read, parsed or written, the reason goes to `ready` (so /readyz says 503 with
/// it), is logged once, and the file is tried again every few seconds until it works or a newer
/// call replaces this one. The lease and the data path do not depend on Docker's file.
pub fn publish(path: &Path, net: &DockerNet, ready: &Readiness) {
    publish_every(path, net, ready, RETRY);
}

fn publish_every(path: &Path, net: &DockerNet, ready: &Readiness, every: Duration) {
    let mut said = WRITES.lock().unwrap_or_else(PoisonError::into_inner);
    match update(path, net) {
        Ok(updated) => {
            log_updated(path, &updated, &mut said);
            ready.set_problem(None);
        }
        Err(e) => {
            let why = problem(&e, net);
            if ready.problem().as_deref() != Some(why.as_str()) {
                warn!(file = %path.display(), "{why}");
            }
            let generation = ready.set_problem(Some(why));
            tokio::spawn(retry(
                path.to_path_buf(),
                net.clone(),
                ready.clone(),
                generation,
                every,
            ));
        }
    }
}

/// Tries the file again until it can be merged, or a newer [`publish`] takes over.
async fn retry(path: PathBuf, net: DockerNet, ready: Readiness, generation: u64, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let (path, net, ready) = (path.clone(), net.clone(), ready.clone());
        let done = tokio::task::spawn_blocking(move || {
            let mut said = WRITES.lock().unwrap_or_else(PoisonError::into_inner);
            if ready.problem_generation() != generation {
                return true;
            }
            match update(&path, &net) {
                Ok(updated) => {
                    info!(file = %path.display(), "daemon.json written at last: {net}");
                    log_updated(&path, &updated, &mut said);
                    ready.update_problem(generation, None);
                    true
                }
                Err(e) => {
                    let why = problem(&e, &net);
                    if ready.problem().as_deref() != Some(why.as_str()) {
                        warn!(file = %path.display(), "{why}");
                        ready.update_problem(generation, Some(why));
                    }
                    false
                }
            }
        })
        .await;
        // A panicking merge would be a bug; stop retrying rather than panic every few seconds.
        if done.unwrap_or(true) {
            return;
        }
    }
}

fn problem(e: &anyhow::Error, net: &DockerNet) -> String {
    format!("{e:#}; Docker's {net} are not set until that is fixed")
}

/// Logs what an update changed that Docker only picks up at a restart; `said` is the stale
/// fixed-cidr-v6 logged last (see [`WRITES`]).
fn log_updated(path: &Path, u: &Updated, said: &mut Option<String>) {
    for r in &u.replaced {
        // The old value is the file's text: escaped, so it cannot forge a log line.
        warn!(file = %path.display(), "replaced {} {} with {}; restart Docker to pick it up",
              r.key, Escaped(&r.old), r.new);
    }
    // IPv6 turned on for a host whose Docker already has the file's bip: nothing was replaced,
    // yet Docker runs without IPv6 until it restarts. (The first write of a file is no news:
    // Docker starts after weftd.)
    let v6: Vec<&str> = (u.added.iter().copied())
        .filter(|k| matches!(*k, "ipv6" | "fixed-cidr-v6"))
        .collect();
    if !v6.is_empty() && !u.added.contains(&"bip") {
        info!(file = %path.display(), "added {}; restart Docker to pick up IPv6", v6.join(" and "));
    }
    match &u.stale_v6 {
        Some(v) if said.as_deref() != Some(v.as_str()) => {
            info!(file = %path.display(),
                  "the network is IPv4 only but daemon.json has fixed-cidr-v6 {}: left as it is (the file is the operator's); if an earlier dual-stack lease put it there, remove ipv6 and fixed-cidr-v6 and restart Docker",
                  Escaped(v));
            *said = Some(v.clone());
        }
        Some(_) => {}
        None => *said = None,
    }
}

fn last_key_start(source: &str, m: &Member) -> usize {
    // The key's opening quote is the last '"' before the ':' that precedes the value.
    let before = &source[..m.value.start];
    let colon = before.rfind(':').unwrap_or(0);
    let key_end = before[..colon].rfind('"').unwrap_or(0);
    before[..key_end].rfind('"').unwrap_or(0)
}

fn indent_before(source: &str, pos: usize) -> String {
    let line_start = source[..pos].rfind('\n').map_or(0, |i| i + 1);
    let prefix = &source[line_start..pos];
    if prefix.chars().all(char::is_whitespace) && !prefix.is_empty() {
        prefix.to_string()
    } else {
        "  ".to_string()
    }
}

/// Finds the top-level members of an object already known to be valid JSON.
fn scan(s: &str) -> Result<(usize, usize, Vec<Member>)> {
    let b = s.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        bail!("not a JSON object");
    }
    let open = i;
    i += 1;
    let mut members = Vec::new();
    loop {
        i = skip_ws(b, i);
        match b.get(i) {
            Some(b'}') => return Ok((open, i, members)),
            Some(b',') => {
                i += 1;
                continue;
            }
            Some(b'"') => {}
            _ => bail!("unexpected byte at offset {i}"),
        }
        let key_end = skip_string(b, i)?;
        let key: String = serde_json::from_str(&s[i..key_end])?;
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            bail!("expected ':' at offset {i}");
        }
        let start = skip_ws(b, i + 1);
        let end = skip_value(b, start)?;
        members.push(Member {
            key,
            value: start..end,
        });
        i = end;
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

fn skip_string(b: &[u8], start: usize) -> Result<usize> {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    bail!("unterminated string")
}

fn skip_value(b: &[u8], start: usize) -> Result<usize> {
    match b.get(start) {
        Some(b'"') => skip_string(b, start),
        Some(b'{') | Some(b'[') => {
            let mut depth = 0usize;
            let mut i = start;
            while i < b.len() {
                match b[i] {
                    b'"' => {
                        i = skip_string(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            bail!("unterminated value")
        }
        Some(_) => {
            let mut i = start;
            while i < b.len() && !matches!(b[i], b',' | b'}' | b']') && !b[i].is_ascii_whitespace()
            {
                i += 1;
            }
            Ok(i)
        }
        None => bail!("missing value"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPERATOR: &str = r#"{
    "registry-mirrors": ["https://mirror.example:5000"],
    "hosts": ["unix:///var/run/docker.sock", "tcp://127.0.0.1:2375"],
    "insecure-registries" : [ "registry.local:5000" ],
    "log-opts": {"max-size": "10m", "bip": "not top level"}
}
"#;

    #[test]
    fn adds_bip_and_mtu_keeping_every_other_byte() {
        let (out, replaced) = merge(OPERATOR, "10.5.7.1/24", 1450).unwrap().unwrap();
        assert!(replaced.is_empty());
        let expected = OPERATOR.replace(
            "\"not top level\"}\n}",
            "\"not top level\"},\n    \"bip\": \"10.5.7.1/24\",\n    \"mtu\": 1450\n}",
        );
        assert_eq!(out, expected);
        let v: Value = serde_json::from_str(&out).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "registry-mirrors",
                "hosts",
                "insecure-registries",
                "log-opts",
                "bip",
                "mtu"
            ]
        );
        // A second merge is a no-op.
        assert_eq!(merge(&out, "10.5.7.1/24", 1450).unwrap(), None);
    }

    #[test]
    fn replaces_a_conflicting_bip_in_place_and_reports_it() {
        let text = "{\"bip\":\"172.17.0.1/16\",\"debug\":true,\"mtu\":1500}";
        let (out, replaced) = merge(text, "10.5.7.1/24", 1450).unwrap().unwrap();
        assert_eq!(out, "{\"bip\":\"10.5.7.1/24\",\"debug\":true,\"mtu\":1450}");
        assert_eq!(replaced[0].old, "\"172.17.0.1/16\"");
        assert_eq!(replaced[1].old, "1500");
    }

    /// A dual-stack lease: 10.5.7.0/24 with fd00:60:0:7::/64.
    fn dual() -> DockerNet {
        DockerNet {
            ipv6: Some("fd00:60:0:7::/64".parse().unwrap()),
            ..DockerNet::v4("10.5.7.1/24", 1450)
        }
    }

    #[test]
    fn a_dual_stack_lease_adds_ipv6_and_fixed_cidr_v6_keeping_every_other_byte() {
        let (out, replaced) = merge_net(OPERATOR, &dual()).unwrap().unwrap();
        assert!(replaced.is_empty());
        let expected = OPERATOR.replace(
            "\"not top level\"}\n}",
            "\"not top level\"},\n    \"bip\": \"10.5.7.1/24\",\n    \"mtu\": 1450,\n    \
             \"ipv6\": true,\n    \"fixed-cidr-v6\": \"fd00:60:0:7::/64\"\n}",
        );
        assert_eq!(out, expected);
        let v: Value = serde_json::from_str(&out).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys[4..], ["bip", "mtu", "ipv6", "fixed-cidr-v6"]);
        assert_eq!(merge_net(&out, &dual()).unwrap(), None);
        // An empty file, and a lease given as its gateway (FLANNEL_IPV6_SUBNET's form): the
        // network is what Docker's fixed-cidr-v6 takes.
        let gateway = DockerNet {
            ipv6: Some("fd00:60:0:7::1/64".parse().unwrap()),
            ..dual()
        };
        let (out, _) = merge_net("", &gateway).unwrap().unwrap();
        assert_eq!(
            out,
            "{\n  \"bip\": \"10.5.7.1/24\",\n  \"mtu\": 1450,\n  \"ipv6\": true,\n  \
             \"fixed-cidr-v6\": \"fd00:60:0:7::/64\"\n}\n"
        );
    }

    #[test]
    fn replaces_a_conflicting_fixed_cidr_v6_in_place_and_reports_it() {
        let text = "{\"fixed-cidr-v6\" : \"2001:db8:1::/64\",\"ipv6\":true,\
                    \"bip\":\"10.5.7.1/24\",\"mtu\":1450}";
        let (out, replaced) = merge_net(text, &dual()).unwrap().unwrap();
        assert_eq!(
            out,
            "{\"fixed-cidr-v6\" : \"fd00:60:0:7::/64\",\"ipv6\":true,\
             \"bip\":\"10.5.7.1/24\",\"mtu\":1450}"
        );
        assert_eq!(
            replaced,
            [Replaced {
                key: "fixed-cidr-v6",
                old: "\"2001:db8:1::/64\"".into(),
                new: "\"fd00:60:0:7::/64\"".into(),
            }]
        );
    }

    #[test]
    fn ipv6_false_in_the_file_is_replaced_by_true_and_reported() {
        let text = "{\n\t\"ipv6\": false,\n\t\"debug\": true\n}\n";
        let (out, replaced) = merge_net(text, &dual()).unwrap().unwrap();
        assert_eq!(
            out,
            "{\n\t\"ipv6\": true,\n\t\"debug\": true,\n\t\"bip\": \"10.5.7.1/24\",\n\t\
             \"mtu\": 1450,\n\t\"fixed-cidr-v6\": \"fd00:60:0:7::/64\"\n}\n"
        );
        assert_eq!(replaced.len(), 1);
        assert_eq!(
            (
                replaced[0].key,
                replaced[0].old.as_str(),
                replaced[0].new.as_str()
            ),
            ("ipv6", "false", "true")
        );
    }

    #[test]
    fn the_same_ipv6_network_spelled_otherwise_is_kept() {
        for spelling in ["FD00:60:0:7::/64", "fd00:0060:0000:0007:0:0:0:0/64"] {
            let text = format!(
                "{{\"bip\":\"10.5.7.1/24\",\"mtu\":1450,\"ipv6\":true,\"fixed-cidr-v6\":\"{spelling}\"}}"
            );
            assert_eq!(merge_net(&text, &dual()).unwrap(), None, "{spelling}");
        }
        // Another prefix length, or an address inside it, is not the lease's network.
        for other in ["fd00:60:0:7::/56", "fd00:60:0:7::1/64"] {
            let text = format!("{{\"fixed-cidr-v6\":\"{other}\"}}");
            let (_, replaced) = merge_net(&text, &dual()).unwrap().unwrap();
            assert_eq!(replaced[0].key, "fixed-cidr-v6", "{other}");
        }
    }

    #[test]
    fn an_ipv4_only_lease_leaves_the_ipv6_keys_alone_and_says_they_look_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        let text = "{\n  \"bip\": \"10.5.7.1/24\",\n  \"mtu\": 1450,\n  \"ipv6\": true,\n  \
                    \"fixed-cidr-v6\": \"fd00:60:0:7::/64\"\n}\n";
        std::fs::write(&path, text).unwrap();
        // Nothing to change: the file is not written, the stale key is reported.
        let u = update(&path, &DockerNet::v4("10.5.7.1/24", 1450)).unwrap();
        assert_eq!(u.stale_v6.as_deref(), Some("\"fd00:60:0:7::/64\""));
        assert!(u.replaced.is_empty() && u.added.is_empty());
        // A new IPv4 lease: bip replaced, the IPv6 keys kept byte for byte.
        let u = update(&path, &DockerNet::v4("10.5.9.1/24", 1450)).unwrap();
        assert_eq!(u.replaced.len(), 1);
        assert_eq!(u.replaced[0].key, "bip");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            text.replace("10.5.7.1/24", "10.5.9.1/24")
        );
        // No fixed-cidr-v6, nothing to say.
        std::fs::write(&path, "{\"ipv6\": false}").unwrap();
        let u = update(&path, &DockerNet::v4("10.5.9.1/24", 1450)).unwrap();
        assert_eq!(u.stale_v6, None);
        assert_eq!(u.added, ["bip", "mtu"]);
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("{\"ipv6\": false,"));
    }

    #[test]
    fn update_reports_ipv6_keys_added_beside_an_existing_bip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        update(&path, &DockerNet::v4("10.5.7.1/24", 1450)).unwrap();
        let u = update(&path, &dual()).unwrap();
        assert_eq!(u.added, ["ipv6", "fixed-cidr-v6"]);
        assert!(u.replaced.is_empty());
        assert_eq!(
            parse(&std::fs::read_to_string(&path).unwrap()).unwrap()["fixed-cidr-v6"],
            "fd00:60:0:7::/64"
        );
    }

    #[test]
    fn a_problem_names_every_key_left_unset() {
        let e = anyhow::anyhow!("daemon.json cannot be parsed");
        assert_eq!(
            problem(&e, &dual()),
            "daemon.json cannot be parsed; Docker's bip 10.5.7.1/24, mtu 1450, ipv6 true and \
             fixed-cidr-v6 fd00:60:0:7::/64 are not set until that is fixed"
        );
    }

    #[test]
    fn empty_or_missing_file_becomes_a_small_object() {
        let (out, _) = merge("", "10.0.1.1/24", 1500).unwrap().unwrap();
        assert_eq!(out, "{\n  \"bip\": \"10.0.1.1/24\",\n  \"mtu\": 1500\n}\n");
        let (out, _) = merge("{}\n", "10.0.1.1/24", 1500).unwrap().unwrap();
        assert_eq!(out, "{\n  \"bip\": \"10.0.1.1/24\",\n  \"mtu\": 1500\n}\n");
        serde_json::from_str::<Value>(&out).unwrap();
    }

    #[test]
    fn refuses_what_it_cannot_parse() {
        for bad in ["{\"bip\": ", "[1,2]", "not json", "{\"a\":1}}"] {
            assert!(merge(bad, "10.0.1.1/24", 1500).is_err(), "{bad}");
        }
    }

    #[test]
    fn update_never_clobbers_an_invalid_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        std::fs::write(&path, "{ broken").unwrap();
        let e = update(&path, &DockerNet::v4("10.0.1.1/24", 1500)).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("daemon.json cannot be parsed"), "{e}");
        assert!(
            e.contains("at line 1 column"),
            "the parse error is named: {e}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ broken");
    }

    #[test]
    fn a_byte_order_mark_is_accepted_and_kept() {
        let text = "\u{feff}{\"debug\": true}\n";
        assert_eq!(parse(text).unwrap()["debug"], true);
        let (out, _) = merge(text, "10.0.1.1/24", 1500).unwrap().unwrap();
        assert_eq!(
            out,
            "\u{feff}{\"debug\": true,\n  \"bip\": \"10.0.1.1/24\",\n  \"mtu\": 1500}\n"
        );
        assert_eq!(merge(&out, "10.0.1.1/24", 1500).unwrap(), None);
        let (out, _) = merge("\u{feff}", "10.0.1.1/24", 1500).unwrap().unwrap();
        assert_eq!(
            out,
            "\u{feff}{\n  \"bip\": \"10.0.1.1/24\",\n  \"mtu\": 1500\n}\n"
        );
        // Only a leading one: a BOM anywhere else is not JSON.
        assert!(merge("{}\u{feff}", "10.0.1.1/24", 1500).is_err());
    }

    #[test]
    fn update_writes_through_a_symlink_keeping_bom_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("docker-daemon.json");
        std::fs::write(&real, "\u{feff}{}\n").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("daemon.json");
        std::os::unix::fs::symlink("docker-daemon.json", &link).unwrap();
        update(&link, &DockerNet::v4("10.0.1.1/24", 1500)).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        let text = std::fs::read_to_string(&real).unwrap();
        assert!(text.starts_with("\u{feff}{\n  \"bip\""), "{text:?}");
        let mode = std::fs::metadata(&real).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    const TICK: Duration = Duration::from_millis(20);

    /// Waits up to two seconds for `f`.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..100 {
            if f() {
                return;
            }
            tokio::time::sleep(TICK).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn an_unparseable_file_is_left_alone_reported_and_merged_once_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        std::fs::write(&path, "{\"debug\": true,, }").unwrap();
        let ready = Readiness::default();
        publish_every(&path, &DockerNet::v4("10.0.1.1/24", 1500), &ready, TICK);
        let why = ready.problem().expect("a problem is reported");
        assert!(why.contains("daemon.json cannot be parsed"), "{why}");
        assert!(
            why.contains("bip 10.0.1.1/24 and mtu 1500 are not set"),
            "{why}"
        );
        tokio::time::sleep(TICK * 5).await;
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"debug\": true,, }"
        );
        assert_eq!(ready.problem().as_deref(), Some(why.as_str()));

        std::fs::write(&path, "{\"debug\": true}").unwrap();
        eventually("the problem to clear", || ready.problem().is_none()).await;
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"debug\": true,\n  \"bip\": \"10.0.1.1/24\",\n  \"mtu\": 1500}"
        );
    }

    #[tokio::test]
    async fn a_retry_for_an_older_lease_never_writes_its_bip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        std::fs::write(&path, "{ broken").unwrap();
        let ready = Readiness::default();
        publish_every(&path, &DockerNet::v4("10.0.1.1/24", 1500), &ready, TICK);
        publish_every(&path, &DockerNet::v4("10.0.2.1/24", 1500), &ready, TICK);
        std::fs::write(&path, "{}").unwrap();
        eventually("the problem to clear", || ready.problem().is_none()).await;
        tokio::time::sleep(TICK * 5).await;
        let after = parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(after["bip"], "10.0.2.1/24");
    }

    #[tokio::test]
    async fn an_unreadable_file_is_a_problem_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading it fails.
        let path = dir.path().join("daemon.json");
        std::fs::create_dir(&path).unwrap();
        let ready = Readiness::default();
        publish_every(&path, &DockerNet::v4("10.0.1.1/24", 1500), &ready, TICK);
        assert!(ready.problem().is_some());
        std::fs::remove_dir(&path).unwrap();
        eventually("the problem to clear", || ready.problem().is_none()).await;
        assert_eq!(
            parse(&std::fs::read_to_string(&path).unwrap()).unwrap()["mtu"],
            1500
        );
    }

    mod properties {
        use super::*;
        use proptest::collection::{btree_map, vec};
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                    .prop_map(Value::from),
                ".{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    vec(inner.clone(), 0..4).prop_map(Value::Array),
                    btree_map(".{0,6}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Spellings of the IPv6 network the dual-stack leases below use, and of others.
        const V6_SPELLINGS: [&str; 5] = [
            "fd00:60:0:7::/64",
            "FD00:0060::7:0:0:0:0/64",
            "fd00:60:0:7::1/64",
            "fd00:60:0:7::/56",
            "not an address",
        ];

        /// A daemon.json as an operator or a tool may have written it: any members (weftd's
        /// keys often among them, of any type, fixed-cidr-v6 often a network), compact or
        /// pretty, maybe with a BOM and trailing whitespace.
        fn daemon_json() -> impl Strategy<Value = String> {
            let key = prop_oneof![
                Just("bip".to_string()),
                Just("mtu".to_string()),
                Just("ipv6".to_string()),
                Just("fixed-cidr-v6".to_string()),
                ".{0,8}"
            ];
            let value = prop_oneof![
                value(),
                prop::sample::select(&V6_SPELLINGS[..]).prop_map(Value::from),
            ];
            (
                btree_map(key, value, 0..6),
                any::<bool>(),
                any::<bool>(),
                "[ \t\r\n]{0,3}",
            )
                .prop_map(|(members, pretty, bom, tail)| {
                    let v = Value::Object(members.into_iter().collect());
                    let text = if pretty {
                        serde_json::to_string_pretty(&v)
                    } else {
                        serde_json::to_string(&v)
                    };
                    let bom = if bom { BOM } else { "" };
                    format!("{bom}{}{tail}", text.unwrap_or_default())
                })
        }

        /// That, with a few characters inserted, replaced or removed.
        fn damaged() -> impl Strategy<Value = String> {
            let edit = (any::<prop::sample::Index>(), 0u8..3, prop::char::any());
            (daemon_json(), vec(edit, 1..4)).prop_map(|(text, edits)| {
                let mut chars: Vec<char> = text.chars().collect();
                for (at, kind, c) in edits {
                    let i = at.index(chars.len() + 1);
                    match kind {
                        0 => chars.insert(i, c),
                        1 if i < chars.len() => chars[i] = c,
                        _ if i < chars.len() => {
                            chars.remove(i);
                        }
                        _ => {}
                    }
                }
                chars.into_iter().collect()
            })
        }

        fn any_input() -> impl Strategy<Value = String> {
            prop_oneof![
                daemon_json(),
                damaged(),
                "\\{[{}\\[\\]\":,\\\\ \n0-9a-z.+-]{0,40}",
                any::<String>(),
            ]
        }

        /// Whether `map` says what weftd wants for `key` (`new`, JSON text): the same value, or
        /// for fixed-cidr-v6 the same network, however spelled.
        fn holds(map: &Map<String, Value>, key: &str, new: &str) -> bool {
            let Some(v) = map.get(key) else {
                return false;
            };
            if key == "fixed-cidr-v6" {
                let net = |v: &Value| v.as_str().and_then(|s| s.parse::<Ipv6Net>().ok());
                let new: Value = serde_json::from_str(new).expect("weftd's own JSON");
                return net(v).is_some() && net(v) == net(&new);
            }
            serde_json::from_str::<Value>(new).ok().as_ref() == Some(v)
        }

        /// The whole contract of `merge_net`, for any input: no panic; a result parses as a JSON
        /// object with the same BOM, weftd's members set (bip and mtu; ipv6 and fixed-cidr-v6 on
        /// a dual-stack lease), and every other member as it was (ipv6 and fixed-cidr-v6
        /// included, on an IPv4-only lease).
        fn check(text: &str, net: &DockerNet) -> Result<(), TestCaseError> {
            let owned = net.members();
            let Ok(merged) = merge_net(text, net) else {
                prop_assert!(parse(text).is_err(), "merge refused what parses: {text:?}");
                return Ok(());
            };
            let before = parse(text).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            let Some((out, _)) = merged else {
                for (k, new) in &owned {
                    prop_assert!(holds(&before, k, new), "{} is not {}: {:?}", k, new, text);
                }
                return Ok(());
            };
            let after = parse(&out)
                .map_err(|e| TestCaseError::fail(format!("{text:?} -> {out:?}: {e:#}")))?;
            prop_assert_eq!(text.starts_with(BOM), out.starts_with(BOM));
            for (k, new) in &owned {
                prop_assert!(holds(&after, k, new), "{} is not {}: {:?}", k, new, out);
            }
            for (k, v) in &before {
                if !owned.iter().any(|(o, _)| o == k) {
                    prop_assert_eq!(after.get(k), Some(v), "{} changed: {:?}", k, out);
                }
            }
            let added = owned
                .iter()
                .filter(|(k, _)| !before.contains_key(*k))
                .count();
            prop_assert_eq!(
                after.len(),
                before.len() + added,
                "members added or lost: {:?}",
                out
            );
            // Merging again changes nothing.
            prop_assert_eq!(merge_net(&out, net).ok(), Some(None));
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn merge_of_any_input_never_panics_and_keeps_every_other_member(
                text in any_input(),
                bip in prop_oneof![Just("10.244.52.1/24".to_string()), ".{0,20}"],
                mtu in any::<u32>(),
                ipv6 in prop::option::of(prop_oneof![
                    Just("fd00:60:0:7::/64".parse::<Ipv6Net>().expect("a network")),
                    (any::<u128>(), 0u8..=128).prop_map(|(a, len)| {
                        Ipv6Net::new(a.into(), len).expect("len <= 128").trunc()
                    }),
                ]),
            ) {
                check(&text, &DockerNet { bip, mtu, ipv6 })?;
            }
        }
    }
}
