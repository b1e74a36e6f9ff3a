//! The coordinator's job payload turned into what the executor runs: image and services
//! (within the runner's allowed lists), steps and their timeouts, the variables the runner
//! itself sets, `$VAR` expansion, registry credentials, cache volume and helper stages.

use std::time::Duration;

use podfleet_config::RunnerConfig;
use podfleet_coordinator::model::{JobResponse, StepWhen};
use podfleet_executor::auth::parse_docker_auth_config;
use podfleet_executor::{
    HelperArchive, HelperBatch, HelperPlan, HelperStage, HelperStageKind, JobSpec,
    RegistryCredential, ServiceSpec, Variable,
};
use podfleet_helper::{HelperJob, Stage};

const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(7200);
/// gitlab-runner's after_script timeout when the step sets none.
const DEFAULT_AFTER_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);
/// A graceful cancel's SIGTERM is followed by SIGKILL after this long.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// podfleet's own helper image and its archive, unless `[runners.docker] helper_image`
/// names another image.
pub(crate) fn own_helper_image(runner: &RunnerConfig) -> Option<(String, HelperArchive)> {
    match runner.docker.helper_image.as_deref() {
        Some(image) if !image.is_empty() => None,
        _ => Some((
            podfleet_helper::image::reference(),
            podfleet_helper::image::docker_archive as HelperArchive,
        )),
    }
}

