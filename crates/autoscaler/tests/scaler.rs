//! The scaling loop against an in-memory provider, on tokio's paused (virtual) clock: what it
//! asks of a provider and when, every state's deadline, the breaker, provider faults, and
//! the start-up reconciliation with the ledger. No test sleeps in real time.
//! (The real local provider is exercised end to end in the `podfleet` crate's tests.)

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use podfleet_autoscaler::ledger::{InstanceRecord, Ledger, RecordState};
use podfleet_autoscaler::planner::{Limits, Policy};
use podfleet_autoscaler::schedule::ScheduledPolicy;
use podfleet_autoscaler::{
    Announcement, Autoscaler, ReadinessCheck, RecoveredJob, ScalerEvent, ScalerSettings,
};
use podfleet_provider::{
    ConnectInfo, InstanceId, InstanceImage, InstanceState, Provider, ProviderError, ProviderInfo,
    ProviderInstance,
};
use tokio::time::Instant;

/// A scale set in memory: instances become Running (or Failed) on the next list after
/// creation and vanish on the next list after deletion, like a cloud's eventual
/// consistency. Faults can be switched on.
#[derive(Default)]
struct MemoryGroup {
    state: Mutex<GroupState>,
}

#[derive(Default)]
struct GroupState {
    instances: Vec<(InstanceId, InstanceState)>,
    next: usize,
    increase_calls: Vec<usize>,
    list_calls: usize,
    deleted: Vec<InstanceId>,
    /// Every listing fails (a 500 or a timeout of the platform's API).
    failing_list: bool,
    /// Creation requests are refused (a 429).
    refusing_increase: bool,
    /// New instances fail to provision.
    provisioning_fails: bool,
    /// Deletion requests are accepted but not carried out.
    ignoring_deletes: bool,
    /// New instances stay in Creating forever.
    never_running: bool,
    /// Instances the platform reports as running an outdated image.
    outdated: Vec<InstanceId>,
}

