//! What the manager is doing now (the status view behind `podfleet status`) and what it has
//! done (the Prometheus metrics on `listen_address`). Job code reports phase changes here;
//! autoscaler events fill the instance table. Nothing here decides anything.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};
use podfleet_autoscaler::metrics::{Histogram, header, label as escape};
use podfleet_autoscaler::{Autoscaler, ScalerEvent};
use podfleet_coordinator::Exchange;
use serde::{Deserialize, Serialize};

use crate::Shutdown;

/// Where a job is in its life on this manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// Telling the coordinator the job is taken.
    Accepting,
    /// Waiting for a slot on an instance.
    WaitingForInstance,
    /// Dialing the instance and its container engine.
    Connecting,
    /// The job's containers run.
    Running,
    /// Cleaning up and sending the final update.
    Finishing,
}

impl JobPhase {
    fn label(self) -> &'static str {
        match self {
            JobPhase::Accepting => "accepting",
            JobPhase::WaitingForInstance => "waiting_for_instance",
            JobPhase::Connecting => "connecting",
            JobPhase::Running => "running",
            JobPhase::Finishing => "finishing",
        }
    }
}

/// One job in `podfleet status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobStatus {
    pub runner: String,
    pub id: u64,
    pub name: String,
    pub phase: JobPhase,
    pub instance: Option<String>,
    pub started_at: DateTime<Utc>,
    pub duration_s: f64,
}

/// One instance in `podfleet status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub runner: String,
    pub id: String,
    /// `ready`, `retiring`, `deleting` or `failed`.
    pub state: String,
    pub age_s: f64,
    /// Jobs started on it so far.
    pub uses: u32,
    /// Jobs running on it now.
    pub jobs: Vec<u64>,
    /// The image version it runs, for providers that report images.
    pub image: Option<String>,
    /// Whether that is the group's current image (`None`: unknown).
    pub image_up_to_date: Option<bool>,
}

/// One runner in `podfleet status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunnerStatus {
    pub name: String,
    /// Instances asked of the provider that are not ready yet.
    pub instances_requested: usize,
    pub jobs_running: usize,
    pub jobs_finished: u64,
}

/// Time from a job's arrival to its start on an instance, over the last jobs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct QueueWait {
    pub samples: usize,
    pub p50_s: Option<f64>,
    pub p95_s: Option<f64>,
    pub max_s: Option<f64>,
}

/// Everything `podfleet status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub pid: u32,
    pub started_at: DateTime<Utc>,
    /// `running`, `draining` (SIGQUIT) or `stopping` (SIGINT/SIGTERM).
    pub mode: String,
    pub runners: Vec<RunnerStatus>,
    pub instances: Vec<InstanceStatus>,
    pub jobs: Vec<JobStatus>,
    pub queue_wait: QueueWait,
}

/// Upper bounds of histogram buckets, in seconds: jobs, phases and HTTP calls alike.
const BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
];

/// How many recent queue waits the status quantiles are computed over.
const RECENT_WAITS: usize = 512;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

struct JobEntry {
    runner: String,
    name: String,
    phase: JobPhase,
    phase_since: Instant,
    arrived: Instant,
    started_at: DateTime<Utc>,
    instance: Option<String>,
}

struct InstanceEntry {
    state: &'static str,
    since: Instant,
    uses: u32,
    image: Option<String>,
    up_to_date: Option<bool>,
}

impl InstanceEntry {
    fn new(state: &'static str) -> Self {
        Self {
            state,
            since: Instant::now(),
            uses: 0,
            image: None,
            up_to_date: None,
        }
    }
}

struct State {
    mode: Option<Shutdown>,
    jobs: BTreeMap<u64, JobEntry>,
    /// Keyed by runner, then instance id.
    instances: BTreeMap<(String, String), InstanceEntry>,
    requested: BTreeMap<String, usize>,
    runners: Vec<String>,
    finished: BTreeMap<(String, String, String), u64>,
    phases: BTreeMap<&'static str, Histogram>,
    queue_wait: Histogram,
    recent_waits: VecDeque<f64>,
    coordinator: BTreeMap<(&'static str, String), Histogram>,
    coordinator_errors: BTreeMap<&'static str, u64>,
    scalers: Vec<(String, Autoscaler)>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            mode: None,
            jobs: BTreeMap::new(),
            instances: BTreeMap::new(),
            requested: BTreeMap::new(),
            runners: Vec::new(),
            finished: BTreeMap::new(),
            phases: BTreeMap::new(),
            queue_wait: histogram(),
            recent_waits: VecDeque::new(),
            coordinator: BTreeMap::new(),
            coordinator_errors: BTreeMap::new(),
            scalers: Vec::new(),
        }
    }
}

