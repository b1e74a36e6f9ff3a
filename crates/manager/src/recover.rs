//! Jobs that survive a manager restart. While a job runs, the group's ledger holds a record
//! of it (the payload with its token, the coordinator URL, the instance, the start time) and
//! a journal file beside the ledger holds every byte of its masked log as it is produced. A
//! restarted manager finds these records, waits for the autoscaler to adopt the instance
//! again, re-attaches to the job's build container, resends the log from the offset the
//! coordinator accepted, carries the log on from the container's retained output without
//! repeating or losing a byte, and finishes the job as if nothing had happened. A job whose
//! instance or container is gone fails with `runner_system_failure` and says why.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use podfleet_coordinator::model::JobResponse;
use podfleet_coordinator::{Client, ClientOptions, JobTrace, JobTraceOptions};
use podfleet_executor::{Cancellation, JobOutcome};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::job::{OutputLimit, RunnerContext, masker_for, trace_sink, watch_remote_graceful};
use crate::telemetry::JobPhase;

/// What the ledger keeps of a running job (its instance is in the autoscaler's record of
/// the instance). The payload carries the job token and masked variables: the ledger file
/// is mode 0600.
#[derive(Serialize, Deserialize)]
struct JobRecord {
    runner: String,
    /// The coordinator's API root the job came from.
    url: String,
    /// When the job was accepted (unix seconds): its timeout counts from here.
    started_unix: i64,
    payload: JobResponse,
}

/// The journal of job `job_id`'s log: beside the ledger, in `<ledger>.jobs/`.
fn journal_path(runner: &RunnerContext, job_id: u64) -> Option<PathBuf> {
    let ledger = runner.scaler.ledger()?;
    // An in-memory ledger (tests, the simulator) has no directory to journal in.
    let path = ledger.path();
    path.parent()?;
    if !path.exists() {
        return None;
    }
    Some(path.with_extension("jobs").join(format!("{job_id}.trace")))
}

/// Records a running job in the ledger (its instance is recorded by the autoscaler when it
/// gets a slot); returns the journal its log goes to. Without a ledger the job runs as
/// before, but cannot be resumed after a restart.
pub(crate) fn record_job(runner: &RunnerContext, payload: &JobResponse) -> Option<PathBuf> {
    let ledger = runner.scaler.ledger()?;
    let record = JobRecord {
        runner: runner.config.name.clone(),
        url: runner.client.base_url().to_string(),
        started_unix: Utc::now().timestamp(),
        payload: payload.clone(),
    };
    let bytes = serde_json::to_vec(&record).expect("a job record always serialises");
    if let Err(e) = ledger.put_job(payload.id, &bytes) {
        tracing::error!(job_id = payload.id, error = %e, "recording the job in the ledger failed; it cannot be resumed after a restart");
        return None;
    }
    journal_path(runner, payload.id)
}

/// Forgets an ended job: its ledger record and its journal.
pub(crate) fn forget_job(runner: &RunnerContext, job_id: u64) {
    let Some(ledger) = runner.scaler.ledger() else {
        return;
    };
    if let Err(e) = ledger.remove_job(job_id) {
        tracing::error!(job_id, error = %e, "removing the ended job from the ledger failed");
    }
    if let Some(path) = journal_path(runner, job_id) {
        let _ = std::fs::remove_file(path);
    }
}

/// Resumes every job the ledger says was running when the previous manager stopped. Each
/// takes a `concurrent` permit when one is free (they run in any case: they are running).
/// Without `resume`, each is given up instead and its instance deleted, with the job's
/// containers in it.
pub(crate) fn resume_jobs(
    runner: Arc<RunnerContext>,
    concurrent: Arc<Semaphore>,
    resume: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(ledger) = runner.scaler.ledger() else {
        return Vec::new();
    };
    let records = match ledger.jobs() {
        Ok(records) => records,
        Err(e) => {
            tracing::error!(runner = %runner.config.name, error = %e, "reading running jobs from the ledger failed; none is resumed");
            return Vec::new();
        }
    };
    let mut tasks = Vec::new();
    for (job_id, bytes) in records {
        let record = match serde_json::from_slice::<JobRecord>(&bytes) {
            Ok(record) => record,
            Err(e) => {
                tracing::error!(job_id, error = %e, "unreadable job record in the ledger; forgetting it");
                forget_job(&runner, job_id);
                continue;
            }
        };
        let runner = runner.clone();
        if !resume {
            tracing::info!(runner = %record.runner, job_id, "giving up a job an earlier run left: its coordinator is gone; its instance is deleted");
            tasks.push(tokio::spawn(async move {
                match runner.wait_for_instance(job_id).await {
                    Ok(acquisition) => runner.scaler.release(&acquisition, false),
                    Err(_) => runner.scaler.abandon(job_id),
                }
                forget_job(&runner, job_id);
            }));
            continue;
        }
        tracing::info!(runner = %record.runner, job_id, "resuming a job that ran when the manager stopped");
        let permit = concurrent.clone().try_acquire_owned().ok();
        tasks.push(tokio::spawn(async move {
            runner.resume_job(job_id, record).await;
            drop(permit);
        }));
    }
    tasks
}

