//! The `.gitlab-ci.yml` subset podfleet runs locally: the only place that knows its YAML.
//!
//! Supported: `stages`, `variables`, `default` (image, before_script, after_script, tags),
//! top-level `image`/`before_script`/`after_script` as defaults, hidden jobs, YAML anchors and
//! `<<` merge keys, and per job `stage`, `image`, `before_script`, `script`, `after_script`,
//! `variables`, `tags`, `when` (on_success, always) and `allow_failure`. GitLab keywords whose
//! absence only changes *how* a job runs (artifacts, cache, rules, …) are ignored with a
//! warning; those that change *what* runs (include, extends, trigger, parallel, other `when`
//! values) are errors that say they are not supported yet. Every problem is reported at once.

use std::fmt;

use serde::Serialize;
use serde_norway::{Mapping, Value};

/// The stages GitLab uses when a file has no `stages:`.
const DEFAULT_STAGES: [&str; 3] = ["build", "test", "deploy"];

/// Top-level keys that are never jobs.
const RESERVED_TOP_LEVEL: [&str; 10] = [
    "stages",
    "variables",
    "default",
    "include",
    "workflow",
    "image",
    "services",
    "before_script",
    "after_script",
    "cache",
];

/// Job keywords podfleet accepts but does not act on yet: the job still runs, only less
/// faithfully (no artifacts, no cache, no rules filtering, …).
const IGNORED_JOB_KEYS: [&str; 24] = [
    "artifacts",
    "cache",
    "coverage",
    "dast_configuration",
    "dependencies",
    "environment",
    "except",
    "hooks",
    "id_tokens",
    "identity",
    "inherit",
    "interruptible",
    "manual_confirmation",
    "needs",
    "only",
    "pages",
    "release",
    "resource_group",
    "retry",
    "rules",
    "secrets",
    "services",
    "start_in",
    "timeout",
];

/// Job keywords that change which jobs exist or what they run: refusing is safer than
/// running something else than the user wrote.
const UNSUPPORTED_JOB_KEYS: [&str; 5] = ["extends", "trigger", "parallel", "run", "inputs"];

const IGNORED_DEFAULT_KEYS: [&str; 8] = [
    "artifacts",
    "cache",
    "hooks",
    "id_tokens",
    "interruptible",
    "retry",
    "services",
    "timeout",
];

/// A parsed pipeline, ready to be scheduled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pipeline {
    /// In execution order, `.pre` first and `.post` last.
    pub stages: Vec<String>,
    /// Visible jobs, in file order.
    pub jobs: Vec<JobSpec>,
    /// Global `variables`, in file order.
    pub variables: Vec<Variable>,
    /// Keywords that were ignored, one readable line each.
    pub warnings: Vec<String>,
}

/// One job of the pipeline, with defaults already applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobSpec {
    pub name: String,
    pub stage: String,
    pub image: Option<ImageSpec>,
    pub before_script: Vec<String>,
    pub script: Vec<String>,
    pub after_script: Vec<String>,
    /// The job's own variables, in file order (global ones are in [`Pipeline::variables`]).
    pub variables: Vec<Variable>,
    pub tags: Vec<String>,
    pub when: When,
    pub allow_failure: bool,
}

/// `image:` in its string or `{name, entrypoint}` form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageSpec {
    pub name: String,
    pub entrypoint: Vec<String>,
}

/// A CI variable. `raw` is set by `expand: false`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Variable {
    pub key: String,
    pub value: String,
    pub raw: bool,
}

/// When a job runs relative to the outcome of earlier stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Only if no earlier job failed (jobs with `allow_failure` do not count).
    OnSuccess,
    /// Whatever happened before.
    Always,
}

/// One thing wrong with a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineProblem {
    /// The job it is about, or `None` for top-level keys.
    pub job: Option<String>,
    /// The key it is about, e.g. `script` or `stages`.
    pub key: String,
    /// Readable text that names the key.
    pub message: String,
}

