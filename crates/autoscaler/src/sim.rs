//! The simulator behind `podfleet simulate`: replays a job-arrival trace through the real
//! [`planner`](crate::planner) (and, when configured, the real predictive model) on a
//! virtual clock, against a provider model with a boot-time distribution and a failure
//! rate. Two references run on the same trace: `baseline`, the incumbent's (taskscaler's)
//! scaling rule as documented, and `oracle`, a clairvoyant scheduler that knows every
//! arrival in advance and gives the lower bound of waiting.
//!
//! Event-driven: the planner runs at every arrival, job end and instance boot (as the real
//! loop is woken by them) and at the update interval, like production.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use podfleet_provider::InstanceId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::planner::{self, Action, InstanceView, Limits, Phase, Policy};
use crate::predict::{self, ArrivalModel};
use crate::settings::ScalerSettings;

/// One line of a trace file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceJob {
    /// Seconds from the start of the trace.
    pub arrival_s: f64,
    pub duration_s: f64,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("trace line {line}: {message}")]
    Trace { line: usize, message: String },
    #[error(
        "trace line {line}: no runner takes a job with tags {tags:?}; add the tags to a runner's tag_list (or run_untagged = true for untagged jobs)"
    )]
    Unroutable { line: usize, tags: Vec<String> },
    #[error("the config has no runner with [runners.autoscaler] to simulate")]
    NoRunners,
}

/// Reads a JSON-lines trace; blank lines are skipped. Arrivals must not go backwards.
pub fn read_trace(text: &str) -> Result<Vec<TraceJob>, SimError> {
    let mut jobs: Vec<TraceJob> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let job: TraceJob = serde_json::from_str(line).map_err(|e| SimError::Trace {
            line: line_number,
            message: format!(
                "{e}; expected {{\"arrival_s\": 12.5, \"duration_s\": 340.0, \"tags\": [\"podman\"]}}"
            ),
        })?;
        let bad = |message: &str| SimError::Trace {
            line: line_number,
            message: message.to_owned(),
        };
        if !job.arrival_s.is_finite() || job.arrival_s < 0.0 {
            return Err(bad("arrival_s must be a number of seconds, 0 or more"));
        }
        if !job.duration_s.is_finite() || job.duration_s < 0.0 {
            return Err(bad("duration_s must be a number of seconds, 0 or more"));
        }
        if jobs
            .last()
            .is_some_and(|last| last.arrival_s > job.arrival_s)
        {
            return Err(bad("arrival_s goes backwards; sort the trace by arrival_s"));
        }
        jobs.push(job);
    }
    Ok(jobs)
}

/// How the simulated provider behaves.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderModel {
    /// Boot time (request to ready) is drawn uniformly from this range, in seconds.
    pub boot_min_s: f64,
    pub boot_max_s: f64,
    /// Probability that an instance fails to come up (it fails at the end of its boot).
    pub failure_rate: f64,
    pub seed: u64,
}

impl Default for ProviderModel {
    fn default() -> Self {
        Self {
            boot_min_s: 60.0,
            boot_max_s: 150.0,
            failure_rate: 0.02,
            seed: 1,
        }
    }
}

/// One `[[runners]]` entry as the simulator needs it.
#[derive(Clone, Debug)]
pub struct SimRunner {
    pub name: String,
    pub tags: Vec<String>,
    pub run_untagged: bool,
    pub settings: ScalerSettings,
}

impl SimRunner {
    fn takes(&self, tags: &[String]) -> bool {
        if tags.is_empty() {
            self.run_untagged
        } else {
            tags.iter().all(|t| self.tags.contains(t))
        }
    }
}

/// Which scaler drives the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// podfleet: the real planner, predictive warm capacity when configured.
    Podfleet,
    /// The incumbent's rule (taskscaler, as documented): instances wanted =
    /// ceil((in use + waiting + unavailable + idle target) / capacity); provider-failed
    /// instances keep counting as capacity until `instance_acquire_timeout`; no prediction.
    Baseline,
    /// Knows every arrival in advance: an instance is ready exactly when a job needs it.
    Oracle,
}

