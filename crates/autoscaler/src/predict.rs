//! Predictive warm capacity: a model of job arrivals per hour of the week, learned from the
//! ledger's per-minute history, that says how many idle slots cover the arrivals expected
//! while a new instance boots. Pure: handed times, never reads a clock.

use chrono::{DateTime, Datelike, Timelike, Utc};

const HOURS_PER_WEEK: usize = 168;
/// Standard deviations of headroom above the expected arrivals. 0: warm capacity covers the
/// expected arrivals of a boot's time and bursts above that are served reactively; the
/// sweep in docs/autoscaler.md shows that more headroom buys little p95 for many
/// instance-hours on bursty (pipeline-stage) arrivals.
const WARM_Z: f64 = 0.0;
/// Where the model knows the hour, surplus idle instances go after this at most: warm
/// capacity is kept by the prediction, not by leftovers of the last burst.
const PREDICTED_IDLE_TIME: std::time::Duration = std::time::Duration::from_secs(300);

/// Per hour-of-week bucket: how many minutes were observed and the sum and sum of squares
/// of the arrivals per minute in them, so both the rate and the burstiness are known.
#[derive(Clone, Debug)]
pub struct ArrivalModel {
    minutes: Vec<f64>,
    sum: Vec<f64>,
    sum_squares: Vec<f64>,
    /// Minute currently being counted (unix minute) and its arrivals so far.
    open_minute: Option<(i64, u32)>,
    /// Last unix minute folded into the buckets.
    observed_until: Option<i64>,
}

impl Default for ArrivalModel {
    fn default() -> Self {
        Self {
            minutes: vec![0.0; HOURS_PER_WEEK],
            sum: vec![0.0; HOURS_PER_WEEK],
            sum_squares: vec![0.0; HOURS_PER_WEEK],
            open_minute: None,
            observed_until: None,
        }
    }
}

fn bucket_of_minute(unix_minute: i64) -> usize {
    let at = DateTime::<Utc>::from_timestamp(unix_minute * 60, 0).unwrap_or_default();
    bucket(at)
}

/// Hour of the week, Monday 00:00 UTC = 0.
pub fn bucket(at: DateTime<Utc>) -> usize {
    at.weekday().num_days_from_monday() as usize * 24 + at.hour() as usize
}

impl ArrivalModel {
    /// A model from the ledger's history (unix minute, arrivals), observed up to `now`.
    pub fn from_history(history: &[(i64, u32)], now: DateTime<Utc>) -> Self {
        let mut model = Self::default();
        if let Some(&(first, _)) = history.first() {
            model.observed_until = Some(first - 1);
        }
        for &(minute, count) in history {
            model.advance_to(minute);
            model.open_minute = Some((minute, count));
        }
        model.advance_to(now.timestamp().div_euclid(60));
        model
    }

    /// Folds every completed minute before `minute` into the buckets (empty minutes count
    /// as zero arrivals, which is what makes the rate a rate).
    fn advance_to(&mut self, minute: i64) {
        let Some(until) = self.observed_until else {
            self.observed_until = Some(minute - 1);
            return;
        };
        let open = self.open_minute.take();
        // Long gaps (the manager was off) are not observed: cap at one week of zeros.
        let from = (until + 1).max(minute - (HOURS_PER_WEEK as i64) * 60);
        for m in from..minute {
            let count = match open {
                Some((open_at, count)) if open_at == m => f64::from(count),
                _ => 0.0,
            };
            let b = bucket_of_minute(m);
            self.minutes[b] += 1.0;
            self.sum[b] += count;
            self.sum_squares[b] += count * count;
        }
        if let Some((open_at, count)) = open
            && open_at >= minute
        {
            self.open_minute = Some((open_at, count));
        }
        self.observed_until = Some(
            self.observed_until
                .map_or(minute - 1, |u| u.max(minute - 1)),
        );
    }

    /// Counts one arrival at `at`.
    pub fn record(&mut self, at: DateTime<Utc>) {
        let minute = at.timestamp().div_euclid(60);
        self.advance_to(minute);
        match &mut self.open_minute {
            Some((open_at, count)) if *open_at == minute => *count += 1,
            _ => self.open_minute = Some((minute, 1)),
        }
    }

    /// Whether the hour of `at` has been seen at least a whole hour in earlier weeks.
    pub fn knows(&self, at: DateTime<Utc>) -> bool {
        self.minutes[bucket(at)] >= 60.0
    }

    /// Idle slots that cover the arrivals of the next `lead` after `now`: their mean plus
    /// `z` standard deviations (per-minute counts taken as independent; z = 1.645 covers
    /// 95 % of windows), or `None` while the hour has no history.
    pub fn warm_slots(
        &self,
        now: DateTime<Utc>,
        lead: std::time::Duration,
        z: f64,
    ) -> Option<usize> {
        let lead_minutes = (lead.as_secs_f64() / 60.0).max(1.0);
        let middle = now + chrono::Duration::seconds((lead.as_secs() / 2) as i64);
        let b = bucket(middle);
        let minutes = self.minutes[b];
        if minutes < 60.0 {
            return None;
        }
        let mean = self.sum[b] / minutes;
        let variance = (self.sum_squares[b] / minutes - mean * mean).max(0.0);
        let expected = mean * lead_minutes + z * (variance * lead_minutes).sqrt();
        // Below a tenth of a job there is nothing worth keeping warm.
        Some(if expected < 0.1 {
            0
        } else {
            expected.ceil() as usize
        })
    }
}

