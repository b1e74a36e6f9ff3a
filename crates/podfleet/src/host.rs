//! `podfleet host prepare`: the executor's manual setup (packages, limited user, limits,
//! environment, lingering, the rootless Podman API service) as one idempotent command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use podfleet_host::prepare::{
    Outcome, Password, PrepareError, PrepareOptions, RegistryMirror, StepReport, prepare,
};

use crate::{EXIT_BAD_INPUT, EXIT_FAILED};

#[derive(Args)]
pub struct HostArgs {
    #[command(subcommand)]
    command: HostCommand,
}

#[derive(Subcommand)]
enum HostCommand {
    /// Make this host (or a VM about to be captured as an image) a podfleet executor.
    /// Idempotent: a second run reports "ok (no change)" for every step.
    Prepare(PrepareArgs),
}

#[derive(Args)]
struct PrepareArgs {
    /// The limited user the connector logs in as.
    #[arg(long, default_value = "podfleet")]
    user: String,
    /// Read the user's password from this file (one line; never pass it as an argument).
    #[arg(long, conflicts_with = "password_stdin")]
    password_file: Option<PathBuf>,
    /// Read the user's password from stdin (one line).
    #[arg(long)]
    password_stdin: bool,
    /// Authorize the OpenSSH public keys in this file (a `.pub` or authorized_keys file).
    #[arg(long)]
    authorized_key: Option<PathBuf>,
    /// Pull Docker Hub images through this mirror (podfleet's image cache): HOST:PORT[/PREFIX].
    #[arg(long, value_parser = parse_mirror)]
    registry_mirror: Option<RegistryMirror>,
    /// Prepare for image capture: SSH host keys removed (regenerated on first boot by a
    /// unit that runs `ssh-keygen -A` before sshd) and /etc/machine-id emptied. Run last,
    /// right before shutting the VM down to capture it.
    #[arg(long)]
    generalize: bool,
    /// List every change that would be made, and make none.
    #[arg(long)]
    dry_run: bool,
}

fn parse_mirror(text: &str) -> Result<RegistryMirror, String> {
    text.parse()
}

pub async fn run(args: HostArgs) -> ExitCode {
    match args.command {
        HostCommand::Prepare(args) => run_prepare(args).await,
    }
}

async fn run_prepare(args: PrepareArgs) -> ExitCode {
    let options = match options(&args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("podfleet host prepare: {message}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    if options.dry_run {
        println!("dry run: listing the changes, changing nothing");
    }
    let mut print = |line: &StepReport| println!("{line}");
    match prepare(options, &mut print).await {
        Ok(reports) => {
            let changed = reports
                .iter()
                .filter(|r| !matches!(r.outcome, Outcome::Unchanged))
                .count();
            let verb = if args.dry_run {
                "would change"
            } else {
                "changed"
            };
            println!(
                "host prepared for user {}: {changed} of {} steps {verb}",
                args.user,
                reports.len()
            );
            ExitCode::SUCCESS
        }
        Err(error @ (PrepareError::Input(_) | PrepareError::Preflight(_))) => {
            for line in error.to_string().lines() {
                eprintln!("podfleet host prepare: {line}");
            }
            eprintln!("podfleet host prepare: nothing was changed");
            ExitCode::from(EXIT_BAD_INPUT)
        }
        Err(error) => {
            eprintln!("podfleet host prepare: {error}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn options(args: &PrepareArgs) -> Result<PrepareOptions, String> {
    let mut options = PrepareOptions::new(&args.user);
    let password_text = match (&args.password_file, args.password_stdin) {
        (Some(path), _) => Some(read(path, "--password-file")?),
        (None, true) => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| format!("--password-stdin: cannot read stdin: {e}"))?;
            Some(text)
        }
        (None, false) => None,
    };
    if let Some(text) = password_text {
        let source = args
            .password_file
            .as_ref()
            .map_or("stdin".to_string(), |p| p.display().to_string());
        options.password = Some(
            Password::from_input(&text).map_err(|why| format!("password from {source}: {why}"))?,
        );
    }
    if let Some(path) = &args.authorized_key {
        options.authorized_keys = read(path, "--authorized-key")?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect();
        if options.authorized_keys.is_empty() {
            return Err(format!(
                "--authorized-key {}: no key in the file",
                path.display()
            ));
        }
    }
    options.registry_mirror = args.registry_mirror.clone();
    options.generalize = args.generalize;
    options.dry_run = args.dry_run;
    Ok(options)
}

fn read(path: &Path, flag: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}