/// One run's figures, as in the report file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub jobs: usize,
    pub p50_wait_s: f64,
    pub p95_wait_s: f64,
    pub max_wait_s: f64,
    pub instance_hours: f64,
    pub instances_created: usize,
    pub jobs_per_instance: f64,
}

/// Replays `trace` under `strategy`. `start` is the wall-clock time of the trace's second 0
/// (policies' periods and the hour-of-week model read it).
pub fn simulate(
    runners: &[SimRunner],
    trace: &[TraceJob],
    model: &ProviderModel,
    strategy: Strategy,
    start: DateTime<Utc>,
) -> Result<RunReport, SimError> {
    if runners.is_empty() {
        return Err(SimError::NoRunners);
    }
    let mut per_runner: Vec<Vec<TraceJob>> = vec![Vec::new(); runners.len()];
    for (index, job) in trace.iter().enumerate() {
        let runner = runners
            .iter()
            .position(|r| r.takes(&job.tags))
            .ok_or_else(|| SimError::Unroutable {
                line: index + 1,
                tags: job.tags.clone(),
            })?;
        per_runner[runner].push(job.clone());
    }
    let mut waits = Vec::new();
    let mut instance_seconds = 0.0;
    let mut created = 0;
    for (n, (runner, jobs)) in runners.iter().zip(&per_runner).enumerate() {
        if jobs.is_empty() {
            continue;
        }
        let mut model = model.clone();
        model.seed = model.seed.wrapping_add(n as u64);
        let outcome = match strategy {
            Strategy::Oracle => oracle(&runner.settings, jobs, &model),
            _ => GroupSim::new(&runner.settings, &model, strategy, start).run(jobs),
        };
        waits.extend(outcome.waits);
        instance_seconds += outcome.instance_seconds;
        created += outcome.instances_created;
    }
    waits.sort_by(|a, b| a.partial_cmp(b).unwrap_or(Ordering::Equal));
    let rank = |p: f64| -> f64 {
        if waits.is_empty() {
            return 0.0;
        }
        let index = ((p * waits.len() as f64).ceil() as usize).clamp(1, waits.len()) - 1;
        round(waits[index])
    };
    Ok(RunReport {
        jobs: waits.len(),
        p50_wait_s: rank(0.50),
        p95_wait_s: rank(0.95),
        max_wait_s: round(waits.last().copied().unwrap_or(0.0)),
        instance_hours: round(instance_seconds / 3600.0),
        instances_created: created,
        jobs_per_instance: if created == 0 {
            0.0
        } else {
            round(waits.len() as f64 / created as f64)
        },
    })
}

fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

struct Outcome {
    waits: Vec<f64>,
    instance_seconds: f64,
    instances_created: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum EventKind {
    Arrival(usize),
    BootDone(usize),
    JobDone(usize),
    Tick,
}

#[derive(Debug)]
struct Event {
    at: f64,
    order: u64,
    kind: EventKind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    /// Earliest first (the heap is a max-heap).
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .partial_cmp(&self.at)
            .unwrap_or(Ordering::Equal)
            .then(other.order.cmp(&self.order))
    }
}

struct SimInstance {
    phase: Phase,
    created_at: f64,
    ready_at: f64,
    will_fail: bool,
    /// When a baseline scaler notices a failed instance (the incumbent does not map the
    /// provider's failed state, so it waits for the creation timeout).
    failure_noticed_at: f64,
    in_use: usize,
    use_count: u32,
    idle_since: f64,
    deleted_at: Option<f64>,
}

