//! The HTTP client for GitLab's runner API: URL handling, headers, retries, and one method per
//! endpoint that turns status codes into typed results.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CoordinatorError;
use crate::model::{
    JobRequest, JobResponse, RemoteJobStatus, ResetTokenRequest, ResetTokenResponse, RunnerInfo,
    Secret, UpdateJobRequest, VerifyRequest, VerifyResponse, error_message,
};
use crate::retry::{RetryPolicy, is_retryable, wait_before_retry};

/// The longest update interval a server may impose (gitlab-runner caps it at 15 minutes).
const MAX_UPDATE_INTERVAL: Duration = Duration::from_secs(15 * 60);

const RUNNER_TOKEN_HEADER: &str = "runner-token";
const JOB_TOKEN_HEADER: &str = "job-token";
const LAST_UPDATE_HEADER: &str = "x-gitlab-last-update";
const JOB_STATUS_HEADER: &str = "job-status";
const UPDATE_INTERVAL_HEADER: &str = "x-gitlab-trace-update-interval";

/// Transport settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub retry: RetryPolicy,
    /// TCP connect timeout (gitlab-runner: 30 s).
    pub connect_timeout: Duration,
    /// Whole-call timeout; must exceed the server's job-request long poll (≈50 s).
    pub request_timeout: Duration,
    /// Told about every HTTP exchange (for metrics); retries are separate exchanges.
    pub observer: Option<RequestObserver>,
}

/// One HTTP exchange with the coordinator, as a [`RequestObserver`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct Exchange {
    /// The API endpoint: `verify`, `request_job`, `update_job`, `patch_trace` or `other`.
    pub endpoint: &'static str,
    /// The response status, or `None` when no response arrived (transport error).
    pub status: Option<u16>,
    pub elapsed: Duration,
}

/// A callback told about each [`Exchange`].
#[derive(Clone)]
pub struct RequestObserver(pub Arc<dyn Fn(Exchange) + Send + Sync>);

impl std::fmt::Debug for RequestObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestObserver")
    }
}

/// The endpoint name of an API path relative to `/api/v4/`.
fn endpoint_of(path: &str) -> &'static str {
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["runners", "verify"] => "verify",
        ["jobs", "request"] => "request_job",
        ["jobs", _] => "update_job",
        ["jobs", _, "trace"] => "patch_trace",
        _ => "other",
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60 * 60),
            observer: None,
        }
    }
}

/// The answer to a job update (`PUT /api/v4/jobs/:id`) that the server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateResponse {
    /// 200 (done) or 202 (final update accepted for later: send it again after the interval).
    pub code: u16,
    pub job_status: Option<RemoteJobStatus>,
    pub trace_update_interval: Option<Duration>,
}

/// The answer to a trace patch (`PATCH /api/v4/jobs/:id/trace`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchResponse {
    /// 202: the server now holds `new_offset` bytes.
    Accepted {
        new_offset: u64,
        job_status: Option<RemoteJobStatus>,
        update_interval: Option<Duration>,
    },
    /// 416: the server holds `server_offset` bytes; resend from there.
    RangeMismatch { server_offset: u64 },
    /// 404: the job is gone; stop patching.
    NotFound,
}

/// A client of one GitLab instance's runner API. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    http: reqwest::Client,
    base: Url,
    system_id: String,
    info: RunnerInfo,
    retry: RetryPolicy,
    observer: Option<RequestObserver>,
}

/// A request to send, rebuilt for every attempt.
struct Call<'a> {
    method: Method,
    path: String,
    query: &'a [(&'a str, &'a str)],
    token_header: Option<(&'static str, &'a str)>,
    extra_headers: Vec<(&'static str, String)>,
    body: CallBody,
    expects_json: bool,
}

