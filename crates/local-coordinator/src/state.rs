//! The pipeline state machine: one owner of every job's status, token, runner and trace.
//! It knows nothing of HTTP; the edge in `http.rs` turns its typed results into responses.

use std::time::Duration;

use chrono::Utc;
use podfleet_coordinator::model::{
    FailureReason, GitInfo, Image, JobFeatures, JobInfo, JobResponse, JobState, JobVariable,
    RunnerJobInfo, Secret, Step, StepWhen, UpdateJobRequest,
};
use tokio::sync::{broadcast, watch};

use crate::pipeline::{JobSpec, Pipeline, Variable, When};
use crate::report::{JobReport, JobStatus, PipelineEvent, PipelineReport, PipelineStatus};
use crate::{GitRevision, RunnerRegistration};

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
    pub project_name: String,
    pub project_dir: String,
    pub job_timeout: Duration,
    pub git: Option<GitRevision>,
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

pub(crate) struct CoordinatorState {
    pipeline_id: u64,
    environment: Environment,
    stages: Vec<String>,
    global_variables: Vec<Variable>,
    jobs: Vec<Job>,
    runners: Vec<RunnerRegistration>,
    current_stage: usize,
    queue_salt: u32,
    queue_tick: u64,
    canceled: bool,
    finished: bool,
    events: broadcast::Sender<PipelineEvent>,
    report: watch::Sender<Option<PipelineReport>>,
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

/// `Content-Range: <start>-<end>`: the start (Rails ignores the end too).
fn range_start(content_range: &str) -> Option<u64> {
    let (start, end) = content_range.trim().split_once('-')?;
    end.trim().parse::<u64>().ok()?;
    start.trim().parse().ok()
}

impl CoordinatorState {
    pub(crate) fn new(
        pipeline: Pipeline,
        runners: Vec<RunnerRegistration>,
        environment: Environment,
        events: broadcast::Sender<PipelineEvent>,
        report: watch::Sender<Option<PipelineReport>>,
    ) -> Self {
        let jobs = pipeline
            .jobs
            .into_iter()
            .zip(1u64..)
            .map(|(spec, id)| Job {
                id,
                spec,
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
            })
            .collect();
        let mut state = CoordinatorState {
            pipeline_id: 1,
            environment,
            stages: pipeline.stages,
            global_variables: pipeline.variables,
            jobs,
            runners,
            current_stage: 0,
            queue_salt: rand::random(),
            queue_tick: 0,
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
        format!("{:08x}{:08x}", self.queue_salt, self.queue_tick)
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

    /// Hands the first pending job this runner may run to it. With `two_phase` the job stays
    /// pending until the runner confirms with `state: running`.
    pub(crate) fn request_job(&mut self, token: &str, two_phase: bool) -> RequestOutcome {
        let Some(runner_index) = self.runner_index(token) else {
            return RequestOutcome::Forbidden;
        };
        let runner = &self.runners[runner_index];
        let Some(job_index) = self.jobs.iter().position(|job| {
            job.status == JobStatus::Pending
                && job.runner.is_none()
                && runner_can_run(runner, &job.spec)
        }) else {
            return RequestOutcome::NoJob {
                last_update: self.queue_value(),
            };
        };
        let job = &mut self.jobs[job_index];
        job.runner = Some(runner_index);
        job.token = Some(new_job_token());
        self.queue_tick += 1;
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
            (JobStatus::Pending, JobState::Pending) | (JobStatus::Running, JobState::Running) => {
                UpdateOutcome::Accepted { status: job.status }
            }
            (JobStatus::Pending, _) => UpdateOutcome::BadRequest {
                message: format!(
                    "job {job_id} waits for the two-phase acknowledgement: send state running first"
                ),
            },
            (JobStatus::Running, JobState::Pending) => UpdateOutcome::Conflict {
                status: JobStatus::Running,
            },
            (JobStatus::Running, final_state) => {
                let claimed = if request.output.checksum.is_empty() {
                    request.checksum.as_str()
                } else {
                    request.output.checksum.as_str()
                };
                if !claimed.is_empty() && claimed != checksum(&job.trace) {
                    job.trace_reset_requested = true;
                    return UpdateOutcome::ChecksumMismatch {
                        status: JobStatus::Running,
                    };
                }
                let status = if final_state == JobState::Success {
                    JobStatus::Success
                } else {
                    JobStatus::Failed
                };
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
                let event = PipelineEvent::JobFinished {
                    job_id,
                    name: job.spec.name.clone(),
                    status,
                    exit_code: job.exit_code,
                };
                self.emit(event);
                self.advance();
                UpdateOutcome::Accepted { status }
            }
            (status, _) => UpdateOutcome::Forbidden {
                status: Some(status),
            },
        }
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
            JobStatus::Running | JobStatus::Pending => {}
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

    /// Cancels every job that has not ended; runners learn it on their next call.
    pub(crate) fn cancel_all(&mut self) {
        if self.finished {
            return;
        }
        self.canceled = true;
        let now = Utc::now();
        let mut finished_events = Vec::new();
        for job in &mut self.jobs {
            if matches!(
                job.status,
                JobStatus::Created | JobStatus::Pending | JobStatus::Running
            ) {
                // A job no runner holds has nobody to tell.
                job.cancel_announced = job.runner.is_none();
                job.status = JobStatus::Canceled;
                job.finished_at = Some(now);
                finished_events.push(PipelineEvent::JobFinished {
                    job_id: job.id,
                    name: job.spec.name.clone(),
                    status: JobStatus::Canceled,
                    exit_code: None,
                });
            }
        }
        for event in finished_events {
            self.emit(event);
        }
        self.finish_pipeline();
    }

    fn failed_so_far(&self) -> bool {
        self.jobs
            .iter()
            .any(|job| job.status == JobStatus::Failed && !job.spec.allow_failure)
    }

    /// Queues the jobs of the current stage, skipping `on_success` jobs after a failure, and
    /// moves on while stages have nothing left to run.
    fn advance(&mut self) {
        while !self.finished {
            let Some(stage) = self.stages.get(self.current_stage).cloned() else {
                self.finish_pipeline();
                return;
            };
            let failed = self.failed_so_far();
            let mut skipped = Vec::new();
            for job in self
                .jobs
                .iter_mut()
                .filter(|job| job.spec.stage == stage && job.status == JobStatus::Created)
            {
                if failed && job.spec.when == When::OnSuccess {
                    job.status = JobStatus::Skipped;
                    skipped.push(PipelineEvent::JobFinished {
                        job_id: job.id,
                        name: job.spec.name.clone(),
                        status: JobStatus::Skipped,
                        exit_code: None,
                    });
                } else {
                    job.status = JobStatus::Pending;
                    self.queue_tick += 1;
                }
            }
            for event in skipped {
                self.emit(event);
            }
            let busy = self.jobs.iter().any(|job| {
                job.spec.stage == stage
                    && matches!(job.status, JobStatus::Pending | JobStatus::Running)
            });
            if busy {
                return;
            }
            self.current_stage += 1;
        }
    }

    fn finish_pipeline(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let status = if self.canceled {
            PipelineStatus::Canceled
        } else if self.failed_so_far() {
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

    fn job_payload(&self, job_index: usize) -> JobResponse {
        let job = &self.jobs[job_index];
        let runner = job.runner.map(|index| (index, &self.runners[index]));
        let environment = &self.environment;
        let token = job.token.clone().unwrap_or_default();
        let timeout = environment.job_timeout.as_secs() as i64;
        let project_path = format!("local/{}", environment.project_name);

        let mut variables = vec![
            variable("CI", "true"),
            variable("GITLAB_CI", "true"),
            variable("CI_SERVER_URL", environment.server_url.clone()),
            variable(
                "CI_API_V4_URL",
                format!("{}/api/v4", environment.server_url),
            ),
            variable("CI_PIPELINE_ID", self.pipeline_id.to_string()),
            variable("CI_PIPELINE_IID", self.pipeline_id.to_string()),
            variable("CI_PIPELINE_SOURCE", "push"),
            variable("CI_JOB_ID", job.id.to_string()),
            variable("CI_JOB_NAME", job.spec.name.clone()),
            variable("CI_JOB_STAGE", job.spec.stage.clone()),
            JobVariable {
                key: "CI_JOB_TOKEN".to_owned(),
                value: token.clone(),
                public: false,
                masked: true,
                ..JobVariable::default()
            },
            variable("CI_PROJECT_ID", "1"),
            variable("CI_PROJECT_NAME", environment.project_name.clone()),
            variable("CI_PROJECT_PATH", project_path.clone()),
            variable("CI_PROJECT_NAMESPACE", "local"),
        ];
        if let Some(git) = &environment.git {
            variables.push(variable("CI_COMMIT_SHA", git.sha.clone()));
            variables.push(variable(
                "CI_COMMIT_SHORT_SHA",
                git.sha.chars().take(8).collect::<String>(),
            ));
            variables.push(variable("CI_COMMIT_REF_NAME", git.ref_name.clone()));
            variables.push(variable("CI_COMMIT_BRANCH", git.ref_name.clone()));
        }
        if let Some((index, runner)) = runner {
            variables.push(variable("CI_RUNNER_ID", (index + 1).to_string()));
            variables.push(variable(
                "CI_RUNNER_DESCRIPTION",
                runner.description.clone(),
            ));
            variables.push(variable("CI_RUNNER_TAGS", runner.tags.join(", ")));
        }
        let from_yaml = |variable: &Variable| JobVariable {
            key: variable.key.clone(),
            value: variable.value.clone(),
            public: true,
            raw: variable.raw,
            ..JobVariable::default()
        };
        variables.extend(self.global_variables.iter().map(from_yaml));
        variables.extend(job.spec.variables.iter().map(from_yaml));

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

        let (sha, ref_name) = match &environment.git {
            Some(git) => (git.sha.clone(), git.ref_name.clone()),
            None => ("0".repeat(40), "local".to_owned()),
        };
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
                project_name: environment.project_name.clone(),
                project_full_path: project_path,
                ..JobInfo::default()
            },
            git_info: GitInfo {
                repo_url: Secret::new(format!("file://{}", environment.project_dir)),
                git_ref: ref_name,
                sha,
                before_sha: "0".repeat(40),
                ref_type: "branch".to_owned(),
                ..GitInfo::default()
            },
            runner_info: RunnerJobInfo {
                timeout,
                runner_session_url: None,
            },
            variables,
            steps,
            image: job.spec.image.as_ref().map(|image| Image {
                name: image.name.clone(),
                entrypoint: image.entrypoint.clone(),
                ..Image::default()
            }),
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

    fn runner(token: &str, tags: &[&str], run_untagged: bool) -> RunnerRegistration {
        RunnerRegistration {
            token: token.to_owned(),
            description: format!("runner {token}"),
            tags: tags.iter().map(|tag| tag.to_string()).collect(),
            run_untagged,
        }
    }

    fn state(yaml: &str, runners: Vec<RunnerRegistration>) -> CoordinatorState {
        let pipeline = parse_pipeline(yaml, "test.yml").expect("valid pipeline");
        let (events, _) = broadcast::channel(64);
        let (report, _) = watch::channel(None);
        CoordinatorState::new(
            pipeline,
            runners,
            Environment {
                server_url: "http://127.0.0.1:1".to_owned(),
                project_name: "demo".to_owned(),
                project_dir: "/src/demo".to_owned(),
                job_timeout: Duration::from_secs(600),
                git: None,
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

    #[test]
    fn content_range_parsing() {
        assert_eq!(range_start("0-511"), Some(0));
        assert_eq!(range_start("512-1023"), Some(512));
        assert_eq!(range_start("bytes 0-1"), None);
        assert_eq!(range_start("12"), None);
    }
}
