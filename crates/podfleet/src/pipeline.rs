//! `podfleet pipeline`: a `.gitlab-ci.yml` run on this machine through the embedded
//! coordinator and the same manager path that serves GitLab.
//!
//! Output: job logs as `name | line` lines; on a terminal a live status line of every job
//! stays at the bottom. Masked variables never reach the output: the runner masks job logs,
//! and podfleet prints no variable values of its own.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use podfleet_autoscaler::ScalerEvent;
use podfleet_local_coordinator::pipeline::{
    Pipeline, Variable, parse_assignment, parse_variables_file,
};
use podfleet_local_coordinator::{
    JobStatus, LocalCoordinator, LocalCoordinatorOptions, PipelineEvent, PipelineReport,
    PipelineStatus, Project, RunnerRegistration,
};
use podfleet_manager::{Announcement, Manager, ManagerEvent, RunnerSetup, Shutdown};
use serde::Serialize;
use tokio::sync::watch;

use crate::{EXIT_BAD_INPUT, EXIT_FAILED};

const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

#[derive(Args)]
pub struct PipelineArgs {
    /// Run only these jobs (a parallel job's base name selects all its instances) and,
    /// transitively, the jobs they `needs`.
    jobs: Vec<String>,
    /// Print stages, jobs and what their rules decided, and exit without running anything.
    #[arg(long)]
    list: bool,
    /// A CI/CD variable (repeatable); wins over the file's variables, like a project variable.
    #[arg(long = "var", value_name = "KEY=VALUE")]
    variables: Vec<String>,
    /// Like --var, but masked: its value is hidden in job logs and never printed.
    #[arg(long = "masked-var", value_name = "KEY=VALUE")]
    masked_variables: Vec<String>,
    /// Variables from a file: `KEY=VALUE` lines, or YAML `KEY: value` / `KEY: {value, masked, file}`.
    #[arg(long, value_name = "FILE")]
    variables_file: Vec<PathBuf>,
    /// Run `when: manual` jobs too.
    #[arg(long)]
    manual: bool,
    /// Copy each job's artifacts archive to DIR/<job>/artifacts.zip.
    #[arg(long, value_name = "DIR")]
    artifacts_dir: Option<PathBuf>,
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
    when: String,
    allowed_failure: bool,
    retries: u32,
    failure_reason: Option<String>,
    skip_reason: Option<String>,
    coverage: Option<String>,
    /// Where --artifacts-dir put the job's artifacts.
    artifacts: Option<String>,
}

/// Variables from --var, --masked-var and --variables-file, in that order of precedence
/// (later wins); errors never show a value.
fn user_variables(args: &PipelineArgs) -> Result<Vec<Variable>, String> {
    let mut variables = Vec::new();
    for path in &args.variables_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read variables file {}: {e}", path.display()))?;
        variables.extend(parse_variables_file(&text, &path.display().to_string())?);
    }
    for (list, masked) in [(&args.variables, false), (&args.masked_variables, true)] {
        for text in list {
            let option = if masked { "--masked-var" } else { "--var" };
            let (key, value) = parse_assignment(text).map_err(|message| {
                let key = text.split('=').next().unwrap_or_default();
                format!("{option} {key}=…: {message}")
            })?;
            if masked && (value.len() < 8 || value.contains('\n')) {
                return Err(format!(
                    "{option} {key}: GitLab masks only single-line values of 8 characters or more; use --var for this one"
                ));
            }
            let mut variable = Variable::public(&key, value);
            variable.masked = masked;
            variables.push(variable);
        }
    }
    Ok(variables)
}