impl<'a> Call<'a> {
    /// A JSON call authenticated with the runner token (verify, job request).
    fn runner(path: &str, token: &'a str, body: &impl Serialize) -> Self {
        Call {
            method: Method::POST,
            path: path.to_owned(),
            query: &[],
            token_header: Some((RUNNER_TOKEN_HEADER, token)),
            extra_headers: Vec::new(),
            body: json_body(body),
            expects_json: true,
        }
    }

    /// A call on a job, authenticated with the job token.
    fn job(method: Method, path: String, token: &'a str, body: CallBody) -> Self {
        Call {
            method,
            path,
            query: &[],
            token_header: Some((JOB_TOKEN_HEADER, token)),
            extra_headers: Vec::new(),
            body,
            expects_json: false,
        }
    }
}

enum CallBody {
    Json(Vec<u8>),
    Text(Vec<u8>),
}

/// What the server answered, after retries.
struct Answer {
    url: String,
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
            .filter(|value| !value.is_empty())
    }

    fn is_json(&self) -> bool {
        self.header("content-type").is_some_and(|content_type| {
            content_type
                .split(';')
                .next()
                .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
        })
    }

    fn decode<T: DeserializeOwned>(&self) -> Result<T, CoordinatorError> {
        if !self.is_json() {
            return Err(CoordinatorError::InvalidResponse {
                url: self.url.clone(),
                status: self.status,
                reason: format!(
                    "content type is {:?}, not application/json",
                    self.header("content-type").unwrap_or("missing")
                ),
            });
        }
        serde_json::from_slice(&self.body).map_err(|error| CoordinatorError::InvalidResponse {
            url: self.url.clone(),
            status: self.status,
            reason: error.to_string(),
        })
    }

    fn job_status(&self) -> Option<RemoteJobStatus> {
        self.header(JOB_STATUS_HEADER).map(RemoteJobStatus::parse)
    }

    fn update_interval(&self) -> Option<Duration> {
        self.header(UPDATE_INTERVAL_HEADER)
            .and_then(|text| text.parse::<u64>().ok())
            .filter(|seconds| *seconds > 0)
            .map(|seconds| Duration::from_secs(seconds).min(MAX_UPDATE_INTERVAL))
    }

    fn unexpected(&self) -> CoordinatorError {
        CoordinatorError::UnexpectedStatus {
            url: self.url.clone(),
            status: self.status,
            message: error_message(&self.body),
        }
    }
}

/// Normalises a configured GitLab URL the way gitlab-runner does: trailing `/` and a trailing
/// `/ci` are removed, then `/api/v4/` is appended (unless the URL is already an API root, as
/// a job recorded for resumption keeps it). Only http and https are accepted.
pub fn api_base_url(url: &str) -> Result<Url, CoordinatorError> {
    let invalid = |reason: &str| CoordinatorError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = url.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/ci").unwrap_or(trimmed);
    let trimmed = trimmed.strip_suffix("/api/v4").unwrap_or(trimmed);
    let base =
        Url::parse(&format!("{trimmed}/api/v4/")).map_err(|error| invalid(&error.to_string()))?;
    match base.scheme() {
        "http" | "https" => {}
        other => return Err(invalid(&format!("scheme {other:?} is not http or https"))),
    }
    if base.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it has no host"));
    }
    Ok(base)
}

