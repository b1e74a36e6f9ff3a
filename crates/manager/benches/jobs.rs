//! One manager holding 1,000 concurrent jobs: `cargo bench -p podfleet-manager --bench jobs`
//! (`-- --jobs N --seconds S` to change the load). Prints peak RSS (VmHWM), CPU per second of
//! wall time (getrusage) while all jobs run, jobs/s, and the ledger's commit times. Not a
//! test: it asserts nothing but that every job ended successfully.
//!
//! Real: the manager (poll loop under `concurrent`, two-phase acceptance, payload → JobSpec,
//! masking, the trace uploader with its journal file, keep-alives, final updates), the
//! coordinator client over HTTP on 127.0.0.1, the autoscaler loop with its planner and a redb
//! ledger file, instance readiness and slot release.
//! Faked: the coordinator (a small in-process HTTP server answering the runner API: jobs,
//! 202 trace patches with `Range`, 200 updates), the provider (instances exist as soon as
//! they are asked for) and, through the manager's `JobEngine` seam, SSH and the instances'
//! container engines: a job "runs" by writing one log line a second for its duration.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post, put};
use podfleet_executor::{Cancellation, JobOutcome, JobSpec, TraceSink};
use podfleet_manager::{JobEngine, Manager, RunnerSetup, Shutdown};
use podfleet_provider::{
    ConnectInfo, InstanceId, InstanceState, Provider, ProviderError, ProviderInfo, ProviderInstance,
};

fn argument(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    // Under `cargo test` one small round checks that it runs.
    let jobs = argument("--jobs", if bench { 1000 } else { 20 });
    let seconds = argument("--seconds", if bench { 120 } else { 5 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(jobs, Duration::from_secs(seconds)));
}

// ---- the coordinator stand-in ---------------------------------------------------------------

#[derive(Default)]
struct Coordinator {
    jobs: u64,
    issued: AtomicU64,
    finished: AtomicU64,
    failed: AtomicU64,
    trace_bytes: AtomicU64,
    patches: AtomicU64,
    sizes: Mutex<HashMap<u64, u64>>,
}

fn payload(id: u64) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "token": format!("glcbt-bench-{id:06}-secret"),
        "job_info": {"id": id, "name": format!("job-{id}"), "stage": "test", "project_id": 1},
        "git_info": {"repo_url": "http://127.0.0.1/bench.git", "ref": "main", "sha": "0123456789abcdef0123456789abcdef01234567", "depth": 1},
        "runner_info": {"timeout": 3600},
        "variables": [
            {"key": "CI_JOB_ID", "value": id.to_string(), "public": true, "masked": false},
            {"key": "DEPLOY_PASSWORD", "value": format!("s3cr3t-{id:06}-value"), "public": false, "masked": true}
        ],
        "steps": [{"name": "script", "script": ["./run-tests.sh"], "timeout": 3600, "when": "on_success", "allow_failure": false}],
        "image": {"name": "localhost/podfleet/busybox:latest"},
        "features": {"trace_sections": true, "failure_reasons": ["script_failure", "runner_system_failure"]}
    })
}

async fn verify() -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        r#"{"id":1,"token":"glrt-bench","token_expires_at":null}"#,
    )
        .into_response()
}

async fn request_job(State(state): State<Arc<Coordinator>>) -> Response {
    let id = state.issued.fetch_add(1, Ordering::SeqCst) + 1;
    if id > state.jobs {
        state.issued.fetch_sub(1, Ordering::SeqCst);
        return StatusCode::NO_CONTENT.into_response();
    }
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        payload(id).to_string(),
    )
        .into_response()
}

