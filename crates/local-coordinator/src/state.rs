//! The pipeline state machine: one owner of every job's status, token, runner, trace and
//! artifacts. It knows nothing of HTTP; the edge in `http.rs` turns its typed results into
//! responses.
//!
//! Scheduling is GitLab's: a job waits for the jobs it `needs`, or without `needs` for every
//! job of the earlier stages, then runs, is skipped, or waits for `--manual` according to its
//! `when` and their outcome. Failures are retried per `retry`; `resource_group` serialises.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;
use podfleet_coordinator::model::{
    ArtifactsFile, Dependency, FailureReason, GitInfo, JobFeatures, JobInfo, JobResponse, JobState,
    JobVariable, RunnerJobInfo, Secret, Step, StepWhen, UpdateJobRequest,
};
use tokio::sync::{broadcast, watch};

use crate::RunnerRegistration;
use crate::pipeline::{JobSpec, Pipeline, Variable, When};
use crate::project::Project;
use crate::report::{JobReport, JobStatus, PipelineEvent, PipelineReport, PipelineStatus};
use crate::sources::Sources;

/// The failure reasons this coordinator accepts (the runner-relevant part of Rails' enum).
const FAILURE_REASONS: [&str; 12] = [
    "unknown_failure",
    "script_failure",
    "api_failure",
    "stuck_or_timeout_failure",
    "runner_system_failure",
    "missing_dependency_failure",
    "runner_unsupported",
    "job_execution_timeout",
    "data_integrity_failure",
    "runner_configuration_error",
    "runner_external_dependency_failure",
    "runner_interrupted",
];

/// What the state needs to know about its surroundings to build job payloads.
pub(crate) struct Environment {
    pub server_url: String,
    pub project: Project,
    pub job_timeout: Duration,
    /// Run `when: manual` jobs.
    pub run_manual: bool,
    /// Where uploaded artifacts are kept.
    pub artifacts_dir: PathBuf,
    /// The snapshot of the working tree jobs clone, when there is a git repository.
    pub sources: Option<Sources>,
}

/// An uploaded artifacts archive.
#[derive(Debug, Clone)]
pub(crate) struct StoredArtifact {
    pub path: PathBuf,
    pub filename: String,
    pub size: u64,
    pub artifact_type: String,
}

struct Job {
    id: u64,
    spec: JobSpec,
    status: JobStatus,
    token: Option<String>,
    runner: Option<usize>,
    trace: Vec<u8>,
    started_at: Option<chrono::DateTime<Utc>>,
    finished_at: Option<chrono::DateTime<Utc>>,
    exit_code: Option<i32>,
    failure_reason: Option<String>,
    /// A canceled job tells its runner once with `Job-Status: canceled`, then answers 403.
    cancel_announced: bool,
    /// A 412 asked the runner to upload the trace again from offset 0.
    trace_reset_requested: bool,
    /// Indices of the jobs this one waits for.
    waits_for: Vec<usize>,
    /// Indices of the jobs whose artifacts this one fetches.
    artifacts_from: Vec<usize>,
    /// Whether `waits_for` comes from `needs` (a DAG job) rather than stages.
    dag: bool,
    /// `when: delayed`: not handed out before this.
    not_before: Option<Instant>,
    /// How many times the job was retried.
    retries: u32,
    /// The failure is allowed (`allow_failure`, or its `exit_codes`).
    failure_allowed: bool,
    /// Why it was skipped.
    skip_reason: Option<String>,
    coverage: Option<String>,
    artifacts: Vec<StoredArtifact>,
}

impl Job {
    fn ended(&self) -> bool {
        matches!(
            self.status,
            JobStatus::Success
                | JobStatus::Failed
                | JobStatus::Skipped
                | JobStatus::Canceled
                | JobStatus::Manual
        )
    }

    fn failed_blocking(&self) -> bool {
        self.status == JobStatus::Failed && !self.failure_allowed
    }

    /// Handed to a runner and not ended.
    fn busy(&self) -> bool {
        self.runner.is_some() && self.holds_token()
    }

    /// Its job token is live: the runner may still clone, fetch and upload with it.
    fn holds_token(&self) -> bool {
        matches!(
            self.status,
            JobStatus::Pending | JobStatus::Running | JobStatus::Canceling
        )
    }
}

pub(crate) enum VerifyOutcome {
    Verified { runner_id: u64 },
    Forbidden,
}

pub(crate) enum RequestOutcome {
    Job(Box<JobResponse>),
    NoJob { last_update: String },
    Forbidden,
}

pub(crate) enum UpdateOutcome {
    Accepted { status: JobStatus },
    Forbidden { status: Option<JobStatus> },
    BadRequest { message: String },
    Conflict { status: JobStatus },
    ChecksumMismatch { status: JobStatus },
}

pub(crate) enum TraceOutcome {
    Accepted { size: u64, status: JobStatus },
    RangeMismatch { size: u64, status: JobStatus },
    Forbidden { status: Option<JobStatus> },
    BadRequest { message: String },
}

pub(crate) enum ArtifactsAccess {
    Allowed(StoredArtifact),
    NotFound,
    Forbidden,
}

pub(crate) struct CoordinatorState {
    pipeline_id: u64,
    environment: Environment,
    global_variables: Vec<Variable>,
    user_variables: Vec<Variable>,
    jobs: Vec<Job>,
    runners: Vec<RunnerRegistration>,
    /// Per runner: how many jobs it was handed (retries count again).
    handed_out: Vec<u64>,
    next_id: u64,
    queue_salt: u32,
    /// Counts changes of the job queue (`X-GitLab-Last-Update`); held job requests wait for
    /// it to change.
    queue_tick: watch::Sender<u64>,
    canceled: bool,
    finished: bool,
    events: broadcast::Sender<PipelineEvent>,
    report: watch::Sender<Option<PipelineReport>>,
}

/// A runner's jobs to start soon (see [`CoordinatorState::upcoming_jobs`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upcoming {
    /// The runner's description.
    pub runner: String,
    pub jobs: usize,
    /// How many jobs the runner was handed so far (retries count again).
    pub handed_out: u64,
}

/// The job queue changed: runners holding a job request ask again.
fn queue_changed(tick: &watch::Sender<u64>) {
    tick.send_modify(|tick| *tick += 1);
}

fn runner_can_run(runner: &RunnerRegistration, spec: &JobSpec) -> bool {
    if spec.tags.is_empty() {
        runner.run_untagged
    } else {
        spec.tags.iter().all(|tag| runner.tags.contains(tag))
    }
}

fn checksum(bytes: &[u8]) -> String {
    podfleet_coordinator::format_checksum(crc32fast::hash(bytes))
}

