//! Readiness of a new (or adopted) instance: SSH answers with the configured credentials,
//! the `instance_ready_command` succeeds, the container engine answers the Docker API
//! through the tunnel; then podfleet's helper image is loaded when missing (best effort). A failed attempt is retried with backoff (1 s doubling to 15 s) until
//! `instance_ready_timeout`, because cloud-init and sshd come up at their own pace; the
//! incumbent's single shot turns a slow boot into create/delete churn.

use std::time::Duration;

use async_trait::async_trait;
use podfleet_autoscaler::ReadinessCheck;
use podfleet_config::RunnerConfig;
use podfleet_connector::Connection;
use podfleet_executor::Executor;
use podfleet_provider::{ConnectInfo, InstanceId};
use tokio::time::Instant;

use crate::session;

const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(15);

pub struct InstanceReadiness {
    pub runner: RunnerConfig,
}

#[async_trait]
impl ReadinessCheck for InstanceReadiness {
    async fn check(&self, id: &InstanceId, info: &ConnectInfo) -> Result<(), String> {
        let timeout = self
            .runner
            .autoscaler
            .as_ref()
            .map_or(Duration::from_secs(300), |a| a.instance_ready_timeout);
        let deadline = Instant::now() + timeout;
        let mut delay = FIRST_RETRY;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match tokio::time::timeout_at(deadline, self.attempt(id, info)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(error)) => error,
                Err(_) => "the attempt did not finish".to_owned(),
            };
            if Instant::now() + delay >= deadline {
                return Err(format!(
                    "{error} (instance {id} not ready after {attempts} attempt(s) within instance_ready_timeout = {timeout:?})"
                ));
            }
            tracing::debug!(instance = %id, attempt = attempts, %error, "instance not ready yet; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(LONGEST_RETRY);
        }
    }
}

impl InstanceReadiness {
    /// One attempt: connect, run the ready command once, ping the engine.
    async fn attempt(&self, id: &InstanceId, info: &ConnectInfo) -> Result<(), String> {
        let options = session::connect_options(&self.runner, info).map_err(|e| e.to_string())?;
        let connection = Connection::connect(&options)
            .await
            .map_err(|e| e.to_string())?;
        let result = self.check_connected(id, info, &connection).await;
        connection.close().await;
        result
    }

    async fn check_connected(
        &self,
        id: &InstanceId,
        info: &ConnectInfo,
        connection: &Connection,
    ) -> Result<(), String> {
        let autoscaler = self.runner.autoscaler.as_ref();
        if let Some(command) = autoscaler.and_then(|a| a.instance_ready_command.as_deref()) {
            let output = connection.exec(command).await.map_err(|e| e.to_string())?;
            if output.exit_status != 0 {
                return Err(format!(
                    "instance_ready_command exited {} on {id}: {}",
                    output.exit_status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
        }
        let tunnel = session::docker_tunnel(&self.runner, info).map_err(|e| e.to_string())?;
        let executor = Executor::connect(connection.clone(), tunnel)
            .await
            .map_err(|e| format!("container engine on {id} does not answer: {e}"))?;
        // The instance's first job should not wait for podfleet's helper image: an instance
        // created ahead of its jobs loads it while it waits. Best effort: a job that needs
        // the image loads it again and fails with the reason if it still cannot.
        if let Some((image, archive)) = crate::spec::own_helper_image(&self.runner)
            && let Err(error) = executor.preload_helper_image(&image, archive).await
        {
            tracing::warn!(instance = %id, %error, "podfleet's helper image was not preloaded");
        }
        Ok(())
    }
}
