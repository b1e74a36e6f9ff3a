//! The executor: runs one job's stages on an instance through the Docker Engine API
//! (bollard) over the connector's SSH tunnel, in gitlab-runner's docker executor order:
//! prepare (images, per-build network, services), get_sources, restore_cache,
//! download_artifacts (in the helper container), step_script and after_script (in the job
//! image), archive_cache and upload_artifacts (helper), cleanup_file_variables; every
//! container, the build volume and the network are removed afterwards. It knows Docker, not
//! clouds or GitLab.

pub mod auth;
mod exit_marker;
pub mod options;
pub mod reattach;
pub mod script;
pub mod services;
mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use auth::RegistryCredential;
/// The Docker API client the executor is built on, for callers that inspect an instance.
pub use bollard;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, HostConfigCgroupnsModeEnum,
    NetworkCreateRequest, NetworkingConfig, VolumeCreateRequest,
};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, CreateImageOptions, ImportImageOptions,
    LogsOptions, RemoveContainerOptions, RemoveVolumeOptions, StopContainerOptions,
    UploadToContainerOptions, WaitContainerOptions,
};
use exit_marker::Piece;
use futures_util::StreamExt;
use podfleet_config::{DockerConfig, PullPolicy};
use podfleet_connector::{Connection, Tunnel};
pub use script::Variable;
pub use services::ServiceSpec;
use tokio_util::sync::CancellationToken;

/// Where the job's output goes (masked and uploaded by the caller).
pub type TraceSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// One job, as the executor needs it.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub job_id: u64,
    pub image: String,
    pub entrypoint: Option<Vec<String>>,
    /// The build volume is mounted here; `project_dir` is below it.
    pub builds_dir: String,
    pub project_dir: String,
    pub variables: Vec<Variable>,
    /// before_script + script.
    pub script: Vec<String>,
    pub after_script: Vec<String>,
    /// The whole job's timeout.
    pub timeout: Duration,
    /// The `script` step's own timeout, when the payload sets one.
    pub script_timeout: Option<Duration>,
    /// The `after_script` step's timeout (gitlab-runner's default is 5 minutes).
    pub after_script_timeout: Duration,
    /// The runner's `shell`: `bash` runs the script in bash when the image has it and
    /// falls back to sh (as gitlab-runner's shell detection does); anything else uses sh.
    pub shell: String,
    /// `features.trace_sections` (or `FF_SCRIPT_SECTIONS`): stage sections in the trace.
    pub trace_sections: bool,
    /// `FF_SCRIPT_SECTIONS`: each command of the script in its own section.
    pub script_sections: bool,
    /// The job's `image.pull_policy` (empty: the runner's `pull_policy`).
    pub pull_policy: Vec<String>,
    /// `image.docker.user` of the job, already checked against `allowed_users`.
    pub user: Option<String>,
    pub services: Vec<ServiceSpec>,
    /// Registry credentials in precedence order (DOCKER_AUTH_CONFIG, then the payload's).
    pub registry_credentials: Vec<RegistryCredential>,
    /// Named volume mounted at `/cache` (`None` with `disable_cache`).
    pub cache_volume: Option<String>,
    /// The helper stages (sources, caches, artifacts); `None` runs none of them.
    pub helper: Option<HelperPlan>,
    /// `FF_ENABLE_JOB_CLEANUP`: cleanup_file_variables also removes the project directory.
    pub remove_project_dir: bool,
    /// How long a graceful cancel waits after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
}

/// Builds the `docker save` archive of podfleet's own helper image.
pub type HelperArchive = fn() -> std::io::Result<Vec<u8>>;

/// The helper container's part of a job: the image, how to get it onto the instance, the
/// job file it reads and the command of each stage that has work.
#[derive(Clone)]
pub struct HelperPlan {
    pub image: String,
    /// A `docker save` archive of `image`, loaded with `POST /images/load` when the instance
    /// lacks it; `None` pulls `image` (a configured `helper_image`) with the runner's policy.
    pub archive: Option<HelperArchive>,
    /// The job file (JSON with tokens): uploaded into each helper container, mode 0600.
    pub job_file: Vec<u8>,
    /// Where the job file goes in the helper container (absolute).
    pub job_file_path: String,
    pub stages: Vec<HelperStage>,
    /// Set when the helper runs consecutive stages in one container (podfleet's own), which
    /// saves a container per stage.
    pub batch: Option<HelperBatch>,
}

/// How one helper container runs several stages in a row.
#[derive(Clone, Copy, Debug)]
pub struct HelperBatch {
    /// The container's command for these stages, in this order.
    pub argv: fn(&[HelperStageKind]) -> Vec<String>,
    /// Each stage but the last ends in a line on stdout: this, its exit status, a newline.
    /// A failing stage ends the container instead, with its status.
    pub stage_end: &'static str,
}

impl std::fmt::Debug for HelperPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HelperPlan")
            .field("image", &self.image)
            .field("loadable", &self.archive.is_some())
            .field("job_file_path", &self.job_file_path)
            .field("stages", &self.stages)
            .field("batch", &self.batch.is_some())
            .finish_non_exhaustive()
    }
}

/// One helper stage with work to do, and its container command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperStage {
    pub kind: HelperStageKind,
    pub argv: Vec<String>,
}

/// The helper stages, in gitlab-runner's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelperStageKind {
    GetSources,
    RestoreCache,
    DownloadArtifacts,
    ArchiveCache,
    ArchiveCacheOnFailure,
    UploadArtifactsOnSuccess,
    UploadArtifactsOnFailure,
}

impl HelperStageKind {
    pub fn section(self) -> &'static str {
        match self {
            Self::GetSources => "get_sources",
            Self::RestoreCache => "restore_cache",
            Self::DownloadArtifacts => "download_artifacts",
            Self::ArchiveCache => "archive_cache",
            Self::ArchiveCacheOnFailure => "archive_cache_on_failure",
            Self::UploadArtifactsOnSuccess => "upload_artifacts_on_success",
            Self::UploadArtifactsOnFailure => "upload_artifacts_on_failure",
        }
    }

    fn header(self) -> &'static str {
        match self {
            Self::GetSources => "Getting source from Git repository",
            Self::RestoreCache => "Restoring cache",
            Self::DownloadArtifacts => "Downloading artifacts",
            Self::ArchiveCache => "Saving cache for successful job",
            Self::ArchiveCacheOnFailure => "Saving cache for failed job",
            Self::UploadArtifactsOnSuccess => "Uploading artifacts for successful job",
            Self::UploadArtifactsOnFailure => "Uploading artifacts for failed job",
        }
    }

    /// Cache stages only warn when they fail, as in gitlab-runner; the others fail the job.
    fn failure_fails_job(self) -> bool {
        !matches!(
            self,
            Self::RestoreCache | Self::ArchiveCache | Self::ArchiveCacheOnFailure
        )
    }
}

/// How a job is stopped from outside: `graceful` (`Job-Status: canceling`) stops the script
/// with SIGTERM (SIGKILL after the job's `stop_grace`) and still runs after_script and the
/// on-failure stages; `hard` (`canceled`, a 403, manager shutdown) kills at once and runs
/// nothing more. Cleanup runs either way.
#[derive(Clone, Debug, Default)]
pub struct Cancellation {
    pub graceful: CancellationToken,
    pub hard: CancellationToken,
}

impl Cancellation {
    pub fn new() -> Self {
        Self::default()
    }
}