fn new_job_token() -> String {
    format!("glcbt-local{:024x}", rand::random::<u128>() >> 32)
}

fn variable(key: &str, value: impl Into<String>) -> JobVariable {
    JobVariable {
        key: key.to_owned(),
        value: value.into(),
        public: true,
        ..JobVariable::default()
    }
}

fn from_pipeline(variable: &Variable) -> JobVariable {
    JobVariable {
        key: variable.key.clone(),
        value: variable.value.clone(),
        public: !variable.masked,
        masked: variable.masked,
        file: variable.file,
        raw: variable.raw,
    }
}

/// `Content-Range: <start>-<end>`: the start (Rails ignores the end too).
fn range_start(content_range: &str) -> Option<u64> {
    let (start, end) = content_range.trim().split_once('-')?;
    end.trim().parse::<u64>().ok()?;
    start.trim().parse().ok()
}

/// The last coverage figure in a log, as GitLab extracts it: the first number of the last match.
fn coverage(pattern: &str, trace: &[u8]) -> Option<String> {
    let regex = regex::Regex::new(pattern).ok()?;
    let text = String::from_utf8_lossy(trace);
    let found = regex.find_iter(&text).last()?;
    let number = regex::Regex::new(r"\d+(?:\.\d+)?").expect("a valid constant regex");
    number
        .find(found.as_str())
        .map(|figure| figure.as_str().to_owned())
}

impl CoordinatorState {
    pub(crate) fn new(
        pipeline: Pipeline,
        runners: Vec<RunnerRegistration>,
        environment: Environment,
        events: broadcast::Sender<PipelineEvent>,
        report: watch::Sender<Option<PipelineReport>>,
    ) -> Self {
        let stage_of = |spec: &JobSpec| {
            pipeline
                .stages
                .iter()
                .position(|stage| *stage == spec.stage)
                .unwrap_or(0)
        };
        let index_of = |name: &str| pipeline.jobs.iter().position(|job| job.name == name);
        let jobs: Vec<Job> = pipeline
            .jobs
            .iter()
            .zip(1u64..)
            .map(|(spec, id)| {
                let earlier: Vec<usize> = pipeline
                    .jobs
                    .iter()
                    .enumerate()
                    .filter(|(_, other)| stage_of(other) < stage_of(spec))
                    .map(|(index, _)| index)
                    .collect();
                let (waits_for, dag, mut artifacts_from) = match &spec.needs {
                    Some(needs) => (
                        needs
                            .iter()
                            .filter_map(|need| index_of(&need.job))
                            .collect(),
                        true,
                        needs
                            .iter()
                            .filter(|need| need.artifacts)
                            .filter_map(|need| index_of(&need.job))
                            .collect(),
                    ),
                    None => (earlier.clone(), false, earlier),
                };
                if let Some(dependencies) = &spec.dependencies {
                    artifacts_from = pipeline
                        .jobs
                        .iter()
                        .enumerate()
                        .filter(|(_, other)| {
                            dependencies.iter().any(|dependency| {
                                other.name == *dependency
                                    || other.name.strip_prefix(dependency.as_str()).is_some_and(
                                        |rest| rest.starts_with(' ') || rest.starts_with(':'),
                                    )
                            })
                        })
                        .map(|(index, _)| index)
                        .collect();
                }
                Job {
                    id,
                    spec: spec.clone(),
                    status: JobStatus::Created,
                    token: None,
                    runner: None,
                    trace: Vec::new(),
                    started_at: None,
                    finished_at: None,
                    exit_code: None,
                    failure_reason: None,
                    cancel_announced: false,
                    trace_reset_requested: false,
                    waits_for,
                    artifacts_from,
                    dag,
                    not_before: None,
                    retries: 0,
                    failure_allowed: false,
                    skip_reason: None,
                    coverage: None,
                    artifacts: Vec::new(),
                }
            })
            .collect();
        let next_id = jobs.len() as u64 + 1;
        let mut state = CoordinatorState {
            pipeline_id: 1,
            environment,
            global_variables: pipeline.variables,
            user_variables: pipeline.user_variables,
            jobs,
            handed_out: vec![0; runners.len()],
            runners,
            next_id,
            queue_salt: rand::random(),
            queue_tick: watch::Sender::new(0),
            canceled: false,
            finished: false,
            events,
            report,
        };
        state.advance();
        state
    }

    fn emit(&self, event: PipelineEvent) {
        // Nobody listening is fine: events are a view, the report is the record.
        let _ = self.events.send(event);
    }

    fn queue_value(&self) -> String {
        format!("{:08x}{:08x}", self.queue_salt, *self.queue_tick.borrow())
    }

    /// Resolves at the next change of the job queue (or of the pipeline's end).
    pub(crate) fn queue_changes(&self) -> watch::Receiver<u64> {
        self.queue_tick.subscribe()
    }

    fn runner_index(&self, token: &str) -> Option<usize> {
        self.runners
            .iter()
            .position(|runner| !token.is_empty() && runner.token == token)
    }

    pub(crate) fn verify(&self, token: &str) -> VerifyOutcome {
        match self.runner_index(token) {
            Some(index) => VerifyOutcome::Verified {
                runner_id: index as u64 + 1,
            },
            None => VerifyOutcome::Forbidden,
        }
    }

    /// Whether job `index` may be handed out now.
    fn ready(&self, index: usize, now: Instant) -> bool {
        let job = &self.jobs[index];
        let waiting = matches!(job.status, JobStatus::Pending | JobStatus::Scheduled);
        if !waiting || job.runner.is_some() {
            return false;
        }
        if job.not_before.is_some_and(|not_before| now < not_before) {
            return false;
        }
        match &job.spec.resource_group {
            Some(group) => !self
                .jobs
                .iter()
                .any(|other| other.busy() && other.spec.resource_group.as_ref() == Some(group)),
            None => true,
        }
    }

    /// Hands the first pending job this runner may run to it. With `two_phase` the job stays
    /// pending until the runner confirms with `state: running`.
    pub(crate) fn request_job(&mut self, token: &str, two_phase: bool) -> RequestOutcome {
        let Some(runner_index) = self.runner_index(token) else {
            return RequestOutcome::Forbidden;
        };
        let runner = &self.runners[runner_index];
        let now = Instant::now();
        let Some(job_index) = (0..self.jobs.len()).find(|&index| {
            self.ready(index, now) && runner_can_run(runner, &self.jobs[index].spec)
        }) else {
            return RequestOutcome::NoJob {
                last_update: self.queue_value(),
            };
        };
        let job = &mut self.jobs[job_index];
        job.status = JobStatus::Pending;
        job.runner = Some(runner_index);
        job.token = Some(new_job_token());
        self.handed_out[runner_index] += 1;
        queue_changed(&self.queue_tick);
        if !two_phase {
            self.start_job(job_index);
        }
        RequestOutcome::Job(Box::new(self.job_payload(job_index)))
    }

