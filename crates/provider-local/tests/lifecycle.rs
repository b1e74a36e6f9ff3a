//! The local provider against the real host: instance users, their rootless Podman services
//! and the managed sshd, from creation through a manager restart to a removal that leaves
//! nothing behind. Needs root and the images of `scripts/setup-host.sh`.
//!
//! Every test has its own group name and state directory, so the tests run in parallel with
//! each other and with anything else on the host that makes users (uids may be reused).

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podfleet_provider::{
    ConnectInfo, InstanceId, InstanceState, Provider, ProviderError, ProviderInstance, SecretString,
};
use podfleet_provider_local::{InstanceCredentials, LocalProvider, LocalSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BUSYBOX: &str = "localhost/podfleet/busybox:latest";
const MISSING_IMAGE: &str = "localhost/does-not-exist:1";
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Removal is polled faster: an instance that leaves the listing before its removal is
/// complete must be caught before the rest of the removal hides the evidence.
const REMOVAL_POLL_INTERVAL: Duration = Duration::from_millis(10);
const CREATE_DEADLINE: Duration = Duration::from_secs(120);
const DELETE_DEADLINE: Duration = Duration::from_secs(60);
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_are_created_survive_a_restart_and_leave_nothing_behind() {
    let group = TestGroup::new("lifecycle", &[BUSYBOX], InstanceCredentials::default());
    let provider = group.provider().await;

    // 1. Creation: both show up at once as Creating, then become Running.
    let asked = Instant::now();
    assert_eq!(provider.increase(2).await.expect("increase"), 2);
    let listed = provider.list().await.expect("list");
    assert_eq!(
        listed.len(),
        2,
        "both requests are listed at once: {listed:?}"
    );
    assert!(
        listed.iter().all(|i| i.state == InstanceState::Creating),
        "new instances are Creating: {listed:?}"
    );
    let ids = sorted_ids(&listed);
    let created_in = wait_until_running(&provider, &ids, asked).await;
    for (id, took) in ids.iter().zip(&created_in) {
        eprintln!(
            "creation time: local instance {id} Running after {:.1} s (two created in parallel)",
            took.as_secs_f64()
        );
    }

    let client_dir = tempfile::tempdir().expect("client scratch dir");
    let host_key_file = group.dir().join("ssh_host_ed25519_key.pub");
    let host_key = std::fs::read_to_string(&host_key_file).expect("read the sshd host key");
    let mut accounts = Vec::new();
    for id in &ids {
        let account = Account::by_name(&id.0).expect("instance user in /etc/passwd");
        assert_eq!(account.comment, group.marker(), "GECOS tag of {id}");
        let info = provider.connect_info(id).await.expect("connect_info");
        assert_ne!(provider.ssh_port(), 0, "port 0 means: pick one");
        assert_eq!(
            info.internal_addr,
            format!("127.0.0.1:{}", provider.ssh_port())
        );
        assert_eq!(info.username.as_deref(), Some(id.0.as_str()));
        assert_eq!(
            info.host_key.as_deref(),
            Some(host_key.trim()),
            "host key of {id}"
        );
        let socket = format!("/run/user/{}/podman/podman.sock", account.uid);
        assert_eq!(info.docker_socket.as_deref(), Some(socket.as_str()));
        let socket_meta = std::fs::symlink_metadata(&socket).expect("podman socket exists");
        assert!(socket_meta.file_type().is_socket(), "{socket} is a socket");
        assert_eq!(socket_meta.uid(), account.uid, "{socket} is owned by {id}");

        // The images are carried: the user's own store has them ...
        let images = run_as_user(
            &account,
            &["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
        )
        .await;
        assert_success(&images, &format!("podman images as {id}"));
        assert!(
            String::from_utf8_lossy(&images.stdout)
                .lines()
                .any(|l| l == BUSYBOX),
            "{id} carries {BUSYBOX}: {images:?}"
        );
        // Image layers are shared between containers (overlay), not copied per container.
        let driver = run_as_user(
            &account,
            &["podman", "info", "--format", "{{.Store.GraphDriverName}}"],
        )
        .await;
        assert_success(&driver, &format!("podman info as {id}"));
        assert_eq!(String::from_utf8_lossy(&driver.stdout).trim(), "overlay");
        // ... and the service behind the handed-out socket serves them.
        let response = http_get(Path::new(&socket), "/v1.40/images/json").await;
        assert!(
            response.starts_with("HTTP/1.") && response.contains(" 200 "),
            "{response}"
        );
        assert!(
            response.contains(BUSYBOX),
            "images API of {id} lists {BUSYBOX}: {response}"
        );

        // The handed-out key logs in, and the server is the one the handed-out host key names.
        let private_key = info
            .private_key
            .as_ref()
            .expect("a generated key is handed out");
        let login = ssh_with_key(client_dir.path(), &info, private_key).await;
        let sshd_log = std::fs::read_to_string(group.dir().join("sshd.log")).unwrap_or_default();
        assert_success(
            &login,
            &format!("ssh with the generated key as {id}; sshd.log: {sshd_log}"),
        );
        assert_eq!(
            String::from_utf8_lossy(&login.stdout).trim(),
            account.uid.to_string()
        );
        accounts.push(account);
    }

    // 2. State comes from the host: a restarted manager sees the same instances, Running,
    // behind the same sshd.
    let port = provider.ssh_port();
    let sshd_pid = read_pid(&group.dir().join("sshd.pid"));
    drop(provider);
    let provider = group.provider().await;
    assert_eq!(
        provider.ssh_port(),
        port,
        "the restarted provider reuses the port"
    );
    assert_eq!(
        read_pid(&group.dir().join("sshd.pid")),
        sshd_pid,
        "the running sshd is kept, not restarted"
    );
    let listed = provider.list().await.expect("list after restart");
    assert_eq!(
        sorted_ids(&listed),
        ids,
        "same instances after restart: {listed:?}"
    );
    assert!(
        listed.iter().all(|i| i.state == InstanceState::Running),
        "still Running after restart: {listed:?}"
    );
    let info = provider
        .connect_info(&ids[0])
        .await
        .expect("connect_info after restart");
    assert_eq!(info.internal_addr, format!("127.0.0.1:{port}"));

    // 3. Removal, by the restarted provider.
    remove_all_and_stop(&group, &provider, &accounts, &EVERY_TRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_credentials_let_the_instance_user_in() {
    let password = format!("pw-{}", hex::encode(rand::random::<[u8; 8]>()));
    let credentials = InstanceCredentials {
        password: Some(SecretString::new(password.clone())),
        authorized_key: None,
    };
    let group = TestGroup::new("password", &[BUSYBOX], credentials);
    let provider = group.provider().await;

    let asked = Instant::now();
    assert_eq!(provider.increase(1).await.expect("increase"), 1);
    let ids = sorted_ids(&provider.list().await.expect("list"));
    let created_in = wait_until_running(&provider, &ids, asked).await;
    eprintln!(
        "creation time: local instance {} Running after {:.1} s (alone in its group)",
        ids[0],
        created_in[0].as_secs_f64()
    );
    let account = Account::by_name(&ids[0].0).expect("instance user in /etc/passwd");
    let info = provider.connect_info(&ids[0]).await.expect("connect_info");
    assert!(
        info.private_key.is_none(),
        "no key is generated when a password is configured"
    );

    let right = ssh_with_password(&info, &password).await;
    assert_success(&right, "ssh with the configured password");
    assert_eq!(
        String::from_utf8_lossy(&right.stdout).trim(),
        account.uid.to_string()
    );
    let wrong = ssh_with_password(&info, &format!("{password}-wrong")).await;
    assert!(
        !wrong.status.success(),
        "a wrong password must be refused: {wrong:?}"
    );
    assert!(
        wrong.stdout.is_empty(),
        "nothing ran with a wrong password: {wrong:?}"
    );

    let expected: Vec<&str> = EVERY_TRACE
        .into_iter()
        .filter(|kind| *kind != "authorized_keys file")
        .collect();
    remove_all_and_stop(&group, &provider, &[account], &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_creation_is_reported_and_removed_fully() {
    let group = TestGroup::new("failing", &[MISSING_IMAGE], InstanceCredentials::default());
    let provider = group.provider().await;

    assert_eq!(provider.increase(1).await.expect("increase"), 1);
    let (id, reason) = poll_list(
        &provider,
        POLL_INTERVAL,
        CREATE_DEADLINE,
        "the creation fails",
        |listed| {
            let [instance] = listed else {
                panic!("exactly one instance is listed: {listed:?}");
            };
            match &instance.state {
                InstanceState::Failed { reason } => Some((instance.id.clone(), reason.clone())),
                InstanceState::Creating => None,
                other => panic!("{} must fail, not be {other:?}", instance.id),
            }
        },
    )
    .await;
    assert!(
        reason.contains(MISSING_IMAGE),
        "the reason names the image: {reason}"
    );

    let account = Account::by_name(&id.0).expect("the failed instance's user exists");
    // The Podman service was started before the image was looked for.
    let expected = [
        "/etc/passwd entry",
        "home directory",
        "runtime dir",
        "processes",
    ];
    remove_all_and_stop(&group, &provider, &[account], &expected).await;
}

/// With keys, a state dir below /tmp used to give Running instances nobody could log in to
/// (sshd's StrictModes refused the keys); now the provider refuses to start.
#[tokio::test]
async fn keys_below_a_directory_others_may_write_are_refused_up_front() {
    let state_dir = tempfile::tempdir_in("/tmp").expect("create a state dir below /tmp");
    let settings = LocalSettings {
        name: format!("untrusted-{}", hex::encode(rand::random::<[u8; 3]>())),
        state_dir: state_dir.path().to_path_buf(),
        ssh_port: 0,
        images: Some(vec![BUSYBOX.to_string()]),
        max_size: 1,
        registries_conf: None,
        image_cache: None,
        image_cache_registries: Vec::new(),
        storage_driver: "overlay".into(),
    };
    let error = LocalProvider::new(settings.clone(), InstanceCredentials::default())
        .await
        .err()
        .expect("a state dir below /tmp must be refused for keys");
    let message = error.to_string();
    assert!(matches!(error, ProviderError::Config(_)), "{error:?}");
    assert!(
        message.contains("below /tmp,"),
        "names the culprit: {message}"
    );
    let group_dir = settings.state_dir.join(&settings.name);
    assert!(!group_dir.join("sshd.pid").exists(), "no sshd was started");
}

#[test]
fn plugin_config_rejects_unknown_keys_and_bad_names() {
    let parse = |config: serde_json::Value| {
        let config = config.as_object().expect("a JSON object").clone();
        LocalSettings::from_plugin_config(&config)
    };

    let error = parse(serde_json::json!({ "name": "ok", "ssh_prot": 2222 }))
        .expect_err("unknown key must be rejected");
    let message = error.to_string();
    assert!(matches!(error, ProviderError::Config(_)), "{error:?}");
    assert!(
        message.contains("unknown field `ssh_prot`"),
        "names the key: {message}"
    );
    assert!(
        message.contains("known keys: name, state_dir, ssh_port, images, max_size"),
        "lists the known keys: {message}"
    );

    for bad in ["", "two words", "dot.ted", "sl/ash", "col:on", "ümlaut"] {
        let error = parse(serde_json::json!({ "name": bad }))
            .expect_err(&format!("name {bad:?} must be rejected"));
        let message = error.to_string();
        assert!(matches!(error, ProviderError::Config(_)), "{error:?}");
        assert!(
            message.contains(&format!("plugin_config.name {bad:?}"))
                && message.contains("letters, digits, '-' or '_'"),
            "names the value and what is allowed: {message}"
        );
    }

    let settings = parse(serde_json::json!({ "name": "Fleet_1-a", "ssh_port": 2222 }))
        .expect("valid settings");
    assert_eq!(settings.name, "Fleet_1-a");
    assert_eq!(settings.ssh_port, 2222);
    assert_eq!(settings.state_dir, PathBuf::from("/var/lib/podfleet/local"));
    assert_eq!(settings.images, None);
    assert_eq!(settings.storage_driver, "overlay");

    let error = parse(serde_json::json!({ "storage_driver": "overlay2" }))
        .expect_err("a driver Podman does not have");
    assert!(
        error.to_string().contains("storage_driver \"overlay2\"")
            && error.to_string().contains("\"vfs\""),
        "{error}"
    );
}

/// One test's group: its own name and state directory. When the test panics, Drop removes
/// whatever instances the group still has and stops its sshd, so a failed run leaves the host
/// clean: a fresh provider (state comes from the host) removes what exists, and the test's own
/// providers are listed too, so creations and removals they have in flight are waited for.
/// Their tasks run on in the worker threads of the test's runtime while the test thread
/// unwinds: hence the `multi_thread` flavor of the instance tests.
struct TestGroup {
    settings: LocalSettings,
    credentials: InstanceCredentials,
    providers: Mutex<Vec<Arc<LocalProvider>>>,
    /// Removed after `Drop::drop` has cleaned up.
    _state_dir: tempfile::TempDir,
}

impl TestGroup {
    fn new(prefix: &str, images: &[&str], credentials: InstanceCredentials) -> Self {
        // Not below /tmp: sshd refuses keys below a directory others may write.
        let state_dir = tempfile::Builder::new()
            .prefix("provider-local-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("create a state dir");
        let settings = LocalSettings {
            name: format!("{prefix}-{}", hex::encode(rand::random::<[u8; 3]>())),
            state_dir: state_dir.path().to_path_buf(),
            ssh_port: 0,
            images: Some(images.iter().map(|i| i.to_string()).collect()),
            max_size: 4,
            registries_conf: None,
            image_cache: None,
            image_cache_registries: Vec::new(),
            storage_driver: "overlay".into(),
        };
        Self {
            settings,
            credentials,
            providers: Mutex::default(),
            _state_dir: state_dir,
        }
    }

    /// A provider for the group, as the manager makes one when it starts.
    async fn provider(&self) -> Arc<LocalProvider> {
        let provider = LocalProvider::new(self.settings.clone(), self.credentials.clone())
            .await
            .expect("start the local provider");
        let provider = Arc::new(provider);
        self.providers
            .lock()
            .expect("providers lock")
            .push(provider.clone());
        provider
    }

    /// `<state_dir>/<group>`: the managed sshd's files.
    fn dir(&self) -> PathBuf {
        self.settings.state_dir.join(&self.settings.name)
    }

    fn marker(&self) -> String {
        format!("podfleet-instance group={}", self.settings.name)
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return; // the test removed everything itself, and checked it did
        }
        let settings = self.settings.clone();
        let credentials = self.credentials.clone();
        let providers =
            std::mem::take(&mut *self.providers.lock().unwrap_or_else(|e| e.into_inner()));
        // The test's thread is busy unwinding, so clean up on a runtime of our own; a panic
        // in there must not abort the test binary, hence the separate thread.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(remove_everything(settings, credentials, providers));
        });
        if cleanup.join().is_err() {
            eprintln!("cleanup of group {} failed", self.settings.name);
        }
    }
}

/// Best-effort removal of a group's instances and sshd after a failed test.
async fn remove_everything(
    settings: LocalSettings,
    credentials: InstanceCredentials,
    providers: Vec<Arc<LocalProvider>>,
) {
    let name = settings.name.clone();
    let fresh = LocalProvider::new(settings, credentials)
        .await
        .expect("provider for cleanup");
    let deadline = Instant::now() + DELETE_DEADLINE;
    loop {
        let mut listed = fresh.list().await.expect("list for cleanup");
        let mut in_flight = Vec::new();
        for provider in &providers {
            in_flight.extend(provider.list().await.expect("list for cleanup"));
        }
        if listed.is_empty() && in_flight.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("cleanup of group {name}: left behind {listed:?} {in_flight:?}");
            break;
        }
        // Removing an instance under a creation still running would race with it.
        let creating: Vec<&InstanceId> = in_flight
            .iter()
            .filter(|i| i.state == InstanceState::Creating)
            .map(|i| &i.id)
            .collect();
        listed.retain(|i| i.state != InstanceState::Deleting && !creating.contains(&&i.id));
        let ids: Vec<InstanceId> = listed.into_iter().map(|i| i.id).collect();
        fresh.decrease(&ids).await.expect("decrease for cleanup");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    fresh.shutdown().await;
}

/// Polls `list` every `interval` until `done` says what it waited for, or fails at the deadline
/// with the last listing.
async fn poll_list<T>(
    provider: &LocalProvider,
    interval: Duration,
    deadline: Duration,
    what: &str,
    mut done: impl FnMut(&[ProviderInstance]) -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        let listed = provider.list().await.expect("list");
        if let Some(value) = done(&listed) {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "{what}: not within {deadline:?}; last listing: {listed:?}"
        );
        tokio::time::sleep(interval).await;
    }
}

/// Waits until every one of `ids` (and nothing else) is Running; returns for each how long
/// after `asked` it was first seen Running.
async fn wait_until_running(
    provider: &LocalProvider,
    ids: &[InstanceId],
    asked: Instant,
) -> Vec<Duration> {
    let mut running_after: Vec<Option<Duration>> = vec![None; ids.len()];
    poll_list(
        provider,
        POLL_INTERVAL,
        CREATE_DEADLINE,
        "instances Running",
        |listed| {
            assert_eq!(
                sorted_ids(listed),
                ids,
                "the group holds just the new instances"
            );
            for instance in listed {
                match &instance.state {
                    InstanceState::Running => {
                        let index = ids
                            .iter()
                            .position(|id| *id == instance.id)
                            .expect("listed");
                        running_after[index].get_or_insert_with(|| asked.elapsed());
                    }
                    InstanceState::Creating => {}
                    other => panic!("{} must become Running, not {other:?}", instance.id),
                }
            }
            running_after.iter().copied().collect()
        },
    )
    .await
}

/// Every trace kind an instance with a Running Podman service has on the host.
const EVERY_TRACE: [&str; 8] = [
    "/etc/passwd entry",
    "/etc/subuid entry",
    "/etc/subgid entry",
    "home directory",
    "container storage",
    "authorized_keys file",
    "runtime dir",
    "processes",
];

/// Removes the group's instances and stops its sshd, checking on the way: the instances are
/// Deleting until they vanish, then nothing of them is left on the host, and the sshd is gone.
/// `expected_before` names traces that must exist beforehand, so the absence checks are not
/// vacuous.
async fn remove_all_and_stop(
    group: &TestGroup,
    provider: &LocalProvider,
    accounts: &[Account],
    expected_before: &[&str],
) {
    for account in accounts {
        let traces = host_traces(group, account);
        for kind in expected_before {
            assert!(
                traces.iter().any(|t| t.starts_with(kind)),
                "before removal {} has a {kind}; found {traces:?}",
                account.name
            );
        }
    }
    let ids: Vec<InstanceId> = accounts
        .iter()
        .map(|a| InstanceId(a.name.clone()))
        .collect();
    let mut accepted = provider.decrease(&ids).await.expect("decrease");
    accepted.sort();
    assert_eq!(accepted, ids, "every removal is accepted");
    let listed = provider.list().await.expect("list");
    assert!(
        listed.len() == ids.len() && listed.iter().all(|i| i.state == InstanceState::Deleting),
        "removed instances are Deleting: {listed:?}"
    );
    poll_list(
        provider,
        REMOVAL_POLL_INTERVAL,
        DELETE_DEADLINE,
        "instances gone",
        |listed| {
            for instance in listed {
                assert_eq!(instance.state, InstanceState::Deleting, "{listed:?}");
            }
            listed.is_empty().then_some(())
        },
    )
    .await;

    for account in accounts {
        let traces = host_traces(group, account);
        assert!(
            traces.is_empty(),
            "{} left behind: {traces:?}",
            account.name
        );
    }
    let tagged: Vec<Account> = Account::all()
        .into_iter()
        .filter(|a| a.comment == group.marker())
        .collect();
    assert!(
        tagged.is_empty(),
        "no user carries the group's tag: {tagged:?}"
    );

    let pid_file = group.dir().join("sshd.pid");
    let sshd_pid = read_pid(&pid_file);
    let port = provider.ssh_port();
    assert!(pid_alive(sshd_pid), "sshd {sshd_pid} runs before shutdown");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "port {port} open"
    );
    provider.shutdown().await;
    assert!(
        !pid_alive(sshd_pid),
        "sshd {sshd_pid} is stopped by shutdown"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} no longer accepts after shutdown"
    );
}

/// What the host still holds of an instance, each entry starting with its kind.
fn host_traces(group: &TestGroup, account: &Account) -> Vec<String> {
    let name = &account.name;
    let mut traces = Vec::new();
    for file in [
        "/etc/passwd",
        "/etc/shadow",
        "/etc/group",
        "/etc/subuid",
        "/etc/subgid",
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.split(':').next() == Some(name.as_str()))
        {
            let shown = line.split(':').take(1).collect::<Vec<_>>().join(":");
            traces.push(format!("{file} entry {shown}"));
        }
    }
    let paths = [
        ("home directory", account.home.clone()),
        (
            "container storage",
            account.home.join(".local/share/containers/storage"),
        ),
        (
            "authorized_keys file",
            group.dir().join("authorized_keys").join(name),
        ),
        (
            "podman service log",
            group.dir().join(format!("{name}.podman.log")),
        ),
    ];
    for (kind, path) in paths {
        if path.symlink_metadata().is_ok() {
            traces.push(format!("{kind} {}", path.display()));
        }
    }
    let run_dir = PathBuf::from(format!("/run/user/{}", account.uid));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for mount in mountinfo.lines().filter_map(|l| l.split(' ').nth(4)) {
        if Path::new(mount).starts_with(&account.home) || Path::new(mount).starts_with(&run_dir) {
            traces.push(format!("mount {mount}"));
        }
    }

    // A user created meanwhile (by a parallel test, say) may have been given the same uid;
    // then what the uid owns is not this instance's.
    if let Some(other) = Account::all()
        .into_iter()
        .find(|a| a.uid == account.uid && a.name != *name)
    {
        eprintln!(
            "uid {} now belongs to {}; skipping the uid checks",
            account.uid, other.name
        );
        return traces;
    }
    if run_dir.exists() {
        traces.push(format!("runtime dir {}", run_dir.display()));
    }
    let processes = processes_of(account.uid);
    if !processes.is_empty() {
        traces.push(format!("processes {processes:?}"));
    }
    for dir in ["/tmp", "/var/tmp", "/dev/shm"] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let owned = entry
                .path()
                .symlink_metadata()
                .is_ok_and(|m| m.uid() == account.uid);
            let named = entry
                .file_name()
                .to_string_lossy()
                .ends_with(&format!("-{}", account.uid))
                || entry
                    .file_name()
                    .to_string_lossy()
                    .ends_with(&format!("_{}", account.uid));
            if owned || named {
                traces.push(format!("temporary file {}", entry.path().display()));
            }
        }
    }
    traces
}

