//! The autoscaler: keeps a provider's group at the size the work needs. It tracks each
//! instance through its states (creating, ready-check, ready, busy, draining, deleting,
//! failed), each with a deadline; checks new instances before handing them out; gives jobs
//! slots (`capacity_per_instance`); retires used-up instances (`max_use_count`); removes idle
//! and failed ones with backoff; pauses creation when creations keep failing (a breaker);
//! records everything in a durable [`ledger`] so a restarted manager adopts what is healthy
//! and deletes what it cannot account for; and drains the group on shutdown. The decisions
//! come from the pure [`planner`]; this module only applies them.
//!
//! Time comes from `tokio::time`, so tests drive the loop on a paused (virtual) clock.

pub mod ledger;
pub mod metrics;
pub mod planner;
pub mod predict;
pub mod schedule;
pub mod settings;
pub mod sim;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use ledger::{InstanceRecord, Ledger, RecordState};
use metrics::Metrics;
use planner::{Action, InstanceView, Phase, Policy};
use podfleet_provider::{
    ConnectInfo, InstanceId, InstanceImage, InstanceState, Provider, ProviderError,
};
use predict::ArrivalModel;
use tokio::sync::{Notify, broadcast};

pub use settings::ScalerSettings;

/// Deletions the provider did not carry out are asked again, backing off up to this.
const MAX_DELETION_BACKOFF: Duration = Duration::from_secs(600);
/// The longest creation pause of an open breaker.
const MAX_BREAKER_PAUSE: Duration = Duration::from_secs(600);
/// The longest wait between loop runs while the provider keeps failing.
const MAX_PROVIDER_BACKOFF: Duration = Duration::from_secs(300);

/// Checks that a running instance can take jobs (SSH, `instance_ready_command`, engine).
#[async_trait]
pub trait ReadinessCheck: Send + Sync {
    async fn check(&self, id: &InstanceId, info: &ConnectInfo) -> Result<(), String>;
}

/// What happened to the group, for logs and the pipeline view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScalerEvent {
    Requested { count: usize },
    Ready { id: InstanceId, seconds: u64 },
    Retiring { id: InstanceId, use_count: u32 },
    Deleting { id: InstanceId, reason: String },
    Deleted { id: InstanceId },
    Failed { id: InstanceId, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("unable to acquire instance within the configured timeout of {0:?}")]
    Timeout(Duration),
    #[error("the autoscaler is shutting down")]
    ShuttingDown,
}

/// A job's slot on a ready instance; give it back with [`Autoscaler::release`].
#[derive(Clone, Debug)]
pub struct Acquisition {
    pub instance: InstanceId,
    pub connect_info: ConnectInfo,
    /// This job is the instance's n-th.
    pub use_number: u32,
    /// The job holding the slot, when the caller named it (recorded in the ledger).
    pub job: Option<u64>,
}

/// A job the ledger says held a slot when the previous manager stopped, on an instance
/// that was adopted again (see [`Autoscaler::recovered_jobs`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredJob {
    pub job: u64,
    pub instance: InstanceId,
}

struct Tracked {
    phase: Phase,
    in_use: usize,
    use_count: u32,
    idle_since: Instant,
    requested_at: Instant,
    /// When the current phase began: every phase's deadline counts from here.
    phase_since: Instant,
    connect_info: Option<ConnectInfo>,
    checking: bool,
    /// When deletion was last asked of the provider, and how often it was asked.
    deletion_asked: Option<Instant>,
    deletion_attempts: u32,
    /// Jobs holding a slot.
    jobs: Vec<u64>,
    first_seen_unix: i64,
}

impl Tracked {
    fn new(phase: Phase, now: Instant) -> Self {
        Self {
            phase,
            in_use: 0,
            use_count: 0,
            idle_since: now,
            requested_at: now,
            phase_since: now,
            connect_info: None,
            checking: false,
            deletion_asked: None,
            deletion_attempts: 0,
            jobs: Vec::new(),
            first_seen_unix: Utc::now().timestamp(),
        }
    }

    fn set_phase(&mut self, phase: Phase, now: Instant) {
        self.phase = phase;
        self.phase_since = now;
    }

    fn record(&self) -> InstanceRecord {
        InstanceRecord {
            state: match self.phase {
                Phase::Creating | Phase::Checking => RecordState::Creating,
                Phase::Ready => RecordState::Ready,
                Phase::Retiring => RecordState::Retiring,
                Phase::Deleting | Phase::Failed => RecordState::Deleting,
            },
            use_count: self.use_count,
            jobs: self.jobs.clone(),
            first_seen_unix: self.first_seen_unix,
        }
    }

    /// The state name used in metrics.
    fn state_name(&self) -> &'static str {
        match self.phase {
            Phase::Creating => "creating",
            Phase::Checking => "ready_check",
            Phase::Ready if self.in_use > 0 => "busy",
            Phase::Ready => "ready",
            Phase::Retiring => "draining",
            Phase::Deleting => "deleting",
            Phase::Failed => "failed",
        }
    }
}

/// What a caller that knows its upcoming work (a local pipeline) tells the autoscaler: see
/// [`Autoscaler::announce`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Announcement {
    /// Jobs to start soon, beyond those running.
    pub jobs: usize,
    /// How many jobs the announcer had seen start when it counted `jobs`.
    pub started: u64,
}

