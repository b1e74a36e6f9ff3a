//! Recorded GitLab payloads decode into the wire model, and what we send has GitLab's shape.

use std::path::PathBuf;

use podfleet_coordinator::model::{
    FeaturesInfo, JobResponse, RunnerInfo, StepWhen, VerifyResponse, error_message,
};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn read(name: &str) -> String {
    let path = data_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The keys of a flat JSON object, in the order they appear in the text.
fn keys_in_order(json: &str) -> Vec<String> {
    json.trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .split(',')
        .map(|pair| {
            pair.split(':')
                .next()
                .expect("a key")
                .trim()
                .trim_matches('"')
                .to_owned()
        })
        .collect()
}

#[test]
fn every_fixture_decodes_into_the_model() {
    let mut checked = 0;
    for entry in std::fs::read_dir(data_dir()).expect("tests/data exists") {
        let path = entry.expect("directory entry").path();
        let name = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        if !name.ends_with(".json") {
            continue;
        }
        let text = read(&name);
        if name.starts_with("features_info.") {
            serde_json::from_str::<FeaturesInfo>(&text).expect(&name);
        } else if name.starts_with("job_request_response.") {
            serde_json::from_str::<JobResponse>(&text).expect(&name);
        } else if name.starts_with("runners_") {
            serde_json::from_str::<VerifyResponse>(&text).expect(&name);
        } else if name.starts_with("error_") {
            assert!(error_message(text.as_bytes()).is_some(), "{name}");
        } else {
            panic!("{name}: no decoder for this fixture; add one to this test");
        }
        checked += 1;
    }
    assert_eq!(checked, 9, "every fixture in tests/data is checked");
}

#[test]
fn gitlab_runner_job_payload_fields() {
    let job: JobResponse = serde_json::from_str(&read(
        "job_request_response.gitlab_runner_network_test.rendered_valid.json",
    ))
    .expect("decodes");
    assert_eq!(job.id, 10);
    assert_eq!(job.token.expose(), "job-token");
    assert!(!job.allow_git_fetch);
    assert_eq!(job.job_info.name, "test-job");
    assert_eq!(job.job_info.project_id, 123);
    assert_eq!(job.git_info.git_ref, "main");
    assert_eq!(job.git_info.sha, "abcdef123456");
    assert_eq!(job.git_info.ref_type, "branch");
    assert_eq!(job.runner_info.timeout, 3600);

    let variable = &job.variables[0];
    assert_eq!(
        (variable.key.as_str(), variable.value.as_str()),
        ("CI_REF_NAME", "main")
    );
    assert!(variable.public && variable.file && variable.raw && !variable.masked);

    assert_eq!(job.steps.len(), 2);
    assert_eq!(job.steps[0].name, "script");
    assert_eq!(job.steps[0].script, ["date", "ls -ls"]);
    assert_eq!(job.steps[0].when, StepWhen::OnSuccess);
    assert!(!job.steps[0].allow_failure);
    assert_eq!(job.steps[1].when, StepWhen::Always);
    assert!(job.steps[1].allow_failure);

    let image = job.image.as_ref().expect("image");
    assert_eq!(image.name, "ruby:3.3");
    assert_eq!(image.entrypoint, ["/bin/sh"]);
    let docker = image
        .executor_opts
        .as_ref()
        .and_then(|opts| opts.docker.as_ref())
        .expect("docker opts");
    assert_eq!(docker.platform, "arm64/v8");
    assert!(docker.unsupported.is_empty());

    assert_eq!(job.services.len(), 2);
    assert_eq!(job.services[0].command, ["sleep", "30"]);
    assert_eq!(job.services[0].aliases(), ["db-pg"]);

    assert_eq!(job.artifacts[0].paths, ["out/*"]);
    assert_eq!(job.artifacts[0].untracked, Some(false));
    assert_eq!(job.cache[0].policy, "push");
    assert_eq!(job.credentials[0].kind, "Registry");
    assert_eq!(job.credentials[0].password.expose(), "job-token");
    let dependency = &job.dependencies[0];
    assert_eq!(dependency.id, 9);
    assert_eq!(
        dependency
            .artifacts_file
            .as_ref()
            .map(|file| (file.filename.as_str(), file.size)),
        Some(("binaries.zip", 13_631_488))
    );
}

#[test]
fn nulls_and_unknown_fields_decode_leniently() {
    let job: JobResponse =
        serde_json::from_str(&read("job_request_response.nulls.json")).expect("decodes");
    assert!(!job.allow_git_fetch);
    assert_eq!(job.git_info.before_sha, "");
    assert_eq!(job.git_info.depth, 20);
    assert_eq!(job.git_info.protected, Some(false));
    assert_eq!(job.variables[1].value, "");
    assert!(job.variables[0].masked);
    assert!(job.steps[1].script.is_empty());
    assert_eq!(job.steps[1].when, StepWhen::Unknown);
    assert!(job.hooks.is_empty() && job.artifacts.is_empty());
    let docker = job
        .image
        .as_ref()
        .and_then(|image| image.executor_opts.as_ref())
        .and_then(|opts| opts.docker.as_ref())
        .expect("docker opts");
    assert_eq!(docker.user, "1000");
    assert!(
        docker.unsupported.contains_key("gpus"),
        "unknown executor_opts are kept"
    );
    assert_eq!(job.services[0].aliases(), ["db", "pg"]);
    assert!(job.services[0].variables.is_empty());
    assert!(job.dependencies[0].artifacts_file.is_none());
    assert_eq!(
        job.features.failure_reasons,
        ["unknown_failure", "script_failure"]
    );
    assert!(job.features.trace_sections);
}

#[test]
fn verify_and_registration_answers_decode() {
    let verify: VerifyResponse =
        serde_json::from_str(&read("runners_verify_response.gitlab_api_docs.json"))
            .expect("decodes");
    assert_eq!(verify.id, 12345);
    assert_eq!(verify.token.expose(), "glrt-6337ff461c94fd3fa32ba3b1ff4125");
    assert_eq!(
        verify.token_expires_at.map(|at| at.to_rfc3339()),
        Some("2021-09-27T21:05:03.203+00:00".to_owned())
    );
    let reset: VerifyResponse = serde_json::from_str(&read(
        "runners_reset_authentication_token_response.gitlab_api_docs.json",
    ))
    .expect("decodes");
    assert_eq!(reset.id, 0);
    assert_eq!(reset.token.expose(), "6337ff461c94fd3fa32ba3b1ff4125");
}

#[test]
fn features_round_trip_byte_for_byte() {
    for name in [
        "features_info.all_disabled.json",
        "features_info.all_enabled.json",
        "features_info.some_enabled.json",
    ] {
        let text = read(name);
        let features: FeaturesInfo = serde_json::from_str(&text).expect(name);
        let encoded = serde_json::to_string(&features).expect("encodes");
        assert_eq!(encoded, text.trim(), "{name}");
    }
}

#[test]
fn our_features_use_gitlab_runners_key_order_and_advertise_what_we_implement() {
    let ours = serde_json::to_string(&FeaturesInfo::podfleet()).expect("encodes");
    assert_eq!(
        keys_in_order(&ours),
        keys_in_order(&read("features_info.all_enabled.json"))
    );
    let value: serde_json::Value = serde_json::from_str(&ours).expect("json");
    let enabled: Vec<&str> = value
        .as_object()
        .expect("object")
        .iter()
        .filter(|(_, on)| on.as_bool() == Some(true))
        .map(|(key, _)| key.as_str())
        .collect();
    let mut expected = vec![
        "variables",
        "image",
        "services",
        "masking",
        "raw_variables",
        "trace_reset",
        "trace_checksum",
        "trace_size",
        "cancelable",
        "return_exit_code",
        "two_phase_job_commit",
    ];
    expected.sort_unstable();
    assert_eq!(enabled, expected);
}

#[test]
fn info_block_has_gitlab_runners_shape() {
    let mut info = RunnerInfo::podfleet("docker-autoscaler", "bash");
    let value = serde_json::to_value(&info).expect("encodes");
    assert_eq!(value["executor"], "docker-autoscaler");
    assert_eq!(value["shell"], "bash");
    assert_eq!(value["config"], serde_json::json!({"gpus": ""}));
    assert!(value.get("labels").is_none(), "empty labels are omitted");
    info.shell.clear();
    let value = serde_json::to_value(&info).expect("encodes");
    assert!(value.get("shell").is_none(), "empty shell is omitted");
}
