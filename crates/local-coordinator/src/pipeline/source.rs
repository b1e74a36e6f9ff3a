//! From files to one configuration mapping, as GitLab builds it: YAML with anchors and merge
//! keys, `include: local` files deep-merged under the main file, `!reference` tags resolved,
//! then `extends` deep-merged (hashes merge, everything else replaces). Keeps each file's text
//! to point problems at `file:line`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_norway::{Mapping, Value};

use super::{PipelineError, Problems, expression, key_text};

/// GitLab's limits.
const MAX_INCLUDES: usize = 150;
const MAX_EXTENDS_DEPTH: usize = 11;
const MAX_REFERENCE_DEPTH: usize = 10;

/// One file's text, to find the line of a key.
pub(crate) struct SourceFile {
    pub name: String,
    lines: Vec<String>,
}

fn indentation(line: &str) -> usize {
    line.len() - line.trim_start_matches([' ', '-']).len()
}

fn is_key_line(line: &str, key: &str) -> bool {
    let content = line.trim_start_matches([' ', '-']);
    [
        format!("{key}:"),
        format!("\"{key}\":"),
        format!("'{key}':"),
    ]
    .iter()
    .any(|prefix| {
        content.starts_with(prefix.as_str())
            && content[prefix.len()..]
                .chars()
                .next()
                .is_none_or(|c| c == ' ' || c == '\t' || c == '#')
    })
}

impl SourceFile {
    pub(crate) fn new(name: &str, text: &str) -> SourceFile {
        SourceFile {
            name: name.to_owned(),
            lines: text.lines().map(str::to_owned).collect(),
        }
    }

    /// The 1-based line of the deepest key of `path` found (a top-level key, then keys nested
    /// below it); `None` when the first key is not in this file.
    pub(crate) fn line_of(&self, path: &[&str]) -> Option<usize> {
        let (first, rest) = path.split_first()?;
        let mut line = self
            .lines
            .iter()
            .position(|line| !line.starts_with([' ', '\t', '#']) && is_key_line(line, first))?;
        let mut parent_indent = 0;
        for key in rest {
            let mut found = None;
            for (index, text) in self.lines.iter().enumerate().skip(line + 1) {
                let trimmed = text.trim();
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    continue;
                }
                if indentation(text) <= parent_indent && !text.starts_with(' ') {
                    break;
                }
                if is_key_line(text, key) {
                    found = Some(index);
                    break;
                }
            }
            match found {
                Some(index) => {
                    parent_indent = indentation(&self.lines[index]);
                    line = index;
                }
                None => break,
            }
        }
        Some(line + 1)
    }
}

/// The merged configuration and where each top-level key came from.
pub(crate) struct Document {
    pub top: Mapping,
    pub files: Vec<SourceFile>,
    /// Top-level key → index in `files` of the file that defined it last.
    pub origin_of: HashMap<String, usize>,
}

impl Document {
    /// The file and line of `path` (`[job, key, …]` or `[top-level key, …]`).
    pub(crate) fn locate(&self, path: &[&str]) -> (String, Option<usize>) {
        let index = path
            .first()
            .and_then(|key| self.origin_of.get(*key))
            .copied()
            .unwrap_or(0);
        let file = &self.files[index];
        (file.name.clone(), file.line_of(path))
    }
}

/// Deep merge as GitLab's `deep_merge`: mappings merge key by key, `over` wins elsewhere.
pub(crate) fn deep_merge(base: &Value, over: &Value) -> Value {
    match (base, over) {
        (Value::Mapping(base), Value::Mapping(over)) => {
            let mut merged = base.clone();
            for (key, value) in over {
                let combined = match merged.get(key) {
                    Some(existing) => deep_merge(existing, value),
                    None => value.clone(),
                };
                merged.insert(key.clone(), combined);
            }
            Value::Mapping(merged)
        }
        _ => over.clone(),
    }
}

fn parse_yaml(text: &str, origin: &str) -> Result<Value, PipelineError> {
    let yaml_error = |error: serde_norway::Error| PipelineError::Yaml {
        origin: match error.location() {
            Some(location) => format!("{origin}:{}", location.line()),
            None => origin.to_owned(),
        },
        message: error.to_string(),
    };
    let mut document: Value = serde_norway::from_str(text).map_err(yaml_error)?;
    document.apply_merge().map_err(yaml_error)?;
    Ok(document)
}

pub(crate) struct Loader<'a> {
    pub project_dir: Option<&'a Path>,
    pub project_files: &'a [String],
    pub files: Vec<SourceFile>,
    pub seen: HashSet<PathBuf>,
}

