//! Readiness of a new instance: SSH answers with the configured credentials, the
//! `instance_ready_command` succeeds (retried until a deadline), and the container engine
//! answers the Docker API through the tunnel.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use podfleet_autoscaler::ReadinessCheck;
use podfleet_config::RunnerConfig;
use podfleet_connector::Connection;
use podfleet_executor::Executor;
use podfleet_provider::{ConnectInfo, InstanceId};

use crate::session;

pub struct InstanceReadiness {
    pub runner: RunnerConfig,
}

#[async_trait]
impl ReadinessCheck for InstanceReadiness {
    async fn check(&self, id: &InstanceId, info: &ConnectInfo) -> Result<(), String> {
        let options = session::connect_options(&self.runner, info).map_err(|e| e.to_string())?;
        let connection = Connection::connect(&options)
            .await
            .map_err(|e| e.to_string())?;
        let result = self.check_connected(id, info, &connection).await;
        connection.close().await;
        result
    }
}

impl InstanceReadiness {
    async fn check_connected(
        &self,
        id: &InstanceId,
        info: &ConnectInfo,
        connection: &Connection,
    ) -> Result<(), String> {
        let autoscaler = self.runner.autoscaler.as_ref();
        if let Some(command) = autoscaler.and_then(|a| a.instance_ready_command.as_deref()) {
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                let output = connection.exec(command).await.map_err(|e| e.to_string())?;
                if output.exit_status == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "instance_ready_command exited {} on {id}: {}",
                        output.exit_status,
                        String::from_utf8_lossy(&output.stderr).trim()
                    ));
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        let tunnel = session::docker_tunnel(&self.runner, info).map_err(|e| e.to_string())?;
        Executor::connect(connection.clone(), tunnel)
            .await
            .map(|_| ())
            .map_err(|e| format!("container engine on {id} does not answer: {e}"))
    }
}
