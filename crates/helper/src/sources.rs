//! `get_sources`: the `GIT_STRATEGY` of a job with the bundled git, into the project dir in
//! the build volume, following gitlab-runner's sequence (init, remote, fetch with refspecs
//! and depth, checkout of the sha, clean, submodules).
//!
//! The job token never reaches `.git/config` or a command line: git gets the credentials as
//! a `url.<with token>.insteadOf <without>` setting through `GIT_CONFIG_*` environment
//! variables, and every line git prints is masked before it is shown.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::job::{GitStrategy, Sources, SubmoduleStrategy};
use crate::mask;

/// Why `get_sources` failed; the message is safe to show (no token).
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    #[error("{what} failed: {reason}")]
    Git { what: String, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SourcesError + '_ {
    move |source| SourcesError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Runs `get_sources` for `sources` into `project_dir`, logging to `log`.
pub fn get_sources(
    sources: &Sources,
    project_dir: &Path,
    log: &mut dyn Write,
) -> Result<(), SourcesError> {
    match sources.strategy {
        GitStrategy::None => {
            let _ = writeln!(log, "Skipping Git repository setup");
            fs::create_dir_all(project_dir).map_err(io_error(project_dir))?;
            return Ok(());
        }
        GitStrategy::Empty => {
            let _ = writeln!(
                log,
                "Skipping Git repository setup and creating an empty build directory"
            );
            empty_directory(project_dir)?;
            return Ok(());
        }
        GitStrategy::Clone => empty_directory(project_dir)?,
        GitStrategy::Fetch => fs::create_dir_all(project_dir).map_err(io_error(project_dir))?,
    }
    let git = Git::new(sources, project_dir)?;
    remove_stale_locks(project_dir);

    if project_dir.join(".git").is_dir() {
        let _ = writeln!(
            log,
            "Reinitialized existing Git repository in {}/.git/",
            project_dir.display()
        );
    } else {
        let mut init = vec!["init", "-q"];
        if sources.object_format == "sha256" {
            init.extend(["--object-format", "sha256"]);
        }
        git.run(&init, log)?;
        let _ = writeln!(
            log,
            "Initialized empty Git repository in {}/.git/",
            project_dir.display()
        );
        let _ = writeln!(log, "Created fresh repository.");
    }
    let remote = git.plain_url.clone();
    if git.quiet(&["remote", "get-url", "origin"]).is_ok() {
        git.run(&["remote", "set-url", "origin", &remote], log)?;
    } else {
        git.run(&["remote", "add", "origin", &remote], log)?;
    }

    if sources.depth > 0 {
        let _ = writeln!(
            log,
            "Fetching changes with git depth set to {}...",
            sources.depth
        );
    } else {
        let _ = writeln!(log, "Fetching changes...");
    }
    let user_agent = format!(
        "http.userAgent=podfleet-helper/{}",
        env!("CARGO_PKG_VERSION")
    );
    let mut fetch: Vec<String> = vec![
        "-c".into(),
        user_agent,
        "fetch".into(),
        "origin".into(),
        "--no-recurse-submodules".into(),
    ];
    fetch.extend(sources.refspecs.iter().cloned());
    if sources.depth > 0 {
        fetch.push("--depth".into());
        fetch.push(sources.depth.to_string());
    } else if project_dir.join(".git/shallow").exists() {
        fetch.push("--unshallow".into());
    }
    fetch.extend(sources.fetch_extra_flags.iter().cloned());
    git.run_owned(&fetch, log)?;

    if !sources.checkout {
        let _ = writeln!(log, "Skipping Git checkout");
        let _ = writeln!(log, "Skipping Git submodules setup");
        return Ok(());
    }
    let short_sha: String = sources.sha.chars().take(8).collect();
    let _ = writeln!(
        log,
        "Checking out {short_sha} as detached HEAD (ref is {})...",
        sources.git_ref
    );
    git.run(
        &[
            "-c",
            "submodule.recurse=false",
            "checkout",
            "-f",
            "-q",
            &sources.sha,
        ],
        log,
    )?;
    if !sources.clean_flags.is_empty() {
        let mut clean = vec!["clean".to_owned()];
        clean.extend(sources.clean_flags.iter().cloned());
        git.run_owned(&clean, log)?;
    }

    match sources.submodule_strategy {
        SubmoduleStrategy::None => {
            let _ = writeln!(log, "Skipping Git submodules setup");
        }
        strategy => {
            let recursive = strategy == SubmoduleStrategy::Recursive;
            let _ = writeln!(
                log,
                "Updating/initializing submodules{}...",
                if recursive { " recursively" } else { "" }
            );
            let paths: Vec<String> = if sources.submodule_paths.is_empty() {
                Vec::new()
            } else {
                std::iter::once("--".to_owned())
                    .chain(sources.submodule_paths.iter().cloned())
                    .collect()
            };
            let mut init = vec!["submodule".to_owned(), "init".to_owned()];
            init.extend(paths.iter().cloned());
            git.run_owned(&init, log)?;
            let mut sync = vec!["submodule".to_owned(), "sync".to_owned()];
            if recursive {
                sync.push("--recursive".to_owned());
            }
            sync.extend(paths.iter().cloned());
            git.run_owned(&sync, log)?;
            let foreach = |command: &str| {
                let mut args = vec!["submodule".to_owned(), "foreach".to_owned()];
                if recursive {
                    args.push("--recursive".to_owned());
                }
                args.push(command.to_owned());
                args
            };
            if !sources.clean_flags.is_empty() {
                git.run_owned(
                    &foreach(&format!("git clean {}", sources.clean_flags.join(" "))),
                    log,
                )?;
            }
            git.run_owned(&foreach("git reset --hard"), log)?;
            let mut update = vec![
                "submodule".to_owned(),
                "update".to_owned(),
                "--init".to_owned(),
            ];
            if recursive {
                update.push("--recursive".to_owned());
            }
            if sources.submodule_depth > 0 {
                update.push("--depth".to_owned());
                update.push(sources.submodule_depth.to_string());
            }
            update.extend(sources.submodule_update_flags.iter().cloned());
            update.extend(paths.iter().cloned());
            // gitlab-runner retries the update once: a transient network error is common.
            if git.run_owned(&update, log).is_err() {
                let _ = writeln!(log, "Updating submodules failed, retrying...");
                git.run_owned(&update, log)?;
            }
        }
    }
    Ok(())
}

/// Removes everything inside `dir` (which may be a volume's mount point, so it stays).
fn empty_directory(dir: &Path) -> Result<(), SourcesError> {
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map(|kind| kind.is_dir())
            .map_err(io_error(&path))?;
        if is_dir {
            fs::remove_dir_all(&path).map_err(io_error(&path))?;
        } else {
            fs::remove_file(&path).map_err(io_error(&path))?;
        }
    }
    Ok(())
}

