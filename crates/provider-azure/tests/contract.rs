//! Every ARM, IMDS and login request the provider sends, checked against
//! reference/azure-vmss.md (method, path, api-version, headers, body), for Uniform and
//! Flexible scale sets, against the stand-in serving the recorded payloads.

mod standin;

use podfleet_provider::{InstanceId, InstanceState, Provider, ProviderError};
use podfleet_provider_azure::{AzureEnvironment, ConnectorDefaults};
use serde_json::json;
use standin::{Cloud, Mode, Recorded, SCALE_SET, ScaleOutOutcome, TENANT, eventually};

fn scale_set_path() -> String {
    Cloud::scale_set_id()
}

fn assert_guid(value: &str) {
    let parts: Vec<usize> = value.split('-').map(str::len).collect();
    assert_eq!(
        parts,
        [8, 4, 4, 4, 12],
        "x-ms-client-request-id {value:?} is not a GUID"
    );
}

/// Checks what every ARM request must carry.
fn assert_arm_headers(request: &Recorded) {
    assert!(
        request
            .headers
            .get("user-agent")
            .is_some_and(|agent| agent.starts_with("podfleet/")),
        "{:?}",
        request.headers.get("user-agent")
    );
    let auth = request
        .headers
        .get("authorization")
        .expect("Authorization header");
    assert!(auth.starts_with("Bearer token-"), "{auth}");
    assert_guid(
        request
            .headers
            .get("x-ms-client-request-id")
            .expect("x-ms-client-request-id"),
    );
    if request.body.is_some() {
        assert_eq!(
            request.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
    }
}

/// `request`'s query parameter `key` is `value`.
fn assert_query(request: &Recorded, key: &str, value: &str) {
    assert_eq!(
        request.query.get(key).map(String::as_str),
        Some(value),
        "{key} of {} {}",
        request.method,
        request.path
    );
}

fn find<'a>(requests: &'a [Recorded], method: &str, path: &str) -> Vec<&'a Recorded> {
    requests
        .iter()
        .filter(|r| r.method == method && r.path == path)
        .collect()
}

