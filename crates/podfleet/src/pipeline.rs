//! `podfleet pipeline`: a `.gitlab-ci.yml` run on this machine through the embedded
//! coordinator and the same manager path that serves GitLab.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use podfleet_autoscaler::ScalerEvent;
use podfleet_local_coordinator::{
    LocalCoordinator, LocalCoordinatorOptions, PipelineEvent, PipelineReport, PipelineStatus,
    RunnerRegistration,
};
use podfleet_manager::{Manager, ManagerEvent, RunnerSetup, Shutdown};
use serde::Serialize;
use tokio::sync::watch;

use crate::{EXIT_BAD_INPUT, EXIT_FAILED};

const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

#[derive(Args)]
pub struct PipelineArgs {
    /// The pipeline file.
    #[arg(long, default_value = ".gitlab-ci.yml")]
    file: PathBuf,
    /// A config.toml; without it, the embedded default (local provider, two runners).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write a JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Serve `podfleet status --socket SOCKET` on this socket while the pipeline runs.
    #[arg(long)]
    status_socket: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    status: String,
    jobs: Vec<JobLine>,
}

#[derive(Serialize)]
struct JobLine {
    name: String,
    stage: String,
    status: String,
    exit_code: Option<i32>,
    runner: Option<String>,
    instance: Option<String>,
    started_at: Option<String>,
    finished_at: Option<String>,
}

