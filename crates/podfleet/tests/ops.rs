//! Operating the daemon: `podfleet run` under a service manager (sd_notify readiness and
//! stopping), SIGQUIT draining a running job to its end, `podfleet status` and `/metrics`
//! while a job runs, and `podfleet doctor` with each check broken on purpose. Real parts:
//! the embedded coordinator in this test process, the local provider, sshd and Podman.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;

use podfleet_local_coordinator::{
    Handle, JobStatus, LocalCoordinator, LocalCoordinatorOptions, RunnerRegistration,
};

const TOKEN: &str = "glrt-ops-Tok3n-5a1e";

/// The tests here change host accounts on purpose (subordinate ids, passwords, killed
/// services): one at a time, so that no test sees another's breakage.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const PASSWORD: &str = "ops-Pa55word-not-for-logs";

fn podfleet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_podfleet"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A config for one runner on the local provider, talking to `url`.
fn write_config(dir: &Path, group: &str, url: &str, extra_global: &str) -> PathBuf {
    support::LocalRunner {
        name: "ops",
        group,
        url,
        token: TOKEN,
        password: PASSWORD,
        global: extra_global,
        plugin: "",
    }
    .write(dir)
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
            description: "ops".into(),
            tags: vec![],
            run_untagged: true,
        }],
        LocalCoordinatorOptions::new(dir),
    )
    .await
    .unwrap()
}

fn instance_users(group: &str) -> Vec<String> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("podfleet-instance group={group}")))
        .map(|l| l.split(':').next().unwrap().to_string())
        .collect()
}

fn status_json(socket: &Path) -> Option<serde_json::Value> {
    let output = podfleet()
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).unwrap())
}