impl fmt::Display for PipelineProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.job {
            Some(job) => write!(formatter, "job {job:?}: {}", self.message),
            None => formatter.write_str(&self.message),
        }
    }
}

fn format_problems(problems: &[PipelineProblem]) -> String {
    match problems {
        [single] => single.to_string(),
        many => {
            let lines: Vec<String> = many
                .iter()
                .map(|problem| format!("  - {problem}"))
                .collect();
            format!("{} problems:\n{}", many.len(), lines.join("\n"))
        }
    }
}

/// Why a pipeline file cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    #[error("{origin}: not valid YAML: {message}")]
    Yaml { origin: String, message: String },
    #[error("{origin}: {}", format_problems(problems))]
    Invalid {
        origin: String,
        problems: Vec<PipelineProblem>,
    },
}

impl PipelineError {
    /// The problems found (empty for a YAML syntax error).
    pub fn problems(&self) -> &[PipelineProblem] {
        match self {
            PipelineError::Yaml { .. } => &[],
            PipelineError::Invalid { problems, .. } => problems,
        }
    }
}

/// Collects problems and warnings while walking the file.
struct Parser {
    problems: Vec<PipelineProblem>,
    warnings: Vec<String>,
}

impl Parser {
    fn problem(&mut self, job: Option<&str>, key: &str, message: impl Into<String>) {
        self.problems.push(PipelineProblem {
            job: job.map(str::to_owned),
            key: key.to_owned(),
            message: message.into(),
        });
    }

    fn warn(&mut self, job: Option<&str>, key: &str) {
        let place = match job {
            Some(job) => format!("job {job:?}"),
            None => "top level".to_owned(),
        };
        self.warnings.push(format!(
            "{place}: {key} is not supported yet and is ignored"
        ));
    }
}

/// Inherited settings from `default:` and the top-level legacy keys.
#[derive(Default)]
struct Defaults {
    image: Option<ImageSpec>,
    before_script: Option<Vec<String>>,
    after_script: Option<Vec<String>>,
    tags: Option<Vec<String>>,
}

