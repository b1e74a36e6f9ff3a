//! The local coordinator driven over HTTP by podfleet's own GitLab client and trace uploader.

mod support;

use support::{client, client_with};

use std::time::Duration;

use podfleet_coordinator::model::{
    FailureReason, JobResponse, JobState, RemoteJobStatus, RunnerInfo, StepWhen, TraceOutput,
    UpdateJobRequest,
};
use podfleet_coordinator::{
    Client, CoordinatorError, JobOutcome, JobTrace, JobTraceOptions, PatchResponse, RemoteState,
    format_checksum,
};
use podfleet_local_coordinator::{
    Handle, JobStatus, LocalCoordinator, LocalCoordinatorOptions, PipelineEvent, PipelineStatus,
    RunnerRegistration, parse_pipeline,
};

const RUNNER_TOKEN: &str = "glrt-local-runner";

fn registration(
    token: &str,
    description: &str,
    tags: &[&str],
    run_untagged: bool,
) -> RunnerRegistration {
    RunnerRegistration {
        token: token.to_owned(),
        description: description.to_owned(),
        tags: tags.iter().map(|tag| tag.to_string()).collect(),
        run_untagged,
    }
}

async fn start(
    yaml: &str,
    runners: Vec<RunnerRegistration>,
    project_dir: &std::path::Path,
) -> Handle {
    let pipeline = parse_pipeline(yaml, ".gitlab-ci.yml").expect("valid pipeline");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    LocalCoordinator::start(
        listener,
        pipeline,
        runners,
        LocalCoordinatorOptions {
            project_dir: project_dir.to_owned(),
            job_timeout: Duration::from_secs(900),
            run_manual: false,
            state_dir: None,
            project: None,
        },
    )
    .await
    .expect("coordinator starts")
}

async fn take_job(client: &Client, token: &str) -> JobResponse {
    let mut last_update = None;
    client
        .request_job(token, &mut last_update)
        .await
        .expect("request")
        .expect("a job is offered")
}

async fn no_job(client: &Client, token: &str) {
    let mut last_update = None;
    let offered = client
        .request_job(token, &mut last_update)
        .await
        .expect("request");
    assert!(
        offered.is_none(),
        "unexpected job {:?}",
        offered.map(|job| job.job_info.name)
    );
    assert!(last_update.is_some(), "204 carries X-GitLab-Last-Update");
}

async fn acknowledge(client: &Client, job: &JobResponse) {
    let token = job.token.expose();
    let answer = client
        .update_job(
            job.id,
            token,
            &UpdateJobRequest::new(RunnerInfo::default(), token, JobState::Running),
        )
        .await
        .expect("two-phase acknowledgement");
    assert_eq!(
        (answer.code, answer.job_status),
        (200, Some(RemoteJobStatus::Running))
    );
}

/// Runs a job to its end through a `JobTrace`, the way the manager will.
async fn run_with_trace(client: &Client, job: &JobResponse, log: &[u8], outcome: JobOutcome) {
    acknowledge(client, job).await;
    let trace = JobTrace::start(
        client.clone(),
        job.id,
        job.token.expose(),
        JobTraceOptions::for_job(job),
    );
    trace.write(log);
    trace.finish(outcome).await.expect("final update accepted");
}

fn variable<'a>(job: &'a JobResponse, key: &str) -> Option<&'a str> {
    job.variables
        .iter()
        .rev()
        .find(|variable| variable.key == key)
        .map(|variable| variable.value.as_str())
}

