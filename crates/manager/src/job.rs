//! One job from payload to final update: trace, instance acquisition, connection, the
//! executor run, release of the instance, and the result reported to the coordinator.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use podfleet_autoscaler::{Autoscaler, Reservation};
use podfleet_config::RunnerConfig;
use podfleet_connector::Connection;
use podfleet_coordinator::model::{FailureReason, JobResponse, JobState, UpdateJobRequest};
use podfleet_coordinator::{
    Client, JobOutcome as FinalOutcome, JobTrace, JobTraceOptions, RemoteState,
};
use podfleet_executor::{Executor, JobOutcome, TraceSink};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::mask::Masker;
use crate::telemetry::{JobPhase, Telemetry};
use crate::{ManagerEvent, session};

/// The result of one job as the manager saw it.
#[derive(Clone, Debug)]
pub struct JobReport {
    pub runner: String,
    pub job_id: u64,
    pub job_name: String,
    pub instance: Option<String>,
    pub outcome: JobOutcome,
}

pub(crate) struct RunnerContext {
    pub config: RunnerConfig,
    pub client: Client,
    pub scaler: Autoscaler,
    pub events: broadcast::Sender<ManagerEvent>,
    pub cancel: CancellationToken,
    pub telemetry: Arc<Telemetry>,
}

impl RunnerContext {
    pub async fn run_job(&self, payload: JobResponse, reservation: Reservation) {
        let job_id = payload.id;
        let job_name = payload.job_info.name.clone();
        let _ = self.events.send(ManagerEvent::JobReceived {
            runner: self.config.name.clone(),
            job_id,
            job_name: job_name.clone(),
        });
        self.telemetry
            .job_arrived(&self.config.name, job_id, &job_name);
        // Two-phase commit: accept the job before doing anything for it.
        let accept = UpdateJobRequest::new(
            self.client.info().clone(),
            payload.token.expose(),
            JobState::Running,
        );
        if let Err(e) = self
            .client
            .update_job(job_id, payload.token.expose(), &accept)
            .await
        {
            tracing::warn!(job_id, error = %e, "accepting the job failed; dropping it");
            self.telemetry
                .job_finished(job_id, "dropped", "accept_failed");
            return;
        }
        let trace = JobTrace::start(
            self.client.clone(),
            job_id,
            payload.token.expose(),
            JobTraceOptions::for_job(&payload),
        );
        let masker = Arc::new(Mutex::new(masker_for(&self.config, &payload)));
        let limit = Arc::new(Mutex::new(OutputLimit::new(
            u64::from(self.config.output_limit) * 1024,
        )));
        let sink: TraceSink = {
            let writer = trace.writer();
            let masker = masker.clone();
            let limit = limit.clone();
            Arc::new(move |bytes: &[u8]| {
                if let (Ok(mut masker), Ok(mut limit)) = (masker.lock(), limit.lock()) {
                    let masked = masker.write(bytes);
                    let (admitted, notice) = limit.admit(&masked);
                    writer.write(admitted);
                    if let Some(notice) = notice {
                        writer.write(notice.as_bytes());
                    }
                }
            })
        };
        sink(
            format!(
                "\x1b[0KRunning with podfleet {} (gitlab-runner compatible)\n\x1b[0K  on {} {}, system ID: {}\n",
                env!("CARGO_PKG_VERSION"),
                self.config.name,
                self.config.short_token(),
                self.client.system_id()
            )
            .as_bytes(),
        );
        let cancel = self.cancel.child_token();
        let remote = watch_remote(trace.remote_state(), cancel.clone());
        let (instance, outcome) = self
            .execute(&payload, sink.clone(), cancel.clone(), reservation)
            .await;
        remote.abort();
        self.telemetry.job_phase(job_id, JobPhase::Finishing);
        let final_line = match &outcome {
            JobOutcome::Success => "\x1b[32;1mJob succeeded\x1b[0;m\n".to_string(),
            JobOutcome::ScriptFailure { exit_code } => {
                format!("\x1b[31;1mERROR: Job failed: exit code {exit_code}\x1b[0;m\n")
            }
            JobOutcome::ImagePullFailure(reason) | JobOutcome::SystemFailure(reason) => {
                format!("\x1b[31;1mERROR: Job failed (system failure): {reason}\x1b[0;m\n")
            }
            JobOutcome::Canceled => "\x1b[31;1mERROR: Job failed: canceled\x1b[0;m\n".to_string(),
            JobOutcome::TimedOut => {
                "\x1b[31;1mERROR: Job failed: execution took longer than the job timeout\x1b[0;m\n"
                    .to_string()
            }
        };
        if let (Ok(mut masker), Ok(mut limit)) = (masker.lock(), limit.lock()) {
            // The job's held-back output is still subject to the limit; the closing line is
            // always written.
            let rest = masker.flush();
            let (admitted, notice) = limit.admit(&rest);
            trace.write(admitted);
            if let Some(notice) = notice {
                trace.write(notice.as_bytes());
            }
            let mut closing = masker.write(final_line.as_bytes());
            closing.extend(masker.flush());
            trace.write(&closing);
        }
        let final_outcome = match &outcome {
            JobOutcome::Success => FinalOutcome::Success,
            JobOutcome::ScriptFailure { exit_code } => FinalOutcome::Failed {
                reason: FailureReason::ScriptFailure,
                exit_code: i32::try_from(*exit_code).ok(),
            },
            JobOutcome::ImagePullFailure(_) => FinalOutcome::Failed {
                reason: FailureReason::ImagePullFailure,
                exit_code: None,
            },
            JobOutcome::SystemFailure(_) => FinalOutcome::Failed {
                reason: FailureReason::RunnerSystemFailure,
                exit_code: None,
            },
            JobOutcome::Canceled => FinalOutcome::Failed {
                reason: FailureReason::JobCanceled,
                exit_code: None,
            },
            JobOutcome::TimedOut => FinalOutcome::Failed {
                reason: FailureReason::JobExecutionTimeout,
                exit_code: None,
            },
        };
        let (label, reason) = match &final_outcome {
            FinalOutcome::Success => ("success", String::new()),
            FinalOutcome::Failed { reason, .. } => ("failed", reason.to_string()),
        };
        if let Err(e) = trace.finish(final_outcome).await {
            tracing::warn!(job_id, error = %e, "final job update failed");
        }
        self.telemetry.job_finished(job_id, label, &reason);
        let _ = self.events.send(ManagerEvent::JobFinished(JobReport {
            runner: self.config.name.clone(),
            job_id,
            job_name,
            instance,
            outcome,
        }));
    }

