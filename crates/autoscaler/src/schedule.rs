//! Which policy is in force: `[[runners.autoscaler.policy]]` entries with their periods and
//! time zones; the last entry with a period covering the current minute wins, as in the
//! incumbent, and no match means no idle capacity.

use chrono::{DateTime, Utc};
use podfleet_config::schedule::{Period, Tz};

use crate::planner::Policy;

/// One policy entry with when it applies.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduledPolicy {
    pub periods: Vec<Period>,
    /// `None`: the host's time zone.
    pub timezone: Option<Tz>,
    pub policy: Policy,
}

impl ScheduledPolicy {
    /// A policy in force at every minute.
    pub fn always(policy: Policy) -> Self {
        Self {
            periods: vec![
                podfleet_config::schedule::parse_period("* * * * *")
                    .expect("the every-minute period parses"),
            ],
            timezone: Some(Tz::UTC),
            policy,
        }
    }

    pub fn is_active(&self, at: DateTime<Utc>) -> bool {
        self.periods.iter().any(|p| p.is_active(at, self.timezone))
    }
}

/// The policy in force at `at`.
pub fn policy_at(schedules: &[ScheduledPolicy], at: DateTime<Utc>) -> Policy {
    schedules
        .iter()
        .rev()
        .find(|s| s.is_active(at))
        .map(|s| s.policy.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use podfleet_config::schedule::{parse_period, parse_timezone};

    fn scheduled(period: &str, zone: &str, idle_count: usize) -> ScheduledPolicy {
        ScheduledPolicy {
            periods: vec![parse_period(period).expect("valid")],
            timezone: parse_timezone(zone).expect("valid"),
            policy: Policy {
                idle_count,
                ..Policy::default()
            },
        }
    }

    #[test]
    fn the_last_matching_policy_wins() {
        let schedules = [
            scheduled("* * * * *", "UTC", 1),
            scheduled("* 8-17 * * mon-fri", "Europe/Berlin", 5),
            scheduled("* 12 * * *", "Europe/Berlin", 2),
        ];
        let at = |t: &str| t.parse::<DateTime<Utc>>().expect("test time");
        // Friday 2026-12-04: 10:00 UTC is 11:00 in Berlin (office hours).
        assert_eq!(
            policy_at(&schedules, at("2026-12-04T10:00:00Z")).idle_count,
            5
        );
        // 11:30 UTC is 12:30 in Berlin: the lunch entry comes last and wins.
        assert_eq!(
            policy_at(&schedules, at("2026-12-04T11:30:00Z")).idle_count,
            2
        );
        // Saturday morning: only the catch-all.
        assert_eq!(
            policy_at(&schedules, at("2026-12-05T08:00:00Z")).idle_count,
            1
        );
        // No entry at all: no idle capacity.
        assert_eq!(
            policy_at(&[], at("2026-12-05T08:00:00Z")),
            Policy::default()
        );
    }
}