/// The manager's live view and counters; shared by every runner loop and job.
pub struct Telemetry {
    started: DateTime<Utc>,
    state: Mutex<State>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        Self {
            started: Utc::now(),
            state: Mutex::new(State::default()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }

    pub(crate) fn runner_started(&self, name: &str, scaler: &Autoscaler) {
        self.with(|s| {
            s.runners.push(name.to_string());
            s.scalers.push((name.to_string(), scaler.clone()));
        });
    }

    /// The autoscaler of the runner called `name`, once it runs.
    pub fn scaler(&self, name: &str) -> Option<Autoscaler> {
        self.with(|s| {
            s.scalers
                .iter()
                .find(|(runner, _)| runner == name)
                .map(|(_, scaler)| scaler.clone())
        })
    }

    pub(crate) fn set_mode(&self, mode: Shutdown) {
        self.with(|s| s.mode = Some(mode));
    }

    pub(crate) fn job_arrived(&self, runner: &str, id: u64, name: &str) {
        let now = Instant::now();
        self.with(|s| {
            s.jobs.insert(
                id,
                JobEntry {
                    runner: runner.to_string(),
                    name: name.to_string(),
                    phase: JobPhase::Accepting,
                    phase_since: now,
                    arrived: now,
                    started_at: Utc::now(),
                    instance: None,
                },
            );
        });
    }

    /// Moves a job to `phase`, recording how long the previous phase took.
    pub(crate) fn job_phase(&self, id: u64, phase: JobPhase) {
        let now = Instant::now();
        self.with(|s| {
            let Some(job) = s.jobs.get_mut(&id) else {
                return;
            };
            let (previous, since, arrived) = (job.phase, job.phase_since, job.arrived);
            job.phase = phase;
            job.phase_since = now;
            s.phases
                .entry(previous.label())
                .or_insert_with(histogram)
                .observe((now - since).as_secs_f64());
            if phase == JobPhase::Running {
                let wait = now - arrived;
                s.queue_wait.observe(wait.as_secs_f64());
                if s.recent_waits.len() == RECENT_WAITS {
                    s.recent_waits.pop_front();
                }
                s.recent_waits.push_back(wait.as_secs_f64());
            }
        });
    }

    pub(crate) fn job_on_instance(&self, runner: &str, id: u64, instance: &str) {
        self.with(|s| {
            if let Some(job) = s.jobs.get_mut(&id) {
                job.instance = Some(instance.to_string());
            }
            s.instances
                .entry((runner.to_string(), instance.to_string()))
                .or_insert_with(|| InstanceEntry::new("ready"))
                .uses += 1;
        });
    }

    /// A job left the manager with `outcome` (`success`, `failed`, `canceled`) and, when it
    /// failed, the failure reason sent to the coordinator.
    pub(crate) fn job_finished(&self, id: u64, outcome: &str, failure_reason: &str) {
        let now = Instant::now();
        self.with(|s| {
            let Some(job) = s.jobs.remove(&id) else {
                return;
            };
            s.phases
                .entry(job.phase.label())
                .or_insert_with(histogram)
                .observe((now - job.phase_since).as_secs_f64());
            *s.finished
                .entry((job.runner, outcome.to_string(), failure_reason.to_string()))
                .or_default() += 1;
        });
    }

    pub(crate) fn scaler_event(&self, runner: &str, event: &ScalerEvent) {
        self.with(|s| {
            let key = |id: &podfleet_provider::InstanceId| (runner.to_string(), id.0.clone());
            let mut set = |id, state: &'static str| {
                let entry = s
                    .instances
                    .entry(key(id))
                    .or_insert_with(|| InstanceEntry::new(state));
                entry.state = state;
            };
            match event {
                ScalerEvent::Requested { count } => {
                    *s.requested.entry(runner.to_string()).or_default() += count;
                }
                ScalerEvent::Ready { id, .. } => {
                    set(id, "ready");
                    let pending = s.requested.entry(runner.to_string()).or_default();
                    *pending = pending.saturating_sub(1);
                }
                ScalerEvent::Retiring { id, .. } => set(id, "retiring"),
                ScalerEvent::Deleting { id, .. } => set(id, "deleting"),
                ScalerEvent::Failed { id, .. } => set(id, "failed"),
                ScalerEvent::Deleted { id } => {
                    s.instances.remove(&key(id));
                }
            }
        });
    }

