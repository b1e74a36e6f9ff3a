//! The GitLab runner API wire model: every JSON body a runner sends or receives.
//!
//! Decoding is lenient, as gitlab-runner's is: unknown fields are ignored and `null` or missing
//! fields decode to their default. Encoding follows gitlab-runner's field omission rules exactly,
//! because Rails distinguishes "absent" from "empty" for some of them.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

/// Decodes `null` as the type's default (Grape exposes unset entity fields as `null`).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero_i32(value: &i32) -> bool {
    *value == 0
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

/// A credential (runner token, job token, password, URL with credentials) whose `Debug` and
/// `Display` never show the value. Serialises transparently.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value, for the places that must send or use it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Secret([REDACTED])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("[REDACTED]")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

// ---------------------------------------------------------------------------------------------
// §3: the `info` block
// ---------------------------------------------------------------------------------------------

/// The runner feature map. Field order is the serialisation order gitlab-runner uses, which
/// GitLab's own tests pin; do not reorder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FeaturesInfo {
    pub variables: bool,
    pub image: bool,
    pub services: bool,
    pub artifacts: bool,
    pub cache: bool,
    pub fallback_cache_keys: bool,
    pub shared: bool,
    pub upload_multiple_artifacts: bool,
    pub upload_raw_artifacts: bool,
    pub session: bool,
    pub terminal: bool,
    pub refspecs: bool,
    pub masking: bool,
    pub proxy: bool,
    pub raw_variables: bool,
    pub artifacts_exclude: bool,
    pub multi_build_steps: bool,
    pub trace_reset: bool,
    pub trace_checksum: bool,
    pub trace_size: bool,
    pub vault_secrets: bool,
    pub cancelable: bool,
    pub return_exit_code: bool,
    pub service_variables: bool,
    pub service_multiple_aliases: bool,
    pub image_executor_opts: bool,
    pub service_executor_opts: bool,
    pub cancel_gracefully: bool,
    pub native_steps_integration: bool,
    pub two_phase_job_commit: bool,
    pub job_inputs: bool,
}

impl FeaturesInfo {
    /// Exactly what podfleet implements today. Advertising a feature makes GitLab hand us jobs
    /// that need it, so each `true` here is a promise the manager keeps.
    pub fn podfleet() -> Self {
        FeaturesInfo {
            variables: true,
            image: true,
            services: true,
            shared: false,
            masking: true,
            raw_variables: true,
            trace_reset: true,
            trace_checksum: true,
            trace_size: true,
            cancelable: true,
            return_exit_code: true,
            two_phase_job_commit: true,
            // Not until the manager runs after_script on `Job-Status: canceling`.
            cancel_gracefully: false,
            ..FeaturesInfo::default()
        }
    }
}

/// `info.config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunnerConfigInfo {
    #[serde(deserialize_with = "null_as_default")]
    pub gpus: String,
}

/// The `info` block sent with verify, job requests and every job update.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunnerInfo {
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(deserialize_with = "null_as_default")]
    pub version: String,
    #[serde(deserialize_with = "null_as_default")]
    pub revision: String,
    #[serde(deserialize_with = "null_as_default")]
    pub platform: String,
    #[serde(deserialize_with = "null_as_default")]
    pub architecture: String,
    #[serde(deserialize_with = "null_as_default")]
    pub executor: String,
    #[serde(
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub shell: String,
    #[serde(deserialize_with = "null_as_default")]
    pub features: FeaturesInfo,
    #[serde(deserialize_with = "null_as_default")]
    pub config: RunnerConfigInfo,
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub labels: BTreeMap<String, String>,
}

impl RunnerInfo {
    /// podfleet's info block for a given executor name (e.g. `docker-autoscaler`) and shell.
    pub fn podfleet(executor: &str, shell: &str) -> Self {
        RunnerInfo {
            name: "podfleet".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            revision: "unknown".to_owned(),
            platform: std::env::consts::OS.to_owned(),
            architecture: go_architecture(std::env::consts::ARCH).to_owned(),
            executor: executor.to_owned(),
            shell: shell.to_owned(),
            features: FeaturesInfo::podfleet(),
            config: RunnerConfigInfo::default(),
            labels: BTreeMap::new(),
        }
    }
}