struct GroupSim<'a> {
    settings: &'a ScalerSettings,
    strategy: Strategy,
    start: DateTime<Utc>,
    base: Instant,
    rng: StdRng,
    model: &'a ProviderModel,
    instances: Vec<SimInstance>,
    queue: VecDeque<(usize, f64)>,
    events: BinaryHeap<Event>,
    order: u64,
    waits: Vec<f64>,
    arrivals: ArrivalModel,
    boot_estimate: f64,
    next_tick: f64,
    /// Jobs running now.
    running: usize,
}

impl<'a> GroupSim<'a> {
    fn new(
        settings: &'a ScalerSettings,
        model: &'a ProviderModel,
        strategy: Strategy,
        start: DateTime<Utc>,
    ) -> Self {
        Self {
            settings,
            strategy,
            start,
            base: Instant::now(),
            rng: StdRng::seed_from_u64(model.seed),
            model,
            instances: Vec::new(),
            queue: VecDeque::new(),
            events: BinaryHeap::new(),
            order: 0,
            waits: Vec::new(),
            arrivals: ArrivalModel::default(),
            boot_estimate: settings.update_interval_when_expecting.as_secs_f64() * 30.0,
            next_tick: 0.0,
            running: 0,
        }
    }

    fn push(&mut self, at: f64, kind: EventKind) {
        self.order += 1;
        self.events.push(Event {
            at,
            order: self.order,
            kind,
        });
    }

    fn instant(&self, t: f64) -> Instant {
        self.base + Duration::from_secs_f64(t.max(0.0))
    }

    fn wall(&self, t: f64) -> DateTime<Utc> {
        self.start + chrono::Duration::milliseconds((t * 1000.0) as i64)
    }

    fn run(mut self, jobs: &[TraceJob]) -> Outcome {
        for (index, job) in jobs.iter().enumerate() {
            self.push(job.arrival_s, EventKind::Arrival(index));
        }
        self.push(0.0, EventKind::Tick);
        let mut end = 0.0_f64;
        while let Some(event) = self.events.pop() {
            let t = event.at;
            end = end.max(t);
            match event.kind {
                EventKind::Arrival(index) => {
                    self.queue.push_back((index, t));
                    self.arrivals.record(self.wall(t));
                }
                EventKind::BootDone(i) => {
                    let instance = &mut self.instances[i];
                    if instance.phase == Phase::Creating {
                        if instance.will_fail {
                            instance.phase = Phase::Failed;
                        } else {
                            instance.phase = Phase::Ready;
                            instance.idle_since = t;
                            let boot = t - instance.created_at;
                            self.boot_estimate = (self.boot_estimate * 3.0 + boot) / 4.0;
                        }
                    }
                }
                EventKind::JobDone(i) => {
                    self.running -= 1;
                    let max_use = self.settings.limits.max_use_count;
                    let instance = &mut self.instances[i];
                    instance.in_use -= 1;
                    if instance.in_use == 0 {
                        instance.idle_since = t;
                    }
                    if max_use > 0
                        && instance.use_count >= max_use
                        && instance.phase == Phase::Ready
                    {
                        instance.phase = Phase::Retiring;
                    }
                }
                EventKind::Tick => {}
            }
            self.assign(t, jobs);
            self.scale(t);
            self.assign(t, jobs);
            // The run ends when the last job has finished.
            if self.waits.len() == jobs.len() && self.running == 0 {
                break;
            }
            let expecting = !self.queue.is_empty()
                || self
                    .instances
                    .iter()
                    .any(|i| i.deleted_at.is_none() && i.phase != Phase::Ready);
            let interval = if expecting {
                self.settings.update_interval_when_expecting
            } else {
                self.settings.update_interval
            };
            let next = t + interval.as_secs_f64().max(0.5);
            let current_tick = event.kind == EventKind::Tick && (t - self.next_tick).abs() < 1e-9;
            if current_tick || next < self.next_tick {
                self.next_tick = next;
                self.push(next, EventKind::Tick);
            }
        }
        // Instances still up at the end count until the end of the trace.
        let mut instance_seconds = 0.0;
        for instance in &self.instances {
            let until = instance.deleted_at.unwrap_or(end);
            instance_seconds += until - instance.created_at;
        }
        Outcome {
            waits: self.waits,
            instance_seconds,
            instances_created: self.instances.len(),
        }
    }