/// Parses a `.gitlab-ci.yml`. `origin` names the file in errors (usually its path).
pub fn parse_pipeline(text: &str, origin: &str) -> Result<Pipeline, PipelineError> {
    let yaml_error = |message: String| PipelineError::Yaml {
        origin: origin.to_owned(),
        message,
    };
    let mut document: Value =
        serde_norway::from_str(text).map_err(|error| yaml_error(error.to_string()))?;
    document
        .apply_merge()
        .map_err(|error| yaml_error(error.to_string()))?;
    let mut parser = Parser {
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let pipeline = match document {
        Value::Mapping(top) => parse_top_level(&mut parser, &top),
        Value::Null => {
            parser.problem(None, "", "the file is empty");
            None
        }
        _ => {
            parser.problem(
                None,
                "",
                "the top level must be a mapping of keys to values",
            );
            None
        }
    };
    match pipeline {
        Some(pipeline) if parser.problems.is_empty() => Ok(Pipeline {
            warnings: parser.warnings,
            ..pipeline
        }),
        _ => Err(PipelineError::Invalid {
            origin: origin.to_owned(),
            problems: parser.problems,
        }),
    }
}

fn parse_top_level(parser: &mut Parser, top: &Mapping) -> Option<Pipeline> {
    let stages = match top.get("stages") {
        None => DEFAULT_STAGES
            .iter()
            .map(|stage| stage.to_string())
            .collect(),
        Some(value) => match string_list(value) {
            Ok(stages) => stages,
            Err(message) => {
                parser.problem(None, "stages", format!("stages {message}"));
                Vec::new()
            }
        },
    };
    let mut all_stages = vec![".pre".to_owned()];
    for stage in stages {
        if stage != ".pre" && stage != ".post" && !all_stages.contains(&stage) {
            all_stages.push(stage);
        }
    }
    all_stages.push(".post".to_owned());

    let variables = match top.get("variables") {
        None => Vec::new(),
        Some(value) => parse_variables(parser, None, value),
    };

    if top.contains_key("include") {
        parser.problem(
            None,
            "include",
            "include is not supported yet; inline the included jobs into this file",
        );
    }
    for key in ["workflow", "services", "cache"] {
        if top.contains_key(key) {
            parser.warn(None, key);
        }
    }

    let mut defaults = Defaults::default();
    // Legacy top-level keys first, so that `default:` wins when both are present.
    apply_default_keys(parser, top, &mut defaults, None);
    match top.get("default") {
        None => {}
        Some(Value::Mapping(default)) => {
            for (key, _) in default {
                let key = key_text(key);
                let known = ["image", "before_script", "after_script", "tags"];
                if known.contains(&key.as_str()) {
                    continue;
                }
                if IGNORED_DEFAULT_KEYS.contains(&key.as_str()) {
                    parser.warn(None, &format!("default:{key}"));
                } else {
                    parser.problem(
                        None,
                        "default",
                        format!("default has an unknown key {key:?}"),
                    );
                }
            }
            apply_default_keys(parser, default, &mut defaults, Some("default"));
        }
        Some(_) => parser.problem(None, "default", "default must be a mapping"),
    }

    let mut jobs = Vec::new();
    for (key, value) in top {
        let name = match key {
            Value::String(name) => name.clone(),
            other => {
                parser.problem(
                    None,
                    "",
                    format!("top-level key {} is not a string", key_text(other)),
                );
                continue;
            }
        };
        if name.starts_with('.') || RESERVED_TOP_LEVEL.contains(&name.as_str()) {
            continue;
        }
        if let Some(job) = parse_job(parser, &name, value, &defaults, &all_stages) {
            jobs.push(job);
        }
    }
    if jobs.is_empty() && parser.problems.is_empty() {
        parser.problem(
            None,
            "",
            "no visible jobs are defined (jobs whose names start with '.' are hidden)",
        );
    }
    Some(Pipeline {
        stages: all_stages,
        jobs,
        variables,
        warnings: Vec::new(),
    })
}

fn apply_default_keys(
    parser: &mut Parser,
    section: &Mapping,
    defaults: &mut Defaults,
    prefix: Option<&str>,
) {
    let name = |key: &str| match prefix {
        Some(prefix) => format!("{prefix}:{key}"),
        None => key.to_owned(),
    };
    if let Some(value) = section.get("image") {
        match parse_image(value) {
            Ok(image) => defaults.image = Some(image),
            Err(message) => parser.problem(None, "image", format!("{} {message}", name("image"))),
        }
    }
    for key in ["before_script", "after_script"] {
        if let Some(value) = section.get(key) {
            match string_list(value) {
                Ok(lines) if key == "before_script" => defaults.before_script = Some(lines),
                Ok(lines) => defaults.after_script = Some(lines),
                Err(message) => parser.problem(None, key, format!("{} {message}", name(key))),
            }
        }
    }
    // Top-level `tags` would be a job named "tags"; only `default:tags` exists.
    if prefix.is_some()
        && let Some(value) = section.get("tags")
    {
        match string_list(value) {
            Ok(tags) => defaults.tags = Some(tags),
            Err(message) => parser.problem(None, "tags", format!("{} {message}", name("tags"))),
        }
    }
}

fn parse_job(
    parser: &mut Parser,
    name: &str,
    value: &Value,
    defaults: &Defaults,
    stages: &[String],
) -> Option<JobSpec> {
    let job = Some(name);
    let Value::Mapping(body) = value else {
        parser.problem(job, "", "a job must be a mapping of keywords");
        return None;
    };
    let problems_before = parser.problems.len();
    for (key, _) in body {
        let key = key_text(key);
        let supported = [
            "script",
            "before_script",
            "after_script",
            "image",
            "stage",
            "variables",
            "tags",
            "when",
            "allow_failure",
        ];
        if supported.contains(&key.as_str()) {
            continue;
        }
        if IGNORED_JOB_KEYS.contains(&key.as_str()) {
            parser.warn(job, &key);
        } else if UNSUPPORTED_JOB_KEYS.contains(&key.as_str()) {
            parser.problem(job, &key, format!("{key} is not supported yet"));
        } else {
            parser.problem(job, &key, format!("unknown key {key:?}"));
        }
    }

    let mut lines = |key: &str, inherited: Option<&Vec<String>>| -> Vec<String> {
        match body.get(key) {
            Some(value) => string_list(value).unwrap_or_else(|message| {
                parser.problem(job, key, format!("{key} {message}"));
                Vec::new()
            }),
            None => inherited.cloned().unwrap_or_default(),
        }
    };
    let before_script = lines("before_script", defaults.before_script.as_ref());
    let after_script = lines("after_script", defaults.after_script.as_ref());
    let tags = lines("tags", defaults.tags.as_ref());
    let script = match body.get("script") {
        None | Some(Value::Null) => {
            parser.problem(job, "script", "script is missing");
            Vec::new()
        }
        Some(value) => match string_list(value) {
            Ok(lines) if lines.is_empty() => {
                parser.problem(job, "script", "script is empty");
                lines
            }
            Ok(lines) => lines,
            Err(message) => {
                parser.problem(job, "script", format!("script {message}"));
                Vec::new()
            }
        },
    };

    let stage = match body.get("stage") {
        None => "test".to_owned(),
        Some(Value::String(stage)) => stage.clone(),
        Some(_) => {
            parser.problem(job, "stage", "stage must be a string");
            String::new()
        }
    };
    if !stage.is_empty() && !stages.contains(&stage) {
        parser.problem(
            job,
            "stage",
            format!(
                "stage {stage:?} is not defined in stages ({})",
                stages.join(", ")
            ),
        );
    }

    let image = match body.get("image") {
        None => defaults.image.clone(),
        Some(value) => match parse_image(value) {
            Ok(image) => Some(image),
            Err(message) => {
                parser.problem(job, "image", format!("image {message}"));
                None
            }
        },
    };

    let variables = match body.get("variables") {
        None => Vec::new(),
        Some(value) => parse_variables(parser, job, value),
    };

    let when = match body.get("when") {
        None => When::OnSuccess,
        Some(Value::String(when)) => match when.as_str() {
            "on_success" => When::OnSuccess,
            "always" => When::Always,
            other => {
                parser.problem(
                    job,
                    "when",
                    format!("when: {other} is not supported yet (use on_success or always)"),
                );
                When::OnSuccess
            }
        },
        Some(_) => {
            parser.problem(job, "when", "when must be a string");
            When::OnSuccess
        }
    };

    let allow_failure = match body.get("allow_failure") {
        None => false,
        Some(Value::Bool(allowed)) => *allowed,
        Some(Value::Mapping(_)) => {
            parser.warn(job, "allow_failure:exit_codes");
            false
        }
        Some(_) => {
            parser.problem(job, "allow_failure", "allow_failure must be true or false");
            false
        }
    };

    if parser.problems.len() > problems_before {
        return None;
    }
    Some(JobSpec {
        name: name.to_owned(),
        stage,
        image,
        before_script,
        script,
        after_script,
        variables,
        tags,
        when,
        allow_failure,
    })
}

fn parse_image(value: &Value) -> Result<ImageSpec, String> {
    match value {
        Value::String(name) if !name.trim().is_empty() => Ok(ImageSpec {
            name: name.clone(),
            entrypoint: Vec::new(),
        }),
        Value::Mapping(image) => {
            let name = match image.get("name") {
                Some(Value::String(name)) if !name.trim().is_empty() => name.clone(),
                _ => return Err("needs a name".to_owned()),
            };
            let entrypoint = match image.get("entrypoint") {
                None => Vec::new(),
                Some(value) => {
                    string_list(value).map_err(|message| format!("entrypoint {message}"))?
                }
            };
            Ok(ImageSpec { name, entrypoint })
        }
        _ => Err("must be an image name or a mapping with a name".to_owned()),
    }
}

fn parse_variables(parser: &mut Parser, job: Option<&str>, value: &Value) -> Vec<Variable> {
    let Value::Mapping(entries) = value else {
        if !value.is_null() {
            parser.problem(
                job,
                "variables",
                "variables must be a mapping of names to values",
            );
        }
        return Vec::new();
    };
    let mut variables = Vec::new();
    for (key, entry) in entries {
        let key = key_text(key);
        let parsed = match entry {
            Value::Mapping(detail) => {
                let value = match detail.get("value") {
                    None | Some(Value::Null) => Some(String::new()),
                    Some(value) => scalar_text(value),
                };
                let raw = matches!(detail.get("expand"), Some(Value::Bool(false)));
                value.map(|value| (value, raw))
            }
            Value::Null => Some((String::new(), false)),
            other => scalar_text(other).map(|value| (value, false)),
        };
        match parsed {
            Some((value, raw)) => variables.push(Variable { key, value, raw }),
            None => parser.problem(
                job,
                "variables",
                format!("variables: {key} must be a string, a number, a boolean or {{value, description}}"),
            ),
        }
    }
    variables
}

/// A string, or a list of strings (nested lists are flattened, as GitLab does for scripts).
fn string_list(value: &Value) -> Result<Vec<String>, String> {
    let not_strings = || "must be a string or a list of strings".to_owned();
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Sequence(items) => {
            let mut lines = Vec::new();
            for item in items {
                match item {
                    Value::Sequence(_) => lines.extend(string_list(item)?),
                    Value::Tagged(_) => return Err(tag_unsupported()),
                    other => lines.push(scalar_text(other).ok_or_else(not_strings)?),
                }
            }
            Ok(lines)
        }
        Value::Tagged(_) => Err(tag_unsupported()),
        other => scalar_text(other)
            .map(|line| vec![line])
            .ok_or_else(not_strings),
    }
}

