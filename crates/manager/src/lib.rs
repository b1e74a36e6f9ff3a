//! The runner manager: for each `[[runners]]` entry it polls the coordinator while it has
//! room, acquires a slot on an instance from the autoscaler, connects, runs the job through
//! the executor while streaming the masked trace back, releases the instance and sends the
//! final update. It wires the components together and owns none of their knowledge.

mod job;
pub mod mask;
mod readiness;
mod session;

use std::sync::Arc;
use std::time::Duration;

use podfleet_autoscaler::planner::{Limits, Policy};
use podfleet_autoscaler::{Autoscaler, ScalerEvent, ScalerSettings};
use podfleet_config::{Config, RunnerConfig};
use podfleet_coordinator::Client;
use podfleet_coordinator::model::RunnerInfo;
use podfleet_provider::Provider;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;

pub use job::JobReport;

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

/// One `[[runners]]` entry with the provider of its instances.
pub struct RunnerSetup {
    pub config: RunnerConfig,
    pub provider: Arc<dyn Provider>,
}

pub struct Manager {
    config: Config,
    runners: Vec<RunnerSetup>,
    system_id: String,
    events: broadcast::Sender<ManagerEvent>,
}

impl Manager {
    pub fn new(config: Config, runners: Vec<RunnerSetup>, system_id: String) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            config,
            runners,
            system_id,
            events,
        }
    }

    pub fn events(&self) -> broadcast::Receiver<ManagerEvent> {
        self.events.subscribe()
    }

    /// Runs until `shutdown` leaves [`Shutdown::Running`], then drains as asked and deletes
    /// instances per `delete_instances_on_shutdown`.
    pub async fn run(self, mut shutdown: watch::Receiver<Shutdown>) {
        let concurrent = Arc::new(Semaphore::new(self.config.concurrent.max(1) as usize));
        let cancel_jobs = CancellationToken::new();
        let mut loops = Vec::new();
        let mut scalers = Vec::new();
        for setup in self.runners {
            let shell = setup.config.shell.clone().unwrap_or_else(|| "sh".into());
            let info = RunnerInfo::podfleet("docker-autoscaler", &shell);
            let client = match Client::new(&setup.config.url, self.system_id.clone(), info) {
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
            let scaler = Autoscaler::start(
                setup.provider.clone(),
                Arc::new(readiness::InstanceReadiness {
                    runner: setup.config.clone(),
                }),
                scaler_settings(&setup.config, setup.provider.info().max_size),
            );
            forward_scaler_events(&scaler, &setup.config.name, self.events.clone());
            scalers.push(scaler.clone());
            let runner = Arc::new(job::RunnerContext {
                config: setup.config,
                client,
                scaler,
                events: self.events.clone(),
                cancel: cancel_jobs.clone(),
            });
            loops.push(tokio::spawn(poll_loop(
                runner,
                concurrent.clone(),
                self.config.check_interval,
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
        for scaler in scalers {
            scaler.shutdown().await;
        }
    }
}

fn forward_scaler_events(
    scaler: &Autoscaler,
    runner: &str,
    events: broadcast::Sender<ManagerEvent>,
) {
    let mut receiver = scaler.events();
    let runner = runner.to_string();
    tokio::spawn(async move {
        loop {
            match receiver.recv().await {
                Ok(event) => {
                    tracing::info!(runner = %runner, ?event, "autoscaler");
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

fn scaler_settings(runner: &RunnerConfig, max_size: usize) -> ScalerSettings {
    let autoscaler = runner.autoscaler.clone().unwrap_or_default();
    // The incumbent's rule: the last policy wins. Periods and time zones are the full
    // autoscaler issue's; here every policy is taken as active.
    let policy = autoscaler
        .policy
        .last()
        .map_or_else(Policy::default, |p| Policy {
            idle_count: p.idle_count as usize,
            idle_time: p.idle_time,
            scale_factor: p.scale_factor,
            scale_factor_limit: p.scale_factor_limit as usize,
        });
    ScalerSettings {
        limits: Limits {
            capacity_per_instance: autoscaler.capacity_per_instance.max(1) as usize,
            max_use_count: autoscaler.max_use_count,
            max_instances: autoscaler.max_instances as usize,
            max_size,
        },
        policy,
        update_interval: autoscaler.update_interval,
        update_interval_when_expecting: autoscaler.update_interval_when_expecting,
        creation_timeout: autoscaler
            .instance_acquire_timeout
            .max(Duration::from_secs(60)),
        delete_instances_on_shutdown: autoscaler.delete_instances_on_shutdown,
        shutdown_deletion_interval: autoscaler.shutdown_deletion_interval,
        shutdown_deletion_retries: autoscaler.shutdown_deletion_retries,
        deletion_retry_interval: autoscaler.deletion_retry_interval,
    }
}

/// Asks the coordinator for jobs while the runner has room, until shutdown.
async fn poll_loop(
    runner: Arc<job::RunnerContext>,
    concurrent: Arc<Semaphore>,
    check_interval: Duration,
    shutdown: watch::Receiver<Shutdown>,
) {
    let limit = match runner.config.limit {
        0 => Semaphore::MAX_PERMITS,
        n => n as usize,
    };
    let runner_slots = Arc::new(Semaphore::new(limit));
    let mut last_update = None;
    let mut jobs = tokio::task::JoinSet::new();
    let token = runner.config.token.expose().to_string();
    while *shutdown.borrow() == Shutdown::Running {
        let got_job = 'poll: {
            let Some(reservation) = runner.scaler.try_reserve() else {
                break 'poll false;
            };
            let Ok(global) = concurrent.clone().try_acquire_owned() else {
                break 'poll false;
            };
            let Ok(local) = runner_slots.clone().try_acquire_owned() else {
                break 'poll false;
            };
            match runner.client.request_job(&token, &mut last_update).await {
                Ok(Some(payload)) => {
                    let runner = runner.clone();
                    jobs.spawn(async move {
                        runner.run_job(payload, reservation).await;
                        drop((global, local));
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
            let mut shutdown = shutdown.clone();
            let _ = tokio::time::timeout(check_interval, shutdown.changed()).await;
        }
    }
    while jobs.join_next().await.is_some() {}
}
