//! Running under systemd: readiness and watchdog notifications (`sd_notify`), and
//! `podfleet service install`, which writes a unit that stops podfleet with SIGQUIT (drain)
//! and gives it the time a drain needs. No pre-start empties the scale sets: the autoscaler
//! reconciles what it finds at start.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use podfleet_config::Config;

use crate::{EXIT_BAD_INPUT, EXIT_FAILED};

/// Sends one notification to the service manager; a no-op outside systemd.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|address| socket.send_to_addr(state.as_bytes(), &address))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "notifying the service manager failed");
    }
}

/// Pings systemd's watchdog at half its interval while the runtime is alive, when the unit
/// asks for it (`WatchdogSec`).
pub fn spawn_watchdog() {
    let Some(interval) = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    ) else {
        return;
    };
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval / 2);
        loop {
            ticks.tick().await;
            notify("WATCHDOG=1");
        }
    });
}

/// The watchdog interval systemd set for this process, if any.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if pid.is_some_and(|pid| pid.parse::<u32>().ok() != Some(own_pid)) {
        return None;
    }
    let usec: u64 = usec?.parse().ok().filter(|usec| *usec > 0)?;
    Some(Duration::from_micros(usec))
}

#[derive(Args)]
pub struct ServiceArgs {
    #[command(subcommand)]
    command: ServiceCommand,
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Write (or print) the systemd unit for `podfleet run` and enable it where systemd runs.
    Install(InstallArgs),
}

#[derive(Args)]
struct InstallArgs {
    /// The config the service runs with.
    #[arg(long, short, default_value = "/etc/podfleet/config.toml")]
    config: PathBuf,
    /// The podfleet binary the unit starts [default: this binary].
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Directory the unit is written to.
    #[arg(long, default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
    /// The longest job timeout of the projects this manager serves (GitLab's default is 1h;
    /// a runner's maximum_timeout caps it): the stop timeout lets such a job finish.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    max_job_timeout: Duration,
    /// Print the unit instead of writing it.
    #[arg(long)]
    print: bool,
    /// Also start the service now.
    #[arg(long)]
    now: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 1h, 90m, 3600s)"))
}