/// Polls `podfleet status` until `accept` says yes.
async fn wait_for_status(
    socket: &Path,
    what: &str,
    accept: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(status) = status_json(socket) {
            if accept(&status) {
                return status;
            }
            last = Some(status);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("status never showed {what}; last: {last:#?}");
}

fn send_signal(child: &Child, signal: i32) {
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

fn notifications(socket: &UnixDatagram) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_drains_a_running_job_while_status_and_metrics_show_it() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let group = "opsq";
    let coordinator = coordinator(
        dir.path(),
        "drained:\n  script:\n    - echo drain-started\n    - sleep 15\n    - echo drain-finished\n",
    )
    .await;
    let metrics_port = free_port();
    let config = write_config(
        dir.path(),
        group,
        &coordinator.url,
        &format!("listen_address = \"127.0.0.1:{metrics_port}\"\nlog_format = \"json\""),
    );
    let socket = dir.path().join("status.sock");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut daemon = podfleet()
        .args(["run", "--config"])
        .arg(&config)
        .arg("--status-socket")
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let status = wait_for_status(&socket, "the job running on an instance", |s| {
        s["jobs"]
            .as_array()
            .is_some_and(|jobs| jobs.iter().any(|j| j["phase"] == "running"))
    })
    .await;
    let job = &status["jobs"][0];
    assert_eq!(job["name"], "drained");
    assert_eq!(job["runner"], "ops");
    let instance = job["instance"].as_str().unwrap().to_string();
    assert!(instance.starts_with(&format!("pf-{group}-")), "{status:#}");
    let listed = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == instance.as_str())
        .unwrap_or_else(|| panic!("instance {instance} missing from {status:#}"));
    assert_eq!(listed["jobs"][0], job["id"]);
    assert_eq!(status["mode"], "running");

    let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("podfleet_jobs{runner=\"ops\",phase=\"running\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("podfleet_coordinator_request_duration_seconds_count{endpoint=\"request_job\",status=\"201\"} 1"),
        "{metrics}"
    );

    // SIGHUP reloads what can change live; a broken file is refused and the old config stays.
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        original.replace("concurrent = 2", "concurrent = 3"),
    )
    .unwrap();
    send_signal(&daemon, libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(&config, "concurrent = \"many\"\n").unwrap();
    // Noticed by the file check (every 3 s) without a signal.
    tokio::time::sleep(Duration::from_secs(4)).await;
    std::fs::write(&config, &original).unwrap();
    let still = status_json(&socket).expect("the daemon survived the reloads");
    assert_eq!(still["jobs"].as_array().unwrap().len(), 1, "{still:#}");

    // SIGQUIT: no new jobs, the running one finishes, then the instance is deleted.
    send_signal(&daemon, libc::SIGQUIT);
    let draining = wait_for_status(&socket, "draining mode", |s| s["mode"] == "draining").await;
    assert_eq!(
        draining["jobs"].as_array().unwrap().len(),
        1,
        "{draining:#}"
    );
    let exit = wait_exit(&mut daemon, Duration::from_secs(180)).await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(exit.success(), "{exit:?}\n{stderr}");
    let report = coordinator.snapshot();
    let drained = report.job("drained").unwrap();
    assert_eq!(drained.status, JobStatus::Success, "{stderr}");
    let trace = String::from_utf8_lossy(&coordinator.trace(1).unwrap_or_default()).into_owned();
    assert!(trace.contains("drain-finished"), "{trace}");

    let seen = notifications(&notify);
    let position = |state: &str| {
        seen.iter()
            .position(|n| n.contains(state))
            .unwrap_or_else(|| panic!("{state} never sent: {seen:?}"))
    };
    assert!(position("READY=1") < position("STOPPING=1"), "{seen:?}");
    // log_format = "json": every log line is a JSON object with logrus's keys.
    for line in stderr.lines().filter(|l| l.starts_with('{')) {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            value["level"].is_string() && value["msg"].is_string() && value["time"].is_string()
        );
    }
    assert!(stderr.lines().any(|l| l.starts_with('{')), "{stderr}");
    assert!(
        stderr.contains("config reloaded") && stderr.contains("concurrent 2 -> 3"),
        "{stderr}"
    );
    assert!(stderr.contains("config reload refused"), "{stderr}");
    assert!(!stderr.contains(PASSWORD) && !stderr.contains(TOKEN));
    assert_eq!(instance_users(group), Vec::<String>::new());
    assert!(!socket.exists(), "status socket left behind");

    // With the daemon gone, `podfleet status` says so in one line.
    let output = podfleet()
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(
        message.contains("no podfleet daemon is running"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_instance_and_job_of_a_running_pipeline() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let group = "opsp";
    let config = write_config(dir.path(), group, "http://127.0.0.1/", "");
    let pipeline = dir.path().join("pipeline.yml");
    std::fs::write(
        &pipeline,
        "watched:\n  script:\n    - echo watching\n    - sleep 4\n",
    )
    .unwrap();
    let socket = dir.path().join("status.sock");
    let mut run = podfleet()
        .args(["pipeline", "--file"])
        .arg(&pipeline)
        .arg("--config")
        .arg(&config)
        .arg("--status-socket")
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for_status(&socket, "the job on its instance", |s| {
        s["jobs"].as_array().is_some_and(|jobs| {
            jobs.iter()
                .any(|j| j["name"] == "watched" && j["instance"].is_string())
        })
    })
    .await;
    let instance = status["jobs"][0]["instance"].as_str().unwrap();
    assert!(
        status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == instance),
        "{status:#}"
    );
    // The table names the same job and instance.
    let table = podfleet()
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("watched") && table.contains(instance),
        "{table}"
    );
    let exit = wait_exit(&mut run, Duration::from_secs(180)).await;
    let mut output = String::new();
    for stream in [
        run.stdout.take().map(|mut s| {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut text);
            text
        }),
        run.stderr.take().map(|mut s| {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut text);
            text
        }),
    ]
    .into_iter()
    .flatten()
    {
        output.push_str(&stream);
    }
    assert!(exit.success(), "{exit:?}\n{output}");
    assert_eq!(instance_users(group), Vec::<String>::new());
}

fn doctor(config: &Path, extra: &[&str]) -> Output {
    podfleet()
        .args(["doctor", "--config"])
        .arg(config)
        .args(extra)
        .output()
        .unwrap()
}

fn line_of<'a>(stdout: &'a str, check: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(check)))
        .unwrap_or_else(|| panic!("no {check} line in:\n{stdout}"))
}

