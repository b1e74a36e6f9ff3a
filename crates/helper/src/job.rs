//! [`HelperJob`]: everything the helper container needs for one job, derived from the job
//! payload by the manager and handed to the helper as a JSON file.
//!
//! The manager side ([`HelperJob::from_payload`]) resolves every `GIT_*` and `CACHE_*`
//! variable, expands cache keys and artifact paths, sanitises cache keys and presigns S3 URLs,
//! so the helper inside the instance needs no config and never sees cache credentials.

use std::fmt;

use podfleet_coordinator::model::{JobResponse, JobVariable, Secret};
use serde::{Deserialize, Serialize};

use crate::cache_key;
use crate::expand::expand;
use crate::s3::{self, SharedCache};

/// The local cache volume's mount point inside the helper container (the executor mounts the
/// per-runner cache volume there).
pub const DEFAULT_CACHE_DIR: &str = "/cache";

/// What the helper does for one job. Serialised as JSON into the job file; `Debug` never
/// prints the job token, dependency tokens, credentials in URLs or presigned URLs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperJob {
    pub job_id: u64,
    pub job_token: Secret,
    /// The coordinator's base URL as the instance reaches it (e.g. `https://gitlab.example.com/`).
    pub coordinator_url: String,
    /// `CI_PROJECT_DIR` inside the containers (in the build volume).
    pub project_dir: String,
    pub sources: Sources,
    /// Where the local cache volume is mounted in the helper container.
    pub cache_dir: String,
    pub caches: Vec<CacheSpec>,
    pub artifacts: Vec<ArtifactSpec>,
    pub dependencies: Vec<DependencySpec>,
}

impl fmt::Debug for HelperJob {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("HelperJob")
            .field("job_id", &self.job_id)
            .field("job_token", &self.job_token)
            .field("coordinator_url", &self.coordinator_url)
            .field("project_dir", &self.project_dir)
            .field("sources", &self.sources)
            .field("cache_dir", &self.cache_dir)
            .field("caches", &self.caches)
            .field("artifacts", &self.artifacts)
            .field("dependencies", &self.dependencies)
            .finish()
    }
}

/// `GIT_STRATEGY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GitStrategy {
    Clone,
    Fetch,
    None,
    Empty,
}

/// `GIT_SUBMODULE_STRATEGY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubmoduleStrategy {
    None,
    Normal,
    Recursive,
}

/// The `get_sources` settings: the payload's `git_info` plus the `GIT_*` variables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sources {
    /// The repository URL, with the job token as its credentials (`gitlab-ci-token:<token>@`).
    pub repo_url: Secret,
    pub sha: String,
    pub before_sha: String,
    pub git_ref: String,
    pub ref_type: String,
    pub refspecs: Vec<String>,
    /// `GIT_DEPTH`; 0 means full history.
    pub depth: u32,
    pub strategy: GitStrategy,
    /// `GIT_CHECKOUT`.
    pub checkout: bool,
    pub submodule_strategy: SubmoduleStrategy,
    /// `GIT_SUBMODULE_PATHS`, split on spaces.
    pub submodule_paths: Vec<String>,
    /// `GIT_SUBMODULE_DEPTH`; 0 means full history.
    pub submodule_depth: u32,
    /// `GIT_SUBMODULE_UPDATE_FLAGS`, split on spaces.
    pub submodule_update_flags: Vec<String>,
    /// `GIT_CLEAN_FLAGS` split on spaces; empty means no `git clean` (`none`).
    pub clean_flags: Vec<String>,
    /// `GIT_FETCH_EXTRA_FLAGS` split on spaces.
    pub fetch_extra_flags: Vec<String>,
    /// `sha1` or `sha256`.
    pub object_format: String,
}

/// `policy` of a cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CachePolicy {
    Pull,
    Push,
    PullPush,
}

impl CachePolicy {
    pub fn pulls(self) -> bool {
        matches!(self, CachePolicy::Pull | CachePolicy::PullPush)
    }

    pub fn pushes(self) -> bool {
        matches!(self, CachePolicy::Push | CachePolicy::PullPush)
    }
}

/// `when` of a cache or artifact entry: after which job outcome it is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    OnSuccess,
    OnFailure,
    Always,
}

impl When {
    pub fn applies(self, on_success: bool) -> bool {
        match self {
            When::Always => true,
            When::OnSuccess => on_success,
            When::OnFailure => !on_success,
        }
    }

