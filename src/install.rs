//! `weftctl install-file`: how the DaemonSet's init containers put the CNI plugin into
//! /opt/cni/bin and the conflist into /etc/cni/net.d (the image has no shell, cp or mv).
//!
//! The kubelet may exec the plugin or read the conflist at any moment, so the file is replaced
//! by a rename, never rewritten in place: nobody sees half a file, and a running old plugin
//! keeps its inode where copying over it would fail with "text file busy".
//!
//! The installed file is the installer's own (root, in the DaemonSet) with exactly the mode
//! asked for, whatever was there before. The init containers drop every capability, so keeping
//! a foreign owner would need CAP_CHOWN they do not have; and a plugin the kubelet runs as root
//! must not stay writable by whoever owned the old file, which is what keeping it would do.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::escape::Escaped;
use crate::fsutil;

/// Installs `src` as `dst` with exactly `mode` (permission bits only).
pub fn install_file(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    if mode & !0o777 != 0 {
        // The file ends up root's: set-user-ID or set-group-ID would make it a root (or root
        // group) program for anyone who can run it, and neither a CNI plugin (the kubelet runs
        // it as root already) nor a config needs that. Sticky means nothing on a file.
        bail!(
            "mode {mode:04o} has set-user-ID, set-group-ID or sticky bits: install-file gives \
             permission bits only (e.g. 0755 for a plugin, 0644 for a config)"
        );
    }
    let src_name = src.to_string_lossy();
    let dst_name = dst.to_string_lossy();
    let bytes = fs::read(src).with_context(|| format!("read {}", Escaped(&src_name)))?;
    let old = match fs::symlink_metadata(dst) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("stat {}", Escaped(&dst_name))),
    };
    // Only for the warning below: where a symlink at `dst` pointed.
    let old_link =
        old.as_ref()
            .filter(|m| m.file_type().is_symlink())
            .map(|_| match fs::read_link(dst) {
                Ok(t) => t.to_string_lossy().into_owned(),
                Err(e) => format!("unreadable: {e}"),
            });
    // A symlink at `dst` is replaced by the new file, not followed: the file it named stays as
    // it was. An installer that wrote through it could be pointed at any file on the host.
    fsutil::replace(dst, &bytes, mode, None)
        .with_context(|| format!("install {} as {}", Escaped(&src_name), Escaped(&dst_name)))?;
    let new = fs::symlink_metadata(dst)
        .with_context(|| format!("stat {} after the install", Escaped(&dst_name)))?;
    println!(
        "installed {} as {} ({mode:04o}, owner {}:{})",
        Escaped(&src_name),
        Escaped(&dst_name),
        new.uid(),
        new.gid()
    );
    if let Some(old) = old {
        if let Some(target) = old_link {
            eprintln!(
                "weftctl: warning: {} was a symbolic link (to {}): it is now the installed \
                 file, and the file it pointed to was left as it was",
                Escaped(&dst_name),
                Escaped(&target)
            );
        } else if (old.uid(), old.gid()) != (new.uid(), new.gid()) {
            eprintln!(
                "weftctl: note: {} was owned by {}:{}; the installed file is {}:{}",
                Escaped(&dst_name),
                old.uid(),
                old.gid(),
                new.uid(),
                new.gid()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn install_file_replaces_atomically_with_the_given_mode() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::write(&src, "new").unwrap();
        let dst = dir.path().join("net.d/10-weft.conflist");
        install_file(&src, &dst, 0o644).unwrap();
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o600)).unwrap();
        install_file(&src, &dst, 0o755).unwrap();
        assert_eq!(mode(&dst), 0o755);
        assert_eq!(fs::read_to_string(&dst).unwrap(), "new");
        let left: Vec<_> = fs::read_dir(dst.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn a_symlink_at_the_destination_is_replaced_and_the_file_it_named_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::write(&src, "plugin").unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, "precious").unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o600)).unwrap();
        let dst = dir.path().join("weft-cni");
        symlink(&elsewhere, &dst).unwrap();

        install_file(&src, &dst, 0o755).unwrap();
        assert!(fs::symlink_metadata(&dst).unwrap().is_file());
        assert_eq!(fs::read_to_string(&dst).unwrap(), "plugin");
        assert_eq!(mode(&dst), 0o755);
        assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "precious");
        assert_eq!(mode(&elsewhere), 0o600);
    }

    #[test]
    fn an_old_setuid_file_is_replaced_by_one_with_only_the_requested_mode() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::write(&src, "new").unwrap();
        let dst = dir.path().join("weft-cni");
        fs::write(&dst, "old").unwrap();
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o6755)).unwrap();
        install_file(&src, &dst, 0o644).unwrap();
        assert_eq!(mode(&dst), 0o644);
        assert_eq!(fs::read_to_string(&dst).unwrap(), "new");
    }

    #[test]
    fn set_id_and_sticky_modes_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::write(&src, "new").unwrap();
        let dst = dir.path().join("weft-cni");
        fs::write(&dst, "old").unwrap();
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).unwrap();
        for bad in [0o4755, 0o2755, 0o1755] {
            let e = install_file(&src, &dst, bad).unwrap_err();
            assert!(format!("{e:#}").contains("permission bits only"), "{e:#}");
        }
        assert_eq!(fs::read_to_string(&dst).unwrap(), "old");
        assert_eq!(mode(&dst), 0o755);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temporary file"
        );
    }

    #[test]
    fn a_missing_source_names_the_file_and_leaves_the_destination_alone() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("weft-cni");
        fs::write(&dst, "old").unwrap();
        let e = install_file(&dir.path().join("nope"), &dst, 0o755).unwrap_err();
        assert!(format!("{e:#}").contains("read "), "{e:#}");
        assert!(format!("{e:#}").contains("nope"), "{e:#}");
        assert_eq!(fs::read_to_string(&dst).unwrap(), "old");
    }
}
