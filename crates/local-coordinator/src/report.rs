//! What a local pipeline tells its watchers: live events and the final report.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A job's status, as GitLab names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Its stage has not been reached.
    Created,
    /// Waiting for a runner, or handed to one that has not confirmed it yet (two-phase commit).
    Pending,
    Running,
    /// Canceled while running: its runner stops the script and still runs `after_script`.
    Canceling,
    Success,
    Failed,
    /// Not run: what it waits for failed (or did not fail, for `when: on_failure`).
    Skipped,
    Canceled,
    /// A `when: manual` job that was not asked for (`--manual` runs them).
    Manual,
    /// A `when: delayed` job waiting for its `start_in`.
    Scheduled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Canceling => "canceling",
            JobStatus::Success => "success",
            JobStatus::Failed => "failed",
            JobStatus::Skipped => "skipped",
            JobStatus::Canceled => "canceled",
            JobStatus::Manual => "manual",
            JobStatus::Scheduled => "scheduled",
        }
    }
}

/// The pipeline's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineStatus {
    Running,
    Success,
    Failed,
    Canceled,
}

/// Something that happened in the pipeline, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineEvent {
    JobStarted {
        job_id: u64,
        name: String,
        runner_description: String,
    },
    /// Log bytes the runner uploaded (already masked by the runner).
    TraceChunk {
        job_id: u64,
        name: String,
        bytes: Vec<u8>,
    },
    JobFinished {
        job_id: u64,
        name: String,
        status: JobStatus,
        exit_code: Option<i32>,
    },
    /// A running job was canceled gracefully: its `after_script` still runs.
    JobCanceling {
        job_id: u64,
        name: String,
    },
    /// A failed job runs again (per `retry`) under a new id.
    JobRetried {
        job_id: u64,
        new_job_id: u64,
        name: String,
        /// 2 for the first retry.
        attempt: u32,
    },
    PipelineFinished {
        status: PipelineStatus,
    },
}

/// One job's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobReport {
    /// The id of the job's last attempt.
    pub job_id: u64,
    pub name: String,
    pub stage: String,
    pub status: JobStatus,
    pub exit_code: Option<i32>,
    pub failure_reason: Option<String>,
    /// The description of the runner that took the job.
    pub runner: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The job's `when` after rules.
    pub when: String,
    /// It failed, but `allow_failure` lets the pipeline pass.
    pub allowed_failure: bool,
    /// How many times it was retried.
    pub retries: u32,
    /// Why it was skipped.
    pub skip_reason: Option<String>,
    /// The figure `coverage:` found in the log.
    pub coverage: Option<String>,
    /// The uploaded artifacts archive, on this machine.
    pub artifacts: Option<std::path::PathBuf>,
}

/// The outcome of a pipeline, jobs in file order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PipelineReport {
    pub status: PipelineStatus,
    pub jobs: Vec<JobReport>,
}

impl PipelineReport {
    /// The report of the job called `name`.
    pub fn job(&self, name: &str) -> Option<&JobReport> {
        self.jobs.iter().find(|job| job.name == name)
    }
}