    fn start_job(&mut self, job_index: usize) {
        let job = &mut self.jobs[job_index];
        job.status = JobStatus::Running;
        job.started_at = Some(Utc::now());
        let event = PipelineEvent::JobStarted {
            job_id: job.id,
            name: job.spec.name.clone(),
            runner_description: job
                .runner
                .map(|index| self.runners[index].description.clone())
                .unwrap_or_default(),
        };
        self.emit(event);
    }

    fn authorized_job(&self, job_id: u64, token: &str) -> Option<usize> {
        self.jobs.iter().position(|job| {
            job.id == job_id && !token.is_empty() && job.token.as_deref() == Some(token)
        })
    }

    /// `PUT /jobs/:id`.
    pub(crate) fn update_job(
        &mut self,
        job_id: u64,
        token: &str,
        request: &UpdateJobRequest,
    ) -> UpdateOutcome {
        let Some(index) = self.authorized_job(job_id, token) else {
            return UpdateOutcome::Forbidden { status: None };
        };
        let job = &mut self.jobs[index];
        if job.status == JobStatus::Canceled {
            if job.cancel_announced {
                return UpdateOutcome::Forbidden {
                    status: Some(JobStatus::Canceled),
                };
            }
            job.cancel_announced = true;
            return UpdateOutcome::Accepted {
                status: JobStatus::Canceled,
            };
        }
        match (job.status, request.state) {
            (JobStatus::Pending, JobState::Running) => {
                self.start_job(index);
                UpdateOutcome::Accepted {
                    status: JobStatus::Running,
                }
            }
            (JobStatus::Pending, JobState::Pending)
            | (JobStatus::Running | JobStatus::Canceling, JobState::Running) => {
                UpdateOutcome::Accepted { status: job.status }
            }
            (JobStatus::Pending, _) => UpdateOutcome::BadRequest {
                message: format!(
                    "job {job_id} waits for the two-phase acknowledgement: send state running first"
                ),
            },
            (JobStatus::Running | JobStatus::Canceling, JobState::Pending) => {
                UpdateOutcome::Conflict { status: job.status }
            }
            (running @ (JobStatus::Running | JobStatus::Canceling), final_state) => {
                let claimed = if request.output.checksum.is_empty() {
                    request.checksum.as_str()
                } else {
                    request.output.checksum.as_str()
                };
                if !claimed.is_empty() && claimed != checksum(&job.trace) {
                    job.trace_reset_requested = true;
                    return UpdateOutcome::ChecksumMismatch { status: running };
                }
                // Like GitLab, a job that was canceling ends canceled whatever the runner saw.
                let status = match (running, final_state) {
                    (JobStatus::Canceling, _) => JobStatus::Canceled,
                    (_, JobState::Success) => JobStatus::Success,
                    _ => JobStatus::Failed,
                };
                self.finish_job(index, status, request);
                UpdateOutcome::Accepted { status }
            }
            (status, _) => UpdateOutcome::Forbidden {
                status: Some(status),
            },
        }
    }

    fn finish_job(&mut self, index: usize, status: JobStatus, request: &UpdateJobRequest) {
        let job = &mut self.jobs[index];
        job.status = status;
        job.finished_at = Some(Utc::now());
        job.exit_code = match status {
            JobStatus::Success => Some(request.exit_code),
            _ => (request.exit_code != 0).then_some(request.exit_code),
        };
        job.failure_reason = match status {
            JobStatus::Failed => Some(
                request
                    .failure_reason
                    .clone()
                    .unwrap_or_else(|| FailureReason::ScriptFailure.as_str().to_owned()),
            ),
            _ => None,
        };
        job.failure_allowed =
            status == JobStatus::Failed && job.spec.allow_failure.allows(job.exit_code);
        if let Some(pattern) = &job.spec.coverage {
            job.coverage = coverage(pattern, &job.trace);
        }
        let event = PipelineEvent::JobFinished {
            job_id: job.id,
            name: job.spec.name.clone(),
            status,
            exit_code: job.exit_code,
        };
        self.emit(event);
        let job = &self.jobs[index];
        let retry = status == JobStatus::Failed
            && !self.canceled
            && job.retries < job.spec.retry.max
            && job.spec.retry.retries(
                job.failure_reason.as_deref().unwrap_or_default(),
                job.exit_code,
            );
        if retry {
            let old_id = job.id;
            let new_id = self.next_id;
            self.next_id += 1;
            let job = &mut self.jobs[index];
            job.id = new_id;
            job.retries += 1;
            job.status = JobStatus::Pending;
            job.token = None;
            job.runner = None;
            job.trace.clear();
            job.started_at = None;
            job.finished_at = None;
            job.exit_code = None;
            job.failure_reason = None;
            job.failure_allowed = false;
            job.trace_reset_requested = false;
            job.artifacts.clear();
            queue_changed(&self.queue_tick);
            let event = PipelineEvent::JobRetried {
                job_id: old_id,
                new_job_id: new_id,
                name: job.spec.name.clone(),
                attempt: job.retries + 1,
            };
            self.emit(event);
        }
        self.advance();
    }
    /// `PATCH /jobs/:id/trace`.
    pub(crate) fn append_trace(
        &mut self,
        job_id: u64,
        token: &str,
        content_range: Option<&str>,
        bytes: &[u8],
    ) -> TraceOutcome {
        let Some(index) = self.authorized_job(job_id, token) else {
            return TraceOutcome::Forbidden { status: None };
        };
        let job = &mut self.jobs[index];
        match job.status {
            JobStatus::Canceled if !job.cancel_announced => {
                job.cancel_announced = true;
                return TraceOutcome::Accepted {
                    size: job.trace.len() as u64,
                    status: JobStatus::Canceled,
                };
            }
            JobStatus::Running | JobStatus::Pending | JobStatus::Canceling => {}
            status => {
                return TraceOutcome::Forbidden {
                    status: Some(status),
                };
            }
        }
        let Some(start) = content_range.and_then(range_start) else {
            return TraceOutcome::BadRequest {
                message: "missing or invalid Content-Range (expected <start>-<end>)".to_owned(),
            };
        };
        if job.trace_reset_requested && start == 0 {
            job.trace.clear();
            job.trace_reset_requested = false;
        }
        let stored = job.trace.len() as u64;
        if start > stored {
            return TraceOutcome::RangeMismatch {
                size: stored,
                status: job.status,
            };
        }
        // Like Rails: data overwrites from `start`, so a resend after a lost answer is harmless.
        let start = start as usize;
        let already_seen = job.trace.len() - start;
        job.trace.truncate(start);
        job.trace.extend_from_slice(bytes);
        let (size, status) = (job.trace.len() as u64, job.status);
        if bytes.len() > already_seen {
            let event = PipelineEvent::TraceChunk {
                job_id,
                name: job.spec.name.clone(),
                bytes: bytes[already_seen..].to_vec(),
            };
            self.emit(event);
        }
        TraceOutcome::Accepted { size, status }
    }

