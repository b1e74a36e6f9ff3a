//! Artifacts uploaded from the project dir to a coordinator implementing GitLab's endpoints,
//! and downloaded and extracted by a dependent job; hostile archives (zip-slip) write
//! nothing outside the build directory.

mod common;

use std::fs;
use std::path::Path;

use common::{TOKEN, payload, serve_coordinator};
use podfleet_coordinator::model::{Artifact, ArtifactsFile, Dependency, JobResponse, Secret};
use podfleet_helper::{HelperJob, Stage, cli::run_stage};

fn job(payload: &JobResponse, project_dir: &Path, coordinator: &str) -> HelperJob {
    HelperJob::from_payload(payload, project_dir.to_str().unwrap(), coordinator, None).unwrap()
}

async fn stage(stage: Stage, job: &HelperJob) -> (Result<(), String>, String) {
    let mut log = Vec::new();
    let result = run_stage(stage, job, &mut log).await;
    (result, String::from_utf8_lossy(&log).into_owned())
}

fn dependent(id: u64) -> JobResponse {
    let mut dependent = payload("127.0.0.1:1", "0000000000000000000000000000000000000000");
    dependent.id = 200;
    dependent.dependencies = vec![Dependency {
        id,
        name: "build".to_owned(),
        token: Secret::new(TOKEN),
        artifacts_file: Some(ArtifactsFile {
            filename: "artifacts.zip".to_owned(),
            size: 1,
        }),
    }];
    dependent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_go_up_as_zip_and_come_back_in_a_dependent_job() {
    let (coordinator, state) = serve_coordinator().await;
    let build = tempfile::tempdir().unwrap();
    let project_dir = build.path().join("project");
    fs::create_dir_all(project_dir.join("out/deep")).unwrap();
    fs::write(project_dir.join("out/app.bin"), vec![7u8; 100_000]).unwrap();
    fs::write(project_dir.join("out/deep/notes.txt"), "notes").unwrap();
    fs::write(project_dir.join("out/deep/skip.log"), "log").unwrap();
    fs::write(project_dir.join("report.xml"), "<testsuites/>").unwrap();

    let mut payload = payload("127.0.0.1:1", "0000000000000000000000000000000000000000");
    payload.artifacts = vec![
        Artifact {
            name: "bin".to_owned(),
            paths: vec!["out/**".to_owned()],
            exclude: vec!["**/*.log".to_owned()],
            when: "on_success".to_owned(),
            expire_in: "1 week".to_owned(),
            artifact_type: "archive".to_owned(),
            artifact_format: "zip".to_owned(),
            ..Artifact::default()
        },
        Artifact {
            name: "junit".to_owned(),
            paths: vec!["report.xml".to_owned()],
            when: "always".to_owned(),
            artifact_type: "junit".to_owned(),
            artifact_format: "gzip".to_owned(),
            ..Artifact::default()
        },
        Artifact {
            name: "only-on-failure".to_owned(),
            paths: vec!["out".to_owned()],
            when: "on_failure".to_owned(),
            ..Artifact::default()
        },
    ];
    // A 307 first (the upload follows it with the whole body), then a 500 (retried).
    state.lock().unwrap().redirect_next_upload = true;
    state.lock().unwrap().upload_failures = vec![500];
    let job = job(&payload, &project_dir, &coordinator);
    let (result, log) = stage(Stage::UploadArtifacts { on_success: true }, &job).await;
    result.unwrap_or_else(|error| panic!("{error}\n{log}"));
    assert!(!log.contains(TOKEN));

    let uploads = state.lock().unwrap().uploads.remove(&100).unwrap();
    assert_eq!(uploads.len(), 2, "on_failure entry must not be uploaded");
    let (name, query, zip) = &uploads[0];
    assert_eq!(name, "bin.zip");
    assert_eq!(
        query,
        "artifact_format=zip&artifact_type=archive&expire_in=1+week&redirected=1"
    );
    let (name, query, gzip) = &uploads[1];
    assert_eq!(name, "junit.gz");
    assert_eq!(query, "artifact_format=gzip&artifact_type=junit");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::MultiGzDecoder::new(&gzip[..]), &mut text)
        .unwrap();
    assert_eq!(text, "<testsuites/>");

    // Info-ZIP agrees on the archive's contents.
    let zip_file = build.path().join("check.zip");
    fs::write(&zip_file, zip).unwrap();
    let expected = ["out/", "out/app.bin", "out/deep/", "out/deep/notes.txt"];
    let names: Vec<String> = podfleet_helper::zip::members(&mut fs::File::open(&zip_file).unwrap())
        .unwrap()
        .into_iter()
        .map(|member| member.name)
        .collect();
    assert_eq!(names, expected);
    // Info-ZIP, the reference reader, agrees when it is installed.
    if let Ok(listing) = std::process::Command::new("unzip")
        .arg("-Z1")
        .arg(&zip_file)
        .output()
    {
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert_eq!(listing.lines().collect::<Vec<_>>(), expected);
    }

    // The dependent job downloads and extracts it.
    state.lock().unwrap().downloads.insert(100, zip.clone());
    let other = tempfile::tempdir().unwrap();
    let dependent_job = job_for_dependent(&coordinator, other.path());
    assert!(Stage::DownloadArtifacts.has_work(&dependent_job));
    let (result, log) = stage(Stage::DownloadArtifacts, &dependent_job).await;
    result.unwrap_or_else(|error| panic!("{error}\n{log}"));
    assert_eq!(
        fs::read(other.path().join("out/app.bin")).unwrap(),
        vec![7u8; 100_000]
    );
    assert_eq!(
        fs::read_to_string(other.path().join("out/deep/notes.txt")).unwrap(),
        "notes"
    );
    assert!(!other.path().join("out/deep/skip.log").exists());
}