    /// Records which image each known instance of `runner` runs.
    pub(crate) fn set_images(&self, runner: &str, images: &[podfleet_provider::InstanceImage]) {
        self.with(|s| {
            for image in images {
                if let Some(entry) = s
                    .instances
                    .get_mut(&(runner.to_string(), image.id.0.clone()))
                {
                    entry.image =
                        Some(image.version.clone().unwrap_or_else(|| image.image.clone()));
                    entry.up_to_date = image.up_to_date;
                }
            }
        });
    }

    /// Records one coordinator exchange; a missing status or a 5xx counts as an error.
    pub fn coordinator_exchange(&self, exchange: Exchange) {
        self.with(|s| {
            let status = exchange
                .status
                .map_or_else(|| "none".to_string(), |code| code.to_string());
            if exchange.status.is_none_or(|code| code >= 500) {
                *s.coordinator_errors.entry(exchange.endpoint).or_default() += 1;
            }
            s.coordinator
                .entry((exchange.endpoint, status))
                .or_insert_with(histogram)
                .observe(exchange.elapsed.as_secs_f64());
        });
    }

    /// The live view for `podfleet status`.
    pub fn status(&self) -> StatusReport {
        let now = Instant::now();
        self.with(|s| {
            let jobs: Vec<JobStatus> = s
                .jobs
                .iter()
                .map(|(id, job)| JobStatus {
                    runner: job.runner.clone(),
                    id: *id,
                    name: job.name.clone(),
                    phase: job.phase,
                    instance: job.instance.clone(),
                    started_at: job.started_at,
                    duration_s: (now - job.arrived).as_secs_f64(),
                })
                .collect();
            let instances = s
                .instances
                .iter()
                .map(|((runner, id), instance)| InstanceStatus {
                    runner: runner.clone(),
                    id: id.clone(),
                    state: instance.state.to_string(),
                    age_s: (now - instance.since).as_secs_f64(),
                    uses: instance.uses,
                    image: instance.image.clone(),
                    image_up_to_date: instance.up_to_date,
                    jobs: jobs
                        .iter()
                        .filter(|j| j.instance.as_deref() == Some(id.as_str()))
                        .map(|j| j.id)
                        .collect(),
                })
                .collect();
            let runners = s
                .runners
                .iter()
                .map(|name| RunnerStatus {
                    name: name.clone(),
                    instances_requested: s.requested.get(name).copied().unwrap_or(0),
                    jobs_running: jobs.iter().filter(|j| &j.runner == name).count(),
                    jobs_finished: s
                        .finished
                        .iter()
                        .filter(|((runner, _, _), _)| runner == name)
                        .map(|(_, n)| n)
                        .sum(),
                })
                .collect();
            StatusReport {
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
                started_at: self.started,
                mode: match s.mode {
                    None | Some(Shutdown::Running) => "running",
                    Some(Shutdown::Graceful) => "draining",
                    Some(Shutdown::Forceful) => "stopping",
                }
                .to_string(),
                runners,
                instances,
                jobs,
                queue_wait: quantiles(&s.recent_waits),
            }
        })
    }