    /// Hands waiting jobs to free slots, busiest instance first (as the real loop does).
    fn assign(&mut self, t: f64, jobs: &[TraceJob]) {
        let limits = self.settings.limits.clone();
        while !self.queue.is_empty() {
            let best = self
                .instances
                .iter()
                .enumerate()
                .filter(|(_, i)| i.deleted_at.is_none() && i.phase == Phase::Ready)
                .filter(|(_, i)| free_slots(i, &limits) > 0)
                .max_by_key(|(_, i)| (i.in_use, i.use_count))
                .map(|(n, _)| n);
            let Some(n) = best else { break };
            let Some((job, arrived)) = self.queue.pop_front() else {
                break;
            };
            let instance = &mut self.instances[n];
            instance.in_use += 1;
            instance.use_count += 1;
            self.waits.push(t - arrived);
            self.running += 1;
            self.push(t + jobs[job].duration_s, EventKind::JobDone(n));
        }
    }

    fn live(&self) -> impl Iterator<Item = (usize, &SimInstance)> {
        self.instances
            .iter()
            .enumerate()
            .filter(|(_, i)| i.deleted_at.is_none())
    }

    fn create(&mut self, t: f64, count: usize) {
        for _ in 0..count {
            let span = (self.model.boot_max_s - self.model.boot_min_s).max(0.0);
            let boot = self.model.boot_min_s + self.rng.random::<f64>() * span;
            let will_fail = self.rng.random::<f64>() < self.model.failure_rate;
            let index = self.instances.len();
            self.instances.push(SimInstance {
                phase: Phase::Creating,
                created_at: t,
                ready_at: t + boot,
                will_fail,
                failure_noticed_at: t + self.settings.creation_timeout.as_secs_f64(),
                in_use: 0,
                use_count: 0,
                idle_since: t,
                deleted_at: None,
            });
            let ready_at = self.instances[index].ready_at;
            self.push(ready_at, EventKind::BootDone(index));
            if will_fail && self.strategy == Strategy::Baseline {
                let noticed = self.instances[index].failure_noticed_at.max(ready_at);
                self.push(noticed, EventKind::Tick);
            }
        }
    }

    fn delete(&mut self, t: f64, index: usize) {
        self.instances[index].deleted_at = Some(t);
    }

    fn scale(&mut self, t: f64) {
        match self.strategy {
            Strategy::Podfleet => self.scale_podfleet(t),
            Strategy::Baseline => self.scale_baseline(t),
            Strategy::Oracle => {}
        }
    }

    fn policy(&self, t: f64) -> Policy {
        let wall = self.wall(t);
        let mut policy = self.settings.policy_at(wall);
        if self.strategy == Strategy::Podfleet && self.settings.predictive {
            let lead = Duration::from_secs_f64(self.boot_estimate)
                + self.settings.update_interval_when_expecting;
            predict::apply(&mut policy, &self.arrivals, wall, lead);
        }
        policy
    }

    /// podfleet: the real planner, exactly as the loop calls it.
    fn scale_podfleet(&mut self, t: f64) {
        let now = self.instant(t);
        let views: Vec<InstanceView> = self
            .live()
            .map(|(n, i)| InstanceView {
                id: InstanceId(n.to_string()),
                phase: i.phase,
                in_use: i.in_use,
                use_count: i.use_count,
                idle_since: self.instant(i.idle_since),
            })
            .collect();
        let policy = self.policy(t);
        let actions = planner::plan(
            &views,
            self.queue.len(),
            &policy,
            &self.settings.limits,
            now,
        );
        for action in actions {
            match action {
                Action::Create(count) => self.create(t, count),
                Action::Delete(ids) => {
                    for id in ids {
                        if let Ok(n) = id.0.parse::<usize>() {
                            self.delete(t, n);
                        }
                    }
                }
            }
        }
    }

