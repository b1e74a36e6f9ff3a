//! The packages an executor needs, through the distribution's package manager.
//!
//! The Docker-compatible CLI for `docker system dial-stdio` is `podman-docker` (Debian,
//! Ubuntu and the RHEL family all ship it under that name): a `docker` command that runs
//! `podman`, whose `system dial-stdio` bridges stdin/stdout to the user's API socket. The
//! alternative, Docker's own CLI (`docker.io`/`docker-ce-cli`), brings the Docker daemon
//! (a root service) along on Debian, which an executor meant to be rootless should not run.
//! A `docker` command that already exists is left alone.

use async_trait::async_trait;
use tokio::process::Command;

use super::distro::{MIN_PODMAN, Version};
use super::{Context, Family, Step, StepError};

pub(crate) struct Packages;

fn wanted(context: &Context) -> Vec<&'static str> {
    let mut names = match context.family {
        Family::Debian => vec![
            "podman",
            "uidmap",
            "slirp4netns",
            "fuse-overlayfs",
            "openssh-server",
        ],
        Family::RedHat => vec![
            "podman",
            "shadow-utils",
            "slirp4netns",
            "fuse-overlayfs",
            "openssh-server",
        ],
    };
    if super::podman::needs_runc() {
        names.push("runc");
    }
    if !command_exists("docker") {
        names.push("podman-docker");
    }
    names
}

/// Whether an executable of that name is on the system `PATH` a login gets.
fn command_exists(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    crate::USER_PATH.split(':').any(|dir| {
        std::fs::metadata(std::path::Path::new(dir).join(name))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Debian 12's Podman (4.3) networks through CNI, whose `dnsname` plugin makes services
/// reachable by their aliases on a job's network.
const CNI_DNS: &str = "golang-github-containernetworking-plugin-dnsname";

/// The name server of per-job networks for the network stack Podman uses (or will use):
/// `aardvark-dns` beside netavark, else CNI's `dnsname` where the distribution has it.
async fn dns_package(family: Family) -> Option<&'static str> {
    match family {
        Family::RedHat => Some("aardvark-dns"),
        Family::Debian if installed(family, "netavark").await => Some("aardvark-dns"),
        Family::Debian => candidate_version(family, CNI_DNS).await.map(|_| CNI_DNS),
    }
}

/// Every wanted package that is not installed.
async fn missing(context: &Context) -> Vec<&'static str> {
    let mut wanted = wanted(context);
    wanted.extend(dns_package(context.family).await);
    let mut missing = Vec::new();
    for package in wanted {
        if !installed(context.family, package).await {
            missing.push(package);
        }
    }
    missing
}

async fn installed(family: Family, package: &str) -> bool {
    match family {
        Family::Debian => crate::run("dpkg-query", &["-W", "-f=${Status}", package])
            .await
            .is_ok_and(|status| status.contains("install ok installed")),
        Family::RedHat => crate::run("rpm", &["-q", "--quiet", package]).await.is_ok(),
    }
}

/// The version the package manager would install, from its current package lists.
pub(crate) async fn candidate_version(family: Family, package: &str) -> Option<Version> {
    match family {
        Family::Debian => {
            let policy = crate::run("apt-cache", &["policy", package]).await.ok()?;
            let line = policy
                .lines()
                .find(|l| l.trim_start().starts_with("Candidate:"))?;
            Version::find_in(line.trim_start().trim_start_matches("Candidate:"))
        }
        Family::RedHat => {
            let out = crate::run(
                "dnf",
                &[
                    "-q",
                    "repoquery",
                    "--latest-limit",
                    "1",
                    "--qf",
                    "%{version}",
                    package,
                ],
            )
            .await
            .ok()?;
            Version::find_in(&out)
        }
    }
}

#[async_trait]
impl Step for Packages {
    fn description(&self, _: &Context) -> String {
        "packages (Podman >= 4.0, subordinate id tools, slirp4netns, fuse-overlayfs, \
         DNS for job networks, OpenSSH server, a docker CLI)"
            .into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        let missing = missing(context).await;
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let tool = match context.family {
            Family::Debian => "apt-get",
            Family::RedHat => "dnf",
        };
        Ok(vec![format!("install {} with {tool}", missing.join(" "))])
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        let fix_network = "check that the package repositories are reachable and the \
                           package manager is not locked by another run, then run again";
        match context.family {
            Family::Debian => {
                let mut update = Command::new("apt-get");
                update.args(["update", "-q"]);
                crate::run_command(update, "apt-get update", None)
                    .await
                    .map_err(|e| StepError::host(e, fix_network))?;
            }
            Family::RedHat => {}
        }
        // After the update: the lists now say which name server package exists.
        let missing = missing(context).await;
        if missing.contains(&"podman") {
            // The lists may only now know Podman (a fresh image has none before `update`).
            if let Some(found) = candidate_version(context.family, "podman").await
                && found < MIN_PODMAN
            {
                return Err(StepError::new(
                    format!("the package manager offers Podman {found}, older than {MIN_PODMAN}"),
                    "enable a repository with a newer Podman (backports, a newer release) \
                     and run again",
                ));
            }
        }
        let (program, mut args) = match context.family {
            Family::Debian => (
                "apt-get",
                vec!["install", "-y", "-q", "--no-install-recommends"],
            ),
            Family::RedHat => ("dnf", vec!["install", "-y", "-q"]),
        };
        args.extend(&missing);
        let mut install = Command::new(program);
        install.args(&args).env("DEBIAN_FRONTEND", "noninteractive");
        crate::run_command(install, &format!("{program} {}", args.join(" ")), None)
            .await
            .map_err(|e| StepError::host(e, fix_network))?;
        Ok(())
    }
}
