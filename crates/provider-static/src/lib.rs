//! The static provider (`plugin = "static"`): a fixed pool of existing hosts, each already
//! prepared as an executor (`podfleet host prepare`), presented as a scale set. The pool's
//! size is the group's `max_size`; `increase` activates free hosts, `decrease` returns them
//! to the pool. Hosts are never created or destroyed, so returning one does nothing to it:
//! whatever jobs left behind (their containers are removed by the executor) stays, and
//! `delete_instances_on_shutdown` only returns every host to the pool.
//!
//! Which hosts are active lives in this process only: after a manager restart every host
//! is free again and the autoscaler activates what it needs. Credentials come from the
//! runner's `connector_config` (the same user, password or key on every host).

use std::collections::BTreeSet;
use std::sync::Mutex;

use async_trait::async_trait;
use podfleet_provider::{
    ConnectInfo, InstanceId, InstanceState, Provider, ProviderError, ProviderInfo, ProviderInstance,
};
use serde::Deserialize;

/// `[runners.autoscaler.plugin_config]` for `plugin = "static"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticSettings {
    /// The pool: SSH addresses, `host:port` (or `host`, port 22).
    pub instances: Vec<String>,
    /// The Docker API socket on every host (for a `host prepare`d user:
    /// `/run/user/<uid>/podman/podman.sock`). Unset: `[runners.docker] host`.
    #[serde(default)]
    pub docker_socket: Option<String>,
}

impl StaticSettings {
    /// Reads and checks the plugin config, reporting every problem at once.
    pub fn from_plugin_config(
        config: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, ProviderError> {
        let settings: StaticSettings =
            serde_json::from_value(serde_json::Value::Object(config.clone())).map_err(|e| {
                ProviderError::Config(format!(
                    "plugin_config of the static provider: {e} (known keys: instances, \
                     docker_socket)"
                ))
            })?;
        let mut problems = Vec::new();
        if settings.instances.is_empty() {
            problems
                .push("plugin_config.instances is empty: list the hosts as \"host:port\"".into());
        }
        let mut seen = BTreeSet::new();
        for address in &settings.instances {
            if !valid_address(address) {
                problems.push(format!(
                    "plugin_config.instances: {address:?} is not \"host\" or \"host:port\""
                ));
            } else if !seen.insert(address.as_str()) {
                problems.push(format!(
                    "plugin_config.instances: {address:?} is listed twice (a host can run \
                     one instance of the group)"
                ));
            }
        }
        if let Some(socket) = &settings.docker_socket
            && !socket.starts_with('/')
        {
            problems.push(format!(
                "plugin_config.docker_socket {socket:?} must be an absolute path on the hosts"
            ));
        }
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(ProviderError::Config(problems.join("; ")))
        }
    }
}

fn valid_address(address: &str) -> bool {
    let (host, port) = match address.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (address, None),
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0));
    host_ok && port_ok
}

pub struct StaticProvider {
    settings: StaticSettings,
    /// Addresses of the hosts handed to the autoscaler.
    active: Mutex<BTreeSet<String>>,
}

impl StaticProvider {
    pub fn new(settings: StaticSettings) -> Self {
        Self {
            settings,
            active: Mutex::default(),
        }
    }

    fn active(&self) -> Result<std::sync::MutexGuard<'_, BTreeSet<String>>, ProviderError> {
        self.active
            .lock()
            .map_err(|_| ProviderError::Platform("static provider state poisoned".into()))
    }
}