/// Lock files a killed git leaves behind would fail every later fetch.
fn remove_stale_locks(project_dir: &Path) {
    for lock in ["index.lock", "shallow.lock", "HEAD.lock", "config.lock"] {
        let _ = fs::remove_file(project_dir.join(".git").join(lock));
    }
}

/// git in the project dir with the credentials in its environment only.
struct Git {
    project_dir: PathBuf,
    /// The repository URL without credentials (what `.git/config` holds).
    plain_url: String,
    /// `(key, value)` git config entries passed through the environment.
    config: Vec<(String, String)>,
    /// Values masked in every line git prints.
    secrets: Vec<String>,
}

impl Git {
    fn new(sources: &Sources, project_dir: &Path) -> Result<Self, SourcesError> {
        let url = sources.repo_url.expose();
        let (plain_url, credentials) = split_credentials(url);
        let mut config = vec![
            ("safe.directory".to_owned(), "*".to_owned()),
            ("advice.detachedHead".to_owned(), "false".to_owned()),
            ("init.defaultBranch".to_owned(), "main".to_owned()),
        ];
        let mut secrets = Vec::new();
        if let Some(credentials) = credentials {
            // Rewrite every URL of the same host (submodules included), as gitlab-runner does.
            let host_root = host_root(&plain_url);
            let with_credentials = host_root.replacen("://", &format!("://{credentials}@"), 1);
            config.push((format!("url.{with_credentials}.insteadOf"), host_root));
            if let Some((_, password)) = credentials.split_once(':') {
                secrets.push(password.to_owned());
                if let Ok(decoded) = percent_decode(password) {
                    secrets.push(decoded);
                }
            }
            secrets.push(credentials);
        }
        Ok(Git {
            project_dir: project_dir.to_owned(),
            plain_url,
            config,
            secrets,
        })
    }

