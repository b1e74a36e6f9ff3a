//! Rootless Podman for the executor user: open-file limits, the host quirks in
//! containers.conf, device permissions, lingering, the API socket as a user service (or a
//! started service where systemd is not PID 1) and the registry mirror drop-in.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use async_trait::async_trait;

use super::files::{create_user_dirs, has_content, read_optional, write_file};
use super::{Context, Step, StepError};
use crate::{Account, podman_socket};

/// The open-file limit asked for; the host's hard limit caps it.
const WANTED_NOFILE: u64 = 1_048_576;
/// The per-container default where the host's hard limit is low (as scripts/setup-host.sh).
const CONTAINER_NOFILE: u64 = 16_384;

/// crun refuses cgroup v1 and hybrid hierarchies; runc works on them.
pub(crate) fn needs_runc() -> bool {
    Path::new("/sys/fs/cgroup/unified").is_dir()
        || !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// The hard `RLIMIT_NOFILE` this process (root) has: the most the host allows.
pub(crate) fn hard_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we own and pass by valid pointer.
    let status = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if status != 0 || limit.rlim_max == libc::RLIM_INFINITY {
        return WANTED_NOFILE;
    }
    limit.rlim_max
}

pub(crate) struct OpenFileLimit;

fn limits_path(context: &Context) -> PathBuf {
    context.path(format!(
        "/etc/security/limits.d/90-podfleet-{}.conf",
        context.options.user
    ))
}

pub(crate) fn limits_text(user: &str, hard: u64) -> String {
    let nofile = WANTED_NOFILE.min(hard);
    format!(
        "# written by podfleet host prepare: open files of the executor user \
         ({WANTED_NOFILE} wanted, capped at the host's hard limit {hard})\n\
         {user} soft nofile {nofile}\n\
         {user} hard nofile {nofile}\n"
    )
}

#[async_trait]
impl Step for OpenFileLimit {
    fn description(&self, _: &Context) -> String {
        "open-file limit (limits.d)".into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        let path = limits_path(context);
        let text = limits_text(&context.options.user, hard_nofile());
        Ok(if has_content(&path, &text)? {
            Vec::new()
        } else {
            vec![format!(
                "write {} (nofile {})",
                path.display(),
                WANTED_NOFILE.min(hard_nofile())
            )]
        })
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        let text = limits_text(&context.options.user, hard_nofile());
        write_file(&limits_path(context), &text, 0o644, None)
    }
}

/// What containers.conf must say on this host; `None` where the default is right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Quirks {
    pub runtime: Option<&'static str>,
    pub nofile: Option<u64>,
}

impl Quirks {
    fn detect() -> Self {
        let hard = hard_nofile();
        Quirks {
            runtime: needs_runc().then_some("runc"),
            nofile: (hard < WANTED_NOFILE).then(|| hard.min(CONTAINER_NOFILE)),
        }
    }
}