impl Loader<'_> {
    /// Loads `text` (file `origin`) and its includes into one mapping, recording problems.
    pub(crate) fn load(
        &mut self,
        text: &str,
        origin: &str,
        problems: &mut Problems,
    ) -> Result<(Mapping, HashMap<String, usize>), PipelineError> {
        let file_index = self.files.len();
        self.files.push(SourceFile::new(origin, text));
        let top = match parse_yaml(text, origin)? {
            Value::Mapping(top) => top,
            Value::Null => {
                problems.push(origin, None, None, "", "the file is empty");
                return Ok((Mapping::new(), HashMap::new()));
            }
            _ => {
                problems.push(
                    origin,
                    Some(1),
                    None,
                    "",
                    "the top level must be a mapping of keys to values",
                );
                return Ok((Mapping::new(), HashMap::new()));
            }
        };
        let mut merged = Mapping::new();
        let mut origin_of = HashMap::new();
        if let Some(include) = top.get("include") {
            let line = self.files[file_index].line_of(&["include"]);
            for path in self.include_paths(include, origin, line, problems) {
                let name = path.display().to_string();
                if !self.seen.insert(path.clone()) {
                    continue;
                }
                if self.seen.len() > MAX_INCLUDES {
                    problems.push(
                        origin,
                        line,
                        None,
                        "include",
                        format!("more than {MAX_INCLUDES} files are included"),
                    );
                    break;
                }
                let shown = self
                    .project_dir
                    .and_then(|dir| path.strip_prefix(dir).ok())
                    .map_or(name.clone(), |relative| relative.display().to_string());
                let text = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(error) => {
                        problems.push(
                            origin,
                            line,
                            None,
                            "include",
                            format!("include: local file {shown} cannot be read: {error}"),
                        );
                        continue;
                    }
                };
                let (included, included_origins) = self.load(&text, &shown, problems)?;
                merged = match deep_merge(&Value::Mapping(merged), &Value::Mapping(included)) {
                    Value::Mapping(mapping) => mapping,
                    _ => unreachable!("deep_merge of two mappings is a mapping"),
                };
                origin_of.extend(included_origins);
            }
        }
        for (key, _) in &top {
            origin_of.insert(key_text(key), file_index);
        }
        let mut own = top;
        own.remove("include");
        let merged = match deep_merge(&Value::Mapping(merged), &Value::Mapping(own)) {
            Value::Mapping(mapping) => mapping,
            _ => unreachable!("deep_merge of two mappings is a mapping"),
        };
        Ok((merged, origin_of))
    }

    /// The local files an `include:` names; other include kinds are problems.
    fn include_paths(
        &self,
        include: &Value,
        origin: &str,
        line: Option<usize>,
        problems: &mut Problems,
    ) -> Vec<PathBuf> {
        let entries = match include {
            Value::Sequence(entries) => entries.clone(),
            other => vec![other.clone()],
        };
        let mut paths = Vec::new();
        for entry in entries {
            let local = match &entry {
                Value::String(path)
                    if path.starts_with("http://") || path.starts_with("https://") =>
                {
                    problems.push(origin, line, None, "include", format!(
                        "include: remote file {path} is not supported locally (podfleet pipeline reads only files of this repository); download it into the repository and use include: local"
                    ));
                    continue;
                }
                Value::String(path) => path.clone(),
                Value::Mapping(mapping) => {
                    let kinds = ["remote", "project", "template", "component"];
                    if let Some(kind) = kinds.iter().find(|kind| mapping.contains_key(**kind)) {
                        problems.push(origin, line, None, "include", format!(
                            "include: {kind} is not supported locally (podfleet pipeline reads only files of this repository); copy the file into the repository and use include: local"
                        ));
                        continue;
                    }
                    for (key, _) in mapping {
                        let key = key_text(key);
                        if key != "local" {
                            problems.push(origin, line, None, "include", format!(
                                "include: {key} is not supported (podfleet supports include: local and the string form)"
                            ));
                        }
                    }
                    match mapping.get("local") {
                        Some(Value::String(path)) => path.clone(),
                        _ => {
                            problems.push(
                                origin,
                                line,
                                None,
                                "include",
                                "include: local must be a file path",
                            );
                            continue;
                        }
                    }
                }
                _ => {
                    problems.push(
                        origin,
                        line,
                        None,
                        "include",
                        "include entries must be file paths or mappings with local",
                    );
                    continue;
                }
            };
            let Some(project_dir) = self.project_dir else {
                problems.push(
                    origin,
                    line,
                    None,
                    "include",
                    format!("include: local {local} needs the project directory; run podfleet pipeline from the repository"),
                );
                continue;
            };
            let relative = local.trim_start_matches('/');
            if relative.contains('*') {
                match expression::glob(relative) {
                    Ok(pattern) => {
                        let matching: Vec<PathBuf> = self
                            .project_files
                            .iter()
                            .filter(|file| pattern.is_match(file))
                            .filter(|file| file.ends_with(".yml") || file.ends_with(".yaml"))
                            .map(|file| project_dir.join(file))
                            .collect();
                        if matching.is_empty() {
                            problems.push(
                                origin,
                                line,
                                None,
                                "include",
                                format!("include: local {local} matches no file"),
                            );
                        }
                        paths.extend(matching);
                    }
                    Err(message) => problems.push(origin, line, None, "include", message),
                }
            } else {
                paths.push(project_dir.join(relative));
            }
        }
        paths
    }
}