pub async fn run(args: PipelineArgs) -> ExitCode {
    let mut config = match &args.config {
        Some(path) => match crate::load_config(path) {
            Ok(config) => config,
            Err(code) => return code,
        },
        None => match podfleet_config::parse(DEFAULT_CONFIG, "embedded default config") {
            Ok(loaded) => loaded.config,
            Err(e) => {
                eprintln!("podfleet: the embedded default config is invalid: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        },
    };
    let text = match std::fs::read_to_string(&args.file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!(
                "podfleet: cannot read pipeline {}: {e}",
                args.file.display()
            );
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let pipeline = match podfleet_local_coordinator::pipeline::parse_pipeline(
        &text,
        &args.file.display().to_string(),
    ) {
        Ok(pipeline) => pipeline,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let registrations = config
        .runners
        .iter()
        .map(|r| RunnerRegistration {
            token: r.token.expose().to_string(),
            description: r.name.clone(),
            tags: r.tag_list.clone(),
            run_untagged: r.run_untagged,
        })
        .collect();
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("podfleet: cannot listen on 127.0.0.1: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let project_dir = args
        .file
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    let options = LocalCoordinatorOptions::new(project_dir);
    let coordinator =
        match LocalCoordinator::start(listener, pipeline, registrations, options).await {
            Ok(handle) => handle,
            Err(e) => {
                eprintln!("podfleet: {e}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        };
    let mut pipeline_events = coordinator.events();
    for runner in &mut config.runners {
        runner.url = coordinator.url.clone();
    }
    let mut runners = Vec::new();
    for runner in &config.runners {
        match crate::providers::provider_for(runner).await {
            Ok(provider) => runners.push(RunnerSetup {
                config: runner.clone(),
                provider,
            }),
            Err(e) => {
                eprintln!("podfleet: {e:#}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        }
    }
    let manager = Manager::new(config, runners, crate::system_id());
    // `podfleet status --socket S` works during a pipeline too, when asked for: the daemon's
    // default socket is never taken, so a local pipeline cannot keep a daemon from starting.
    let serving = match &args.status_socket {
        Some(socket) => match crate::status::bind(socket).await {
            Ok(listener) => {
                crate::status::serve_status(listener, manager.telemetry());
                Some(socket.clone())
            }
            Err(e) => {
                eprintln!("podfleet: status is not served: {e:#}");
                None
            }
        },
        None => None,
    };
    let mut manager_events = manager.events();
    let (stop, stopped) = watch::channel(Shutdown::Running);
    let manager_task = tokio::spawn(manager.run(stopped));
    let (signal_stop, mut signalled) = watch::channel(Shutdown::Running);
    crate::spawn_signal_handlers(signal_stop);

    let mut placement = Placement::default();
    let mut partial: HashMap<u64, Vec<u8>> = HashMap::new();
    let report = loop {
        tokio::select! {
            event = pipeline_events.recv() => match event {
                Ok(PipelineEvent::JobStarted { name, runner_description, .. }) => {
                    println!("podfleet: job {name} started on runner {runner_description}");
                }
                Ok(PipelineEvent::TraceChunk { job_id, name, bytes }) => {
                    print_lines(&name, partial.entry(job_id).or_default(), &bytes, false);
                }
                Ok(PipelineEvent::JobFinished { job_id, name, status, exit_code }) => {
                    print_lines(&name, partial.entry(job_id).or_default(), &[], true);
                    let code = exit_code.map(|c| format!(" (exit code {c})")).unwrap_or_default();
                    println!("podfleet: job {name} {}{code}", status.as_str());
                }
                Ok(PipelineEvent::PipelineFinished { .. }) => break coordinator.wait().await,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break coordinator.wait().await,
            },
            event = manager_events.recv() => {
                if let Ok(event) = event {
                    print_manager_event(&event, &mut placement);
                }
            },
            _ = signalled.changed() => {
                eprintln!("podfleet: stopping: canceling jobs and deleting instances");
                coordinator.cancel_all();
                let _ = stop.send(Shutdown::Forceful);
            },
        }
    };
    let _ = stop.send(Shutdown::Graceful);
    // Show instance deletions while the manager cleans up.
    let mut manager_task = manager_task;
    loop {
        tokio::select! {
            _ = &mut manager_task => break,
            event = manager_events.recv() => {
                if let Ok(event) = event {
                    print_manager_event(&event, &mut placement);
                }
            }
        }
    }
    if let Some(socket) = serving {
        let _ = std::fs::remove_file(socket);
    }
    print_summary(&report, &placement.instances);
    if let Some(path) = &args.report {
        let json = report_json(&report, &placement.instances);
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("podfleet: cannot write report {}: {e}", path.display());
            return ExitCode::from(EXIT_FAILED);
        }
    }
    match report.status {
        PipelineStatus::Success => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_FAILED),
    }
}

/// Instances by job name, learned from the manager's events.
#[derive(Default)]
struct Placement {
    names: HashMap<u64, String>,
    instances: HashMap<String, String>,
}

fn print_manager_event(event: &ManagerEvent, placement: &mut Placement) {
    match event {
        ManagerEvent::JobReceived {
            job_id, job_name, ..
        } => {
            placement.names.insert(*job_id, job_name.clone());
        }
        ManagerEvent::JobOnInstance {
            runner,
            job_id,
            instance,
        } => {
            if let Some(name) = placement.names.get(job_id) {
                placement.instances.insert(name.clone(), instance.clone());
            }
            println!("podfleet: [{runner}] job {job_id} runs on instance {instance}");
        }
        ManagerEvent::Scaler { runner, event } => {
            let line = match event {
                ScalerEvent::Requested { count } => format!("creating {count} instance(s)"),
                ScalerEvent::Ready { id, seconds } => {
                    format!("instance {id} created and ready ({seconds}s)")
                }
                ScalerEvent::Retiring { id, use_count } => {
                    format!("instance {id} used {use_count} time(s): retiring (max_use_count)")
                }
                ScalerEvent::Deleting { id, reason } => {
                    format!("deleting instance {id} ({reason})")
                }
                ScalerEvent::Deleted { id } => format!("instance {id} deleted"),
                ScalerEvent::Failed { id, reason } => format!("instance {id} failed: {reason}"),
            };
            println!("podfleet: [{runner}] {line}");
        }
        ManagerEvent::JobFinished(_) => {}
    }
}

/// Prints complete lines of a job's log prefixed with its name; keeps a partial last line.
fn print_lines(name: &str, partial: &mut Vec<u8>, bytes: &[u8], flush: bool) {
    partial.extend_from_slice(bytes);
    let mut out = std::io::stdout().lock();
    while let Some(pos) = partial.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = partial.drain(..=pos).collect();
        let _ = write!(out, "{name:>16} | {}", String::from_utf8_lossy(&line));
    }
    if flush && !partial.is_empty() {
        let _ = writeln!(out, "{name:>16} | {}", String::from_utf8_lossy(partial));
        partial.clear();
    }
}

fn print_summary(report: &PipelineReport, instances: &HashMap<String, String>) {
    println!();
    println!(
        "{:<24} {:<10} {:<9} {:>5}  {:<20} INSTANCE",
        "JOB", "STAGE", "STATUS", "EXIT", "RUNNER"
    );
    for job in &report.jobs {
        println!(
            "{:<24} {:<10} {:<9} {:>5}  {:<20} {}",
            job.name,
            job.stage,
            job.status.as_str(),
            job.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            job.runner.clone().unwrap_or_else(|| "-".into()),
            instances.get(&job.name).map_or("-", String::as_str),
        );
    }
    println!("pipeline {}", status_name(report));
}

fn status_name(report: &PipelineReport) -> &'static str {
    match report.status {
        PipelineStatus::Running => "running",
        PipelineStatus::Success => "success",
        PipelineStatus::Failed => "failed",
        PipelineStatus::Canceled => "canceled",
    }
}

fn report_json(report: &PipelineReport, instances: &HashMap<String, String>) -> String {
    let jobs = report
        .jobs
        .iter()
        .map(|job| JobLine {
            name: job.name.clone(),
            stage: job.stage.clone(),
            status: job.status.as_str().to_string(),
            exit_code: job.exit_code,
            runner: job.runner.clone(),
            instance: instances.get(&job.name).cloned(),
            started_at: job.started_at.map(|t| t.to_rfc3339()),
            finished_at: job.finished_at.map(|t| t.to_rfc3339()),
        })
        .collect();
    let status = match status_name(report) {
        "success" => "success",
        _ => "failed",
    };
    serde_json::to_string_pretty(&Report {
        status: status.into(),
        jobs,
    })
    .unwrap_or_default()
}