async fn update_job(
    State(state): State<Arc<Coordinator>>,
    Path(_id): Path<u64>,
    body: String,
) -> Response {
    let update: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    match update["state"].as_str() {
        Some("success") => {
            state.finished.fetch_add(1, Ordering::SeqCst);
        }
        Some("failed") => {
            state.failed.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    }
    (StatusCode::OK, [("job-status", "running")], "").into_response()
}

async fn patch_trace(
    State(state): State<Arc<Coordinator>>,
    Path(id): Path<u64>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let start: u64 = headers
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut sizes = state.sizes.lock().expect("sizes");
    let size = sizes.entry(id).or_default();
    if start != *size {
        let range = format!("0-{size}");
        return (StatusCode::RANGE_NOT_SATISFIABLE, [("range", range)]).into_response();
    }
    *size += body.len() as u64;
    state
        .trace_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    state.patches.fetch_add(1, Ordering::Relaxed);
    let range = format!("0-{size}");
    (
        StatusCode::ACCEPTED,
        [
            ("range", range),
            ("job-status", "running".to_string()),
            ("x-gitlab-trace-update-interval", "3".to_string()),
        ],
    )
        .into_response()
}

// ---- the provider and engine stand-ins ------------------------------------------------------

#[derive(Default)]
struct InstantGroup {
    next: AtomicU64,
    instances: Mutex<BTreeMap<String, ()>>,
}

#[async_trait]
impl Provider for InstantGroup {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "bench".into(),
            max_size: 100_000,
        }
    }

    async fn list(&self) -> Result<Vec<ProviderInstance>, ProviderError> {
        let instances = self.instances.lock().expect("instances");
        Ok(instances
            .keys()
            .map(|id| ProviderInstance {
                id: InstanceId(id.clone()),
                state: InstanceState::Running,
            })
            .collect())
    }

    async fn increase(&self, count: usize) -> Result<usize, ProviderError> {
        let mut instances = self.instances.lock().expect("instances");
        for _ in 0..count {
            let n = self.next.fetch_add(1, Ordering::SeqCst);
            instances.insert(format!("bench-{n:05}"), ());
        }
        Ok(count)
    }

    async fn decrease(&self, ids: &[InstanceId]) -> Result<Vec<InstanceId>, ProviderError> {
        let mut instances = self.instances.lock().expect("instances");
        for id in ids {
            instances.remove(&id.0);
        }
        Ok(ids.to_vec())
    }

    async fn connect_info(&self, id: &InstanceId) -> Result<ConnectInfo, ProviderError> {
        Ok(ConnectInfo {
            internal_addr: format!("127.0.0.1 ({id})"),
            ..Default::default()
        })
    }
}

/// Runs a job by writing a numbered line a second for `duration`.
struct TickingEngine {
    duration: Duration,
    running: AtomicU64,
}

#[async_trait]
impl JobEngine for TickingEngine {
    async fn check(&self, _: &InstanceId, _: &ConnectInfo) -> Result<(), String> {
        Ok(())
    }

    async fn run(
        &self,
        _: &InstanceId,
        job: &JobSpec,
        trace: TraceSink,
        cancel: Cancellation,
    ) -> JobOutcome {
        self.running.fetch_add(1, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let mut tick = 0u64;
        let outcome = loop {
            if started.elapsed() >= self.duration {
                break JobOutcome::Success;
            }
            tick += 1;
            // The masked variable appears in the output, as leaked secrets do.
            let secret = job
                .variables
                .iter()
                .find(|v| v.key == "DEPLOY_PASSWORD")
                .map_or("", |v| v.value.as_str());
            trace(format!("job {} line {tick}: deploying with {secret}\n", job.job_id).as_bytes());
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = cancel.hard.cancelled() => break JobOutcome::Canceled,
            }
        };
        self.running.fetch_sub(1, Ordering::SeqCst);
        outcome
    }
}

// ---- measurement ----------------------------------------------------------------------------

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage(2) fills the zeroed struct we own; no other memory is involved.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

