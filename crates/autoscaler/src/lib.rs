//! The autoscaler: keeps a provider's group at the size the work needs. It tracks each
//! instance's phase, checks new instances before handing them out, gives jobs slots
//! (`capacity_per_instance`), retires used-up instances (`max_use_count`), removes idle
//! and failed ones, and drains the group on shutdown. The decisions come from the pure
//! [`planner`]; this module only applies them.

pub mod planner;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use planner::{Action, InstanceView, Limits, Phase, Policy};
use podfleet_provider::{ConnectInfo, InstanceId, InstanceState, Provider};
use tokio::sync::{Notify, broadcast};

/// Checks that a running instance can take jobs (SSH, `instance_ready_command`, engine).
#[async_trait]
pub trait ReadinessCheck: Send + Sync {
    async fn check(&self, id: &InstanceId, info: &ConnectInfo) -> Result<(), String>;
}

#[derive(Clone, Debug)]
pub struct ScalerSettings {
    pub limits: Limits,
    pub policy: Policy,
    pub update_interval: Duration,
    pub update_interval_when_expecting: Duration,
    /// How long an instance may take from request to ready.
    pub creation_timeout: Duration,
    pub delete_instances_on_shutdown: bool,
    pub shutdown_deletion_interval: Duration,
    pub shutdown_deletion_retries: u32,
    /// A deletion the provider has not carried out after this long is asked for again.
    pub deletion_retry_interval: Duration,
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
}

struct Tracked {
    phase: Phase,
    in_use: usize,
    use_count: u32,
    idle_since: Instant,
    requested_at: Instant,
    connect_info: Option<ConnectInfo>,
    checking: bool,
    /// When deletion was last asked of the provider.
    deletion_asked: Option<Instant>,
}

#[derive(Default)]
struct State {
    instances: BTreeMap<InstanceId, Tracked>,
    /// When each creation the provider accepted but no listing has shown yet was asked for.
    unlisted_creations: Vec<Instant>,
    waiting: usize,
    /// Jobs the manager may be about to receive or is preparing (see [`Reservation`]).
    reserved: usize,
    synced_once: bool,
    shutting_down: bool,
    /// Instances that failed before becoming ready, in a row; creation backs off on them
    /// so a broken image or host does not spin up and tear down instances in a loop.
    creation_failures: u32,
    creation_paused_until: Option<Instant>,
}

impl State {
    fn creation_failed(&mut self, now: Instant) {
        self.creation_failures += 1;
        let backoff = Duration::from_secs(1 << self.creation_failures.min(6));
        self.creation_paused_until = Some(now + backoff);
    }
}

struct Inner {
    provider: Arc<dyn Provider>,
    readiness: Arc<dyn ReadinessCheck>,
    settings: ScalerSettings,
    state: Mutex<State>,
    wake: Notify,
    changed: Notify,
    events: broadcast::Sender<ScalerEvent>,
}

