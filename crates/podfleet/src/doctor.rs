//! `podfleet doctor`: every link of the chain a job depends on, checked in order, each with
//! PASS/FAIL/SKIP and, when it fails, the fix. Exit 0 only when nothing failed.
//!
//! The chain per runner: config → coordinator (and the runner token) → provider (a list
//! call) → SSH to an instance → the container engine's API through the tunnel → rootless →
//! cgroups → open-file limit → subordinate ids → disk space; then the image cache.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use podfleet_config::{Config, RunnerConfig};
use podfleet_connector::Connection;
use podfleet_coordinator::Client;
use podfleet_coordinator::model::RunnerInfo;
use podfleet_executor::Executor;
use podfleet_manager::session;
use podfleet_provider::{InstanceId, InstanceState, Provider};

use crate::{EXIT_BAD_INPUT, EXIT_FAILED};

#[derive(Args)]
pub struct DoctorArgs {
    /// The config to check.
    #[arg(long, short, default_value = "/etc/podfleet/config.toml")]
    config: PathBuf,
    /// When a runner has no running instance, create one for the checks and delete it after.
    #[arg(long)]
    probe_instance: bool,
    /// Least free disk space under the instance user's home, in GiB.
    #[arg(long, default_value_t = 5)]
    min_free_gib: u64,
    /// Least hard open-file limit on an instance.
    #[arg(long, default_value_t = 8192)]
    min_nofile: u64,
    /// An image cache (pull-through registry) the instances use; checked for `/v2/`.
    #[arg(long, value_name = "URL")]
    image_cache: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail,
    Skip,
}

/// One check's result.
struct Check {
    verdict: Verdict,
    name: String,
    detail: String,
    fix: Option<String>,
}

impl Check {
    fn pass(name: &str, detail: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Pass,
            name: name.into(),
            detail: detail.into(),
            fix: None,
        }
    }
    fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Fail,
            name: name.into(),
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn skip(name: &str, detail: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Skip,
            name: name.into(),
            detail: detail.into(),
            fix: None,
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        };
        write!(f, "{verdict}  {:<14} {}", self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      fix: {fix}")?;
        }
        Ok(())
    }
}

/// Prints checks as they are made and remembers whether any failed.
#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn add(&mut self, check: Check) {
        self.failed |= check.verdict == Verdict::Fail;
        println!("{check}");
    }
}

