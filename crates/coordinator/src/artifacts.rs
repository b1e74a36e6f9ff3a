//! Artifact transfers with the job token (§9): `POST /api/v4/jobs/:id/artifacts` (multipart,
//! streamed from a file) and `GET /api/v4/jobs/:id/artifacts` (streamed into a file). The
//! helper calls these from the instance, straight to the coordinator.
//!
//! The job token travels in the `JOB-TOKEN` header only, never in a URL, so no URL in an
//! error can leak it; redirects to object storage are followed without the header.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{CONTENT_TYPE, HeaderMap, LOCATION};
use reqwest::{StatusCode, Url};
use tokio::io::AsyncWriteExt;

use crate::client::api_base_url;
use crate::error::CoordinatorError;
use crate::retry::{RetryPolicy, is_retryable, wait_before_retry};

/// Why an artifact transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactsError {
    #[error(
        "{url} answered 413: the artifacts archive is larger than the instance's maximum artifacts size; make the artifacts smaller or raise the limit in GitLab's CI/CD settings"
    )]
    TooLarge { url: String },

    #[error(
        "{url} answered {status}: {message}; the job token is invalid, the job is not running or may not read these artifacts"
    )]
    Forbidden {
        url: String,
        status: u16,
        message: String,
    },

    #[error("{url} answered 404: the artifacts do not exist (expired or never uploaded)")]
    NotFound { url: String },

    #[error("{url} answered {status}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Status {
        url: String,
        status: u16,
        message: String,
    },

    #[error("request to {url} failed: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
}

impl ArtifactsError {
    /// Whether repeating the call cannot help.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            ArtifactsError::Transport { .. } | ArtifactsError::Status { .. }
        )
    }
}

/// One archive to upload and how the server should store it.
#[derive(Debug, Clone)]
pub struct ArtifactUpload<'a> {
    pub file: &'a Path,
    /// `artifacts.zip`, `junit.xml.gz`, ...
    pub file_name: &'a str,
    /// `zip`, `gzip` or `raw`.
    pub artifact_format: &'a str,
    /// `archive`, `junit`, ...
    pub artifact_type: &'a str,
    /// Free text such as `1 week`; empty means the server's default.
    pub expire_in: &'a str,
}

/// Makes the artifact calls of one job.
#[derive(Debug, Clone)]
pub struct ArtifactsClient {
    http: reqwest::Client,
    base: Url,
    retry: RetryPolicy,
}

const BOUNDARY_PREFIX: &str = "podfleet-artifacts-";

impl ArtifactsClient {
    /// A client for the coordinator at `coordinator_url` (as in `config.toml`'s `url`).
    /// gitlab-runner makes 3 attempts per upload (see [`RetryPolicy`]).
    pub fn new(coordinator_url: &str, retry: RetryPolicy) -> Result<Self, CoordinatorError> {
        let base = api_base_url(coordinator_url)?;
        let http = reqwest::Client::builder()
            .user_agent(format!("podfleet-helper/{}", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // Redirects are handled here: a streamed body cannot be replayed by reqwest.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| CoordinatorError::Transport {
                url: base.to_string(),
                source: error,
            })?;
        Ok(ArtifactsClient { http, base, retry })
    }

    /// Uploads one archive for job `job_id`; 403 and 413 are final, retryable answers and
    /// network errors are retried, a 307 switches to its `Location`.
    pub async fn upload(
        &self,
        job_id: u64,
        job_token: &str,
        upload: &ArtifactUpload<'_>,
    ) -> Result<(), ArtifactsError> {
        let mut url = self
            .base
            .join(&format!("jobs/{job_id}/artifacts"))
            .map_err(|error| invalid_url(&self.base, error))?;
        {
            let mut query = url.query_pairs_mut();
            for (key, value) in [
                ("artifact_format", upload.artifact_format),
                ("artifact_type", upload.artifact_type),
                ("expire_in", upload.expire_in),
            ] {
                if !value.is_empty() {
                    query.append_pair(key, value);
                }
            }
        }
        let mut attempt = 0;
        let mut redirects = 0;
        loop {
            attempt += 1;
            let result = self.upload_once(&url, job_token, upload).await;
            let error = match result {
                Ok(UploadAnswer::Done) => return Ok(()),
                Ok(UploadAnswer::Redirect(location)) if redirects < 3 => {
                    redirects += 1;
                    url = location;
                    attempt -= 1;
                    continue;
                }
                Ok(UploadAnswer::Redirect(location)) => ArtifactsError::Status {
                    url: url.to_string(),
                    status: 307,
                    message: format!("too many redirects (last to {location})"),
                },
                Ok(UploadAnswer::Retry(error, headers)) => {
                    if attempt >= self.retry.max_attempts {
                        return Err(error);
                    }
                    self.back_off(attempt, &headers).await;
                    continue;
                }
                Err(error) => error,
            };
            if error.is_final() || attempt >= self.retry.max_attempts {
                return Err(error);
            }
            self.back_off(attempt, &HeaderMap::new()).await;
        }
    }

    /// Waits before attempt `attempt + 1` (`Retry-After` or exponential backoff).
    async fn back_off(&self, attempt: u32, headers: &HeaderMap) {
        tokio::time::sleep(wait_before_retry(
            &self.retry,
            attempt,
            headers,
            chrono::Utc::now(),
        ))
        .await;
    }

