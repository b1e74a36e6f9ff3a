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

/// SSH sessions (with the engine client over them and its idle tunnels) kept per instance
/// between its jobs: the next job on the instance skips the SSH handshake, authentication
/// and first channel. A session is given up when its instance leaves service (used up,
/// failed) or the session stops answering; jobs sharing an instance share its session.
#[derive(Default)]
pub(crate) struct Sessions {
    open: std::sync::Mutex<std::collections::HashMap<String, Kept>>,
}

struct Kept {
    connection: podfleet_connector::Connection,
    executor: podfleet_executor::Executor,
    /// Jobs using it now.
    users: usize,
    /// Not handed out any more; closed when its last user is done.
    done: bool,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Kept>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The kept session to `instance` when it still answers, counted as in use. Sessions
    /// nobody uses whose connection ended or whose instance left service (`in_service`
    /// says) are closed and forgotten on the way: a deleted VM does not always end the TCP
    /// connection to it.
    pub async fn checkout(
        &self,
        instance: &str,
        in_service: impl Fn(&str) -> bool,
    ) -> Option<(podfleet_connector::Connection, podfleet_executor::Executor)> {
        let (found, stale) = {
            let mut open = self.lock();
            let stale: Vec<String> = open
                .iter()
                .filter(|(id, kept)| {
                    kept.users == 0 && (kept.connection.is_closed() || !in_service(id.as_str()))
                })
                .map(|(id, _)| id.clone())
                .collect();
            let stale: Vec<_> = stale
                .iter()
                .filter_map(|id| open.remove(id))
                .map(|kept| kept.connection)
                .collect();
            let found = open
                .get_mut(instance)
                .filter(|kept| !kept.done && !kept.connection.is_closed())
                .map(|kept| {
                    kept.users += 1;
                    (kept.connection.clone(), kept.executor.clone())
                });
            (found, stale)
        };
        for connection in stale {
            connection.close().await;
        }
        let found = found?;
        // The connection may have died without saying so yet: one quick ping.
        let ping = found.1.docker().ping();
        if matches!(
            tokio::time::timeout(Duration::from_secs(5), ping).await,
            Ok(Ok(_))
        ) {
            return Some(found);
        }
        if let Some(connection) = self.checkin(instance, false) {
            connection.close().await;
        }
        None
    }

    /// Keeps a new session to `instance` for the instance's next jobs, counted as in use
    /// by the caller; `false` when another job's session is kept already.
    pub fn share(
        &self,
        instance: &str,
        connection: &podfleet_connector::Connection,
        executor: &podfleet_executor::Executor,
    ) -> bool {
        let mut open = self.lock();
        if open.contains_key(instance) {
            return false;
        }
        open.insert(
            instance.to_owned(),
            Kept {
                connection: connection.clone(),
                executor: executor.clone(),
                users: 1,
                done: false,
            },
        );
        true
    }

    /// A job is done with the kept session to `instance`; `keep`: the instance stays in
    /// service and the session worked. Returns the connection to close when nobody uses it
    /// any more and it is not kept.
    pub fn checkin(&self, instance: &str, keep: bool) -> Option<podfleet_connector::Connection> {
        let mut open = self.lock();
        let kept = open.get_mut(instance)?;
        kept.users = kept.users.saturating_sub(1);
        kept.done |= !keep;
        if kept.done && kept.users == 0 {
            return open.remove(instance).map(|kept| kept.connection);
        }
        None
    }
}