#[tokio::test]
async fn pipeline_runs_stage_by_stage_over_the_runner_api() {
    let project = tempfile::tempdir().expect("temp dir");
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/stages.gitlab-ci.yml"
    ))
    .expect("pipeline file");
    let handle = start(
        &yaml,
        vec![registration(
            RUNNER_TOKEN,
            "local runner",
            &["podman"],
            true,
        )],
        project.path(),
    )
    .await;
    let mut events = handle.events();
    let client = client(&handle.url);

    // verify: 200 for a registered token, 403 otherwise.
    assert_eq!(
        client.verify_runner(RUNNER_TOKEN).await.expect("verify").id,
        1
    );
    let forbidden = client
        .verify_runner("glrt-unknown")
        .await
        .expect_err("unknown token");
    assert!(
        matches!(forbidden, CoordinatorError::Forbidden { .. }),
        "{forbidden}"
    );
    let mut last_update = None;
    let forbidden = client
        .request_job("glrt-unknown", &mut last_update)
        .await
        .expect_err("unknown token");
    assert!(
        matches!(forbidden, CoordinatorError::Forbidden { .. }),
        "{forbidden}"
    );

    // The build stage comes first; nothing else is offered while it runs.
    let build = take_job(&client, RUNNER_TOKEN).await;
    assert_eq!(
        (build.job_info.name.as_str(), build.job_info.stage.as_str()),
        ("build", "build")
    );
    no_job(&client, RUNNER_TOKEN).await;
    assert_eq!(
        handle.snapshot().job("build").map(|job| job.status),
        Some(JobStatus::Pending)
    );

    // The payload is what GitLab would send.
    let token = build.token.expose().to_owned();
    assert!(token.starts_with("glcbt-"));
    for (key, value) in [
        ("CI_JOB_ID", "1"),
        ("CI_JOB_NAME", "build"),
        ("CI_JOB_STAGE", "build"),
        ("CI_PIPELINE_ID", "1"),
        ("CI_SERVER_URL", handle.url.as_str()),
        ("CI_RUNNER_DESCRIPTION", "local runner"),
        ("CI_RUNNER_TAGS", "podman"),
        ("CI_JOB_TOKEN", token.as_str()),
        ("GLOBAL", "from the top"),
        ("LOCAL", "from the job"),
    ] {
        assert_eq!(variable(&build, key), Some(value), "{key}");
    }
    let project_name = project
        .path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        variable(&build, "CI_PROJECT_NAME"),
        Some(project_name.as_str())
    );
    assert_eq!(
        variable(&build, "CI_PROJECT_DIR"),
        None,
        "the runner sets CI_PROJECT_DIR"
    );
    let job_token = build
        .variables
        .iter()
        .find(|v| v.key == "CI_JOB_TOKEN")
        .expect("job token");
    assert!(job_token.masked && !job_token.public);
    let position = |key: &str| {
        build
            .variables
            .iter()
            .position(|v| v.key == key)
            .expect(key)
    };
    assert!(
        position("CI_RUNNER_TAGS") < position("GLOBAL") && position("GLOBAL") < position("LOCAL")
    );
    assert_eq!(build.steps.len(), 2);
    assert_eq!(
        (build.steps[0].name.as_str(), build.steps[0].when),
        ("script", StepWhen::OnSuccess)
    );
    assert_eq!(build.steps[0].script, ["echo before", "make"]);
    assert!(!build.steps[0].allow_failure);
    assert_eq!(
        (build.steps[1].name.as_str(), build.steps[1].when),
        ("after_script", StepWhen::Always)
    );
    assert_eq!(build.steps[1].script, ["echo cleanup"]);
    assert!(build.steps[1].allow_failure);
    assert_eq!(build.steps[0].timeout, 900);
    assert_eq!(build.runner_info.timeout, 900);
    assert_eq!(
        build.image.as_ref().map(|image| image.name.as_str()),
        Some("alpine:3")
    );
    assert!(build.features.trace_sections);
    assert!(
        build
            .features
            .failure_reasons
            .iter()
            .any(|reason| reason == "script_failure")
    );

    // Job endpoints want the job's own token, and a final state only after the acknowledgement.
    let wrong = client
        .update_job(
            build.id,
            "glcbt-wrong",
            &UpdateJobRequest::new(RunnerInfo::default(), "glcbt-wrong", JobState::Running),
        )
        .await
        .expect_err("wrong job token");
    assert!(
        matches!(wrong, CoordinatorError::Forbidden { .. }),
        "{wrong}"
    );
    let early = client
        .update_job(
            build.id,
            &token,
            &UpdateJobRequest::new(RunnerInfo::default(), &token, JobState::Success),
        )
        .await
        .expect_err("final state before the acknowledgement");
    assert_eq!(early.status(), Some(400));
    let keep_alive = client
        .update_job(
            build.id,
            &token,
            &UpdateJobRequest::new(RunnerInfo::default(), &token, JobState::Pending),
        )
        .await
        .expect("pending keep-alive");
    assert_eq!(keep_alive.job_status, Some(RemoteJobStatus::Pending));
    acknowledge(&client, &build).await;

    // Trace: 202 with Range, 416 on a gap, and the stored log is exactly what was sent.
    assert_eq!(
        client
            .patch_trace(build.id, &token, 0, b"hello\n")
            .await
            .expect("patch"),
        PatchResponse::Accepted {
            new_offset: 6,
            job_status: Some(RemoteJobStatus::Running),
            update_interval: Some(Duration::from_secs(3)),
        }
    );
    assert_eq!(
        client
            .patch_trace(build.id, &token, 10, b"gap")
            .await
            .expect("patch"),
        PatchResponse::RangeMismatch { server_offset: 6 }
    );
    let forbidden = client
        .patch_trace(build.id, "glcbt-wrong", 6, b"x")
        .await
        .expect_err("wrong token");
    assert!(matches!(forbidden, CoordinatorError::Forbidden { .. }));
    client
        .patch_trace(build.id, &token, 6, b"world\n")
        .await
        .expect("patch");
    assert_eq!(
        handle.trace(build.id).as_deref(),
        Some(&b"hello\nworld\n"[..])
    );

    // A wrong checksum is refused with 412; the right one completes the job.
    let mut done = UpdateJobRequest::new(RunnerInfo::default(), &token, JobState::Success);
    done.output = TraceOutput {
        checksum: format_checksum(crc32fast::hash(b"hello\n")),
        bytesize: 6,
    };
    let mismatch = client
        .update_job(build.id, &token, &done)
        .await
        .expect_err("checksum mismatch");
    assert!(
        matches!(mismatch, CoordinatorError::TraceValidationFailed { .. }),
        "{mismatch}"
    );
    done.output = TraceOutput {
        checksum: format_checksum(crc32fast::hash(b"hello\nworld\n")),
        bytesize: 12,
    };
    done.checksum = done.output.checksum.clone();
    let finished = client
        .update_job(build.id, &token, &done)
        .await
        .expect("final update");
    assert_eq!(
        (finished.code, finished.job_status),
        (200, Some(RemoteJobStatus::Success))
    );
    let after = client
        .update_job(build.id, &token, &done)
        .await
        .expect_err("job is over");
    assert!(matches!(after, CoordinatorError::Forbidden { .. }));

    // Test stage: one failure, one allowed failure, both through the real trace uploader.
    let unit = take_job(&client, RUNNER_TOKEN).await;
    let flaky = take_job(&client, RUNNER_TOKEN).await;
    assert_eq!(
        (unit.job_info.name.as_str(), flaky.job_info.name.as_str()),
        ("unit", "flaky")
    );
    no_job(&client, RUNNER_TOKEN).await;
    let failed = |exit_code| JobOutcome::Failed {
        reason: FailureReason::ScriptFailure,
        exit_code: Some(exit_code),
    };
    run_with_trace(&client, &unit, "unit failed ✗\n".as_bytes(), failed(1)).await;
    run_with_trace(&client, &flaky, b"flaky failed\n", failed(2)).await;
    assert_eq!(
        handle.trace(unit.id).as_deref(),
        Some("unit failed ✗\n".as_bytes())
    );

    // Deploy stage: the on_success job is skipped, the `when: always` job still runs.
    let notify = take_job(&client, RUNNER_TOKEN).await;
    assert_eq!(notify.job_info.name, "notify");
    no_job(&client, RUNNER_TOKEN).await;
    run_with_trace(&client, &notify, b"notified\n", JobOutcome::Success).await;

    let report = tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .expect("pipeline ends");
    assert_eq!(report.status, PipelineStatus::Failed);
    let summary: Vec<(&str, &str, JobStatus, Option<i32>)> = report
        .jobs
        .iter()
        .map(|job| {
            (
                job.name.as_str(),
                job.stage.as_str(),
                job.status,
                job.exit_code,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("build", "build", JobStatus::Success, Some(0)),
            ("unit", "test", JobStatus::Failed, Some(1)),
            ("flaky", "test", JobStatus::Failed, Some(2)),
            ("deploy", "deploy", JobStatus::Skipped, None),
            ("notify", "deploy", JobStatus::Success, Some(0)),
        ]
    );
    let unit_report = report.job("unit").expect("unit");
    assert_eq!(
        unit_report.failure_reason.as_deref(),
        Some("script_failure")
    );
    assert_eq!(unit_report.runner.as_deref(), Some("local runner"));
    let started = unit_report.started_at.expect("started");
    assert!(unit_report.finished_at.expect("finished") >= started);
    let deploy_report = report.job("deploy").expect("deploy");
    assert!(deploy_report.runner.is_none() && deploy_report.started_at.is_none());
    let json = serde_json::to_value(&report).expect("serialisable");
    assert_eq!(json["status"], "failed");
    assert_eq!(json["jobs"][3]["status"], "skipped");

    // Events arrive in pipeline order.
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        match event {
            PipelineEvent::JobStarted {
                name,
                runner_description,
                ..
            } => {
                assert_eq!(runner_description, "local runner");
                seen.push(format!("start {name}"));
            }
            PipelineEvent::JobFinished { name, status, .. } => {
                seen.push(format!("{} {name}", status.as_str()))
            }
            PipelineEvent::TraceChunk { name, bytes, .. } => seen.push(format!(
                "log {name} {}",
                String::from_utf8_lossy(&bytes).trim_end()
            )),
            PipelineEvent::PipelineFinished { status } => seen.push(format!("pipeline {status:?}")),
            PipelineEvent::JobRetried { name, .. } => seen.push(format!("retry {name}")),
            PipelineEvent::JobCanceling { name, .. } => seen.push(format!("canceling {name}")),
        }
    }
    assert_eq!(
        seen,
        [
            "start build",
            "log build hello",
            "log build world",
            "success build",
            "start unit",
            "log unit unit failed ✗",
            "failed unit",
            "start flaky",
            "log flaky flaky failed",
            "failed flaky",
            "skipped deploy",
            "start notify",
            "log notify notified",
            "success notify",
            "pipeline Failed",
        ]
    );
}