async fn run(jobs: u64, duration: Duration) {
    let state_dir = tempfile::tempdir().expect("a temporary state dir");
    let coordinator = Arc::new(Coordinator {
        jobs,
        ..Default::default()
    });
    let app = Router::new()
        .route("/api/v4/runners/verify", post(verify))
        .route("/api/v4/jobs/request", post(request_job))
        .route("/api/v4/jobs/{id}", put(update_job))
        .route("/api/v4/jobs/{id}/trace", patch(patch_trace))
        .with_state(coordinator.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let url = format!("http://{}/", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let config_text = format!(
        r#"
concurrent = {jobs}
check_interval = 1
podfleet_state_dir = "{state}"

[[runners]]
name = "bench"
url = "{url}"
token = "glrt-bench-token"
executor = "docker-autoscaler"
[runners.docker]
image = "localhost/podfleet/busybox:latest"
[runners.autoscaler]
plugin = "bench"
capacity_per_instance = 1
max_use_count = 0
max_instances = {jobs}
update_interval = "1s"
update_interval_when_expecting = "200ms"
delete_instances_on_shutdown = true
[[runners.autoscaler.policy]]
idle_count = 0
idle_time = "1m"
"#,
        state = state_dir.path().display()
    );
    let config = podfleet_config::parse(&config_text, "bench.toml")
        .expect("the bench config is valid")
        .config;
    let provider: Arc<dyn Provider> = Arc::new(InstantGroup::default());
    let runners = vec![RunnerSetup {
        config: config.runners[0].clone(),
        provider,
    }];
    let engine = Arc::new(TickingEngine {
        duration,
        running: AtomicU64::new(0),
    });
    let manager =
        Manager::new(config, runners, "s_bench0000001".into()).with_engine(engine.clone());
    let telemetry = manager.telemetry();
    let (stop, shutdown) = tokio::sync::watch::channel(Shutdown::Running);
    let started = Instant::now();
    let cpu_start = cpu_time();
    let manager_task = tokio::spawn(manager.run(shutdown));

    println!("{jobs} jobs of {duration:?} each, one line a second; 2 tokio worker threads");
    // Ramp: until every job runs.
    let mut last_print = Instant::now();
    while engine.running.load(Ordering::SeqCst) < jobs {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if last_print.elapsed() >= Duration::from_secs(5) {
            println!(
                "  ramp {:>5.1}s: {} running",
                started.elapsed().as_secs_f64(),
                engine.running.load(Ordering::SeqCst)
            );
            last_print = Instant::now();
        }
        if started.elapsed() > duration {
            println!(
                "  only {} jobs ran at once before the first ended",
                engine.running.load(Ordering::SeqCst)
            );
            break;
        }
    }
    let ramp = started.elapsed();
    let ramp_cpu = cpu_time() - cpu_start;
    println!(
        "ramp to {} concurrent jobs: {:.1}s ({:.0} jobs/s accepted and started), CPU {:.2} s/s",
        engine.running.load(Ordering::SeqCst),
        ramp.as_secs_f64(),
        jobs as f64 / ramp.as_secs_f64(),
        ramp_cpu.as_secs_f64() / ramp.as_secs_f64()
    );
    // Steady state: all jobs running, tracing and being kept alive.
    let window = (duration.saturating_sub(ramp) / 2).max(Duration::from_secs(1));
    let (cpu_before, wall_before, bytes_before) = (
        cpu_time(),
        Instant::now(),
        coordinator.trace_bytes.load(Ordering::Relaxed),
    );
    tokio::time::sleep(window).await;
    let steady_wall = wall_before.elapsed();
    let steady_cpu = cpu_time() - cpu_before;
    let steady_running = engine.running.load(Ordering::SeqCst);
    let steady_bytes = coordinator.trace_bytes.load(Ordering::Relaxed) - bytes_before;
    println!(
        "steady state over {:.1}s with {steady_running} jobs running: CPU {:.3} s/s (cores), trace {:.0} KiB/s uploaded, peak RSS so far {:.1} MiB",
        steady_wall.as_secs_f64(),
        steady_cpu.as_secs_f64() / steady_wall.as_secs_f64(),
        steady_bytes as f64 / 1024.0 / steady_wall.as_secs_f64(),
        peak_rss_kib() as f64 / 1024.0
    );
    // The end: every final update.
    while coordinator.finished.load(Ordering::SeqCst) + coordinator.failed.load(Ordering::SeqCst)
        < jobs
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = started.elapsed();
    let total_cpu = cpu_time() - cpu_start;
    println!(
        "all {} jobs ended ({} failed) in {:.1}s: {:.1} jobs/s overall, CPU {:.3} s/s on average; {} patches, {:.1} MiB of trace",
        jobs,
        coordinator.failed.load(Ordering::SeqCst),
        total.as_secs_f64(),
        jobs as f64 / total.as_secs_f64(),
        total_cpu.as_secs_f64() / total.as_secs_f64(),
        coordinator.patches.load(Ordering::Relaxed),
        coordinator.trace_bytes.load(Ordering::Relaxed) as f64 / 1024.0 / 1024.0
    );
    if let Some(ledger) = telemetry.scaler("bench").as_ref().and_then(|s| s.ledger()) {
        let commits = ledger.commit_times();
        println!(
            "ledger commits (under the autoscaler's lock): {} commits, p50 {:?}, p99 {:?}, max {:?}",
            commits.count, commits.p50, commits.p99, commits.max
        );
    }
    println!(
        "peak RSS (VmHWM): {:.1} MiB",
        peak_rss_kib() as f64 / 1024.0
    );
    stop.send_replace(Shutdown::Graceful);
    let _ = manager_task.await;
    assert_eq!(
        coordinator.failed.load(Ordering::SeqCst),
        0,
        "every job succeeds"
    );
}
