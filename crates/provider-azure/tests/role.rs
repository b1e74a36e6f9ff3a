//! Least privilege: every ARM request the provider can issue (both orchestration modes,
//! every feature on) maps to an action of the shipped custom role `docs/azure-role.json`,
//! and the role holds no action the provider never needs.

mod standin;

use std::collections::BTreeSet;

use podfleet_provider::{InstanceId, InstanceState, Provider};
use podfleet_provider_azure::actions::{all_actions, rbac_action};
use podfleet_provider_azure::{AzureEnvironment, ConnectorDefaults};
use serde_json::{Value, json};
use standin::{Cloud, Mode, ScaleOutOutcome, eventually};

fn role_actions() -> BTreeSet<String> {
    let path = format!("{}/../../docs/azure-role.json", env!("CARGO_MANIFEST_DIR"));
    let role: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(role["IsCustom"], json!(true));
    role["Actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// Runs every operation of the provider and returns the ARM requests it sent.
async fn every_request(mode: Mode) -> Vec<standin::Recorded> {
    let cloud = Cloud::start(mode).await;
    let connector = ConnectorDefaults {
        use_external_addr: true,
        ..Default::default()
    };
    let provider = standin::provider_with(
        &cloud,
        &[("track_gallery_latest", json!(true))],
        AzureEnvironment::default(),
        connector,
    )
    .await
    .unwrap();
    provider.increase(2).await.unwrap();
    eventually("scale-out followed", || !provider.operations_pending()).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let running = loop {
        let listed = provider.list().await.unwrap();
        if let Some(instance) = listed.iter().find(|i| i.state == InstanceState::Running) {
            break instance.id.clone();
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    provider.connect_info(&running).await.unwrap();
    provider.instance_images().await.unwrap();
    // A failed scale-out: capacity repair; then deletion of failed instances (forced).
    cloud.with(|s| s.next_scale_out = ScaleOutOutcome::FailQuota);
    provider.increase(1).await.unwrap();
    eventually("repair done", || !provider.operations_pending()).await;
    cloud.with(|s| s.next_scale_out = ScaleOutOutcome::FailInstances);
    provider.increase(1).await.unwrap();
    eventually("failure followed", || !provider.operations_pending()).await;
    let all: Vec<InstanceId> = provider
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    provider.decrease(&all).await.unwrap();
    eventually("deletions followed", || !provider.operations_pending()).await;
    assert!(
        !cloud.with(|s| s.force_deleted.is_empty()),
        "forced deletion not exercised"
    );
    cloud.arm_requests()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_covered_by_the_role_and_the_role_by_a_request() {
    let role = role_actions();
    let expected: BTreeSet<String> = all_actions().into_iter().map(str::to_string).collect();
    assert_eq!(
        role, expected,
        "docs/azure-role.json differs from the provider's action table"
    );
    let mut used = BTreeSet::new();
    for mode in [Mode::Uniform, Mode::Flexible] {
        for request in every_request(mode).await {
            let action = rbac_action(&request.method, &request.path).unwrap_or_else(|| {
                panic!(
                    "{mode:?}: {} {} maps to no RBAC action",
                    request.method, request.path
                )
            });
            assert!(
                role.contains(action),
                "{action} missing from docs/azure-role.json"
            );
            used.insert(action.to_string());
        }
    }
    assert_eq!(used, role, "the role grants actions no request needed");
}
