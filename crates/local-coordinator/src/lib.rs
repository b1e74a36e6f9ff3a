//! The embedded coordinator: serves GitLab's runner API on 127.0.0.1 for one local pipeline,
//! so the manager runs `podfleet pipeline` jobs over exactly the HTTP path it uses with GitLab.
//!
//! [`pipeline`] parses `.gitlab-ci.yml` against a [`project::Project`];
//! [`LocalCoordinator::start`] serves it (runner API, artifacts, and the working tree's
//! snapshot as a git repository, see `sources.rs`) and returns a [`Handle`] to watch events,
//! cancel, and wait for the [`PipelineReport`]. The wire payloads come from
//! `podfleet_coordinator::model`; this crate never defines GitLab JSON.

mod http;
pub mod pipeline;
pub mod project;
mod report;
mod sources;
mod state;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, oneshot, watch};

pub use pipeline::{Pipeline, PipelineError, load_pipeline, parse_pipeline, parse_pipeline_with};
pub use project::Project;
pub use report::{JobReport, JobStatus, PipelineEvent, PipelineReport, PipelineStatus};
pub use state::Upcoming;

use http::SharedState;
use state::{CoordinatorState, Environment};

/// How many events a slow watcher may fall behind before it starts missing some.
const EVENT_CAPACITY: usize = 4096;

/// A runner the local coordinator accepts, as GitLab would have it registered.
#[derive(Clone, PartialEq, Eq)]
pub struct RunnerRegistration {
    pub token: String,
    pub description: String,
    pub tags: Vec<String>,
    pub run_untagged: bool,
}

impl fmt::Debug for RunnerRegistration {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("RunnerRegistration")
            .field("token", &"[REDACTED]")
            .field("description", &self.description)
            .field("tags", &self.tags)
            .field("run_untagged", &self.run_untagged)
            .finish()
    }
}

/// Settings of a local coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCoordinatorOptions {
    /// The repository the pipeline belongs to: names the project and gives the commit.
    pub project_dir: PathBuf,
    /// `runner_info.timeout` of every job (a job's `timeout:` can only lower it).
    pub job_timeout: Duration,
    /// Run `when: manual` jobs instead of leaving them in the `manual` state.
    pub run_manual: bool,
    /// Where artifacts and the source snapshot are kept; a temporary directory, removed
    /// with the handle, when `None`.
    pub state_dir: Option<PathBuf>,
    /// The repository at `project_dir` as the caller already inspected it (to load the
    /// pipeline); inspected again when `None`.
    pub project: Option<Project>,
}

impl LocalCoordinatorOptions {
    /// One-hour job timeout, like GitLab's default.
    pub fn new(project_dir: impl Into<PathBuf>) -> Self {
        LocalCoordinatorOptions {
            project_dir: project_dir.into(),
            job_timeout: Duration::from_secs(60 * 60),
            run_manual: false,
            state_dir: None,
            project: None,
        }
    }
}

/// Why a local coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalCoordinatorError {
    #[error("cannot read the listening address of the local coordinator: {source}")]
    Listener {
        #[source]
        source: std::io::Error,
    },
    #[error("runner {description:?}: {reason}")]
    InvalidRunner { description: String, reason: String },
    #[error("cannot prepare the state directory {path}: {source}")]
    StateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot snapshot the working tree for the jobs: {0}")]
    Sources(String),
}

/// The embedded coordinator.
pub struct LocalCoordinator;