    /// Acquires an instance and runs the job on it; returns the instance used.
    async fn execute(
        &self,
        payload: &JobResponse,
        sink: TraceSink,
        cancel: CancellationToken,
        reservation: Reservation,
    ) -> (Option<String>, JobOutcome) {
        let spec = match crate::spec::job_spec(&self.config, payload) {
            Ok(spec) => spec,
            Err(reason) => return (None, JobOutcome::SystemFailure(reason)),
        };
        let acquire_timeout = self
            .config
            .autoscaler
            .as_ref()
            .map_or(Duration::from_secs(900), |a| a.instance_acquire_timeout);
        self.telemetry
            .job_phase(payload.id, JobPhase::WaitingForInstance);
        say(&sink, "Preparing the \"docker-autoscaler\" executor");
        let acquisition = tokio::select! {
            acquired = self.scaler.acquire_for(Some(payload.id), acquire_timeout) => match acquired {
                Ok(acquisition) => acquisition,
                Err(e) => return (None, JobOutcome::SystemFailure(e.to_string())),
            },
            _ = cancel.cancelled() => return (None, JobOutcome::Canceled),
        };
        // The slot is held now (or the job failed): the room reserved for it is given back.
        drop(reservation);
        let instance = acquisition.instance.to_string();
        self.telemetry.job_phase(payload.id, JobPhase::Connecting);
        self.telemetry
            .job_on_instance(&self.config.name, payload.id, &instance);
        let _ = self.events.send(ManagerEvent::JobOnInstance {
            runner: self.config.name.clone(),
            job_id: payload.id,
            instance: instance.clone(),
        });
        say(&sink, &format!("Dialing instance {instance}..."));
        let connected = async {
            let options = session::connect_options(&self.config, &acquisition.connect_info)
                .map_err(|e| e.to_string())?;
            let connection = Connection::connect(&options)
                .await
                .map_err(|e| e.to_string())?;
            let tunnel = session::docker_tunnel(&self.config, &acquisition.connect_info)
                .map_err(|e| e.to_string())?;
            let executor = tokio::select! {
                connected = Executor::connect(connection.clone(), tunnel) => {
                    connected.map_err(|e| format!("container engine on {instance}: {e}"))?
                }
                _ = tokio::time::sleep(Duration::from_secs(60)) => {
                    return Err(format!("container engine on {instance} did not answer within 60s"));
                }
            };
            Ok::<_, String>((connection, executor))
        }
        .await;
        let (connection, executor) = match connected {
            Ok(pair) => pair,
            Err(reason) => {
                // An instance we cannot reach is no capacity: replace it.
                self.scaler.release(&acquisition, false);
                let outcome =
                    JobOutcome::SystemFailure(format!("instance {instance} unreachable: {reason}"));
                return (Some(instance), outcome);
            }
        };
        say(
            &sink,
            &format!(
                "Instance {instance} connected (job {} of this instance)",
                acquisition.use_number
            ),
        );
        self.telemetry.job_phase(payload.id, JobPhase::Running);
        let outcome = executor.run(&spec, &self.config.docker, sink, cancel).await;
        // A system failure replaces the instance only when the instance is what broke
        // (the engine no longer answers), not for a failure of this job's own setup.
        let healthy = match outcome {
            JobOutcome::SystemFailure(_) => {
                let ping = executor.docker().ping();
                matches!(
                    tokio::time::timeout(Duration::from_secs(10), ping).await,
                    Ok(Ok(_))
                )
            }
            _ => true,
        };
        connection.close().await;
        self.scaler.release(&acquisition, healthy);
        (Some(instance), outcome)
    }
}

