//! The ARM REST client: bearer tokens, retries (429 with `Retry-After`, 5xx, broken
//! connections), self-throttling on `x-ms-ratelimit-remaining-*`, both error body shapes,
//! paging through `nextLink` and long-running operations (`Azure-AsyncOperation`,
//! `Location`, `provisioningState`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::settings::Timing;
use crate::token::{TokenError, TokenProvider, error_chain, percent_encode};

/// What a request is for, to name it in errors and to find its RBAC action.
#[derive(Clone, Debug)]
pub struct Operation {
    /// Plain words: "read scale set", "change capacity", ...
    pub what: &'static str,
    /// The ARM resource (id) the request is about.
    pub resource: String,
    /// The RBAC action Azure checks for this request.
    pub action: &'static str,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ArmError {
    #[error(
        "azure denied {what} on {resource}: the identity lacks the action {action} ({code}: \
         {message}); assign the podfleet role (docs/azure-role.json) with this action at the \
         resource group"
    )]
    Forbidden {
        what: &'static str,
        resource: String,
        action: String,
        code: String,
        message: String,
    },
    #[error(
        "azure: {what}: {resource} not found ({message}); check plugin_config.subscription_id, \
         resource_group_name and name"
    )]
    NotFound {
        what: &'static str,
        resource: String,
        message: String,
    },
    #[error("azure throttled {what} (policy {policy}); retrying after {retry_after:?}")]
    Throttled {
        what: &'static str,
        retry_after: Duration,
        policy: String,
    },
    #[error("azure: {what}: quota exhausted: {message}; raise the quota or lower max_instances")]
    Quota { what: &'static str, message: String },
    #[error("azure: {what} on {resource}: {status} {code}: {message}")]
    Api {
        what: &'static str,
        resource: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("azure: {what}: the scale set changed meanwhile (412 on If-Match)")]
    PreconditionFailed { what: &'static str },
    #[error("azure: {what}: ARM token: {0}", .source)]
    Token {
        what: &'static str,
        source: TokenError,
    },
    #[error("azure: {what}: {message}")]
    Transport { what: &'static str, message: String },
    #[error("azure: {what} failed inside the operation {url}: {code}: {message}")]
    OperationFailed {
        what: &'static str,
        url: String,
        code: String,
        message: String,
    },
    #[error("azure: {what}: operation {url} still running after {waited:?}")]
    OperationTimeout {
        what: &'static str,
        url: String,
        waited: Duration,
    },
    #[error("azure: {what}: unexpected answer: {message}")]
    Unexpected { what: &'static str, message: String },
}

impl ArmError {
    /// Errors that retrying cannot fix: configuration or permissions.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            ArmError::Forbidden { .. } | ArmError::NotFound { .. } | ArmError::Token { .. }
        )
    }
}

/// An ARM error body: `{"error": {...}}` (CloudError) or the bare object (as the Compute
/// throttling answer is).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    /// `target` of the first detail, for throttling the exhausted policy.
    pub detail_target: Option<String>,
    pub detail_codes: Vec<String>,
}

impl ErrorBody {
    pub fn parse(text: &str) -> Self {
        let json: Value = match serde_json::from_str(text) {
            Ok(json) => json,
            Err(_) => {
                return ErrorBody {
                    message: text.chars().take(500).collect(),
                    ..Default::default()
                };
            }
        };
        let inner = json.get("error").filter(|e| e.is_object()).unwrap_or(&json);
        let string = |value: &Value, key: &str| {
            value
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let details = inner
            .get("details")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut message = string(inner, "message");
        if message.is_empty() {
            message = text.chars().take(500).collect();
        }
        ErrorBody {
            code: string(inner, "code"),
            message,
            detail_target: details
                .iter()
                .find_map(|d| d.get("target").and_then(Value::as_str).map(str::to_string)),
            detail_codes: details.iter().map(|d| string(d, "code")).collect(),
        }
    }

    /// The action an `AuthorizationFailed` message names: "... perform action 'X' over ...".
    pub fn denied_action(&self) -> Option<String> {
        let start = self.message.find("action '")? + "action '".len();
        let rest = &self.message[start..];
        Some(rest[..rest.find('\'')?].to_string())
    }

    fn is_quota(&self) -> bool {
        let message = self.message.to_ascii_lowercase();
        self.code.contains("Quota") || message.contains("quota")
    }
}

/// Counters, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArmStats {
    pub requests: u64,
    pub throttled: u64,
    pub retried: u64,
    pub slowed_down: u64,
    pub token_refreshes: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    throttled: AtomicU64,
    retried: AtomicU64,
    slowed_down: AtomicU64,
    token_refreshes: AtomicU64,
}

