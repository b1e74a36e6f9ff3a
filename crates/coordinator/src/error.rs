//! The errors of the coordinator client.

/// Why a call to the GitLab runner API did not produce the expected answer.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(
        "invalid coordinator url {url:?}: {reason}; expected something like https://gitlab.example.com/"
    )]
    InvalidUrl { url: String, reason: String },

    #[error("{url} answered 403 forbidden: the token is invalid, or the job is no longer running")]
    Forbidden { url: String },

    #[error("{url} answered 404 not found: the job no longer exists")]
    NotFound { url: String },

    #[error("{url} answered 412: the server rejected the trace checksum and asks for a re-upload")]
    TraceValidationFailed { url: String },

    #[error("{url} answered {status}{}", message.as_ref().map(|text| format!(": {text}")).unwrap_or_default())]
    UnexpectedStatus {
        url: String,
        status: u16,
        message: Option<String>,
    },

    #[error("request to {url} failed: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("{url} answered {status} with a body that is not the expected JSON: {reason}")]
    InvalidResponse {
        url: String,
        status: u16,
        reason: String,
    },

    #[error("job {job_id} was {status} on the server; stop working on it")]
    JobAborted { job_id: u64, status: String },

    #[error("job {job_id}: the coordinator did not accept the trace after {attempts} attempts")]
    TraceNotAccepted { job_id: u64, attempts: u32 },

    #[error(
        "job {job_id}: the coordinator answered 202 to the final update {attempts} times without completing the job"
    )]
    FinalUpdateNotCompleted { job_id: u64, attempts: u32 },

    #[error("job {job_id}: the trace upload task failed: {reason}")]
    TraceTaskFailed { job_id: u64, reason: String },

    #[error("job {job_id}: gave up on the final update after {attempts} attempts: {last_error}")]
    FinalUpdateFailed {
        job_id: u64,
        attempts: u32,
        last_error: Box<CoordinatorError>,
    },
}

impl CoordinatorError {
    /// Whether this result counts against the runner's health, as gitlab-runner counts it
    /// (§4.5): 403 and network failures do, other answers do not.
    pub fn is_unhealthy(&self) -> bool {
        matches!(
            self,
            CoordinatorError::Forbidden { .. } | CoordinatorError::Transport { .. }
        )
    }

    /// The HTTP status the server answered, when there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            CoordinatorError::Forbidden { .. } => Some(403),
            CoordinatorError::NotFound { .. } => Some(404),
            CoordinatorError::TraceValidationFailed { .. } => Some(412),
            CoordinatorError::UnexpectedStatus { status, .. }
            | CoordinatorError::InvalidResponse { status, .. } => Some(*status),
            _ => None,
        }
    }
}
