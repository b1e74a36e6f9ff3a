//! The embedded coordinator: serves GitLab's runner API on 127.0.0.1 for one local pipeline,
//! so the manager runs `podfleet pipeline` jobs over exactly the HTTP path it uses with GitLab.
//!
//! [`pipeline`] parses the `.gitlab-ci.yml` subset; [`LocalCoordinator::start`] serves it and
//! returns a [`Handle`] to watch events, cancel, and wait for the [`PipelineReport`]. The wire
//! payloads come from `podfleet_coordinator::model`; this crate never defines GitLab JSON.

mod http;
pub mod pipeline;
mod report;
mod state;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, oneshot, watch};

pub use pipeline::{Pipeline, PipelineError, parse_pipeline};
pub use report::{JobReport, JobStatus, PipelineEvent, PipelineReport, PipelineStatus};

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
    /// `runner_info.timeout` of every job.
    pub job_timeout: Duration,
}

impl LocalCoordinatorOptions {
    /// One-hour job timeout, like GitLab's default.
    pub fn new(project_dir: impl Into<PathBuf>) -> Self {
        LocalCoordinatorOptions {
            project_dir: project_dir.into(),
            job_timeout: Duration::from_secs(60 * 60),
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
}

/// The commit the local pipeline runs for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GitRevision {
    pub sha: String,
    pub ref_name: String,
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
        let project_dir = std::fs::canonicalize(&options.project_dir)
            .unwrap_or_else(|_| options.project_dir.clone());
        let project_name = project_dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "project".to_owned());
        let environment = Environment {
            server_url: url.clone(),
            project_name,
            project_dir: project_dir.display().to_string(),
            job_timeout: options.job_timeout,
            git: git_revision(&project_dir).await,
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

/// HEAD's commit and branch, when `project_dir` is a git work tree and git is installed.
async fn git_revision(project_dir: &Path) -> Option<GitRevision> {
    let git = |arguments: &'static [&'static str]| async move {
        let output = tokio::process::Command::new("git")
            .arg("-C")
            .arg(project_dir)
            .args(arguments)
            .output()
            .await
            .ok()?;
        let text = String::from_utf8(output.stdout).ok()?.trim().to_owned();
        (output.status.success() && !text.is_empty()).then_some(text)
    };
    let sha = git(&["rev-parse", "HEAD"]).await?;
    let ref_name = match git(&["rev-parse", "--abbrev-ref", "HEAD"]).await {
        Some(branch) if branch != "HEAD" => branch,
        _ => sha.clone(),
    };
    Some(GitRevision { sha, ref_name })
}

/// A running local coordinator. Dropping it stops the server.
pub struct Handle {
    /// Base URL of the served API, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    state: SharedState,
    events: broadcast::Sender<PipelineEvent>,
    report: watch::Receiver<Option<PipelineReport>>,
    _shutdown: oneshot::Sender<()>,
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

    /// The report as it stands now (status `running` until the pipeline ends).
    pub fn snapshot(&self) -> PipelineReport {
        http::lock(&self.state).snapshot()
    }

    /// Cancels the pipeline: pending jobs end at once; runners holding a job learn it from
    /// `Job-Status: canceled` on their next call and get 403 after that.
    pub fn cancel_all(&self) {
        http::lock(&self.state).cancel_all();
    }

    /// The log the runner uploaded for a job so far.
    pub fn trace(&self, job_id: u64) -> Option<Vec<u8>> {
        http::lock(&self.state).trace(job_id)
    }
}
