//! `whist-scaling-service`: see the library's documentation for what it does and reads.

use std::process::ExitCode;

use clap::Parser;
use scaling_service::config::{Args, BUILD_COMMIT};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    // `simulate` and `compare` run offline: none of the service's settings apply to them.
    match std::env::args_os().nth(1) {
        Some(a) if a == "simulate" => return simulate(),
        Some(a) if a == "compare" => return compare(),
        _ => {}
    }
    let args = Args::parse();
    let log_config = args
        .log
        .to_config("scaling-service", args.app_env, BUILD_COMMIT);
    let _logger = match logger::init(&log_config) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("whist-scaling-service: {error}");
            return ExitCode::from(2);
        }
    };
    let config = match args.validate() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(%error, "invalid configuration");
            eprintln!("whist-scaling-service: {error}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(?config, "starting");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(error) => {
            eprintln!("whist-scaling-service: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let result = runtime.block_on(async {
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        scaling_service::run(config, shutdown).await
    });
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "fatal");
            eprintln!("whist-scaling-service: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received, shutting down");
    shutdown.cancel();
}

fn simulate() -> ExitCode {
    use scaling_service::simulation::{SimulateArgs, run_simulation};
    let args = SimulateArgs::parse_from(std::env::args_os().skip(1));
    let started = std::time::Instant::now();
    match run_simulation(&args) {
        Ok(summary) => {
            println!(
                "{}: {} sessions over {:.1} simulated hours: {} unmet, wait p50 {:.1} s / p99 {:.1} s, \
                 {:.2} host-hours, {} launches, {} terminations ({} early), peak {} hosts; \
                 {:.2} s elapsed ({} build); wrote {}",
                summary.algorithm,
                summary.sessions,
                summary.simulated_hours,
                summary.unmet_requests,
                summary.wait_p50_s,
                summary.wait_p99_s,
                summary.host_hours,
                summary.launches,
                summary.terminations,
                summary.early_terminations,
                summary.peak_hosts,
                started.elapsed().as_secs_f64(),
                if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                },
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("whist-scaling-service simulate: {error}");
            ExitCode::FAILURE
        }
    }
}

fn compare() -> ExitCode {
    use scaling_service::simulation::compare::{CompareArgs, run_compare};
    let args = CompareArgs::parse_from(std::env::args_os().skip(1));
    match run_compare(&args) {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("whist-scaling-service compare: {error}");
            ExitCode::FAILURE
        }
    }
}