/// A received ARM answer.
#[derive(Debug)]
pub struct ArmResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl ArmResponse {
    pub fn json(&self, what: &'static str) -> Result<Value, ArmError> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| ArmError::Unexpected {
            what,
            message: format!("body is not JSON: {e}"),
        })
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub struct ArmClient {
    http: reqwest::Client,
    base: reqwest::Url,
    tokens: TokenProvider,
    timing: Timing,
    /// No request leaves before this instant (after a 429 or while slowing down).
    not_before: Mutex<Option<Instant>>,
    counters: Counters,
}

impl ArmClient {
    pub fn new(base: &str, tokens: TokenProvider, timing: Timing) -> Result<Self, String> {
        let base = reqwest::Url::parse(base)
            .map_err(|e| format!("plugin_config.arm_endpoint {base:?}: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(timing.request_timeout)
            .user_agent(concat!("podfleet/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            http,
            base,
            tokens,
            timing,
            not_before: Mutex::new(None),
            counters: Counters::default(),
        })
    }

    pub fn tokens(&self) -> &TokenProvider {
        &self.tokens
    }

    pub fn stats(&self) -> ArmStats {
        let c = &self.counters;
        ArmStats {
            requests: c.requests.load(Ordering::Relaxed),
            throttled: c.throttled.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            slowed_down: c.slowed_down.load(Ordering::Relaxed),
            token_refreshes: c.token_refreshes.load(Ordering::Relaxed),
        }
    }

    /// `{base}{path}?api-version=...&key=value...`, every value percent-encoded.
    pub fn url(&self, path: &str, api_version: &str, query: &[(&str, &str)]) -> String {
        let mut url = format!(
            "{}{path}?api-version={}",
            self.base.as_str().trim_end_matches('/'),
            percent_encode(api_version)
        );
        for (key, value) in query {
            url.push('&');
            url.push_str(&percent_encode(key));
            url.push('=');
            url.push_str(&percent_encode(value));
        }
        url
    }

    /// Parses a URL ARM handed out (next link, operation status) leniently, and refuses to
    /// send the token anywhere but the ARM endpoint.
    fn checked_url(&self, what: &'static str, url: &str) -> Result<reqwest::Url, ArmError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| ArmError::Unexpected {
            what,
            message: format!("URL {url:?}: {e}"),
        })?;
        if parsed.origin() != self.base.origin() {
            return Err(ArmError::Unexpected {
                what,
                message: format!(
                    "ARM pointed at {url}, outside the ARM endpoint {}; the token is not sent \
                     there",
                    self.base
                ),
            });
        }
        Ok(parsed)
    }

    pub async fn get(&self, op: &Operation, url: &str) -> Result<Value, ArmError> {
        let response = self.send(op, Method::GET, url, None, None).await?;
        response.json(op.what)
    }

    /// Every item of a paged list (`value` + `nextLink`).
    pub async fn list(&self, op: &Operation, url: &str) -> Result<Vec<Value>, ArmError> {
        let mut items = Vec::new();
        let mut next = Some(url.to_string());
        let mut pages = 0;
        while let Some(url) = next.take() {
            pages += 1;
            if pages > 1000 {
                return Err(ArmError::Unexpected {
                    what: op.what,
                    message: "more than 1000 pages: the nextLink chain loops".into(),
                });
            }
            let page = self.get(op, &url).await?;
            if let Some(values) = page.get("value").and_then(Value::as_array) {
                items.extend(values.iter().cloned());
            }
            next = page
                .get("nextLink")
                .and_then(Value::as_str)
                .filter(|link| !link.is_empty())
                .map(str::to_string);
        }
        Ok(items)
    }

