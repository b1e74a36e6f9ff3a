//! How the working tree reaches a local job: as a git clone, exactly like from GitLab.
//!
//! At start the coordinator snapshots the working tree into a commit object (the index of
//! HEAD plus every tracked and untracked, non-ignored file as it is on disk: what `git add -A`
//! would commit, à la `git stash create` but with untracked files), without touching the
//! user's index, branches or stash. A clean tree snapshots to HEAD itself. A bare repository
//! in the pipeline's state directory borrows the project's objects (`objects/info/alternates`,
//! nothing is copied) and has one branch, the current one, pointing at the snapshot; it is
//! served read-only with git's smart HTTP protocol (`git http-backend`) on the coordinator's
//! 127.0.0.1 port, authenticated with the job token like GitLab's
//! `gitlab-ci-token:<job token>@` URLs. So the helper clones over the same path as with
//! GitLab (shallow fetches, refspecs, submodules of public URLs), and the job sees what a push
//! would give it, minus ignored files.

use std::path::{Path, PathBuf};
use std::process::Command;

use podfleet_coordinator::model::{GitInfo, Secret};

use crate::project::Project;

/// The snapshot served to jobs.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    /// The directory `git http-backend` serves (holds `<project path>.git`).
    pub root: PathBuf,
    /// `local/<name>.git`.
    pub repository: String,
    pub sha: String,
    pub branch: String,
}

fn git(dir: &Path, arguments: &[&str], index: Option<&Path>) -> Result<String, String> {
    let mut command = Command::new("git");
    command.arg("-C").arg(dir).args(arguments);
    if let Some(index) = index {
        command.env("GIT_INDEX_FILE", index);
    }
    command
        .env("GIT_AUTHOR_NAME", "podfleet")
        .env("GIT_AUTHOR_EMAIL", "podfleet@localhost")
        .env("GIT_COMMITTER_NAME", "podfleet")
        .env("GIT_COMMITTER_EMAIL", "podfleet@localhost");
    let output = command
        .output()
        .map_err(|error| format!("cannot run git (is it installed?): {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "git {} in {} failed: {}",
            arguments.join(" "),
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

impl Sources {
    /// Snapshots `project`'s working tree and prepares the served repository under
    /// `state_dir`; `None` when the project is not a git work tree.
    pub(crate) fn prepare(project: &Project, state_dir: &Path) -> Result<Option<Sources>, String> {
        let Some(state) = &project.git else {
            return Self::prepare_plain(project, state_dir).map(Some);
        };
        let dir = &project.dir;
        let index = state_dir.join("snapshot.index");
        // Starting from a copy of the real index reuses its stat data (only changed files
        // are hashed again); without one, start from HEAD.
        let real_index = PathBuf::from(git(
            dir,
            &["rev-parse", "--path-format=absolute", "--git-path", "index"],
            None,
        )?);
        if std::fs::copy(&real_index, &index).is_err() {
            git(dir, &["read-tree", "HEAD"], Some(&index))?;
        }
        git(dir, &["add", "-A", "--", "."], Some(&index))?;
        let tree = git(dir, &["write-tree"], Some(&index))?;
        let _ = std::fs::remove_file(&index);
        let head_tree = git(dir, &["rev-parse", "HEAD^{tree}"], None)?;
        let sha = if tree == head_tree {
            state.sha.clone()
        } else {
            git(
                dir,
                &[
                    "commit-tree",
                    &tree,
                    "-p",
                    "HEAD",
                    "-m",
                    "podfleet: snapshot of the working tree",
                ],
                None,
            )?
        };
        let objects = git(
            dir,
            &["rev-parse", "--path-format=absolute", "--git-common-dir"],
            None,
        )
        .map(|common| PathBuf::from(common).join("objects"))?;
        let root = state_dir.join("git");
        let repository = format!("{}.git", project.path);
        let bare = root.join(&repository);
        std::fs::create_dir_all(&bare)
            .map_err(|error| format!("cannot create {}: {error}", bare.display()))?;
        git(&bare, &["init", "-q", "--bare"], None)?;
        let alternates = bare.join("objects/info/alternates");
        std::fs::write(&alternates, format!("{}\n", objects.display()))
            .map_err(|error| format!("cannot write {}: {error}", alternates.display()))?;
        let branch = state
            .branch
            .clone()
            .unwrap_or_else(|| "detached".to_owned());
        git(
            &bare,
            &["update-ref", &format!("refs/heads/{branch}"), &sha],
            None,
        )?;
        git(
            &bare,
            &["symbolic-ref", "HEAD", &format!("refs/heads/{branch}")],
            None,
        )?;
        Ok(Some(Sources {
            root,
            repository,
            sha,
            branch,
        }))
    }

    /// A directory that is not a git work tree is served the same way: its files (all of
    /// them, no ignore rules but its own `.gitignore` files) are committed into a private
    /// repository in the state directory, with no parent, on branch `main`.
    fn prepare_plain(project: &Project, state_dir: &Path) -> Result<Sources, String> {
        let root = state_dir.join("git");
        let repository = format!("{}.git", project.path);
        let bare = root.join(&repository);
        std::fs::create_dir_all(&bare)
            .map_err(|error| format!("cannot create {}: {error}", bare.display()))?;
        git(&bare, &["init", "-q", "--bare"], None)?;
        let git_dir = format!("--git-dir={}", bare.display());
        let work_tree = format!("--work-tree={}", project.dir.display());
        let index = state_dir.join("snapshot.index");
        let with_tree = |arguments: &[&str]| {
            let mut all = vec![git_dir.as_str(), work_tree.as_str()];
            all.extend_from_slice(arguments);
            git(&project.dir, &all, Some(&index))
        };
        with_tree(&["add", "-A", "--", "."])?;
        let tree = with_tree(&["write-tree"])?;
        let _ = std::fs::remove_file(&index);
        let sha = git(
            &bare,
            &[
                "commit-tree",
                &tree,
                "-m",
                "podfleet: snapshot of the directory",
            ],
            None,
        )?;
        let branch = "main".to_owned();
        git(&bare, &["update-ref", "refs/heads/main", &sha], None)?;
        git(&bare, &["symbolic-ref", "HEAD", "refs/heads/main"], None)?;
        Ok(Sources {
            root,
            repository,
            sha,
            branch,
        })
    }

    /// `git_info` of a job: the served repository, with the job token in the URL as GitLab
    /// puts it.
    pub(crate) fn git_info(&self, server_url: &str, token: &str) -> GitInfo {
        let (scheme, host) = server_url.split_once("://").unwrap_or(("http", server_url));
        GitInfo {
            repo_url: Secret::new(format!(
                "{scheme}://gitlab-ci-token:{token}@{host}/{}",
                self.repository
            )),
            git_ref: self.branch.clone(),
            sha: self.sha.clone(),
            before_sha: "0".repeat(40),
            ref_type: "branch".to_owned(),
            refspecs: vec![format!(
                "+refs/heads/{0}:refs/remotes/origin/{0}",
                self.branch
            )],
            depth: 20,
            ..GitInfo::default()
        }
    }
}
