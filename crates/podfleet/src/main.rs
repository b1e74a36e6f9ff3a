//! The `podfleet` binary: the CLI over the library crates. Only this crate reads the
//! environment, installs signal handlers and picks exit codes (0 ok, 1 failed, 2 bad input).

mod doctor;
mod host;
mod images;
mod logging;
mod pipeline;
mod providers;
mod rotation;
mod service;
mod simulate;
mod status;

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
    /// Prepare this host as an executor (`host prepare`).
    Host(host::HostArgs),
    /// Run the manager daemon against the coordinator URLs of the config (GitLab or other).
    Run(RunArgs),
    /// Show what the running daemon is doing: runners, instances, jobs, queue wait.
    Status(status::StatusArgs),
    /// Check config, coordinator, provider, instances and host; PASS/FAIL with the fix.
    Doctor(doctor::DoctorArgs),
    /// Install podfleet as a systemd service.
    Service(service::ServiceArgs),
    /// Replay a job-arrival trace through the autoscaler on a virtual clock (or generate one).
    Simulate(simulate::SimulateArgs),
    /// Show which image each instance runs and which are outdated.
    Images(images::ImagesArgs),
    /// Run the pull-through image cache (`cache serve`).
    Cache(podfleet_image_cache::cli::CacheArgs),
    /// Run one helper stage of a job (inside the helper container).
    Helper(podfleet_helper::cli::HelperArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, short)]
    config: PathBuf,
    /// The status socket to serve [default: see `podfleet status --help`].
    #[arg(long)]
    status_socket: Option<PathBuf>,
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
    // The daemon logs as its config says, once the config is read; commands log warnings.
    let log_level = match &cli.command {
        Command::Run(args) => podfleet_config::load(&args.config)
            .ok()
            .map(|loaded| loaded.config),
        _ => None,
    }
    .map_or_else(
        || logging::init("warn", "runner"),
        |config| {
            logging::init(
                config.log_level.as_deref().unwrap_or("info"),
                config.log_format.as_deref().unwrap_or("runner"),
            )
        },
    );
    // A job is one deep future (stages, containers, streams); 8 MiB like the main thread,
    // so an unoptimised build has room too. Only the pages used are ever committed.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 << 20)
        .build()
    {
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
            Command::Host(args) => host::run(args).await,
            Command::Run(args) => run_manager(args, log_level).await,
            Command::Status(args) => status::run(args).await,
            Command::Doctor(args) => doctor::run(args).await,
            Command::Images(args) => images::run(args).await,
            Command::Service(args) => service::run(args).await,
            Command::Simulate(args) => simulate::run(args).await,
            Command::Helper(args) => podfleet_helper::cli::run(args).await,
            Command::Cache(args) => {
                // SIGINT or SIGTERM stops the cache; what is stored stays valid either way.
                podfleet_image_cache::cli::run(args, async {
                    use tokio::signal::unix::{SignalKind, signal};
                    match signal(SignalKind::terminate()) {
                        Ok(mut term) => {
                            tokio::select! {
                                _ = tokio::signal::ctrl_c() => {}
                                _ = term.recv() => {}
                            }
                        }
                        Err(_) => {
                            let _ = tokio::signal::ctrl_c().await;
                        }
                    }
                })
                .await
            }
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

async fn run_manager(args: RunArgs, log_level: logging::LevelHandle) -> ExitCode {
    let path = args.config.as_path();
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let socket = args.status_socket.unwrap_or_else(status::default_socket);
    let status_listener = match status::bind(&socket).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("podfleet: status socket: {e:#}");
            return ExitCode::from(EXIT_FAILED);
        }
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
    let listen_address = config.listen_address.clone();
    let runner_configs = config.runners.clone();
    let manager = podfleet_manager::Manager::new(config, runners, system_id());
    status::serve_status(status_listener, manager.telemetry());
    if let Some(address) = listen_address
        && let Err(e) = status::serve_metrics(&address, manager.telemetry()).await
    {
        eprintln!("podfleet: {e:#}");
        let _ = std::fs::remove_file(&socket);
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    spawn_signal_handlers(stop.clone());
    spawn_reloads(path.to_path_buf(), manager.reloader(), log_level);
    rotation::spawn(
        path.to_path_buf(),
        &runner_configs,
        manager.tokens(),
        &system_id(),
    );
    service::notify("READY=1");
    service::spawn_watchdog();
    {
        // Tell systemd a stop has begun, so that it waits (TimeoutStopSec) instead of
        // assuming a hang.
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            if stopped
                .wait_for(|mode| *mode != Shutdown::Running)
                .await
                .is_ok()
            {
                service::notify("STOPPING=1");
            }
        });
    }
    manager.run(stopped).await;
    let _ = std::fs::remove_file(&socket);
    ExitCode::SUCCESS
}

/// Reloads the config on SIGHUP and when the file changes (checked every 3 s, like
/// gitlab-runner), applying what can change while jobs run and saying what cannot.
fn spawn_reloads(path: PathBuf, reloader: podfleet_manager::Reloader, level: logging::LevelHandle) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler: config reload by signal is off");
        return;
    };
    tokio::spawn(async move {
        let mut seen = std::fs::read(&path).ok();
        loop {
            let forced = tokio::select! {
                _ = hangup.recv() => true,
                _ = tokio::time::sleep(std::time::Duration::from_secs(3)) => false,
            };
            let current = std::fs::read(&path).ok();
            if !forced && current == seen {
                continue;
            }
            seen = current;
            service::notify("RELOADING=1");
            match podfleet_config::load(&path) {
                Ok(loaded) => {
                    let config = loaded.config;
                    let level_name = config.log_level.as_deref().unwrap_or("info");
                    if let Err(e) = level.reload(logging::filter(level_name)) {
                        tracing::warn!(error = %e, "changing the log level failed");
                    }
                    let outcome = reloader.apply(&config);
                    tracing::info!(
                        path = %path.display(),
                        applied = ?outcome.applied,
                        "config reloaded"
                    );
                    for change in outcome.needs_restart {
                        tracing::warn!(change = %change, "config change takes effect after a restart");
                    }
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), "config reload refused, the running config stays:\n{e}");
                }
            }
            service::notify("READY=1");
        }
    });
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