    fn parse(text: &str, what: &str) -> Result<Self, String> {
        match text {
            "" | "on_success" => Ok(When::OnSuccess),
            "on_failure" => Ok(When::OnFailure),
            "always" => Ok(When::Always),
            other => Err(format!(
                "{what} when {other:?} is not one of on_success, on_failure, always"
            )),
        }
    }
}

/// One cache entry, its keys already expanded and sanitised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpec {
    pub key: String,
    /// Tried in order when `key` has no archive (`fallback_keys`, then `CACHE_FALLBACK_KEY`).
    pub fallback_keys: Vec<String>,
    pub paths: Vec<String>,
    pub untracked: bool,
    pub policy: CachePolicy,
    pub when: When,
    /// Directory of the local archives, relative to the cache dir (`<project path>`).
    pub local_dir: String,
    /// Present when `[runners.cache]` configures a shared S3 cache.
    pub remote: Option<RemoteCache>,
    /// Why this cache cannot be used (its key sanitises to nothing): the cache stages say so
    /// and skip it, as gitlab-runner does; a cache never fails a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unusable: Option<String>,
}

/// Presigned URLs of a shared cache entry (valid for the job's timeout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCache {
    /// GET URLs, one per key in restore order: `key`, then each fallback key.
    pub download_urls: Vec<Secret>,
    /// PUT URL of `key`.
    pub upload_url: Secret,
    /// Largest archive uploaded in bytes; 0 means no limit.
    pub max_upload_size: u64,
}

/// One `artifacts` entry, its paths expanded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactSpec {
    /// Archive name without extension (`artifacts` by default).
    pub name: String,
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    pub untracked: bool,
    pub when: When,
    pub expire_in: String,
    /// `archive`, `junit`, ... as the payload says.
    pub artifact_type: String,
    /// `zip`, `gzip` or `raw`.
    pub artifact_format: ArtifactFormat,
}

/// How an artifact entry is packed for upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactFormat {
    Zip,
    Gzip,
    Raw,
}

impl ArtifactFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactFormat::Zip => "zip",
            ArtifactFormat::Gzip => "gzip",
            ArtifactFormat::Raw => "raw",
        }
    }
}

/// A job whose artifacts this job downloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DependencySpec {
    pub id: u64,
    pub name: String,
    pub token: Secret,
}

/// Why a payload cannot become a [`HelperJob`] (the job fails with this reason).
pub type PayloadError = String;

struct Variables<'a>(&'a [JobVariable]);

impl Variables<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|variable| variable.key == key)
            .map(|variable| variable.value.as_str())
    }

    fn get_nonempty(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|value| !value.trim().is_empty())
    }

    fn lookup(&self) -> impl Fn(&str) -> Option<String> + '_ {
        move |key| self.get(key).map(str::to_owned)
    }

    fn flags(&self, key: &str, default: &str) -> Vec<String> {
        let text = self.get(key).unwrap_or(default);
        text.split_whitespace().map(str::to_owned).collect()
    }

    fn number(&self, key: &str) -> Result<Option<u32>, PayloadError> {
        match self.get_nonempty(key) {
            None => Ok(None),
            Some(text) => text.trim().parse().map(Some).map_err(|_| {
                format!("{key} {text:?} is not a whole number (set it to e.g. 0, 1 or 50)")
            }),
        }
    }

    fn boolean(&self, key: &str, default: bool) -> Result<bool, PayloadError> {
        match self.get_nonempty(key).map(str::trim) {
            None => Ok(default),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
            Some(other) => Err(format!("{key} {other:?} is not true or false")),
        }
    }
}

impl HelperJob {
    /// Builds the helper's view of a job. `project_dir` is `CI_PROJECT_DIR` in the containers,
    /// `coordinator_url` the URL the instance uses to reach the coordinator, `cache` the
    /// runner's shared cache ([`SharedCache::of_runner`]; presigned S3 URLs are made here,
    /// valid for the job timeout; `None` keeps caches on the instance).
    /// A bad `GIT_*`/cache/artifact setting is an error naming the variable and its fix.
    pub fn from_payload(
        payload: &JobResponse,
        project_dir: &str,
        coordinator_url: &str,
        cache: Option<&SharedCache<'_>>,
    ) -> Result<Self, PayloadError> {
        Self::from_payload_at(
            payload,
            project_dir,
            coordinator_url,
            cache,
            chrono::Utc::now(),
        )
    }

