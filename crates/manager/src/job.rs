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
use podfleet_executor::{Cancellation, Executor, JobOutcome, TraceSink};
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
    /// A stand-in for SSH and the instances' engines (the benchmark); `None` in production.
    pub engine: Option<Arc<dyn crate::JobEngine>>,
    /// SSH sessions kept between the jobs of an instance.
    pub sessions: crate::session::Sessions,
}

impl RunnerContext {
    /// Runs a job to its final update. What is left to do on its instance afterwards (its
    /// containers removed, its SSH session returned) comes back for the caller to run once
    /// the job's slot of `concurrent`/`limit` is free.
    pub async fn run_job(
        &self,
        payload: JobResponse,
        reservation: Reservation,
    ) -> Option<Aftercare> {
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
            return None;
        }
        // What a restarted manager needs to resume the job, before anything of it runs.
        let journal = crate::recover::record_job(self, &payload);
        let trace = JobTrace::start(
            self.client.clone(),
            job_id,
            payload.token.expose(),
            JobTraceOptions {
                journal,
                ..JobTraceOptions::for_job(&payload)
            },
        );
        let masker = Arc::new(Mutex::new(masker_for(&self.config, &payload)));
        let limit = Arc::new(Mutex::new(OutputLimit::new(
            u64::from(self.config.output_limit) * 1024,
        )));
        let sink = trace_sink(&trace, masker.clone(), limit.clone(), 0);
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
        let cancel = Cancellation {
            graceful: CancellationToken::new(),
            hard: self.cancel.child_token(),
        };
        let remote = watch_remote_graceful(trace.remote_state(), cancel.clone());
        let (instance, outcome, aftercare) = self
            .execute(&payload, sink.clone(), cancel, reservation)
            .await;
        remote.abort();
        self.finish_job(&payload, trace, &masker, &limit, instance, outcome, None)
            .await;
        aftercare
    }

    /// Writes the closing lines, sends the final update, forgets the job's record and
    /// journal, and reports the job's end.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn finish_job(
        &self,
        payload: &JobResponse,
        trace: JobTrace,
        masker: &Mutex<Masker>,
        limit: &Mutex<OutputLimit>,
        instance: Option<String>,
        outcome: JobOutcome,
        note: Option<&str>,
    ) {
        let job_id = payload.id;
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
            JobOutcome::ServiceFailure(reason) => {
                format!("\x1b[31;1mERROR: Job failed: {reason}\x1b[0;m\n")
            }
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
            let mut closing = Vec::new();
            if let Some(note) = note {
                closing
                    .extend(masker.write(format!("\x1b[0K\x1b[36;1m{note}\x1b[0;m\n").as_bytes()));
            }
            closing.extend(masker.write(final_line.as_bytes()));
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
            // The job's own services (its .gitlab-ci.yml): another instance would not help.
            JobOutcome::ServiceFailure(_) => FinalOutcome::Failed {
                reason: FailureReason::ScriptFailure,
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
        // Settled (or given up) on the coordinator: nothing left to resume.
        crate::recover::forget_job(self, job_id);
        self.telemetry.job_finished(job_id, label, &reason);
        let _ = self.events.send(ManagerEvent::JobFinished(JobReport {
            runner: self.config.name.clone(),
            job_id,
            job_name: payload.job_info.name.clone(),
            instance,
            outcome,
        }));
    }

    /// SSH to the instance of `acquisition` and its container engine through the tunnel.
    pub(crate) async fn connect(
        &self,
        acquisition: &podfleet_autoscaler::Acquisition,
    ) -> Result<(Connection, Executor), String> {
        let instance = &acquisition.instance;
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
        Ok((connection, executor))
    }

    /// Acquires an instance and runs the job on it; returns the instance used, and what is
    /// left to do there once the job is reported.
    async fn execute(
        &self,
        payload: &JobResponse,
        sink: TraceSink,
        cancel: Cancellation,
        reservation: Reservation,
    ) -> (Option<String>, JobOutcome, Option<Aftercare>) {
        let spec = match crate::spec::job_spec(&self.config, payload) {
            Ok(spec) => spec,
            Err(reason) => return (None, JobOutcome::SystemFailure(reason), None),
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
                Err(e) => return (None, JobOutcome::SystemFailure(e.to_string()), None),
            },
            _ = cancel.hard.cancelled() => return (None, JobOutcome::Canceled, None),
            _ = cancel.graceful.cancelled() => return (None, JobOutcome::Canceled, None),
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
        if let Some(engine) = &self.engine {
            let spec = match crate::spec::job_spec(&self.config, payload) {
                Ok(spec) => spec,
                Err(reason) => {
                    self.scaler.release(&acquisition, true);
                    return (Some(instance), JobOutcome::SystemFailure(reason), None);
                }
            };
            self.telemetry.job_phase(payload.id, JobPhase::Running);
            let outcome = engine.run(&acquisition.instance, &spec, sink, cancel).await;
            let healthy = !matches!(outcome, JobOutcome::SystemFailure(_));
            self.scaler.release(&acquisition, healthy);
            return (Some(instance), outcome, None);
        }
        // The instance this job holds is in service; of the others, the autoscaler knows.
        let in_service = |id: &str| {
            id == instance
                || self
                    .scaler
                    .in_service(&podfleet_provider::InstanceId(id.to_owned()))
        };
        let kept = self.sessions.checkout(&instance, in_service).await;
        let (connection, executor, shared, reused) = match kept {
            Some((connection, executor)) => (connection, executor, true, true),
            None => match self.connect(&acquisition).await {
                Ok((connection, executor)) => {
                    let shared = self.sessions.share(&instance, &connection, &executor);
                    (connection, executor, shared, false)
                }
                Err(reason) => {
                    // An instance we cannot reach is no capacity: replace it.
                    self.scaler.release(&acquisition, false);
                    let outcome = JobOutcome::SystemFailure(format!(
                        "instance {instance} unreachable: {reason}"
                    ));
                    return (Some(instance), outcome, None);
                }
            },
        };
        say(
            &sink,
            &format!(
                "Instance {instance} connected (job {} of this instance{})",
                acquisition.use_number,
                if reused {
                    ", SSH session kept from its last job"
                } else {
                    ""
                }
            ),
        );
        self.telemetry.job_phase(payload.id, JobPhase::Running);
        let (outcome, leftovers) = executor
            .run_leaving(&spec, &self.config.docker, sink, cancel)
            .await;
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
        // The slot is free for the instance's next job before this one's containers are
        // removed; an instance leaving service (used up, failed, outdated) is deleted with
        // them. The session stays for the instance's next job while it stays in service.
        self.scaler.release(&acquisition, healthy);
        let in_service = healthy && self.scaler.in_service(&acquisition.instance);
        let aftercare = Aftercare {
            leftovers: in_service.then_some(leftovers),
            executor,
            instance: instance.clone(),
            in_service,
            connection: (!shared).then_some(connection),
        };
        (Some(instance), outcome, Some(aftercare))
    }
}

