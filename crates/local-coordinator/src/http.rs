//! The HTTP edge: GitLab's runner API routes, parsed into calls on the state machine and
//! answered with GitLab's status codes and headers.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::Query;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, patch, post, put};
use podfleet_coordinator::model::{JobRequest, UpdateJobRequest, VerifyRequest, VerifyResponse};
use serde::de::DeserializeOwned;

use crate::report::JobStatus;
use crate::state::{
    ArtifactsAccess, CoordinatorState, RequestOutcome, StoredArtifact, TraceOutcome, UpdateOutcome,
    VerifyOutcome,
};

/// Seconds between trace patches we ask runners for (GitLab's value while someone watches).
const TRACE_UPDATE_INTERVAL: &str = "3";

/// GitLab's default maximum artifacts size is 100 MiB; a local pipeline allows more.
const MAX_ARTIFACTS_BYTES: usize = 1 << 30;

pub(crate) type SharedState = Arc<Mutex<CoordinatorState>>;

pub(crate) fn lock(state: &SharedState) -> MutexGuard<'_, CoordinatorState> {
    // Every state change completes under one lock without awaiting; a panic in one handler
    // leaves a consistent state behind, so keep serving.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn router(state: SharedState) -> Router {
    Router::new()
        .route("/api/v4/runners/verify", post(verify))
        .route("/api/v4/jobs/request", post(request_job))
        .route("/api/v4/jobs/{id}", put(update_job))
        .route("/api/v4/jobs/{id}/trace", patch(patch_trace))
        .route(
            "/api/v4/jobs/{id}/artifacts",
            post(upload_artifacts)
                .get(download_artifacts)
                .layer(DefaultBodyLimit::max(MAX_ARTIFACTS_BYTES)),
        )
        .route("/{*path}", any(git_http))
        .fallback(|| async { message(StatusCode::NOT_FOUND, "404 Not Found") })
        .with_state(state)
}

/// GitLab's error body: `{"message":"…"}`.
fn message(status: StatusCode, text: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "message": text }))).into_response()
}

/// A request body that is not the JSON the endpoint expects; answered with 400.
struct InvalidBody(String);

impl IntoResponse for InvalidBody {
    fn into_response(self) -> Response {
        message(
            StatusCode::BAD_REQUEST,
            &format!("400 Bad request - invalid JSON body: {}", self.0),
        )
    }
}

fn decode<T: DeserializeOwned>(body: &Bytes) -> Result<T, InvalidBody> {
    serde_json::from_slice(body).map_err(|error| InvalidBody(error.to_string()))
}