fn tag_unsupported() -> String {
    "uses a YAML tag such as !reference, which is not supported yet".to_owned()
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn key_text(key: &Value) -> String {
    scalar_text(key).unwrap_or_else(|| format!("{key:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Pipeline {
        parse_pipeline(text, ".gitlab-ci.yml").unwrap_or_else(|error| panic!("{error}"))
    }

    fn error(text: &str) -> String {
        parse_pipeline(text, ".gitlab-ci.yml")
            .expect_err("invalid pipeline")
            .to_string()
    }

    #[test]
    fn default_stages_wrap_pre_and_post() {
        let pipeline = parse("job:\n  script: echo hi\n");
        assert_eq!(
            pipeline.stages,
            [".pre", "build", "test", "deploy", ".post"]
        );
        assert_eq!(pipeline.jobs[0].stage, "test");
        assert_eq!(pipeline.jobs[0].script, ["echo hi"]);
        assert_eq!(pipeline.jobs[0].when, When::OnSuccess);
    }

    #[test]
    fn declared_stages_keep_their_order() {
        let pipeline = parse("stages: [lint, .pre, build]\nj:\n  stage: lint\n  script: [a]\n");
        assert_eq!(pipeline.stages, [".pre", "lint", "build", ".post"]);
    }

    #[test]
    fn defaults_are_inherited_and_overridden() {
        let pipeline = parse(
            r#"
image: legacy:1
before_script: echo legacy
default:
  image:
    name: alpine:3
    entrypoint: [""]
  after_script: [echo bye]
  tags: [podman]
inherits:
  script: [echo a]
overrides:
  image: debian:12
  before_script: []
  after_script: echo mine
  tags: [pinp, podman]
  script: echo b
"#,
        );
        let inherits = &pipeline.jobs[0];
        assert_eq!(
            inherits.image,
            Some(ImageSpec {
                name: "alpine:3".into(),
                entrypoint: vec![String::new()]
            })
        );
        assert_eq!(inherits.before_script, ["echo legacy"]);
        assert_eq!(inherits.after_script, ["echo bye"]);
        assert_eq!(inherits.tags, ["podman"]);
        let overrides = &pipeline.jobs[1];
        assert_eq!(
            overrides.image.as_ref().map(|image| image.name.as_str()),
            Some("debian:12")
        );
        assert!(overrides.before_script.is_empty());
        assert_eq!(overrides.after_script, ["echo mine"]);
        assert_eq!(overrides.tags, ["pinp", "podman"]);
    }

    #[test]
    fn variables_accept_scalars_and_value_description_forms() {
        let pipeline = parse(
            r#"
variables:
  PLAIN: hello
  NUMBER: 3
  FLAG: true
  DOCUMENTED:
    value: "x"
    description: "shown in the UI"
  RAW:
    value: "$NOT_EXPANDED"
    expand: false
job:
  variables:
    LOCAL: "1"
  script: env
"#,
        );
        let pairs: Vec<(&str, &str, bool)> = pipeline
            .variables
            .iter()
            .map(|variable| (variable.key.as_str(), variable.value.as_str(), variable.raw))
            .collect();
        assert_eq!(
            pairs,
            [
                ("PLAIN", "hello", false),
                ("NUMBER", "3", false),
                ("FLAG", "true", false),
                ("DOCUMENTED", "x", false),
                ("RAW", "$NOT_EXPANDED", true),
            ]
        );
        assert_eq!(pipeline.jobs[0].variables[0].key, "LOCAL");
    }

    #[test]
    fn hidden_jobs_anchors_and_merge_keys() {
        let pipeline = parse(
            r#"
.template: &template
  image: alpine:3
  script: [echo from template]
real:
  <<: *template
  stage: build
"#,
        );
        assert_eq!(pipeline.jobs.len(), 1);
        let job = &pipeline.jobs[0];
        assert_eq!((job.name.as_str(), job.stage.as_str()), ("real", "build"));
        assert_eq!(job.script, ["echo from template"]);
    }

    #[test]
    fn errors_name_the_file_the_job_and_the_key() {
        assert_eq!(
            error("build:\n  stage: build\n"),
            r#".gitlab-ci.yml: job "build": script is missing"#
        );
        assert_eq!(
            error("deploy:\n  script: x\n  when: manual\n"),
            r#".gitlab-ci.yml: job "deploy": when: manual is not supported yet (use on_success or always)"#
        );
        assert_eq!(
            error("job:\n  stage: nowhere\n  script: x\n"),
            r#".gitlab-ci.yml: job "job": stage "nowhere" is not defined in stages (.pre, build, test, deploy, .post)"#
        );
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let text = error("a:\n  script: x\n  extends: .b\nb:\n  scrpt: x\ninclude: other.yml\n");
        assert!(text.starts_with(".gitlab-ci.yml: 4 problems:"), "{text}");
        for expected in [
            "include is not supported yet",
            r#"job "a": extends is not supported yet"#,
            r#"job "b": unknown key "scrpt""#,
            r#"job "b": script is missing"#,
        ] {
            assert!(text.contains(expected), "{expected} missing from {text}");
        }
    }

    #[test]
    fn ignored_keywords_become_warnings() {
        let pipeline = parse(
            "job:\n  script: x\n  artifacts:\n    paths: [out]\n  rules:\n    - when: always\n",
        );
        assert_eq!(
            pipeline.warnings,
            [
                r#"job "job": artifacts is not supported yet and is ignored"#,
                r#"job "job": rules is not supported yet and is ignored"#,
            ]
        );
    }

    #[test]
    fn yaml_syntax_errors_name_the_file() {
        let text = error("job: [unclosed\n");
        assert!(
            text.starts_with(".gitlab-ci.yml: not valid YAML:"),
            "{text}"
        );
        assert_eq!(error(""), ".gitlab-ci.yml: the file is empty");
        assert!(error(".hidden:\n  script: x\n").contains("no visible jobs"));
    }

    #[test]
    fn when_always_and_allow_failure_are_read() {
        let pipeline = parse("a:\n  script: x\n  when: always\n  allow_failure: true\n");
        assert_eq!(pipeline.jobs[0].when, When::Always);
        assert!(pipeline.jobs[0].allow_failure);
    }
}
