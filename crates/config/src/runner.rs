//! What a loaded runner entry answers beyond its fields: feature flags, the short token, and
//! the one-line summaries printed at start-up.

use crate::kind::parse_go_bool;
use std::path::{Path, PathBuf};

use crate::model::{AutoscalerConfig, Config, RunnerConfig};

/// Where podfleet keeps durable state when `podfleet_state_dir` is unset.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/podfleet";

impl Config {
    /// `podfleet_state_dir`, or [`DEFAULT_STATE_DIR`].
    pub fn state_dir(&self) -> PathBuf {
        self.podfleet_state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    }
}

impl AutoscalerConfig {
    /// The ledger file of this group: `state_file`, or a file in `state_dir` named after the
    /// group's identity (plugin and plugin_config), so the same scale set finds its ledger
    /// again after a token rotation or a rename, and two groups never share one.
    pub fn ledger_path(&self, state_dir: &Path) -> PathBuf {
        if let Some(path) = &self.state_file {
            return path.clone();
        }
        let identity = format!(
            "{}\n{}",
            self.plugin,
            serde_json::Value::Object(self.plugin_config.clone())
        );
        // FNV-1a: stable across Rust releases, unlike std's DefaultHasher.
        let hash = identity
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            });
        let plugin: String = self
            .plugin
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        state_dir.join(format!("ledger-{plugin}-{hash:016x}.redb"))
    }
}

/// Feature flags whose default is not `false`.
///
/// gitlab-runner 19.x defaults `FF_TIMESTAMPS` to true; podfleet keeps it off so job logs stay
/// byte-for-byte comparable with the trace format its coordinator and tests expect.
const FEATURE_FLAG_DEFAULTS: &[(&str, bool)] = &[
    ("FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO", true),
    ("FF_USE_ADAPTIVE_REQUEST_CONCURRENCY", true),
    ("FF_MASK_ALL_DEFAULT_TOKENS", true),
    ("FF_TIMESTAMPS", false),
];

/// Token prefixes GitLab puts before the random part of a token.
const TOKEN_PREFIXES: &[&str] = &["glrt-", "glrtr-", "glcbt-"];

impl RunnerConfig {
    /// Whether a feature flag is on for this runner: `[runners.feature_flags]` wins, then the
    /// last `NAME=value` in `environment` whose value is a Go boolean (`true`/`1`/`false`/`0`,
    /// ...), then the flag's default.
    pub fn feature_flag(&self, name: &str) -> bool {
        if let Some(&value) = self.feature_flags.get(name) {
            return value;
        }
        let from_environment = self.environment.iter().rev().find_map(|entry| {
            let (key, value) = entry.split_once('=')?;
            if key == name {
                parse_go_bool(value)
            } else {
                None
            }
        });
        if let Some(value) = from_environment {
            return value;
        }
        FEATURE_FLAG_DEFAULTS
            .iter()
            .find(|(flag, _)| *flag == name)
            .is_some_and(|(_, default)| *default)
    }

    /// The short token shown in logs, container names and `CI_RUNNER_SHORT_TOKEN`.
    pub fn short_token(&self) -> String {
        short_token(self.token.expose())
    }
}

/// gitlab-runner's `helpers.ShortenToken`: after a known prefix (`glrt-`, `glrtr-`, `glcbt-`,
/// then an optional partition marker `t1_`...), the next 9 characters; a legacy `GR` + 7 hex
/// token keeps its first 17; any other token its first 8.
pub fn short_token(token: &str) -> String {
    let first = |text: &str, count: usize| text.chars().take(count).collect::<String>();
    if token.chars().count() < 8 {
        return token.to_owned();
    }
    let after_prefix = TOKEN_PREFIXES
        .iter()
        .find_map(|prefix| token.strip_prefix(prefix));
    let partitioned = strip_partition(after_prefix.unwrap_or(token));
    match (after_prefix, partitioned) {
        (Some(rest), None) => first(rest, 9),
        (_, Some(rest)) => first(rest, 9),
        (None, None) if is_legacy_registration_token(token) => first(token, 17),
        (None, None) => first(token, 8),
    }
}

/// Strips a partition marker such as `t1_`.
fn strip_partition(token: &str) -> Option<&str> {
    let bytes = token.as_bytes();
    let marked =
        bytes.len() > 3 && bytes[0] == b't' && bytes[1].is_ascii_digit() && bytes[2] == b'_';
    marked.then(|| &token[3..])
}

fn is_legacy_registration_token(token: &str) -> bool {
    token.len() >= 17
        && token.starts_with("GR")
        && token.as_bytes()[2..9].iter().all(u8::is_ascii_hexdigit)
}

impl Config {
    /// One line per runner for start-up logs: name, executor, plugin, limits and tags.
    /// Never prints a secret (no token, no password, no plugin settings).
    pub fn summary_lines(&self) -> Vec<String> {
        self.runners
            .iter()
            .map(|runner| {
                let scaling = runner.autoscaler.as_ref().map_or_else(
                    || "no autoscaler".to_owned(),
                    |autoscaler| {
                        format!(
                            "plugin {}, capacity_per_instance {}, max_instances {}, max_use_count {}",
                            autoscaler.plugin,
                            autoscaler.capacity_per_instance,
                            count_or_unlimited(autoscaler.max_instances),
                            count_or_unlimited(autoscaler.max_use_count),
                        )
                    },
                );
                let tags = if runner.tag_list.is_empty() {
                    "none".to_owned()
                } else {
                    runner.tag_list.join(",")
                };
                format!(
                    "runner {:?}: executor {}, {scaling}, limit {}, tags {tags}, run_untagged {}",
                    runner.name,
                    runner.executor,
                    count_or_unlimited(runner.limit),
                    runner.run_untagged,
                )
            })
            .collect()
    }
}

fn count_or_unlimited(count: u32) -> String {
    if count == 0 {
        "unlimited".to_owned()
    } else {
        count.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_tokens_follow_gitlab_runner() {
        let cases = [
            ("glrt-abcdefghijklmnop", "abcdefghi"),
            ("glrt-t1_abcdefghijklmnop", "abcdefghi"),
            ("t2_abcdefghijklmnop", "abcdefghi"),
            ("glrtr-abcdefghijklmnop", "abcdefghi"),
            ("glcbt-abcdefghijklmnop", "abcdefghi"),
            ("GR1348941abcdefghijklmnop", "GR1348941abcdefgh"),
            ("GRxyz1234abcdefghijklmnop", "GRxyz123"),
            ("0123456789abcdef", "01234567"),
            ("short", "short"),
            ("glrt-abc", "abc"),
        ];
        for (token, short) in cases {
            assert_eq!(short_token(token), short, "{token}");
        }
    }
}