fn job_for_dependent(coordinator: &str, project_dir: &Path) -> HelperJob {
    job(&dependent(100), project_dir, coordinator)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_and_forbidden_are_final_and_named() {
    let (coordinator, state) = serve_coordinator().await;
    let build = tempfile::tempdir().unwrap();
    fs::write(build.path().join("a"), "a").unwrap();
    let mut payload = payload("127.0.0.1:1", "0000000000000000000000000000000000000000");
    payload.artifacts = vec![Artifact {
        paths: vec!["a".to_owned()],
        ..Artifact::default()
    }];
    state.lock().unwrap().upload_failures = vec![413, 413, 413];
    let job = job(&payload, build.path(), &coordinator);
    let (result, _) = stage(Stage::UploadArtifacts { on_success: true }, &job).await;
    let error = result.unwrap_err();
    assert!(error.contains("413") && error.contains("larger"), "{error}");
    assert_eq!(
        state.lock().unwrap().upload_attempts,
        1,
        "413 is not retried"
    );

    let mut wrong = job.clone();
    wrong.job_token = Secret::new("glcbt-not-the-token");
    let (result, _) = stage(Stage::UploadArtifacts { on_success: true }, &wrong).await;
    let error = result.unwrap_err();
    assert!(error.contains("403"), "{error}");
    assert!(!error.contains("glcbt-not-the-token"), "{error}");
}

/// A zip archive with raw members `(name, unix mode, contents)`, stored uncompressed.
fn hostile_zip(members: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, mode, contents) in members {
        let offset = out.len() as u32;
        let crc = crc32fast::hash(contents);
        let mut header = Vec::new();
        header.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        header.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0x21, 0]);
        header.extend_from_slice(&crc.to_le_bytes());
        header.extend_from_slice(&(contents.len() as u32).to_le_bytes());
        header.extend_from_slice(&(contents.len() as u32).to_le_bytes());
        header.extend_from_slice(&(name.len() as u16).to_le_bytes());
        header.extend_from_slice(&0u16.to_le_bytes());
        header.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(contents);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0x21, 0]);
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&(contents.len() as u32).to_le_bytes());
        central.extend_from_slice(&(contents.len() as u32).to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 8]);
        central.extend_from_slice(&(mode << 16).to_le_bytes());
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let start = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

