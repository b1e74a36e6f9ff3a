//! The runner manager: for each `[[runners]]` entry it polls the coordinator while it has
//! room, acquires a slot on an instance from the autoscaler, connects, runs the job through
//! the executor while streaming the masked trace back, releases the instance and sends the
//! final update. It wires the components together and owns none of their knowledge.

mod job;
pub mod mask;
mod readiness;
mod recover;
pub mod session;
mod spec;
pub mod telemetry;
mod tokens;

use std::sync::Arc;
use std::time::Duration;

use podfleet_autoscaler::{Autoscaler, ScalerEvent, ScalerSettings};
use podfleet_config::{Config, RunnerConfig};
use podfleet_coordinator::model::RunnerInfo;
use podfleet_coordinator::{Client, ClientOptions, RequestObserver};
use podfleet_executor::{Cancellation, JobOutcome, JobSpec, TraceSink};
use podfleet_provider::{ConnectInfo, InstanceId, Provider};
use tokio::sync::{Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;

pub use job::JobReport;
pub use podfleet_autoscaler::Announcement;
pub use telemetry::{StatusReport, Telemetry};
pub use tokens::RunnerTokens;

/// How to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    Running,
    /// Stop asking for jobs, let running ones finish, then clean up (SIGQUIT).
    Graceful,
    /// Stop asking for jobs, cancel running ones, then clean up (SIGINT, SIGTERM).
    Forceful,
}

/// What the manager did, for logs and the pipeline view.
#[derive(Clone, Debug)]
pub enum ManagerEvent {
    JobReceived {
        runner: String,
        job_id: u64,
        job_name: String,
    },
    JobOnInstance {
        runner: String,
        job_id: u64,
        instance: String,
    },
    JobFinished(JobReport),
    Scaler {
        runner: String,
        event: ScalerEvent,
    },
}

/// Offers podfleet's helper image to the provider, which may make it available to every
/// instance at once (the local provider's shared store) instead of a load into each by its
/// readiness check. Before the runner's first instance: one created during a first share
/// could see the image half-written.
async fn share_helper_image(runner: &RunnerConfig, provider: &dyn Provider) {
    let Some((reference, _)) = spec::own_helper_image(runner) else {
        return;
    };
    let archive = match tokio::task::spawn_blocking(podfleet_helper::image::docker_archive_file)
        .await
    {
        Ok(Ok(archive)) => archive,
        Ok(Err(error)) => {
            tracing::warn!(runner = %runner.name, %error, "podfleet's helper image is not shared");
            return;
        }
        Err(_) => return,
    };
    match provider.share_image(&archive, &reference).await {
        Ok(true) => {
            tracing::debug!(runner = %runner.name, image = %reference, "helper image shared with every instance")
        }
        Ok(false) => {}
        Err(error) => {
            tracing::warn!(runner = %runner.name, %error, "podfleet's helper image is not shared; each instance loads it")
        }
    }
}

/// One `[[runners]]` entry with the provider of its instances.
pub struct RunnerSetup {
    pub config: RunnerConfig,
    pub provider: Arc<dyn Provider>,
}

/// A stand-in for SSH and the instances' container engines, for the benchmark
/// (`benches/jobs.rs`): it checks new instances and runs jobs in their place. Everything
/// else stays the real manager: polling, acceptance, the trace (masking, journal, patches),
/// the autoscaler and its ledger, release and the final update. Production sets none.
#[async_trait::async_trait]
pub trait JobEngine: Send + Sync {
    /// The readiness check of a new or adopted instance.
    async fn check(&self, instance: &InstanceId, info: &ConnectInfo) -> Result<(), String>;
    /// Runs the job on `instance` to its end, its output into `trace`.
    async fn run(
        &self,
        instance: &InstanceId,
        job: &JobSpec,
        trace: TraceSink,
        cancel: Cancellation,
    ) -> JobOutcome;
}

/// Instance readiness through a [`JobEngine`].
struct EngineReadiness(Arc<dyn JobEngine>);

#[async_trait::async_trait]
impl podfleet_autoscaler::ReadinessCheck for EngineReadiness {
    async fn check(&self, id: &InstanceId, info: &ConnectInfo) -> Result<(), String> {
        self.0.check(id, info).await
    }
}

