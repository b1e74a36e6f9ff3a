//! What `[[runners.autoscaler.policy]]` `periods` and `timezone` mean: 5-field cron
//! expressions (taskscaler's form) evaluated minute by minute in an IANA time zone. The
//! readers in `kind.rs` validate with these functions and the autoscaler evaluates with the
//! values they return, so a period that loads is exactly a period that runs.

use chrono::{DateTime, TimeZone, Timelike, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

pub use chrono_tz::Tz;

/// A parsed `periods` entry.
#[derive(Clone, Debug)]
pub struct Period {
    cron: Cron,
    text: String,
}

/// Two periods are the same when written the same.
impl PartialEq for Period {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl PartialEq<&str> for Period {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl Period {
    /// Whether the period covers the minute that contains `at`, read in `timezone`
    /// (`None`: the manager's local time zone, as gitlab-runner does).
    pub fn is_active(&self, at: DateTime<Utc>, timezone: Option<Tz>) -> bool {
        // Periods have no seconds field; croner then matches second 0 only, so the
        // minute is what is compared.
        let minute = at
            .with_second(0)
            .and_then(|t| t.with_nanosecond(0))
            .unwrap_or(at);
        let matching = match timezone {
            Some(zone) => self.cron.is_time_matching(&minute.with_timezone(&zone)),
            None => self
                .cron
                .is_time_matching(&minute.with_timezone(&chrono::Local)),
        };
        matching.unwrap_or(false)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Parses one 5-field cron expression: minute hour day-of-month month day-of-week, with
/// `*`, `-`, `/`, `,`, and `jan`..`dec` / `sun`..`sat` names.
pub fn parse_period(text: &str) -> Result<Period, String> {
    let fields = text.split_whitespace().count();
    if fields != 5 {
        return Err(format!(
            "has {fields} fields, a period has 5 (minute hour day-of-month month day-of-week)"
        ));
    }
    let parser = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build();
    let cron = parser.parse(text).map_err(|e| {
        e.to_string()
            .trim_end_matches('.')
            .to_lowercase()
            .replace("cronpattern", "the expression")
    })?;
    Ok(Period {
        cron,
        text: text.to_owned(),
    })
}

/// Parses an IANA time zone name; `Local` (Go's name for the host's zone) gives `None`.
pub fn parse_timezone(text: &str) -> Result<Option<Tz>, String> {
    if text == "Local" {
        return Ok(None);
    }
    text.parse::<Tz>()
        .map(Some)
        .map_err(|_| format!("{text:?} is not an IANA time zone name"))
}

/// The UTC instant of a wall-clock time in `timezone`, for tests and the simulator's
/// start time (the earliest one when a DST change makes it ambiguous).
pub fn utc_of(timezone: Tz, naive: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
    timezone
        .from_local_datetime(&naive)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("test time")
    }

    #[test]
    fn office_hours_in_berlin() {
        let period = parse_period("* 7-19 * * mon-fri").expect("valid");
        let berlin = parse_timezone("Europe/Berlin").expect("valid");
        // Friday 2026-12-04 06:30 UTC is 07:30 in Berlin (CET, UTC+1).
        assert!(period.is_active(at("2026-12-04T06:30:45Z"), berlin));
        // 05:59 UTC is 06:59 in Berlin: before the period.
        assert!(!period.is_active(at("2026-12-04T05:59:59Z"), berlin));
        // Saturday.
        assert!(!period.is_active(at("2026-12-05T10:00:00Z"), berlin));
        // In UTC the same instant is outside the period.
        assert!(!period.is_active(at("2026-12-04T06:30:00Z"), Some(Tz::UTC)));
    }

    #[test]
    fn steps_lists_and_names() {
        let period = parse_period("*/15 9,17 1-7 jan,dec *").expect("valid");
        assert!(period.is_active(at("2026-12-03T17:45:10Z"), Some(Tz::UTC)));
        assert!(!period.is_active(at("2026-12-03T17:44:00Z"), Some(Tz::UTC)));
        assert!(!period.is_active(at("2026-11-03T17:45:00Z"), Some(Tz::UTC)));
    }

    #[test]
    fn bad_periods_say_what_is_wrong() {
        for bad in [
            "* * * *",
            "* * * * * *",
            "61 * * * *",
            "* 25 * * *",
            "* * * * funday",
            "",
        ] {
            let error = parse_period(bad).expect_err(bad);
            assert!(!error.is_empty(), "{bad}");
        }
        assert!(parse_timezone("Mars/Olympus").is_err());
        assert_eq!(parse_timezone("Local").expect("valid"), None);
    }
}
