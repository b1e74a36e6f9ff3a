//! podfleet's image cache: a pull-through OCI registry proxy for ephemeral executors.
//!
//! Module map: `config` (TOML file + flags), `cli` (clap structs, `run`), `server` (HTTP,
//! routing, client auth, metrics endpoint), `manifests` (tag TTL, HEAD revalidation,
//! stale-if-error), `blobs` (single-flight download teed to disk and clients, digest check
//! before commit, pass-through), `storage` (content-addressed files, quota/LRU, GC),
//! `upstream` (HTTP client, basic and bearer-token auth), `reference` and `manifest`
//! (validation of names, digests and manifests), `registries_conf` (client drop-in),
//! `tls` (HTTPS serving with rustls).

pub mod blobs;
pub mod cli;
pub mod config;
pub mod error;
pub mod manifest;
pub mod manifests;
pub mod metrics;
pub mod reference;
pub mod registries_conf;
pub mod server;
pub mod storage;
pub mod tls;
pub mod upstream;

pub use registries_conf::{MirrorRoute, render_registries_conf_dropin};
