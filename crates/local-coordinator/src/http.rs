//! The HTTP edge: GitLab's runner API routes, parsed into calls on the state machine and
//! answered with GitLab's status codes and headers.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post, put};
use podfleet_coordinator::model::{JobRequest, UpdateJobRequest, VerifyRequest, VerifyResponse};
use serde::de::DeserializeOwned;

use crate::report::JobStatus;
use crate::state::{CoordinatorState, RequestOutcome, TraceOutcome, UpdateOutcome, VerifyOutcome};

/// Seconds between trace patches we ask runners for (GitLab's value while someone watches).
const TRACE_UPDATE_INTERVAL: &str = "3";

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
    let outcome = lock(&state).request_job(request.token.expose(), two_phase);
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
