//! `podfleet host prepare` for real on this machine (root, Debian 12): a new user is
//! prepared, a second run changes nothing, the user's SSH commands get the connector's
//! environment, and a pipeline runs on the user through the static provider and an sshd
//! the test starts on 127.0.0.1. Bad input and a dry run stop before changing anything.
//! Every test removes its user and what prepare made for it, even when it fails.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "localhost/podfleet/busybox:latest";

fn podfleet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_podfleet"))
}

fn unique_user() -> String {
    let mut bytes = [0u8; 3];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .expect("/dev/urandom is readable");
    format!(
        "pfprep-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn passwd_entry(user: &str) -> Option<(u32, PathBuf)> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find(|l| l.split(':').next() == Some(user))
        .map(|l| {
            let fields: Vec<&str> = l.split(':').collect();
            (fields[2].parse().unwrap(), PathBuf::from(fields[5]))
        })
}

fn lines_for(path: &str, user: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(':').next() == Some(user))
        .map(str::to_string)
        .collect()
}

fn processes_of(uid: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_string();
                    line.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(uid)
        })
        .collect()
}

/// Removes the test's user and everything prepare made for it, on drop.
struct UserCleanup(String);

impl UserCleanup {
    fn leftovers(&self) -> Vec<String> {
        let user = &self.0;
        let mut left = Vec::new();
        if passwd_entry(user).is_some() {
            left.push(format!("/etc/passwd entry of {user}"));
        }
        for file in ["/etc/shadow", "/etc/subuid", "/etc/subgid", "/etc/group"] {
            if !lines_for(file, user).is_empty() {
                left.push(format!("{file} line of {user}"));
            }
        }
        for path in [
            format!("/var/lib/systemd/linger/{user}"),
            format!("/etc/security/limits.d/90-podfleet-{user}.conf"),
            format!("/home/{user}"),
        ] {
            if Path::new(&path).exists() {
                left.push(path);
            }
        }
        left
    }
}

impl Drop for UserCleanup {
    fn drop(&mut self) {
        let user = &self.0;
        if let Some((uid, home)) = passwd_entry(user) {
            for _ in 0..50 {
                let pids = processes_of(uid);
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .stderr(Stdio::null())
                        .status();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // Rootless storage leaves overlay mounts below the home and the runtime dir.
            let run_dir = format!("/run/user/{uid}");
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let mut mounts: Vec<&str> = mountinfo
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|m| m.starts_with(&*home.to_string_lossy()) || m.starts_with(&run_dir))
                .collect();
            mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for mount in mounts {
                let _ = Command::new("umount").args(["-l", mount]).status();
            }
            let _ = Command::new("userdel").args(["-r", "-f", user]).output();
            let _ = std::fs::remove_dir_all(&run_dir);
            let _ = std::fs::remove_dir_all(&home);
        }
        for file in ["/etc/subuid", "/etc/subgid"] {
            if !lines_for(file, user).is_empty() {
                let _ = Command::new("sed")
                    .args(["-i", &format!("/^{user}:/d"), file])
                    .status();
            }
        }
        let _ = std::fs::remove_file(format!("/var/lib/systemd/linger/{user}"));
        let _ = std::fs::remove_file(format!("/etc/security/limits.d/90-podfleet-{user}.conf"));
    }
}

/// A private directory others may traverse (the prepared user reads the image archive).
fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn secret_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn prepare(user: &str, password_file: &Path, extra: &[&str]) -> Output {
    podfleet()
        .args(["host", "prepare", "--user", user, "--password-file"])
        .arg(password_file)
        .args(extra)
        .output()
        .unwrap()
}

fn step_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| {
            l.contains(": ok (no change)")
                || l.contains(": changed (")
                || l.contains(": would change: ")
        })
        .map(str::to_string)
        .collect()
}

