//! The connector: reaches an instance over SSH (russh) and opens byte streams to its
//! container engine, either straight to the engine's Unix socket (`direct-streamlocal`) or
//! through `docker system dial-stdio` on the instance. It knows SSH, not Docker or clouds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podfleet_provider::SecretString;
use russh::ChannelMsg;
use russh::client::{self, AuthResult, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};

/// A byte stream to the instance's engine, carried by one SSH channel.
pub type TunnelStream = russh::ChannelStream<client::Msg>;

/// How the server's host key is checked.
#[derive(Clone, Debug)]
pub enum HostKeyCheck {
    /// The provider told us the key (OpenSSH public key line); anything else is refused.
    Pinned(String),
    /// An OpenSSH `known_hosts` file.
    KnownHosts(PathBuf),
    /// No check. Only for platforms that cannot tell the key; logged as a warning.
    AcceptAny,
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// `host:port`.
    pub addr: String,
    pub username: String,
    pub password: Option<SecretString>,
    /// Private key text (OpenSSH or PEM).
    pub private_key: Option<SecretString>,
    pub host_key: HostKeyCheck,
    /// How long to keep trying while the instance's sshd comes up.
    pub timeout: Duration,
    /// SSH keepalive interval for long jobs.
    pub keepalive: Option<Duration>,
}

/// The engine end of a tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tunnel {
    /// `direct-streamlocal@openssh.com` to this Unix socket path on the instance.
    Socket(String),
    /// Run this command on the instance and use its stdin/stdout (`docker system dial-stdio`).
    Command(String),
}

impl Tunnel {
    /// The tunnel gitlab-runner would use for a Docker host URL: a socket forward, or with
    /// `FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO` the Docker CLI's `dial-stdio` on the instance.
    pub fn for_docker_host(host: &str, dial_stdio: bool) -> Result<Tunnel, ConnectError> {
        if dial_stdio {
            return Ok(Tunnel::Command(format!(
                "docker -H {} system dial-stdio",
                shell_quote(host)
            )));
        }
        match host.strip_prefix("unix://") {
            Some(path) if path.starts_with('/') => Ok(Tunnel::Socket(path.to_string())),
            _ => Err(ConnectError::Unsupported(format!(
                "docker host {host:?}: only unix:///path sockets can be forwarded over SSH; \
                 use a unix socket or enable FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO"
            ))),
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("ssh to {addr}: {message}")]
    Unreachable { addr: String, message: String },
    #[error(
        "ssh host key of {addr} does not match the expected key: refusing to connect \
         (fix the known host entry or the instance)"
    )]
    HostKeyMismatch { addr: String },
    #[error("ssh authentication as {user} at {addr} failed: {message}")]
    Auth {
        user: String,
        addr: String,
        message: String,
    },
    #[error("ssh channel to {addr}: {message}")]
    Channel { addr: String, message: String },
    #[error("{0}")]
    Unsupported(String),
}

/// Output of a command run on the instance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

struct ClientHandler {
    check: HostKeyCheck,
    host: String,
    port: u16,
    mismatch: Arc<std::sync::atomic::AtomicBool>,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_key else {
            self.mismatch
                .store(true, std::sync::atomic::Ordering::SeqCst);
            return Ok(false);
        };
        let accepted = match &self.check {
            HostKeyCheck::Pinned(line) => parse_public_key_line(line)
                .map(|expected| expected.key_data() == key.key_data())
                .unwrap_or(false),
            HostKeyCheck::KnownHosts(path) => {
                russh::keys::check_known_hosts_path(&self.host, self.port, key, path)
                    .unwrap_or(false)
            }
            HostKeyCheck::AcceptAny => {
                tracing::warn!(host = %self.host, "ssh host key not checked (no key known)");
                true
            }
        };
        if !accepted {
            self.mismatch
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(accepted)
    }
}

/// Parses `ssh-ed25519 AAAA... comment`.
fn parse_public_key_line(line: &str) -> Option<PublicKey> {
    let base64 = line.split_whitespace().nth(1)?;
    russh::keys::parse_public_key_base64(base64).ok()
}

/// An authenticated SSH connection to one instance; channels multiplex over it.
#[derive(Clone)]
pub struct Connection {
    handle: Arc<Handle<ClientHandler>>,
    addr: String,
}

