//! `podfleet host prepare`: makes this host (or a VM about to be captured as an image) a
//! podfleet executor, idempotently. A preflight refuses unsupported hosts before anything
//! changes; then each step checks whether its change is already there (no change), and
//! otherwise applies it and checks again. `dry_run` lists the changes and makes none.
//!
//! Files are written below a configurable root (`/` on a real host) so that tests can run
//! the file-only steps (`--generalize`) against a temporary directory; commands (useradd,
//! apt-get, podman) always act on the running system.

mod account;
pub mod distro;
mod files;
mod generalize;
mod packages;
mod podman;

use std::fmt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::{Account, HostError};
pub use distro::{Family, HostFacts, PreflightError, Version, preflight};
pub use podman::RegistryMirror;

/// A password that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// One trailing newline (as `echo` or an editor leaves it) is not part of the password.
    pub fn from_input(text: &str) -> Result<Self, String> {
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(text);
        if text.is_empty() {
            return Err("the password is empty".into());
        }
        if text.contains(['\n', ':']) {
            return Err("the password must be one line without ':'".into());
        }
        Ok(Self(text.to_string()))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[MASKED]")
    }
}

/// What to prepare.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// The limited user the connector logs in as.
    pub user: String,
    pub password: Option<Password>,
    /// OpenSSH public key lines authorized for the user.
    pub authorized_keys: Vec<String>,
    pub registry_mirror: Option<RegistryMirror>,
    /// Prepare for image capture: host keys regenerated on first boot, machine-id reset.
    pub generalize: bool,
    pub dry_run: bool,
    /// Where the host's files are; `/` except in tests.
    pub root: PathBuf,
}

impl PrepareOptions {
    pub fn new(user: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            password: None,
            authorized_keys: Vec::new(),
            registry_mirror: None,
            generalize: false,
            dry_run: false,
            root: PathBuf::from("/"),
        }
    }

    /// Every problem of the options, before anything runs.
    pub fn validate(&self) -> Result<(), PrepareError> {
        let mut problems = Vec::new();
        if !valid_user_name(&self.user) {
            problems.push(format!(
                "user name {:?} is not a valid login name (lower-case letters, digits, '-', \
                 '_', starting with a letter or '_', at most 32 characters)",
                self.user
            ));
        }
        if self.user == "root" {
            problems.push(
                "the executor user must be unprivileged: choose another name than root".into(),
            );
        }
        if self.password.is_none() && self.authorized_keys.is_empty() {
            problems.push(format!(
                "no credentials for {}: give --password-file, --password-stdin or \
                 --authorized-key (the connector must be able to log in)",
                self.user
            ));
        }
        // Never echo a bad line: it may be a private key given by mistake.
        let bad: Vec<String> = (self.authorized_keys.iter().enumerate())
            .filter(|(_, key)| !account::looks_like_public_key(key))
            .map(|(index, _)| (index + 1).to_string())
            .collect();
        if !bad.is_empty() {
            problems.push(format!(
                "authorized key line(s) {} are not OpenSSH public keys (expected \
                 'ssh-ed25519 AAAA...' or similar; give the .pub file, never the private key)",
                bad.join(", ")
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PrepareError::Input(problems))
        }
    }
}

fn valid_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 32
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// What a step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Already as wanted.
    Unchanged,
    /// Changed; the changes made.
    Changed(Vec<String>),
    /// Dry run: the changes a real run would make.
    WouldChange(Vec<String>),
}

/// One line of the report: a step and its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepReport {
    pub step: String,
    pub outcome: Outcome,
}

impl fmt::Display for StepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Unchanged => write!(f, "{}: ok (no change)", self.step),
            Outcome::Changed(changes) => {
                write!(f, "{}: changed ({})", self.step, changes.join("; "))
            }
            Outcome::WouldChange(changes) => {
                write!(f, "{}: would change: {}", self.step, changes.join("; "))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{}", .0.join("\n"))]
    Input(Vec<String>),
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("step {step:?} failed: {message}\n  fix: {fix}")]
    Step {
        step: String,
        message: String,
        fix: String,
    },
}

/// Why a step could not check or apply its change, and what the operator can do.
#[derive(Debug)]
pub(crate) struct StepError {
    message: String,
    fix: String,
}

impl StepError {
    pub(crate) fn new(message: impl ToString, fix: impl ToString) -> Self {
        Self {
            message: message.to_string(),
            fix: fix.to_string(),
        }
    }

    pub(crate) fn io(what: impl fmt::Display, error: std::io::Error) -> Self {
        Self::new(
            format!("{what}: {error}"),
            "check that the file system is writable and not full, then run again",
        )
    }

    pub(crate) fn host(error: HostError, fix: impl ToString) -> Self {
        Self::new(error, fix)
    }
}

/// One idempotent change to the host.
#[async_trait]
pub(crate) trait Step: Send + Sync {
    fn description(&self, context: &Context) -> String;
    /// The changes still needed; empty when the host is already as wanted.
    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError>;
    async fn apply(&self, context: &Context) -> Result<(), StepError>;
}

/// What every step may consult.
pub(crate) struct Context {
    pub options: PrepareOptions,
    pub family: Family,
    /// Whether systemd is PID 1 (`/run/systemd/system` exists, as sd_booted(3) checks).
    pub systemd_running: bool,
}

impl Context {
    /// `absolute` below the configured root.
    pub fn path(&self, absolute: impl AsRef<Path>) -> PathBuf {
        let relative = absolute
            .as_ref()
            .strip_prefix("/")
            .unwrap_or(absolute.as_ref());
        self.options.root.join(relative)
    }