    /// The incumbent's rule (reference §3.2 of docs/autoscaler.md's sources).
    fn scale_baseline(&mut self, t: f64) {
        let limits = self.settings.limits.clone();
        let policy = self.policy(t);
        let capacity = limits.capacity_per_instance.max(1);
        // Provider-failed instances: removed only once the creation timeout notices them.
        let stale: Vec<usize> = self
            .live()
            .filter(|(_, i)| i.phase == Phase::Failed && t >= i.failure_noticed_at)
            .map(|(n, _)| n)
            .collect();
        for n in stale {
            self.delete(t, n);
        }
        let retired: Vec<usize> = self
            .live()
            .filter(|(_, i)| i.phase == Phase::Retiring && i.in_use == 0)
            .map(|(n, _)| n)
            .collect();
        for n in retired {
            self.delete(t, n);
        }
        let acquired: usize = self.live().map(|(_, i)| i.in_use).sum();
        let unavailable: usize = self
            .live()
            .filter(|(_, i)| i.phase == Phase::Retiring)
            .map(|(_, i)| capacity - i.in_use.min(capacity))
            .sum();
        let pending = self.queue.len();
        let demand = acquired + pending + unavailable + planner::idle_target(&policy, acquired);
        let mut wanted = demand.div_ceil(capacity);
        let cap = match limits.max_instances {
            0 => limits.max_size,
            n => n.min(limits.max_size),
        };
        wanted = wanted.min(cap);
        let live = self.live().count();
        if wanted > live {
            self.create(t, wanted - live);
        } else if wanted < live {
            let mut surplus = live - wanted;
            let mut idle: Vec<(usize, f64)> = self
                .live()
                .filter(|(_, i)| i.phase == Phase::Ready && i.in_use == 0)
                .filter(|(_, i)| t - i.idle_since >= policy.idle_time.as_secs_f64())
                .map(|(n, i)| (n, i.idle_since))
                .collect();
            idle.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(Ordering::Equal));
            for (n, _) in idle {
                if surplus == 0 {
                    break;
                }
                self.delete(t, n);
                surplus -= 1;
            }
        }
    }
}

fn free_slots(instance: &SimInstance, limits: &Limits) -> usize {
    let by_capacity = limits.capacity_per_instance.saturating_sub(instance.in_use);
    if limits.max_use_count == 0 {
        by_capacity
    } else {
        by_capacity.min(limits.max_use_count.saturating_sub(instance.use_count) as usize)
    }
}