fn with_job_status(mut response: Response, status: Option<JobStatus>) -> Response {
    if let Some(status) = status {
        response
            .headers_mut()
            .insert("job-status", HeaderValue::from_static(status.as_str()));
    }
    response
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

async fn verify(State(state): State<SharedState>, body: Bytes) -> Response {
    let request: VerifyRequest = match decode(&body) {
        Ok(request) => request,
        Err(invalid) => return invalid.into_response(),
    };
    if request.token.is_empty() {
        return message(
            StatusCode::BAD_REQUEST,
            "400 Bad request - token is missing",
        );
    }
    match lock(&state).verify(request.token.expose()) {
        VerifyOutcome::Verified { runner_id } => axum::Json(VerifyResponse {
            id: runner_id,
            token: request.token,
            token_expires_at: None,
        })
        .into_response(),
        VerifyOutcome::Forbidden => message(StatusCode::FORBIDDEN, "403 Forbidden"),
    }
}

/// How long a job request that finds nothing, and already knows the queue as it is (the
/// `last_update` it sends, from the `X-GitLab-Last-Update` it was given), is held for the
/// queue to change, as GitLab's long polling does. Short: a job that becomes ready by time
/// alone (`when: delayed`) is found at the next ask.
const LONG_POLL: std::time::Duration = std::time::Duration::from_secs(1);

async fn request_job(State(state): State<SharedState>, body: Bytes) -> Response {
    let request: JobRequest = match decode(&body) {
        Ok(request) => request,
        Err(invalid) => return invalid.into_response(),
    };
    if request.token.is_empty() {
        return message(
            StatusCode::BAD_REQUEST,
            "400 Bad request - token is missing",
        );
    }
    let two_phase = request.info.features.two_phase_job_commit;
    let known = request.last_update.clone();
    let deadline = tokio::time::Instant::now() + LONG_POLL;
    let outcome = loop {
        let (outcome, mut changes) = {
            let mut state = lock(&state);
            (
                state.request_job(request.token.expose(), two_phase),
                state.queue_changes(),
            )
        };
        match &outcome {
            RequestOutcome::NoJob { last_update } if known.as_deref() == Some(last_update) => {
                match tokio::time::timeout_at(deadline, changes.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => break outcome,
                }
            }
            _ => break outcome,
        }
    };
    match outcome {
        RequestOutcome::Job(job) => (StatusCode::CREATED, axum::Json(job)).into_response(),
        RequestOutcome::NoJob { last_update } => {
            let mut response = StatusCode::NO_CONTENT.into_response();
            if let Ok(value) = HeaderValue::from_str(&last_update) {
                response.headers_mut().insert("x-gitlab-last-update", value);
            }
            response
        }
        RequestOutcome::Forbidden => message(StatusCode::FORBIDDEN, "403 Forbidden"),
    }
}

async fn update_job(
    State(state): State<SharedState>,
    Path(job_id): Path<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: UpdateJobRequest = match decode(&body) {
        Ok(request) => request,
        Err(invalid) => return invalid.into_response(),
    };
    let token = header(&headers, "job-token").unwrap_or(request.token.expose());
    let outcome = lock(&state).update_job(job_id, token, &request);
    match outcome {
        UpdateOutcome::Accepted { status } => {
            with_job_status((StatusCode::OK, "200").into_response(), Some(status))
        }
        UpdateOutcome::Forbidden { status } => {
            with_job_status(message(StatusCode::FORBIDDEN, "403 Forbidden"), status)
        }
        UpdateOutcome::BadRequest { message: text } => message(
            StatusCode::BAD_REQUEST,
            &format!("400 Bad request - {text}"),
        ),
        UpdateOutcome::Conflict { status } => with_job_status(
            message(
                StatusCode::CONFLICT,
                "409 Conflict - the job is already running",
            ),
            Some(status),
        ),
        UpdateOutcome::ChecksumMismatch { status } => with_job_status(
            message(
                StatusCode::PRECONDITION_FAILED,
                "412 Precondition Failed - the trace checksum does not match the stored trace",
            ),
            Some(status),
        ),
    }
}

async fn patch_trace(
    State(state): State<SharedState>,
    Path(job_id): Path<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = header(&headers, "job-token").unwrap_or_default();
    let content_range = header(&headers, "content-range");
    let outcome = lock(&state).append_trace(job_id, token, content_range, &body);
    let ranged = |status: StatusCode, size: u64, job_status: JobStatus| {
        let mut response = with_job_status(status.into_response(), Some(job_status));
        if let Ok(value) = HeaderValue::from_str(&format!("0-{size}")) {
            response.headers_mut().insert("range", value);
        }
        response
    };
    match outcome {
        TraceOutcome::Accepted { size, status } => {
            let mut response = ranged(StatusCode::ACCEPTED, size, status);
            response.headers_mut().insert(
                "x-gitlab-trace-update-interval",
                HeaderValue::from_static(TRACE_UPDATE_INTERVAL),
            );
            response
        }
        TraceOutcome::RangeMismatch { size, status } => {
            ranged(StatusCode::RANGE_NOT_SATISFIABLE, size, status)
        }
        TraceOutcome::Forbidden { status } => {
            with_job_status(message(StatusCode::FORBIDDEN, "403 Forbidden"), status)
        }
        TraceOutcome::BadRequest { message: text } => message(
            StatusCode::BAD_REQUEST,
            &format!("400 Bad request - {text}"),
        ),
    }
}

/// One field of a `multipart/form-data` body: name, filename, bytes.
type FormPart<'a> = (String, Option<String>, &'a [u8]);