/// An OpenSSH sshd in the foreground on 127.0.0.1 that lets only `user` in, by password.
struct Sshd {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Sshd {
    fn start(dir: &Path, user: &str) -> Sshd {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let key = dir.join("host_key");
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", text(&made));
        let log = dir.join("sshd.log");
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = dir.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {key}\nPidFile {pid}\n\
                     UsePAM no\nPermitRootLogin no\nAllowUsers {user}\nPasswordAuthentication yes\n\
                     KbdInteractiveAuthentication no\nPubkeyAuthentication no\n\
                     AllowStreamLocalForwarding yes\nAllowTcpForwarding local\nX11Forwarding no\n\
                     MaxSessions 64\nLogLevel INFO\n",
                    key = key.display(),
                    pid = dir.join("sshd.pid").display(),
                ),
            )
            .unwrap();
            let mut child = Command::new("/usr/sbin/sshd")
                .arg("-D")
                .arg("-f")
                .arg(&config)
                .arg("-E")
                .arg(&log)
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break; // the port was taken meanwhile: try another
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Sshd { child, port, log };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "sshd did not start; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `command` over SSH as the user, the password from the environment (never argv).
fn ssh(sshd: &Sshd, user: &str, password: &str, command: &str) -> Output {
    Command::new("sshpass")
        .arg("-e")
        .args([
            "ssh",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-p",
            &sshd.port.to_string(),
            &format!("{user}@127.0.0.1"),
            command,
        ])
        .env("SSHPASS", password)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Loads the image the pipeline uses into the user's store, as the local provider does:
/// root's `podman save`, then `podman load` as the user.
fn load_image(dir: &Path, user: &str, uid: u32) {
    let archive = dir.join("busybox.tar");
    let saved = Command::new("podman")
        .args(["save", "-q", "-o"])
        .arg(&archive)
        .arg(IMAGE)
        .output()
        .unwrap();
    assert!(
        saved.status.success(),
        "scripts/setup-host.sh builds {IMAGE}: {}",
        text(&saved)
    );
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loaded = Command::new("runuser")
        .args(["-u", user, "--", "env"])
        .arg(format!("XDG_RUNTIME_DIR=/run/user/{uid}"))
        .args(["podman", "load", "-q", "-i"])
        .arg(&archive)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(loaded.status.success(), "{}", text(&loaded));
}

#[test]
fn prepared_user_runs_a_pipeline_and_a_second_prepare_changes_nothing() {
    let user = unique_user();
    let cleanup = UserCleanup(user.clone());
    let dir = shared_tempdir();
    let password = format!("Pr3pare-{}-secret", unique_user());
    let password_file = secret_file(dir.path(), "password", &format!("{password}\n"));

    let first = prepare(&user, &password_file, &[]);
    let all = text(&first);
    assert_eq!(first.status.code(), Some(0), "{all}");
    assert!(
        !all.contains(&password),
        "the password leaked into the output"
    );
    let lines = step_lines(&first);
    assert!(lines.len() >= 10, "one line per step: {all}");
    for step in [
        format!("limited user {user}: changed"),
        "login credentials: changed".to_string(),
        "connector environment (XDG_RUNTIME_DIR, DOCKER_HOST in ~/.bashrc): changed".into(),
        "lingering (user services run without a login): changed".into(),
        "podman.socket user service enabled: changed".into(),
        "rootless Podman API answering on the user's socket: changed".into(),
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(&step)),
            "{step:?} missing: {all}"
        );
    }

    // What the report's Listings 2-6 ask for is there, checked directly on the host.
    let (uid, home) = passwd_entry(&user).expect("the user exists");
    let shadow = lines_for("/etc/shadow", &user);
    assert!(
        shadow[0].split(':').nth(1).unwrap().starts_with("$6$"),
        "a SHA-512 crypt hash"
    );
    assert_eq!(lines_for("/etc/subuid", &user).len(), 1);
    assert_eq!(lines_for("/etc/subgid", &user).len(), 1);
    let bashrc = std::fs::read_to_string(home.join(".bashrc")).unwrap();
    assert!(
        bashrc.starts_with("# >>> podfleet connector environment")
            && bashrc.contains(&format!("export XDG_RUNTIME_DIR=/run/user/{uid}\n")),
        "{bashrc}"
    );
    assert!(Path::new(&format!("/var/lib/systemd/linger/{user}")).exists());
    let wants = home.join(".config/systemd/user/sockets.target.wants/podman.socket");
    assert!(
        std::fs::read_link(&wants)
            .unwrap()
            .ends_with("podman.socket")
    );
    let limits =
        std::fs::read_to_string(format!("/etc/security/limits.d/90-podfleet-{user}.conf")).unwrap();
    assert!(limits.contains(&format!("{user} hard nofile ")), "{limits}");

