//! GitLab's recorded job payload (`job_request_response...rendered_valid.json`, from
//! gitlab-runner's network tests) run end to end by the real `podfleet run` on a local
//! instance. Only what cannot exist here is swapped: the images for the locally built busybox,
//! the repository URL for a real repository on 127.0.0.1 (served by `git http-backend`, asking
//! for the token in the URL as GitLab does) and its commit. Everything else is the payload as
//! recorded: the file variable, both services with their aliases, entrypoint and command, the
//! artifacts, the push-only cache, the registry credentials and the dependency on job 9, whose
//! artifacts the stand-in coordinator serves to `other-job-token` only.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};

mod support;

#[path = "../../helper/tests/common/mod.rs"]
mod helper_common;

const RUNNER_TOKEN: &str = "glrt-fixture-Job-0c1d";
const IMAGE: &str = "localhost/podfleet/busybox:latest";

#[derive(Default)]
struct Coordinator {
    payload: Option<serde_json::Value>,
    trace: Vec<u8>,
    states: Vec<String>,
    failure_reason: Option<String>,
    /// (JOB-TOKEN, query, body) of each artifacts upload.
    uploads: Vec<(String, String, Vec<u8>)>,
    /// JOB-TOKEN of each download of job 9's artifacts.
    downloads: Vec<String>,
    dependency_zip: Vec<u8>,
}

type Shared = Arc<Mutex<Coordinator>>;

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn serve(state: Shared) -> String {
    async fn request(State(state): State<Shared>) -> Response {
        match state.lock().unwrap().payload.take() {
            Some(payload) => (StatusCode::CREATED, axum::Json(payload)).into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        }
    }
    async fn update(State(state): State<Shared>, body: Bytes) -> Response {
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let mut state = state.lock().unwrap();
        state
            .states
            .push(body["state"].as_str().unwrap_or_default().to_owned());
        if let Some(reason) = body["failure_reason"].as_str() {
            state.failure_reason = Some(reason.to_owned());
        }
        StatusCode::OK.into_response()
    }
    async fn trace(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
        let mut state = state.lock().unwrap();
        let start: usize = header(&headers, "content-range")
            .split('-')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX);
        if start != state.trace.len() {
            let range = format!("0-{}", state.trace.len());
            return (StatusCode::RANGE_NOT_SATISFIABLE, [("range", range)]).into_response();
        }
        state.trace.extend_from_slice(&body);
        let range = format!("0-{}", state.trace.len());
        (
            StatusCode::ACCEPTED,
            [("range", range.as_str()), ("job-status", "running")],
        )
            .into_response()
    }
    async fn upload(
        State(state): State<Shared>,
        uri: axum::http::Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let token = header(&headers, "job-token");
        let mut state = state.lock().unwrap();
        let accepted = token == "job-token";
        state.uploads.push((
            token,
            uri.query().unwrap_or_default().to_owned(),
            body.to_vec(),
        ));
        if accepted {
            (StatusCode::CREATED, "{}").into_response()
        } else {
            StatusCode::FORBIDDEN.into_response()
        }
    }
    async fn download(State(state): State<Shared>, headers: HeaderMap) -> Response {
        let token = header(&headers, "job-token");
        let mut state = state.lock().unwrap();
        state.downloads.push(token.clone());
        if token != "other-job-token" {
            return StatusCode::FORBIDDEN.into_response();
        }
        (
            StatusCode::OK,
            [("content-type", "application/zip")],
            state.dependency_zip.clone(),
        )
            .into_response()
    }
    let app = axum::Router::new()
        .route(
            "/api/v4/runners/verify",
            post(|| async {
                axum::Json(
                    serde_json::json!({"id": 1, "token": RUNNER_TOKEN, "token_expires_at": null}),
                )
            }),
        )
        .route("/api/v4/jobs/request", post(request))
        .route("/api/v4/jobs/10", put(update))
        .route("/api/v4/jobs/10/trace", patch(trace))
        .route("/api/v4/jobs/10/artifacts", post(upload))
        .route("/api/v4/jobs/9/artifacts", get(download))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// A zip holding `dependency-from-job-9.txt`, made by Python's zipfile (an independent writer).
fn dependency_zip(dir: &Path) -> Vec<u8> {
    let path = dir.join("binaries.zip");
    let status = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, zipfile\n\
             with zipfile.ZipFile(sys.argv[1], 'w') as z:\n\
             \x20   z.writestr('dependency-from-job-9.txt', 'built by job 9\\n')\n",
        )
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(path).unwrap()
}

