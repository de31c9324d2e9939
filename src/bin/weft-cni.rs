//! weft-cni: the CNI plugin a container runtime runs per pod and command (see `weft::cni`).
//! Results and errors go to stdout as CNI JSON, logs to stderr.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .init();
    if std::env::var_os("CNI_COMMAND").is_none() {
        eprintln!(
            "weft-cni {}: CNI plugin for weft (flannel-compatible); CNI versions {}",
            env!("CARGO_PKG_VERSION"),
            weft::cni::version::SUPPORTED.join(", ")
        );
    }
    let mut stdin = Vec::new();
    // Someone trying it by hand gets the banner, not a wait for input. A read error leaves the
    // config empty, which is then reported as a decode failure.
    if !std::io::stdin().is_terminal() {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let reply = weft::cni::run(|k| std::env::var(k).ok(), &stdin);
    let mut out = std::io::stdout().lock();
    if out
        .write_all(&reply.stdout)
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    if reply.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