impl LocalCoordinator {
    /// Serves `pipeline` on `listener` until the returned [`Handle`] is dropped.
    pub async fn start(
        listener: tokio::net::TcpListener,
        pipeline: Pipeline,
        runners: Vec<RunnerRegistration>,
        options: LocalCoordinatorOptions,
    ) -> Result<Handle, LocalCoordinatorError> {
        validate_runners(&runners)?;
        let address = listener
            .local_addr()
            .map_err(|source| LocalCoordinatorError::Listener { source })?;
        let url = format!("http://{address}");
        let (temporary, state_dir) = match &options.state_dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let temporary = tempfile::Builder::new()
                    .prefix("podfleet-pipeline-")
                    .tempdir()
                    .map_err(|source| LocalCoordinatorError::StateDir {
                        path: std::env::temp_dir().display().to_string(),
                        source,
                    })?;
                let path = temporary.path().to_owned();
                (Some(temporary), path)
            }
        };
        std::fs::create_dir_all(&state_dir).map_err(|source| LocalCoordinatorError::StateDir {
            path: state_dir.display().to_string(),
            source,
        })?;
        let project_dir = options.project_dir.clone();
        let inspected = options.project.clone();
        let prepared = tokio::task::spawn_blocking({
            let state_dir = state_dir.clone();
            move || {
                let project = inspected.unwrap_or_else(|| Project::inspect(&project_dir));
                let sources = sources::Sources::prepare(&project, &state_dir);
                (project, sources)
            }
        })
        .await
        .map_err(|error| LocalCoordinatorError::Sources(error.to_string()))?;
        let (project, sources) = prepared;
        let sources = sources.map_err(LocalCoordinatorError::Sources)?;
        let environment = Environment {
            server_url: url.clone(),
            project,
            job_timeout: options.job_timeout,
            run_manual: options.run_manual,
            artifacts_dir: state_dir.join("artifacts"),
            sources,
        };
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (report_sender, report) = watch::channel(None);
        let state: SharedState = Arc::new(Mutex::new(CoordinatorState::new(
            pipeline,
            runners,
            environment,
            events.clone(),
            report_sender,
        )));
        let (shutdown, shutdown_signal) = oneshot::channel::<()>();
        let router = http::router(Arc::clone(&state));
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    // Either a shutdown request or a dropped handle ends the server.
                    let _ = shutdown_signal.await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "local coordinator stopped serving");
            }
        });
        Ok(Handle {
            url,
            state,
            events,
            report,
            _shutdown: shutdown,
            _state_dir: temporary,
        })
    }
}

fn validate_runners(runners: &[RunnerRegistration]) -> Result<(), LocalCoordinatorError> {
    for (index, runner) in runners.iter().enumerate() {
        let invalid = |reason: &str| LocalCoordinatorError::InvalidRunner {
            description: runner.description.clone(),
            reason: reason.to_owned(),
        };
        if runner.token.is_empty() {
            return Err(invalid("the token is empty"));
        }
        if runners[..index]
            .iter()
            .any(|other| other.token == runner.token)
        {
            return Err(invalid("another runner has the same token"));
        }
        if runner.tags.is_empty() && !runner.run_untagged {
            tracing::warn!(
                runner = %runner.description,
                "runner has no tags and does not run untagged jobs, so it will never get a job"
            );
        }
    }
    Ok(())
}

/// A running local coordinator. Dropping it stops the server.
pub struct Handle {
    /// Base URL of the served API, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    state: SharedState,
    events: broadcast::Sender<PipelineEvent>,
    report: watch::Receiver<Option<PipelineReport>>,
    _shutdown: oneshot::Sender<()>,
    _state_dir: Option<tempfile::TempDir>,
}

impl Handle {
    /// Events from now on (a receiver that falls more than 4096 events behind skips some).
    pub fn events(&self) -> broadcast::Receiver<PipelineEvent> {
        self.events.subscribe()
    }

    /// Waits until every job has ended (or was skipped or canceled).
    pub async fn wait(&self) -> PipelineReport {
        let mut report = self.report.clone();
        let finished = report
            .wait_for(Option::is_some)
            .await
            .expect("the state holding the report sender lives as long as the handle");
        finished
            .clone()
            .expect("wait_for returned only once the report is set")
    }

    /// Per runner: how many of its jobs will start soon (the widest stage of what has not
    /// ended, less its jobs running now), and how many it was handed so far.
    pub fn upcoming_jobs(&self) -> Vec<Upcoming> {
        http::lock(&self.state).upcoming_jobs()
    }

    /// The report as it stands now (status `running` until the pipeline ends).
    pub fn snapshot(&self) -> PipelineReport {
        http::lock(&self.state).snapshot()
    }

    /// Cancels the pipeline: pending jobs end at once; runners holding a job learn it from
    /// `Job-Status: canceled` on their next call and get 403 after that.
    pub fn cancel_all(&self) {
        http::lock(&self.state).cancel_all(false);
    }

    /// Cancels the pipeline as GitLab's cancel button does: pending jobs end at once; running
    /// jobs become `canceling`, their runners stop the script and run `after_script`, and
    /// each ends `canceled` when its runner reports. `cancel_all` afterwards stops them hard.
    pub fn cancel_all_gracefully(&self) {
        http::lock(&self.state).cancel_all(true);
    }

    /// The log the runner uploaded for a job so far.
    pub fn trace(&self, job_id: u64) -> Option<Vec<u8>> {
        http::lock(&self.state).trace(job_id)
    }
}
