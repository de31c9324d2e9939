//! CNI errors: a well-known code, a short message and details, printed as the spec's error JSON
//! on stdout with a non-zero exit.

use serde_json::{json, Value};

/// The spec's well-known error codes (SPEC.md, "Error"), plus libcni's catch-all.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    /// A transient condition, e.g. weftd has not written subnet.env yet.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot service ADD.
    pub const NOT_AVAILABLE: u32 = 50;
    /// weft-cni's own (the spec leaves 100 and up to plugins): CHECK found the pod's address
    /// outside this node's current lease.
    pub const NOT_IN_LEASE: u32 = 100;
    /// ADD of an attachment that is already added (no DEL since).
    pub const ALREADY_ADDED: u32 = 101;
    /// What libcni's skel reports for errors without a well-known code.
    pub const INTERNAL: u32 = 999;
}

/// One CNI error result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The same error with `context` in front of its message ("bridge ADD: …").
    pub fn context(mut self, context: impl std::fmt::Display) -> Self {
        self.msg = format!("{context}: {}", self.msg);
        self
    }

    /// The spec's error structure, in protocol version `version`.
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }

    /// Reads a plugin's error output; None when `stdout` is not a CNI error.
    pub fn from_plugin_output(stdout: &[u8]) -> Option<Self> {
        let v: Value = serde_json::from_slice(stdout).ok()?;
        let code = u32::try_from(v.get("code")?.as_u64()?).ok()?;
        let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Some(Self {
            code,
            msg: text("msg"),
            details: text("details"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_spec_error_structure_and_omits_empty_details() {
        let e = CniError::new(code::INVALID_CONFIG, "bad");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 7, "msg": "bad"})
        );
        let e = e.with_details("why").context("bridge ADD");
        assert_eq!(
            e.to_json("0.4.0"),
            json!({"cniVersion": "0.4.0", "code": 7, "msg": "bridge ADD: bad", "details": "why"})
        );
    }

    #[test]
    fn reads_a_delegates_error_and_nothing_else() {
        let e = CniError::from_plugin_output(br#"{"code":11,"msg":"busy","details":"x"}"#);
        assert_eq!(
            e,
            Some(CniError::new(11, "busy").with_details("x")),
            "a delegate's error keeps its code"
        );
        assert_eq!(CniError::from_plugin_output(b"panic: oops"), None);
        assert_eq!(CniError::from_plugin_output(br#"{"code":-1}"#), None);
        assert_eq!(CniError::from_plugin_output(br#"{"msg":"no code"}"#), None);
    }
}
