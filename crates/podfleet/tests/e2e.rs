//! End-to-end tests of `podfleet` through the real parts: the embedded coordinator, the
//! local provider's instance users with rootless Podman, the managed sshd, russh, and the
//! Docker API of Podman. They need the host prepared by `scripts/setup-host.sh` and root.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PASSWORD: &str = "e2e-Pa55word-that-must-not-leak";
/// Jobs of the e2e pipeline without tags: they must all run on the unprivileged runner.
const UNTAGGED_JOBS: [&str; 5] = [
    "untagged-1",
    "untagged-2",
    "untagged-3",
    "exit-three",
    "missing-image",
];
const TOKENS: [&str; 2] = [
    "glrt-e2e-unprivileged-Tok3n-91c7",
    "glrt-e2e-privileged-Tok3n-44d2",
];

fn podfleet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_podfleet"))
}

fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Writes the e2e config with its own state dir and group names.
fn config_in(dir: &Path, group: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(data("e2e-config.toml"))
        .unwrap()
        .replace("@STATE_DIR@", &dir.join("state").display().to_string())
        .replace("@GROUP@", group);
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn instance_users(group_prefix: &str) -> Vec<String> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("podfleet-instance group={group_prefix}")))
        .map(|l| l.split(':').next().unwrap().to_string())
        .collect()
}

fn sshd_running_for(state_dir: &Path) -> bool {
    let needle = state_dir.display().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(&needle))
            .unwrap_or(false)
    })
}

/// Asserts that nothing of the test's instances is left on the host.
fn assert_nothing_left(dir: &Path, group: &str) {
    assert_eq!(
        instance_users(group),
        Vec::<String>::new(),
        "instance users left behind"
    );
    assert!(
        !sshd_running_for(&dir.join("state")),
        "managed sshd left running"
    );
    let homes: Vec<_> = std::fs::read_dir("/home")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("pf-{group}"))
        })
        .collect();
    assert!(homes.is_empty(), "home directories left: {homes:?}");
}

/// CapEff of each job, parsed from the prefixed job log lines.
fn cap_bits(stdout: &str, job: &str) -> u32 {
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{job} |")) && l.contains("CapEff:"))
        .unwrap_or_else(|| panic!("no CapEff line for {job} in:\n{stdout}"));
    let hex = line.rsplit(['\t', ' ']).next().unwrap().trim();
    u64::from_str_radix(hex, 16).unwrap().count_ones()
}