/// GitLab shows Go's architecture names (`amd64`, `arm64`), not Rust's.
fn go_architecture(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// §2: verify
// ---------------------------------------------------------------------------------------------

/// Body of `POST /api/v4/runners/verify`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VerifyRequest {
    pub info: RunnerInfo,
    pub token: Secret,
    #[serde(
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub system_id: String,
}

/// The 200 answer of `POST /api/v4/runners/verify`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VerifyResponse {
    #[serde(deserialize_with = "null_as_default")]
    pub id: u64,
    pub token: Secret,
    pub token_expires_at: Option<DateTime<Utc>>,
}

/// Body of `POST /api/v4/runners/reset_authentication_token`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetTokenRequest {
    pub token: Secret,
}

/// `POST /runners/reset_authentication_token` answer (201): the runner's new token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetTokenResponse {
    pub token: Secret,
    pub token_expires_at: Option<DateTime<Utc>>,
}

// ---------------------------------------------------------------------------------------------
// §4: job request
// ---------------------------------------------------------------------------------------------

/// `session` of a job request (only with a session server, which podfleet does not run yet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionInfo {
    pub url: String,
    pub certificate: String,
    pub authorization: Secret,
}

/// Body of `POST /api/v4/jobs/request`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobRequest {
    pub info: RunnerInfo,
    pub token: Secret,
    #[serde(
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub system_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_update: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionInfo>,
}

// ---------------------------------------------------------------------------------------------
// §5: the job payload
// ---------------------------------------------------------------------------------------------

/// The 201 body of `POST /api/v4/jobs/request`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobResponse {
    #[serde(deserialize_with = "null_as_default")]
    pub id: u64,
    pub token: Secret,
    #[serde(deserialize_with = "null_as_default")]
    pub allow_git_fetch: bool,
    #[serde(deserialize_with = "null_as_default")]
    pub job_info: JobInfo,
    #[serde(deserialize_with = "null_as_default")]
    pub git_info: GitInfo,
    #[serde(deserialize_with = "null_as_default")]
    pub runner_info: RunnerJobInfo,
    #[serde(deserialize_with = "null_as_default")]
    pub variables: Vec<JobVariable>,
    #[serde(deserialize_with = "null_as_default")]
    pub steps: Vec<Step>,
    #[serde(deserialize_with = "null_as_default")]
    pub hooks: Vec<Hook>,
    pub image: Option<Image>,
    #[serde(deserialize_with = "null_as_default")]
    pub services: Vec<Service>,
    #[serde(deserialize_with = "null_as_default")]
    pub artifacts: Vec<Artifact>,
    #[serde(deserialize_with = "null_as_default")]
    pub cache: Vec<Cache>,
    #[serde(deserialize_with = "null_as_default")]
    pub credentials: Vec<Credentials>,
    #[serde(deserialize_with = "null_as_default")]
    pub dependencies: Vec<Dependency>,
    #[serde(deserialize_with = "null_as_default")]
    pub features: JobFeatures,
}

/// `job_info`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobInfo {
    #[serde(deserialize_with = "null_as_default")]
    pub id: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(deserialize_with = "null_as_default")]
    pub stage: String,
    #[serde(deserialize_with = "null_as_default")]
    pub pipeline_id: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub project_id: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub project_name: String,
    #[serde(deserialize_with = "null_as_default")]
    pub project_full_path: String,
    #[serde(deserialize_with = "null_as_default")]
    pub namespace_id: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub root_namespace_id: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub user_id: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub time_in_queue_seconds: f64,
    #[serde(deserialize_with = "null_as_default")]
    pub queue_size: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub queue_depth: u64,
}

/// `git_info`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GitInfo {
    /// The clone URL with the job token embedded.
    pub repo_url: Secret,
    #[serde(rename = "ref", deserialize_with = "null_as_default")]
    pub git_ref: String,
    #[serde(deserialize_with = "null_as_default")]
    pub sha: String,
    #[serde(deserialize_with = "null_as_default")]
    pub before_sha: String,
    #[serde(deserialize_with = "null_as_default")]
    pub ref_type: String,
    #[serde(deserialize_with = "null_as_default")]
    pub refspecs: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub depth: u32,
    #[serde(
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub repo_object_format: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protected: Option<bool>,
}

