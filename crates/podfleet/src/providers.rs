//! Builds each runner's provider from its `plugin` and `plugin_config`.

use std::sync::Arc;

use anyhow::{Context, bail};
use podfleet_config::RunnerConfig;
use podfleet_provider::{Provider, SecretString};
use podfleet_provider_local::{InstanceCredentials, LocalProvider, LocalSettings};
use podfleet_provider_static::{StaticProvider, StaticSettings};

/// Local groups (state dir + name) already handed to a runner in this process.
static LOCAL_GROUPS: std::sync::Mutex<std::collections::BTreeSet<std::path::PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

pub async fn provider_for(runner: &RunnerConfig) -> anyhow::Result<Arc<dyn Provider>> {
    let Some(autoscaler) = &runner.autoscaler else {
        bail!(
            "runner {:?} has no [runners.autoscaler] section",
            runner.name
        );
    };
    match autoscaler.plugin.as_str() {
        "local" | "podfleet-local" => {
            let settings = LocalSettings::from_plugin_config(&autoscaler.plugin_config)
                .with_context(|| format!("runner {:?}", runner.name))?;
            // Two runners on one group would each delete the other's instances as unknown.
            let group = settings.state_dir.join(&settings.name);
            let fresh = LOCAL_GROUPS
                .lock()
                .map(|mut groups| groups.insert(group.clone()))
                .unwrap_or(false);
            if !fresh {
                bail!(
                    "runner {:?}: local group {} is already used by another runner; give each \
                     runner its own plugin_config.name",
                    runner.name,
                    group.display()
                );
            }
            let connector = &autoscaler.connector_config;
            let authorized_key = match &connector.key_path {
                Some(path) => Some(public_key_of(path).await?),
                None => None,
            };
            let credentials = InstanceCredentials {
                password: connector
                    .password
                    .as_ref()
                    .map(|p| SecretString::new(p.expose())),
                authorized_key,
            };
            let provider = LocalProvider::new(settings, credentials)
                .await
                .with_context(|| format!("runner {:?}: local provider", runner.name))?;
            Ok(Arc::new(provider))
        }
        "static" => {
            let settings = StaticSettings::from_plugin_config(&autoscaler.plugin_config)
                .with_context(|| format!("runner {:?}", runner.name))?;
            Ok(Arc::new(StaticProvider::new(settings)))
        }
        "azure" | "fleeting-plugin-azure" => {
            Ok(Arc::new(azure_provider(runner, autoscaler).await?))
        }
        other => bail!(
            "runner {:?}: provider plugin {other:?} is not available in this build of podfleet \
             (available: local, static, azure)",
            runner.name
        ),
    }
}

/// The Azure scale-set provider: `plugin_config` as the incumbent plugin's (plus podfleet's
/// optional keys), credentials from the conventional `AZURE_*` environment variables.
pub async fn azure_provider(
    runner: &RunnerConfig,
    autoscaler: &podfleet_config::AutoscalerConfig,
) -> anyhow::Result<podfleet_provider_azure::AzureProvider> {
    let settings =
        podfleet_provider_azure::AzureSettings::from_plugin_config(&autoscaler.plugin_config)
            .with_context(|| format!("runner {:?}", runner.name))?;
    let variable = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let environment = podfleet_provider_azure::AzureEnvironment {
        tenant_id: variable("AZURE_TENANT_ID"),
        client_id: variable("AZURE_CLIENT_ID"),
        client_secret: variable("AZURE_CLIENT_SECRET").map(SecretString::new),
        federated_token_file: variable("AZURE_FEDERATED_TOKEN_FILE").map(Into::into),
        authority_host: variable("AZURE_AUTHORITY_HOST"),
    };
    let connector = &autoscaler.connector_config;
    let defaults = podfleet_provider_azure::ConnectorDefaults::default();
    let connector = podfleet_provider_azure::ConnectorDefaults {
        username: connector.username.clone(),
        password: connector
            .password
            .as_ref()
            .map(|p| SecretString::new(p.expose())),
        use_external_addr: connector.use_external_addr,
        os: connector.os.clone().unwrap_or(defaults.os),
        arch: connector.arch.clone().unwrap_or(defaults.arch),
        protocol_port: connector.protocol_port.unwrap_or(defaults.protocol_port),
    };
    podfleet_provider_azure::AzureProvider::new(
        settings,
        environment,
        connector,
        podfleet_provider_azure::Timing::default(),
    )
    .await
    .with_context(|| format!("runner {:?}: azure provider", runner.name))
}

/// The OpenSSH public key line of a private key file.
async fn public_key_of(path: &std::path::Path) -> anyhow::Result<String> {
    let output = tokio::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(path)
        .output()
        .await
        .context("running ssh-keygen -y")?;
    if !output.status.success() {
        bail!(
            "connector_config.key_path {}: cannot derive its public key: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}