/// The parts of a `multipart/form-data` body.
fn multipart_parts<'a>(content_type: &str, body: &'a [u8]) -> Option<Vec<FormPart<'a>>> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|part| part.strip_prefix("boundary="))?
        .trim_matches('"');
    let delimiter = format!("--{boundary}").into_bytes();
    let find = |haystack: &[u8], from: usize| -> Option<usize> {
        haystack
            .get(from..)?
            .windows(delimiter.len())
            .position(|window| window == delimiter.as_slice())
            .map(|position| position + from)
    };
    let mut parts = Vec::new();
    let mut position = find(body, 0)? + delimiter.len();
    loop {
        if body.get(position..position + 2) == Some(b"--") {
            return Some(parts);
        }
        let headers_start = position + 2;
        let headers_end = body
            .get(headers_start..)?
            .windows(4)
            .position(|window| window == b"\r\n\r\n")?
            + headers_start;
        let headers = String::from_utf8_lossy(&body[headers_start..headers_end]).into_owned();
        let data_start = headers_end + 4;
        let next = find(body, data_start)?;
        let data_end = next.checked_sub(2)?;
        let disposition = headers
            .lines()
            .find(|line| line.to_ascii_lowercase().starts_with("content-disposition"))?
            .to_owned();
        let field = |key: &str| {
            disposition.split(';').map(str::trim).find_map(|part| {
                part.strip_prefix(&format!("{key}="))
                    .map(|value| value.trim_matches('"').to_owned())
            })
        };
        parts.push((
            field("name")?,
            field("filename"),
            &body[data_start..data_end.max(data_start)],
        ));
        position = next + delimiter.len();
    }
}

async fn upload_artifacts(
    State(state): State<SharedState>,
    Path(job_id): Path<u64>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = header(&headers, "job-token")
        .map(str::to_owned)
        .or_else(|| query.get("token").cloned())
        .unwrap_or_default();
    let content_type = header(&headers, "content-type").unwrap_or_default();
    let Some(parts) = multipart_parts(content_type, &body) else {
        return message(
            StatusCode::BAD_REQUEST,
            "400 Bad request - expected a multipart/form-data body with a file field",
        );
    };
    let form = |name: &str| {
        parts
            .iter()
            .find(|(field, _, _)| field == name)
            .map(|(_, _, data)| String::from_utf8_lossy(data).into_owned())
    };
    let artifact_type = query
        .get("artifact_type")
        .cloned()
        .or_else(|| form("artifact_type"))
        .unwrap_or_else(|| "archive".to_owned());
    let Some((_, filename, data)) = parts.iter().find(|(field, _, _)| field == "file") else {
        return message(StatusCode::BAD_REQUEST, "400 Bad request - file is missing");
    };
    let destination = lock(&state).artifacts_destination(job_id, &token, &artifact_type);
    let Some(destination) = destination else {
        return message(StatusCode::FORBIDDEN, "403 Forbidden");
    };
    let written = match destination.parent() {
        Some(parent) => tokio::fs::create_dir_all(parent).await,
        None => Ok(()),
    };
    let written = match written {
        Ok(()) => tokio::fs::write(&destination, data).await,
        Err(error) => Err(error),
    };
    if let Err(error) = written {
        tracing::error!(path = %destination.display(), %error, "cannot store artifacts");
        return message(
            StatusCode::INTERNAL_SERVER_ERROR,
            "500 Internal Server Error - cannot store the artifacts",
        );
    }
    lock(&state).artifacts_stored(
        job_id,
        StoredArtifact {
            path: destination,
            filename: filename
                .clone()
                .unwrap_or_else(|| "artifacts.zip".to_owned()),
            size: data.len() as u64,
            artifact_type,
        },
    );
    (
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "id": job_id })),
    )
        .into_response()
}

async fn download_artifacts(
    State(state): State<SharedState>,
    Path(job_id): Path<u64>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let token = header(&headers, "job-token")
        .map(str::to_owned)
        .or_else(|| query.get("job_token").cloned())
        .unwrap_or_default();
    let access = lock(&state).artifacts_for(job_id, &token);
    match access {
        ArtifactsAccess::Forbidden => message(StatusCode::FORBIDDEN, "403 Forbidden"),
        ArtifactsAccess::NotFound => message(StatusCode::NOT_FOUND, "404 Not Found"),
        ArtifactsAccess::Allowed(artifact) => match tokio::fs::read(&artifact.path).await {
            Ok(bytes) => {
                let mut response = (StatusCode::OK, bytes).into_response();
                response
                    .headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/zip"));
                if let Ok(value) = HeaderValue::from_str(&format!(
                    "attachment; filename=\"{}\"",
                    artifact.filename.replace('"', "")
                )) {
                    response.headers_mut().insert("content-disposition", value);
                }
                response
            }
            Err(_) => message(StatusCode::NOT_FOUND, "404 Not Found"),
        },
    }
}

