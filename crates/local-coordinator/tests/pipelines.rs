//! Every supported keyword has a pipeline under `tests/pipelines/` and the job graph it must
//! give (`<name>.expected`): jobs in order with what the parser decided, jobs left out and
//! why, then the statuses after running it against a scripted runner over the runner API (a
//! script line `exit N` fails the job with exit code N; everything else succeeds).
//! Files under `tests/pipelines/errors/` must be refused, naming file:line and the keyword.
//!
//! The project is fixed (branch `main`, a known file list and changed files), so rules
//! decide the same everywhere. `UPDATE_EXPECT=1 cargo test` rewrites the expected files;
//! review the diff.

mod support;

use support::client;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use podfleet_coordinator::model::{
    FailureReason, JobResponse, JobState, RunnerInfo, UpdateJobRequest,
};
use podfleet_coordinator::{JobOutcome, JobTrace, JobTraceOptions};
use podfleet_local_coordinator::pipeline::{JobSpec, Pipeline, Variable};
use podfleet_local_coordinator::project::GitState;
use podfleet_local_coordinator::{
    LocalCoordinator, LocalCoordinatorOptions, PipelineReport, Project, RunnerRegistration,
    parse_pipeline_with,
};

const RUNNER_TOKEN: &str = "glrt-pipelines-test";

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines")
}

/// The fixed project every case is read against.
fn project() -> Project {
    Project {
        dir: data_dir(),
        name: "demo".to_owned(),
        path: "local/demo".to_owned(),
        git: Some(GitState {
            sha: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            branch: Some("main".to_owned()),
            ref_name: "main".to_owned(),
            message: "Add the parser\n\nWith a body.".to_owned(),
            default_branch: "main".to_owned(),
            changes_base: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            changed_files: vec!["src/lib.rs".to_owned(), "docs/guide.md".to_owned()],
        }),
        files: [
            "README.md",
            "Cargo.toml",
            "Dockerfile",
            "src/lib.rs",
            "src/main.rs",
            "docs/guide.md",
            "include/build.yml",
            "include/nested.yml",
            "include/extra/lint.yml",
        ]
        .iter()
        .map(|file| file.to_string())
        .collect(),
    }
}

fn cases(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("test data directory")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.to_string_lossy().ends_with(".gitlab-ci.yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no pipelines in {}", dir.display());
    files
}