#[tokio::test]
async fn jobs_are_routed_by_tags_like_gitlab() {
    let project = tempfile::tempdir().expect("temp dir");
    let yaml =
        "image-build:\n  tags: [pinp]\n  script: podman build .\nlint:\n  script: make lint\n";
    let handle = start(
        yaml,
        vec![
            registration("glrt-podman", "podman", &["podman"], true),
            registration("glrt-pinp", "pinp", &["pinp"], false),
        ],
        project.path(),
    )
    .await;
    let client = client(&handle.url);
    let lint = take_job(&client, "glrt-podman").await;
    assert_eq!(lint.job_info.name, "lint");
    no_job(&client, "glrt-podman").await; // never the pinp-tagged job
    let image_build = take_job(&client, "glrt-pinp").await;
    assert_eq!(image_build.job_info.name, "image-build");
    assert_eq!(variable(&image_build, "CI_RUNNER_TAGS"), Some("pinp"));
    no_job(&client, "glrt-pinp").await;
}

/// Waits until the trace's uploader has heard `wanted` from the coordinator.
async fn wait_for_remote(trace: &JobTrace, wanted: RemoteState) {
    let mut state = trace.remote_state();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|state| *state == wanted),
    )
    .await
    .unwrap_or_else(|_| panic!("{wanted:?} not heard within 10s"))
    .expect("trace alive");
}