/// Turns the coordinator's payload into what the executor runs. A payload the executor
/// cannot run fails that job with a reason, never the manager.
pub(crate) fn job_spec(runner: &RunnerConfig, payload: &JobResponse) -> Result<JobSpec, String> {
    let job_image = payload
        .image
        .as_ref()
        .map(|i| i.name.clone())
        .filter(|name| !name.is_empty());
    if let Some(image) = &job_image {
        check_allowed(image, &runner.docker.allowed_images, "allowed_images")?;
        if runner.docker.privileged {
            check_allowed(
                image,
                &runner.docker.allowed_privileged_images,
                "allowed_privileged_images",
            )?;
        }
    }
    let image = job_image
        .or_else(|| runner.docker.image.clone())
        .ok_or("the job names no image and [runners.docker] image is not set")?;
    let user = payload
        .image
        .as_ref()
        .and_then(|i| i.executor_opts.as_ref())
        .and_then(|o| o.docker.as_ref())
        .map(|d| d.user.clone())
        .filter(|u| !u.is_empty());
    if let Some(user) = &user
        && !runner.docker.allowed_users.is_empty()
        && !runner.docker.allowed_users.contains(user)
    {
        return Err(format!(
            "user {user:?} of the job's image is not on the list of allowed_users of this runner: {}",
            runner.docker.allowed_users.join(", ")
        ));
    }
    let step_timeout = |t: i64| (t > 0).then(|| Duration::from_secs(t as u64));
    let mut script = Vec::new();
    let mut after_script = Vec::new();
    let mut script_timeout = None;
    let mut after_script_timeout = DEFAULT_AFTER_SCRIPT_TIMEOUT;
    for step in &payload.steps {
        match (step.name.as_str(), step.when) {
            ("after_script", _) => {
                after_script.extend(step.script.iter().cloned());
                after_script_timeout = step_timeout(step.timeout).unwrap_or(after_script_timeout);
            }
            (_, StepWhen::OnSuccess) => {
                script.extend(step.script.iter().cloned());
                script_timeout = step_timeout(step.timeout).or(script_timeout);
            }
            (name, when) => {
                return Err(format!(
                    "step {name:?} with when {when:?} is not supported yet"
                ));
            }
        }
    }
    if script.is_empty() {
        return Err("the job has no script step".into());
    }
    let project = if payload.job_info.project_full_path.is_empty() {
        format!("project-{}", payload.job_info.project_id)
    } else {
        payload.job_info.project_full_path.clone()
    };
    let builds_dir = runner
        .builds_dir
        .clone()
        .unwrap_or_else(|| "/builds".into());
    let project_dir = format!("{builds_dir}/{project}");
    let timeout = match payload.runner_info.timeout {
        t if t > 0 => Duration::from_secs(t as u64),
        _ => DEFAULT_JOB_TIMEOUT,
    };
    // (variable, raw): raw values are not expanded.
    let mut variables: Vec<(Variable, bool)> = Vec::new();
    let mut set = |key: &str, value: &str, file: bool, raw: bool| {
        variables.retain(|(v, _)| v.key != key);
        variables.push((
            Variable {
                key: key.into(),
                value: value.into(),
                file,
            },
            raw,
        ));
    };
    set("CI_JOB_IMAGE", &image, false, false);
    set("CI_RUNNER_SHORT_TOKEN", &runner.short_token(), false, false);
    for entry in &runner.environment {
        if let Some((key, value)) = entry.split_once('=') {
            set(key, value, false, false);
        }
    }
    set("CI_BUILDS_DIR", &builds_dir, false, false);
    set("CI_PROJECT_DIR", &project_dir, false, false);
    set("CI_SERVER", "yes", false, false);
    set("CI_JOB_STATUS", "running", false, false);
    set(
        "CI_JOB_TIMEOUT",
        &timeout.as_secs().to_string(),
        false,
        false,
    );
    for variable in &payload.variables {
        set(&variable.key, &variable.value, variable.file, variable.raw);
    }
    set("CI_DISPOSABLE_ENVIRONMENT", "true", false, false);
    set("CI_RUNNER_VERSION", env!("CARGO_PKG_VERSION"), false, false);
    set(
        "CI_RUNNER_EXECUTABLE_ARCH",
        &format!("linux/{}", std::env::consts::ARCH),
        false,
        false,
    );
    set(
        "RUNNER_TEMP_PROJECT_DIR",
        &format!("{project_dir}.tmp"),
        false,
        false,
    );
    let flag = |name: &str| job_flag(payload, name).unwrap_or_else(|| runner.feature_flag(name));
    // The per-build network exists for jobs with services (see the executor), whatever
    // FF_NETWORK_PER_BUILD says.
    let has_services = !payload.services.is_empty() || !runner.docker.services.is_empty();
    if has_services {
        set(
            "CI_BUILD_NETWORK_NAME",
            &format!("podfleet-job-{}-network", payload.id),
            false,
            false,
        );
    }
    let variables = expand_all(variables);
    let services = services(runner, payload, &variables)?;
    let registry_credentials = registry_credentials(runner, payload, &variables)?;
    let script_sections = flag("FF_SCRIPT_SECTIONS");
    let helper = helper_plan(runner, payload, &project_dir)?;
    Ok(JobSpec {
        job_id: payload.id,
        image,
        entrypoint: payload
            .image
            .as_ref()
            .map(|i| i.entrypoint.clone())
            .filter(|e| !e.is_empty()),
        builds_dir,
        project_dir,
        variables,
        script,
        after_script,
        timeout,
        script_timeout,
        after_script_timeout,
        shell: runner.shell.clone().unwrap_or_else(|| "sh".into()),
        trace_sections: payload.features.trace_sections || script_sections,
        script_sections,
        pull_policy: payload
            .image
            .as_ref()
            .map(|i| i.pull_policy.clone())
            .unwrap_or_default(),
        user,
        services,
        registry_credentials,
        cache_volume: (!runner.docker.disable_cache)
            .then(|| format!("podfleet-cache-{}", runner.short_token())),
        helper,
        remove_project_dir: flag("FF_ENABLE_JOB_CLEANUP"),
        stop_grace: STOP_GRACE,
    })
}

/// Where the helper container finds its job file.
const HELPER_JOB_FILE: &str = "/podfleet-helper-job.json";