/// How a job ended, as far as the instance is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Success,
    /// The script (or a helper stage the job depends on) exited non-zero.
    ScriptFailure {
        exit_code: i64,
    },
    /// The job image (or a service image) could not be had, or its pull policy is not
    /// allowed.
    ImagePullFailure(String),
    /// A service did not start or did not become ready in time (its logs are in the trace).
    ServiceFailure(String),
    /// The instance or its engine failed us.
    SystemFailure(String),
    /// Stopped on request.
    Canceled,
    /// Ran past its timeout (the job's or a step's).
    TimedOut,
}

impl JobOutcome {
    /// `CI_JOB_STATUS` for after_script.
    fn job_status(&self) -> &'static str {
        match self {
            JobOutcome::Success => "success",
            JobOutcome::Canceled => "canceled",
            _ => "failed",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("docker api on the instance: {0}")]
    Engine(#[from] bollard::errors::Error),
}

/// A Docker API session on one instance.
#[derive(Clone)]
pub struct Executor {
    docker: Docker,
    /// podfleet's own helper image, once seen on the instance: its tag is its content's
    /// hash, so a later job there need not ask again.
    helper_seen: Arc<std::sync::Mutex<Option<String>>>,
    /// Held while a container is created on the instance: see [`Executor::create`].
    creating: Arc<tokio::sync::Mutex<()>>,
}

/// What a stage run is stopped by.
struct Stops<'a> {
    cancel: &'a Cancellation,
    /// Whether a graceful cancel stops this stage (not after_script and later ones).
    graceful: bool,
    limit: Duration,
    /// SIGTERM to SIGKILL on a graceful cancel.
    grace: Duration,
}

impl Executor {
    /// Opens the Docker API through the connection and checks that the engine answers.
    pub async fn connect(connection: Connection, tunnel: Tunnel) -> Result<Self, ExecutorError> {
        let docker = transport::docker_over_ssh(connection, tunnel)?;
        docker.ping().await?;
        Ok(Self::with(docker))
    }