    /// [`HelperJob::from_payload`] at a given time (presigned URLs are dated).
    pub fn from_payload_at(
        payload: &JobResponse,
        project_dir: &str,
        coordinator_url: &str,
        cache: Option<&SharedCache<'_>>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self, PayloadError> {
        let variables = Variables(&payload.variables);
        let sources = sources(payload, &variables)?;
        let local_dir = local_cache_dir(payload, sources.strategy);
        let timeout = u64::try_from(payload.runner_info.timeout)
            .ok()
            .filter(|seconds| *seconds > 0)
            .unwrap_or(3600);
        let remote = match cache {
            Some(shared) if shared.config.cache_type.is_some() => Some(
                s3::CacheSigner::from_config(shared, payload.job_info.project_id)
                    .map_err(|error| format!("[runners.cache] {error}"))?,
            ),
            _ => None,
        };
        let mut caches = Vec::new();
        for (index, entry) in payload.cache.iter().enumerate() {
            if entry.paths.is_empty() && !entry.untracked {
                continue;
            }
            let lookup = variables.lookup();
            let raw_key = if entry.key.is_empty() {
                format!("{}/{}", payload.job_info.name, payload.git_info.git_ref)
            } else {
                expand(&entry.key, &lookup)
            };
            let (key, unusable) = match cache_key::sanitise(&raw_key) {
                Ok(key) => (key, None),
                Err(error) => (
                    String::new(),
                    Some(format!(
                        "cache[{index}] key {raw_key:?} {error}; this cache is skipped"
                    )),
                ),
            };
            let mut fallback_keys = Vec::new();
            let fallback_sources = entry
                .fallback_keys
                .iter()
                .map(|key| expand(key, &lookup))
                .chain(
                    variables
                        .get_nonempty("CACHE_FALLBACK_KEY")
                        // gitlab-runner refuses a global fallback into protected caches.
                        .filter(|key| !key.trim_end().ends_with("-protected"))
                        .map(|key| expand(key, &lookup)),
                );
            for raw in fallback_sources {
                // A bad fallback key is skipped, as gitlab-runner does: restore is best effort.
                if let Ok(fallback) = cache_key::sanitise(&raw)
                    && fallback != key
                    && !fallback_keys.contains(&fallback)
                {
                    fallback_keys.push(fallback);
                }
            }
            let policy = match expand(&entry.policy, &lookup).as_str() {
                "" | "pull-push" => CachePolicy::PullPush,
                "pull" => CachePolicy::Pull,
                "push" => CachePolicy::Push,
                other => {
                    return Err(format!(
                        "cache[{index}] policy {other:?} is not one of pull, push, pull-push"
                    ));
                }
            };
            let when = When::parse(&entry.when, &format!("cache[{index}]"))?;
            let remote = remote
                .as_ref()
                .filter(|_| unusable.is_none())
                .map(|signer| signer.presign(&key, &fallback_keys, timeout, now));
            caches.push(CacheSpec {
                key,
                fallback_keys,
                paths: entry
                    .paths
                    .iter()
                    .map(|path| expand(path, &lookup))
                    .collect(),
                untracked: entry.untracked,
                policy,
                when,
                local_dir: local_dir.clone(),
                remote,
                unusable,
            });
        }
        let mut artifacts = Vec::new();
        for (index, entry) in payload.artifacts.iter().enumerate() {
            let lookup = variables.lookup();
            let artifact_format = match entry.artifact_format.as_str() {
                "" | "zip" => ArtifactFormat::Zip,
                "gzip" => ArtifactFormat::Gzip,
                "raw" => ArtifactFormat::Raw,
                other => {
                    return Err(format!(
                        "artifacts[{index}] artifact_format {other:?} is not supported (zip, gzip or raw)"
                    ));
                }
            };
            let name = expand(&entry.name, &lookup);
            artifacts.push(ArtifactSpec {
                name: if name.trim().is_empty() {
                    "artifacts".to_owned()
                } else {
                    name
                },
                paths: entry
                    .paths
                    .iter()
                    .map(|path| expand(path, &lookup))
                    .collect(),
                exclude: entry
                    .exclude
                    .iter()
                    .map(|path| expand(path, &lookup))
                    .collect(),
                untracked: entry.untracked.unwrap_or(false),
                when: When::parse(&entry.when, &format!("artifacts[{index}]"))?,
                expire_in: entry.expire_in.clone(),
                artifact_type: if entry.artifact_type.is_empty() {
                    "archive".to_owned()
                } else {
                    entry.artifact_type.clone()
                },
                artifact_format,
            });
        }
        let dependencies = payload
            .dependencies
            .iter()
            .filter(|dependency| {
                dependency
                    .artifacts_file
                    .as_ref()
                    .is_some_and(|file| !file.filename.is_empty())
            })
            .map(|dependency| DependencySpec {
                id: dependency.id,
                name: dependency.name.clone(),
                token: if dependency.token.is_empty() {
                    payload.token.clone()
                } else {
                    dependency.token.clone()
                },
            })
            .collect();
        Ok(HelperJob {
            job_id: payload.id,
            job_token: payload.token.clone(),
            coordinator_url: coordinator_url.to_owned(),
            project_dir: project_dir.to_owned(),
            sources,
            cache_dir: DEFAULT_CACHE_DIR.to_owned(),
            caches,
            artifacts,
            dependencies,
        })
    }

