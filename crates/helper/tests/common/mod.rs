//! Test harness: real git repositories served over smart HTTP by `git http-backend` (as CGI
//! behind a small axum server on 127.0.0.1 that demands the job token like GitLab does), a
//! coordinator implementing the two artifact endpoints, and job payloads.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use podfleet_coordinator::model::{JobResponse, JobVariable, Secret};
use tokio::io::AsyncWriteExt;

pub const TOKEN: &str = "glcbt-64_test-job-token-SECRET";

pub fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("git runs");
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Repositories under `<root>/group/`: `project.git` (with a submodule `sub` from
/// `../sub.git`) and `sub.git`. Returns the project's HEAD sha.
pub struct Repositories {
    pub root: tempfile::TempDir,
    pub work: PathBuf,
}

impl Repositories {
    pub fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let group = root.path().join("group");
        std::fs::create_dir_all(&group).unwrap();
        let work = root.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        // The submodule.
        let sub = work.join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        git(&sub, &["init", "-q", "-b", "main"]);
        std::fs::write(sub.join("sub.txt"), "from the submodule\n").unwrap();
        git(&sub, &["add", "."]);
        git(&sub, &["commit", "-q", "-m", "sub"]);
        git(
            &group,
            &["clone", "-q", "--bare", sub.to_str().unwrap(), "sub.git"],
        );
        // The project.
        let project = work.join("project");
        std::fs::create_dir_all(&project).unwrap();
        git(&project, &["init", "-q", "-b", "main"]);
        std::fs::write(project.join("README"), "first\n").unwrap();
        git(&project, &["add", "."]);
        git(&project, &["commit", "-q", "-m", "first"]);
        git(
            &group,
            &[
                "clone",
                "-q",
                "--bare",
                project.to_str().unwrap(),
                "project.git",
            ],
        );
        git(
            &project,
            &[
                "remote",
                "add",
                "origin",
                group.join("project.git").to_str().unwrap(),
            ],
        );
        Repositories { root, work }
    }

    /// Commits `file` with `contents` to the project and pushes it; returns the sha.
    pub fn commit(&self, file: &str, contents: &str) -> String {
        let project = self.work.join("project");
        std::fs::write(project.join(file), contents).unwrap();
        git(&project, &["add", "."]);
        git(&project, &["commit", "-q", "-m", file]);
        git(&project, &["push", "-q", "origin", "main"]);
        git(&project, &["rev-parse", "HEAD"])
    }

    /// Adds the submodule (relative URL `../sub.git`) and pushes; returns the sha.
    pub fn add_submodule(&self) -> String {
        let project = self.work.join("project");
        let group = self.root.path().join("group");
        git(
            &project,
            &[
                "-c",
                "protocol.file.allow=always",
                "submodule",
                "add",
                "-q",
                group.join("sub.git").to_str().unwrap(),
                "sub",
            ],
        );
        git(
            &project,
            &[
                "config",
                "-f",
                ".gitmodules",
                "submodule.sub.url",
                "../sub.git",
            ],
        );
        git(&project, &["add", "."]);
        git(&project, &["commit", "-q", "-m", "submodule"]);
        git(&project, &["push", "-q", "origin", "main"]);
        git(&project, &["rev-parse", "HEAD"])
    }

    pub fn head(&self) -> String {
        git(&self.work.join("project"), &["rev-parse", "HEAD"])
    }
}

