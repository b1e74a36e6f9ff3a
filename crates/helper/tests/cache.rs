//! Caches saved by one job and restored by the next: in the instance's cache volume, and
//! through the manager's presigned URLs against a real S3-compatible server (moto_server).

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{payload, variable};
use podfleet_coordinator::model::{Cache, JobResponse};
use podfleet_helper::{HelperJob, SharedCache, Stage, cli::run_stage};

async fn stage(stage: Stage, job: &HelperJob) -> String {
    let mut log = Vec::new();
    run_stage(stage, job, &mut log)
        .await
        .expect("cache stages never fail the job");
    String::from_utf8_lossy(&log).into_owned()
}

fn cached_payload(key: &str) -> JobResponse {
    let mut payload = payload("127.0.0.1:1", "0000000000000000000000000000000000000000");
    payload.variables = vec![variable("CI_COMMIT_REF_SLUG", "main")];
    payload.cache = vec![Cache {
        key: key.to_owned(),
        paths: vec!["vendor/".to_owned()],
        policy: "pull-push".to_owned(),
        ..Cache::default()
    }];
    payload
}

fn helper_job(
    payload: &JobResponse,
    project: &Path,
    cache_dir: &Path,
    shared: Option<&SharedCache<'_>>,
) -> HelperJob {
    let mut job = HelperJob::from_payload(
        payload,
        project.to_str().unwrap(),
        "http://127.0.0.1:1/",
        shared,
    )
    .unwrap();
    job.cache_dir = cache_dir.to_str().unwrap().to_owned();
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_cache_saved_by_one_job_is_restored_by_the_next() {
    let cache_dir = tempfile::tempdir().unwrap();
    let first = tempfile::tempdir().unwrap();
    fs::create_dir_all(first.path().join("vendor/lib")).unwrap();
    fs::write(first.path().join("vendor/lib/dep.rs"), "dep").unwrap();

    let payload = cached_payload("deps-$CI_COMMIT_REF_SLUG");
    let job = helper_job(&payload, first.path(), cache_dir.path(), None);
    assert!(Stage::ArchiveCache { on_success: true }.has_work(&job));
    assert!(!Stage::ArchiveCache { on_success: false }.has_work(&job));
    let log = stage(Stage::ArchiveCache { on_success: true }, &job).await;
    assert!(log.contains("Created cache"), "{log}");
    assert!(
        cache_dir
            .path()
            .join("group/project/deps-main/cache.zip")
            .exists()
    );

    let second = tempfile::tempdir().unwrap();
    let job = helper_job(&payload, second.path(), cache_dir.path(), None);
    let log = stage(Stage::RestoreCache, &job).await;
    assert!(log.contains("Successfully extracted cache"), "{log}");
    assert_eq!(
        fs::read_to_string(second.path().join("vendor/lib/dep.rs")).unwrap(),
        "dep"
    );

    // A fallback key is used when the key has no archive yet.
    let mut other_branch = cached_payload("deps-feature");
    other_branch.cache[0].fallback_keys = vec!["deps-main".to_owned()];
    let third = tempfile::tempdir().unwrap();
    let log = stage(
        Stage::RestoreCache,
        &helper_job(&other_branch, third.path(), cache_dir.path(), None),
    )
    .await;
    assert!(log.contains("from fallback key deps-main"), "{log}");
    assert!(third.path().join("vendor/lib/dep.rs").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_cache_key_stays_inside_the_cache_dir() {
    let sandbox = tempfile::tempdir().unwrap();
    let cache_dir = sandbox.path().join("cache");
    let project = sandbox.path().join("project");
    fs::create_dir_all(project.join("vendor")).unwrap();
    fs::write(project.join("vendor/x"), "x").unwrap();
    let payload = cached_payload("../../../escaped-key");
    let job = helper_job(&payload, &project, &cache_dir, None);
    stage(Stage::ArchiveCache { on_success: true }, &job).await;
    assert!(
        cache_dir
            .join("group/project/escaped-key/cache.zip")
            .exists()
    );
    let top: Vec<_> = fs::read_dir(sandbox.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(top.len(), 2, "{top:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_pull_cache_is_not_saved_and_a_failed_restore_is_a_warning() {
    let cache_dir = tempfile::tempdir().unwrap();
    let project = tempfile::tempdir().unwrap();
    let mut payload = cached_payload("k");
    payload.cache[0].policy = "pull".to_owned();
    let job = helper_job(&payload, project.path(), cache_dir.path(), None);
    assert!(!Stage::ArchiveCache { on_success: true }.has_work(&job));
    let log = stage(Stage::RestoreCache, &job).await;
    assert!(log.contains("no cache archive found"), "{log}");
}

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> (Moto, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server runs (pip install 'moto[server]')");
    let moto = Moto(child);
    let end = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "moto_server did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    (moto, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_cache_goes_through_presigned_urls_to_s3() {
    let (_moto, port) = start_moto();
    let endpoint = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let created = http
        .put(format!("{endpoint}/runner-cache"))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{:?}", created.text().await);

    let toml = format!(
        r#"concurrent = 1
[[runners]]
  name = "r"
  url = "https://gitlab.example.com/"
  token = "glrt-abcdefghijklmnop"
  executor = "docker-autoscaler"
  [runners.cache]
    Type = "s3"
    Path = "prefix"
    [runners.cache.s3]
      ServerAddress = "127.0.0.1:{port}"
      AccessKey = "AKIDEXAMPLE"
      SecretKey = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
      BucketName = "runner-cache"
      BucketLocation = "us-east-1"
      Insecure = true
  [runners.autoscaler]
    plugin = "fleeting-plugin-azure"
"#
    );
    let loaded = podfleet_config::parse(&toml, "config.toml").unwrap();
    let runner = &loaded.config.runners[0];
    let shared = SharedCache::of_runner(runner).expect("Type = s3 configures a shared cache");

    let first_cache = tempfile::tempdir().unwrap();
    let first = tempfile::tempdir().unwrap();
    fs::create_dir_all(first.path().join("vendor")).unwrap();
    fs::write(first.path().join("vendor/big.bin"), vec![3u8; 300_000]).unwrap();
    let payload = cached_payload("shared-key");
    let job = helper_job(&payload, first.path(), first_cache.path(), Some(&shared));
    let shown = format!("{job:?}");
    assert!(
        !shown.contains("X-Amz-Signature"),
        "presigned URLs are secrets: {shown}"
    );
    let log = stage(Stage::ArchiveCache { on_success: true }, &job).await;
    assert!(log.contains("Created cache"), "{log}");
    assert!(!log.contains("X-Amz-Signature"), "{log}");

    // The object sits where gitlab-runner puts it, with the archive's size.
    let key = format!(
        "prefix/runner/{}/project/9/shared-key",
        runner.short_token()
    );
    let local = first_cache
        .path()
        .join("group/project/shared-key/cache.zip");
    let listing = http
        .get(format!("{endpoint}/runner-cache?list-type=2"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let size = fs::metadata(&local).unwrap().len();
    assert!(
        listing.contains(&format!("<Key>{key}</Key>"))
            && listing.contains(&format!("<Size>{size}</Size>")),
        "{key} ({size} bytes) not in {listing}"
    );

    // Another instance (empty local cache) restores it from S3.
    let second_cache = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    let job = helper_job(&payload, second.path(), second_cache.path(), Some(&shared));
    let log = stage(Stage::RestoreCache, &job).await;
    assert!(log.contains("Successfully extracted cache"), "{log}");
    assert_eq!(
        fs::read(second.path().join("vendor/big.bin")).unwrap(),
        vec![3u8; 300_000]
    );
}