/// Every file under `dir`, recursively (symlinks not followed).
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(entry.path());
            }
            out.push(entry.path().display().to_string());
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zip_slip_archives_write_nothing_outside_the_build_dir() {
    let (coordinator, state) = serve_coordinator().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dot-dot",
            hostile_zip(&[
                ("ok.txt", 0o100644, b"ok"),
                ("../escaped.txt", 0o100644, b"evil"),
            ]),
        ),
        (
            "nested dot-dot",
            hostile_zip(&[("a/../../escaped.txt", 0o100644, b"evil")]),
        ),
        (
            "absolute",
            hostile_zip(&[("/tmp/../escaped.txt", 0o100644, b"evil")]),
        ),
        (
            "backslash",
            hostile_zip(&[("..\\escaped.txt", 0o100644, b"evil")]),
        ),
        (
            "symlink out then through it",
            hostile_zip(&[
                ("link", 0o120777, b".."),
                ("link/escaped.txt", 0o100644, b"evil"),
            ]),
        ),
        (
            "absolute symlink",
            hostile_zip(&[
                ("link", 0o120777, b"/"),
                ("link/escaped.txt", 0o100644, b"evil"),
            ]),
        ),
        (
            "inside symlink then through it",
            hostile_zip(&[
                ("dir/", 0o040755, b""),
                ("link", 0o120777, b"dir"),
                ("link/x", 0o100644, b"x"),
            ]),
        ),
    ];
    for (case, archive) in cases {
        let sandbox = tempfile::tempdir().unwrap();
        let project_dir = sandbox.path().join("build/project");
        fs::create_dir_all(&project_dir).unwrap();
        state.lock().unwrap().downloads.insert(100, archive);
        let job = job_for_dependent(&coordinator, &project_dir);
        let (result, log) = stage(Stage::DownloadArtifacts, &job).await;
        assert!(
            result.is_err(),
            "{case}: a hostile archive must fail the stage\n{log}"
        );
        let outside: Vec<String> = files_under(sandbox.path())
            .into_iter()
            .filter(|path| !path.starts_with(&project_dir.display().to_string()))
            .filter(|path| *path != sandbox.path().join("build").display().to_string())
            .collect();
        assert!(
            outside.is_empty(),
            "{case}: wrote outside the build dir: {outside:?}"
        );
        assert!(
            !sandbox.path().join("build/escaped.txt").exists()
                && !Path::new("/escaped.txt").exists()
                && !std::env::temp_dir().join("escaped.txt").exists(),
            "{case}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_existing_symlink_in_the_project_is_replaced_not_followed() {
    let (coordinator, state) = serve_coordinator().await;
    let sandbox = tempfile::tempdir().unwrap();
    let project_dir = sandbox.path().join("project");
    fs::create_dir_all(&project_dir).unwrap();
    let victim = sandbox.path().join("victim.txt");
    fs::write(&victim, "original").unwrap();
    std::os::unix::fs::symlink(&victim, project_dir.join("file.txt")).unwrap();
    state
        .lock()
        .unwrap()
        .downloads
        .insert(100, hostile_zip(&[("file.txt", 0o100644, b"new")]));
    let job = job_for_dependent(&coordinator, &project_dir);
    let (result, log) = stage(Stage::DownloadArtifacts, &job).await;
    result.unwrap_or_else(|error| panic!("{error}\n{log}"));
    assert_eq!(fs::read_to_string(&victim).unwrap(), "original");
    assert_eq!(
        fs::read_to_string(project_dir.join("file.txt")).unwrap(),
        "new"
    );
    assert!(
        !fs::symlink_metadata(project_dir.join("file.txt"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}
