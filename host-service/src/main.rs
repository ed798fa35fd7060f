//! `whist-host-service`: see the library's documentation for what it does, reads and writes.

use std::process::ExitCode;

use clap::Parser;
use host_service::Signals;
use host_service::config::{Args, BUILD_COMMIT};

fn main() -> ExitCode {
    let args = Args::parse();
    let log_config = args
        .log
        .to_config("host-service", args.app_env, BUILD_COMMIT);
    let _logger = match logger::init(&log_config) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("whist-host-service: {error}");
            return ExitCode::from(2);
        }
    };
    let config = match args.validate() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(%error, "invalid configuration");
            eprintln!("whist-host-service: {error}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(?config, "starting");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(error) => {
            eprintln!("whist-host-service: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let signals = Signals::new();
    let result = runtime.block_on(async {
        tokio::spawn(forward_signals(signals.clone()));
        host_service::run(config, signals).await
    });
    match result {
        Ok(stopped) => {
            tracing::info!(?stopped, "stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(error = %error, "fatal");
            eprintln!("whist-host-service: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The first SIGTERM/SIGINT starts a drain; a second one stops the mandelboxes at once.
async fn forward_signals(signals: Signals) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    for token in [&signals.drain, &signals.now] {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received");
        token.cancel();
    }
}
