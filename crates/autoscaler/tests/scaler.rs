//! The scaling loop against an in-memory provider: what it asks of a provider and when.
//! (The real local provider is exercised end to end in the `podfleet` crate's tests.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use podfleet_autoscaler::planner::{Limits, Policy};
use podfleet_autoscaler::{Autoscaler, ReadinessCheck, ScalerSettings};
use podfleet_provider::{
    ConnectInfo, InstanceId, InstanceState, Provider, ProviderError, ProviderInfo, ProviderInstance,
};

/// A scale set in memory: instances become Running on the next list after creation and
/// vanish on the next list after deletion, like a cloud's eventual consistency.
#[derive(Default)]
struct MemoryGroup {
    state: Mutex<GroupState>,
}

#[derive(Default)]
struct GroupState {
    instances: Vec<(InstanceId, InstanceState)>,
    next: usize,
    increase_calls: Vec<usize>,
    deleted: Vec<InstanceId>,
}

impl MemoryGroup {
    fn was_deleted(&self, id: &InstanceId) -> bool {
        self.state.lock().unwrap().deleted.contains(id)
    }
}

#[async_trait]
impl Provider for MemoryGroup {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "memory".into(),
            max_size: 100,
        }
    }
    async fn list(&self) -> Result<Vec<ProviderInstance>, ProviderError> {
        let mut state = self.state.lock().unwrap();
        let listed = state
            .instances
            .iter()
            .map(|(id, s)| ProviderInstance {
                id: id.clone(),
                state: s.clone(),
            })
            .collect();
        for (_, s) in &mut state.instances {
            if *s == InstanceState::Creating {
                *s = InstanceState::Running;
            }
        }
        state
            .instances
            .retain(|(_, s)| *s != InstanceState::Deleting);
        Ok(listed)
    }
    async fn increase(&self, count: usize) -> Result<usize, ProviderError> {
        let mut state = self.state.lock().unwrap();
        state.increase_calls.push(count);
        for _ in 0..count {
            state.next += 1;
            let id = InstanceId(format!("vm-{}", state.next));
            state.instances.push((id, InstanceState::Creating));
        }
        Ok(count)
    }
    async fn decrease(&self, ids: &[InstanceId]) -> Result<Vec<InstanceId>, ProviderError> {
        let mut state = self.state.lock().unwrap();
        for (id, s) in &mut state.instances {
            if ids.contains(id) {
                *s = InstanceState::Deleting;
            }
        }
        state.deleted.extend(ids.iter().cloned());
        Ok(ids.to_vec())
    }
    async fn connect_info(&self, id: &InstanceId) -> Result<ConnectInfo, ProviderError> {
        Ok(ConnectInfo {
            internal_addr: format!("{id}:22"),
            ..Default::default()
        })
    }
}

struct AlwaysReady;

#[async_trait]
impl ReadinessCheck for AlwaysReady {
    async fn check(&self, _: &InstanceId, _: &ConnectInfo) -> Result<(), String> {
        Ok(())
    }
}

fn settings(max_use_count: u32, max_instances: usize) -> ScalerSettings {
    ScalerSettings {
        limits: Limits {
            capacity_per_instance: 1,
            max_use_count,
            max_instances,
            max_size: 100,
        },
        policy: Policy {
            idle_time: Duration::from_secs(3600),
            ..Default::default()
        },
        update_interval: Duration::from_millis(50),
        update_interval_when_expecting: Duration::from_millis(10),
        creation_timeout: Duration::from_secs(60),
        delete_instances_on_shutdown: true,
        shutdown_deletion_interval: Duration::from_millis(50),
        shutdown_deletion_retries: 3,
        deletion_retry_interval: Duration::from_millis(200),
    }
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_burst_of_jobs_creates_its_instances_in_one_request() {
    let group = Arc::new(MemoryGroup::default());
    let scaler = Autoscaler::start(group.clone(), Arc::new(AlwaysReady), settings(1, 10));
    let acquisitions = futures_join(&scaler, 4).await;
    let distinct: std::collections::HashSet<_> =
        acquisitions.iter().map(|a| a.instance.clone()).collect();
    assert_eq!(distinct.len(), 4, "max_use_count = 1: one instance per job");
    let calls = group.state.lock().unwrap().increase_calls.clone();
    assert_eq!(calls.iter().sum::<usize>(), 4, "{calls:?}");
    assert!(
        calls.len() <= 2,
        "instances asked for one at a time: {calls:?}"
    );
    for acquisition in &acquisitions {
        scaler.release(acquisition, true);
    }
    // Used-up instances are retired and deleted once their job is done.
    eventually("retired instances deleted", || {
        group.state.lock().unwrap().deleted.len() == 4
    })
    .await;
    scaler.shutdown().await;
}

async fn futures_join(scaler: &Autoscaler, n: usize) -> Vec<podfleet_autoscaler::Acquisition> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let scaler = scaler.clone();
            tokio::spawn(async move { scaler.acquire(Duration::from_secs(10)).await })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap().unwrap());
    }
    out
}

