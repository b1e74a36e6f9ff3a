//! `--generalize`: what makes one prepared VM safe to capture as an image that many
//! instances boot from. Every instance must get its own SSH host keys (else one stolen
//! key impersonates them all) and its own machine id (else they share DHCP client ids,
//! journal ids and podfleet's `system_id`).

use std::path::PathBuf;

use async_trait::async_trait;

use super::files::{has_content, read_optional, write_file};
use super::{Context, Step, StepError};

const UNIT_NAME: &str = "podfleet-ssh-host-keys.service";
const UNIT_PATH: &str = "/etc/systemd/system/podfleet-ssh-host-keys.service";
const UNIT_LINK: &str =
    "/etc/systemd/system/multi-user.target.wants/podfleet-ssh-host-keys.service";

/// Runs before sshd on every boot; `ssh-keygen -A` creates only the keys that are
/// missing, so after the first boot it does nothing.
pub(crate) const UNIT: &str = "\
# written by podfleet host prepare --generalize
[Unit]
Description=Create the SSH host keys this instance lacks (removed for image capture)
Before=ssh.service sshd.service
After=local-fs.target

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
";

pub(crate) struct HostKeys;

impl HostKeys {
    fn keys(context: &Context) -> Result<Vec<PathBuf>, StepError> {
        let dir = context.path("/etc/ssh");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StepError::io(format!("read {}", dir.display()), e)),
        };
        let mut keys: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("ssh_host_"))
            .map(|e| e.path())
            .collect();
        keys.sort();
        Ok(keys)
    }
}

#[async_trait]
impl Step for HostKeys {
    fn description(&self, _: &Context) -> String {
        "generalize: SSH host keys regenerated on first boot".into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        let mut changes = Vec::new();
        let keys = Self::keys(context)?;
        if !keys.is_empty() {
            changes.push(format!(
                "remove {} SSH host key file(s) from {}",
                keys.len(),
                context.path("/etc/ssh").display()
            ));
        }
        if !has_content(&context.path(UNIT_PATH), UNIT)? {
            changes.push(format!("write {UNIT_NAME} (ssh-keygen -A before sshd)"));
        }
        if context.path(UNIT_LINK).symlink_metadata().is_err() {
            changes.push(format!("enable {UNIT_NAME} in multi-user.target"));
        }
        Ok(changes)
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        write_file(&context.path(UNIT_PATH), UNIT, 0o644, None)?;
        let link = context.path(UNIT_LINK);
        if link.symlink_metadata().is_err() {
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| StepError::io(format!("create {}", parent.display()), e))?;
            }
            // The link systemctl enable makes: to the unit's path on the running system.
            std::os::unix::fs::symlink(UNIT_PATH, &link)
                .map_err(|e| StepError::io(format!("link {}", link.display()), e))?;
        }
        for key in Self::keys(context)? {
            std::fs::remove_file(&key)
                .map_err(|e| StepError::io(format!("remove {}", key.display()), e))?;
        }
        Ok(())
    }
}

pub(crate) struct MachineId;

impl MachineId {
    /// D-Bus keeps its own copy where it is not a link to /etc/machine-id.
    fn dbus_copy(context: &Context) -> Option<PathBuf> {
        let path = context.path("/var/lib/dbus/machine-id");
        path.symlink_metadata()
            .is_ok_and(|m| m.file_type().is_file())
            .then_some(path)
    }
}

#[async_trait]
impl Step for MachineId {
    fn description(&self, _: &Context) -> String {
        "generalize: machine id reset (a new one on first boot)".into()
    }

    async fn check(&self, context: &Context) -> Result<Vec<String>, StepError> {
        let path = context.path("/etc/machine-id");
        let mut changes = Vec::new();
        if read_optional(&path)?.is_some_and(|id| !id.trim().is_empty()) {
            changes.push(format!("empty {}", path.display()));
        }
        if let Some(copy) = Self::dbus_copy(context) {
            changes.push(format!("remove {}", copy.display()));
        }
        Ok(changes)
    }