/// A user account as `/etc/passwd` lists it.
#[derive(Clone, Debug)]
struct Account {
    name: String,
    uid: u32,
    comment: String,
    home: PathBuf,
}

impl Account {
    fn all() -> Vec<Account> {
        let text = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        text.lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                let [name, _, uid, _, comment, home, _] = fields[..] else {
                    return None;
                };
                Some(Account {
                    name: name.to_string(),
                    uid: uid.parse().ok()?,
                    comment: comment.to_string(),
                    home: PathBuf::from(home),
                })
            })
            .collect()
    }

    fn by_name(name: &str) -> Option<Account> {
        Self::all().into_iter().find(|a| a.name == name)
    }
}

fn sorted_ids(listed: &[ProviderInstance]) -> Vec<InstanceId> {
    let mut ids: Vec<InstanceId> = listed.iter().map(|i| i.id.clone()).collect();
    ids.sort();
    ids
}

/// Live processes with `uid` as real, effective, saved or filesystem uid (a zombie is dead,
/// waiting for init to reap it, which on these machines takes a while).
fn processes_of(uid: u32) -> Vec<i32> {
    let entries = std::fs::read_dir("/proc").expect("read /proc");
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let zombie = status
                .lines()
                .any(|l| l.starts_with("State:") && l[6..].trim_start().starts_with('Z'));
            !zombie
                && status
                    .lines()
                    .find(|l| l.starts_with("Uid:"))
                    .is_some_and(|l| l.split_whitespace().skip(1).any(|u| u == uid.to_string()))
        })
        .collect()
}