struct State {
    settings: ScalerSettings,
    instances: BTreeMap<InstanceId, Tracked>,
    /// When each creation the provider accepted but no listing has shown yet was asked for.
    unlisted_creations: Vec<Instant>,
    waiting: usize,
    /// The caller's last word on the jobs to start soon (see [`Autoscaler::announce`]).
    announced: Announcement,
    /// Jobs that took a slot since the start.
    started: u64,
    /// Jobs the manager may be about to receive or is preparing (see [`Reservation`]).
    reserved: usize,
    synced_once: bool,
    shutting_down: bool,
    /// Creations that failed in a row (provider refusals, provisioning failures, readiness
    /// failures of new instances). At `failure_threshold` the breaker opens.
    consecutive_failures: u32,
    breaker_open_until: Option<Instant>,
    /// Provider calls that failed in a row; the loop backs off on them.
    provider_failures: u32,
    arrivals: ArrivalModel,
    /// Mean time from request to ready, the lead time predictive capacity covers.
    boot_estimate: Duration,
    recovered: Vec<RecoveredJob>,
    metrics: Metrics,
}

impl State {
    /// The announced jobs not yet started: the announcement less the jobs that took a slot
    /// beyond those its announcer had counted.
    fn announced_jobs(&self) -> usize {
        let since = self.started.saturating_sub(self.announced.started);
        self.announced
            .jobs
            .saturating_sub(usize::try_from(since).unwrap_or(usize::MAX))
    }

    fn creation_failed(&mut self, now: Instant) {
        self.consecutive_failures += 1;
        let threshold = self.settings.failure_threshold.max(1);
        if self.consecutive_failures >= threshold {
            let over = (self.consecutive_failures - threshold).min(10);
            let pause = (Duration::from_secs(15) * (1 << over)).min(MAX_BREAKER_PAUSE);
            self.breaker_open_until = Some(now + pause);
            self.metrics.breaker_trips += 1;
            tracing::warn!(
                runner = %self.settings.runner,
                failures = self.consecutive_failures,
                pause_seconds = pause.as_secs(),
                "instance creation keeps failing: creation paused (check the provider, the image and instance_ready_command)"
            );
        }
    }

    fn creation_succeeded(&mut self) {
        self.consecutive_failures = 0;
        self.breaker_open_until = None;
    }

    /// The policy in force, with predictive warm capacity applied.
    fn policy_now(&self) -> Policy {
        let at = Utc::now();
        let mut policy = self.settings.policy_at(at);
        if self.settings.predictive {
            let lead = self.boot_estimate + self.settings.update_interval_when_expecting;
            predict::apply(&mut policy, &self.arrivals, at, lead);
        }
        policy
    }

    fn counts_by_state(&self) -> Vec<(&'static str, usize)> {
        let mut counts: Vec<(&'static str, usize)> = [
            "creating",
            "ready_check",
            "ready",
            "busy",
            "draining",
            "deleting",
            "failed",
        ]
        .into_iter()
        .map(|name| (name, 0))
        .collect();
        for tracked in self.instances.values() {
            let name = tracked.state_name();
            if let Some(entry) = counts.iter_mut().find(|(n, _)| *n == name) {
                entry.1 += 1;
            }
        }
        if let Some(entry) = counts.iter_mut().find(|(n, _)| *n == "creating") {
            entry.1 += self.unlisted_creations.len();
        }
        counts
    }
}

