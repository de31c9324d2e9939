//! Atomic, durable file replacement: a reader sees the old file or the new one, never half of
//! either, and after a crash the disk holds one of them whole. Used for subnet.env and
//! daemon.json, which operators may have symlinked, chowned or chmodded: all of that is kept
//! ([`write_atomic`]); and for `weftctl install-file`, which keeps none of it ([`replace`]).

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Linux's own limit on symlinks followed in one lookup (MAXSYMLINKS).
const MAX_SYMLINKS: usize = 40;

/// Writes `contents` to `path`:
/// - through symlinks: the file a link names is replaced, the link stays;
/// - an existing file keeps its owner, group and mode; a new one gets `mode` (and the
///   directory is created if needed);
/// - through a temporary file in the same directory and a rename, with the file synced before
///   the rename and the directory after it.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let target = follow_symlinks(path)?;
    let existing = match fs::metadata(&target) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("stat {}", target.display())),
    };
    match existing {
        Some(m) => replace(
            &target,
            contents,
            m.mode() & 0o7777,
            Some((m.uid(), m.gid())),
        ),
        None => replace(&target, contents, mode, None),
    }
}

/// Puts `contents` at `path` itself, atomically and durably: a temporary file in the same
/// directory (created if needed) is written, given `owner` (uid, gid; `None`: this process's)
/// and exactly `mode` through its descriptor, synced, then renamed over `path`, and the
/// directory is synced. Nothing at `path` is followed: rename(2) replaces a symlink there with
/// the new file and leaves the file it pointed to alone.
pub fn replace(path: &Path, contents: &[u8], mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
    let dir = parent(path);
    fs::create_dir_all(dir).with_context(|| format!("create directory {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".weft-")
        .tempfile_in(dir)
        .with_context(|| format!("create temporary file in {}", dir.display()))?;
    tmp.write_all(contents)
        .with_context(|| format!("write {}", tmp.path().display()))?;
    let file = tmp.as_file();
    if let Some((uid, gid)) = owner {
        // Owner first: chown clears set-id bits that the mode below may restore.
        std::os::unix::fs::fchown(file, Some(uid), Some(gid)).with_context(|| {
            format!(
                "give {} the owner {uid}:{gid} of {}",
                tmp.path().display(),
                path.display()
            )
        })?;
    }
    file.set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("chmod and sync {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("rename into {}", path.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("sync directory {}", dir.display()))?;
    Ok(())
}

/// The file `path` names after following symlinks at its last component (directories resolve by
/// themselves). A dangling link gives the path it points to, which a write then creates.
fn follow_symlinks(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_SYMLINKS {
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let link =
                    fs::read_link(&p).with_context(|| format!("read link {}", p.display()))?;
                // A relative link is relative to the directory holding it.
                p = parent(&p).join(link);
            }
            _ => return Ok(p),
        }
    }
    bail!("{}: too many levels of symbolic links", path.display())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Reads a file that may not exist yet.
pub fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// Names in `dir` other than `keep`: leftovers such as temporary files.
    fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !keep.contains(&n.as_str()))
            .collect()
    }

    #[test]
    fn a_new_file_gets_the_given_mode_and_its_directory_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        write_atomic(&path, b"A=1\n", 0o644).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"A=1\n");
        assert_eq!(mode(&path), 0o644);
        assert!(others(&dir.path().join("run/flannel"), &["subnet.env"]).is_empty());
    }

    #[test]
    fn an_existing_file_keeps_its_mode_and_is_replaced_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let before = fs::metadata(&path).unwrap().ino();
        write_atomic(&path, b"new", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(mode(&path), 0o640);
        assert_ne!(
            fs::metadata(&path).unwrap().ino(),
            before,
            "a new inode: renamed in"
        );
        assert!(others(dir.path(), &["daemon.json"]).is_empty());
    }

    #[test]
    fn an_existing_file_keeps_its_owner_and_group() {
        if !weft_lab::require_root("an_existing_file_keeps_its_owner_and_group") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        fs::write(&path, "{}").unwrap();
        std::os::unix::fs::chown(&path, Some(4321), Some(8765)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o2640)).unwrap();
        write_atomic(&path, b"{\"mtu\": 1450}", 0o644).unwrap();
        let m = fs::metadata(&path).unwrap();
        assert_eq!((m.uid(), m.gid()), (4321, 8765));
        assert_eq!(m.mode() & 0o7777, 0o2640, "set-gid survives the chown");
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"mtu\": 1450}");
    }

    #[test]
    fn a_symlink_is_written_through_and_stays_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let real_dir = dir.path().join("conf");
        fs::create_dir(&real_dir).unwrap();
        let real = real_dir.join("daemon.json");
        fs::write(&real, "old").unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).unwrap();
        // A relative link to a relative link to the file.
        let hop = dir.path().join("hop.json");
        symlink("conf/daemon.json", &hop).unwrap();
        let link = dir.path().join("daemon.json");
        symlink("hop.json", &link).unwrap();

        write_atomic(&link, b"new", 0o644).unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(fs::symlink_metadata(&hop).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_to_string(&real).unwrap(), "new");
        assert_eq!(mode(&real), 0o600);
        assert!(others(&real_dir, &["daemon.json"]).is_empty());
    }

    #[test]
    fn a_dangling_symlink_creates_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("daemon.json");
        let real = dir.path().join("elsewhere/daemon.json");
        symlink(&real, &link).unwrap();
        write_atomic(&link, b"{}", 0o644).unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_to_string(&real).unwrap(), "{}");
    }

    #[test]
    fn a_symlink_loop_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        symlink("b", &a).unwrap();
        symlink("a", dir.path().join("b")).unwrap();
        let e = write_atomic(&a, b"x", 0o644).unwrap_err();
        assert!(format!("{e:#}").contains("too many levels"), "{e:#}");
    }
}
