//! Which hosts `host prepare` supports, decided from facts gathered before any change:
//! the effective user, `/etc/os-release` and the Podman version (installed or offered).

use std::fmt;

/// The package manager family of a supported distribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Debian, Ubuntu and derivatives: apt and dpkg.
    Debian,
    /// RHEL, CentOS Stream, Rocky, AlmaLinux, Oracle Linux, Fedora: dnf and rpm.
    RedHat,
}

/// Distributions `host prepare` knows how to install packages on, for error messages.
pub const SUPPORTED: &str = "Debian, Ubuntu (apt); RHEL, CentOS Stream, Rocky Linux, \
                             AlmaLinux, Oracle Linux, Fedora (dnf)";

/// The oldest Podman with what podfleet relies on (the Docker-compatible API service,
/// `system dial-stdio`, rootless networks).
pub const MIN_PODMAN: Version = Version(4, 0, 0);

/// The fields of `/etc/os-release` that decide support.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OsRelease {
    pub id: String,
    pub id_like: Vec<String>,
    pub pretty_name: String,
}

impl OsRelease {
    /// Parses os-release(5) text: `KEY=value` lines, values optionally quoted.
    pub fn parse(text: &str) -> Self {
        let mut release = OsRelease::default();
        for line in text.lines() {
            let Some((key, value)) = line.trim().split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
            match key {
                "ID" => release.id = value.to_ascii_lowercase(),
                "ID_LIKE" => {
                    release.id_like = value
                        .split_whitespace()
                        .map(str::to_ascii_lowercase)
                        .collect()
                }
                "PRETTY_NAME" => release.pretty_name = value.to_string(),
                _ => {}
            }
        }
        release
    }

    pub fn family(&self) -> Option<Family> {
        let ids = std::iter::once(&self.id).chain(&self.id_like);
        for id in ids {
            match id.as_str() {
                "debian" | "ubuntu" => return Some(Family::Debian),
                "rhel" | "centos" | "fedora" | "rocky" | "almalinux" | "ol" => {
                    return Some(Family::RedHat);
                }
                _ => {}
            }
        }
        None
    }

    fn name(&self) -> &str {
        if self.pretty_name.is_empty() {
            &self.id
        } else {
            &self.pretty_name
        }
    }
}

/// A `major.minor.patch` version, enough to compare Podman releases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// The first `N.N[.N]` in `text`: `podman version 4.3.1`, `1:4.3.1+ds1-8`, `5.2.2-9.el9`.
    pub fn find_in(text: &str) -> Option<Version> {
        for word in text.split_whitespace() {
            // A Debian epoch ("1:") is not part of the upstream version.
            let word = word.rsplit_once(':').map_or(word, |(_, rest)| rest);
            let numbers: Vec<u32> = word
                .split(|c: char| !c.is_ascii_digit() && c != '.')
                .next()
                .unwrap_or("")
                .split('.')
                .map_while(|part| part.parse().ok())
                .collect();
            if numbers.len() >= 2 {
                return Some(Version(
                    numbers[0],
                    numbers[1],
                    numbers.get(2).copied().unwrap_or(0),
                ));
            }
        }
        None
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// What preflight looks at; gathered without changing anything.
#[derive(Clone, Debug)]
pub struct HostFacts {
    pub effective_uid: u32,
    /// The os-release text, or `None` when the file is missing.
    pub os_release: Option<String>,
    /// `podman --version` when Podman is installed.
    pub podman_installed: Option<Version>,
    /// The version the package manager would install, when Podman is not installed and
    /// the package lists know one.
    pub podman_candidate: Option<Version>,
}

/// Why `host prepare` refuses a host before changing anything.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "host prepare must run as root (it installs packages and creates users); \
         run it with sudo or as root"
    )]
    NotRoot,
    #[error("cannot tell the distribution: /etc/os-release is missing; supported: {SUPPORTED}")]
    NoOsRelease,
    #[error("unsupported distribution {name:?} (ID={id}); supported: {SUPPORTED}")]
    UnsupportedDistribution { name: String, id: String },
    #[error(
        "Podman {found} is installed but podfleet needs Podman >= {MIN_PODMAN}; upgrade it \
         (for example from the distribution's backports or a newer release) and run again"
    )]
    PodmanTooOld { found: Version },
    #[error(
        "the package manager offers Podman {found} but podfleet needs Podman >= {MIN_PODMAN}; \
         enable a repository with a newer Podman (backports, a newer release) and run again"
    )]
    PodmanCandidateTooOld { found: Version },
}