struct Inner {
    provider: Arc<dyn Provider>,
    readiness: Arc<dyn ReadinessCheck>,
    ledger: Option<Ledger>,
    state: Mutex<State>,
    wake: Notify,
    changed: Notify,
    events: broadcast::Sender<ScalerEvent>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, id: &InstanceId, tracked: &Tracked) {
        if let Some(ledger) = &self.ledger
            && let Err(e) = ledger.put(id, &tracked.record())
        {
            tracing::error!(error = %e, instance = %id, "recording an instance failed");
        }
    }

    fn forget(&self, id: &InstanceId) {
        if let Some(ledger) = &self.ledger
            && let Err(e) = ledger.remove(id)
        {
            tracing::error!(error = %e, instance = %id, "removing an instance from the ledger failed");
        }
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[derive(Clone)]
pub struct Autoscaler {
    inner: Arc<Inner>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Autoscaler {
    /// Starts the scaling loop with the ledger at `settings.ledger_path`. Without one (or
    /// when it cannot be opened, which is logged as an error), instances the group already
    /// holds have no record of their use and are removed for safety, as the incumbent does.
    pub fn start(
        provider: Arc<dyn Provider>,
        readiness: Arc<dyn ReadinessCheck>,
        settings: ScalerSettings,
    ) -> Self {
        let ledger = settings
            .ledger_path
            .as_deref()
            .and_then(|path| match Ledger::open(path) {
                Ok(ledger) => Some(ledger),
                Err(e) => {
                    tracing::error!(runner = %settings.runner, error = %e, "running without a ledger: instances found at start will be deleted");
                    None
                }
            });
        Self::start_with_ledger(provider, readiness, settings, ledger)
    }

    /// Starts the scaling loop with a durable ledger. The first pass reconciles the ledger
    /// with the provider's listing: instances on record and running are checked again and
    /// adopted with their use counts; failed ones, ones on record as deleting, and ones
    /// the ledger does not know are deleted; records of instances gone are dropped.
    pub fn start_with_ledger(
        provider: Arc<dyn Provider>,
        readiness: Arc<dyn ReadinessCheck>,
        settings: ScalerSettings,
        ledger: Option<Ledger>,
    ) -> Self {
        let (events, _) = broadcast::channel(256);
        let arrivals = match &ledger {
            Some(ledger) => match ledger.arrivals() {
                Ok(history) => ArrivalModel::from_history(&history, Utc::now()),
                Err(e) => {
                    tracing::error!(error = %e, "reading arrival history failed; starting without it");
                    ArrivalModel::default()
                }
            },
            None => ArrivalModel::default(),
        };
        let boot_estimate = settings.update_interval_when_expecting * 30;
        let inner = Arc::new(Inner {
            provider,
            readiness,
            ledger,
            state: Mutex::new(State {
                settings,
                instances: BTreeMap::new(),
                unlisted_creations: Vec::new(),
                waiting: 0,
                announced: Announcement::default(),
                started: 0,
                reserved: 0,
                synced_once: false,
                shutting_down: false,
                consecutive_failures: 0,
                breaker_open_until: None,
                provider_failures: 0,
                arrivals,
                boot_estimate,
                recovered: Vec::new(),
                metrics: Metrics::default(),
            }),
            wake: Notify::new(),
            changed: Notify::new(),
            events,
        });
        let task = tokio::spawn(run_loop(inner.clone()));
        Self {
            inner,
            task: Arc::new(Mutex::new(Some(task))),
        }
    }

    pub fn events(&self) -> broadcast::Receiver<ScalerEvent> {
        self.inner.events.subscribe()
    }

    /// Replaces policies and limits at run time (a reload). Instances keep their state; a
    /// lower `max_instances` or `idle_count` takes effect through normal scale-down, never
    /// by deleting busy instances.
    pub fn update_settings(&self, settings: ScalerSettings) {
        self.inner.lock().settings = settings;
        self.inner.wake.notify_one();
        self.inner.changed.notify_waiters();
    }

    pub fn settings(&self) -> ScalerSettings {
        self.inner.lock().settings.clone()
    }

    /// The group's ledger, when it has one: the manager keeps its resumable jobs there.
    pub fn ledger(&self) -> Option<&Ledger> {
        self.inner.ledger.as_ref()
    }

    /// Whether the first listing has been reconciled with the ledger, so that
    /// [`Autoscaler::recovered_jobs`] is complete.
    pub fn synced(&self) -> bool {
        self.inner.lock().synced_once
    }

    /// Jobs that held a slot on an adopted instance when the previous manager stopped.
    /// Their slots are held until [`Autoscaler::reattach`] or [`Autoscaler::abandon`].
    pub fn recovered_jobs(&self) -> Vec<RecoveredJob> {
        self.inner.lock().recovered.clone()
    }

    /// Takes over the slot a recovered job holds, once its instance has been checked
    /// again; `None` while the check runs or if the instance did not survive.
    pub fn reattach(&self, job: u64) -> Option<Acquisition> {
        let state = self.inner.lock();
        let recovered = state.recovered.iter().find(|r| r.job == job)?;
        let tracked = state.instances.get(&recovered.instance)?;
        if !matches!(tracked.phase, Phase::Ready | Phase::Retiring) {
            return None;
        }
        Some(Acquisition {
            instance: recovered.instance.clone(),
            connect_info: tracked.connect_info.clone()?,
            use_number: tracked.use_count,
            job: Some(job),
        })
    }

    /// Gives up a recovered job's slot (the job could not be resumed).
    pub fn abandon(&self, job: u64) {
        let mut state = self.inner.lock();
        let Some(index) = state.recovered.iter().position(|r| r.job == job) else {
            return;
        };
        let recovered = state.recovered.remove(index);
        let now = now();
        if let Some(tracked) = state.instances.get_mut(&recovered.instance) {
            tracked.jobs.retain(|j| *j != job);
            tracked.in_use = tracked.in_use.saturating_sub(1);
            if tracked.in_use == 0 {
                tracked.idle_since = now;
            }
            self.inner.persist(&recovered.instance, tracked);
        }
        drop(state);
        self.inner.wake.notify_one();
    }

    /// Whether a job could still get a slot, counting all instances the group may have.
    pub fn has_room(&self) -> bool {
        let state = self.inner.lock();
        room_in(&state)
    }

    /// Reserves room for one job before asking the coordinator for it, so the manager
    /// never takes more jobs than the group can ever serve (or, in preemptive mode, more
    /// than there are ready idle slots). Hold the reservation until the job's
    /// [`Autoscaler::acquire`] returns (or drop it when no job came).
    pub fn try_reserve(&self) -> Option<Reservation> {
        let mut state = self.inner.lock();
        if !room_in(&state) {
            return None;
        }
        state.reserved += 1;
        Some(Reservation(self.clone()))
    }

    /// Waits for a slot on a ready instance, asking for new instances as needed.
    pub async fn acquire(&self, timeout: Duration) -> Result<Acquisition, AcquireError> {
        self.acquire_for(None, timeout).await
    }

    /// [`Autoscaler::acquire`] for a named job, recorded in the ledger with its instance.
    pub async fn acquire_for(
        &self,
        job: Option<u64>,
        timeout: Duration,
    ) -> Result<Acquisition, AcquireError> {
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        {
            let mut state = self.inner.lock();
            state.waiting += 1;
            let at = Utc::now();
            state.arrivals.record(at);
            if let Some(ledger) = &self.inner.ledger
                && let Err(e) = ledger.record_arrival(at)
            {
                tracing::warn!(error = %e, "recording a job arrival failed");
            }
        }
        // Counted out on every exit, also when the caller drops this future (a job
        // canceled while it waits), so the planner never keeps capacity for a ghost.
        let mut waiting = WaitingGuard {
            scaler: self,
            counted: true,
        };
        self.inner.wake.notify_one();
        loop {
            let changed = self.inner.changed.notified();
            if let Some(ended) = self.try_acquire(&mut waiting, job, started) {
                break ended;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                self.inner.lock().metrics.acquisition_timeouts += 1;
                break Err(AcquireError::Timeout(timeout));
            }
        }
    }

    /// One attempt of [`Autoscaler::acquire_for`]: a slot, the end of the wait, or `None`
    /// to wait for a change.
    fn try_acquire(
        &self,
        waiting: &mut WaitingGuard<'_>,
        job: Option<u64>,
        started: tokio::time::Instant,
    ) -> Option<Result<Acquisition, AcquireError>> {
        let mut state = self.inner.lock();
        if let Some(acquisition) = self.take_slot(&mut state, job) {
            // Counted out in the same step as the slot is taken: the planner never sees the
            // job both waiting and holding its slot (it would create an instance for it).
            state.waiting = state.waiting.saturating_sub(1);
            waiting.counted = false;
            // An announced job that starts is no longer to come: the capacity kept for it is
            // in use.
            state.started += 1;
            state.metrics.acquisitions += 1;
            state
                .metrics
                .queue_wait_seconds
                .observe(started.elapsed().as_secs_f64());
            return Some(Ok(acquisition));
        }
        state
            .shutting_down
            .then_some(Err(AcquireError::ShuttingDown))
    }

    fn take_slot(&self, state: &mut State, job: Option<u64>) -> Option<Acquisition> {
        let limits = state.settings.limits.clone();
        // Prefer the busiest instance with room, so others can go idle and be removed.
        let (id, tracked) = state
            .instances
            .iter_mut()
            .filter(|(_, t)| t.connect_info.is_some())
            .filter(|(id, t)| planner::free_slots(&view(id, t), &limits) > 0)
            .max_by_key(|(_, t)| (t.in_use, t.use_count))?;
        tracked.in_use += 1;
        tracked.use_count += 1;
        tracked.jobs.extend(job);
        let acquisition = Acquisition {
            instance: id.clone(),
            connect_info: tracked.connect_info.clone()?,
            use_number: tracked.use_count,
            job,
        };
        self.inner.persist(id, tracked);
        Some(acquisition)
    }

    /// Asks the provider which image each instance runs; with `replace`, instances it
    /// reports as outdated (`up_to_date == Some(false)`) are retired: they finish their
    /// current jobs, take no new one, and are deleted, and normal scaling replaces them with
    /// instances of the current image. Providers without image tracking answer an error.
    pub async fn check_images(&self, replace: bool) -> Result<Vec<InstanceImage>, ProviderError> {
        let images = self.inner.provider.instance_images().await?;
        if replace {
            for image in images.iter().filter(|i| i.up_to_date == Some(false)) {
                if self.retire(&image.id) {
                    tracing::info!(
                        runner = %self.inner.lock().settings.runner,
                        instance = %image.id,
                        version = image.version.as_deref().unwrap_or("unknown"),
                        target = image.target_version.as_deref().unwrap_or("unknown"),
                        "outdated image: instance drains and is replaced"
                    );
                }
            }
        }
        Ok(images)
    }

    /// Announces that about `announcement.jobs` jobs will start soon, beyond those running
    /// (a local pipeline knows its stages in advance): idle capacity is kept for them, on
    /// top of the policy's, until the announcement changes. Each job that takes a slot after
    /// the announcer's count of started jobs counts one off, so an announcement that
    /// arrives after the job it counted has started keeps nothing for it. Limits hold.
    pub fn announce(&self, announcement: Announcement) {
        let changed = {
            let mut state = self.inner.lock();
            std::mem::replace(&mut state.announced, announcement) != announcement
        };
        if changed {
            self.inner.wake.notify_one();
        }
    }

    /// Whether the instance is known and takes jobs (not retiring, failed or being deleted).
    pub fn in_service(&self, id: &InstanceId) -> bool {
        self.inner
            .lock()
            .instances
            .get(id)
            .is_some_and(|tracked| tracked.phase == Phase::Ready)
    }

    /// Takes a ready instance out of service: it gets no new job and is deleted once its
    /// running jobs are released (an outdated image, for example). Returns whether it was
    /// ready and is now draining.
    pub fn retire(&self, id: &InstanceId) -> bool {
        let use_count = {
            let mut state = self.inner.lock();
            let now = now();
            let Some(tracked) = state.instances.get_mut(id) else {
                return false;
            };
            if tracked.phase != Phase::Ready {
                return false;
            }
            tracked.set_phase(Phase::Retiring, now);
            let use_count = tracked.use_count;
            self.inner.persist(id, tracked);
            use_count
        };
        let _ = self.inner.events.send(ScalerEvent::Retiring {
            id: id.clone(),
            use_count,
        });
        self.inner.wake.notify_one();
        self.inner.changed.notify_waiters();
        true
    }

    /// Gives a slot back. An unhealthy instance (unreachable, broken engine) stops counting
    /// as capacity at once and is replaced.
    pub fn release(&self, acquisition: &Acquisition, healthy: bool) {
        let mut event = None;
        {
            let mut state = self.inner.lock();
            let limits = state.settings.limits.clone();
            let now = now();
            let State {
                instances, metrics, ..
            } = &mut *state;
            let Some(tracked) = instances.get_mut(&acquisition.instance) else {
                return;
            };
            tracked.in_use = tracked.in_use.saturating_sub(1);
            if let Some(job) = acquisition.job {
                tracked.jobs.retain(|j| *j != job);
            }
            if tracked.in_use == 0 {
                tracked.idle_since = now;
            }
            if !healthy {
                if tracked.phase != Phase::Failed {
                    metrics.instances_failed += 1;
                }
                tracked.set_phase(Phase::Failed, now);
                event = Some(ScalerEvent::Failed {
                    id: acquisition.instance.clone(),
                    reason: "unhealthy after a job".into(),
                });
            } else if limits.max_use_count > 0
                && tracked.use_count >= limits.max_use_count
                && tracked.phase == Phase::Ready
            {
                tracked.set_phase(Phase::Retiring, now);
                event = Some(ScalerEvent::Retiring {
                    id: acquisition.instance.clone(),
                    use_count: tracked.use_count,
                });
            }
            self.inner.persist(&acquisition.instance, tracked);
        }
        if let Some(event) = event {
            let _ = self.inner.events.send(event);
        }
        self.inner.wake.notify_one();
        self.inner.changed.notify_waiters();
    }

    /// Appends the autoscaler's metrics in Prometheus text format.
    pub fn write_prometheus(&self, out: &mut String) {
        let state = self.inner.lock();
        state
            .metrics
            .write(out, &state.settings.runner, &state.counts_by_state());
    }

    /// Stops scaling. With `delete_instances_on_shutdown`, removes every instance of the
    /// group and waits until they are gone (see
    /// [`ScalerSettings::shutdown_deletion_deadline`]); without it, instances stay and the
    /// ledger keeps them for the next start to adopt.
    pub async fn shutdown(&self) {
        self.inner.lock().shutting_down = true;
        self.inner.changed.notify_waiters();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        if self.inner.lock().settings.delete_instances_on_shutdown {
            self.delete_all().await;
        }
        self.inner.provider.shutdown().await;
    }

    async fn delete_all(&self) {
        let (interval, deadline) = {
            let state = self.inner.lock();
            (
                state.settings.shutdown_deletion_interval,
                tokio::time::Instant::now() + state.settings.shutdown_deletion_deadline(),
            )
        };
        let mut asked: BTreeMap<InstanceId, tokio::time::Instant> = BTreeMap::new();
        let mut attempt = 0;
        while tokio::time::Instant::now() < deadline {
            attempt += 1;
            let listed = match self.inner.provider.list().await {
                Ok(listed) => listed,
                Err(e) => {
                    tracing::warn!(error = %e, "listing instances during shutdown failed");
                    self.inner.lock().metrics.provider_errors += 1;
                    tokio::time::sleep(interval).await;
                    continue;
                }
            };
            let gone: Vec<InstanceId> = asked
                .keys()
                .filter(|id| !listed.iter().any(|i| &i.id == *id))
                .cloned()
                .collect();
            for id in gone {
                asked.remove(&id);
                self.gone(&id, true);
            }
            if listed.is_empty() {
                return;
            }
            // Asked again after the deletion interval, in case the provider dropped it.
            let now = tokio::time::Instant::now();
            let ids: Vec<InstanceId> = listed
                .iter()
                .filter(|i| i.state != InstanceState::Deleting)
                .filter(|i| asked.get(&i.id).is_none_or(|at| now - *at >= interval))
                .map(|i| i.id.clone())
                .collect();
            if !ids.is_empty() {
                for id in &ids {
                    if !asked.contains_key(id) {
                        let _ = self.inner.events.send(ScalerEvent::Deleting {
                            id: id.clone(),
                            reason: "shutdown".into(),
                        });
                    }
                }
                match self.inner.provider.decrease(&ids).await {
                    Ok(accepted) => asked.extend(accepted.into_iter().map(|id| (id, now))),
                    Err(e) => {
                        self.inner.lock().metrics.provider_errors += 1;
                        tracing::warn!(error = %e, attempt, "deleting instances on shutdown failed")
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200).min(interval)) => {}
                () = self.inner.provider.changed() => {}
            }
        }
        tracing::warn!(
            "instances still present after the shutdown deletion deadline; the ledger keeps them for the next start"
        );
    }

    fn gone(&self, id: &InstanceId, asked: bool) {
        gone(&self.inner, id, asked);
    }
}

/// An instance left the group: metrics, ledger, event.
fn gone(inner: &Inner, id: &InstanceId, asked: bool) {
    {
        let mut state = inner.lock();
        if let Some(tracked) = state.instances.remove(id) {
            let lifetime = Utc::now().timestamp() - tracked.first_seen_unix;
            state
                .metrics
                .instance_lifetime_seconds
                .observe(lifetime.max(0) as f64);
            state
                .metrics
                .instance_use_count
                .observe(f64::from(tracked.use_count));
        }
        state.metrics.instances_deleted += 1;
    }
    inner.forget(id);
    let event = if asked {
        ScalerEvent::Deleted { id: id.clone() }
    } else {
        ScalerEvent::Failed {
            id: id.clone(),
            reason: "instance unexpectedly removed".into(),
        }
    };
    let _ = inner.events.send(event);
}

fn room_in(state: &State) -> bool {
    if state.shutting_down {
        return false;
    }
    let limits = &state.settings.limits;
    let coming = state.reserved.max(state.waiting);
    let policy = state.settings.policy_at(Utc::now());
    if policy.preemptive {
        // The incumbent's preemptive mode, enforced: a job is only taken when a ready
        // slot is free for it now.
        let free: usize = state
            .instances
            .iter()
            .filter(|(_, t)| t.connect_info.is_some())
            .map(|(id, t)| planner::free_slots(&view(id, t), limits))
            .sum();
        return coming < free;
    }
    if limits.max_instances == 0 {
        return true;
    }
    let in_use: usize = state.instances.values().map(|i| i.in_use).sum();
    in_use + coming < limits.max_instances * limits.capacity_per_instance.max(1)
}

/// Room held for one job; given back when dropped.
pub struct Reservation(Autoscaler);

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut state = self.0.inner.lock();
        state.reserved = state.reserved.saturating_sub(1);
    }
}

