//! weftd: the per-host agent. Parses flags, sets up logging, runs the agent until a signal.

use std::io::IsTerminal;
use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, error, info, warn};
use tracing_subscriber::EnvFilter;
use weft::flags::DaemonArgs;
use weft::health::Readiness;

fn main() -> ExitCode {
    let args = DaemonArgs::from_env();
    if args.version {
        println!("weftd {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    // -v raises weft's own verbosity; libraries (gRPC, HTTP/2) stay at warn unless WEFT_LOG says.
    let level = match args.verbosity {
        0..=3 => "warn,weft=info,weft_backends=info",
        4..=5 => "warn,weft=debug,weft_backends=debug",
        _ => "warn,weft=trace,weft_backends=trace",
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // Under systemd the journal stamps each line already.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
    raise_fd_limit();
    // One thread: weftd's work is one loop of etcd and netlink calls, and every further worker
    // thread adds its own malloc arena to the resident size. (The udp data plane runs on
    // threads of its own.)
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                error!("cannot install signal handlers");
                return ExitCode::FAILURE;
            }
        };
        let health = Readiness::default();
        // Leaving the select drops the agent, which stops the data plane's workers (joined).
        let signal = tokio::select! {
            r = weft::agent::run(args, health.clone()) => return match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => { error!("{e:#}"); ExitCode::FAILURE }
            },
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        match health.kept() {
            "" => info!("{signal}: exiting"),
            kept => info!("{signal}: exiting; lease kept, and in the kernel: {kept}"),
        }
        ExitCode::SUCCESS
    })
}

/// Raises the soft limit on open files to the hard one, as Go does for flanneld (since Go 1.19):
/// the usual soft limit of 1024 is shared by etcd, netlink, the data plane and health checks, and
/// running out of it fails firewall resyncs and accepts. weft uses no select(2), which is what
/// the low soft limit protects.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => debug!("open files limit raised from {soft} to {hard}"),
            Err(e) => warn!("raise the open files limit from {soft} to {hard}: {e}"),
        },
        Ok(_) => {}
        Err(e) => warn!("read the open files limit: {e}"),
    }
}