#[derive(Clone)]
pub struct Autoscaler {
    inner: Arc<Inner>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Autoscaler {
    /// Starts the scaling loop. Instances the group already holds are unknown to this
    /// manager and removed for safety, as the incumbent does without state storage.
    pub fn start(
        provider: Arc<dyn Provider>,
        readiness: Arc<dyn ReadinessCheck>,
        settings: ScalerSettings,
    ) -> Self {
        let (events, _) = broadcast::channel(256);
        let inner = Arc::new(Inner {
            provider,
            readiness,
            settings,
            state: Mutex::new(State::default()),
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

    /// Whether a job could still get a slot, counting all instances the group may have.
    pub fn has_room(&self) -> bool {
        let Ok(state) = self.inner.state.lock() else {
            return false;
        };
        self.room_in(&state)
    }

    fn room_in(&self, state: &State) -> bool {
        if state.shutting_down {
            return false;
        }
        let limits = &self.inner.settings.limits;
        if limits.max_instances == 0 {
            return true;
        }
        let in_use: usize = state.instances.values().map(|i| i.in_use).sum();
        let coming = state.reserved.max(state.waiting);
        in_use + coming < limits.max_instances * limits.capacity_per_instance.max(1)
    }

    /// Reserves room for one job before asking the coordinator for it, so the manager
    /// never takes more jobs than the group can ever serve. Hold the reservation until the
    /// job's [`Autoscaler::acquire`] returns (or drop it when no job came).
    pub fn try_reserve(&self) -> Option<Reservation> {
        let mut state = self.inner.state.lock().ok()?;
        if !self.room_in(&state) {
            return None;
        }
        state.reserved += 1;
        Some(Reservation(self.clone()))
    }

    /// Waits for a slot on a ready instance, asking for new instances as needed.
    pub async fn acquire(&self, timeout: Duration) -> Result<Acquisition, AcquireError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.with_state(|s| s.waiting += 1);
        // Counted out on every exit, also when the caller drops this future (a job
        // canceled while it waits), so the planner never keeps capacity for a ghost.
        let _waiting = WaitingGuard(self);
        self.inner.wake.notify_one();
        loop {
            let changed = self.inner.changed.notified();
            if let Some(acquisition) = self.try_take_slot() {
                break Ok(acquisition);
            }
            if self.with_state(|s| s.shutting_down) {
                break Err(AcquireError::ShuttingDown);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break Err(AcquireError::Timeout(timeout));
            }
        }
    }

    fn try_take_slot(&self) -> Option<Acquisition> {
        let limits = &self.inner.settings.limits;
        let mut state = self.inner.state.lock().ok()?;
        // Prefer the busiest instance with room, so others can go idle and be removed.
        let (id, tracked) = state
            .instances
            .iter_mut()
            .filter(|(_, t)| t.connect_info.is_some())
            .filter(|(id, t)| planner::free_slots(&view(id, t), limits) > 0)
            .max_by_key(|(_, t)| (t.in_use, t.use_count))?;
        tracked.in_use += 1;
        tracked.use_count += 1;
        Some(Acquisition {
            instance: id.clone(),
            connect_info: tracked.connect_info.clone()?,
            use_number: tracked.use_count,
        })
    }

    /// Gives a slot back. An unhealthy instance (unreachable, broken engine) stops counting
    /// as capacity at once and is replaced.
    pub fn release(&self, acquisition: &Acquisition, healthy: bool) {
        let limits = self.inner.settings.limits.clone();
        let mut event = None;
        self.with_state(|state| {
            let Some(tracked) = state.instances.get_mut(&acquisition.instance) else {
                return;
            };
            tracked.in_use = tracked.in_use.saturating_sub(1);
            if tracked.in_use == 0 {
                tracked.idle_since = Instant::now();
            }
            if !healthy {
                tracked.phase = Phase::Failed;
                event = Some(ScalerEvent::Failed {
                    id: acquisition.instance.clone(),
                    reason: "unhealthy after a job".into(),
                });
            } else if limits.max_use_count > 0
                && tracked.use_count >= limits.max_use_count
                && tracked.phase == Phase::Ready
            {
                tracked.phase = Phase::Retiring;
                event = Some(ScalerEvent::Retiring {
                    id: acquisition.instance.clone(),
                    use_count: tracked.use_count,
                });
            }
        });
        if let Some(event) = event {
            let _ = self.inner.events.send(event);
        }
        self.inner.wake.notify_one();
        self.inner.changed.notify_waiters();
    }

    /// Stops scaling; with `delete_instances_on_shutdown`, removes every instance of the
    /// group and waits (bounded by the deletion interval and retries) until they are gone.
    pub async fn shutdown(&self) {
        self.with_state(|s| s.shutting_down = true);
        self.inner.changed.notify_waiters();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        if self.inner.settings.delete_instances_on_shutdown {
            self.delete_all().await;
        }
        self.inner.provider.shutdown().await;
    }

    async fn delete_all(&self) {
        let settings = &self.inner.settings;
        let mut asked: Vec<InstanceId> = Vec::new();
        // shutdown_deletion_interval × shutdown_deletion_retries bounds the wait (10 s × 3
        // by default), polling faster than the interval so a quick provider exits quickly.
        let deadline = Instant::now()
            + (settings.shutdown_deletion_interval * settings.shutdown_deletion_retries.max(1))
                .max(Duration::from_secs(10));
        let mut attempt = 0;
        while Instant::now() < deadline {
            attempt += 1;
            let listed = match self.inner.provider.list().await {
                Ok(listed) => listed,
                Err(e) => {
                    tracing::warn!(error = %e, "listing instances during shutdown failed");
                    tokio::time::sleep(settings.shutdown_deletion_interval).await;
                    continue;
                }
            };
            asked.retain(|id| {
                let present = listed.iter().any(|i| &i.id == id);
                if !present {
                    let _ = self
                        .inner
                        .events
                        .send(ScalerEvent::Deleted { id: id.clone() });
                }
                present
            });
            if listed.is_empty() {
                return;
            }
            let ids: Vec<InstanceId> = listed
                .iter()
                .filter(|i| i.state != InstanceState::Deleting && !asked.contains(&i.id))
                .map(|i| i.id.clone())
                .collect();
            if !ids.is_empty() {
                for id in &ids {
                    let _ = self.inner.events.send(ScalerEvent::Deleting {
                        id: id.clone(),
                        reason: "shutdown".into(),
                    });
                }
                match self.inner.provider.decrease(&ids).await {
                    Ok(accepted) => asked.extend(accepted),
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "deleting instances on shutdown failed")
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tracing::warn!("instances still present after the shutdown deletion retries");
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state)
    }
}

/// Room held for one job; given back when dropped.
pub struct Reservation(Autoscaler);

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0
            .with_state(|s| s.reserved = s.reserved.saturating_sub(1));
    }
}

struct WaitingGuard<'a>(&'a Autoscaler);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0
            .with_state(|s| s.waiting = s.waiting.saturating_sub(1));
        self.0.inner.wake.notify_one();
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
        if let Err(e) = step(&inner).await {
            tracing::warn!(error = %e, "autoscaler update failed");
        }
        let expecting = {
            let state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            state.waiting > 0
                || !state.unlisted_creations.is_empty()
                || state.instances.values().any(|t| {
                    matches!(
                        t.phase,
                        Phase::Creating | Phase::Deleting | Phase::Retiring | Phase::Failed
                    )
                })
        };
        let interval = if expecting {
            inner.settings.update_interval_when_expecting
        } else {
            inner.settings.update_interval
        };
        let _ = tokio::time::timeout(interval, inner.wake.notified()).await;
    }
}

