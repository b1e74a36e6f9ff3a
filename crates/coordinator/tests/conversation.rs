//! The client and the trace uploader against a scripted GitLab: every request is checked.

mod support;

use std::time::Duration;

use podfleet_coordinator::model::{
    FailureReason, JobState, RemoteJobStatus, RunnerInfo, UpdateJobRequest,
};
use podfleet_coordinator::{
    Client, ClientOptions, CoordinatorError, JobOutcome, JobTrace, JobTraceOptions, PatchResponse,
    RemoteState, RetryPolicy, format_checksum,
};
use support::{Recorded, Reply, ScriptedServer};

const RUNNER_TOKEN: &str = "glrt-abc123";
const SYSTEM_ID: &str = "s_0123456789ab";

fn client(server: &ScriptedServer) -> Client {
    Client::with_options(
        &server.url,
        SYSTEM_ID,
        RunnerInfo::podfleet("docker-autoscaler", "bash"),
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

fn fast_trace_options() -> JobTraceOptions {
    JobTraceOptions {
        update_interval: Duration::from_millis(20),
        force_send_interval: Duration::from_secs(3600),
        final_update_backoff_base: Duration::from_millis(1),
        failure_reasons: vec!["script_failure".into(), "unknown_failure".into()],
        ..JobTraceOptions::default()
    }
}

fn job_payload() -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/job_request_response.gitlab_runner_network_test.rendered_valid.json"),
    )
    .expect("fixture")
}

fn assert_common_headers(request: &Recorded) {
    let agent = request.header("user-agent").expect("user agent");
    assert!(
        agent.starts_with("podfleet/") && agent.contains("gitlab-runner compatible"),
        "{agent}"
    );
    let id = request.header("x-request-id").expect("request id");
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
}

async fn wait_for_state(trace: &JobTrace, wanted: RemoteState) {
    let mut receiver = trace.remote_state();
    tokio::time::timeout(
        Duration::from_secs(10),
        receiver.wait_for(|state| *state == wanted),
    )
    .await
    .expect("remote state changes in time")
    .expect("sender alive");
}