impl MemoryGroup {
    fn with(f: impl FnOnce(&mut GroupState)) -> Arc<Self> {
        let group = Arc::new(Self::default());
        f(&mut group.state.lock().unwrap());
        group
    }
    fn was_deleted(&self, id: &InstanceId) -> bool {
        self.state.lock().unwrap().deleted.contains(id)
    }
    fn set(&self, f: impl FnOnce(&mut GroupState)) {
        f(&mut self.state.lock().unwrap());
    }
    fn get<R>(&self, f: impl FnOnce(&GroupState) -> R) -> R {
        f(&self.state.lock().unwrap())
    }
    fn add(&self, id: &str, state: InstanceState) {
        self.set(|s| s.instances.push((InstanceId(id.into()), state)));
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
        state.list_calls += 1;
        if state.failing_list {
            return Err(ProviderError::Platform(
                "GET scale set: 500 Internal Server Error".into(),
            ));
        }
        let listed = state
            .instances
            .iter()
            .map(|(id, s)| ProviderInstance {
                id: id.clone(),
                state: s.clone(),
            })
            .collect();
        let (fails, stuck) = (state.provisioning_fails, state.never_running);
        for (_, s) in &mut state.instances {
            if *s == InstanceState::Creating && !stuck {
                *s = if fails {
                    InstanceState::Failed {
                        reason: "provisioning failed".into(),
                    }
                } else {
                    InstanceState::Running
                };
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
        if state.refusing_increase {
            return Err(ProviderError::Platform(
                "PATCH scale set: 429 Too Many Requests".into(),
            ));
        }
        for _ in 0..count {
            state.next += 1;
            let id = InstanceId(format!("vm-{}", state.next));
            state.instances.push((id, InstanceState::Creating));
        }
        Ok(count)
    }
    /// Instances in `outdated` run an old image.
    async fn instance_images(&self) -> Result<Vec<InstanceImage>, ProviderError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .instances
            .iter()
            .map(|(id, _)| {
                let old = state.outdated.contains(id);
                InstanceImage {
                    id: id.clone(),
                    image: "gallery/podfleet".into(),
                    version: Some(if old { "1.0.0" } else { "2.0.0" }.into()),
                    latest_model_applied: Some(!old),
                    target_version: Some("2.0.0".into()),
                    up_to_date: Some(!old),
                }
            })
            .collect())
    }
    async fn decrease(&self, ids: &[InstanceId]) -> Result<Vec<InstanceId>, ProviderError> {
        let mut state = self.state.lock().unwrap();
        if !state.ignoring_deletes {
            for (id, s) in &mut state.instances {
                if ids.contains(id) {
                    *s = InstanceState::Deleting;
                }
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

/// Readiness that fails for the instances named in `broken`.
#[derive(Default)]
struct Readiness {
    broken: Mutex<HashSet<String>>,
    checked: Mutex<Vec<InstanceId>>,
}

impl Readiness {
    fn broken(ids: &[&str]) -> Arc<Self> {
        let readiness = Self::default();
        readiness
            .broken
            .lock()
            .unwrap()
            .extend(ids.iter().map(|s| s.to_string()));
        Arc::new(readiness)
    }
}

#[async_trait]
impl ReadinessCheck for Readiness {
    async fn check(&self, id: &InstanceId, _: &ConnectInfo) -> Result<(), String> {
        self.checked.lock().unwrap().push(id.clone());
        if self.broken.lock().unwrap().contains(&id.0) {
            Err("instance_ready_command exited 1".into())
        } else {
            Ok(())
        }
    }
}

fn always_ready() -> Arc<Readiness> {
    Arc::new(Readiness::default())
}

fn settings(max_use_count: u32, max_instances: usize) -> ScalerSettings {
    ScalerSettings {
        runner: "test".into(),
        limits: Limits {
            capacity_per_instance: 1,
            max_use_count,
            max_instances,
            max_size: 100,
        },
        schedules: vec![ScheduledPolicy::always(Policy {
            idle_time: Duration::from_secs(3600),
            ..Default::default()
        })],
        update_interval: Duration::from_secs(5),
        update_interval_when_expecting: Duration::from_secs(1),
        creation_timeout: Duration::from_secs(60),
        ready_timeout: Duration::from_secs(60),
        failure_threshold: 3,
        delete_instances_on_shutdown: true,
        shutdown_deletion_interval: Duration::from_secs(1),
        shutdown_deletion_retries: 3,
        deletion_retry_interval: Duration::from_secs(10),
        predictive: false,
        ledger_path: None,
    }
}

/// Waits on the virtual clock (at most ten virtual minutes) for `condition`.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn acquire_all(scaler: &Autoscaler, n: usize) -> Vec<podfleet_autoscaler::Acquisition> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let scaler = scaler.clone();
            tokio::spawn(async move { scaler.acquire(Duration::from_secs(120)).await })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap().unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_jobs_creates_its_instances_in_one_request() {
    let group = Arc::new(MemoryGroup::default());
    let scaler = Autoscaler::start(group.clone(), always_ready(), settings(1, 10));
    let acquisitions = acquire_all(&scaler, 4).await;
    let distinct: HashSet<_> = acquisitions.iter().map(|a| a.instance.clone()).collect();
    assert_eq!(distinct.len(), 4, "max_use_count = 1: one instance per job");
    let calls = group.get(|s| s.increase_calls.clone());
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
        group.get(|s| s.deleted.len()) == 4
    })
    .await;
    let mut metrics = String::new();
    scaler.write_prometheus(&mut metrics);
    assert!(
        metrics.contains("podfleet_autoscaler_acquisitions_total{runner=\"test\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("podfleet_autoscaler_queue_wait_seconds_count{runner=\"test\"} 4"),
        "{metrics}"
    );
    scaler.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_unhealthy_instance_is_replaced_and_never_handed_out_again() {
    let group = Arc::new(MemoryGroup::default());
    let scaler = Autoscaler::start(group.clone(), always_ready(), settings(0, 1));
    let first = scaler.acquire(Duration::from_secs(60)).await.unwrap();
    scaler.release(&first, false);
    let second = scaler.acquire(Duration::from_secs(60)).await.unwrap();
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
        group.get(|s| s.instances.is_empty()),
        "shutdown left instances"
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_ledger_instances_found_at_start_are_deleted_and_max_instances_holds() {
    let group = Arc::new(MemoryGroup::default());
    group.add("vm-old-1", InstanceState::Running);
    group.add("vm-old-2", InstanceState::Running);
    let scaler = Autoscaler::start(group.clone(), always_ready(), settings(0, 1));
    let acquisition = scaler.acquire(Duration::from_secs(60)).await.unwrap();
    assert!(!acquisition.instance.0.starts_with("vm-old"));
    eventually("leftovers deleted", || group.get(|s| s.deleted.len()) >= 2).await;
    // max_instances = 1 and the only slot is taken: a second job must wait.
    assert!(scaler.acquire(Duration::from_secs(30)).await.is_err());
    scaler.release(&acquisition, true);
    scaler.shutdown().await;
}

/// Issue 4, "start-up with leftover instances": the healthy are adopted with their use
/// counts, the broken, failed, used-up and unknown ones deleted.
#[tokio::test(start_paused = true)]
async fn leftover_instances_healthy_adopted_rest_deleted() {
    let ledger = Ledger::in_memory().unwrap();
    let record = |state, use_count, jobs: Vec<u64>| InstanceRecord {
        state,
        use_count,
        jobs,
        first_seen_unix: 1_700_000_000,
    };
    let id = |s: &str| InstanceId(s.into());
    ledger
        .put(&id("healthy-1"), &record(RecordState::Ready, 1, vec![]))
        .unwrap();
    ledger
        .put(
            &id("healthy-busy"),
            &record(RecordState::Ready, 2, vec![77]),
        )
        .unwrap();
    ledger
        .put(&id("broken"), &record(RecordState::Ready, 1, vec![]))
        .unwrap();
    ledger
        .put(&id("failed"), &record(RecordState::Ready, 0, vec![]))
        .unwrap();
    ledger
        .put(
            &id("was-deleting"),
            &record(RecordState::Deleting, 1, vec![]),
        )
        .unwrap();
    ledger
        .put(&id("used-up"), &record(RecordState::Retiring, 5, vec![]))
        .unwrap();
    ledger
        .put(&id("vanished"), &record(RecordState::Ready, 1, vec![]))
        .unwrap();
    let group = Arc::new(MemoryGroup::default());
    for name in [
        "healthy-1",
        "healthy-busy",
        "broken",
        "was-deleting",
        "used-up",
        "unknown",
    ] {
        group.add(name, InstanceState::Running);
    }
    group.add(
        "failed",
        InstanceState::Failed {
            reason: "VM agent unreachable".into(),
        },
    );
    let readiness = Readiness::broken(&["broken"]);
    let mut events_settings = settings(5, 10);
    events_settings.delete_instances_on_shutdown = false;
    let scaler = Autoscaler::start_with_ledger(
        group.clone(),
        readiness.clone(),
        events_settings,
        Some(ledger),
    );
    eventually("the rest deleted", || {
        ["broken", "failed", "was-deleting", "used-up", "unknown"]
            .iter()
            .all(|name| group.was_deleted(&id(name)))
    })
    .await;
    assert!(!group.was_deleted(&id("healthy-1")));
    assert!(!group.was_deleted(&id("healthy-busy")));
    // Only instances on record as usable were checked; the unknown one never was.
    let checked = readiness.checked.lock().unwrap().clone();
    assert!(checked.contains(&id("healthy-1")) && checked.contains(&id("broken")));
    assert!(!checked.contains(&id("unknown")));
    // The recovered job keeps its slot until the manager re-attaches or abandons it.
    assert_eq!(
        scaler.recovered_jobs(),
        [RecoveredJob {
            job: 77,
            instance: id("healthy-busy")
        }]
    );
    eventually("recovered job re-attachable", || {
        scaler.reattach(77).is_some()
    })
    .await;
    // A new job gets the adopted idle instance, which keeps counting its uses.
    let acquisition = scaler.acquire(Duration::from_secs(60)).await.unwrap();
    assert_eq!(acquisition.instance, id("healthy-1"));
    assert_eq!(acquisition.use_number, 2);
    assert_eq!(group.get(|s| s.increase_calls.len()), 0, "nothing created");
    scaler.release(&acquisition, true);
    scaler.abandon(77);
    scaler.shutdown().await;
    // delete_instances_on_shutdown = false: the healthy stay for the next start.
    assert!(group.get(|s| s.instances.len()) == 2);
}

#[tokio::test(start_paused = true)]
async fn a_ledger_file_carries_instances_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut with_file = settings(0, 2);
    with_file.ledger_path = Some(dir.path().join("ledger.redb"));
    with_file.delete_instances_on_shutdown = false;
    let group = Arc::new(MemoryGroup::default());
    let first = Autoscaler::start(group.clone(), always_ready(), with_file.clone());
    let acquisition = first.acquire(Duration::from_secs(60)).await.unwrap();
    first.release(&acquisition, true);
    first.shutdown().await;
    drop(first);
    // The ledger file is released when the first scaler is gone.
    let second = Autoscaler::start(group.clone(), always_ready(), with_file);
    let again = second.acquire(Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        again.instance, acquisition.instance,
        "adopted, not replaced"
    );
    assert_eq!(again.use_number, 2);
    assert!(group.get(|s| s.deleted.is_empty()));
    second.release(&again, true);
    second.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_job_canceled_while_waiting_holds_no_capacity() {
    let group = Arc::new(MemoryGroup::default());
    let mut idle_at_once = settings(0, 1);
    idle_at_once.schedules[0].policy.idle_time = Duration::ZERO;
    let scaler = Autoscaler::start(group.clone(), always_ready(), idle_at_once);
    let first = scaler.acquire(Duration::from_secs(60)).await.unwrap();
    // A second job waits for the only instance, then is canceled (its future dropped).
    let waiting = {
        let scaler = scaler.clone();
        tokio::spawn(async move { scaler.acquire(Duration::from_secs(600)).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
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

#[tokio::test(start_paused = true)]
async fn reservations_cap_the_jobs_taken_at_the_group_size() {
    let group = Arc::new(MemoryGroup::default());
    let scaler = Autoscaler::start(group.clone(), always_ready(), settings(0, 2));
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
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(group.get(|s| s.increase_calls.is_empty()));
    drop((first, again));
    scaler.shutdown().await;
}

/// A local pipeline announces how many of its jobs will start soon: instances for them are
/// created ahead of the jobs, in one request and within max_instances; once they run and
/// nothing more is announced, nothing more is created.
#[tokio::test(start_paused = true)]
async fn announced_jobs_get_their_instances_ahead_within_the_limits() {
    let group = Arc::new(MemoryGroup::default());
    let scaler = Autoscaler::start(group.clone(), always_ready(), settings(0, 3));
    scaler.announce(announce(5, 0));
    eventually("instances for the announced jobs", || {
        group.get(|s| s.increase_calls.iter().sum::<usize>()) == 3
    })
    .await;
    assert_eq!(
        group.get(|s| s.increase_calls.clone()),
        [3],
        "asked for at once, capped at max_instances = 3"
    );
    let first = scaler.acquire(Duration::from_secs(60)).await.unwrap();
    let second = scaler.acquire(Duration::from_secs(60)).await.unwrap();
    // Two jobs run and nothing more is coming: no idle capacity is wanted any more.
    scaler.announce(announce(0, 2));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(group.get(|s| s.increase_calls.iter().sum::<usize>()), 3);
    scaler.release(&first, true);
    scaler.release(&second, true);
    scaler.shutdown().await;
}

/// The announced job takes the instance made for it before the pipeline says it started:
/// that job used up its announcement, so no instance is made for it a second time.
#[tokio::test(start_paused = true)]
async fn a_job_taking_a_slot_uses_up_its_announcement() {
    let group = Arc::new(MemoryGroup::default());
    let scaler = Autoscaler::start(group.clone(), always_ready(), settings(0, 3));
    scaler.announce(announce(1, 0));
    eventually("an instance for the announced job", || scaler.has_room()).await;
    let job = scaler.acquire(Duration::from_secs(60)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        group.get(|s| s.increase_calls.clone()),
        [1],
        "one instance for one announced job"
    );
    // The same count again, made before the job started (the pipeline's view and the
    // job's start race): still nothing more.
    scaler.announce(announce(1, 0));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        group.get(|s| s.increase_calls.clone()),
        [1],
        "an announcement the started job overtook keeps nothing for it"
    );
    // A job announced after that start is a new one: its instance is made ahead of it.
    scaler.announce(announce(1, 1));
    eventually("an instance for the next announced job", || {
        group.get(|s| s.increase_calls.iter().sum::<usize>()) == 2
    })
    .await;
    scaler.release(&job, true);
    scaler.shutdown().await;
}

fn announce(jobs: usize, started: u64) -> Announcement {
    Announcement { jobs, started }
}

#[tokio::test(start_paused = true)]
async fn preemptive_mode_takes_jobs_only_with_a_ready_idle_slot() {
    let group = Arc::new(MemoryGroup::default());
    let mut preemptive = settings(0, 5);
    preemptive.schedules[0].policy.preemptive = true;
    let scaler = Autoscaler::start(group.clone(), always_ready(), preemptive.clone());
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(scaler.try_reserve().is_none(), "no ready instance yet");
    // A reload asks for one idle slot: once it is ready, exactly one job may be taken.
    preemptive.schedules[0].policy.idle_count = 1;
    scaler.update_settings(preemptive);
    eventually("an idle ready slot", || scaler.has_room()).await;
    let reservation = scaler.try_reserve().expect("one ready idle slot");
    assert!(scaler.try_reserve().is_none(), "only one slot is ready");
    drop(reservation);
    scaler.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_never_runs_fails_at_the_creation_timeout_and_is_deleted() {
    let group = MemoryGroup::with(|s| s.never_running = true);
    let scaler = Autoscaler::start(group.clone(), always_ready(), settings(0, 1));
    let started = Instant::now();
    let waiting = {
        let scaler = scaler.clone();
        tokio::spawn(async move { scaler.acquire(Duration::from_secs(3600)).await })
    };
    eventually("stuck instance deleted", || {
        group.was_deleted(&InstanceId("vm-1".into()))
    })
    .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(60) && elapsed < Duration::from_secs(70),
        "deleted after {elapsed:?}, creation_timeout is 60 s"
    );
    // Its replacement comes up once the platform recovers.
    group.set(|s| s.never_running = false);
    let acquisition = waiting.await.unwrap().unwrap();
    assert_ne!(acquisition.instance.0, "vm-1");
    scaler.release(&acquisition, true);
    scaler.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn creations_that_keep_failing_trip_the_breaker_instead_of_looping() {
    let group = MemoryGroup::with(|s| s.provisioning_fails = true);
    let mut idle_two = settings(0, 10);
    idle_two.schedules[0].policy.idle_count = 2;
    let scaler = Autoscaler::start(group.clone(), always_ready(), idle_two);
    // One virtual hour of a broken image.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let created = group.get(|s| s.increase_calls.iter().sum::<usize>());
    // Without the breaker: two instances a second. With it: the threshold, then single
    // trial instances at pauses that double up to ten minutes.
    assert!(created <= 20, "{created} instances created in an hour");
    assert!(created >= 4, "creation must be retried, {created}");
    let mut metrics = String::new();
    scaler.write_prometheus(&mut metrics);
    assert!(
        !metrics.contains("podfleet_autoscaler_creation_breaker_trips_total{runner=\"test\"} 0"),
        "{metrics}"
    );
    // Failed instances were deleted, none left counting as capacity.
    eventually("failed instances deleted", || {
        group.get(|s| {
            s.instances
                .iter()
                .all(|(_, st)| *st == InstanceState::Creating)
        })
    })
    .await;
    // The platform recovers: the breaker closes after one good instance.
    group.set(|s| s.provisioning_fails = false);
    eventually("idle capacity back", || {
        scaler.has_room()
            && group.get(|s| {
                s.instances
                    .iter()
                    .filter(|(_, st)| *st == InstanceState::Running)
                    .count()
                    == 2
            })
    })
    .await;
    scaler.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_provider_is_asked_less_often_and_nothing_crashes() {
    let group = MemoryGroup::with(|s| s.failing_list = true);
    let scaler = Autoscaler::start(group.clone(), always_ready(), settings(0, 2));
    tokio::time::sleep(Duration::from_secs(1800)).await;
    // At the 5 s interval that would be 360 calls; backoff doubles up to 5 minutes.
    let calls = group.get(|s| s.list_calls);
    assert!(calls < 25, "{calls} listings in half an hour of errors");
    // 429 on creation: a job still waits, and gets its instance once the provider recovers.
    group.set(|s| {
        s.failing_list = false;
        s.refusing_increase = true;
    });
    let waiting = {
        let scaler = scaler.clone();
        tokio::spawn(async move { scaler.acquire(Duration::from_secs(7200)).await })
    };
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(!waiting.is_finished());
    group.set(|s| s.refusing_increase = false);
    let acquisition = waiting.await.unwrap().unwrap();
    scaler.release(&acquisition, true);
    scaler.shutdown().await;
    assert!(group.get(|s| s.instances.is_empty()), "an instance leaked");
}

#[tokio::test(start_paused = true)]
async fn deletions_the_provider_ignores_are_retried_with_backoff() {
    let group = Arc::new(MemoryGroup::default());
    let mut quick_idle = settings(0, 1);
    quick_idle.schedules[0].policy.idle_time = Duration::ZERO;
    quick_idle.delete_instances_on_shutdown = false;
    let scaler = Autoscaler::start(group.clone(), always_ready(), quick_idle);
    let acquisition = scaler.acquire(Duration::from_secs(60)).await.unwrap();
    group.set(|s| s.ignoring_deletes = true);
    scaler.release(&acquisition, true);
    tokio::time::sleep(Duration::from_secs(600)).await;
    let asked = group.get(|s| s.deleted.len());
    // Asked at 0, 10, 30, 70, 150, 310 s (doubling from deletion_retry_interval = 10 s).
    assert!(
        (4..=8).contains(&asked),
        "deletion asked {asked} times in 10 minutes"
    );
    group.set(|s| s.ignoring_deletes = false);
    eventually("deleted at last", || group.get(|s| s.instances.is_empty())).await;
    scaler.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_reload_raises_and_lowers_idle_capacity_without_touching_busy_instances() {
    let group = Arc::new(MemoryGroup::default());
    let mut reloadable = settings(0, 10);
    reloadable.schedules[0].policy.idle_time = Duration::from_secs(60);
    let scaler = Autoscaler::start(group.clone(), always_ready(), reloadable.clone());
    let busy = scaler.acquire(Duration::from_secs(60)).await.unwrap();
    reloadable.schedules[0].policy.idle_count = 3;
    scaler.update_settings(reloadable.clone());
    let running = |group: &MemoryGroup| {
        group.get(|s| {
            s.instances
                .iter()
                .filter(|(_, st)| *st == InstanceState::Running)
                .count()
        })
    };
    eventually("three idle instances besides the busy one", || {
        running(&group) == 4
    })
    .await;
    reloadable.schedules[0].policy.idle_count = 0;
    scaler.update_settings(reloadable);
    eventually("idle instances removed after idle_time", || {
        running(&group) == 1
    })
    .await;
    assert!(!group.was_deleted(&busy.instance));
    scaler.release(&busy, true);
    scaler.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn outdated_instances_finish_their_job_then_are_replaced() {
    let group = Arc::new(MemoryGroup::default());
    let scaler = Autoscaler::start(group.clone(), always_ready(), settings(0, 2));
    let first = scaler.acquire(Duration::from_secs(60)).await.unwrap();
    let old = first.instance.clone();
    // The platform's model moves on: the busy instance now runs an outdated image.
    group.state.lock().unwrap().outdated.push(old.clone());
    let images = scaler.check_images(false).await.unwrap();
    assert!(
        images
            .iter()
            .any(|i| i.id == old && i.up_to_date == Some(false))
    );
    // With replacement on, it drains: its job goes on, it is not deleted under it...
    scaler.check_images(true).await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!group.was_deleted(&old), "deleted under a running job");
    let mut events = scaler.events();
    // ...no new job lands on it, even idle: the next job waits for a new instance...
    let second = scaler.acquire(Duration::from_secs(60)).await.unwrap();
    scaler.release(&first, true);
    let third = scaler.acquire(Duration::from_secs(600)).await.unwrap();
    assert_ne!(third.instance, old, "a job landed on an outdated instance");
    // ...and it was deleted once its job was done.
    eventually("outdated instance deleted", || group.was_deleted(&old)).await;
    let mut retired = false;
    while let Ok(event) = events.try_recv() {
        retired |= matches!(&event, ScalerEvent::Deleting { id, .. } if *id == old);
    }
    assert!(retired, "no deletion event for the outdated instance");
    scaler.release(&second, true);
    scaler.release(&third, true);
    scaler.shutdown().await;
}