fn read_pid(path: &Path) -> i32 {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read pid file {}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("pid in {}: {e}", path.display()))
}

/// Whether `pid` runs; a zombie nobody reaps (pid 1 of a container may not) counts as gone.
fn pid_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// Runs a command with a deadline and returns what it printed.
async fn run(program: &str, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(COMMAND_DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {COMMAND_DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// Runs a command as the instance user, with a clean environment like a login would give.
async fn run_as_user(account: &Account, command: &[&str]) -> Output {
    let home = format!("HOME={}", account.home.display());
    let runtime_dir = format!("XDG_RUNTIME_DIR=/run/user/{}", account.uid);
    let mut args = vec!["-u", &account.name, "--", "env", "-i", &home, &runtime_dir];
    args.push("PATH=/usr/local/bin:/usr/bin:/bin");
    args.extend_from_slice(command);
    run("runuser", &args).await
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}): stdout {:?} stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One HTTP/1.0 request over a unix socket; the whole response as text.
async fn http_get(socket: &Path, path: &str) -> String {
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: podman\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    tokio::time::timeout(COMMAND_DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} on {} timed out", socket.display()))
        .unwrap_or_else(|e| panic!("GET {path} on {}: {e}", socket.display()))
}

fn split_addr(info: &ConnectInfo) -> (&str, &str) {
    info.internal_addr
        .rsplit_once(':')
        .expect("internal_addr is host:port")
}

/// `ssh … id -u` with the handed-out key, trusting only the handed-out host key.
async fn ssh_with_key(scratch: &Path, info: &ConnectInfo, key: &SecretString) -> Output {
    let (host, port) = split_addr(info);
    let user = info.username.as_deref().expect("a user name");
    let key_file = scratch.join(format!("{user}.key"));
    std::fs::write(&key_file, key.expose()).expect("write the private key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod the private key");
    let known_hosts = scratch.join(format!("{user}.known_hosts"));
    let host_key = info.host_key.as_deref().expect("a host key");
    std::fs::write(&known_hosts, format!("[{host}]:{port} {host_key}\n"))
        .expect("write known_hosts");
    let key_arg = key_file.to_string_lossy().into_owned();
    let known_hosts_arg = format!("UserKnownHostsFile={}", known_hosts.display());
    let target = format!("{user}@{host}");
    let args = [
        "-F",
        "/dev/null",
        "-i",
        &key_arg,
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        &known_hosts_arg,
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=10",
        "-p",
        port,
        &target,
        "id",
        "-u",
    ];
    run("ssh", &args).await
}

/// `sshpass -p <password> ssh … id -u`.
async fn ssh_with_password(info: &ConnectInfo, password: &str) -> Output {
    let (host, port) = split_addr(info);
    let target = format!("{}@{host}", info.username.as_deref().expect("a user name"));
    let args = [
        "-p",
        password,
        "ssh",
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "LogLevel=ERROR",
        "-p",
        port,
        &target,
        "id",
        "-u",
    ];
    run("sshpass", &args).await
}
