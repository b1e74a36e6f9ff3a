//! podfleet's real autoscaler drives the Azure provider against the stand-in: the report's
//! Appendix A runner (its `plugin_config` unchanged, plus the stand-in's endpoints) scales
//! from 0 to N instances and back to 0, with each instance's lifecycle checked.

mod standin;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use podfleet_autoscaler::{Autoscaler, ReadinessCheck, ScalerSettings};
use podfleet_provider::{ConnectInfo, InstanceId};
use podfleet_provider_azure::{AzureEnvironment, AzureProvider, AzureSettings, ConnectorDefaults};
use standin::{Cloud, Mode, VmState, eventually};

/// Ready when the stand-in runs the VM and the provider's address is the VM's.
struct StandinReady {
    cloud: Cloud,
}

#[async_trait]
impl ReadinessCheck for StandinReady {
    async fn check(&self, id: &InstanceId, info: &ConnectInfo) -> Result<(), String> {
        self.cloud.with(|s| {
            let vm = s.vms.get(&id.0).ok_or(format!("{id} does not exist"))?;
            if vm.state != VmState::Running {
                return Err(format!("{id} is {:?}", vm.state));
            }
            let network = match s.mode {
                Mode::Uniform => "10.0.0",
                Mode::Flexible => "10.1.0",
            };
            let expected = format!("{network}.{}:22", vm.index + 4);
            if info.internal_addr != expected {
                return Err(format!(
                    "{id}: address {} is not {expected}",
                    info.internal_addr
                ));
            }
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_appendix_a_runner_scales_a_uniform_set_from_zero_to_four_and_back() {
    zero_to_four_and_back(Mode::Uniform).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_appendix_a_runner_scales_a_flexible_set_from_zero_to_four_and_back() {
    zero_to_four_and_back(Mode::Flexible).await;
}

async fn zero_to_four_and_back(mode: Mode) {
    let cloud = Cloud::start(mode).await;
    // An instance left over by an earlier manager is removed at start.
    cloud.add_running(1);
    let leftover = cloud.with(|s| s.vms.keys().next().unwrap().clone());
    let text = std::fs::read_to_string(format!(
        "{}/tests/fixtures/seed-appendix-a.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let config = podfleet_config::parse(&text, "seed-appendix-a.toml")
        .unwrap()
        .config;
    let runner = &config.runners[0];
    let autoscaler = runner.autoscaler.as_ref().unwrap();
    assert_eq!(autoscaler.plugin, "fleeting-plugin-azure");
    let mut plugin_config = autoscaler.plugin_config.clone();
    for (key, value) in cloud.plugin_config() {
        // Only the endpoints are the stand-in's; the report's keys are kept as written.
        plugin_config.entry(key).or_insert(value);
    }
    let settings = AzureSettings::from_plugin_config(&plugin_config).unwrap();
    let connector = ConnectorDefaults {
        username: autoscaler.connector_config.username.clone(),
        use_external_addr: autoscaler.connector_config.use_external_addr,
        ..Default::default()
    };
    let provider = Arc::new(
        AzureProvider::new(
            settings,
            AzureEnvironment::default(),
            connector,
            standin::fast_timing(),
        )
        .await
        .unwrap(),
    );
    let state_dir = tempfile::tempdir().unwrap();
    let mut scaler_settings =
        ScalerSettings::from_config(&runner.name, autoscaler, 1000, state_dir.path());
    scaler_settings.update_interval = Duration::from_millis(20);
    scaler_settings.update_interval_when_expecting = Duration::from_millis(10);
    scaler_settings.deletion_retry_interval = Duration::from_millis(500);
    scaler_settings.shutdown_deletion_interval = Duration::from_millis(50);
    scaler_settings.ledger_path = None;
    assert_eq!(scaler_settings.limits.max_use_count, 2);
    let scaler = Autoscaler::start(
        provider.clone(),
        Arc::new(StandinReady {
            cloud: cloud.clone(),
        }),
        scaler_settings,
    );

    // Four jobs at once: four instances (capacity_per_instance = 1).
    let first_round = acquire(&scaler, 4).await;
    let instances: BTreeSet<InstanceId> = first_round.iter().map(|a| a.instance.clone()).collect();
    assert_eq!(instances.len(), 4);
    assert!(
        !instances.contains(&InstanceId(leftover.clone())),
        "the leftover was handed out"
    );
    eventually("leftover deleted", || {
        cloud.with(|s| !s.vms.contains_key(&leftover))
    })
    .await;
    assert_eq!(cloud.with(|s| s.capacity), 4);
    for acquisition in &first_round {
        scaler.release(acquisition, true);
    }
    // Used once of max_use_count = 2 and idle_time = 30 min: they stay.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(cloud.with(|s| s.live_vms()), 4);

    // Four more jobs reuse them; after their second job they are retired and deleted.
    let second_round = acquire(&scaler, 4).await;
    let reused: BTreeSet<InstanceId> = second_round.iter().map(|a| a.instance.clone()).collect();
    assert_eq!(reused, instances);
    assert!(second_round.iter().all(|a| a.use_number == 2));
    assert!(
        cloud.with(|s| s.deleted.iter().all(|id| *id == leftover)),
        "an instance was deleted while in use"
    );
    for acquisition in &second_round {
        scaler.release(acquisition, true);
    }
    eventually("group back to zero", || cloud.with(|s| s.vms.is_empty())).await;
    assert_eq!(cloud.with(|s| s.capacity), 0);

    // Each instance was seen creating, then running, and deleted exactly once.
    cloud.with(|s| {
        for id in &instances {
            assert_eq!(
                s.deleted.iter().filter(|d| *d == &id.0).count(),
                1,
                "{id} deleted twice"
            );
            let history = &s.history[&id.0];
            assert_eq!(history[0], "Creating", "{id}: {history:?}");
            let running = history
                .iter()
                .position(|h| h == "Running")
                .expect("never ran");
            assert!(
                history[running..]
                    .iter()
                    .all(|h| h == "Running" || h == "Deleting"),
                "{id}: {history:?}"
            );
        }
    });
    scaler.shutdown().await;
    provider_shutdown(&provider).await;
    assert!(
        provider.failed_operations().is_empty(),
        "{:?}",
        provider.failed_operations()
    );
    let capacity_writes = cloud
        .arm_requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert!(
        capacity_writes <= 4,
        "{capacity_writes} capacity writes for one burst"
    );
}

async fn provider_shutdown(provider: &AzureProvider) {
    use podfleet_provider::Provider;
    provider.shutdown().await;
}

async fn acquire(scaler: &Autoscaler, jobs: usize) -> Vec<podfleet_autoscaler::Acquisition> {
    let tasks: Vec<_> = (0..jobs)
        .map(|_| {
            let scaler = scaler.clone();
            tokio::spawn(async move { scaler.acquire(Duration::from_secs(20)).await })
        })
        .collect();
    let mut acquired = Vec::new();
    for task in tasks {
        acquired.push(task.await.unwrap().expect("a job got no instance"));
    }
    acquired
}