    /// Per runner (in registration order), by its description: how many of its jobs will
    /// start soon. That is the most jobs of one stage that have not ended and that it took
    /// or can take (a job several runners can take counts for the first), less its jobs
    /// running now. A hint for its autoscaler to create instances ahead of the jobs; the
    /// running jobs are left out because their slots are counted as they are released,
    /// before this state hears that the job ended. Each comes with how many jobs the runner
    /// was handed so far, so a count that reaches the autoscaler after one of its jobs has
    /// taken a slot there is not kept for that job again.
    pub(crate) fn upcoming_jobs(&self) -> Vec<Upcoming> {
        let mut per_stage: Vec<std::collections::HashMap<&str, usize>> =
            vec![std::collections::HashMap::new(); self.runners.len()];
        let mut running = vec![0usize; self.runners.len()];
        for job in self.jobs.iter().filter(|job| !job.ended()) {
            if let Some(runner) = job.runner.filter(|_| job.busy()) {
                running[runner] += 1;
            }
            let runner = job.runner.or_else(|| {
                self.runners
                    .iter()
                    .position(|runner| runner_can_run(runner, &job.spec))
            });
            if let Some(runner) = runner {
                *per_stage[runner]
                    .entry(job.spec.stage.as_str())
                    .or_default() += 1;
            }
        }
        self.runners
            .iter()
            .zip(per_stage.into_iter().zip(running))
            .zip(&self.handed_out)
            .map(|((runner, (stages, running)), &handed_out)| {
                let widest = stages.values().copied().max().unwrap_or(0);
                Upcoming {
                    runner: runner.description.clone(),
                    jobs: widest.saturating_sub(running),
                    handed_out,
                }
            })
            .collect()
    }

    /// Cancels every job that has not ended; runners learn it on their next call. Gracefully,
    /// a running job becomes `canceling` (`Job-Status: canceling`: its runner stops the
    /// script, runs `after_script` and reports) and ends canceled when its runner reports;
    /// otherwise it is canceled at once (`Job-Status: canceled`, then 403).
    pub(crate) fn cancel_all(&mut self, graceful: bool) {
        if self.finished {
            return;
        }
        self.canceled = true;
        let now = Utc::now();
        let mut events = Vec::new();
        for job in &mut self.jobs {
            if graceful && job.runner.is_some() && job.status == JobStatus::Running {
                job.status = JobStatus::Canceling;
                events.push(PipelineEvent::JobCanceling {
                    job_id: job.id,
                    name: job.spec.name.clone(),
                });
                continue;
            }
            if matches!(
                job.status,
                JobStatus::Created
                    | JobStatus::Pending
                    | JobStatus::Running
                    | JobStatus::Canceling
                    | JobStatus::Scheduled
            ) {
                // A job no runner holds has nobody to tell.
                job.cancel_announced = job.runner.is_none();
                job.status = JobStatus::Canceled;
                job.finished_at = Some(now);
                events.push(PipelineEvent::JobFinished {
                    job_id: job.id,
                    name: job.spec.name.clone(),
                    status: JobStatus::Canceled,
                    exit_code: None,
                });
            }
        }
        for event in events {
            self.emit(event);
        }
        if self.jobs.iter().all(Job::ended) {
            self.finish_pipeline();
        }
    }

    /// Moves every waiting job whose wait is over to pending, skipped or manual, until
    /// nothing changes; ends the pipeline when every job has ended.
    fn advance(&mut self) {
        if self.finished {
            return;
        }
        loop {
            let mut changed = false;
            for index in 0..self.jobs.len() {
                if self.jobs[index].status != JobStatus::Created {
                    continue;
                }
                let job = &self.jobs[index];
                let waited: Vec<&Job> = job
                    .waits_for
                    .iter()
                    .map(|&other| &self.jobs[other])
                    .collect();
                if waited.iter().any(|other| !other.ended()) {
                    continue;
                }
                let failed = waited
                    .iter()
                    .find(|other| other.failed_blocking())
                    .map(|other| other.spec.name.clone());
                // A manual job that blocks (no allow_failure) holds back what waits for it.
                let blocked = waited
                    .iter()
                    .find(|other| {
                        other.status == JobStatus::Manual && !other.spec.allow_failure.allowed
                    })
                    .map(|other| other.spec.name.clone());
                // A DAG job does not run when a job it needs did not run.
                let missing = waited
                    .iter()
                    .find(|other| {
                        job.dag
                            && matches!(
                                other.status,
                                JobStatus::Skipped | JobStatus::Canceled | JobStatus::Manual
                            )
                    })
                    .map(|other| other.spec.name.clone());
                let run_manual = self.environment.run_manual;
                let decision: Result<(), String> = match job.spec.when {
                    When::Always => Ok(()),
                    When::OnFailure => match &failed {
                        Some(_) => Ok(()),
                        None => Err("when: on_failure and nothing it waits for failed".to_owned()),
                    },
                    When::OnSuccess | When::Delayed | When::Manual => {
                        if let Some(name) = failed {
                            Err(format!("{name} failed"))
                        } else if let Some(name) = blocked {
                            Err(format!(
                                "it waits for the manual job {name}, which was not run (use --manual)"
                            ))
                        } else if let Some(name) = missing {
                            Err(format!("it needs {name}, which did not run"))
                        } else {
                            Ok(())
                        }
                    }
                };
                let job = &mut self.jobs[index];
                changed = true;
                match decision {
                    Err(reason) => {
                        job.status = JobStatus::Skipped;
                        job.skip_reason = Some(reason);
                        let event = PipelineEvent::JobFinished {
                            job_id: job.id,
                            name: job.spec.name.clone(),
                            status: JobStatus::Skipped,
                            exit_code: None,
                        };
                        self.emit(event);
                    }
                    Ok(()) if job.spec.when == When::Manual && !run_manual => {
                        job.status = JobStatus::Manual;
                        let event = PipelineEvent::JobFinished {
                            job_id: job.id,
                            name: job.spec.name.clone(),
                            status: JobStatus::Manual,
                            exit_code: None,
                        };
                        self.emit(event);
                    }
                    Ok(()) => {
                        job.status = JobStatus::Pending;
                        if job.spec.when == When::Delayed {
                            let delay = Duration::from_secs(job.spec.start_in.unwrap_or_default());
                            job.not_before = Some(Instant::now() + delay);
                            job.status = JobStatus::Scheduled;
                        }
                        queue_changed(&self.queue_tick);
                    }
                }
            }
            if !changed {
                break;
            }
        }
        if self.jobs.iter().all(Job::ended) {
            self.finish_pipeline();
        }
    }