/// `runner_info` of a job payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunnerJobInfo {
    /// Job timeout in seconds; gitlab-runner uses 7200 when this is ≤ 0.
    #[serde(deserialize_with = "null_as_default")]
    pub timeout: i64,
    pub runner_session_url: Option<String>,
}

/// One entry of `variables`. `file` and `raw` are only on the wire when true.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobVariable {
    #[serde(deserialize_with = "null_as_default")]
    pub key: String,
    #[serde(deserialize_with = "null_as_default")]
    pub value: String,
    #[serde(deserialize_with = "null_as_default")]
    pub public: bool,
    #[serde(deserialize_with = "null_as_default")]
    pub masked: bool,
    #[serde(skip_serializing_if = "is_false", deserialize_with = "null_as_default")]
    pub file: bool,
    #[serde(skip_serializing_if = "is_false", deserialize_with = "null_as_default")]
    pub raw: bool,
}

impl fmt::Debug for JobVariable {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Masked values are secrets by definition; keep them out of logs and panics.
        let value = if self.masked {
            "[MASKED]"
        } else {
            self.value.as_str()
        };
        formatter
            .debug_struct("JobVariable")
            .field("key", &self.key)
            .field("value", &value)
            .field("public", &self.public)
            .field("masked", &self.masked)
            .field("file", &self.file)
            .field("raw", &self.raw)
            .finish()
    }
}

/// When a step runs, relative to the outcome of the steps before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepWhen {
    #[default]
    OnSuccess,
    OnFailure,
    Always,
    /// A value newer than this model; the manager decides what to do with it.
    #[serde(other)]
    Unknown,
}

/// One entry of `steps` (`script`, `after_script`, `release`, …).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Step {
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(deserialize_with = "null_as_default")]
    pub script: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub timeout: i64,
    #[serde(deserialize_with = "null_as_default")]
    pub when: StepWhen,
    #[serde(deserialize_with = "null_as_default")]
    pub allow_failure: bool,
}

/// One entry of `hooks` (`pre_get_sources_script`, `post_get_sources_script`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Hook {
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(deserialize_with = "null_as_default")]
    pub script: Vec<String>,
}

/// A port exposed by an image or service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Port {
    #[serde(deserialize_with = "null_as_default")]
    pub number: u16,
    #[serde(deserialize_with = "null_as_default")]
    pub protocol: String,
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
}

/// A `{key, value}` pair of `services[].variables`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageVariable {
    #[serde(deserialize_with = "null_as_default")]
    pub key: String,
    #[serde(deserialize_with = "null_as_default")]
    pub value: String,
}

/// `executor_opts.docker`. Keys this model does not know are kept in `unsupported`, so the
/// manager can fail the job the way gitlab-runner does instead of silently ignoring them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DockerExecutorOptions {
    #[serde(
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub platform: String,
    #[serde(
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub user: String,
    #[serde(flatten)]
    pub unsupported: BTreeMap<String, serde_json::Value>,
}

/// `executor_opts.kubernetes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KubernetesExecutorOptions {
    #[serde(
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub user: String,
}

/// `executor_opts` of an image or service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecutorOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerExecutorOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesExecutorOptions>,
}

/// `image`, and each entry of `services` (gitlab-runner uses one type for both).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Image {
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    /// One alias or several separated by `,` or spaces (feature `service_multiple_aliases`).
    #[serde(
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub alias: String,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub command: Vec<String>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub entrypoint: Vec<String>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub ports: Vec<Port>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub variables: Vec<ImageVariable>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub pull_policy: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executor_opts: Option<ExecutorOptions>,
}

impl Image {
    /// The aliases of a service, split as gitlab-runner splits them.
    pub fn aliases(&self) -> Vec<&str> {
        self.alias
            .split([',', ' '])
            .filter(|alias| !alias.is_empty())
            .collect()
    }
}

/// A service container; the same wire shape as [`Image`].
pub type Service = Image;