    /// One ARM request with the retry policy: 429 after `Retry-After`, 5xx and connection
    /// failures with back-off, a refused token renewed once. Every operation podfleet sends
    /// is idempotent (absolute capacity under `If-Match`, deletion of named instances), so
    /// writes are retried like reads.
    pub async fn send(
        &self,
        op: &Operation,
        method: Method,
        url: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<ArmResponse, ArmError> {
        let target = self.checked_url(op.what, url)?;
        let mut attempt = 0u32;
        let mut token_renewed = false;
        loop {
            attempt += 1;
            if let Some(wait) = self.wait_turn(op)? {
                tokio::time::sleep(wait).await;
            }
            let token = self
                .tokens
                .token()
                .await
                .map_err(|source| ArmError::Token {
                    what: op.what,
                    source,
                })?;
            let mut request = self
                .http
                .request(method.clone(), target.clone())
                .bearer_auth(token.expose())
                .header("x-ms-client-request-id", request_id());
            if let Some(body) = body {
                request = request
                    .header("Content-Type", "application/json")
                    .body(body.to_string());
            }
            if let Some(etag) = if_match {
                request = request.header("If-Match", etag);
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let sent = request.send().await;
            let response = match sent {
                Ok(response) => response,
                Err(e) => {
                    let message = format!("{method} {url}: {}", error_chain(&e));
                    if attempt < self.timing.max_attempts {
                        tracing::warn!(%message, attempt, "azure: request failed, retrying");
                        self.counters.retried.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(self.backoff(attempt)).await;
                        continue;
                    }
                    return Err(ArmError::Transport {
                        what: op.what,
                        message,
                    });
                }
            };
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = match response.bytes().await {
                Ok(bytes) => bytes.to_vec(),
                Err(e) if attempt < self.timing.max_attempts => {
                    tracing::warn!(error = %error_chain(&e), "azure: answer cut off, retrying");
                    self.counters.retried.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(self.backoff(attempt)).await;
                    continue;
                }
                Err(e) => {
                    return Err(ArmError::Transport {
                        what: op.what,
                        message: format!("{method} {url}: reading the answer: {}", error_chain(&e)),
                    });
                }
            };
            self.note_rate_limits(&headers);
            let response = ArmResponse {
                status,
                headers,
                body,
            };
            if (200..300).contains(&status) {
                return Ok(response);
            }
            let error = ErrorBody::parse(&String::from_utf8_lossy(&response.body));
            tracing::debug!(
                status,
                code = %error.code,
                request_id = response.header("x-ms-request-id").unwrap_or(""),
                correlation_id = response.header("x-ms-correlation-request-id").unwrap_or(""),
                "azure: {} {url} refused",
                method
            );
            match status {
                429 => {
                    self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                    let retry_after = retry_after(&response.headers, &self.timing)
                        .unwrap_or_else(|| self.backoff(attempt));
                    self.hold_until(Instant::now() + retry_after);
                    let policy = error
                        .detail_target
                        .clone()
                        .unwrap_or_else(|| error.code.clone());
                    tracing::warn!(?retry_after, %policy, "azure: throttled (429)");
                    if attempt < self.timing.max_attempts && retry_after <= self.max_inline_wait() {
                        continue;
                    }
                    return Err(ArmError::Throttled {
                        what: op.what,
                        retry_after,
                        policy,
                    });
                }
                401 if !token_renewed => {
                    // Expired or revoked token: renew once, then give up.
                    token_renewed = true;
                    self.counters
                        .token_refreshes
                        .fetch_add(1, Ordering::Relaxed);
                    self.tokens.invalidate().await;
                    continue;
                }
                500 | 502 | 503 | 504 if attempt < self.timing.max_attempts => {
                    self.counters.retried.fetch_add(1, Ordering::Relaxed);
                    let wait = retry_after(&response.headers, &self.timing)
                        .unwrap_or_else(|| self.backoff(attempt));
                    tracing::warn!(status, ?wait, code = %error.code, "azure: server error, retrying");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                _ => return Err(classify(op, status, error)),
            }
        }
    }

    /// Follows a long-running operation to its end. `method`/`url` are those of the
    /// request that started it (to re-read the resource when ARM gave no status URL).
    pub async fn wait_for_operation(
        &self,
        op: &Operation,
        url: &str,
        started: ArmResponse,
        timeout: Duration,
    ) -> Result<(), ArmError> {
        let begin = Instant::now();
        let async_url = started.header("azure-asyncoperation").map(str::to_string);
        let location = started.header("location").map(str::to_string);
        let mut interval = retry_after(&started.headers, &self.timing);
        let (poll_url, kind) = if let Some(status_url) = async_url {
            (status_url, PollKind::AsyncOperation)
        } else if let Some(location) = location {
            (location, PollKind::Location)
        } else {
            let body = started.json(op.what)?;
            if is_terminal(&body) {
                return check_provisioning(op, url, &body);
            }
            (url.to_string(), PollKind::Resource)
        };
        loop {
            let wait = interval.unwrap_or_else(|| self.timing.seconds(5.0));
            if begin.elapsed() + wait > timeout {
                return Err(ArmError::OperationTimeout {
                    what: op.what,
                    url: poll_url,
                    waited: begin.elapsed(),
                });
            }
            tokio::time::sleep(wait).await;
            let poll = Operation {
                what: op.what,
                resource: op.resource.clone(),
                action: match kind {
                    PollKind::AsyncOperation | PollKind::Location => {
                        "Microsoft.Compute/locations/operations/read"
                    }
                    PollKind::Resource => "Microsoft.Compute/virtualMachineScaleSets/read",
                },
            };
            let response = match self.send(&poll, Method::GET, &poll_url, None, None).await {
                Ok(response) => response,
                // The operation ended in an error status (Location polling).
                Err(ArmError::Api { code, message, .. }) => {
                    return Err(ArmError::OperationFailed {
                        what: op.what,
                        url: poll_url,
                        code,
                        message,
                    });
                }
                Err(e) => return Err(e),
            };
            interval = retry_after(&response.headers, &self.timing);
            match kind {
                PollKind::AsyncOperation => {
                    let body = response.json(op.what)?;
                    let status = body.get("status").and_then(Value::as_str).unwrap_or("");
                    match status.to_ascii_lowercase().as_str() {
                        "succeeded" => return Ok(()),
                        "failed" | "canceled" | "cancelled" => {
                            let error = body.get("error").cloned().unwrap_or(Value::Null);
                            let parsed = ErrorBody::parse(
                                &serde_json::json!({ "error": error }).to_string(),
                            );
                            return Err(ArmError::OperationFailed {
                                what: op.what,
                                url: poll_url,
                                code: if parsed.code.is_empty() {
                                    status.to_string()
                                } else {
                                    parsed.code
                                },
                                message: parsed.message,
                            });
                        }
                        _ => continue,
                    }
                }
                PollKind::Location => {
                    if response.status == 202 {
                        continue;
                    }
                    return Ok(());
                }
                PollKind::Resource => {
                    let body = response.json(op.what)?;
                    if is_terminal(&body) {
                        return check_provisioning(op, url, &body);
                    }
                }
            }
        }
    }

    /// How long to wait before sending, or a throttling error when the wait is too long to
    /// block a caller (the next call will find out again, cheaply, without a request).
    fn wait_turn(&self, op: &Operation) -> Result<Option<Duration>, ArmError> {
        let not_before = *self.not_before.lock().unwrap_or_else(|e| e.into_inner());
        let Some(not_before) = not_before else {
            return Ok(None);
        };
        let wait = not_before.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Ok(None);
        }
        if wait > self.max_inline_wait() {
            return Err(ArmError::Throttled {
                what: op.what,
                retry_after: wait,
                policy: "earlier Retry-After".into(),
            });
        }
        Ok(Some(wait))
    }

    fn hold_until(&self, until: Instant) {
        let mut not_before = self.not_before.lock().unwrap_or_else(|e| e.into_inner());
        if not_before.is_none_or(|current| current < until) {
            *not_before = Some(until);
        }
    }

    /// Longest throttling wait a call sits out instead of failing.
    fn max_inline_wait(&self) -> Duration {
        self.timing.seconds(60.0)
    }

    /// 1, 2, 4, 8, ... seconds (capped at 30) with up to 50 % jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = f64::from(1u32 << attempt.saturating_sub(1).min(5)).min(30.0);
        let jitter = 1.0 + rand::random::<f64>() * 0.5;
        self.timing.seconds(base * jitter)
    }

    /// Spaces requests out when any remaining-requests header runs low.
    fn note_rate_limits(&self, headers: &HeaderMap) {
        let Some(remaining) = lowest_remaining(headers) else {
            return;
        };
        if remaining >= self.timing.slow_down_below {
            return;
        }
        self.counters.slowed_down.fetch_add(1, Ordering::Relaxed);
        // The closer to zero, the longer the pause: up to two seconds between requests.
        let missing = (self.timing.slow_down_below - remaining) as f64;
        let pause = self
            .timing
            .seconds(2.0 * missing / self.timing.slow_down_below as f64);
        tracing::info!(
            remaining,
            ?pause,
            "azure: rate limit running low, slowing down"
        );
        self.hold_until(Instant::now() + pause);
    }
}

enum PollKind {
    AsyncOperation,
    Location,
    Resource,
}

fn is_terminal(body: &Value) -> bool {
    match body
        .pointer("/properties/provisioningState")
        .and_then(Value::as_str)
    {
        None => true,
        Some(state) => matches!(
            state.to_ascii_lowercase().as_str(),
            "succeeded" | "failed" | "canceled"
        ),
    }
}

fn check_provisioning(op: &Operation, url: &str, body: &Value) -> Result<(), ArmError> {
    let state = body
        .pointer("/properties/provisioningState")
        .and_then(Value::as_str)
        .unwrap_or("Succeeded");
    if state.eq_ignore_ascii_case("succeeded") {
        Ok(())
    } else {
        Err(ArmError::OperationFailed {
            what: op.what,
            url: url.to_string(),
            code: state.to_string(),
            message: format!("{} ended in provisioningState {state}", op.resource),
        })
    }
}

fn classify(op: &Operation, status: u16, error: ErrorBody) -> ArmError {
    match status {
        403 => ArmError::Forbidden {
            what: op.what,
            resource: op.resource.clone(),
            action: error
                .denied_action()
                .unwrap_or_else(|| op.action.to_string()),
            code: error.code,
            message: error.message,
        },
        404 => ArmError::NotFound {
            what: op.what,
            resource: op.resource.clone(),
            message: if error.code.is_empty() {
                error.message
            } else {
                format!("{}: {}", error.code, error.message)
            },
        },
        412 => ArmError::PreconditionFailed { what: op.what },
        409 | 400 if error.is_quota() => ArmError::Quota {
            what: op.what,
            message: error.message,
        },
        _ => ArmError::Api {
            what: op.what,
            resource: op.resource.clone(),
            status,
            code: error.code,
            message: error.message,
        },
    }
}

/// `Retry-After` in seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap, timing: &Timing) -> Option<Duration> {
    let value = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return Some(timing.seconds(seconds));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let seconds = (date.timestamp() - chrono::Utc::now().timestamp()).max(0);
    Some(timing.seconds(seconds as f64))
}

