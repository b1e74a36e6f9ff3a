//! The autoscaler's settings and how `[runners.autoscaler]` maps onto them: one place, used
//! by the manager and by `podfleet simulate`, so the simulator runs what production runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use podfleet_config::AutoscalerConfig;

use crate::planner::{Limits, Policy};
use crate::schedule::{ScheduledPolicy, policy_at};

#[derive(Clone, Debug, PartialEq)]
pub struct ScalerSettings {
    /// The runner's name, as a metrics label and in logs.
    pub runner: String,
    pub limits: Limits,
    /// The policies in config order; see [`crate::schedule::policy_at`].
    pub schedules: Vec<ScheduledPolicy>,
    pub update_interval: Duration,
    pub update_interval_when_expecting: Duration,
    /// Creating state: how long an instance may take from request to running.
    pub creation_timeout: Duration,
    /// Ready-check state: how long its readiness check may take, retries included.
    pub ready_timeout: Duration,
    /// Creations that fail in a row before the breaker opens and creation pauses.
    pub failure_threshold: u32,
    pub delete_instances_on_shutdown: bool,
    pub shutdown_deletion_interval: Duration,
    pub shutdown_deletion_retries: u32,
    /// A deletion the provider has not carried out after this long is asked for again
    /// (doubling on each further attempt, up to ten minutes).
    pub deletion_retry_interval: Duration,
    /// Keep idle capacity ahead of the arrival rate learned per hour of the week.
    pub predictive: bool,
    /// The durable ledger; `None` runs without one (instances found at start are deleted).
    /// Read at start only: a reload does not move the ledger.
    pub ledger_path: Option<PathBuf>,
}

impl ScalerSettings {
    /// Settings for one runner's group; `max_size` is the provider's own cap, `state_dir`
    /// the global `podfleet_state_dir` (see `Config::state_dir`).
    pub fn from_config(
        runner: &str,
        config: &AutoscalerConfig,
        max_size: usize,
        state_dir: &Path,
    ) -> Self {
        let schedules = config
            .policy
            .iter()
            .map(|p| ScheduledPolicy {
                periods: p.periods.clone(),
                timezone: p.timezone,
                policy: Policy {
                    idle_count: p.idle_count as usize,
                    idle_time: p.idle_time,
                    scale_factor: p.scale_factor,
                    scale_factor_limit: p.scale_factor_limit as usize,
                    preemptive: p.preemptive(),
                },
            })
            .collect();
        Self {
            runner: runner.to_owned(),
            limits: Limits {
                capacity_per_instance: config.capacity_per_instance.max(1) as usize,
                max_use_count: config.max_use_count,
                max_instances: config.max_instances as usize,
                max_size,
            },
            schedules,
            update_interval: config.update_interval,
            update_interval_when_expecting: config.update_interval_when_expecting,
            creation_timeout: config.instance_acquire_timeout,
            ready_timeout: config.instance_ready_timeout,
            failure_threshold: config.failure_threshold.max(1),
            delete_instances_on_shutdown: config.delete_instances_on_shutdown,
            shutdown_deletion_interval: config.shutdown_deletion_interval,
            shutdown_deletion_retries: config.shutdown_deletion_retries,
            deletion_retry_interval: config.deletion_retry_interval,
            predictive: config.predictive_warm_capacity,
            ledger_path: Some(config.ledger_path(state_dir)),
        }
    }

    /// The policy in force at `at`.
    pub fn policy_at(&self, at: DateTime<Utc>) -> Policy {
        policy_at(&self.schedules, at)
    }

    /// How long shutdown waits for deletions: the configured interval × retries, but never
    /// less than two minutes, which real providers need to remove a handful of instances.
    pub fn shutdown_deletion_deadline(&self) -> Duration {
        (self.shutdown_deletion_interval * self.shutdown_deletion_retries.max(1))
            .max(Duration::from_secs(120))
    }
}
