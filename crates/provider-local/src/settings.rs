//! `plugin_config` of the local provider, and the credentials it takes from the connector.

use podfleet_image_cache::{MirrorRoute, render_registries_conf_dropin};
use std::path::PathBuf;

use podfleet_provider::{ProviderError, SecretString};
use serde::Deserialize;

/// `[runners.autoscaler.plugin_config]` for `plugin = "local"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSettings {
    /// Name of the group (the "scale set"); instance users are tagged with it.
    #[serde(default = "default_name")]
    pub name: String,
    /// Where the provider keeps its sshd, keys and image archives.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Port of the managed sshd on 127.0.0.1; 0 picks a free port once and keeps it.
    #[serde(default)]
    pub ssh_port: u16,
    /// Images of the host's (root's) Podman store that every instance carries, as a VM
    /// image would. Unset: every image of the host's store.
    #[serde(default)]
    pub images: Option<Vec<String>>,
    /// Upper bound of the group, like a scale set's quota.
    #[serde(default = "default_max_size")]
    pub max_size: usize,
    /// A `registries.conf` drop-in (TOML text) written into each instance, for example to
    /// point the instance at a pull-through image cache.
    #[serde(default)]
    pub registries_conf: Option<String>,
    /// A podfleet image cache (`podfleet cache serve`) the instances pull through, as
    /// `HOST:PORT` reachable from the instances (plain HTTP on a loopback address).
    #[serde(default)]
    pub image_cache: Option<String>,
    /// The registries pulled through `image_cache`; each must be an upstream prefix of the
    /// cache. Default: `docker.io`.
    #[serde(default = "default_cache_registries")]
    pub image_cache_registries: Vec<String>,
    /// The instance's Podman storage driver (its `~/.config/containers/storage.conf`).
    /// `overlay` — native in a user namespace (Linux 5.13+), else through fuse-overlayfs —
    /// shares image layers between containers; `vfs` copies the whole image for every
    /// container (Podman's choice on Debian 12 when nothing says otherwise).
    #[serde(default = "default_storage_driver")]
    pub storage_driver: String,
}

fn default_storage_driver() -> String {
    "overlay".into()
}

fn default_cache_registries() -> Vec<String> {
    vec!["docker.io".into()]
}

fn default_name() -> String {
    "local".into()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/podfleet/local")
}
fn default_max_size() -> usize {
    64
}

impl LocalSettings {
    /// Whether instances read the host's shared image store: it is an overlay store, which
    /// only overlay instances can read.
    pub(crate) fn shares_images(&self) -> bool {
        self.storage_driver == "overlay"
    }

    pub fn from_plugin_config(
        config: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, ProviderError> {
        let settings: LocalSettings =
            serde_json::from_value(serde_json::Value::Object(config.clone())).map_err(|e| {
                ProviderError::Config(format!(
                    "plugin_config of the local provider: {e} (known keys: name, state_dir, \
                     ssh_port, images, max_size, registries_conf, image_cache, \
                     image_cache_registries, storage_driver)"
                ))
            })?;
        let valid = !settings.name.is_empty()
            && settings
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(ProviderError::Config(format!(
                "plugin_config.name {:?} must be letters, digits, '-' or '_'",
                settings.name
            )));
        }
        if !["overlay", "vfs", "btrfs", "zfs"].contains(&settings.storage_driver.as_str()) {
            return Err(ProviderError::Config(format!(
                "plugin_config.storage_driver {:?} is not a Podman storage driver: use \
                 \"overlay\" (the default) or \"vfs\"",
                settings.storage_driver
            )));
        }
        settings.cache_dropin()?;
        Ok(settings)
    }

    /// The `registries.conf.d` drop-in that sends the instance's pulls through
    /// `image_cache`, when one is set.
    pub fn cache_dropin(&self) -> Result<Option<String>, ProviderError> {
        let Some(address) = &self.image_cache else {
            return Ok(None);
        };
        let routes: Vec<MirrorRoute> = self
            .image_cache_registries
            .iter()
            .map(|r| MirrorRoute::same(r))
            .collect();
        render_registries_conf_dropin(address, &routes, true)
            .map(Some)
            .map_err(|e| {
                ProviderError::Config(format!(
                    "plugin_config.image_cache / image_cache_registries: {e}"
                ))
            })
    }
}

/// Credentials the instances accept, from `[runners.autoscaler.connector_config]`.
#[derive(Clone, Debug, Default)]
pub struct InstanceCredentials {
    /// Password set on each instance user (password authentication).
    pub password: Option<SecretString>,
    /// Public key (OpenSSH line) authorized for each instance user. When neither this nor a
    /// password is given, the provider generates a key pair and hands out the private key.
    pub authorized_key: Option<String>,
}