    async fn upload_once(
        &self,
        url: &Url,
        job_token: &str,
        upload: &ArtifactUpload<'_>,
    ) -> Result<UploadAnswer, ArtifactsError> {
        let io_error = |source| ArtifactsError::Io {
            path: upload.file.to_owned(),
            source,
        };
        let file = tokio::fs::File::open(upload.file).await.map_err(io_error)?;
        let length = file.metadata().await.map_err(io_error)?.len();
        let boundary = format!("{BOUNDARY_PREFIX}{:016x}", rand::random::<u64>());
        let file_name = upload.file_name.replace(['"', '\r', '\n'], "_");
        let head = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        );
        let tail = format!("\r\n--{boundary}--\r\n");
        let content_length = head.len() as u64 + length + tail.len() as u64;
        let body_stream = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(head))])
            .chain(tokio_util::io::ReaderStream::new(file))
            .chain(futures_util::stream::iter([Ok(Bytes::from(tail))]));
        let response = self
            .http
            .post(url.clone())
            .header("JOB-TOKEN", job_token)
            .header(
                CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .header(reqwest::header::CONTENT_LENGTH, content_length)
            .body(reqwest::Body::wrap_stream(body_stream))
            .send()
            .await
            .map_err(|source| transport(url, source))?;
        let status = response.status();
        let headers = response.headers().clone();
        if status == StatusCode::TEMPORARY_REDIRECT
            && let Some(location) = headers
                .get(LOCATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|location| url.join(location).ok())
        {
            return Ok(UploadAnswer::Redirect(location));
        }
        if status.is_success() {
            return Ok(UploadAnswer::Done);
        }
        let message = error_text(response).await;
        let error = status_error(url, status, message);
        if is_retryable(status.as_u16()) {
            return Ok(UploadAnswer::Retry(error, headers));
        }
        Err(error)
    }

    /// Downloads the artifacts of job `job_id` (a dependency) into `destination`, following
    /// a redirect to object storage; 401/403/404 are final. Returns the size in bytes.
    pub async fn download(
        &self,
        job_id: u64,
        job_token: &str,
        destination: &Path,
    ) -> Result<u64, ArtifactsError> {
        let url = self
            .base
            .join(&format!("jobs/{job_id}/artifacts"))
            .map_err(|error| invalid_url(&self.base, error))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // gitlab-runner asks for a direct (object storage) download on the first try only.
            let mut request_url = url.clone();
            if attempt == 1 {
                request_url
                    .query_pairs_mut()
                    .append_pair("direct_download", "true");
            }
            match self
                .download_once(&request_url, job_token, destination)
                .await
            {
                Ok(size) => return Ok(size),
                Err(error) if error.is_final() || attempt >= self.retry.max_attempts => {
                    return Err(error);
                }
                Err(_) => self.back_off(attempt, &HeaderMap::new()).await,
            }
        }
    }

    async fn download_once(
        &self,
        url: &Url,
        job_token: &str,
        destination: &Path,
    ) -> Result<u64, ArtifactsError> {
        let mut response = self
            .http
            .get(url.clone())
            .header("JOB-TOKEN", job_token)
            .send()
            .await
            .map_err(|source| transport(url, source))?;
        let mut shown_url = url.to_string();
        if response.status().is_redirection() {
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|location| url.join(location).ok())
                .ok_or_else(|| ArtifactsError::Status {
                    url: url.to_string(),
                    status: response.status().as_u16(),
                    message: "redirect without a usable Location".to_owned(),
                })?;
            // A presigned object storage URL: its query is the credential, so it is not shown.
            let mut shown = location.clone();
            shown.set_query(None);
            shown_url = shown.to_string();
            response = self.http.get(location).send().await.map_err(|source| {
                ArtifactsError::Transport {
                    url: shown_url.clone(),
                    source: source.without_url(),
                }
            })?;
        }
        let status = response.status();
        if !status.is_success() {
            let message = error_text(response).await;
            let shown: Url = shown_url.parse().unwrap_or_else(|_| url.clone());
            return Err(status_error(&shown, status, message));
        }
        let io_error = |source| ArtifactsError::Io {
            path: destination.to_owned(),
            source,
        };
        let mut file = tokio::fs::File::create(destination)
            .await
            .map_err(io_error)?;
        let mut size = 0u64;
        while let Some(chunk) =
            response
                .chunk()
                .await
                .map_err(|source| ArtifactsError::Transport {
                    url: shown_url.clone(),
                    source: source.without_url(),
                })?
        {
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io_error)?;
        }
        file.flush().await.map_err(io_error)?;
        Ok(size)
    }
}

enum UploadAnswer {
    Done,
    Redirect(Url),
    Retry(ArtifactsError, HeaderMap),
}

fn invalid_url(base: &Url, error: impl std::fmt::Display) -> ArtifactsError {
    ArtifactsError::Coordinator(CoordinatorError::InvalidUrl {
        url: base.to_string(),
        reason: error.to_string(),
    })
}

fn transport(url: &Url, source: reqwest::Error) -> ArtifactsError {
    ArtifactsError::Transport {
        url: url.to_string(),
        source: source.without_url(),
    }
}

fn status_error(url: &Url, status: StatusCode, message: String) -> ArtifactsError {
    let url = url.to_string();
    match status.as_u16() {
        413 => ArtifactsError::TooLarge { url },
        401 | 403 => ArtifactsError::Forbidden {
            url,
            status: status.as_u16(),
            message,
        },
        404 => ArtifactsError::NotFound { url },
        // 400 (bad request) and 405 (artifacts disabled) will not change on a retry either.
        400 | 405 => ArtifactsError::Forbidden {
            url,
            status: status.as_u16(),
            message,
        },
        other => ArtifactsError::Status {
            url,
            status: other,
            message,
        },
    }
}

/// The server's error text, short: a JSON `message`/`error`, else the first 200 characters.
async fn error_text(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text)
        && let Some(message) = value
            .get("message")
            .or_else(|| value.get("error"))
            .map(|message| match message {
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            })
    {
        return message;
    }
    text.trim().chars().take(200).collect()
}