    fn finish_pipeline(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        // Nothing more will be handed out: held requests are answered now.
        queue_changed(&self.queue_tick);
        let status = if self.canceled {
            PipelineStatus::Canceled
        } else if self.jobs.iter().any(Job::failed_blocking) {
            PipelineStatus::Failed
        } else {
            PipelineStatus::Success
        };
        self.report
            .send_replace(Some(self.report_with_status(status)));
        self.emit(PipelineEvent::PipelineFinished { status });
    }

    fn report_with_status(&self, status: PipelineStatus) -> PipelineReport {
        PipelineReport {
            status,
            jobs: self
                .jobs
                .iter()
                .map(|job| JobReport {
                    job_id: job.id,
                    name: job.spec.name.clone(),
                    stage: job.spec.stage.clone(),
                    status: job.status,
                    exit_code: job.exit_code,
                    failure_reason: job.failure_reason.clone(),
                    runner: job
                        .runner
                        .map(|index| self.runners[index].description.clone()),
                    started_at: job.started_at,
                    finished_at: job.finished_at,
                    when: job.spec.when.as_str().to_owned(),
                    allowed_failure: job.failure_allowed,
                    retries: job.retries,
                    skip_reason: job.skip_reason.clone(),
                    coverage: job.coverage.clone(),
                    artifacts: job
                        .artifacts
                        .iter()
                        .filter(|artifact| artifact.artifact_type == "archive")
                        .map(|artifact| artifact.path.clone())
                        .next(),
                })
                .collect(),
        }
    }

    /// The report as it stands (status `running` until the pipeline ends).
    pub(crate) fn snapshot(&self) -> PipelineReport {
        match self.report.borrow().as_ref() {
            Some(report) => report.clone(),
            None => self.report_with_status(PipelineStatus::Running),
        }
    }

    /// The stored trace of a job (for tests and reports).
    pub(crate) fn trace(&self, job_id: u64) -> Option<Vec<u8>> {
        self.jobs
            .iter()
            .find(|job| job.id == job_id)
            .map(|job| job.trace.clone())
    }

    /// Where `POST /jobs/:id/artifacts` stores a file, when `token` is that running job's.
    pub(crate) fn artifacts_destination(
        &self,
        job_id: u64,
        token: &str,
        artifact_type: &str,
    ) -> Option<PathBuf> {
        let index = self.authorized_job(job_id, token)?;
        if !matches!(
            self.jobs[index].status,
            JobStatus::Running | JobStatus::Canceling
        ) {
            return None;
        }
        let safe: String = artifact_type
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        Some(
            self.environment
                .artifacts_dir
                .join(job_id.to_string())
                .join(format!("{safe}.upload")),
        )
    }

    /// Records an uploaded file.
    pub(crate) fn artifacts_stored(&mut self, job_id: u64, artifact: StoredArtifact) {
        if let Some(job) = self.jobs.iter_mut().find(|job| job.id == job_id) {
            job.artifacts
                .retain(|existing| existing.artifact_type != artifact.artifact_type);
            job.artifacts.push(artifact);
        }
    }

    /// `GET /jobs/:id/artifacts`: allowed to the job itself and to jobs that fetch its artifacts.
    pub(crate) fn artifacts_for(&self, job_id: u64, token: &str) -> ArtifactsAccess {
        let Some(owner) = self.jobs.iter().position(|job| job.id == job_id) else {
            return ArtifactsAccess::NotFound;
        };
        let allowed = !token.is_empty()
            && self.jobs.iter().enumerate().any(|(index, job)| {
                job.token.as_deref() == Some(token)
                    && job.holds_token()
                    && (index == owner || job.artifacts_from.contains(&owner))
            });
        if !allowed {
            return ArtifactsAccess::Forbidden;
        }
        match self.jobs[owner]
            .artifacts
            .iter()
            .find(|artifact| artifact.artifact_type == "archive")
        {
            Some(artifact) => ArtifactsAccess::Allowed(artifact.clone()),
            None => ArtifactsAccess::NotFound,
        }
    }

    /// The directory `git http-backend` serves, when `path` names the served repository.
    pub(crate) fn sources_root(&self, path: &str) -> Option<PathBuf> {
        let sources = self.environment.sources.as_ref()?;
        let prefix = format!("/{}/", sources.repository);
        path.starts_with(&prefix).then(|| sources.root.clone())
    }

    /// Whether `token` is the token of a job that is pending or running (to clone sources).
    pub(crate) fn job_token_active(&self, token: &str) -> bool {
        !token.is_empty()
            && self
                .jobs
                .iter()
                .any(|job| job.token.as_deref() == Some(token) && job.holds_token())
    }