/// A `podfleet pipeline` running in the background, its stdout collected line by line.
struct Background {
    child: std::process::Child,
    seen: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Background {
    /// Starts `podfleet pipeline --file FILE --config CONFIG` and `extra` arguments.
    fn start(file: &Path, config: &Path, extra: &[&std::ffi::OsStr]) -> Self {
        let mut child = podfleet()
            .args(["pipeline", "--file"])
            .arg(file)
            .arg("--config")
            .arg(config)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        let reader = {
            let seen = seen.clone();
            let stdout = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    seen.lock().unwrap().push_str(&format!("{line}\n"));
                }
            })
        };
        Self {
            child,
            seen,
            reader,
        }
    }

    /// Waits until the output holds `text` (two minutes at most).
    fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.seen.lock().unwrap().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} within 120s:\n{}",
                self.seen.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` to the pipeline process.
    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// Waits for the pipeline to end (four minutes at most): its status and whole output.
    fn finish(mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(240);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the pipeline did not end:\n{}",
                self.seen.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        self.reader.join().unwrap();
        let out = self.seen.lock().unwrap().clone();
        (status, out)
    }
}

#[test]
fn pipeline_routes_by_tag_isolates_privileges_fails_and_cleans_up() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let group = "e2ea";
    let config = config_in(dir.path(), group);
    let report_path = dir.path().join("report.json");
    let output = podfleet()
        .args(["pipeline", "--file"])
        .arg(data("e2e-pipeline.yml"))
        .arg("--config")
        .arg(&config)
        .arg("--report")
        .arg(&report_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let all = format!("{stdout}\n{stderr}");
    // A job failed, so the pipeline failed: exit 1.
    assert_eq!(output.status.code(), Some(1), "{all}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(report["status"], "failed");
    let job = |name: &str| {
        report["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["name"] == name)
            .unwrap_or_else(|| panic!("job {name} missing from {report}"))
            .clone()
    };
    // Untagged jobs never run on the privileged runner; the tagged one only there.
    for name in UNTAGGED_JOBS {
        assert_eq!(job(name)["runner"], "unprivileged", "{name}: {all}");
    }
    assert_eq!(job("privileged")["runner"], "privileged", "{all}");
    for name in ["untagged-1", "untagged-2", "untagged-3", "privileged"] {
        assert_eq!(job(name)["status"], "success", "{name}: {all}");
    }
    // A non-zero exit fails the job, with its exit code in the report.
    assert_eq!(job("exit-three")["status"], "failed");
    assert_eq!(job("exit-three")["exit_code"], 3);
    // A missing image fails that job with a message naming the image.
    assert_eq!(job("missing-image")["status"], "failed");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("missing-image |") && l.contains("localhost/does-not-exist:1")),
        "{all}"
    );
    // Privileged containers get the full capability set; unprivileged ones do not.
    let privileged = cap_bits(&stdout, "privileged");
    let unprivileged = cap_bits(&stdout, "untagged-1");
    assert!(
        privileged >= 38,
        "privileged job has only {privileged} capabilities"
    );
    assert!(
        unprivileged <= 16,
        "unprivileged job has {unprivileged} capabilities"
    );
    // max_use_count = 2 with one instance at a time: five untagged jobs need three instances,
    // none used more than twice.
    let mut uses = std::collections::HashMap::new();
    for name in UNTAGGED_JOBS {
        let instance = job(name)["instance"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            instance.starts_with(&format!("pf-{group}u-")),
            "{name} ran on {instance:?}"
        );
        *uses.entry(instance).or_insert(0) += 1;
    }
    assert!(
        uses.values().all(|&n| n <= 2),
        "an instance ran more than max_use_count jobs: {uses:?}"
    );
    assert!(uses.len() >= 3, "instances were not retired: {uses:?}");
    assert!(stdout.contains("retiring (max_use_count)"), "{all}");
    // An instance's second job reuses the SSH session of its first.
    assert!(
        stdout.contains("(job 2 of this instance, SSH session kept from its last job)"),
        "{all}"
    );
    // The instances were created and deleted, and the output says so.
    assert!(
        stdout.contains("created and ready") && stdout.contains("deleting instance"),
        "{all}"
    );
    // No secret from the config appears in any output.
    let report_text = std::fs::read_to_string(&report_path).unwrap();
    for secret in [PASSWORD, TOKENS[0], TOKENS[1]] {
        assert!(!all.contains(secret), "secret leaked into the output");
        assert!(
            !report_text.contains(secret),
            "secret leaked into the report"
        );
    }
    assert_nothing_left(dir.path(), group);
}

/// The first Ctrl-C cancels like GitLab's cancel button (the job goes `canceling`, its
/// script stops, its after_script runs); the instances are deleted either way.
#[test]
fn ctrl_c_cancels_running_jobs_runs_their_after_script_and_deletes_instances() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let group = "e2eb";
    let config = config_in(dir.path(), group);
    let pipeline = Background::start(&data("sleep-pipeline.yml"), &config, &[]);
    pipeline.wait_for("started sleeping");
    pipeline.signal(libc::SIGINT);
    let (status, out) = pipeline.finish();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("job long canceling"), "{out}");
    assert!(
        out.contains("after_script ran with CI_JOB_STATUS=canceled"),
        "{out}"
    );
    assert!(out.contains("job long canceled"), "{out}");
    assert!(!out.contains("job long failed"), "{out}");
    assert_nothing_left(dir.path(), group);
}

/// A pipeline killed outright leaves its instance and its running job on record; the next
/// pipeline does not try to carry that job on (its coordinator died with the first one): it
/// deletes the instance, runs its own job and leaves nothing.
#[test]
fn a_pipeline_killed_mid_job_is_cleaned_up_by_the_next_one() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let group = "e2ek";
    let config = config_in(dir.path(), group);
    let pipeline = Background::start(&data("sleep-pipeline.yml"), &config, &[]);
    pipeline.wait_for("started sleeping");
    pipeline.signal(libc::SIGKILL);
    let _ = pipeline.finish();
    let left = instance_users(&format!("{group}u"));
    assert_eq!(left.len(), 1, "the killed pipeline's instance: {left:?}");

    let quick = dir.path().join("quick.yml");
    std::fs::write(&quick, "quick:\n  script:\n    - echo quick job ran\n").unwrap();
    let output = podfleet()
        .args(["pipeline", "--file"])
        .arg(&quick)
        .arg("--config")
        .arg(&config)
        .env("PODFLEET_LOG", "info")
        .output()
        .unwrap();
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(0), "{all}");
    assert!(all.contains("quick job ran"), "{all}");
    assert!(all.contains("giving up a job an earlier run left"), "{all}");
    assert!(!all.contains("resuming a job"), "{all}");
    assert!(!all.contains("trace patch failed"), "{all}");
    assert!(
        !instance_users(&format!("{group}u")).contains(&left[0]),
        "the killed pipeline's instance is still there:\n{all}"
    );
    assert_nothing_left(dir.path(), group);
}

/// An instance that disappears under a running job (every process of its user killed, as
/// when a cloud deletes the VM) fails that job as a system failure; the manager stays healthy:
/// the broken instance is replaced (the runner allows one instance), the next job runs on the
/// new one, and nothing is left behind.
#[test]
fn an_instance_that_disappears_mid_job_fails_it_as_a_system_failure_and_the_pipeline_goes_on() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let group = "e2ev";
    let config = config_in(dir.path(), group);
    let report_path = dir.path().join("report.json");
    let pipeline = Background::start(
        &data("vanish-pipeline.yml"),
        &config,
        &["--report".as_ref(), report_path.as_os_str()],
    );
    pipeline.wait_for("started sleeping");
    let users = instance_users(&format!("{group}u"));
    assert_eq!(users.len(), 1, "{users:?}");
    // The instance goes away: its Podman service, conmon, the job's processes and its SSH
    // sessions, all at once.
    let killed = Command::new("pkill")
        .args(["-KILL", "-u", &users[0]])
        .status()
        .unwrap();
    assert!(killed.success(), "nothing to kill for {}", users[0]);

    let (status, out) = pipeline.finish();
    assert_eq!(status.code(), Some(1), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let job = |name: &str| {
        report["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|job| job["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no job {name} in {report}"))
    };
    let long = job("long");
    assert_eq!(long["status"], "failed", "{out}");
    assert_eq!(long["failure_reason"], "runner_system_failure", "{out}");
    let next = job("next");
    assert_eq!(next["status"], "success", "{out}");
    assert_ne!(
        long["instance"], next["instance"],
        "the next job ran on the vanished instance: {report}"
    );
    assert!(out.contains("the next job ran"), "{out}");
    assert_nothing_left(dir.path(), group);
}

/// The pipeline announces its stages: the privileged runner's two instances for the second
/// stage are asked for at once, while the first stage still runs on the other runner.
#[test]
fn a_parallel_stage_gets_its_instances_while_the_stage_before_runs() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let group = "e2en";
    let config = config_in(dir.path(), group);
    let output = podfleet()
        .args(["pipeline", "--file"])
        .arg(data("announce-pipeline.yml"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let all = format!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{all}");
    let at = |needle: &str| {
        stdout
            .find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{all}"))
    };
    assert!(
        at("[privileged] creating 2 instance(s)") < at("job first success"),
        "{all}"
    );
    assert_nothing_left(dir.path(), group);
}

#[test]
fn config_check_reports_every_problem_with_line_and_column() {
    let output = podfleet()
        .args(["config", "check"])
        .arg(data("bad-config.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for expected in [
        "bad-config.toml:1:14:",
        "bad-config.toml:3:1:",
        "bad-config.toml:7:9:",
        "bad-config.toml:11:1:",
        "idle_tme",
        "bad-config.toml:12:17:",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("glrt-bad-config-secret-token"),
        "token leaked:\n{stderr}"
    );

    let output = podfleet()
        .args(["config", "check"])
        .arg(data("seed-appendix-a.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    for secret in [
        "example-password-123",
        "glrt-unprivileged-token-0001",
        "glrt-privileged-token-0002",
    ] {
        assert!(
            !stdout.contains(secret) && !String::from_utf8_lossy(&output.stderr).contains(secret)
        );
    }
}

#[test]
fn unreadable_inputs_exit_2() {
    let output = podfleet()
        .args(["config", "check", "/nonexistent/config.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/config.toml"));
    let output = podfleet()
        .args(["pipeline", "--file", "/nonexistent/.gitlab-ci.yml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/.gitlab-ci.yml"));
}

/// `podfleet run` against a coordinator URL (here the embedded coordinator, served by the
/// test itself): the daemon takes the job, and SIGQUIT drains it and deletes the instances.
#[test]
fn run_daemon_serves_a_coordinator_and_drains_on_sigquit() {
    use podfleet_local_coordinator::{
        LocalCoordinator, LocalCoordinatorOptions, RunnerRegistration,
    };
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let group = "e2ec";
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pipeline = podfleet_local_coordinator::parse_pipeline(
        "only:\n  script:\n    - echo served by the daemon\n",
        "inline",
    )
    .unwrap();
    let runners = vec![
        RunnerRegistration {
            token: TOKENS[0].into(),
            description: "unprivileged".into(),
            tags: vec![],
            run_untagged: true,
        },
        RunnerRegistration {
            token: TOKENS[1].into(),
            description: "privileged".into(),
            tags: vec!["pinp".into()],
            run_untagged: false,
        },
    ];
    let coordinator = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        LocalCoordinator::start(
            listener,
            pipeline,
            runners,
            LocalCoordinatorOptions::new(dir.path()),
        )
        .await
        .unwrap()
    });
    let config = config_in(dir.path(), group);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "url = \"http://127.0.0.1/\"",
        &format!("url = {:?}", coordinator.url),
    );
    std::fs::write(&config, text).unwrap();
    let mut child = podfleet()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--status-socket")
        .arg(dir.path().join("status.sock"))
        .spawn()
        .unwrap();
    let report = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(180), coordinator.wait()).await
    });
    let pid = child.id() as i32;
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    let status = child.wait().unwrap();
    let report = report.expect("the daemon never finished the job");
    assert_eq!(report.jobs[0].status.as_str(), "success", "{report:?}");
    assert_eq!(report.jobs[0].runner.as_deref(), Some("unprivileged"));
    let trace = String::from_utf8_lossy(&coordinator.trace(1).unwrap_or_default()).into_owned();
    assert!(trace.contains("served by the daemon"), "{trace}");
    assert!(status.success(), "daemon exit: {status}");
    assert_nothing_left(dir.path(), group);
}