fn user_agent() -> String {
    format!(
        "podfleet/{} (gitlab-runner compatible; {}/{})",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

/// A fresh correlation id: 32 lower-case hex digits, like a UUIDv4 without dashes.
fn request_id() -> String {
    let value: u128 = rand::random();
    format!("{value:032x}")
}

fn json_body(value: &impl Serialize) -> CallBody {
    // Serialising plain structs of strings, numbers and maps cannot fail.
    CallBody::Json(serde_json::to_vec(value).expect("wire model serialises to JSON"))
}

impl Client {
    /// A client for the GitLab instance at `url` (e.g. `https://gitlab.example.com/`),
    /// identifying itself with `system_id` and `info` on every call.
    pub fn new(
        url: &str,
        system_id: impl Into<String>,
        info: RunnerInfo,
    ) -> Result<Client, CoordinatorError> {
        Client::with_options(url, system_id, info, ClientOptions::default())
    }

    pub fn with_options(
        url: &str,
        system_id: impl Into<String>,
        info: RunnerInfo,
        options: ClientOptions,
    ) -> Result<Client, CoordinatorError> {
        let base = api_base_url(url)?;
        let http = reqwest::Client::builder()
            .user_agent(user_agent())
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout)
            .build()
            .map_err(|error| CoordinatorError::Transport {
                url: base.to_string(),
                source: error,
            })?;
        Ok(Client {
            inner: Arc::new(ClientInner {
                http,
                base,
                system_id: system_id.into(),
                info,
                retry: options.retry,
                observer: options.observer,
            }),
        })
    }

    /// The API root every path is joined to, ending in `/api/v4/`.
    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    pub fn system_id(&self) -> &str {
        &self.inner.system_id
    }

    pub fn info(&self) -> &RunnerInfo {
        &self.inner.info
    }

    /// `POST /runners/verify`: checks a runner authentication token (and heartbeats).
    pub async fn verify_runner(&self, token: &str) -> Result<VerifyResponse, CoordinatorError> {
        let request = VerifyRequest {
            info: self.inner.info.clone(),
            token: Secret::new(token),
            system_id: self.inner.system_id.clone(),
        };
        let answer = self
            .send(Call::runner("runners/verify", token, &request))
            .await?;
        match answer.status {
            // Very old servers answer 200 with the text body `200` and no details.
            200 if !answer.is_json() => Ok(VerifyResponse {
                token: Secret::new(token),
                ..VerifyResponse::default()
            }),
            200 => answer.decode(),
            403 => Err(CoordinatorError::Forbidden { url: answer.url }),
            _ => Err(answer.unexpected()),
        }
    }

    /// `POST /runners/reset_authentication_token`: trades the runner token for a new one (the
    /// old one stops working). gitlab-runner does this before a token expires.
    pub async fn reset_token(&self, token: &str) -> Result<ResetTokenResponse, CoordinatorError> {
        let request = ResetTokenRequest {
            token: Secret::new(token),
        };
        let answer = self
            .send(Call::runner(
                "runners/reset_authentication_token",
                token,
                &request,
            ))
            .await?;
        match answer.status {
            201 | 200 => answer.decode(),
            403 => Err(CoordinatorError::Forbidden { url: answer.url }),
            _ => Err(answer.unexpected()),
        }
    }

    /// `POST /jobs/request`: asks for a job. `last_update` carries the opaque queue value
    /// between calls; it is updated from every answer that has `X-GitLab-Last-Update`.
    /// 204 and 409 (lost assignment race) are `Ok(None)`.
    pub async fn request_job(
        &self,
        token: &str,
        last_update: &mut Option<String>,
    ) -> Result<Option<JobResponse>, CoordinatorError> {
        let request = JobRequest {
            info: self.inner.info.clone(),
            token: Secret::new(token),
            system_id: self.inner.system_id.clone(),
            last_update: last_update.clone().filter(|value| !value.is_empty()),
            session: None,
        };
        let answer = self
            .send(Call::runner("jobs/request", token, &request))
            .await?;
        if let Some(value) = answer.header(LAST_UPDATE_HEADER) {
            *last_update = Some(value.to_owned());
        }
        match answer.status {
            201 => answer.decode().map(Some),
            204 | 409 => Ok(None),
            403 => Err(CoordinatorError::Forbidden { url: answer.url }),
            _ => Err(answer.unexpected()),
        }
    }

    /// `PUT /jobs/:id`: reports the job's state. The client's own `info` and `job_token` are
    /// sent whatever `request.info`/`request.token` hold. 200 and 202 are answers; 202 means
    /// "send this final update again after `trace_update_interval`".
    pub async fn update_job(
        &self,
        job_id: u64,
        job_token: &str,
        request: &UpdateJobRequest,
    ) -> Result<UpdateResponse, CoordinatorError> {
        let mut body = request.clone();
        body.info = self.inner.info.clone();
        body.token = Secret::new(job_token);
        let call = Call::job(
            Method::PUT,
            format!("jobs/{job_id}"),
            job_token,
            json_body(&body),
        );
        let answer = self.send(call).await?;
        match answer.status {
            200 | 202 => Ok(UpdateResponse {
                code: answer.status,
                job_status: answer.job_status(),
                trace_update_interval: answer.update_interval(),
            }),
            403 => Err(CoordinatorError::Forbidden { url: answer.url }),
            404 => Err(CoordinatorError::NotFound { url: answer.url }),
            412 => Err(CoordinatorError::TraceValidationFailed { url: answer.url }),
            _ => Err(answer.unexpected()),
        }
    }

    /// `PATCH /jobs/:id/trace`: appends `bytes` at `offset` (`Content-Range` end inclusive).
    /// An empty patch sends nothing and is accepted as is.
    pub async fn patch_trace(
        &self,
        job_id: u64,
        job_token: &str,
        offset: u64,
        bytes: &[u8],
    ) -> Result<PatchResponse, CoordinatorError> {
        self.patch_trace_with(job_id, job_token, offset, bytes, false)
            .await
    }

    /// [`Client::patch_trace`] with `debug_trace` (set when `CI_DEBUG_TRACE` is on).
    pub async fn patch_trace_with(
        &self,
        job_id: u64,
        job_token: &str,
        offset: u64,
        bytes: &[u8],
        debug_trace: bool,
    ) -> Result<PatchResponse, CoordinatorError> {
        if bytes.is_empty() {
            return Ok(PatchResponse::Accepted {
                new_offset: offset,
                job_status: None,
                update_interval: None,
            });
        }
        let end = offset + bytes.len() as u64;
        let query = [("debug_trace", if debug_trace { "true" } else { "false" })];
        let call = Call {
            query: &query,
            extra_headers: vec![("content-range", format!("{offset}-{}", end - 1))],
            ..Call::job(
                Method::PATCH,
                format!("jobs/{job_id}/trace"),
                job_token,
                CallBody::Text(bytes.to_vec()),
            )
        };
        let answer = self.send(call).await?;
        match answer.status {
            202 => Ok(PatchResponse::Accepted {
                new_offset: answer.header("range").and_then(range_end).unwrap_or(end),
                job_status: answer.job_status(),
                update_interval: answer.update_interval(),
            }),
            416 => Ok(PatchResponse::RangeMismatch {
                server_offset: answer.header("range").and_then(range_end).unwrap_or(0),
            }),
            404 => Ok(PatchResponse::NotFound),
            403 => Err(CoordinatorError::Forbidden { url: answer.url }),
            _ => Err(answer.unexpected()),
        }
    }

    /// Sends a call, repeating it on retryable statuses, and reads the whole answer.
    async fn send(&self, call: Call<'_>) -> Result<Answer, CoordinatorError> {
        let url =
            self.inner
                .base
                .join(&call.path)
                .map_err(|error| CoordinatorError::InvalidUrl {
                    url: format!("{}{}", self.inner.base, call.path),
                    reason: error.to_string(),
                })?;
        let url_text = url.to_string();
        let correlation_id = request_id();
        let policy = self.inner.retry;
        let mut attempt = 1;
        loop {
            let request = self.build(&call, url.clone(), &correlation_id);
            let transport = |error: reqwest::Error| CoordinatorError::Transport {
                url: url_text.clone(),
                source: error,
            };
            let started = std::time::Instant::now();
            let observe = |status: Option<u16>| {
                if let Some(observer) = &self.inner.observer {
                    (observer.0)(Exchange {
                        endpoint: endpoint_of(&call.path),
                        status,
                        elapsed: started.elapsed(),
                    });
                }
            };
            let response = request.send().await.map_err(|e| {
                observe(None);
                transport(e)
            })?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response
                .bytes()
                .await
                .map_err(|e| {
                    observe(None);
                    transport(e)
                })?
                .to_vec();
            observe(Some(status));
            if is_retryable(status) && attempt < policy.max_attempts {
                let wait = wait_before_retry(&policy, attempt, &headers, chrono::Utc::now());
                tracing::debug!(
                    url = %url_text, status, attempt, wait_ms = wait.as_millis() as u64,
                    "retrying coordinator call"
                );
                tokio::time::sleep(wait).await;
                attempt += 1;
                continue;
            }
            return Ok(Answer {
                url: url_text,
                status,
                headers,
                body,
            });
        }
    }

    fn build(&self, call: &Call<'_>, url: Url, correlation_id: &str) -> reqwest::RequestBuilder {
        let mut request = self
            .inner
            .http
            .request(call.method.clone(), url)
            .header("x-request-id", correlation_id);
        if !call.query.is_empty() {
            request = request.query(call.query);
        }
        if call.expects_json {
            request = request.header("accept", "application/json");
        }
        if let Some((name, token)) = call.token_header
            && let Ok(value) = HeaderValue::from_str(token)
        {
            request = request.header(HeaderName::from_static(name), value);
        }
        for (name, value) in &call.extra_headers {
            request = request.header(*name, value.as_str());
        }
        match &call.body {
            CallBody::Json(bytes) => request
                .header("content-type", "application/json")
                .body(bytes.clone()),
            CallBody::Text(bytes) => request
                .header("content-type", "text/plain")
                .body(bytes.clone()),
        }
    }
}

/// The number after `-` in a `Range: 0-<size>` header.
fn range_end(range: &str) -> Option<u64> {
    range.rsplit_once('-')?.1.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_is_fixed_like_gitlab_runner() {
        for (input, expected) in [
            (
                "https://gitlab.example.com",
                "https://gitlab.example.com/api/v4/",
            ),
            (
                "https://gitlab.example.com/",
                "https://gitlab.example.com/api/v4/",
            ),
            (
                "https://gitlab.example.com/ci",
                "https://gitlab.example.com/api/v4/",
            ),
            (
                "https://gitlab.example.com/ci/",
                "https://gitlab.example.com/api/v4/",
            ),
            (
                "http://host:8080/gitlab/",
                "http://host:8080/gitlab/api/v4/",
            ),
            // An API root (what a job's record keeps) stays as it is.
            (
                "http://127.0.0.1:4000/api/v4/",
                "http://127.0.0.1:4000/api/v4/",
            ),
        ] {
            let base = api_base_url(input).expect(input);
            assert_eq!(base.as_str(), expected, "{input}");
        }
    }

    #[test]
    fn base_url_rejects_other_schemes_and_garbage() {
        for input in [
            "ftp://gitlab.example.com",
            "gitlab.example.com",
            "",
            "unix:///x",
        ] {
            let error = api_base_url(input).expect_err(input);
            assert!(
                error.to_string().contains("invalid coordinator url"),
                "{error}"
            );
        }
    }

    #[test]
    fn endpoints_are_named_by_path() {
        assert_eq!(endpoint_of("runners/verify"), "verify");
        assert_eq!(endpoint_of("jobs/request"), "request_job");
        assert_eq!(endpoint_of("jobs/42"), "update_job");
        assert_eq!(endpoint_of("jobs/42/trace"), "patch_trace");
        assert_eq!(endpoint_of("jobs/42/artifacts"), "other");
    }

    #[test]
    fn request_ids_are_32_hex_digits() {
        let id = request_id();
        assert_eq!(id.len(), 32);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(id, request_id());
    }

    #[test]
    fn range_end_reads_the_upper_bound() {
        assert_eq!(range_end("0-512"), Some(512));
        assert_eq!(range_end("0-"), None);
        assert_eq!(range_end("nonsense"), None);
    }
}