#[tokio::test]
async fn an_unhealthy_instance_is_replaced_and_never_handed_out_again() {
    let group = Arc::new(MemoryGroup::default());
    let scaler = Autoscaler::start(group.clone(), Arc::new(AlwaysReady), settings(0, 1));
    let first = scaler.acquire(Duration::from_secs(10)).await.unwrap();
    scaler.release(&first, false);
    let second = scaler.acquire(Duration::from_secs(10)).await.unwrap();
    assert_ne!(
        first.instance, second.instance,
        "a failed instance was handed out again"
    );
    eventually("failed instance deleted", || {
        group.was_deleted(&first.instance)
    })
    .await;
    scaler.release(&second, true);
    scaler.shutdown().await;
    assert!(
        group.state.lock().unwrap().instances.is_empty(),
        "shutdown left instances"
    );
}

#[tokio::test]
async fn instances_found_at_start_are_deleted_and_max_instances_holds() {
    let group = Arc::new(MemoryGroup::default());
    group.increase(2).await.unwrap();
    group.list().await.unwrap(); // now Running: left over by an earlier manager
    let scaler = Autoscaler::start(group.clone(), Arc::new(AlwaysReady), settings(0, 1));
    let acquisition = scaler.acquire(Duration::from_secs(10)).await.unwrap();
    assert!(!["vm-1", "vm-2"].contains(&acquisition.instance.0.as_str()));
    eventually("leftovers deleted", || {
        group.state.lock().unwrap().deleted.len() >= 2
    })
    .await;
    // max_instances = 1 and the only slot is taken: a second job must wait.
    assert!(scaler.acquire(Duration::from_millis(300)).await.is_err());
    scaler.release(&acquisition, true);
    scaler.shutdown().await;
}

#[tokio::test]
async fn a_job_canceled_while_waiting_holds_no_capacity() {
    let group = Arc::new(MemoryGroup::default());
    let mut idle_at_once = settings(0, 1);
    idle_at_once.policy.idle_time = Duration::ZERO;
    let scaler = Autoscaler::start(group.clone(), Arc::new(AlwaysReady), idle_at_once);
    let first = scaler.acquire(Duration::from_secs(10)).await.unwrap();
    // A second job waits for the only instance, then is canceled (its future dropped).
    let waiting = {
        let scaler = scaler.clone();
        tokio::spawn(async move { scaler.acquire(Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    waiting.abort();
    let _ = waiting.await;
    scaler.release(&first, true);
    // Nobody waits any more and idle_time is zero: the idle instance goes.
    eventually("idle instance deleted", || {
        group.was_deleted(&first.instance)
    })
    .await;
    assert!(scaler.has_room());
    scaler.shutdown().await;
}

#[tokio::test]
async fn reservations_cap_the_jobs_taken_at_the_group_size() {
    let group = Arc::new(MemoryGroup::default());
    let scaler = Autoscaler::start(group.clone(), Arc::new(AlwaysReady), settings(0, 2));
    let first = scaler.try_reserve().expect("room for a first job");
    let second = scaler.try_reserve().expect("room for a second job");
    assert!(
        scaler.try_reserve().is_none(),
        "a third job taken with max_instances = 2"
    );
    // No job came for the second reservation: its room is given back.
    drop(second);
    let again = scaler.try_reserve().expect("room given back");
    // Reservations alone create no instances (only waiting jobs and idle_count do).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(group.state.lock().unwrap().increase_calls.is_empty());
    drop((first, again));
    scaler.shutdown().await;
}