/// The policy with predictive warm capacity applied: for an hour with history, the idle
/// target is the predicted one and surplus idle instances go after at most five minutes;
/// otherwise the policy is unchanged.
pub fn apply(
    policy: &mut crate::planner::Policy,
    model: &ArrivalModel,
    now: DateTime<Utc>,
    lead: std::time::Duration,
) {
    if let Some(slots) = model.warm_slots(now, lead, WARM_Z) {
        policy.idle_count = slots;
        policy.idle_time = policy.idle_time.min(PREDICTED_IDLE_TIME);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("test time")
    }

    #[test]
    fn learns_busy_and_quiet_hours_of_the_week() {
        let mut model = ArrivalModel::default();
        // Two Mondays: 10:00-11:00 UTC gets a burst of 6 jobs every 10 minutes.
        for day in ["2026-11-23", "2026-11-30"] {
            for minute in (0..60).step_by(10) {
                for _ in 0..6 {
                    model.record(at(&format!("{day}T10:{minute:02}:05Z")));
                }
            }
        }
        let now = at("2026-12-07T09:59:00Z");
        model.record(now); // folds the history up to now
        assert!(model.knows(at("2026-12-07T10:30:00Z")));
        let busy = model
            .warm_slots(at("2026-12-07T10:00:00Z"), Duration::from_secs(120), 0.0)
            .expect("known hour");
        // 0.6 jobs a minute on average: 1.2 expected in a two-minute window.
        assert_eq!(busy, 2);
        let covered = model
            .warm_slots(at("2026-12-07T10:00:00Z"), Duration::from_secs(120), 1.645)
            .expect("known hour");
        // In bursts of 6, covering 95 % of windows takes far more than the mean.
        assert!(covered >= 5, "{covered}");
        let quiet = model
            .warm_slots(at("2026-12-07T03:00:00Z"), Duration::from_secs(120), 1.645)
            .expect("known hour");
        assert_eq!(quiet, 0);
        // A Tuesday hour was observed too (time passed), and had nothing.
        assert_eq!(
            model.warm_slots(at("2026-12-01T10:00:00Z"), Duration::from_secs(120), 1.645),
            Some(0)
        );
        // Saturday was never observed before the first record (model starts 2026-11-23).
        let fresh = ArrivalModel::default();
        assert_eq!(fresh.warm_slots(now, Duration::from_secs(120), 0.0), None);
    }

    #[test]
    fn prediction_replaces_idle_count_only_for_known_hours() {
        let mut model = ArrivalModel::default();
        for minute in 0..60 {
            model.record(at(&format!("2026-11-30T09:{minute:02}:00Z")));
            model.record(at(&format!("2026-11-30T09:{minute:02}:30Z")));
        }
        model.record(at("2026-12-07T08:00:00Z"));
        let policy = crate::planner::Policy {
            idle_count: 1,
            idle_time: Duration::from_secs(1800),
            ..Default::default()
        };
        let mut known = policy.clone();
        apply(
            &mut known,
            &model,
            at("2026-12-07T09:00:00Z"),
            Duration::from_secs(120),
        );
        // Two jobs a minute, two-minute boots: four slots kept warm; leftovers go sooner.
        assert_eq!(known.idle_count, 4);
        assert_eq!(known.idle_time, PREDICTED_IDLE_TIME);
        let mut unknown = policy.clone();
        // Monday 08:00 is the one hour of the week not yet observed.
        apply(
            &mut unknown,
            &model,
            at("2026-12-07T08:00:00Z"),
            Duration::from_secs(120),
        );
        assert_eq!(unknown, policy);
    }

    #[test]
    fn history_from_the_ledger_gives_the_same_model() {
        let mut online = ArrivalModel::default();
        let mut history = Vec::new();
        for minute in [100_000_i64, 100_000, 100_003, 100_090] {
            online.record(DateTime::<Utc>::from_timestamp(minute * 60 + 7, 0).expect("time"));
            match history.last_mut() {
                Some((m, count)) if *m == minute => *count += 1,
                _ => history.push((minute, 1)),
            }
        }
        let now = DateTime::<Utc>::from_timestamp(100_200 * 60, 0).expect("time");
        online.advance_to(now.timestamp() / 60);
        let restored = ArrivalModel::from_history(&history, now);
        assert_eq!(online.sum, restored.sum);
        assert_eq!(online.minutes, restored.minutes);
        assert_eq!(online.sum_squares, restored.sum_squares);
    }
}