/// `git http-backend` as CGI for the repositories under `root`, answering 401 unless the
/// request carries `gitlab-ci-token:<TOKEN>` as basic auth.
pub async fn serve_git(root: PathBuf) -> SocketAddr {
    async fn handle(
        State(root): State<Arc<PathBuf>>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("gitlab-ci-token:{TOKEN}"))
        );
        let authorised = headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            == Some(expected.as_str());
        if !authorised {
            return (
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Basic realm=\"GitLab\"")],
                "HTTP Basic: Access denied",
            )
                .into_response();
        }
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let mut child = tokio::process::Command::new("git")
            .arg("http-backend")
            .env_clear()
            .env("GIT_PROJECT_ROOT", root.as_os_str())
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("REQUEST_METHOD", method.as_str())
            .env("PATH_INFO", uri.path())
            .env("QUERY_STRING", uri.query().unwrap_or(""))
            .env("CONTENT_TYPE", header("content-type"))
            .env("CONTENT_LENGTH", body.len().to_string())
            .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
            .env("GIT_PROTOCOL", header("git-protocol"))
            .env("REMOTE_USER", "gitlab-ci-token")
            .env("REMOTE_ADDR", "127.0.0.1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("git http-backend starts");
        let mut stdin = child.stdin.take().unwrap();
        let writer = tokio::spawn(async move {
            let _ = stdin.write_all(&body).await;
        });
        let output = child.wait_with_output().await.unwrap();
        writer.await.unwrap();
        let raw = output.stdout;
        let split = raw
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .map(|at| (at, 4))
            .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|at| (at, 2)))
            .expect("CGI output has a header block");
        let head = String::from_utf8_lossy(&raw[..split.0]).into_owned();
        let mut builder = Response::builder().status(200);
        for line in head.lines() {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            if name.eq_ignore_ascii_case("status") {
                let code: u16 = value.trim()[..3].parse().unwrap();
                builder = builder.status(code);
            } else {
                builder = builder.header(name.trim(), value.trim());
            }
        }
        builder
            .body(axum::body::Body::from(raw[split.0 + split.1..].to_vec()))
            .unwrap()
    }
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(Arc::new(root));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// What the test coordinator saw and serves.
#[derive(Default)]
pub struct CoordinatorState {
    /// Uploaded archives by job id: (file name, query string, body).
    pub uploads: HashMap<u64, Vec<(String, String, Vec<u8>)>>,
    /// Archives served by `GET /jobs/:id/artifacts`.
    pub downloads: HashMap<u64, Vec<u8>>,
    /// Statuses to answer to the next uploads, before accepting.
    pub upload_failures: Vec<u16>,
    pub upload_attempts: u32,
    /// Answer the next upload with a 307 to this same endpoint with `&redirected=1` added.
    pub redirect_next_upload: bool,
    /// Answer downloads with a 302 to object storage (`/storage/:id?X-Amz-Signature=…`).
    pub redirect_downloads: bool,
    /// Whether object storage saw a `JOB-TOKEN` header (it must not).
    pub token_sent_to_storage: bool,
}