#[tokio::test]
async fn full_conversation_from_verify_to_final_update() {
    let server = ScriptedServer::start(vec![
        Reply::status(200).json(r#"{"id":42,"token":"glrt-abc123","token_expires_at":null}"#),
        Reply::status(204).header("X-GitLab-Last-Update", "3f9c"),
        Reply::status(201).json(&job_payload()),
        Reply::status(200).header("Job-Status", "running"),
        Reply::status(202)
            .header("Range", "0-6")
            .header("Job-Status", "running")
            .header("X-GitLab-Trace-Update-Interval", "0"),
        Reply::status(416).header("Range", "0-3"),
        Reply::status(202)
            .header("Range", "0-12")
            .header("Job-Status", "running"),
        Reply::status(202).header("X-GitLab-Trace-Update-Interval", "1"),
        Reply::status(202),
        Reply::status(200).header("Job-Status", "failed"),
    ])
    .await;
    let client = client(&server);

    let verified = client.verify_runner(RUNNER_TOKEN).await.expect("verify");
    assert_eq!(verified.id, 42);

    let mut last_update = None;
    let nothing = client
        .request_job(RUNNER_TOKEN, &mut last_update)
        .await
        .expect("request");
    assert!(nothing.is_none());
    assert_eq!(last_update.as_deref(), Some("3f9c"));

    let job = client
        .request_job(RUNNER_TOKEN, &mut last_update)
        .await
        .expect("request")
        .expect("a job");
    assert_eq!(job.id, 10);
    assert_eq!(
        last_update.as_deref(),
        Some("3f9c"),
        "kept when the answer has no header"
    );
    let job_token = job.token.expose().to_owned();

    let accepted = client
        .update_job(
            job.id,
            &job_token,
            &UpdateJobRequest::new(RunnerInfo::default(), &job_token, JobState::Running),
        )
        .await
        .expect("two-phase acknowledgement");
    assert_eq!(accepted.code, 200);
    assert_eq!(accepted.job_status, Some(RemoteJobStatus::Running));

    let trace = JobTrace::start(client.clone(), job.id, &job_token, fast_trace_options());
    trace.write(b"hello ");
    server.wait_for_requests(5).await;
    trace.write(b"world\n");
    server.wait_for_requests(7).await;
    assert_eq!(
        trace.checksum(),
        format_checksum(crc32fast::hash(b"hello world\n"))
    );
    trace
        .finish(JobOutcome::Failed {
            reason: FailureReason::ScriptFailure,
            exit_code: Some(1),
        })
        .await
        .expect("final update completes");

    let requests = server.requests();
    assert_eq!(requests.len(), 10, "{requests:#?}");
    assert_eq!(server.unused_replies(), 0);
    for request in &requests {
        assert_common_headers(request);
    }

    let verify = &requests[0];
    assert_eq!(
        (verify.method.as_str(), verify.path.as_str()),
        ("POST", "/api/v4/runners/verify")
    );
    assert_eq!(verify.header("runner-token"), Some(RUNNER_TOKEN));
    assert_eq!(verify.header("accept"), Some("application/json"));
    assert_eq!(verify.header("content-type"), Some("application/json"));
    let body = verify.json();
    assert_eq!(body["token"], RUNNER_TOKEN);
    assert_eq!(body["system_id"], SYSTEM_ID);
    assert_eq!(body["info"]["executor"], "docker-autoscaler");
    assert_eq!(body["info"]["features"]["two_phase_job_commit"], true);
    assert_eq!(body["info"]["features"]["cancel_gracefully"], false);

    for (index, expected_last_update) in [(1, None), (2, Some("3f9c"))] {
        let request = &requests[index];
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("POST", "/api/v4/jobs/request")
        );
        assert_eq!(request.header("runner-token"), Some(RUNNER_TOKEN));
        let body = request.json();
        assert_eq!(body["token"], RUNNER_TOKEN);
        assert_eq!(body["system_id"], SYSTEM_ID);
        assert_eq!(
            body.get("last_update").and_then(|v| v.as_str()),
            expected_last_update
        );
        assert!(body["info"]["features"].is_object());
    }

    let running = &requests[3];
    assert_eq!(
        (running.method.as_str(), running.path.as_str()),
        ("PUT", "/api/v4/jobs/10")
    );
    assert_eq!(running.header("job-token"), Some("job-token"));
    assert_ne!(
        running.header("accept"),
        Some("application/json"),
        "no JSON answer expected"
    );
    let body = running.json();
    assert_eq!(body["token"], "job-token");
    assert_eq!(body["state"], "running");
    assert_eq!(body["output"], serde_json::json!({}));
    assert_eq!(
        body["info"]["executor"], "docker-autoscaler",
        "the client's own info is sent"
    );

    for (index, range, bytes) in [
        (4, "0-5", &b"hello "[..]),
        (5, "6-11", &b"world\n"[..]),
        (6, "3-11", &b"lo world\n"[..]),
    ] {
        let patch = &requests[index];
        assert_eq!(
            (patch.method.as_str(), patch.path.as_str()),
            ("PATCH", "/api/v4/jobs/10/trace?debug_trace=false")
        );
        assert_eq!(patch.header("job-token"), Some("job-token"));
        assert_eq!(patch.header("content-type"), Some("text/plain"));
        assert_eq!(
            patch.header("content-range"),
            Some(range),
            "request {index}"
        );
        assert_eq!(patch.body, bytes, "request {index}");
    }

    let checksum = format_checksum(crc32fast::hash(b"hello world\n"));
    for request in &requests[7..10] {
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("PUT", "/api/v4/jobs/10")
        );
        assert_eq!(request.header("job-token"), Some("job-token"));
        let body = request.json();
        assert_eq!(body["state"], "failed");
        assert_eq!(body["token"], "job-token");
        assert_eq!(body["failure_reason"], "script_failure");
        assert_eq!(body["exit_code"], 1);
        assert_eq!(body["checksum"], checksum.as_str());
        assert_eq!(
            body["output"],
            serde_json::json!({"checksum": checksum, "bytesize": 12})
        );
    }
    let waited = requests[8].received_at - requests[7].received_at;
    assert!(
        waited >= Duration::from_millis(900),
        "202 interval of 1 s honoured: {waited:?}"
    );

    let ids: std::collections::HashSet<_> = requests
        .iter()
        .filter_map(|r| r.header("x-request-id"))
        .collect();
    assert_eq!(
        ids.len(),
        requests.len(),
        "each call has its own correlation id"
    );
}

#[tokio::test]
async fn retry_after_is_honoured_on_429() {
    let server = ScriptedServer::start(vec![
        Reply::status(429).header("Retry-After", "1"),
        Reply::status(200).json(r#"{"id":1,"token":"glrt-abc123","token_expires_at":null}"#),
    ])
    .await;
    let verified = client(&server)
        .verify_runner(RUNNER_TOKEN)
        .await
        .expect("verify after retry");
    assert_eq!(verified.id, 1);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].body, requests[1].body,
        "the same body is sent again"
    );
    let waited = requests[1].received_at - requests[0].received_at;
    assert!(waited >= Duration::from_millis(900), "waited {waited:?}");
}

#[tokio::test]
async fn retryable_statuses_give_up_after_five_attempts() {
    let server = ScriptedServer::start((0..5).map(|_| Reply::status(503)).collect()).await;
    let mut last_update = None;
    let error = client(&server)
        .request_job(RUNNER_TOKEN, &mut last_update)
        .await
        .expect_err("unavailable");
    assert_eq!(error.status(), Some(503));
    assert!(!error.is_unhealthy());
    assert_eq!(server.requests().len(), 5);
}

