//! The executor's stages on a real rootless Podman instance of the local provider: services
//! reached by alias (and one that never becomes ready failing the job with its logs), trace
//! sections, file and hostile variables, graceful and hard cancels, job and step timeouts,
//! pull policies, and registry credentials from `DOCKER_AUTH_CONFIG` against Debian's
//! `docker-registry` with htpasswd. The executor talks to the instance user's Podman socket
//! directly (root on the same host), which is the Docker API the SSH tunnel would carry.
//! Needs root and the host of `scripts/setup-host.sh` (busybox image, docker-registry, skopeo).

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podfleet_config::{DockerConfig, PullPolicy};
use podfleet_coordinator::model::{
    ArtifactsFile, Cache, Dependency, JobResponse, JobVariable, Secret,
};
use podfleet_executor::auth::parse_docker_auth_config;
use podfleet_executor::{
    Cancellation, Executor, HelperBatch, HelperPlan, HelperStage, HelperStageKind, JobOutcome,
    JobSpec, ServiceSpec, TraceSink, Variable,
};
use podfleet_helper::{HelperJob, Stage};
use podfleet_provider::{InstanceId, InstanceState, Provider};
use podfleet_provider_local::{InstanceCredentials, LocalProvider, LocalSettings};

const BUSYBOX: &str = "localhost/podfleet/busybox:latest";
/// BUSYBOX with `EXPOSE 5432`, committed by [`exposing_image`].
const EXPOSING: &str = "localhost/podfleet-test/busybox-expose:5432";

/// Makes [`EXPOSING`] in root's image store (once per host: the commit is deterministic in
/// what matters, its exposed port), so the local provider carries it to the instance.
fn exposing_image() {
    static MADE: std::sync::Once = std::sync::Once::new();
    MADE.call_once(|| {
        let podman = |args: &[&str]| {
            let output = Command::new("podman").args(args).output().unwrap();
            assert!(output.status.success(), "podman {args:?}: {output:?}");
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        };
        let container = podman(&["create", "--network", "none", BUSYBOX, "true"]);
        podman(&[
            "commit",
            "-q",
            "--change",
            "EXPOSE 5432/tcp",
            &container,
            EXPOSING,
        ]);
        podman(&["rm", &container]);
    });
}

/// One local-provider instance and the executor on its Podman socket.
struct Instance {
    provider: LocalProvider,
    id: InstanceId,
    executor: Executor,
    _state: tempfile::TempDir,
}

