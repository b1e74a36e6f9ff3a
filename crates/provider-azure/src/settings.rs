//! `plugin_config` of the Azure provider (the incumbent plugin's keys plus podfleet's own),
//! the credentials the binary hands over from the environment, and the provider's timing.

use std::path::PathBuf;
use std::time::Duration;

use podfleet_provider::{ProviderError, SecretString};
use serde::Deserialize;

/// Public Azure endpoints; every one can be replaced (sovereign clouds, a local stand-in).
pub const DEFAULT_ARM_ENDPOINT: &str = "https://management.azure.com";
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";
pub const DEFAULT_ARM_AUDIENCE: &str = "https://management.azure.com/";
pub const DEFAULT_LOGIN_ENDPOINT: &str = "https://login.microsoftonline.com";
/// Compute (scale sets, VMs) api-version; see reference/azure-vmss.md §1.
pub const DEFAULT_COMPUTE_API_VERSION: &str = "2024-11-01";
/// Network (NIC, public IP by id) api-version, for Flexible scale sets.
pub const DEFAULT_NETWORK_API_VERSION: &str = "2025-01-01";
/// The only version of the scale-set NIC / public-IP APIs (paths under a scale set).
pub const VMSS_NETWORK_API_VERSION: &str = "2018-10-01";
pub const DEFAULT_GALLERY_API_VERSION: &str = "2024-03-03";

/// Which credential to use for ARM tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// Managed identity, then client secret, then workload identity, then Azure CLI: the
    /// first one that is configured and answers is used from then on.
    #[default]
    Auto,
    ManagedIdentity,
    ClientSecret,
    WorkloadIdentity,
    AzureCli,
}

/// `[runners.autoscaler.plugin_config]` for `plugin = "fleeting-plugin-azure"` (or `"azure"`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureSettings {
    /// Scale set name (incumbent key).
    pub name: String,
    /// Incumbent key.
    pub subscription_id: String,
    /// Incumbent key.
    pub resource_group_name: String,
    #[serde(default)]
    pub credential: CredentialKind,
    /// Entra tenant for client-secret and workload-identity tokens.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Application (client) id of a service principal or of a user-assigned managed identity.
    #[serde(default)]
    pub client_id: Option<String>,
    /// File holding the client secret (never the secret itself in the config).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Projected service-account token (workload identity federation).
    #[serde(default)]
    pub federated_token_file: Option<PathBuf>,
    /// A user-assigned managed identity by object id.
    #[serde(default)]
    pub managed_identity_object_id: Option<String>,
    /// A user-assigned managed identity by ARM resource id.
    #[serde(default)]
    pub managed_identity_resource_id: Option<String>,
    #[serde(default = "default_arm_endpoint")]
    pub arm_endpoint: String,
    #[serde(default = "default_imds_endpoint")]
    pub imds_endpoint: String,
    #[serde(default)]
    pub login_endpoint: Option<String>,
    /// Token audience of ARM; change it only for sovereign clouds.
    #[serde(default = "default_arm_audience")]
    pub arm_audience: String,
    /// `az` executable for the Azure CLI credential.
    #[serde(default = "default_azure_cli")]
    pub azure_cli: PathBuf,
    #[serde(default = "default_compute_api_version")]
    pub compute_api_version: String,
    #[serde(default = "default_network_api_version")]
    pub network_api_version: String,
    #[serde(default = "default_gallery_api_version")]
    pub gallery_api_version: String,
    /// Delete instances that failed or are stuck with `forceDeletion=true`.
    #[serde(default = "default_true")]
    pub force_delete_failed: bool,
    /// Upper bound of the group (Azure allows up to 1000 instances per scale set).
    #[serde(default = "default_max_size")]
    pub max_size: usize,
    /// Compare instances with the newest version of the model's Compute Gallery image
    /// definition, not only with the model itself.
    #[serde(default)]
    pub track_gallery_latest: bool,
    /// How long a scale-out or delete operation may run before it is reported as failed.
    #[serde(default = "default_operation_timeout_seconds")]
    pub operation_timeout_seconds: u64,
}

fn default_arm_endpoint() -> String {
    DEFAULT_ARM_ENDPOINT.into()
}
fn default_arm_audience() -> String {
    DEFAULT_ARM_AUDIENCE.into()
}
fn default_imds_endpoint() -> String {
    DEFAULT_IMDS_ENDPOINT.into()
}
fn default_azure_cli() -> PathBuf {
    PathBuf::from("az")
}
fn default_compute_api_version() -> String {
    DEFAULT_COMPUTE_API_VERSION.into()
}
fn default_network_api_version() -> String {
    DEFAULT_NETWORK_API_VERSION.into()
}
fn default_gallery_api_version() -> String {
    DEFAULT_GALLERY_API_VERSION.into()
}
fn default_true() -> bool {
    true
}
fn default_max_size() -> usize {
    1000
}
fn default_operation_timeout_seconds() -> u64 {
    30 * 60
}

const KNOWN_KEYS: &str = "name, subscription_id, resource_group_name, credential, tenant_id, \
    client_id, client_secret_file, federated_token_file, managed_identity_object_id, \
    managed_identity_resource_id, arm_endpoint, imds_endpoint, login_endpoint, arm_audience, azure_cli, \
    compute_api_version, network_api_version, gallery_api_version, force_delete_failed, max_size, \
    track_gallery_latest, operation_timeout_seconds";