/// One entry of `artifacts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Artifact {
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub untracked: Option<bool>,
    #[serde(deserialize_with = "null_as_default")]
    pub paths: Vec<String>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub exclude: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub when: String,
    #[serde(deserialize_with = "null_as_default")]
    pub expire_in: String,
    #[serde(deserialize_with = "null_as_default")]
    pub artifact_type: String,
    #[serde(deserialize_with = "null_as_default")]
    pub artifact_format: String,
}

/// One entry of `cache` (the key already carries Rails' protection suffixes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cache {
    #[serde(deserialize_with = "null_as_default")]
    pub key: String,
    #[serde(deserialize_with = "null_as_default")]
    pub untracked: bool,
    #[serde(deserialize_with = "null_as_default")]
    pub paths: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub policy: String,
    #[serde(deserialize_with = "null_as_default")]
    pub when: String,
    #[serde(deserialize_with = "null_as_default")]
    pub fallback_keys: Vec<String>,
}

/// One entry of `credentials` (e.g. the project registry with the job token).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Credentials {
    #[serde(rename = "type", deserialize_with = "null_as_default")]
    pub kind: String,
    #[serde(deserialize_with = "null_as_default")]
    pub url: String,
    #[serde(deserialize_with = "null_as_default")]
    pub username: String,
    pub password: Secret,
}

/// `dependencies[].artifacts_file`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ArtifactsFile {
    #[serde(deserialize_with = "null_as_default")]
    pub filename: String,
    #[serde(deserialize_with = "null_as_default")]
    pub size: u64,
}

/// One entry of `dependencies`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dependency {
    #[serde(deserialize_with = "null_as_default")]
    pub id: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    pub token: Secret,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifacts_file: Option<ArtifactsFile>,
}

/// `features` of a job payload: what the server supports for this job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobFeatures {
    #[serde(deserialize_with = "null_as_default")]
    pub trace_sections: bool,
    #[serde(deserialize_with = "null_as_default")]
    pub failure_reasons: Vec<String>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub token_mask_prefixes: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// §8: job update
// ---------------------------------------------------------------------------------------------

/// The `state` a runner reports in `PUT /api/v4/jobs/:id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Two-phase commit keep-alive while the job is being prepared.
    Pending,
    Running,
    Success,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Success => "success",
            JobState::Failed => "failed",
        }
    }

    /// Whether this state ends the job.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Success | JobState::Failed)
    }
}

/// Why a job failed, as the runner reports it (§8.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    ScriptFailure,
    RunnerSystemFailure,
    JobExecutionTimeout,
    ImagePullFailure,
    UnknownFailure,
    RunnerConfigurationError,
    RunnerExternalDependencyFailure,
    RunnerInterrupted,
    /// Internal to the runner; GitLab has no such reason, so it maps to `unknown_failure`.
    JobCanceled,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::ScriptFailure => "script_failure",
            FailureReason::RunnerSystemFailure => "runner_system_failure",
            FailureReason::JobExecutionTimeout => "job_execution_timeout",
            FailureReason::ImagePullFailure => "image_pull_failure",
            FailureReason::UnknownFailure => "unknown_failure",
            FailureReason::RunnerConfigurationError => "runner_configuration_error",
            FailureReason::RunnerExternalDependencyFailure => "runner_external_dependency_failure",
            FailureReason::RunnerInterrupted => "runner_interrupted",
            FailureReason::JobCanceled => "job_canceled",
        }
    }

    /// Reasons every GitLab version accepts, whatever the job's `failure_reasons` say.
    fn always_supported(self) -> bool {
        matches!(
            self,
            FailureReason::ScriptFailure
                | FailureReason::RunnerSystemFailure
                | FailureReason::JobExecutionTimeout
        )
    }

    /// The older reason gitlab-runner falls back to when the server does not know this one.
    fn compatible(self) -> Option<FailureReason> {
        match self {
            FailureReason::ImagePullFailure => Some(FailureReason::RunnerSystemFailure),
            FailureReason::RunnerConfigurationError => Some(FailureReason::ScriptFailure),
            FailureReason::RunnerExternalDependencyFailure => {
                Some(FailureReason::RunnerSystemFailure)
            }
            _ => None,
        }
    }

    /// Maps this reason to one the server accepts for this job, given the job payload's
    /// `features.failure_reasons`. An empty list (old servers) sends the reason unchanged.
    pub fn for_server(self, supported: &[String]) -> FailureReason {
        if supported.is_empty() {
            return self;
        }
        let is_supported =
            |reason: FailureReason| supported.iter().any(|known| known == reason.as_str());
        if self.always_supported() || is_supported(self) {
            return self;
        }
        match self.compatible() {
            Some(fallback) if fallback.always_supported() || is_supported(fallback) => fallback,
            _ => FailureReason::UnknownFailure,
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// `output` of a job update: checksum and size of the trace the runner sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TraceOutput {
    #[serde(
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub checksum: String,
    #[serde(
        skip_serializing_if = "is_zero_u64",
        deserialize_with = "null_as_default"
    )]
    pub bytesize: u64,
}

