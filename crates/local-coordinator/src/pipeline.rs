//! `.gitlab-ci.yml` as people write it, read the way GitLab reads it: the only place that knows
//! its YAML. See `docs/pipeline.md` for the supported keywords and the differences from GitLab.
//!
//! The steps, in GitLab's order: YAML (anchors, merge keys) → `include: local` files merged
//! under the main file → `!reference` tags → `extends` → per job: `default`/`inherit`,
//! `parallel` expansion, `rules` or `only`/`except` against the project's variables and files
//! → `needs`/`dependencies` checks over the whole graph. Anything GitLab would act on that
//! podfleet cannot is an error naming the keyword and `file:line`; every problem is reported
//! at once.

mod expression;
mod source;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use podfleet_coordinator::model::{
    Artifact, Cache, DockerExecutorOptions, ExecutorOptions, Image, ImageVariable,
};
use serde::Serialize;
use serde_norway::{Mapping, Value};

use crate::project::Project;
use expression::Lookup;
use source::{Document, Loader};

/// The stages GitLab uses when a file has no `stages:`.
const DEFAULT_STAGES: [&str; 3] = ["build", "test", "deploy"];

/// Top-level keys that are never jobs.
const RESERVED_TOP_LEVEL: [&str; 11] = [
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
    "spec",
];

/// Job keywords podfleet acts on.
const JOB_KEYS: [&str; 30] = [
    "after_script",
    "allow_failure",
    "artifacts",
    "before_script",
    "cache",
    "coverage",
    "dependencies",
    "environment",
    "except",
    "extends",
    "image",
    "inherit",
    "interruptible",
    "manual_confirmation",
    "needs",
    "only",
    "parallel",
    "resource_group",
    "retry",
    "rules",
    "script",
    "services",
    "stage",
    "start_in",
    "tags",
    "timeout",
    "variables",
    "when",
    "hooks",
    "id_tokens",
];

/// Job keywords that need a GitLab instance: refused rather than run differently.
const GITLAB_ONLY_JOB_KEYS: [&str; 9] = [
    "trigger",
    "pages",
    "release",
    "secrets",
    "identity",
    "dast_configuration",
    "run",
    "inputs",
    "publish",
];

/// `default:` keywords.
const DEFAULT_KEYS: [&str; 10] = [
    "after_script",
    "artifacts",
    "before_script",
    "cache",
    "image",
    "interruptible",
    "retry",
    "services",
    "tags",
    "timeout",
];

/// Failure reasons `retry:when` accepts.
const RETRY_WHEN: [&str; 13] = [
    "always",
    "unknown_failure",
    "script_failure",
    "api_failure",
    "stuck_or_timeout_failure",
    "runner_system_failure",
    "runner_unsupported",
    "stale_schedule",
    "job_execution_timeout",
    "archived_failure",
    "unmet_prerequisites",
    "scheduler_failure",
    "data_integrity_failure",
];

/// `artifacts:reports` types and the format gitlab-runner uploads each in.
const REPORT_TYPES: [&str; 19] = [
    "junit",
    "coverage_report",
    "cobertura",
    "codequality",
    "sast",
    "secret_detection",
    "dependency_scanning",
    "container_scanning",
    "dast",
    "license_scanning",
    "performance",
    "browser_performance",
    "load_performance",
    "metrics",
    "requirements",
    "terraform",
    "accessibility",
    "cyclonedx",
    "dotenv",
];

/// A parsed pipeline, ready to be scheduled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pipeline {
    /// In execution order, `.pre` first and `.post` last.
    pub stages: Vec<String>,
    /// Jobs the pipeline runs (rules applied, `parallel` expanded), in file order.
    pub jobs: Vec<JobSpec>,
    /// Jobs `rules`/`only`/`except` left out, with why.
    pub excluded: Vec<ExcludedJob>,
    /// Global `variables` (workflow rules' variables applied), in file order.
    pub variables: Vec<Variable>,
    /// Variables given on the command line: they win over the file's, like project variables.
    pub user_variables: Vec<Variable>,
    /// `workflow:name`, expanded.
    pub name: Option<String>,
    /// Set when `workflow:rules` keep the pipeline from running: why.
    pub filtered_out: Option<String>,
}

/// A job that does not run, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExcludedJob {
    pub name: String,
    pub stage: String,
    pub reason: String,
}

impl Pipeline {
    /// Whether `job` is `name` or one of its `parallel` instances (`name 1/3`, `name: [a]`).
    fn is_instance(job: &str, name: &str) -> bool {
        job == name
            || job
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(": [") || is_node_suffix(rest))
    }

    /// The pipeline reduced to the jobs `names` (or their `parallel` instances) and,
    /// transitively, the jobs they `needs`; an error names the names no job has.
    pub fn select(&self, names: &[String]) -> Result<Pipeline, String> {
        let unknown: Vec<&str> = names
            .iter()
            .filter(|name| {
                !self
                    .jobs
                    .iter()
                    .any(|job| Self::is_instance(&job.name, name))
            })
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            let excluded: Vec<&str> = unknown
                .iter()
                .copied()
                .filter(|name| {
                    self.excluded
                        .iter()
                        .any(|job| Self::is_instance(&job.name, name))
                })
                .collect();
            let mut message = format!("no job named {} in this pipeline", unknown.join(", "));
            if !excluded.is_empty() {
                message.push_str(&format!(
                    " ({} left out by rules/only/except; see --list)",
                    excluded.join(", ")
                ));
            }
            return Err(message);
        }
        let mut wanted: Vec<String> = self
            .jobs
            .iter()
            .filter(|job| names.iter().any(|name| Self::is_instance(&job.name, name)))
            .map(|job| job.name.clone())
            .collect();
        let mut index = 0;
        while index < wanted.len() {
            let job = self.jobs.iter().find(|job| job.name == wanted[index]);
            for need in job.and_then(|job| job.needs.as_ref()).into_iter().flatten() {
                if !wanted.contains(&need.job) {
                    wanted.push(need.job.clone());
                }
            }
            index += 1;
        }
        Ok(Pipeline {
            jobs: self
                .jobs
                .iter()
                .filter(|job| wanted.contains(&job.name))
                .cloned()
                .collect(),
            ..self.clone()
        })
    }
}

fn is_node_suffix(rest: &str) -> bool {
    let Some(fraction) = rest.strip_prefix(' ') else {
        return false;
    };
    fraction
        .split_once('/')
        .is_some_and(|(index, total)| index.parse::<u32>().is_ok() && total.parse::<u32>().is_ok())
}

/// `KEY=VALUE` from the command line.
pub fn parse_assignment(text: &str) -> Result<(String, String), String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err("expected KEY=VALUE".to_owned());
    };
    let valid = !key.is_empty()
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !key.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        return Err(format!(
            "{key:?} is not a variable name (letters, digits and _, not starting with a digit)"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// A variables file: YAML (`KEY: value`, or `KEY: {value, masked, file, expand}`) when it
/// is a mapping, else `KEY=VALUE` lines (`#` comments). Values never appear in errors.
pub fn parse_variables_file(text: &str, origin: &str) -> Result<Vec<Variable>, String> {
    if let Ok(Value::Mapping(mapping)) = serde_norway::from_str::<Value>(text) {
        let mut variables = Vec::new();
        for (key, value) in &mapping {
            let key = key_text(key);
            let mut variable = Variable::public(&key, String::new());
            match value {
                Value::Mapping(detail) => {
                    for (field, entry) in detail {
                        match (key_text(field).as_str(), entry) {
                            ("value", entry) => {
                                variable.value = scalar_text(entry).ok_or_else(|| {
                                    format!("{origin}: {key}: value must be a string")
                                })?
                            }
                            ("masked", Value::Bool(flag)) => variable.masked = *flag,
                            ("file", Value::Bool(flag)) => variable.file = *flag,
                            ("expand", Value::Bool(flag)) => variable.raw = !*flag,
                            (other, _) => {
                                return Err(format!(
                                    "{origin}: {key}: unknown or mistyped field {other:?} (value, masked, file, expand)"
                                ));
                            }
                        }
                    }
                }
                other => {
                    variable.value = scalar_text(other).ok_or_else(|| {
                        format!("{origin}: {key} must be a string or {{value, masked}}")
                    })?
                }
            }
            variables.push(variable);
        }
        return Ok(variables);
    }
    let mut variables = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = parse_assignment(line)
            .map_err(|message| format!("{origin}:{}: {message}", number + 1))?;
        let value = value
            .strip_prefix('"')
            .and_then(|inner| inner.strip_suffix('"'))
            .or_else(|| {
                value
                    .strip_prefix('\'')
                    .and_then(|inner| inner.strip_suffix('\''))
            })
            .map_or(value.clone(), str::to_owned);
        variables.push(Variable::public(&key, value));
    }
    Ok(variables)
}

/// One job of the pipeline, with defaults and rules already applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobSpec {
    pub name: String,
    pub stage: String,
    pub image: Option<Image>,
    pub services: Vec<Image>,
    pub before_script: Vec<String>,
    pub script: Vec<String>,
    pub after_script: Vec<String>,
    /// The job's own variables (parallel and rules ones included), in file order; global
    /// ones are in [`Pipeline::variables`].
    pub variables: Vec<Variable>,
    pub tags: Vec<String>,
    pub when: When,
    /// Seconds to wait for `when: delayed`.
    pub start_in: Option<u64>,
    pub allow_failure: AllowFailure,
    /// `inherit:variables`: the global variables this job gets (`None`: all of them).
    pub inherited_variables: Option<Vec<String>>,
    /// `None`: wait for every job of earlier stages; `Some`: only these (a DAG job).
    pub needs: Option<Vec<Need>>,
    /// `dependencies:`: whose artifacts to fetch (`None`: the default set).
    pub dependencies: Option<Vec<String>>,
    pub retry: Retry,
    /// `timeout:` in seconds.
    pub timeout: Option<u64>,
    pub artifacts: Vec<Artifact>,
    pub cache: Vec<Cache>,
    pub interruptible: bool,
    pub resource_group: Option<String>,
    /// `coverage:` regex, matched against the log.
    pub coverage: Option<String>,
    pub environment: Option<Environment>,
    /// `CI_NODE_INDEX`/`CI_NODE_TOTAL` of a `parallel` job.
    pub node: Option<(u32, u32)>,
    /// Why the job is in the pipeline (the matching rule, or "no rules").
    pub reason: String,
}

