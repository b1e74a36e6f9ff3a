//! Faults: 429 storms with Retry-After (the recorded Compute throttling answer), 5xx, a
//! scale-out that fails inside its operation, tokens expiring mid-run, no IMDS. The
//! provider backs off, stays usable and leaks no instance.

mod standin;

use podfleet_provider::{InstanceId, Provider, ProviderError};
use podfleet_provider_azure::{AzureEnvironment, ConnectorDefaults};
use serde_json::json;
use standin::{Cloud, Fault, Mode, SCALE_SET, ScaleOutOutcome, TENANT, eventually};

fn throttling(times: u32, retry_after: &str) -> Fault {
    Fault {
        method: Some("GET"),
        path_contains: "/virtualMachines".into(),
        times,
        status: 429,
        headers: vec![
            ("Retry-After".into(), retry_after.into()),
            (
                "x-ms-ratelimit-remaining-resource".into(),
                "Microsoft.Compute/HighCostGet;0".into(),
            ),
        ],
        body: std::fs::read_to_string(format!(
            "{}/tests/fixtures/Error_429_ComputeThrottling.body.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    }
}

fn list_requests(cloud: &Cloud) -> usize {
    cloud
        .arm_requests()
        .iter()
        .filter(|r| r.path.ends_with("/virtualMachines"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_is_sat_out_after_each_retry_after() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    cloud.add_running(2);
    // Retry-After: 20 "seconds", a test second being a millisecond.
    cloud.fault(throttling(3, "20"));
    let listed = provider.list().await.unwrap();
    assert_eq!(listed.len(), 2);
    let tries: Vec<std::time::Instant> = cloud
        .arm_requests()
        .iter()
        .filter(|r| r.path.ends_with("/virtualMachines"))
        .map(|r| r.at)
        .collect();
    assert_eq!(tries.len(), 4, "three throttled tries and one that passed");
    for pair in tries.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= std::time::Duration::from_millis(20),
            "retried after {gap:?}, before Retry-After"
        );
    }
    let stats = provider.stats();
    assert_eq!(stats.throttled, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retry_after_fails_fast_and_sends_nothing_until_it_passed() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    // 1200 s (the recorded value) is far longer than any call should block: the call
    // reports the throttling at once, and calls within the window send no request (Azure
    // would answer them with a new Retry-After).
    cloud.fault(throttling(1, "1200"));
    let error = provider.list().await.unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, ProviderError::Platform(_)), "{error:?}");
    assert!(
        text.contains("throttled") && text.contains("HighCostGet"),
        "{text}"
    );
    let sent = cloud.arm_requests().len();
    let again = provider.list().await.unwrap_err().to_string();
    assert!(again.contains("throttled"), "{again}");
    assert_eq!(
        cloud.arm_requests().len(),
        sent,
        "a request was sent inside the Retry-After window"
    );
    // After the window (1.2 s of test time) the provider works again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while provider.list().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "still throttled");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_low_on_requests_slows_the_client_down() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    assert_eq!(provider.stats().slowed_down, 0);
    cloud.with(|s| s.remaining_resource = Some(3));
    provider.list().await.unwrap();
    provider.list().await.unwrap();
    assert!(provider.stats().slowed_down >= 2, "{:?}", provider.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_then_reported() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    let server_error = |times| {
        Fault {
        method: None,
        path_contains: "/virtualMachines".into(),
        times,
        status: 500,
        headers: vec![],
        body: json!({"error":{"code":"InternalServerError","message":"An unexpected error occured while processing the network profile of the VM."}}).to_string(),
    }
    };
    cloud.fault(server_error(2));
    provider.list().await.unwrap();
    assert_eq!(list_requests(&cloud), 3);
    cloud.clear_requests();
    cloud.fault(server_error(100));
    let error = provider.list().await.unwrap_err().to_string();
    assert!(error.contains("InternalServerError"), "{error}");
    assert_eq!(list_requests(&cloud), 6, "bounded retries (max_attempts)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_write_answered_500_is_retried_without_double_growth() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    cloud.fault(Fault {
        method: Some("PATCH"),
        path_contains: SCALE_SET.into(),
        times: 1,
        status: 503,
        headers: vec![("Retry-After".into(), "2".into())],
        body: String::new(),
    });
    assert_eq!(provider.increase(2).await.unwrap(), 2);
    assert_eq!(
        cloud.with(|s| s.capacity),
        2,
        "the absolute capacity is idempotent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_out_that_fails_inside_its_operation_is_detected_and_repaired() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    cloud.with(|s| s.next_scale_out = ScaleOutOutcome::FailQuota);
    // ARM accepts the write (200) ...
    assert_eq!(provider.increase(3).await.unwrap(), 3);
    // ... and the operation then fails on the cores quota.
    eventually("failure detected", || {
        !provider.failed_operations().is_empty()
    })
    .await;
    let failure = provider.failed_operations()[0].clone();
    assert!(
        failure.contains("quota") && failure.contains("OperationNotAllowed"),
        "{failure}"
    );
    // The capacity that counted instances which never came is set back.
    eventually("capacity repaired", || cloud.with(|s| s.capacity) == 0).await;
    assert!(provider.list().await.unwrap().is_empty());
    // The provider stays usable: the next scale-out works.
    assert_eq!(provider.increase(1).await.unwrap(), 1);
    eventually("operations done", || !provider.operations_pending()).await;
    assert_eq!(provider.list().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_mid_run_is_renewed_once() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    assert_eq!(provider.tokens_fetched(), 1);
    provider.list().await.unwrap();
    assert_eq!(provider.tokens_fetched(), 1, "the cached token is reused");
    // ARM stops accepting the token (expired early, revoked): 401 ExpiredAuthenticationToken.
    cloud.with(|s| s.valid_tokens.clear());
    provider.list().await.unwrap();
    assert_eq!(provider.tokens_fetched(), 2);
    assert_eq!(provider.stats().token_refreshes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_renewed_before_they_expire() {
    let cloud = Cloud::start(Mode::Uniform).await;
    // Tokens that live less than the refresh margin (5 minutes) are never reused.
    cloud.with(|s| s.token_lifetime_seconds = 240);
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    provider.list().await.unwrap();
    provider.list().await.unwrap();
    assert_eq!(provider.tokens_fetched(), 3);
    assert_eq!(
        provider.stats().token_refreshes,
        0,
        "no request was refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm_that_keeps_refusing_tokens_is_reported_not_looped() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    cloud.fault(Fault {
        method: None,
        path_contains: "/virtualMachines".into(),
        times: 100,
        status: 401,
        headers: vec![],
        body: json!({"error":{"code":"InvalidAuthenticationToken","message":"The access token is invalid."}}).to_string(),
    });
    let error = provider.list().await.unwrap_err().to_string();
    assert!(error.contains("InvalidAuthenticationToken"), "{error}");
    assert_eq!(list_requests(&cloud), 2, "one renewal, then the error");
}

async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_imds_the_chain_moves_on_to_the_service_principal() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let environment = AzureEnvironment {
        tenant_id: Some(TENANT.into()),
        client_id: Some("app-id".into()),
        client_secret: Some(podfleet_provider::SecretString::new("s3cr3t-value")),
        ..Default::default()
    };
    let provider = standin::provider_with(
        &cloud,
        &[("imds_endpoint", json!(closed_port().await))],
        environment,
        ConnectorDefaults::default(),
    )
    .await
    .unwrap();
    provider.list().await.unwrap();
    assert!(
        cloud
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/oauth2/v2.0/token"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_managed_identity_without_imds_is_one_clear_error() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let error = standin::provider(
        &cloud,
        &[
            ("credential", json!("managed_identity")),
            ("imds_endpoint", json!(closed_port().await)),
        ],
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(
        error.contains("managed identity") && error.contains("no instance metadata service"),
        "{error}"
    );
    assert!(cloud.arm_requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_configured_lists_every_credential_tried() {
    let cloud = Cloud::start(Mode::Uniform).await;
    cloud.with(|s| s.imds_enabled = false);
    let error = standin::provider(&cloud, &[])
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("managed identity (IMDS)"), "{error}");
    assert!(
        error.contains("Azure CLI") && error.contains("/nonexistent/az"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_deletion_is_reported_and_can_be_asked_again() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    cloud.add_running(1);
    provider.list().await.unwrap();
    cloud.fault(Fault {
        method: Some("POST"),
        path_contains: "/delete".into(),
        times: 1,
        status: 409,
        headers: vec![],
        body: json!({"error":{"code":"OperationNotAllowed","message":"The operation is not allowed because another operation is in progress."}}).to_string(),
    });
    let error = provider
        .decrease(&[InstanceId("0".into())])
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("another operation"), "{error}");
    assert_eq!(
        provider.list().await.unwrap().len(),
        1,
        "nothing was deleted"
    );
    assert_eq!(
        provider
            .decrease(&[InstanceId("0".into())])
            .await
            .unwrap()
            .len(),
        1
    );
    eventually("deleted", || cloud.with(|s| s.vms.is_empty())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_answering_for_imds_does_not_stop_the_chain() {
    let cloud = Cloud::start(Mode::Uniform).await;
    // Off Azure, a firewall or proxy may answer for 169.254.169.254 with its own page.
    cloud.fault(Fault {
        method: Some("GET"),
        path_contains: "/metadata/identity/oauth2/token".into(),
        times: 1,
        status: 403,
        headers: vec![],
        body: "resolve_deny: denied destination".into(),
    });
    let environment = AzureEnvironment {
        tenant_id: Some(TENANT.into()),
        client_id: Some("app-id".into()),
        client_secret: Some(podfleet_provider::SecretString::new("s3cr3t-value")),
        ..Default::default()
    };
    let provider = standin::provider_with(&cloud, &[], environment, ConnectorDefaults::default())
        .await
        .unwrap();
    provider.list().await.unwrap();
    assert!(
        cloud
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/oauth2/v2.0/token"))
    );
}