fn variables_text(variables: &[Variable]) -> String {
    variables
        .iter()
        .map(|variable| {
            let flag = if variable.raw { "(raw)" } else { "" };
            format!("{}={}{flag}", variable.key, variable.value)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn render_job(out: &mut String, job: &JobSpec) {
    let mut line = format!(
        "job {:?} stage={} when={}",
        job.name,
        job.stage,
        job.when.as_str()
    );
    if let Some(seconds) = job.start_in {
        write!(line, " start_in={seconds}s").unwrap();
    }
    if job.allow_failure.allowed || !job.allow_failure.exit_codes.is_empty() {
        write!(line, " allow_failure").unwrap();
        if !job.allow_failure.exit_codes.is_empty() {
            write!(line, "={:?}", job.allow_failure.exit_codes).unwrap();
        }
    }
    match &job.needs {
        None => {}
        Some(needs) => {
            let needs: Vec<String> = needs
                .iter()
                .map(|need| {
                    let mut text = need.job.clone();
                    if !need.artifacts {
                        text.push_str("(no artifacts)");
                    }
                    if need.optional {
                        text.push_str("(optional)");
                    }
                    text
                })
                .collect();
            write!(line, " needs=[{}]", needs.join(", ")).unwrap();
        }
    }
    if let Some(dependencies) = &job.dependencies {
        write!(line, " dependencies=[{}]", dependencies.join(", ")).unwrap();
    }
    if job.retry.max > 0 {
        write!(line, " retry={}", job.retry.max).unwrap();
        if !job.retry.when.is_empty() {
            write!(line, " when={}", job.retry.when.join(",")).unwrap();
        }
        if !job.retry.exit_codes.is_empty() {
            write!(line, " exit_codes={:?}", job.retry.exit_codes).unwrap();
        }
    }
    if let Some(timeout) = job.timeout {
        write!(line, " timeout={timeout}s").unwrap();
    }
    if let Some((index, total)) = job.node {
        write!(line, " node={index}/{total}").unwrap();
    }
    if job.interruptible {
        write!(line, " interruptible").unwrap();
    }
    if let Some(inherited) = &job.inherited_variables {
        write!(line, " global_variables=[{}]", inherited.join(", ")).unwrap();
    }
    if let Some(group) = &job.resource_group {
        write!(line, " resource_group={group}").unwrap();
    }
    if !job.tags.is_empty() {
        write!(line, " tags=[{}]", job.tags.join(", ")).unwrap();
    }
    writeln!(out, "{line} | {}", job.reason).unwrap();
    if let Some(image) = &job.image {
        write!(out, "  image: {}", image.name).unwrap();
        if !image.entrypoint.is_empty() {
            write!(out, " entrypoint={:?}", image.entrypoint).unwrap();
        }
        if !image.pull_policy.is_empty() {
            write!(out, " pull_policy={:?}", image.pull_policy).unwrap();
        }
        writeln!(out).unwrap();
    }
    for service in &job.services {
        write!(out, "  service: {}", service.name).unwrap();
        if !service.alias.is_empty() {
            write!(out, " alias={}", service.alias).unwrap();
        }
        if !service.command.is_empty() {
            write!(out, " command={:?}", service.command).unwrap();
        }
        if !service.entrypoint.is_empty() {
            write!(out, " entrypoint={:?}", service.entrypoint).unwrap();
        }
        for variable in &service.variables {
            write!(out, " {}={}", variable.key, variable.value).unwrap();
        }
        writeln!(out).unwrap();
    }
    if !job.before_script.is_empty() {
        writeln!(out, "  before_script: {}", job.before_script.join(" ; ")).unwrap();
    }
    writeln!(out, "  script: {}", job.script.join(" ; ")).unwrap();
    if !job.after_script.is_empty() {
        writeln!(out, "  after_script: {}", job.after_script.join(" ; ")).unwrap();
    }
    if !job.variables.is_empty() {
        writeln!(out, "  variables: {}", variables_text(&job.variables)).unwrap();
    }
    for artifact in &job.artifacts {
        writeln!(
            out,
            "  artifacts: type={} paths={:?} exclude={:?} when={} expire_in={:?} name={:?}",
            artifact.artifact_type,
            artifact.paths,
            artifact.exclude,
            artifact.when,
            artifact.expire_in,
            artifact.name
        )
        .unwrap();
    }
    for cache in &job.cache {
        writeln!(
            out,
            "  cache: key={} paths={:?} policy={} when={} untracked={} fallback={:?}",
            cache.key, cache.paths, cache.policy, cache.when, cache.untracked, cache.fallback_keys
        )
        .unwrap();
    }
    if let Some(environment) = &job.environment {
        writeln!(
            out,
            "  environment: {} {:?}",
            environment.name, environment.url
        )
        .unwrap();
    }
}

fn render(pipeline: &Pipeline) -> String {
    let mut out = String::new();
    writeln!(out, "stages: {}", pipeline.stages.join(", ")).unwrap();
    if let Some(name) = &pipeline.name {
        writeln!(out, "name: {name}").unwrap();
    }
    if let Some(reason) = &pipeline.filtered_out {
        writeln!(out, "filtered out: {reason}").unwrap();
    }
    if !pipeline.variables.is_empty() {
        writeln!(out, "variables: {}", variables_text(&pipeline.variables)).unwrap();
    }
    for job in &pipeline.jobs {
        render_job(&mut out, job);
    }
    for job in &pipeline.excluded {
        writeln!(
            out,
            "excluded {:?} stage={} | {}",
            job.name, job.stage, job.reason
        )
        .unwrap();
    }
    out
}

/// The exit code a scripted job ends with: the first `exit N` line of its script steps.
fn scripted_exit(job: &JobResponse) -> i32 {
    job.steps
        .iter()
        .filter(|step| step.name == "script")
        .flat_map(|step| &step.script)
        .find_map(|line| {
            line.trim()
                .strip_prefix("exit ")
                .and_then(|code| code.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the pipeline with a runner that takes every job and fakes its outcome.
async fn run(pipeline: Pipeline, run_manual: bool) -> PipelineReport {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let project = tempfile::tempdir().expect("temp dir");
    let mut options = LocalCoordinatorOptions::new(project.path());
    options.run_manual = run_manual;
    let handle = LocalCoordinator::start(
        listener,
        pipeline,
        vec![RunnerRegistration {
            token: RUNNER_TOKEN.to_owned(),
            description: "scripted".to_owned(),
            tags: ["podman", "pinp", "docker", "linux"]
                .iter()
                .map(|tag| tag.to_string())
                .collect(),
            run_untagged: true,
        }],
        options,
    )
    .await
    .expect("coordinator starts");
    let client = client(&handle.url);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last_update = None;
    loop {
        let snapshot = handle.snapshot();
        if snapshot.status != podfleet_local_coordinator::PipelineStatus::Running {
            return snapshot;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pipeline did not finish: {snapshot:?}"
        );
        let Some(job) = client
            .request_job(RUNNER_TOKEN, &mut last_update)
            .await
            .expect("request")
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let token = job.token.expose();
        client
            .update_job(
                job.id,
                token,
                &UpdateJobRequest::new(RunnerInfo::default(), token, JobState::Running),
            )
            .await
            .expect("acknowledge");
        let trace = JobTrace::start(
            client.clone(),
            job.id,
            token,
            JobTraceOptions::for_job(&job),
        );
        trace.write(format!("running {}\n", job.job_info.name).as_bytes());
        let outcome = match scripted_exit(&job) {
            0 => JobOutcome::Success,
            code => JobOutcome::Failed {
                reason: FailureReason::ScriptFailure,
                exit_code: Some(code),
            },
        };
        trace.finish(outcome).await.expect("final update accepted");
    }
}

fn statuses(report: &PipelineReport) -> String {
    let mut out = format!("pipeline: {:?}\n", report.status);
    for job in &report.jobs {
        let mut line = format!("  {:?}: {}", job.name, job.status.as_str());
        if job.allowed_failure {
            line.push_str(" (allowed)");
        }
        if job.retries > 0 {
            write!(line, " retries={}", job.retries).unwrap();
        }
        if let Some(reason) = &job.skip_reason {
            write!(line, " because {reason}").unwrap();
        }
        writeln!(out, "{line}").unwrap();
    }
    out
}

fn check(path: &Path, actual: &str) {
    let expected_path = path.with_extension("").with_extension("expected");
    let expected_path = PathBuf::from(
        expected_path
            .to_string_lossy()
            .replace(".gitlab-ci.expected", ".expected"),
    );
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::write(&expected_path, actual).expect("write expected file");
        return;
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|error| {
        panic!(
            "{}: {error} (run with UPDATE_EXPECT=1)",
            expected_path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} differs from {}",
        path.display(),
        expected_path.display()
    );
}

fn relative(path: &Path) -> String {
    path.strip_prefix(data_dir())
        .expect("under the data dir")
        .display()
        .to_string()
}

#[tokio::test]
async fn every_keyword_gives_the_expected_graph_and_statuses() {
    let project = project();
    for path in cases(&data_dir()) {
        let text = std::fs::read_to_string(&path).expect("pipeline file");
        let pipeline = parse_pipeline_with(&text, &relative(&path), &project, &[])
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let mut actual = render(&pipeline);
        if pipeline.filtered_out.is_none() && !pipeline.jobs.is_empty() {
            let run_manual = text.lines().next() == Some("# run with --manual");
            let report = run(pipeline, run_manual).await;
            actual.push_str(&statuses(&report));
        }
        check(&path, &actual);
    }
}

#[test]
fn bad_pipelines_are_refused_with_file_line_and_keyword() {
    let project = project();
    for path in cases(&data_dir().join("errors")) {
        let text = std::fs::read_to_string(&path).expect("pipeline file");
        let error = parse_pipeline_with(&text, &relative(&path), &project, &[])
            .map(|pipeline| panic!("{} parsed: {pipeline:?}", path.display()))
            .unwrap_err();
        let rendered = format!("{error}\n");
        // Every problem says where it is.
        for problem in error.problems() {
            assert!(
                problem.line.is_some(),
                "{}: no line for {problem}",
                path.display()
            );
        }
        check(&path, &rendered);
    }
}