/// The changes `containers.conf` text needs for `quirks`, and the text with them made.
pub(crate) fn containers_conf(
    text: &str,
    quirks: &Quirks,
) -> Result<(Vec<String>, String), String> {
    use toml_edit::{Array, DocumentMut, Item, Table, Value};
    let mut document: DocumentMut = text.parse().map_err(|e| format!("{e}"))?;
    let mut changes = Vec::new();
    if let Some(runtime) = quirks.runtime {
        let current = document
            .get("engine")
            .and_then(|e| e.get("runtime"))
            .and_then(|r| r.as_str());
        if current != Some(runtime) {
            changes.push(format!(
                "[engine] runtime = {runtime:?} (crun refuses this host's hybrid cgroups)"
            ));
            let engine = document
                .entry("engine")
                .or_insert_with(|| Item::Table(Table::new()));
            engine["runtime"] = toml_edit::value(runtime);
        }
    }
    if let Some(nofile) = quirks.nofile {
        let current: Vec<String> = document
            .get("containers")
            .and_then(|c| c.get("default_ulimits"))
            .and_then(|u| u.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let within = |entry: &String, name: &str, max: u64| {
            entry.strip_prefix(name).is_some_and(|limits| {
                limits
                    .split(':')
                    .all(|n| n.parse::<u64>().is_ok_and(|n| n <= max))
            })
        };
        let hard = hard_nofile();
        let nofile_ok = current.iter().any(|e| within(e, "nofile=", hard));
        let nproc_ok = current.iter().any(|e| e.starts_with("nproc="));
        if !(nofile_ok && nproc_ok) {
            changes.push(format!(
                "[containers] default_ulimits nofile={nofile}:{nofile} (the host's hard \
                 limit {hard} is below what Podman asks for by default)"
            ));
            let mut entries: Array = current
                .iter()
                .filter(|e| !e.starts_with("nofile=") && !e.starts_with("nproc="))
                .map(|e| Value::from(e.as_str()))
                .collect();
            entries.push(format!("nofile={nofile}:{nofile}"));
            entries.push(format!("nproc={CONTAINER_NOFILE}:{CONTAINER_NOFILE}"));
            let containers = document
                .entry("containers")
                .or_insert_with(|| Item::Table(Table::new()));
            containers["default_ulimits"] = toml_edit::value(entries);
        }
    }
    let mut updated = document.to_string();
    if text.trim().is_empty() && !changes.is_empty() {
        updated = format!("# written by podfleet host prepare: host quirks detected\n{updated}");
    }
    Ok((changes, updated))
}

pub(crate) struct ContainersConf;

impl ContainersConf {
    fn plan(context: &Context) -> Result<(PathBuf, Vec<String>, String), StepError> {
        let path = context.path("/etc/containers/containers.conf");
        let text = read_optional(&path)?.unwrap_or_default();
        let (changes, updated) = containers_conf(&text, &Quirks::detect()).map_err(|e| {
            StepError::new(
                format!("{} is not valid TOML: {e}", path.display()),
                "fix or remove the file and run again",
            )
        })?;
        let changes = changes
            .into_iter()
            .map(|c| format!("{}: {c}", path.display()))
            .collect();
        Ok((path, changes, updated))
    }
}

#[async_trait]
impl Step for ContainersConf {
    fn description(&self, _: &Context) -> String {
        "containers.conf host quirks (runtime, default ulimits)".into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        Ok(Self::plan(context)?.1)
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        let (path, _, updated) = Self::plan(context)?;
        write_file(&path, &updated, 0o644, None)
    }
}

/// Devices rootless Podman opens as the user: slirp4netns needs the TUN device and
/// fuse-overlayfs needs FUSE; both are 0666 on an ordinary host.
const DEVICES: [(&str, &str); 2] = [("/dev/net/tun", "tun"), ("/dev/fuse", "fuse")];
const UDEV_RULE: &str = "/etc/udev/rules.d/70-podfleet-rootless.rules";

pub(crate) struct DevicePermissions;

impl DevicePermissions {
    fn restrictive(context: &Context) -> Vec<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        DEVICES
            .iter()
            .map(|(device, _)| context.path(device))
            .filter(|path| {
                std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o777 != 0o666)
            })
            .collect()
    }
}

#[async_trait]
impl Step for DevicePermissions {
    fn description(&self, _: &Context) -> String {
        "device permissions for rootless networking and storage".into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        Ok(Self::restrictive(context)
            .iter()
            .map(|p| format!("chmod 0666 {} (persisted in {UDEV_RULE})", p.display()))
            .collect())
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        let rules: String = DEVICES
            .iter()
            .map(|(_, kernel)| format!("KERNEL==\"{kernel}\", MODE=\"0666\"\n"))
            .collect();
        write_file(
            &context.path(UDEV_RULE),
            &format!(
                "# written by podfleet host prepare: rootless Podman opens these as the user\n{rules}"
            ),
            0o644,
            None,
        )?;
        for path in Self::restrictive(context) {
            crate::set_mode(&path, 0o666)
                .map_err(|e| StepError::io(format!("chmod 0666 {}", path.display()), e))?;
        }
        Ok(())
    }
}

pub(crate) struct Linger;

#[async_trait]
impl Step for Linger {
    fn description(&self, _: &Context) -> String {
        "lingering (user services run without a login)".into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        let path = context.path(format!("/var/lib/systemd/linger/{}", context.options.user));
        Ok(if path.exists() {
            Vec::new()
        } else {
            vec![format!(
                "create {} (as loginctl enable-linger)",
                path.display()
            )]
        })
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        let user = &context.options.user;
        if context.systemd_running {
            // logind also starts the user's manager now, not only at the next boot.
            crate::run("loginctl", &["enable-linger", user])
                .await
                .map_err(|e| StepError::host(e, "check that systemd-logind runs"))?;
            return Ok(());
        }
        write_file(
            &context.path(format!("/var/lib/systemd/linger/{user}")),
            "",
            0o644,
            None,
        )
    }
}

const SOCKET_UNITS: [&str; 3] = [
    "/usr/lib/systemd/user/podman.socket",
    "/lib/systemd/user/podman.socket",
    "/etc/systemd/user/podman.socket",
];
const WANTS: &str = ".config/systemd/user/sockets.target.wants";

pub(crate) struct SocketUnit;

impl SocketUnit {
    fn unit(context: &Context) -> Option<&'static str> {
        SOCKET_UNITS
            .into_iter()
            .find(|unit| context.path(unit).exists())
    }

    fn enabled(context: &Context, account: &Account) -> bool {
        let global = context.path("/etc/systemd/user/sockets.target.wants/podman.socket");
        let own = context.path(account.home.join(WANTS).join("podman.socket"));
        global.exists() || own.symlink_metadata().is_ok()
    }

    fn user_manager_runs(account: &Account) -> bool {
        crate::runtime_dir(account.uid)
            .join("systemd/private")
            .exists()
    }
}