    /// The executor user, once it exists.
    pub fn account(&self) -> Result<Option<Account>, StepError> {
        let passwd = self.path("/etc/passwd");
        let accounts = crate::accounts_in(&passwd)
            .map_err(|e| StepError::io(format!("read {}", passwd.display()), e))?;
        Ok(accounts.into_iter().find(|a| a.name == self.options.user))
    }

    /// The executor user; an error if it does not exist (a step that needs it runs after
    /// the user step, except in a dry run, where it reports what it would do instead).
    pub fn existing_account(&self) -> Result<Account, StepError> {
        self.account()?.ok_or_else(|| {
            StepError::new(
                format!("user {} does not exist", self.options.user),
                "run host prepare without --dry-run to create it",
            )
        })
    }
}

/// Reads what preflight needs, changing nothing.
pub async fn gather_facts(root: &Path, family_hint: Option<Family>) -> HostFacts {
    // SAFETY: geteuid has no preconditions.
    let effective_uid = unsafe { libc::geteuid() };
    let os_release = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(root.join(p)).ok());
    let podman_installed = crate::run("podman", &["--version"])
        .await
        .ok()
        .and_then(|out| Version::find_in(&out));
    let family = family_hint.or_else(|| {
        os_release
            .as_deref()
            .and_then(|t| distro::OsRelease::parse(t).family())
    });
    let podman_candidate = match (podman_installed, family) {
        (None, Some(family)) => packages::candidate_version(family, "podman").await,
        _ => None,
    };
    HostFacts {
        effective_uid,
        os_release,
        podman_installed,
        podman_candidate,
    }
}

/// Runs preflight and every step, calling `report` with each step's line as it finishes.
pub async fn prepare(
    options: PrepareOptions,
    report: &mut (dyn FnMut(&StepReport) + Send),
) -> Result<Vec<StepReport>, PrepareError> {
    options.validate()?;
    let facts = gather_facts(&options.root, None).await;
    let family = preflight(&facts)?;
    let context = Context {
        systemd_running: Path::new("/run/systemd/system").is_dir(),
        options,
        family,
    };
    let mut reports = Vec::new();
    for step in steps(&context) {
        let line = run_step(step.as_ref(), &context).await?;
        report(&line);
        reports.push(line);
    }
    Ok(reports)
}

async fn run_step(step: &dyn Step, context: &Context) -> Result<StepReport, PrepareError> {
    let description = step.description(context);
    let failed = |error: StepError| PrepareError::Step {
        step: description.clone(),
        message: error.message,
        fix: error.fix,
    };
    let changes = step.check(context).await.map_err(failed)?;
    let outcome = if changes.is_empty() {
        Outcome::Unchanged
    } else if context.options.dry_run {
        Outcome::WouldChange(changes)
    } else {
        tracing::info!(step = %description, ?changes, "applying");
        step.apply(context).await.map_err(failed)?;
        let left = step.check(context).await.map_err(failed)?;
        if !left.is_empty() {
            return Err(failed(StepError::new(
                format!("still not done after applying it: {}", left.join("; ")),
                "see the message above; fix it by hand or report a bug in podfleet",
            )));
        }
        Outcome::Changed(changes)
    };
    Ok(StepReport {
        step: description,
        outcome,
    })
}

/// The steps in the order they must run: each may rely on the ones before it.
fn steps(context: &Context) -> Vec<Box<dyn Step>> {
    let options = &context.options;
    let mut steps: Vec<Box<dyn Step>> = vec![
        Box::new(packages::Packages),
        Box::new(account::User),
        Box::new(account::Credentials),
    ];
    if !options.authorized_keys.is_empty() {
        steps.push(Box::new(account::AuthorizedKeys));
    }
    steps.extend::<[Box<dyn Step>; 8]>([
        Box::new(account::SubordinateIds),
        Box::new(podman::OpenFileLimit),
        Box::new(podman::ContainersConf),
        Box::new(podman::DevicePermissions),
        Box::new(account::ConnectorEnvironment),
        Box::new(podman::Linger),
        Box::new(podman::SocketUnit),
        Box::new(podman::ApiService),
    ]);
    if let Some(mirror) = &options.registry_mirror {
        steps.push(Box::new(podman::MirrorDropIn(mirror.clone())));
    }
    if options.generalize {
        steps.extend::<[Box<dyn Step>; 2]>([
            Box::new(generalize::HostKeys),
            Box::new(generalize::MachineId),
        ]);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_report_every_problem_at_once() {
        let mut options = PrepareOptions::new("Bad Name");
        options.authorized_keys = vec!["-----BEGIN OPENSSH PRIVATE KEY-----".into()];
        let PrepareError::Input(problems) = options.validate().unwrap_err() else {
            panic!("bad options are input errors");
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("\"Bad Name\""), "{problems:?}");
        assert!(
            problems[1].contains("never the private key"),
            "{problems:?}"
        );
        let options = PrepareOptions::new("podfleet");
        let message = options.validate().unwrap_err().to_string();
        assert!(message.contains("--password-file"), "{message}");
    }

    #[test]
    fn passwords_lose_one_trailing_newline_and_never_print() {
        let password = Password::from_input("s3cret pass\n").unwrap();
        assert_eq!(password.expose(), "s3cret pass");
        assert_eq!(format!("{password:?}"), "[MASKED]");
        assert!(Password::from_input("\n").is_err());
        assert!(Password::from_input("two\nlines\n").is_err());
    }

    #[test]
    fn report_lines_name_the_step_and_the_outcome() {
        let line = |outcome| StepReport {
            step: "linger for podfleet".into(),
            outcome,
        };
        assert_eq!(
            line(Outcome::Unchanged).to_string(),
            "linger for podfleet: ok (no change)"
        );
        assert_eq!(
            line(Outcome::WouldChange(vec!["create a".into(), "b".into()])).to_string(),
            "linger for podfleet: would change: create a; b"
        );
    }
}
