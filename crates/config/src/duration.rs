//! Go-style durations (`"30m0s"`, `"1h30m"`, `"500ms"`), as gitlab-runner writes them.

use std::time::Duration;

const NANOS_PER_UNIT: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("\u{b5}s", 1_000),  // micro sign
    ("\u{3bc}s", 1_000), // greek mu
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Parses a duration the way Go's `time.ParseDuration` does: a sequence of decimal numbers,
/// each with an optional fraction and a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), such as
/// `"30m0s"`, `"1h30m"`, `"1.5s"` or `"500ms"`; `"0"` alone needs no unit.
///
/// Unlike Go, a negative duration is an error: nothing in the config can wait a negative time.
/// Integer seconds (`check_interval = 3`) are TOML integers, not strings, and are handled by the
/// config walker, not here.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = |why: &str| format!("{text:?} is not a Go duration: {why}");
    let mut rest = text;
    if let Some(stripped) = rest.strip_prefix('+') {
        rest = stripped;
    } else if let Some(stripped) = rest.strip_prefix('-') {
        if stripped.chars().all(|c| c == '0') && !stripped.is_empty() {
            return Ok(Duration::ZERO);
        }
        return Err(invalid("it is negative"));
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid("it is empty"));
    }
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let integer_digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (integer, after_integer) = rest.split_at(integer_digits);
        let (fraction, after_number) = match after_integer.strip_prefix('.') {
            Some(after_dot) => {
                let fraction_digits = after_dot.bytes().take_while(u8::is_ascii_digit).count();
                after_dot.split_at(fraction_digits)
            }
            None => ("", after_integer),
        };
        if integer.is_empty() && fraction.is_empty() {
            return Err(invalid("expected a number"));
        }
        let unit_length = after_number
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after_number.len());
        let (unit, remainder) = after_number.split_at(unit_length);
        if unit.is_empty() {
            return Err(invalid(
                "a number is missing its unit (ns, us, ms, s, m or h)",
            ));
        }
        let Some(&(_, unit_nanos)) = NANOS_PER_UNIT.iter().find(|(name, _)| *name == unit) else {
            return Err(invalid(&format!(
                "unknown unit {unit:?} (use ns, us, ms, s, m or h)"
            )));
        };
        let too_large = || invalid("it is too large");
        let whole: u128 = if integer.is_empty() {
            0
        } else {
            integer.parse().map_err(|_| too_large())?
        };
        let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(too_large)?;
        // Digits past the 18th cannot change a nanosecond count; dropping them keeps the
        // arithmetic in range.
        let fraction = &fraction[..fraction.len().min(18)];
        if !fraction.is_empty() {
            let numerator: u128 = fraction.parse().map_err(|_| too_large())?;
            let denominator = 10u128.pow(u32::try_from(fraction.len()).unwrap_or(18));
            nanos += numerator * unit_nanos / denominator;
        }
        total_nanos = total_nanos.checked_add(nanos).ok_or_else(too_large)?;
        rest = remainder;
    }
    let seconds =
        u64::try_from(total_nanos / 1_000_000_000).map_err(|_| invalid("it is too large"))?;
    let subsec = u32::try_from(total_nanos % 1_000_000_000).unwrap_or(0);
    Ok(Duration::new(seconds, subsec))
}

/// Formats a duration the way Go's `Duration.String` does (`"30m0s"`, `"1h0m0s"`, `"1.5s"`,
/// `"500ms"`), so that what podfleet prints matches what gitlab-runner users know.
pub fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    if nanos < 1_000_000_000 {
        let (unit, per_unit) = if nanos < 1_000 {
            ("ns", 1)
        } else if nanos < 1_000_000 {
            ("µs", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        return format!("{}{unit}", decimal(nanos, per_unit));
    }
    let hours = nanos / 3_600_000_000_000;
    let minutes = (nanos / 60_000_000_000) % 60;
    let second_nanos = nanos % 60_000_000_000;
    let seconds = decimal(second_nanos, 1_000_000_000);
    if hours > 0 {
        format!("{hours}h{minutes}m{seconds}s")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

/// `value / per_unit` written with the shortest exact decimal fraction.
fn decimal(value: u128, per_unit: u128) -> String {
    let whole = value / per_unit;
    let remainder = value % per_unit;
    if remainder == 0 {
        return whole.to_string();
    }
    let width = per_unit.to_string().len() - 1;
    let fraction = format!("{remainder:0width$}");
    format!("{whole}.{}", fraction.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        let cases = [
            ("30m0s", Duration::from_secs(1800)),
            ("1h30m", Duration::from_secs(5400)),
            ("60s", Duration::from_secs(60)),
            ("10m", Duration::from_secs(600)),
            ("500ms", Duration::from_millis(500)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("1.5s", Duration::from_millis(1500)),
            (".5h", Duration::from_secs(1800)),
            ("2h45m30.5s", Duration::from_millis(9_930_500)),
            ("+5s", Duration::from_secs(5)),
            ("-0", Duration::ZERO),
            ("1us", Duration::from_micros(1)),
            ("1µs", Duration::from_micros(1)),
            ("1μs", Duration::from_micros(1)),
            ("3ns", Duration::from_nanos(3)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn bad_durations_say_why() {
        let cases = [
            ("", "empty"),
            ("30", "missing its unit"),
            ("10 m", "unknown unit \" m\""),
            ("30x", "unknown unit \"x\""),
            ("1d", "unknown unit \"d\""),
            ("-5s", "negative"),
            ("m", "expected a number"),
            ("1h.", "expected a number"),
            ("99999999999999999999999h", "too large"),
            ("thirty minutes", "expected a number"),
        ];
        for (text, why) in cases {
            let error = parse_duration(text).expect_err(text);
            assert!(error.contains(why), "{text}: {error}");
            assert!(error.starts_with(&format!("{text:?}")), "{error}");
        }
    }

    #[test]
    fn formatting_matches_go() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(1800), "30m0s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(10), "10s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_micros(1500), "1.5ms"),
            (Duration::from_nanos(7), "7ns"),
        ];
        for (duration, text) in cases {
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text), Ok(duration), "round trip of {text}");
        }
    }
}