#[async_trait]
impl Step for SocketUnit {
    fn description(&self, _: &Context) -> String {
        "podman.socket user service enabled".into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        let change = vec![format!(
            "enable podman.socket for {} (a sockets.target.wants link)",
            context.options.user
        )];
        let Some(account) = context.account()? else {
            return Ok(change);
        };
        Ok(if Self::enabled(context, &account) {
            Vec::new()
        } else {
            change
        })
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        let account = context.existing_account()?;
        let unit = Self::unit(context).ok_or_else(|| {
            StepError::new(
                format!("no podman.socket unit in {}", SOCKET_UNITS.join(", ")),
                "install the podman package (its user units ship podman.socket)",
            )
        })?;
        if context.systemd_running && Self::user_manager_runs(&account) {
            let manager = format!("{}@", account.name);
            crate::run(
                "systemctl",
                &["--user", "-M", &manager, "enable", "podman.socket"],
            )
            .await
            .map_err(|e| {
                StepError::host(
                    e,
                    "check the user's manager: systemctl --user -M USER@ status",
                )
            })?;
            return Ok(());
        }
        // No user manager runs: create the link `systemctl --user enable` would create.
        create_user_dirs(&account, WANTS, 0o755)?;
        let link = context.path(account.home.join(WANTS).join("podman.socket"));
        let made = std::os::unix::fs::symlink(unit, &link)
            .and_then(|()| std::os::unix::fs::lchown(&link, Some(account.uid), Some(account.gid)));
        made.map_err(|e| StepError::io(format!("link {}", link.display()), e))
    }
}

pub(crate) struct ApiService;

impl ApiService {
    async fn answers(account: &Account) -> Result<(), String> {
        crate::ping_docker_api(&podman_socket(account.uid)).await
    }
}

#[async_trait]
impl Step for ApiService {
    fn description(&self, _: &Context) -> String {
        "rootless Podman API answering on the user's socket".into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        let how = if context.systemd_running {
            "start podman.socket in the user's manager"
        } else {
            "start `podman system service` as the user, as systemd is not PID 1 here"
        };
        let Some(account) = context.account()? else {
            return Ok(vec![how.to_string()]);
        };
        Ok(match Self::answers(&account).await {
            Ok(()) => Vec::new(),
            Err(why) => vec![format!("{how} (not answering now: {why})")],
        })
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        let account = context.existing_account()?;
        if context.systemd_running {
            let manager = format!("{}@", account.name);
            crate::run(
                "systemctl",
                &["--user", "-M", &manager, "start", "podman.socket"],
            )
            .await
            .map_err(|e| {
                StepError::host(
                    e,
                    format!(
                        "check lingering (loginctl show-user {}) and the socket unit \
                         (systemctl --user -M {}@ status podman.socket)",
                        account.name, account.name
                    ),
                )
            })?;
        } else {
            crate::ensure_runtime_dir(&account)
                .map_err(|e| StepError::host(e, "check that /run is writable"))?;
            create_user_dirs(&account, ".local/state/podfleet", 0o755)?;
            let log = account
                .home
                .join(".local/state/podfleet/podman-service.log");
            crate::start_podman_service(&account, &log)
                .await
                .map_err(|e| {
                    StepError::host(
                        e,
                        format!(
                            "read {} and try `podman info` as {}",
                            log.display(),
                            account.name
                        ),
                    )
                })?;
            let _ = std::os::unix::fs::chown(&log, Some(account.uid), Some(account.gid));
        }
        // Socket activation starts Podman on the first connection: the ping in the next
        // check proves the API answers, not only that a socket exists.
        Self::answers(&account)
            .await
            .map_err(|why| StepError::new(why, format!("try `podman info` as {}", account.name)))
    }
}

/// `--registry-mirror HOST:PORT[/PREFIX]`: where Docker Hub images are pulled through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryMirror {
    host: String,
    port: u16,
    prefix: Option<String>,
}

impl FromStr for RegistryMirror {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("registry mirror {text:?}: {why} (expected HOST:PORT or HOST:PORT/PREFIX)")
        };
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix.trim_end_matches('/'))),
            None => (text, None),
        };
        let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if !host_ok {
            return Err(bad("the host must be a name or an IPv4 address"));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("the port must be 1-65535"))?;
        if let Some(prefix) = prefix {
            let prefix_ok = !prefix.is_empty()
                && prefix.split('/').all(|part| {
                    !part.is_empty()
                        && part
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                });
            if !prefix_ok {
                return Err(bad(
                    "the prefix must be path segments of letters, digits, '.', '_', '-'",
                ));
            }
        }
        Ok(RegistryMirror {
            host: host.to_string(),
            port,
            prefix: prefix.map(str::to_string),
        })
    }
}

