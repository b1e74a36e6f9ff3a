//! gitlab-runner's `config.toml`, typed and validated.
//!
//! podfleet is a drop-in for gitlab-runner's `docker-autoscaler` manager, so it reads the same
//! file: the global section, `[session_server]`, and each `[[runners]]` entry with its
//! `[runners.docker]`, `[runners.autoscaler]` (plugin, `plugin_config`, `connector_config`,
//! `[[runners.autoscaler.policy]]`, ...) and `[runners.feature_flags]`. [`parse`] and [`load`]
//! check the whole document against one schema (the `section!` declarations in `model.rs`,
//! which are also the Rust types) and report **every** problem at once, each with its
//! line:column, key path and fix; unknown keys are warnings with a "did you mean". Secrets
//! (runner token, connector password, Sentry DSN) are [`Secret`]s and never appear in `Debug`
//! output, in problems or in [`Config::summary_lines`]. These keys are podfleet extensions that
//! gitlab-runner does not have: `tag_list` and `run_untagged` in `[[runners]]`, because GitLab
//! keeps tags server-side while podfleet's embedded coordinator needs them locally; and the
//! autoscaler's `state_file`, `instance_ready_timeout`, `predictive_warm_capacity`,
//! `image_check_interval`, `replace_outdated_images` and the global `podfleet_state_dir`. Policy `periods` and `timezone` are parsed here
//! ([`schedule`]) into the values the autoscaler evaluates.
//!
//! This is the only crate that knows TOML.

mod checks;
mod duration;
mod kind;
mod model;
mod problem;
pub mod rewrite;
mod runner;
pub mod schedule;
mod secret;
mod walk;

use std::fmt;
use std::path::{Path, PathBuf};

pub use duration::{format_duration, parse_duration};
pub use model::{
    AutoscalerConfig, CacheConfig, CacheS3Config, Config, ConnectorConfig, DockerConfig,
    PolicyConfig, PullPolicy, RunnerConfig, ScaleThrottle, ServiceConfig, SessionServerConfig,
    StateStorage,
};
pub use problem::Problem;
pub use runner::{DEFAULT_STATE_DIR, short_token};
pub use secret::Secret;

use problem::{LineIndex, Position};
use walk::{TableView, Walker, read_section};

/// A config that passed validation, with the warnings found on the way (unknown keys, settings
/// podfleet ignores, ...), in document order.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<Problem>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Every problem of the file, errors and warnings, in document order.
    #[error("{}", InvalidDisplay { origin, problems })]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

struct InvalidDisplay<'a> {
    origin: &'a str,
    problems: &'a [Problem],
}

impl fmt::Display for InvalidDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.problems.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{problem}", self.origin)?;
        }
        Ok(())
    }
}

/// Parses and validates `config.toml` text. `origin` names the text in messages (a path).
pub fn parse(text: &str, origin: &str) -> Result<Loaded, ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        origin: origin.to_owned(),
        problems,
    };
    let document = toml_edit::Document::parse(text).map_err(|error| {
        // Only the message and the span: the error's Display quotes the source line, which
        // may hold a token.
        let at = error.span().map_or(Position::START, |span| {
            LineIndex::new(text).position(span.start)
        });
        let message = error.message().lines().collect::<Vec<_>>().join("; ");
        invalid(vec![Problem {
            line: at.line,
            column: at.column,
            key_path: "(toml syntax)".to_owned(),
            message: format!("invalid TOML: {message}"),
            fix:
                "correct the TOML syntax at this position (strings need quotes, tables [brackets])"
                    .to_owned(),
        }])
    })?;

    let mut walker = Walker::new(text);
    let root = TableView {
        table: Some(document.as_table()),
        path: String::new(),
        at: Position::START,
    };
    let config: Config = read_section(&mut walker, &root);
    checks::check(&config, &mut walker);

    let by_position = |problem: &Problem| (problem.line, problem.column);
    let mut warnings = walker.warnings;
    warnings.sort_by_key(by_position);
    if walker.errors.is_empty() {
        return Ok(Loaded { config, warnings });
    }
    let mut problems = walker.errors;
    problems.extend(warnings);
    problems.sort_by_key(by_position);
    Err(invalid(problems))
}

/// Reads and validates a `config.toml` file.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}