/// A waiting job, counted out when its wait ends without a slot (a timeout, a shutdown, a
/// caller that stopped waiting).
struct WaitingGuard<'a> {
    scaler: &'a Autoscaler,
    counted: bool,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        if self.counted {
            let mut state = self.scaler.inner.lock();
            state.waiting = state.waiting.saturating_sub(1);
        }
        self.scaler.inner.wake.notify_one();
    }
}

fn view(id: &InstanceId, tracked: &Tracked) -> InstanceView {
    InstanceView {
        id: id.clone(),
        phase: tracked.phase,
        in_use: tracked.in_use,
        use_count: tracked.use_count,
        idle_since: tracked.idle_since,
    }
}

async fn run_loop(inner: Arc<Inner>) {
    loop {
        let failed = match step(&inner).await {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(error = %e, "autoscaler update failed; retrying with backoff");
                true
            }
        };
        let interval = {
            let mut state = inner.lock();
            if failed {
                state.provider_failures += 1;
                state.metrics.provider_errors += 1;
            } else {
                state.provider_failures = 0;
            }
            let expecting = state.waiting > 0
                || state.announced_jobs() > 0
                || !state.unlisted_creations.is_empty()
                || state.instances.values().any(|t| {
                    matches!(
                        t.phase,
                        Phase::Creating
                            | Phase::Checking
                            | Phase::Deleting
                            | Phase::Retiring
                            | Phase::Failed
                    )
                });
            let base = if expecting {
                state.settings.update_interval_when_expecting
            } else {
                state.settings.update_interval
            };
            // A failing provider (timeouts, 429, 500) is asked less often, up to 5 minutes.
            let backoff = base * (1 << state.provider_failures.min(8));
            backoff.min(MAX_PROVIDER_BACKOFF.max(base))
        };
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = inner.wake.notified() => {}
            () = inner.provider.changed() => {}
        }
    }
}