/// A pipeline of a long job and a later one, the long job taken, acknowledged and tracing.
async fn running_long_job(project: &std::path::Path) -> (Handle, Client, JobResponse, JobTrace) {
    let handle = start(
        "long:\n  script: sleep 600\nlater:\n  stage: deploy\n  script: x\n",
        vec![registration(RUNNER_TOKEN, "local runner", &[], true)],
        project,
    )
    .await;
    let client = client(&handle.url);
    let job = take_job(&client, RUNNER_TOKEN).await;
    acknowledge(&client, &job).await;
    let trace = JobTrace::start(
        client.clone(),
        job.id,
        job.token.expose(),
        JobTraceOptions {
            update_interval: Duration::from_millis(20),
            ..JobTraceOptions::for_job(&job)
        },
    );
    (handle, client, job, trace)
}

#[tokio::test]
async fn cancel_all_answers_canceled_once_then_forbidden() {
    let project = tempfile::tempdir().expect("temp dir");
    let (handle, client, job, trace) = running_long_job(project.path()).await;
    handle.cancel_all();
    let report = tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .expect("pipeline ends");
    assert_eq!(report.status, PipelineStatus::Canceled);
    assert_eq!(
        report.job("long").map(|job| job.status),
        Some(JobStatus::Canceled)
    );
    assert_eq!(
        report.job("later").map(|job| job.status),
        Some(JobStatus::Canceled)
    );

    trace.write(b"still working\n");
    wait_for_remote(&trace, RemoteState::Abort).await;
    assert!(matches!(
        trace.finish(JobOutcome::Success).await,
        Err(CoordinatorError::JobAborted { .. })
    ));
    let forbidden = client
        .patch_trace(job.id, job.token.expose(), 0, b"more")
        .await
        .expect_err("after cancel");
    assert!(matches!(forbidden, CoordinatorError::Forbidden { .. }));
}