impl Instance {
    async fn create(prefix: &str, registries_conf: Option<String>) -> Self {
        exposing_image();
        // Not below /tmp: sshd refuses keys below a directory others may write.
        let state = tempfile::Builder::new()
            .prefix("executor-stages-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let settings = LocalSettings {
            name: format!("{prefix}{:04x}", (nanos ^ std::process::id()) & 0xffff),
            state_dir: state.path().to_path_buf(),
            ssh_port: 0,
            images: Some(vec![BUSYBOX.to_string(), EXPOSING.to_string()]),
            max_size: 1,
            registries_conf,
            image_cache: None,
            image_cache_registries: Vec::new(),
            storage_driver: "overlay".into(),
        };
        let provider = LocalProvider::new(settings, InstanceCredentials::default())
            .await
            .expect("start the local provider");
        assert_eq!(provider.increase(1).await.expect("increase"), 1);
        let deadline = Instant::now() + Duration::from_secs(180);
        let id = loop {
            let listed = provider.list().await.expect("list");
            match listed.first() {
                Some(instance) if instance.state == InstanceState::Running => {
                    break instance.id.clone();
                }
                Some(instance) if instance.state == InstanceState::Creating => {}
                other => panic!("the instance must become Running: {other:?}"),
            }
            assert!(Instant::now() < deadline, "instance not Running in 180s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let info = provider.connect_info(&id).await.expect("connect_info");
        let socket = info
            .docker_socket
            .expect("the local provider names the socket");
        let executor = Executor::connect_unix(&socket)
            .await
            .expect("the instance's Podman API answers");
        Self {
            provider,
            id,
            executor,
            _state: state,
        }
    }

    /// Runs a job and returns its outcome and trace.
    async fn run(&self, job: &JobSpec, config: &DockerConfig, cancel: Cancellation) -> Run {
        let trace = Arc::new(Mutex::new(Vec::new()));
        let sink: TraceSink = {
            let trace = trace.clone();
            Arc::new(move |bytes: &[u8]| trace.lock().unwrap().extend_from_slice(bytes))
        };
        let outcome = self.executor.run(job, config, sink, cancel).await;
        let trace = String::from_utf8_lossy(&trace.lock().unwrap()).into_owned();
        // Each stage's exit status line is taken out of what the job shows.
        assert!(!trace.contains("podfleet-exit"), "{trace}");
        Run { outcome, trace }
    }

    /// Names of the job's containers, volumes and networks still on the instance.
    async fn leftovers(&self, job_id: u64) -> Vec<String> {
        let prefix = format!("podfleet-job-{job_id}-");
        let docker = self.executor.docker();
        let mut names = Vec::new();
        let all = bollard_list(docker).await;
        names.extend(all.into_iter().filter(|n| n.starts_with(&prefix)));
        names
    }

    async fn remove(self) {
        self.provider
            .decrease(std::slice::from_ref(&self.id))
            .await
            .expect("decrease");
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self.provider.list().await.expect("list").is_empty() {
            assert!(Instant::now() < deadline, "instance not removed in 90s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.provider.shutdown().await;
    }
}

/// Container, volume and network names on the engine.
async fn bollard_list(docker: &podfleet_executor::bollard::Docker) -> Vec<String> {
    use podfleet_executor::bollard::query_parameters::{
        ListContainersOptions, ListNetworksOptions, ListVolumesOptions,
    };
    let mut names = Vec::new();
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            ..Default::default()
        }))
        .await
        .unwrap();
    for container in containers {
        for name in container.names.unwrap_or_default() {
            names.push(name.trim_start_matches('/').to_string());
        }
    }
    let volumes = docker
        .list_volumes(None::<ListVolumesOptions>)
        .await
        .unwrap();
    names.extend(
        volumes
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name),
    );
    let networks = docker
        .list_networks(None::<ListNetworksOptions>)
        .await
        .unwrap();
    names.extend(networks.into_iter().filter_map(|n| n.name));
    names
}

struct Run {
    outcome: JobOutcome,
    trace: String,
}

fn variable(key: &str, value: &str, file: bool) -> Variable {
    Variable {
        key: key.into(),
        value: value.into(),
        file,
    }
}

fn job(job_id: u64, script: &[&str]) -> JobSpec {
    JobSpec {
        job_id,
        image: BUSYBOX.into(),
        entrypoint: None,
        builds_dir: "/builds".into(),
        project_dir: "/builds/group/project".into(),
        variables: vec![variable("CI_JOB_STATUS", "running", false)],
        script: script.iter().map(|s| s.to_string()).collect(),
        after_script: Vec::new(),
        timeout: Duration::from_secs(120),
        script_timeout: None,
        after_script_timeout: Duration::from_secs(60),
        shell: "sh".into(),
        trace_sections: false,
        script_sections: false,
        pull_policy: Vec::new(),
        user: None,
        services: Vec::new(),
        registry_credentials: Vec::new(),
        cache_volume: None,
        helper: None,
        remove_project_dir: false,
        stop_grace: Duration::from_secs(10),
    }
}

fn config() -> DockerConfig {
    DockerConfig {
        pull_policy: vec![PullPolicy::IfNotPresent],
        wait_for_services_timeout: 30,
        ..Default::default()
    }
}

/// `section_start:<unix ts>:<name>` (options in brackets or `\r\e[0K` after the name).
fn has_marker(trace: &str, kind: &str, name: &str) -> bool {
    marker_at(trace, kind, name).is_some()
}

/// Where [`has_marker`]'s marker first is in `trace`.
fn marker_at(trace: &str, kind: &str, name: &str) -> Option<usize> {
    trace
        .match_indices(&format!("{kind}:"))
        .find_map(|(at, m)| {
            let rest = &trace[at + m.len()..];
            let (timestamp, rest) = rest.split_once(':')?;
            (timestamp.parse::<u64>().is_ok()
                && rest.starts_with(name)
                && matches!(rest.as_bytes().get(name.len()), Some(b'[' | b'\r')))
            .then_some(at)
        })
}

/// A script line printing the container's network interfaces with routes: `eth0` on a
/// bridge network, `tap0` on its own slirp4netns stack.
const ROUTE_INTERFACES: &str =
    "echo \"interfaces=$(tail -n +2 /proc/net/route | cut -f1 | sort -u | tr '\\n' ,)\"";

