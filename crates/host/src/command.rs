//! Running host commands to completion, with what they printed on failure.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// A failed host command, with what it printed.
#[derive(Debug, thiserror::Error)]
#[error("{command}: {detail}")]
pub struct HostError {
    pub command: String,
    pub detail: String,
}

impl HostError {
    pub fn new(command: impl Into<String>, detail: impl ToString) -> Self {
        Self {
            command: command.into(),
            detail: detail.to_string(),
        }
    }
}

/// Runs a command to completion; non-zero exit is an error carrying stderr.
pub async fn run(program: &str, args: &[&str]) -> Result<String, HostError> {
    run_with_input(program, args, None).await
}

/// Runs a command with `input` on its stdin (how secrets reach `chpasswd`: never argv).
pub async fn run_with_input(
    program: &str,
    args: &[&str],
    input: Option<&[u8]>,
) -> Result<String, HostError> {
    let mut command = Command::new(program);
    command.args(args);
    run_command(command, &format!("{program} {}", args.join(" ")), input).await
}

/// Runs a prepared command; `label` names it in errors (and must not contain secrets).
pub async fn run_command(
    mut command: Command,
    label: &str,
    input: Option<&[u8]>,
) -> Result<String, HostError> {
    let label = label.trim().to_string();
    let mut child = command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HostError::new(label.clone(), e))?;
    if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(bytes)
            .await
            .map_err(|e| HostError::new(label.clone(), e))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| HostError::new(label.clone(), e))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(HostError::new(
            label,
            format!(
                "{} ({})",
                String::from_utf8_lossy(&output.stderr).trim(),
                output.status
            ),
        ))
    }
}