#[tokio::test]
async fn a_graceful_cancel_lets_the_runner_finish_after_script_then_ends_canceled() {
    let project = tempfile::tempdir().expect("temp dir");
    let (handle, _client, job, trace) = running_long_job(project.path()).await;
    trace.write(b"working\n");
    handle.cancel_all_gracefully();
    let snapshot = handle.snapshot();
    assert_eq!(snapshot.status, PipelineStatus::Running, "not over yet");
    assert_eq!(
        snapshot.job("long").map(|job| job.status),
        Some(JobStatus::Canceling)
    );
    assert_eq!(
        snapshot.job("later").map(|job| job.status),
        Some(JobStatus::Canceled),
        "a job no runner holds ends at once"
    );

    wait_for_remote(&trace, RemoteState::Canceling).await;
    // The runner keeps its token while canceling: after_script output still lands.
    trace.write(b"after_script ran\n");
    trace
        .finish(JobOutcome::Failed {
            reason: FailureReason::JobCanceled,
            exit_code: None,
        })
        .await
        .expect("the final update of a canceling job is accepted");
    let report = tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .expect("pipeline ends");
    assert_eq!(report.status, PipelineStatus::Canceled);
    assert_eq!(
        report.job("long").map(|job| job.status),
        Some(JobStatus::Canceled)
    );
    let log = String::from_utf8(handle.trace(job.id).expect("trace kept")).expect("utf-8");
    assert!(log.contains("working\nafter_script ran\n"), "{log}");
}