async fn step(inner: &Arc<Inner>) -> Result<(), podfleet_provider::ProviderError> {
    let listed = inner.provider.list().await?;
    let now = Instant::now();
    let mut events = Vec::new();
    let mut to_check = Vec::new();
    let mut preexisting = Vec::new();
    let mut retry_deletion = Vec::new();
    let actions = {
        let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let first = !state.synced_once;
        state.synced_once = true;
        let mut failed_creations = 0;
        for instance in &listed {
            let known = state.instances.contains_key(&instance.id);
            if !known {
                if first {
                    preexisting.push(instance.id.clone());
                    state
                        .instances
                        .insert(instance.id.clone(), tracked(Phase::Deleting, now));
                    continue;
                }
                if !state.unlisted_creations.is_empty() {
                    state.unlisted_creations.remove(0);
                }
                state
                    .instances
                    .insert(instance.id.clone(), tracked(Phase::Creating, now));
            }
            let Some(t) = state.instances.get_mut(&instance.id) else {
                continue;
            };
            match (&instance.state, t.phase) {
                (_, Phase::Deleting | Phase::Failed) => {}
                (InstanceState::Failed { reason }, phase) => {
                    if phase == Phase::Creating {
                        failed_creations += 1;
                    }
                    t.phase = Phase::Failed;
                    events.push(ScalerEvent::Failed {
                        id: instance.id.clone(),
                        reason: reason.clone(),
                    });
                }
                (InstanceState::Running, Phase::Creating) if !t.checking => {
                    t.checking = true;
                    to_check.push(instance.id.clone());
                }
                (_, Phase::Creating)
                    if now.saturating_duration_since(t.requested_at)
                        > inner.settings.creation_timeout =>
                {
                    failed_creations += 1;
                    t.phase = Phase::Failed;
                    events.push(ScalerEvent::Failed {
                        id: instance.id.clone(),
                        reason: format!("not ready within {:?}", inner.settings.creation_timeout),
                    });
                }
                _ => {}
            }
        }
        // Creations the provider accepted but never listed count as failed ones.
        let timeout = inner.settings.creation_timeout;
        let before = state.unlisted_creations.len();
        state
            .unlisted_creations
            .retain(|asked| now.saturating_duration_since(*asked) < timeout);
        failed_creations += before - state.unlisted_creations.len();
        // Deletions the provider did not carry out are asked for again.
        for instance in &listed {
            if instance.state == InstanceState::Deleting {
                continue;
            }
            if let Some(t) = state.instances.get_mut(&instance.id)
                && t.phase == Phase::Deleting
                && t.deletion_asked.is_some_and(|at| {
                    now.saturating_duration_since(at) >= inner.settings.deletion_retry_interval
                })
            {
                t.deletion_asked = Some(now);
                retry_deletion.push(instance.id.clone());
            }
        }
        // Instances that left the listing: deleted as asked, or vanished.
        let gone: Vec<InstanceId> = state
            .instances
            .keys()
            .filter(|id| !listed.iter().any(|l| &l.id == *id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(t) = state.instances.remove(&id) {
                if t.phase == Phase::Deleting {
                    events.push(ScalerEvent::Deleted { id });
                } else {
                    events.push(ScalerEvent::Failed {
                        id,
                        reason: "instance unexpectedly removed".into(),
                    });
                }
            }
        }
        for _ in 0..failed_creations {
            state.creation_failed(now);
        }
        if state.shutting_down {
            Vec::new()
        } else {
            let mut views: Vec<InstanceView> =
                state.instances.iter().map(|(id, t)| view(id, t)).collect();
            for n in 0..state.unlisted_creations.len() {
                views.push(InstanceView {
                    id: InstanceId(format!("(requested {n})")),
                    phase: Phase::Creating,
                    in_use: 0,
                    use_count: 0,
                    idle_since: now,
                });
            }
            let paused = state.creation_paused_until.is_some_and(|until| now < until);
            let mut actions = planner::plan(
                &views,
                state.waiting,
                &inner.settings.policy,
                &inner.settings.limits,
                now,
            );
            if paused {
                actions.retain(|a| !matches!(a, Action::Create(_)));
            }
            for action in &actions {
                match action {
                    Action::Create(_) => {}
                    Action::Delete(ids) => {
                        for id in ids {
                            if let Some(t) = state.instances.get_mut(id) {
                                let reason = match t.phase {
                                    Phase::Failed => "failed",
                                    Phase::Retiring => "used up (max_use_count)",
                                    _ => "idle",
                                };
                                t.phase = Phase::Deleting;
                                t.deletion_asked = Some(now);
                                events.push(ScalerEvent::Deleting {
                                    id: id.clone(),
                                    reason: reason.into(),
                                });
                            }
                        }
                    }
                }
            }
            actions
        }
    };
    for event in events {
        let _ = inner.events.send(event);
    }
    if !preexisting.is_empty() {
        for id in &preexisting {
            let _ = inner.events.send(ScalerEvent::Deleting {
                id: id.clone(),
                reason: "pre-existing instance with no record of its use".into(),
            });
        }
        if let Err(e) = inner.provider.decrease(&preexisting).await {
            tracing::warn!(error = %e, "deleting pre-existing instances failed; will retry");
        }
    }
    if !retry_deletion.is_empty() {
        tracing::info!(instances = ?retry_deletion, "asking again to delete instances still present");
        if let Err(e) = inner.provider.decrease(&retry_deletion).await {
            tracing::warn!(error = %e, "deleting instances failed; will retry");
        }
    }
    for id in to_check {
        tokio::spawn(check_instance(inner.clone(), id));
    }
    for action in actions {
        match action {
            Action::Create(count) => {
                let accepted = inner.provider.increase(count).await;
                let accepted = match accepted {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, count, "provider refused to create instances");
                        0
                    }
                };
                let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                state
                    .unlisted_creations
                    .extend(std::iter::repeat_n(now, accepted.min(count)));
                drop(state);
                if accepted > 0 {
                    let _ = inner
                        .events
                        .send(ScalerEvent::Requested { count: accepted });
                }
            }
            Action::Delete(ids) => {
                if let Err(e) = inner.provider.decrease(&ids).await {
                    tracing::warn!(error = %e, "deleting instances failed; will retry");
                }
            }
        }
    }
    Ok(())
}

fn tracked(phase: Phase, now: Instant) -> Tracked {
    Tracked {
        phase,
        in_use: 0,
        use_count: 0,
        idle_since: now,
        requested_at: now,
        connect_info: None,
        checking: false,
        deletion_asked: (phase == Phase::Deleting).then_some(now),
    }
}

async fn check_instance(inner: Arc<Inner>, id: InstanceId) {
    let result = match inner.provider.connect_info(&id).await {
        Ok(info) => inner.readiness.check(&id, &info).await.map(|()| info),
        Err(e) => Err(e.to_string()),
    };
    let event = {
        let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = state.instances.get_mut(&id) else {
            return;
        };
        t.checking = false;
        if t.phase != Phase::Creating {
            return;
        }
        match result {
            Ok(info) => {
                state.creation_failures = 0;
                let Some(t) = state.instances.get_mut(&id) else {
                    return;
                };
                t.phase = Phase::Ready;
                t.connect_info = Some(info);
                t.idle_since = Instant::now();
                ScalerEvent::Ready {
                    id: id.clone(),
                    seconds: t.requested_at.elapsed().as_secs(),
                }
            }
            Err(reason) => {
                t.phase = Phase::Failed;
                state.creation_failed(Instant::now());
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
