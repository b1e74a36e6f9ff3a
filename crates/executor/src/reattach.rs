//! Re-attaching to a job whose manager process died while the job ran: the job's build
//! container (`podfleet-job-<id>-build`) kept running on its instance under conmon; a
//! restarted manager finds it, reads its retained log from the start (the caller aligns it
//! with what the coordinator already has), follows it to the container's exit, runs
//! after_script and removes everything the job created, as [`Executor::run`] would have.

use std::time::Duration;

use bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
};
use futures_util::StreamExt;
use podfleet_config::DockerConfig;

use crate::exit_marker::ExitMarker;
use crate::{
    Cancellation, Executor, ExecutorError, JobOutcome, JobResources, JobSpec, OutputStream,
    TraceSink, say, say_error, say_warning, stage_script,
};

/// The build container of a job, as found after a manager restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildContainer {
    pub name: String,
    pub running: bool,
}

impl Executor {
    /// The job's build container, or `None` when it no longer exists on the instance.
    pub async fn find_build_container(
        &self,
        job_id: u64,
    ) -> Result<Option<BuildContainer>, ExecutorError> {
        let name = build_container(job_id);
        match self
            .docker
            .inspect_container(&name, None::<InspectContainerOptions>)
            .await
        {
            Ok(inspect) => Ok(Some(BuildContainer {
                running: inspect
                    .state
                    .and_then(|state| state.running)
                    .unwrap_or(false),
                name,
            })),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The build container's output so far (stdout and stderr as the engine retained
    /// them), from its first byte.
    pub async fn build_log(&self, job_id: u64) -> Result<Vec<u8>, ExecutorError> {
        let name = build_container(job_id);
        let options = LogsOptions {
            follow: false,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let mut stream = self.docker.logs(&name, Some(options));
        let mut log = Vec::new();
        // As the job's trace had it: without the stage's exit status line.
        let mut marker = ExitMarker::default();
        while let Some(item) = stream.next().await {
            log.extend(marker.shown(item?));
        }
        log.extend(marker.finish());
        Ok(log)
    }

    /// Follows the build container of `job` to its end: its whole log from the first byte
    /// goes to `trace` (the caller drops what the coordinator already has), then
    /// after_script runs, then every container, the volume and the network of the job are
    /// removed. `remaining` is what is left of the job's timeout.
    pub async fn reattach(
        &self,
        job: &JobSpec,
        config: &DockerConfig,
        trace: TraceSink,
        cancel: Cancellation,
        remaining: Duration,
    ) -> JobOutcome {
        let resources = self.existing_resources(job).await;
        let build = resources.container("build");
        let after = resources.container("after-script");
        resources.record(&after);
        let outcome = tokio::select! {
            outcome = self.follow_to_exit(&build, &trace) => outcome,
            _ = cancel.graceful.cancelled() => JobOutcome::Canceled,
            _ = cancel.hard.cancelled() => JobOutcome::Canceled,
            _ = tokio::time::sleep(remaining) => JobOutcome::TimedOut,
        };
        if matches!(outcome, JobOutcome::Canceled | JobOutcome::TimedOut) {
            let why = if outcome == JobOutcome::TimedOut {
                format!(
                    "execution took longer than {} seconds",
                    job.timeout.as_secs()
                )
            } else {
                "job canceled".to_string()
            };
            say_error(&trace, &why);
            let _ = self.docker.kill_container(&build, None).await;
        }
        // As in a normal run: a hard cancel or a broken engine runs nothing more.
        if !job.after_script.is_empty()
            && !cancel.hard.is_cancelled()
            && !matches!(outcome, JobOutcome::SystemFailure(_))
        {
            // An after_script the previous manager had started is started again from the
            // beginning: its container is replaced.
            let _ = self
                .docker
                .remove_container(
                    &after,
                    Some(RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
            let status = match &outcome {
                JobOutcome::Success => "success",
                JobOutcome::Canceled => "canceled",
                _ => "failed",
            };
            say(&trace, "Running after_script");
            let script = stage_script(job, &job.after_script, Some(status));
            let after_run =
                self.run_container(job, config, &resources, "after-script", script, &trace);
            match tokio::time::timeout(Duration::from_secs(300), after_run).await {
                Ok(JobOutcome::Success) => {}
                Ok(other) => say_warning(&trace, &format!("after_script failed: {other:?}")),
                Err(_) => say_warning(&trace, "after_script timed out after 5m0s"),
            }
        }
        resources.remove(&self.docker).await;
        outcome
    }

    /// Removes what a job created on the instance (its containers, build volume and
    /// network), for a job that cannot be resumed.
    pub async fn remove_job_resources(&self, job: &JobSpec) {
        self.existing_resources(job)
            .await
            .remove(&self.docker)
            .await;
    }

    /// What the job created on the instance, as far as the engine shows it: every
    /// container labelled with the job's id (build, services, helper stages), its build
    /// volume and its network.
    async fn existing_resources(&self, job: &JobSpec) -> JobResources {
        let resources = JobResources::new(job);
        resources.record(&resources.container("build"));
        let options = ListContainersOptions {
            all: true,
            filters: Some(std::collections::HashMap::from([(
                "label".to_string(),
                vec![format!("io.podfleet.job.id={}", job.job_id)],
            )])),
            ..Default::default()
        };
        match self.docker.list_containers(Some(options)).await {
            Ok(containers) => {
                for container in containers {
                    for name in container.names.unwrap_or_default() {
                        resources.record(name.trim_start_matches('/'));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(job_id = job.job_id, error = %e, "listing the job's containers failed; removing the build container only")
            }
        }
        resources
            .network_created
            .store(resources.uses_network, std::sync::atomic::Ordering::SeqCst);
        resources
    }

    /// Streams a started container's log from its first byte until it has exited and its
    /// log is drained, and maps its exit to an outcome.
    async fn follow_to_exit(&self, name: &str, trace: &TraceSink) -> JobOutcome {
        let options = LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let stream: OutputStream = Box::pin(self.docker.logs(name, Some(options)));
        self.follow_to_end(name, stream, false, None, trace).await
    }
}

/// The name [`Executor::run`] gives a job's build container.
pub fn build_container(job_id: u64) -> String {
    format!("podfleet-job-{job_id}-build")
}