/// What one pass decided to ask of the provider, applied after the lock is released.
#[derive(Default)]
struct Work {
    events: Vec<ScalerEvent>,
    to_check: Vec<InstanceId>,
    delete: Vec<InstanceId>,
    create: usize,
    gone: Vec<(InstanceId, bool)>,
}

async fn step(inner: &Arc<Inner>) -> Result<(), podfleet_provider::ProviderError> {
    let listed = inner.provider.list().await?;
    let now = now();
    let mut work = Work::default();
    {
        let mut state = inner.lock();
        if !state.synced_once {
            state.synced_once = true;
            reconcile(inner, &mut state, &listed, now, &mut work);
        }
        track_listing(inner, &mut state, &listed, now, &mut work);
        if !state.shutting_down {
            plan_actions(inner, &mut state, now, &mut work);
        }
    }
    for event in work.events {
        let _ = inner.events.send(event);
    }
    for (id, asked) in work.gone {
        gone(inner, &id, asked);
    }
    for id in work.to_check {
        tokio::spawn(check_instance(inner.clone(), id));
    }
    if !work.delete.is_empty()
        && let Err(e) = inner.provider.decrease(&work.delete).await
    {
        // Asked again after the deletion backoff.
        inner.lock().metrics.provider_errors += 1;
        tracing::warn!(error = %e, "deleting instances failed; will retry with backoff");
    }
    if work.create > 0 {
        let accepted = match inner.provider.increase(work.create).await {
            Ok(n) => n.min(work.create),
            Err(e) => {
                tracing::warn!(error = %e, count = work.create, "provider refused to create instances");
                let mut state = inner.lock();
                state.metrics.provider_errors += 1;
                state.creation_failed(now);
                0
            }
        };
        let mut state = inner.lock();
        state
            .unlisted_creations
            .extend(std::iter::repeat_n(now, accepted));
        state.metrics.instances_requested += accepted as u64;
        drop(state);
        if accepted > 0 {
            let _ = inner
                .events
                .send(ScalerEvent::Requested { count: accepted });
        }
    }
    Ok(())
}

