//! get_sources against real repositories served by `git http-backend` on 127.0.0.1 that
//! demand the job token.

mod common;

use common::{Repositories, TOKEN, payload, serve_git, variable};
use podfleet_helper::{HelperJob, Stage, cli::run_stage};

async fn get_sources(job: &HelperJob) -> (Result<(), String>, String) {
    let mut log = Vec::new();
    let result = run_stage(Stage::GetSources, job, &mut log).await;
    (result, String::from_utf8_lossy(&log).into_owned())
}

fn job_for(
    payload: &podfleet_coordinator::model::JobResponse,
    project_dir: &std::path::Path,
) -> HelperJob {
    HelperJob::from_payload(
        payload,
        project_dir.to_str().unwrap(),
        "http://127.0.0.1:1/",
        None,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_with_the_job_token_checks_out_the_sha_and_keeps_the_token_out() {
    let repos = Repositories::new();
    let first = repos.head();
    let second = repos.commit("second.txt", "two\n");
    let addr = serve_git(repos.root.path().to_owned()).await;
    let build = tempfile::tempdir().unwrap();
    let project_dir = build.path().join("group/project");

    // The job is for the first commit, though main has moved on.
    let job = job_for(&payload(&addr.to_string(), &first), &project_dir);
    let (result, log) = get_sources(&job).await;
    result.unwrap_or_else(|error| panic!("{error}\n{log}"));
    assert!(project_dir.join("README").exists());
    assert!(!project_dir.join("second.txt").exists());
    assert_eq!(common::git(&project_dir, &["rev-parse", "HEAD"]), first);
    assert!(
        log.contains(&format!("Checking out {} as detached HEAD", &first[..8])),
        "{log}"
    );
    assert!(!log.contains(TOKEN), "{log}");
    let config = std::fs::read_to_string(project_dir.join(".git/config")).unwrap();
    assert!(!config.contains(TOKEN), "{config}");

    // fetch reuses the repository and moves to the new sha; clean flags remove strays.
    std::fs::write(project_dir.join("stray.o"), "x").unwrap();
    let mut fetch = payload(&addr.to_string(), &second);
    fetch.variables.push(variable("GIT_STRATEGY", "fetch"));
    let (result, log) = get_sources(&job_for(&fetch, &project_dir)).await;
    result.unwrap_or_else(|error| panic!("{error}\n{log}"));
    assert!(
        log.contains("Reinitialized existing Git repository"),
        "{log}"
    );
    assert!(project_dir.join("second.txt").exists());
    assert!(!project_dir.join("stray.o").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_fails_clearly_without_showing_it() {
    let repos = Repositories::new();
    let addr = serve_git(repos.root.path().to_owned()).await;
    let build = tempfile::tempdir().unwrap();
    let mut payload = payload(&addr.to_string(), &repos.head());
    let wrong = "glcbt-wrong-token-VALUE";
    payload.git_info.repo_url = podfleet_coordinator::model::Secret::new(format!(
        "http://gitlab-ci-token:{wrong}@{addr}/group/project.git"
    ));
    let job = job_for(&payload, &build.path().join("p"));
    let (result, log) = get_sources(&job).await;
    let error = result.unwrap_err();
    assert!(error.contains("git") && error.contains("fetch"), "{error}");
    assert!(
        error.contains("Authentication failed") || log.contains("Authentication failed"),
        "{error}\n{log}"
    );
    assert!(
        !error.contains(wrong) && !log.contains(wrong),
        "{error}\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_submodules_and_the_other_strategies() {
    let repos = Repositories::new();
    repos.commit("b.txt", "b\n");
    let sha = repos.add_submodule();
    let addr = serve_git(repos.root.path().to_owned()).await;
    let build = tempfile::tempdir().unwrap();
    let project_dir = build.path().join("group/project");

    let mut shallow = payload(&addr.to_string(), &sha);
    shallow.variables = vec![
        variable("GIT_DEPTH", "1"),
        variable("GIT_SUBMODULE_STRATEGY", "recursive"),
    ];
    let (result, log) = get_sources(&job_for(&shallow, &project_dir)).await;
    result.unwrap_or_else(|error| panic!("{error}\n{log}"));
    assert!(
        log.contains("Fetching changes with git depth set to 1..."),
        "{log}"
    );
    assert_eq!(
        common::git(&project_dir, &["rev-list", "--count", "HEAD"]),
        "1"
    );
    assert_eq!(
        std::fs::read_to_string(project_dir.join("sub/sub.txt")).unwrap(),
        "from the submodule\n"
    );
    assert!(!log.contains(TOKEN), "{log}");

    // GIT_CHECKOUT=false fetches but leaves the work tree alone.
    let mut no_checkout = payload(&addr.to_string(), &sha);
    no_checkout.variables = vec![variable("GIT_CHECKOUT", "false")];
    let other = build.path().join("other");
    let (result, log) = get_sources(&job_for(&no_checkout, &other)).await;
    result.unwrap_or_else(|error| panic!("{error}\n{log}"));
    assert!(
        other.join(".git").is_dir() && !other.join("README").exists(),
        "{log}"
    );

    // empty leaves an empty directory; none leaves it as it is.
    let mut empty = payload(&addr.to_string(), &sha);
    empty.variables = vec![variable("GIT_STRATEGY", "empty")];
    let job = job_for(&empty, &project_dir);
    let (result, _) = get_sources(&job).await;
    result.unwrap();
    assert_eq!(std::fs::read_dir(&project_dir).unwrap().count(), 0);

    std::fs::write(project_dir.join("kept"), "k").unwrap();
    let mut none = payload(&addr.to_string(), &sha);
    none.variables = vec![variable("GIT_STRATEGY", "none")];
    let job = job_for(&none, &project_dir);
    assert!(!Stage::GetSources.has_work(&job));
    let (result, _) = get_sources(&job).await;
    result.unwrap();
    assert!(project_dir.join("kept").exists());
}