/// The clairvoyant lower bound: each job goes where it adds the least instance time, an
/// instance booted exactly in time for it if that is cheaper; instances live from their
/// boot to their last job's end. Waiting happens only when `max_instances` is reached.
fn oracle(settings: &ScalerSettings, jobs: &[TraceJob], model: &ProviderModel) -> Outcome {
    struct Planned {
        created_at: f64,
        end: f64,
        slots: Vec<f64>,
        uses: u32,
    }
    let limits = &settings.limits;
    let capacity = limits.capacity_per_instance.max(1);
    let boot = model.boot_min_s;
    let cap = match limits.max_instances {
        0 => usize::MAX,
        n => n,
    };
    let mut instances: Vec<Planned> = Vec::new();
    let mut waits = Vec::new();
    for job in jobs {
        let t = job.arrival_s;
        let usable = |p: &Planned| limits.max_use_count == 0 || p.uses < limits.max_use_count;
        // An instance is up from its boot until its last job ends; one that ended can be
        // kept up through the gap instead (that gap then counts as its time).
        let alive = instances.iter().filter(|p| p.end > t).count();
        let mut best: Option<(usize, f64)> = None;
        for (n, p) in instances.iter().enumerate() {
            let free_now = p.slots.iter().any(|free| *free <= t);
            if !usable(p) || !free_now || (p.end <= t && alive >= cap) {
                continue;
            }
            let cost = (t + job.duration_s - p.end).max(0.0);
            if best.is_none_or(|(_, c)| cost < c) {
                best = Some((n, cost));
            }
        }
        let fresh_cost = boot + job.duration_s;
        let (n, start) = match best {
            Some((n, cost)) if cost <= fresh_cost || alive >= cap => (n, t),
            _ if alive < cap => {
                instances.push(Planned {
                    created_at: t - boot,
                    end: t,
                    slots: vec![t; capacity],
                    uses: 0,
                });
                (instances.len() - 1, t)
            }
            _ => {
                // At the cap with nothing free: the earliest slot of an instance still up.
                let mut earliest: Option<(usize, f64)> = None;
                for (n, p) in instances.iter().enumerate() {
                    if !usable(p) || p.end <= t {
                        continue;
                    }
                    let free = p.slots.iter().copied().fold(f64::INFINITY, f64::min);
                    if earliest.is_none_or(|(_, at)| free < at) {
                        earliest = Some((n, free));
                    }
                }
                match earliest {
                    Some((n, at)) => (n, at.max(t)),
                    // Every instance up is used up: the next one after the first to end.
                    None => {
                        let at = instances
                            .iter()
                            .filter(|p| p.end > t)
                            .map(|p| p.end)
                            .fold(f64::INFINITY, f64::min);
                        let at = if at.is_finite() { at } else { t };
                        instances.push(Planned {
                            created_at: at - boot,
                            end: at,
                            slots: vec![at; capacity],
                            uses: 0,
                        });
                        (instances.len() - 1, at)
                    }
                }
            }
        };
        let planned = &mut instances[n];
        let slot = planned
            .slots
            .iter_mut()
            .min_by(|a, b| a.partial_cmp(b).unwrap_or(Ordering::Equal))
            .expect("an instance has at least one slot");
        let start = start.max(*slot);
        *slot = start + job.duration_s;
        planned.uses += 1;
        planned.end = planned.end.max(start + job.duration_s);
        waits.push(start - job.arrival_s);
    }
    Outcome {
        instance_seconds: instances.iter().map(|p| p.end - p.created_at).sum(),
        instances_created: instances.len(),
        waits,
    }
}

/// How to generate a trace of realistic workdays.
#[derive(Clone, Debug)]
pub struct GeneratorSettings {
    pub days: u32,
    /// Pipelines started on an average workday.
    pub pipelines_per_day: f64,
    /// Share of pipelines that run a privileged (`pinp`) job stage.
    pub privileged_share: f64,
    /// Tag of privileged jobs.
    pub privileged_tag: String,
    pub seed: u64,
}

/// Generates a trace that starts on a Monday at 00:00: pipelines arrive as a Poisson
/// process whose rate follows the working day (morning and afternoon peaks, a lunch dip,
/// little at night, almost nothing at weekends); each pipeline has 1–4 stages of 1–8
/// parallel jobs, a stage starting when the previous one ends; durations are log-normal
/// (median about 2.5 minutes, a long tail). Deterministic for a seed.
pub fn generate(settings: &GeneratorSettings) -> Vec<TraceJob> {
    let mut rng = StdRng::seed_from_u64(settings.seed);
    // Relative pipeline rate per hour of a workday; sums to 1.
    const HOURLY: [f64; 24] = [
        0.002, 0.002, 0.002, 0.002, 0.002, 0.004, 0.01, 0.03, 0.08, 0.11, 0.12, 0.10, 0.06, 0.09,
        0.11, 0.11, 0.08, 0.05, 0.02, 0.01, 0.006, 0.004, 0.004, 0.002,
    ];
    let total: f64 = HOURLY.iter().sum();
    let mut jobs = Vec::new();
    for day in 0..settings.days {
        let weekend = day % 7 >= 5;
        let day_rate = if weekend { 0.03 } else { 1.0 } * settings.pipelines_per_day;
        for (hour, share) in HOURLY.iter().enumerate() {
            let rate_per_s = day_rate * share / total / 3600.0;
            let mut t = 0.0;
            loop {
                t += exponential(&mut rng, rate_per_s);
                if t >= 3600.0 {
                    break;
                }
                let start = f64::from(day) * 86400.0 + hour as f64 * 3600.0 + t;
                pipeline(&mut rng, start, settings, &mut jobs);
            }
        }
    }
    jobs.sort_by(|a, b| {
        a.arrival_s
            .partial_cmp(&b.arrival_s)
            .unwrap_or(Ordering::Equal)
    });
    jobs
}