impl AzureSettings {
    pub fn from_plugin_config(
        config: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, ProviderError> {
        let settings: AzureSettings =
            serde_json::from_value(serde_json::Value::Object(config.clone())).map_err(|e| {
                ProviderError::Config(format!(
                    "plugin_config of the azure provider: {e} (known keys: {KNOWN_KEYS})"
                ))
            })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ProviderError> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("name", &self.name),
            ("subscription_id", &self.subscription_id),
            ("resource_group_name", &self.resource_group_name),
        ] {
            let valid = !value.is_empty()
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.()".contains(c));
            if !valid {
                problems.push(format!(
                    "plugin_config.{key} {value:?} must be a non-empty Azure name (letters, \
                     digits, '-', '_', '.', '(', ')')"
                ));
            }
        }
        for (key, value) in [
            ("arm_endpoint", Some(&self.arm_endpoint)),
            ("imds_endpoint", Some(&self.imds_endpoint)),
            ("login_endpoint", self.login_endpoint.as_ref()),
        ] {
            if let Some(value) = value
                && reqwest::Url::parse(value).is_err()
            {
                problems.push(format!(
                    "plugin_config.{key} {value:?} is not a URL (for example https://management.azure.com)"
                ));
            }
        }
        if self.max_size == 0 {
            problems.push("plugin_config.max_size must be at least 1".into());
        }
        let user_assigned = [
            self.managed_identity_object_id.is_some(),
            self.managed_identity_resource_id.is_some(),
        ];
        if user_assigned.iter().filter(|set| **set).count() > 1 {
            problems.push(
                "plugin_config: set at most one of managed_identity_object_id and \
                 managed_identity_resource_id"
                    .into(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ProviderError::Config(problems.join("; ")))
        }
    }

    /// ARM id of the scale set.
    pub fn scale_set_id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/{}",
            self.subscription_id, self.resource_group_name, self.name
        )
    }
}

/// Credentials from the process environment (`AZURE_TENANT_ID`, `AZURE_CLIENT_ID`,
/// `AZURE_CLIENT_SECRET`, `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_AUTHORITY_HOST`), read by the
/// binary; `plugin_config` values win over them.
#[derive(Clone, Debug, Default)]
pub struct AzureEnvironment {
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub federated_token_file: Option<PathBuf>,
    pub authority_host: Option<String>,
}

/// Where an instance is reached and as whom, from `connector_config`.
#[derive(Clone, Debug)]
pub struct ConnectorDefaults {
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub use_external_addr: bool,
    pub os: String,
    pub arch: String,
    pub protocol_port: u16,
}

impl Default for ConnectorDefaults {
    fn default() -> Self {
        Self {
            username: None,
            password: None,
            use_external_addr: false,
            os: "linux".into(),
            arch: "amd64".into(),
            protocol_port: 22,
        }
    }
}

/// Waits of the provider. `second` is the length of one second of `Retry-After` and of the
/// back-off schedule: real time in production, shortened in tests so that a 1200 s throttle
/// can be exercised in milliseconds.
#[derive(Clone, Debug)]
pub struct Timing {
    pub second: Duration,
    /// Tokens are renewed this long before they expire.
    pub token_refresh_margin: Duration,
    /// Connect timeout of the first IMDS try, so a host off Azure moves on quickly.
    pub imds_probe_timeout: Duration,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
    /// Attempts of one ARM request on 429, 5xx and connection errors.
    pub max_attempts: u32,
    /// Below this many remaining requests (any `x-ms-ratelimit-remaining-*` header) the
    /// client spaces its requests out.
    pub slow_down_below: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            second: Duration::from_secs(1),
            token_refresh_margin: Duration::from_secs(300),
            imds_probe_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(60),
            max_attempts: 6,
            slow_down_below: 20,
        }
    }
}

impl Timing {
    /// `n` seconds of this timing.
    pub fn seconds(&self, n: f64) -> Duration {
        self.second.mul_f64(n.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn the_incumbent_keys_alone_are_enough() {
        let settings = AzureSettings::from_plugin_config(&config(
            r#"{"name":"podman-executors","subscription_id":"00000000-0000-0000-0000-000000000000","resource_group_name":"gitlab-runner-test"}"#,
        ))
        .unwrap();
        assert_eq!(settings.credential, CredentialKind::Auto);
        assert_eq!(settings.arm_endpoint, DEFAULT_ARM_ENDPOINT);
        assert!(settings.scale_set_id().ends_with(
            "/resourceGroups/gitlab-runner-test/providers/Microsoft.Compute/virtualMachineScaleSets/podman-executors"
        ));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let error = AzureSettings::from_plugin_config(&config(
            r#"{"name":"","subscription_id":"a/b","resource_group_name":"rg","arm_endpoint":"not a url","max_size":0}"#,
        ))
        .unwrap_err()
        .to_string();
        for key in [
            "plugin_config.name",
            "plugin_config.subscription_id",
            "arm_endpoint",
            "max_size",
        ] {
            assert!(error.contains(key), "{key} missing from: {error}");
        }
    }

    #[test]
    fn unknown_keys_are_named_with_the_known_ones() {
        let error = AzureSettings::from_plugin_config(&config(
            r#"{"name":"a","subscription_id":"s","resource_group_name":"rg","nmae":"x"}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("nmae") && error.contains("known keys"),
            "{error}"
        );
    }
}