/// The password of `Authorization: Basic`, which carries the job token for git.
fn basic_password(headers: &HeaderMap) -> Option<String> {
    use base64::Engine;
    let encoded = header(headers, "authorization")?.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':')
        .map(|(_, password)| password.to_owned())
}

/// Git's smart HTTP protocol for the source snapshot, read-only, through `git http-backend`.
async fn git_http(
    State(state): State<SharedState>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    let upload_pack = path.ends_with("/info/refs") || path.ends_with("/git-upload-pack");
    let root = {
        let state = lock(&state);
        state.sources_root(path)
    };
    let Some(root) = root.filter(|_| upload_pack) else {
        return message(StatusCode::NOT_FOUND, "404 Not Found");
    };
    let authorized =
        basic_password(&headers).is_some_and(|token| lock(&state).job_token_active(&token));
    if !authorized {
        let mut response = message(StatusCode::UNAUTHORIZED, "401 Unauthorized");
        response.headers_mut().insert(
            "www-authenticate",
            HeaderValue::from_static("Basic realm=\"podfleet local coordinator\""),
        );
        return response;
    }
    let mut command = tokio::process::Command::new("git");
    command
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", path)
        .env("REQUEST_METHOD", method.as_str())
        .env("QUERY_STRING", uri.query().unwrap_or_default())
        .env(
            "CONTENT_TYPE",
            header(&headers, "content-type").unwrap_or_default(),
        )
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(encoding) = header(&headers, "content-encoding") {
        command.env("HTTP_CONTENT_ENCODING", encoding);
    }
    if let Some(protocol) = header(&headers, "git-protocol") {
        command.env("GIT_PROTOCOL", protocol);
    }
    let output = async {
        use tokio::io::AsyncWriteExt;
        let mut child = command.spawn()?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let writer = async move {
            let written = stdin.write_all(&body).await;
            drop(stdin);
            written
        };
        let (written, output) = tokio::join!(writer, child.wait_with_output());
        written?;
        output
    }
    .await;
    let output = match output {
        Ok(output) => output,
        Err(error) => {
            tracing::error!(%error, "cannot run git http-backend");
            return message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error - cannot run git http-backend",
            );
        }
    };
    cgi_response(&output.stdout)
}

/// An HTTP response from CGI output (`Status:` and other headers, a blank line, the body).
fn cgi_response(output: &[u8]) -> Response {
    let split = output
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|position| (position, 4))
        .or_else(|| {
            output
                .windows(2)
                .position(|window| window == b"\n\n")
                .map(|position| (position, 2))
        });
    let Some((end, separator)) = split else {
        return message(
            StatusCode::INTERNAL_SERVER_ERROR,
            "500 Internal Server Error - git http-backend answered without headers",
        );
    };
    let head = String::from_utf8_lossy(&output[..end]).into_owned();
    let mut response = output[end + separator..].to_vec().into_response();
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value
                .split_whitespace()
                .next()
                .and_then(|code| code.parse().ok());
            if let Some(status) = code.and_then(|code: u16| StatusCode::from_u16(code).ok()) {
                *response.status_mut() = status;
            }
        } else if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_split_into_fields() {
        let body = b"--XX\r\nContent-Disposition: form-data; name=\"artifact_type\"\r\n\r\narchive\r\n--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"artifacts.zip\"\r\nContent-Type: application/zip\r\n\r\nPK\x03\x04\r\n--data\r\n--XX--\r\n";
        let parts = multipart_parts("multipart/form-data; boundary=XX", body).expect("valid body");
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0, "artifact_type");
        assert_eq!(parts[0].2, b"archive");
        assert_eq!(parts[1].1.as_deref(), Some("artifacts.zip"));
        assert_eq!(parts[1].2, b"PK\x03\x04\r\n--data");
        assert!(multipart_parts("multipart/form-data", body).is_none());
    }

    #[test]
    fn cgi_output_becomes_a_response() {
        let response = cgi_response(b"Status: 403 Forbidden\r\nContent-Type: text/plain\r\n\r\nno");
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()["content-type"], "text/plain");
    }
}
