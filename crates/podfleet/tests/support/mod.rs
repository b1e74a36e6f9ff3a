//! Shared by the binary's integration tests: the one-runner local-provider config.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// What differs between tests in `tests/data/local-runner.toml`.
pub struct LocalRunner<'a> {
    pub name: &'a str,
    pub group: &'a str,
    pub url: &'a str,
    pub token: &'a str,
    pub password: &'a str,
    /// Extra global keys.
    pub global: &'a str,
    /// Extra `plugin_config` keys.
    pub plugin: &'a str,
}

impl LocalRunner<'_> {
    /// Writes `dir/config.toml` with the instances' state under `dir/state`.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/local-runner.toml"),
        )
        .unwrap();
        let text = template
            .replace("@STATE@", &dir.join("state").display().to_string())
            .replace("@GLOBAL@", self.global)
            .replace("@NAME@", self.name)
            .replace("@URL@", self.url)
            .replace("@TOKEN@", self.token)
            .replace("@GROUP@", self.group)
            .replace("@PASSWORD@", self.password)
            .replace("@PLUGIN@", self.plugin);
        let path = dir.join("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Sends `signal` to the child process and waits for it to exit.
pub async fn signal_and_wait(
    mut child: std::process::Child,
    signal: i32,
) -> std::process::ExitStatus {
    // SAFETY: kill(2) with the pid of our own child and a constant signal.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap()
}

/// Starts `podfleet run --config CONFIG` with its status socket at `dir/status.sock` and its
/// output in `dir/daemon.log`.
pub fn spawn_daemon(config: &Path, dir: &Path) -> std::process::Child {
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_podfleet"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--status-socket")
        .arg(dir.join("status.sock"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// What the daemon logged so far.
pub fn daemon_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
}
