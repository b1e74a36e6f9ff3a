//! The per-job trace uploader: buffers the (already masked) log, streams it to the coordinator,
//! keeps the job alive, notices remote cancellation, and sends the final update (§6–§8).

mod buffer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{Client, PatchResponse, UpdateResponse};
use crate::error::CoordinatorError;
use crate::model::{
    FailureReason, JobResponse, JobState, RemoteJobStatus, TraceOutput, UpdateJobRequest,
};
use crate::retry::exponential_backoff;
use buffer::TraceBuffer;
pub use buffer::format_checksum;

/// The longest a final update is repeated while the server answers 202. Rails stops waiting
/// after 5 minutes, so this is only a guard against a misbehaving server.
const MAX_ACCEPTED_REPEATS: u32 = 100;

/// Settings of a [`JobTrace`].
#[derive(Debug, Clone)]
pub struct JobTraceOptions {
    /// How often new output is sent (gitlab-runner: 3 s). The server may change it.
    pub update_interval: Duration,
    /// Keep-alive: when nothing was accepted for this long, a `running` update is sent.
    pub force_send_interval: Duration,
    /// Output beyond this many bytes is dropped after a notice (gitlab-runner: 4 MiB).
    pub output_limit_bytes: usize,
    /// Largest single patch (gitlab-runner: 1 MiB).
    pub max_patch_bytes: usize,
    /// The job payload's `features.failure_reasons`, to map reasons the server does not know.
    pub failure_reasons: Vec<String>,
    /// Sets `debug_trace=true` on patches (`CI_DEBUG_TRACE`).
    pub debug_trace: bool,
    /// Tries of the final update (and final flush) before giving up (gitlab-runner: 10).
    pub final_update_retry_limit: u32,
    /// First backoff step between failed final updates (gitlab-runner: 1 s).
    pub final_update_backoff_base: Duration,
    /// A file every accepted byte of the log is appended to before it is uploaded (mode
    /// 0600), so that [`JobTrace::resume`] can carry the log on after a manager restart.
    pub journal: Option<PathBuf>,
}

impl Default for JobTraceOptions {
    fn default() -> Self {
        JobTraceOptions {
            update_interval: Duration::from_secs(3),
            force_send_interval: Duration::from_secs(30),
            output_limit_bytes: 4 * 1024 * 1024,
            max_patch_bytes: 1024 * 1024,
            failure_reasons: Vec::new(),
            debug_trace: false,
            final_update_retry_limit: 10,
            final_update_backoff_base: Duration::from_secs(1),
            journal: None,
        }
    }
}

impl JobTraceOptions {
    /// Defaults, with the failure reasons the job's server supports.
    pub fn for_job(job: &JobResponse) -> Self {
        JobTraceOptions {
            failure_reasons: job.features.failure_reasons.clone(),
            ..JobTraceOptions::default()
        }
    }
}

/// What the coordinator wants done with the job, as learned from trace and update answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteState {
    Running,
    /// `Job-Status: canceling`: stop the script, run after_script, then finish normally.
    Canceling,
    /// `Job-Status: canceled`/`failed` or 403: stop everything; no further updates are sent.
    Abort,
}

/// How the job ended, for the final update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    Success,
    Failed {
        reason: FailureReason,
        exit_code: Option<i32>,
    },
}

/// The upload state, owned by the background task while the job runs and by
/// [`JobTrace::finish`] afterwards.
struct Uploader {
    client: Client,
    job_id: u64,
    job_token: String,
    buffer: Arc<Mutex<TraceBuffer>>,
    options: JobTraceOptions,
    remote_state: watch::Sender<RemoteState>,
    /// Bytes the server holds.
    sent_offset: u64,
    update_interval: Duration,
    last_accepted: Instant,
    /// The job is gone (404 on a patch): trace upload stops, the final update is still sent.
    gone: bool,
    /// Why the job was aborted, once it was.
    abort_status: Option<String>,
}

enum PatchStep {
    /// Bytes were accepted.
    Progress,
    /// Nothing was accepted; try again after one update interval.
    RetryLater,
    /// No more patches: aborted, or the job is gone.
    Stop,
}

