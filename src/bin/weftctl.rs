//! weftctl: admin tool for a weft network.

use std::process::ExitCode;

use clap::Parser;
use weft::ctl::CtlArgs;
use weft::flags::{drop_empty_flanneld_env, normalize_args};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    drop_empty_flanneld_env();
    let args = CtlArgs::parse_from(normalize_args(std::env::args_os()));
    match weft::ctl::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weftctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