/// Lines the job itself printed (not the echoed `$ command` lines).
fn printed(trace: &str, needle: &str) -> bool {
    trace
        .lines()
        .any(|l| l.contains(needle) && !l.contains("$ "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_services_variables_cancels_and_timeouts_on_rootless_podman() {
    let instance = Instance::create("stg", None).await;
    let mut failures = Vec::new();
    macro_rules! check {
        ($cond:expr, $($what:tt)*) => {
            if !$cond {
                failures.push(format!($($what)*));
            }
        };
    }

    // A service reached by its explicit and its name-derived aliases, with the job's
    // variables in its environment; stage sections and per-command sections in the trace.
    let mut with_service = job(
        7101,
        &[
            "nc -w 5 db 5432 </dev/null",
            "nc -w 5 localhost__podfleet-test__busybox-expose 5432 </dev/null",
            "nc -w 5 localhost-podfleet-test-busybox-expose 5432 </dev/null",
            ROUTE_INTERFACES,
        ],
    );
    with_service
        .variables
        .push(variable("GREETING", "hello-from-job-variables", false));
    with_service.trace_sections = true;
    with_service.script_sections = true;
    with_service.services = vec![ServiceSpec {
        // The port to wait for comes from the image's ExposedPorts.
        image: EXPOSING.into(),
        aliases: vec!["db".into()],
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            // Listens late: the job only works if the executor waited for the port.
            "sleep 2; exec nc -ll -p 5432 -e sh -c 'echo \"$GREETING\"'".into(),
        ]),
        variables: vec![variable("GREETING", "hello-from-job-variables", false)],
        ..Default::default()
    }];
    let run = instance
        .run(&with_service, &config(), Cancellation::new())
        .await;
    check!(
        run.outcome == JobOutcome::Success,
        "service job: {:?}\n{}",
        run.outcome,
        run.trace
    );
    check!(
        run.trace.matches("hello-from-job-variables").count() >= 3,
        "each alias reached the service:\n{}",
        run.trace
    );
    check!(
        run.trace
            .contains("Waiting for services to be up and running"),
        "the exposed port was waited for:\n{}",
        run.trace
    );
    for section in ["prepare_executor", "step_script", "section_script_step_2"] {
        check!(
            has_marker(&run.trace, "section_start", section)
                && has_marker(&run.trace, "section_end", section),
            "section {section} in:\n{}",
            run.trace
        );
    }
    check!(
        printed(&run.trace, "interfaces=eth0,"),
        "a job with services is on its network (a bridge):\n{}",
        run.trace
    );
    check!(
        instance.leftovers(7101).await.is_empty(),
        "left behind by 7101: {:?}",
        instance.leftovers(7101).await
    );

    // A service that never listens: the job fails after wait_for_services_timeout with the
    // service's own log in the trace, and the script never runs.
    let mut dead_service = job(7102, &["echo script-ran"]);
    dead_service.services = vec![ServiceSpec {
        image: BUSYBOX.into(),
        aliases: vec!["never".into()],
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            "echo service-log-line-before-hanging; sleep 600".into(),
        ]),
        ports: vec![6543],
        ..Default::default()
    }];
    let dead_config = DockerConfig {
        wait_for_services_timeout: 3,
        ..config()
    };
    let run = instance
        .run(&dead_service, &dead_config, Cancellation::new())
        .await;
    check!(
        matches!(&run.outcome, JobOutcome::ServiceFailure(reason) if reason.contains("wait_for_services_timeout") && reason.contains(":6543 did not accept")),
        "dead service: {:?}\n{}",
        run.outcome,
        run.trace
    );
    check!(
        run.trace.contains("service-log-line-before-hanging"),
        "service log in trace:\n{}",
        run.trace
    );
    check!(
        !printed(&run.trace, "script-ran"),
        "script ran:\n{}",
        run.trace
    );
    check!(
        instance.leftovers(7102).await.is_empty(),
        "left behind by 7102: {:?}",
        instance.leftovers(7102).await
    );

    // File variables (a path to a 0600 file under $CI_PROJECT_DIR.tmp, removed by
    // cleanup_file_variables) and hostile values, printed back byte for byte.
    let hostile = "'; echo INJECTED; '$(echo INJECTED)`echo INJECTED`\"\\$HOME\nsecond line";
    let mut files = job(
        7103,
        &[
            "printf '<%s>\\n' \"$HOSTILE\"",
            "printf '[%s]\\n' \"$(cat \"$SECRET_FILE\")\"",
            "echo \"path=$SECRET_FILE\"",
            "stat -c 'mode=%a' \"$SECRET_FILE\"",
            ROUTE_INTERFACES,
        ],
    );
    files.variables.push(variable("HOSTILE", hostile, false));
    files
        .variables
        .push(variable("SECRET_FILE", "file-content-42", true));
    files.after_script = vec!["printf 'after:%s\\n' \"$(cat \"$SECRET_FILE\")\"".into()];
    let run = instance.run(&files, &config(), Cancellation::new()).await;
    check!(
        run.outcome == JobOutcome::Success,
        "files: {:?}\n{}",
        run.outcome,
        run.trace
    );
    check!(
        run.trace.contains(&format!("<{hostile}>")),
        "hostile value printed back:\n{}",
        run.trace
    );
    check!(
        !run.trace.lines().any(|l| l == "INJECTED"),
        "injection:\n{}",
        run.trace
    );
    check!(
        printed(&run.trace, "interfaces=tap0,"),
        "a job without services has its own network stack (slirp4netns):\n{}",
        run.trace
    );
    check!(
        run.trace.contains("[file-content-42]"),
        "file variable:\n{}",
        run.trace
    );
    check!(
        run.trace.contains("after:file-content-42"),
        "file variable in after_script:\n{}",
        run.trace
    );
    check!(
        run.trace
            .contains("path=/builds/group/project.tmp/SECRET_FILE"),
        "file variable path:\n{}",
        run.trace
    );
    check!(run.trace.contains("mode=600"), "file mode:\n{}", run.trace);
    check!(
        run.trace
            .contains("Cleaning up project directory and file based variables"),
        "cleanup stage:\n{}",
        run.trace
    );

    // A graceful cancel stops the script with SIGTERM and still runs after_script, which
    // sees CI_JOB_STATUS=canceled.
    let mut graceful = job(
        7104,
        &["trap 'echo got-sigterm; exit 143' TERM; echo script-started; sleep 300 & wait"],
    );
    graceful.after_script = vec!["echo \"after-script-status=$CI_JOB_STATUS\"".into()];
    let cancel = Cancellation::new();
    let trigger = {
        let cancel = cancel.clone();
        let executor = instance.executor.clone();
        tokio::spawn(async move {
            wait_for_running(&executor, "podfleet-job-7104-build").await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            cancel.graceful.cancel();
        })
    };
    let started = Instant::now();
    let run = instance.run(&graceful, &config(), cancel).await;
    trigger.await.unwrap();
    check!(
        run.outcome == JobOutcome::Canceled,
        "graceful: {:?}\n{}",
        run.outcome,
        run.trace
    );
    check!(
        run.trace.contains("got-sigterm"),
        "SIGTERM reached the script:\n{}",
        run.trace
    );
    check!(
        run.trace.contains("after-script-status=canceled"),
        "after_script after a graceful cancel:\n{}",
        run.trace
    );
    check!(
        started.elapsed() < Duration::from_secs(200),
        "graceful cancel did not stop the job"
    );
    check!(
        instance.leftovers(7104).await.is_empty(),
        "left behind by 7104: {:?}",
        instance.leftovers(7104).await
    );

    // A hard cancel kills at once: no after_script.
    let mut hard = job(7105, &["echo script-started; sleep 300"]);
    hard.after_script = vec!["echo after-script-ran".into()];
    let cancel = Cancellation::new();
    let trigger = {
        let cancel = cancel.clone();
        let executor = instance.executor.clone();
        tokio::spawn(async move {
            wait_for_running(&executor, "podfleet-job-7105-build").await;
            cancel.hard.cancel();
        })
    };
    let run = instance.run(&hard, &config(), cancel).await;
    trigger.await.unwrap();
    check!(
        run.outcome == JobOutcome::Canceled,
        "hard: {:?}\n{}",
        run.outcome,
        run.trace
    );
    check!(
        !printed(&run.trace, "after-script-ran"),
        "after_script after a hard cancel:\n{}",
        run.trace
    );
    check!(
        instance.leftovers(7105).await.is_empty(),
        "left behind by 7105: {:?}",
        instance.leftovers(7105).await
    );

    // The job's timeout, and a step timeout shorter than it; after_script still runs.
    let mut timed = job(7106, &["sleep 300"]);
    timed.timeout = Duration::from_secs(3);
    timed.after_script = vec!["echo \"after-timeout-status=$CI_JOB_STATUS\"".into()];
    let run = instance.run(&timed, &config(), Cancellation::new()).await;
    check!(
        run.outcome == JobOutcome::TimedOut,
        "job timeout: {:?}\n{}",
        run.outcome,
        run.trace
    );
    check!(
        run.trace.contains("execution took longer than 3 seconds"),
        "timeout line:\n{}",
        run.trace
    );
    check!(
        run.trace.contains("after-timeout-status=failed"),
        "after_script after timeout:\n{}",
        run.trace
    );
    let mut step = job(7107, &["sleep 300"]);
    step.script_timeout = Some(Duration::from_secs(2));
    let run = instance.run(&step, &config(), Cancellation::new()).await;
    check!(
        run.outcome == JobOutcome::TimedOut,
        "step timeout: {:?}\n{}",
        run.outcome,
        run.trace
    );
    check!(
        run.trace.contains("execution took longer than 2 seconds"),
        "step timeout line:\n{}",
        run.trace
    );

    // A pull policy the runner does not allow fails the job before anything runs, naming
    // both lists; a missing image under "never" names the image.
    let mut denied = job(7108, &["echo never-runs"]);
    denied.pull_policy = vec!["always".into()];
    let run = instance.run(&denied, &config(), Cancellation::new()).await;
    check!(
        matches!(&run.outcome, JobOutcome::ImagePullFailure(reason) if reason.contains("pull_policy ([always])") && reason.contains("allowed_pull_policies ([if-not-present])")),
        "denied pull policy: {:?}",
        run.outcome
    );
    let mut missing = job(7109, &["echo never-runs"]);
    missing.image = "localhost/podfleet/not-there:1".into();
    let never = DockerConfig {
        pull_policy: vec![PullPolicy::Never],
        ..config()
    };
    let run = instance.run(&missing, &never, Cancellation::new()).await;
    check!(
        matches!(&run.outcome, JobOutcome::ImagePullFailure(reason) if reason.contains("localhost/podfleet/not-there:1") && reason.contains("never")),
        "missing image: {:?}",
        run.outcome
    );

    instance.remove().await;
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A private registry (htpasswd, plain HTTP on 127.0.0.1) that the instance may pull from
/// only with the credentials of `DOCKER_AUTH_CONFIG`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_auth_config_pulls_from_a_private_registry() {
    let registry = Registry::start("puller", "Pa55-for-registry").await;
    let image = format!("{}/private/busybox:auth", registry.address);
    registry.seed("private/busybox:auth");
    let conf = format!(
        "[[registry]]\nlocation = \"{}\"\ninsecure = true\n",
        registry.address
    );
    let instance = Instance::create("stga", Some(conf)).await;
    let auth = String::from_utf8(
        Command::new("sh")
            .args(["-c", "printf '%s' 'puller:Pa55-for-registry' | base64 -w0"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let auth_config = format!(
        r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
        registry.address
    );
    let always = DockerConfig {
        pull_policy: vec![PullPolicy::Always],
        ..config()
    };

    let mut without = job(7201, &["echo pulled-without-credentials"]);
    without.image = image.clone();
    let run = instance.run(&without, &always, Cancellation::new()).await;
    let refused =
        matches!(&run.outcome, JobOutcome::ImagePullFailure(reason) if reason.contains(&image));

    let mut with = job(7202, &["echo pulled-with-credentials"]);
    with.image = image.clone();
    with.registry_credentials = parse_docker_auth_config(&auth_config).unwrap();
    let authorized = instance.run(&with, &always, Cancellation::new()).await;

    instance.remove().await;
    assert!(
        refused,
        "pull without credentials: {:?}\n{}",
        run.outcome, run.trace
    );
    assert_eq!(
        authorized.outcome,
        JobOutcome::Success,
        "{}",
        authorized.trace
    );
    assert!(printed(&authorized.trace, "pulled-with-credentials"));
    assert!(
        !authorized.trace.contains("Pa55-for-registry"),
        "the password reached the trace"
    );
}

async fn wait_for_running(executor: &Executor, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let inspected = executor
            .docker()
            .inspect_container(
                name,
                None::<podfleet_executor::bollard::query_parameters::InspectContainerOptions>,
            )
            .await;
        if let Ok(container) = inspected
            && container.state.and_then(|s| s.running) == Some(true)
        {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Debian's `docker-registry` with htpasswd auth on 127.0.0.1, killed on drop.
struct Registry {
    address: String,
    dir: tempfile::TempDir,
    child: std::process::Child,
    user: String,
    password: String,
}

impl Registry {
    async fn start(user: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        // distribution reads bcrypt hashes only; glibc's crypt makes them.
        let hash = Command::new("python3")
            .args([
                "-W",
                "ignore",
                "-c",
                "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1024)))",
                password,
            ])
            .output()
            .unwrap();
        assert!(hash.status.success(), "bcrypt hash: {hash:?}");
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(
            &htpasswd,
            format!("{user}:{}\n", String::from_utf8_lossy(&hash.stdout).trim()),
        )
        .unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: warn, formatter: text}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: {address}}}\nauth: {{htpasswd: {{realm: podfleet-test, path: {}}}}}\n",
                dir.path().join("data").display(),
                htpasswd.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry is installed (apt-get install docker-registry)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start: {}",
                std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            address,
            dir,
            child,
            user: user.into(),
            password: password.into(),
        }
    }

    /// Copies the local busybox image into the registry.
    fn seed(&self, repository_and_tag: &str) {
        let output = Command::new("skopeo")
            .args([
                "copy",
                "-q",
                "--dest-tls-verify=false",
                "--dest-creds",
                &format!("{}:{}", self.user, self.password),
                &format!("containers-storage:{BUSYBOX}"),
                &format!("docker://{}/{repository_and_tag}", self.address),
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "seed the registry: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// podfleet's helper image, built around the podfleet binary under test (its `helper`
/// subcommand runs the stages) and cached on disk by the binary's hash.
fn helper_archive() -> std::io::Result<Vec<u8>> {
    podfleet_helper::image::docker_archive_of(
        Path::new(env!("CARGO_BIN_EXE_podfleet")),
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    )
}

/// The helper stages of a payload, as the manager plans them.
fn helper_plan(payload: &JobResponse, project_dir: &str) -> HelperPlan {
    let job = HelperJob::from_payload(payload, project_dir, "http://127.0.0.1:1/", None)
        .expect("helper job");
    let kinds = [
        HelperStageKind::GetSources,
        HelperStageKind::RestoreCache,
        HelperStageKind::DownloadArtifacts,
        HelperStageKind::ArchiveCache,
        HelperStageKind::ArchiveCacheOnFailure,
        HelperStageKind::UploadArtifactsOnSuccess,
        HelperStageKind::UploadArtifactsOnFailure,
    ];
    let job_file = "/podfleet-helper-job.json";
    let stages = Stage::ALL
        .into_iter()
        .filter(|stage| stage.has_work(&job))
        .map(|stage| HelperStage {
            kind: *kinds.iter().find(|k| k.section() == stage.name()).unwrap(),
            argv: stage.argv(job_file),
        })
        .collect();
    // Hashing the (debug, ~300 MB) binary is slow: once per test binary.
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let hash = HASH.get_or_init(|| {
        podfleet_helper::image::binary_hash(Path::new(env!("CARGO_BIN_EXE_podfleet")))
            .expect("hash the podfleet binary")
    });
    HelperPlan {
        image: podfleet_helper::image::reference_for_hash(hash),
        archive: Some(helper_archive),
        job_file: job.to_json(),
        job_file_path: job_file.into(),
        stages,
        batch: Some(HelperBatch {
            argv: batch_argv,
            stage_end: podfleet_helper::STAGE_END_MARKER,
        }),
    }
}

fn batch_argv(kinds: &[HelperStageKind]) -> Vec<String> {
    let stages: Vec<Stage> = kinds
        .iter()
        .map(|kind| Stage::from_name(kind.section()).unwrap())
        .collect();
    Stage::batch_argv(&stages, "/podfleet-helper-job.json")
}

/// The helper image is loaded into a fresh instance through `POST /images/load`, and a cache
/// saved by one job's archive_cache (into the runner's cache volume) is restored by the next
/// job's restore_cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_stages_carry_a_cache_from_one_job_to_the_next() {
    let instance = Instance::create("stgh", None).await;
    let mut payload = JobResponse {
        id: 7301,
        token: Secret::new("job-token-7301"),
        variables: vec![JobVariable {
            key: "GIT_STRATEGY".into(),
            value: "none".into(),
            ..Default::default()
        }],
        cache: vec![Cache {
            key: "stages-cache".into(),
            paths: vec!["vendor/".into()],
            policy: "pull-push".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    payload.git_info.git_ref = "main".into();
    let cache_volume = format!("podfleet-cache-{}", instance.id.0);
    let mut first = job(
        7301,
        &["mkdir -p vendor && echo cached-content-77 > vendor/file"],
    );
    first.trace_sections = true;
    first.helper = Some(helper_plan(&payload, &first.project_dir));
    first.cache_volume = Some(cache_volume.clone());
    let saved = instance.run(&first, &config(), Cancellation::new()).await;

    payload.id = 7302;
    let mut second = job(7302, &["cat vendor/file"]);
    second.helper = Some(helper_plan(&payload, &second.project_dir));
    second.cache_volume = Some(cache_volume.clone());
    let restored = instance.run(&second, &config(), Cancellation::new()).await;

    // restore_cache and download_artifacts in one container: the first ends in its section,
    // the second fails (its coordinator is unreachable) and fails the job before the script.
    payload.id = 7303;
    payload.dependencies = vec![Dependency {
        id: 7301,
        name: "build".into(),
        token: Secret::new("job-token-7301"),
        artifacts_file: Some(ArtifactsFile {
            filename: "artifacts.zip".into(),
            size: 10,
        }),
    }];
    let mut third = job(7303, &["echo script-ran-7303"]);
    third.trace_sections = true;
    third.helper = Some(helper_plan(&payload, &third.project_dir));
    third.cache_volume = Some(cache_volume.clone());
    let batched = instance.run(&third, &config(), Cancellation::new()).await;
    let left = instance.leftovers(7301).await.len()
        + instance.leftovers(7302).await.len()
        + instance.leftovers(7303).await.len();
    let _ = instance
        .executor
        .docker()
        .remove_volume(
            &cache_volume,
            None::<podfleet_executor::bollard::query_parameters::RemoveVolumeOptions>,
        )
        .await;
    instance.remove().await;

    assert_eq!(saved.outcome, JobOutcome::Success, "{}", saved.trace);
    assert!(
        has_marker(&saved.trace, "section_start", "archive_cache")
            && has_marker(&saved.trace, "section_end", "archive_cache"),
        "{}",
        saved.trace
    );
    assert!(
        saved.trace.contains("Loading helper image"),
        "{}",
        saved.trace
    );
    assert_eq!(restored.outcome, JobOutcome::Success, "{}", restored.trace);
    assert!(
        restored.trace.contains("Restoring cache"),
        "{}",
        restored.trace
    );
    assert!(
        printed(&restored.trace, "cached-content-77"),
        "the second job sees the first job's cache:\n{}",
        restored.trace
    );
    assert!(
        !restored.trace.contains("Loading helper image"),
        "the helper image is loaded once per instance:\n{}",
        restored.trace
    );
    assert!(
        matches!(batched.outcome, JobOutcome::ScriptFailure { .. }),
        "{:?}\n{}",
        batched.outcome,
        batched.trace
    );
    let position = |kind: &str, name: &str| {
        marker_at(&batched.trace, kind, name)
            .unwrap_or_else(|| panic!("no {kind} of {name}:\n{}", batched.trace))
    };
    let order = [
        position("section_start", "restore_cache"),
        position("section_end", "restore_cache"),
        position("section_start", "download_artifacts"),
        position("section_end", "download_artifacts"),
    ];
    assert!(order.is_sorted(), "{order:?}\n{}", batched.trace);
    assert!(
        batched.trace.contains("Restoring cache")
            && batched.trace.contains("Downloading artifacts"),
        "{}",
        batched.trace
    );
    assert!(
        !printed(&batched.trace, "script-ran-7303")
            && !batched.trace.contains("podfleet-stage-end"),
        "{}",
        batched.trace
    );
    assert_eq!(left, 0, "job resources left behind");
}