/// Decides whether this host can be prepared. Pure: the caller gathers the facts.
pub fn preflight(facts: &HostFacts) -> Result<Family, PreflightError> {
    if facts.effective_uid != 0 {
        return Err(PreflightError::NotRoot);
    }
    let release = OsRelease::parse(
        facts
            .os_release
            .as_deref()
            .ok_or(PreflightError::NoOsRelease)?,
    );
    let family = release
        .family()
        .ok_or_else(|| PreflightError::UnsupportedDistribution {
            name: release.name().to_string(),
            id: release.id.clone(),
        })?;
    match (facts.podman_installed, facts.podman_candidate) {
        (Some(found), _) if found < MIN_PODMAN => Err(PreflightError::PodmanTooOld { found }),
        (None, Some(found)) if found < MIN_PODMAN => {
            Err(PreflightError::PodmanCandidateTooOld { found })
        }
        _ => Ok(family),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_12: &str = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
                             VERSION_ID=\"12\"\nID=debian\n";
    const ROCKY_9: &str = "NAME=\"Rocky Linux\"\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n\
                           PRETTY_NAME=\"Rocky Linux 9.4 (Blue Onyx)\"\n";
    const UBUNTU: &str =
        "NAME=\"Ubuntu\"\nID=ubuntu\nID_LIKE=debian\nPRETTY_NAME=\"Ubuntu 24.04 LTS\"\n";
    const ALPINE: &str = "NAME=\"Alpine Linux\"\nID=alpine\nPRETTY_NAME=\"Alpine Linux v3.20\"\n";

    fn facts(os: &str) -> HostFacts {
        HostFacts {
            effective_uid: 0,
            os_release: Some(os.to_string()),
            podman_installed: Some(Version(4, 3, 1)),
            podman_candidate: None,
        }
    }

    #[test]
    fn supported_families_are_recognised() {
        assert_eq!(preflight(&facts(DEBIAN_12)), Ok(Family::Debian));
        assert_eq!(preflight(&facts(UBUNTU)), Ok(Family::Debian));
        assert_eq!(preflight(&facts(ROCKY_9)), Ok(Family::RedHat));
        let derivative = "ID=linuxmint\nID_LIKE=\"ubuntu debian\"\n";
        assert_eq!(preflight(&facts(derivative)), Ok(Family::Debian));
    }

    #[test]
    fn an_unsupported_distribution_is_named_with_the_supported_ones() {
        let error = preflight(&facts(ALPINE)).unwrap_err();
        assert_eq!(
            error,
            PreflightError::UnsupportedDistribution {
                name: "Alpine Linux v3.20".into(),
                id: "alpine".into()
            }
        );
        let message = error.to_string();
        assert!(message.contains("Alpine Linux v3.20"), "{message}");
        assert!(
            message.contains("Debian") && message.contains("Rocky"),
            "{message}"
        );
        let missing = HostFacts {
            os_release: None,
            ..facts(DEBIAN_12)
        };
        assert_eq!(preflight(&missing), Err(PreflightError::NoOsRelease));
    }

    #[test]
    fn not_root_is_refused_first() {
        let facts = HostFacts {
            effective_uid: 1000,
            ..facts(ALPINE)
        };
        assert_eq!(preflight(&facts), Err(PreflightError::NotRoot));
    }

    #[test]
    fn podman_older_than_4_is_refused_installed_or_offered() {
        let installed = HostFacts {
            podman_installed: Some(Version(3, 4, 4)),
            ..facts(UBUNTU)
        };
        assert_eq!(
            preflight(&installed),
            Err(PreflightError::PodmanTooOld {
                found: Version(3, 4, 4)
            })
        );
        let offered = HostFacts {
            podman_installed: None,
            podman_candidate: Some(Version(3, 0, 1)),
            ..facts(DEBIAN_12)
        };
        let error = preflight(&offered).unwrap_err();
        assert!(error.to_string().contains("offers Podman 3.0.1"), "{error}");
        let unknown = HostFacts {
            podman_installed: None,
            podman_candidate: None,
            ..facts(DEBIAN_12)
        };
        assert_eq!(preflight(&unknown), Ok(Family::Debian));
        let exactly_four = HostFacts {
            podman_installed: Some(Version(4, 0, 0)),
            ..facts(DEBIAN_12)
        };
        assert_eq!(preflight(&exactly_four), Ok(Family::Debian));
    }

    #[test]
    fn versions_are_found_in_tool_output() {
        assert_eq!(
            Version::find_in("podman version 4.3.1"),
            Some(Version(4, 3, 1))
        );
        assert_eq!(
            Version::find_in("  Candidate: 1:4.9.3+ds1-1ubuntu0.2"),
            Some(Version(4, 9, 3))
        );
        assert_eq!(Version::find_in("5.2.2-9.el9_5"), Some(Version(5, 2, 2)));
        assert_eq!(Version::find_in("Candidate: (none)"), None);
        assert!(Version(3, 4, 4) < MIN_PODMAN && Version(10, 0, 0) > MIN_PODMAN);
    }
}
