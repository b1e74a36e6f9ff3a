//! When and how long to wait before repeating an API call (§1 "Retries").

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::HeaderMap;

/// How the client repeats calls that the server answered with a retryable status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (gitlab-runner: 5).
    pub max_attempts: u32,
    /// First exponential backoff step (gitlab-runner: 100 ms); tests shrink it.
    pub backoff_base: Duration,
    /// Upper bound of one exponential backoff step (gitlab-runner: 60 s).
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// 408, 429, 500, 502, 503, 504 and anything from 512 up are retried.
pub(crate) fn is_retryable(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504) || status >= 512
}

/// The wait before the next attempt, after `attempt` (1-based) got a retryable answer:
/// `RateLimit-ResetTime` if present and valid, else `Retry-After` seconds, else exponential
/// backoff with jitter.
pub(crate) fn wait_before_retry(
    policy: &RetryPolicy,
    attempt: u32,
    headers: &HeaderMap,
    now: DateTime<Utc>,
) -> Duration {
    if let Some(reset_at) = header_text(headers, "ratelimit-resettime")
        .and_then(|text| DateTime::parse_from_rfc2822(text).ok())
    {
        let wait = reset_at.with_timezone(&Utc) - now;
        return wait.to_std().unwrap_or(Duration::ZERO);
    }
    if let Some(seconds) =
        header_text(headers, "retry-after").and_then(|text| text.trim().parse::<u64>().ok())
    {
        return Duration::from_secs(seconds);
    }
    exponential_backoff(policy.backoff_base, policy.backoff_max, attempt)
}

/// `base × 2^(attempt−1)`, jittered into `[base, that]` as gitlab-runner's backoff library
/// does, and capped at `max`.
pub(crate) fn exponential_backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    let ceiling = base.saturating_mul(factor).min(max);
    if ceiling <= base {
        return ceiling;
    }
    let spread = ceiling - base;
    base + spread.mul_f64(rand::random::<f64>())
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-05-01T10:00:00Z")
            .expect("valid date")
            .with_timezone(&Utc)
    }

    #[test]
    fn retryable_statuses_match_gitlab_runner() {
        for status in [408, 429, 500, 502, 503, 504, 512, 599] {
            assert!(is_retryable(status), "{status}");
        }
        for status in [
            200, 201, 204, 400, 401, 403, 404, 409, 412, 416, 501, 505, 511,
        ] {
            assert!(!is_retryable(status), "{status}");
        }
    }

    #[test]
    fn rate_limit_reset_time_wins_over_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "RateLimit-ResetTime",
            HeaderValue::from_static("Wed, 01 May 2024 10:00:07 GMT"),
        );
        headers.insert("Retry-After", HeaderValue::from_static("60"));
        let wait = wait_before_retry(&RetryPolicy::default(), 1, &headers, now());
        assert_eq!(wait, Duration::from_secs(7));
    }

    #[test]
    fn invalid_reset_time_falls_back_to_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert("RateLimit-ResetTime", HeaderValue::from_static("soon"));
        headers.insert("Retry-After", HeaderValue::from_static("3"));
        let wait = wait_before_retry(&RetryPolicy::default(), 1, &headers, now());
        assert_eq!(wait, Duration::from_secs(3));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        assert_eq!(exponential_backoff(base, max, 1), base);
        for attempt in 2..=4 {
            let wait = exponential_backoff(base, max, attempt);
            let ceiling = base * 2u32.pow(attempt - 1);
            assert!(wait >= base && wait <= ceiling, "{attempt}: {wait:?}");
        }
        assert!(exponential_backoff(base, max, 30) <= max);
    }
}
