//! The local provider (`plugin = "local"`): instances are isolated executor identities on
//! this host, each its own unprivileged user with subordinate id ranges and its own
//! rootless Podman API service, reachable only over SSH through a podfleet-managed sshd on
//! 127.0.0.1. It behaves like a cloud scale set: state is read back from the host (users,
//! sockets, processes), so a restarted manager sees the same instances.

mod settings;
mod shared;
mod sshd;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use podfleet_host as host;
use podfleet_provider::{
    ConnectInfo, InstanceId, InstanceState, Provider, ProviderError, ProviderInfo,
    ProviderInstance, SecretString,
};
pub use settings::{InstanceCredentials, LocalSettings};
use shared::SharedStore;
use sshd::Sshd;

const READY_MARKER: &str = ".podfleet-ready";

/// useradd/userdel lock /etc/passwd and friends: serialise them across every group of the
/// process (two runners' providers included), and image archive creation with them.
static HOST_LOCK: std::sync::LazyLock<Arc<tokio::sync::Mutex<()>>> =
    std::sync::LazyLock::new(Arc::default);

pub struct LocalProvider {
    settings: LocalSettings,
    credentials: InstanceCredentials,
    /// `<state_dir>/<group name>`.
    dir: PathBuf,
    sshd: Sshd,
    /// Private key handed out when the provider generated the instances' key pair.
    generated_key: Option<SecretString>,
    in_flight: Arc<Mutex<InFlight>>,
    /// Signalled when a creation or deletion task ends (`Provider::changed`).
    changes: Arc<tokio::sync::Notify>,
    /// Serialises useradd/userdel and image archive creation.
    host_lock: Arc<tokio::sync::Mutex<()>>,
    /// The image archives instances got last, and when they were looked up.
    archives: Archives,
}

/// Image archives looked up for instances, and when (shared by creations).
type Archives = Arc<std::sync::Mutex<Option<(Instant, Vec<PathBuf>)>>>;

#[derive(Default)]
struct InFlight {
    creating: HashSet<String>,
    deleting: HashSet<String>,
    failed: Vec<(String, String)>,
}

impl LocalProvider {
    /// Prepares the group: state directory, managed sshd, and keys.
    pub async fn new(
        settings: LocalSettings,
        mut credentials: InstanceCredentials,
    ) -> Result<Self, ProviderError> {
        if unsafe_is_not_root() {
            return Err(ProviderError::Config(
                "the local provider manages users and must run as root".into(),
            ));
        }
        let dir = settings.state_dir.join(&settings.name);
        std::fs::create_dir_all(dir.join("images")).map_err(|e| {
            ProviderError::Config(format!("cannot create state dir {}: {e}", dir.display()))
        })?;
        // Instance users read image archives from here.
        for d in [&settings.state_dir, &dir, &dir.join("images")] {
            host::set_mode(d, 0o755)
                .map_err(|e| platform(format!("chmod {}: {e}", d.display())))?;
        }
        check_reachable_by_instances(&dir.join("images"))?;
        // Without a password the instances are reached by key (given or generated).
        if credentials.password.is_none() || credentials.authorized_key.is_some() {
            check_trusted_by_sshd(&dir)?;
        }
        let mut generated_key = None;
        if credentials.password.is_none() && credentials.authorized_key.is_none() {
            let key = dir.join("instance_key");
            if !key.exists() {
                let arg = key.to_string_lossy().into_owned();
                host::run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", &arg])
                    .await
                    .map_err(|e| platform(e.to_string()))?;
            }
            let private = std::fs::read_to_string(&key).map_err(|e| platform(e.to_string()))?;
            let public = std::fs::read_to_string(key.with_extension("pub"))
                .map_err(|e| platform(e.to_string()))?;
            generated_key = Some(SecretString::new(private));
            credentials.authorized_key = Some(public.trim().to_string());
        }
        let sshd = Sshd::ensure_running(&dir, settings.ssh_port, credentials.password.is_some())
            .await
            .map_err(|e| platform(format!("managed sshd: {e}")))?;
        Ok(Self {
            settings,
            credentials,
            dir,
            sshd,
            generated_key,
            in_flight: Arc::default(),
            changes: Arc::default(),
            archives: Arc::default(),
            host_lock: HOST_LOCK.clone(),
        })
    }

    /// Port of the managed sshd.
    pub fn ssh_port(&self) -> u16 {
        self.sshd.port
    }