#[tokio::test]
async fn runners_without_two_phase_commit_start_jobs_at_once() {
    let project = tempfile::tempdir().expect("temp dir");
    let handle = start(
        "job:\n  script: x\n",
        vec![registration(RUNNER_TOKEN, "legacy", &[], true)],
        project.path(),
    )
    .await;
    let mut info = RunnerInfo::podfleet("docker-autoscaler", "bash");
    info.features.two_phase_job_commit = false;
    let client = client_with(&handle.url, info);
    let job = take_job(&client, RUNNER_TOKEN).await;
    assert_eq!(
        handle.snapshot().job("job").map(|job| job.status),
        Some(JobStatus::Running)
    );
    let token = job.token.expose();
    let mut done = UpdateJobRequest::new(RunnerInfo::default(), token, JobState::Failed);
    done.failure_reason = Some("runner_system_failure".to_owned());
    client
        .update_job(job.id, token, &done)
        .await
        .expect("final update");
    let report = handle.wait().await;
    assert_eq!(report.status, PipelineStatus::Failed);
    let job = report.job("job").expect("job");
    assert_eq!(
        (job.exit_code, job.failure_reason.as_deref()),
        (None, Some("runner_system_failure"))
    );
}

#[tokio::test]
async fn commit_variables_come_from_the_local_repository() {
    let project = tempfile::tempdir().expect("temp dir");
    let git = |arguments: &[&str]| {
        let output = std::process::Command::new("git")
            .arg("-C")
            .arg(project.path())
            .args([
                "-c",
                "user.name=podfleet",
                "-c",
                "user.email=podfleet@localhost",
                "-c",
                "init.defaultBranch=trunk",
            ])
            .args(arguments)
            .output()
            .expect("git is installed");
        assert!(
            output.status.success(),
            "git {arguments:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("utf8")
            .trim()
            .to_owned()
    };
    git(&["init", "-q"]);
    git(&["commit", "-q", "--allow-empty", "-m", "first"]);
    let sha = git(&["rev-parse", "HEAD"]);
    let handle = start(
        "job:\n  script: x\n",
        vec![registration(RUNNER_TOKEN, "r", &[], true)],
        project.path(),
    )
    .await;
    let job = take_job(&client(&handle.url), RUNNER_TOKEN).await;
    assert_eq!(variable(&job, "CI_COMMIT_SHA"), Some(sha.as_str()));
    assert_eq!(variable(&job, "CI_COMMIT_SHORT_SHA"), Some(&sha[..8]));
    assert_eq!(variable(&job, "CI_COMMIT_REF_NAME"), Some("trunk"));
    assert_eq!(job.git_info.sha, sha);
    assert_eq!(job.git_info.git_ref, "trunk");
}

/// A runner that already knows the queue (its `X-GitLab-Last-Update`) is held, as GitLab
/// long-polls: the next stage's job reaches it as soon as the stage before ends, not at its
/// next ask.
#[tokio::test]
async fn a_request_that_knows_the_queue_is_held_until_the_queue_changes() {
    let project = tempfile::tempdir().expect("temp dir");
    let handle = start(
        "stages: [a, b]\nfirst: { stage: a, script: x }\nsecond: { stage: b, script: x }\n",
        vec![registration(RUNNER_TOKEN, "runner", &[], true)],
        project.path(),
    )
    .await;
    let client = client(&handle.url);
    let first = take_job(&client, RUNNER_TOKEN).await;
    let mut last_update = None;
    let offered = client
        .request_job(RUNNER_TOKEN, &mut last_update)
        .await
        .expect("request");
    assert!(
        offered.is_none(),
        "a runner new to the queue is answered at once"
    );
    let held = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut last_update = last_update;
            client.request_job(RUNNER_TOKEN, &mut last_update).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "answered before the queue changed");
    run_with_trace(&client, &first, b"done\n", JobOutcome::Success).await;
    let offered = held.await.expect("task").expect("request");
    assert_eq!(
        offered.map(|job| job.job_info.name).as_deref(),
        Some("second")
    );
}