/// Resolves every `!reference [job, key, …]` below `value` against `top`.
pub(crate) fn resolve_references(
    value: &Value,
    top: &Mapping,
    depth: usize,
) -> Result<Value, String> {
    match value {
        Value::Tagged(tagged) if tagged.tag == "reference" => {
            if depth >= MAX_REFERENCE_DEPTH {
                return Err(format!(
                    "!reference is nested more than {MAX_REFERENCE_DEPTH} levels deep"
                ));
            }
            let Value::Sequence(path) = &tagged.value else {
                return Err("!reference needs a list such as [.job, script]".to_owned());
            };
            let keys: Vec<String> = path
                .iter()
                .map(|key| match key {
                    Value::String(key) => Ok(key.clone()),
                    _ => Err("!reference keys must be strings".to_owned()),
                })
                .collect::<Result<_, _>>()?;
            let mut target = Value::Mapping(top.clone());
            for key in &keys {
                target = match &target {
                    Value::Mapping(mapping) => mapping.get(key.as_str()).cloned(),
                    _ => None,
                }
                .ok_or_else(|| {
                    format!(
                        "!reference [{}] names nothing: {key} is not there",
                        keys.join(", ")
                    )
                })?;
            }
            resolve_references(&target, top, depth + 1)
        }
        Value::Tagged(tagged) => Err(format!(
            "the YAML tag {} is not supported (only !reference is)",
            tagged.tag
        )),
        Value::Sequence(items) => items
            .iter()
            .map(|item| resolve_references(item, top, depth))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Sequence),
        Value::Mapping(mapping) => {
            let mut resolved = Mapping::new();
            for (key, item) in mapping {
                resolved.insert(key.clone(), resolve_references(item, top, depth)?);
            }
            Ok(Value::Mapping(resolved))
        }
        other => Ok(other.clone()),
    }
}

/// The job `name` with its `extends` chain deep-merged in (parents first, in list order).
pub(crate) fn resolve_extends(
    name: &str,
    top: &Mapping,
    chain: &mut Vec<String>,
) -> Result<Mapping, String> {
    if chain.iter().any(|seen| seen == name) {
        chain.push(name.to_owned());
        return Err(format!("extends has a cycle: {}", chain.join(" -> ")));
    }
    if chain.len() >= MAX_EXTENDS_DEPTH {
        return Err(format!(
            "extends is nested more than {MAX_EXTENDS_DEPTH} levels deep"
        ));
    }
    let Some(Value::Mapping(body)) = top.get(name) else {
        return Err(match chain.last() {
            Some(child) => {
                format!("{child} extends {name}, which is not defined as a job or template")
            }
            None => format!("{name} is not defined"),
        });
    };
    let parents = match body.get("extends") {
        None => Vec::new(),
        Some(Value::String(parent)) => vec![parent.clone()],
        Some(Value::Sequence(parents)) => parents
            .iter()
            .map(|parent| match parent {
                Value::String(parent) => Ok(parent.clone()),
                _ => Err("extends must be a job name or a list of job names".to_owned()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("extends must be a job name or a list of job names".to_owned()),
    };
    chain.push(name.to_owned());
    let mut merged = Value::Mapping(Mapping::new());
    for parent in &parents {
        let resolved = resolve_extends(parent, top, chain)?;
        merged = deep_merge(&merged, &Value::Mapping(resolved));
    }
    chain.pop();
    let mut own = body.clone();
    own.remove("extends");
    match deep_merge(&merged, &Value::Mapping(own)) {
        Value::Mapping(mapping) => Ok(mapping),
        _ => unreachable!("deep_merge of two mappings is a mapping"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_nested_keys() {
        let file = SourceFile::new(
            "f.yml",
            "stages: [a]\n\njob:\n  image: x\n  rules:\n    - if: $A\n      when: manual\nother:\n  script: y\n",
        );
        assert_eq!(file.line_of(&["job"]), Some(3));
        assert_eq!(file.line_of(&["job", "rules"]), Some(5));
        assert_eq!(file.line_of(&["job", "rules", "when"]), Some(7));
        assert_eq!(file.line_of(&["other", "script"]), Some(9));
        assert_eq!(file.line_of(&["job", "missing"]), Some(3));
        assert_eq!(file.line_of(&["nothing"]), None);
    }

    #[test]
    fn deep_merge_merges_hashes_and_replaces_arrays() {
        let base: Value = serde_norway::from_str("a: {x: 1, y: [1, 2]}\nb: 1\n").unwrap();
        let over: Value = serde_norway::from_str("a: {y: [3], z: 4}\n").unwrap();
        let expected: Value = serde_norway::from_str("a: {x: 1, y: [3], z: 4}\nb: 1\n").unwrap();
        assert_eq!(deep_merge(&base, &over), expected);
    }
}
