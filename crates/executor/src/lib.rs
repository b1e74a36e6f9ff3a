//! The executor: runs one job's containers on an instance through the Docker Engine API
//! (bollard) over the connector's SSH tunnel: image present or pulled, a per-build network,
//! the build volume, the job script in the job image, the trace streamed out, and every
//! container, volume and network removed afterwards. It knows Docker, not clouds or GitLab.

pub mod options;
pub mod script;
mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigCgroupnsModeEnum, NetworkCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, LogsOptions, RemoveContainerOptions,
    RemoveVolumeOptions, UploadToContainerOptions, WaitContainerOptions,
};
use futures_util::StreamExt;
use podfleet_config::{DockerConfig, PullPolicy};
use podfleet_connector::{Connection, Tunnel};
pub use script::Variable;
use tokio_util::sync::CancellationToken;

/// Where the job's output goes (masked and uploaded by the caller).
pub type TraceSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// One job, as the executor needs it.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub job_id: u64,
    pub image: String,
    pub entrypoint: Option<Vec<String>>,
    pub project_dir: String,
    pub variables: Vec<Variable>,
    /// before_script + script.
    pub script: Vec<String>,
    pub after_script: Vec<String>,
    pub network_per_build: bool,
    pub timeout: Duration,
    /// The runner's `shell`: `bash` runs the script in bash when the image has it and
    /// falls back to sh (as gitlab-runner's shell detection does); anything else uses sh.
    pub shell: String,
}

/// How a job ended, as far as the instance is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Success,
    /// The script exited non-zero.
    ScriptFailure {
        exit_code: i64,
    },
    /// The job image could not be had.
    ImagePullFailure(String),
    /// The instance or its engine failed us.
    SystemFailure(String),
    /// Stopped on request.
    Canceled,
    /// Ran past its timeout.
    TimedOut,
}

#[cfg(test)]
mod tests {
    use super::{shell_command, single_file_tar};

