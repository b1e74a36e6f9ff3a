//! The coordinator's job payload turned into what the executor runs: image (within the
//! runner's allowed lists), steps, variables the runner itself sets, timeouts.

use std::time::Duration;

use podfleet_config::RunnerConfig;
use podfleet_coordinator::model::{JobResponse, StepWhen};
use podfleet_executor::{JobSpec, Variable};

const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(7200);

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
    let mut script = Vec::new();
    let mut after_script = Vec::new();
    for step in &payload.steps {
        match (step.name.as_str(), step.when) {
            ("after_script", _) => after_script.extend(step.script.iter().cloned()),
            (_, StepWhen::OnSuccess) => script.extend(step.script.iter().cloned()),
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
    let mut variables: Vec<Variable> = Vec::new();
    let mut set = |key: &str, value: &str, file: bool| {
        variables.retain(|v| v.key != key);
        variables.push(Variable {
            key: key.into(),
            value: value.into(),
            file,
        });
    };
    set("CI_RUNNER_SHORT_TOKEN", &runner.short_token(), false);
    for entry in &runner.environment {
        if let Some((key, value)) = entry.split_once('=') {
            set(key, value, false);
        }
    }
    set("CI_BUILDS_DIR", &builds_dir, false);
    set("CI_PROJECT_DIR", &project_dir, false);
    set("CI_SERVER", "yes", false);
    set("CI_JOB_STATUS", "running", false);
    set("CI_JOB_TIMEOUT", &timeout.as_secs().to_string(), false);
    set("CI_JOB_IMAGE", &image, false);
    for variable in &payload.variables {
        set(&variable.key, &variable.value, variable.file);
    }
    set("CI_DISPOSABLE_ENVIRONMENT", "true", false);
    set("CI_RUNNER_VERSION", env!("CARGO_PKG_VERSION"), false);
    set(
        "CI_RUNNER_EXECUTABLE_ARCH",
        &format!("linux/{}", std::env::consts::ARCH),
        false,
    );
    let network_per_build = runner.feature_flag("FF_NETWORK_PER_BUILD");
    if network_per_build {
        set(
            "CI_BUILD_NETWORK_NAME",
            &format!("podfleet-job-{}-network", payload.id),
            false,
        );
    }
    Ok(JobSpec {
        job_id: payload.id,
        image,
        entrypoint: payload
            .image
            .as_ref()
            .map(|i| i.entrypoint.clone())
            .filter(|e| !e.is_empty()),
        project_dir,
        variables,
        script,
        after_script,
        network_per_build,
        timeout,
        shell: runner.shell.clone().unwrap_or_else(|| "sh".into()),
    })
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
