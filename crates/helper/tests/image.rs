//! The helper image built from a podfleet binary, loaded into a real (temporary) Podman
//! store and run: `helper --version`, then a real get_sources stage that clones over HTTP
//! with the job token using the git bundled in the image.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Repositories, payload, serve_git};
use podfleet_helper::{HelperJob, Stage, image};

const HELPER_BINARY: &str = env!("CARGO_BIN_EXE_podfleet-helper");

/// `podman` on a store of its own, so tests never touch the host's images.
fn podman(store: &Path) -> Command {
    let mut command = Command::new("podman");
    command
        .arg("--root")
        .arg(store.join("root"))
        .arg("--runroot")
        .arg(store.join("runroot"))
        .args([
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]);
    command
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helper_image_loads_into_podman_and_clones_with_its_own_git() {
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("image-cache");
    let binary = Path::new(HELPER_BINARY);
    let started = std::time::Instant::now();
    let archive = image::docker_archive_of(binary, &cache).unwrap();
    // Figures for the report (printed, never asserted).
    eprintln!(
        "helper image archive: {} bytes, built in {:?}",
        archive.len(),
        started.elapsed()
    );
    let hash = image::binary_hash(binary).unwrap();
    let reference = image::reference_for_hash(&hash);
    // Cached on disk under the hash, and byte-identical when rebuilt (stable image ID).
    let cached = cache.join(format!("helper-{}.tar", &hash[..16]));
    assert_eq!(std::fs::read(&cached).unwrap(), archive);
    std::fs::remove_file(&cached).unwrap();
    assert!(image::docker_archive_of(binary, &cache).unwrap() == archive);

    let store = work.path().join("store");
    let archive_file = work.path().join("helper.tar");
    std::fs::write(&archive_file, &archive).unwrap();
    let started = std::time::Instant::now();
    let loaded = run(podman(&store).arg("load").arg("-i").arg(&archive_file));
    eprintln!("podman load (vfs): {:?}", started.elapsed());
    assert!(loaded.contains(&reference), "{loaded}");

    let version = run(podman(&store).args(["run", "--rm", "--network", "none", &reference]));
    assert_eq!(
        version.trim(),
        format!("podfleet-helper {}", env!("CARGO_PKG_VERSION"))
    );

    // A real stage: clone from the test git server on 127.0.0.1 into a bind-mounted build dir.
    let repos = Repositories::new();
    let sha = repos.add_submodule();
    let addr = serve_git(repos.root.path().to_owned()).await;
    let builds = work.path().join("builds");
    std::fs::create_dir_all(&builds).unwrap();
    let mut payload = payload(&addr.to_string(), &sha);
    payload.variables = vec![common::variable("GIT_SUBMODULE_STRATEGY", "recursive")];
    let job = HelperJob::from_payload(
        &payload,
        "/builds/group/project",
        "http://127.0.0.1:1/",
        None,
    )
    .unwrap();
    let job_dir = work.path().join("job");
    std::fs::create_dir_all(&job_dir).unwrap();
    std::fs::write(job_dir.join("job.json"), job.to_json()).unwrap();
    let mut command = podman(&store);
    command
        .args(["run", "--rm", "--network", "host"])
        .arg("-v")
        .arg(format!("{}:/builds", builds.display()))
        .arg("-v")
        .arg(format!("{}:/job:ro", job_dir.display()))
        .arg(&reference)
        .args(Stage::GetSources.argv("/job/job.json"));
    let output = tokio::task::spawn_blocking(move || run(&mut command))
        .await
        .unwrap();
    assert!(!output.contains(common::TOKEN), "{output}");
    let project = builds.join("group/project");
    assert_eq!(common::git(&project, &["rev-parse", "HEAD"]), sha);
    assert_eq!(
        std::fs::read_to_string(project.join("sub/sub.txt")).unwrap(),
        "from the submodule\n",
        "{output}"
    );
}
