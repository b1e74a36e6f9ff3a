//! Jobs survive a manager restart (issue 4, item 5): the daemon `podfleet run` is killed
//! with SIGKILL while a job runs on a local-provider instance and started again with the
//! same state dir; the job's container ran on meanwhile under conmon, the new daemon
//! re-attaches to it and the coordinator ends up with the whole log, every line exactly once,
//! and the right status. A job whose container was removed while the daemon was down fails
//! as a system failure. Real parts: the embedded coordinator in this test process (it keeps
//! its state across the daemon's restart), the local provider, sshd and rootless Podman.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use podfleet_local_coordinator::{
    Handle, JobStatus, LocalCoordinator, LocalCoordinatorOptions, RunnerRegistration,
};

const TOKEN: &str = "glrt-restart-Tok3n-77b2";
const PASSWORD: &str = "restart-Pa55word-not-for-logs";
const LINES: usize = 40;

/// The tests here create and delete host accounts: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Numbered lines over about 20 s, then an after_script that must run after the restart.
fn counting_pipeline() -> String {
    format!(
        "counted:\n  script:\n    - 'i=1; while [ $i -le {LINES} ]; do echo \"numbered line $i\"; i=$((i+1)); sleep 0.5; done'\n  after_script:\n    - echo after-script-ran\n"
    )
}

async fn coordinator(dir: &Path, pipeline: &str) -> Handle {
    let pipeline = podfleet_local_coordinator::pipeline::parse_pipeline(pipeline, "test.yml")
        .expect("test pipeline parses");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    LocalCoordinator::start(
        listener,
        pipeline,
        vec![RunnerRegistration {
            token: TOKEN.into(),
            description: "restart".into(),
            tags: vec![],
            run_untagged: true,
        }],
        LocalCoordinatorOptions::new(dir),
    )
    .await
    .unwrap()
}

fn write_config(dir: &Path, group: &str, url: &str) -> PathBuf {
    support::LocalRunner {
        name: "restart",
        group,
        url,
        token: TOKEN,
        password: PASSWORD,
        global: "",
        plugin: "",
    }
    .write(dir)
}

/// `podfleet run` with its log in `dir/daemon-<n>.log` (a killed daemon's log stays readable).
fn start_daemon(config: &Path, dir: &Path, n: u32) -> Child {
    let log = std::fs::File::create(dir.join(format!("daemon-{n}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_podfleet"))
        .args(["run", "--config"])
        .arg(config)
        .arg("--status-socket")
        .arg(dir.join(format!("status-{n}.sock")))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn daemon_log(dir: &Path, n: u32) -> String {
    std::fs::read_to_string(dir.join(format!("daemon-{n}.log"))).unwrap_or_default()
}

fn instance_users(group: &str) -> Vec<(String, u32)> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("podfleet-instance group={group}")))
        .map(|l| {
            let fields: Vec<&str> = l.split(':').collect();
            (fields[0].to_string(), fields[2].parse().unwrap())
        })
        .collect()
}

fn trace_of(coordinator: &Handle) -> String {
    String::from_utf8_lossy(&coordinator.trace(1).unwrap_or_default()).into_owned()
}

