//! One configured upstream registry: HTTP with bounded timeouts, and its authentication —
//! anonymous, basic, or the bearer-token flow (`WWW-Authenticate: Bearer realm,service,scope`)
//! with tokens cached per scope. Credentials go only to the upstream itself or to a token
//! realm on the same registrable domain; redirects (CDNs) never carry them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, StatusCode, header};
use reqwest::Url;

use crate::config::UpstreamConfig;
use crate::error::RegistryError;
use crate::metrics::{Metrics, add};

/// A password or token: never printed.
#[derive(Clone)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Clone, Debug)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Credentials {
    /// Reads `USERNAME:PASSWORD` from the first non-empty line of `path`.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read credentials file {}: {error}", path.display()))?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .unwrap_or("");
        match line.split_once(':') {
            Some((username, password)) if !username.is_empty() => Ok(Self {
                username: username.to_owned(),
                password: Secret(password.to_owned()),
            }),
            _ => Err(format!(
                "credentials file {}: expected one line USERNAME:PASSWORD",
                path.display()
            )),
        }
    }
}

#[derive(Debug)]
pub enum UpstreamError {
    Connect(String),
    Timeout,
    Denied(StatusCode),
    Status(StatusCode),
}

impl UpstreamError {
    pub fn into_registry(self, upstream: &str, what: &str) -> RegistryError {
        match self {
            UpstreamError::Connect(detail) => RegistryError::unavailable(
                StatusCode::BAD_GATEWAY,
                format!("upstream {upstream} unreachable while fetching {what}: {detail}"),
            ),
            UpstreamError::Timeout => RegistryError::unavailable(
                StatusCode::GATEWAY_TIMEOUT,
                format!("upstream {upstream} did not answer in time for {what}"),
            ),
            UpstreamError::Denied(status) => RegistryError::new(
                StatusCode::FORBIDDEN,
                "DENIED",
                format!(
                    "upstream {upstream} refused {what} with {status}: check the upstream's credentials_file"
                ),
            ),
            UpstreamError::Status(StatusCode::TOO_MANY_REQUESTS) => RegistryError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                format!("upstream {upstream} rate-limited {what}"),
            ),
            UpstreamError::Status(status) => RegistryError::unavailable(
                StatusCode::BAD_GATEWAY,
                format!("upstream {upstream} answered {status} for {what}"),
            ),
        }
    }
}

#[derive(Default)]
struct AuthState {
    use_basic: bool,
    tokens: HashMap<String, (Secret, Instant)>,
}

pub struct Upstream {
    pub prefix: String,
    base: Url,
    /// Docker Hub names official images `library/<name>`.
    pub docker_hub: bool,
    client: reqwest::Client,
    credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
    response_timeout: Duration,
    metrics: Arc<Metrics>,
}

pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
    pub idle: Duration,
}

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        docker_hub: bool,
        timeouts: &Timeouts,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let credentials = config
            .credentials_file
            .as_deref()
            .map(Credentials::read)
            .transpose()?;
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .read_timeout(timeouts.idle)
            .user_agent(concat!("podfleet-image-cache/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| {
                format!(
                    "cannot build the HTTP client for upstream {}: {error}",
                    config.prefix
                )
            })?;
        Ok(Self {
            prefix: config.prefix.clone(),
            base: config.url.clone(),
            docker_hub,
            client,
            credentials,
            auth: Mutex::new(AuthState::default()),
            response_timeout: timeouts.response,
            metrics,
        })
    }

    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// Sends `METHOD /v2/<repository>/<tail>` and returns the response once its headers
    /// arrived (within the response timeout); 401 is answered by authenticating once.
    pub async fn send(
        &self,
        method: Method,
        repository: &str,
        tail: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = self
            .base
            .join(&format!("/v2/{repository}/{tail}"))
            .map_err(|error| UpstreamError::Connect(error.to_string()))?;
        let scope = format!("repository:{repository}:pull");
        let mut authenticated = false;
        loop {
            let mut request = self.client.request(method.clone(), url.clone());
            if let Some(accept) = accept {
                request = request.header(header::ACCEPT, accept);
            }
            request = self.authorize(request, &scope);
            add(&self.metrics.upstream_requests, 1);
            let response = match tokio::time::timeout(self.response_timeout, request.send()).await {
                Err(_) => return Err(self.failed(UpstreamError::Timeout)),
                Ok(Err(error)) if error.is_timeout() => {
                    return Err(self.failed(UpstreamError::Timeout));
                }
                Ok(Err(error)) => {
                    return Err(self.failed(UpstreamError::Connect(error_chain(&error))));
                }
                Ok(Ok(response)) => response,
            };
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !authenticated {
                authenticated = true;
                let challenge = response
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_owned);
                self.authenticate(challenge.as_deref(), &scope).await?;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(UpstreamError::Denied(status));
            }
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                return Err(self.failed(UpstreamError::Status(status)));
            }
            return Ok(response);
        }
    }

    fn failed(&self, error: UpstreamError) -> UpstreamError {
        add(&self.metrics.upstream_errors, 1);
        tracing::warn!(upstream = %self.prefix, error = ?error, "upstream request failed");
        error
    }

    fn authorize(&self, request: reqwest::RequestBuilder, scope: &str) -> reqwest::RequestBuilder {
        let auth = self
            .auth
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((token, expires)) = auth.tokens.get(scope)
            && *expires > Instant::now()
        {
            return request.bearer_auth(&token.0);
        }
        match (&self.credentials, auth.use_basic) {
            (Some(credentials), true) => {
                request.basic_auth(&credentials.username, Some(&credentials.password.0))
            }
            _ => request,
        }
    }

    async fn authenticate(
        &self,
        challenge: Option<&str>,
        scope: &str,
    ) -> Result<(), UpstreamError> {
        let Some(challenge) = challenge.and_then(parse_challenge) else {
            return Err(UpstreamError::Denied(StatusCode::UNAUTHORIZED));
        };
        if challenge.scheme.eq_ignore_ascii_case("basic") {
            if self.credentials.is_none() {
                return Err(UpstreamError::Denied(StatusCode::UNAUTHORIZED));
            }
            self.auth
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .use_basic = true;
            return Ok(());
        }
        if !challenge.scheme.eq_ignore_ascii_case("bearer") {
            return Err(UpstreamError::Denied(StatusCode::UNAUTHORIZED));
        }
        let realm = challenge
            .params
            .get("realm")
            .and_then(|realm| Url::parse(realm).ok())
            .filter(|realm| matches!(realm.scheme(), "http" | "https"))
            .ok_or(UpstreamError::Denied(StatusCode::UNAUTHORIZED))?;
        let mut token_url = realm.clone();
        {
            let mut query = token_url.query_pairs_mut();
            if let Some(service) = challenge.params.get("service") {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope);
        }
        let mut request = self.client.get(token_url);
        if let Some(credentials) = &self.credentials {
            if realm_trusted(&self.base, &realm) {
                request = request.basic_auth(&credentials.username, Some(&credentials.password.0));
            } else {
                tracing::warn!(upstream = %self.prefix, realm = %realm.host_str().unwrap_or(""), "token realm is outside the upstream's domain: asking for an anonymous token");
            }
        }
        let response = match tokio::time::timeout(self.response_timeout, request.send()).await {
            Err(_) => return Err(self.failed(UpstreamError::Timeout)),
            Ok(Err(error)) => {
                return Err(self.failed(UpstreamError::Connect(format!(
                    "token realm: {}",
                    error_chain(&error)
                ))));
            }
            Ok(Ok(response)) => response,
        };
        if !response.status().is_success() {
            return Err(UpstreamError::Denied(response.status()));
        }
        let body: serde_json::Value = tokio::time::timeout(self.response_timeout, response.json())
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|error| {
                UpstreamError::Connect(format!(
                    "token realm answered something that is not a token: {error}"
                ))
            })?;
        let token = body
            .get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|token| token.as_str())
            .ok_or_else(|| UpstreamError::Connect("token realm answered without a token".into()))?;
        let lifetime = body
            .get("expires_in")
            .and_then(|v| v.as_u64())
            .unwrap_or(60)
            .max(20);
        let expires = Instant::now() + Duration::from_secs(lifetime - 10);
        self.auth
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .tokens
            .insert(scope.to_owned(), (Secret(token.to_owned()), expires));
        Ok(())
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