/// The recorded payload with local images, the local repository and its commit.
fn payload(git: std::net::SocketAddr, sha: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(
            "../coordinator/tests/data/job_request_response.gitlab_runner_network_test.rendered_valid.json",
        ),
    )
    .unwrap();
    let mut payload: serde_json::Value = serde_json::from_str(&text).unwrap();
    payload["git_info"]["repo_url"] = format!(
        "http://gitlab-ci-token:{}@{git}/group/project.git",
        helper_common::TOKEN
    )
    .into();
    payload["git_info"]["sha"] = sha.into();
    payload["image"]["name"] = IMAGE.into();
    // The recorded entrypoint is a bare `/bin/sh`: the job's command (the script file, as
    // gitlab-runner passes its `sh -c` shell detection) would reach that shell as a script
    // name and fail with any image, on gitlab-runner as here. Busybox runs with its own.
    payload["image"]["entrypoint"] = serde_json::json!([]);
    for service in payload["services"].as_array_mut().unwrap() {
        service["name"] = IMAGE.into();
    }
    payload
}

#[tokio::test]
async fn the_recorded_gitlab_payload_runs_end_to_end() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let repositories = helper_common::Repositories::new();
    for dir in ["out", "vendor"] {
        std::fs::create_dir_all(repositories.work.join("project").join(dir)).unwrap();
    }
    repositories.commit("out/result.txt", "the job's artifact\n");
    let sha = repositories.commit("vendor/lib.txt", "cached dependency\n");
    let git = helper_common::serve_git(repositories.root.path().to_owned()).await;

    let state: Shared = Arc::default();
    {
        let mut state = state.lock().unwrap();
        state.payload = Some(payload(git, &sha));
        state.dependency_zip = dependency_zip(dir.path());
    }
    let url = serve(state.clone()).await;
    let config = support::LocalRunner {
        name: "fixture",
        group: "fixq",
        url: &url,
        token: RUNNER_TOKEN,
        password: "fixture-Pa55word",
        global: "",
        plugin: "",
    }
    .write(dir.path());
    let mut daemon = support::spawn_daemon(&config, dir.path());

    let deadline = Instant::now() + Duration::from_secs(240);
    let final_state = loop {
        let last = state.lock().unwrap().states.last().cloned();
        if let Some(last) = last.filter(|s| s == "success" || s == "failed") {
            break last;
        }
        if Instant::now() > deadline {
            let _ = daemon.kill();
            panic!(
                "the job did not finish in 240s\n{}\n{}",
                String::from_utf8_lossy(&state.lock().unwrap().trace),
                support::daemon_log(dir.path())
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let status = support::signal_and_wait(daemon, libc::SIGQUIT).await;

    let state = state.lock().unwrap();
    let trace = String::from_utf8_lossy(&state.trace).into_owned();
    let daemon_log = support::daemon_log(dir.path());
    assert_eq!(
        final_state, "success",
        "reason {:?}\n{trace}\n{daemon_log}",
        state.failure_reason
    );
    assert!(status.success(), "{status:?}\n{daemon_log}");
    // Sources from the repository at the commit, the dependency's artifacts beside them.
    for name in ["README", "out", "vendor", "dependency-from-job-9.txt"] {
        assert!(
            trace.contains(name),
            "{name} not listed by `ls -ls`:\n{trace}"
        );
    }
    assert_eq!(state.downloads, ["other-job-token"], "{trace}");
    // `artifacts: paths: [out/*]`, `when: always`, `expire_in: 7d`: one zip uploaded with the
    // job's own token, holding the committed file.
    assert_eq!(state.uploads.len(), 1, "{trace}");
    let (token, query, body) = &state.uploads[0];
    assert_eq!(token, "job-token");
    assert!(query.contains("expire_in=7d"), "{query}");
    let zip_name = b"out/result.txt";
    assert!(
        body.windows(zip_name.len()).any(|w| w == zip_name),
        "the uploaded archive does not hold out/result.txt"
    );
    // No secret of the payload or the config reaches the trace or the log.
    for secret in [
        helper_common::TOKEN,
        "job-token\"",
        "other-job-token",
        RUNNER_TOKEN,
        "fixture-Pa55word",
    ] {
        assert!(!trace.contains(secret), "{secret} in the trace:\n{trace}");
        assert!(!daemon_log.contains(secret), "{secret} in the log");
    }
}
