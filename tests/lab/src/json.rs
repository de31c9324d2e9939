//! Parsed `ip -j` / `bridge -j` output: tests assert on JSON, not on scraped text.

use serde_json::Value;

/// Parses JSON from iproute2; empty output (nothing to list) is an empty array.
pub fn parse(s: &str) -> Value {
    if s.trim().is_empty() {
        return Value::Array(vec![]);
    }
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON from iproute2: {e}: {s}"))
}

/// The entries of a dump (a lone object counts as one entry).
pub fn entries(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        Value::Null => vec![],
        other => vec![other],
    }
}

/// One sorted line per entry, made of the named string fields (entries lacking one are left out).
pub fn rows(v: &Value, fields: &[&str]) -> Vec<String> {
    let mut r: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| fields.iter().all(|f| e[*f].is_string()))
        .map(|e| {
            fields
                .iter()
                .map(|f| e[*f].as_str().unwrap_or(""))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    r.sort();
    r
}