/// The helper stages with work for this job (sources, caches, artifacts), run in podfleet's
/// own helper image (loaded onto the instance when missing) or in `helper_image` when set.
/// A `file://` repository (the local coordinator's directory that is no git repository) is
/// on the manager's host, which an instance cannot reach, and a payload without a repository
/// URL (scripted test coordinators; GitLab always sends one) names nothing to fetch: such a
/// job gets no sources, as with `GIT_STRATEGY: none`.
fn helper_plan(
    runner: &RunnerConfig,
    payload: &JobResponse,
    project_dir: &str,
) -> Result<Option<HelperPlan>, String> {
    let repo_url = payload.git_info.repo_url.expose();
    let local_only = repo_url.is_empty() || repo_url.starts_with("file://");
    let adjusted;
    let payload = if local_only {
        let mut copy = payload.clone();
        copy.variables
            .push(podfleet_coordinator::model::JobVariable {
                key: "GIT_STRATEGY".into(),
                value: "none".into(),
                ..Default::default()
            });
        adjusted = copy;
        &adjusted
    } else {
        payload
    };
    let cache = podfleet_helper::SharedCache::of_runner(runner);
    let job = HelperJob::from_payload(payload, project_dir, &runner.url, cache.as_ref())?;
    let stages: Vec<HelperStage> = Stage::ALL
        .into_iter()
        .filter(|stage| stage.has_work(&job))
        .map(|stage| HelperStage {
            kind: stage_kind(stage),
            argv: stage.argv(HELPER_JOB_FILE),
        })
        .collect();
    if stages.is_empty() {
        return Ok(None);
    }
    let (image, archive) = match own_helper_image(runner) {
        Some((image, archive)) => (image, Some(archive)),
        None => (runner.docker.helper_image.clone().unwrap_or_default(), None),
    };
    // podfleet's own helper (the binary of this build) runs consecutive stages in one
    // container; a configured helper_image may be an older build that cannot.
    let batch = archive.is_some().then_some(HelperBatch {
        argv: batch_argv,
        stage_end: podfleet_helper::STAGE_END_MARKER,
    });
    Ok(Some(HelperPlan {
        image,
        archive,
        job_file: job.to_json(),
        job_file_path: HELPER_JOB_FILE.into(),
        stages,
        batch,
    }))
}

fn stage_kind(stage: Stage) -> HelperStageKind {
    match stage {
        Stage::GetSources => HelperStageKind::GetSources,
        Stage::RestoreCache => HelperStageKind::RestoreCache,
        Stage::DownloadArtifacts => HelperStageKind::DownloadArtifacts,
        Stage::ArchiveCache { on_success: true } => HelperStageKind::ArchiveCache,
        Stage::ArchiveCache { on_success: false } => HelperStageKind::ArchiveCacheOnFailure,
        Stage::UploadArtifacts { on_success: true } => HelperStageKind::UploadArtifactsOnSuccess,
        Stage::UploadArtifacts { on_success: false } => HelperStageKind::UploadArtifactsOnFailure,
    }
}

fn batch_argv(kinds: &[HelperStageKind]) -> Vec<String> {
    let stages: Vec<Stage> = kinds
        .iter()
        .filter_map(|kind| Stage::ALL.into_iter().find(|s| stage_kind(*s) == *kind))
        .collect();
    Stage::batch_argv(&stages, HELPER_JOB_FILE)
}

/// A feature flag set as a job variable (Go boolean syntax), which wins over the runner's.
fn job_flag(payload: &JobResponse, name: &str) -> Option<bool> {
    payload
        .variables
        .iter()
        .rev()
        .find(|v| v.key == name)
        .and_then(|v| match v.value.to_ascii_lowercase().as_str() {
            "1" | "t" | "true" => Some(true),
            "0" | "f" | "false" => Some(false),
            _ => None,
        })
}

/// Expands `$VAR` in every non-raw value against the list (each name's last definition,
/// unexpanded), as gitlab-runner's `JobVariables.Expand` does.
fn expand_all(variables: Vec<(Variable, bool)>) -> Vec<Variable> {
    let lookup = |name: &str| -> Option<String> {
        if matches!(name, "*" | "#" | "@" | "!" | "?" | "-") {
            return Some(format!("${name}"));
        }
        variables
            .iter()
            .rev()
            .find(|(v, _)| v.key == name)
            .map(|(v, _)| v.value.clone())
    };
    variables
        .iter()
        .map(|(variable, raw)| {
            let mut variable = variable.clone();
            if !raw {
                variable.value = podfleet_executor::script::expand(&variable.value, &lookup);
            }
            variable
        })
        .collect()
}

