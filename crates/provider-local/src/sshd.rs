//! The podfleet-managed `sshd` on 127.0.0.1 through which instances are reached.
//!
//! One sshd per group, with its own host key, configuration and port, all under the
//! group's state directory. Only members of the instance group may log in, and only with
//! the credentials the connector configuration names.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::host::{self, HostError};

pub const INSTANCE_GROUP: &str = "podfleet-instances";

pub struct Sshd {
    dir: PathBuf,
    pub port: u16,
}

impl Sshd {
    pub fn authorized_keys_dir(dir: &Path) -> PathBuf {
        dir.join("authorized_keys")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("sshd.pid")
    }

    pub fn host_public_key(&self) -> std::io::Result<String> {
        Ok(
            std::fs::read_to_string(self.dir.join("ssh_host_ed25519_key.pub"))?
                .trim()
                .to_string(),
        )
    }

    /// Starts the group's sshd unless it already runs (for instance after a manager
    /// restart), keeping the port it had.
    pub async fn ensure_running(
        dir: &Path,
        wanted_port: u16,
        password_auth: bool,
    ) -> Result<Sshd, HostError> {
        let io = |what: &str, e: std::io::Error| HostError {
            command: what.to_string(),
            detail: e.to_string(),
        };
        std::fs::create_dir_all(Self::authorized_keys_dir(dir)).map_err(|e| io("mkdir", e))?;
        std::fs::create_dir_all("/run/sshd").map_err(|e| io("mkdir /run/sshd", e))?;
        let port_file = dir.join("port");
        let port = match std::fs::read_to_string(&port_file) {
            Ok(text) if wanted_port == 0 => text.trim().parse().unwrap_or(0),
            _ => wanted_port,
        };
        let port = if port == 0 {
            free_port().map_err(|e| io("pick a port", e))?
        } else {
            port
        };
        std::fs::write(&port_file, port.to_string()).map_err(|e| io("write port", e))?;
        let sshd = Sshd {
            dir: dir.to_path_buf(),
            port,
        };

        let key = dir.join("ssh_host_ed25519_key");
        if !key.exists() {
            let key_arg = key.to_string_lossy().into_owned();
            host::run(
                "ssh-keygen",
                &["-q", "-t", "ed25519", "-N", "", "-f", &key_arg],
            )
            .await?;
        }
        let config = sshd.config_text(password_auth);
        let config_path = dir.join("sshd_config");
        let changed = std::fs::read_to_string(&config_path).ok().as_deref() != Some(&config);
        if changed {
            std::fs::write(&config_path, &config).map_err(|e| io("write sshd_config", e))?;
        }
        match sshd.running_pid() {
            Some(pid) if !changed => {
                tracing::debug!(pid, port, "managed sshd already running");
                return Ok(sshd);
            }
            Some(pid) => {
                // SAFETY: kill(2) on a pid from our own pid file; no memory involved.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None => {}
        }
        host::run("groupadd", &["-f", INSTANCE_GROUP]).await?;
        let config_arg = config_path.to_string_lossy().into_owned();
        let log_arg = dir.join("sshd.log").to_string_lossy().into_owned();
        host::run("/usr/sbin/sshd", &["-f", &config_arg, "-E", &log_arg]).await?;
        for _ in 0..50 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                tracing::info!(port, "started managed sshd");
                return Ok(sshd);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(HostError {
            command: format!("sshd -f {config_arg}"),
            detail: format!("not listening on 127.0.0.1:{port}; see {log_arg}"),
        })
    }

    /// The listener of this group's sshd: from the pid file, or (when the file is gone) by
    /// its command line, so a stale daemon is always found and replaced.
    fn running_pid(&self) -> Option<i32> {
        // A pid file outlives reboots and crashes: trust its pid only when that process
        // really is this group's sshd, never signal a stranger.
        // sshd rewrites its title into one string ("sshd: /usr/sbin/sshd -f <config> ...
        // [listener] ..."), so match on the joined command line.
        let config = format!(" {} ", self.dir.join("sshd_config").display());
        let is_ours = move |cmdline: &[String]| {
            let joined = format!(" {} ", cmdline.join(" "));
            cmdline.first().is_some_and(|arg| arg.contains("sshd")) && joined.contains(&config)
        };
        let from_file = std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
            .filter(|pid| {
                host::pid_alive(*pid) && host::cmdline(*pid).is_some_and(|c| is_ours(&c))
            });
        from_file.or_else(|| host::find_process(is_ours))
    }

    /// Stops the sshd and forgets its pid file.
    pub async fn stop(&self) {
        if let Some(pid) = self.running_pid() {
            // SAFETY: kill(2) on a pid from our own pid file; no memory involved.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            // It exits at once; give it 2.5 s at most.
            for _ in 0..250 {
                if !host::pid_alive(pid) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = std::fs::remove_file(self.pid_file());
    }

    fn config_text(&self, password_auth: bool) -> String {
        let dir = self.dir.display();
        format!(
            "# managed by podfleet (local provider); rewritten on start\n\
             Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {dir}/ssh_host_ed25519_key\n\
             PidFile {dir}/sshd.pid\n\
             UsePAM no\n\
             PermitRootLogin no\n\
             AllowGroups {INSTANCE_GROUP}\n\
             PasswordAuthentication {pw}\n\
             KbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\n\
             AuthorizedKeysFile {dir}/authorized_keys/%u\n\
             AllowStreamLocalForwarding yes\n\
             AllowTcpForwarding local\n\
             X11Forwarding no\n\
             PermitTTY no\n\
             MaxSessions 128\n\
             MaxStartups 64:30:256\n\
             ClientAliveInterval 60\n\
             LogLevel INFO\n",
            port = self.port,
            pw = if password_auth { "yes" } else { "no" },
        )
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
