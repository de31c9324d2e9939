//! Running the delegate plugin (bridge) as the spec's delegation protocol says: found on
//! CNI_PATH, run with weft-cni's own environment (CNI_COMMAND and the rest pass through), the
//! config on stdin, its stderr on weft-cni's stderr, its result or error read from stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::error::{code, CniError};

/// A delegate plugin binary.
#[derive(Debug, Clone)]
pub struct Delegate {
    pub kind: String,
    pub path: PathBuf,
}

/// Environment changes for one run: (name, Some(value)) sets, (name, None) removes.
pub type EnvChanges<'a> = &'a [(&'a str, Option<&'a str>)];

impl Delegate {
    /// The executable `kind` in the first directory of `cni_path` (':'-separated) that has it.
    pub fn find(kind: &str, cni_path: &str) -> Result<Self, CniError> {
        std::env::split_paths(cni_path)
            .filter(|d| !d.as_os_str().is_empty())
            .map(|d| d.join(kind))
            .find(|p| is_executable(p))
            .map(|path| Self {
                kind: kind.into(),
                path,
            })
            .ok_or_else(|| {
                CniError::new(
                    code::INTERNAL,
                    format!("delegate plugin {kind:?} not found in CNI_PATH {cni_path:?}"),
                )
            })
    }

    /// Runs `command` with `config` on stdin; its stdout on success, its error (code kept,
    /// message prefixed with "<kind> <command>") on failure.
    pub fn run(&self, command: &str, config: &[u8], env: EnvChanges) -> Result<Vec<u8>, CniError> {
        let what = format!("{} {command}", self.kind);
        let mut cmd = Command::new(&self.path);
        cmd.env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let mut child = cmd.spawn().map_err(|e| {
            CniError::new(code::INTERNAL, format!("run {}: {e}", self.path.display()))
        })?;
        // Written from a second thread so a plugin that answers before reading all of its
        // input cannot deadlock us on a full pipe.
        let out = std::thread::scope(|s| {
            if let Some(mut stdin) = child.stdin.take() {
                s.spawn(move || {
                    // A plugin that exits without reading its input has its answer on stdout.
                    let _ = stdin.write_all(config);
                });
            }
            child.wait_with_output()
        })
        .map_err(|e| CniError::new(code::INTERNAL, format!("{what}: {e}")))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(match CniError::from_plugin_output(&out.stdout) {
            Some(e) => e.context(what),
            None => CniError::new(code::INTERNAL, format!("{what} failed ({})", out.status))
                .with_details(
                    String::from_utf8_lossy(&out.stdout)
                        .chars()
                        .take(2000)
                        .collect::<String>(),
                ),
        })
    }

    /// The versions the delegate speaks (its VERSION answer).
    pub fn supported_versions(&self) -> Result<Vec<String>, CniError> {
        let ask = json!({"cniVersion": super::version::LATEST}).to_string();
        let out = self.run("VERSION", ask.as_bytes(), &[])?;
        let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
        v.get("supportedVersions")
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .ok_or_else(|| {
                CniError::new(
                    code::DECODE_FAILURE,
                    format!("{} VERSION: no supportedVersions in its answer", self.kind),
                )
            })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_executable_on_the_path_and_names_the_path_when_missing() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        // Not executable in a: skipped.
        std::fs::write(a.path().join("bridge"), b"").unwrap();
        let exe = b.path().join("bridge");
        std::fs::write(&exe, b"").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{}::{}", a.path().display(), b.path().display());
        assert_eq!(Delegate::find("bridge", &path).unwrap().path, exe);
        let e = Delegate::find("macvlan", &path).unwrap_err();
        assert!(e.msg.contains("macvlan") && e.msg.contains(&path), "{e:?}");
    }
}
