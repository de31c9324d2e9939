//! `weftctl install-file` as the DaemonSet's init containers run it: as root with every
//! capability dropped (`setpriv --inh-caps=-all --bounding-set=-all`). Root only.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

const SETPRIV: [&str; 3] = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"];

/// Root and setpriv, or a visible skip (a failure under CI=true).
fn require_setpriv(test: &str) -> bool {
    weft_lab::require_tools(test, &["setpriv"])
}

/// `cmd` run the way the init containers run, without any capability.
fn without_capabilities(cmd: &[&str]) -> Output {
    let mut c = Command::new(SETPRIV[0]);
    c.args(&SETPRIV[1..]).arg("--").args(cmd);
    weft_lab::cmd::output(&mut c, weft_lab::cmd::TIMEOUT)
}

/// weftctl install-file SRC DST MODE without capabilities, after checking that setpriv really
/// leaves none (else a pass here would prove nothing).
fn install(src: &Path, dst: &Path, mode: &str) -> Output {
    let status = without_capabilities(&["cat", "/proc/self/status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    let eff = status.lines().find(|l| l.starts_with("CapEff:"));
    assert_eq!(eff, Some("CapEff:\t0000000000000000"), "{status}");
    without_capabilities(&[
        env!("CARGO_BIN_EXE_weftctl"),
        "install-file",
        &src.display().to_string(),
        &dst.display().to_string(),
        mode,
    ])
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777
}

/// A source file and an empty /opt/cni/bin of the test's own.
fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("weft-cni.new");
    fs::write(&src, "new plugin").expect("write source");
    let bin = dir.path().join("opt/cni/bin");
    fs::create_dir_all(&bin).expect("mkdir");
    (dir, src, bin)
}

#[test]
fn without_capabilities_a_file_owned_by_another_user_is_replaced_by_a_root_owned_one() {
    if !require_setpriv(
        "without_capabilities_a_file_owned_by_another_user_is_replaced_by_a_root_owned_one",
    ) {
        return;
    }
    let (_dir, src, bin) = setup();
    let dst = bin.join("weft-cni");
    fs::write(&dst, "old plugin").expect("write old");
    std::os::unix::fs::chown(&dst, Some(4321), Some(4321)).expect("chown");
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o700)).expect("chmod");

    let out = install(&src, &dst, "0755");
    assert!(out.status.success(), "{}", text(&out));
    let m = fs::symlink_metadata(&dst).expect("stat");
    assert_eq!((m.uid(), m.gid()), (0, 0), "root's");
    assert_eq!(mode(&dst), 0o755);
    assert_eq!(fs::read_to_string(&dst).expect("read"), "new plugin");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was owned by 4321:4321"),
        "the change of owner is told: {}",
        text(&out)
    );
    assert_eq!(
        fs::read_dir(&bin).expect("ls").count(),
        1,
        "no temporary file"
    );
}

#[test]
fn without_capabilities_a_symlink_is_replaced_and_the_file_it_named_is_left_alone() {
    if !require_setpriv(
        "without_capabilities_a_symlink_is_replaced_and_the_file_it_named_is_left_alone",
    ) {
        return;
    }
    let (dir, src, bin) = setup();
    let precious = dir.path().join("precious");
    fs::write(&precious, "precious").expect("write");
    fs::set_permissions(&precious, fs::Permissions::from_mode(0o600)).expect("chmod");
    let dst = bin.join("weft-cni");
    symlink(&precious, &dst).expect("symlink");

    let out = install(&src, &dst, "0755");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        fs::symlink_metadata(&dst).expect("stat").is_file(),
        "a regular file now"
    );
    assert_eq!(fs::read_to_string(&dst).expect("read"), "new plugin");
    assert_eq!(mode(&dst), 0o755);
    assert_eq!(fs::read_to_string(&precious).expect("read"), "precious");
    assert_eq!(mode(&precious), 0o600);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was a symbolic link"),
        "{}",
        text(&out)
    );
}

#[test]
fn without_capabilities_an_old_setuid_file_gives_way_to_the_mode_asked_and_setuid_is_refused() {
    if !require_setpriv(
        "without_capabilities_an_old_setuid_file_gives_way_to_the_mode_asked_and_setuid_is_refused",
    ) {
        return;
    }
    let (_dir, src, bin) = setup();
    let dst = bin.join("weft-cni");
    fs::write(&dst, "old plugin").expect("write old");
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o4755)).expect("chmod");

    let out = install(&src, &dst, "0644");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode(&dst), 0o644, "no setuid carried over");
    assert_eq!(fs::read_to_string(&dst).expect("read"), "new plugin");

    // Nor can one be asked for: refused, and the installed file stays as it is.
    fs::write(&src, "newer plugin").expect("write source");
    let out = install(&src, &dst, "04755");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission bits only"),
        "{}",
        text(&out)
    );
    assert_eq!(mode(&dst), 0o644);
    assert_eq!(fs::read_to_string(&dst).expect("read"), "new plugin");
    assert_eq!(
        fs::read_dir(&bin).expect("ls").count(),
        1,
        "no temporary file"
    );
}
