//! End-to-end tests of the connector against a real OpenSSH sshd. Every test starts its own
//! sshd on its own loopback port with its own keys in its own temporary directory, and logs
//! in as an unprivileged test user, so the tests run in parallel. They need root (to start
//! sshd and create the user) and `/usr/sbin/sshd` and `ssh-keygen`.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use podfleet_connector::{
    ConnectError, ConnectOptions, Connection, HostKeyCheck, Tunnel, TunnelStream,
};
use podfleet_provider::SecretString;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The unprivileged user the tests log in as; sshd refuses everyone else (root included).
const TEST_USER: &str = "pfconnector-test";
const TEST_PASSWORD: &str = "pf-connector-test-pw-7Xq2";
const SSHD: &str = "/usr/sbin/sshd";

/// Generous bound for anything that should finish quickly, so a hang fails instead of blocking.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a command to completion and panics with its output if it fails.
fn run(command: &mut Command) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Creates the test user if missing and sets its password, once per test process. Another
/// process (a parallel `cargo test`) may race us: "already exists" is fine, and a busy
/// `/etc/shadow` lock is retried until a deadline.
fn ensure_test_user() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let exists = |user: &str| {
            Command::new("id")
                .args(["-u", user])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        };
        if !exists(TEST_USER) {
            let status = Command::new("useradd")
                .args(["-m", "-s", "/bin/sh", TEST_USER])
                .status()
                .expect("useradd runs (the tests need root)");
            // 9: the user was created by someone else meanwhile.
            assert!(
                status.success() || status.code() == Some(9),
                "useradd {TEST_USER} failed: {status}"
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut child = Command::new("chpasswd")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("chpasswd runs");
            let mut stdin = child.stdin.take().expect("stdin is piped");
            writeln!(stdin, "{TEST_USER}:{TEST_PASSWORD}").expect("chpasswd reads its input");
            drop(stdin);
            let output = child.wait_with_output().expect("chpasswd finishes");
            if output.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chpasswd for {TEST_USER} keeps failing: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

/// An ed25519 key pair written by `ssh-keygen`.
struct KeyPair {
    private_path: PathBuf,
    /// The OpenSSH public key line, `ssh-ed25519 AAAA... comment`.
    public_line: String,
}

impl KeyPair {
    fn generate(path: &Path) -> KeyPair {
        run(Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "pfconnector-test-key",
                "-f",
            ])
            .arg(path));
        let public_line = std::fs::read_to_string(path.with_extension("pub"))
            .expect("ssh-keygen wrote the public key")
            .trim()
            .to_string();
        KeyPair {
            private_path: path.to_path_buf(),
            public_line,
        }
    }

    fn private_text(&self) -> SecretString {
        SecretString::new(
            std::fs::read_to_string(&self.private_path).expect("ssh-keygen wrote the private key"),
        )
    }
}

/// A port on 127.0.0.1 that was free a moment ago. Another process may take it before sshd
/// binds it; `Sshd::launch` then sees sshd exit and tries the next port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding a loopback port works")
        .port()
}

/// What an sshd needs on disk: a directory the test user can traverse, the host key, and the
/// client key authorized for the test user.
struct SshdFiles {
    dir: tempfile::TempDir,
    host_key: KeyPair,
    client_key: KeyPair,
}