pub async fn run(args: DoctorArgs) -> ExitCode {
    let mut report = Report::default();
    let config = match podfleet_config::load(&args.config) {
        Ok(loaded) => {
            report.add(Check::pass(
                "config",
                format!(
                    "{}: {} runner(s), {} warning(s)",
                    args.config.display(),
                    loaded.config.runners.len(),
                    loaded.warnings.len()
                ),
            ));
            loaded.config
        }
        Err(e) => {
            report.add(Check::fail(
                "config",
                format!("{}:\n{e}", args.config.display()),
                "correct the problems listed (line:column), then run `podfleet config check`",
            ));
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    for runner in &config.runners {
        println!("\nrunner {:?}", runner.name);
        check_runner(&config, runner, &args, &mut report).await;
    }
    if let Some(url) = &args.image_cache {
        report.add(image_cache(url).await);
    }
    if report.failed {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

async fn check_runner(
    _config: &Config,
    runner: &RunnerConfig,
    args: &DoctorArgs,
    report: &mut Report,
) {
    report.add(coordinator(runner).await);
    let provider = match crate::providers::provider_for(runner).await {
        Ok(provider) => provider,
        Err(e) => {
            report.add(Check::fail(
                "provider",
                format!("{e:#}"),
                "correct [runners.autoscaler] plugin and plugin_config as the message says",
            ));
            return;
        }
    };
    let listed = provider.list().await;
    let instances = match listed {
        Ok(instances) => {
            report.add(Check::pass(
                "provider",
                format!(
                    "{}: list answered, {} instance(s)",
                    provider.info().name,
                    instances.len()
                ),
            ));
            instances
        }
        Err(e) => {
            report.add(Check::fail(
                "provider",
                format!("listing instances failed: {e}"),
                "check the provider's credentials and that they may list the group",
            ));
            provider.shutdown().await;
            return;
        }
    };
    let running = instances
        .iter()
        .find(|i| i.state == InstanceState::Running)
        .map(|i| i.id.clone());
    // Without a running instance, a failed one is checked link by link: that says why.
    let failed = instances.iter().find_map(|i| match &i.state {
        InstanceState::Failed { reason } => Some((i.id.clone(), reason.clone())),
        _ => None,
    });
    let (instance, probe) = match (running, failed) {
        (Some(id), _) => (Some(id), false),
        (None, Some((id, reason))) => {
            report.add(Check::fail(
                "instance",
                format!("{id} has failed: {reason}"),
                "the checks below say which link broke; the autoscaler deletes and replaces it",
            ));
            (Some(id), false)
        }
        (None, None) if args.probe_instance => match probe_instance(provider.as_ref()).await {
            Ok(id) => (Some(id), true),
            Err(e) => {
                report.add(Check::fail(
                    "instance",
                    format!("creating a probe instance failed: {e}"),
                    "see the provider check above; the provider could not create an instance",
                ));
                (None, false)
            }
        },
        (None, None) => {
            report.add(Check::skip(
                "instance",
                "no running instance to check (pass --probe-instance to create one for the checks)",
            ));
            (None, false)
        }
    };
    if let Some(id) = &instance {
        check_instance(runner, provider.clone(), id, args, report).await;
    }
    if probe && let Some(id) = instance {
        if let Err(e) = provider.decrease(std::slice::from_ref(&id)).await {
            eprintln!("podfleet doctor: deleting probe instance {id} failed: {e}");
        }
        // The deletion is asynchronous on most platforms: wait until it is gone, briefly.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline
            && provider
                .list()
                .await
                .is_ok_and(|all| all.iter().any(|i| i.id == id))
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    provider.shutdown().await;
}

async fn coordinator(runner: &RunnerConfig) -> Check {
    let shell = runner.shell.clone().unwrap_or_else(|| "sh".into());
    let client = match Client::new(
        &runner.url,
        crate::system_id(),
        RunnerInfo::podfleet("docker-autoscaler", &shell),
    ) {
        Ok(client) => client,
        Err(e) => return Check::fail("coordinator", e.to_string(), "correct the runner's url"),
    };
    match tokio::time::timeout(
        Duration::from_secs(30),
        client.verify_runner(runner.token.expose()),
    )
    .await
    {
        Ok(Ok(_)) => Check::pass(
            "coordinator",
            format!("{}: token {} accepted", runner.url, runner.short_token()),
        ),
        Ok(Err(e)) if e.status() == Some(403) => Check::fail(
            "coordinator",
            format!(
                "{}: token {} refused (403)",
                runner.url,
                runner.short_token()
            ),
            "create a runner in GitLab (Settings > CI/CD > Runners) and put its glrt- token in the runner's token",
        ),
        Ok(Err(e)) => Check::fail(
            "coordinator",
            format!("{}: {e}", runner.url),
            "check the url, DNS, proxy and TLS settings; the manager must reach the coordinator",
        ),
        Err(_) => Check::fail(
            "coordinator",
            format!("{}: no answer within 30 s", runner.url),
            "check the url and that a firewall does not drop the connection",
        ),
    }
}

/// Creates one instance and waits until the provider reports it running.
async fn probe_instance(provider: &dyn Provider) -> anyhow::Result<InstanceId> {
    let before: Vec<InstanceId> = provider.list().await?.into_iter().map(|i| i.id).collect();
    anyhow::ensure!(
        provider.increase(1).await? == 1,
        "the provider accepted no new instance (group at its maximum size?)"
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        for instance in provider.list().await? {
            if before.contains(&instance.id) {
                continue;
            }
            match instance.state {
                InstanceState::Running => return Ok(instance.id),
                InstanceState::Failed { reason } => {
                    let _ = provider.decrease(std::slice::from_ref(&instance.id)).await;
                    anyhow::bail!("instance {} failed: {reason}", instance.id)
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("no new instance was running within 300 s")
}

async fn check_instance(
    runner: &RunnerConfig,
    provider: Arc<dyn Provider>,
    id: &InstanceId,
    args: &DoctorArgs,
    report: &mut Report,
) {
    let info = match provider.connect_info(id).await {
        Ok(info) => info,
        Err(e) => {
            report.add(Check::fail(
                "ssh",
                format!("instance {id}: no connection details: {e}"),
                "the provider cannot say how to reach the instance; see its logs",
            ));
            return;
        }
    };
    let connection = match session::connect_options(runner, &info) {
        Ok(options) => Connection::connect(&options)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let connection = match connection {
        Ok(connection) => {
            report.add(Check::pass(
                "ssh",
                format!("instance {id} at {}: logged in", info.internal_addr),
            ));
            connection
        }
        Err(e) => {
            report.add(Check::fail(
                "ssh",
                format!("instance {id} at {}: {e}", info.internal_addr),
                "check connector_config (username, password or key_path) against the instance's user; \
                 `podfleet host prepare` sets that user up",
            ));
            return;
        }
    };
    engine_checks(runner, &info, connection.clone(), id, report).await;
    host_checks(&connection, args, report).await;
    connection.close().await;
}

async fn engine_checks(
    runner: &RunnerConfig,
    info: &podfleet_provider::ConnectInfo,
    connection: Connection,
    id: &InstanceId,
    report: &mut Report,
) {
    let engine = async {
        let tunnel = session::docker_tunnel(runner, info).map_err(|e| e.to_string())?;
        let libpod = libpod_rootless(&connection, &tunnel).await;
        let executor = Executor::connect(connection, tunnel)
            .await
            .map_err(|e| e.to_string())?;
        let info = executor.docker().info().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((info, libpod))
    };
    let (info, libpod_rootless) = match tokio::time::timeout(Duration::from_secs(60), engine).await
    {
        Ok(Ok(info)) => {
            report.add(Check::pass(
                "engine",
                format!(
                    "instance {id}: Docker API answers ({} {})",
                    info.0.operating_system.clone().unwrap_or_default(),
                    info.0.server_version.clone().unwrap_or_default()
                ),
            ));
            (info.0, info.1)
        }
        failed => {
            let detail = match failed {
                Ok(Err(e)) => e,
                _ => "no answer within 60 s".to_string(),
            };
            report.add(Check::fail(
                "engine",
                format!("instance {id}: {detail}"),
                "start the user's Podman API socket (`systemctl --user enable --now podman.socket`, \
                 or `podfleet host prepare`), and check [runners.docker] host",
            ));
            return;
        }
    };
    let options = info.security_options.clone().unwrap_or_default();
    report.add(rootless_check(libpod_rootless, &options));
    report.add(cgroup_check(
        info.cgroup_version
            .as_ref()
            .map(|v| v.to_string())
            .as_deref(),
        info.default_runtime.as_deref(),
    ));
}

/// Podman's own answer to "rootless?" (`GET /libpod/info`, `host.security.rootless`), asked
/// through the same tunnel as the Docker API; `None` for engines without the libpod API.
/// (Podman 4.3's Docker-compatible `/info` does not list `name=rootless`.)
async fn libpod_rootless(
    connection: &Connection,
    tunnel: &podfleet_connector::Tunnel,
) -> Option<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = connection.open_tunnel(tunnel).await.ok()?;
    stream
        .write_all(b"GET /v4.0.0/libpod/info HTTP/1.0\r\nHost: d\r\n\r\n")
        .await
        .ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.lines().next()?.contains(" 200 ") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    value["host"]["security"]["rootless"].as_bool()
}

fn rootless_check(libpod_rootless: Option<bool>, security_options: &[String]) -> Check {
    let rootless = libpod_rootless
        .unwrap_or_else(|| security_options.iter().any(|o| o.contains("name=rootless")));
    if rootless {
        Check::pass("rootless", "the engine runs rootless")
    } else {
        Check::fail(
            "rootless",
            format!(
                "the engine runs as root (security options {security_options:?}): a job could take over the instance"
            ),
            "run rootless Podman as a limited user and point the connector at it (`podfleet host prepare --user NAME`)",
        )
    }
}

fn cgroup_check(version: Option<&str>, runtime: Option<&str>) -> Check {
    match (version, runtime) {
        (Some("2"), _) => Check::pass("cgroups", "cgroup v2"),
        (_, Some("runc")) => Check::pass(
            "cgroups",
            "cgroup v1 or hybrid with runc: jobs run, but memory/cpus limits are not enforced rootless",
        ),
        (version, runtime) => Check::fail(
            "cgroups",
            format!(
                "cgroup {} with runtime {}: rootless containers fail to start",
                version.unwrap_or("unknown"),
                runtime.unwrap_or("unknown")
            ),
            "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1), or set runtime = \"runc\" in containers.conf [engine]",
        ),
    }
}

/// Facts of the instance's host read through one shell command.
async fn host_checks(connection: &Connection, args: &DoctorArgs, report: &mut Report) {
    let script = "u=$(id -un); echo \"user $u\"; echo \"nofile $(ulimit -Hn)\"; \
                  echo \"subuid $(grep -c \"^$u:\" /etc/subuid 2>/dev/null)\"; \
                  echo \"subgid $(grep -c \"^$u:\" /etc/subgid 2>/dev/null)\"; \
                  echo \"free $(df -Pk \"$HOME\" | awk 'NR==2 {print $4}')\"";
    let facts = match connection
        .exec(&format!("sh -c '{}'", script.replace('\'', "'\\''")))
        .await
    {
        Ok(output) => String::from_utf8_lossy(&output.stdout).into_owned(),
        Err(e) => {
            report.add(Check::fail(
                "host",
                format!("running a command on the instance failed: {e}"),
                "the SSH user needs a shell; check its login shell",
            ));
            return;
        }
    };
    let fact = |key: &str| {
        facts
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    for check in evaluate_host(
        &fact("user"),
        &fact("nofile"),
        &fact("subuid"),
        &fact("subgid"),
        &fact("free"),
        args,
    ) {
        report.add(check);
    }
}

fn evaluate_host(
    user: &str,
    nofile: &str,
    subuid: &str,
    subgid: &str,
    free_kib: &str,
    args: &DoctorArgs,
) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(match nofile {
        "unlimited" => Check::pass("ulimits", "open files: unlimited"),
        n => match n.parse::<u64>() {
            Ok(n) if n >= args.min_nofile => Check::pass("ulimits", format!("open files (hard): {n}")),
            _ => Check::fail(
                "ulimits",
                format!("open files (hard) for {user}: {n}, below {}", args.min_nofile),
                format!(
                    "raise it in /etc/security/limits.d/ (`{user} hard nofile {}`), or run `podfleet host prepare`",
                    args.min_nofile.max(16384)
                ),
            ),
        },
    });
    let ids_ok = |count: &str| count.parse::<u32>().is_ok_and(|n| n > 0);
    checks.push(if ids_ok(subuid) && ids_ok(subgid) {
        Check::pass("subids", format!("{user} has /etc/subuid and /etc/subgid ranges"))
    } else {
        Check::fail(
            "subids",
            format!("{user} has no range in /etc/subuid or /etc/subgid: rootless Podman cannot map image users"),
            format!("usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user} (or `podfleet host prepare`)"),
        )
    });
    checks.push(match free_kib.parse::<u64>() {
        Ok(kib) if kib / (1024 * 1024) >= args.min_free_gib => Check::pass(
            "disk",
            format!("{} GiB free under the user's home", kib / (1024 * 1024)),
        ),
        Ok(kib) => Check::fail(
            "disk",
            format!(
                "{} GiB free under the user's home, below {} GiB: image pulls will fail",
                kib / (1024 * 1024),
                args.min_free_gib
            ),
            "grow the disk (the report resizes /home), or prune images with `podman system prune -a`",
        ),
        Err(_) => Check::fail(
            "disk",
            format!("cannot read free space ({free_kib:?})"),
            "make sure `df` exists on the instance",
        ),
    });
    checks
}

async fn image_cache(url: &str) -> Check {
    let probe = format!("{}/v2/", url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build();
    let answer = match client {
        Ok(client) => client.get(&probe).send().await,
        Err(e) => return Check::fail("image cache", e.to_string(), "check the URL"),
    };
    match answer {
        // 401 is a registry that wants credentials: it is there.
        Ok(response) if matches!(response.status().as_u16(), 200 | 401) => {
            Check::pass("image cache", format!("{probe} answers"))
        }
        Ok(response) => Check::fail(
            "image cache",
            format!("{probe} answered {}", response.status()),
            "point --image-cache at the registry's base URL (the cache serves /v2/)",
        ),
        Err(e) => Check::fail(
            "image cache",
            format!("{probe}: {e}"),
            "start the cache (`podfleet cache serve`) or correct its address",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> DoctorArgs {
        DoctorArgs {
            config: PathBuf::new(),
            probe_instance: false,
            min_free_gib: 5,
            min_nofile: 8192,
            image_cache: None,
        }
    }

    fn verdicts(checks: &[Check]) -> Vec<(&str, bool)> {
        checks
            .iter()
            .map(|c| (c.name.as_str(), c.verdict == Verdict::Pass))
            .collect()
    }

    #[test]
    fn host_facts_pass_and_fail_with_fixes() {
        let good = evaluate_host("ci", "20000", "1", "1", "20971520", &args());
        assert_eq!(
            verdicts(&good),
            vec![("ulimits", true), ("subids", true), ("disk", true)]
        );
        let bad = evaluate_host("ci", "1024", "0", "1", "1048576", &args());
        assert_eq!(
            verdicts(&bad),
            vec![("ulimits", false), ("subids", false), ("disk", false)]
        );
        assert!(bad.iter().all(|c| c.fix.is_some()));
        assert!(
            bad[1]
                .fix
                .as_deref()
                .unwrap()
                .contains("usermod --add-subuids")
        );
    }

    #[test]
    fn rootful_engines_and_cgroup_v1_with_crun_fail() {
        let seccomp = ["name=seccomp,profile=default".to_string()];
        let rootless = ["name=seccomp".to_string(), "name=rootless".to_string()];
        assert!(rootless_check(None, &rootless).verdict == Verdict::Pass);
        assert!(rootless_check(None, &seccomp).verdict == Verdict::Fail);
        // Podman's own word wins over the Docker-compatible options.
        assert!(rootless_check(Some(true), &seccomp).verdict == Verdict::Pass);
        assert!(rootless_check(Some(false), &rootless).verdict == Verdict::Fail);
        assert!(cgroup_check(Some("2"), Some("crun")).verdict == Verdict::Pass);
        assert!(cgroup_check(Some("1"), Some("runc")).verdict == Verdict::Pass);
        assert!(cgroup_check(Some("1"), Some("crun")).verdict == Verdict::Fail);
    }
}