/// Body of `PUT /api/v4/jobs/:id`. Omission rules follow gitlab-runner's `omitempty` tags:
/// `failure_reason`, `checksum`, `exit_code` (when 0) and `runtime_environment_key` are left out
/// when empty; `output` is always present but its members are left out when empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateJobRequest {
    #[serde(default)]
    pub info: RunnerInfo,
    #[serde(default)]
    pub token: Secret,
    pub state: JobState,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failure_reason: Option<String>,
    /// Deprecated duplicate of `output.checksum`, still sent by gitlab-runner.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub checksum: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub output: TraceOutput,
    #[serde(skip_serializing_if = "is_zero_i32", default)]
    pub exit_code: i32,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub runtime_environment_key: String,
}

impl UpdateJobRequest {
    /// An update with no trace information (two-phase `pending`/`running` acknowledgements).
    pub fn new(info: RunnerInfo, job_token: &str, state: JobState) -> Self {
        UpdateJobRequest {
            info,
            token: Secret::new(job_token),
            state,
            failure_reason: None,
            checksum: String::new(),
            output: TraceOutput::default(),
            exit_code: 0,
            runtime_environment_key: String::new(),
        }
    }
}

/// A job's status as the server reports it in the `Job-Status` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteJobStatus {
    Created,
    Pending,
    Running,
    Success,
    Failed,
    Canceling,
    Canceled,
    Skipped,
    Manual,
    Other(String),
}

impl RemoteJobStatus {
    pub fn parse(value: &str) -> Self {
        match value.trim() {
            "created" => RemoteJobStatus::Created,
            "pending" => RemoteJobStatus::Pending,
            "running" => RemoteJobStatus::Running,
            "success" => RemoteJobStatus::Success,
            "failed" => RemoteJobStatus::Failed,
            "canceling" => RemoteJobStatus::Canceling,
            "canceled" => RemoteJobStatus::Canceled,
            "skipped" => RemoteJobStatus::Skipped,
            "manual" => RemoteJobStatus::Manual,
            other => RemoteJobStatus::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            RemoteJobStatus::Created => "created",
            RemoteJobStatus::Pending => "pending",
            RemoteJobStatus::Running => "running",
            RemoteJobStatus::Success => "success",
            RemoteJobStatus::Failed => "failed",
            RemoteJobStatus::Canceling => "canceling",
            RemoteJobStatus::Canceled => "canceled",
            RemoteJobStatus::Skipped => "skipped",
            RemoteJobStatus::Manual => "manual",
            RemoteJobStatus::Other(other) => other,
        }
    }

    /// `canceled` or `failed`: the runner must stop at once (gitlab-runner's `Abort`).
    pub fn requires_abort(&self) -> bool {
        matches!(self, RemoteJobStatus::Canceled | RemoteJobStatus::Failed)
    }
}

