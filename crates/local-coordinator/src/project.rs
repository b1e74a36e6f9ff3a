//! What a local pipeline knows about the repository it runs for: the commit, the branch, the
//! files a push would carry and the files that changed. One inspection feeds both the parser
//! (rules, `exists`, `changes`) and the job payloads (predefined `CI_*` variables).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::pipeline::Variable;

/// The repository of a local pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    /// Canonical path of the project directory.
    pub dir: PathBuf,
    /// `CI_PROJECT_NAME`: the directory's name.
    pub name: String,
    /// `CI_PROJECT_PATH`: `local/<name>`.
    pub path: String,
    /// Git facts, when the directory is a git work tree and git is installed.
    pub git: Option<GitState>,
    /// Files a push would carry, relative to `dir`, `/`-separated: tracked and untracked
    /// non-ignored files in a git work tree, every file below `dir` (but `.git`) otherwise.
    pub files: Vec<String>,
}

/// The commit and branch of a git work tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitState {
    pub sha: String,
    /// `None` on a detached HEAD.
    pub branch: Option<String>,
    /// The branch, or the commit SHA on a detached HEAD.
    pub ref_name: String,
    /// HEAD's full commit message.
    pub message: String,
    /// `origin/HEAD`'s branch, else `init.defaultBranch`, else the current branch.
    pub default_branch: String,
    /// What `changes:` compares with when a rule gives no `compare_to`: the upstream branch
    /// when there is one (what a push would add to it), else HEAD (uncommitted changes).
    pub changes_base: String,
    /// Files that differ between `changes_base` and the working tree, untracked ones included.
    pub changed_files: Vec<String>,
}

fn git(dir: &Path, arguments: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(arguments)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout).ok()
}