#[async_trait]
impl Provider for StaticProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "static".into(),
            max_size: self.settings.instances.len(),
        }
    }

    async fn list(&self) -> Result<Vec<ProviderInstance>, ProviderError> {
        Ok(self
            .active()?
            .iter()
            .map(|address| ProviderInstance {
                id: InstanceId(address.clone()),
                state: InstanceState::Running,
            })
            .collect())
    }

    async fn increase(&self, count: usize) -> Result<usize, ProviderError> {
        let mut active = self.active()?;
        let free: Vec<String> = self
            .settings
            .instances
            .iter()
            .filter(|address| !active.contains(*address))
            .take(count)
            .cloned()
            .collect();
        let activated = free.len();
        active.extend(free);
        Ok(activated)
    }

    async fn decrease(&self, ids: &[InstanceId]) -> Result<Vec<InstanceId>, ProviderError> {
        let mut active = self.active()?;
        Ok(ids
            .iter()
            .filter(|id| active.remove(&id.0))
            .cloned()
            .collect())
    }

    async fn connect_info(&self, id: &InstanceId) -> Result<ConnectInfo, ProviderError> {
        if !self.active()?.contains(&id.0) {
            return Err(ProviderError::UnknownInstance(id.clone()));
        }
        Ok(ConnectInfo {
            internal_addr: id.0.clone(),
            external_addr: None,
            // The runner's connector_config supplies user, password or key.
            username: None,
            password: None,
            private_key: None,
            host_key: None,
            os: "linux".into(),
            arch: std::env::consts::ARCH.into(),
            docker_socket: self.settings.docker_socket.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(instances: &[&str]) -> StaticProvider {
        let config = serde_json::json!({
            "instances": instances,
            "docker_socket": "/run/user/1001/podman/podman.sock",
        });
        let serde_json::Value::Object(map) = config else {
            unreachable!("a json object literal")
        };
        StaticProvider::new(StaticSettings::from_plugin_config(&map).unwrap())
    }

    fn ids(listed: &[ProviderInstance]) -> Vec<&str> {
        listed.iter().map(|i| i.id.0.as_str()).collect()
    }

    #[tokio::test]
    async fn the_pool_is_the_group_and_increase_activates_free_hosts() {
        let provider = provider(&["a:22", "b:2222", "c"]);
        assert_eq!(provider.info().max_size, 3);
        assert!(provider.list().await.unwrap().is_empty());
        assert_eq!(provider.increase(2).await.unwrap(), 2);
        let listed = provider.list().await.unwrap();
        assert_eq!(ids(&listed), vec!["a:22", "b:2222"]);
        assert!(listed.iter().all(|i| i.state == InstanceState::Running));
        // Only one host is left free: asking for more activates what there is.
        assert_eq!(provider.increase(5).await.unwrap(), 1);
        assert_eq!(provider.increase(1).await.unwrap(), 0);
        assert_eq!(provider.list().await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn decrease_returns_hosts_to_the_pool_for_reuse() {
        let provider = provider(&["a:22", "b:22"]);
        provider.increase(2).await.unwrap();
        let returned = provider
            .decrease(&[InstanceId("b:22".into()), InstanceId("zzz:22".into())])
            .await
            .unwrap();
        assert_eq!(
            returned,
            vec![InstanceId("b:22".into())],
            "unknown ids are not accepted"
        );
        assert_eq!(ids(&provider.list().await.unwrap()), vec!["a:22"]);
        let again = provider
            .decrease(&[InstanceId("b:22".into())])
            .await
            .unwrap();
        assert!(again.is_empty(), "a free host cannot be returned twice");
        assert_eq!(provider.increase(1).await.unwrap(), 1);
        assert_eq!(ids(&provider.list().await.unwrap()), vec!["a:22", "b:22"]);
    }

    #[tokio::test]
    async fn connect_info_names_the_host_and_socket_and_leaves_credentials_to_the_connector() {
        let provider = provider(&["127.0.0.1:2022"]);
        let id = InstanceId("127.0.0.1:2022".into());
        assert!(matches!(
            provider.connect_info(&id).await,
            Err(ProviderError::UnknownInstance(_))
        ));
        provider.increase(1).await.unwrap();
        let info = provider.connect_info(&id).await.unwrap();
        assert_eq!(info.internal_addr, "127.0.0.1:2022");
        assert_eq!(
            info.docker_socket.as_deref(),
            Some("/run/user/1001/podman/podman.sock")
        );
        assert_eq!(
            (info.username, info.password, info.private_key),
            (None, None, None)
        );
    }

    #[test]
    fn bad_plugin_config_reports_every_problem() {
        let config = serde_json::json!({
            "instances": ["a:22", "a:22", "b:0", "c d", ""],
            "docker_socket": "relative.sock",
        });
        let serde_json::Value::Object(map) = config else {
            unreachable!("a json object literal")
        };
        let Err(ProviderError::Config(message)) = StaticSettings::from_plugin_config(&map) else {
            panic!("bad config is refused");
        };
        for expected in [
            "listed twice",
            "\"b:0\"",
            "\"c d\"",
            "\"\"",
            "absolute path",
        ] {
            assert!(message.contains(expected), "{expected}: {message}");
        }
        let unknown = serde_json::json!({"instances": ["a"], "max_size": 3});
        let serde_json::Value::Object(map) = unknown else {
            unreachable!("a json object literal")
        };
        let error = StaticSettings::from_plugin_config(&map)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("known keys: instances, docker_socket"),
            "{error}"
        );
        let empty = serde_json::json!({"instances": []});
        let serde_json::Value::Object(map) = empty else {
            unreachable!("a json object literal")
        };
        let error = StaticSettings::from_plugin_config(&map)
            .unwrap_err()
            .to_string();
        assert!(error.contains("is empty"), "{error}");
    }
}