impl SshdFiles {
    fn create() -> SshdFiles {
        ensure_test_user();
        let dir = tempfile::tempdir().expect("a temporary directory can be created");
        // sshd and the test user's sessions must be able to traverse it.
        set_mode(dir.path(), 0o755);
        let host_key = KeyPair::generate(&dir.path().join("ssh_host_ed25519_key"));
        let client_key = KeyPair::generate(&dir.path().join("client_key"));
        let authorized_keys = dir.path().join("authorized_keys");
        std::fs::create_dir(&authorized_keys).expect("the authorized_keys directory is created");
        set_mode(&authorized_keys, 0o755);
        let user_keys = authorized_keys.join(TEST_USER);
        std::fs::write(&user_keys, format!("{}\n", client_key.public_line))
            .expect("the authorized key is written");
        set_mode(&user_keys, 0o644);
        SshdFiles {
            dir,
            host_key,
            client_key,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Options that log in with the authorized client key and pin the real host key.
    fn key_options(&self, port: u16) -> ConnectOptions {
        ConnectOptions {
            addr: format!("127.0.0.1:{port}"),
            username: TEST_USER.into(),
            password: None,
            private_key: Some(self.client_key.private_text()),
            host_key: HostKeyCheck::Pinned(self.host_key.public_line.clone()),
            timeout: Duration::from_secs(10),
            keepalive: None,
        }
    }
}

/// One OpenSSH sshd in the foreground, killed on drop.
struct Sshd {
    files: SshdFiles,
    port: u16,
    child: Child,
}

impl Sshd {
    /// Starts an sshd with fresh keys on a free port.
    async fn start() -> Sshd {
        Sshd::launch(
            SshdFiles::create(),
            std::iter::repeat_with(free_port).take(5),
        )
        .await
    }

    /// Starts sshd on the first of `ports` it can bind.
    async fn launch(files: SshdFiles, ports: impl IntoIterator<Item = u16>) -> Sshd {
        std::fs::create_dir_all("/run/sshd").expect("the privilege separation directory exists");
        let config = files.path("sshd_config");
        let pid_file = files.path("sshd.pid");
        let log = files.path("sshd.log");
        for port in ports {
            std::fs::write(&config, sshd_config(files.dir.path(), port))
                .expect("sshd_config is written");
            let _ = std::fs::remove_file(&pid_file);
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-f")
                .arg(&config)
                .arg("-E")
                .arg(&log)
                .stdin(Stdio::null())
                .spawn()
                .expect("sshd starts");
            if wait_until_listening(&mut child, port, &pid_file, &log).await {
                return Sshd { files, port, child };
            }
            let _ = child.wait();
        }
        panic!(
            "sshd did not come up on any port; last log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.files.path("sshd.log")).unwrap_or_default()
    }

    fn key_options(&self) -> ConnectOptions {
        self.files.key_options(self.port)
    }

    async fn connect(&self) -> Connection {
        let options = self.key_options();
        match tokio::time::timeout(STEP_TIMEOUT, Connection::connect(&options)).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => panic!(
                "connect to {}: {error}; sshd log:\n{}",
                self.addr(),
                self.log()
            ),
            Err(_) => panic!("connect to {} hung; sshd log:\n{}", self.addr(), self.log()),
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // Stops the listener; per-connection sshd processes end when their clients go away.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True once this sshd wrote its pid file (it does so after binding its port) and the port
/// accepts connections; false if sshd exited (the port was taken meanwhile, for instance).
async fn wait_until_listening(child: &mut Child, port: u16, pid_file: &Path, log: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    let own_pid = child.id().to_string();
    loop {
        if let Some(status) = child.try_wait().expect("sshd's status can be read") {
            eprintln!("sshd on port {port} exited early: {status}");
            return false;
        }
        let pid_written = std::fs::read_to_string(pid_file).is_ok_and(|pid| pid.trim() == own_pid);
        if pid_written
            && tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        {
            return true;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "sshd on port {port} did not start listening in time; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sshd_config(dir: &Path, port: u16) -> String {
    let dir = dir.display();
    // Port must come before ListenAddress. `AllowTcpForwarding no` would also refuse
    // direct-streamlocal, hence `local`.
    format!(
        "Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/ssh_host_ed25519_key
PidFile {dir}/sshd.pid
UsePAM no
PasswordAuthentication yes
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile {dir}/authorized_keys/%u
AllowStreamLocalForwarding yes
AllowTcpForwarding local
StrictModes no
PermitRootLogin no
AllowUsers {TEST_USER}
LogLevel VERBOSE
"
    )
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Awaits `future`, failing the test if it takes longer than `STEP_TIMEOUT`.
async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP_TIMEOUT:?}"))
}

/// Writes `payload` and then EOF while reading concurrently (so neither side's window can
/// stall the other), and returns everything read until the far end's EOF.
async fn round_trip(stream: TunnelStream, payload: &[u8]) -> Vec<u8> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async {
        writer
            .write_all(payload)
            .await
            .expect("the tunnel accepts writes");
        writer.shutdown().await.expect("the tunnel accepts EOF");
    };
    let read = async {
        let mut received = Vec::new();
        reader
            .read_to_end(&mut received)
            .await
            .expect("the tunnel can be read");
        received
    };
    let ((), received) = within("a tunnel round trip", async { tokio::join!(write, read) }).await;
    received
}

/// Bytes that are unlikely to round-trip by accident: every position differs per `seed`.
fn payload(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add(seed.wrapping_mul(7919)) as u8
        })
        .collect()
}

/// A Unix-socket echo server the test user may connect to: each connection gets back what
/// it sends, then EOF after the client's EOF.
fn start_echo_server(dir: &Path) -> String {
    let socket_dir = dir.join("engine");
    std::fs::create_dir(&socket_dir).expect("the socket directory is created");
    set_mode(&socket_dir, 0o777);
    let socket = socket_dir.join("echo.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("the echo socket binds");
    set_mode(&socket, 0o666);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
                    let _ = writer.shutdown().await;
                }
            });
        }
    });
    socket
        .to_str()
        .expect("the temporary path is UTF-8")
        .to_string()
}

