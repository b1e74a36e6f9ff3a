//! Processes and mounts of the host, read from /proc.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::HostError;

/// Live process ids owned by `uid` (real uid), from /proc. Zombies are dead already and
/// wait only for their parent (often init, which may take its time) to reap them.
pub fn processes_of(uid: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| live_process_uid(*pid) == Some(uid))
        .collect()
}

fn live_process_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim_start)
    };
    if field("State:")?.starts_with('Z') {
        return None;
    }
    field("Uid:")?.split_whitespace().next()?.parse().ok()
}

/// Kills every process of `uid` until none is left (processes may fork while we kill).
pub async fn kill_all_processes(uid: u32) -> Result<(), HostError> {
    // SIGKILLed processes are gone within milliseconds: look often, for 5 s at most (new
    // ones a dying process forks are killed on the next look).
    for _ in 0..500 {
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
        tokio::time::sleep(Duration::from_millis(10)).await;
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
    fn finds_own_processes() {
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        assert!(processes_of(uid).contains(&(std::process::id() as i32)));
    }
}
