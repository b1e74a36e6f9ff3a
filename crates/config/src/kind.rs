//! Readers: one per kind of value a key may hold (string, integer seconds, Go duration,
//! list of strings, map, section, ...). Each reads a [`Field`], reports what is wrong with it
//! to the [`Walker`] and returns the typed value, or the key's default when the key is absent
//! or unusable, so the walk goes on and finds every other problem too.
//!
//! Messages name the expected kind and what was found, never the value of a secret.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use toml_edit::{Item, TableLike, Value};

use crate::duration::parse_duration;
use crate::model::PullPolicy;
use crate::problem::Position;
use crate::schedule::{self, Period, Tz};
use crate::secret::Secret;
use crate::walk::{
    Field, Section, TableView, Walker, defaults, found, found_value, join_path, read_section,
};

const DURATION_FIX: &str = "use a Go duration such as \"30m0s\", \"1h30m\" or \"10s\"";

fn wrong_type(walker: &mut Walker<'_>, field: &Field<'_>, expected: &str, fix: String) {
    let found = field.item.map_or("nothing", found);
    walker.error(
        field.at,
        &field.path,
        format!("must be {expected}, found {found}"),
        fix,
    );
}

fn missing(walker: &mut Walker<'_>, field: &Field<'_>, example: &str) {
    walker.error(
        field.at,
        &field.path,
        "is missing".to_owned(),
        format!("add {} = {example}", field.key),
    );
}

/// Shows a value in a message, shortened, for keys whose values are not secret.
fn shown(text: &str) -> String {
    const LIMIT: usize = 60;
    if text.chars().count() <= LIMIT {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(LIMIT).collect();
        format!("{head:?}…")
    }
}

fn value<'a>(field: &Field<'a>) -> Option<&'a Value> {
    field.item.and_then(Item::as_value)
}

// ---------------------------------------------------------------- strings

fn get_str<'a>(walker: &mut Walker<'_>, field: &Field<'a>) -> Option<&'a str> {
    field.item?;
    match value(field) {
        Some(Value::String(text)) => Some(text.value().as_str()),
        _ => {
            let fix = format!("put the value in quotes: {} = \"...\"", field.key);
            wrong_type(walker, field, "a string", fix);
            None
        }
    }
}

pub fn string(walker: &mut Walker<'_>, field: &Field<'_>) -> String {
    get_str(walker, field).unwrap_or_default().to_owned()
}

