//! Docker's daemon.json gets `bip` and `mtu` from the lease. The file is the operator's: every other
//! key keeps its bytes and its place, so we edit the text in place rather than re-serializing, and a
//! file that is not a JSON object is never written.

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::fsutil;

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

/// Returns the text with `bip` and `mtu` set, and which existing values were replaced.
/// `None` when the file already says exactly this.
pub fn merge(text: &str, bip: &str, mtu: u32) -> Result<Option<(String, Vec<Replaced>)>> {
    let source = if text.trim().is_empty() { "{}" } else { text };
    let parsed: Value = serde_json::from_str(source).context("not valid JSON")?;
    if !parsed.is_object() {
        bail!("not a JSON object");
    }
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
    let mut out = source.to_string();
    for (range, with) in edits {
        out.replace_range(range, &with);
    }
    if text.trim().is_empty() {
        out.push('\n');
    }
    Ok(Some((out, replaced)))
}

/// Refuses early, before anything else happens, when the file exists and cannot be merged.
pub fn check(path: &Path) -> Result<()> {
    if let Some(text) = fsutil::read_optional(path)? {
        merge(&text, "0.0.0.0/0", 0).with_context(|| {
            format!(
                "{} cannot be parsed; weftd will not overwrite it (fix or remove it)",
                path.display()
            )
        })?;
    }
    Ok(())
}

/// Merges `bip`/`mtu` into the file at `path` and writes it atomically if anything changed.
pub fn update(path: &Path, bip: &str, mtu: u32) -> Result<Vec<Replaced>> {
    let text = fsutil::read_optional(path)?.unwrap_or_default();
    let merged = merge(&text, bip, mtu).with_context(|| {
        format!(
            "{} cannot be parsed; weftd will not overwrite it",
            path.display()
        )
    })?;
    let Some((out, replaced)) = merged else {
        return Ok(Vec::new());
    };
    let mode = std::fs::metadata(path)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
        .unwrap_or(0o644);
    fsutil::write_atomic(path, out.as_bytes(), mode)?;
    Ok(replaced)
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
        assert!(format!("{e:#}").contains("daemon.json"), "{e:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ broken");
        assert!(check(&path).is_err());
    }
}