    fn marker_comment(&self) -> String {
        format!("podfleet-instance group={}", self.settings.name)
    }

    fn own_accounts(&self) -> Result<Vec<host::Account>, ProviderError> {
        let marker = self.marker_comment();
        Ok(host::accounts()
            .map_err(|e| platform(format!("read /etc/passwd: {e}")))?
            .into_iter()
            .filter(|a| a.comment == marker)
            .collect())
    }

    fn new_user_name(&self) -> String {
        let group: String = self
            .settings
            .name
            .to_ascii_lowercase()
            .chars()
            .take(20)
            .collect();
        let suffix: [u8; 3] = rand::random();
        format!("pf-{}-{}", group.replace('_', "-"), hex::encode(suffix))
    }

    /// Stops the managed sshd when no instance is left, so a drained group leaves nothing
    /// running on the host.
    pub async fn stop_sshd_if_empty(&self) -> Result<bool, ProviderError> {
        if self.own_accounts()?.is_empty() {
            self.sshd.stop().await;
            return Ok(true);
        }
        Ok(false)
    }

    fn creation(&self) -> Creation {
        Creation {
            settings: self.settings.clone(),
            credentials: self.credentials.clone(),
            dir: self.dir.clone(),
            comment: self.marker_comment(),
            host_lock: self.host_lock.clone(),
            archives: self.archives.clone(),
        }
    }
}

fn unsafe_is_not_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() != 0 }
}

fn platform(message: String) -> ProviderError {
    ProviderError::Platform(message)
}

/// sshd (StrictModes) ignores an `AuthorizedKeysFile` when a directory above it may be
/// written by anyone but root (e.g. one below /tmp): every key would be refused, with a
/// line in sshd's log as the only hint. Refuse such a state dir up front instead.
fn check_trusted_by_sshd(dir: &Path) -> Result<(), ProviderError> {
    use std::os::unix::fs::MetadataExt;
    match first_ancestor(dir, |meta| meta.uid() != 0 || meta.mode() & 0o022 != 0)? {
        Some((ancestor, _)) => Err(ProviderError::Config(format!(
            "state_dir {}: sshd refuses authorized keys below {}, which is not owned by \
             root or is writable by others; choose a state_dir whose parents only root \
             can write (the default is /var/lib/podfleet/local)",
            dir.display(),
            ancestor.display()
        ))),
        None => Ok(()),
    }
}

/// The first of `dir` and its ancestors (resolved) whose metadata matches.
fn first_ancestor(
    dir: &Path,
    matches: impl Fn(&std::fs::Metadata) -> bool,
) -> Result<Option<(PathBuf, std::fs::Metadata)>, ProviderError> {
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| platform(format!("resolve state dir {}: {e}", dir.display())))?;
    for ancestor in dir.ancestors() {
        let meta = std::fs::metadata(ancestor)
            .map_err(|e| platform(format!("stat {}: {e}", ancestor.display())))?;
        if matches(&meta) {
            return Ok(Some((ancestor.to_path_buf(), meta)));
        }
    }
    Ok(None)
}

/// Instance users load image archives from `<state>/<group>/images`: every directory above
/// it must let others through, or each creation fails with "permission denied".
fn check_reachable_by_instances(dir: &Path) -> Result<(), ProviderError> {
    use std::os::unix::fs::MetadataExt;
    match first_ancestor(dir, |meta| meta.mode() & 0o001 == 0)? {
        Some((ancestor, meta)) => Err(ProviderError::Config(format!(
            "state_dir: instance users cannot reach {} because {} is not searchable by \
             others (mode {:o}); chmod o+x it or choose another state_dir",
            dir.display(),
            ancestor.display(),
            meta.mode() & 0o7777
        ))),
        None => Ok(()),
    }
}

/// Everything a creation task needs, detached from the provider's lifetime.
struct Creation {
    settings: LocalSettings,
    credentials: InstanceCredentials,
    dir: PathBuf,
    comment: String,
    host_lock: Arc<tokio::sync::Mutex<()>>,
    archives: Archives,
}

/// How long the image archives looked up for one instance serve the next ones: a burst of
/// creations asks root's Podman once, and an image rebuilt on the host reaches instances
/// created this much later.
const ARCHIVES_FRESH: std::time::Duration = std::time::Duration::from_secs(30);