fn git_line(dir: &Path, arguments: &[&str]) -> Option<String> {
    let text = git(dir, arguments)?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn lines(text: Option<String>) -> Vec<String> {
    text.map(|text| {
        text.lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

/// Files that differ between `base` and the working tree of `dir`, untracked ones included;
/// `None` when `base` does not name a commit.
pub(crate) fn changed_since(dir: &Path, base: &str) -> Option<Vec<String>> {
    let mut files = lines(Some(git(dir, &["diff", "--name-only", base, "--"])?));
    files.extend(lines(git(
        dir,
        &["ls-files", "--others", "--exclude-standard"],
    )));
    files.sort();
    files.dedup();
    Some(files)
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if entry.file_name() != ".git" {
                walk(root, &path, files);
            }
        } else if let Ok(relative) = path.strip_prefix(root) {
            files.push(relative.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// `CI_COMMIT_REF_SLUG`'s rule: lower case, runs of other characters than `0-9a-z` become
/// `-`, at most 63 bytes, no leading or trailing `-`.
pub fn slug(text: &str) -> String {
    let mut slug = String::new();
    for character in text.to_lowercase().chars() {
        if character.is_ascii_alphanumeric() {
            slug.push(character);
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug: String = slug.trim_start_matches('-').chars().take(63).collect();
    slug.trim_end_matches('-').to_owned()
}

impl Project {
    /// Inspects `dir` (never fails: a directory that is not a git work tree has no `git`).
    pub fn inspect(dir: &Path) -> Project {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        let name = dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "project".to_owned());
        let git = Self::inspect_git(&dir);
        let files = match &git {
            Some(_) => {
                let mut files = lines(git_line(
                    &dir,
                    &["ls-files", "--cached", "--others", "--exclude-standard"],
                ));
                // A file deleted in the working tree but still in the index is not pushed.
                files.retain(|file| dir.join(file).exists());
                files
            }
            None => {
                let mut files = Vec::new();
                walk(&dir, &dir, &mut files);
                files.sort();
                files
            }
        };
        Project {
            path: format!("local/{name}"),
            name,
            dir,
            git,
            files,
        }
    }

    fn inspect_git(dir: &Path) -> Option<GitState> {
        let sha = git_line(dir, &["rev-parse", "--verify", "HEAD"])?;
        // A directory the enclosing repository ignores (say, under `target/`) is no part of
        // that repository's pushes: it is a plain directory.
        if git(dir, &["check-ignore", "-q", "--", "."]).is_some() {
            return None;
        }
        let branch = git_line(dir, &["symbolic-ref", "--short", "-q", "HEAD"]);
        let message = git(dir, &["log", "-1", "--format=%B", "HEAD"])
            .map(|message| message.trim_end().to_owned())
            .unwrap_or_default();
        let default_branch = git_line(
            dir,
            &["symbolic-ref", "--short", "refs/remotes/origin/HEAD"],
        )
        .map(|remote| {
            remote
                .strip_prefix("origin/")
                .map(str::to_owned)
                .unwrap_or(remote)
        })
        .or_else(|| git_line(dir, &["config", "init.defaultBranch"]))
        .or_else(|| branch.clone())
        .unwrap_or_else(|| "main".to_owned());
        let changes_base = git_line(dir, &["rev-parse", "--verify", "-q", "@{upstream}"])
            .unwrap_or_else(|| sha.clone());
        let changed_files = changed_since(dir, &changes_base).unwrap_or_default();
        Some(GitState {
            ref_name: branch.clone().unwrap_or_else(|| sha.clone()),
            sha,
            branch,
            message,
            default_branch,
            changes_base,
            changed_files,
        })
    }

    /// A project with no git repository and no files (for parsing text alone).
    pub fn detached(dir: &Path) -> Project {
        Project {
            dir: dir.to_owned(),
            name: "project".to_owned(),
            path: "local/project".to_owned(),
            git: None,
            files: Vec::new(),
        }
    }

    /// The pipeline-level predefined variables GitLab would set for a push of this commit.
    pub fn predefined_variables(&self) -> Vec<Variable> {
        let mut variables = vec![
            Variable::public("CI", "true"),
            Variable::public("GITLAB_CI", "true"),
            Variable::public("CI_PIPELINE_SOURCE", "push"),
            Variable::public("CI_PIPELINE_ID", "1"),
            Variable::public("CI_PIPELINE_IID", "1"),
            Variable::public("CI_PROJECT_ID", "1"),
            Variable::public("CI_PROJECT_NAME", &self.name),
            Variable::public("CI_PROJECT_TITLE", &self.name),
            Variable::public("CI_PROJECT_PATH", &self.path),
            Variable::public("CI_PROJECT_PATH_SLUG", slug(&self.path)),
            Variable::public("CI_PROJECT_NAMESPACE", "local"),
            Variable::public("CI_COMMIT_BEFORE_SHA", "0".repeat(40)),
        ];
        match &self.git {
            Some(git) => {
                let title = git.message.lines().next().unwrap_or_default().to_owned();
                let description = git
                    .message
                    .split_once('\n')
                    .map(|(_, rest)| rest.trim_start_matches('\n').to_owned())
                    .unwrap_or_default();
                variables.extend([
                    Variable::public("CI_COMMIT_SHA", &git.sha),
                    Variable::public("CI_COMMIT_SHORT_SHA", &git.sha[..git.sha.len().min(8)]),
                    Variable::public("CI_COMMIT_REF_NAME", &git.ref_name),
                    Variable::public("CI_COMMIT_REF_SLUG", slug(&git.ref_name)),
                    Variable::public("CI_COMMIT_MESSAGE", &git.message),
                    Variable::public("CI_COMMIT_TITLE", title),
                    Variable::public("CI_COMMIT_DESCRIPTION", description),
                    Variable::public("CI_DEFAULT_BRANCH", &git.default_branch),
                ]);
                if let Some(branch) = &git.branch {
                    variables.push(Variable::public("CI_COMMIT_BRANCH", branch));
                }
            }
            None => variables.extend([
                Variable::public("CI_COMMIT_SHA", "0".repeat(40)),
                Variable::public("CI_COMMIT_SHORT_SHA", "00000000"),
                Variable::public("CI_COMMIT_REF_NAME", "local"),
                Variable::public("CI_COMMIT_REF_SLUG", "local"),
                Variable::public("CI_COMMIT_BRANCH", "local"),
                Variable::public("CI_DEFAULT_BRANCH", "local"),
            ]),
        }
        variables
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_follow_gitlab() {
        assert_eq!(slug("Feature/Add_Thing"), "feature-add-thing");
        assert_eq!(slug("--a--b--"), "a-b");
        assert_eq!(slug(&"x".repeat(70)).len(), 63);
    }
}