    fn command(&self, args: &[String]) -> Command {
        let mut command = Command::new("git");
        command
            .args(args)
            .current_dir(&self.project_dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GCM_INTERACTIVE", "Never")
            .env("GIT_LFS_SKIP_SMUDGE", "1")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_COUNT", self.config.len().to_string())
            .stdin(Stdio::null());
        for (index, (key, value)) in self.config.iter().enumerate() {
            command
                .env(format!("GIT_CONFIG_KEY_{index}"), key)
                .env(format!("GIT_CONFIG_VALUE_{index}"), value);
        }
        command
    }

    fn mask(&self, text: &str) -> String {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        mask::secrets(text, &secrets)
    }

    fn run(&self, args: &[&str], log: &mut dyn Write) -> Result<(), SourcesError> {
        let owned: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        self.run_owned(&owned, log)
    }

    /// Runs git, streaming its masked output into `log`.
    fn run_owned(&self, args: &[String], log: &mut dyn Write) -> Result<(), SourcesError> {
        let what = self.mask(&format!("git {}", args.join(" ")));
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| SourcesError::Git {
                what: what.clone(),
                reason: format!("cannot start git: {error} (is git in the helper image?)"),
            })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, receiver) = std::sync::mpsc::channel::<String>();
        let forward = |reader: Box<dyn io::Read + Send>,
                       sender: std::sync::mpsc::Sender<String>| {
            std::thread::spawn(move || {
                for line in BufReader::new(reader).split(b'\n').map_while(Result::ok) {
                    // git's progress lines use \r; keep the last state of each.
                    let text = String::from_utf8_lossy(&line);
                    let text = text
                        .rsplit('\r')
                        .find(|part| !part.is_empty())
                        .unwrap_or("");
                    if sender.send(text.to_owned()).is_err() {
                        break;
                    }
                }
            })
        };
        let threads = [
            forward(Box::new(stdout), sender.clone()),
            forward(Box::new(stderr), sender),
        ];
        let mut last_lines: Vec<String> = Vec::new();
        for line in receiver {
            let masked = self.mask(&line);
            let _ = writeln!(log, "{masked}");
            last_lines.push(masked);
            if last_lines.len() > 5 {
                last_lines.remove(0);
            }
        }
        for thread in threads {
            let _ = thread.join();
        }
        let status = child.wait().map_err(|error| SourcesError::Git {
            what: what.clone(),
            reason: error.to_string(),
        })?;
        if status.success() {
            Ok(())
        } else {
            Err(SourcesError::Git {
                what,
                reason: format!(
                    "{status}{}",
                    last_lines
                        .last()
                        .map(|line| format!(": {line}"))
                        .unwrap_or_default()
                ),
            })
        }
    }

    /// Runs git without showing its output (for probes).
    fn quiet(&self, args: &[&str]) -> Result<String, ()> {
        let owned: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        let output = self.command(&owned).output().map_err(|_| ())?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(())
        }
    }
}

/// `(url without user info, Some("user:password"))`.
fn split_credentials(url: &str) -> (String, Option<String>) {
    let Some(scheme_end) = url.find("://") else {
        return (url.to_owned(), None);
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => (
            format!("{}{}", &url[..scheme_end + 3], &rest[at + 1..]),
            Some(rest[..at].to_owned()),
        ),
        None => (url.to_owned(), None),
    }
}

/// `scheme://host[:port]/` of a URL.
fn host_root(url: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |at| at + 3);
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    format!("{}{}/", &url[..scheme_end], &rest[..authority_end])
}

fn percent_decode(text: &str) -> Result<String, ()> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' && at + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[at + 1..at + 3]).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_split_from_the_url() {
        assert_eq!(
            split_credentials("http://gitlab-ci-token:abc@127.0.0.1:8080/g/p.git"),
            (
                "http://127.0.0.1:8080/g/p.git".to_owned(),
                Some("gitlab-ci-token:abc".to_owned())
            )
        );
        assert_eq!(
            split_credentials("https://host/p.git"),
            ("https://host/p.git".to_owned(), None)
        );
        assert_eq!(
            host_root("http://127.0.0.1:8080/g/p.git"),
            "http://127.0.0.1:8080/"
        );
        assert_eq!(percent_decode("a%2Fb").unwrap(), "a/b");
    }
}
