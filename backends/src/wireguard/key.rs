//! WireGuard keys: 32 bytes, written in base64 as `wg genkey` writes them; and the private key
//! file, `/run/flannel/wgkey` (or `WIREGUARD_KEY_FILE`), made once and reused so that a restart
//! keeps the public key the peers know. A key file on a persistent path keeps it across reboots
//! too.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::alphabet::STANDARD;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::Error;

/// One WireGuard key (public, private or preshared).
pub type Key = [u8; 32];

/// flannel's key file, and the variable that moves it.
pub const DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";
pub const KEY_FILE_ENV: &str = "WIREGUARD_KEY_FILE";

/// Go's `base64.StdEncoding` as wgtypes.ParseKey uses it: padding required, stray low bits in
/// the last character tolerated.
const B64: GeneralPurpose = GeneralPurpose::new(
    &STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

/// A key from its base64 text (surrounding whitespace ignored), or why it is none.
pub fn parse(text: &str) -> Result<Key, String> {
    let bytes = B64
        .decode(text.trim())
        .map_err(|e| format!("not base64 ({e})"))?;
    Key::try_from(bytes.as_slice())
        .map_err(|_| format!("{} bytes, not the 32 of a WireGuard key", bytes.len()))
}

/// A key as base64 text.
pub fn show(key: &Key) -> String {
    B64.encode(key)
}

/// The public key of a private key.
pub fn public(private: &PrivateKey) -> Key {
    PublicKey::from(&StaticSecret::from(private.0)).to_bytes()
}

/// A private key, wiped when dropped and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(Key);

impl PrivateKey {
    #[cfg(test)]
    pub fn for_tests(bytes: Key) -> Self {
        Self(bytes)
    }

    pub fn bytes(&self) -> &Key {
        &self.0
    }

    /// A fresh key from the kernel's random source, clamped as `wg genkey` does.
    pub fn generate() -> Result<Self, Error> {
        let mut k = [0u8; 32];
        getrandom(&mut k).map_err(Error::io("read random bytes for a WireGuard key"))?;
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        Ok(Self(k))
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        for b in &mut self.0 {
            // SAFETY: `b` is a valid, aligned byte of our own array.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(…)")
    }
}

fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, writable for its whole length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Where the private key lives: `WIREGUARD_KEY_FILE` if set and not empty, else flannel's path.
pub fn key_file() -> PathBuf {
    key_file_from(std::env::var_os(KEY_FILE_ENV))
}

fn key_file_from(var: Option<std::ffi::OsString>) -> PathBuf {
    match var {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_KEY_FILE),
    }
}

/// The private key in `path`, made (mode 0400, atomically) if the file does not exist. An
/// existing file is never written: one that cannot be read or holds no key is an error that says
/// so. Returns whether the key was made now.
pub fn load_or_create(path: &Path) -> Result<(PrivateKey, bool), Error> {
    match read(path)? {
        Some(k) => Ok((k, false)),
        None => create(path),
    }
}

/// The key in `path`; `None` when there is no such file.
fn read(path: &Path) -> Result<Option<PrivateKey>, Error> {
    let shown = path.display();
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Other(format!(
                "WireGuard private key file {shown}: cannot read it ({e}); weftd never replaces \
                 an existing key file: fix its permissions, or remove it to have a new key made"
            )))
        }
    };
    // A key is 44 characters and a newline: read a little more, to tell garbage from a key.
    let mut text = Vec::with_capacity(64);
    (&mut file)
        .take(256)
        .read_to_end(&mut text)
        .map_err(Error::io(format!(
            "read WireGuard private key file {shown}"
        )))?;
    let bad = |why: String| {
        Error::Other(format!(
            "WireGuard private key file {shown} holds no key: {why} (want 32 bytes in base64, as \
             `wg genkey` writes them); weftd never replaces an existing key file: fix it, or \
             remove it to have a new key made (peers then learn the new public key)"
        ))
    };
    let text = std::str::from_utf8(&text).map_err(|_| bad("not text".into()))?;
    parse(text).map(|k| Some(PrivateKey(k))).map_err(bad)
}