pub fn opt_string(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<String> {
    get_str(walker, field).map(str::to_owned)
}

pub fn opt_path(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<PathBuf> {
    get_str(walker, field).map(PathBuf::from)
}

/// A string that must be present and not empty; `example` is shown in the fix.
pub fn required_string(example: &'static str) -> impl Fn(&mut Walker<'_>, &Field<'_>) -> String {
    move |walker, field| {
        if field.item.is_none() {
            missing(walker, field, example);
            return String::new();
        }
        let text = get_str(walker, field).unwrap_or_default();
        if text.is_empty() && value(field).is_some_and(Value::is_str) {
            walker.error(
                field.at,
                &field.path,
                "must not be empty".to_owned(),
                format!("set {} = {example}", field.key),
            );
        }
        text.to_owned()
    }
}

/// The GitLab URL: required, and http(s) unless it is left to `$VAR` expansion.
pub fn gitlab_url(walker: &mut Walker<'_>, field: &Field<'_>) -> String {
    let url = required_string("\"https://gitlab.example.com\"")(walker, field);
    let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
    if !url.is_empty() && !scheme_ok && !url.contains('$') {
        walker.error(
            field.at,
            &field.path,
            "must be an http:// or https:// URL".to_owned(),
            "write the GitLab address with its scheme, e.g. url = \"https://gitlab.example.com\""
                .to_owned(),
        );
    }
    url
}

/// A string from a closed set of values.
pub fn opt_one_of(
    allowed: &'static [&'static str],
) -> impl Fn(&mut Walker<'_>, &Field<'_>) -> Option<String> {
    move |walker, field| {
        let text = get_str(walker, field)?;
        if !allowed.contains(&text) {
            walker.error(
                field.at,
                &field.path,
                format!("{} is not one of {}", shown(text), allowed.join(", ")),
                format!("set {} to one of: {}", field.key, allowed.join(", ")),
            );
            return None;
        }
        Some(text.to_owned())
    }
}

pub const EXECUTOR: &str = "docker-autoscaler";

/// `connector_config.protocol`: podfleet reaches instances over SSH only.
pub fn connector_protocol(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<String> {
    let protocol = get_str(walker, field)?;
    if protocol != "ssh" {
        walker.error(
            field.at,
            &field.path,
            format!(
                "podfleet connects to instances over ssh only, not {}",
                shown(protocol)
            ),
            "set protocol = \"ssh\" or remove the key".to_owned(),
        );
        return None;
    }
    Some(protocol.to_owned())
}

pub fn executor(walker: &mut Walker<'_>, field: &Field<'_>) -> String {
    let executor = required_string("\"docker-autoscaler\"")(walker, field);
    if !executor.is_empty() && executor != EXECUTOR {
        walker.error(
            field.at,
            &field.path,
            format!(
                "podfleet runs only the {EXECUTOR} executor, not {}",
                shown(&executor)
            ),
            format!(
                "set executor = \"{EXECUTOR}\" and describe the instances in [runners.autoscaler]"
            ),
        );
    }
    executor
}

/// Type errors never echo a value (see [`wrong_type`]), so a secret written without quotes is
/// not repeated back either.
fn get_secret(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<Secret> {
    get_str(walker, field).map(|text| Secret::new(text.to_owned()))
}

pub fn runner_token(walker: &mut Walker<'_>, field: &Field<'_>) -> Secret {
    let example =
        "\"glrt-...\" (the runner authentication token GitLab showed when the runner was created)";
    Secret::new(required_string(example)(walker, field))
}

pub fn opt_secret(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<Secret> {
    get_secret(walker, field)
}

/// A string in some format: `is_valid` checks it, `what` names the format in the message and
/// `example` shows a good value in the fix.
fn formatted_string(
    walker: &mut Walker<'_>,
    field: &Field<'_>,
    is_valid: fn(&str) -> bool,
    what: &str,
    example: &str,
) -> Option<String> {
    let text = get_str(walker, field)?;
    if !is_valid(text) {
        walker.error(
            field.at,
            &field.path,
            format!("{} is not {what}", shown(text)),
            format!("write {} = {example}", field.key),
        );
        return None;
    }
    Some(text.to_owned())
}

/// A `host:port` address to listen on.
pub fn opt_listen_address(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<String> {
    let is_host_port = |address: &str| {
        address
            .rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    };
    formatted_string(
        walker,
        field,
        is_host_port,
        "a host:port address",
        "\"127.0.0.1:9252\"",
    )
}

/// A date-time, written by gitlab-runner as a TOML date-time (accepted as a string too).
pub fn opt_datetime(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<String> {
    field.item?;
    match value(field) {
        Some(Value::Datetime(datetime)) => Some(datetime.value().to_string()),
        Some(Value::String(text)) => Some(text.value().clone()),
        _ => {
            let fix = format!(
                "write a date-time such as {} = 2025-01-31T12:00:00Z",
                field.key
            );
            wrong_type(walker, field, "a date-time", fix);
            None
        }
    }
}

/// Docker's memory sizes: a number with an optional unit, e.g. `"128m"`, `"1.5g"`, `"512MiB"`.
pub fn opt_memory_size(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<String> {
    let what = "a memory size (a number with an optional unit b, k, m or g)";
    formatted_string(walker, field, is_memory_size, what, "\"512m\"")
}

/// Mirrors docker/go-units `RAMInBytes`: `^[0-9]+(\.[0-9]+)? ?([kKmMgGtTpP])?[iI]?[bB]?$`.
fn is_memory_size(text: &str) -> bool {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return false;
    }
    let mut rest = &text[digits..];
    if let Some(after_dot) = rest.strip_prefix('.') {
        let fraction = after_dot.bytes().take_while(u8::is_ascii_digit).count();
        if fraction == 0 {
            return false;
        }
        rest = &after_dot[fraction..];
    }
    let rest = rest.strip_prefix(' ').unwrap_or(rest).to_ascii_lowercase();
    let rest = rest
        .strip_prefix(['k', 'm', 'g', 't', 'p'])
        .unwrap_or(&rest);
    let rest = rest.strip_prefix('i').unwrap_or(rest);
    let rest = rest.strip_prefix('b').unwrap_or(rest);
    rest.is_empty()
}

/// A CPU count as gitlab-runner reads it (a rational number): `"1.5"`, `"2"`, `"3/2"`.
pub fn opt_cpus(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<String> {
    formatted_string(walker, field, is_cpu_count, "a number of CPUs", "\"1.5\"")
}

fn is_cpu_count(text: &str) -> bool {
    let is_decimal = |part: &str| {
        !part.is_empty()
            && part.chars().all(|c| c.is_ascii_digit() || c == '.')
            && part.matches('.').count() <= 1
            && part != "."
    };
    match text.split_once('/') {
        Some((numerator, denominator)) => {
            is_decimal(numerator)
                && !denominator.is_empty()
                && denominator.chars().all(|c| c.is_ascii_digit())
                && denominator.chars().any(|c| c != '0')
        }
        None => is_decimal(text),
    }
}

// ---------------------------------------------------------------- booleans

fn get_bool(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<bool> {
    field.item?;
    match value(field) {
        Some(Value::Boolean(flag)) => Some(*flag.value()),
        _ => {
            let fix = format!(
                "write {} = true or {} = false, without quotes",
                field.key, field.key
            );
            wrong_type(walker, field, "a boolean", fix);
            None
        }
    }
}

pub fn boolean(walker: &mut Walker<'_>, field: &Field<'_>) -> bool {
    get_bool(walker, field).unwrap_or(false)
}

pub fn opt_bool(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<bool> {
    get_bool(walker, field)
}

// ---------------------------------------------------------------- numbers

fn get_int(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<i64> {
    field.item?;
    match value(field) {
        Some(Value::Integer(number)) => Some(*number.value()),
        _ => {
            let fix = format!(
                "write a whole number without quotes, e.g. {} = 1",
                field.key
            );
            wrong_type(walker, field, "an integer", fix);
            None
        }
    }
}

fn to_u32(walker: &mut Walker<'_>, field: &Field<'_>, number: i64) -> Option<u32> {
    if number < 0 {
        walker.error(
            field.at,
            &field.path,
            format!("must not be negative, found {number}"),
            format!("set {} to 0 or more", field.key),
        );
        return None;
    }
    match u32::try_from(number) {
        Ok(number) => Some(number),
        Err(_) => {
            walker.error(
                field.at,
                &field.path,
                format!("{number} is too large"),
                format!("set {} to at most {}", field.key, u32::MAX),
            );
            None
        }
    }
}

/// A count that defaults to `default` when absent; 0 is kept (it often means "no limit").
pub fn uint_or(default: u32) -> impl Fn(&mut Walker<'_>, &Field<'_>) -> u32 {
    move |walker, field| {
        get_int(walker, field)
            .and_then(|number| to_u32(walker, field, number))
            .unwrap_or(default)
    }
}

pub fn uint(walker: &mut Walker<'_>, field: &Field<'_>) -> u32 {
    uint_or(0)(walker, field)
}

/// A count where gitlab-runner treats 0 like "not set" and uses `default`.
pub fn uint_nonzero_or(default: u32) -> impl Fn(&mut Walker<'_>, &Field<'_>) -> u32 {
    move |walker, field| match uint_or(default)(walker, field) {
        0 => default,
        number => number,
    }
}

/// `concurrent`: required, and 0 would stop every job.
pub fn concurrent(walker: &mut Walker<'_>, field: &Field<'_>) -> u32 {
    const FIX: &str = "set concurrent to the number of jobs that may run at once across all runners, e.g. concurrent = 4";
    if field.item.is_none() {
        walker.error(
            field.at,
            &field.path,
            "is missing".to_owned(),
            FIX.to_owned(),
        );
        return 1;
    }
    match get_int(walker, field).and_then(|number| to_u32(walker, field, number)) {
        Some(0) => {
            walker.error(
                field.at,
                &field.path,
                "must be at least 1; with 0 no job would ever run".to_owned(),
                FIX.to_owned(),
            );
            1
        }
        Some(number) => number,
        None => 1,
    }
}

pub fn int_or(default: i64) -> impl Fn(&mut Walker<'_>, &Field<'_>) -> i64 {
    move |walker, field| get_int(walker, field).unwrap_or(default)
}

pub fn int(walker: &mut Walker<'_>, field: &Field<'_>) -> i64 {
    int_or(0)(walker, field)
}

pub fn opt_int(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<i64> {
    get_int(walker, field)
}

/// An integer where 0, like absence, means `default`.
pub fn int_nonzero_or(default: i64) -> impl Fn(&mut Walker<'_>, &Field<'_>) -> i64 {
    move |walker, field| match get_int(walker, field) {
        Some(0) | None => default,
        Some(number) => number,
    }
}

/// An integer where 0 means "not set" (gitlab-runner's `omitzero`).
pub fn opt_nonzero_int(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<i64> {
    get_int(walker, field).filter(|number| *number != 0)
}

/// An integer at least `minimum` (scale_throttle's -1 means unlimited).
pub fn int_at_least(minimum: i64) -> impl Fn(&mut Walker<'_>, &Field<'_>) -> i64 {
    move |walker, field| {
        let number = get_int(walker, field).unwrap_or(0);
        if number < minimum {
            walker.error(
                field.at,
                &field.path,
                format!("must be at least {minimum}, found {number}"),
                format!("set {} to {minimum} or more", field.key),
            );
            return 0;
        }
        number
    }
}

pub fn opt_port(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<u16> {
    let number = get_int(walker, field)?;
    match u16::try_from(number) {
        Ok(port) if port > 0 => Some(port),
        _ => {
            walker.error(
                field.at,
                &field.path,
                format!("{number} is not a TCP port"),
                format!("set {} to a port between 1 and 65535, e.g. 22", field.key),
            );
            None
        }
    }
}

/// Whole seconds, as gitlab-runner's `int` fields; 0 or less means `default_seconds`.
pub fn seconds_or(default_seconds: u64) -> impl Fn(&mut Walker<'_>, &Field<'_>) -> Duration {
    move |walker, field| {
        if let Some(Value::String(_)) = value(field) {
            walker.error(
                field.at,
                &field.path,
                "must be a whole number of seconds, found a string".to_owned(),
                format!(
                    "write the seconds without quotes or unit, e.g. {} = {default_seconds}",
                    field.key
                ),
            );
            return Duration::from_secs(default_seconds);
        }
        match get_int(walker, field) {
            Some(seconds) if seconds > 0 => Duration::from_secs(seconds.unsigned_abs()),
            _ => Duration::from_secs(default_seconds),
        }
    }
}

fn number_of(value: &Value) -> Option<f64> {
    match value {
        Value::Float(number) => Some(*number.value()),
        // Integer-valued floats are common (`scale_factor = 1`); the precision loss past 2^53
        // cannot matter for the keys that hold floats.
        #[allow(clippy::cast_precision_loss)]
        Value::Integer(number) => Some(*number.value() as f64),
        _ => None,
    }
}

pub fn non_negative_float(walker: &mut Walker<'_>, field: &Field<'_>) -> f64 {
    field
        .item
        .map_or(0.0, |_| match value(field).and_then(number_of) {
            Some(number) if number.is_finite() && number >= 0.0 => number,
            Some(_) => {
                walker.error(
                    field.at,
                    &field.path,
                    "must be a finite number, 0 or more".to_owned(),
                    format!("set {} to a number such as 0.5", field.key),
                );
                0.0
            }
            None => {
                let fix = format!("write a number without quotes, e.g. {} = 0.5", field.key);
                wrong_type(walker, field, "a number", fix);
                0.0
            }
        })
}

pub fn floats(walker: &mut Walker<'_>, field: &Field<'_>) -> Vec<f64> {
    let fix = format!(
        "write a list of numbers, e.g. {} = [1.0, 5.0, 30.0]",
        field.key
    );
    array_elements(walker, field, "an array of numbers", &fix, |value| {
        number_of(value).filter(|number| number.is_finite())
    })
}

// ---------------------------------------------------------------- durations

fn get_go_duration(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<Duration> {
    field.item?;
    match value(field) {
        Some(Value::String(text)) => match parse_duration(text.value()) {
            Ok(duration) => Some(duration),
            Err(why) => {
                walker.error(field.at, &field.path, why, DURATION_FIX.to_owned());
                None
            }
        },
        Some(Value::Integer(number)) if *number.value() == 0 => Some(Duration::ZERO),
        Some(Value::Integer(number)) => {
            // gitlab-runner's TOML decoder reads an integer into a Go duration as nanoseconds,
            // which is never what a person writing `idle_time = 1800` meant.
            let number = number.value();
            walker.error(
                field.at,
                &field.path,
                format!(
                    "must be a Go duration string; gitlab-runner would read the integer {number} as {number} nanoseconds"
                ),
                format!("write {} = \"{number}s\" if you meant seconds", field.key),
            );
            None
        }
        _ => {
            wrong_type(
                walker,
                field,
                "a Go duration string",
                DURATION_FIX.to_owned(),
            );
            None
        }
    }
}

pub fn go_duration_or(default: Duration) -> impl Fn(&mut Walker<'_>, &Field<'_>) -> Duration {
    move |walker, field| get_go_duration(walker, field).unwrap_or(default)
}

/// A Go duration where 0 means "not set" and `default` applies (taskscaler's options).
pub fn go_duration_nonzero_or(
    default: Duration,
) -> impl Fn(&mut Walker<'_>, &Field<'_>) -> Duration {
    move |walker, field| match get_go_duration(walker, field) {
        Some(duration) if !duration.is_zero() => duration,
        _ => default,
    }
}

pub fn opt_go_duration(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<Duration> {
    get_go_duration(walker, field)
}

// ---------------------------------------------------------------- lists

/// Reads an array element by element; `convert` returns `None` for a bad element, which is
/// reported at the element's own position.
fn array_elements<T>(
    walker: &mut Walker<'_>,
    field: &Field<'_>,
    expected: &str,
    fix: &str,
    convert: impl Fn(&Value) -> Option<T>,
) -> Vec<T> {
    if field.item.is_none() {
        return Vec::new();
    }
    let Some(Value::Array(array)) = value(field) else {
        wrong_type(walker, field, expected, fix.to_owned());
        return Vec::new();
    };
    let mut elements = Vec::new();
    for (index, element) in array.iter().enumerate() {
        match convert(element) {
            Some(converted) => elements.push(converted),
            None => {
                let at = walker.position(element.span(), field.at);
                walker.error(
                    at,
                    &format!("{}[{index}]", field.path),
                    format!(
                        "must be {expected}, found {} in the array",
                        found_value(element)
                    ),
                    fix.to_owned(),
                );
            }
        }
    }
    elements
}

fn string_value(value: &Value) -> Option<String> {
    value.as_str().map(str::to_owned)
}

pub fn strings(walker: &mut Walker<'_>, field: &Field<'_>) -> Vec<String> {
    let fix = format!(
        "write a list of quoted strings, e.g. {} = [\"a\", \"b\"]",
        field.key
    );
    array_elements(walker, field, "an array of strings", &fix, string_value)
}

/// A string or a list of strings (gitlab-runner's `StringOrArray`).
pub fn string_or_strings(walker: &mut Walker<'_>, field: &Field<'_>) -> Vec<String> {
    match value(field) {
        Some(Value::String(text)) => vec![text.value().clone()],
        _ => {
            let fix = format!(
                "write {} = \"a\" or {} = [\"a\", \"b\"]",
                field.key, field.key
            );
            array_elements(
                walker,
                field,
                "a string or an array of strings",
                &fix,
                string_value,
            )
        }
    }
}

/// podfleet's `tag_list`: a list, or one comma-separated string as `register --tag-list` takes.
pub fn tags(walker: &mut Walker<'_>, field: &Field<'_>) -> Vec<String> {
    string_or_strings(walker, field)
        .iter()
        .flat_map(|entry| entry.split(','))
        .map(str::trim)
        .filter(|tag| !tag.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `environment`: `KEY=VALUE` entries; feature flags in it must be booleans to take effect.
pub fn environment(walker: &mut Walker<'_>, field: &Field<'_>) -> Vec<String> {
    let entries = strings(walker, field);
    let Some(Value::Array(array)) = value(field) else {
        return entries;
    };
    for (index, element) in array.iter().enumerate() {
        let Some(entry) = element.as_str() else {
            continue;
        };
        let at = walker.position(element.span(), field.at);
        let path = format!("{}[{index}]", field.path);
        match entry.split_once('=') {
            None => walker.warning(
                at,
                &path,
                "is not KEY=VALUE; the job will not see it".to_owned(),
                "write it as \"NAME=value\"".to_owned(),
            ),
            Some((name, flag)) if name.starts_with("FF_") && parse_go_bool(flag).is_none() => {
                walker.warning(
                    at,
                    &path,
                    format!("feature flag {name} is not a boolean, so it is ignored"),
                    format!("write \"{name}=true\" or \"{name}=false\""),
                );
            }
            Some(_) => {}
        }
    }
    entries
}

/// Go's `strconv.ParseBool`, which gitlab-runner uses for feature flag values.
pub(crate) fn parse_go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

pub fn pull_policies(walker: &mut Walker<'_>, field: &Field<'_>) -> Vec<PullPolicy> {
    let names = string_or_strings(walker, field);
    // Point at the offending element of a list, not at the list.
    let places: Vec<(Position, String)> = match value(field) {
        Some(Value::Array(array)) => array
            .iter()
            .enumerate()
            .filter(|(_, element)| element.is_str())
            .map(|(index, element)| {
                let at = walker.position(element.span(), field.at);
                (at, format!("{}[{index}]", field.path))
            })
            .collect(),
        _ => vec![(field.at, field.path.clone())],
    };
    let mut policies = Vec::new();
    for (name, (at, path)) in names.iter().zip(places) {
        match name.parse::<PullPolicy>() {
            Ok(policy) => policies.push(policy),
            Err(()) => walker.error(
                at,
                &path,
                format!("{} is not a pull policy", shown(name)),
                "use always, if-not-present or never".to_owned(),
            ),
        }
    }
    policies
}

/// `[[runners.autoscaler.policy]] periods`: 5-field cron expressions, each checked by
/// [`schedule::parse_period`] and reported at its own position; all minutes when absent.
pub fn cron_periods(walker: &mut Walker<'_>, field: &Field<'_>) -> Vec<Period> {
    const EXAMPLE: &str =
        "write minute hour day-of-month month day-of-week, e.g. \"* 7-19 * * mon-fri\"";
    if field.item.is_none() {
        return vec![schedule::parse_period("* * * * *").expect("the default period parses")];
    }
    let fix = format!(
        "{EXAMPLE}, in a list: {} = [\"* 7-19 * * mon-fri\"]",
        field.key
    );
    let Some(Value::Array(array)) = value(field) else {
        wrong_type(walker, field, "an array of strings", fix);
        return Vec::new();
    };
    let mut periods = Vec::new();
    for (index, element) in array.iter().enumerate() {
        let at = walker.position(element.span(), field.at);
        let path = format!("{}[{index}]", field.path);
        let Some(text) = element.as_str() else {
            let message = format!(
                "must be a string, found {} in the array",
                found_value(element)
            );
            walker.error(at, &path, message, fix.clone());
            continue;
        };
        match schedule::parse_period(text) {
            Ok(period) => periods.push(period),
            Err(reason) => walker.error(
                at,
                &path,
                format!("{} is not a 5-field cron expression: {reason}", shown(text)),
                EXAMPLE.to_owned(),
            ),
        }
    }
    periods
}

/// `[[runners.autoscaler.policy]] timezone`: an IANA name; unset or `Local` is the host's.
pub fn opt_timezone(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<Tz> {
    let text = get_str(walker, field)?;
    match schedule::parse_timezone(text) {
        Ok(zone) => zone,
        Err(reason) => {
            walker.error(
                field.at,
                &field.path,
                reason,
                format!(
                    "write an IANA time zone such as {} = \"Europe/Berlin\" or \"UTC\", or remove it for local time",
                    field.key
                ),
            );
            None
        }
    }
}

// ---------------------------------------------------------------- maps

fn get_table<'a>(
    walker: &mut Walker<'_>,
    field: &Field<'a>,
    fix: &str,
) -> Option<&'a dyn TableLike> {
    let item = field.item?;
    match item.as_table_like() {
        Some(table) if !matches!(item, Item::ArrayOfTables(_)) => Some(table),
        _ => {
            wrong_type(walker, field, "a table", fix.to_owned());
            None
        }
    }
}

/// A table whose values are all read with `convert`; a bad value is reported at its own key.
fn map_entries<T>(
    walker: &mut Walker<'_>,
    field: &Field<'_>,
    expected: &str,
    example: &str,
    convert: impl Fn(&Value) -> Option<T>,
) -> BTreeMap<String, T> {
    let fix = format!("write [{}] with entries like {example}", field.path);
    let Some(table) = get_table(walker, field, &fix) else {
        return BTreeMap::new();
    };
    let mut entries = BTreeMap::new();
    for (key, item) in table.iter() {
        match item.as_value().and_then(&convert) {
            Some(converted) => {
                entries.insert(key.to_owned(), converted);
            }
            None => {
                let at = walker.position(item.span(), field.at);
                walker.error(
                    at,
                    &join_path(&field.path, key),
                    format!("must be {expected}, found {}", found(item)),
                    format!("write entries like {example}"),
                );
            }
        }
    }
    entries
}

pub fn string_map(walker: &mut Walker<'_>, field: &Field<'_>) -> BTreeMap<String, String> {
    map_entries(walker, field, "a string", "name = \"value\"", string_value)
}

pub fn bool_map(walker: &mut Walker<'_>, field: &Field<'_>) -> BTreeMap<String, bool> {
    map_entries(
        walker,
        field,
        "a boolean",
        "FF_NETWORK_PER_BUILD = true",
        Value::as_bool,
    )
}

pub fn string_list_map(
    walker: &mut Walker<'_>,
    field: &Field<'_>,
) -> BTreeMap<String, Vec<String>> {
    map_entries(
        walker,
        field,
        "an array of strings",
        "\"image\" = [\"/dev/kvm\"]",
        |value| {
            value
                .as_array()?
                .iter()
                .map(string_value)
                .collect::<Option<Vec<String>>>()
        },
    )
}

/// `ulimit`: `name = "soft[:hard]"` with integer limits, as gitlab-runner parses them.
pub fn ulimits(walker: &mut Walker<'_>, field: &Field<'_>) -> BTreeMap<String, String> {
    let is_limit = |text: &str| {
        let (soft, hard) = text.split_once(':').unwrap_or((text, text));
        soft.parse::<i64>().is_ok() && hard.parse::<i64>().is_ok()
    };
    map_entries(
        walker,
        field,
        "a string \"soft[:hard]\" of integers",
        "nofile = \"1024:2048\"",
        |value| {
            value
                .as_str()
                .filter(|text| is_limit(text))
                .map(str::to_owned)
        },
    )
}

/// A table handed on verbatim as JSON (`plugin_config`), as gitlab-runner's `JSON()` does.
pub fn json_object(
    walker: &mut Walker<'_>,
    field: &Field<'_>,
) -> serde_json::Map<String, serde_json::Value> {
    let fix = format!("write [{}] as a table of the plugin's settings", field.path);
    let Some(table) = get_table(walker, field, &fix) else {
        return serde_json::Map::new();
    };
    json_of_table(walker, table, &field.path, field.at)
}

fn json_of_table(
    walker: &mut Walker<'_>,
    table: &dyn TableLike,
    path: &str,
    at: Position,
) -> serde_json::Map<String, serde_json::Value> {
    let mut object = serde_json::Map::new();
    for (key, item) in table.iter() {
        let path = join_path(path, key);
        let at = walker.position(item.span(), at);
        let json = match item {
            Item::Value(value) => json_of_value(walker, value, &path, at),
            Item::Table(table) => {
                serde_json::Value::Object(json_of_table(walker, table, &path, at))
            }
            Item::ArrayOfTables(tables) => serde_json::Value::Array(
                tables
                    .iter()
                    .map(|table| serde_json::Value::Object(json_of_table(walker, table, &path, at)))
                    .collect(),
            ),
            Item::None => continue,
        };
        object.insert(key.to_owned(), json);
    }
    object
}

fn json_of_value(
    walker: &mut Walker<'_>,
    value: &Value,
    path: &str,
    at: Position,
) -> serde_json::Value {
    match value {
        Value::String(text) => serde_json::Value::String(text.value().clone()),
        Value::Integer(number) => serde_json::Value::from(*number.value()),
        Value::Boolean(flag) => serde_json::Value::Bool(*flag.value()),
        // Go's encoding/json writes a time.Time as an RFC 3339 string.
        Value::Datetime(datetime) => serde_json::Value::String(datetime.value().to_string()),
        Value::Float(number) => match serde_json::Number::from_f64(*number.value()) {
            Some(number) => serde_json::Value::Number(number),
            None => {
                walker.error(
                    at,
                    path,
                    "nan and inf cannot be handed to the plugin as JSON".to_owned(),
                    "use a finite number".to_owned(),
                );
                serde_json::Value::Null
            }
        },
        Value::Array(array) => serde_json::Value::Array(
            array
                .iter()
                .enumerate()
                .map(|(index, element)| {
                    let at = walker.position(element.span(), at);
                    json_of_value(walker, element, &format!("{path}[{index}]"), at)
                })
                .collect(),
        ),
        Value::InlineTable(table) => {
            serde_json::Value::Object(json_of_table(walker, table, path, at))
        }
    }
}

// ---------------------------------------------------------------- sections

fn section_view<'a>(walker: &mut Walker<'_>, field: &Field<'a>) -> Option<TableView<'a>> {
    let fix = format!("write it as a [{}] table", field.path);
    let table = get_table(walker, field, &fix)?;
    Some(TableView {
        table: Some(table),
        path: field.path.clone(),
        at: field.at,
    })
}

/// A sub-section that always exists; an absent table gives every key's default.
pub fn section<T: Section>(walker: &mut Walker<'_>, field: &Field<'_>) -> T {
    if field.item.is_none() {
        return read_section(walker, &TableView::absent(field.path.clone(), field.at));
    }
    match section_view(walker, field) {
        Some(view) => read_section(walker, &view),
        None => defaults(),
    }
}

pub fn optional_section<T: Section>(walker: &mut Walker<'_>, field: &Field<'_>) -> Option<T> {
    field.item?;
    let view = section_view(walker, field)?;
    Some(read_section(walker, &view))
}

/// An array of tables (`[[runners]]`, `[[runners.autoscaler.policy]]`), or an inline array of
/// inline tables.
pub fn section_list<T: Section>(walker: &mut Walker<'_>, field: &Field<'_>) -> Vec<T> {
    let Some(item) = field.item else {
        return Vec::new();
    };
    let tables: Vec<(&dyn TableLike, Option<std::ops::Range<usize>>)> = match item {
        Item::ArrayOfTables(tables) => tables
            .iter()
            .map(|table| (table as &dyn TableLike, table.span()))
            .collect(),
        Item::Value(Value::Array(array))
            if array.iter().all(|element| element.is_inline_table()) =>
        {
            array
                .iter()
                .filter_map(|element| {
                    Some((element.as_inline_table()? as &dyn TableLike, element.span()))
                })
                .collect()
        }
        _ => {
            let fix = format!("write each entry under its own [[{}]] header", field.path);
            wrong_type(walker, field, "an array of tables", fix);
            return Vec::new();
        }
    };
    tables
        .into_iter()
        .enumerate()
        .map(|(index, (table, span))| {
            let path = format!("{}[{index}]", field.path);
            let at = walker.position(span, field.at);
            walker.record(&path, at);
            read_section(
                walker,
                &TableView {
                    table: Some(table),
                    path,
                    at,
                },
            )
        })
        .collect()
}

/// A table podfleet accepts but does not interpret; returns whether it is present.
pub fn accepted_table(walker: &mut Walker<'_>, field: &Field<'_>) -> bool {
    if field.item.is_none() {
        return false;
    }
    let fix = format!("write it as a [{}] table", field.path);
    get_table(walker, field, &fix).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_follow_docker() {
        for good in ["128m", "1g", "1.5g", "512MiB", "4096", "100 MB", "2k"] {
            assert!(is_memory_size(good), "{good}");
        }
        for bad in ["", "m", "12x", "1.g", "-1m", "1gg"] {
            assert!(!is_memory_size(bad), "{bad}");
        }
    }

    #[test]
    fn cpu_counts_are_rational_numbers() {
        for good in ["1", "1.5", "0.25", "3/2", ".5"] {
            assert!(is_cpu_count(good), "{good}");
        }
        for bad in ["", ".", "1.2.3", "two", "1/0", "1/", "-1"] {
            assert!(!is_cpu_count(bad), "{bad}");
        }
    }

    #[test]
    fn go_booleans() {
        assert_eq!(parse_go_bool("1"), Some(true));
        assert_eq!(parse_go_bool("True"), Some(true));
        assert_eq!(parse_go_bool("f"), Some(false));
        assert_eq!(parse_go_bool("yes"), None);
    }
}
