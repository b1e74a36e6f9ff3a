//! What jobs fetch from the local coordinator besides their payload: the working tree as a
//! git repository (cloned here with the real `git` CLI, the way podfleet's helper does), and
//! artifacts uploaded by one job and downloaded by the jobs that depend on it.

mod support;

use support::client;

use std::path::Path;
use std::process::Command;

use podfleet_coordinator::Client;
use podfleet_coordinator::model::{JobResponse, JobState, RunnerInfo, UpdateJobRequest};
use podfleet_local_coordinator::{
    Handle, LocalCoordinator, LocalCoordinatorOptions, RunnerRegistration, parse_pipeline,
};

const RUNNER_TOKEN: &str = "glrt-sources-test";

fn git(dir: &Path, arguments: &[&str]) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@localhost",
            "-c",
            "init.defaultBranch=feature/x",
        ])
        .args(arguments)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("git is installed");
    assert!(
        output.status.success(),
        "git {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

async fn start(yaml: &str, project: &Path) -> Handle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    LocalCoordinator::start(
        listener,
        parse_pipeline(yaml, ".gitlab-ci.yml").expect("valid pipeline"),
        vec![RunnerRegistration {
            token: RUNNER_TOKEN.to_owned(),
            description: "r".to_owned(),
            tags: Vec::new(),
            run_untagged: true,
        }],
        LocalCoordinatorOptions::new(project),
    )
    .await
    .expect("coordinator starts")
}

async fn take(client: &Client) -> JobResponse {
    let mut last_update = None;
    let job = client
        .request_job(RUNNER_TOKEN, &mut last_update)
        .await
        .expect("request")
        .expect("a job is offered");
    let token = job.token.expose();
    client
        .update_job(
            job.id,
            token,
            &UpdateJobRequest::new(RunnerInfo::default(), token, JobState::Running),
        )
        .await
        .expect("acknowledge");
    job
}

async fn finish(client: &Client, job: &JobResponse) {
    let token = job.token.expose();
    client
        .update_job(
            job.id,
            token,
            &UpdateJobRequest::new(RunnerInfo::default(), token, JobState::Success),
        )
        .await
        .expect("final update");
}

// git runs as a blocking child process while the server answers it: two worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_clone_the_working_tree_with_uncommitted_changes_minus_ignored_files() {
    let project = tempfile::tempdir().expect("temp dir");
    let dir = project.path();
    git(dir, &["init", "-q"]);
    std::fs::write(dir.join(".gitignore"), "secret.txt\n").unwrap();
    std::fs::write(dir.join("tracked.txt"), "committed\n").unwrap();
    std::fs::write(dir.join("deleted.txt"), "gone soon\n").unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "first"]);
    let head = git(dir, &["rev-parse", "HEAD"]);
    std::fs::write(dir.join("tracked.txt"), "edited, not committed\n").unwrap();
    std::fs::write(dir.join("untracked.txt"), "new\n").unwrap();
    std::fs::write(dir.join("secret.txt"), "ignored\n").unwrap();
    std::fs::remove_file(dir.join("deleted.txt")).unwrap();

    let handle = start("job:\n  script: x\n", dir).await;
    let client = client(&handle.url);
    let job = take(&client).await;
    let info = &job.git_info;
    assert_eq!(info.git_ref, "feature/x");
    assert_ne!(info.sha, head, "a dirty tree is a new snapshot commit");
    assert_eq!(
        info.refspecs,
        ["+refs/heads/feature/x:refs/remotes/origin/feature/x"]
    );
    let url = info.repo_url.expose();
    assert!(
        url.starts_with("http://gitlab-ci-token:glcbt-"),
        "{}",
        info.repo_url
    );

    // The user's repository is untouched: same HEAD, same index, no new refs.
    assert_eq!(git(dir, &["rev-parse", "HEAD"]), head);
    assert_eq!(git(dir, &["status", "--porcelain"]).lines().count(), 3);
    assert_eq!(git(dir, &["for-each-ref"]).lines().count(), 1);

    // Fetched like gitlab-runner does: a shallow fetch of the refspec, then a checkout.
    let clone = tempfile::tempdir().expect("temp dir");
    let work = clone.path();
    git(work, &["init", "-q"]);
    git(work, &["remote", "add", "origin", url]);
    git(
        work,
        &[
            "fetch",
            "-q",
            "--depth",
            &info.depth.to_string(),
            "origin",
            &info.refspecs[0],
        ],
    );
    git(work, &["checkout", "-q", "-f", &info.sha]);
    assert_eq!(
        std::fs::read_to_string(work.join("tracked.txt")).unwrap(),
        "edited, not committed\n"
    );
    assert_eq!(
        std::fs::read_to_string(work.join("untracked.txt")).unwrap(),
        "new\n"
    );
    assert!(!work.join("secret.txt").exists(), "ignored files stay home");
    assert!(
        !work.join("deleted.txt").exists(),
        "deleted files are deleted"
    );

    // Without the token, or with a token of no running job: refused.
    let anonymous = url.replace(&format!(":{}@", job.token.expose()), ":wrong@");
    let refused = Command::new("git")
        .args(["ls-remote", &anonymous])
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("git");
    assert!(!refused.status.success());
    finish(&client, &job).await;
    let after = Command::new("git")
        .args(["ls-remote", url])
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("git");
    assert!(
        !after.status.success(),
        "a finished job's token no longer clones"
    );
}

