//! Builds each runner's provider from its `plugin` and `plugin_config`.

use std::sync::Arc;

use anyhow::{Context, bail};
use podfleet_config::RunnerConfig;
use podfleet_provider::{Provider, SecretString};
use podfleet_provider_local::{InstanceCredentials, LocalProvider, LocalSettings};

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
        other => bail!(
            "runner {:?}: provider plugin {other:?} is not available in this build of podfleet \
             (available: local)",
            runner.name
        ),
    }
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