/// The job's services then the runner's `[[runners.docker.services]]`, within
/// `allowed_services`, `allowed_privileged_services` and `services_limit`. Each gets the
/// job's variables except non-public ones the server sent, then its own.
fn services(
    runner: &RunnerConfig,
    payload: &JobResponse,
    variables: &[Variable],
) -> Result<Vec<ServiceSpec>, String> {
    let docker = &runner.docker;
    let hidden: Vec<&str> = payload
        .variables
        .iter()
        .filter(|v| !v.public)
        .map(|v| v.key.as_str())
        .collect();
    let shared: Vec<Variable> = variables
        .iter()
        .filter(|v| !hidden.contains(&v.key.as_str()))
        .map(|v| Variable {
            file: false,
            ..v.clone()
        })
        .collect();
    let lookup = |name: &str| {
        variables
            .iter()
            .rev()
            .find(|v| v.key == name)
            .map(|v| v.value.clone())
    };
    let mut services = Vec::new();
    for service in &payload.services {
        if service.name.is_empty() {
            continue;
        }
        check_allowed(&service.name, &docker.allowed_services, "allowed_services")?;
        let mut env = shared.clone();
        for variable in &service.variables {
            env.retain(|v| v.key != variable.key);
            env.push(Variable {
                key: variable.key.clone(),
                value: podfleet_executor::script::expand(&variable.value, &lookup),
                file: false,
            });
        }
        services.push(ServiceSpec {
            image: podfleet_executor::script::expand(&service.name, &lookup),
            aliases: service.aliases().into_iter().map(String::from).collect(),
            entrypoint: (!service.entrypoint.is_empty()).then(|| service.entrypoint.clone()),
            command: (!service.command.is_empty()).then(|| service.command.clone()),
            variables: env,
            pull_policy: service.pull_policy.clone(),
            ports: service
                .ports
                .iter()
                .map(|p| p.number)
                .filter(|p| *p > 0)
                .collect(),
        });
    }
    for service in &docker.services {
        let mut env = shared.clone();
        for entry in &service.environment {
            if let Some((key, value)) = entry.split_once('=') {
                env.retain(|v| v.key != key);
                env.push(Variable {
                    key: key.into(),
                    value: value.into(),
                    file: false,
                });
            }
        }
        services.push(ServiceSpec {
            image: service.name.clone(),
            aliases: service
                .alias
                .as_deref()
                .unwrap_or_default()
                .split([',', ' '])
                .filter(|a| !a.is_empty())
                .map(String::from)
                .collect(),
            entrypoint: (!service.entrypoint.is_empty()).then(|| service.entrypoint.clone()),
            command: (!service.command.is_empty()).then(|| service.command.clone()),
            variables: env,
            pull_policy: Vec::new(),
            ports: Vec::new(),
        });
    }
    if docker.services_privileged.unwrap_or(docker.privileged) {
        for service in &services {
            check_allowed(
                &service.image,
                &docker.allowed_privileged_services,
                "allowed_privileged_services",
            )?;
        }
    }
    if let Some(limit) = docker.services_limit.filter(|l| *l >= 0)
        && services.len() > limit as usize
    {
        return Err(format!(
            "the job has {} services but services_limit of this runner is {limit}",
            services.len()
        ));
    }
    Ok(services)
}

/// `DOCKER_AUTH_CONFIG` (job variable, else the runner's `environment`), then the payload's
/// `credentials` of type `registry`: the first match for a registry wins, as in
/// gitlab-runner.
fn registry_credentials(
    runner: &RunnerConfig,
    payload: &JobResponse,
    variables: &[Variable],
) -> Result<Vec<RegistryCredential>, String> {
    let mut credentials = Vec::new();
    let from_job = payload
        .variables
        .iter()
        .rev()
        .find(|v| v.key == "DOCKER_AUTH_CONFIG")
        .map(|v| {
            // A file variable holds the JSON itself in the payload.
            variables
                .iter()
                .find(|x| x.key == v.key && !x.file)
                .map_or(v.value.clone(), |x| x.value.clone())
        });
    let from_runner = runner
        .environment
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("DOCKER_AUTH_CONFIG="))
        .map(String::from);
    for text in [from_job, from_runner].into_iter().flatten() {
        credentials.extend(parse_docker_auth_config(&text)?);
    }
    for entry in &payload.credentials {
        if entry.kind.eq_ignore_ascii_case("registry") {
            credentials.push(RegistryCredential::new(
                &entry.url,
                &entry.username,
                entry.password.expose(),
            ));
        }
    }
    Ok(credentials)
}

