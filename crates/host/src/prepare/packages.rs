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
         OpenSSH server, a docker CLI)"
            .into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        let mut missing = Vec::new();
        for package in wanted(context) {
            if !installed(context.family, package).await {
                missing.push(package);
            }
        }
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
        let mut missing = Vec::new();
        for package in wanted(context) {
            if !installed(context.family, package).await {
                missing.push(package);
            }
        }
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