/// Writes a new key next to `path` and links it into place, which fails rather than replace a
/// file that appeared meanwhile (another process made one: that one is used).
fn create(path: &Path) -> Result<(PrivateKey, bool), Error> {
    let shown = path.display();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    let key = PrivateKey::generate()?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "wgkey".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| -> io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&tmp)?;
        f.write_all(format!("{}\n", show(key.bytes())).as_bytes())?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
            Ok((key, true))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match read(path)? {
            Some(k) => Ok((k, false)),
            None => Err(Error::Other(format!(
                "WireGuard private key file {shown} appeared and vanished while weftd made it"
            ))),
        },
        Err(e) => Err(Error::Io {
            context: format!("write WireGuard private key file {shown}"),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weft-wgkey-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("temp dir");
        d
    }

    /// RFC 7748's test vector (Alice's keys).
    #[test]
    fn the_public_key_is_x25519_of_the_private_key() {
        let private = parse("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=").expect("key");
        let public = public(&PrivateKey(private));
        assert_eq!(
            show(&public),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
    }

    #[test]
    fn keys_are_32_bytes_of_padded_base64() {
        assert!(parse("hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=\n").is_ok());
        assert!(parse(" hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo= ").is_ok());
        let short = parse("AAAA").expect_err("3 bytes");
        assert!(short.contains("3 bytes"), "{short}");
        assert!(parse("hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo").is_err());
        assert!(parse("hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo=").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn a_key_file_is_made_once_0400_and_reused() {
        let d = dir("made");
        let path = d.join("sub/wgkey");
        let (k, made) = load_or_create(&path).expect("made");
        assert!(made);
        let meta = fs::metadata(&path).expect("exists");
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        let text = fs::read_to_string(&path).expect("text");
        assert_eq!(
            text,
            format!("{}\n", show(k.bytes())),
            "as `wg genkey` writes it"
        );
        let (again, made) = load_or_create(&path).expect("reused");
        assert!(!made);
        assert_eq!(again, k);
        // Clamped as wg genkey's.
        assert_eq!(k.bytes()[0] & 7, 0);
        assert_eq!(k.bytes()[31] & 0xc0, 0x40);
        let leftovers: Vec<_> = fs::read_dir(d.join("sub")).expect("dir").collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_key_written_by_wg_genkey_is_used_as_it_is() {
        let d = dir("genkey");
        let path = d.join("wgkey");
        fs::write(&path, "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=\n").expect("write");
        let (k, made) = load_or_create(&path).expect("read");
        assert!(!made);
        assert_eq!(
            show(&public(&k)),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_garbage_key_file_is_refused_and_left_alone() {
        let d = dir("garbage");
        for (i, garbage) in [&b"not a key\n"[..], b"", b"\xff\xfe", &[b'A'; 300]]
            .into_iter()
            .enumerate()
        {
            let path = d.join(format!("wgkey{i}"));
            fs::write(&path, garbage).expect("write");
            let e = load_or_create(&path).expect_err("garbage");
            let text = e.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains("never replaces"), "{text}");
            assert_eq!(fs::read(&path).expect("kept"), garbage);
        }
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unreadable_key_file_is_refused_and_left_alone() {
        let d = dir("unreadable");
        // A directory in the key's place cannot be read as a file, even by root.
        let path = d.join("wgkey");
        fs::create_dir(&path).expect("dir");
        let e = load_or_create(&path).expect_err("unreadable");
        assert!(e.to_string().contains("wgkey"), "{e}");
        assert!(path.is_dir());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn the_key_file_is_flannels_unless_the_variable_says_otherwise() {
        assert_eq!(key_file_from(None), PathBuf::from("/run/flannel/wgkey"));
        assert_eq!(
            key_file_from(Some("".into())),
            PathBuf::from("/run/flannel/wgkey")
        );
        assert_eq!(
            key_file_from(Some("/var/lib/weft/wgkey".into())),
            PathBuf::from("/var/lib/weft/wgkey")
        );
    }

    proptest! {
        #[test]
        fn any_key_survives_base64(k in any::<[u8; 32]>()) {
            prop_assert_eq!(parse(&show(&k)), Ok(k));
        }

        #[test]
        fn any_text_parses_or_is_refused(s in "\\PC{0,60}") {
            if let Ok(k) = parse(&s) {
                prop_assert_eq!(k.len(), 32);
            }
        }
    }
}