/// The first listing after start: ledger and provider are made to agree.
fn reconcile(
    inner: &Inner,
    state: &mut State,
    listed: &[podfleet_provider::ProviderInstance],
    now: Instant,
    work: &mut Work,
) {
    let records = match &inner.ledger {
        Some(ledger) => match ledger.instances() {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(error = %e, "reading the ledger failed: instances found are deleted");
                BTreeMap::new()
            }
        },
        None => BTreeMap::new(),
    };
    let max_use_count = state.settings.limits.max_use_count;
    for instance in listed {
        let record = records.get(&instance.id);
        let verdict = match (record, &instance.state) {
            (_, InstanceState::Deleting) => Err(None),
            (None, _) => Err(Some("pre-existing instance with no record of its use")),
            (Some(_), InstanceState::Failed { .. }) => Err(Some("failed while podfleet was down")),
            (Some(r), _) if r.state == RecordState::Deleting => {
                Err(Some("was being deleted when podfleet stopped"))
            }
            (Some(r), _)
                if max_use_count > 0 && r.use_count >= max_use_count && r.jobs.is_empty() =>
            {
                Err(Some("used up (max_use_count)"))
            }
            (Some(r), _) => Ok(r),
        };
        match verdict {
            Ok(record) => {
                // Adopted: checked again before it takes jobs; its jobs keep their slots.
                let mut tracked = Tracked::new(Phase::Creating, now);
                tracked.use_count = record.use_count;
                tracked.first_seen_unix = record.first_seen_unix;
                tracked.jobs = record.jobs.clone();
                tracked.in_use = record.jobs.len();
                for job in &record.jobs {
                    state.recovered.push(RecoveredJob {
                        job: *job,
                        instance: instance.id.clone(),
                    });
                }
                tracing::info!(instance = %instance.id, use_count = record.use_count, "adopting instance from the ledger after a readiness check");
                state.instances.insert(instance.id.clone(), tracked);
            }
            Err(reason) => {
                let mut tracked = Tracked::new(Phase::Deleting, now);
                tracked.deletion_asked = Some(now);
                tracked.deletion_attempts = 1;
                if let Some(reason) = reason {
                    work.delete.push(instance.id.clone());
                    work.events.push(ScalerEvent::Deleting {
                        id: instance.id.clone(),
                        reason: reason.into(),
                    });
                }
                inner.persist(&instance.id, &tracked);
                state.instances.insert(instance.id.clone(), tracked);
            }
        }
    }
    for id in records.keys() {
        if !listed.iter().any(|l| &l.id == id) {
            inner.forget(id);
        }
    }
}