    async fn apply(&self, context: &Context) -> Result<(), StepError> {
        // Empty, not absent: systemd then treats the next boot as the first and writes a
        // new id (an absent file can leave a read-only root without one).
        let path = context.path("/etc/machine-id");
        if read_optional(&path)?.is_some_and(|id| !id.trim().is_empty()) {
            write_file(&path, "", 0o444, None)?;
        }
        if let Some(copy) = Self::dbus_copy(context) {
            std::fs::remove_file(&copy)
                .map_err(|e| StepError::io(format!("remove {}", copy.display()), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Family, Outcome, PrepareOptions, run_step};
    use super::*;

    fn image_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let path = |p: &str| root.path().join(p);
        std::fs::create_dir_all(path("etc/ssh")).unwrap();
        std::fs::create_dir_all(path("var/lib/dbus")).unwrap();
        for key in [
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
            "ssh_host_rsa_key",
        ] {
            std::fs::write(path("etc/ssh").join(key), "key").unwrap();
        }
        std::fs::write(path("etc/ssh/sshd_config"), "Port 22\n").unwrap();
        std::fs::write(path("etc/machine-id"), "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::write(path("var/lib/dbus/machine-id"), "0123456789abcdef\n").unwrap();
        root
    }

    fn context(root: &std::path::Path, dry_run: bool) -> Context {
        let mut options = PrepareOptions::new("podfleet");
        options.root = root.to_path_buf();
        options.dry_run = dry_run;
        Context {
            options,
            family: Family::Debian,
            systemd_running: false,
        }
    }

    fn listing(root: &std::path::Path) -> Vec<(String, String)> {
        let mut found = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                let meta = path.symlink_metadata().unwrap();
                let name = path.strip_prefix(root).unwrap().display().to_string();
                if meta.is_dir() {
                    stack.push(path);
                } else if meta.file_type().is_symlink() {
                    found.push((
                        name,
                        format!("-> {}", std::fs::read_link(&path).unwrap().display()),
                    ));
                } else {
                    found.push((name, std::fs::read_to_string(&path).unwrap()));
                }
            }
        }
        found.sort();
        found
    }

    #[tokio::test]
    async fn generalize_resets_identity_once_and_then_changes_nothing() {
        let root = image_root();
        let context = context(root.path(), false);
        for step in [&HostKeys as &dyn Step, &MachineId] {
            let first = run_step(step, &context).await.unwrap();
            assert!(matches!(first.outcome, Outcome::Changed(_)), "{first}");
            let second = run_step(step, &context).await.unwrap();
            assert_eq!(second.outcome, Outcome::Unchanged, "{second}");
        }
        let path = |p: &str| root.path().join(p);
        let left: Vec<String> = std::fs::read_dir(path("etc/ssh"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            vec!["sshd_config".to_string()],
            "only the host keys go"
        );
        assert_eq!(std::fs::read_to_string(path("etc/machine-id")).unwrap(), "");
        assert!(!path("var/lib/dbus/machine-id").exists());
        assert_eq!(
            std::fs::read_to_string(path(UNIT_PATH.trim_start_matches('/'))).unwrap(),
            UNIT
        );
        assert_eq!(
            std::fs::read_link(path(UNIT_LINK.trim_start_matches('/'))).unwrap(),
            PathBuf::from(UNIT_PATH)
        );
        assert!(UNIT.contains("Before=ssh.service sshd.service"));
        assert!(UNIT.contains("ExecStart=/usr/bin/ssh-keygen -A"));
    }

    #[tokio::test]
    async fn a_dry_run_lists_the_generalization_and_changes_nothing() {
        let root = image_root();
        let before = listing(root.path());
        let context = context(root.path(), true);
        let keys = run_step(&HostKeys, &context).await.unwrap();
        let Outcome::WouldChange(changes) = &keys.outcome else {
            panic!("a dry run on an ungeneralized root reports changes: {keys}");
        };
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert!(
            changes[0].contains("remove 3 SSH host key file(s)"),
            "{changes:?}"
        );
        let id = run_step(&MachineId, &context).await.unwrap();
        assert!(
            matches!(id.outcome, Outcome::WouldChange(ref c) if c.len() == 2),
            "{id}"
        );
        assert_eq!(listing(root.path()), before, "a dry run changes nothing");
    }
}