    /// An executor over the Docker API on a local unix socket (an instance's engine reached
    /// without SSH, e.g. the local provider's from the same host).
    pub async fn connect_unix(socket: &str) -> Result<Self, ExecutorError> {
        let docker = Docker::connect_with_unix(socket, 600, bollard::API_DEFAULT_VERSION)?;
        docker.ping().await?;
        Ok(Self::with(docker))
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Runs the job to its end. Whatever happens, the job's containers, volume and network
    /// are removed before this returns.
    pub async fn run(
        &self,
        job: &JobSpec,
        config: &DockerConfig,
        trace: TraceSink,
        cancel: Cancellation,
    ) -> JobOutcome {
        let (outcome, leftovers) = self.run_leaving(job, config, trace, cancel).await;
        leftovers.remove(self).await;
        outcome
    }

    /// [`Executor::run`] without the cleanup: the job's outcome is known before its
    /// containers, volume and network are removed, which [`Leftovers::remove`] does (the
    /// caller may report the job first).
    pub async fn run_leaving(
        &self,
        job: &JobSpec,
        config: &DockerConfig,
        trace: TraceSink,
        cancel: Cancellation,
    ) -> (JobOutcome, Leftovers) {
        let resources = JobResources::new(job);
        let outcome = Box::pin(self.run_stages(job, config, &resources, &trace, &cancel)).await;
        (outcome, Leftovers(resources))
    }

    async fn run_stages(
        &self,
        job: &JobSpec,
        config: &DockerConfig,
        resources: &JobResources,
        trace: &TraceSink,
        cancel: &Cancellation,
    ) -> JobOutcome {
        let deadline = tokio::time::Instant::now() + job.timeout;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let sections = Sections {
            trace: trace.clone(),
            enabled: job.trace_sections,
        };
        // prepare_executor: images, network, services. A stalled registry or service must not
        // outlive a cancel or the job's timeout.
        sections.start(
            "prepare_executor",
            &format!("Using Docker executor with image {} ...", job.image),
        );
        // The helper image loads while the job image is pulled and services start (a
        // failed load is retried, and reported, by the first helper stage).
        let prepare = async {
            match job.helper.as_ref().filter(|plan| !plan.stages.is_empty()) {
                Some(plan) => {
                    let helper = self.ensure_helper_image(plan, config, resources, trace);
                    tokio::join!(self.prepare(job, config, resources, trace), helper).0
                }
                None => self.prepare(job, config, resources, trace).await,
            }
        };
        let prepared = tokio::select! {
            prepared = prepare => prepared,
            _ = cancel.hard.cancelled() => Err(JobOutcome::Canceled),
            _ = cancel.graceful.cancelled() => Err(JobOutcome::Canceled),
            _ = tokio::time::sleep_until(deadline) => Err(JobOutcome::TimedOut),
        };
        sections.end("prepare_executor");
        if let Err(outcome) = prepared {
            match &outcome {
                JobOutcome::TimedOut => say_error(trace, &timeout_message(job.timeout)),
                JobOutcome::Canceled => say_error(trace, "job canceled"),
                _ => {}
            }
            return outcome;
        }
        let stops = |graceful: bool, limit: Duration| Stops {
            cancel,
            graceful,
            limit,
            grace: job.stop_grace,
        };
        let mut outcome = JobOutcome::Success;
        let before_script = [
            HelperStageKind::GetSources,
            HelperStageKind::RestoreCache,
            HelperStageKind::DownloadArtifacts,
        ];
        let stages = HelperStages {
            job,
            config,
            resources,
            trace,
            sections: &sections,
        };
        // The script's container is made ready while the helper works: most of a
        // container's start-up cost is then off the job's path. If a helper stage fails,
        // it is removed with the rest.
        let main = stage_script(job, &job.script, None);
        let helper_stops = stops(true, left());
        // Boxed here and below: the job's future is large, and a debug build polls it on
        // a small stack.
        let (failed, build) = tokio::join!(
            Box::pin(self.helper_stages(&stages, &before_script, &helper_stops)),
            Box::pin(self.prepare_user_stage(job, config, resources, "build", main)),
        );
        if let Some(failed) = failed {
            outcome = failed;
        }
        // The helper container for a successful script's caches and artifacts is made ready
        // while the script runs (if the script fails, it is removed unused).
        let on_success = job
            .helper
            .as_ref()
            .map(|plan| {
                helper_runs(
                    plan,
                    &[
                        HelperStageKind::ArchiveCache,
                        HelperStageKind::UploadArtifactsOnSuccess,
                    ],
                )
            })
            .unwrap_or_default();
        let mut ahead = None;
        if outcome == JobOutcome::Success {
            sections.start(
                "step_script",
                "Executing \"step_script\" stage of the job script",
            );
            // The message names the timeout that binds: the step's, or the job's.
            let (limit, named) = match job.script_timeout {
                Some(step) if step < left() => (step, step),
                _ => (left(), job.timeout),
            };
            let prepare_ahead = async {
                match (job.helper.as_ref(), on_success.first()) {
                    (Some(plan), Some(run)) => Some(self.prepare_helper(&stages, plan, run).await),
                    _ => None,
                }
            };
            let (name, script_stops) = (resources.container("build"), stops(true, limit));
            (outcome, ahead) = tokio::join!(
                Box::pin(self.container_stage(
                    &name,
                    std::future::ready(build),
                    None,
                    trace,
                    &script_stops
                )),
                Box::pin(prepare_ahead),
            );
            if outcome == JobOutcome::TimedOut {
                say_error(trace, &timeout_message(named));
            }
            sections.end("step_script");
        }
        let hard = cancel.hard.is_cancelled();
        if !job.after_script.is_empty() && !hard && !matches!(outcome, JobOutcome::SystemFailure(_))
        {
            sections.start("after_script", "Running after_script");
            let after = stage_script(job, &job.after_script, Some(outcome.job_status()));
            let limit = job.after_script_timeout;
            match self
                .user_stage(
                    job,
                    config,
                    resources,
                    "after-script",
                    after,
                    trace,
                    &stops(false, limit),
                )
                .await
            {
                JobOutcome::Success => {}
                JobOutcome::TimedOut => say_warning(
                    trace,
                    &format!("after_script timed out after {}", human(limit)),
                ),
                other => say_warning(trace, &format!("after_script failed: {other:?}")),
            }
            sections.end("after_script");
        }
        let succeeded = outcome == JobOutcome::Success;
        if !cancel.hard.is_cancelled() && !matches!(outcome, JobOutcome::SystemFailure(_)) {
            // These run past a graceful cancel and the job's timeout, like after_script.
            let limit = left().max(job.after_script_timeout);
            let failed = match ahead {
                Some(prepared) if succeeded => {
                    let mut runs = on_success.iter();
                    let mut failed = match runs.next() {
                        Some(run) => {
                            let prepared = std::future::ready(prepared);
                            self.run_helper(&stages, run, prepared, &stops(false, limit))
                                .await
                        }
                        None => None,
                    };
                    if failed.is_none() {
                        let rest: Vec<HelperStageKind> = runs
                            .flat_map(|run| run.stages.iter().map(|s| s.kind))
                            .collect();
                        failed = self
                            .helper_stages(&stages, &rest, &stops(false, limit))
                            .await;
                    }
                    failed
                }
                _ => {
                    let kinds = if succeeded {
                        [
                            HelperStageKind::ArchiveCache,
                            HelperStageKind::UploadArtifactsOnSuccess,
                        ]
                    } else {
                        [
                            HelperStageKind::ArchiveCacheOnFailure,
                            HelperStageKind::UploadArtifactsOnFailure,
                        ]
                    };
                    self.helper_stages(&stages, &kinds, &stops(false, limit))
                        .await
                }
            };
            if let Some(failed) = failed
                && succeeded
            {
                outcome = failed;
            }
        }
        if job.variables.iter().any(|v| v.file) && !cancel.hard.is_cancelled() {
            sections.start(
                "cleanup_file_variables",
                "Cleaning up project directory and file based variables",
            );
            let cleanup =
                script::cleanup_script(&job.project_dir, &job.variables, job.remove_project_dir);
            let result = self
                .user_stage(
                    job,
                    config,
                    resources,
                    "cleanup",
                    cleanup,
                    trace,
                    &stops(false, Duration::from_secs(60)),
                )
                .await;
            if result != JobOutcome::Success {
                say_warning(trace, &format!("cleanup_file_variables failed: {result:?}"));
            }
            sections.end("cleanup_file_variables");
        }
        outcome
    }

    /// Images, network and services: everything before the first stage.
    async fn prepare(
        &self,
        job: &JobSpec,
        config: &DockerConfig,
        resources: &JobResources,
        trace: &TraceSink,
    ) -> Result<(), JobOutcome> {
        let policies =
            pull_policies(&job.pull_policy, config).map_err(JobOutcome::ImagePullFailure)?;
        self.ensure_image(&job.image, &policies, &job.registry_credentials, trace)
            .await
            .map_err(JobOutcome::ImagePullFailure)?;
        if resources.uses_network {
            let request = NetworkCreateRequest {
                name: resources.network.clone(),
                driver: Some("bridge".into()),
                labels: Some(resources.labels()),
                ..Default::default()
            };
            match self.docker.create_network(request).await {
                Ok(_) => {}
                // The name is unique to this job: if it exists, a retried request made it.
                Err(e) if e.to_string().contains("already") => {}
                Err(e) => {
                    return Err(JobOutcome::SystemFailure(format!(
                        "create network {}: {e}",
                        resources.network
                    )));
                }
            }
            resources
                .network_created
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        // The named volumes exist before any container names them: Podman's implicit
        // creation of a volume that two containers name at once (the runner's cache volume,
        // for two jobs on one instance over their own connections) fails one of them.
        let build_volume = VolumeCreateRequest {
            name: Some(resources.volume.clone()),
            labels: Some(resources.labels()),
            ..Default::default()
        };
        self.ensure_volume(build_volume).await?;
        if let Some(cache) = &job.cache_volume {
            let cache_volume = VolumeCreateRequest {
                name: Some(cache.clone()),
                ..Default::default()
            };
            self.ensure_volume(cache_volume).await?;
        }
        self.start_services(job, config, resources, trace).await
    }

    /// Creates a named volume unless it exists.
    async fn ensure_volume(&self, request: VolumeCreateRequest) -> Result<(), JobOutcome> {
        let name = request.name.clone().unwrap_or_default();
        match self.docker.create_volume(request).await {
            Ok(_) => Ok(()),
            // Shared (the runner's cache volume), or made by a retried request.
            Err(e) if e.to_string().contains("already exists") => Ok(()),
            Err(e) => Err(JobOutcome::SystemFailure(format!(
                "create volume {name}: {e}"
            ))),
        }
    }

    /// Starts every service on the job's network, then waits for their TCP ports.
    async fn start_services(
        &self,
        job: &JobSpec,
        config: &DockerConfig,
        resources: &JobResources,
        trace: &TraceSink,
    ) -> Result<(), JobOutcome> {
        let mut targets = Vec::new();
        let mut started = Vec::new();
        for (index, service) in job.services.iter().enumerate() {
            let aliases = service.all_aliases();
            say(
                trace,
                &format!(
                    "Starting service {} with aliases {} ...",
                    service.image,
                    aliases.join(", ")
                ),
            );
            let policies = pull_policies(&service.pull_policy, config)
                .map_err(JobOutcome::ImagePullFailure)?;
            self.ensure_image(&service.image, &policies, &job.registry_credentials, trace)
                .await
                .map_err(JobOutcome::ImagePullFailure)?;
            let mut ports: Vec<u16> = service.ports.clone();
            if let Ok(image) = self.docker.inspect_image(&service.image).await {
                ports.extend(
                    image
                        .config
                        .and_then(|c| c.exposed_ports)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|p| services::tcp_port(p)),
                );
            }
            ports.sort_unstable();
            ports.dedup();
            let name = resources.container(&format!("service-{index}"));
            let body = service_body(service, config, resources, &aliases);
            resources.record(&name);
            if let Err(e) = self.create(&name, body).await {
                return Err(match classify_create_error(&service.image, e) {
                    JobOutcome::SystemFailure(reason) => {
                        JobOutcome::ServiceFailure(format!("service {}: {reason}", service.image))
                    }
                    other => other,
                });
            }
            if let Err(e) = self.docker.start_container(&name, None).await {
                self.service_logs(&name, &service.image, trace).await;
                return Err(JobOutcome::ServiceFailure(format!(
                    "service {} did not start: {e}",
                    service.image
                )));
            }
            let host = aliases.first().cloned().unwrap_or_else(|| name.clone());
            targets.extend(ports.iter().map(|port| (host.clone(), *port)));
            started.push((name, service.image.clone()));
        }
        if targets.is_empty() || config.wait_for_services_timeout < 0 {
            return Ok(());
        }
        let timeout = config.wait_for_services_timeout as u64;
        say(
            trace,
            &format!("Waiting for services to be up and running (timeout {timeout} seconds)..."),
        );
        let probe = services::probe_script(&targets, timeout);
        let collected = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink: TraceSink = {
            let collected = collected.clone();
            Arc::new(move |bytes: &[u8]| {
                if let Ok(mut c) = collected.lock() {
                    c.extend_from_slice(bytes);
                }
            })
        };
        let never = Cancellation::new();
        let stops = Stops {
            cancel: &never,
            graceful: false,
            limit: Duration::from_secs(timeout + 30),
            grace: Duration::ZERO,
        };
        let result = self
            .user_stage(
                job,
                config,
                resources,
                "wait-for-services",
                probe,
                &sink,
                &stops,
            )
            .await;
        let probe_output =
            String::from_utf8_lossy(&collected.lock().map(|c| c.clone()).unwrap_or_default())
                .trim()
                .to_string();
        match result {
            JobOutcome::Success => Ok(()),
            JobOutcome::ScriptFailure { exit_code: 4 } => {
                say_warning(
                    trace,
                    &format!(
                        "services were not waited for: {probe_output}; install nc or bash in the job image"
                    ),
                );
                Ok(())
            }
            other => {
                for (name, image) in &started {
                    self.service_logs(name, image, trace).await;
                }
                let why = match other {
                    JobOutcome::ScriptFailure { .. } | JobOutcome::TimedOut => format!(
                        "services did not become ready within wait_for_services_timeout ({timeout}s): {probe_output}"
                    ),
                    other => format!("waiting for services failed: {other:?}"),
                };
                say_error(trace, &why);
                Err(JobOutcome::ServiceFailure(why))
            }
        }
    }

    /// Writes a service's logs into the trace, as gitlab-runner does for unhealthy services.
    async fn service_logs(&self, name: &str, image: &str, trace: &TraceSink) {
        say_warning(
            trace,
            &format!("Service {image} probably didn't start properly. Its logs:"),
        );
        let options = LogsOptions {
            follow: false,
            stdout: true,
            stderr: true,
            tail: "200".into(),
            ..Default::default()
        };
        let mut stream = self.docker.logs(name, Some(options));
        let read = async {
            while let Some(Ok(item)) = stream.next().await {
                if let LogOutput::StdOut { message }
                | LogOutput::StdErr { message }
                | LogOutput::Console { message } = item
                {
                    trace(&message);
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
        trace(b"\n");
    }

    /// The helper stages of `kinds` the plan has work for, in order (see [`helper_runs`]).
    /// `Some(outcome)` when one fails the job; the stages after it do not run.
    async fn helper_stages(
        &self,
        stages: &HelperStages<'_>,
        kinds: &[HelperStageKind],
        stops: &Stops<'_>,
    ) -> Option<JobOutcome> {
        let plan = stages.job.helper.as_ref()?;
        for run in helper_runs(plan, kinds) {
            let prepared = self.prepare_helper(stages, plan, &run);
            if let Some(failed) = self.run_helper(stages, &run, prepared, stops).await {
                return Some(failed);
            }
        }
        None
    }

    /// The helper container of `run`, prepared (see [`Executor::prepare_container`]).
    async fn prepare_helper(
        &self,
        stages: &HelperStages<'_>,
        plan: &HelperPlan,
        run: &HelperRun<'_>,
    ) -> Result<Prepared, JobOutcome> {
        let HelperStages {
            job,
            config,
            resources,
            trace,
            ..
        } = *stages;
        self.ensure_helper_image(plan, config, resources, trace)
            .await
            .map_err(JobOutcome::SystemFailure)?;
        let argv = match run.batch {
            Some(batch) => (batch.argv)(&run.stages.iter().map(|s| s.kind).collect::<Vec<_>>()),
            None => run.stages[0].argv.clone(),
        };
        let name = run.container(resources);
        // podfleet's own helper image has a shell to report the exit status with.
        let cmd = if plan.archive.is_some() {
            exit_marker::wrap(&argv)
        } else {
            argv
        };
        let body = ContainerCreateBody {
            image: Some(plan.image.clone()),
            cmd: Some(cmd),
            labels: Some(resources.labels()),
            working_dir: Some(job.builds_dir.clone()),
            host_config: Some(HostConfig {
                binds: Some(resources.binds(job)),
                // The helper talks to the coordinator, git and cache servers the instance
                // reaches.
                network_mode: Some("host".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let job_file = (
            plan.job_file_path.trim_start_matches('/'),
            &plan.job_file[..],
            0o600,
        );
        resources.record(&name);
        self.prepare_container(&name, body, job_file).await
    }

    /// Runs the helper container of `run`, each stage in its own trace section.
    /// `Some(outcome)` when a stage fails the job.
    async fn run_helper(
        &self,
        stages: &HelperStages<'_>,
        run: &HelperRun<'_>,
        prepared: impl std::future::Future<Output = Result<Prepared, JobOutcome>>,
        stops: &Stops<'_>,
    ) -> Option<JobOutcome> {
        let HelperStages {
            resources,
            trace,
            sections,
            ..
        } = *stages;
        let planned = &run.stages;
        let first = planned.first()?;
        sections.start(first.kind.section(), first.kind.header());
        // Which stage is running: a stage end line moves on to the next.
        let current = std::sync::atomic::AtomicUsize::new(0);
        let stage_ends = run.batch.map(|batch| StageEnds {
            marker: batch.stage_end,
            on_end: Box::new(|code: i32| {
                let at = current.load(std::sync::atomic::Ordering::SeqCst);
                let Some(ended) = planned.get(at) else {
                    return;
                };
                if code != 0 {
                    say_warning(
                        trace,
                        &format!("{} failed with exit code {code}", ended.kind.section()),
                    );
                }
                sections.end(ended.kind.section());
                if let Some(next) = planned.get(at + 1) {
                    current.store(at + 1, std::sync::atomic::Ordering::SeqCst);
                    sections.start(next.kind.section(), next.kind.header());
                }
            }),
        });
        let outcome = self
            .container_stage(
                &run.container(resources),
                prepared,
                stage_ends,
                trace,
                stops,
            )
            .await;
        let last = planned[current.load(std::sync::atomic::Ordering::SeqCst)];
        sections.end(last.kind.section());
        match outcome {
            JobOutcome::Success => None,
            JobOutcome::ScriptFailure { exit_code } if !last.kind.failure_fails_job() => {
                say_warning(
                    trace,
                    &format!("{} failed with exit code {exit_code}", last.kind.section()),
                );
                None
            }
            other => Some(other),
        }
    }

    fn with(docker: Docker) -> Self {
        Self {
            docker,
            helper_seen: Arc::default(),
            creating: Arc::default(),
        }
    }

    /// Creates a container, one at a time per instance. Podman 4.3 locks a new container's
    /// named volumes in map order (`finalizeMounts` in its specgen), so two containers
    /// created side by side that share two volumes (a job's build and cache volumes, as its
    /// helper and script containers do) can each hold the lock the other waits for: both
    /// creations, and every later call that needs those volumes, then hang for good (seen
    /// in 3 of 17 runs of the pipeline benchmark's 4-job pipeline before this lock, none in
    /// 43 after). Creation is tens of milliseconds; what follows it (the file upload, the
    /// attach that initialises the container) still runs side by side.
    async fn create(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<(), bollard::errors::Error> {
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let _one_at_a_time = self.creating.lock().await;
        self.docker.create_container(Some(options), body).await?;
        Ok(())
    }

    /// The helper image on the instance, checked (and pulled or loaded) once per job, and
    /// podfleet's own once per instance connection.
    async fn ensure_helper_image(
        &self,
        plan: &HelperPlan,
        config: &DockerConfig,
        resources: &JobResources,
        trace: &TraceSink,
    ) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        if resources.helper_ready.load(Ordering::SeqCst) {
            return Ok(());
        }
        let seen = || {
            self.helper_seen
                .lock()
                .map(|seen| seen.as_deref() == Some(plan.image.as_str()))
                .unwrap_or(false)
        };
        let result = match plan.archive {
            None => match pull_policies(&[], config) {
                Ok(policies) => self.ensure_image(&plan.image, &policies, &[], trace).await,
                Err(reason) => Err(reason),
            },
            Some(_) if seen() || self.docker.inspect_image(&plan.image).await.is_ok() => Ok(()),
            Some(archive) => {
                say(trace, &format!("Loading helper image {} ...", plan.image));
                self.load_helper_image(&plan.image, archive).await
            }
        };
        if result.is_ok() {
            resources.helper_ready.store(true, Ordering::SeqCst);
            if plan.archive.is_some()
                && let Ok(mut seen) = self.helper_seen.lock()
            {
                *seen = Some(plan.image.clone());
            }
        }
        result
    }

    /// Loads podfleet's own helper image `image` from `archive` unless the instance has it
    /// (an instance's readiness check does this, so its first job does not wait for it).
    pub async fn preload_helper_image(
        &self,
        image: &str,
        archive: HelperArchive,
    ) -> Result<(), String> {
        if self.docker.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        self.load_helper_image(image, archive).await
    }

    async fn load_helper_image(&self, image: &str, archive: HelperArchive) -> Result<(), String> {
        let bytes = archive()
            .map_err(|e| format!("podfleet's helper image archive could not be built: {e}"))?;
        let mut stream = self.docker.import_image(
            ImportImageOptions::default(),
            bollard::body_full(bytes.into()),
            None,
        );
        while let Some(progress) = stream.next().await {
            progress.map_err(|e| format!("load helper image {image}: {e}"))?;
        }
        self.docker
            .inspect_image(image)
            .await
            .map(|_| ())
            .map_err(|e| format!("helper image {image} missing after loading it: {e}"))
    }

    /// A script stage in the job image (step_script, after_script, cleanup, service probe).
    #[allow(clippy::too_many_arguments)]
    async fn user_stage(
        &self,
        job: &JobSpec,
        config: &DockerConfig,
        resources: &JobResources,
        role: &str,
        script: String,
        trace: &TraceSink,
        stops: &Stops<'_>,
    ) -> JobOutcome {
        let prepared = self.prepare_user_stage(job, config, resources, role, script);
        let name = resources.container(role);
        self.container_stage(&name, prepared, None, trace, stops)
            .await
    }

    /// The container of a script stage, prepared (see [`Executor::prepare_container`]).
    async fn prepare_user_stage(
        &self,
        job: &JobSpec,
        config: &DockerConfig,
        resources: &JobResources,
        role: &str,
        script: String,
    ) -> Result<Prepared, JobOutcome> {
        let name = resources.container(role);
        let script_path = format!("/podfleet-{role}.sh");
        let body = container_body(job, config, resources, &script_path);
        // The script (with every variable value) goes in as a file, never on a command
        // line where other users of the host could read it in /proc, and with no size cap.
        let script = format!("{}{script}", exit_marker::SHELL_TRAP);
        let file = (&script_path[1..], script.as_bytes(), 0o700);
        resources.record(&name);
        self.prepare_container(&name, body, file).await
    }

    /// Runs the container `prepared` makes ready (see [`Executor::prepare_container`]): starts
    /// it and follows it to its exit, a stop or its time limit.
    async fn container_stage(
        &self,
        name: &str,
        prepared: impl std::future::Future<Output = Result<Prepared, JobOutcome>>,
        stage_ends: Option<StageEnds<'_>>,
        trace: &TraceSink,
        stops: &Stops<'_>,
    ) -> JobOutcome {
        let mut run = Box::pin(async {
            match prepared.await {
                Ok(prepared) => self.start_prepared(prepared, stage_ends, trace).await,
                Err(outcome) => outcome,
            }
        });
        let graceful = async {
            if stops.graceful {
                stops.cancel.graceful.cancelled().await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            outcome = &mut run => outcome,
            _ = tokio::time::sleep(stops.limit) => {
                let _ = self.docker.kill_container(name, None).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut run).await;
                JobOutcome::TimedOut
            }
            _ = stops.cancel.hard.cancelled() => {
                let _ = self.docker.kill_container(name, None).await;
                JobOutcome::Canceled
            }
            _ = graceful => {
                say_error(trace, "job canceled: stopping the script (SIGTERM, then SIGKILL)");
                let grace = i32::try_from(stops.grace.as_secs()).unwrap_or(i32::MAX);
                let stop = StopContainerOptions { t: Some(grace), ..Default::default() };
                let _ = self.docker.stop_container(name, Some(stop)).await;
                // The script's last output still reaches the trace.
                let _ = tokio::time::timeout(Duration::from_secs(10), &mut run).await;
                JobOutcome::Canceled
            }
        }
    }

    async fn ensure_image(
        &self,
        image: &str,
        policies: &[PullPolicy],
        credentials: &[RegistryCredential],
        trace: &TraceSink,
    ) -> Result<(), String> {
        let present = self.docker.inspect_image(image).await.is_ok();
        let mut last_error = String::new();
        for policy in policies {
            match policy {
                PullPolicy::Never if present => return Ok(()),
                PullPolicy::Never => {
                    last_error = format!(
                        "image {image} is not on the instance and pull_policy is \"never\""
                    );
                }
                PullPolicy::IfNotPresent if present => {
                    say(trace, &format!("Using locally found image version {image}"));
                    return Ok(());
                }
                PullPolicy::IfNotPresent | PullPolicy::Always => {
                    let credential = auth::credential_for(credentials, image);
                    let with = credential
                        .map(|c| {
                            format!(" with credentials for {} (user {})", c.registry, c.username)
                        })
                        .unwrap_or_default();
                    say(trace, &format!("Pulling docker image {image}{with} ..."));
                    match self.pull(image, credential).await {
                        Ok(()) => return Ok(()),
                        Err(e) => {
                            last_error =
                                format!("failed to pull image {image}: {}", pull_message(&e));
                        }
                    }
                }
            }
        }
        Err(last_error)
    }

    async fn pull(
        &self,
        image: &str,
        credential: Option<&RegistryCredential>,
    ) -> Result<(), bollard::errors::Error> {
        let options = CreateImageOptions {
            from_image: Some(image.to_string()),
            ..Default::default()
        };
        let credentials = credential.map(RegistryCredential::docker);
        let mut stream = self.docker.create_image(Some(options), None, credentials);
        while let Some(progress) = stream.next().await {
            progress?;
        }
        Ok(())
    }

    /// A script in the job image, stopped by nothing but its exit (within after_script's
    /// 5 minutes at most): for a job resumed after a manager restart.
    pub(crate) async fn run_container(
        &self,
        job: &JobSpec,
        config: &DockerConfig,
        resources: &JobResources,
        role: &str,
        script: String,
        trace: &TraceSink,
    ) -> JobOutcome {
        let never = Cancellation::new();
        let stops = Stops {
            cancel: &never,
            graceful: false,
            limit: job.after_script_timeout,
            grace: Duration::ZERO,
        };
        self.user_stage(job, config, resources, role, script, trace, &stops)
            .await
    }

    /// Creates a stage container, puts its file in and attaches to it: ready to start. Podman
    /// initialises the container (mounts, network, runtime) when attached, so this is most
    /// of a container's start-up cost, and it can run while an earlier stage still does.
    async fn prepare_container(
        &self,
        name: &str,
        body: ContainerCreateBody,
        file: (&str, &[u8], u32),
    ) -> Result<Prepared, JobOutcome> {
        let image = body.image.clone().unwrap_or_default();
        if let Err(e) = self.create(name, body).await {
            return Err(classify_create_error(&image, e));
        }
        let (path, contents, mode) = file;
        let archive = single_file_tar(path, contents, mode);
        let upload = UploadToContainerOptions {
            path: "/".into(),
            ..Default::default()
        };
        let upload =
            self.docker
                .upload_to_container(name, Some(upload), bollard::body_full(archive.into()));
        // Attached before the start, as gitlab-runner does: the attach stream carries all the
        // output and ends when the container exits, so a short script is not held up by the
        // engine polling log files and exit states (Podman's log follow and wait poll every
        // 250 ms). An engine that refuses the attach gets its log followed instead. The file
        // goes in meanwhile: both only need the container created.
        let attach = AttachContainerOptions {
            stdout: true,
            stderr: true,
            stream: true,
            ..Default::default()
        };
        let attach = self.docker.attach_container(name, Some(attach));
        let (uploaded, attached) = tokio::join!(upload, attach);
        if let Err(e) = uploaded {
            return Err(JobOutcome::SystemFailure(format!(
                "copy the stage's file into {name}: {e}"
            )));
        }
        Ok(Prepared {
            name: name.to_owned(),
            attached: attached.map(|attached| attached.output).map_err(|e| {
                tracing::debug!(container = name, error = %e, "attach refused: following the log");
            }),
        })
    }

    /// Starts a prepared container and follows it to its exit.
    async fn start_prepared(
        &self,
        prepared: Prepared,
        stage_ends: Option<StageEnds<'_>>,
        trace: &TraceSink,
    ) -> JobOutcome {
        let name = &prepared.name;
        if let Err(e) = self.docker.start_container(name, None).await {
            return JobOutcome::SystemFailure(format!("start container {name}: {e}"));
        }
        let (stream, attached): (OutputStream, bool) = match prepared.attached {
            Ok(output) => (output, true),
            Err(()) => {
                let logs = LogsOptions {
                    follow: true,
                    stdout: true,
                    stderr: true,
                    ..Default::default()
                };
                (Box::pin(self.docker.logs(name, Some(logs))), false)
            }
        };
        self.follow_to_end(name, stream, attached, stage_ends, trace)
            .await
    }

    /// Follows a started container's output (`stream`: its attach stream, or its followed
    /// log) into `trace` until it has exited and its output is drained, without the stage's
    /// exit status line, and maps its exit to an outcome.
    pub(crate) async fn follow_to_end(
        &self,
        name: &str,
        mut stream: OutputStream,
        attached: bool,
        mut stage_ends: Option<StageEnds<'_>>,
        trace: &TraceSink,
    ) -> JobOutcome {
        let mut wait = self
            .docker
            .wait_container(name, None::<WaitContainerOptions>);
        // The end of the job is the container's exit, not the end of the log stream:
        // Podman's follow stream can stay open after a fast exit, so once the container
        // has exited the log is drained for a short grace period only.
        let mut exit = None;
        let mut marker = match &stage_ends {
            Some(ends) => exit_marker::ExitMarker::with_stage_ends(ends.marker),
            None => exit_marker::ExitMarker::default(),
        };
        let mut drain_until: Option<tokio::time::Instant> = None;
        let mut drain_cap = tokio::time::Instant::now();
        loop {
            let grace = async {
                match drain_until {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(output)) => {
                        for piece in marker.pieces(output) {
                            match piece {
                                Piece::Shown(shown) if !shown.is_empty() => trace(&shown),
                                Piece::Shown(_) => {}
                                Piece::StageEnd(code) => {
                                    if let Some(ends) = stage_ends.as_mut() {
                                        (ends.on_end)(code);
                                    }
                                }
                            }
                        }
                        // After the exit, keep draining while output still flows.
                        if let Some(deadline) = drain_until.as_mut() {
                            *deadline = (tokio::time::Instant::now() + LOG_DRAIN_IDLE).min(drain_cap);
                        }
                    }
                    Some(Err(e)) => {
                        if exit.is_none() {
                            return JobOutcome::SystemFailure(format!("logs of {name}: {e}"));
                        }
                        break;
                    }
                    None => break,
                },
                result = wait.next(), if exit.is_none() => {
                    exit = Some(result);
                    let now = tokio::time::Instant::now();
                    drain_cap = now + LOG_DRAIN_CAP;
                    drain_until = Some(now + LOG_DRAIN_IDLE);
                }
                _ = grace => break,
            }
        }
        let held = marker.finish();
        if !held.is_empty() {
            trace(&held);
        }
        let result = match (exit, marker.code()) {
            (Some(result), _) => result,
            // The stage said how it ended, and its output has ended: no need to wait for the
            // engine's exit cleanup.
            (None, Some(0)) => return JobOutcome::Success,
            (None, Some(code)) => {
                return JobOutcome::ScriptFailure {
                    exit_code: i64::from(code),
                };
            }
            // The attach stream ended with the container: a new wait answers at once, where
            // the one in flight would answer at its next poll.
            (None, None) if attached => {
                drop(wait);
                self.docker
                    .wait_container(name, None::<WaitContainerOptions>)
                    .next()
                    .await
            }
            (None, None) => wait.next().await,
        };
        match result {
            Some(Ok(response)) if response.status_code == 0 => JobOutcome::Success,
            Some(Ok(response)) => JobOutcome::ScriptFailure {
                exit_code: response.status_code,
            },
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. }))
                if code != 0 =>
            {
                JobOutcome::ScriptFailure { exit_code: code }
            }
            Some(Err(e)) => JobOutcome::SystemFailure(format!("wait for {name}: {e}")),
            None => JobOutcome::SystemFailure(format!("wait for {name}: no answer")),
        }
    }
}

/// The network mode of a job container without services (and no `network_mode`).
const OWN_NETWORK_STACK: &str = "slirp4netns";

/// What a job left on its instance (containers, build volume, network) until removed.
pub struct Leftovers(JobResources);

impl Leftovers {
    /// Removes it all; failures are logged, never the job's.
    pub async fn remove(self, executor: &Executor) {
        self.0.remove(&executor.docker).await;
    }
}

/// A stage container created, with its file, and attached: ready to start.
pub(crate) struct Prepared {
    name: String,
    /// The attach stream; `Err` when the engine refused the attach (its log is followed).
    attached: Result<OutputStream, ()>,
}

/// The helper containers for the stages of `kinds` the plan has work for, in order: one
/// for all of them when the helper can run several in a row, else one each.
fn helper_runs<'p>(plan: &'p HelperPlan, kinds: &[HelperStageKind]) -> Vec<HelperRun<'p>> {
    let planned: Vec<&HelperStage> = kinds
        .iter()
        .filter_map(|kind| plan.stages.iter().find(|s| s.kind == *kind))
        .collect();
    match plan.batch {
        Some(batch) if planned.len() > 1 => vec![HelperRun {
            stages: planned,
            batch: Some(batch),
        }],
        _ => planned
            .into_iter()
            .map(|stage| HelperRun {
                stages: vec![stage],
                batch: None,
            })
            .collect(),
    }
}

/// One helper container: its stages (several only with `batch`).
struct HelperRun<'p> {
    stages: Vec<&'p HelperStage>,
    batch: Option<HelperBatch>,
}

impl HelperRun<'_> {
    /// The container's name, after its first stage.
    fn container(&self, resources: &JobResources) -> String {
        resources.container(&self.stages[0].kind.section().replace('_', "-"))
    }
}

