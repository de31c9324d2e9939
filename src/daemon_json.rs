//! Docker's daemon.json gets `bip` and `mtu` from the lease. The file is the operator's: every other
//! key keeps its bytes and its place, so we edit the text in place rather than re-serializing, and a
//! file that is not a JSON object is never written. A file weftd cannot merge is never a reason to
//! exit either (that would stop lease renewal): it is reported once, on /readyz and in the log, and
//! retried until it is fixed.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use tracing::{info, warn};

use crate::fsutil;
use crate::health::Readiness;

/// A UTF-8 byte order mark, which Windows editors put first and Docker accepts.
const BOM: &str = "\u{feff}";
/// How often a file that could not be merged is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// Serializes writers of daemon.json within weftd: a retry for an old lease must not write its
/// bip after a newer lease's (it checks under this lock that it is still current).
static WRITES: Mutex<()> = Mutex::new(());

/// A key weftd changed, with what the operator had there.
#[derive(Debug, Clone, PartialEq)]
pub struct Replaced {
    pub key: &'static str,
    pub old: String,
    pub new: String,
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
/// `None` when the file already says exactly this. A leading BOM stays.
pub fn merge(text: &str, bip: &str, mtu: u32) -> Result<Option<(String, Vec<Replaced>)>> {
    parse(text)?;
    let (bom, body) = match text.strip_prefix(BOM) {
        Some(rest) => (BOM, rest),
        None => ("", text),
    };
    let source = if body.trim().is_empty() { "{}" } else { body };
    let wanted: [(&'static str, String); 2] = [
        ("bip", Value::from(bip).to_string()),
        ("mtu", mtu.to_string()),
    ];

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
            if old != new {
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
    Ok(Some((out, replaced)))
}

/// Merges `bip`/`mtu` into the file at `path` and writes it if anything changed: through a
/// symlink, keeping owner, group and mode, atomically and durably ([`fsutil::write_atomic`]).
pub fn update(path: &Path, bip: &str, mtu: u32) -> Result<Vec<Replaced>> {
    let text = fsutil::read_optional(path)?.unwrap_or_default();
    let merged = merge(&text, bip, mtu).with_context(|| {
        format!(
            "{} cannot be parsed, so weftd leaves it untouched",
            path.display()
        )
    })?;
    let Some((out, replaced)) = merged else {
        return Ok(Vec::new());
    };
    fsutil::write_atomic(path, out.as_bytes(), 0o644)?;
    Ok(replaced)
}

/// Writes the lease's `bip`/`mtu` into daemon.json and never fails: when the file cannot be
/// read, parsed or written, the reason goes to `ready` (so /readyz says 503 with it), is logged
/// once, and the file is tried again every few seconds until it works or a newer call replaces
/// this one. The lease and the data path do not depend on Docker's file.
pub fn publish(path: &Path, bip: &str, mtu: u32, ready: &Readiness) {
    publish_every(path, bip, mtu, ready, RETRY);
}

fn publish_every(path: &Path, bip: &str, mtu: u32, ready: &Readiness, every: Duration) {
    let _writing = WRITES.lock().unwrap_or_else(PoisonError::into_inner);
    match update(path, bip, mtu) {
        Ok(replaced) => {
            log_replaced(path, &replaced);
            ready.set_problem(None);
        }
        Err(e) => {
            let why = problem(&e, bip, mtu);
            if ready.problem().as_deref() != Some(why.as_str()) {
                warn!(file = %path.display(), "{why}");
            }
            let generation = ready.set_problem(Some(why));
            tokio::spawn(retry(
                path.to_path_buf(),
                bip.to_string(),
                mtu,
                ready.clone(),
                generation,
                every,
            ));
        }
    }
}

/// Tries the file again until it can be merged, or a newer [`publish`] takes over.
async fn retry(
    path: PathBuf,
    bip: String,
    mtu: u32,
    ready: Readiness,
    generation: u64,
    every: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        let (path, bip, ready) = (path.clone(), bip.clone(), ready.clone());
        let done = tokio::task::spawn_blocking(move || {
            let _writing = WRITES.lock().unwrap_or_else(PoisonError::into_inner);
            if ready.problem_generation() != generation {
                return true;
            }
            match update(&path, &bip, mtu) {
                Ok(replaced) => {
                    info!(file = %path.display(), "daemon.json written at last: bip {bip}, mtu {mtu}");
                    log_replaced(&path, &replaced);
                    ready.update_problem(generation, None);
                    true
                }
                Err(e) => {
                    let why = problem(&e, &bip, mtu);
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

fn problem(e: &anyhow::Error, bip: &str, mtu: u32) -> String {
    format!("{e:#}; Docker's bip {bip} and mtu {mtu} are not set until that is fixed")
}

fn log_replaced(path: &Path, replaced: &[Replaced]) {
    for r in replaced {
        // The old value is the file's text: escaped, so it cannot forge a log line.
        warn!(file = %path.display(), "replaced {} {} with {}; restart Docker to pick it up",
              r.key, crate::escape::Escaped(&r.old), r.new);
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
        let e = update(&path, "10.0.1.1/24", 1500).unwrap_err();
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
        update(&link, "10.0.1.1/24", 1500).unwrap();
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
        publish_every(&path, "10.0.1.1/24", 1500, &ready, TICK);
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
        publish_every(&path, "10.0.1.1/24", 1500, &ready, TICK);
        publish_every(&path, "10.0.2.1/24", 1500, &ready, TICK);
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
        publish_every(&path, "10.0.1.1/24", 1500, &ready, TICK);
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

        /// A daemon.json as an operator or a tool may have written it: any members (bip and mtu
        /// often among them, of any type), compact or pretty, maybe with a BOM and trailing
        /// whitespace.
        fn daemon_json() -> impl Strategy<Value = String> {
            let key = prop_oneof![Just("bip".to_string()), Just("mtu".to_string()), ".{0,8}"];
            (
                btree_map(key, value(), 0..6),
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

        /// The whole contract of `merge`, for any input: no panic; a result parses as a JSON
        /// object with the same BOM, bip and mtu set, and every other member as it was.
        fn check(text: &str, bip: &str, mtu: u32) -> Result<(), TestCaseError> {
            let Ok(merged) = merge(text, bip, mtu) else {
                prop_assert!(parse(text).is_err(), "merge refused what parses: {text:?}");
                return Ok(());
            };
            let before = parse(text).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            let Some((out, _)) = merged else {
                prop_assert_eq!(&before["bip"], &Value::from(bip));
                prop_assert_eq!(&before["mtu"], &Value::from(mtu));
                return Ok(());
            };
            let after = parse(&out)
                .map_err(|e| TestCaseError::fail(format!("{text:?} -> {out:?}: {e:#}")))?;
            prop_assert_eq!(text.starts_with(BOM), out.starts_with(BOM));
            prop_assert_eq!(&after["bip"], &Value::from(bip), "{:?}", out);
            prop_assert_eq!(&after["mtu"], &Value::from(mtu), "{:?}", out);
            for (k, v) in &before {
                if k != "bip" && k != "mtu" {
                    prop_assert_eq!(after.get(k), Some(v), "{} changed: {:?}", k, out);
                }
            }
            let added = ["bip", "mtu"]
                .iter()
                .filter(|k| !before.contains_key(**k))
                .count();
            prop_assert_eq!(
                after.len(),
                before.len() + added,
                "members added or lost: {:?}",
                out
            );
            // Merging again changes nothing.
            prop_assert_eq!(merge(&out, bip, mtu).ok(), Some(None));
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn merge_of_any_input_never_panics_and_keeps_every_other_member(
                text in any_input(),
                bip in prop_oneof![Just("10.244.52.1/24".to_string()), ".{0,20}"],
                mtu in any::<u32>(),
            ) {
                check(&text, &bip, mtu)?;
            }
        }
    }
}