/// `environment:` name and URL (expanded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Environment {
    pub name: String,
    pub url: Option<String>,
}

/// `allow_failure`, with `exit_codes` when only some failures are allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AllowFailure {
    pub allowed: bool,
    /// Non-empty: only these exit codes are allowed failures.
    pub exit_codes: Vec<i32>,
}

impl AllowFailure {
    /// Whether a failure with `exit_code` is allowed.
    pub fn allows(&self, exit_code: Option<i32>) -> bool {
        if self.exit_codes.is_empty() {
            self.allowed
        } else {
            exit_code.is_some_and(|code| self.exit_codes.contains(&code))
        }
    }
}

/// One entry of `needs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Need {
    pub job: String,
    pub artifacts: bool,
    pub optional: bool,
}

/// `retry`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Retry {
    pub max: u32,
    /// Failure reasons that retry (`always` for any); empty with `exit_codes` set: only those.
    pub when: Vec<String>,
    pub exit_codes: Vec<i32>,
}

impl Retry {
    /// Whether a failure with this reason and exit code is retried (attempt limits aside).
    pub fn retries(&self, failure_reason: &str, exit_code: Option<i32>) -> bool {
        let by_code = exit_code.is_some_and(|code| self.exit_codes.contains(&code));
        let by_reason = if self.when.is_empty() {
            self.exit_codes.is_empty()
        } else {
            self.when
                .iter()
                .any(|when| when == "always" || when == failure_reason)
        };
        by_code || by_reason
    }
}

/// A CI variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Variable {
    pub key: String,
    pub value: String,
    /// `expand: false`: the runner must not expand `$` references in the value.
    pub raw: bool,
    /// Hidden in logs; never printed by podfleet.
    pub masked: bool,
    /// The runner writes the value to a file and sets the variable to its path.
    pub file: bool,
}

impl Variable {
    /// A plain, unmasked variable.
    pub fn public(key: &str, value: impl Into<String>) -> Variable {
        Variable {
            key: key.to_owned(),
            value: value.into(),
            raw: false,
            masked: false,
            file: false,
        }
    }
}

/// When a job runs relative to the jobs it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Only if none of them failed (allowed failures do not count).
    OnSuccess,
    /// Only if one of them failed.
    OnFailure,
    /// Whatever happened.
    Always,
    /// Only when asked for (`podfleet pipeline --manual`).
    Manual,
    /// Like `on_success`, `start_in` later.
    Delayed,
}

impl When {
    pub fn as_str(self) -> &'static str {
        match self {
            When::OnSuccess => "on_success",
            When::OnFailure => "on_failure",
            When::Always => "always",
            When::Manual => "manual",
            When::Delayed => "delayed",
        }
    }
}

/// One thing wrong with a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineProblem {
    /// The file it is in (as given, or relative to the project for included files).
    pub file: String,
    /// 1-based line of the keyword, when known.
    pub line: Option<usize>,
    /// The job it is about, or `None` for top-level keys.
    pub job: Option<String>,
    /// The keyword it is about, e.g. `script` or `stages`.
    pub key: String,
    /// Readable text that names the keyword.
    pub message: String,
}

impl fmt::Display for PipelineProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(formatter, "{}:{line}: ", self.file)?,
            None => write!(formatter, "{}: ", self.file)?,
        }
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
    #[error("{}", format_problems(problems))]
    Invalid {
        origin: String,
        problems: Vec<PipelineProblem>,
    },
    #[error("{path}: cannot read the pipeline file: {message}")]
    Unreadable { path: String, message: String },
}

impl PipelineError {
    /// The problems found (empty for a YAML syntax error).
    pub fn problems(&self) -> &[PipelineProblem] {
        match self {
            PipelineError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

/// Problems found so far.
#[derive(Default)]
pub(crate) struct Problems(Vec<PipelineProblem>);

impl Problems {
    pub(crate) fn push(
        &mut self,
        file: &str,
        line: Option<usize>,
        job: Option<&str>,
        key: &str,
        message: impl Into<String>,
    ) {
        self.0.push(PipelineProblem {
            file: file.to_owned(),
            line,
            job: job.map(str::to_owned),
            key: key.to_owned(),
            message: message.into(),
        });
    }
}

/// Variables in GitLab's precedence: later entries win.
#[derive(Clone, Default)]
struct Scope(Vec<(String, String, bool)>);

impl Scope {
    fn extend(&mut self, variables: &[Variable]) {
        self.0.extend(
            variables
                .iter()
                .map(|variable| (variable.key.clone(), variable.value.clone(), variable.raw)),
        );
    }

    fn raw_lookup(&self, name: &str) -> Option<(&str, bool)> {
        self.0
            .iter()
            .rev()
            .find(|(key, _, _)| key == name)
            .map(|(_, value, raw)| (value.as_str(), *raw))
    }

    /// `text` with `$VAR`, `${VAR}` expanded (`$$` is a literal `$`; unknown variables are empty).
    fn expand(&self, text: &str) -> String {
        self.expand_depth(text, 0)
    }

    fn expand_depth(&self, text: &str, depth: usize) -> String {
        let mut expanded = String::new();
        let mut rest = text;
        while let Some(position) = rest.find('$') {
            expanded.push_str(&rest[..position]);
            rest = &rest[position + 1..];
            if let Some(after) = rest.strip_prefix('$') {
                expanded.push('$');
                rest = after;
                continue;
            }
            let (name, after) = if let Some(braced) = rest.strip_prefix('{') {
                match braced.find('}') {
                    Some(end) => (&braced[..end], &braced[end + 1..]),
                    None => {
                        expanded.push('$');
                        continue;
                    }
                }
            } else {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                (&rest[..end], &rest[end..])
            };
            if name.is_empty() {
                expanded.push('$');
                continue;
            }
            if let Some((value, raw)) = self.raw_lookup(name) {
                if raw || depth > 8 {
                    expanded.push_str(value);
                } else {
                    expanded.push_str(&self.expand_depth(value, depth + 1));
                }
            }
            rest = after;
        }
        expanded.push_str(rest);
        expanded
    }
}

impl Lookup for Scope {
    fn lookup(&self, name: &str) -> Option<String> {
        self.raw_lookup(name).map(|(value, raw)| {
            if raw {
                value.to_owned()
            } else {
                self.expand(value)
            }
        })
    }
}

/// Parses pipeline text with no project around it: no includes, no files for `exists`, no
/// git state (the predefined variables describe a branch named `local`).
pub fn parse_pipeline(text: &str, origin: &str) -> Result<Pipeline, PipelineError> {
    let project = Project::detached(Path::new("."));
    parse_pipeline_with(text, origin, &project, &[])
}

/// Reads and parses the pipeline file `path` of `project`; `user_variables` come from the
/// command line.
pub fn load_pipeline(
    path: &Path,
    project: &Project,
    user_variables: &[Variable],
) -> Result<Pipeline, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|error| PipelineError::Unreadable {
        path: path.display().to_string(),
        message: error.to_string(),
    })?;
    parse_pipeline_with(&text, &path.display().to_string(), project, user_variables)
}

/// Parses pipeline `text` (file `origin`) of `project`.
pub fn parse_pipeline_with(
    text: &str,
    origin: &str,
    project: &Project,
    user_variables: &[Variable],
) -> Result<Pipeline, PipelineError> {
    let mut problems = Problems::default();
    let has_project = project.git.is_some() || !project.files.is_empty();
    let mut loader = Loader {
        project_dir: has_project.then_some(project.dir.as_path()),
        project_files: &project.files,
        files: Vec::new(),
        seen: HashSet::new(),
    };
    let (top, origin_of) = loader.load(text, origin, &mut problems)?;
    let mut document = Document {
        top,
        files: loader.files,
        origin_of,
    };
    // `!reference` resolves against the merged file, before `extends` (as GitLab does).
    let mut resolved = Mapping::new();
    for (key, value) in &document.top {
        let name = key_text(key);
        match source::resolve_references(value, &document.top, 0) {
            Ok(value) => {
                resolved.insert(key.clone(), value);
            }
            Err(message) => {
                let (file, line) = document.locate(&[&name]);
                problems.push(&file, line, None, &name, message);
            }
        }
    }
    document.top = resolved;
    let mut context = Context {
        document: &document,
        project,
        problems,
    };
    let pipeline = context.pipeline(user_variables);
    let problems = context.problems.0;
    if problems.is_empty() {
        Ok(pipeline)
    } else {
        Err(PipelineError::Invalid {
            origin: origin.to_owned(),
            problems,
        })
    }
}

/// Inherited settings from `default:` and the legacy top-level keys, as raw values.
type Defaults = Mapping;

struct Context<'a> {
    document: &'a Document,
    project: &'a Project,
    problems: Problems,
}

/// A job before `parallel` expansion and rules.
struct RawJob {
    source_name: String,
    body: Mapping,
}

