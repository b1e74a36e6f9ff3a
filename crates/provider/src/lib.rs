//! The provider abstraction: a group of executor instances that can be listed, grown and
//! shrunk, like a cloud scale set. Providers know their platform and nothing of jobs.
//!
//! The shape follows GitLab's fleeting plugins (`Increase`, `Decrease`, `Update`,
//! `ConnectInfo`) so that cloud scale sets, the local provider and later a host for
//! existing fleeting plugin binaries all fit behind one trait.

use std::fmt;
use std::path::Path;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// The provider's own name for one instance (a VM id, a local user name, ...).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceId(pub String);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the platform says about an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Asked for, not yet usable.
    Creating,
    /// Up; whether it is ready for jobs is for the autoscaler to check.
    Running,
    /// Being removed.
    Deleting,
    /// Will never become usable (failed provisioning, deallocated, half-built): replace it.
    Failed { reason: String },
}

/// One instance as listed by the provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderInstance {
    pub id: InstanceId,
    pub state: InstanceState,
}

/// A secret string (password, private key) that never prints.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[MASKED]")
    }
}

/// How to reach an instance, as the platform knows it. The connector configuration of the
/// runner fills in or overrides credentials the provider does not supply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectInfo {
    /// Address inside the platform's network, `host:port` or `host` (port from the protocol).
    pub internal_addr: String,
    /// Public address, when the platform has one.
    pub external_addr: Option<String>,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    /// A private key in OpenSSH or PEM form that the provider generated for this instance.
    pub private_key: Option<SecretString>,
    /// The instance's SSH host key (OpenSSH public key line), when the platform knows it;
    /// the connector then checks the server against it instead of trusting on first use.
    pub host_key: Option<String>,
    pub os: String,
    pub arch: String,
    /// Where the container engine's API socket is on the instance, when the platform knows.
    pub docker_socket: Option<String>,
}

/// Facts about the platform, reported once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderInfo {
    /// Plugin name as written in config (e.g. `local`).
    pub name: String,
    /// The platform's own hard cap on the group's size.
    pub max_size: usize,
}

/// Which image an instance runs, for image maintenance: instances that are not on the
/// group's current image are drained after their job and replaced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceImage {
    pub id: InstanceId,
    /// The image as the platform names it (an image id or path, or `publisher:offer:sku:version`).
    pub image: String,
    /// The image version the instance was built from, when the platform tells it.
    pub version: Option<String>,
    /// Whether the instance matches the group's current model (Azure `latestModelApplied`);
    /// `None` when the platform has no such notion.
    pub latest_model_applied: Option<bool>,
    /// The version new instances get (or should get, with a tracked image gallery).
    pub target_version: Option<String>,
    /// `false`: the instance runs an outdated image and should be replaced after its
    /// current job. Only `Some(false)` asks for replacement; `None` means unknown.
    pub up_to_date: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider configuration: {0}")]
    Config(String),
    #[error("instance {id}: {message}")]
    Instance { id: InstanceId, message: String },
    #[error("unknown instance {0}")]
    UnknownInstance(InstanceId),
    #[error("{0}")]
    Platform(String),
}

/// A group of instances on one platform.
#[async_trait]
pub trait Provider: Send + Sync {
    fn info(&self) -> ProviderInfo;

    /// Every instance of the group as the platform sees it now. This must work after a
    /// restart of the manager: state comes from the platform, not from memory.
    async fn list(&self) -> Result<Vec<ProviderInstance>, ProviderError>;

    /// Asks for `count` more instances; returns how many requests were accepted. New
    /// instances show up in [`Provider::list`] as `Creating`, then `Running` or `Failed`.
    async fn increase(&self, count: usize) -> Result<usize, ProviderError>;

    /// Removes these instances; returns those whose removal was accepted. Removal of an
    /// instance must leave nothing of it behind.
    async fn decrease(&self, ids: &[InstanceId]) -> Result<Vec<InstanceId>, ProviderError>;

    /// How to reach a running instance.
    async fn connect_info(&self, id: &InstanceId) -> Result<ConnectInfo, ProviderError>;

    /// Stops background work of the provider itself (not the instances).
    async fn shutdown(&self) {}

    /// Makes the image `reference`, held in the `docker save` archive `archive`, available to
    /// every instance of the group without a load into each; `Ok(false)` when the provider
    /// cannot (the caller then loads it into each instance). A shared image is read-only
    /// and may belong to a user the instances do not map: it must not write to its own
    /// filesystem outside its mounts.
    async fn share_image(&self, archive: &Path, reference: &str) -> Result<bool, ProviderError> {
        let _ = (archive, reference);
        Ok(false)
    }

    /// Resolves when an instance may have changed state on the provider's own time (a
    /// creation or deletion it runs itself finished), so the caller lists again at once
    /// instead of at its next tick. A provider that learns states only by listing (a cloud
    /// API) never resolves. A change before the call is not lost: the next call resolves.
    async fn changed(&self) {
        std::future::pending::<()>().await
    }

    /// Per instance, which image it runs and whether that is the group's current image.
    /// Providers without image tracking answer with a [`ProviderError::Platform`] error
    /// saying so; the caller then does no image maintenance.
    async fn instance_images(&self) -> Result<Vec<InstanceImage>, ProviderError> {
        Err(ProviderError::Platform(format!(
            "provider {} does not report instance images",
            self.info().name
        )))
    }
}