/// `output_limit` (KiB) on the job's log: output past it is dropped, once announced; the
/// manager's own closing lines are still written.
struct OutputLimit {
    limit: u64,
    written: u64,
}

impl OutputLimit {
    fn new(limit: u64) -> Self {
        Self { limit, written: 0 }
    }

    /// The part of `bytes` within the limit, and the notice when this write crosses it.
    fn admit<'a>(&mut self, bytes: &'a [u8]) -> (&'a [u8], Option<String>) {
        let room = self.limit.saturating_sub(self.written);
        let taken = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let crossed = taken < bytes.len() && self.written <= self.limit;
        self.written += bytes.len() as u64;
        let notice = crossed.then(|| {
            format!(
                "\n\x1b[31;1mJob's log exceeded limit of {} bytes.\nJob execution will continue but no more output will be collected.\x1b[0;m\n",
                self.limit
            )
        });
        (&bytes[..taken], notice)
    }
}

/// The job's log masker: its masked variables, the token prefixes the job names plus the
/// defaults (unless `FF_MASK_ALL_DEFAULT_TOKENS` is off; `glpat-` always), and sensitive URL
/// parameters.
fn masker_for(runner: &RunnerConfig, payload: &JobResponse) -> Masker {
    let job_flag = payload
        .variables
        .iter()
        .rev()
        .find(|v| v.key == "FF_MASK_ALL_DEFAULT_TOKENS")
        .map(|v| !matches!(v.value.as_str(), "false" | "0" | "FALSE" | "False"));
    let all_defaults =
        job_flag.unwrap_or_else(|| runner.feature_flag("FF_MASK_ALL_DEFAULT_TOKENS"));
    let defaults = crate::mask::DEFAULT_TOKEN_PREFIXES
        .iter()
        .filter(|p| all_defaults || **p == "glpat-")
        .map(|p| p.to_string());
    let prefixes = payload
        .features
        .token_mask_prefixes
        .iter()
        .cloned()
        .chain(defaults);
    Masker::with_rules(
        payload
            .variables
            .iter()
            .filter(|v| v.masked)
            .map(|v| v.value.clone()),
        prefixes,
        true,
    )
}

/// Cancels the job when the coordinator says so.
fn watch_remote(
    mut remote: tokio::sync::watch::Receiver<RemoteState>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if *remote.borrow_and_update() != RemoteState::Running {
                cancel.cancel();
                return;
            }
            if remote.changed().await.is_err() {
                return;
            }
        }
    })
}

fn say(sink: &TraceSink, line: &str) {
    sink(format!("\x1b[0K\x1b[36;1m{line}\x1b[0;m\n").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_limit_is_dropped_once_announced() {
        let mut limit = OutputLimit::new(10);
        assert_eq!(limit.admit(b"12345"), (&b"12345"[..], None));
        let (admitted, notice) = limit.admit(b"67890abc");
        assert_eq!(admitted, b"67890");
        assert!(
            notice
                .unwrap()
                .contains("Job's log exceeded limit of 10 bytes")
        );
        assert_eq!(limit.admit(b"more"), (&b""[..], None));
    }
}