fn pipeline(rng: &mut StdRng, start: f64, settings: &GeneratorSettings, jobs: &mut Vec<TraceJob>) {
    let stages = rng.random_range(1..=4);
    let privileged_stage =
        (rng.random::<f64>() < settings.privileged_share).then(|| rng.random_range(0..stages));
    let mut at = start;
    for stage in 0..stages {
        let parallel = rng.random_range(1..=8);
        let mut longest: f64 = 0.0;
        for _ in 0..parallel {
            // Log-normal: median e^5 ≈ 150 s, σ 0.8; capped at an hour.
            let duration = (5.0 + 0.8 * normal(rng)).exp().clamp(5.0, 3600.0);
            longest = longest.max(duration);
            let tags = if privileged_stage == Some(stage) {
                vec![settings.privileged_tag.clone()]
            } else {
                Vec::new()
            };
            jobs.push(TraceJob {
                arrival_s: round(at),
                duration_s: round(duration),
                tags,
            });
        }
        // The next stage starts when this one ends, plus a little coordinator latency.
        at += longest + 5.0;
    }
}

fn exponential(rng: &mut StdRng, rate: f64) -> f64 {
    if rate <= 0.0 {
        return f64::INFINITY;
    }
    -(1.0 - rng.random::<f64>()).ln() / rate
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduledPolicy;

    fn settings(
        capacity: usize,
        max_use: u32,
        max_instances: usize,
        idle_count: usize,
    ) -> ScalerSettings {
        ScalerSettings {
            runner: "test".into(),
            limits: Limits {
                capacity_per_instance: capacity,
                max_use_count: max_use,
                max_instances,
                max_size: 1000,
            },
            schedules: vec![ScheduledPolicy::always(Policy {
                idle_count,
                idle_time: Duration::from_secs(600),
                ..Policy::default()
            })],
            update_interval: Duration::from_secs(60),
            update_interval_when_expecting: Duration::from_secs(2),
            creation_timeout: Duration::from_secs(900),
            ready_timeout: Duration::from_secs(300),
            failure_threshold: 3,
            delete_instances_on_shutdown: true,
            shutdown_deletion_interval: Duration::from_secs(10),
            shutdown_deletion_retries: 3,
            deletion_retry_interval: Duration::from_secs(60),
            predictive: false,
            ledger_path: None,
        }
    }

    fn runner(settings: ScalerSettings) -> SimRunner {
        SimRunner {
            name: "test".into(),
            tags: vec![],
            run_untagged: true,
            settings,
        }
    }

    fn start() -> DateTime<Utc> {
        "2026-01-05T00:00:00Z".parse().expect("time")
    }

    fn fixed_boot() -> ProviderModel {
        ProviderModel {
            boot_min_s: 100.0,
            boot_max_s: 100.0,
            failure_rate: 0.0,
            seed: 7,
        }
    }

    #[test]
    fn a_burst_waits_one_boot_and_the_oracle_not_at_all() {
        let trace: Vec<TraceJob> = (0..5)
            .map(|_| TraceJob {
                arrival_s: 1000.0,
                duration_s: 50.0,
                tags: vec![],
            })
            .collect();
        let runners = [runner(settings(1, 1, 10, 0))];
        let report =
            simulate(&runners, &trace, &fixed_boot(), Strategy::Podfleet, start()).expect("runs");
        assert_eq!(report.jobs, 5);
        // All five instances asked for at once: every job waits exactly one boot.
        assert_eq!(report.max_wait_s, 100.0);
        assert_eq!(report.p50_wait_s, 100.0);
        assert_eq!(report.instances_created, 5);
        // Five instances, each 100 s boot + 50 s job.
        assert_eq!(report.instance_hours, round(5.0 * 150.0 / 3600.0));
        let oracle =
            simulate(&runners, &trace, &fixed_boot(), Strategy::Oracle, start()).expect("runs");
        assert_eq!(oracle.max_wait_s, 0.0);
        assert_eq!(oracle.instance_hours, report.instance_hours);
    }

    #[test]
    fn max_instances_makes_jobs_queue() {
        let trace: Vec<TraceJob> = (0..4)
            .map(|_| TraceJob {
                arrival_s: 0.0,
                duration_s: 100.0,
                tags: vec![],
            })
            .collect();
        let runners = [runner(settings(1, 0, 2, 0))];
        for strategy in [Strategy::Podfleet, Strategy::Baseline] {
            let report =
                simulate(&runners, &trace, &fixed_boot(), strategy, start()).expect("runs");
            assert_eq!(report.instances_created, 2, "{strategy:?}");
            // Two wait one boot, two wait a boot and a job.
            assert_eq!(report.max_wait_s, 200.0, "{strategy:?}");
        }
    }

    #[test]
    fn untagged_jobs_need_a_runner_that_takes_them() {
        let trace = [TraceJob {
            arrival_s: 0.0,
            duration_s: 1.0,
            tags: vec!["gpu".into()],
        }];
        let runners = [runner(settings(1, 0, 2, 0))];
        let error = simulate(&runners, &trace, &fixed_boot(), Strategy::Podfleet, start())
            .expect_err("no runner has the gpu tag");
        assert!(error.to_string().contains("trace line 1"), "{error}");
    }

    #[test]
    fn traces_are_checked_line_by_line() {
        let good = "{\"arrival_s\": 1.5, \"duration_s\": 3, \"tags\": [\"pinp\"]}\n\n{\"arrival_s\": 2, \"duration_s\": 1}\n";
        assert_eq!(read_trace(good).expect("valid").len(), 2);
        let backwards =
            "{\"arrival_s\": 5, \"duration_s\": 3}\n{\"arrival_s\": 2, \"duration_s\": 1}\n";
        let error = read_trace(backwards).expect_err("backwards");
        assert!(error.to_string().starts_with("trace line 2:"), "{error}");
        let error = read_trace("{\"arrival\": 5}").expect_err("wrong key");
        assert!(error.to_string().contains("arrival_s"), "{error}");
    }

    #[test]
    fn generated_workdays_are_deterministic_and_busy_in_office_hours() {
        let settings = GeneratorSettings {
            days: 7,
            pipelines_per_day: 100.0,
            privileged_share: 0.2,
            privileged_tag: "pinp".into(),
            seed: 3,
        };
        let trace = generate(&settings);
        assert_eq!(trace, generate(&settings));
        let office = trace
            .iter()
            .filter(|j| {
                let hour = (j.arrival_s % 86400.0) / 3600.0;
                (8.0..18.0).contains(&hour) && j.arrival_s < 5.0 * 86400.0
            })
            .count();
        assert!(office * 10 > trace.len() * 7, "{office} of {}", trace.len());
        assert!(trace.iter().any(|j| j.tags == ["pinp"]));
        assert!(trace.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s));
    }
}