/// The lowest count of every `x-ms-ratelimit-remaining-*` header; the Compute form is
/// `Microsoft.Compute/HighCostGet;159` (several policies comma-separated).
fn lowest_remaining(headers: &HeaderMap) -> Option<u64> {
    headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-ms-ratelimit-remaining-"))
        .filter_map(|(_, value)| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|part| part.rsplit(';').next()?.trim().parse::<u64>().ok())
        .min()
}

/// A random GUID (version 4) for `x-ms-client-request-id`.
fn request_id() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const THROTTLING: &str =
        include_str!("../tests/fixtures/Error_429_ComputeThrottling.body.json");

    #[test]
    fn the_bare_throttling_body_and_the_wrapped_shape_both_parse() {
        let bare = ErrorBody::parse(THROTTLING);
        assert_eq!(bare.code, "OperationNotAllowed");
        assert_eq!(bare.detail_target.as_deref(), Some("HighCostGet"));
        assert_eq!(bare.detail_codes, ["TooManyRequests"]);
        let wrapped = ErrorBody::parse(
            r#"{"error":{"code":"AuthorizationFailed","message":"The client 'x' with object id 'y' does not have authorization to perform action 'Microsoft.Compute/virtualMachineScaleSets/read' over scope '/subscriptions/s' or the scope is invalid."}}"#,
        );
        assert_eq!(wrapped.code, "AuthorizationFailed");
        assert_eq!(
            wrapped.denied_action().as_deref(),
            Some("Microsoft.Compute/virtualMachineScaleSets/read")
        );
        let raw = ErrorBody::parse("<html>bad gateway</html>");
        assert_eq!(raw.message, "<html>bad gateway</html>");
    }

    #[test]
    fn remaining_counts_of_both_header_forms_are_read() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-ms-ratelimit-remaining-resource",
            "Microsoft.Compute/HighCostGet;159,Microsoft.Compute/LowCostGet;3"
                .parse()
                .unwrap(),
        );
        headers.insert(
            "x-ms-ratelimit-remaining-subscription-reads",
            "11999".parse().unwrap(),
        );
        assert_eq!(lowest_remaining(&headers), Some(3));
        assert_eq!(lowest_remaining(&HeaderMap::new()), None);
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let timing = Timing::default();
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "1200".parse().unwrap());
        assert_eq!(
            retry_after(&headers, &timing),
            Some(Duration::from_secs(1200))
        );
        let soon = chrono::Utc::now() + chrono::Duration::seconds(120);
        headers.insert("retry-after", soon.to_rfc2822().parse().unwrap());
        let wait = retry_after(&headers, &timing).unwrap();
        assert!(
            wait <= Duration::from_secs(120) && wait >= Duration::from_secs(100),
            "{wait:?}"
        );
    }

    #[test]
    fn request_ids_are_version_4_guids() {
        let id = request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, request_id());
    }
}