/// What every helper stage of a job needs.
#[derive(Clone, Copy)]
struct HelperStages<'a> {
    job: &'a JobSpec,
    config: &'a DockerConfig,
    resources: &'a JobResources,
    trace: &'a TraceSink,
    sections: &'a Sections,
}

/// Several helper stages in one container: the line that ends each but the last (see
/// [`HelperBatch`]), and what to do at each end.
pub(crate) struct StageEnds<'a> {
    marker: &'static str,
    on_end: Box<dyn FnMut(i32) + Send + 'a>,
}

/// A container's output as the engine streams it (attach or log follow).
pub(crate) type OutputStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
>;

/// After a container exits, its log is drained until it is quiet this long...
const LOG_DRAIN_IDLE: Duration = Duration::from_millis(500);
/// ...and for this long at most.
const LOG_DRAIN_CAP: Duration = Duration::from_secs(5);

fn classify_create_error(image: &str, error: bollard::errors::Error) -> JobOutcome {
    let text = error.to_string();
    if text.contains("image not known") || text.contains("No such image") {
        JobOutcome::ImagePullFailure(format!(
            "image {image} is not available on the instance: {text}"
        ))
    } else {
        JobOutcome::SystemFailure(format!("create container: {text}"))
    }
}

/// The registry's own message from a failed pull (bollard wraps it in its error type).
fn pull_message(error: &bollard::errors::Error) -> String {
    match error {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        bollard::errors::Error::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

/// The pull policies of an image: the job's (each one must be allowed by
/// `allowed_pull_policies`, or the runner's `pull_policy` when that is unset), else the
/// runner's.
pub fn pull_policies(job: &[String], config: &DockerConfig) -> Result<Vec<PullPolicy>, String> {
    if job.is_empty() {
        return Ok(config.effective_pull_policies());
    }
    let allowed = config.effective_allowed_pull_policies();
    let names = |policies: &[PullPolicy]| {
        policies
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut policies = Vec::new();
    for text in job {
        let policy: PullPolicy = text.parse().map_err(|_| {
            format!("pull_policy {text:?} of the job is not one of always, if-not-present, never")
        })?;
        policies.push(policy);
    }
    if policies.iter().any(|p| !allowed.contains(p)) {
        return Err(format!(
            "pull_policy ([{}]) defined in the job is not one of the allowed_pull_policies ([{}]) of this runner",
            job.join(" "),
            names(&allowed)
        ));
    }
    Ok(policies)
}

fn stage_script(job: &JobSpec, commands: &[String], job_status: Option<&str>) -> String {
    let mut variables = job.variables.clone();
    if let Some(status) = job_status {
        variables.retain(|v| v.key != "CI_JOB_STATUS");
        variables.push(Variable {
            key: "CI_JOB_STATUS".into(),
            value: status.into(),
            file: false,
        });
    }
    let options = script::ScriptOptions {
        command_sections: job.script_sections,
    };
    script::stage_script(&job.project_dir, &variables, commands, options)
}

fn container_body(
    job: &JobSpec,
    config: &DockerConfig,
    resources: &JobResources,
    script_path: &str,
) -> ContainerCreateBody {
    let mut binds = resources.binds(job);
    let mut anonymous = Vec::new();
    for volume in &config.volumes {
        if volume.contains(':') {
            binds.push(volume.clone());
        } else {
            anonymous.push(volume.clone());
        }
    }
    // A job with services gets its own network, where they answer by alias. Otherwise each
    // container gets its own user-mode network stack, rootless Podman's default, which the
    // Docker-compatible API swaps for its bridge: a container on the bridge costs about
    // twice as much to start and stop (CNI plugins and iptables run for each).
    let network_mode = if resources.uses_network {
        Some(resources.network.clone())
    } else {
        Some(
            config
                .network_mode
                .clone()
                .unwrap_or_else(|| OWN_NETWORK_STACK.to_owned()),
        )
    };
    let host_config = HostConfig {
        privileged: Some(config.privileged),
        // Podman-in-Podman needs its own cgroup namespace to mount cgroup2 inside.
        cgroupns_mode: config
            .privileged
            .then_some(HostConfigCgroupnsModeEnum::PRIVATE),
        binds: Some(binds),
        network_mode,
        cap_add: non_empty(&config.cap_add),
        cap_drop: non_empty(&config.cap_drop),
        security_opt: non_empty(&config.security_opt),
        dns: non_empty(&config.dns),
        dns_search: non_empty(&config.dns_search),
        extra_hosts: non_empty(&config.extra_hosts),
        shm_size: (config.shm_size > 0).then_some(config.shm_size),
        oom_kill_disable: config.oom_kill_disable.then_some(true),
        ..options::resources(config)
    };
    // `disable_entrypoint_overwrite` keeps the image's own entrypoint whatever the job asks.
    let entrypoint = job
        .entrypoint
        .clone()
        .filter(|e| !e.is_empty() && !config.disable_entrypoint_overwrite);
    ContainerCreateBody {
        image: Some(job.image.clone()),
        entrypoint,
        cmd: Some(shell_command(&job.shell, script_path)),
        working_dir: None,
        // The job's `image.docker.user` (checked against allowed_users) wins over the
        // runner's `user`, as in gitlab-runner.
        user: job.user.clone().or_else(|| config.user.clone()),
        labels: Some(resources.labels()),
        volumes: (!anonymous.is_empty()).then_some(anonymous),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// A service container: on the job's network under its aliases, privileged only where
/// `services_privileged` (or `privileged` when unset) allows.
fn service_body(
    service: &ServiceSpec,
    config: &DockerConfig,
    resources: &JobResources,
    aliases: &[String],
) -> ContainerCreateBody {
    let privileged = config.services_privileged.unwrap_or(config.privileged);
    let env: Vec<String> = service
        .variables
        .iter()
        .filter(|v| !v.key.is_empty() && !v.key.contains('='))
        .map(|v| format!("{}={}", v.key, v.value))
        .collect();
    let endpoint = EndpointSettings {
        aliases: Some(aliases.to_vec()),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(service.image.clone()),
        entrypoint: service.entrypoint.clone().filter(|e| !e.is_empty()),
        cmd: service.command.clone().filter(|c| !c.is_empty()),
        env: Some(env),
        labels: Some(resources.labels()),
        host_config: Some(HostConfig {
            privileged: Some(privileged),
            cgroupns_mode: privileged.then_some(HostConfigCgroupnsModeEnum::PRIVATE),
            network_mode: Some(resources.network.clone()),
            security_opt: non_empty(&config.services_security_opt),
            tmpfs: (!config.services_tmpfs.is_empty())
                .then(|| config.services_tmpfs.clone().into_iter().collect()),
            memory: config
                .service_memory
                .as_deref()
                .and_then(options::memory_bytes),
            nano_cpus: config.service_cpus.as_deref().and_then(options::nano_cpus),
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(resources.network.clone(), endpoint)])),
        }),
        ..Default::default()
    }
}

/// The container command running the script file at `path` (passed as an argument, so it
/// needs no quoting).
fn shell_command(shell: &str, path: &str) -> Vec<String> {
    if shell == "bash" {
        let detect =
            "if command -v bash >/dev/null 2>&1; then exec bash \"$1\"; fi; exec sh \"$1\"";
        vec![
            "sh".into(),
            "-c".into(),
            detect.into(),
            "sh".into(),
            path.into(),
        ]
    } else {
        vec!["sh".into(), path.into()]
    }
}

/// A ustar archive holding one regular file, for the Docker API's archive upload.
fn single_file_tar(name: &str, contents: &[u8], mode: u32) -> Vec<u8> {
    fn put(header: &mut [u8; 512], at: usize, value: &[u8]) {
        header[at..at + value.len()].copy_from_slice(value);
    }
    let mut header = [0u8; 512];
    put(&mut header, 0, &name.as_bytes()[..name.len().min(99)]);
    put(&mut header, 100, format!("{mode:07o}\0").as_bytes());
    put(&mut header, 108, b"0000000\0");
    put(&mut header, 116, b"0000000\0");
    put(
        &mut header,
        124,
        format!("{:011o}\0", contents.len()).as_bytes(),
    );
    put(&mut header, 136, b"00000000000\0");
    put(&mut header, 148, b"        ");
    header[156] = b'0';
    put(&mut header, 257, b"ustar\x0000");
    let checksum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    put(&mut header, 148, format!("{checksum:06o}\0 ").as_bytes());
    let mut archive = header.to_vec();
    archive.extend_from_slice(contents);
    archive.resize(archive.len().div_ceil(512) * 512 + 1024, 0);
    archive
}

fn non_empty(values: &[String]) -> Option<Vec<String>> {
    (!values.is_empty()).then(|| values.to_vec())
}

/// Names of everything a job creates on the instance, so it can all be removed.
struct JobResources {
    prefix: String,
    network: String,
    volume: String,
    job_id: u64,
    /// A per-build network: when the job has services (Podman has no container links).
    uses_network: bool,
    containers: std::sync::Mutex<Vec<String>>,
    network_created: std::sync::atomic::AtomicBool,
    /// The helper image was found (or pulled, or loaded) for this job.
    helper_ready: std::sync::atomic::AtomicBool,
}

impl JobResources {
    fn new(job: &JobSpec) -> Self {
        let prefix = format!("podfleet-job-{}", job.job_id);
        Self {
            network: format!("{prefix}-network"),
            volume: format!("{prefix}-builds"),
            prefix,
            job_id: job.job_id,
            uses_network: !job.services.is_empty(),
            containers: Default::default(),
            network_created: Default::default(),
            helper_ready: Default::default(),
        }
    }

    fn container(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// Recorded before creation, so a cancel that lands mid-create still removes it.
    fn record(&self, name: &str) {
        if let Ok(mut containers) = self.containers.lock()
            && !containers.iter().any(|c| c == name)
        {
            containers.push(name.to_string());
        }
    }

    /// The build volume at the builds dir, and the runner's cache volume at `/cache`.
    fn binds(&self, job: &JobSpec) -> Vec<String> {
        let mut binds = vec![format!("{}:{}", self.volume, job.builds_dir)];
        if let Some(cache) = &job.cache_volume {
            binds.push(format!("{cache}:/cache"));
        }
        binds
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            ("io.podfleet.job.id".to_string(), self.job_id.to_string()),
            (
                "com.gitlab.gitlab-runner.job.id".to_string(),
                self.job_id.to_string(),
            ),
        ])
    }

    async fn remove(&self, docker: &Docker) {
        let containers = self
            .containers
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        // All at once: Podman removes each under its own lock, and most of a removal is
        // waiting for the container's exit cleanup.
        futures_util::future::join_all(containers.iter().map(|name| async move {
            let options = RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            };
            if let Err(e) = docker.remove_container(name, Some(options)).await
                && !e.to_string().contains("no such container")
            {
                tracing::warn!(container = %name, error = %e, "removing job container failed");
            }
        }))
        .await;
        let volume = async {
            let _ = docker
                .remove_volume(&self.volume, Some(RemoveVolumeOptions { force: true }))
                .await;
        };
        let network = async {
            if self
                .network_created
                .load(std::sync::atomic::Ordering::SeqCst)
                && let Err(e) = docker.remove_network(&self.network).await
            {
                tracing::warn!(network = %self.network, error = %e, "removing job network failed");
            }
        };
        tokio::join!(volume, network);
    }
}