#[tokio::test]
async fn non_retryable_answers_are_final() {
    let server = ScriptedServer::start(vec![
        Reply::status(403).json(r#"{"message":"403 Forbidden"}"#),
        Reply::status(403).json(r#"{"message":"403 Forbidden"}"#),
        Reply::status(409).header("X-GitLab-Last-Update", "77"),
        Reply::status(422).json(r#"{"message":"Runner is orphaned"}"#),
    ])
    .await;
    let client = client(&server);
    let error = client
        .verify_runner(RUNNER_TOKEN)
        .await
        .expect_err("forbidden");
    assert!(
        matches!(error, CoordinatorError::Forbidden { .. }),
        "{error}"
    );

    let mut last_update = None;
    let error = client
        .request_job(RUNNER_TOKEN, &mut last_update)
        .await
        .expect_err("forbidden");
    assert!(error.is_unhealthy(), "403 counts against runner health");
    assert!(
        client
            .request_job(RUNNER_TOKEN, &mut last_update)
            .await
            .expect("409")
            .is_none()
    );
    assert_eq!(last_update.as_deref(), Some("77"));
    let error = client
        .request_job(RUNNER_TOKEN, &mut last_update)
        .await
        .expect_err("422");
    assert_eq!(
        error.to_string(),
        format!(
            "{}api/v4/jobs/request answered 422: Runner is orphaned",
            server.url
        )
    );
    assert_eq!(server.requests().len(), 4);
}

#[tokio::test]
async fn old_servers_answering_plain_200_to_verify_are_accepted() {
    let server = ScriptedServer::start(vec![
        Reply::status(200).header("content-type", "text/plain"),
    ])
    .await;
    let verified = client(&server)
        .verify_runner(RUNNER_TOKEN)
        .await
        .expect("verify");
    assert_eq!(verified.token.expose(), RUNNER_TOKEN);
}

#[tokio::test]
async fn patch_results_are_typed() {
    let server = ScriptedServer::start(vec![
        Reply::status(202)
            .header("Range", "0-4")
            .header("X-GitLab-Trace-Update-Interval", "60"),
        Reply::status(416).header("Range", "0-2"),
        Reply::status(404),
    ])
    .await;
    let client = client(&server);
    let accepted = client
        .patch_trace(5, "job-token", 0, b"abcd")
        .await
        .expect("202");
    assert_eq!(
        accepted,
        PatchResponse::Accepted {
            new_offset: 4,
            job_status: None,
            update_interval: Some(Duration::from_secs(60)),
        }
    );
    let mismatch = client
        .patch_trace(5, "job-token", 4, b"ef")
        .await
        .expect("416");
    assert_eq!(mismatch, PatchResponse::RangeMismatch { server_offset: 2 });
    let gone = client
        .patch_trace(5, "job-token", 2, b"cdef")
        .await
        .expect("404");
    assert_eq!(gone, PatchResponse::NotFound);
}

#[tokio::test]
async fn forbidden_trace_patch_aborts_the_job() {
    let server =
        ScriptedServer::start(vec![Reply::status(403).header("Job-Status", "canceled")]).await;
    let trace = JobTrace::start(client(&server), 7, "job-token", fast_trace_options());
    trace.write(b"working...\n");
    wait_for_state(&trace, RemoteState::Abort).await;
    let error = trace
        .finish(JobOutcome::Success)
        .await
        .expect_err("aborted");
    assert!(
        matches!(error, CoordinatorError::JobAborted { job_id: 7, .. }),
        "{error}"
    );
    assert_eq!(server.requests().len(), 1, "nothing is sent after an abort");
}

#[tokio::test]
async fn job_status_headers_publish_canceling_then_abort() {
    let server = ScriptedServer::start(vec![
        Reply::status(202)
            .header("Range", "0-2")
            .header("Job-Status", "canceling"),
        Reply::status(202)
            .header("Range", "0-4")
            .header("Job-Status", "canceled"),
    ])
    .await;
    let trace = JobTrace::start(client(&server), 8, "job-token", fast_trace_options());
    trace.write(b"ab");
    wait_for_state(&trace, RemoteState::Canceling).await;
    trace.write(b"cd");
    wait_for_state(&trace, RemoteState::Abort).await;
    assert!(trace.finish(JobOutcome::Success).await.is_err());
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn silent_jobs_send_keep_alive_updates() {
    let server = ScriptedServer::start(vec![
        Reply::status(202).header("Range", "0-3"),
        Reply::status(200).header("Job-Status", "canceling"),
    ])
    .await;
    let options = JobTraceOptions {
        force_send_interval: Duration::from_millis(100),
        ..fast_trace_options()
    };
    let trace = JobTrace::start(client(&server), 9, "job-token", options);
    trace.write(b"abc");
    wait_for_state(&trace, RemoteState::Canceling).await;
    let requests = server.requests();
    let keep_alive = &requests[1];
    assert_eq!(
        (keep_alive.method.as_str(), keep_alive.path.as_str()),
        ("PUT", "/api/v4/jobs/9")
    );
    let body = keep_alive.json();
    assert_eq!(body["state"], "running");
    assert_eq!(
        body["output"],
        serde_json::json!({"checksum": format_checksum(crc32fast::hash(b"abc")), "bytesize": 3})
    );
    assert!(body.get("exit_code").is_none() && body.get("failure_reason").is_none());
}

#[tokio::test]
async fn trace_validation_failure_reuploads_the_whole_trace() {
    let server = ScriptedServer::start(vec![
        Reply::status(202).header("Range", "0-3"),
        Reply::status(412),
        Reply::status(202).header("Range", "0-3"),
        Reply::status(200).header("Job-Status", "success"),
    ])
    .await;
    let trace = JobTrace::start(client(&server), 11, "job-token", fast_trace_options());
    trace.write(b"abc");
    server.wait_for_requests(1).await;
    trace
        .finish(JobOutcome::Success)
        .await
        .expect("finishes after re-upload");
    let requests = server.requests();
    assert_eq!(requests.len(), 4);
    assert_eq!(requests[2].method, "PATCH");
    assert_eq!(requests[2].header("content-range"), Some("0-2"));
    assert_eq!(requests[2].body, b"abc");
    let last = requests[3].json();
    assert_eq!(last["state"], "success");
    assert!(last.get("failure_reason").is_none() && last.get("exit_code").is_none());
}

#[tokio::test]
async fn unsupported_failure_reasons_are_mapped_in_the_final_update() {
    let server = ScriptedServer::start(vec![Reply::status(200)]).await;
    let trace = JobTrace::start(client(&server), 12, "job-token", fast_trace_options());
    trace
        .finish(JobOutcome::Failed {
            reason: FailureReason::ImagePullFailure,
            exit_code: None,
        })
        .await
        .expect("finishes");
    let body = server.requests()[0].json();
    assert_eq!(body["failure_reason"], "runner_system_failure");
    assert!(body.get("exit_code").is_none());
    assert_eq!(
        body["output"],
        serde_json::json!({"checksum": "crc32:00000000"})
    );
}

#[tokio::test]
async fn writers_append_to_the_same_log() {
    let server = ScriptedServer::start(vec![
        Reply::status(202).header("Range", "0-11"),
        Reply::status(200).header("Job-Status", "success"),
    ])
    .await;
    // No periodic upload: everything goes out in the final flush, in one patch.
    let options = JobTraceOptions {
        update_interval: Duration::from_secs(3600),
        ..fast_trace_options()
    };
    let trace = JobTrace::start(client(&server), 13, "job-token", options);
    let writer = trace.writer();
    trace.write(b"owner ");
    tokio::spawn(async move { writer.write(b"task\n") })
        .await
        .expect("writer task");
    trace.finish(JobOutcome::Success).await.expect("finishes");
    let requests = server.requests();
    assert_eq!(requests[0].body, b"owner task\n");
    assert_eq!(
        requests[1].json()["output"]["checksum"],
        format_checksum(crc32fast::hash(b"owner task\n")).as_str()
    );
}

#[tokio::test]
async fn token_reset_trades_the_runner_token_and_a_refusal_is_forbidden() {
    let server = ScriptedServer::start(vec![
        Reply::status(201)
            .json(r#"{"token":"glrt-new-token","token_expires_at":"2026-03-01T00:00:00.000Z"}"#),
        Reply::status(403).json(r#"{"message":"403 Forbidden"}"#),
    ])
    .await;
    let client = client(&server);
    let reset = client.reset_token(RUNNER_TOKEN).await.expect("reset");
    assert_eq!(reset.token.expose(), "glrt-new-token");
    assert_eq!(
        reset.token_expires_at.map(|at| at.to_rfc3339()),
        Some("2026-03-01T00:00:00+00:00".to_string())
    );
    let refused = client.reset_token("glrt-new-token").await.unwrap_err();
    assert_eq!(refused.status(), Some(403));
    assert!(!refused.to_string().contains("glrt-new-token"), "{refused}");

    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let first = &requests[0];
    assert_eq!(
        (first.method.as_str(), first.path.as_str()),
        ("POST", "/api/v4/runners/reset_authentication_token")
    );
    assert_common_headers(first);
    assert_eq!(first.json()["token"], RUNNER_TOKEN);
}