/// Each check of `podfleet doctor` passes on a healthy setup and fails, with a fix, when
/// its link is broken on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_a_healthy_setup_and_names_each_broken_link() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let group = "opsd";
    let coordinator = coordinator(dir.path(), "unused:\n  script: [\"true\"]\n").await;
    let config = write_config(dir.path(), group, &coordinator.url, "");
    let image_cache_port = {
        // A registry stand-in that answers /v2/ like one.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().route("/v2/", axum::routing::get(|| async { "{}" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        port
    };
    let cache = format!("http://127.0.0.1:{image_cache_port}");

    // Healthy: every check passes and the probe instance is gone afterwards.
    let output = doctor(
        &config,
        &[
            "--probe-instance",
            "--min-free-gib",
            "1",
            "--image-cache",
            &cache,
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let all = format!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    for check in [
        "config",
        "coordinator",
        "provider",
        "ssh",
        "engine",
        "rootless",
        "cgroups",
        "ulimits",
        "subids",
        "disk",
        "image cache",
    ] {
        assert!(
            line_of(&stdout, check).starts_with("PASS"),
            "{check}:\n{all}"
        );
    }
    assert_eq!(output.status.code(), Some(0), "{all}");
    assert!(
        !all.contains(PASSWORD) && !all.contains(TOKEN),
        "secret in doctor output"
    );
    assert_eq!(instance_users(group), Vec::<String>::new());

    // Thresholds above what the host has: ulimits and disk fail, with their fixes.
    let output = doctor(
        &config,
        &[
            "--probe-instance",
            "--min-nofile",
            "100000000",
            "--min-free-gib",
            "100000000",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    for check in ["ulimits", "disk"] {
        let line = line_of(&stdout, check);
        assert!(line.starts_with("FAIL"), "{stdout}");
    }
    assert!(
        stdout.contains("fix: raise it in /etc/security/limits.d/"),
        "{stdout}"
    );
    assert!(stdout.contains("fix: grow the disk"), "{stdout}");

    // A wrong token: the coordinator refuses it.
    let wrong_token = std::fs::read_to_string(&config)
        .unwrap()
        .replace(TOKEN, "glrt-not-the-registered-token");
    let broken = dir.path().join("wrong-token.toml");
    std::fs::write(&broken, wrong_token).unwrap();
    let stdout = String::from_utf8_lossy(&doctor(&broken, &[]).stdout).into_owned();
    assert!(
        line_of(&stdout, "coordinator").starts_with("FAIL"),
        "{stdout}"
    );
    assert!(stdout.contains("refused (403)"), "{stdout}");

    // A coordinator that is not there.
    let unreachable = std::fs::read_to_string(&config).unwrap().replace(
        &coordinator.url,
        &format!("http://127.0.0.1:{}", free_port()),
    );
    let broken = dir.path().join("unreachable.toml");
    std::fs::write(&broken, unreachable).unwrap();
    let stdout = String::from_utf8_lossy(&doctor(&broken, &[]).stdout).into_owned();
    assert!(
        line_of(&stdout, "coordinator").starts_with("FAIL"),
        "{stdout}"
    );

    // A provider config it cannot use.
    let bad_provider = std::fs::read_to_string(&config)
        .unwrap()
        .replace("plugin = \"local\"", "plugin = \"no-such-plugin\"");
    let broken = dir.path().join("bad-provider.toml");
    std::fs::write(&broken, bad_provider).unwrap();
    let stdout = String::from_utf8_lossy(&doctor(&broken, &[]).stdout).into_owned();
    assert!(line_of(&stdout, "provider").starts_with("FAIL"), "{stdout}");
    assert!(stdout.contains("no-such-plugin"), "{stdout}");

    // An image cache that does not answer.
    let output = doctor(
        &config,
        &[
            "--image-cache",
            &format!("http://127.0.0.1:{}", free_port()),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        line_of(&stdout, "image cache").starts_with("FAIL"),
        "{stdout}"
    );

    // A config with an error: reported with line:column, exit 2, nothing else checked.
    let broken = dir.path().join("bad.toml");
    std::fs::write(&broken, "concurrent = \"many\"\n").unwrap();
    let output = doctor(&broken, &[]);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    assert!(line_of(&stdout, "config").starts_with("FAIL"), "{stdout}");
    assert!(stdout.contains(":1:"), "{stdout}");

    broken_instance_is_named(&config, group).await;
    assert_eq!(instance_users(group), Vec::<String>::new());
}
/// Breaks a running instance three ways — its subordinate ids, its engine, its login — and
/// checks that doctor names each.
async fn broken_instance_is_named(config: &Path, group: &str) {
    use podfleet_provider::{InstanceState, Provider, SecretString};
    use podfleet_provider_local::{InstanceCredentials, LocalProvider, LocalSettings};
    let _ = group;
    let loaded = podfleet_config::load(config).unwrap().config;
    let autoscaler = loaded.runners[0].autoscaler.clone().unwrap();
    let settings = LocalSettings::from_plugin_config(&autoscaler.plugin_config).unwrap();
    let provider = LocalProvider::new(
        settings,
        InstanceCredentials {
            password: Some(SecretString::new(PASSWORD)),
            authorized_key: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(provider.increase(1).await.unwrap(), 1);
    let deadline = Instant::now() + Duration::from_secs(120);
    let user = loop {
        let running = provider
            .list()
            .await
            .unwrap()
            .into_iter()
            .find(|i| i.state == InstanceState::Running);
        if let Some(instance) = running {
            break instance.id;
        }
        assert!(Instant::now() < deadline, "the instance never ran");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let check = |name: &'static str| {
        let output = doctor(config, &[]);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert_eq!(output.status.code(), Some(1), "{stdout}");
        let line = line_of(&stdout, name).to_string();
        assert!(line.starts_with("FAIL"), "{name}:\n{stdout}");
        stdout
    };

    // The user's Podman API service is gone (and every other process of the user, so that
    // usermod below may change the account).
    let uid = uid_of(&user.0);
    assert!(
        !pids_of(uid, "system service").is_empty(),
        "no podman service for {user}"
    );
    for pid in pids_of(uid, "") {
        // SAFETY: kill(2) with a pid read from /proc.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    check("engine");

    // No subordinate ids: rootless Podman could not map image users. (usermod takes the
    // same locks as useradd, so instances created meanwhile by other tests keep theirs.)
    let mut removal = Command::new("usermod");
    for (file, flag) in [
        ("/etc/subuid", "--del-subuids"),
        ("/etc/subgid", "--del-subgids"),
    ] {
        let line = std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .find(|l| l.starts_with(&format!("{user}:")))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{user} has no range in {file}"));
        let fields: Vec<u64> = line
            .split(':')
            .skip(1)
            .map(|f| f.parse().unwrap())
            .collect();
        removal
            .arg(flag)
            .arg(format!("{}-{}", fields[0], fields[0] + fields[1] - 1));
    }
    removal.arg(&user.0);
    // The SSH sessions of the doctor run above may still be ending.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !removal.status().unwrap().success() {
        assert!(Instant::now() < deadline, "usermod kept failing for {user}");
        for pid in pids_of(uid, "") {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let stdout = check("subids");
    assert!(stdout.contains("usermod --add-subuids"), "{stdout}");

    // The login is refused.
    let mut chpasswd = Command::new("chpasswd")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        chpasswd.stdin.as_mut().unwrap(),
        format!("{user}:another-Pa55word\n").as_bytes(),
    )
    .unwrap();
    drop(chpasswd.stdin.take());
    assert!(chpasswd.wait().unwrap().success());
    let stdout = check("ssh");
    assert!(stdout.contains("check connector_config"), "{stdout}");

    provider
        .decrease(std::slice::from_ref(&user))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while provider.list().await.unwrap().iter().any(|i| i.id == user) {
        assert!(Instant::now() < deadline, "the instance was not deleted");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    provider.shutdown().await;
}

fn uid_of(user: &str) -> u32 {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(&format!("{user}:")))
        .and_then(|l| l.split(':').nth(2)?.parse().ok())
        .unwrap()
}

/// Processes of `uid` whose command line contains `needle`.
fn pids_of(uid: u32, needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let owner = status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            owner == Some(uid) && cmdline.contains(needle)
        })
        .collect()
}

/// `podfleet service install` writes a unit systemd accepts, with SIGQUIT and a stop timeout
/// long enough for a drain, and a second run changes nothing.
#[test]
fn service_install_writes_a_unit_systemd_accepts() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let config = write_config(dir.path(), "opss", "http://127.0.0.1/", "");
    let units = dir.path().join("units");
    let install = || {
        podfleet()
            .args(["service", "install", "--max-job-timeout", "3h", "--config"])
            .arg(&config)
            .arg("--unit-dir")
            .arg(&units)
            .output()
            .unwrap()
    };
    let first = install();
    assert!(first.status.success(), "{first:?}");
    assert!(String::from_utf8_lossy(&first.stdout).contains("written"));
    let second = install();
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("unchanged"),
        "{second:?}"
    );
    let unit = std::fs::read_to_string(units.join("podfleet.service")).unwrap();
    assert!(unit.contains("KillSignal=SIGQUIT\n"), "{unit}");
    assert!(unit.contains("Type=notify\n"), "{unit}");
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        stop > 3 * 3600,
        "stop timeout {stop}s is shorter than the longest job"
    );
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(units.join("podfleet.service"))
        .output();
    if let Ok(verify) = verify {
        assert!(
            verify.status.success(),
            "systemd-analyze rejects the unit: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
}
