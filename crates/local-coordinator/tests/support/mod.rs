//! Shared by the integration tests: podfleet's own GitLab client, with fast retries.
#![allow(dead_code)]

use std::time::Duration;

use podfleet_coordinator::model::RunnerInfo;
use podfleet_coordinator::{Client, ClientOptions, RetryPolicy};

/// A client reporting `info`, retrying after 1–5 ms.
pub fn client_with(url: &str, info: RunnerInfo) -> Client {
    Client::with_options(
        url,
        "s_0123456789ab",
        info,
        ClientOptions {
            retry: RetryPolicy {
                backoff_base: Duration::from_millis(1),
                backoff_max: Duration::from_millis(5),
                ..RetryPolicy::default()
            },
            ..ClientOptions::default()
        },
    )
    .expect("valid url")
}

/// A client reporting what podfleet's manager reports.
pub fn client(url: &str) -> Client {
    client_with(url, RunnerInfo::podfleet("docker-autoscaler", "bash"))
}