/// Follows every instance through its states with the provider's listing and deadlines.
fn track_listing(
    inner: &Inner,
    state: &mut State,
    listed: &[podfleet_provider::ProviderInstance],
    now: Instant,
    work: &mut Work,
) {
    let settings = state.settings.clone();
    let mut failed_creations = 0;
    for instance in listed {
        if !state.instances.contains_key(&instance.id) {
            if !state.unlisted_creations.is_empty() {
                state.unlisted_creations.remove(0);
            }
            let tracked = Tracked::new(Phase::Creating, now);
            inner.persist(&instance.id, &tracked);
            state.instances.insert(instance.id.clone(), tracked);
        }
        let Some(t) = state.instances.get_mut(&instance.id) else {
            continue;
        };
        let in_phase = now.saturating_duration_since(t.phase_since);
        let fail = match (&instance.state, t.phase) {
            (_, Phase::Deleting | Phase::Failed) => None,
            (InstanceState::Failed { reason }, _) => Some(reason.clone()),
            (InstanceState::Deleting, _) => Some("removed by the platform".to_owned()),
            (InstanceState::Running, Phase::Creating) if !t.checking => {
                t.checking = true;
                t.set_phase(Phase::Checking, now);
                work.to_check.push(instance.id.clone());
                None
            }
            (_, Phase::Creating) if in_phase > settings.creation_timeout => Some(format!(
                "not running within {:?} (instance_acquire_timeout)",
                settings.creation_timeout
            )),
            // The check has its own deadline; this one catches a check that hangs.
            (_, Phase::Checking) if in_phase > settings.ready_timeout + Duration::from_secs(30) => {
                Some(format!(
                    "readiness check did not finish within {:?} (instance_ready_timeout)",
                    settings.ready_timeout
                ))
            }
            _ => None,
        };
        if let Some(reason) = fail {
            if matches!(t.phase, Phase::Creating | Phase::Checking) && t.use_count == 0 {
                failed_creations += 1;
            }
            t.set_phase(Phase::Failed, now);
            inner.persist(&instance.id, t);
            state.metrics.instances_failed += 1;
            work.events.push(ScalerEvent::Failed {
                id: instance.id.clone(),
                reason,
            });
        }
    }
    // Creations the provider accepted but never listed count as failed ones.
    let before = state.unlisted_creations.len();
    state
        .unlisted_creations
        .retain(|asked| now.saturating_duration_since(*asked) < settings.creation_timeout);
    failed_creations += before - state.unlisted_creations.len();
    // Deletions the provider did not carry out are asked for again, with backoff.
    for instance in listed {
        if instance.state == InstanceState::Deleting {
            continue;
        }
        if let Some(t) = state.instances.get_mut(&instance.id)
            && t.phase == Phase::Deleting
            && t.deletion_asked.is_some_and(|at| {
                let backoff = (settings.deletion_retry_interval
                    * (1 << t.deletion_attempts.saturating_sub(1).min(10)))
                .min(MAX_DELETION_BACKOFF);
                now.saturating_duration_since(at) >= backoff
            })
        {
            t.deletion_asked = Some(now);
            t.deletion_attempts += 1;
            tracing::info!(instance = %instance.id, attempt = t.deletion_attempts, "asking again to delete an instance still present");
            work.delete.push(instance.id.clone());
        }
    }
    // Instances that left the listing: deleted as asked, or vanished.
    for id in state.instances.keys() {
        if !listed.iter().any(|l| &l.id == id) {
            let asked = state.instances[id].phase == Phase::Deleting;
            work.gone.push((id.clone(), asked));
        }
    }
    for _ in 0..failed_creations {
        state.creation_failed(now);
    }
}