/// The smallest line start `p` of `journal` such that `journal[p..]` is a prefix of
/// `build` (the build container's masked output so far): the log up to `p` is what the
/// manager and executor wrote before the container started, the rest is the container's
/// output the coordinator already has or will get from the journal. `None` when nothing
/// matches (the journal goes past the build output: the manager stopped after it).
fn align(journal: &[u8], build: &[u8]) -> Option<usize> {
    std::iter::once(0)
        .chain(
            journal
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .find(|&p| build.starts_with(&journal[p..]))
}

impl RunnerContext {
    async fn resume_job(&self, job_id: u64, record: JobRecord) {
        let payload = record.payload.clone();
        let Some(journal) = journal_path(self, job_id) else {
            forget_job(self, job_id);
            return;
        };
        self.telemetry
            .job_arrived(&self.config.name, job_id, &payload.job_info.name);
        let client = if record.url == self.client.base_url().as_str() {
            self.client.clone()
        } else {
            match Client::with_options(
                &record.url,
                self.client.system_id().to_string(),
                self.client.info().clone(),
                ClientOptions::default(),
            ) {
                Ok(client) => client,
                Err(e) => {
                    tracing::error!(job_id, error = %e, "the job's coordinator URL is unusable; it cannot be resumed");
                    forget_job(self, job_id);
                    return;
                }
            }
        };
        let options = JobTraceOptions {
            journal: Some(journal.clone()),
            ..JobTraceOptions::for_job(&payload)
        };
        let trace = match JobTrace::resume(
            client.clone(),
            job_id,
            payload.token.expose(),
            options.clone(),
        ) {
            Ok(trace) => trace,
            Err(e) => {
                // Without the journal the log so far cannot be carried on; the job still
                // gets its end.
                tracing::warn!(job_id, error = %e, "the job's trace journal is unreadable; its log restarts");
                JobTrace::start(client, job_id, payload.token.expose(), options)
            }
        };
        let logged = trace.bytesize();
        let journal_bytes = std::fs::read(&journal).unwrap_or_default();
        let masker = Arc::new(Mutex::new(masker_for(&self.config, &payload)));
        let limit_bytes = u64::from(self.config.output_limit) * 1024;
        let limit = Arc::new(Mutex::new(OutputLimit::resumed(limit_bytes, logged)));
        let cancel = Cancellation {
            graceful: CancellationToken::new(),
            hard: self.cancel.child_token(),
        };
        let remote = watch_remote_graceful(trace.remote_state(), cancel.clone());
        let resumed = self
            .reattach(
                &payload,
                &record,
                &journal_bytes,
                &trace,
                &masker,
                &limit,
                cancel,
            )
            .await;
        remote.abort();
        let (instance, outcome, note) = match resumed {
            Ok((instance, outcome)) => (
                Some(instance),
                outcome,
                Some("podfleet re-attached to this job after a manager restart"),
            ),
            Err((instance, reason)) => (instance, JobOutcome::SystemFailure(reason), None),
        };
        self.finish_job(&payload, trace, &masker, &limit, instance, outcome, note)
            .await;
    }

    /// Waits for the job's instance, connects, and follows the job to its end. `Err` holds
    /// why the job cannot be resumed (the instance or container is gone, or unreachable).
    #[allow(clippy::too_many_arguments)]
    async fn reattach(
        &self,
        payload: &JobResponse,
        record: &JobRecord,
        journal: &[u8],
        trace: &JobTrace,
        masker: &Arc<Mutex<crate::mask::Masker>>,
        limit: &Arc<Mutex<OutputLimit>>,
        cancel: Cancellation,
    ) -> Result<(String, JobOutcome), (Option<String>, String)> {
        let job_id = payload.id;
        self.telemetry
            .job_phase(job_id, JobPhase::WaitingForInstance);
        let acquisition = match self.wait_for_instance(job_id).await {
            Ok(acquisition) => acquisition,
            Err(reason) => {
                self.scaler.abandon(job_id);
                return Err((None, reason));
            }
        };
        let instance = acquisition.instance.to_string();
        self.telemetry
            .job_on_instance(&self.config.name, job_id, &instance);
        self.telemetry.job_phase(job_id, JobPhase::Connecting);
        let spec = match crate::spec::job_spec(&self.config, payload) {
            Ok(spec) => spec,
            Err(reason) => {
                self.scaler.release(&acquisition, true);
                return Err((Some(instance), reason));
            }
        };
        let connected = self.connect(&acquisition).await;
        let (connection, executor) = match connected {
            Ok(pair) => pair,
            Err(reason) => {
                self.scaler.release(&acquisition, false);
                return Err((
                    Some(instance.clone()),
                    format!("instance {instance} unreachable after a manager restart: {reason}"),
                ));
            }
        };
        let found = executor.find_build_container(job_id).await;
        let build_log = match found {
            Ok(Some(_)) => executor.build_log(job_id).await.map_err(|e| e.to_string()),
            Ok(None) => Err(format!(
                "the job's container {} on instance {instance} is gone (removed while the manager was down)",
                podfleet_executor::reattach::build_container(job_id)
            )),
            Err(e) => Err(e.to_string()),
        };
        let build_log = match build_log {
            Ok(log) => log,
            Err(reason) => {
                executor.remove_job_resources(&spec).await;
                connection.close().await;
                self.scaler.release(&acquisition, true);
                return Err((Some(instance), reason));
            }
        };
        // Where the container's output starts in the log the coordinator has (or gets from
        // the journal): what follows that in the journal is skipped in the replay.
        let masked_build = {
            let mut fresh = masker_for(&self.config, payload);
            let mut masked = fresh.write(&build_log);
            masked.extend(fresh.flush());
            masked
        };
        let skip = match align(journal, &masked_build) {
            Some(start) => (journal.len() - start) as u64,
            None => {
                tracing::warn!(
                    job_id,
                    "the journal goes past the build output; the build output is not replayed"
                );
                masked_build.len() as u64
            }
        };
        tracing::info!(job_id, instance = %instance, journal = journal.len(), skip, "re-attached to the job's build container");
        let sink = trace_sink(trace, masker.clone(), limit.clone(), skip);
        self.telemetry.job_phase(job_id, JobPhase::Running);
        let elapsed = Utc::now()
            .timestamp()
            .saturating_sub(record.started_unix)
            .max(0) as u64;
        let remaining = spec.timeout.saturating_sub(Duration::from_secs(elapsed));
        let outcome = executor
            .reattach(&spec, &self.config.docker, sink, cancel, remaining)
            .await;
        let healthy = match outcome {
            JobOutcome::SystemFailure(_) => matches!(
                tokio::time::timeout(Duration::from_secs(10), executor.docker().ping()).await,
                Ok(Ok(_))
            ),
            _ => true,
        };
        connection.close().await;
        self.scaler.release(&acquisition, healthy);
        Ok((instance, outcome))
    }

    /// Waits until the autoscaler has adopted (and checked) the job's instance again.
    async fn wait_for_instance(
        &self,
        job_id: u64,
    ) -> Result<podfleet_autoscaler::Acquisition, String> {
        let settings = self.scaler.settings();
        let deadline = tokio::time::Instant::now()
            + settings.ready_timeout
            + settings.update_interval
            + Duration::from_secs(60);
        loop {
            if self.scaler.synced() {
                if let Some(acquisition) = self.scaler.reattach(job_id) {
                    return Ok(acquisition);
                }
                let Some(recovered) = self
                    .scaler
                    .recovered_jobs()
                    .into_iter()
                    .find(|r| r.job == job_id)
                else {
                    return Err(
                        "the job's instance is gone (or failed its readiness check) after a manager restart, or the job had no instance yet when the manager stopped"
                            .into(),
                    );
                };
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "instance {} was not ready again within {:?} after a manager restart",
                        recovered.instance, settings.ready_timeout
                    ));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(
                    "the autoscaler did not reconcile its ledger after a manager restart".into(),
                );
            }
            if self.cancel.is_cancelled() {
                return Err("the manager is stopping".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::align;

    const HEAD: &[u8] =
        b"\x1b[0KRunning with podfleet\n\x1b[0K\x1b[36;1mUsing Docker executor\x1b[0;m\n";

    #[test]
    fn the_build_output_is_found_after_the_executor_lines() {
        let journal = [HEAD, b"line 1\nline 2\nli"].concat();
        let build = b"line 1\nline 2\nline 3\n";
        assert_eq!(align(&journal, build), Some(HEAD.len()));
    }

    #[test]
    fn repeated_output_aligns_at_its_first_line() {
        let journal = [HEAD, b"x\nx\nx\n"].concat();
        let build = b"x\nx\nx\nx\nx\n";
        assert_eq!(align(&journal, build), Some(HEAD.len()));
    }

    #[test]
    fn nothing_of_the_build_logged_yet_skips_nothing() {
        let start = align(HEAD, b"line 1\n").expect("aligns at the end");
        assert_eq!(start, HEAD.len());
    }

    #[test]
    fn a_journal_past_the_build_output_does_not_align_mid_line() {
        let journal = [HEAD, b"line 1\nJob succ"].concat();
        assert_eq!(align(&journal, b"other\n"), None);
    }
}
