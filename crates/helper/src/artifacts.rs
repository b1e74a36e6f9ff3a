//! `download_artifacts` and `upload_artifacts_on_success/on_failure`, run in the helper
//! container: archives built from the project dir go straight to the coordinator with the
//! job token; dependencies' archives are extracted into the project dir without any member
//! escaping it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use podfleet_coordinator::RetryPolicy;
use podfleet_coordinator::artifacts::{ArtifactUpload, ArtifactsClient, ArtifactsError};

use crate::archive;
use crate::job::{ArtifactFormat, HelperJob};
use crate::zip;

/// Why an artifact stage failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactStageError {
    #[error(transparent)]
    Transfer(#[from] ArtifactsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

fn io_context(what: impl Into<String>) -> impl FnOnce(io::Error) -> ArtifactStageError {
    let what = what.into();
    move |source| ArtifactStageError::Io { what, source }
}

/// gitlab-runner's artifact retries: 3 attempts.
fn retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        ..RetryPolicy::default()
    }
}

/// Uploads every artifact entry whose `when` matches the job's outcome.
pub async fn upload(
    job: &HelperJob,
    on_success: bool,
    scratch: &Path,
    log: &mut dyn Write,
) -> Result<(), ArtifactStageError> {
    let project_dir = Path::new(&job.project_dir);
    let client =
        ArtifactsClient::new(&job.coordinator_url, retry()).map_err(ArtifactsError::from)?;
    let _ = writeln!(
        log,
        "Uploading artifacts for {} job",
        if on_success { "successful" } else { "failed" }
    );
    for artifact in job
        .artifacts
        .iter()
        .filter(|artifact| artifact.when.applies(on_success))
    {
        let selection = archive::select(
            project_dir,
            &artifact.paths,
            &artifact.exclude,
            artifact.untracked,
        )
        .map_err(io_context(format!("cannot list {}", project_dir.display())))?;
        for warning in &selection.warnings {
            let _ = writeln!(log, "WARNING: {warning}");
        }
        if selection.members.is_empty() {
            let _ = writeln!(log, "ERROR: No files to upload for {}", artifact.name);
            continue;
        }
        let (file_name, file) = match artifact.artifact_format {
            ArtifactFormat::Zip => {
                let file_name = format!("{}.zip", artifact.name);
                let file = scratch.join("artifacts.zip");
                archive::write_zip(project_dir, &selection.members, &file)
                    .map_err(io_context(format!("cannot write {}", file.display())))?;
                (file_name, file)
            }
            ArtifactFormat::Gzip => {
                let file_name = format!("{}.gz", artifact.name);
                let file = scratch.join("artifacts.gz");
                archive::write_gzip(project_dir, &selection.members, &file)
                    .map_err(io_context(format!("cannot write {}", file.display())))?;
                (file_name, file)
            }
            ArtifactFormat::Raw => {
                let file_name = artifact.name.clone();
                let file = scratch.join("artifacts.raw");
                archive::write_raw(project_dir, &selection.members, &file)
                    .map_err(io_context(format!("artifacts {}", artifact.name)))?;
                (file_name, file)
            }
        };
        let size = fs::metadata(&file).map(|meta| meta.len()).unwrap_or(0);
        let _ = writeln!(
            log,
            "{}: found {} matching artifact files and directories",
            artifact.name,
            selection.members.len()
        );
        let _ = writeln!(
            log,
            "Uploading artifacts as \"{}\" ({}) to coordinator... ({size} bytes)",
            artifact.artifact_type,
            artifact.artifact_format.as_str()
        );
        let result = client
            .upload(
                job.job_id,
                job.job_token.expose(),
                &ArtifactUpload {
                    file: &file,
                    file_name: &file_name,
                    artifact_format: artifact.artifact_format.as_str(),
                    artifact_type: &artifact.artifact_type,
                    expire_in: &artifact.expire_in,
                },
            )
            .await;
        let _ = fs::remove_file(&file);
        result?;
        let _ = writeln!(
            log,
            "Uploading artifacts as \"{}\" to coordinator... 201 Created",
            artifact.artifact_type
        );
    }
    Ok(())
}

/// Downloads and extracts every dependency's artifacts into the project dir.
pub async fn download(
    job: &HelperJob,
    scratch: &Path,
    log: &mut dyn Write,
) -> Result<(), ArtifactStageError> {
    let project_dir = PathBuf::from(&job.project_dir);
    fs::create_dir_all(&project_dir).map_err(io_context(format!(
        "cannot create {}",
        project_dir.display()
    )))?;
    let client =
        ArtifactsClient::new(&job.coordinator_url, retry()).map_err(ArtifactsError::from)?;
    for dependency in &job.dependencies {
        let _ = writeln!(
            log,
            "Downloading artifacts for {} ({})...",
            dependency.name, dependency.id
        );
        let file = scratch.join(format!("dependency-{}.archive", dependency.id));
        let size = client
            .download(dependency.id, dependency.token.expose(), &file)
            .await?;
        let _ = writeln!(
            log,
            "Downloading artifacts from coordinator... ok ({size} bytes)"
        );
        let result = extract_archive(&file, &project_dir);
        let _ = fs::remove_file(&file);
        let extracted = result?;
        let _ = writeln!(
            log,
            "Extracted {} files, {} directories, {} symlinks",
            extracted.files, extracted.directories, extracted.symlinks
        );
    }
    Ok(())
}

/// Extracts a downloaded archive, recognised by its magic bytes as gitlab-runner does.
pub fn extract_archive(file: &Path, root: &Path) -> Result<zip::Extracted, ArtifactStageError> {
    let mut archive =
        fs::File::open(file).map_err(io_context(format!("cannot open {}", file.display())))?;
    let mut magic = [0u8; 4];
    let read = io::Read::read(&mut archive, &mut magic).unwrap_or(0);
    match &magic[..read.min(4)] {
        [0x28, 0xb5, 0x2f, 0xfd] => Err(ArtifactStageError::Unsupported(
            "the dependency's artifacts are a zstd tar (artifact_format tarzstd), which podfleet's helper cannot extract; use the zip format".to_owned(),
        )),
        [0x1f, 0x8b, ..] => Err(ArtifactStageError::Unsupported(
            "the dependency's artifacts are gzip (a report), which are not extracted into the project".to_owned(),
        )),
        _ => zip::extract(&mut archive, root)
            .map_err(io_context(format!("cannot extract artifacts into {}", root.display()))),
    }
}