impl fmt::Display for RegistryMirror {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)?;
        if let Some(prefix) = &self.prefix {
            write!(f, "/{prefix}")?;
        }
        Ok(())
    }
}

const MIRROR_DROP_IN: &str = "/etc/containers/registries.conf.d/50-podfleet-mirror.conf";

pub(crate) fn mirror_drop_in(mirror: &RegistryMirror) -> String {
    format!(
        "# written by podfleet host prepare --registry-mirror: Docker Hub images are pulled\n\
         # through this mirror first (plain HTTP inside the private network), then directly\n\
         [[registry]]\n\
         prefix = \"docker.io\"\n\
         location = \"docker.io\"\n\
         \n\
         [[registry.mirror]]\n\
         location = \"{mirror}\"\n\
         insecure = true\n"
    )
}

pub(crate) struct MirrorDropIn(pub RegistryMirror);

#[async_trait]
impl Step for MirrorDropIn {
    fn description(&self, _: &Context) -> String {
        format!("registry mirror {}", self.0)
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        let path = context.path(MIRROR_DROP_IN);
        Ok(if has_content(&path, &mirror_drop_in(&self.0))? {
            Vec::new()
        } else {
            vec![format!("write {}", path.display())]
        })
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        write_file(
            &context.path(MIRROR_DROP_IN),
            &mirror_drop_in(&self.0),
            0o644,
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quirks() -> Quirks {
        Quirks {
            runtime: Some("runc"),
            nofile: Some(16384),
        }
    }

    #[test]
    fn containers_conf_gets_the_quirks_and_keeps_the_rest() {
        let (changes, text) = containers_conf("", &quirks()).unwrap();
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(text.contains("runtime = \"runc\""), "{text}");
        assert!(text.contains("\"nofile=16384:16384\""), "{text}");
        let (again, unchanged) = containers_conf(&text, &quirks()).unwrap();
        assert_eq!(again, Vec::<String>::new());
        assert_eq!(unchanged, text);

        let other = "[containers]\ndefault_ulimits = [\"core=0:0\", \"nofile=1048576:1048576\"]\nlog_driver = \"k8s-file\"\n";
        let (changes, text) = containers_conf(other, &quirks()).unwrap();
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(text.contains("log_driver = \"k8s-file\""), "{text}");
        assert!(text.contains("\"core=0:0\""), "{text}");
        assert!(!text.contains("1048576"), "{text}");

        let none = Quirks {
            runtime: None,
            nofile: None,
        };
        assert_eq!(
            containers_conf(other, &none).unwrap(),
            (vec![], other.to_string())
        );
        assert!(containers_conf("[broken", &none).is_err());
    }

    #[test]
    fn the_setup_scripts_file_needs_no_change() {
        // As scripts/setup-host.sh writes it on this kind of host.
        let script = "# written by podfleet scripts/setup-host.sh: host quirks detected at setup\n\
                      [containers]\ndefault_ulimits = [\"nofile=16384:16384\", \"nproc=16384:16384\"]\n\
                      [engine]\nruntime = \"runc\"\n";
        if hard_nofile() >= 16384 {
            assert_eq!(
                containers_conf(script, &quirks()).unwrap().0,
                Vec::<String>::new()
            );
        }
    }

    #[test]
    fn limits_are_capped_at_the_hard_limit() {
        let text = limits_text("pf", 20000);
        assert!(
            text.contains("pf soft nofile 20000\npf hard nofile 20000\n"),
            "{text}"
        );
        let text = limits_text("pf", u64::MAX);
        assert!(text.contains("pf hard nofile 1048576"), "{text}");
    }

    #[test]
    fn registry_mirrors_parse_and_render() {
        let mirror: RegistryMirror = "cache.internal:5000/docker.io".parse().unwrap();
        assert_eq!(mirror.to_string(), "cache.internal:5000/docker.io");
        let text = mirror_drop_in(&mirror);
        assert!(
            text.contains("location = \"cache.internal:5000/docker.io\""),
            "{text}"
        );
        assert_eq!(
            "10.0.0.4:5000"
                .parse::<RegistryMirror>()
                .unwrap()
                .to_string(),
            "10.0.0.4:5000"
        );
        for bad in [
            "cache",
            "cache:0",
            ":5000",
            "cache:5000/",
            "cache:5000/a b",
            "ca che:1",
        ] {
            let error = bad.parse::<RegistryMirror>().unwrap_err();
            assert!(error.contains("HOST:PORT"), "{bad}: {error}");
        }
    }
}