pub struct Manager {
    engine: Option<Arc<dyn JobEngine>>,
    config: Config,
    runners: Vec<RunnerSetup>,
    system_id: String,
    events: broadcast::Sender<ManagerEvent>,
    telemetry: Arc<Telemetry>,
    live: watch::Sender<LiveSettings>,
    tokens: RunnerTokens,
    announcer: Announcer,
    /// Whether jobs a previous manager process left running are carried on.
    resume_jobs: bool,
}

/// Tells each runner's autoscaler how many jobs will run at once soon (see
/// [`podfleet_autoscaler::Autoscaler::announce`]); a local pipeline knows its stages.
#[derive(Clone)]
pub struct Announcer {
    runners: Arc<Vec<(String, watch::Sender<Announcement>)>>,
}

impl Announcer {
    /// `announcement` for the runner named `runner` (unknown names are ignored).
    pub fn announce(&self, runner: &str, announcement: Announcement) {
        if let Some((_, sender)) = self.runners.iter().find(|(name, _)| name == runner) {
            sender.send_if_modified(|announced| {
                std::mem::replace(announced, announcement) != announcement
            });
        }
    }

    fn forward(&self, runner: &str, scaler: Autoscaler) {
        let Some((_, sender)) = self.runners.iter().find(|(name, _)| name == runner) else {
            return;
        };
        let mut announced = sender.subscribe();
        tokio::spawn(async move {
            loop {
                scaler.announce(*announced.borrow_and_update());
                if announced.changed().await.is_err() {
                    break;
                }
            }
        });
    }
}

/// The settings a running manager takes from a reloaded config without a restart.
#[derive(Clone, Debug, PartialEq)]
struct LiveSettings {
    concurrent: usize,
    check_interval: Duration,
    /// Per runner name: its `limit` (0 = none).
    limits: Vec<(String, u32)>,
}

impl LiveSettings {
    fn of(config: &Config) -> Self {
        Self {
            concurrent: config.concurrent.max(1) as usize,
            check_interval: config.check_interval,
            limits: config
                .runners
                .iter()
                .map(|r| (r.name.clone(), r.limit))
                .collect(),
        }
    }
}

/// What a config reload changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Settings now in effect.
    pub applied: Vec<String>,
    /// Changes that take effect only after a restart of the manager.
    pub needs_restart: Vec<String>,
}

/// Applies reloaded configs to a running [`Manager`].
#[derive(Clone)]
pub struct Reloader {
    live: watch::Sender<LiveSettings>,
    config: Arc<std::sync::Mutex<Config>>,
    telemetry: Arc<Telemetry>,
    tokens: RunnerTokens,
}

