//! [`Stage`]: the helper's steps of a job, as the executor schedules them, and the command
//! line that runs one of them in the helper container.

use crate::job::{GitStrategy, HelperJob};

/// Where podfleet's binary lives in the helper image.
pub const BINARY_PATH: &str = "/usr/local/bin/podfleet";

/// Exit code of a stage that failed (the reason is the last line on stderr).
pub const EXIT_STAGE_FAILED: i32 = 1;
/// Exit code when the job file is missing or unreadable (a runner system failure).
pub const EXIT_BAD_INPUT: i32 = 2;

/// Ends each stage but the last when the helper runs several (`get_sources,download_artifacts`):
/// this, the stage's exit status and a newline on stdout. A NUL byte begins it, so no log
/// line looks like it.
pub const STAGE_END_MARKER: &str = "\0podfleet-stage-end:";

/// A step of a job that runs in the helper container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    GetSources,
    RestoreCache,
    DownloadArtifacts,
    /// `archive_cache` (after a successful script) or `archive_cache_on_failure`.
    ArchiveCache {
        on_success: bool,
    },
    /// `upload_artifacts_on_success` or `upload_artifacts_on_failure`.
    UploadArtifacts {
        on_success: bool,
    },
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::GetSources,
        Stage::RestoreCache,
        Stage::DownloadArtifacts,
        Stage::ArchiveCache { on_success: true },
        Stage::ArchiveCache { on_success: false },
        Stage::UploadArtifacts { on_success: true },
        Stage::UploadArtifacts { on_success: false },
    ];

    /// gitlab-runner's stage name (also the helper's subcommand).
    pub fn name(&self) -> &'static str {
        match self {
            Stage::GetSources => "get_sources",
            Stage::RestoreCache => "restore_cache",
            Stage::DownloadArtifacts => "download_artifacts",
            Stage::ArchiveCache { on_success: true } => "archive_cache",
            Stage::ArchiveCache { on_success: false } => "archive_cache_on_failure",
            Stage::UploadArtifacts { on_success: true } => "upload_artifacts_on_success",
            Stage::UploadArtifacts { on_success: false } => "upload_artifacts_on_failure",
        }
    }

    /// The stage called `name`, if any.
    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|stage| stage.name() == name)
    }

    /// The stages named in a comma-separated list, in its order; `None` when a name is
    /// unknown or the list is empty.
    pub fn parse_list(names: &str) -> Option<Vec<Stage>> {
        names
            .split(',')
            .map(Stage::from_name)
            .collect::<Option<Vec<_>>>()
    }

    /// The helper container's command for these stages run one after the other in one
    /// container (see [`STAGE_END_MARKER`]).
    pub fn batch_argv(stages: &[Stage], job_file: &str) -> Vec<String> {
        let names: Vec<&str> = stages.iter().map(Stage::name).collect();
        vec![
            BINARY_PATH.to_owned(),
            "helper".to_owned(),
            names.join(","),
            job_file.to_owned(),
        ]
    }

    /// Whether running this stage would do anything for `job`; the executor skips the helper
    /// container when not.
    pub fn has_work(&self, job: &HelperJob) -> bool {
        match self {
            Stage::GetSources => job.sources.strategy != GitStrategy::None,
            Stage::RestoreCache => job.caches.iter().any(|cache| cache.policy.pulls()),
            Stage::DownloadArtifacts => !job.dependencies.is_empty(),
            Stage::ArchiveCache { on_success } => job
                .caches
                .iter()
                .any(|cache| cache.policy.pushes() && cache.when.applies(*on_success)),
            Stage::UploadArtifacts { on_success } => job.artifacts.iter().any(|artifact| {
                artifact.when.applies(*on_success)
                    && (!artifact.paths.is_empty() || artifact.untracked)
            }),
        }
    }

    /// The helper container's command for this stage, reading the job from `job_file`.
    pub fn argv(&self, job_file: &str) -> Vec<String> {
        vec![
            BINARY_PATH.to_owned(),
            "helper".to_owned(),
            self.name().to_owned(),
            job_file.to_owned(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_distinct() {
        for stage in Stage::ALL {
            assert_eq!(Stage::from_name(stage.name()), Some(stage));
        }
        assert_eq!(Stage::from_name("step_script"), None);
    }

    #[test]
    fn lists_of_stages_parse_in_order_and_reject_unknown_names() {
        assert_eq!(
            Stage::parse_list("get_sources,download_artifacts"),
            Some(vec![Stage::GetSources, Stage::DownloadArtifacts])
        );
        assert_eq!(
            Stage::parse_list("restore_cache"),
            Some(vec![Stage::RestoreCache])
        );
        assert_eq!(Stage::parse_list("get_sources,nope"), None);
        assert_eq!(Stage::parse_list(""), None);
        let argv = Stage::batch_argv(
            &[
                Stage::ArchiveCache { on_success: true },
                Stage::UploadArtifacts { on_success: true },
            ],
            "/job.json",
        );
        assert_eq!(argv[2], "archive_cache,upload_artifacts_on_success");
        assert_eq!(Stage::parse_list(&argv[2]).unwrap().len(), 2);
    }

    #[test]
    fn argv_runs_the_binary_with_the_stage_and_job_file() {
        assert_eq!(
            Stage::ArchiveCache { on_success: false }.argv("/tmp/job.json"),
            [
                BINARY_PATH,
                "helper",
                "archive_cache_on_failure",
                "/tmp/job.json"
            ]
        );
    }
}
