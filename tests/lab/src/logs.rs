//! What a failed test leaves behind to be read: the end of every log the processes it started
//! wrote, printed as it unwinds (a `Drop` that sees `std::thread::panicking()`), before the
//! directories holding them are removed. A failure in CI can then be diagnosed from its output
//! alone.

use std::path::{Path, PathBuf};

/// Lines printed from the end of each log.
pub const TAIL: usize = 200;

/// The `*.log` files under `dir`, `depth` levels of directories down at most (1: `dir`'s own),
/// in name order.
pub fn find(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if depth == 0 {
        return found;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            found.extend(find(&p, depth - 1));
        } else if p.extension().is_some_and(|e| e == "log") {
            found.push(p);
        }
    }
    found
}

/// Prints the last [`TAIL`] lines of `log` to stderr (the test's captured output), named by its
/// path below `root`.
pub fn print_tail(root: &Path, log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let name = log.strip_prefix(root).unwrap_or(log).display();
    let total = text.lines().count();
    eprintln!(
        "----- {name}: last {} of {total} lines -----\n{}\n----- end of {name} -----",
        total.min(TAIL),
        crate::cmd::tail(&text, TAIL)
    );
}

/// [`print_tail`] of every `*.log` under `dir` ([`find`] to `depth`), when the thread is
/// unwinding from a panic; nothing otherwise.
pub fn print_if_panicking(dir: &Path, depth: usize) {
    if std::thread::panicking() {
        for log in find(dir, depth) {
            print_tail(dir, &log);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_found_by_name_to_the_depth_asked() {
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("h1/deeper")).expect("mkdir");
        std::fs::create_dir_all(d.join("h0")).expect("mkdir");
        for f in [
            "etcd0.log",
            "h1/weftd.log",
            "h0/weftd.log",
            "h0/subnet.env",
            "h1/deeper/x.log",
        ] {
            std::fs::write(d.join(f), "x\n").expect("write");
        }
        let names = |depth| -> Vec<String> {
            find(d, depth)
                .iter()
                .map(|p| p.strip_prefix(d).expect("under").display().to_string())
                .collect()
        };
        assert_eq!(names(1), ["etcd0.log"]);
        assert_eq!(names(2), ["etcd0.log", "h0/weftd.log", "h1/weftd.log"]);
        assert_eq!(names(3).len(), 4);
        assert!(find(&d.join("absent"), 2).is_empty());
    }
}