    // The second run: every step is already done.
    let second = prepare(&user, &password_file, &[]);
    let all = text(&second);
    assert_eq!(second.status.code(), Some(0), "{all}");
    let lines = step_lines(&second);
    assert!(lines.len() >= 10, "{all}");
    assert!(
        lines.iter().all(|l| l.ends_with(": ok (no change)")),
        "a second run changes nothing: {all}"
    );
    assert!(all.contains(" 0 of "), "{all}");

    // SSH commands of the user get the connector's environment, and the docker CLI talks
    // to the user's rootless Podman through it.
    load_image(dir.path(), &user, uid);
    let sshd = Sshd::start(dir.path(), &user);
    let env = ssh(
        &sshd,
        &user,
        &password,
        "echo $XDG_RUNTIME_DIR $DOCKER_HOST",
    );
    assert_eq!(
        String::from_utf8_lossy(&env.stdout).trim(),
        format!("/run/user/{uid} unix:///run/user/{uid}/podman/podman.sock"),
        "{}\nsshd log:\n{}",
        text(&env),
        std::fs::read_to_string(&sshd.log).unwrap_or_default()
    );
    let images = ssh(
        &sshd,
        &user,
        &password,
        "docker images --format '{{.Repository}}'",
    );
    assert!(
        String::from_utf8_lossy(&images.stdout).contains("localhost/podfleet/busybox"),
        "{}",
        text(&images)
    );

    // A pipeline on the prepared user through the static provider (dial-stdio path).
    let marker = format!("ran-on-prepared-host-{user}");
    let pipeline = dir.path().join(".gitlab-ci.yml");
    std::fs::write(
        &pipeline,
        format!("prepared:\n  image: {IMAGE}\n  script:\n    - echo {marker}\n    - test \"$(cat /proc/self/uid_map | wc -l)\" -ge 1\n"),
    )
    .unwrap();
    let config = secret_file(
        dir.path(),
        "config.toml",
        &format!(
            r#"concurrent = 1
check_interval = 1

[[runners]]
name = "static"
url = "http://127.0.0.1/"
token = "glrt-host-prepare-static-Tok3n"
executor = "docker-autoscaler"
shell = "sh"
run_untagged = true
environment = ["FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO=true"]

[runners.docker]
image = "{IMAGE}"
pull_policy = "if-not-present"

[runners.autoscaler]
plugin = "static"
capacity_per_instance = 1
max_use_count = 0
max_instances = 1
delete_instances_on_shutdown = true
update_interval_when_expecting = "500ms"

[runners.autoscaler.plugin_config]
instances = ["127.0.0.1:{port}"]
docker_socket = "/run/user/{uid}/podman/podman.sock"

[runners.autoscaler.connector_config]
username = "{user}"
password = "{password}"
timeout = "30s"

[[runners.autoscaler.policy]]
idle_count = 0
idle_time = "30m0s"
"#,
            port = sshd.port,
        ),
    );
    let report = dir.path().join("report.json");
    let run = podfleet()
        .arg("pipeline")
        .arg("--file")
        .arg(&pipeline)
        .arg("--config")
        .arg(&config)
        .arg("--report")
        .arg(&report)
        .env("PODFLEET_LOG", "warn")
        .output()
        .unwrap();
    let all = text(&run);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{all}\nsshd log:\n{}",
        std::fs::read_to_string(&sshd.log).unwrap_or_default()
    );
    assert!(all.contains(&marker), "the job's output is shown: {all}");
    assert!(!all.contains(&password), "the password leaked: {all}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["status"], "success", "{report}");
    assert_eq!(
        report["jobs"][0]["instance"],
        format!("127.0.0.1:{}", sshd.port),
        "{report}"
    );

    drop(sshd);
    drop(cleanup);
    assert_eq!(UserCleanup(user).leftovers(), Vec::<String>::new());
}