fn lock(buffer: &Mutex<TraceBuffer>) -> MutexGuard<'_, TraceBuffer> {
    // A panic while holding the lock cannot leave the buffer half-written in a way that
    // matters more than losing the log, so keep going with what is there.
    buffer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Uploader {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) -> Uploader {
        loop {
            tokio::select! {
                _ = &mut stop => return self,
                _ = tokio::time::sleep(self.update_interval) => {}
            }
            if self.abort_status.is_none() {
                self.incremental_update().await;
            }
        }
    }

    fn pending_bytes(&self) -> u64 {
        lock(&self.buffer).len().saturating_sub(self.sent_offset)
    }

    async fn incremental_update(&mut self) {
        let mut sent_any = false;
        while !self.gone && self.pending_bytes() > 0 {
            match self.send_patch().await {
                PatchStep::Progress => sent_any = true,
                PatchStep::RetryLater | PatchStep::Stop => break,
            }
        }
        if !sent_any
            && self.abort_status.is_none()
            && self.last_accepted.elapsed() >= self.options.force_send_interval
        {
            self.keep_alive().await;
        }
    }

    async fn send_patch(&mut self) -> PatchStep {
        let (offset, chunk) = {
            let buffer = lock(&self.buffer);
            (
                self.sent_offset,
                buffer.chunk(self.sent_offset, self.options.max_patch_bytes),
            )
        };
        let result = self
            .client
            .patch_trace_with(
                self.job_id,
                &self.job_token,
                offset,
                &chunk,
                self.options.debug_trace,
            )
            .await;
        match result {
            Ok(PatchResponse::Accepted {
                new_offset,
                job_status,
                update_interval,
            }) => {
                let held = lock(&self.buffer).len();
                self.sent_offset = new_offset.min(held);
                self.last_accepted = Instant::now();
                self.apply_interval(update_interval);
                if self.apply_status(job_status.as_ref()) {
                    return PatchStep::Stop;
                }
                if self.sent_offset > offset {
                    PatchStep::Progress
                } else {
                    PatchStep::RetryLater
                }
            }
            Ok(PatchResponse::RangeMismatch { server_offset }) => {
                tracing::debug!(
                    job_id = self.job_id,
                    sent_offset = offset,
                    server_offset,
                    "trace range mismatch; resending from the server's offset"
                );
                self.sent_offset = server_offset.min(lock(&self.buffer).len());
                PatchStep::RetryLater
            }
            Ok(PatchResponse::NotFound) => {
                tracing::warn!(job_id = self.job_id, "job not found; trace upload stopped");
                self.gone = true;
                PatchStep::Stop
            }
            Err(CoordinatorError::Forbidden { .. }) => {
                self.abort("forbidden");
                PatchStep::Stop
            }
            Err(error) => {
                tracing::warn!(job_id = self.job_id, %error, "trace patch failed; will retry");
                PatchStep::RetryLater
            }
        }
    }

    fn trace_output(&self) -> TraceOutput {
        let buffer = lock(&self.buffer);
        TraceOutput {
            checksum: buffer.checksum_of_prefix(self.sent_offset),
            bytesize: self.sent_offset.min(buffer.len()),
        }
    }

    async fn keep_alive(&mut self) {
        let request = UpdateJobRequest {
            output: self.trace_output(),
            ..UpdateJobRequest::new(
                self.client.info().clone(),
                &self.job_token,
                JobState::Running,
            )
        };
        match self
            .client
            .update_job(self.job_id, &self.job_token, &request)
            .await
        {
            Ok(UpdateResponse {
                job_status,
                trace_update_interval,
                ..
            }) => {
                self.last_accepted = Instant::now();
                self.apply_interval(trace_update_interval);
                self.apply_status(job_status.as_ref());
            }
            Err(CoordinatorError::Forbidden { .. }) => self.abort("forbidden"),
            Err(CoordinatorError::NotFound { .. }) => self.abort("not found"),
            Err(error) => {
                tracing::warn!(job_id = self.job_id, %error, "keep-alive update failed");
            }
        }
    }

    fn apply_interval(&mut self, interval: Option<Duration>) {
        if let Some(interval) = interval {
            self.update_interval = interval;
        }
    }

    /// Publishes what a `Job-Status` header asks for; true when the job must be abandoned.
    fn apply_status(&mut self, status: Option<&RemoteJobStatus>) -> bool {
        match status {
            Some(status) if status.requires_abort() => {
                self.abort(status.as_str());
                true
            }
            Some(RemoteJobStatus::Canceling) => {
                self.remote_state.send_if_modified(|state| {
                    let changed = *state == RemoteState::Running;
                    if changed {
                        *state = RemoteState::Canceling;
                    }
                    changed
                });
                false
            }
            _ => false,
        }
    }

    fn abort(&mut self, status: &str) {
        tracing::info!(
            job_id = self.job_id,
            status,
            "job aborted by the coordinator"
        );
        self.abort_status = Some(status.to_owned());
        self.remote_state.send_replace(RemoteState::Abort);
    }

    fn aborted_error(&self) -> Option<CoordinatorError> {
        self.abort_status
            .as_ref()
            .map(|status| CoordinatorError::JobAborted {
                job_id: self.job_id,
                status: status.clone(),
            })
    }

    /// Sends everything not yet accepted, waiting one interval after each refusal.
    async fn flush(&mut self) -> Result<(), CoordinatorError> {
        let mut refusals = 0;
        while !self.gone && self.pending_bytes() > 0 {
            match self.send_patch().await {
                PatchStep::Progress => refusals = 0,
                PatchStep::Stop => break,
                PatchStep::RetryLater => {
                    refusals += 1;
                    if refusals >= self.options.final_update_retry_limit {
                        return Err(CoordinatorError::TraceNotAccepted {
                            job_id: self.job_id,
                            attempts: refusals,
                        });
                    }
                    tokio::time::sleep(self.update_interval).await;
                }
            }
        }
        match self.aborted_error() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    async fn finish(mut self, outcome: JobOutcome) -> Result<(), CoordinatorError> {
        if let Some(error) = self.aborted_error() {
            return Err(error);
        }
        lock(&self.buffer).close();
        self.flush().await?;

        let (state, failure_reason, exit_code) = match outcome {
            JobOutcome::Success => (JobState::Success, None, 0),
            JobOutcome::Failed { reason, exit_code } => (
                JobState::Failed,
                Some(
                    reason
                        .for_server(&self.options.failure_reasons)
                        .as_str()
                        .to_owned(),
                ),
                exit_code.unwrap_or(0),
            ),
        };
        let mut failures = 0;
        let mut accepted_repeats = 0;
        loop {
            let output = self.trace_output();
            let request = UpdateJobRequest {
                failure_reason: failure_reason.clone(),
                checksum: output.checksum.clone(),
                output,
                exit_code,
                ..UpdateJobRequest::new(self.client.info().clone(), &self.job_token, state)
            };
            let result = self
                .client
                .update_job(self.job_id, &self.job_token, &request)
                .await;
            match result {
                Ok(response) if response.code == 202 => {
                    accepted_repeats += 1;
                    if accepted_repeats > MAX_ACCEPTED_REPEATS {
                        return Err(CoordinatorError::FinalUpdateNotCompleted {
                            job_id: self.job_id,
                            attempts: accepted_repeats,
                        });
                    }
                    let wait = response
                        .trace_update_interval
                        .unwrap_or(self.update_interval);
                    tokio::time::sleep(wait).await;
                }
                // 200, whatever the Job-Status: the job's end is settled on the server.
                Ok(_) => return Ok(()),
                Err(
                    error
                    @ (CoordinatorError::Forbidden { .. } | CoordinatorError::NotFound { .. }),
                ) => {
                    self.remote_state.send_replace(RemoteState::Abort);
                    return Err(error);
                }
                Err(error) => {
                    failures += 1;
                    if failures >= self.options.final_update_retry_limit {
                        return Err(CoordinatorError::FinalUpdateFailed {
                            job_id: self.job_id,
                            attempts: failures,
                            last_error: Box::new(error),
                        });
                    }
                    if let CoordinatorError::TraceValidationFailed { .. } = error {
                        // Feature `trace_reset`: upload the whole log again, then repeat.
                        self.sent_offset = 0;
                        self.gone = false;
                        self.flush().await?;
                        continue;
                    }
                    tracing::warn!(job_id = self.job_id, %error, "final update failed; will retry");
                    tokio::time::sleep(exponential_backoff(
                        self.options.final_update_backoff_base,
                        Duration::from_secs(60 * 60),
                        failures,
                    ))
                    .await;
                }
            }
        }
    }
}

