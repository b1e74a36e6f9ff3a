//! `podfleet-cache`: the image cache alone (`podfleet cache serve` without the rest of
//! podfleet), used by the integration tests to run, SIGKILL and restart the cache as a
//! separate process. Reads `PODFLEET_LOG`, exits on SIGINT/SIGTERM after draining.

use std::process::ExitCode;

use clap::Parser;
use podfleet_image_cache::cli::ServeArgs;

#[derive(Parser)]
#[command(
    name = "podfleet-cache",
    version,
    about = "Pull-through OCI registry cache"
)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PODFLEET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(podfleet_image_cache::cli::run_serve(&cli.serve, async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut interrupt), Ok(mut terminate)) => {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }))
}
