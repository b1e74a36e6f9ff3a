//! A trace carried on by a restarted manager (`JobTrace::resume`) against GitLab's answers:
//! the journal is the log so far, the server holds only part of it, its 416 `Range` says how
//! much, and the rest goes up once, followed by the new output and the final update.

mod support;

use std::time::Duration;

use podfleet_coordinator::model::RunnerInfo;
use podfleet_coordinator::{
    Client, ClientOptions, JobOutcome, JobTrace, JobTraceOptions, RetryPolicy,
};
use support::{Reply, ScriptedServer};

/// A fresh directory under the system's temporary directory (no tempfile dependency here).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "podfleet-coordinator-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn client(server: &ScriptedServer) -> Client {
    Client::with_options(
        &server.url,
        "s_0123456789ab",
        RunnerInfo::podfleet("docker-autoscaler", "sh"),
        ClientOptions {
            retry: RetryPolicy {
                backoff_base: Duration::from_millis(1),
                backoff_max: Duration::from_millis(5),
                ..RetryPolicy::default()
            },
            ..ClientOptions::default()
        },
    )
    .expect("valid url")
}

#[tokio::test]
async fn a_resumed_trace_sends_what_the_server_lacks_exactly_once() {
    let dir = TempDir::new("resume");
    let journal = dir.path().join("jobs/77.trace");
    std::fs::create_dir_all(journal.parent().unwrap()).unwrap();
    // The previous manager logged 12 bytes; the server accepted 6 before it died.
    std::fs::write(&journal, b"line1\nline2\n").unwrap();
    let server = ScriptedServer::start(vec![
        Reply::status(416).header("Range", "0-6"),
        Reply::status(202).header("Range", "0-18"),
        Reply::status(200),
    ])
    .await;
    let options = JobTraceOptions {
        update_interval: Duration::from_millis(20),
        final_update_backoff_base: Duration::from_millis(1),
        journal: Some(journal.clone()),
        ..JobTraceOptions::default()
    };
    let trace = JobTrace::resume(client(&server), 77, "job-token", options).expect("resumes");
    assert_eq!(trace.bytesize(), 12, "the journal is the log so far");
    trace.write(b"line3\n");
    tokio::time::sleep(Duration::from_millis(200)).await;
    trace.finish(JobOutcome::Success).await.expect("finishes");

    let requests = server.requests();
    let patches: Vec<_> = requests.iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 2, "{requests:#?}");
    assert_eq!(patches[0].header("content-range"), Some("0-17"));
    assert_eq!(patches[1].header("content-range"), Some("6-17"));
    assert_eq!(patches[1].body, b"line2\nline3\n");
    let update = requests
        .iter()
        .find(|r| r.method == "PUT")
        .expect("final update");
    let body = update.json();
    assert_eq!(body["state"], "success");
    assert_eq!(body["output"]["bytesize"], 18);
    // New output is journaled too, for a second restart.
    assert_eq!(std::fs::read(&journal).unwrap(), b"line1\nline2\nline3\n");
}

#[tokio::test]
async fn a_new_journal_is_owner_only_and_holds_the_log() {
    let dir = TempDir::new("journal");
    let journal = dir.path().join("jobs/5.trace");
    let server = ScriptedServer::start(vec![
        Reply::status(202).header("Range", "0-4"),
        Reply::status(200),
    ])
    .await;
    let options = JobTraceOptions {
        update_interval: Duration::from_millis(20),
        journal: Some(journal.clone()),
        ..JobTraceOptions::default()
    };
    let trace = JobTrace::start(client(&server), 5, "job-token", options);
    trace.write(b"abc\n");
    trace.finish(JobOutcome::Success).await.expect("finishes");
    assert_eq!(std::fs::read(&journal).unwrap(), b"abc\n");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&journal).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}
