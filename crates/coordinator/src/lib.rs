//! The GitLab runner API client: the only crate that knows GitLab's JSON.
//!
//! [`model`] holds the wire types, [`Client`] makes the calls (with gitlab-runner's URL
//! handling, headers and retries), and [`JobTrace`] streams one job's log and sends its final
//! update. Masking the log is the caller's job: write only masked bytes into a [`JobTrace`].

pub mod artifacts;
mod client;
mod error;
pub mod model;
mod retry;
mod trace;

pub use client::{
    Client, ClientOptions, Exchange, PatchResponse, RequestObserver, UpdateResponse, api_base_url,
};
pub use error::CoordinatorError;
pub use retry::RetryPolicy;
pub use trace::{JobOutcome, JobTrace, JobTraceOptions, RemoteState, TraceWriter, format_checksum};