#[test]
fn a_dry_run_lists_every_change_and_makes_none() {
    let user = unique_user();
    let _cleanup = UserCleanup(user.clone());
    let dir = shared_tempdir();
    let password_file = secret_file(dir.path(), "password", "dry-run-secret\n");
    let containers_conf = std::fs::read_to_string("/etc/containers/containers.conf").ok();

    let output = prepare(
        &user,
        &password_file,
        &["--dry-run", "--registry-mirror", "127.0.0.1:5000/docker.io"],
    );
    let all = text(&output);
    assert_eq!(output.status.code(), Some(0), "{all}");
    assert!(
        all.contains("dry run: listing the changes, changing nothing"),
        "{all}"
    );
    let lines = step_lines(&output);
    for expected in [
        format!("limited user {user}: would change: create user {user}"),
        "login credentials: would change: set the password".to_string(),
        "connector environment (XDG_RUNTIME_DIR, DOCKER_HOST in ~/.bashrc): would change:".into(),
        "lingering (user services run without a login): would change: create".into(),
        "podman.socket user service enabled: would change:".into(),
        "rootless Podman API answering on the user's socket: would change:".into(),
        "registry mirror 127.0.0.1:5000/docker.io: would change: write".into(),
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(&expected)),
            "{expected:?} missing: {all}"
        );
    }
    assert!(!all.contains("dry-run-secret"), "{all}");
    // Nothing of it happened.
    assert_eq!(UserCleanup(user.clone()).leftovers(), Vec::<String>::new());
    assert!(!Path::new("/etc/containers/registries.conf.d/50-podfleet-mirror.conf").exists());
    assert_eq!(
        std::fs::read_to_string("/etc/containers/containers.conf").ok(),
        containers_conf
    );
}

#[test]
fn without_root_prepare_stops_before_changing_anything() {
    let user = unique_user();
    let _cleanup = UserCleanup(user.clone());
    let mut child = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(env!("CARGO_BIN_EXE_podfleet"))
        .args(["host", "prepare", "--user", &user, "--password-stdin"])
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"not-root-secret\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let all = text(&output);
    assert_eq!(output.status.code(), Some(2), "{all}");
    assert!(all.contains("must run as root"), "{all}");
    assert!(all.contains("nothing was changed"), "{all}");
    assert!(step_lines(&output).is_empty(), "no step ran: {all}");
    assert!(!all.contains("not-root-secret"), "{all}");
    assert_eq!(UserCleanup(user).leftovers(), Vec::<String>::new());
}

#[test]
fn bad_arguments_are_refused_before_anything_runs() {
    let user = unique_user();
    let _cleanup = UserCleanup(user.clone());
    let no_credentials = podfleet()
        .args(["host", "prepare", "--user", &user])
        .output()
        .unwrap();
    let all = text(&no_credentials);
    assert_eq!(no_credentials.status.code(), Some(2), "{all}");
    assert!(
        all.contains("--password-file, --password-stdin or --authorized-key"),
        "{all}"
    );

    let bad_mirror = podfleet()
        .args([
            "host",
            "prepare",
            "--user",
            &user,
            "--registry-mirror",
            "cache",
        ])
        .output()
        .unwrap();
    let all = text(&bad_mirror);
    assert_eq!(bad_mirror.status.code(), Some(2), "{all}");
    assert!(all.contains("expected HOST:PORT"), "{all}");

    let dir = shared_tempdir();
    let private = secret_file(
        dir.path(),
        "id",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n",
    );
    let wrong_key = podfleet()
        .args(["host", "prepare", "--user", &user, "--authorized-key"])
        .arg(&private)
        .output()
        .unwrap();
    let all = text(&wrong_key);
    assert_eq!(wrong_key.status.code(), Some(2), "{all}");
    assert!(all.contains("never the private key"), "{all}");
    assert!(!all.contains("abc"), "key material is not echoed: {all}");
    assert_eq!(UserCleanup(user).leftovers(), Vec::<String>::new());
}

#[test]
fn a_failing_step_is_named_with_its_fix_and_later_steps_do_not_run() {
    let user = unique_user();
    let _cleanup = UserCleanup(user.clone());
    // An existing user whose login shell never reads ~/.bashrc.
    let made = Command::new("useradd")
        .args(["-m", "-s", "/bin/sh", &user])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));
    let dir = shared_tempdir();
    let password_file = secret_file(dir.path(), "password", "failing-step-secret\n");

    let output = prepare(&user, &password_file, &[]);
    let all = text(&output);
    assert_eq!(output.status.code(), Some(1), "{all}");
    assert!(
        all.contains(
            "step \"connector environment (XDG_RUNTIME_DIR, DOCKER_HOST in ~/.bashrc)\" failed"
        ),
        "{all}"
    );
    assert!(
        all.contains(&format!("fix: usermod -s /bin/bash {user}")),
        "{all}"
    );
    assert!(
        !Path::new(&format!("/var/lib/systemd/linger/{user}")).exists(),
        "the steps after the failed one did not run"
    );
    assert!(!all.contains("failing-step-secret"), "{all}");
}
