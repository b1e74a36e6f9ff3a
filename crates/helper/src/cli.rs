//! `podfleet helper <stage> <job-file>`: the program of the helper container.
//!
//! Exit codes: 0 done (cache stages always, their trouble is a warning), 1 the stage failed
//! (the reason is the last line on stderr), 2 the job file is missing or invalid.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::job::HelperJob;
use crate::stage::{EXIT_BAD_INPUT, EXIT_STAGE_FAILED, STAGE_END_MARKER, Stage};
use crate::{artifacts, cache, sources};

/// Arguments of `podfleet helper`.
#[derive(Debug, clap::Args)]
pub struct HelperArgs {
    /// get_sources, restore_cache, download_artifacts, archive_cache,
    /// archive_cache_on_failure, upload_artifacts_on_success or upload_artifacts_on_failure.
    #[arg(required_unless_present = "version")]
    pub stage: Option<String>,
    /// The job file the executor wrote (JSON, see `HelperJob`).
    #[arg(required_unless_present = "version")]
    pub job_file: Option<PathBuf>,
    /// Print the helper's version (the executor's probe that the image works).
    #[arg(long)]
    pub version: bool,
}

/// The helper's version line.
pub fn version() -> String {
    format!("podfleet-helper {}", env!("CARGO_PKG_VERSION"))
}

/// Runs one stage; logs go to stdout, the failure reason to stderr.
pub async fn run(args: HelperArgs) -> ExitCode {
    if args.version {
        println!("{}", version());
        return ExitCode::SUCCESS;
    }
    let (Some(stage_name), Some(job_file)) = (args.stage, args.job_file) else {
        eprintln!("podfleet helper: give a stage and a job file");
        return ExitCode::from(EXIT_BAD_INPUT as u8);
    };
    let Some(stages) = Stage::parse_list(&stage_name) else {
        let names: Vec<&str> = Stage::ALL.iter().map(Stage::name).collect();
        eprintln!(
            "podfleet helper: unknown stage in {stage_name:?}; use one of {} (several: \
             joined by commas)",
            names.join(", ")
        );
        return ExitCode::from(EXIT_BAD_INPUT as u8);
    };
    let job = match std::fs::read(&job_file)
        .map_err(|error| format!("cannot read the job file {}: {error}", job_file.display()))
        .and_then(|bytes| HelperJob::from_json(&bytes))
    {
        Ok(job) => job,
        Err(error) => {
            eprintln!("podfleet helper: {error}");
            return ExitCode::from(EXIT_BAD_INPUT as u8);
        }
    };
    let mut stdout = std::io::stdout();
    for (n, stage) in stages.iter().enumerate() {
        let code = match run_stage(*stage, &job, &mut stdout).await {
            Ok(()) => 0,
            Err(reason) => {
                let _ = stdout.flush();
                eprintln!("ERROR: {}: {reason}", stage.name());
                EXIT_STAGE_FAILED
            }
        };
        // A stage failing ends the container with its status; the executor reads the
        // status of each stage before the last from a line on stdout, in order with the
        // stage's log.
        if code != 0 || n + 1 == stages.len() {
            return ExitCode::from(code as u8);
        }
        let _ = writeln!(stdout, "{STAGE_END_MARKER}{code}");
        let _ = stdout.flush();
    }
    ExitCode::SUCCESS
}

/// Runs `stage` for `job`, logging to `log`; the error is the job's failure reason.
pub async fn run_stage(stage: Stage, job: &HelperJob, log: &mut dyn Write) -> Result<(), String> {
    // Scratch space for archives outside the project dir (they must not land in artifacts),
    // on the build volume beside it, as gitlab-runner's `<project dir>.tmp`: not in the
    // container's own filesystem, which a shared read-only helper image cannot write.
    let scratch = scratch_dir(Path::new(&job.project_dir))
        .map_err(|error| format!("cannot create a scratch directory: {error}"))?;
    let result = match stage {
        Stage::GetSources => sources::get_sources(&job.sources, Path::new(&job.project_dir), log)
            .map_err(|error| error.to_string()),
        Stage::RestoreCache => {
            cache::restore(job, log).await;
            Ok(())
        }
        Stage::ArchiveCache { on_success } => {
            cache::save(job, on_success, log).await;
            Ok(())
        }
        Stage::DownloadArtifacts => artifacts::download(job, &scratch, log)
            .await
            .map_err(|error| error.to_string()),
        Stage::UploadArtifacts { on_success } => artifacts::upload(job, on_success, &scratch, log)
            .await
            .map_err(|error| error.to_string()),
    };
    let _ = std::fs::remove_dir_all(&scratch);
    // `<project dir>.tmp` too when nothing else is in it (file variables may be).
    if let Some(tmp) = scratch.parent() {
        let _ = std::fs::remove_dir(tmp);
    }
    result
}

fn scratch_dir(project_dir: &Path) -> std::io::Result<PathBuf> {
    let mut tmp = project_dir.as_os_str().to_owned();
    tmp.push(".tmp");
    let dir = PathBuf::from(tmp).join(format!(
        "podfleet-helper-{}-{:08x}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn rand_suffix() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0)
}