pub async fn run(args: ServiceArgs) -> ExitCode {
    let ServiceCommand::Install(args) = args.command;
    let config = match crate::load_config(&args.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let binary = match args.binary.clone().map_or_else(std::env::current_exe, Ok) {
        Ok(binary) => binary,
        Err(e) => {
            eprintln!(
                "podfleet service install: cannot tell where this binary is ({e}); pass --binary"
            );
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let config_path = std::path::absolute(&args.config).unwrap_or(args.config.clone());
    let unit = unit_text(&binary, &config_path, &config, args.max_job_timeout);
    if args.print {
        print!("{unit}");
        return ExitCode::SUCCESS;
    }
    match install(&args.unit_dir, &unit, args.now).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podfleet service install: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

async fn install(unit_dir: &Path, unit: &str, now: bool) -> anyhow::Result<()> {
    let path = unit_dir.join("podfleet.service");
    if std::fs::read_to_string(&path).is_ok_and(|old| old == unit) {
        println!("{}: unchanged", path.display());
    } else {
        std::fs::create_dir_all(unit_dir)
            .with_context(|| format!("creating {}", unit_dir.display()))?;
        std::fs::write(&path, unit).with_context(|| format!("writing {}", path.display()))?;
        println!("{}: written", path.display());
    }
    // Only where systemd is the running init can the unit be enabled now.
    if !Path::new("/run/systemd/system").exists() {
        println!(
            "systemd is not running here: enable it later with `systemctl enable {}podfleet.service`",
            if now { "--now " } else { "" }
        );
        return Ok(());
    }
    let mut steps: Vec<Vec<&str>> = vec![vec!["daemon-reload"], vec!["enable", "podfleet.service"]];
    if now {
        steps.push(vec!["restart", "podfleet.service"]);
    }
    for step in steps {
        let status = tokio::process::Command::new("systemctl")
            .args(&step)
            .status()
            .await
            .context("running systemctl")?;
        anyhow::ensure!(
            status.success(),
            "systemctl {} failed ({status})",
            step.join(" ")
        );
        println!("systemctl {}: done", step.join(" "));
    }
    Ok(())
}

/// How long a SIGQUIT drain may take: the longest job, then the shutdown deletions of the
/// slowest runner (retries × interval), then the global `shutdown_timeout`, plus a minute.
pub fn stop_timeout(config: &Config, max_job_timeout: Duration) -> Duration {
    let deletions = config
        .runners
        .iter()
        .filter_map(|r| r.autoscaler.as_ref())
        .map(|a| a.shutdown_deletion_interval * a.shutdown_deletion_retries.max(1))
        .max()
        .unwrap_or_default();
    max_job_timeout + deletions + config.shutdown_timeout + Duration::from_secs(60)
}

fn unit_text(binary: &Path, config_path: &Path, config: &Config, max_job: Duration) -> String {
    let stop = stop_timeout(config, max_job).as_secs();
    format!(
        "# Written by `podfleet service install`. SIGQUIT drains: podfleet stops asking for jobs,\n\
         # lets running ones finish, then deletes instances per delete_instances_on_shutdown.\n\
         # TimeoutStopSec = longest job ({job}s) + shutdown deletions + shutdown_timeout + 60s.\n\
         # No ExecStartPre scales anything to zero: podfleet adopts or deletes what it finds.\n\
         [Unit]\n\
         Description=podfleet: autoscaling rootless CI job runner for GitLab\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=notify\n\
         NotifyAccess=main\n\
         ExecStart={binary} run --config {config}\n\
         ExecReload=/bin/kill -HUP $MAINPID\n\
         KillSignal=SIGQUIT\n\
         KillMode=mixed\n\
         TimeoutStopSec={stop}\n\
         WatchdogSec=120\n\
         Restart=on-failure\n\
         RestartSec=5\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        job = max_job.as_secs(),
        binary = exec_word(binary),
        config = exec_word(config_path),
    )
}

/// A path as one word of a systemd `ExecStart=` line (quoted when it has spaces).
fn exec_word(path: &Path) -> String {
    let text = path.display().to_string();
    if text.contains(char::is_whitespace) || text.contains('"') {
        format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_spaces_are_one_exec_word() {
        assert_eq!(
            exec_word(Path::new("/usr/bin/podfleet")),
            "/usr/bin/podfleet"
        );
        assert_eq!(
            exec_word(Path::new("/opt/my tools/podfleet")),
            "\"/opt/my tools/podfleet\""
        );
    }

    #[test]
    fn watchdog_interval_follows_systemd_variables() {
        assert_eq!(
            watchdog_interval(Some("120000000"), None, 7),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            watchdog_interval(Some("120000000"), Some("7"), 7),
            Some(Duration::from_secs(120))
        );
        // Meant for another process (a parent that exec'd us keeps its variables).
        assert_eq!(watchdog_interval(Some("120000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
    }

    #[test]
    fn the_stop_timeout_covers_a_job_and_the_deletions() {
        let config = podfleet_config::parse(
            "concurrent = 1\nshutdown_timeout = 30\n\
             [[runners]]\nname = \"a\"\nurl = \"https://gitlab.example.com\"\ntoken = \"glrt-x\"\nexecutor = \"docker-autoscaler\"\n\
             [runners.autoscaler]\nplugin = \"local\"\nshutdown_deletion_interval = \"10s\"\nshutdown_deletion_retries = 6\n",
            "test",
        )
        .unwrap()
        .config;
        assert_eq!(
            stop_timeout(&config, Duration::from_secs(3600)),
            Duration::from_secs(3600 + 60 + 30 + 60)
        );
        let unit = unit_text(
            Path::new("/usr/local/bin/podfleet"),
            Path::new("/etc/podfleet/config.toml"),
            &config,
            Duration::from_secs(3600),
        );
        assert!(unit.contains("KillSignal=SIGQUIT\n"));
        assert!(unit.contains("TimeoutStopSec=3750\n"));
        assert!(unit.contains("Type=notify\n"));
        assert!(unit.contains(
            "ExecStart=/usr/local/bin/podfleet run --config /etc/podfleet/config.toml\n"
        ));
        assert!(!unit.lines().any(|l| l.starts_with("ExecStartPre")));
    }
}