    #[test]
    fn script_archive_unpacks_with_tar() {
        let dir = std::env::temp_dir().join(format!("podfleet-tar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let archive = dir.join("a.tar");
        let contents = "echo one\n".repeat(100);
        let tar = single_file_tar("podfleet-build.sh", contents.as_bytes(), 0o700);
        std::fs::write(&archive, tar).unwrap();
        let status = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        let unpacked = dir.join("podfleet-build.sh");
        assert_eq!(std::fs::read_to_string(&unpacked).unwrap(), contents);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&unpacked).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bash_runs_when_present_and_sh_otherwise() {
        let dir = std::env::temp_dir().join(format!("podfleet-shell-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script_file = dir.join("script.sh");
        std::fs::write(&script_file, "echo ${BASH_VERSION:+bash}; echo 'it''s'\n").unwrap();
        let script = script_file.to_string_lossy().into_owned();
        let run = |path: &str| {
            let command = shell_command("bash", &script);
            let output = std::process::Command::new(&command[0])
                .args(&command[1..])
                .env("PATH", path)
                .output()
                .unwrap();
            String::from_utf8(output.stdout).unwrap()
        };
        assert!(
            run("/usr/bin:/bin").contains("bash\n"),
            "bash not used when present"
        );
        let sh_only = std::env::temp_dir().join(format!("podfleet-sh-only-{}", std::process::id()));
        std::fs::create_dir_all(&sh_only).unwrap();
        let _ = std::os::unix::fs::symlink("/bin/sh", sh_only.join("sh"));
        let out = run(&sh_only.to_string_lossy());
        assert!(!out.contains("bash") && out.contains("its"), "{out}");
        assert_eq!(shell_command("sh", "/x.sh"), vec!["sh", "/x.sh"]);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("docker api on the instance: {0}")]
    Engine(#[from] bollard::errors::Error),
}

/// A Docker API session on one instance.
#[derive(Clone)]
pub struct Executor {
    docker: Docker,
}

impl Executor {
    /// Opens the Docker API through the connection and checks that the engine answers.
    pub async fn connect(connection: Connection, tunnel: Tunnel) -> Result<Self, ExecutorError> {
        let docker = transport::docker_over_ssh(connection, tunnel)?;
        docker.ping().await?;
        Ok(Self { docker })
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Runs the job to its end. Whatever happens, the job's containers, volume and network
    /// are removed before this returns.
    pub async fn run(
        &self,
        job: &JobSpec,
        config: &DockerConfig,
        trace: TraceSink,
        cancel: CancellationToken,
    ) -> JobOutcome {
        let resources = JobResources::new(job);
        let outcome = self
            .run_stages(job, config, &resources, &trace, &cancel)
            .await;
        resources.remove(&self.docker).await;
        outcome
    }

    async fn run_stages(
        &self,
        job: &JobSpec,
        config: &DockerConfig,
        resources: &JobResources,
        trace: &TraceSink,
        cancel: &CancellationToken,
    ) -> JobOutcome {
        say(
            trace,
            &format!("Using Docker executor with image {} ...", job.image),
        );
        // A stalled registry must not outlive a cancel or the job's timeout.
        let pulled = tokio::select! {
            pulled = self.ensure_image(&job.image, config, trace) => pulled,
            _ = cancel.cancelled() => return JobOutcome::Canceled,
            _ = tokio::time::sleep(job.timeout) => return JobOutcome::TimedOut,
        };
        if let Err(reason) = pulled {
            return JobOutcome::ImagePullFailure(reason);
        }
        if job.network_per_build {
            let request = NetworkCreateRequest {
                name: resources.network.clone(),
                driver: Some("bridge".into()),
                labels: Some(resources.labels()),
                ..Default::default()
            };
            match self.docker.create_network(request).await {
                Ok(_) => {}
                // The name is unique to this job: if it exists, a retried request made it.
                Err(e) if e.to_string().contains("already") => {}
                Err(e) => {
                    return JobOutcome::SystemFailure(format!(
                        "create network {}: {e}",
                        resources.network
                    ));
                }
            }
            resources
                .network_created
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let main = stage_script(job, &job.script, None);
        let outcome = tokio::select! {
            outcome = self.run_container(job, config, resources, "build", main, trace) => outcome,
            _ = cancel.cancelled() => JobOutcome::Canceled,
            _ = tokio::time::sleep(job.timeout) => JobOutcome::TimedOut,
        };
        if matches!(outcome, JobOutcome::Canceled | JobOutcome::TimedOut) {
            // The build container is killed by the removal below; say why in the trace.
            let why = if outcome == JobOutcome::TimedOut {
                format!(
                    "execution took longer than {} seconds",
                    job.timeout.as_secs()
                )
            } else {
                "job canceled".to_string()
            };
            say_error(trace, &why);
            let _ = self
                .docker
                .kill_container(&resources.container("build"), None)
                .await;
        }
        if !job.after_script.is_empty() && !matches!(outcome, JobOutcome::ImagePullFailure(_)) {
            let status = match &outcome {
                JobOutcome::Success => "success",
                JobOutcome::Canceled => "canceled",
                _ => "failed",
            };
            say(trace, "Running after_script");
            let after = stage_script(job, &job.after_script, Some(status));
            let after_run =
                self.run_container(job, config, resources, "after-script", after, trace);
            match tokio::time::timeout(Duration::from_secs(300), after_run).await {
                Ok(JobOutcome::Success) => {}
                Ok(other) => say_warning(trace, &format!("after_script failed: {other:?}")),
                Err(_) => say_warning(trace, "after_script timed out after 5m0s"),
            }
        }
        outcome
    }

    async fn ensure_image(
        &self,
        image: &str,
        config: &DockerConfig,
        trace: &TraceSink,
    ) -> Result<(), String> {
        let present = self.docker.inspect_image(image).await.is_ok();
        let mut last_error = String::new();
        for policy in config.effective_pull_policies() {
            match policy {
                PullPolicy::Never if present => return Ok(()),
                PullPolicy::Never => {
                    last_error = format!(
                        "image {image} is not on the instance and pull_policy is \"never\""
                    );
                }
                PullPolicy::IfNotPresent if present => {
                    say(trace, &format!("Using locally found image version {image}"));
                    return Ok(());
                }
                PullPolicy::IfNotPresent | PullPolicy::Always => {
                    say(trace, &format!("Pulling docker image {image} ..."));
                    match self.pull(image).await {
                        Ok(()) => return Ok(()),
                        Err(e) => last_error = format!("failed to pull image {image}: {e}"),
                    }
                }
            }
        }
        Err(last_error)
    }

    async fn pull(&self, image: &str) -> Result<(), bollard::errors::Error> {
        let options = CreateImageOptions {
            from_image: Some(image.to_string()),
            ..Default::default()
        };
        let mut stream = self.docker.create_image(Some(options), None, None);
        while let Some(progress) = stream.next().await {
            progress?;
        }
        Ok(())
    }

    async fn run_container(
        &self,
        job: &JobSpec,
        config: &DockerConfig,
        resources: &JobResources,
        role: &str,
        script: String,
        trace: &TraceSink,
    ) -> JobOutcome {
        let name = resources.container(role);
        let script_path = format!("/podfleet-{role}.sh");
        let body = container_body(job, config, resources, &script_path);
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        // Recorded before creation, so a cancel that lands mid-create still removes it.
        resources
            .containers
            .lock()
            .map(|mut c| c.push(name.clone()))
            .ok();
        if let Err(e) = self.docker.create_container(Some(options), body).await {
            return classify_create_error(&job.image, e);
        }
        // The script (with every variable value) goes in as a file, never on a command
        // line where other users of the host could read it in /proc, and with no size cap.
        let archive = single_file_tar(&script_path[1..], script.as_bytes(), 0o700);
        let upload = UploadToContainerOptions {
            path: "/".into(),
            ..Default::default()
        };
        if let Err(e) = self
            .docker
            .upload_to_container(&name, Some(upload), bollard::body_full(archive.into()))
            .await
        {
            return JobOutcome::SystemFailure(format!("copy the job script into {name}: {e}"));
        }
        if let Err(e) = self.docker.start_container(&name, None).await {
            return JobOutcome::SystemFailure(format!("start container {name}: {e}"));
        }
        let logs = LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let mut stream = self.docker.logs(&name, Some(logs));
        let mut wait = self
            .docker
            .wait_container(&name, None::<WaitContainerOptions>);
        // The end of the job is the container's exit, not the end of the log stream:
        // Podman's follow stream can stay open after a fast exit, so once the container
        // has exited the log is drained for a short grace period only.
        let mut exit = None;
        let mut drain_until: Option<tokio::time::Instant> = None;
        let mut drain_cap = tokio::time::Instant::now();
        loop {
            let grace = async {
                match drain_until {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(
                        LogOutput::StdOut { message }
                        | LogOutput::StdErr { message }
                        | LogOutput::Console { message },
                    )) => {
                        trace(&message);
                        // After the exit, keep draining while output still flows.
                        if let Some(deadline) = drain_until.as_mut() {
                            *deadline = (tokio::time::Instant::now() + LOG_DRAIN_IDLE).min(drain_cap);
                        }
                    }
                    Some(Ok(LogOutput::StdIn { .. })) => {}
                    Some(Err(e)) => {
                        if exit.is_none() {
                            return JobOutcome::SystemFailure(format!("logs of {name}: {e}"));
                        }
                        break;
                    }
                    None => break,
                },
                result = wait.next(), if exit.is_none() => {
                    exit = Some(result);
                    let now = tokio::time::Instant::now();
                    drain_cap = now + LOG_DRAIN_CAP;
                    drain_until = Some(now + LOG_DRAIN_IDLE);
                }
                _ = grace => break,
            }
        }
        let result = match exit {
            Some(result) => result,
            None => wait.next().await,
        };
        match result {
            Some(Ok(response)) if response.status_code == 0 => JobOutcome::Success,
            Some(Ok(response)) => JobOutcome::ScriptFailure {
                exit_code: response.status_code,
            },
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. }))
                if code != 0 =>
            {
                JobOutcome::ScriptFailure { exit_code: code }
            }
            Some(Err(e)) => JobOutcome::SystemFailure(format!("wait for {name}: {e}")),
            None => JobOutcome::SystemFailure(format!("wait for {name}: no answer")),
        }
    }
}

/// After a container exits, its log is drained until it is quiet this long...
const LOG_DRAIN_IDLE: Duration = Duration::from_millis(500);
/// ...and for this long at most.
const LOG_DRAIN_CAP: Duration = Duration::from_secs(5);

fn classify_create_error(image: &str, error: bollard::errors::Error) -> JobOutcome {
    let text = error.to_string();
    if text.contains("image not known") || text.contains("No such image") {
        JobOutcome::ImagePullFailure(format!(
            "image {image} is not available on the instance: {text}"
        ))
    } else {
        JobOutcome::SystemFailure(format!("create container: {text}"))
    }
}

fn stage_script(job: &JobSpec, commands: &[String], job_status: Option<&str>) -> String {
    let mut variables = job.variables.clone();
    if let Some(status) = job_status {
        variables.push(Variable {
            key: "CI_JOB_STATUS".into(),
            value: status.into(),
            file: false,
        });
    }
    script::stage_script(&job.project_dir, &variables, commands)
}

fn container_body(
    job: &JobSpec,
    config: &DockerConfig,
    resources: &JobResources,
    script_path: &str,
) -> ContainerCreateBody {
    let mut binds = vec![format!("{}:/builds", resources.volume)];
    let mut anonymous = Vec::new();
    for volume in &config.volumes {
        if volume.contains(':') {
            binds.push(volume.clone());
        } else {
            anonymous.push(volume.clone());
        }
    }
    let network_mode = if job.network_per_build {
        Some(resources.network.clone())
    } else {
        config.network_mode.clone()
    };
    let host_config = HostConfig {
        privileged: Some(config.privileged),
        // Podman-in-Podman needs its own cgroup namespace to mount cgroup2 inside.
        cgroupns_mode: config
            .privileged
            .then_some(HostConfigCgroupnsModeEnum::PRIVATE),
        binds: Some(binds),
        network_mode,
        cap_add: non_empty(&config.cap_add),
        cap_drop: non_empty(&config.cap_drop),
        security_opt: non_empty(&config.security_opt),
        dns: non_empty(&config.dns),
        dns_search: non_empty(&config.dns_search),
        extra_hosts: non_empty(&config.extra_hosts),
        shm_size: (config.shm_size > 0).then_some(config.shm_size),
        oom_kill_disable: config.oom_kill_disable.then_some(true),
        ..options::resources(config)
    };
    // `disable_entrypoint_overwrite` keeps the image's own entrypoint whatever the job asks.
    let entrypoint = job
        .entrypoint
        .clone()
        .filter(|e| !e.is_empty() && !config.disable_entrypoint_overwrite);
    ContainerCreateBody {
        image: Some(job.image.clone()),
        entrypoint,
        cmd: Some(shell_command(&job.shell, script_path)),
        working_dir: None,
        user: config.user.clone(),
        labels: Some(resources.labels()),
        volumes: (!anonymous.is_empty()).then_some(anonymous),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// The container command running the script file at `path` (passed as an argument, so it
/// needs no quoting).
fn shell_command(shell: &str, path: &str) -> Vec<String> {
    if shell == "bash" {
        let detect =
            "if command -v bash >/dev/null 2>&1; then exec bash \"$1\"; fi; exec sh \"$1\"";
        vec![
            "sh".into(),
            "-c".into(),
            detect.into(),
            "sh".into(),
            path.into(),
        ]
    } else {
        vec!["sh".into(), path.into()]
    }
}

/// A ustar archive holding one regular file, for the Docker API's archive upload.
fn single_file_tar(name: &str, contents: &[u8], mode: u32) -> Vec<u8> {
    fn put(header: &mut [u8; 512], at: usize, value: &[u8]) {
        header[at..at + value.len()].copy_from_slice(value);
    }
    let mut header = [0u8; 512];
    put(&mut header, 0, &name.as_bytes()[..name.len().min(99)]);
    put(&mut header, 100, format!("{mode:07o}\0").as_bytes());
    put(&mut header, 108, b"0000000\0");
    put(&mut header, 116, b"0000000\0");
    put(
        &mut header,
        124,
        format!("{:011o}\0", contents.len()).as_bytes(),
    );
    put(&mut header, 136, b"00000000000\0");
    put(&mut header, 148, b"        ");
    header[156] = b'0';
    put(&mut header, 257, b"ustar\x0000");
    let checksum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    put(&mut header, 148, format!("{checksum:06o}\0 ").as_bytes());
    let mut archive = header.to_vec();
    archive.extend_from_slice(contents);
    archive.resize(archive.len().div_ceil(512) * 512 + 1024, 0);
    archive
}

fn non_empty(values: &[String]) -> Option<Vec<String>> {
    (!values.is_empty()).then(|| values.to_vec())
}

/// Names of everything a job creates on the instance, so it can all be removed.
struct JobResources {
    prefix: String,
    network: String,
    volume: String,
    job_id: u64,
    containers: std::sync::Mutex<Vec<String>>,
    network_created: std::sync::atomic::AtomicBool,
}

impl JobResources {
    fn new(job: &JobSpec) -> Self {
        let prefix = format!("podfleet-job-{}", job.job_id);
        Self {
            network: format!("{prefix}-network"),
            volume: format!("{prefix}-builds"),
            prefix,
            job_id: job.job_id,
            containers: Default::default(),
            network_created: Default::default(),
        }
    }

    fn container(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            ("io.podfleet.job.id".to_string(), self.job_id.to_string()),
            (
                "com.gitlab.gitlab-runner.job.id".to_string(),
                self.job_id.to_string(),
            ),
        ])
    }

    async fn remove(&self, docker: &Docker) {
        let containers = self
            .containers
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        for name in containers {
            let options = RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            };
            if let Err(e) = docker.remove_container(&name, Some(options)).await {
                tracing::warn!(container = %name, error = %e, "removing job container failed");
            }
        }
        let _ = docker
            .remove_volume(&self.volume, Some(RemoveVolumeOptions { force: true }))
            .await;
        if self
            .network_created
            .load(std::sync::atomic::Ordering::SeqCst)
            && let Err(e) = docker.remove_network(&self.network).await
        {
            tracing::warn!(network = %self.network, error = %e, "removing job network failed");
        }
    }
}

fn say(trace: &TraceSink, line: &str) {
    trace(format!("\x1b[0K\x1b[36;1m{line}\x1b[0;m\n").as_bytes());
}

fn say_warning(trace: &TraceSink, line: &str) {
    trace(format!("\x1b[0;33mWARNING: {line}\x1b[0;m\n").as_bytes());
}

fn say_error(trace: &TraceSink, line: &str) {
    trace(format!("\x1b[31;1mERROR: {line}\x1b[0;m\n").as_bytes());
}