#[tokio::test]
async fn key_auth_with_pinned_host_key_runs_a_command() {
    let sshd = Sshd::start().await;
    let connection = sshd.connect().await;
    assert_eq!(connection.addr(), sshd.addr());

    let output = within("exec", connection.exec("echo hi; exit 7"))
        .await
        .expect("exec works");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hi\n");
    assert_eq!(output.exit_status, 7);
    assert!(
        output.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Same connection again: stderr is kept apart, and we are the unprivileged user.
    let output = within("exec", connection.exec("id -un; echo oops >&2"))
        .await
        .expect("a second exec on the same connection works");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{TEST_USER}\n")
    );
    assert_eq!(String::from_utf8_lossy(&output.stderr), "oops\n");
    assert_eq!(output.exit_status, 0);

    within("close", connection.close()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !connection.is_closed() {
        assert!(
            Instant::now() < deadline,
            "the connection is still open after close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn password_auth_works_and_a_wrong_password_is_an_auth_error_that_hides_it() {
    let sshd = Sshd::start().await;
    let password_options = |password: &str| ConnectOptions {
        private_key: None,
        password: Some(SecretString::new(password)),
        ..sshd.key_options()
    };

    let connection = within(
        "connect",
        Connection::connect(&password_options(TEST_PASSWORD)),
    )
    .await
    .unwrap_or_else(|e| panic!("password login: {e}; sshd log:\n{}", sshd.log()));
    let output = within("exec", connection.exec("id -un"))
        .await
        .expect("exec works");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{TEST_USER}\n")
    );

    let wrong_password = "not-the-password-5d1f";
    let error = within(
        "connect",
        Connection::connect(&password_options(wrong_password)),
    )
    .await
    .err()
    .expect("a wrong password is rejected");
    assert!(matches!(error, ConnectError::Auth { .. }), "{error:?}");
    let shown = format!("{error} {error:?}");
    assert!(
        !shown.contains(wrong_password),
        "the password leaked into: {shown}"
    );
    assert!(
        shown.contains(TEST_USER),
        "the error names the user: {shown}"
    );
}

#[tokio::test]
async fn a_key_that_is_not_authorized_is_an_auth_error() {
    let sshd = Sshd::start().await;
    let stranger = KeyPair::generate(&sshd.files.path("stranger_key"));
    let options = ConnectOptions {
        private_key: Some(stranger.private_text()),
        ..sshd.key_options()
    };
    let error = within("connect", Connection::connect(&options))
        .await
        .err()
        .expect("an unknown key is rejected");
    assert!(matches!(error, ConnectError::Auth { .. }), "{error:?}");
}

#[tokio::test]
async fn host_keys_are_checked_pinned_and_against_known_hosts() {
    let sshd = Sshd::start().await;
    let other_key = KeyPair::generate(&sshd.files.path("other_host_key"));

    let pinned_wrong = ConnectOptions {
        host_key: HostKeyCheck::Pinned(other_key.public_line.clone()),
        ..sshd.key_options()
    };
    let error = within("connect", Connection::connect(&pinned_wrong))
        .await
        .err()
        .expect("a different pinned key is refused");
    assert!(
        matches!(error, ConnectError::HostKeyMismatch { .. }),
        "{error:?}"
    );

    let known_hosts = |name: &str, key: &KeyPair| {
        let path = sshd.files.path(name);
        let content = format!(
            "# written by the connector tests\n\
             [127.0.0.1]:1 {unrelated}\n\
             [127.0.0.1]:{port} {key}\n",
            unrelated = other_key.public_line,
            port = sshd.port,
            key = key.public_line,
        );
        std::fs::write(&path, content).expect("known_hosts is written");
        ConnectOptions {
            host_key: HostKeyCheck::KnownHosts(path),
            ..sshd.key_options()
        }
    };

    let right = known_hosts("known_hosts_right", &sshd.files.host_key);
    let connection = within("connect", Connection::connect(&right))
        .await
        .unwrap_or_else(|e| panic!("the known_hosts entry should be accepted: {e}"));
    let output = within("exec", connection.exec("echo ok"))
        .await
        .expect("exec works");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "ok\n");

    let wrong = known_hosts("known_hosts_wrong", &other_key);
    let error = within("connect", Connection::connect(&wrong))
        .await
        .err()
        .expect("a changed host key is refused");
    assert!(
        matches!(error, ConnectError::HostKeyMismatch { .. }),
        "{error:?}"
    );

    // A known_hosts file with no entry for this host does not vouch for it either.
    let missing = ConnectOptions {
        host_key: HostKeyCheck::KnownHosts(sshd.files.path("no_such_known_hosts")),
        ..sshd.key_options()
    };
    let error = within("connect", Connection::connect(&missing))
        .await
        .err()
        .expect("an unknown host is refused");
    assert!(
        matches!(error, ConnectError::HostKeyMismatch { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn socket_tunnel_round_trips_bytes() {
    let sshd = Sshd::start().await;
    let socket = start_echo_server(sshd.files.dir.path());
    let connection = sshd.connect().await;

    let stream = within(
        "open tunnel",
        connection.open_tunnel(&Tunnel::Socket(socket)),
    )
    .await
    .expect("the socket tunnel opens");
    // Larger than one SSH channel window, so window adjustments are exercised too.
    let sent = payload(1, 5 * 1024 * 1024);
    let received = round_trip(stream, &sent).await;
    assert_eq!(received.len(), sent.len());
    assert!(
        received == sent,
        "the echoed bytes differ from the sent ones"
    );
}

#[tokio::test]
async fn socket_tunnel_to_a_missing_socket_is_a_channel_error() {
    let sshd = Sshd::start().await;
    let connection = sshd.connect().await;
    let missing = sshd.files.path("no-such.sock").display().to_string();
    let error = within(
        "open tunnel",
        connection.open_tunnel(&Tunnel::Socket(missing.clone())),
    )
    .await
    .err()
    .expect("a forward to a missing socket fails");
    assert!(matches!(error, ConnectError::Channel { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&missing),
        "the error names the socket: {error}"
    );
}

#[tokio::test]
async fn command_tunnel_round_trips_bytes_through_cat() {
    let sshd = Sshd::start().await;
    let connection = sshd.connect().await;
    let stream = within(
        "open tunnel",
        connection.open_tunnel(&Tunnel::Command("cat".into())),
    )
    .await
    .expect("the command tunnel opens");
    let sent = payload(2, 3 * 1024 * 1024);
    let received = round_trip(stream, &sent).await;
    assert_eq!(received.len(), sent.len());
    assert!(
        received == sent,
        "the bytes cat sent back differ from the sent ones"
    );
}

#[tokio::test]
async fn twenty_concurrent_socket_tunnels_over_one_connection() {
    let sshd = Sshd::start().await;
    let socket = start_echo_server(sshd.files.dir.path());
    let connection = sshd.connect().await;

    let mut tunnels = tokio::task::JoinSet::new();
    for index in 0..20u32 {
        let connection = connection.clone();
        let socket = socket.clone();
        tunnels.spawn(async move {
            let stream = connection
                .open_tunnel(&Tunnel::Socket(socket))
                .await
                .unwrap_or_else(|e| panic!("tunnel {index}: {e}"));
            let sent = payload(100 + index, 256 * 1024 + index as usize);
            let received = round_trip(stream, &sent).await;
            (index, received == sent)
        });
    }
    let mut finished = Vec::new();
    while let Some(result) = within("the tunnels", tunnels.join_next()).await {
        let (index, echoed) = result.expect("a tunnel task panicked");
        assert!(echoed, "tunnel {index} got back different bytes");
        finished.push(index);
    }
    finished.sort_unstable();
    assert_eq!(finished, (0..20).collect::<Vec<_>>());
}

#[tokio::test]
async fn nothing_listening_is_unreachable_after_the_timeout() {
    let port = free_port();
    let options = ConnectOptions {
        addr: format!("127.0.0.1:{port}"),
        username: TEST_USER.into(),
        password: Some(SecretString::new(TEST_PASSWORD)),
        private_key: None,
        host_key: HostKeyCheck::AcceptAny,
        timeout: Duration::from_secs(1),
        keepalive: None,
    };
    // Generous bound: connect must give up, but how fast is not this test's business.
    let result = tokio::time::timeout(Duration::from_secs(10), Connection::connect(&options)).await;
    let error = result
        .expect("connect gives up within 10 s when told to try for 1 s")
        .err()
        .expect("nothing listens, so connect fails");
    assert!(
        matches!(error, ConnectError::Unreachable { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(&options.addr),
        "the error names the address: {error}"
    );
}

#[tokio::test]
async fn connect_keeps_trying_until_sshd_comes_up() {
    let files = SshdFiles::create();
    // Stands in for an instance whose sshd is not up yet: it hangs up on every connection.
    let not_yet = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port binds");
    let port = not_yet
        .local_addr()
        .expect("the listener has an address")
        .port();
    let options = ConnectOptions {
        timeout: Duration::from_secs(30),
        ..files.key_options(port)
    };
    let connecting = tokio::spawn(async move { Connection::connect(&options).await });

    // Once the client has been hung up on, sshd takes over the port.
    let (first_attempt, _) = within("the first attempt", not_yet.accept())
        .await
        .expect("the client connects");
    drop(first_attempt);
    drop(not_yet);
    let _sshd = Sshd::launch(files, [port]).await;

    let connection = within("connect", connecting)
        .await
        .expect("the connect task does not panic")
        .unwrap_or_else(|e| panic!("connect should have retried until sshd was up: {e}"));
    let output = within("exec", connection.exec("echo up"))
        .await
        .expect("exec works");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "up\n");
}
