//! Counters of the cache, rendered as Prometheus text on `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub manifest_hits: AtomicU64,
    pub manifest_misses: AtomicU64,
    pub blob_hits: AtomicU64,
    pub blob_misses: AtomicU64,
    /// Requests that joined a blob download already in flight instead of starting one.
    pub coalesced_waits: AtomicU64,
    pub upstream_bytes: AtomicU64,
    pub upstream_requests: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub served_bytes: AtomicU64,
    pub revalidations: AtomicU64,
    pub stale_served: AtomicU64,
    pub evictions: AtomicU64,
    pub evicted_bytes: AtomicU64,
    pub gc_removed: AtomicU64,
    /// Blobs streamed from upstream without caching (too big, disk full, storage error).
    pub passthrough: AtomicU64,
    /// Upstream content rejected: digest mismatch, size mismatch, malformed manifest.
    pub rejected: AtomicU64,
    pub stored_bytes: AtomicU64,
}

pub fn add(counter: &AtomicU64, value: u64) {
    counter.fetch_add(value, Ordering::Relaxed);
}

impl Metrics {
    pub fn render(&self) -> String {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP podfleet_cache_{name} {help}");
            let _ = writeln!(out, "# TYPE podfleet_cache_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "podfleet_cache_{name}{labels} {value}");
            }
        };
        metric(
            "hits_total",
            "counter",
            "Requests answered from the cache.",
            &[
                ("{type=\"manifest\"}", get(&self.manifest_hits)),
                ("{type=\"blob\"}", get(&self.blob_hits)),
            ],
        );
        metric(
            "misses_total",
            "counter",
            "Requests that needed the upstream.",
            &[
                ("{type=\"manifest\"}", get(&self.manifest_misses)),
                ("{type=\"blob\"}", get(&self.blob_misses)),
            ],
        );
        metric(
            "coalesced_waits_total",
            "counter",
            "Blob requests that shared a download already in flight.",
            &[("", get(&self.coalesced_waits))],
        );
        metric(
            "upstream_bytes_total",
            "counter",
            "Body bytes received from upstreams.",
            &[("", get(&self.upstream_bytes))],
        );
        metric(
            "upstream_requests_total",
            "counter",
            "Requests sent to upstreams (token requests excluded).",
            &[("", get(&self.upstream_requests))],
        );
        metric(
            "upstream_errors_total",
            "counter",
            "Upstream requests that failed (connect, timeout, 5xx, 429).",
            &[("", get(&self.upstream_errors))],
        );
        metric(
            "served_bytes_total",
            "counter",
            "Body bytes sent to clients.",
            &[("", get(&self.served_bytes))],
        );
        metric(
            "revalidations_total",
            "counter",
            "Tag revalidations (HEAD) sent upstream.",
            &[("", get(&self.revalidations))],
        );
        metric(
            "stale_served_total",
            "counter",
            "Tags served from the cache because the upstream failed.",
            &[("", get(&self.stale_served))],
        );
        metric(
            "evictions_total",
            "counter",
            "Objects evicted to stay under the quota.",
            &[("", get(&self.evictions))],
        );
        metric(
            "evicted_bytes_total",
            "counter",
            "Bytes evicted to stay under the quota.",
            &[("", get(&self.evicted_bytes))],
        );
        metric(
            "gc_removed_total",
            "counter",
            "Unreferenced objects removed by garbage collection.",
            &[("", get(&self.gc_removed))],
        );
        metric(
            "passthrough_total",
            "counter",
            "Blobs streamed without caching (too big, disk full).",
            &[("", get(&self.passthrough))],
        );
        metric(
            "rejected_total",
            "counter",
            "Upstream content rejected (digest or size mismatch, malformed manifest).",
            &[("", get(&self.rejected))],
        );
        metric(
            "stored_bytes",
            "gauge",
            "Bytes of cached content on disk.",
            &[("", get(&self.stored_bytes))],
        );
        out
    }
}