impl Context<'_> {
    fn problem(&mut self, path: &[&str], job: Option<&str>, message: impl Into<String>) {
        let (file, line) = self.document.locate(path);
        let key = path.last().copied().unwrap_or_default();
        self.problems.push(&file, line, job, key, message);
    }

    fn pipeline(&mut self, user_variables: &[Variable]) -> Pipeline {
        let top = &self.document.top;
        let empty = top.is_empty() && self.problems.0.is_empty();
        let stages = self.stages();
        let mut variables = match top.get("variables") {
            None => Vec::new(),
            Some(value) => self.variables(&["variables"], None, value),
        };
        let mut scope = Scope::default();
        scope.extend(&self.project.predefined_variables());
        scope.extend(&variables);
        scope.extend(user_variables);

        let (name, filtered_out) = self.workflow(&mut scope, &mut variables);
        let defaults = self.defaults();

        let mut jobs = Vec::new();
        let mut excluded = Vec::new();
        let mut known_names: HashMap<String, Vec<String>> = HashMap::new();
        for (key, value) in top {
            let Value::String(job_name) = key else {
                self.problem(
                    &[],
                    None,
                    format!("top-level key {} is not a string", key_text(key)),
                );
                continue;
            };
            if job_name.starts_with('.') || RESERVED_TOP_LEVEL.contains(&job_name.as_str()) {
                continue;
            }
            let job = Some(job_name.as_str());
            if !matches!(value, Value::Mapping(_)) {
                self.problem(&[job_name], job, "a job must be a mapping of keywords");
                continue;
            }
            let body = match source::resolve_extends(job_name, top, &mut Vec::new()) {
                Ok(body) => body,
                Err(message) => {
                    self.problem(&[job_name, "extends"], job, message);
                    continue;
                }
            };
            let raw = RawJob {
                source_name: job_name.clone(),
                body,
            };
            let instances =
                self.parse_job(&raw, &defaults, &stages, &scope, &variables, user_variables);
            let names = known_names.entry(job_name.clone()).or_default();
            for instance in instances {
                names.push(instance.name().to_owned());
                match instance {
                    Planned::Runs(spec) => jobs.push(*spec),
                    Planned::Excluded(job) => excluded.push(job),
                }
            }
        }
        if empty {
            self.problem(&[], None, "the file is empty");
        } else if jobs.is_empty() && excluded.is_empty() && self.problems.0.is_empty() {
            self.problem(
                &[],
                None,
                "no visible jobs are defined (jobs whose names start with '.' are hidden)",
            );
        }
        self.check_graph(&mut jobs, &excluded, &stages, &known_names);
        Pipeline {
            stages,
            jobs,
            excluded,
            variables,
            user_variables: user_variables.to_vec(),
            name,
            filtered_out,
        }
    }

    fn stages(&mut self) -> Vec<String> {
        let stages = match self.document.top.get("stages") {
            None => DEFAULT_STAGES
                .iter()
                .map(|stage| stage.to_string())
                .collect(),
            Some(value) => match string_list(value) {
                Ok(stages) => stages,
                Err(message) => {
                    self.problem(&["stages"], None, format!("stages {message}"));
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
        all_stages
    }

    fn workflow(
        &mut self,
        scope: &mut Scope,
        variables: &mut Vec<Variable>,
    ) -> (Option<String>, Option<String>) {
        let Some(workflow) = self.document.top.get("workflow") else {
            return (None, None);
        };
        let Value::Mapping(workflow) = workflow else {
            self.problem(
                &["workflow"],
                None,
                "workflow must be a mapping with rules and/or name",
            );
            return (None, None);
        };
        for (key, _) in workflow {
            let key = key_text(key);
            if !["rules", "name"].contains(&key.as_str()) {
                self.problem(&["workflow", &key], None, format!("workflow:{key} is not supported (podfleet supports workflow:rules and workflow:name)"));
            }
        }
        let mut filtered_out = None;
        if let Some(rules) = workflow.get("rules") {
            let path = ["workflow", "rules"];
            match self.rules(&path, None, rules, scope, true) {
                Some(RulesOutcome::Matched {
                    rule,
                    when,
                    variables: rule_variables,
                    ..
                }) => {
                    if when == Some(RuleWhen::Never) {
                        filtered_out = Some(format!("workflow:rules {rule} says when: never"));
                    }
                    scope.extend(&rule_variables);
                    for variable in rule_variables {
                        variables.retain(|existing| existing.key != variable.key);
                        variables.push(variable);
                    }
                }
                Some(RulesOutcome::NoMatch) => {
                    filtered_out = Some("no workflow:rules rule matches".to_owned());
                }
                None => {}
            }
        }
        let name = match workflow.get("name") {
            None => None,
            Some(Value::String(name)) => Some(scope.expand(name)),
            Some(_) => {
                self.problem(
                    &["workflow", "name"],
                    None,
                    "workflow:name must be a string",
                );
                None
            }
        };
        (name, filtered_out)
    }

    fn defaults(&mut self) -> Defaults {
        let top = &self.document.top;
        let mut defaults = Mapping::new();
        // Legacy top-level keys first, so that `default:` wins when both are present.
        for key in [
            "image",
            "services",
            "cache",
            "before_script",
            "after_script",
        ] {
            if let Some(value) = top.get(key) {
                defaults.insert(Value::String(key.to_owned()), value.clone());
            }
        }
        // Defaults are checked once here, not only when a job inherits them.
        let default_section = match top.get("default") {
            Some(Value::Mapping(default)) => Some(default.clone()),
            _ => None,
        };
        for (section, values) in [
            (None, Some(top.clone())),
            (Some("default"), default_section),
        ] {
            let Some(values) = values else { continue };
            let path = |key: &'static str| -> Vec<&'static str> {
                match section {
                    Some(section) => vec![section, key],
                    None => vec![key],
                }
            };
            if let Some(value) = values.get("image") {
                self.image(&path("image"), None, value, false);
            }
            match values.get("services") {
                Some(Value::Sequence(services)) => {
                    for service in services {
                        self.image(&path("services"), None, service, true);
                    }
                }
                Some(Value::Null) | None => {}
                Some(_) => {
                    self.problem(&path("services"), None, "services must be a list of images")
                }
            }
            for key in ["before_script", "after_script"] {
                if let Some(value) = values.get(key)
                    && let Err(message) = string_list(value)
                {
                    self.problem(&path(key), None, format!("{key} {message}"));
                }
            }
            if section.is_some() {
                if let Some(value) = values.get("tags")
                    && let Err(message) = string_list(value)
                {
                    self.problem(&path("tags"), None, format!("tags {message}"));
                }
                if let Some(value) = values.get("retry") {
                    self.retry("default", value);
                }
                if let Some(value) = values.get("timeout") {
                    self.duration(&path("timeout"), None, value, "timeout");
                }
                if let Some(value) = values.get("artifacts") {
                    self.artifacts("default", value);
                }
            }
            if let Some(value) = values.get("cache") {
                self.cache("default", value, &Scope::default());
            }
        }
        match top.get("default") {
            None => {}
            Some(Value::Mapping(default)) => {
                for (key, value) in default {
                    let name = key_text(key);
                    if DEFAULT_KEYS.contains(&name.as_str()) {
                        defaults.insert(key.clone(), value.clone());
                    } else if ["hooks", "id_tokens"].contains(&name.as_str()) {
                        self.problem(
                            &["default", &name],
                            None,
                            format!("default:{name} is not supported: {}", gitlab_only(&name)),
                        );
                    } else {
                        self.problem(
                            &["default", &name],
                            None,
                            format!("default has an unknown keyword {name:?}"),
                        );
                    }
                }
            }
            Some(_) => self.problem(&["default"], None, "default must be a mapping"),
        }
        defaults
    }

    /// The instances of one job (several with `parallel`), each running or excluded.
    fn parse_job(
        &mut self,
        raw: &RawJob,
        defaults: &Defaults,
        stages: &[String],
        pipeline_scope: &Scope,
        global_variables: &[Variable],
        user_variables: &[Variable],
    ) -> Vec<Planned> {
        let name = raw.source_name.as_str();
        let job = Some(name);
        let body = &raw.body;
        let problems_before = self.problems.0.len();
        for (key, _) in body {
            let key = key_text(key);
            if JOB_KEYS.contains(&key.as_str()) {
                if key == "hooks" || key == "id_tokens" {
                    self.problem(
                        &[name, &key],
                        job,
                        format!("{key} is not supported: {}", gitlab_only(&key)),
                    );
                }
                continue;
            }
            if GITLAB_ONLY_JOB_KEYS.contains(&key.as_str()) {
                self.problem(
                    &[name, &key],
                    job,
                    format!("{key} is not supported: {}", gitlab_only(&key)),
                );
            } else {
                self.problem(&[name, &key], job, format!("unknown keyword {key:?}"));
            }
        }

        // `inherit` limits what `default:` and global variables give this job.
        let (inherit_default, inherit_variables) = self.inherit(name, body);
        let inherited = |key: &str| -> Option<&Value> {
            body.get(key).or_else(|| {
                inherit_default
                    .as_ref()
                    .is_none_or(|allowed| allowed.iter().any(|allowed| allowed == key))
                    .then(|| defaults.get(key))
                    .flatten()
            })
        };

        let lines = |context: &mut Self, key: &str| -> Vec<String> {
            match inherited(key) {
                Some(value) => string_list(value).unwrap_or_else(|message| {
                    context.problem(&[name, key], job, format!("{key} {message}"));
                    Vec::new()
                }),
                None => Vec::new(),
            }
        };
        let before_script = lines(self, "before_script");
        let after_script = lines(self, "after_script");
        let tags = lines(self, "tags");
        let script = match body.get("script") {
            // A GitLab-only job is already refused; its missing script is no news.
            None | Some(Value::Null)
                if GITLAB_ONLY_JOB_KEYS
                    .iter()
                    .any(|key| body.contains_key(*key)) =>
            {
                Vec::new()
            }
            None | Some(Value::Null) => {
                self.problem(&[name, "script"], job, "script is missing");
                Vec::new()
            }
            Some(value) => match string_list(value) {
                Ok(lines) if lines.is_empty() => {
                    self.problem(&[name, "script"], job, "script is empty");
                    lines
                }
                Ok(lines) => lines,
                Err(message) => {
                    self.problem(&[name, "script"], job, format!("script {message}"));
                    Vec::new()
                }
            },
        };

        let stage = match body.get("stage") {
            None => "test".to_owned(),
            Some(Value::String(stage)) => stage.clone(),
            Some(_) => {
                self.problem(&[name, "stage"], job, "stage must be a string");
                String::new()
            }
        };
        if !stage.is_empty() && !stages.contains(&stage) {
            self.problem(
                &[name, "stage"],
                job,
                format!(
                    "stage {stage:?} is not defined in stages ({})",
                    stages.join(", ")
                ),
            );
        }

        let image =
            inherited("image").and_then(|value| self.image(&[name, "image"], job, value, false));
        let services = match inherited("services") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Sequence(services)) => services
                .iter()
                .filter_map(|service| self.image(&[name, "services"], job, service, true))
                .collect(),
            Some(_) => {
                self.problem(
                    &[name, "services"],
                    job,
                    "services must be a list of images",
                );
                Vec::new()
            }
        };

        let own_variables = match body.get("variables") {
            None => Vec::new(),
            Some(value) => self.variables(&[name, "variables"], job, value),
        };
        let globals: Vec<Variable> = match &inherit_variables {
            None => global_variables.to_vec(),
            Some(allowed) => global_variables
                .iter()
                .filter(|variable| allowed.contains(&variable.key))
                .cloned()
                .collect(),
        };

        let when = self.when(&[name, "when"], job, body.get("when"));
        let start_in = match body.get("start_in") {
            None => None,
            Some(value) => self.duration(&[name, "start_in"], job, value, "start_in"),
        };
        let allow_failure =
            self.allow_failure(&[name, "allow_failure"], job, body.get("allow_failure"));
        let needs = self.needs(name, body.get("needs"));
        let dependencies = match body.get("dependencies") {
            None => None,
            Some(value) => match string_list(value) {
                Ok(dependencies) => Some(dependencies),
                Err(message) => {
                    self.problem(
                        &[name, "dependencies"],
                        job,
                        format!("dependencies {message}"),
                    );
                    None
                }
            },
        };
        let retry = match inherited("retry") {
            None => Retry::default(),
            Some(value) => self.retry(name, value),
        };
        let timeout = match inherited("timeout") {
            None => None,
            Some(value) => self.duration(&[name, "timeout"], job, value, "timeout"),
        };
        let artifacts = match inherited("artifacts") {
            None | Some(Value::Null) => Vec::new(),
            Some(value) => self.artifacts(name, value),
        };
        let interruptible = match inherited("interruptible") {
            None => false,
            Some(Value::Bool(flag)) => *flag,
            Some(_) => {
                self.problem(
                    &[name, "interruptible"],
                    job,
                    "interruptible must be true or false",
                );
                false
            }
        };
        let resource_group = match body.get("resource_group") {
            None => None,
            Some(Value::String(group)) => Some(group.clone()),
            Some(_) => {
                self.problem(
                    &[name, "resource_group"],
                    job,
                    "resource_group must be a string",
                );
                None
            }
        };
        let coverage = match body.get("coverage") {
            None => None,
            Some(Value::String(pattern)) => {
                let inner = pattern
                    .strip_prefix('/')
                    .and_then(|rest| rest.strip_suffix('/'))
                    .unwrap_or(pattern);
                match regex::Regex::new(inner) {
                    Ok(_) => Some(inner.to_owned()),
                    Err(error) => {
                        self.problem(
                            &[name, "coverage"],
                            job,
                            format!("coverage is not a valid regex: {error}"),
                        );
                        None
                    }
                }
            }
            Some(_) => {
                self.problem(
                    &[name, "coverage"],
                    job,
                    "coverage must be a /regex/ string",
                );
                None
            }
        };
        if let Some(value) = body.get("manual_confirmation")
            && !matches!(value, Value::String(_))
        {
            self.problem(
                &[name, "manual_confirmation"],
                job,
                "manual_confirmation must be a string",
            );
        }
        let has_rules = body.contains_key("rules");
        if has_rules && (body.contains_key("only") || body.contains_key("except")) {
            self.problem(
                &[name, "rules"],
                job,
                "rules cannot be combined with only/except (GitLab rejects this too); keep one",
            );
        }

        let nodes = self.parallel(name, body.get("parallel"));

        let mut planned = Vec::new();
        for node in nodes {
            let mut variables = own_variables.clone();
            variables.extend(node.variables.iter().cloned());
            let instance_name = node.name.clone().unwrap_or_else(|| name.to_owned());
            let mut scope = Scope::default();
            scope.extend(&self.project.predefined_variables());
            scope.extend(&globals);
            scope.extend(&variables);
            scope.extend(&[
                Variable::public("CI_JOB_NAME", &instance_name),
                Variable::public("CI_JOB_NAME_SLUG", crate::project::slug(&instance_name)),
                Variable::public("CI_JOB_STAGE", &stage),
            ]);
            scope.extend(user_variables);
            let _ = pipeline_scope;

            let mut spec = JobSpec {
                name: instance_name,
                stage: stage.clone(),
                image: image.clone().map(|image| expand_image(image, &scope)),
                services: services
                    .iter()
                    .cloned()
                    .map(|image| expand_image(image, &scope))
                    .collect(),
                before_script: before_script.clone(),
                script: script.clone(),
                after_script: after_script.clone(),
                variables,
                tags: tags.iter().map(|tag| scope.expand(tag)).collect(),
                when: when.unwrap_or(When::OnSuccess),
                start_in,
                allow_failure: allow_failure.clone().unwrap_or_else(|| AllowFailure {
                    allowed: when == Some(When::Manual),
                    exit_codes: Vec::new(),
                }),
                inherited_variables: inherit_variables.clone(),
                needs: needs.clone(),
                dependencies: dependencies.clone(),
                retry: retry.clone(),
                timeout,
                artifacts: artifacts.clone(),
                cache: Vec::new(),
                interruptible,
                resource_group: resource_group.as_ref().map(|group| scope.expand(group)),
                coverage: coverage.clone(),
                environment: None,
                node: node.index,
                reason: "no rules".to_owned(),
            };
            spec.cache = match inherited("cache") {
                None | Some(Value::Null) => Vec::new(),
                Some(value) => self.cache(name, value, &scope),
            };
            spec.environment = self.environment(name, body.get("environment"), &scope);
            // With problems, rules are pointless to evaluate; the job stays in the graph so
            // that `needs` problems are reported too.
            if self.problems.0.len() > problems_before {
                planned.push(Planned::Runs(Box::new(spec)));
                continue;
            }
            if let Some((index, total)) = node.index {
                spec.variables
                    .push(Variable::public("CI_NODE_INDEX", index.to_string()));
                spec.variables
                    .push(Variable::public("CI_NODE_TOTAL", total.to_string()));
            }

            let exclusion = if has_rules {
                self.apply_rules(
                    name,
                    body,
                    &mut spec,
                    &mut scope,
                    when,
                    allow_failure.is_some(),
                )
            } else {
                self.apply_only_except(name, body, &scope)
            };
            if spec.when == When::Delayed && spec.start_in.is_none() {
                self.problem(
                    &[name, "when"],
                    job,
                    "when: delayed needs start_in (e.g. start_in: 30 seconds)",
                );
            }
            if spec.start_in.is_some() && spec.when != When::Delayed {
                self.problem(&[name, "start_in"], job, "start_in needs when: delayed");
            }
            match exclusion {
                Some(reason) => planned.push(Planned::Excluded(ExcludedJob {
                    name: spec.name,
                    stage: spec.stage,
                    reason,
                })),
                None => planned.push(Planned::Runs(Box::new(spec))),
            }
        }
        planned
    }

    fn inherit(
        &mut self,
        name: &str,
        body: &Mapping,
    ) -> (Option<Vec<String>>, Option<Vec<String>>) {
        let job = Some(name);
        let Some(inherit) = body.get("inherit") else {
            return (None, None);
        };
        let Value::Mapping(inherit) = inherit else {
            self.problem(
                &[name, "inherit"],
                job,
                "inherit must be a mapping with default and/or variables",
            );
            return (None, None);
        };
        let read = |context: &mut Self, key: &str| -> Option<Vec<String>> {
            match inherit.get(key) {
                None | Some(Value::Bool(true)) => None,
                Some(Value::Bool(false)) => Some(Vec::new()),
                Some(value) => match string_list(value) {
                    Ok(list) => Some(list),
                    Err(message) => {
                        context.problem(
                            &[name, "inherit", key],
                            job,
                            format!("inherit:{key} must be true, false or a list: it {message}"),
                        );
                        None
                    }
                },
            }
        };
        let default = read(self, "default");
        let variables = read(self, "variables");
        for (key, _) in inherit {
            let key = key_text(key);
            if key != "default" && key != "variables" {
                self.problem(
                    &[name, "inherit", &key],
                    job,
                    format!("inherit has an unknown keyword {key:?} (default or variables)"),
                );
            }
        }
        (default, variables)
    }

    fn image(
        &mut self,
        path: &[&str],
        job: Option<&str>,
        value: &Value,
        service: bool,
    ) -> Option<Image> {
        let what = if service { "services" } else { "image" };
        match value {
            Value::String(name) if !name.trim().is_empty() => Some(Image {
                name: name.clone(),
                ..Image::default()
            }),
            Value::Mapping(mapping) => {
                let mut image = Image::default();
                for (key, entry) in mapping {
                    let key = key_text(key);
                    let list = |entry: &Value| {
                        string_list(entry).map_err(|message| format!("{what}:{key} {message}"))
                    };
                    let result: Result<(), String> = match key.as_str() {
                        "name" => match entry {
                            Value::String(name) if !name.trim().is_empty() => {
                                image.name = name.clone();
                                Ok(())
                            }
                            _ => Err(format!("{what}:name must be a non-empty string")),
                        },
                        "entrypoint" => list(entry).map(|entrypoint| image.entrypoint = entrypoint),
                        "command" if service => list(entry).map(|command| image.command = command),
                        "alias" if service => match entry {
                            Value::String(alias) => {
                                image.alias = alias.clone();
                                Ok(())
                            }
                            _ => Err(format!("{what}:alias must be a string")),
                        },
                        "variables" if service => match entry {
                            Value::Mapping(variables) => {
                                for (key, value) in variables {
                                    image.variables.push(ImageVariable {
                                        key: key_text(key),
                                        value: scalar_text(value).unwrap_or_default(),
                                    });
                                }
                                Ok(())
                            }
                            _ => Err(format!("{what}:variables must be a mapping")),
                        },
                        "pull_policy" => list(entry).and_then(|policies| {
                            match policies.iter().find(|policy| !["always", "if-not-present", "never"].contains(&policy.as_str())) {
                                Some(bad) => Err(format!("{what}:pull_policy {bad:?} is not one of always, if-not-present, never")),
                                None => {
                                    image.pull_policy = policies;
                                    Ok(())
                                }
                            }
                        }),
                        "docker" => match entry {
                            Value::Mapping(docker) => {
                                let mut options = DockerExecutorOptions::default();
                                let mut result = Ok(());
                                for (key, value) in docker {
                                    match (key_text(key).as_str(), value) {
                                        ("platform", Value::String(platform)) => options.platform = platform.clone(),
                                        ("user", Value::String(user)) => options.user = user.clone(),
                                        (other, _) => result = Err(format!("{what}:docker:{other} is not supported (platform and user are)")),
                                    }
                                }
                                image.executor_opts = Some(ExecutorOptions {
                                    docker: Some(options),
                                    kubernetes: None,
                                });
                                result
                            }
                            _ => Err(format!("{what}:docker must be a mapping")),
                        },
                        other => Err(format!("{what} has an unknown keyword {other:?}")),
                    };
                    if let Err(message) = result {
                        self.problem(path, job, message);
                    }
                }
                if image.name.is_empty() {
                    self.problem(path, job, format!("{what} needs a name"));
                    return None;
                }
                Some(image)
            }
            _ => {
                self.problem(
                    path,
                    job,
                    format!("{what} must be an image name or a mapping with a name"),
                );
                None
            }
        }
    }

    fn variables(&mut self, path: &[&str], job: Option<&str>, value: &Value) -> Vec<Variable> {
        let Value::Mapping(entries) = value else {
            if !value.is_null() {
                self.problem(path, job, "variables must be a mapping of names to values");
            }
            return Vec::new();
        };
        let mut variables = Vec::new();
        for (key, entry) in entries {
            let key = key_text(key);
            let parsed = match entry {
                Value::Mapping(detail) => {
                    for (field, _) in detail {
                        let field = key_text(field);
                        if !["value", "description", "expand", "options"].contains(&field.as_str())
                        {
                            self.problem(path, job, format!("variables: {key} has an unknown keyword {field:?} (value, description, expand, options)"));
                        }
                    }
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
                Some((value, raw)) => variables.push(Variable {
                    key,
                    value,
                    raw,
                    masked: false,
                    file: false,
                }),
                None => self.problem(
                    path,
                    job,
                    format!("variables: {key} must be a string, a number, a boolean or {{value, description}}"),
                ),
            }
        }
        variables
    }

    fn when(&mut self, path: &[&str], job: Option<&str>, value: Option<&Value>) -> Option<When> {
        match value {
            None => None,
            Some(Value::String(when)) => match when.as_str() {
                "on_success" => Some(When::OnSuccess),
                "on_failure" => Some(When::OnFailure),
                "always" => Some(When::Always),
                "manual" => Some(When::Manual),
                "delayed" => Some(When::Delayed),
                other => {
                    self.problem(path, job, format!("when: {other} is not one of on_success, on_failure, always, manual, delayed"));
                    None
                }
            },
            Some(_) => {
                self.problem(path, job, "when must be a string");
                None
            }
        }
    }

    fn duration(
        &mut self,
        path: &[&str],
        job: Option<&str>,
        value: &Value,
        key: &str,
    ) -> Option<u64> {
        let parsed = match value {
            Value::Number(number) => number.as_u64().ok_or_else(|| "must be positive".to_owned()),
            Value::String(text) => parse_duration(text),
            _ => Err("must be a duration such as 1h 30m".to_owned()),
        };
        match parsed {
            Ok(seconds) => Some(seconds),
            Err(message) => {
                self.problem(path, job, format!("{key} {message}"));
                None
            }
        }
    }

    fn allow_failure(
        &mut self,
        path: &[&str],
        job: Option<&str>,
        value: Option<&Value>,
    ) -> Option<AllowFailure> {
        match value {
            None => None,
            Some(Value::Bool(allowed)) => Some(AllowFailure {
                allowed: *allowed,
                exit_codes: Vec::new(),
            }),
            Some(Value::Mapping(mapping)) => {
                let codes = mapping.get("exit_codes").map(exit_codes);
                match (codes, mapping.len()) {
                    (Some(Ok(codes)), 1) => Some(AllowFailure {
                        allowed: true,
                        exit_codes: codes,
                    }),
                    (Some(Err(message)), _) => {
                        self.problem(path, job, format!("allow_failure:exit_codes {message}"));
                        None
                    }
                    _ => {
                        self.problem(
                            path,
                            job,
                            "allow_failure must be true, false or {exit_codes: [...]}",
                        );
                        None
                    }
                }
            }
            Some(_) => {
                self.problem(
                    path,
                    job,
                    "allow_failure must be true, false or {exit_codes: [...]}",
                );
                None
            }
        }
    }

    fn needs(&mut self, name: &str, value: Option<&Value>) -> Option<Vec<Need>> {
        let job = Some(name);
        let path = [name, "needs"];
        let items = match value? {
            Value::Sequence(items) => flatten(items),
            Value::Null => Vec::new(),
            single @ (Value::String(_) | Value::Mapping(_)) => vec![single.clone()],
            _ => {
                self.problem(
                    &path,
                    job,
                    "needs must be a list of job names or {job, artifacts, optional}",
                );
                return Some(Vec::new());
            }
        };
        let mut needs = Vec::new();
        for item in items {
            match item {
                Value::String(need) => needs.push(Need {
                    job: need,
                    artifacts: true,
                    optional: false,
                }),
                Value::Mapping(mapping) => {
                    if mapping.contains_key("pipeline") || mapping.contains_key("project") {
                        self.problem(&path, job, "needs:project and needs:pipeline are not supported locally: they fetch artifacts from other GitLab pipelines");
                        continue;
                    }
                    let Some(Value::String(target)) = mapping.get("job") else {
                        self.problem(&path, job, "needs entries in mapping form need job: <name>");
                        continue;
                    };
                    let flag = |key: &str, default: bool| match mapping.get(key) {
                        None => Ok(default),
                        Some(Value::Bool(flag)) => Ok(*flag),
                        Some(_) => Err(format!("needs:{key} must be true or false")),
                    };
                    let mut targets = vec![target.clone()];
                    for (key, value) in &mapping {
                        let key = key_text(key);
                        match key.as_str() {
                            "job" | "artifacts" | "optional" => {}
                            "parallel" => match matrix_names(target, value) {
                                Ok(names) => targets = names,
                                Err(message) => {
                                    self.problem(&path, job, format!("needs:parallel {message}"))
                                }
                            },
                            other => self.problem(
                                &path,
                                job,
                                format!("needs has an unknown keyword {other:?}"),
                            ),
                        }
                    }
                    match (flag("artifacts", true), flag("optional", false)) {
                        (Ok(artifacts), Ok(optional)) => {
                            needs.extend(targets.into_iter().map(|target| Need {
                                job: target,
                                artifacts,
                                optional,
                            }))
                        }
                        (Err(message), _) | (_, Err(message)) => self.problem(&path, job, message),
                    }
                }
                _ => self.problem(
                    &path,
                    job,
                    "needs entries must be job names or {job, artifacts, optional}",
                ),
            }
        }
        if needs.len() > 50 {
            self.problem(&path, job, "needs lists more than 50 jobs (GitLab's limit)");
        }
        Some(needs)
    }

    fn retry(&mut self, name: &str, value: &Value) -> Retry {
        let job = Some(name);
        let path = [name, "retry"];
        let max = |context: &mut Self, value: &Value| match value.as_u64() {
            Some(max @ 0..=2) => max as u32,
            _ => {
                context.problem(&path, job, "retry must be 0, 1 or 2 (or max: 0..2)");
                0
            }
        };
        match value {
            Value::Number(_) => Retry {
                max: max(self, value),
                ..Retry::default()
            },
            Value::Mapping(mapping) => {
                let mut retry = Retry::default();
                for (key, entry) in mapping {
                    match key_text(key).as_str() {
                        "max" => retry.max = max(self, entry),
                        "when" => match string_list(entry) {
                            Ok(when) => {
                                for reason in &when {
                                    if !RETRY_WHEN.contains(&reason.as_str()) {
                                        self.problem(
                                            &path,
                                            job,
                                            format!(
                                                "retry:when {reason:?} is not one of {}",
                                                RETRY_WHEN.join(", ")
                                            ),
                                        );
                                    }
                                }
                                retry.when = when;
                            }
                            Err(message) => {
                                self.problem(&path, job, format!("retry:when {message}"))
                            }
                        },
                        "exit_codes" => match exit_codes(entry) {
                            Ok(codes) => retry.exit_codes = codes,
                            Err(message) => {
                                self.problem(&path, job, format!("retry:exit_codes {message}"))
                            }
                        },
                        other => self.problem(
                            &path,
                            job,
                            format!(
                                "retry has an unknown keyword {other:?} (max, when, exit_codes)"
                            ),
                        ),
                    }
                }
                retry
            }
            _ => {
                self.problem(
                    &path,
                    job,
                    "retry must be a number or {max, when, exit_codes}",
                );
                Retry::default()
            }
        }
    }

    fn artifacts(&mut self, name: &str, value: &Value) -> Vec<Artifact> {
        let job = Some(name);
        let path = [name, "artifacts"];
        let Value::Mapping(mapping) = value else {
            self.problem(&path, job, "artifacts must be a mapping");
            return Vec::new();
        };
        let mut archive = Artifact {
            artifact_type: "archive".to_owned(),
            artifact_format: "zip".to_owned(),
            when: "on_success".to_owned(),
            ..Artifact::default()
        };
        let mut reports = Vec::new();
        for (key, entry) in mapping {
            let key = key_text(key);
            let list = |entry: &Value| {
                string_list(entry).map_err(|message| format!("artifacts:{key} {message}"))
            };
            let result: Result<(), String> = match key.as_str() {
                "paths" => list(entry).map(|paths| archive.paths = paths),
                "exclude" => list(entry).map(|exclude| archive.exclude = exclude),
                "name" => scalar_text(entry)
                    .map(|text| archive.name = text)
                    .ok_or_else(|| "artifacts:name must be a string".to_owned()),
                "untracked" => match entry {
                    Value::Bool(flag) => {
                        archive.untracked = Some(*flag);
                        Ok(())
                    }
                    _ => Err("artifacts:untracked must be true or false".to_owned()),
                },
                "when" => match entry.as_str() {
                    Some(when @ ("on_success" | "on_failure" | "always")) => {
                        archive.when = when.to_owned();
                        Ok(())
                    }
                    _ => Err("artifacts:when must be on_success, on_failure or always".to_owned()),
                },
                "expire_in" => match entry {
                    Value::String(text) if text == "never" || parse_duration(text).is_ok() => {
                        archive.expire_in = text.clone();
                        Ok(())
                    }
                    _ => Err(
                        "artifacts:expire_in must be a duration such as 1 week, or never"
                            .to_owned(),
                    ),
                },
                // GitLab UI and permission settings: no local meaning, nothing to run differently.
                "expose_as" | "public" | "access" => Ok(()),
                "reports" => match entry {
                    Value::Mapping(kinds) => {
                        let mut result = Ok(());
                        for (kind, paths) in kinds {
                            let kind = key_text(kind);
                            if !REPORT_TYPES.contains(&kind.as_str()) {
                                result = Err(format!(
                                    "artifacts:reports:{kind} is not a report type podfleet knows ({})",
                                    REPORT_TYPES.join(", ")
                                ));
                                continue;
                            }
                            match string_list(paths) {
                                Ok(paths) => reports.push(Artifact {
                                    name: kind.clone(),
                                    paths,
                                    when: "always".to_owned(),
                                    artifact_format: "gzip".to_owned(),
                                    artifact_type: kind,
                                    ..Artifact::default()
                                }),
                                Err(message) => {
                                    result = Err(format!("artifacts:reports:{kind} {message}"))
                                }
                            }
                        }
                        result
                    }
                    _ => Err(
                        "artifacts:reports must be a mapping of report types to paths".to_owned(),
                    ),
                },
                other => Err(format!("artifacts has an unknown keyword {other:?}")),
            };
            if let Err(message) = result {
                self.problem(&path, job, message);
            }
        }
        let mut artifacts = Vec::new();
        if !archive.paths.is_empty() || archive.untracked == Some(true) {
            artifacts.push(archive);
        }
        artifacts.extend(reports);
        artifacts
    }

    fn cache(&mut self, name: &str, value: &Value, scope: &Scope) -> Vec<Cache> {
        let job = Some(name);
        let path = [name, "cache"];
        let entries = match value {
            Value::Sequence(entries) => entries.clone(),
            other => vec![other.clone()],
        };
        if entries.len() > 4 {
            self.problem(
                &path,
                job,
                "cache lists more than 4 caches (GitLab's limit)",
            );
        }
        let mut caches = Vec::new();
        for entry in entries {
            let Value::Mapping(mapping) = entry else {
                self.problem(&path, job, "cache must be a mapping or a list of mappings");
                continue;
            };
            let mut cache = Cache {
                key: "default".to_owned(),
                policy: "pull-push".to_owned(),
                when: "on_success".to_owned(),
                ..Cache::default()
            };
            for (key, entry) in &mapping {
                let key = key_text(key);
                let result: Result<(), String> = match key.as_str() {
                    "key" => match entry {
                        Value::Mapping(spec) => {
                            self.cache_key_files(spec).map(|key| cache.key = key)
                        }
                        other => scalar_text(other)
                            .map(|key| cache.key = scope.expand(&key))
                            .ok_or_else(|| {
                                "cache:key must be a string or {files, prefix}".to_owned()
                            }),
                    },
                    "paths" => string_list(entry)
                        .map(|paths| cache.paths = paths)
                        .map_err(|message| format!("cache:paths {message}")),
                    "untracked" => match entry {
                        Value::Bool(flag) => {
                            cache.untracked = *flag;
                            Ok(())
                        }
                        _ => Err("cache:untracked must be true or false".to_owned()),
                    },
                    "policy" => match entry.as_str().map(|policy| scope.expand(policy)) {
                        Some(policy)
                            if ["pull", "push", "pull-push"].contains(&policy.as_str()) =>
                        {
                            cache.policy = policy;
                            Ok(())
                        }
                        _ => Err("cache:policy must be pull, push or pull-push".to_owned()),
                    },
                    "when" => match entry.as_str() {
                        Some(when @ ("on_success" | "on_failure" | "always")) => {
                            cache.when = when.to_owned();
                            Ok(())
                        }
                        _ => Err("cache:when must be on_success, on_failure or always".to_owned()),
                    },
                    "fallback_keys" => string_list(entry)
                        .map(|keys| {
                            cache.fallback_keys = keys.iter().map(|key| scope.expand(key)).collect()
                        })
                        .map_err(|message| format!("cache:fallback_keys {message}")),
                    // Protected-branch cache separation has no local meaning.
                    "unprotect" => Ok(()),
                    other => Err(format!("cache has an unknown keyword {other:?}")),
                };
                if let Err(message) = result {
                    self.problem(&path, job, message);
                }
            }
            caches.push(cache);
        }
        caches
    }

    /// `cache:key:files`: GitLab keys on the commits that last changed the files; podfleet
    /// keys on their content (same files, same key), prefixed like GitLab.
    fn cache_key_files(&self, spec: &Mapping) -> Result<String, String> {
        use sha2::Digest;
        let files = match spec.get("files") {
            Some(value) => {
                string_list(value).map_err(|message| format!("cache:key:files {message}"))?
            }
            None => return Err("cache:key in mapping form needs files".to_owned()),
        };
        if files.is_empty() || files.len() > 2 {
            return Err("cache:key:files must list one or two files".to_owned());
        }
        let mut hasher = sha2::Sha256::new();
        for file in &files {
            hasher.update(file.as_bytes());
            if let Ok(bytes) = std::fs::read(self.project.dir.join(file)) {
                hasher.update(&bytes);
            }
        }
        let digest = hex::encode(hasher.finalize());
        let prefix = match spec.get("prefix") {
            None => "default".to_owned(),
            Some(value) => {
                scalar_text(value).ok_or_else(|| "cache:key:prefix must be a string".to_owned())?
            }
        };
        Ok(format!("{prefix}-{}", &digest[..40]))
    }

    fn environment(
        &mut self,
        name: &str,
        value: Option<&Value>,
        scope: &Scope,
    ) -> Option<Environment> {
        let job = Some(name);
        let path = [name, "environment"];
        match value? {
            Value::String(environment) => Some(Environment {
                name: scope.expand(environment),
                url: None,
            }),
            Value::Mapping(mapping) => {
                let mut environment = Environment {
                    name: String::new(),
                    url: None,
                };
                for (key, entry) in mapping {
                    match (key_text(key).as_str(), entry) {
                        ("name", Value::String(text)) => environment.name = scope.expand(text),
                        ("url", Value::String(text)) => environment.url = Some(scope.expand(text)),
                        // Deployment bookkeeping in GitLab: nothing runs differently locally.
                        ("action" | "deployment_tier" | "auto_stop_in" | "on_stop", _) => {}
                        ("kubernetes", _) => self.problem(
                            &path,
                            job,
                            "environment:kubernetes is not supported locally",
                        ),
                        (other, _) => self.problem(
                            &path,
                            job,
                            format!("environment has an unknown or mistyped keyword {other:?}"),
                        ),
                    }
                }
                if environment.name.is_empty() {
                    self.problem(&path, job, "environment needs a name");
                    return None;
                }
                Some(environment)
            }
            _ => {
                self.problem(&path, job, "environment must be a name or {name, url}");
                None
            }
        }
    }

    fn parallel(&mut self, name: &str, value: Option<&Value>) -> Vec<Node> {
        let job = Some(name);
        let path = [name, "parallel"];
        let single = vec![Node {
            name: None,
            index: None,
            variables: Vec::new(),
        }];
        let Some(value) = value else {
            return single;
        };
        match value {
            Value::Number(number) => match number.as_u64() {
                Some(total @ 1..=200) => (1..=total as u32)
                    .map(|index| Node {
                        name: Some(format!("{name} {index}/{total}")),
                        index: Some((index, total as u32)),
                        variables: Vec::new(),
                    })
                    .collect(),
                _ => {
                    self.problem(&path, job, "parallel must be between 1 and 200");
                    single
                }
            },
            Value::Mapping(mapping) if mapping.len() == 1 && mapping.contains_key("matrix") => {
                match matrix(mapping.get("matrix").expect("checked above")) {
                    Ok(combinations) => {
                        let total = combinations.len() as u32;
                        combinations
                            .into_iter()
                            .zip(1u32..)
                            .map(|(variables, index)| Node {
                                name: Some(matrix_name(name, &variables)),
                                index: Some((index, total)),
                                variables,
                            })
                            .collect()
                    }
                    Err(message) => {
                        self.problem(&path, job, format!("parallel:matrix {message}"));
                        single
                    }
                }
            }
            _ => {
                self.problem(&path, job, "parallel must be a number or {matrix: [...]}");
                single
            }
        }
    }

    /// Evaluates `rules`; `Some(reason)` when they exclude the job.
    fn apply_rules(
        &mut self,
        name: &str,
        body: &Mapping,
        spec: &mut JobSpec,
        scope: &mut Scope,
        job_when: Option<When>,
        job_allow_failure: bool,
    ) -> Option<String> {
        let rules = body
            .get("rules")
            .expect("apply_rules is called only for jobs with rules");
        match self.rules(&[name, "rules"], Some(name), rules, scope, false) {
            None => None,
            Some(RulesOutcome::NoMatch) => Some("no rule matches".to_owned()),
            Some(RulesOutcome::Matched {
                rule,
                when,
                allow_failure,
                variables,
                start_in,
                interruptible,
            }) => {
                let when = match when {
                    Some(RuleWhen::Never) => return Some(format!("rule {rule} says when: never")),
                    Some(RuleWhen::Job(when)) => when,
                    None => job_when.unwrap_or(When::OnSuccess),
                };
                spec.when = when;
                spec.allow_failure = match allow_failure {
                    Some(allowed) => AllowFailure {
                        allowed,
                        exit_codes: Vec::new(),
                    },
                    // With rules, a manual job blocks later stages unless it allows failure.
                    None if job_allow_failure => spec.allow_failure.clone(),
                    None => AllowFailure::default(),
                };
                if start_in.is_some() {
                    spec.start_in = start_in;
                }
                if let Some(flag) = interruptible {
                    spec.interruptible = flag;
                }
                scope.extend(&variables);
                for variable in variables {
                    spec.variables
                        .retain(|existing| existing.key != variable.key);
                    spec.variables.push(variable);
                }
                spec.reason = format!("rule {rule} matches");
                None
            }
        }
    }

    /// The first matching rule (rules number from 1), `NoMatch`, or `None` after a problem.
    fn rules(
        &mut self,
        path: &[&str],
        job: Option<&str>,
        rules: &Value,
        scope: &Scope,
        workflow: bool,
    ) -> Option<RulesOutcome> {
        let Value::Sequence(rules) = rules else {
            self.problem(path, job, "rules must be a list");
            return None;
        };
        // `- !reference [.x, rules]` nests a list: GitLab flattens it.
        let rules = flatten(rules);
        let before = self.problems.0.len();
        let mut outcome = None;
        for (index, rule) in rules.iter().enumerate() {
            let number = index + 1;
            let Value::Mapping(rule) = rule else {
                self.problem(path, job, format!("rule {number} must be a mapping"));
                continue;
            };
            let mut matched = true;
            let mut description = Vec::new();
            let mut result = RulesOutcome::Matched {
                rule: String::new(),
                when: None,
                allow_failure: None,
                variables: Vec::new(),
                start_in: None,
                interruptible: None,
            };
            for (key, value) in rule {
                let key = key_text(key);
                let fail = |context: &mut Self, message: String| {
                    context.problem(path, job, format!("rule {number}: {message}"));
                };
                match key.as_str() {
                    "if" => match value.as_str().map(expression::parse) {
                        Some(Ok(parsed)) => {
                            description.push(format!("if {}", value.as_str().unwrap_or_default()));
                            match parsed.evaluate(scope) {
                                Ok(true) => {}
                                Ok(false) => matched = false,
                                Err(message) => fail(self, format!("if: {message}")),
                            }
                        }
                        Some(Err(message)) => fail(self, format!("if: {message}")),
                        None => fail(self, "if must be a string".to_owned()),
                    },
                    "exists" => match self.exists(value, scope) {
                        Ok(found) => {
                            description.push("exists".to_owned());
                            matched &= found;
                        }
                        Err(message) => fail(self, format!("exists: {message}")),
                    },
                    "changes" => match self.changes(value, scope) {
                        Ok(changed) => {
                            description.push("changes".to_owned());
                            matched &= changed;
                        }
                        Err(message) => fail(self, format!("changes: {message}")),
                    },
                    "when" => {
                        let allowed: &[&str] = if workflow {
                            &["always", "never"]
                        } else {
                            &[
                                "on_success",
                                "on_failure",
                                "always",
                                "manual",
                                "delayed",
                                "never",
                            ]
                        };
                        match value.as_str() {
                            Some(when) if allowed.contains(&when) => {
                                if let RulesOutcome::Matched { when: slot, .. } = &mut result {
                                    *slot = Some(match when {
                                        "never" => RuleWhen::Never,
                                        "on_success" => RuleWhen::Job(When::OnSuccess),
                                        "on_failure" => RuleWhen::Job(When::OnFailure),
                                        "always" => RuleWhen::Job(When::Always),
                                        "manual" => RuleWhen::Job(When::Manual),
                                        _ => RuleWhen::Job(When::Delayed),
                                    });
                                }
                            }
                            _ => fail(self, format!("when must be one of {}", allowed.join(", "))),
                        }
                    }
                    "allow_failure" if !workflow => match value {
                        Value::Bool(flag) => {
                            if let RulesOutcome::Matched { allow_failure, .. } = &mut result {
                                *allow_failure = Some(*flag);
                            }
                        }
                        _ => fail(self, "allow_failure must be true or false".to_owned()),
                    },
                    "interruptible" if !workflow => match value {
                        Value::Bool(flag) => {
                            if let RulesOutcome::Matched { interruptible, .. } = &mut result {
                                *interruptible = Some(*flag);
                            }
                        }
                        _ => fail(self, "interruptible must be true or false".to_owned()),
                    },
                    "start_in" if !workflow => {
                        let seconds = self.duration(path, job, value, "start_in");
                        if let RulesOutcome::Matched { start_in, .. } = &mut result {
                            *start_in = seconds;
                        }
                    }
                    "variables" => {
                        let parsed = self.variables(path, job, value);
                        if let RulesOutcome::Matched { variables, .. } = &mut result {
                            *variables = parsed;
                        }
                    }
                    "needs" if !workflow => fail(
                        self,
                        "rules:needs is not supported yet; set needs on the job".to_owned(),
                    ),
                    other => fail(self, format!("unknown keyword {other:?} in a rule")),
                }
            }
            if matched && outcome.is_none() {
                if let RulesOutcome::Matched { rule, .. } = &mut result {
                    *rule = if description.is_empty() {
                        format!("{number}")
                    } else {
                        format!("{number} ({})", description.join(", "))
                    };
                }
                outcome = Some(result);
            }
        }
        if self.problems.0.len() > before {
            return None;
        }
        Some(outcome.unwrap_or(RulesOutcome::NoMatch))
    }

    fn exists(&self, value: &Value, scope: &Scope) -> Result<bool, String> {
        let patterns = match value {
            Value::Mapping(mapping) => {
                if mapping.keys().any(|key| key_text(key) != "paths") {
                    return Err(
                        "only exists:paths is supported (exists:project needs GitLab)".to_owned(),
                    );
                }
                string_list(mapping.get("paths").unwrap_or(&Value::Null))?
            }
            other => string_list(other)?,
        };
        for pattern in patterns {
            let pattern = expression::glob(&scope.expand(&pattern))?;
            if self.project.files.iter().any(|file| pattern.is_match(file)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `changes` compares the working tree (untracked, non-ignored files included) with
    /// `compare_to`, else with the upstream branch, else with HEAD; always true without git,
    /// as GitLab's is for pipelines that are not pushes.
    fn changes(&self, value: &Value, scope: &Scope) -> Result<bool, String> {
        let (patterns, compare_to) = match value {
            Value::Mapping(mapping) => {
                for key in mapping.keys() {
                    let key = key_text(key);
                    if key != "paths" && key != "compare_to" {
                        return Err(format!("unknown keyword {key:?} (paths, compare_to)"));
                    }
                }
                let compare_to = match mapping.get("compare_to") {
                    None => None,
                    Some(Value::String(reference)) => Some(scope.expand(reference)),
                    Some(_) => return Err("compare_to must be a git ref".to_owned()),
                };
                (
                    string_list(mapping.get("paths").unwrap_or(&Value::Null))?,
                    compare_to,
                )
            }
            other => (string_list(other)?, None),
        };
        let Some(git) = &self.project.git else {
            return Ok(true);
        };
        let changed = match compare_to {
            None => git.changed_files.clone(),
            Some(reference) => crate::project::changed_since(&self.project.dir, &reference)
                .ok_or_else(|| {
                    format!("compare_to {reference:?} is not a commit of this repository")
                })?,
        };
        for pattern in patterns {
            let pattern = expression::glob(&scope.expand(&pattern))?;
            if changed.iter().any(|file| pattern.is_match(file)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `only`/`except`; `Some(reason)` when they exclude the job.
    fn apply_only_except(&mut self, name: &str, body: &Mapping, scope: &Scope) -> Option<String> {
        let default_only = Value::Sequence(vec![
            Value::String("branches".into()),
            Value::String("tags".into()),
        ]);
        let only = body.get("only").unwrap_or(&default_only);
        match self.only_except(name, "only", only, scope) {
            Some(false) => return Some("only: does not match this push".to_owned()),
            None => return None,
            Some(true) => {}
        }
        if let Some(except) = body.get("except")
            && self.only_except(name, "except", except, scope) == Some(true)
        {
            return Some("except: matches this push".to_owned());
        }
        None
    }

    /// Whether every given part of an `only`/`except` block has a matching condition.
    fn only_except(&mut self, name: &str, key: &str, value: &Value, scope: &Scope) -> Option<bool> {
        let job = Some(name);
        let path = [name, key];
        let refs_of = |value: &Value| string_list(value);
        let (refs, variables, changes) = match value {
            Value::Mapping(mapping) => {
                let mut refs = None;
                let mut variables = None;
                let mut changes = None;
                for (part, entry) in mapping {
                    match key_text(part).as_str() {
                        "refs" => refs = Some(refs_of(entry)),
                        "variables" => variables = Some(string_list(entry)),
                        "changes" => changes = Some(entry.clone()),
                        "kubernetes" => {
                            self.problem(
                                &path,
                                job,
                                format!("{key}:kubernetes is not supported locally"),
                            );
                            return None;
                        }
                        other => {
                            self.problem(&path, job, format!("{key} has an unknown keyword {other:?} (refs, variables, changes)"));
                            return None;
                        }
                    }
                }
                (refs, variables, changes)
            }
            other => (Some(refs_of(other)), None, None),
        };
        let mut all = true;
        if let Some(refs) = refs {
            match refs {
                Ok(refs) => {
                    let mut any = false;
                    for pattern in &refs {
                        match self.ref_matches(pattern, scope) {
                            Ok(matched) => any |= matched,
                            Err(message) => {
                                self.problem(&path, job, format!("{key}: {message}"));
                                return None;
                            }
                        }
                    }
                    all &= any;
                }
                Err(message) => {
                    self.problem(&path, job, format!("{key}:refs {message}"));
                    return None;
                }
            }
        }
        if let Some(variables) = variables {
            let expressions = match variables {
                Ok(expressions) => expressions,
                Err(message) => {
                    self.problem(&path, job, format!("{key}:variables {message}"));
                    return None;
                }
            };
            let mut any = false;
            for text in expressions {
                match expression::parse(&text).and_then(|parsed| parsed.evaluate(scope)) {
                    Ok(value) => any |= value,
                    Err(message) => {
                        self.problem(&path, job, format!("{key}:variables: {message}"));
                        return None;
                    }
                }
            }
            all &= any;
        }
        if let Some(changes) = changes {
            match self.changes(&changes, scope) {
                Ok(changed) => all &= changed,
                Err(message) => {
                    self.problem(&path, job, format!("{key}:changes: {message}"));
                    return None;
                }
            }
        }
        Some(all)
    }

    fn ref_matches(&self, pattern: &str, scope: &Scope) -> Result<bool, String> {
        let reference = scope.lookup("CI_COMMIT_REF_NAME").unwrap_or_default();
        let is_tag = scope.lookup("CI_COMMIT_TAG").is_some();
        let source = scope.lookup("CI_PIPELINE_SOURCE").unwrap_or_default();
        if pattern.contains('@') {
            return Err(format!("{pattern:?}: ref@project patterns need GitLab"));
        }
        Ok(match pattern {
            "branches" => !is_tag,
            "tags" => is_tag,
            "pushes" => source == "push",
            "api"
            | "chat"
            | "chats"
            | "external"
            | "external_pull_requests"
            | "merge_requests"
            | "pipelines"
            | "schedules"
            | "triggers"
            | "web" => {
                let wanted = match pattern {
                    "chats" => "chat",
                    "merge_requests" => "merge_request_event",
                    "external_pull_requests" => "external_pull_request_event",
                    "pipelines" => "pipeline",
                    "schedules" => "schedule",
                    "triggers" => "trigger",
                    other => other,
                };
                source == wanted
            }
            regex if regex.starts_with('/') => {
                let parsed = expression::parse(&format!("$CI_COMMIT_REF_NAME =~ {regex}"))?;
                parsed.evaluate(scope)?
            }
            literal => literal == reference,
        })
    }

    /// Stages, `needs` and `dependencies` over the whole pipeline.
    fn check_graph(
        &mut self,
        jobs: &mut [JobSpec],
        excluded: &[ExcludedJob],
        stages: &[String],
        known_names: &HashMap<String, Vec<String>>,
    ) {
        let stage_index = |stage: &str| stages.iter().position(|known| known == stage).unwrap_or(0);
        let running: HashMap<String, usize> = jobs
            .iter()
            .map(|job| (job.name.clone(), stage_index(&job.stage)))
            .collect();
        let excluded_names: HashSet<&str> = excluded.iter().map(|job| job.name.as_str()).collect();
        let source_of = |instance: &str| -> String {
            known_names
                .iter()
                .find(|(_, names)| names.iter().any(|name| name == instance))
                .map(|(source, _)| source.clone())
                .unwrap_or_else(|| instance.to_owned())
        };
        for job in jobs.iter_mut() {
            let source = source_of(&job.name);
            let own_stage = stage_index(&job.stage);
            if let Some(needs) = job.needs.take() {
                let mut resolved = Vec::new();
                for need in needs {
                    // A parallel job is needed by its base name: all its instances.
                    let targets: Vec<String> = match known_names.get(&need.job) {
                        Some(instances) if !(instances.len() == 1 && instances[0] == need.job) => {
                            instances.clone()
                        }
                        _ => vec![need.job.clone()],
                    };
                    for target in targets {
                        match running.get(&target) {
                            Some(stage) if *stage > own_stage => self.problem(
                                &[&source, "needs"],
                                Some(&job.name),
                                format!("needs {target:?}, which is in the later stage {:?}", stages[*stage]),
                            ),
                            Some(_) if target == job.name => self.problem(&[&source, "needs"], Some(&job.name), "a job cannot need itself"),
                            Some(_) => resolved.push(Need { job: target, ..need.clone() }),
                            None if need.optional => {}
                            None if excluded_names.contains(target.as_str()) => self.problem(
                                &[&source, "needs"],
                                Some(&job.name),
                                format!("needs {target:?}, which rules/only/except leave out of this pipeline (add optional: true to the need)"),
                            ),
                            None => self.problem(
                                &[&source, "needs"],
                                Some(&job.name),
                                format!("needs {target:?}, which is not a job of this pipeline"),
                            ),
                        }
                    }
                }
                job.needs = Some(resolved);
            }
            if let Some(dependencies) = &job.dependencies {
                for dependency in dependencies {
                    let targets = known_names
                        .get(dependency)
                        .cloned()
                        .unwrap_or_else(|| vec![dependency.clone()]);
                    for target in targets {
                        match running.get(&target) {
                            Some(stage) if *stage >= own_stage && job.needs.as_ref().is_none_or(|needs| !needs.iter().any(|need| need.job == target)) => self.problem(
                                &[&source, "dependencies"],
                                Some(&job.name),
                                format!("dependencies names {target:?}, which is not in an earlier stage"),
                            ),
                            Some(_) => {}
                            None if excluded_names.contains(target.as_str()) => {}
                            None => self.problem(
                                &[&source, "dependencies"],
                                Some(&job.name),
                                format!("dependencies names {target:?}, which is not a job of this pipeline"),
                            ),
                        }
                    }
                }
            }
        }
        // Cycles among `needs` (possible only within one stage).
        let index_of: HashMap<&str, usize> = jobs
            .iter()
            .enumerate()
            .map(|(index, job)| (job.name.as_str(), index))
            .collect();
        let mut state = vec![0u8; jobs.len()];
        fn visit(
            index: usize,
            jobs: &[JobSpec],
            index_of: &HashMap<&str, usize>,
            state: &mut [u8],
            path: &mut Vec<usize>,
        ) -> Option<Vec<usize>> {
            if state[index] == 2 {
                return None;
            }
            if state[index] == 1 {
                let start = path.iter().position(|&seen| seen == index).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(index);
                return Some(cycle);
            }
            state[index] = 1;
            path.push(index);
            for need in jobs[index].needs.iter().flatten() {
                if let Some(&next) = index_of.get(need.job.as_str())
                    && let Some(cycle) = visit(next, jobs, index_of, state, path)
                {
                    return Some(cycle);
                }
            }
            path.pop();
            state[index] = 2;
            None
        }
        for index in 0..jobs.len() {
            if let Some(cycle) = visit(index, jobs, &index_of, &mut state, &mut Vec::new()) {
                let names: Vec<&str> = cycle
                    .iter()
                    .map(|&index| jobs[index].name.as_str())
                    .collect();
                let first = source_of(names[0]);
                self.problem(
                    &[&first, "needs"],
                    Some(names[0]),
                    format!("needs has a cycle: {}", names.join(" -> ")),
                );
                break;
            }
        }
    }
}

enum Planned {
    Runs(Box<JobSpec>),
    Excluded(ExcludedJob),
}

impl Planned {
    fn name(&self) -> &str {
        match self {
            Planned::Runs(spec) => &spec.name,
            Planned::Excluded(job) => &job.name,
        }
    }
}

struct Node {
    name: Option<String>,
    index: Option<(u32, u32)>,
    variables: Vec<Variable>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RuleWhen {
    Never,
    Job(When),
}

enum RulesOutcome {
    Matched {
        rule: String,
        when: Option<RuleWhen>,
        allow_failure: Option<bool>,
        variables: Vec<Variable>,
        start_in: Option<u64>,
        interruptible: Option<bool>,
    },
    NoMatch,
}

fn expand_image(mut image: Image, scope: &Scope) -> Image {
    image.name = scope.expand(&image.name);
    image
}

fn gitlab_only(key: &str) -> &'static str {
    match key {
        "trigger" => "child and multi-project pipelines need GitLab",
        "pages" | "release" | "publish" => "it publishes to GitLab, which a local pipeline has not",
        "secrets" | "id_tokens" | "identity" => "it needs GitLab's secret and identity providers",
        "hooks" => "pre_get_sources_script hooks run only with GitLab's git strategy",
        _ => "it needs a GitLab instance",
    }
}

/// The combinations of a `parallel:matrix`, each as variables in key order.
fn matrix(value: &Value) -> Result<Vec<Vec<Variable>>, String> {
    let Value::Sequence(entries) = value else {
        return Err("must be a list of mappings of variables to values".to_owned());
    };
    let mut combinations = Vec::new();
    for entry in entries {
        let Value::Mapping(mapping) = entry else {
            return Err("entries must be mappings of variables to values".to_owned());
        };
        let mut partial: Vec<Vec<Variable>> = vec![Vec::new()];
        for (key, values) in mapping {
            let key = key_text(key);
            let values = string_list(values).map_err(|message| format!("{key} {message}"))?;
            let key = key.as_str();
            partial = partial
                .into_iter()
                .flat_map(|combination| {
                    values.iter().map(move |value| {
                        let mut next = combination.clone();
                        next.push(Variable::public(key, value.clone()));
                        next
                    })
                })
                .collect();
        }
        combinations.extend(partial);
    }
    if combinations.is_empty() || combinations.len() > 200 {
        return Err(format!(
            "forms {} jobs (1 to 200 allowed)",
            combinations.len()
        ));
    }
    Ok(combinations)
}

/// GitLab's name for a matrix job: `name: [value1, value2]`.
fn matrix_name(name: &str, variables: &[Variable]) -> String {
    let values: Vec<&str> = variables
        .iter()
        .map(|variable| variable.value.as_str())
        .collect();
    format!("{name}: [{}]", values.join(", "))
}

/// The instance names a `needs:parallel:matrix` selects.
fn matrix_names(name: &str, value: &Value) -> Result<Vec<String>, String> {
    let Value::Mapping(mapping) = value else {
        return Err("must be {matrix: [...]}".to_owned());
    };
    let matrix_value = mapping
        .get("matrix")
        .ok_or_else(|| "must be {matrix: [...]}".to_owned())?;
    Ok(matrix(matrix_value)?
        .iter()
        .map(|variables| matrix_name(name, variables))
        .collect())
}

fn exit_codes(value: &Value) -> Result<Vec<i32>, String> {
    let items = match value {
        Value::Sequence(items) => items.clone(),
        other => vec![other.clone()],
    };
    items
        .iter()
        .map(|item| {
            item.as_i64()
                .and_then(|code| i32::try_from(code).ok())
                .ok_or_else(|| "must be an exit code or a list of exit codes".to_owned())
        })
        .collect()
}

/// GitLab's durations: `3600`, `30s`, `1h 30m`, `2 hours 5 minutes`, `1 week`, `1.5h`.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let invalid = || format!("{text:?} is not a duration such as 30 minutes or 1h 30m");
    let text = text.trim().to_lowercase();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(seconds);
    }
    let mut total = 0f64;
    let mut rest = text.as_str();
    let mut parts = 0;
    while !rest.trim_start().is_empty() {
        rest = rest.trim_start();
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().map_err(|_| invalid())?;
        rest = rest[number_end..].trim_start();
        let unit_end = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = rest[unit_end..].trim_start_matches([',', ' ']);
        rest = rest.strip_prefix("and ").unwrap_or(rest);
        let factor = match unit {
            "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86400.0,
            "w" | "wk" | "week" | "weeks" => 604800.0,
            "mo" | "month" | "months" => 2_592_000.0,
            "y" | "yr" | "year" | "years" => 31_536_000.0,
            _ => return Err(invalid()),
        };
        total += number * factor;
        parts += 1;
    }
    if parts == 0 {
        return Err(invalid());
    }
    Ok(total.round() as u64)
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
                    other => lines.push(scalar_text(other).ok_or_else(not_strings)?),
                }
            }
            Ok(lines)
        }
        other => scalar_text(other)
            .map(|line| vec![line])
            .ok_or_else(not_strings),
    }
}

/// Nested lists spliced into their parent, as GitLab does for `!reference`d lists.
fn flatten(items: &[Value]) -> Vec<Value> {
    let mut flat = Vec::new();
    for item in items {
        match item {
            Value::Sequence(inner) => flat.extend(flatten(inner)),
            other => flat.push(other.clone()),
        }
    }
    flat
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
mod tests;
