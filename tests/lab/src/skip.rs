//! Tests that need root or tools skip visibly outside CI and fail under `CI=true`.
//!
//! libtest swallows `eprintln!` of a passing test, so a skip printed that way reads as a pass that
//! ran nothing. The message goes straight to the process's stderr instead.

use std::io::Write;

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Skips `test` visibly (a failure under `CI=true`); always false, for `return` guards.
pub(crate) fn skip(test: &str, why: &str) -> bool {
    skip_to(&mut std::io::stderr(), in_ci(), test, why)
}

fn skip_to(out: &mut impl Write, ci: bool, test: &str, why: &str) -> bool {
    if ci {
        panic!("{test} {why}, and CI=true: this is a failure, not a skip");
    }
    let _ = writeln!(out, "SKIPPED {test}: {why}");
    false
}

/// Whether a root-only test (namespaces, netlink, iptables) can run.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(test, "needs root (network namespaces)")
}

/// Whether root and the kernel's IPv6 (the lab's IPv6 underlay) are there.
pub fn require_ipv6(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    if crate::topology::have_ipv6() {
        return true;
    }
    skip(
        test,
        "needs IPv6 (the kernel was booted with ipv6.disable=1)",
    )
}

/// Whether root and every tool in `tools` are there.
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    if !require_root(test) {
        return false;
    }
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !crate::cmd::have(t))
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip(
        test,
        &format!("needs {missing:?} (deploy/setup-debian.sh installs them)"),
    )
}

#[cfg(test)]
mod tests {
    use super::skip_to;

    #[test]
    fn a_skip_outside_ci_is_written_to_the_stream_not_to_libtests_capture() {
        let mut out = Vec::new();
        assert!(!skip_to(&mut out, false, "t", "needs root"));
        assert_eq!(String::from_utf8_lossy(&out), "SKIPPED t: needs root\n");
    }

    #[test]
    #[should_panic(expected = "CI=true: this is a failure")]
    fn a_skip_under_ci_fails_the_test() {
        skip_to(&mut Vec::new(), true, "t", "needs root");
    }
}
