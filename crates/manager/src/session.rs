//! How a runner reaches an instance: connector options from `connector_config` merged with
//! what the provider knows, and the Docker API tunnel for `[runners.docker] host`.

use std::time::Duration;

use podfleet_config::RunnerConfig;
use podfleet_connector::{ConnectError, ConnectOptions, HostKeyCheck, Tunnel};
use podfleet_provider::{ConnectInfo, SecretString};

const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connector_config.key_path {path}: {source}")]
    Key {
        path: String,
        source: std::io::Error,
    },
    #[error("no SSH user for the instance: set connector_config.username")]
    NoUser,
    #[error(transparent)]
    Tunnel(#[from] ConnectError),
}

pub fn connect_options(
    runner: &RunnerConfig,
    info: &ConnectInfo,
) -> Result<ConnectOptions, SessionError> {
    let connector = runner.autoscaler.as_ref().map(|a| &a.connector_config);
    let addr = match (
        connector.map(|c| c.use_external_addr).unwrap_or(false),
        &info.external_addr,
    ) {
        (true, Some(external)) => external.clone(),
        _ => info.internal_addr.clone(),
    };
    // A provider that names a per-instance identity (the local provider's users) wins over
    // the static username; otherwise the configured username is used.
    let username = info
        .username
        .clone()
        .or_else(|| connector.and_then(|c| c.username.clone()))
        .ok_or(SessionError::NoUser)?;
    let password = info.password.clone().or_else(|| {
        connector
            .and_then(|c| c.password.as_ref())
            .map(|p| SecretString::new(p.expose()))
    });
    let private_key = match connector.and_then(|c| c.key_path.as_ref()) {
        Some(path) => Some(SecretString::new(std::fs::read_to_string(path).map_err(
            |source| SessionError::Key {
                path: path.display().to_string(),
                source,
            },
        )?)),
        None => info.private_key.clone(),
    };
    let host_key = match &info.host_key {
        Some(key) => HostKeyCheck::Pinned(key.clone()),
        None => HostKeyCheck::AcceptAny,
    };
    Ok(ConnectOptions {
        addr,
        username,
        password,
        private_key,
        host_key,
        timeout: connector
            .and_then(|c| c.timeout)
            .unwrap_or(Duration::from_secs(60)),
        keepalive: connector.and_then(|c| c.keepalive),
    })
}

/// The engine socket: the instance's own (local provider) when the provider knows it, else
/// `[runners.docker] host`, else Docker's default.
pub fn docker_tunnel(runner: &RunnerConfig, info: &ConnectInfo) -> Result<Tunnel, SessionError> {
    let host = match (&info.docker_socket, &runner.docker.host) {
        (Some(socket), _) => format!("unix://{socket}"),
        (None, Some(host)) => host.clone(),
        (None, None) => DEFAULT_DOCKER_HOST.to_string(),
    };
    let dial_stdio = runner.feature_flag("FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO");
    Ok(Tunnel::for_docker_host(&host, dial_stdio)?)
}
