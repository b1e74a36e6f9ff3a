//! Acting as an unprivileged user: commands in a clean environment, the user's runtime
//! directory and its rootless Podman API service.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Account, HostError, run_command};

/// The `PATH` of commands run as a user: the system directories only.
pub const USER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `/run/user/<uid>`, the user's `XDG_RUNTIME_DIR`.
pub fn runtime_dir(uid: u32) -> PathBuf {
    PathBuf::from(format!("/run/user/{uid}"))
}

/// Where the user's rootless Podman serves the Docker-compatible API.
pub fn podman_socket(uid: u32) -> PathBuf {
    runtime_dir(uid).join("podman/podman.sock")
}

/// `program args` as `account`, through `runuser`, with nothing of root's environment but
/// what a login would set (`HOME`, `USER`, `PATH`, `XDG_RUNTIME_DIR`).
pub fn user_command(account: &Account, program: &str, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("runuser");
    command
        .args(["-u", &account.name, "--", "env", "-i"])
        .arg(format!("HOME={}", account.home.display()))
        .arg(format!("USER={}", account.name))
        .arg(format!("LOGNAME={}", account.name))
        .arg(format!("PATH={USER_PATH}"))
        .arg(format!(
            "XDG_RUNTIME_DIR={}",
            runtime_dir(account.uid).display()
        ))
        .arg(program)
        .args(args)
        .current_dir(&account.home);
    command
}

/// Runs `program args` as `account` to completion; its stdout on success.
pub async fn run_as(account: &Account, program: &str, args: &[&str]) -> Result<String, HostError> {
    run_command(
        user_command(account, program, args),
        &format!("{program} {} (as {})", args.join(" "), account.name),
        None,
    )
    .await
}

/// Creates `/run/user/<uid>` and its `podman` directory, owned by the user, mode 0700, as
/// systemd-logind would; without logind nothing else creates them.
pub fn ensure_runtime_dir(account: &Account) -> Result<(), HostError> {
    let run_dir = runtime_dir(account.uid);
    for dir in [run_dir.clone(), run_dir.join("podman")] {
        let failed = |e: std::io::Error| HostError::new(format!("create {}", dir.display()), e);
        std::fs::create_dir_all(&dir).map_err(failed)?;
        std::os::unix::fs::chown(&dir, Some(account.uid), Some(account.gid)).map_err(failed)?;
        set_mode(&dir, 0o700).map_err(failed)?;
    }
    Ok(())
}

pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Starts `podman system service --time=0` as the user on its socket, in its own process
/// group so that it outlives the caller, and waits until the socket accepts connections.
/// Its output goes to `log_path`.
pub async fn start_podman_service(account: &Account, log_path: &Path) -> Result<(), HostError> {
    let socket = podman_socket(account.uid);
    let label = format!("podman system service (as {})", account.name);
    let log = std::fs::File::create(log_path)
        .map_err(|e| HostError::new(format!("create {}", log_path.display()), e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| HostError::new(format!("create {}", log_path.display()), e))?;
    let url = format!("unix://{}", socket.display());
    let mut command = user_command(account, "podman", &["system", "service", "--time=0", &url]);
    command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Own process group: a Ctrl-C aimed at the caller must not take the service down.
        .process_group(0);
    let mut child = command
        .spawn()
        .map_err(|e| HostError::new(label.clone(), e))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if socket.exists() && tokio::net::UnixStream::connect(&socket).await.is_ok() {
            // The service runs on; tokio reaps it if it exits while the caller runs.
            drop(child);
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            return Err(HostError::new(
                label,
                format!("exited ({status}): {}", log.trim()),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(HostError::new(
        label,
        format!(
            "socket {} did not appear within 30s; see {}",
            socket.display(),
            log_path.display()
        ),
    ))
}

/// `GET /_ping` on a Docker-compatible API socket: `Ok` when it answers 200 `OK`.
pub async fn ping_docker_api(socket: &Path) -> Result<(), String> {
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("{}: GET /_ping timed out", socket.display()))?
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let status_ok = response
        .lines()
        .next()
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("200"));
    if status_ok && response.trim_end().ends_with("OK") {
        Ok(())
    } else {
        let first = response.lines().next().unwrap_or("no response");
        Err(format!(
            "{}: GET /_ping answered {first:?}",
            socket.display()
        ))
    }
}