impl fmt::Display for RemoteJobStatus {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A GitLab API error body: `{"message":"403 Forbidden"}` or
/// `{"message":{"attr":["msg", …]}}`, flattened the way gitlab-runner does (`attr: msg; msg`).
pub fn error_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ErrorBody {
        message: serde_json::Value,
    }
    let parsed: ErrorBody = serde_json::from_slice(body).ok()?;
    match parsed.message {
        serde_json::Value::String(text) => Some(text),
        serde_json::Value::Object(fields) => {
            let parts: Vec<String> = fields
                .iter()
                .map(|(attribute, messages)| {
                    let texts: Vec<String> = match messages {
                        serde_json::Value::Array(items) => items
                            .iter()
                            .map(|item| match item {
                                serde_json::Value::String(text) => text.clone(),
                                other => other.to_string(),
                            })
                            .collect(),
                        serde_json::Value::String(text) => vec![text.clone()],
                        other => vec![other.to_string()],
                    };
                    format!("{attribute}: {}", texts.join("; "))
                })
                .collect();
            Some(parts.join(", "))
        }
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_request_omits_empty_fields() {
        let request = UpdateJobRequest::new(RunnerInfo::default(), "glcbt-x", JobState::Running);
        let json = serde_json::to_value(&request).expect("serialises");
        let object = json.as_object().expect("object");
        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        assert_eq!(keys, ["info", "output", "state", "token"]);
        assert_eq!(json["output"], serde_json::json!({}));
        let text = serde_json::to_string(&request).expect("serialises");
        assert!(
            text.ends_with(r#""token":"glcbt-x","state":"running","output":{}}"#),
            "{text}"
        );
    }

    #[test]
    fn final_update_request_has_every_field() {
        let request = UpdateJobRequest {
            failure_reason: Some("script_failure".into()),
            checksum: "crc32:0000abcd".into(),
            output: TraceOutput {
                checksum: "crc32:0000abcd".into(),
                bytesize: 12,
            },
            exit_code: 1,
            ..UpdateJobRequest::new(RunnerInfo::default(), "glcbt-x", JobState::Failed)
        };
        let json = serde_json::to_value(&request).expect("serialises");
        assert_eq!(json["state"], "failed");
        assert_eq!(json["failure_reason"], "script_failure");
        assert_eq!(json["checksum"], "crc32:0000abcd");
        assert_eq!(
            json["output"],
            serde_json::json!({"checksum": "crc32:0000abcd", "bytesize": 12})
        );
        assert_eq!(json["exit_code"], 1);
        assert!(json.get("runtime_environment_key").is_none());
    }

    #[test]
    fn failure_reasons_map_to_what_the_server_supports() {
        let supported: Vec<String> = ["script_failure", "unknown_failure", "image_pull_failure"]
            .iter()
            .map(|reason| reason.to_string())
            .collect();
        assert_eq!(
            FailureReason::ImagePullFailure.for_server(&supported),
            FailureReason::ImagePullFailure
        );
        assert_eq!(
            FailureReason::RunnerConfigurationError.for_server(&supported),
            FailureReason::ScriptFailure
        );
        assert_eq!(
            FailureReason::RunnerExternalDependencyFailure.for_server(&supported),
            FailureReason::RunnerSystemFailure
        );
        assert_eq!(
            FailureReason::RunnerInterrupted.for_server(&supported),
            FailureReason::UnknownFailure
        );
        assert_eq!(
            FailureReason::JobExecutionTimeout.for_server(&supported),
            FailureReason::JobExecutionTimeout
        );
        assert_eq!(
            FailureReason::RunnerInterrupted.for_server(&[]),
            FailureReason::RunnerInterrupted
        );
    }

    #[test]
    fn masked_variables_and_secrets_stay_out_of_debug_output() {
        let variable = JobVariable {
            key: "CI_JOB_TOKEN".into(),
            value: "glcbt-secret-value".into(),
            masked: true,
            ..JobVariable::default()
        };
        let secret = Secret::new("glrt-secret-value");
        let printed = format!("{variable:?} {secret:?} {secret}");
        assert!(!printed.contains("secret-value"), "{printed}");
    }

    #[test]
    fn error_bodies_are_flattened() {
        assert_eq!(
            error_message(br#"{"message":"403 Forbidden"}"#).as_deref(),
            Some("403 Forbidden")
        );
        assert_eq!(
            error_message(
                br#"{"message":{"runner_namespaces.base":["Maximum number of ci registered group runners (3) exceeded"]}}"#
            )
            .as_deref(),
            Some(
                "runner_namespaces.base: Maximum number of ci registered group runners (3) exceeded"
            )
        );
        assert_eq!(error_message(b"not json"), None);
    }

    #[test]
    fn service_aliases_split_on_commas_and_spaces() {
        let service = Image {
            alias: "db, pg  postgres".into(),
            ..Image::default()
        };
        assert_eq!(service.aliases(), ["db", "pg", "postgres"]);
    }
}
