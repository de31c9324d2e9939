//! CNI spec versions: which configs weft-cni accepts, which commands each version allows, and
//! which version to speak to a delegate that is older than the config.

use super::error::{code, CniError};

/// The config versions weft-cni accepts, oldest first. 0.3.1 is what most flannel conflists
/// still say; 0.3.0 and older have no CHECK and a different result format for some plugins.
pub const SUPPORTED: &[&str] = &["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version weft-cni speaks.
pub const LATEST: &str = "1.1.0";

/// A dotted version as three numbers, comparable.
fn parse(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let r = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(r)
}

/// Whether `v` is at least `min` (both dotted versions; an unparseable `v` is not).
pub fn at_least(v: &str, min: &str) -> bool {
    matches!((parse(v), parse(min)), (Some(a), Some(b)) if a >= b)
}

/// The config's `cniVersion`, if weft-cni speaks it. libcni reads a missing version as 0.1.0.
pub fn check_supported(v: Option<&str>) -> Result<&'static str, CniError> {
    let v = v.unwrap_or("0.1.0");
    SUPPORTED.iter().copied().find(|s| *s == v).ok_or_else(|| {
        CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("incompatible CNI version {v:?}"),
        )
        .with_details(format!("weft-cni supports {}", SUPPORTED.join(", ")))
    })
}

/// Whether config version `v` has `command` (CHECK came with 0.4.0, STATUS and GC with 1.1.0).
pub fn allows(v: &str, command: &str) -> Result<(), CniError> {
    let min = match command {
        "CHECK" => "0.4.0",
        "STATUS" | "GC" => "1.1.0",
        _ => return Ok(()),
    };
    if at_least(v, min) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("config version {v} does not allow {command} (needs {min} or later)"),
        ))
    }
}

/// The version to hand a delegate that supports `delegate_supports`, for a config of version
/// `config`: the config's own when the delegate has it; for a 1.1.0 config, 1.0.0, whose
/// results have the same shape (Debian bookworm's plugins stop at 1.0.0).
pub fn for_delegate(config: &str, delegate_supports: &[String]) -> Result<&'static str, CniError> {
    let has = |v: &str| delegate_supports.iter().any(|s| s == v);
    let want = check_supported(Some(config))?;
    if has(want) {
        return Ok(want);
    }
    if want == "1.1.0" && has("1.0.0") {
        return Ok("1.0.0");
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!("the delegate does not support CNI version {want}"),
    )
    .with_details(format!("it supports {}", delegate_supports.join(", "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn accepts_the_four_versions_and_refuses_others_with_code_1() {
        for v in SUPPORTED {
            assert_eq!(check_supported(Some(v)), Ok(*v));
        }
        for v in [
            None,
            Some("0.2.0"),
            Some("0.3.0"),
            Some("2.0.0"),
            Some("1.0"),
        ] {
            let e = check_supported(v).unwrap_err();
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION, "{v:?}");
        }
    }

    #[test]
    fn check_needs_0_4_0_and_status_and_gc_need_1_1_0() {
        assert!(allows("0.3.1", "CHECK").is_err());
        assert!(allows("0.4.0", "CHECK").is_ok());
        assert!(allows("1.0.0", "STATUS").is_err());
        assert!(allows("1.0.0", "GC").is_err());
        assert!(allows("1.1.0", "STATUS").is_ok());
        assert!(allows("0.3.1", "ADD").is_ok());
        assert!(allows("0.3.1", "DEL").is_ok());
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(at_least("0.10.0", "0.4.0"));
        assert!(at_least("1.0.0", "1.0.0"));
        assert!(!at_least("0.3.1", "0.4.0"));
        assert!(!at_least("x", "0.1.0"));
        assert!(!at_least("1.0.0.0", "0.1.0"));
    }

    #[test]
    fn a_delegate_gets_the_config_version_or_1_0_0_for_1_1_0() {
        let bookworm = list(&["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]);
        assert_eq!(for_delegate("0.3.1", &bookworm), Ok("0.3.1"));
        assert_eq!(for_delegate("1.0.0", &bookworm), Ok("1.0.0"));
        assert_eq!(for_delegate("1.1.0", &bookworm), Ok("1.0.0"));
        let newer = list(&["1.0.0", "1.1.0"]);
        assert_eq!(for_delegate("1.1.0", &newer), Ok("1.1.0"));
        let old = list(&["0.3.1", "0.4.0"]);
        let e = for_delegate("1.0.0", &old).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.details.contains("0.4.0"), "{e:?}");
    }
}
