//! The `podfleet` binary: the CLI over the library crates. Only this crate reads the
//! environment, installs signal handlers and picks exit codes (0 ok, 1 failed, 2 bad input).

mod pipeline;
mod providers;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use podfleet_manager::Shutdown;
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "podfleet",
    version,
    about = "Autoscaling rootless CI job runner for GitLab on Podman"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a gitlab-runner config.toml.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run a .gitlab-ci.yml pipeline on this machine through the embedded coordinator.
    Pipeline(pipeline::PipelineArgs),
    /// Run the manager daemon against the coordinator URLs of the config (GitLab or other).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE: one summary line per runner, or every problem with line:column.
    Check { file: PathBuf },
}

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PODFLEET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("podfleet: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Config {
                command: ConfigCommand::Check { file },
            } => config_check(&file),
            Command::Pipeline(args) => pipeline::run(args).await,
            Command::Run { config } => run_manager(&config).await,
        }
    })
}

/// Loads a config, printing every problem on failure and warnings on success.
pub fn load_config(path: &std::path::Path) -> Result<podfleet_config::Config, ExitCode> {
    match podfleet_config::load(path) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                eprintln!("{}:{warning}", path.display());
            }
            Ok(loaded.config)
        }
        Err(e) => {
            eprintln!("{e}");
            Err(ExitCode::from(EXIT_BAD_INPUT))
        }
    }
}

fn config_check(path: &std::path::Path) -> ExitCode {
    match load_config(path) {
        Ok(config) => {
            for line in config.summary_lines() {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

async fn run_manager(path: &std::path::Path) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let mut runners = Vec::new();
    for runner in &config.runners {
        match providers::provider_for(runner).await {
            Ok(provider) => runners.push(podfleet_manager::RunnerSetup {
                config: runner.clone(),
                provider,
            }),
            Err(e) => {
                eprintln!("podfleet: {e:#}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        }
    }
    let (stop, stopped) = watch::channel(Shutdown::Running);
    spawn_signal_handlers(stop);
    let manager = podfleet_manager::Manager::new(config, runners, system_id());
    manager.run(stopped).await;
    ExitCode::SUCCESS
}

/// SIGQUIT drains gracefully; SIGINT and SIGTERM cancel running jobs. Either way the
/// instances are deleted per `delete_instances_on_shutdown` before the process exits.
pub fn spawn_signal_handlers(stop: watch::Sender<Shutdown>) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut quit), Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        let mut forceful_requests = 0;
        loop {
            let mode = tokio::select! {
                _ = quit.recv() => Shutdown::Graceful,
                _ = int.recv() => Shutdown::Forceful,
                _ = term.recv() => Shutdown::Forceful,
            };
            if mode == Shutdown::Forceful {
                forceful_requests += 1;
            }
            if forceful_requests >= 2 {
                // The operator insists: stop now, even if instances are left to delete.
                eprintln!("podfleet: second interrupt: exiting without cleanup");
                std::process::exit(i32::from(EXIT_FAILED));
            }
            eprintln!("podfleet: {mode:?} shutdown requested (interrupt again to exit at once)");
            let _ = stop.send(mode);
        }
    });
}

/// `s_` + 12 hex characters derived from the machine id, as gitlab-runner's `system_id`.
pub fn system_id() -> String {
    use sha2::Digest;
    let machine_id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let digest = sha2::Sha256::digest(format!("podfleet:{}", machine_id.trim()).as_bytes());
    format!("s_{}", &hex::encode(&digest[..6]))
}