impl Creation {
    async fn create(&self, user: &str) -> Result<(), String> {
        let started = Instant::now();
        {
            let _guard = self.host_lock.lock().await;
            host::run(
                "useradd",
                &[
                    "-m",
                    "-s",
                    "/bin/sh",
                    "-c",
                    &self.comment,
                    "-G",
                    sshd::INSTANCE_GROUP,
                    user,
                ],
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        let account = host::account(user)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("user {user} vanished after useradd"))?;
        match &self.credentials.password {
            Some(password) => {
                let line = format!("{user}:{}\n", password.expose());
                host::run_with_input("chpasswd", &[], Some(line.as_bytes()))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            // A locked account ('!') is refused by sshd even for keys; '*' is "no password".
            None => {
                host::run("usermod", &["-p", "*", user])
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        if let Some(key) = &self.credentials.authorized_key {
            let path = Sshd::authorized_keys_dir(&self.dir).join(user);
            std::fs::write(&path, format!("{key}\n")).map_err(|e| e.to_string())?;
        }
        host::ensure_runtime_dir(&account).map_err(|e| e.to_string())?;
        let dropins = [
            ("50-podfleet.conf", self.settings.registries_conf.clone()),
            (
                "50-podfleet-cache.conf",
                self.settings.cache_dropin().map_err(|e| e.to_string())?,
            ),
        ];
        for (name, text) in dropins {
            let Some(text) = text else { continue };
            let path = account.home.join(".config/containers/registries.conf.d");
            self.as_user(&account, "mkdir", &["-p", &path.to_string_lossy()])
                .await?;
            std::fs::write(path.join(name), text).map_err(|e| e.to_string())?;
        }
        let containers = account.home.join(".config/containers");
        self.as_user(&account, "mkdir", &["-p", &containers.to_string_lossy()])
            .await?;
        let storage = format!(
            "# Written by podfleet's local provider (plugin_config.storage_driver).\n\
             [storage]\ndriver = \"{}\"\n{}",
            self.settings.storage_driver,
            self.settings
                .shares_images()
                .then(|| SharedStore::new(&self.settings.state_dir).storage_options())
                .flatten()
                .unwrap_or_default()
        );
        std::fs::write(containers.join("storage.conf"), storage).map_err(|e| e.to_string())?;
        self.start_podman_service(&account).await?;
        let images = self.image_archives().await?;
        for archive in &images {
            self.as_user(
                &account,
                "podman",
                &["load", "-q", "-i", &archive.to_string_lossy()],
            )
            .await?;
        }
        std::fs::write(account.home.join(READY_MARKER), b"").map_err(|e| e.to_string())?;
        tracing::info!(
            instance = user,
            images = images.len(),
            seconds = started.elapsed().as_secs_f64(),
            "local instance created"
        );
        Ok(())
    }

    async fn as_user(
        &self,
        account: &host::Account,
        program: &str,
        args: &[&str],
    ) -> Result<(), String> {
        host::run_as(account, program, args)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    async fn start_podman_service(&self, account: &host::Account) -> Result<(), String> {
        let log_path = self.dir.join(format!("{}.podman.log", account.name));
        host::start_podman_service(account, &log_path)
            .await
            .map_err(|e| e.to_string())
    }

    /// `podman save` archives of the images instances carry, made once per image id (and
    /// looked up again after [`ARCHIVES_FRESH`]).
    async fn image_archives(&self) -> Result<Vec<PathBuf>, String> {
        let recent = || {
            self.archives
                .lock()
                .ok()
                .and_then(|cached| cached.clone())
                .filter(|(at, archives)| {
                    at.elapsed() < ARCHIVES_FRESH && archives.iter().all(|a| a.exists())
                })
                .map(|(_, archives)| archives)
        };
        if let Some(archives) = recent() {
            return Ok(archives);
        }
        let _guard = self.host_lock.lock().await;
        // A creation that held the lock may have looked them up meanwhile.
        if let Some(archives) = recent() {
            return Ok(archives);
        }
        let archives = self.look_up_archives().await?;
        if let Ok(mut cached) = self.archives.lock() {
            *cached = Some((Instant::now(), archives.clone()));
        }
        Ok(archives)
    }

    /// Asks root's Podman; the caller holds the host lock.
    async fn look_up_archives(&self) -> Result<Vec<PathBuf>, String> {
        let names = match &self.settings.images {
            Some(names) => names.clone(),
            None => host::run(
                "podman",
                &["images", "--format", "{{.Repository}}:{{.Tag}}"],
            )
            .await
            .map_err(|e| e.to_string())?
            .lines()
            .filter(|l| !l.contains("<none>"))
            .map(str::to_string)
            .collect(),
        };
        let mut archives = Vec::new();
        for name in names {
            let id = host::run(
                "podman",
                &["image", "inspect", "--format", "{{.Id}}", &name],
            )
            .await
            .map_err(|e| format!("image {name} is not in the host's Podman store: {e}"))?;
            let archive = self.dir.join("images").join(format!("{}.tar", id.trim()));
            if !archive.exists() {
                let part = archive.with_extension("part");
                let part_arg = part.to_string_lossy().into_owned();
                host::run("podman", &["save", "-q", "-o", &part_arg, &name])
                    .await
                    .map_err(|e| e.to_string())?;
                host::set_mode(&part, 0o644).map_err(|e| e.to_string())?;
                std::fs::rename(&part, &archive).map_err(|e| e.to_string())?;
            }
            archives.push(archive);
        }
        Ok(archives)
    }
}

/// Removes an instance user and everything it owned on the host.
async fn delete_instance(
    account: &host::Account,
    dir: &Path,
    lock: &tokio::sync::Mutex<()>,
) -> Result<(), String> {
    host::kill_all_processes(account.uid)
        .await
        .map_err(|e| e.to_string())?;
    let run_dir = host::runtime_dir(account.uid);
    for mount in host::mounts_below(&[&account.home, &run_dir]) {
        let _ = host::run("umount", &["-l", &mount.to_string_lossy()]).await;
    }
    {
        let _guard = lock.lock().await;
        // The marker first: an interrupted deletion must not look like a ready instance.
        let _ = std::fs::remove_file(account.home.join(READY_MARKER));
        host::run("userdel", &["-r", "-f", &account.name])
            .await
            .map_err(|e| e.to_string())?;
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    let _ = std::fs::remove_dir_all(&account.home);
    let _ = std::fs::remove_file(Sshd::authorized_keys_dir(dir).join(&account.name));
    let _ = std::fs::remove_file(dir.join(format!("{}.podman.log", account.name)));
    for tmp in ["/tmp", "/var/tmp", "/dev/shm"] {
        remove_owned_entries(Path::new(tmp), account.uid);
    }
    Ok(())
}

fn remove_owned_entries(dir: &Path, uid: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if meta.uid() == uid {
            let path = entry.path();
            let _ = if meta.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "local".into(),
            max_size: self.settings.max_size,
        }
    }

    async fn list(&self) -> Result<Vec<ProviderInstance>, ProviderError> {
        let accounts = self.own_accounts()?;
        let mut in_flight = self
            .in_flight
            .lock()
            .map_err(|_| platform("state poisoned".into()))?;
        let mut listed: Vec<ProviderInstance> = accounts
            .iter()
            .map(|account| {
                let state = if in_flight.deleting.contains(&account.name) {
                    InstanceState::Deleting
                } else if in_flight.creating.contains(&account.name) {
                    InstanceState::Creating
                } else if let Some((_, reason)) = in_flight
                    .failed
                    .iter()
                    .find(|(name, _)| name == &account.name)
                {
                    InstanceState::Failed {
                        reason: reason.clone(),
                    }
                } else {
                    observed_state(account)
                };
                ProviderInstance {
                    id: InstanceId(account.name.clone()),
                    state,
                }
            })
            .collect();
        // A creation whose useradd has not happened yet still counts as Creating.
        for name in &in_flight.creating {
            if !accounts.iter().any(|a| &a.name == name) {
                listed.push(ProviderInstance {
                    id: InstanceId(name.clone()),
                    state: InstanceState::Creating,
                });
            }
        }
        // So does a deletion that has removed the user but not yet the rest (its runtime dir,
        // keys, shared memory): the instance is gone only when nothing of it is left.
        for name in &in_flight.deleting {
            if !accounts.iter().any(|a| &a.name == name) {
                listed.push(ProviderInstance {
                    id: InstanceId(name.clone()),
                    state: InstanceState::Deleting,
                });
            }
        }
        in_flight
            .failed
            .retain(|(name, _)| accounts.iter().any(|a| &a.name == name));
        Ok(listed)
    }

    async fn increase(&self, count: usize) -> Result<usize, ProviderError> {
        let existing = self.list().await?.len();
        let count = count.min(self.settings.max_size.saturating_sub(existing));
        for _ in 0..count {
            let user = self.new_user_name();
            if let Ok(mut in_flight) = self.in_flight.lock() {
                in_flight.creating.insert(user.clone());
            }
            let creation = self.creation();
            let in_flight = self.in_flight.clone();
            let changes = self.changes.clone();
            tokio::spawn(async move {
                let result = creation.create(&user).await;
                if let Ok(mut in_flight) = in_flight.lock() {
                    in_flight.creating.remove(&user);
                    if let Err(reason) = result {
                        tracing::warn!(instance = %user, %reason, "local instance creation failed");
                        in_flight.failed.push((user, reason));
                    }
                }
                changes.notify_one();
            });
        }
        Ok(count)
    }

    async fn decrease(&self, ids: &[InstanceId]) -> Result<Vec<InstanceId>, ProviderError> {
        let accounts = self.own_accounts()?;
        let mut accepted = Vec::new();
        for id in ids {
            let Some(account) = accounts.iter().find(|a| a.name == id.0).cloned() else {
                continue;
            };
            {
                let mut in_flight = self
                    .in_flight
                    .lock()
                    .map_err(|_| platform("state poisoned".into()))?;
                if !in_flight.deleting.insert(account.name.clone()) {
                    continue; // already being deleted
                }
            }
            accepted.push(id.clone());
            let dir = self.dir.clone();
            let lock = self.host_lock.clone();
            let in_flight = self.in_flight.clone();
            let changes = self.changes.clone();
            tokio::spawn(async move {
                if let Err(reason) = delete_instance(&account, &dir, &lock).await {
                    tracing::warn!(instance = %account.name, %reason, "local instance deletion failed; will retry");
                }
                if let Ok(mut in_flight) = in_flight.lock() {
                    in_flight.deleting.remove(&account.name);
                }
                changes.notify_one();
            });
        }
        Ok(accepted)
    }

    async fn share_image(&self, archive: &Path, reference: &str) -> Result<bool, ProviderError> {
        // The store is an overlay store: instances on another driver cannot read it.
        if !self.settings.shares_images() {
            return Ok(false);
        }
        let _guard = self.host_lock.lock().await;
        SharedStore::new(&self.settings.state_dir)
            .share(archive, reference)
            .await
            .map(|()| true)
            .map_err(|e| platform(format!("sharing image {reference}: {e}")))
    }

    async fn changed(&self) {
        self.changes.notified().await
    }

    /// Stops the managed sshd once the group is empty, so a drained group leaves nothing
    /// running on the host.
    async fn shutdown(&self) {
        match self.stop_sshd_if_empty().await {
            Ok(true) => tracing::info!(group = %self.settings.name, "managed sshd stopped"),
            Ok(false) => {
                tracing::info!(group = %self.settings.name, "instances remain; managed sshd kept")
            }
            Err(e) => tracing::warn!(error = %e, "cannot list instances at shutdown"),
        }
    }

    async fn connect_info(&self, id: &InstanceId) -> Result<ConnectInfo, ProviderError> {
        let account = host::account(&id.0)
            .map_err(|e| platform(e.to_string()))?
            .filter(|a| a.comment == self.marker_comment())
            .ok_or_else(|| ProviderError::UnknownInstance(id.clone()))?;
        Ok(ConnectInfo {
            internal_addr: format!("127.0.0.1:{}", self.sshd.port),
            external_addr: None,
            username: Some(account.name.clone()),
            password: None,
            private_key: self.generated_key.clone(),
            host_key: Some(
                self.sshd
                    .host_public_key()
                    .map_err(|e| platform(e.to_string()))?,
            ),
            os: "linux".into(),
            arch: std::env::consts::ARCH.into(),
            docker_socket: Some(
                host::podman_socket(account.uid)
                    .to_string_lossy()
                    .into_owned(),
            ),
        })
    }
}

/// State of an instance that no task of this process is working on, from the host alone.
fn observed_state(account: &host::Account) -> InstanceState {
    if !account.home.join(READY_MARKER).exists() {
        return InstanceState::Failed {
            reason: "instance was never completed (creation interrupted)".into(),
        };
    }
    if !host::podman_socket(account.uid).exists() || host::processes_of(account.uid).is_empty() {
        return InstanceState::Failed {
            reason: "the instance's Podman service is not running".into(),
        };
    }
    InstanceState::Running
}