    fn job_payload(&self, job_index: usize) -> JobResponse {
        let job = &self.jobs[job_index];
        let runner = job.runner.map(|index| (index, &self.runners[index]));
        let environment = &self.environment;
        let project = &environment.project;
        let token = job.token.clone().unwrap_or_default();
        let timeout = job
            .spec
            .timeout
            .map_or(environment.job_timeout.as_secs(), |seconds| {
                seconds.min(environment.job_timeout.as_secs())
            }) as i64;

        let mut variables: Vec<JobVariable> = project
            .predefined_variables()
            .iter()
            .map(from_pipeline)
            .collect();
        variables.extend([
            variable("CI_SERVER_URL", environment.server_url.clone()),
            variable(
                "CI_API_V4_URL",
                format!("{}/api/v4", environment.server_url),
            ),
            variable("CI_JOB_ID", job.id.to_string()),
            variable("CI_JOB_NAME", job.spec.name.clone()),
            variable("CI_JOB_NAME_SLUG", crate::project::slug(&job.spec.name)),
            variable("CI_JOB_STAGE", job.spec.stage.clone()),
            variable(
                "CI_JOB_URL",
                format!(
                    "{}/{}/-/jobs/{}",
                    environment.server_url, project.path, job.id
                ),
            ),
            JobVariable {
                key: "CI_JOB_TOKEN".to_owned(),
                value: token.clone(),
                public: false,
                masked: true,
                ..JobVariable::default()
            },
        ]);
        if job.spec.when == When::Manual {
            variables.push(variable("CI_JOB_MANUAL", "true"));
        }
        if let Some(environment) = &job.spec.environment {
            variables.push(variable("CI_ENVIRONMENT_NAME", environment.name.clone()));
            variables.push(variable(
                "CI_ENVIRONMENT_SLUG",
                crate::project::slug(&environment.name),
            ));
            if let Some(url) = &environment.url {
                variables.push(variable("CI_ENVIRONMENT_URL", url.clone()));
            }
        }
        if let Some((index, runner)) = runner {
            variables.push(variable("CI_RUNNER_ID", (index + 1).to_string()));
            variables.push(variable(
                "CI_RUNNER_DESCRIPTION",
                runner.description.clone(),
            ));
            variables.push(variable("CI_RUNNER_TAGS", runner.tags.join(", ")));
        }
        variables.extend(
            self.global_variables
                .iter()
                .filter(|variable| {
                    job.spec
                        .inherited_variables
                        .as_ref()
                        .is_none_or(|allowed| allowed.contains(&variable.key))
                })
                .map(from_pipeline),
        );
        variables.extend(job.spec.variables.iter().map(from_pipeline));
        // Command-line variables win, like GitLab's project variables.
        variables.extend(self.user_variables.iter().map(from_pipeline));

        let mut steps = vec![Step {
            name: "script".to_owned(),
            script: job
                .spec
                .before_script
                .iter()
                .chain(&job.spec.script)
                .cloned()
                .collect(),
            timeout,
            when: StepWhen::OnSuccess,
            allow_failure: false,
        }];
        if !job.spec.after_script.is_empty() {
            steps.push(Step {
                name: "after_script".to_owned(),
                script: job.spec.after_script.clone(),
                timeout,
                when: StepWhen::Always,
                allow_failure: true,
            });
        }

        let git_info = match &environment.sources {
            Some(sources) => sources.git_info(&environment.server_url, &token),
            None => GitInfo {
                repo_url: Secret::new(format!("file://{}", project.dir.display())),
                git_ref: "local".to_owned(),
                sha: "0".repeat(40),
                before_sha: "0".repeat(40),
                ref_type: "branch".to_owned(),
                ..GitInfo::default()
            },
        };
        let dependencies = job
            .artifacts_from
            .iter()
            .map(|&index| {
                let other = &self.jobs[index];
                Dependency {
                    id: other.id,
                    name: other.spec.name.clone(),
                    token: Secret::new(token.clone()),
                    artifacts_file: other
                        .artifacts
                        .iter()
                        .find(|artifact| artifact.artifact_type == "archive")
                        .map(|artifact| ArtifactsFile {
                            filename: artifact.filename.clone(),
                            size: artifact.size,
                        }),
                }
            })
            .collect();
        JobResponse {
            id: job.id,
            token: Secret::new(token),
            allow_git_fetch: false,
            job_info: JobInfo {
                id: job.id,
                name: job.spec.name.clone(),
                stage: job.spec.stage.clone(),
                pipeline_id: self.pipeline_id,
                project_id: 1,
                project_name: project.name.clone(),
                project_full_path: project.path.clone(),
                ..JobInfo::default()
            },
            git_info,
            runner_info: RunnerJobInfo {
                timeout,
                runner_session_url: None,
            },
            variables,
            steps,
            image: job.spec.image.clone(),
            services: job.spec.services.clone(),
            artifacts: job.spec.artifacts.clone(),
            cache: job.spec.cache.clone(),
            dependencies,
            features: JobFeatures {
                trace_sections: true,
                failure_reasons: FAILURE_REASONS.iter().map(|r| r.to_string()).collect(),
                token_mask_prefixes: Vec::new(),
            },
            ..JobResponse::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::parse_pipeline;
    use podfleet_coordinator::model::RunnerInfo;

    fn runner(token: &str, tags: &[&str], run_untagged: bool) -> RunnerRegistration {
        RunnerRegistration {
            token: token.to_owned(),
            description: format!("runner {token}"),
            tags: tags.iter().map(|tag| tag.to_string()).collect(),
            run_untagged,
        }
    }

    fn state(yaml: &str, runners: Vec<RunnerRegistration>) -> CoordinatorState {
        state_with(yaml, runners, false)
    }

    fn state_with(
        yaml: &str,
        runners: Vec<RunnerRegistration>,
        run_manual: bool,
    ) -> CoordinatorState {
        let pipeline = parse_pipeline(yaml, "test.yml").expect("valid pipeline");
        let (events, _) = broadcast::channel(64);
        let (report, _) = watch::channel(None);
        CoordinatorState::new(
            pipeline,
            runners,
            Environment {
                server_url: "http://127.0.0.1:1".to_owned(),
                project: Project::detached(std::path::Path::new("/src/demo")),
                job_timeout: Duration::from_secs(600),
                run_manual,
                artifacts_dir: PathBuf::from("/nonexistent/artifacts"),
                sources: None,
            },
            events,
            report,
        )
    }

    fn offered(state: &mut CoordinatorState, token: &str) -> Option<String> {
        match state.request_job(token, true) {
            RequestOutcome::Job(job) => Some(job.job_info.name),
            RequestOutcome::NoJob { .. } => None,
            RequestOutcome::Forbidden => panic!("token {token} unknown"),
        }
    }

    #[test]
    fn tagged_jobs_go_only_to_runners_holding_every_tag() {
        let yaml = "pinp:\n  tags: [pinp, podman]\n  script: x\nplain:\n  script: y\n";
        let mut coordinator = state(
            yaml,
            vec![
                runner("podman-only", &["podman"], false),
                runner("untagged", &[], true),
                runner("both", &["pinp", "podman", "extra"], false),
            ],
        );
        assert_eq!(offered(&mut coordinator, "podman-only"), None);
        assert_eq!(offered(&mut coordinator, "both").as_deref(), Some("pinp"));
        assert_eq!(
            offered(&mut coordinator, "both"),
            None,
            "untagged needs run_untagged"
        );
        assert_eq!(
            offered(&mut coordinator, "untagged").as_deref(),
            Some("plain")
        );
    }

    #[test]
    fn unknown_tokens_are_forbidden() {
        let mut coordinator = state("a:\n  script: x\n", vec![runner("r", &[], true)]);
        assert!(matches!(
            coordinator.verify("nope"),
            VerifyOutcome::Forbidden
        ));
        assert!(matches!(coordinator.verify(""), VerifyOutcome::Forbidden));
        assert!(matches!(
            coordinator.request_job("nope", true),
            RequestOutcome::Forbidden
        ));
    }

    fn update(outcome: JobState, exit_code: i32) -> UpdateJobRequest {
        let mut request = UpdateJobRequest::new(RunnerInfo::default(), "", outcome);
        request.exit_code = exit_code;
        request.failure_reason = (outcome == JobState::Failed).then(|| "script_failure".to_owned());
        request
    }

    /// Takes the next job for the runner "r", runs it to `state` and returns its name.
    fn run_next(state: &mut CoordinatorState, outcome: JobState, exit_code: i32) -> Option<String> {
        let RequestOutcome::Job(job) = state.request_job("r", false) else {
            return None;
        };
        let request = update(outcome, exit_code);
        assert!(matches!(
            state.update_job(job.id, job.token.expose(), &request),
            UpdateOutcome::Accepted { .. }
        ));
        Some(job.job_info.name)
    }

    #[test]
    fn upcoming_jobs_are_the_widest_stage_left_less_the_running_ones() {
        let yaml = "stages: [build, test, deploy]\n\
                    build: { stage: build, script: x }\n\
                    unit: { stage: test, script: x }\n\
                    lint: { stage: test, script: x }\n\
                    pinp-build: { stage: test, tags: [pinp], script: x }\n\
                    deploy: { stage: deploy, script: x }\n";
        let mut coordinator = state(
            yaml,
            vec![runner("r", &[], true), runner("p", &["pinp"], false)],
        );
        let upcoming = |state: &CoordinatorState| -> Vec<usize> {
            state.upcoming_jobs().into_iter().map(|u| u.jobs).collect()
        };
        let handed_out = |state: &CoordinatorState| -> Vec<u64> {
            state
                .upcoming_jobs()
                .into_iter()
                .map(|u| u.handed_out)
                .collect()
        };
        assert_eq!(upcoming(&coordinator), [2, 1]);
        assert_eq!(handed_out(&coordinator), [0, 0]);
        // build runs: the test stage's two jobs are still to come, one of them on build's slot.
        let RequestOutcome::Job(build) = coordinator.request_job("r", false) else {
            panic!("build is offered");
        };
        assert_eq!(upcoming(&coordinator), [1, 1]);
        assert_eq!(handed_out(&coordinator), [1, 0]);
        coordinator.update_job(
            build.id,
            build.token.expose(),
            &update(JobState::Success, 0),
        );
        assert_eq!(upcoming(&coordinator), [2, 1]);
        for _ in 0..2 {
            run_next(&mut coordinator, JobState::Success, 0).expect("a test job");
        }
        // unit and lint are over; pinp-build (for the other runner) and deploy are left.
        assert_eq!(upcoming(&coordinator), [1, 1]);
        assert_eq!(handed_out(&coordinator), [3, 0]);
    }

    fn statuses(state: &CoordinatorState) -> Vec<(String, &'static str)> {
        state
            .snapshot()
            .jobs
            .iter()
            .map(|job| (job.name.clone(), job.status.as_str()))
            .collect()
    }

    fn offered_names(state: &mut CoordinatorState) -> Vec<String> {
        let mut names = Vec::new();
        while let RequestOutcome::Job(job) = state.request_job("r", true) {
            names.push(job.job_info.name);
        }
        names
    }

    #[test]
    fn needs_start_jobs_before_their_stage_ends() {
        let yaml = "stages: [build, test]\nslow:\n  stage: build\n  script: x\nfast:\n  stage: build\n  script: x\nafter-fast:\n  stage: test\n  needs: [fast]\n  script: x\nstaged:\n  stage: test\n  script: x\n";
        let mut coordinator = state(yaml, vec![runner("r", &[], true)]);
        // `slow` is taken and keeps running; `fast` finishes.
        let RequestOutcome::Job(_slow) = coordinator.request_job("r", false) else {
            panic!("slow is offered first");
        };
        assert_eq!(
            run_next(&mut coordinator, JobState::Success, 0).as_deref(),
            Some("fast")
        );
        // The DAG job may start; the stage job still waits for `slow`.
        assert_eq!(offered_names(&mut coordinator), ["after-fast"]);
    }

    #[test]
    fn failures_skip_on_success_and_run_on_failure_and_always() {
        let yaml = "stages: [build, test]\nbroken:\n  stage: build\n  script: x\nnext:\n  stage: test\n  script: x\ncleanup:\n  stage: test\n  when: always\n  script: x\nreport:\n  stage: test\n  when: on_failure\n  script: x\n";
        let mut coordinator = state(yaml, vec![runner("r", &[], true)]);
        assert_eq!(
            run_next(&mut coordinator, JobState::Failed, 1).as_deref(),
            Some("broken")
        );
        assert_eq!(offered_names(&mut coordinator), ["cleanup", "report"]);
        let report = coordinator.snapshot();
        assert_eq!(
            report.job("next").map(|job| job.status),
            Some(JobStatus::Skipped)
        );
        assert_eq!(
            report
                .job("next")
                .and_then(|job| job.skip_reason.as_deref()),
            Some("broken failed")
        );
    }

    #[test]
    fn allowed_failures_and_exit_codes_let_the_pipeline_pass() {
        let yaml = "stages: [a, b]\nflaky:\n  stage: a\n  allow_failure:\n    exit_codes: [3]\n  script: x\nnext:\n  stage: b\n  script: x\n";
        let mut coordinator = state(yaml, vec![runner("r", &[], true)]);
        assert_eq!(
            run_next(&mut coordinator, JobState::Failed, 3).as_deref(),
            Some("flaky")
        );
        assert_eq!(
            run_next(&mut coordinator, JobState::Success, 0).as_deref(),
            Some("next")
        );
        let report = coordinator.snapshot();
        assert_eq!(report.status, PipelineStatus::Success);
        assert!(report.job("flaky").is_some_and(|job| job.allowed_failure));

        let mut coordinator = state(yaml, vec![runner("r", &[], true)]);
        assert_eq!(
            run_next(&mut coordinator, JobState::Failed, 4).as_deref(),
            Some("flaky")
        );
        assert_eq!(coordinator.snapshot().status, PipelineStatus::Failed);
    }

    #[test]
    fn retries_give_a_new_job_id_until_max() {
        let yaml = "job:\n  retry:\n    max: 2\n    when: script_failure\n  script: x\n";
        let mut coordinator = state(yaml, vec![runner("r", &[], true)]);
        let first = match coordinator.request_job("r", false) {
            RequestOutcome::Job(job) => job,
            _ => panic!("job offered"),
        };
        let failed = update(JobState::Failed, 1);
        coordinator.update_job(first.id, first.token.expose(), &failed);
        // The old token is no longer valid; a new attempt is offered.
        assert!(matches!(
            coordinator.update_job(first.id, first.token.expose(), &failed),
            UpdateOutcome::Forbidden { .. }
        ));
        assert_eq!(
            run_next(&mut coordinator, JobState::Failed, 1).as_deref(),
            Some("job")
        );
        assert_eq!(
            run_next(&mut coordinator, JobState::Failed, 1).as_deref(),
            Some("job")
        );
        assert_eq!(run_next(&mut coordinator, JobState::Failed, 1), None);
        let report = coordinator.snapshot();
        assert_eq!(report.jobs[0].retries, 2);
        assert_eq!(report.status, PipelineStatus::Failed);
    }

    #[test]
    fn retry_when_filters_failure_reasons() {
        let yaml = "job:\n  retry:\n    max: 2\n    when: runner_system_failure\n  script: x\n";
        let mut coordinator = state(yaml, vec![runner("r", &[], true)]);
        assert_eq!(
            run_next(&mut coordinator, JobState::Failed, 1).as_deref(),
            Some("job")
        );
        assert_eq!(run_next(&mut coordinator, JobState::Failed, 1), None);
        assert_eq!(coordinator.snapshot().jobs[0].retries, 0);
    }

    #[test]
    fn manual_jobs_wait_for_the_flag() {
        let yaml = "stages: [a, b]\ndeploy:\n  stage: a\n  when: manual\n  script: x\nafter:\n  stage: b\n  script: x\ngated:\n  stage: b\n  needs: [deploy]\n  script: x\n";
        let mut coordinator = state(yaml, vec![runner("r", &[], true)]);
        // `deploy` allows failure (manual without rules), so the stage job still runs.
        assert_eq!(offered_names(&mut coordinator), ["after"]);
        assert_eq!(
            statuses(&coordinator),
            [
                ("deploy".to_owned(), "manual"),
                ("after".to_owned(), "pending"),
                ("gated".to_owned(), "skipped")
            ]
        );
        let mut coordinator = state_with(yaml, vec![runner("r", &[], true)], true);
        assert_eq!(
            run_next(&mut coordinator, JobState::Success, 0).as_deref(),
            Some("deploy")
        );
        assert_eq!(offered_names(&mut coordinator), ["after", "gated"]);
    }

    #[test]
    fn resource_groups_run_one_job_at_a_time() {
        let yaml = "one:\n  resource_group: prod\n  script: x\ntwo:\n  resource_group: prod\n  script: x\n";
        let mut coordinator = state(yaml, vec![runner("r", &[], true)]);
        assert_eq!(offered_names(&mut coordinator), ["one"]);
    }

    #[test]
    fn delayed_jobs_are_scheduled() {
        let yaml = "later:\n  when: delayed\n  start_in: 1 hour\n  script: x\n";
        let mut coordinator = state(yaml, vec![runner("r", &[], true)]);
        assert!(offered_names(&mut coordinator).is_empty());
        assert_eq!(statuses(&coordinator), [("later".to_owned(), "scheduled")]);
    }

    #[test]
    fn payloads_carry_artifacts_cache_services_and_dependencies() {
        let yaml = r#"
stages: [build, test]
build:
  stage: build
  image: {name: "alpine:3", entrypoint: [""], pull_policy: if-not-present}
  services:
    - name: postgres:16
      alias: db
      command: ["postgres", "-c", "fsync=off"]
      variables: {POSTGRES_PASSWORD: x}
  artifacts:
    paths: [out/]
    expire_in: 1 week
    reports:
      junit: report.xml
  cache:
    key: deps-$CI_COMMIT_REF_SLUG
    paths: [.cache/]
    policy: pull
  timeout: 10m
  script: x
test:
  stage: test
  variables:
    SECRET: {value: s, expand: false}
  script: x
"#;
        let mut coordinator = state(yaml, vec![runner("r", &[], true)]);
        let RequestOutcome::Job(build) = coordinator.request_job("r", false) else {
            panic!("build offered");
        };
        assert_eq!(build.runner_info.timeout, 600);
        assert_eq!(build.steps[0].timeout, 600);
        let image = build.image.as_ref().expect("image");
        assert_eq!(
            (image.name.as_str(), image.entrypoint.as_slice()),
            ("alpine:3", [String::new()].as_slice())
        );
        assert_eq!(image.pull_policy, ["if-not-present"]);
        assert_eq!(build.services[0].alias, "db");
        assert_eq!(build.services[0].command, ["postgres", "-c", "fsync=off"]);
        assert_eq!(build.services[0].variables[0].key, "POSTGRES_PASSWORD");
        assert_eq!(build.artifacts.len(), 2);
        assert_eq!(
            (
                build.artifacts[0].artifact_type.as_str(),
                build.artifacts[0].artifact_format.as_str(),
                build.artifacts[0].expire_in.as_str()
            ),
            ("archive", "zip", "1 week")
        );
        assert_eq!(build.artifacts[1].artifact_type, "junit");
        assert_eq!(build.cache[0].key, "deps-local");
        assert_eq!(build.cache[0].policy, "pull");
        coordinator.artifacts_stored(
            build.id,
            StoredArtifact {
                path: PathBuf::from("/tmp/a.zip"),
                filename: "artifacts.zip".to_owned(),
                size: 12,
                artifact_type: "archive".to_owned(),
            },
        );
        let done = update(JobState::Success, 0);
        coordinator.update_job(build.id, build.token.expose(), &done);
        let RequestOutcome::Job(test) = coordinator.request_job("r", false) else {
            panic!("test offered");
        };
        assert_eq!(test.dependencies.len(), 1);
        assert_eq!(test.dependencies[0].id, build.id);
        assert_eq!(test.dependencies[0].token.expose(), test.token.expose());
        assert_eq!(
            test.dependencies[0]
                .artifacts_file
                .as_ref()
                .map(|file| (file.filename.as_str(), file.size)),
            Some(("artifacts.zip", 12))
        );
        let secret = test
            .variables
            .iter()
            .find(|variable| variable.key == "SECRET")
            .expect("variable");
        assert!(secret.raw);
        // The dependency's token may fetch the archive; the finished build's may not.
        assert!(matches!(
            coordinator.artifacts_for(build.id, test.token.expose()),
            ArtifactsAccess::Allowed(_)
        ));
        assert!(matches!(
            coordinator.artifacts_for(build.id, build.token.expose()),
            ArtifactsAccess::Forbidden
        ));
        assert!(matches!(
            coordinator.artifacts_for(build.id, "nope"),
            ArtifactsAccess::Forbidden
        ));
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(range_start("0-511"), Some(0));
        assert_eq!(range_start("512-1023"), Some(512));
        assert_eq!(range_start("bytes 0-1"), None);
        assert_eq!(range_start("12"), None);
    }
}