#[tokio::test]
async fn a_clean_tree_is_served_at_head() {
    let project = tempfile::tempdir().expect("temp dir");
    let dir = project.path();
    git(dir, &["init", "-q"]);
    std::fs::write(dir.join("a.txt"), "a\n").unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "first"]);
    let handle = start("job:\n  script: x\n", dir).await;
    let job = take(&client(&handle.url)).await;
    assert_eq!(job.git_info.sha, git(dir, &["rev-parse", "HEAD"]));
}

fn multipart(boundary: &str, fields: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(filename) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/zip\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

#[tokio::test]
async fn artifacts_go_from_a_job_to_the_jobs_that_depend_on_it() {
    let project = tempfile::tempdir().expect("temp dir");
    let yaml = "stages: [build, test]\nbuild:\n  stage: build\n  artifacts:\n    paths: [out/]\n  script: x\ntest:\n  stage: test\n  script: x\nunrelated:\n  stage: test\n  dependencies: []\n  script: x\n";
    let handle = start(yaml, project.path()).await;
    let client = client(&handle.url);
    let http = reqwest::Client::new();
    let build = take(&client).await;
    let archive: &[u8] = b"PK\x03\x04 pretend zip \r\n--not-a-boundary";
    let upload = |token: String| {
        let body = multipart(
            "podfleetboundary",
            &[("file", Some("artifacts.zip"), archive)],
        );
        http.post(format!(
            "{}/api/v4/jobs/{}/artifacts?artifact_format=zip&artifact_type=archive&expire_in=1d",
            handle.url, build.id
        ))
        .header("JOB-TOKEN", token)
        .header(
            "Content-Type",
            "multipart/form-data; boundary=podfleetboundary",
        )
        .body(body)
        .send()
    };
    let wrong = upload("glcbt-wrong".to_owned()).await.expect("request");
    assert_eq!(wrong.status(), 403);
    let stored = upload(build.token.expose().to_owned())
        .await
        .expect("request");
    assert_eq!(stored.status(), 201);
    finish(&client, &build).await;

    let first = take(&client).await;
    let second = take(&client).await;
    let (test, unrelated) = if first.job_info.name == "test" {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(test.dependencies.len(), 1);
    let file = test.dependencies[0]
        .artifacts_file
        .as_ref()
        .expect("artifacts_file");
    assert_eq!(
        (file.filename.as_str(), file.size),
        ("artifacts.zip", archive.len() as u64)
    );
    assert!(unrelated.dependencies.is_empty());

    let download = |token: String| {
        http.get(format!("{}/api/v4/jobs/{}/artifacts", handle.url, build.id))
            .header("JOB-TOKEN", token)
            .send()
    };
    let fetched = download(test.token.expose().to_owned())
        .await
        .expect("request");
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.expect("body").as_ref(), archive);
    let refused = download(unrelated.token.expose().to_owned())
        .await
        .expect("request");
    assert_eq!(refused.status(), 403);
    finish(&client, &test).await;
    finish(&client, &unrelated).await;
    let report = handle.wait().await;
    assert!(
        report
            .job("build")
            .and_then(|job| job.artifacts.as_ref())
            .is_some_and(|path| path.exists())
    );
}
