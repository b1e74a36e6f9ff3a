//! `podfleet pipeline` end to end on a real `.gitlab-ci.yml` (tests/pipelines/e2e.gitlab-ci.yml)
//! in a git repository with an uncommitted file: the local provider, rootless Podman, the
//! helper's clone of the working tree's snapshot. Needs the host prepared by
//! `scripts/setup-host.sh` and root, like `e2e.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

const MASKED: &str = "s3cr3t-value-never-shown";

fn git(dir: &Path, arguments: &[&str]) {
    let status = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@localhost"])
        .args(arguments)
        .status()
        .expect("git is installed");
    assert!(status.success(), "git {arguments:?}");
}

/// A git repository on branch main with `pipeline` committed as .gitlab-ci.yml, an
/// uncommitted file and an ignored one.
fn repository(project: &Path, pipeline: &str) {
    std::fs::create_dir_all(project).expect("project dir");
    git(project, &["init", "-q", "-b", "main"]);
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/pipelines")
            .join(pipeline),
        project.join(".gitlab-ci.yml"),
    )
    .expect("copy pipeline");
    std::fs::write(project.join(".gitignore"), "ignored.txt\n").expect("write");
    git(project, &["add", "."]);
    git(project, &["commit", "-q", "-m", "pipeline"]);
    std::fs::write(project.join("uncommitted.txt"), "uncommitted content\n").expect("write");
    std::fs::write(project.join("ignored.txt"), "ignored\n").expect("write");
}

fn config_in(dir: &Path, group: &str) -> PathBuf {
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/e2e-config.toml");
    let text = std::fs::read_to_string(template)
        .expect("e2e config")
        .replace("@STATE_DIR@", &dir.join("state").display().to_string())
        .replace("@GROUP@", group);
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn a_real_pipeline_runs_with_rules_needs_variables_and_the_working_tree() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let project = dir.path().join("project");
    repository(&project, "e2e.gitlab-ci.yml");

    let config = config_in(dir.path(), "e2ep");
    let report_path = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_podfleet"))
        .args(["pipeline", "--file"])
        .arg(project.join(".gitlab-ci.yml"))
        .arg("--config")
        .arg(&config)
        .arg("--report")
        .arg(&report_path)
        .args(["--var", "EXTRA=from-the-command-line"])
        .arg("--masked-var")
        .arg(format!("SECRET_TOKEN={MASKED}"))
        .output()
        .expect("podfleet runs");
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report_text = std::fs::read_to_string(&report_path).unwrap_or_default();
    assert!(!all.contains(MASKED), "masked value in the output:\n{all}");
    assert!(!report_text.contains(MASKED), "masked value in the report");
    assert_eq!(output.status.code(), Some(0), "{all}");
    assert!(all.contains("token is [MASKED]"), "{all}");
    assert!(all.contains("hello from main"), "{all}");
    assert!(all.contains("extra is from-the-command-line"), "{all}");
    assert!(!all.contains("manual ran"), "{all}");

    let report: serde_json::Value = serde_json::from_str(&report_text).expect("JSON report");
    let job = |name: &str| {
        report["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .find(|job| job["name"] == name)
            .cloned()
    };
    assert_eq!(report["status"], "success");
    let flaky = job("flaky").expect("flaky");
    assert_eq!(
        (flaky["status"].as_str(), flaky["allowed_failure"].as_bool()),
        (Some("failed"), Some(true))
    );
    assert_eq!(flaky["exit_code"], 3);
    assert_eq!(job("manual").expect("manual")["status"], "manual");
    assert_eq!(job("after").expect("after")["status"], "success");
    assert!(job("only-elsewhere").is_none(), "rules leave it out");
}

#[test]
fn bad_pipelines_exit_2_with_file_line_and_keyword() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let file = dir.path().join(".gitlab-ci.yml");
    std::fs::write(
        &file,
        "build:\n  script: make\n  needs: [missing]\n  artifact:\n    paths: [x]\n",
    )
    .expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_podfleet"))
        .args(["pipeline", "--list", "--file"])
        .arg(&file)
        .output()
        .expect("podfleet runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let shown = file.display().to_string();
    assert!(
        stderr.contains(&format!(
            "{shown}:4: job \"build\": unknown keyword \"artifact\""
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{shown}:3: job \"build\": needs \"missing\"")),
        "{stderr}"
    );
}

#[test]
fn list_shows_rules_outcomes_without_running_anything() {
    let output = Command::new(env!("CARGO_BIN_EXE_podfleet"))
        .args(["pipeline", "--list", "--file"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines/e2e.gitlab-ci.yml"))
        .args(["--var", "CI_COMMIT_BRANCH=elsewhere"])
        .output()
        .expect("podfleet runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let line = |name: &str| {
        stdout
            .lines()
            .find(|line| line.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from\n{stdout}"))
            .to_owned()
    };
    assert!(
        line("only-elsewhere").contains("rule 1 (if $CI_COMMIT_BRANCH == \"elsewhere\") matches"),
        "{stdout}"
    );
    assert!(line("manual").contains("manual*"), "{stdout}");
    assert!(line("after").contains(" build "), "{stdout}");
}

#[test]
fn the_working_tree_reaches_the_job_and_artifacts_the_next_one() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let project = dir.path().join("project");
    repository(&project, "sources.gitlab-ci.yml");
    let output = Command::new(env!("CARGO_BIN_EXE_podfleet"))
        .args(["pipeline", "--file"])
        .arg(project.join(".gitlab-ci.yml"))
        .arg("--config")
        .arg(config_in(dir.path(), "e2eq"))
        .arg("--artifacts-dir")
        .arg(dir.path().join("artifacts"))
        .output()
        .expect("podfleet runs");
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(0), "{all}");
    assert!(all.contains("show | uncommitted content"), "{all}");
    assert!(all.contains("show | ignored file absent"), "{all}");
    // The artifact went up from the first job's instance and down into the second job.
    assert!(all.contains("use | made by show"), "{all}");
    let exported: Vec<_> = std::fs::read_dir(dir.path().join("artifacts"))
        .expect("--artifacts-dir written")
        .map(|entry| entry.unwrap().path())
        .collect();
    assert!(!exported.is_empty(), "no artifacts exported");
}