/// `stages`, jobs with their `when`, `needs` and rules outcome, and the jobs left out.
fn print_list(pipeline: &Pipeline) {
    if let Some(name) = &pipeline.name {
        println!("pipeline {name}");
    }
    if let Some(reason) = &pipeline.filtered_out {
        println!("no pipeline: {reason}");
    }
    println!(
        "{:<28} {:<10} {:<11} {:<24} RULES",
        "JOB", "STAGE", "WHEN", "NEEDS"
    );
    for stage in &pipeline.stages {
        for job in pipeline.jobs.iter().filter(|job| &job.stage == stage) {
            let needs = match &job.needs {
                None => "(stage order)".to_owned(),
                Some(needs) if needs.is_empty() => "[]".to_owned(),
                Some(needs) => needs
                    .iter()
                    .map(|need| need.job.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            };
            let mut when = job.when.as_str().to_owned();
            if job.allow_failure.allowed || !job.allow_failure.exit_codes.is_empty() {
                when.push('*');
            }
            println!(
                "{:<28} {:<10} {:<11} {:<24} {}",
                job.name, job.stage, when, needs, job.reason
            );
        }
        for job in pipeline.excluded.iter().filter(|job| &job.stage == stage) {
            println!(
                "{:<28} {:<10} {:<11} {:<24} not run: {}",
                job.name, job.stage, "-", "-", job.reason
            );
        }
    }
    println!("(* allow_failure)");
}

/// Where the project is: the git work tree holding the file, else the file's directory.
fn project_dir(file: &Path) -> PathBuf {
    let directory = file
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    let top = std::process::Command::new("git")
        .arg("-C")
        .arg(&directory)
        .args(["rev-parse", "--show-toplevel"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    top.unwrap_or(directory)
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
    let user_variables = match user_variables(&args) {
        Ok(variables) => variables,
        Err(message) => {
            eprintln!("podfleet: {message}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let project_dir = project_dir(&args.file);
    let project = {
        let dir = project_dir.clone();
        match tokio::task::spawn_blocking(move || Project::inspect(&dir)).await {
            Ok(project) => project,
            Err(e) => {
                eprintln!("podfleet: cannot inspect {}: {e}", project_dir.display());
                return ExitCode::from(EXIT_FAILED);
            }
        }
    };
    let pipeline =
        match podfleet_local_coordinator::load_pipeline(&args.file, &project, &user_variables) {
            Ok(pipeline) => pipeline,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        };
    let pipeline = if args.jobs.is_empty() {
        pipeline
    } else {
        match pipeline.select(&args.jobs) {
            Ok(pipeline) => pipeline,
            Err(message) => {
                eprintln!("podfleet: {message}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        }
    };
    if args.list {
        print_list(&pipeline);
        return ExitCode::SUCCESS;
    }
    if let Some(reason) = &pipeline.filtered_out {
        println!("podfleet: no pipeline runs: {reason}");
        return ExitCode::SUCCESS;
    }
    if pipeline.jobs.is_empty() {
        println!("podfleet: rules/only/except leave no job to run (see --list)");
        return ExitCode::SUCCESS;
    }
    let job_names: Vec<String> = pipeline.jobs.iter().map(|job| job.name.clone()).collect();
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
    let mut options = LocalCoordinatorOptions::new(project_dir);
    options.run_manual = args.manual;
    options.project = Some(project);
    // Side by side: the coordinator snapshots the working tree while each local group
    // starts its own sshd.
    let (coordinator, providers) = tokio::join!(
        LocalCoordinator::start(listener, pipeline, registrations, options),
        futures_util::future::join_all(config.runners.iter().map(crate::providers::provider_for)),
    );
    let coordinator = match coordinator {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("podfleet: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let mut runners = Vec::new();
    for (runner, provider) in config.runners.iter().zip(providers) {
        match provider {
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
    let mut pipeline_events = coordinator.events();
    for setup in &mut runners {
        setup.config.url = coordinator.url.clone();
    }
    for runner in &mut config.runners {
        runner.url = coordinator.url.clone();
    }
    // The embedded coordinator is on 127.0.0.1: asking it often costs nothing, while a job
    // of the next stage waits for the next ask (gitlab-runner's default is every 3 s).
    config.check_interval = config.check_interval.min(LOCAL_CHECK_INTERVAL);
    // A job an interrupted earlier pipeline left belongs to that pipeline's coordinator,
    // which is gone.
    let manager = Manager::new(config, runners, crate::system_id()).without_resuming();
    // The pipeline knows its stages: each runner's autoscaler hears how many of its jobs
    // will start soon, and creates their instances ahead of them.
    let announcer = manager.announcer();
    let announce = |coordinator: &podfleet_local_coordinator::Handle| {
        for upcoming in coordinator.upcoming_jobs() {
            let announcement = Announcement {
                jobs: upcoming.jobs,
                started: upcoming.handed_out,
            };
            announcer.announce(&upcoming.runner, announcement);
        }
    };
    announce(&coordinator);
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
    let (interrupts, mut signalled) = watch::channel(Interrupt::None);
    spawn_interrupt_handlers(interrupts);

    let mut placement = Placement::default();
    let mut partial: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut live = LiveStatus::new(&job_names, std::io::stdout().is_terminal());
    for job in coordinator.snapshot().jobs {
        live.set(&job.name, job.status);
    }
    live.draw();
    let report = loop {
        tokio::select! {
            event = pipeline_events.recv() => match event.inspect(|event| {
                if !matches!(event, PipelineEvent::TraceChunk { .. }) {
                    announce(&coordinator);
                }
            }) {
                Ok(PipelineEvent::JobStarted { name, runner_description, .. }) => {
                    live.set(&name, JobStatus::Running);
                    live.line(&format!("podfleet: job {name} started on runner {runner_description}"));
                }
                Ok(PipelineEvent::TraceChunk { job_id, name, bytes }) => {
                    print_lines(&mut live, &name, partial.entry(job_id).or_default(), &bytes, false);
                }
                Ok(PipelineEvent::JobFinished { job_id, name, status, exit_code }) => {
                    print_lines(&mut live, &name, partial.entry(job_id).or_default(), &[], true);
                    live.set(&name, status);
                    let code = exit_code.map(|c| format!(" (exit code {c})")).unwrap_or_default();
                    live.line(&format!("podfleet: job {name} {}{code}", status.as_str()));
                }
                Ok(PipelineEvent::JobCanceling { name, .. }) => {
                    live.set(&name, JobStatus::Canceling);
                    live.line(&format!("podfleet: job {name} canceling: its after_script still runs"));
                }
                Ok(PipelineEvent::JobRetried { name, attempt, .. }) => {
                    live.set(&name, JobStatus::Pending);
                    live.line(&format!("podfleet: job {name} is retried (attempt {attempt})"));
                }
                Ok(PipelineEvent::PipelineFinished { .. }) => break coordinator.wait().await,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break coordinator.wait().await,
            },
            event = manager_events.recv() => {
                if let Ok(event) = event
                    && let Some(line) = manager_event_line(&event, &mut placement)
                {
                    live.line(&line);
                }
            },
            _ = signalled.changed() => {
                let interrupt = *signalled.borrow_and_update();
                live.clear();
                match interrupt {
                    Interrupt::None => {}
                    Interrupt::Cancel => {
                        eprintln!(
                            "podfleet: canceling: running jobs stop their script and run after_script \
                             (interrupt again to stop them at once)"
                        );
                        coordinator.cancel_all_gracefully();
                    }
                    Interrupt::Abort => {
                        eprintln!("podfleet: stopping: canceling jobs and deleting instances");
                        coordinator.cancel_all();
                        let _ = stop.send(Shutdown::Forceful);
                    }
                }
            },
        }
    };
    live.clear();
    live.enabled = false;
    // Export artifacts before the coordinator (and its state directory) goes away.
    let mut exported = HashMap::new();
    if let Some(dir) = &args.artifacts_dir {
        for job in &report.jobs {
            let Some(source) = &job.artifacts else {
                continue;
            };
            let target_dir = dir.join(podfleet_local_coordinator::project::slug(&job.name));
            let target = target_dir.join("artifacts.zip");
            let copied =
                std::fs::create_dir_all(&target_dir).and_then(|()| std::fs::copy(source, &target));
            match copied {
                Ok(_) => {
                    exported.insert(job.name.clone(), target.display().to_string());
                }
                Err(e) => eprintln!(
                    "podfleet: cannot export the artifacts of {} to {}: {e}",
                    job.name,
                    target.display()
                ),
            }
        }
    }
    let _ = stop.send(Shutdown::Graceful);
    // Show instance deletions while the manager cleans up.
    let mut manager_task = manager_task;
    loop {
        tokio::select! {
            _ = &mut manager_task => break,
            event = manager_events.recv() => {
                if let Ok(event) = event
                    && let Some(line) = manager_event_line(&event, &mut placement)
                {
                    println!("{line}");
                }
            }
        }
    }
    if let Some(socket) = serving {
        let _ = std::fs::remove_file(socket);
    }
    print_summary(&report, &placement.instances);
    if let Some(path) = &args.report {
        let json = report_json(&report, &placement.instances, &exported);
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

/// How often runners ask the embedded coordinator for jobs, at most.
const LOCAL_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// How far interrupts have taken a local pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupt {
    None,
    /// Like GitLab's cancel button: running jobs go `canceling` and run their after_script.
    Cancel,
    /// Jobs are stopped at once; instances are still deleted.
    Abort,
}

/// SIGINT and SIGQUIT cancel gracefully, the next one aborts; SIGTERM aborts at once. One
/// more after an abort exits without cleanup.
fn spawn_interrupt_handlers(interrupts: watch::Sender<Interrupt>) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut int), Ok(mut quit), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        loop {
            let asked = tokio::select! {
                _ = int.recv() => Interrupt::Cancel,
                _ = quit.recv() => Interrupt::Cancel,
                _ = term.recv() => Interrupt::Abort,
            };
            let current = *interrupts.borrow();
            if current == Interrupt::Abort {
                eprintln!("podfleet: interrupted again: exiting without cleanup");
                std::process::exit(i32::from(crate::EXIT_FAILED));
            }
            let next = if current == Interrupt::Cancel {
                Interrupt::Abort
            } else {
                asked
            };
            interrupts.send_replace(next);
        }
    });
}

/// Instances by job name, learned from the manager's events.
#[derive(Default)]
struct Placement {
    names: HashMap<u64, String>,
    instances: HashMap<String, String>,
}

fn manager_event_line(event: &ManagerEvent, placement: &mut Placement) -> Option<String> {
    match event {
        ManagerEvent::JobReceived {
            job_id, job_name, ..
        } => {
            placement.names.insert(*job_id, job_name.clone());
            None
        }
        ManagerEvent::JobOnInstance {
            runner,
            job_id,
            instance,
        } => {
            if let Some(name) = placement.names.get(job_id) {
                placement.instances.insert(name.clone(), instance.clone());
            }
            Some(format!(
                "podfleet: [{runner}] job {job_id} runs on instance {instance}"
            ))
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
            Some(format!("podfleet: [{runner}] {line}"))
        }
        ManagerEvent::JobFinished(_) => None,
    }
}

/// The live status line at the bottom of a terminal: every job's state, redrawn on change.
struct LiveStatus {
    enabled: bool,
    drawn: bool,
    jobs: Vec<(String, JobStatus)>,
}

impl LiveStatus {
    fn new(names: &[String], enabled: bool) -> LiveStatus {
        LiveStatus {
            enabled,
            drawn: false,
            jobs: names
                .iter()
                .map(|name| (name.clone(), JobStatus::Created))
                .collect(),
        }
    }

    fn set(&mut self, name: &str, status: JobStatus) {
        if let Some(entry) = self.jobs.iter_mut().find(|(job, _)| job == name) {
            entry.1 = status;
        }
        self.draw();
    }

    fn clear(&mut self) {
        if self.drawn {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\r\x1b[2K");
            let _ = out.flush();
            self.drawn = false;
        }
    }

    fn draw(&mut self) {
        if !self.enabled {
            return;
        }
        let count = |wanted: &[JobStatus]| {
            self.jobs
                .iter()
                .filter(|(_, status)| wanted.contains(status))
                .count()
        };
        let running: Vec<&str> = self
            .jobs
            .iter()
            .filter(|(_, status)| matches!(status, JobStatus::Running | JobStatus::Canceling))
            .map(|(name, _)| name.as_str())
            .collect();
        let text = format!(
            "[{} done, {} failed, {} waiting] running: {}",
            count(&[
                JobStatus::Success,
                JobStatus::Skipped,
                JobStatus::Manual,
                JobStatus::Canceled
            ]),
            count(&[JobStatus::Failed]),
            count(&[JobStatus::Created, JobStatus::Pending, JobStatus::Scheduled]),
            if running.is_empty() {
                "-".to_owned()
            } else {
                running.join(", ")
            }
        );
        let width = terminal_width();
        let shown: String = text.chars().take(width.saturating_sub(1)).collect();
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r\x1b[2K\x1b[7m{shown}\x1b[0m");
        let _ = out.flush();
        self.drawn = true;
    }

    /// Prints a full line above the status line.
    fn line(&mut self, text: &str) {
        self.clear();
        println!("{text}");
        self.draw();
    }
}

fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills the winsize we pass; a failure leaves it zeroed.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        80
    }
}

/// Prints complete lines of a job's log prefixed with its name; keeps a partial last line.
fn print_lines(
    live: &mut LiveStatus,
    name: &str,
    partial: &mut Vec<u8>,
    bytes: &[u8],
    flush: bool,
) {
    partial.extend_from_slice(bytes);
    while let Some(pos) = partial.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = partial.drain(..=pos).collect();
        let text = String::from_utf8_lossy(&line);
        live.line(&format!(
            "{name:>16} | {}",
            text.trim_end_matches(['\n', '\r'])
        ));
    }
    if flush && !partial.is_empty() {
        let text = String::from_utf8_lossy(partial).into_owned();
        live.line(&format!("{name:>16} | {text}"));
        partial.clear();
    }
}

fn print_summary(report: &PipelineReport, instances: &HashMap<String, String>) {
    println!();
    println!(
        "{:<24} {:<10} {:<10} {:>5} {:>8}  {:<20} INSTANCE",
        "JOB", "STAGE", "STATUS", "EXIT", "TIME", "RUNNER"
    );
    for job in &report.jobs {
        let mut status = job.status.as_str().to_owned();
        if job.allowed_failure {
            status.push('*');
        }
        let time = match (job.started_at, job.finished_at) {
            (Some(start), Some(end)) => {
                format!("{:.1}s", (end - start).num_milliseconds() as f64 / 1000.0)
            }
            _ => "-".to_owned(),
        };
        println!(
            "{:<24} {:<10} {:<10} {:>5} {:>8}  {:<20} {}",
            job.name,
            job.stage,
            status,
            job.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            time,
            job.runner.clone().unwrap_or_else(|| "-".into()),
            instances.get(&job.name).map_or("-", String::as_str),
        );
    }
    for job in &report.jobs {
        if let Some(reason) = &job.skip_reason {
            println!("{}: skipped because {reason}", job.name);
        }
        if job.retries > 0 {
            println!("{}: retried {} time(s)", job.name, job.retries);
        }
        if job.status == JobStatus::Manual {
            println!("{}: manual job not run (use --manual)", job.name);
        }
    }
    if report.jobs.iter().any(|job| job.allowed_failure) {
        println!("(* failed, allowed to fail)");
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

fn report_json(
    report: &PipelineReport,
    instances: &HashMap<String, String>,
    exported: &HashMap<String, String>,
) -> String {
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
            when: job.when.clone(),
            allowed_failure: job.allowed_failure,
            retries: job.retries,
            failure_reason: job.failure_reason.clone(),
            skip_reason: job.skip_reason.clone(),
            coverage: job.coverage.clone(),
            artifacts: exported.get(&job.name).cloned(),
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
