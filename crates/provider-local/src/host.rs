//! Host operations of the local provider: users, processes, mounts and commands, as root.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// A failed host command, with what it printed.
#[derive(Debug, thiserror::Error)]
#[error("{command}: {detail}")]
pub struct HostError {
    pub command: String,
    pub detail: String,
}

/// Runs a command to completion; non-zero exit is an error carrying stderr.
pub async fn run(program: &str, args: &[&str]) -> Result<String, HostError> {
    run_with_input(program, args, None).await
}

pub async fn run_with_input(
    program: &str,
    args: &[&str],
    input: Option<&[u8]>,
) -> Result<String, HostError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HostError {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(bytes).await.map_err(|e| HostError {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    }
    let output = child.wait_with_output().await.map_err(|e| HostError {
        command: command.clone(),
        detail: e.to_string(),
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(HostError {
            command,
            detail: format!(
                "{} ({})",
                String::from_utf8_lossy(&output.stderr).trim(),
                output.status
            ),
        })
    }
}

/// A user account as `/etc/passwd` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub comment: String,
    pub home: PathBuf,
}

/// Every account of the host.
pub fn accounts() -> std::io::Result<Vec<Account>> {
    let text = std::fs::read_to_string("/etc/passwd")?;
    Ok(text.lines().filter_map(parse_passwd_line).collect())
}

fn parse_passwd_line(line: &str) -> Option<Account> {
    let fields: Vec<&str> = line.split(':').collect();
    if fields.len() != 7 {
        return None;
    }
    Some(Account {
        name: fields[0].to_string(),
        uid: fields[2].parse().ok()?,
        gid: fields[3].parse().ok()?,
        comment: fields[4].to_string(),
        home: PathBuf::from(fields[5]),
    })
}

pub fn account(name: &str) -> std::io::Result<Option<Account>> {
    Ok(accounts()?.into_iter().find(|a| a.name == name))
}

/// Process ids owned by `uid` (real uid), from /proc.
pub fn processes_of(uid: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| process_uid(*pid) == Some(uid))
        .collect()
}

fn process_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Kills every process of `uid` until none is left (processes may fork while we kill).
pub async fn kill_all_processes(uid: u32) -> Result<(), HostError> {
    for _ in 0..50 {
        let pids = processes_of(uid);
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid read from /proc and a constant signal has no
            // memory-safety preconditions; a vanished pid only yields ESRCH.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(HostError {
        command: format!("kill processes of uid {uid}"),
        detail: format!("still running: {:?}", processes_of(uid)),
    })
}

/// Mount points below any of `roots`, deepest first.
pub fn mounts_below(roots: &[&Path]) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| roots.iter().any(|r| p.starts_with(r)))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// The command line of a process, split into its arguments.
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The first process whose command line matches.
pub fn find_process(matches: impl Fn(&[String]) -> bool) -> Option<i32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| cmdline(*pid).is_some_and(|args| matches(&args)))
}

/// Whether a process with this pid is alive.
pub fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_lines() {
        let a = parse_passwd_line("pf-x:x:1001:1001:podfleet:demo:/home/pf-x:/bin/sh");
        assert_eq!(
            a, None,
            "a comment with ':' splits the line and must not parse as a user"
        );
        let a = parse_passwd_line("pf-x:x:1001:1002:podfleet-demo:/home/pf-x:/bin/sh").unwrap();
        assert_eq!(
            (a.uid, a.gid, a.comment.as_str()),
            (1001, 1002, "podfleet-demo")
        );
        assert_eq!(parse_passwd_line("broken"), None);
    }

    #[test]
    fn finds_own_processes() {
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        assert!(processes_of(uid).contains(&(std::process::id() as i32)));
    }
}