async fn settle(provider: &podfleet_provider_azure::AzureProvider) {
    eventually("operations followed", || !provider.operations_pending()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uniform_requests_follow_the_reference() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();

    // The managed-identity token: IMDS with the mandatory header, version and resource.
    let imds = &cloud.requests()[0];
    assert_eq!(
        (imds.method.as_str(), imds.path.as_str()),
        ("GET", "/metadata/identity/oauth2/token")
    );
    assert_eq!(
        imds.headers.get("metadata").map(String::as_str),
        Some("true")
    );
    assert_query(imds, "api-version", "2018-02-01");
    assert_query(imds, "resource", "https://management.azure.com/");

    // The scale set read at start.
    let read = &cloud.arm_requests()[0];
    assert_eq!(
        (read.method.as_str(), read.path.as_str()),
        ("GET", scale_set_path().as_str())
    );
    assert_query(read, "api-version", "2024-11-01");
    assert_arm_headers(read);
    cloud.clear_requests();

    // Increase: read, then PATCH of the absolute capacity under If-Match, then the poll.
    assert_eq!(provider.increase(3).await.unwrap(), 3);
    settle(&provider).await;
    let requests = cloud.arm_requests();
    let patches = find(&requests, "PATCH", &scale_set_path());
    assert_eq!(patches.len(), 1);
    let patch = patches[0];
    assert_arm_headers(patch);
    assert_query(patch, "api-version", "2024-11-01");
    assert_eq!(
        patch.headers.get("if-match").map(String::as_str),
        Some("\"1\"")
    );
    assert_eq!(patch.body, Some(json!({ "sku": { "capacity": 3 } })));
    let polls: Vec<&Recorded> = requests
        .iter()
        .filter(|r| r.path.contains("/operations/"))
        .collect();
    assert!(
        !polls.is_empty(),
        "the Azure-AsyncOperation URL was not polled"
    );
    for poll in &polls {
        assert_eq!(poll.method, "GET");
        assert!(poll.path.starts_with(&format!(
            "/subscriptions/{}/providers/Microsoft.Compute/locations/westus/operations/",
            standin::SUBSCRIPTION
        )));
        assert_arm_headers(poll);
    }
    assert_eq!(cloud.with(|s| s.capacity), 3);
    cloud.clear_requests();

    // List: one paged call with the instance view; the stand-in pages by two.
    let listed = provider.list().await.unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    let requests = cloud.arm_requests();
    let lists = find(
        &requests,
        "GET",
        &format!("{}/virtualMachines", scale_set_path()),
    );
    assert_eq!(lists.len(), 2, "two pages expected");
    for list in &lists {
        assert_arm_headers(list);
        assert_query(list, "api-version", "2024-11-01");
        assert_query(list, "$expand", "instanceView");
    }
    assert_query(lists[1], "$skiptoken", "2");
    assert_eq!(
        requests.len(),
        2,
        "one list per tick, no per-instance reads: {requests:?}"
    );
    eventually_running(&provider, 3).await;

    // Addresses: the instance's NICs (api 2018-10-01), primary NIC and IP configuration.
    cloud.clear_requests();
    let info = provider
        .connect_info(&InstanceId("0".into()))
        .await
        .unwrap();
    assert_eq!(info.internal_addr, "10.0.0.4:22");
    assert_eq!(info.external_addr, None);
    let requests = cloud.arm_requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(
        requests[0].path,
        format!("{}/virtualMachines/0/networkInterfaces", scale_set_path())
    );
    assert_query(&requests[0], "api-version", "2018-10-01");
    // Cached: addresses do not change while the VM lives.
    provider
        .connect_info(&InstanceId("0".into()))
        .await
        .unwrap();
    assert_eq!(cloud.arm_requests().len(), 1);

    // Delete chosen instances: one POST, 202 + Location polled until done.
    cloud.clear_requests();
    let accepted = provider
        .decrease(&[InstanceId("0".into()), InstanceId("2".into())])
        .await
        .unwrap();
    assert_eq!(accepted, [InstanceId("0".into()), InstanceId("2".into())]);
    settle(&provider).await;
    let requests = cloud.arm_requests();
    let deletes = find(&requests, "POST", &format!("{}/delete", scale_set_path()));
    assert_eq!(deletes.len(), 1);
    assert_arm_headers(deletes[0]);
    assert_query(deletes[0], "api-version", "2024-11-01");
    assert_eq!(
        deletes[0].query.get("forceDeletion"),
        None,
        "healthy instances are not force-deleted"
    );
    assert_eq!(deletes[0].body, Some(json!({ "instanceIds": ["0", "2"] })));
    assert!(
        requests
            .iter()
            .any(|r| r.path.contains("/operations/") && r.query.contains_key("monitor")),
        "Location not polled"
    );
    // Deleting instances lowers the capacity itself: no capacity write follows.
    assert!(find(&requests, "PATCH", &scale_set_path()).is_empty());
    let left: Vec<String> = provider
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id.0)
        .collect();
    assert_eq!(left, ["1"]);
    assert_eq!(cloud.with(|s| s.capacity), 1);
}

