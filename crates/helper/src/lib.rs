//! podfleet's helper: what gitlab-runner's helper image does, from podfleet's own binary.
//!
//! Two sides share this crate. The manager/executor side turns a job payload into a
//! [`HelperJob`] (variables resolved, cache keys sanitised, S3 URLs presigned), decides which
//! [`Stage`]s have work, and ships the helper image ([`image`]) to an instance. The helper
//! side is `podfleet helper <stage> <job-file>` ([`cli`]), run inside the helper container
//! with the build volume at the project dir and the cache volume at `/cache`: it fetches
//! sources with git ([`sources`]), restores and saves caches ([`cache`]) and downloads and
//! uploads artifacts ([`artifacts`]) straight to and from the coordinator with the job token.
//!
//! Invariant: no path taken from a payload, an archive or a cache key is ever written
//! outside the project dir or the cache dir ([`paths`] checks every one).

mod archive;
pub mod artifacts;
pub mod cache;
mod cache_key;
pub mod cli;
mod expand;
pub mod image;
mod job;
mod mask;
pub mod paths;
mod s3;
pub mod sources;
mod stage;
mod tar;
pub mod zip;

pub use job::{
    ArtifactFormat, ArtifactSpec, CachePolicy, CacheSpec, DEFAULT_CACHE_DIR, DependencySpec,
    GitStrategy, HelperJob, PayloadError, RemoteCache, Sources, SubmoduleStrategy, When,
};
pub use s3::{Credentials as S3Credentials, Endpoint as S3Endpoint, SharedCache, presign_url};
pub use stage::{BINARY_PATH, EXIT_BAD_INPUT, EXIT_STAGE_FAILED, STAGE_END_MARKER, Stage};
