//! The `polarstack-daemon` binary: flags in, logging set up, then [`run`].
use std::process::ExitCode;

use polarstack_daemon::{config::Flags, run, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let flags = Flags::from_env();
    telemetry::init_logging(flags.log_format, &flags.log_level());
    match run(flags).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "polarstack-daemon failed");
            ExitCode::FAILURE
        }
    }
}
