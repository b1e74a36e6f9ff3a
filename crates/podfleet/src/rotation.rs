//! Runner token rotation, as gitlab-runner does it: a token with an expiry is reset at
//! `obtained_at + 0.75 × (expires_at − obtained_at)`; the new token is used from the next job
//! request on and written back into the config file (only the runner's token lines change).

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use podfleet_config::rewrite::{RotatedToken, store_rotated_token};
use podfleet_config::{RunnerConfig, Secret};
use podfleet_coordinator::Client;
use podfleet_coordinator::model::RunnerInfo;
use podfleet_manager::RunnerTokens;

/// gitlab-runner's `TokenResetIntervalFactor`.
const RESET_AT_FRACTION: f64 = 0.75;

/// How long to wait before trying a failed reset again (the token still works meanwhile).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// When the token obtained at `obtained_at` and expiring at `expires_at` is due for a reset;
/// `None` when it does not expire. A token whose obtain time is unknown is due at once.
pub fn reset_due(
    obtained_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    let expires_at = expires_at.filter(|at| *at > DateTime::UNIX_EPOCH)?;
    let Some(obtained_at) = obtained_at.filter(|at| *at > DateTime::UNIX_EPOCH) else {
        return Some(DateTime::UNIX_EPOCH);
    };
    let lifetime = (expires_at - obtained_at).num_milliseconds().max(0) as f64;
    Some(obtained_at + chrono::Duration::milliseconds((lifetime * RESET_AT_FRACTION) as i64))
}

/// A config date-time (TOML date-time or RFC 3339 string); the zero time means "never".
fn parse_time(text: Option<&str>) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text?)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

/// Starts one rotation task per runner whose token expires.
pub fn spawn(
    config_path: PathBuf,
    runners: &[RunnerConfig],
    tokens: RunnerTokens,
    system_id: &str,
) {
    for runner in runners {
        let expires_at = parse_time(runner.token_expires_at.as_deref());
        if reset_due(None, expires_at).is_none() {
            continue;
        }
        let shell = runner.shell.clone().unwrap_or_else(|| "sh".into());
        let client = match Client::new(
            &runner.url,
            system_id.to_owned(),
            RunnerInfo::podfleet("docker-autoscaler", &shell),
        ) {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(runner = %runner.name, error = %e, "token rotation disabled");
                continue;
            }
        };
        let rotation = Rotation {
            runner: runner.name.clone(),
            obtained_at: parse_time(runner.token_obtained_at.as_deref()),
            expires_at,
            config_path: config_path.clone(),
            tokens: tokens.clone(),
            client,
        };
        tokio::spawn(rotation.run());
    }
}

struct Rotation {
    runner: String,
    obtained_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    config_path: PathBuf,
    tokens: RunnerTokens,
    client: Client,
}

impl Rotation {
    async fn run(mut self) {
        // Not before the manager has verified the runner with the token it started with.
        self.tokens.serving(&self.runner).await;
        while let Some(due) = reset_due(self.obtained_at, self.expires_at) {
            let wait = (due - Utc::now()).to_std().unwrap_or_default();
            tracing::info!(runner = %self.runner, due = %due.to_rfc3339(), "runner token reset scheduled");
            tokio::time::sleep(wait).await;
            let Some(current) = self.tokens.get(&self.runner) else {
                return;
            };
            match self.client.reset_token(current.expose()).await {
                Ok(reset) => {
                    let now = Utc::now();
                    let new_token = reset.token.expose().to_owned();
                    // The old token stops working now: use the new one before anything else.
                    self.tokens
                        .set(&self.runner, Secret::new(new_token.clone()));
                    let rotated = RotatedToken {
                        token: &new_token,
                        obtained_at: now,
                        expires_at: reset.token_expires_at,
                    };
                    match store_rotated_token(&self.config_path, current.expose(), &rotated) {
                        Ok(()) => tracing::info!(
                            runner = %self.runner,
                            config = %self.config_path.display(),
                            "runner token reset and saved"
                        ),
                        Err(e) => tracing::error!(
                            runner = %self.runner,
                            error = %e,
                            "runner token reset, but saving it failed: this process keeps \
                             working, a restart would use the old, now invalid token"
                        ),
                    }
                    self.obtained_at = Some(now);
                    self.expires_at = reset.token_expires_at;
                }
                Err(e) if e.status() == Some(403) => {
                    tracing::error!(
                        runner = %self.runner,
                        "the coordinator refused to reset the runner token (403): the token was \
                         revoked or already expired; create a new runner token in GitLab"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(runner = %self.runner, error = %e, "runner token reset failed; trying again in 60s");
                    tokio::time::sleep(RETRY_AFTER_FAILURE).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn reset_falls_at_three_quarters_of_the_lifetime() {
        assert_eq!(
            reset_due(
                Some(at("2026-01-01T00:00:00Z")),
                Some(at("2026-01-05T00:00:00Z"))
            ),
            Some(at("2026-01-04T00:00:00Z"))
        );
    }

    #[test]
    fn tokens_without_expiry_are_never_reset_and_unknown_obtain_times_reset_at_once() {
        assert_eq!(reset_due(Some(at("2026-01-01T00:00:00Z")), None), None);
        let zero = parse_time(Some("0001-01-01T00:00:00Z"));
        assert_eq!(reset_due(None, zero), None, "gitlab-runner's zero time");
        assert_eq!(
            reset_due(None, Some(at("2026-01-05T00:00:00Z"))),
            Some(DateTime::UNIX_EPOCH)
        );
    }
}
