//! The delegate configs weft-cni rendered at ADD, one file per attachment (container id and
//! interface name) in `dataDir`, so DEL undoes exactly what ADD did even after subnet.env
//! changed or went away. Directory 0700 and files 0600: they are root's business, and a
//! directory that is not root's alone is refused. Files are synced before they count, and
//! created exclusively, so a second ADD of an attachment cannot replace the first one's record.

use std::fs::{self, DirBuilder, File};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use tracing::warn;

use super::error::{code, CniError};
use crate::escape::Escaped;

/// The prefix of weft-cni's temporary files in dataDir: an ADD's record before it is linked in.
const TEMP_PREFIX: &str = ".weft-";

/// One attachment: CNI_CONTAINERID and CNI_IFNAME, checked as libcni checks them so they are
/// safe in a file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

impl Attachment {
    pub fn new(container_id: &str, ifname: &str) -> Result<Self, CniError> {
        let id_ok = super::config::valid_name(container_id);
        if !id_ok {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_CONTAINERID {container_id:?} is not a valid container id"),
            ));
        }
        // Linux's limit (IFNAMSIZ - 1) and the characters the kernel or a path cannot take.
        let if_ok = !ifname.is_empty()
            && ifname.len() <= 15
            && ifname != "."
            && ifname != ".."
            && !ifname.contains(|c: char| c == '/' || c == ':' || c.is_whitespace());
        if !if_ok {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_IFNAME {ifname:?} is not a valid interface name"),
            ));
        }
        Ok(Self {
            container_id: container_id.into(),
            ifname: ifname.into(),
        })
    }

    /// `<id>:<ifname>`: neither part can hold ':', so the name is unambiguous, and an id starts
    /// with an alphanumeric, so it never looks like a temporary file.
    fn file_name(&self) -> String {
        format!("{}:{}", self.container_id, self.ifname)
    }
}

pub struct Store {
    dir: PathBuf,
}

fn io_error(what: String, e: std::io::Error) -> CniError {
    CniError::new(code::IO_FAILURE, format!("{what}: {e}"))
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self, a: &Attachment) -> PathBuf {
        self.dir.join(a.file_name())
    }

    /// Records `config` for `a`, durably. Fails when `a` already has a record.
    pub fn save_new(&self, a: &Attachment, config: &[u8]) -> Result<(), CniError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| io_error(format!("create {}", self.dir.display()), e))?;
        self.check_dir()?;
        // tempfile creates it 0600.
        let mut tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(&self.dir)
            .map_err(|e| io_error(format!("create a file in {}", self.dir.display()), e))?;
        tmp.write_all(config)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| io_error(format!("write {}", tmp.path().display()), e))?;
        let path = self.path(a);
        // A hard link, not a rename: it fails instead of replacing an existing record.
        tmp.persist_noclobber(&path).map_err(|e| {
            if e.error.kind() == ErrorKind::AlreadyExists {
                CniError::new(
                    code::ALREADY_ADDED,
                    format!(
                        "container {} already has {} on this network ({} exists): DEL it first",
                        a.container_id,
                        a.ifname,
                        path.display()
                    ),
                )
            } else {
                io_error(format!("create {}", path.display()), e.error)
            }
        })?;
        sync_dir(&self.dir)
    }

    /// The record of `a`, or None when there is none.
    pub fn load(&self, a: &Attachment) -> Result<Option<Vec<u8>>, CniError> {
        if !self.check_dir()? {
            return Ok(None);
        }
        let path = self.path(a);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(format!("read {}", path.display()), e)),
        }
    }

    /// Removes the record of `a`, durably; no record is fine.
    pub fn remove(&self, a: &Attachment) -> Result<(), CniError> {
        if !self.check_dir()? {
            return Ok(());
        }
        let path = self.path(a);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(format!("remove {}", path.display()), e)),
        }
    }

    /// Every attachment with a file named as its record (for GC, which then checks the
    /// contents). Other files are left alone, with a log line: dataDir may hold what is not
    /// weft-cni's. Temporary files are skipped quietly: they are other ADDs under way.
    pub fn list(&self) -> Result<Vec<Attachment>, CniError> {
        if !self.check_dir()? {
            return Ok(Vec::new());
        }
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(format!("list {}", self.dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let record = name
                .to_str()
                .and_then(|n| n.split_once(':'))
                .and_then(|(id, ifname)| Attachment::new(id, ifname).ok());
            match record {
                Some(a) => out.push(a),
                None if name.to_string_lossy().starts_with(TEMP_PREFIX) => {}
                None => warn!(
                    file = %Escaped(&entry.path().to_string_lossy()),
                    "not named as a weft-cni record (<container id>:<interface>): left alone"
                ),
            }
        }
        out.sort_by_key(Attachment::file_name);
        Ok(out)
    }

    /// Whether the directory exists; an error when it does but is not weft-cni's alone.
    ///
    /// A record names the plugin DEL and GC run as root and the config they give it, so whoever
    /// can write to the directory (another owner; a group or others, by its mode) could have
    /// root run a plugin on a config of their choosing. Loose read or search bits (0755) are
    /// refused too, not tightened: dataDir may be a directory weft-cni does not own alone (an
    /// operator may point it at /var/lib/cni or another shared one), and a chmod 0700 there,
    /// done silently at some pod's ADD, would cut every other user off from all below it. The
    /// operator knows which it is; the message says what to do in either case. A directory
    /// weft-cni creates is 0700 already.
    fn check_dir(&self) -> Result<bool, CniError> {
        let m = match fs::metadata(&self.dir) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error(format!("stat {}", self.dir.display()), e)),
        };
        if !m.is_dir() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("dataDir {} is not a directory", self.dir.display()),
            ));
        }
        let me = nix::unistd::geteuid().as_raw();
        let mode = m.mode() & 0o7777;
        if m.uid() != me || mode & 0o077 != 0 {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "dataDir {} is mode {mode:04o} and owned by uid {}: it holds the records of \
                     what weft-cni delegated as root, so it must be weft-cni's alone (owned by \
                     uid {me}, mode 0700); if it is weft-cni's own, chown and chmod 0700 it, \
                     else point dataDir at a directory of its own",
                    self.dir.display(),
                    m.uid()
                ),
            ));
        }
        Ok(true)
    }
}