    /// The job file's contents.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a HelperJob is plain data and always serialises")
    }

    /// Reads a job file.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|error| format!("invalid helper job file: {error}"))
    }
}

fn sources(payload: &JobResponse, variables: &Variables<'_>) -> Result<Sources, PayloadError> {
    let strategy = match variables.get_nonempty("GIT_STRATEGY").map(str::trim) {
        None if payload.allow_git_fetch => GitStrategy::Fetch,
        None => GitStrategy::Clone,
        Some("clone") => GitStrategy::Clone,
        Some("fetch") => GitStrategy::Fetch,
        Some("none") => GitStrategy::None,
        Some("empty") => GitStrategy::Empty,
        Some(other) => {
            return Err(format!(
                "GIT_STRATEGY {other:?} is not one of clone, fetch, none, empty"
            ));
        }
    };
    let submodule_strategy = match variables
        .get_nonempty("GIT_SUBMODULE_STRATEGY")
        .map(str::trim)
    {
        None | Some("none") => SubmoduleStrategy::None,
        Some("normal") => SubmoduleStrategy::Normal,
        Some("recursive") => SubmoduleStrategy::Recursive,
        Some(other) => {
            return Err(format!(
                "GIT_SUBMODULE_STRATEGY {other:?} is not one of none, normal, recursive"
            ));
        }
    };
    let depth = match variables.number("GIT_DEPTH")? {
        Some(depth) => depth,
        None => payload.git_info.depth,
    };
    let clean_flags = match variables.get("GIT_CLEAN_FLAGS").map(str::trim) {
        Some("none") => Vec::new(),
        _ => variables.flags("GIT_CLEAN_FLAGS", "-ffdx"),
    };
    let fetch_extra_flags = match variables.get("GIT_FETCH_EXTRA_FLAGS").map(str::trim) {
        Some("none") => Vec::new(),
        _ => variables.flags("GIT_FETCH_EXTRA_FLAGS", "--prune --quiet"),
    };
    for flag in clean_flags.iter().chain(&fetch_extra_flags) {
        if !flag.starts_with('-') {
            return Err(format!(
                "git flag {flag:?} in GIT_CLEAN_FLAGS or GIT_FETCH_EXTRA_FLAGS does not start with '-'"
            ));
        }
    }
    let repo_url = payload.git_info.repo_url.expose();
    if matches!(strategy, GitStrategy::Clone | GitStrategy::Fetch) {
        if !(repo_url.starts_with("http://") || repo_url.starts_with("https://")) {
            return Err(format!(
                "the repository URL {} is not http(s); podfleet's helper clones over HTTP(S) only",
                crate::mask::url(repo_url)
            ));
        }
        if payload.git_info.sha.is_empty() {
            return Err("the job payload has no git_info.sha to check out".to_owned());
        }
    }
    let refspecs = if payload.git_info.refspecs.is_empty() {
        default_refspecs(&payload.git_info.git_ref, &payload.git_info.ref_type)
    } else {
        payload.git_info.refspecs.clone()
    };
    let submodule_depth = match variables.number("GIT_SUBMODULE_DEPTH")? {
        Some(depth) => depth,
        None => depth,
    };
    Ok(Sources {
        repo_url: payload.git_info.repo_url.clone(),
        sha: payload.git_info.sha.clone(),
        before_sha: payload.git_info.before_sha.clone(),
        git_ref: payload.git_info.git_ref.clone(),
        ref_type: payload.git_info.ref_type.clone(),
        refspecs,
        depth,
        strategy,
        checkout: variables.boolean("GIT_CHECKOUT", true)?,
        submodule_strategy,
        submodule_paths: variables.flags("GIT_SUBMODULE_PATHS", ""),
        submodule_depth,
        submodule_update_flags: variables.flags("GIT_SUBMODULE_UPDATE_FLAGS", ""),
        clean_flags,
        fetch_extra_flags,
        object_format: if payload.git_info.repo_object_format.is_empty() {
            "sha1".to_owned()
        } else {
            payload.git_info.repo_object_format.clone()
        },
    })
}