/// Runs the planner and marks what it decided.
fn plan_actions(inner: &Inner, state: &mut State, now: Instant, work: &mut Work) {
    let gone: Vec<&InstanceId> = work.gone.iter().map(|(id, _)| id).collect();
    let mut views: Vec<InstanceView> = state
        .instances
        .iter()
        .filter(|(id, _)| !gone.contains(id))
        .map(|(id, t)| view(id, t))
        .collect();
    for n in 0..state.unlisted_creations.len() {
        views.push(InstanceView {
            id: InstanceId(format!("(requested {n})")),
            phase: Phase::Creating,
            in_use: 0,
            use_count: 0,
            idle_since: now,
        });
    }
    let mut policy = state.policy_now();
    // Announced jobs already waiting are counted as waiting.
    policy.idle_count = policy
        .idle_count
        .max(state.announced_jobs().saturating_sub(state.waiting));
    let actions = planner::plan(&views, state.waiting, &policy, &state.settings.limits, now);
    let breaker_open = state.breaker_open_until.is_some_and(|until| now < until);
    let half_open = state.consecutive_failures >= state.settings.failure_threshold.max(1);
    for action in actions {
        match action {
            Action::Create(count) if !breaker_open => {
                // Half-open breaker: one trial instance until a creation succeeds.
                work.create = if half_open { count.min(1) } else { count };
            }
            Action::Create(_) => {}
            Action::Delete(ids) => {
                for id in ids {
                    if let Some(t) = state.instances.get_mut(&id) {
                        let reason = match t.phase {
                            Phase::Failed => "failed",
                            Phase::Retiring => "retired (used up or outdated)",
                            _ => "idle",
                        };
                        t.set_phase(Phase::Deleting, now);
                        t.deletion_asked = Some(now);
                        t.deletion_attempts = 1;
                        inner.persist(&id, t);
                        work.events.push(ScalerEvent::Deleting {
                            id: id.clone(),
                            reason: reason.into(),
                        });
                        work.delete.push(id);
                    }
                }
            }
        }
    }
}

async fn check_instance(inner: Arc<Inner>, id: InstanceId) {
    let (ready_timeout, max_use_count) = {
        let state = inner.lock();
        (
            state.settings.ready_timeout,
            state.settings.limits.max_use_count,
        )
    };
    let check = async {
        let info = inner
            .provider
            .connect_info(&id)
            .await
            .map_err(|e| e.to_string())?;
        inner.readiness.check(&id, &info).await.map(|()| info)
    };
    let result = match tokio::time::timeout(ready_timeout, check).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "readiness check did not pass within {ready_timeout:?} (instance_ready_timeout)"
        )),
    };
    let event = {
        let mut state = inner.lock();
        let now = now();
        let State {
            instances,
            metrics,
            recovered,
            ..
        } = &mut *state;
        let Some(t) = instances.get_mut(&id) else {
            return;
        };
        t.checking = false;
        if t.phase != Phase::Checking {
            return;
        }
        match result {
            Ok(info) => {
                let seconds = now.saturating_duration_since(t.requested_at);
                metrics.readiness_seconds.observe(seconds.as_secs_f64());
                // An adopted instance that is used up drains its recovered jobs only.
                let used_up = max_use_count > 0 && t.use_count >= max_use_count;
                t.set_phase(
                    if used_up {
                        Phase::Retiring
                    } else {
                        Phase::Ready
                    },
                    now,
                );
                t.connect_info = Some(info);
                t.idle_since = now;
                inner.persist(&id, t);
                let adopted = t.use_count > 0;
                if !adopted {
                    // Learn the boot time that predictive capacity must cover.
                    state.boot_estimate = (state.boot_estimate * 3 + seconds) / 4;
                    state.creation_succeeded();
                }
                ScalerEvent::Ready {
                    id: id.clone(),
                    seconds: seconds.as_secs(),
                }
            }
            Err(reason) => {
                metrics.ready_check_failures += 1;
                metrics.instances_failed += 1;
                let new = t.use_count == 0;
                t.set_phase(Phase::Failed, now);
                // Jobs on record there cannot be resumed: their slots are freed so the
                // instance can be deleted.
                recovered.retain(|r| r.instance != id);
                t.jobs.clear();
                t.in_use = 0;
                inner.persist(&id, t);
                if new {
                    state.creation_failed(now);
                }
                ScalerEvent::Failed {
                    id: id.clone(),
                    reason,
                }
            }
        }
    };
    let _ = inner.events.send(event);
    inner.changed.notify_waiters();
    inner.wake.notify_one();
}
