//! The daemon (`podfleet run` on the local provider) against a stand-in coordinator speaking
//! GitLab's runner API on 127.0.0.1, for what only shows in the requests it sends:
//!
//! - runner token rotation: a token past three quarters of its lifetime is reset at the
//!   coordinator, the next job requests carry the new token, and the config file gets the new
//!   token in place of the old one, with nothing else changed and no token in the log;
//! - `request_concurrency`: that many job requests are in flight at once against a
//!   coordinator that holds each one (long polling), and never more.
//!
//! No job is handed out, so no instance is created.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod support;

const OLD_TOKEN: &str = "glrt-rotate-Old-7d1c";
const NEW_TOKEN: &str = "glrt-rotate-New-93fa";

#[derive(Default)]
struct Seen {
    /// (path, token sent in the body) of every request, in order.
    requests: Vec<(String, String)>,
    /// Job requests being answered now, and the most there ever were.
    in_flight: usize,
    most_in_flight: usize,
}

/// Serves verify, job requests (each held for `hold`, then "no job") and token resets.
async fn stand_in(seen: Arc<Mutex<Seen>>, hold: Duration) -> String {
    use axum::Json;
    use axum::http::StatusCode;
    use axum::routing::post;
    let record = |seen: Arc<Mutex<Seen>>, path: &'static str| {
        move |Json(body): Json<serde_json::Value>| {
            let seen = seen.clone();
            async move {
                let token = body["token"].as_str().unwrap_or_default().to_owned();
                seen.lock().unwrap().requests.push((path.to_owned(), token));
            }
        }
    };
    let verify = record(seen.clone(), "verify");
    let request = record(seen.clone(), "request");
    let counter = seen.clone();
    let reset = record(seen.clone(), "reset");
    let app = axum::Router::new()
        .route(
            "/api/v4/runners/verify",
            post(move |body| async move {
                verify(body).await;
                Json(serde_json::json!({"id": 7, "token": OLD_TOKEN, "token_expires_at": null}))
            }),
        )
        .route(
            "/api/v4/jobs/request",
            post(move |body| async move {
                request(body).await;
                {
                    let mut seen = counter.lock().unwrap();
                    seen.in_flight += 1;
                    seen.most_in_flight = seen.most_in_flight.max(seen.in_flight);
                }
                tokio::time::sleep(hold).await;
                counter.lock().unwrap().in_flight -= 1;
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/api/v4/runners/reset_authentication_token",
            post(move |body| async move {
                reset(body).await;
                (
                    StatusCode::CREATED,
                    Json(serde_json::json!({
                        "token": NEW_TOKEN,
                        "token_expires_at": "2099-01-01T00:00:00.000Z"
                    })),
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn write_config(dir: &Path, url: &str, group: &str) -> std::path::PathBuf {
    support::LocalRunner {
        name: "standin",
        group,
        url,
        token: OLD_TOKEN,
        password: "rotation-Pa55word",
        global: "",
        plugin: "",
    }
    .write(dir)
}

fn write_rotation_config(dir: &Path, url: &str) -> std::path::PathBuf {
    let path = write_config(dir, url, "rotq");
    // Obtained long ago, expired by now: due for a reset at once.
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &format!("token = \"{OLD_TOKEN}\""),
        &format!(
            "token = \"{OLD_TOKEN}\"  # rotated by podfleet\n\
             token_obtained_at = 2026-01-01T00:00:00Z\n\
             token_expires_at = 2026-01-05T00:00:00Z"
        ),
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn an_expiring_token_is_reset_used_and_saved() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let url = stand_in(seen.clone(), Duration::ZERO).await;
    let config = write_rotation_config(dir.path(), &url);
    let before = std::fs::read_to_string(&config).unwrap();
    let daemon = support::spawn_daemon(&config, dir.path());

    let deadline = Instant::now() + Duration::from_secs(60);
    let rotated = loop {
        let done = {
            let seen = seen.lock().unwrap();
            let reset_at = seen.requests.iter().position(|(path, _)| path == "reset");
            reset_at.is_some_and(|at| {
                seen.requests[at + 1..]
                    .iter()
                    .any(|(path, token)| path == "request" && token == NEW_TOKEN)
            })
        };
        let saved = std::fs::read_to_string(&config).unwrap();
        if done && saved.contains(NEW_TOKEN) {
            break saved;
        }
        assert!(
            Instant::now() < deadline,
            "no rotation within 60s: requests {:?}\n{}",
            seen.lock().unwrap().requests,
            support::daemon_log(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let status = support::signal_and_wait(daemon, libc::SIGTERM).await;
    assert!(status.success(), "{status:?}");

    {
        let seen = seen.lock().unwrap();
        let (_, reset_token) = seen.requests.iter().find(|(p, _)| p == "reset").unwrap();
        assert_eq!(
            reset_token, OLD_TOKEN,
            "the reset is asked with the old token"
        );
        let reset_at = seen
            .requests
            .iter()
            .position(|(p, _)| p == "reset")
            .unwrap();
        assert!(
            seen.requests[reset_at + 1..]
                .iter()
                .all(|(_, token)| token == NEW_TOKEN),
            "the old token is never used after the reset: {:?}",
            seen.requests
        );
    }
    // Only the runner's token lines changed; the comment beside the token stays.
    let changed: Vec<(&str, &str)> = before
        .lines()
        .zip(rotated.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed.len(), 3, "{changed:?}");
    assert!(rotated.contains(&format!("token = \"{NEW_TOKEN}\"  # rotated by podfleet")));
    assert!(rotated.contains("token_expires_at = 2099-01-01T00:00:00Z"));
    assert_eq!(before.lines().count(), rotated.lines().count());
    let log = support::daemon_log(dir.path());
    assert!(log.contains("runner token reset and saved"), "{log}");
    assert!(
        !log.contains(OLD_TOKEN) && !log.contains(NEW_TOKEN),
        "a token in the log:\n{log}"
    );
    // The file change was picked up as a reload without asking for a restart.
    assert!(!log.contains("takes effect after a restart"), "{log}");
}

#[tokio::test]
async fn request_concurrency_keeps_that_many_job_requests_in_flight_and_no_more() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let url = stand_in(seen.clone(), Duration::from_millis(1500)).await;
    let config = write_config(dir.path(), &url, "reqc");
    // Room for five jobs (`concurrent`, instances), three requests at a time.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("concurrent = 2", "concurrent = 5")
        .replace("max_instances = 1", "max_instances = 5")
        .replace("shell = \"sh\"", "shell = \"sh\"\nrequest_concurrency = 3");
    std::fs::write(&config, text).unwrap();
    let daemon = support::spawn_daemon(&config, dir.path());

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let requests = {
            let seen = seen.lock().unwrap();
            seen.requests
                .iter()
                .filter(|(path, _)| path == "request")
                .count()
        };
        if requests >= 12 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{requests} job requests within 60s\n{}",
            support::daemon_log(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = support::signal_and_wait(daemon, libc::SIGTERM).await;
    assert!(status.success(), "{status:?}");
    let most = seen.lock().unwrap().most_in_flight;
    assert_eq!(
        most,
        3,
        "job requests in flight at once\n{}",
        support::daemon_log(dir.path())
    );
}