/// Old servers send no refspecs: fetch the job's ref (branch or tag) as gitlab-runner did.
fn default_refspecs(git_ref: &str, ref_type: &str) -> Vec<String> {
    if git_ref.is_empty() {
        return vec!["+refs/heads/*:refs/remotes/origin/*".to_owned()];
    }
    if ref_type == "tag" {
        vec![format!("+refs/tags/{git_ref}:refs/tags/{git_ref}")]
    } else {
        vec![format!(
            "+refs/heads/{git_ref}:refs/remotes/origin/{git_ref}"
        )]
    }
}

/// `<project path>` of the local cache: the project's full path (`group/project`), with
/// `-empty` for `GIT_STRATEGY=empty` as gitlab-runner does.
fn local_cache_dir(payload: &JobResponse, strategy: GitStrategy) -> String {
    let mut path = if payload.job_info.project_full_path.is_empty() {
        format!("project-{}", payload.job_info.project_id)
    } else {
        payload.job_info.project_full_path.clone()
    };
    if strategy == GitStrategy::Empty {
        path.push_str("-empty");
    }
    // The project path comes from the server; it still goes through the key sanitiser so no
    // value can climb out of the cache volume.
    cache_key::sanitise(&path)
        .unwrap_or_else(|_| format!("project-{}", payload.job_info.project_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use podfleet_coordinator::model::{Artifact, ArtifactsFile, Cache, Dependency};

    fn payload() -> JobResponse {
        let mut payload = JobResponse {
            id: 42,
            token: Secret::new("glcbt-job-token-secret"),
            ..JobResponse::default()
        };
        payload.job_info.name = "build".to_owned();
        payload.job_info.project_full_path = "group/project".to_owned();
        payload.job_info.project_id = 7;
        payload.git_info.repo_url = Secret::new(
            "http://gitlab-ci-token:glcbt-job-token-secret@127.0.0.1/group/project.git",
        );
        payload.git_info.sha = "0123456789abcdef0123456789abcdef01234567".to_owned();
        payload.git_info.git_ref = "main".to_owned();
        payload.git_info.ref_type = "branch".to_owned();
        payload.runner_info.timeout = 3600;
        payload
    }

    fn variable(key: &str, value: &str) -> JobVariable {
        JobVariable {
            key: key.to_owned(),
            value: value.to_owned(),
            public: true,
            ..JobVariable::default()
        }
    }

    fn build(payload: &JobResponse) -> Result<HelperJob, String> {
        HelperJob::from_payload(
            payload,
            "/builds/group/project",
            "http://127.0.0.1:1/",
            None,
        )
    }

    #[test]
    fn debug_never_shows_tokens() {
        let mut payload = payload();
        payload.dependencies.push(Dependency {
            id: 1,
            name: "dep".to_owned(),
            token: Secret::new("dependency-token-secret"),
            artifacts_file: Some(ArtifactsFile {
                filename: "artifacts.zip".to_owned(),
                size: 1,
            }),
        });
        let job = build(&payload).unwrap();
        let shown = format!("{job:?}");
        assert!(!shown.contains("glcbt-job-token-secret"), "{shown}");
        assert!(!shown.contains("dependency-token-secret"), "{shown}");
        assert!(shown.contains("/builds/group/project"));
    }

    #[test]
    fn git_variables_are_read_and_bad_values_fail_with_the_variable_name() {
        let mut payload = payload();
        payload.variables = vec![
            variable("GIT_STRATEGY", "fetch"),
            variable("GIT_DEPTH", "3"),
            variable("GIT_SUBMODULE_STRATEGY", "recursive"),
            variable("GIT_CLEAN_FLAGS", "none"),
            variable("GIT_CHECKOUT", "false"),
        ];
        let job = build(&payload).unwrap();
        assert_eq!(job.sources.strategy, GitStrategy::Fetch);
        assert_eq!(job.sources.depth, 3);
        assert_eq!(job.sources.submodule_strategy, SubmoduleStrategy::Recursive);
        assert!(job.sources.clean_flags.is_empty());
        assert!(!job.sources.checkout);
        assert_eq!(
            job.sources.refspecs,
            ["+refs/heads/main:refs/remotes/origin/main"]
        );

        for (key, value) in [
            ("GIT_STRATEGY", "rsync"),
            ("GIT_SUBMODULE_STRATEGY", "all"),
            ("GIT_DEPTH", "deep"),
            ("GIT_CHECKOUT", "maybe"),
        ] {
            let mut payload = payload.clone();
            payload.variables.push(variable(key, value));
            let error = build(&payload).unwrap_err();
            assert!(error.contains(key), "{error}");
        }
    }

    #[test]
    fn a_non_http_repository_fails_without_showing_the_token() {
        let mut payload = payload();
        payload.git_info.repo_url = Secret::new("ssh://gitlab-ci-token:glcbt-secret@host/x.git");
        let error = build(&payload).unwrap_err();
        assert!(!error.contains("glcbt-secret"), "{error}");
        assert!(error.contains("host/x.git"), "{error}");
    }

    #[test]
    fn cache_entries_expand_sanitise_and_validate() {
        let mut payload = payload();
        payload.variables = vec![
            variable("CI_COMMIT_REF_SLUG", "main"),
            variable("CACHE_FALLBACK_KEY", "global"),
        ];
        payload.cache = vec![Cache {
            key: "deps-$CI_COMMIT_REF_SLUG/../../etc".to_owned(),
            paths: vec!["vendor/".to_owned()],
            policy: "pull".to_owned(),
            when: "always".to_owned(),
            fallback_keys: vec!["deps-default".to_owned()],
            ..Cache::default()
        }];
        let job = build(&payload).unwrap();
        let cache = &job.caches[0];
        assert_eq!(cache.key, "etc");
        assert_eq!(cache.fallback_keys, ["deps-default", "global"]);
        assert_eq!(cache.policy, CachePolicy::Pull);
        assert_eq!(cache.when, When::Always);
        assert_eq!(cache.local_dir, "group/project");

        payload.cache[0].policy = "sometimes".to_owned();
        assert!(build(&payload).unwrap_err().contains("policy"));
    }

    #[test]
    fn empty_cache_key_defaults_to_job_name_and_ref() {
        let mut payload = payload();
        payload.cache = vec![Cache {
            paths: vec!["x".to_owned()],
            ..Cache::default()
        }];
        assert_eq!(build(&payload).unwrap().caches[0].key, "build/main");
    }

    #[test]
    fn a_key_that_expands_to_nothing_skips_the_cache_instead_of_failing_the_job() {
        let mut payload = payload();
        payload.cache = vec![Cache {
            key: "$CI_COMMIT_SHA".to_owned(),
            paths: vec!["vendor/*".to_owned()],
            policy: "push".to_owned(),
            ..Cache::default()
        }];
        let job = build(&payload).unwrap();
        let reason = job.caches[0].unusable.as_deref().unwrap();
        assert!(
            reason.contains("cache[0]") && reason.contains("skipped"),
            "{reason}"
        );
    }

    #[test]
    fn artifacts_and_dependencies_are_mapped() {
        let mut payload = payload();
        payload.artifacts = vec![Artifact {
            paths: vec!["out/**".to_owned()],
            when: "on_failure".to_owned(),
            artifact_format: "gzip".to_owned(),
            artifact_type: "junit".to_owned(),
            ..Artifact::default()
        }];
        payload.dependencies = vec![
            Dependency {
                id: 5,
                name: "with".to_owned(),
                token: Secret::new("t"),
                artifacts_file: Some(ArtifactsFile {
                    filename: "artifacts.zip".to_owned(),
                    size: 10,
                }),
            },
            Dependency {
                id: 6,
                name: "without".to_owned(),
                ..Dependency::default()
            },
        ];
        let job = build(&payload).unwrap();
        assert_eq!(job.artifacts[0].name, "artifacts");
        assert_eq!(job.artifacts[0].when, When::OnFailure);
        assert_eq!(job.artifacts[0].artifact_format, ArtifactFormat::Gzip);
        assert_eq!(job.dependencies.len(), 1);
        assert_eq!(job.dependencies[0].id, 5);

        payload.artifacts[0].artifact_format = "tarzstd".to_owned();
        assert!(build(&payload).unwrap_err().contains("artifact_format"));
    }

    #[test]
    fn the_job_file_round_trips() {
        let job = build(&payload()).unwrap();
        assert_eq!(HelperJob::from_json(&job.to_json()).unwrap(), job);
    }
}