async fn eventually_running(provider: &podfleet_provider_azure::AzureProvider, count: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let listed = provider.list().await.unwrap();
        if listed
            .iter()
            .filter(|i| i.state == InstanceState::Running)
            .count()
            == count
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "instances never ran: {listed:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flexible_requests_follow_the_reference() {
    let cloud = Cloud::start(Mode::Flexible).await;
    let connector = ConnectorDefaults {
        use_external_addr: true,
        username: Some("gitlab-runner-executor".into()),
        ..Default::default()
    };
    let provider = standin::provider_with(&cloud, &[], AzureEnvironment::default(), connector)
        .await
        .unwrap();
    assert_eq!(
        provider.orchestration(),
        podfleet_provider_azure::Orchestration::Flexible
    );
    assert_eq!(provider.increase(3).await.unwrap(), 3);
    settle(&provider).await;
    cloud.clear_requests();

    let listed = provider.list().await.unwrap();
    assert_eq!(listed.len(), 3);
    let requests = cloud.arm_requests();
    let vm_path = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines",
        standin::SUBSCRIPTION,
        standin::RESOURCE_GROUP
    );
    let lists = find(&requests, "GET", &vm_path);
    assert_eq!(lists.len(), 2, "paged: {requests:?}");
    for list in &lists {
        assert_arm_headers(list);
        assert_query(list, "api-version", "2024-11-01");
        assert_query(list, "$expand", "instanceView");
        assert_eq!(
            list.query.get("$filter").cloned(),
            Some(format!(
                "'virtualMachineScaleSet/id' eq '{}'",
                Cloud::scale_set_id()
            ))
        );
    }
    eventually_running(&provider, 3).await;

    // Addresses: NIC and public IP by id with the Network api-version.
    cloud.clear_requests();
    let name = format!("{SCALE_SET}_1");
    let info = provider
        .connect_info(&InstanceId(name.clone()))
        .await
        .unwrap();
    assert_eq!(info.internal_addr, "10.1.0.5:22");
    assert_eq!(info.external_addr.as_deref(), Some("198.51.100.5:22"));
    assert_eq!(info.username.as_deref(), Some("gitlab-runner-executor"));
    let requests = cloud.arm_requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(requests[0].path.ends_with(&format!(
        "/providers/Microsoft.Network/networkInterfaces/{name}-nic"
    )));
    assert!(requests[1].path.ends_with(&format!(
        "/providers/Microsoft.Network/publicIPAddresses/{name}-ip"
    )));
    for request in &requests {
        assert_arm_headers(request);
        assert_query(request, "api-version", "2025-01-01");
    }

    // Deletion by VM name through the scale set's batch delete.
    cloud.clear_requests();
    provider
        .decrease(&[InstanceId(name.clone())])
        .await
        .unwrap();
    settle(&provider).await;
    let requests = cloud.arm_requests();
    let deletes = find(&requests, "POST", &format!("{}/delete", scale_set_path()));
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0].body, Some(json!({ "instanceIds": [name] })));
    assert_eq!(provider.list().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uniform_public_addresses_come_from_the_scale_set_network_api() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let connector = ConnectorDefaults {
        use_external_addr: true,
        ..Default::default()
    };
    let provider = standin::provider_with(&cloud, &[], AzureEnvironment::default(), connector)
        .await
        .unwrap();
    provider.increase(1).await.unwrap();
    settle(&provider).await;
    eventually_running(&provider, 1).await;
    cloud.clear_requests();
    let info = provider
        .connect_info(&InstanceId("0".into()))
        .await
        .unwrap();
    assert_eq!(info.external_addr.as_deref(), Some("203.0.113.4:22"));
    let requests = cloud.arm_requests();
    let public = requests.last().unwrap();
    assert!(
        public.path.ends_with(
            "/virtualMachines/0/networkInterfaces/nic0/ipConfigurations/ip1/publicIPAddresses/pub1"
        ),
        "{}",
        public.path
    );
    assert_query(public, "api-version", "2018-10-01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increases_are_folded_into_few_capacity_writes() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = std::sync::Arc::new(standin::provider(&cloud, &[]).await.unwrap());
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let provider = provider.clone();
            tokio::spawn(async move { provider.increase(1).await })
        })
        .collect();
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.unwrap().unwrap();
    }
    assert_eq!(accepted, 8);
    assert_eq!(cloud.with(|s| s.capacity), 8);
    let patches = find(&cloud.arm_requests(), "PATCH", &scale_set_path()).len();
    assert!(
        patches < 8,
        "{patches} capacity writes for 8 concurrent increases"
    );
    settle(&provider).await;
    assert_eq!(provider.list().await.unwrap().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_changed_meanwhile_is_read_again_not_overwritten() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    // Another writer (a second manager, the portal) raises the capacity between our read
    // and our write: the etag no longer matches.
    cloud.fault(standin::Fault {
        method: Some("PATCH"),
        path_contains: SCALE_SET.into(),
        times: 1,
        status: 412,
        headers: vec![],
        body: json!({"error":{"code":"PreconditionFailed","message":"etag mismatch"}}).to_string(),
    });
    assert_eq!(provider.increase(2).await.unwrap(), 2);
    let requests = cloud.arm_requests();
    let reads = find(&requests, "GET", &scale_set_path()).len();
    assert_eq!(reads, 3, "start, first read, re-read after 412");
    assert_eq!(find(&requests, "PATCH", &scale_set_path()).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_never_grows_past_max_size() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[("max_size", json!(2))])
        .await
        .unwrap();
    assert_eq!(provider.increase(5).await.unwrap(), 2);
    assert_eq!(provider.increase(1).await.unwrap(), 0);
    assert_eq!(cloud.with(|s| s.capacity), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_deallocated_instances_are_reported_failed_and_force_deleted() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    cloud.with(|s| s.next_scale_out = ScaleOutOutcome::FailInstances);
    provider.increase(1).await.unwrap();
    settle(&provider).await;
    cloud.add_running(1);
    cloud.with(|s| s.vms.get_mut("1").unwrap().state = standin::VmState::Deallocated);
    let listed = provider.list().await.unwrap();
    for instance in &listed {
        assert!(
            matches!(&instance.state, InstanceState::Failed { reason } if reason.contains("AllocationFailed") || reason.contains("deallocated")),
            "{listed:?}"
        );
    }
    // The scale-out that produced the failed VM is reported.
    assert!(
        provider
            .failed_operations()
            .iter()
            .any(|e| e.contains("AllocationFailed"))
    );
    cloud.clear_requests();
    provider
        .decrease(&[InstanceId("0".into()), InstanceId("1".into())])
        .await
        .unwrap();
    let deletes: Vec<Recorded> = cloud
        .arm_requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(deletes.len(), 1);
    assert_query(&deletes[0], "forceDeletion", "true");
    settle(&provider).await;
    assert!(provider.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_principal_secret_from_the_environment_is_used_off_azure() {
    let cloud = Cloud::start(Mode::Uniform).await;
    cloud.with(|s| s.imds_enabled = false);
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
    let login = cloud
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/oauth2/v2.0/token"))
        .expect("login request");
    assert_eq!(login.method, "POST");
    assert_eq!(login.path, format!("/{TENANT}/oauth2/v2.0/token"));
    assert_eq!(
        login.headers.get("content-type").map(String::as_str),
        Some("application/x-www-form-urlencoded")
    );
    let form = login.body.unwrap();
    let form = form.as_str().unwrap();
    for part in [
        "grant_type=client_credentials",
        "client_id=app-id",
        "client_secret=s3cr3t-value",
        "scope=https%3A%2F%2Fmanagement.azure.com%2F.default",
    ] {
        assert!(
            form.split('&').any(|p| p == part),
            "{part} missing from the form"
        );
    }
    assert_eq!(provider.tokens_fetched(), 1, "the token is cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_client_secret_is_one_clear_error_without_the_secret() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let environment = AzureEnvironment {
        tenant_id: Some(TENANT.into()),
        client_id: Some("app-id".into()),
        client_secret: Some(podfleet_provider::SecretString::new("wrong-secret-value")),
        ..Default::default()
    };
    let error = standin::provider_with(
        &cloud,
        &[("credential", json!("client_secret"))],
        environment,
        ConnectorDefaults::default(),
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(error.contains("AADSTS7000215"), "{error}");
    assert!(
        !error.contains("wrong-secret-value"),
        "the secret leaked: {error}"
    );
    let logins = cloud
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/token"))
        .count();
    assert_eq!(logins, 1, "a refused secret is not retried in a loop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_reads_the_projected_token_each_time() {
    let cloud = Cloud::start(Mode::Uniform).await;
    cloud.with(|s| s.imds_enabled = false);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    let assertion = cloud.with(|s| s.federated_assertion.clone());
    std::fs::write(&file, format!("{assertion}\n")).unwrap();
    let environment = AzureEnvironment {
        tenant_id: Some(TENANT.into()),
        client_id: Some("app-id".into()),
        federated_token_file: Some(file.clone()),
        ..Default::default()
    };
    let provider = standin::provider_with(&cloud, &[], environment, ConnectorDefaults::default())
        .await
        .unwrap();
    let login = cloud
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/oauth2/v2.0/token"))
        .unwrap();
    let form = login.body.unwrap().as_str().unwrap().to_string();
    assert!(
        form.contains(
            "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
        ),
        "{form}"
    );
    assert!(!form.contains("client_secret"), "{form}");
    // The token on disk is rotated; the next token request must send the new one.
    cloud.with(|s| {
        s.federated_assertion = "rotated.assertion.sig".into();
        s.valid_tokens.clear();
    });
    std::fs::write(&file, "rotated.assertion.sig").unwrap();
    provider.list().await.unwrap();
    assert_eq!(provider.tokens_fetched(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_assigned_identity_is_named_to_imds() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let identity = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/podfleet";
    cloud.with(|s| s.imds_identity = Some(("msi_res_id".into(), identity.into())));
    standin::provider(
        &cloud,
        &[
            ("credential", json!("managed_identity")),
            ("managed_identity_resource_id", json!(identity)),
        ],
    )
    .await
    .unwrap();
    cloud.with(|s| s.imds_identity = Some(("client_id".into(), "mi-client-id".into())));
    standin::provider(&cloud, &[("client_id", json!("mi-client-id"))])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_permission_is_one_error_naming_resource_and_action() {
    let cloud = Cloud::start(Mode::Uniform).await;
    cloud.with(|s| {
        s.denied.push((
            "GET",
            SCALE_SET.into(),
            "Microsoft.Compute/virtualMachineScaleSets/read",
        ))
    });
    let error = standin::provider(&cloud, &[]).await.err().unwrap();
    assert!(matches!(error, ProviderError::Config(_)), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("Microsoft.Compute/virtualMachineScaleSets/read"),
        "{text}"
    );
    assert!(text.contains(&Cloud::scale_set_id()), "{text}");
    assert_eq!(cloud.arm_requests().len(), 1, "a 403 is not retried");

    // Allowed to read but not to write: the increase fails once, clearly.
    cloud.with(|s| {
        s.denied.clear();
        s.denied.push((
            "PATCH",
            SCALE_SET.into(),
            "Microsoft.Compute/virtualMachineScaleSets/write",
        ));
    });
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    cloud.clear_requests();
    let error = provider.increase(1).await.unwrap_err().to_string();
    assert!(
        error.contains("Microsoft.Compute/virtualMachineScaleSets/write"),
        "{error}"
    );
    assert_eq!(
        find(&cloud.arm_requests(), "PATCH", &scale_set_path()).len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_scale_set_name_says_which_keys_to_check() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let error = standin::provider(&cloud, &[("name", json!("no-such-set"))])
        .await
        .err()
        .unwrap();
    let text = error.to_string();
    assert!(
        text.contains("virtualMachineScaleSets/no-such-set"),
        "{text}"
    );
    assert!(text.contains("resource_group_name"), "{text}");
    assert_eq!(cloud.arm_requests().len(), 1, "a 404 is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_versions_and_latest_model_are_reported_per_instance() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[("track_gallery_latest", json!(true))])
        .await
        .unwrap();
    cloud.add_running(2);
    // A new image version is published and pinned in the model; instance 0 keeps the old.
    cloud.with(|s| {
        s.vms.get_mut("0").unwrap().latest_model = false;
        s.vms.get_mut("1").unwrap().image_version = "1.1.0".into();
        s.model_version = "1.1.0".into();
        s.gallery_versions = vec!["1.0.0".into(), "1.1.0".into(), "1.2.0".into()];
    });
    let images = provider.instance_images().await.unwrap();
    assert_eq!(images.len(), 2);
    let old = &images[0];
    assert_eq!(old.id.0, "0");
    assert_eq!(old.version.as_deref(), Some("1.0.0"));
    assert_eq!(old.latest_model_applied, Some(false));
    assert_eq!(old.up_to_date, Some(false));
    // The gallery has 1.2.0 although the model pins 1.1.0: with track_gallery_latest the
    // target is 1.2.0, so instance 1 is outdated too.
    let current = &images[1];
    assert_eq!(current.target_version.as_deref(), Some("1.2.0"));
    assert_eq!(current.up_to_date, Some(false));
    let gallery = cloud
        .arm_requests()
        .into_iter()
        .find(|r| r.path.ends_with("/versions"))
        .expect("gallery listed");
    assert_eq!(
        gallery.path,
        format!("{}/versions", standin::GALLERY_DEFINITION)
    );
    assert_query(&gallery, "api-version", "2024-03-03");

    // A newer version still replicating to the region is not the target yet.
    cloud.with(|s| {
        s.gallery_versions.push("1.3.0".into());
        s.replicating.push("1.3.0".into());
    });
    let images = provider.instance_images().await.unwrap();
    assert_eq!(images[1].target_version.as_deref(), Some("1.2.0"));
    let checks: Vec<Recorded> = cloud
        .arm_requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/versions/1.3.0"))
        .collect();
    assert!(!checks.is_empty(), "replication of 1.3.0 not checked");
    assert_query(&checks[0], "$expand", "ReplicationStatus");

    // Without gallery tracking the model is the target.
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    let images = provider.instance_images().await.unwrap();
    assert_eq!(images[1].target_version.as_deref(), Some("1.1.0"));
    assert_eq!(images[1].up_to_date, Some(true));
    assert!(
        images[0]
            .image
            .ends_with("/images/podman-executor/versions/1.0.0"),
        "{}",
        images[0].image
    );
}

/// Serves a recorded list answer verbatim for the next instance listing.
fn serve_recorded_list(cloud: &Cloud, name: &str) {
    let body = standin::recorded_body(name, "200");
    cloud.fault(standin::Fault {
        method: Some("GET"),
        path_contains: "/virtualMachines".into(),
        times: 1,
        status: 200,
        headers: vec![],
        body: body.to_string(),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_list_answers_parse_and_foreign_next_links_are_not_followed() {
    let cloud = Cloud::start(Mode::Uniform).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    // The minimal example: items without ids are skipped, nothing breaks.
    serve_recorded_list(&cloud, "VirtualMachineScaleSetVMs_List.MinimumSet.json");
    assert!(provider.list().await.unwrap().is_empty());
    // The maximal example's nextLink points at another host ("a://example.com/..."): the
    // ARM token must not be sent there.
    serve_recorded_list(&cloud, "VirtualMachineScaleSetVMs_List.json");
    cloud.clear_requests();
    let error = provider.list().await.unwrap_err().to_string();
    assert!(
        error.contains("a://example.com") && error.contains("outside the ARM endpoint"),
        "{error}"
    );
    assert_eq!(
        cloud.requests().len(),
        1,
        "the foreign next link was requested"
    );

    let cloud = Cloud::start(Mode::Flexible).await;
    let provider = standin::provider(&cloud, &[]).await.unwrap();
    serve_recorded_list(&cloud, "VirtualMachines_List.MinimumSet.json");
    assert!(provider.list().await.unwrap().is_empty());
}