    /// All metrics in the Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let status = self.status();
        let mut out = String::new();
        self.with(|s| {
            header(&mut out, "podfleet_jobs", "gauge", "Jobs on this manager now, by phase");
            let mut by_phase: BTreeMap<(&str, &str), usize> = BTreeMap::new();
            for runner in &s.runners {
                for phase in [
                    JobPhase::Accepting,
                    JobPhase::WaitingForInstance,
                    JobPhase::Connecting,
                    JobPhase::Running,
                    JobPhase::Finishing,
                ] {
                    by_phase.insert((runner, phase.label()), 0);
                }
            }
            for job in &status.jobs {
                if let Some(n) = by_phase.get_mut(&(job.runner.as_str(), job.phase.label())) {
                    *n += 1;
                }
            }
            for ((runner, phase), n) in by_phase {
                let _ = writeln!(
                    out,
                    "podfleet_jobs{{runner=\"{}\",phase=\"{phase}\"}} {n}",
                    escape(runner)
                );
            }
            header(
                &mut out,
                "podfleet_jobs_finished_total",
                "counter",
                "Jobs finished, by outcome and failure reason",
            );
            for ((runner, outcome, reason), n) in &s.finished {
                let _ = writeln!(
                    out,
                    "podfleet_jobs_finished_total{{runner=\"{}\",outcome=\"{outcome}\",failure_reason=\"{reason}\"}} {n}",
                    escape(runner)
                );
            }
            header(
                &mut out,
                "podfleet_job_phase_duration_seconds",
                "histogram",
                "Time jobs spent in each phase",
            );
            for (phase, histogram) in &s.phases {
                histogram.write(
                    &mut out,
                    "podfleet_job_phase_duration_seconds",
                    &format!("phase=\"{phase}\""),
                );
            }
            header(
                &mut out,
                "podfleet_job_queue_wait_seconds",
                "histogram",
                "Time from a job's arrival to its start on an instance",
            );
            s.queue_wait
                .write(&mut out, "podfleet_job_queue_wait_seconds", "");
            header(
                &mut out,
                "podfleet_instances",
                "gauge",
                "Instances known to the manager, by state",
            );
            let mut by_state: BTreeMap<(&str, &str), usize> = BTreeMap::new();
            for instance in &status.instances {
                *by_state
                    .entry((instance.runner.as_str(), instance.state.as_str()))
                    .or_default() += 1;
            }
            for ((runner, state), n) in by_state {
                let _ = writeln!(
                    out,
                    "podfleet_instances{{runner=\"{}\",state=\"{state}\"}} {n}",
                    escape(runner)
                );
            }
            header(
                &mut out,
                "podfleet_coordinator_request_duration_seconds",
                "histogram",
                "Coordinator API calls, by endpoint and status",
            );
            for ((endpoint, status), histogram) in &s.coordinator {
                histogram.write(
                    &mut out,
                    "podfleet_coordinator_request_duration_seconds",
                    &format!("endpoint=\"{endpoint}\",status=\"{status}\""),
                );
            }
            header(
                &mut out,
                "podfleet_coordinator_request_errors_total",
                "counter",
                "Coordinator API calls that got no answer or a 5xx",
            );
            for (endpoint, n) in &s.coordinator_errors {
                let _ = writeln!(
                    out,
                    "podfleet_coordinator_request_errors_total{{endpoint=\"{endpoint}\"}} {n}"
                );
            }
        });
        // Each runner's autoscaler (instances, acquisitions, readiness, lifetimes), merged
        // so that every metric family is one group, as the exposition format requires.
        let scalers: Vec<Autoscaler> =
            self.with(|s| s.scalers.iter().map(|(_, a)| a.clone()).collect());
        let parts: Vec<String> = scalers
            .iter()
            .map(|scaler| {
                let mut part = String::new();
                scaler.write_prometheus(&mut part);
                part
            })
            .collect();
        out.push_str(&merge_families(&parts));
        out
    }
}

