//! External commands, each under a time limit: a hung `ip` or `etcdctl` fails its test instead of
//! hanging the suite.

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long one command may take unless the caller says otherwise.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `cmd` (stdin closed, output captured) for at most `limit`; a command still running then is
/// killed by the PID this function started it with, and the call panics naming it.
pub fn output(cmd: &mut Command, limit: Duration) -> Output {
    output_with_input(cmd, None, limit)
}

/// [`output`], with `input` written to the command's stdin (then closed).
pub fn output_with_input(cmd: &mut Command, input: Option<&[u8]>, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        // A command that exits without reading its input is its own answer, not our failure.
        let _ = stdin.write_all(data);
    }
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("wait for {what}: {e}"),
        Err(_) => {
            // SAFETY: a signal to the child this function started, by PID.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{what} did not finish in {limit:?}");
        }
    }
}

/// Runs a program under [`TIMEOUT`]; returns (success, stdout, stderr).
pub fn sh(args: &[&str]) -> (bool, String, String) {
    let out = output(Command::new(args[0]).args(&args[1..]), TIMEOUT);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a program that must succeed; returns its stdout.
pub fn must(args: &[&str]) -> String {
    let (ok, out, err) = sh(args);
    assert!(ok, "{args:?} failed: {out}{err}");
    out
}

/// Whether a program is on PATH.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// The last `n` lines of `text`, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