struct Challenge {
    scheme: String,
    params: HashMap<String, String>,
}

fn parse_challenge(text: &str) -> Option<Challenge> {
    let text = text.trim();
    let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(key.trim().to_ascii_lowercase(), value.to_owned());
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_owned(),
        params,
    })
}

/// Credentials go to a token realm only on the upstream's own host or registrable domain
/// (approximated by the last two DNS labels: `auth.docker.io` for `registry-1.docker.io`),
/// and never downgraded from https to http.
fn realm_trusted(upstream: &Url, realm: &Url) -> bool {
    if upstream.scheme() == "https" && realm.scheme() != "https" {
        return false;
    }
    let (Some(upstream_host), Some(realm_host)) = (upstream.host_str(), realm.host_str()) else {
        return false;
    };
    let (upstream_host, realm_host) = (
        upstream_host.to_ascii_lowercase(),
        realm_host.to_ascii_lowercase(),
    );
    let is_ip = |host: &str| host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok();
    if is_ip(&upstream_host) || is_ip(&realm_host) {
        return upstream_host == realm_host;
    }
    let tail = |host: &str| {
        host.rsplit('.')
            .take(2)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    upstream_host == realm_host || tail(&upstream_host) == tail(&realm_host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let challenge = parse_challenge(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#).unwrap();
        assert_eq!(challenge.scheme, "Bearer");
        assert_eq!(challenge.params["realm"], "https://auth.docker.io/token");
        assert_eq!(challenge.params["service"], "registry.docker.io");
        assert_eq!(
            challenge.params["scope"],
            "repository:library/busybox:pull,push"
        );
        let basic = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(basic.scheme, "Basic");
    }

    #[test]
    fn credentials_only_to_the_upstream_domain() {
        let hub = Url::parse("https://registry-1.docker.io").unwrap();
        assert!(realm_trusted(
            &hub,
            &Url::parse("https://auth.docker.io/token").unwrap()
        ));
        assert!(!realm_trusted(
            &hub,
            &Url::parse("https://evil.example/token").unwrap()
        ));
        assert!(!realm_trusted(
            &hub,
            &Url::parse("http://auth.docker.io/token").unwrap()
        ));
        let local = Url::parse("http://127.0.0.1:5100").unwrap();
        assert!(realm_trusted(
            &local,
            &Url::parse("http://127.0.0.1:5200/token").unwrap()
        ));
        assert!(!realm_trusted(
            &local,
            &Url::parse("http://127.0.0.2:5200/token").unwrap()
        ));
    }

    #[test]
    fn secrets_do_not_print() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cred");
        std::fs::write(&path, "\nrobot:hunter2\n").unwrap();
        let credentials = Credentials::read(&path).unwrap();
        assert_eq!(credentials.username, "robot");
        assert!(!format!("{credentials:?}").contains("hunter2"));
        std::fs::write(&path, "no-colon").unwrap();
        assert!(
            Credentials::read(&path)
                .unwrap_err()
                .contains("USERNAME:PASSWORD")
        );
    }
}