impl Reloader {
    /// Takes what can change live (`concurrent`, `check_interval`, runner `limit`, and the
    /// `[runners.autoscaler]` limits, intervals and policies) from `config` and says what
    /// needs a restart (runners added or removed, a runner's plugin, plugin_config,
    /// connector_config or other sections changed).
    pub fn apply(&self, config: &Config) -> ReloadOutcome {
        let mut outcome = ReloadOutcome::default();
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let (old, new) = (LiveSettings::of(&current), LiveSettings::of(config));
        if old.concurrent != new.concurrent {
            outcome.applied.push(format!(
                "concurrent {} -> {}",
                old.concurrent, new.concurrent
            ));
        }
        if old.check_interval != new.check_interval {
            outcome.applied.push(format!(
                "check_interval {:?} -> {:?}",
                old.check_interval, new.check_interval
            ));
        }
        let names = |c: &Config| c.runners.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        if names(&current) != names(config) {
            outcome
                .needs_restart
                .push("the list of [[runners]] changed".to_string());
        }
        for runner in &config.runners {
            let Some(before) = current.runners.iter().find(|r| r.name == runner.name) else {
                continue;
            };
            if before.limit != runner.limit {
                outcome.applied.push(format!(
                    "runner {:?} limit {} -> {}",
                    runner.name, before.limit, runner.limit
                ));
            }
            let provider_part = |r: &RunnerConfig| {
                r.autoscaler
                    .as_ref()
                    .map(|a| format!("{:?}", (&a.plugin, &a.plugin_config, &a.connector_config)))
            };
            if provider_part(runner) != provider_part(before) {
                outcome.needs_restart.push(format!(
                    "runner {:?}: plugin, plugin_config or connector_config changed",
                    runner.name
                ));
            }
            // A new token (rotated by podfleet, or edited) is used from the next request on.
            if self.tokens.set(&runner.name, runner.token.clone()) {
                outcome
                    .applied
                    .push(format!("runner {:?} token", runner.name));
            }
            let rest = |r: &RunnerConfig| {
                let mut r = r.clone();
                r.limit = 0;
                r.autoscaler = None;
                r.token = Default::default();
                r.token_obtained_at = None;
                r.token_expires_at = None;
                format!("{r:?}")
            };
            if rest(runner) != rest(before) {
                outcome.needs_restart.push(format!(
                    "runner {:?}: settings outside [runners.autoscaler] other than limit changed",
                    runner.name
                ));
            }
            if let (Some(autoscaler), Some(scaler)) = (
                runner.autoscaler.as_ref(),
                self.telemetry.scaler(&runner.name),
            ) {
                let old = scaler.settings();
                let mut new = ScalerSettings::from_config(
                    &runner.name,
                    autoscaler,
                    old.limits.max_size,
                    &config.state_dir(),
                );
                new.ledger_path = old.ledger_path.clone();
                if new != old {
                    scaler.update_settings(new);
                    outcome.applied.push(format!(
                        "runner {:?} [runners.autoscaler] limits and policies",
                        runner.name
                    ));
                }
            }
        }
        *current = config.clone();
        self.live.send_replace(new);
        outcome
    }
}

impl Manager {
    pub fn new(config: Config, runners: Vec<RunnerSetup>, system_id: String) -> Self {
        let (events, _) = broadcast::channel(1024);
        let (live, _) = watch::channel(LiveSettings::of(&config));
        let tokens = RunnerTokens::of(&config);
        let announcer = Announcer {
            runners: Arc::new(
                runners
                    .iter()
                    .map(|setup| {
                        let (sender, _) = watch::channel(Announcement::default());
                        (setup.config.name.clone(), sender)
                    })
                    .collect(),
            ),
        };
        Self {
            engine: None,
            config,
            runners,
            system_id,
            events,
            telemetry: Arc::new(Telemetry::new()),
            live,
            tokens,
            announcer,
            resume_jobs: true,
        }
    }

    /// Jobs a previous manager process left running are not carried on but given up, and
    /// their instances deleted: for a manager whose coordinator lives and dies with it (an
    /// earlier `podfleet pipeline`'s is gone).
    pub fn without_resuming(mut self) -> Self {
        self.resume_jobs = false;
        self
    }

    /// A handle to announce the jobs coming soon to the runners' autoscalers.
    pub fn announcer(&self) -> Announcer {
        self.announcer.clone()
    }

    /// Runs jobs through `engine` instead of SSH and the instances' engines (the benchmark).
    pub fn with_engine(mut self, engine: Arc<dyn JobEngine>) -> Self {
        self.engine = Some(engine);
        self
    }

    /// The live status and metrics of this manager.
    pub fn telemetry(&self) -> Arc<Telemetry> {
        self.telemetry.clone()
    }