/// A running job's log and its link to the coordinator. Create it when the job is received,
/// write the masked log into it, watch [`JobTrace::remote_state`], and end with
/// [`JobTrace::finish`].
pub struct JobTrace {
    job_id: u64,
    buffer: Arc<Mutex<TraceBuffer>>,
    remote_state: watch::Receiver<RemoteState>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Uploader>,
}

impl JobTrace {
    /// Starts the upload task (on the current tokio runtime). With `options.journal`, the
    /// journal file is created (or truncated); if that fails the job runs without one (and
    /// cannot be resumed after a restart), which is logged.
    pub fn start(client: Client, job_id: u64, job_token: &str, options: JobTraceOptions) -> Self {
        let mut buffer = TraceBuffer::new(options.output_limit_bytes);
        if let Some(path) = &options.journal {
            match open_journal(path, true) {
                Ok(file) => buffer.set_journal(file),
                Err(error) => tracing::warn!(
                    job_id,
                    %error,
                    "cannot create the trace journal; this job cannot be resumed after a restart"
                ),
            }
        }
        Self::spawn(client, job_id, job_token, options, buffer)
    }

    /// Carries on the log of a job a previous manager process was running: the journal at
    /// `options.journal` is read back as the log so far and appended to from now on. The
    /// coordinator's accepted offset is not guessed: the first patch starts at 0 and the
    /// server's answer (416 with `Range`, or an overwrite of identical bytes) moves the
    /// upload to the server's offset, so nothing is lost or sent twice.
    pub fn resume(
        client: Client,
        job_id: u64,
        job_token: &str,
        options: JobTraceOptions,
    ) -> Result<Self, std::io::Error> {
        let path = options.journal.clone().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a resumed trace needs a journal",
            )
        })?;
        let accepted = std::fs::read(&path)?;
        let file = open_journal(&path, false)?;
        let buffer = TraceBuffer::resumed(options.output_limit_bytes, accepted, Some(file));
        Ok(Self::spawn(client, job_id, job_token, options, buffer))
    }

    fn spawn(
        client: Client,
        job_id: u64,
        job_token: &str,
        options: JobTraceOptions,
        buffer: TraceBuffer,
    ) -> Self {
        let buffer = Arc::new(Mutex::new(buffer));
        let (state_sender, state_receiver) = watch::channel(RemoteState::Running);
        let (stop_sender, stop_receiver) = oneshot::channel();
        let uploader = Uploader {
            client,
            job_id,
            job_token: job_token.to_owned(),
            buffer: Arc::clone(&buffer),
            update_interval: options.update_interval,
            options,
            remote_state: state_sender,
            sent_offset: 0,
            last_accepted: Instant::now(),
            gone: false,
            abort_status: None,
        };
        let task = tokio::spawn(uploader.run(stop_receiver));
        JobTrace {
            job_id,
            buffer,
            remote_state: state_receiver,
            stop: stop_sender,
            task,
        }
    }

    pub fn job_id(&self) -> u64 {
        self.job_id
    }

    /// Appends log output. Cheap and non-blocking: the bytes are sent by the upload task.
    pub fn write(&self, bytes: &[u8]) {
        lock(&self.buffer).write(bytes);
    }

    /// A cloneable appender for output produced away from the owner of this trace (e.g. the
    /// executor's container streams); it writes into the same log.
    pub fn writer(&self) -> TraceWriter {
        TraceWriter(Arc::clone(&self.buffer))
    }

    /// `crc32:%08x` of every byte accepted into the log so far.
    pub fn checksum(&self) -> String {
        let buffer = lock(&self.buffer);
        buffer.checksum_of_prefix(buffer.len())
    }

    /// Bytes accepted into the log so far (after UTF-8 repair and the output limit).
    pub fn bytesize(&self) -> u64 {
        lock(&self.buffer).len()
    }

    /// What the coordinator asks for: keep running, cancel gracefully, or abort.
    pub fn remote_state(&self) -> watch::Receiver<RemoteState> {
        self.remote_state.clone()
    }

    /// Stops the periodic upload, sends the rest of the log, then the final update, repeating
    /// it while the server answers 202. Fails with [`CoordinatorError::JobAborted`] when the
    /// coordinator aborted the job (nothing more is sent then).
    pub async fn finish(self, outcome: JobOutcome) -> Result<(), CoordinatorError> {
        let JobTrace {
            job_id, stop, task, ..
        } = self;
        // The task may already have ended; then there is nobody to tell.
        let _ = stop.send(());
        let uploader = task
            .await
            .map_err(|error| CoordinatorError::TraceTaskFailed {
                job_id,
                reason: error.to_string(),
            })?;
        uploader.finish(outcome).await
    }
}

/// Opens a trace journal for appending, owner-only (the log is masked, but it is still the
/// job's output).
fn open_journal(path: &Path, truncate: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).mode(0o600);
    if truncate {
        options.write(true).truncate(true);
    } else {
        options.append(true);
    }
    options.open(path).map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!("trace journal {}: {error}", path.display()),
        )
    })
}

/// A cheap, cloneable handle that appends to a job's log, for output produced away from the
/// [`JobTrace`] owner (the executor's container streams).
#[derive(Clone)]
pub struct TraceWriter(Arc<Mutex<TraceBuffer>>);

impl TraceWriter {
    /// Same as [`JobTrace::write`].
    pub fn write(&self, bytes: &[u8]) {
        lock(&self.0).write(bytes);
    }
}
