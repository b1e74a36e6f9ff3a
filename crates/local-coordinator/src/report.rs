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
    Success,
    Failed,
    /// Not run because an earlier stage failed.
    Skipped,
    Canceled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Success => "success",
            JobStatus::Failed => "failed",
            JobStatus::Skipped => "skipped",
            JobStatus::Canceled => "canceled",
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
    PipelineFinished {
        status: PipelineStatus,
    },
}

/// One job's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobReport {
    pub name: String,
    pub stage: String,
    pub status: JobStatus,
    pub exit_code: Option<i32>,
    pub failure_reason: Option<String>,
    /// The description of the runner that took the job.
    pub runner: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
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