    /// A handle to apply reloaded configs while the manager runs.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            live: self.live.clone(),
            config: Arc::new(std::sync::Mutex::new(self.config.clone())),
            telemetry: self.telemetry.clone(),
            tokens: self.tokens.clone(),
        }
    }

    /// The runner tokens in use, for token rotation.
    pub fn tokens(&self) -> RunnerTokens {
        self.tokens.clone()
    }

    pub fn events(&self) -> broadcast::Receiver<ManagerEvent> {
        self.events.subscribe()
    }

    /// Runs until `shutdown` leaves [`Shutdown::Running`], then drains as asked and deletes
    /// instances per `delete_instances_on_shutdown`.
    pub async fn run(self, mut shutdown: watch::Receiver<Shutdown>) {
        let concurrent = Arc::new(Semaphore::new(self.config.concurrent.max(1) as usize));
        let resize = tokio::spawn(follow_concurrent(concurrent.clone(), self.live.subscribe()));
        let cancel_jobs = CancellationToken::new();
        let mut loops = Vec::new();
        let mut image_watches = Vec::new();
        let mut scalers = Vec::new();
        for setup in self.runners {
            let shell = setup.config.shell.clone().unwrap_or_else(|| "sh".into());
            let info = RunnerInfo::podfleet("docker-autoscaler", &shell);
            let telemetry = self.telemetry.clone();
            let options = ClientOptions {
                observer: Some(RequestObserver(Arc::new(move |exchange| {
                    telemetry.coordinator_exchange(exchange)
                }))),
                ..ClientOptions::default()
            };
            let client = match Client::with_options(
                &setup.config.url,
                self.system_id.clone(),
                info,
                options,
            ) {
                Ok(client) => client,
                Err(e) => {
                    tracing::error!(runner = %setup.config.name, error = %e, "runner disabled");
                    continue;
                }
            };
            // Like gitlab-runner's start-up: a token the coordinator refuses disables that
            // runner (and says so) instead of polling with it forever.
            match client.verify_runner(setup.config.token.expose()).await {
                Ok(_) => {}
                Err(e) if e.status() == Some(403) => {
                    tracing::error!(
                        runner = %setup.config.name,
                        "runner token refused by the coordinator (403): runner disabled; check its token"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(runner = %setup.config.name, error = %e, "verifying the runner failed; polling anyway")
                }
            }
            self.tokens.mark_serving(&setup.config.name);
            share_helper_image(&setup.config, setup.provider.as_ref()).await;
            let scaler = Autoscaler::start(
                setup.provider.clone(),
                match &self.engine {
                    Some(engine) => Arc::new(EngineReadiness(engine.clone())),
                    None => Arc::new(readiness::InstanceReadiness {
                        runner: setup.config.clone(),
                    }),
                },
                scaler_settings(&self.config, &setup.config, setup.provider.info().max_size),
            );
            forward_scaler_events(
                &scaler,
                &setup.config.name,
                self.events.clone(),
                self.telemetry.clone(),
            );
            self.telemetry.runner_started(&setup.config.name, &scaler);
            self.announcer.forward(&setup.config.name, scaler.clone());
            image_watches.push(tokio::spawn(watch_images(
                setup.config.name.clone(),
                scaler.clone(),
                setup.config.autoscaler.clone().unwrap_or_default(),
                self.telemetry.clone(),
            )));
            scalers.push(scaler.clone());
            let runner = Arc::new(job::RunnerContext {
                config: setup.config,
                client,
                scaler,
                events: self.events.clone(),
                cancel: cancel_jobs.clone(),
                telemetry: self.telemetry.clone(),
                engine: self.engine.clone(),
                sessions: session::Sessions::default(),
            });
            // Jobs the previous manager process left running are carried on first.
            loops.extend(recover::resume_jobs(
                runner.clone(),
                concurrent.clone(),
                self.resume_jobs,
            ));
            loops.push(tokio::spawn(poll_loop(
                runner,
                self.tokens.clone(),
                concurrent.clone(),
                self.live.subscribe(),
                shutdown.clone(),
            )));
        }
        let mode = loop {
            let mode = *shutdown.borrow_and_update();
            if mode != Shutdown::Running {
                break mode;
            }
            if shutdown.changed().await.is_err() {
                break Shutdown::Forceful;
            }
        };
        tracing::info!(?mode, "shutting down");
        self.telemetry.set_mode(mode);
        if mode == Shutdown::Forceful {
            cancel_jobs.cancel();
        }
        // A forceful stop may be upgraded while draining: cancel jobs then too.
        let upgrade = {
            let mut shutdown = shutdown.clone();
            let cancel = cancel_jobs.clone();
            tokio::spawn(async move {
                while shutdown.changed().await.is_ok() {
                    if *shutdown.borrow() == Shutdown::Forceful {
                        cancel.cancel();
                    }
                }
            })
        };
        for handle in loops {
            let _ = handle.await;
        }
        upgrade.abort();
        for watch in image_watches {
            watch.abort();
        }
        resize.abort();
        // Side by side: each group deletes its own instances.
        futures_util::future::join_all(scalers.iter().map(Autoscaler::shutdown)).await;
    }
}