/// The executor's view of the job's log: output is masked, held to `output_limit`, and its
/// first `skip` masked bytes are dropped (a resumed job's output the coordinator already
/// has), then written to `trace`.
pub(crate) fn trace_sink(
    trace: &JobTrace,
    masker: Arc<Mutex<Masker>>,
    limit: Arc<Mutex<OutputLimit>>,
    skip: u64,
) -> TraceSink {
    let writer = trace.writer();
    let skip = Mutex::new(skip);
    Arc::new(move |bytes: &[u8]| {
        if let (Ok(mut masker), Ok(mut limit), Ok(mut skip)) =
            (masker.lock(), limit.lock(), skip.lock())
        {
            let masked = masker.write(bytes);
            let skipped = usize::try_from(*skip)
                .unwrap_or(usize::MAX)
                .min(masked.len());
            *skip -= skipped as u64;
            let (admitted, notice) = limit.admit(&masked[skipped..]);
            writer.write(admitted);
            if let Some(notice) = notice {
                writer.write(notice.as_bytes());
            }
        }
    })
}

/// `output_limit` (KiB) on the job's log: output past it is dropped, once announced; the
/// manager's own closing lines are still written.
pub(crate) struct OutputLimit {
    limit: u64,
    written: u64,
}

impl OutputLimit {
    pub(crate) fn new(limit: u64) -> Self {
        Self { limit, written: 0 }
    }

    /// A limit of which `written` bytes are already used (a resumed job's log so far).
    pub(crate) fn resumed(limit: u64, written: u64) -> Self {
        Self { limit, written }
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
pub(crate) fn masker_for(runner: &RunnerConfig, payload: &JobResponse) -> Masker {
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

/// Stops the job when the coordinator says so: `canceling` gracefully (after_script still
/// runs), `canceled`/aborted at once.
pub(crate) fn watch_remote_graceful(
    mut remote: tokio::sync::watch::Receiver<RemoteState>,
    cancel: Cancellation,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match *remote.borrow_and_update() {
                RemoteState::Running => {}
                RemoteState::Canceling => cancel.graceful.cancel(),
                RemoteState::Abort => {
                    cancel.hard.cancel();
                    return;
                }
            }
            if remote.changed().await.is_err() {
                return;
            }
        }
    })
}

pub(crate) fn say(sink: &TraceSink, line: &str) {
    sink(format!("\x1b[0K\x1b[36;1m{line}\x1b[0;m\n").as_bytes());
}

/// What is left of a job on its instance once the job is reported: its containers, volume
/// and network to remove, then the SSH session to return (kept for the instance's next job)
/// or close.
pub(crate) struct Aftercare {
    /// `None` when the instance leaves service: it is deleted with them.
    leftovers: Option<podfleet_executor::Leftovers>,
    executor: Executor,
    instance: String,
    in_service: bool,
    /// The job's own connection; `None` when the session is kept in `sessions`.
    connection: Option<Connection>,
}

impl Aftercare {
    pub(crate) async fn run(self, sessions: &session::Sessions) {
        if let Some(leftovers) = self.leftovers {
            leftovers.remove(&self.executor).await;
        }
        let to_close = match self.connection {
            Some(connection) => Some(connection),
            None => sessions.checkin(&self.instance, self.in_service),
        };
        if let Some(connection) = to_close {
            connection.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn canceling_stops_gracefully_and_abort_hard() {
        let (state, remote) = tokio::sync::watch::channel(RemoteState::Running);
        let cancel = Cancellation::new();
        let watcher = watch_remote_graceful(remote, cancel.clone());
        state.send_replace(RemoteState::Canceling);
        cancel.graceful.cancelled().await;
        assert!(
            !cancel.hard.is_cancelled(),
            "canceling must not kill at once"
        );
        state.send_replace(RemoteState::Abort);
        cancel.hard.cancelled().await;
        watcher.await.unwrap();
    }

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