/// Merges expositions of the same metrics for different label values into one group per
/// family, keeping the first `# HELP`/`# TYPE` lines and the order of first appearance.
fn merge_families(parts: &[String]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for part in parts {
        let mut current = String::new();
        for line in part.lines() {
            if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
            {
                current = rest.split(' ').next().unwrap_or_default().to_string();
                let family = families.entry(current.clone()).or_insert_with(|| {
                    order.push(current.clone());
                    Default::default()
                });
                if !family.0.iter().any(|h| h == line) {
                    family.0.push(line.to_string());
                }
            } else if let Some(family) = families.get_mut(&current) {
                family.1.push(line.to_string());
            }
        }
    }
    let mut out = String::new();
    for name in order {
        let (headers, samples) = &families[&name];
        for line in headers.iter().chain(samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn quantiles(samples: &VecDeque<f64>) -> QueueWait {
    let mut sorted: Vec<f64> = samples.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| -> Option<f64> {
        let last = sorted.len().checked_sub(1)?;
        Some(sorted[((last as f64) * q).round() as usize])
    };
    QueueWait {
        samples: sorted.len(),
        p50_s: at(0.5),
        p95_s: at(0.95),
        max_s: sorted.last().copied(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podfleet_provider::InstanceId;
    use std::time::Duration;

    #[test]
    fn a_job_moves_through_phases_into_the_counters() {
        let telemetry = Telemetry::new();
        telemetry.with(|s| s.runners.push("r1".into()));
        telemetry.job_arrived("r1", 7, "build \"x\"");
        telemetry.job_phase(7, JobPhase::WaitingForInstance);
        telemetry.scaler_event(
            "r1",
            &ScalerEvent::Ready {
                id: InstanceId("i-1".into()),
                seconds: 3,
            },
        );
        telemetry.job_on_instance("r1", 7, "i-1");
        telemetry.job_phase(7, JobPhase::Running);
        let status = telemetry.status();
        assert_eq!(status.jobs.len(), 1);
        assert_eq!(status.jobs[0].phase, JobPhase::Running);
        assert_eq!(status.instances[0].jobs, vec![7]);
        assert_eq!(status.instances[0].uses, 1);
        assert_eq!(status.queue_wait.samples, 1);
        assert_eq!(status.runners[0].jobs_running, 1);
        let text = telemetry.prometheus();
        assert!(text.contains("podfleet_jobs{runner=\"r1\",phase=\"running\"} 1"));
        assert!(text.contains("podfleet_instances{runner=\"r1\",state=\"ready\"} 1"));

        telemetry.job_finished(7, "failed", "script_failure");
        let text = telemetry.prometheus();
        assert!(text.contains(
            "podfleet_jobs_finished_total{runner=\"r1\",outcome=\"failed\",failure_reason=\"script_failure\"} 1"
        ));
        assert!(text.contains("podfleet_job_phase_duration_seconds_count{phase=\"running\"} 1"));
        assert!(text.contains("podfleet_jobs{runner=\"r1\",phase=\"running\"} 0"));
        assert!(telemetry.status().jobs.is_empty());
    }

    #[test]
    fn coordinator_errors_and_latency_are_counted_per_endpoint() {
        let telemetry = Telemetry::new();
        for status in [Some(201), Some(502), None] {
            telemetry.coordinator_exchange(Exchange {
                endpoint: "request_job",
                status,
                elapsed: Duration::from_millis(30),
            });
        }
        let text = telemetry.prometheus();
        assert!(
            text.contains("podfleet_coordinator_request_errors_total{endpoint=\"request_job\"} 2")
        );
        assert!(text.contains(
            "podfleet_coordinator_request_duration_seconds_bucket{endpoint=\"request_job\",status=\"201\",le=\"0.05\"} 1"
        ));
        assert!(text.contains(
            "podfleet_coordinator_request_duration_seconds_count{endpoint=\"request_job\",status=\"none\"} 1"
        ));
    }

    #[test]
    fn families_of_several_runners_are_one_group_each() {
        let a = "# HELP m Things\n# TYPE m gauge\nm{runner=\"a\"} 1\n# HELP n N\n# TYPE n counter\nn{runner=\"a\"} 2\n";
        let b = "# HELP m Things\n# TYPE m gauge\nm{runner=\"b\"} 3\n# HELP n N\n# TYPE n counter\nn{runner=\"b\"} 4\n";
        assert_eq!(
            merge_families(&[a.to_string(), b.to_string()]),
            "# HELP m Things\n# TYPE m gauge\nm{runner=\"a\"} 1\nm{runner=\"b\"} 3\n# HELP n N\n# TYPE n counter\nn{runner=\"a\"} 2\nn{runner=\"b\"} 4\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn quantiles_of_waits() {
        let waits: VecDeque<f64> = (1..=100).map(f64::from).collect();
        let q = quantiles(&waits);
        assert_eq!(q.p50_s, Some(51.0));
        assert_eq!(q.p95_s, Some(95.0));
        assert_eq!(q.max_s, Some(100.0));
        assert_eq!(quantiles(&VecDeque::new()).p50_s, None);
    }
}