fn forward_scaler_events(
    scaler: &Autoscaler,
    runner: &str,
    events: broadcast::Sender<ManagerEvent>,
    telemetry: Arc<Telemetry>,
) {
    let mut receiver = scaler.events();
    let runner = runner.to_string();
    tokio::spawn(async move {
        loop {
            match receiver.recv().await {
                Ok(event) => {
                    tracing::info!(runner = %runner, ?event, "autoscaler");
                    telemetry.scaler_event(&runner, &event);
                    let _ = events.send(ManagerEvent::Scaler {
                        runner: runner.clone(),
                        event,
                    });
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    });
}

/// Every `image_check_interval`, learns which image each instance runs (for `podfleet
/// status`) and, with `replace_outdated_images`, has outdated ones drained and replaced.
/// Providers without image tracking are asked once and then left alone.
async fn watch_images(
    runner: String,
    scaler: Autoscaler,
    config: podfleet_config::AutoscalerConfig,
    telemetry: Arc<Telemetry>,
) {
    let mut reported = false;
    loop {
        match scaler.check_images(config.replace_outdated_images).await {
            Ok(images) => {
                reported = true;
                telemetry.set_images(&runner, &images);
            }
            Err(e) if !reported => {
                tracing::debug!(runner = %runner, error = %e, "no image maintenance for this runner");
                if config.replace_outdated_images {
                    tracing::warn!(runner = %runner, error = %e, "replace_outdated_images is set but the provider does not report images");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(runner = %runner, error = %e, "checking instance images failed")
            }
        }
        tokio::time::sleep(config.image_check_interval).await;
    }
}

fn scaler_settings(config: &Config, runner: &RunnerConfig, max_size: usize) -> ScalerSettings {
    let autoscaler = runner.autoscaler.clone().unwrap_or_default();
    ScalerSettings::from_config(&runner.name, &autoscaler, max_size, &config.state_dir())
}

/// Asks the coordinator for jobs while the runner has room, until shutdown.
/// Asks the coordinator for jobs for one runner: `request_concurrency` requests at a time
/// (each one only with room for its job), under the runner's `limit` as the live settings
/// say, until shutdown; then waits for the runner's jobs.
async fn poll_loop(
    runner: Arc<job::RunnerContext>,
    tokens: RunnerTokens,
    concurrent: Arc<Semaphore>,
    live: watch::Receiver<LiveSettings>,
    shutdown: watch::Receiver<Shutdown>,
) {
    let limit_of = {
        let name = runner.config.name.clone();
        let configured = runner.config.limit;
        move |settings: &LiveSettings| {
            let limit = settings
                .limits
                .iter()
                .find(|(runner, _)| *runner == name)
                .map_or(configured, |(_, limit)| *limit);
            match limit {
                0 => UNLIMITED,
                n => n as usize,
            }
        }
    };
    let mut runner_limit = limit_of(&live.borrow());
    let runner_slots = Arc::new(Semaphore::new(runner_limit));
    let follow_limit = {
        let (runner_slots, mut live) = (runner_slots.clone(), live.clone());
        tokio::spawn(async move {
            while live.changed().await.is_ok() {
                let wanted = limit_of(&live.borrow());
                resize_semaphore(&runner_slots, &mut runner_limit, wanted);
            }
        })
    };
    let poller = Poller {
        runner: runner.clone(),
        tokens,
        concurrent,
        runner_slots,
        last_update: Arc::new(std::sync::Mutex::new(None)),
        live,
        shutdown,
    };
    let mut pollers = tokio::task::JoinSet::new();
    for _ in 0..runner.config.request_concurrency.max(1) {
        pollers.spawn(poller.clone().run());
    }
    while pollers.join_next().await.is_some() {}
    follow_limit.abort();
}

/// One of a runner's `request_concurrency` job requesters; they share the runner's slots
/// and the coordinator's `X-GitLab-Last-Update`.
#[derive(Clone)]
struct Poller {
    runner: Arc<job::RunnerContext>,
    tokens: RunnerTokens,
    concurrent: Arc<Semaphore>,
    runner_slots: Arc<Semaphore>,
    last_update: Arc<std::sync::Mutex<Option<String>>>,
    live: watch::Receiver<LiveSettings>,
    shutdown: watch::Receiver<Shutdown>,
}

impl Poller {
    async fn run(self) {
        let runner = &self.runner;
        let mut jobs = tokio::task::JoinSet::new();
        while *self.shutdown.borrow() == Shutdown::Running {
            let check_interval = self.live.borrow().check_interval;
            // Without a job, the next ask waits for check_interval, or less: for a slot
            // when that is what was missing (a job that just ended gives its slot back
            // right after its final update).
            let mut full: Option<Arc<Semaphore>> = None;
            let got_job = 'poll: {
                let Some(reservation) = runner.scaler.try_reserve() else {
                    break 'poll false;
                };
                let Ok(global) = self.concurrent.clone().try_acquire_owned() else {
                    full = Some(self.concurrent.clone());
                    break 'poll false;
                };
                let Ok(local) = self.runner_slots.clone().try_acquire_owned() else {
                    full = Some(self.runner_slots.clone());
                    break 'poll false;
                };
                let token = self
                    .tokens
                    .get(&runner.config.name)
                    .unwrap_or_else(|| runner.config.token.clone());
                // Held only around the request, not across it: requests run side by side.
                let mut last_update = self
                    .last_update
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let answer = runner
                    .client
                    .request_job(token.expose(), &mut last_update)
                    .await;
                if last_update.is_some() {
                    *self.last_update.lock().unwrap_or_else(|e| e.into_inner()) = last_update;
                }
                tracing::debug!(
                    runner = %runner.config.name,
                    job = answer.as_ref().ok().and_then(Option::as_ref).map(|job| job.id),
                    "job request answered"
                );
                match answer {
                    Ok(Some(payload)) => {
                        let runner = runner.clone();
                        jobs.spawn(async move {
                            let aftercare = runner.run_job(payload, reservation).await;
                            // Reported: its slots are free while its leftovers go.
                            drop((global, local));
                            if let Some(aftercare) = aftercare {
                                aftercare.run(&runner.sessions).await;
                            }
                        });
                        true
                    }
                    Ok(None) => false,
                    Err(e) => {
                        tracing::warn!(runner = %runner.config.name, error = %e, "job request failed");
                        false
                    }
                }
            };
            while jobs.try_join_next().is_some() {}
            if !got_job {
                let mut shutdown = self.shutdown.clone();
                let slot = async {
                    match full {
                        Some(semaphore) => drop(semaphore.acquire().await),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(check_interval) => {}
                    _ = shutdown.changed() => {}
                    () = slot => {}
                }
            }
        }
        while jobs.join_next().await.is_some() {}
    }
}

/// Permits standing for "no limit": large, yet small enough to grow and shrink from.
const UNLIMITED: usize = 1 << 24;

/// Keeps the global `concurrent` semaphore at the size the live settings say.
async fn follow_concurrent(semaphore: Arc<Semaphore>, mut live: watch::Receiver<LiveSettings>) {
    let mut size = live.borrow().concurrent;
    while live.changed().await.is_ok() {
        let wanted = live.borrow().concurrent;
        resize_semaphore(&semaphore, &mut size, wanted);
    }
}

/// Grows or shrinks a semaphore of `size` permits to `wanted`. Shrinking takes permits as
/// running jobs give them back, so no running job is affected.
fn resize_semaphore(semaphore: &Arc<Semaphore>, size: &mut usize, wanted: usize) {
    if wanted == *size {
        return;
    }
    if wanted > *size {
        semaphore.add_permits(wanted - *size);
    } else {
        let surplus = (*size - wanted) as u32;
        let semaphore = semaphore.clone();
        tokio::spawn(async move {
            if let Ok(permits) = semaphore.acquire_many(surplus).await {
                permits.forget();
            }
        });
    }
    *size = wanted;
}