/// A coordinator with `POST/GET /api/v4/jobs/:id/artifacts` as GitLab's (multipart upload,
/// `JOB-TOKEN` checked against `TOKEN`).
pub async fn serve_coordinator() -> (String, Arc<Mutex<CoordinatorState>>) {
    let state = Arc::new(Mutex::new(CoordinatorState::default()));
    async fn upload(
        State(state): State<Arc<Mutex<CoordinatorState>>>,
        UrlPath(id): UrlPath<u64>,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let mut state = state.lock().unwrap();
        state.upload_attempts += 1;
        if headers.get("job-token").and_then(|v| v.to_str().ok()) != Some(TOKEN) {
            return (StatusCode::FORBIDDEN, "{\"message\":\"403 Forbidden\"}").into_response();
        }
        if state.redirect_next_upload {
            state.redirect_next_upload = false;
            let location = format!("{}?{}&redirected=1", uri.path(), uri.query().unwrap_or(""));
            return (StatusCode::TEMPORARY_REDIRECT, [("location", location)]).into_response();
        }
        if !state.upload_failures.is_empty() {
            let status = state.upload_failures.remove(0);
            return (
                StatusCode::from_u16(status).unwrap(),
                "{\"message\":\"try later\"}",
            )
                .into_response();
        }
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let Some(boundary) = content_type.split("boundary=").nth(1) else {
            return (StatusCode::BAD_REQUEST, "no multipart boundary").into_response();
        };
        let (file_name, contents) = parse_multipart(&body, boundary);
        state.uploads.entry(id).or_default().push((
            file_name,
            uri.query().unwrap_or("").to_owned(),
            contents,
        ));
        (StatusCode::CREATED, "201").into_response()
    }
    async fn download(
        State(state): State<Arc<Mutex<CoordinatorState>>>,
        UrlPath(id): UrlPath<u64>,
        headers: HeaderMap,
    ) -> Response {
        if headers.get("job-token").and_then(|v| v.to_str().ok()) != Some(TOKEN) {
            return (StatusCode::FORBIDDEN, "{\"message\":\"403 Forbidden\"}").into_response();
        }
        if state.lock().unwrap().redirect_downloads {
            return (
                StatusCode::FOUND,
                [(
                    "location",
                    format!("/storage/{id}?X-Amz-Signature=presigned"),
                )],
            )
                .into_response();
        }
        match state.lock().unwrap().downloads.get(&id) {
            Some(bytes) => (StatusCode::OK, bytes.clone()).into_response(),
            None => (StatusCode::NOT_FOUND, "{\"message\":\"404 Not Found\"}").into_response(),
        }
    }
    async fn storage(
        State(state): State<Arc<Mutex<CoordinatorState>>>,
        UrlPath(id): UrlPath<u64>,
        uri: Uri,
        headers: HeaderMap,
    ) -> Response {
        let mut state = state.lock().unwrap();
        state.token_sent_to_storage |= headers.contains_key("job-token");
        if uri.query() != Some("X-Amz-Signature=presigned") {
            return (StatusCode::FORBIDDEN, "signature missing").into_response();
        }
        match state.downloads.get(&id) {
            Some(bytes) => (StatusCode::OK, bytes.clone()).into_response(),
            None => (StatusCode::NOT_FOUND, "no such object").into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/storage/{id}", axum::routing::get(storage))
        .route(
            "/api/v4/jobs/{id}/artifacts",
            axum::routing::post(upload).get(download),
        )
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/"), state)
}

/// The `file` part of a multipart body: (filename, contents).
fn parse_multipart(body: &[u8], boundary: &str) -> (String, Vec<u8>) {
    let delimiter = format!("--{boundary}");
    let start = find(body, delimiter.as_bytes()).expect("opening boundary") + delimiter.len();
    let headers_end = start + find(&body[start..], b"\r\n\r\n").expect("part headers") + 4;
    let headers = String::from_utf8_lossy(&body[start..headers_end]).into_owned();
    assert!(headers.contains("name=\"file\""), "{headers}");
    let file_name = headers
        .split("filename=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("")
        .to_owned();
    let closing = format!("\r\n--{boundary}--");
    let end =
        headers_end + find(&body[headers_end..], closing.as_bytes()).expect("closing boundary");
    (file_name, body[headers_end..end].to_vec())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

pub fn variable(key: &str, value: &str) -> JobVariable {
    JobVariable {
        key: key.to_owned(),
        value: value.to_owned(),
        public: true,
        ..JobVariable::default()
    }
}

/// A job payload for `group/project` served at `git_addr`.
pub fn payload(git_addr: &str, sha: &str) -> JobResponse {
    let mut payload = JobResponse {
        id: 100,
        token: Secret::new(TOKEN),
        ..JobResponse::default()
    };
    payload.job_info.name = "build".to_owned();
    payload.job_info.project_id = 9;
    payload.job_info.project_full_path = "group/project".to_owned();
    payload.git_info.repo_url = Secret::new(format!(
        "http://gitlab-ci-token:{TOKEN}@{git_addr}/group/project.git"
    ));
    payload.git_info.sha = sha.to_owned();
    payload.git_info.git_ref = "main".to_owned();
    payload.git_info.ref_type = "branch".to_owned();
    payload.git_info.refspecs = vec![
        "+refs/heads/*:refs/remotes/origin/*".to_owned(),
        "+refs/tags/*:refs/tags/*".to_owned(),
    ];
    payload.runner_info.timeout = 3600;
    payload
}