async fn wait_for_trace(coordinator: &Handle, needle: &str, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(240);
    while Instant::now() < deadline {
        if trace_of(coordinator).contains(needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "the trace never showed {needle:?}: {}\ndaemon log:\n{}",
        trace_of(coordinator),
        daemon_log(dir, 1)
    );
}

async fn wait_for_end(coordinator: &Handle, dir: &Path) -> podfleet_local_coordinator::JobReport {
    let waited = tokio::time::timeout(Duration::from_secs(240), coordinator.wait()).await;
    let report = waited.unwrap_or_else(|_| {
        panic!(
            "the job never ended: {}\nrestarted daemon log:\n{}",
            trace_of(coordinator),
            daemon_log(dir, 2)
        )
    });
    report.job("counted").unwrap().clone()
}

fn kill(child: &mut Child, signal: i32) {
    // SAFETY: kill(2) with the pid of our own child and a constant signal.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("podfleet did not exit within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGQUIT: the daemon drains and deletes its instances (delete_instances_on_shutdown).
async fn stop_and_check_nothing_left(daemon: &mut Child, group: &str, dir: &Path) {
    kill(daemon, libc::SIGQUIT);
    let exit = wait_exit(daemon, Duration::from_secs(180)).await;
    assert!(exit.success(), "{exit:?}\n{}", daemon_log(dir, 2));
    assert_eq!(instance_users(group), Vec::new(), "an instance was leaked");
    for n in [1, 2] {
        let log = daemon_log(dir, n);
        assert!(!log.contains(PASSWORD) && !log.contains(TOKEN), "{log}");
    }
}

/// A Docker API request as root on an instance's Podman socket.
async fn engine_request(uid: u32, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = format!("/run/user/{uid}/podman/podman.sock");
    let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let request = format!("{method} {path} HTTP/1.0\r\nHost: d\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_a_sigkill_of_the_manager_with_its_whole_log() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let group = "rsta";
    let coordinator = coordinator(dir.path(), &counting_pipeline()).await;
    let config = write_config(dir.path(), group, &coordinator.url);

    let mut first = start_daemon(&config, dir.path(), 1);
    wait_for_trace(&coordinator, "numbered line 6\n", dir.path()).await;
    kill(&mut first, libc::SIGKILL);
    wait_exit(&mut first, Duration::from_secs(10)).await;
    let at_kill = trace_of(&coordinator);
    let users = instance_users(group);
    assert_eq!(
        users.len(),
        1,
        "the instance outlives the manager: {users:?}"
    );
    // The job's container runs on without a manager: its log grows on the instance.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let inspect = engine_request(
        users[0].1,
        "GET",
        "/v1.41/containers/podfleet-job-1-build/json",
    )
    .await;
    assert!(
        inspect.contains("\"Running\":true"),
        "the job's container died with the manager: {inspect}"
    );

    let mut second = start_daemon(&config, dir.path(), 2);
    let job = wait_for_end(&coordinator, dir.path()).await;
    let trace = trace_of(&coordinator);
    let log = daemon_log(dir.path(), 2);
    assert_eq!(job.status, JobStatus::Success, "{trace}\n{log}");
    assert!(
        trace.starts_with(&at_kill[..at_kill.rfind('\n').unwrap()]),
        "the log so far was rewritten:\n{at_kill}\n---\n{trace}"
    );
    let numbered: Vec<&str> = trace
        .lines()
        .filter(|l| l.starts_with("numbered line "))
        .collect();
    let expected: Vec<String> = (1..=LINES).map(|i| format!("numbered line {i}")).collect();
    assert_eq!(
        numbered, expected,
        "every line exactly once, in order:\n{trace}"
    );
    assert!(trace.contains("after-script-ran"), "{trace}");
    assert!(
        trace.contains("re-attached to this job after a manager restart"),
        "{trace}"
    );
    assert!(trace.contains("Job succeeded"), "{trace}");
    assert!(
        log.contains("re-attached to the job's build container"),
        "{log}"
    );

    stop_and_check_nothing_left(&mut second, group, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_container_was_removed_while_the_manager_was_down_is_a_system_failure() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let group = "rstb";
    let coordinator = coordinator(dir.path(), &counting_pipeline()).await;
    let config = write_config(dir.path(), group, &coordinator.url);

    let mut first = start_daemon(&config, dir.path(), 1);
    wait_for_trace(&coordinator, "numbered line 3\n", dir.path()).await;
    kill(&mut first, libc::SIGKILL);
    wait_exit(&mut first, Duration::from_secs(10)).await;
    let users = instance_users(group);
    assert_eq!(users.len(), 1, "{users:?}");
    let removed = engine_request(
        users[0].1,
        "DELETE",
        "/v1.41/containers/podfleet-job-1-build?force=true",
    )
    .await;
    assert!(
        removed.starts_with("HTTP/1.0 204") || removed.starts_with("HTTP/1.1 204"),
        "{removed}"
    );

    let mut second = start_daemon(&config, dir.path(), 2);
    let job = wait_for_end(&coordinator, dir.path()).await;
    let trace = trace_of(&coordinator);
    assert_eq!(job.status, JobStatus::Failed, "{trace}");
    assert_eq!(
        job.failure_reason.as_deref(),
        Some("runner_system_failure"),
        "{trace}"
    );
    assert!(
        trace.contains("podfleet-job-1-build") && trace.contains("is gone"),
        "{trace}"
    );
    assert!(!trace.contains("after-script-ran"), "{trace}");

    stop_and_check_nothing_left(&mut second, group, dir.path()).await;
}