/// Stage sections in the trace (`features.trace_sections`); only the cyan header otherwise.
struct Sections {
    trace: TraceSink,
    enabled: bool,
}

impl Sections {
    fn start(&self, name: &str, header: &str) {
        if self.enabled {
            (self.trace)(format!("section_start:{}:{name}\r\x1b[0K", unix_now()).as_bytes());
        }
        say(&self.trace, header);
    }

    fn end(&self, name: &str) {
        if self.enabled {
            (self.trace)(format!("section_end:{}:{name}\r\x1b[0K", unix_now()).as_bytes());
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn timeout_message(limit: Duration) -> String {
    format!("execution took longer than {} seconds", limit.as_secs())
}

/// `5m0s`, `1h0m0s`, `30s`, as Go prints durations.
fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    match (secs / 3600, secs % 3600 / 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

fn say(trace: &TraceSink, line: &str) {
    trace(format!("\x1b[0K\x1b[36;1m{line}\x1b[0;m\n").as_bytes());
}

fn say_warning(trace: &TraceSink, line: &str) {
    trace(format!("\x1b[0;33mWARNING: {line}\x1b[0;m\n").as_bytes());
}

fn say_error(trace: &TraceSink, line: &str) {
    trace(format!("\x1b[31;1mERROR: {line}\x1b[0;m\n").as_bytes());
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_pull_policies_must_be_allowed() {
        let mut config = DockerConfig {
            pull_policy: vec![PullPolicy::IfNotPresent],
            ..Default::default()
        };
        assert_eq!(
            pull_policies(&[], &config).unwrap(),
            vec![PullPolicy::IfNotPresent]
        );
        assert_eq!(
            pull_policies(&["if-not-present".into()], &config).unwrap(),
            vec![PullPolicy::IfNotPresent]
        );
        let error = pull_policies(&["always".into()], &config).unwrap_err();
        assert!(
            error.contains("pull_policy ([always])")
                && error.contains("allowed_pull_policies ([if-not-present])"),
            "{error}"
        );
        config.allowed_pull_policies = vec![PullPolicy::Always, PullPolicy::Never];
        assert_eq!(
            pull_policies(&["never".into(), "always".into()], &config).unwrap(),
            vec![PullPolicy::Never, PullPolicy::Always]
        );
        assert!(pull_policies(&["sometimes".into()], &config).is_err());
    }

    #[test]
    fn durations_as_go_prints_them() {
        assert_eq!(human(Duration::from_secs(300)), "5m0s");
        assert_eq!(human(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(human(Duration::from_secs(42)), "42s");
    }

    #[test]
    fn script_archive_unpacks_with_tar() {
        let dir = std::env::temp_dir().join(format!("podfleet-tar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let archive = dir.join("a.tar");
        let contents = "echo one\n".repeat(100);
        let tar = single_file_tar("podfleet-build.sh", contents.as_bytes(), 0o700);
        std::fs::write(&archive, tar).unwrap();
        let status = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        let unpacked = dir.join("podfleet-build.sh");
        assert_eq!(std::fs::read_to_string(&unpacked).unwrap(), contents);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&unpacked).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bash_runs_when_present_and_sh_otherwise() {
        let dir = std::env::temp_dir().join(format!("podfleet-shell-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script_file = dir.join("script.sh");
        std::fs::write(&script_file, "echo ${BASH_VERSION:+bash}; echo 'it''s'\n").unwrap();
        let script = script_file.to_string_lossy().into_owned();
        let run = |path: &str| {
            let command = shell_command("bash", &script);
            let output = std::process::Command::new(&command[0])
                .args(&command[1..])
                .env("PATH", path)
                .output()
                .unwrap();
            String::from_utf8(output.stdout).unwrap()
        };
        assert!(
            run("/usr/bin:/bin").contains("bash\n"),
            "bash not used when present"
        );
        let sh_only = std::env::temp_dir().join(format!("podfleet-sh-only-{}", std::process::id()));
        std::fs::create_dir_all(&sh_only).unwrap();
        let _ = std::os::unix::fs::symlink("/bin/sh", sh_only.join("sh"));
        let out = run(&sh_only.to_string_lossy());
        assert!(!out.contains("bash") && out.contains("its"), "{out}");
        assert_eq!(shell_command("sh", "/x.sh"), vec!["sh", "/x.sh"]);
    }
}