impl Connection {
    /// Connects and authenticates, retrying refused or dropped connections until
    /// `options.timeout`; a wrong host key or rejected credentials fail at once.
    pub async fn connect(options: &ConnectOptions) -> Result<Connection, ConnectError> {
        let deadline = Instant::now() + options.timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            match Self::connect_once(options).await {
                Ok(connection) => return Ok(connection),
                Err(error @ ConnectError::Unreachable { .. })
                    if Instant::now() + delay < deadline =>
                {
                    tracing::debug!(%error, "ssh not reachable yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn connect_once(options: &ConnectOptions) -> Result<Connection, ConnectError> {
        let addr = options.addr.clone();
        let (host, port) = split_host_port(&addr)?;
        let config = client::Config {
            keepalive_interval: options.keepalive,
            keepalive_max: 3,
            inactivity_timeout: None,
            nodelay: true,
            ..Default::default()
        };
        let mismatch = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handler = ClientHandler {
            check: options.host_key.clone(),
            host: host.clone(),
            port,
            mismatch: mismatch.clone(),
        };
        let connect = client::connect(Arc::new(config), (host.as_str(), port), handler);
        let remaining = options.timeout.max(Duration::from_secs(1));
        let mut handle = match tokio::time::timeout(remaining, connect).await {
            Ok(Ok(handle)) => handle,
            Ok(Err(_)) if mismatch.load(std::sync::atomic::Ordering::SeqCst) => {
                return Err(ConnectError::HostKeyMismatch { addr });
            }
            Ok(Err(e)) => {
                return Err(ConnectError::Unreachable {
                    addr,
                    message: e.to_string(),
                });
            }
            Err(_) => {
                return Err(ConnectError::Unreachable {
                    addr,
                    message: "connect timed out".into(),
                });
            }
        };
        let auth_error = |message: String| ConnectError::Auth {
            user: options.username.clone(),
            addr: addr.clone(),
            message,
        };
        let mut tried = Vec::new();
        if let Some(key_text) = &options.private_key {
            tried.push("public key");
            let key = russh::keys::decode_secret_key(key_text.expose(), None)
                .map_err(|e| auth_error(format!("the private key cannot be read: {e}")))?;
            let hash = handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| auth_error(e.to_string()))?
                .flatten();
            let result = handle
                .authenticate_publickey(
                    options.username.clone(),
                    PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                )
                .await
                .map_err(|e| auth_error(e.to_string()))?;
            if result == AuthResult::Success {
                return Ok(Connection {
                    handle: Arc::new(handle),
                    addr,
                });
            }
        }
        if let Some(password) = &options.password {
            tried.push("password");
            let result = handle
                .authenticate_password(options.username.clone(), password.expose())
                .await
                .map_err(|e| auth_error(e.to_string()))?;
            if result == AuthResult::Success {
                return Ok(Connection {
                    handle: Arc::new(handle),
                    addr,
                });
            }
        }
        Err(auth_error(if tried.is_empty() {
            "no credentials: set connector_config password or key_path".into()
        } else {
            format!(
                "rejected ({}); check connector_config username, password and key_path",
                tried.join(", ")
            )
        }))
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Runs a command on the instance and collects its output and exit status.
    pub async fn exec(&self, command: &str) -> Result<ExecOutput, ConnectError> {
        let channel_error = |message: String| ConnectError::Channel {
            addr: self.addr.clone(),
            message,
        };
        let mut channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| channel_error(e.to_string()))?;
        channel
            .exec(true, command)
            .await
            .map_err(|e| channel_error(e.to_string()))?;
        let mut output = ExecOutput::default();
        let mut status = None;
        while let Some(message) = channel.wait().await {
            match message {
                ChannelMsg::Data { data } => output.stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, .. } => output.stderr.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                _ => {}
            }
        }
        output.exit_status = status.ok_or_else(|| {
            channel_error(format!("command {command:?} ended without an exit status"))
        })?;
        Ok(output)
    }

    /// Opens a byte stream to the engine through the given tunnel.
    pub async fn open_tunnel(&self, tunnel: &Tunnel) -> Result<TunnelStream, ConnectError> {
        let channel_error = |message: String| ConnectError::Channel {
            addr: self.addr.clone(),
            message,
        };
        match tunnel {
            Tunnel::Socket(path) => {
                let channel = self
                    .handle
                    .channel_open_direct_streamlocal(path.clone())
                    .await
                    .map_err(|e| channel_error(format!("forward to {path}: {e}")))?;
                Ok(channel.into_stream())
            }
            Tunnel::Command(command) => {
                let channel = self
                    .handle
                    .channel_open_session()
                    .await
                    .map_err(|e| channel_error(e.to_string()))?;
                channel
                    .exec(true, command.as_str())
                    .await
                    .map_err(|e| channel_error(format!("{command}: {e}")))?;
                Ok(channel.into_stream())
            }
        }
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

fn split_host_port(addr: &str) -> Result<(String, u16), ConnectError> {
    let unsupported = || ConnectError::Unreachable {
        addr: addr.to_string(),
        message: "address must be host:port or host".into(),
    };
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') => {
            let port = port.parse().map_err(|_| unsupported())?;
            Ok((
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port,
            ))
        }
        Some(_) => Err(unsupported()),
        None => Ok((addr.to_string(), 22)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_to_tunnel() {
        assert_eq!(
            Tunnel::for_docker_host("unix:///run/user/1001/podman/podman.sock", false).unwrap(),
            Tunnel::Socket("/run/user/1001/podman/podman.sock".into())
        );
        assert_eq!(
            Tunnel::for_docker_host("unix:///run/x.sock", true).unwrap(),
            Tunnel::Command("docker -H 'unix:///run/x.sock' system dial-stdio".into())
        );
        let error = Tunnel::for_docker_host("tcp://1.2.3.4:2375", false).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO"),
            "{error}"
        );
    }

    #[test]
    fn host_port() {
        assert_eq!(
            split_host_port("127.0.0.1:2222").unwrap(),
            ("127.0.0.1".into(), 2222)
        );
        assert_eq!(split_host_port("example").unwrap(), ("example".into(), 22));
        assert_eq!(split_host_port("[::1]:22").unwrap(), ("::1".into(), 22));
        assert!(split_host_port("h:x").is_err());
    }
}