fn sync_dir(dir: &Path) -> Result<(), CniError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(format!("sync {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn eth0(id: &str) -> Attachment {
        Attachment::new(id, "eth0").unwrap()
    }

    #[test]
    fn records_are_0600_in_a_0700_directory_named_by_container_and_interface() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("var/lib/cni/weft"));
        let a = eth0("abc");
        store.save_new(&a, b"{}").unwrap();
        let path = tmp.path().join("var/lib/cni/weft/abc:eth0");
        assert_eq!(store.path(&a), path);
        assert_eq!(fs::read(&path).unwrap(), b"{}");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(store.load(&a).unwrap().as_deref(), Some(&b"{}"[..]));
    }

    #[test]
    fn a_second_save_fails_and_keeps_the_first_record() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cni");
        let store = Store::new(&dir);
        let a = eth0("abc");
        store.save_new(&a, b"first").unwrap();
        let e = store.save_new(&a, b"second").unwrap_err();
        assert!(e.msg.contains("DEL it first"), "{e:?}");
        assert_eq!(store.load(&a).unwrap().as_deref(), Some(&b"first"[..]));
        let names: Vec<_> = fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }

    #[test]
    fn load_remove_and_list_tolerate_what_is_not_there() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("none"));
        assert_eq!(store.load(&eth0("x")).unwrap(), None);
        store.remove(&eth0("x")).unwrap();
        assert!(store.list().unwrap().is_empty());

        let dir = tmp.path().join("cni");
        let store = Store::new(&dir);
        store.save_new(&eth0("b"), b"1").unwrap();
        store
            .save_new(&Attachment::new("a", "net1").unwrap(), b"2")
            .unwrap();
        fs::write(dir.join("stray"), b"").unwrap();
        fs::write(dir.join(".weft-tmp:eth0"), b"").unwrap();
        let ids: Vec<String> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|a| format!("{}:{}", a.container_id, a.ifname))
            .collect();
        assert_eq!(ids, ["a:net1", "b:eth0"]);
        store.remove(&eth0("b")).unwrap();
        assert_eq!(store.load(&eth0("b")).unwrap(), None);
    }

    #[test]
    fn an_existing_data_dir_others_can_read_is_refused_and_left_0755() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cni");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let store = Store::new(&dir);
        let a = eth0("abc");
        let e = store.save_new(&a, b"{}").unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG, "{e:?}");
        assert!(
            e.msg.contains(&dir.display().to_string()) && e.msg.contains("0755"),
            "{e:?}"
        );
        assert_eq!(mode(&dir), 0o755, "not chmodded behind the operator's back");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "nothing written");

        // Nor are records read from it (DEL, CHECK) or listed (GC).
        fs::write(dir.join("abc:eth0"), b"{}").unwrap();
        assert!(store.load(&a).is_err());
        assert!(store.remove(&a).is_err());
        assert!(store.list().is_err());
        assert!(dir.join("abc:eth0").exists());
    }

    #[test]
    fn a_data_dir_owned_by_another_user_is_refused_even_at_0700() {
        if !weft_lab::require_root("a_data_dir_owned_by_another_user_is_refused_even_at_0700") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cni");
        fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(4321), Some(4321)).unwrap();
        let e = Store::new(&dir).save_new(&eth0("abc"), b"{}").unwrap_err();
        assert!(e.msg.contains("owned by uid 4321"), "{e:?}");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "nothing written");
    }

    #[test]
    fn ids_and_interface_names_that_could_escape_the_directory_are_refused() {
        for (id, ifname) in [
            ("../etc", "eth0"),
            ("a/b", "eth0"),
            ("", "eth0"),
            ("-a", "eth0"),
            ("a", ""),
            ("a", ".."),
            ("a", "x/y"),
            ("a", "e:0"),
            ("a", "e 0"),
            ("a", "sixteen-chars-xx"),
        ] {
            let e = Attachment::new(id, ifname).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{id:?} {ifname:?}");
        }
        assert!(Attachment::new("k8s_pod.1-a", "eth0").is_ok());
    }
}