/// A job's image must match one of the runner's globs when the list is set (the runner's
/// own default image is always allowed, as in gitlab-runner).
fn check_allowed(image: &str, globs: &[String], key: &str) -> Result<(), String> {
    if globs.is_empty() || globs.iter().any(|glob| glob_matches(glob, image)) {
        return Ok(());
    }
    Err(format!(
        "the {image:?} image is not present on the list of {key} of this runner: {}",
        globs.join(", ")
    ))
}

/// Doublestar globs as gitlab-runner uses them: `**` matches anything, `*` and `?` stop at `/`.
fn glob_matches(glob: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match p {
            [] => t.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=t.len()).any(|i| go(rest, &t[i..])),
            [b'*', rest @ ..] => (0..=t.len())
                .take_while(|&i| i == 0 || t[i - 1] != b'/')
                .any(|i| go(rest, &t[i..])),
            [b'?', rest @ ..] => matches!(t, [c, ..] if *c != b'/') && go(rest, &t[1..]),
            [c, rest @ ..] => matches!(t, [d, ..] if d == c) && go(rest, &t[1..]),
        }
    }
    go(glob.as_bytes(), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_follow_doublestar_rules() {
        assert!(glob_matches(
            "localhost/podfleet/*",
            "localhost/podfleet/busybox:latest"
        ));
        assert!(!glob_matches(
            "localhost/*",
            "localhost/podfleet/busybox:latest"
        ));
        assert!(glob_matches(
            "localhost/**",
            "localhost/podfleet/busybox:latest"
        ));
        assert!(glob_matches("**/ruby:*", "docker.io/library/ruby:3.3"));
        assert!(glob_matches("ruby:3.?", "ruby:3.3") && !glob_matches("ruby:3.?", "ruby:3.10"));
    }

    use podfleet_config::DockerConfig;
    use podfleet_coordinator::model::{
        Credentials, DockerExecutorOptions, ExecutorOptions, Image, JobVariable, Port, Secret, Step,
    };

    fn runner(docker: DockerConfig, environment: &[&str]) -> RunnerConfig {
        RunnerConfig {
            docker,
            environment: environment.iter().map(|e| e.to_string()).collect(),
            ..Default::default()
        }
    }

    fn var(key: &str, value: &str) -> JobVariable {
        JobVariable {
            key: key.into(),
            value: value.into(),
            public: true,
            ..Default::default()
        }
    }

    fn payload(variables: Vec<JobVariable>) -> JobResponse {
        JobResponse {
            id: 42,
            image: Some(Image {
                name: "localhost/podfleet/busybox:latest".into(),
                ..Default::default()
            }),
            steps: vec![
                Step {
                    name: "script".into(),
                    script: vec!["echo hi".into()],
                    timeout: 30,
                    ..Default::default()
                },
                Step {
                    name: "after_script".into(),
                    script: vec!["echo bye".into()],
                    timeout: 12,
                    when: StepWhen::Always,
                    ..Default::default()
                },
            ],
            variables,
            ..Default::default()
        }
    }

    fn value(spec: &JobSpec, key: &str) -> String {
        spec.variables
            .iter()
            .find(|v| v.key == key)
            .unwrap_or_else(|| panic!("{key} missing"))
            .value
            .clone()
    }

    #[test]
    fn non_raw_values_are_expanded_raw_ones_kept() {
        let raw = JobVariable {
            raw: true,
            ..var("RAW", "$A and ${CI_PROJECT_DIR}")
        };
        let spec = job_spec(
            &runner(DockerConfig::default(), &["FROM_RUNNER=runner-$A"]),
            &payload(vec![
                var("A", "alpha"),
                var("B", "$A-${A}-$$-$UNSET-end"),
                var("BIN", "${CI_PROJECT_DIR}/bin"),
                raw,
            ]),
        )
        .unwrap();
        assert_eq!(value(&spec, "B"), "alpha-alpha-$--end");
        assert_eq!(value(&spec, "BIN"), format!("{}/bin", spec.project_dir));
        assert_eq!(value(&spec, "RAW"), "$A and ${CI_PROJECT_DIR}");
        assert_eq!(value(&spec, "FROM_RUNNER"), "runner-alpha");
    }

    #[test]
    fn step_timeouts_and_flags() {
        let spec = job_spec(
            &runner(DockerConfig::default(), &[]),
            &payload(vec![
                var("FF_SCRIPT_SECTIONS", "true"),
                var("FF_ENABLE_JOB_CLEANUP", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(spec.script_timeout, Some(Duration::from_secs(30)));
        assert_eq!(spec.after_script_timeout, Duration::from_secs(12));
        assert!(spec.script_sections && spec.trace_sections && spec.remove_project_dir);
        assert_eq!(
            spec.cache_volume
                .as_deref()
                .map(|v| v.starts_with("podfleet-cache-")),
            Some(true)
        );
        let no_cache = job_spec(
            &runner(
                DockerConfig {
                    disable_cache: true,
                    ..Default::default()
                },
                &[],
            ),
            &payload(Vec::new()),
        )
        .unwrap();
        assert_eq!(no_cache.cache_volume, None);
        assert!(!no_cache.trace_sections && !no_cache.remove_project_dir);
    }

    #[test]
    fn services_get_aliases_public_variables_and_limits() {
        let mut job = payload(vec![
            var("PUBLIC_ONE", "shown"),
            JobVariable {
                public: false,
                masked: true,
                ..var("SECRET_ONE", "hidden-value")
            },
        ]);
        job.services = vec![Image {
            name: "registry.example.com/group/db:16".into(),
            alias: "db, cache".into(),
            command: vec!["serve".into()],
            ports: vec![Port {
                number: 5432,
                ..Default::default()
            }],
            variables: vec![podfleet_coordinator::model::ImageVariable {
                key: "DB_NAME".into(),
                value: "$PUBLIC_ONE-db".into(),
            }],
            ..Default::default()
        }];
        let spec = job_spec(&runner(DockerConfig::default(), &[]), &job).unwrap();
        let service = &spec.services[0];
        assert_eq!(service.aliases, vec!["db", "cache"]);
        assert_eq!(service.ports, vec![5432]);
        assert_eq!(service.command.as_deref(), Some(&["serve".to_string()][..]));
        let env = |key: &str| {
            service
                .variables
                .iter()
                .find(|v| v.key == key)
                .map(|v| v.value.clone())
        };
        assert_eq!(env("PUBLIC_ONE").as_deref(), Some("shown"));
        assert_eq!(env("DB_NAME").as_deref(), Some("shown-db"));
        assert_eq!(
            env("SECRET_ONE"),
            None,
            "non-public variables stay out of services"
        );
        assert_eq!(
            value(&spec, "CI_BUILD_NETWORK_NAME"),
            "podfleet-job-42-network"
        );

        let allowed = DockerConfig {
            allowed_services: vec!["docker.io/**".into()],
            ..Default::default()
        };
        let error = job_spec(&runner(allowed, &[]), &job).unwrap_err();
        assert!(
            error.contains("allowed_services")
                && error.contains("registry.example.com/group/db:16"),
            "{error}"
        );
        let privileged = DockerConfig {
            privileged: true,
            allowed_privileged_services: vec!["docker.io/**".into()],
            ..Default::default()
        };
        let error = job_spec(&runner(privileged, &[]), &job).unwrap_err();
        assert!(error.contains("allowed_privileged_services"), "{error}");
        let unprivileged_services = DockerConfig {
            privileged: true,
            services_privileged: Some(false),
            allowed_privileged_services: vec!["docker.io/**".into()],
            ..Default::default()
        };
        assert!(job_spec(&runner(unprivileged_services, &[]), &job).is_ok());
        let limited = DockerConfig {
            services_limit: Some(0),
            ..Default::default()
        };
        let error = job_spec(&runner(limited, &[]), &job).unwrap_err();
        assert!(error.contains("services_limit"), "{error}");
    }

    #[test]
    fn registry_credentials_in_gitlab_runner_order() {
        let mut job = payload(vec![var(
            "DOCKER_AUTH_CONFIG",
            r#"{"auths": {"registry.example.com": {"username": "from-job", "password": "p1"}}}"#,
        )]);
        job.credentials = vec![Credentials {
            kind: "registry".into(),
            url: "registry.example.com".into(),
            username: "gitlab-ci-token".into(),
            password: Secret::new("job-token"),
        }];
        let spec = job_spec(
            &runner(
                DockerConfig::default(),
                &[r#"DOCKER_AUTH_CONFIG={"auths": {"other.example.com": {"username": "from-runner", "password": "p2"}}}"#],
            ),
            &job,
        )
        .unwrap();
        let users: Vec<(&str, &str)> = spec
            .registry_credentials
            .iter()
            .map(|c| (c.registry.as_str(), c.username.as_str()))
            .collect();
        assert_eq!(
            users,
            vec![
                ("registry.example.com", "from-job"),
                ("other.example.com", "from-runner"),
                ("registry.example.com", "gitlab-ci-token"),
            ]
        );
        job.variables = vec![var("DOCKER_AUTH_CONFIG", "not json")];
        assert!(
            job_spec(&runner(DockerConfig::default(), &[]), &job)
                .unwrap_err()
                .contains("DOCKER_AUTH_CONFIG")
        );
    }

    #[test]
    fn job_user_must_be_allowed() {
        let mut job = payload(Vec::new());
        job.image.as_mut().unwrap().executor_opts = Some(ExecutorOptions {
            docker: Some(DockerExecutorOptions {
                user: "root".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let allowed = DockerConfig {
            allowed_users: vec!["1000".into()],
            ..Default::default()
        };
        let error = job_spec(&runner(allowed, &[]), &job).unwrap_err();
        assert!(
            error.contains("\"root\"") && error.contains("allowed_users") && error.contains("1000"),
            "{error}"
        );
        let spec = job_spec(&runner(DockerConfig::default(), &[]), &job).unwrap();
        assert_eq!(spec.user.as_deref(), Some("root"));
    }

    #[test]
    fn helper_stages_with_work_and_their_image() {
        let mut job = payload(Vec::new());
        job.token = Secret::new("job-token-secret");
        job.git_info.repo_url =
            Secret::new("http://gitlab-ci-token:job-token-secret@127.0.0.1:1/g/p.git");
        job.git_info.sha = "a".repeat(40);
        job.git_info.git_ref = "main".into();
        job.git_info.ref_type = "branch".into();
        job.artifacts = vec![podfleet_coordinator::model::Artifact {
            paths: vec!["out/".into()],
            when: "on_success".into(),
            ..Default::default()
        }];
        let spec = job_spec(&runner(DockerConfig::default(), &[]), &job).unwrap();
        let plan = spec.helper.expect("a helper plan");
        let kinds: Vec<HelperStageKind> = plan.stages.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            vec![
                HelperStageKind::GetSources,
                HelperStageKind::UploadArtifactsOnSuccess
            ]
        );
        assert_eq!(
            plan.stages[0].argv.last().map(String::as_str),
            Some(HELPER_JOB_FILE)
        );
        assert!(plan.archive.is_some() && plan.image.starts_with("localhost/podfleet-helper:"));
        assert!(
            !format!("{plan:?}").contains("job-token-secret"),
            "token in Debug"
        );
        let own = DockerConfig {
            helper_image: Some("registry.example.com/helper:1".into()),
            ..Default::default()
        };
        let plan = job_spec(&runner(own, &[]), &job).unwrap().helper.unwrap();
        assert_eq!(plan.image, "registry.example.com/helper:1");
        assert!(plan.archive.is_none());
        // A file:// repository (the local coordinator's plain directory) is not fetched.
        job.git_info.repo_url = Secret::new("file:///srv/project");
        job.artifacts.clear();
        assert!(
            job_spec(&runner(DockerConfig::default(), &[]), &job)
                .unwrap()
                .helper
                .is_none()
        );
    }

    #[test]
    fn disallowed_images_fail_the_job_with_the_list() {
        let allowed = vec!["localhost/podfleet/*".to_string()];
        assert!(
            check_allowed(
                "localhost/podfleet/busybox:latest",
                &allowed,
                "allowed_images"
            )
            .is_ok()
        );
        let error = check_allowed("docker.io/evil:1", &allowed, "allowed_images").unwrap_err();
        assert!(
            error.contains("docker.io/evil:1") && error.contains("localhost/podfleet/*"),
            "{error}"
        );
        assert!(check_allowed("anything", &[], "allowed_images").is_ok());
    }
}
