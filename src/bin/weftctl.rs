//! weftctl: admin tool for a weft network.

use std::process::ExitCode;

use weft::ctl::CtlArgs;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = CtlArgs::from_env();
    match weft::ctl::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weftctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
