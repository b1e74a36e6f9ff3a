//! Logs as gitlab-runner writes them: `log_level` (debug, info, warn, error, fatal, panic)
//! and `log_format` (`runner`: readable lines; `text`: logrus key=value; `json`: one object
//! per line with `level`, `msg`, `time`). `PODFLEET_LOG` (an env-filter) overrides the level.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::reload;

/// Changes the level of a running process (config reload).
pub type LevelHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// The env-filter directive of a gitlab-runner log level.
fn directive(level: &str) -> &'static str {
    match level {
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        _ => "error",
    }
}

/// The filter for `level`, unless `PODFLEET_LOG` says otherwise.
pub fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_env("PODFLEET_LOG").unwrap_or_else(|_| EnvFilter::new(directive(level)))
}

/// Installs the global logger; returns the handle that changes its level later.
pub fn init(level: &str, format: &str) -> LevelHandle {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = reload::Layer::new(filter(level));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        "text" => registry
            .with(layer.event_format(Logrus { json: false }))
            .init(),
        "json" => registry
            .with(layer.event_format(Logrus { json: true }))
            .init(),
        _ => registry
            .with(layer.compact().with_target(false).with_ansi(false))
            .init(),
    }
    handle
}

/// logrus's text and JSON formats, as gitlab-runner prints them.
struct Logrus {
    json: bool,
}

#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.pairs
                .push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

impl<S, N> FormatEvent<S, N> for Logrus
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        let level = if level == "warn" {
            "warning".into()
        } else {
            level
        };
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        writeln!(writer, "{}", render(self.json, &time, &level, &fields))
    }
}

fn render(json: bool, time: &str, level: &str, fields: &Fields) -> String {
    if json {
        let mut object = serde_json::Map::new();
        for (key, value) in &fields.pairs {
            object.insert(key.clone(), value.clone().into());
        }
        object.insert("level".into(), level.into());
        object.insert("msg".into(), fields.message.clone().into());
        object.insert("time".into(), time.into());
        serde_json::Value::Object(object).to_string()
    } else {
        let mut line = format!("time={time:?} level={level} msg={:?}", fields.message);
        for (key, value) in &fields.pairs {
            if value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._/:".contains(c))
            {
                line.push_str(&format!(" {key}={value}"));
            } else {
                line.push_str(&format!(" {key}={value:?}"));
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Fields {
        Fields {
            message: "job finished".into(),
            pairs: vec![
                ("job".into(), "42".into()),
                ("error".into(), "exit code 1: \"boom\"".into()),
            ],
        }
    }

    #[test]
    fn text_lines_are_logrus_key_values() {
        assert_eq!(
            render(false, "2026-12-04T18:00:00Z", "info", &fields()),
            "time=\"2026-12-04T18:00:00Z\" level=info msg=\"job finished\" job=42 error=\"exit code 1: \\\"boom\\\"\""
        );
    }

    #[test]
    fn json_lines_carry_level_msg_and_time() {
        let line = render(true, "2026-12-04T18:00:00Z", "warning", &fields());
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["level"], "warning");
        assert_eq!(value["msg"], "job finished");
        assert_eq!(value["time"], "2026-12-04T18:00:00Z");
        assert_eq!(value["job"], "42");
    }

    #[test]
    fn gitlab_runner_levels_map_to_filters() {
        assert_eq!(directive("fatal"), "error");
        assert_eq!(directive("panic"), "error");
        assert_eq!(directive("warning"), "warn");
        assert_eq!(directive("debug"), "debug");
    }
}
