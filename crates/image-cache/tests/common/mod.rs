//! Test harness: Debian's real `docker-registry` (distribution 2.8) as the upstream on
//! 127.0.0.1, seeded with the locally built busybox image by skopeo; the cache in-process or
//! as the `podfleet-cache` binary; skopeo and podman as clients; and the faults a real
//! network has (refusing, hanging, slow links, a token-auth front) as small TCP/HTTP pieces.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use podfleet_image_cache::config::{Config, Overrides};
use podfleet_image_cache::server::{App, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const SOURCE_IMAGE: &str = "containers-storage:localhost/podfleet/busybox:latest";

/// Polls `condition` until it holds or `deadline` passes (then panics with `what`).
pub async fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !condition() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The busybox image as an OCI layout (layers compressed once), so seeding a registry is a
/// plain copy. Kept under the image's ID in the temp dir and shared by test binaries and
/// runs: one small directory, rebuilt only when setup-host.sh rebuilds the image.
fn seed_layout() -> &'static Path {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let image = SOURCE_IMAGE.strip_prefix("containers-storage:").unwrap();
        let id =
            run(Command::new("podman").args(["image", "inspect", "--format", "{{.Id}}", image]));
        let dir = std::env::temp_dir().join(format!("podfleet-image-cache-seed-{}", id.trim()));
        if dir.join("index.json").exists() {
            return dir;
        }
        let partial = dir.with_extension(format!("{}.part", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        run(Command::new("skopeo").args([
            "copy",
            "-q",
            "--dest-compress",
            "--dest-compress-format",
            "gzip",
            SOURCE_IMAGE,
            &format!("oci:{}:busybox", partial.display()),
        ]));
        // Another test binary may have won the race: its copy is as good as ours.
        if std::fs::rename(&partial, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        dir
    })
}

pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub async fn run_async(command: &mut tokio::process::Command) -> Result<String, String> {
    let output = command
        .output()
        .await
        .map_err(|error| format!("cannot run {command:?}: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// `docker-registry serve` with its own config and storage, killed on drop.
pub struct Registry {
    pub address: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Registry {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = Self {
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            child: None,
        };
        registry.restart().await;
        registry
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// (Re)starts, on the previous port when there was one.
    pub async fn restart(&mut self) {
        for _attempt in 0..5 {
            let port = if self.address.port() == 0 {
                free_port()
            } else {
                self.address.port()
            };
            self.address = SocketAddr::from(([127, 0, 0, 1], port));
            let config = self.dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog: {{level: warn, formatter: text}}\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp: {{addr: {}}}\n",
                    self.data().display(),
                    self.address
                ),
            )
            .unwrap();
            let log = std::fs::File::create(self.dir.path().join("registry.log")).unwrap();
            let mut child = Command::new("/usr/bin/docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("docker-registry is installed (apt-get install docker-registry)");
            let url = format!("http://{}/v2/", self.address);
            let end = Instant::now() + Duration::from_secs(20);
            while Instant::now() < end {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if reqwest::get(&url)
                    .await
                    .is_ok_and(|response| response.status().is_success())
                {
                    self.child = Some(child);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "docker-registry did not start: {}",
            std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn seed(&self, repository_and_tag: &str) {
        run_async(tokio::process::Command::new("skopeo").args([
            "copy",
            "-q",
            "--dest-tls-verify=false",
            &format!("oci:{}:busybox", seed_layout().display()),
            &format!("docker://{}/{repository_and_tag}", self.address),
        ]))
        .await
        .unwrap();
    }

    /// The file distribution serves for a blob (to corrupt it).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.data().join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }

    /// Stores `manifest` as-is (no validation, unlike a push) and points `repository:tag` at it.
    pub fn plant_manifest(&self, repository: &str, tag: &str, manifest: &[u8]) -> String {
        let digest = podfleet_image_cache::reference::Digest::of(manifest);
        let hex = digest.hex().to_owned();
        let blob = self.blob_file(&digest.to_string());
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, manifest).unwrap();
        let repo = self.data().join(format!(
            "docker/registry/v2/repositories/{repository}/_manifests"
        ));
        for link in [
            format!("revisions/sha256/{hex}/link"),
            format!("tags/{tag}/current/link"),
            format!("tags/{tag}/index/sha256/{hex}/link"),
        ] {
            let path = repo.join(link);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, digest.to_string()).unwrap();
        }
        digest.to_string()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The cache in this process on 127.0.0.1:<free port>.
pub struct Cache {
    pub address: SocketAddr,
    pub app: Arc<App>,
    pub storage: PathBuf,
    _storage_dir: Option<tempfile::TempDir>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Cache {
    /// `config` is the TOML body without `storage`, which the cache gets fresh.
    pub async fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = Self::start_in(dir.path(), config).await;
        cache._storage_dir = Some(dir);
        cache
    }

    pub async fn start_in(storage: &Path, config: &str) -> Self {
        let text = format!(
            "storage = \"{}\"\nmin_free_space = \"0\"\n{config}",
            storage.display()
        );
        let config = Config::parse(&text, "test config", &Overrides::default()).unwrap();
        let app = App::new(&config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (sender, receiver) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn({
            let app = app.clone();
            async move {
                serve(app, listener, async {
                    let _ = receiver.await;
                })
                .await
                .unwrap();
            }
        });
        Self {
            address,
            app,
            storage: storage.to_owned(),
            _storage_dir: None,
            shutdown: Some(sender),
            task: Some(task),
        }
    }

    pub fn metric(&self, name: &str) -> u64 {
        metric_value(&self.app.metrics.render(), name)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.storage
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap())
            .exists()
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The value of a sample line `name value` (labels included in `name`) in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

/// `skopeo copy docker://<source> dir:<dir>` (plain HTTP).
pub async fn skopeo_copy(source: &str, dir: &Path) -> Result<String, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    run_async(tokio::process::Command::new("skopeo").args([
        "copy",
        "-q",
        "--src-tls-verify=false",
        &format!("docker://{source}"),
        &format!("dir:{}", dir.display()),
    ]))
    .await
}

pub fn dir_manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// (digest, size) of the config and every layer.
pub fn blob_digests(manifest: &serde_json::Value) -> Vec<(String, u64)> {
    std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().unwrap())
        .map(|descriptor| {
            (
                descriptor["digest"].as_str().unwrap().to_owned(),
                descriptor["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The image's largest layer: (digest, size).
pub fn largest_layer(manifest: &serde_json::Value) -> (String, u64) {
    blob_digests(manifest)
        .into_iter()
        .max_by_key(|(_, size)| *size)
        .unwrap()
}

/// Accepts TCP connections and never answers: an upstream that hangs.
pub struct Blackhole {
    pub address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start(address: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        Self { address, task }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP relay to `target` that sends server → client bytes at `bytes_per_second`:
/// a slow upstream link. Counts the bytes it relayed from the server.
pub struct SlowLink {
    pub address: SocketAddr,
    pub relayed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowLink {
    pub async fn start(target: SocketAddr, bytes_per_second: u64) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let relayed = Arc::new(AtomicU64::new(0));
        let counter = relayed.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                connections.spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upload = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                        let _ = server_write.shutdown().await;
                    });
                    let chunk = (bytes_per_second / 20).max(1) as usize;
                    let mut buffer = vec![0; chunk];
                    while let Ok(read) = server_read.read(&mut buffer).await {
                        if read == 0 || client_write.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                        counter.fetch_add(read as u64, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_secs_f64(
                            read as f64 / bytes_per_second as f64,
                        ))
                        .await;
                    }
                    let _ = client_write.shutdown().await;
                    upload.abort();
                });
            }
        });
        Self {
            address,
            relayed,
            task,
        }
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends one raw HTTP/1.1 request (paths exactly as written: no client-side `..` cleanup)
/// and returns the status and body.
pub async fn raw_request(address: SocketAddr, request_head: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request_head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The registry error code of a JSON error body.
pub fn error_code(body: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|error| panic!("not error JSON ({error}): {body}"));
    value["errors"][0]["code"].as_str().unwrap().to_owned()
}

pub async fn get(url: &str) -> reqwest::Response {
    reqwest::Client::new().get(url).send().await.unwrap()
}

/// The `podfleet-cache` binary as a child process (killed on drop).
pub struct CacheProcess {
    pub address: SocketAddr,
    child: Child,
}

impl CacheProcess {
    pub async fn start(storage: &Path, upstream: SocketAddr, extra_args: &[&str]) -> Self {
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(storage.with_extension("log"))
            .unwrap();
        let mut child = Command::new(
            // Set for this crate's own tests; other crates reuse the harness without it.
            match option_env!("CARGO_BIN_EXE_podfleet-cache") {
                Some(binary) => binary,
                None => panic!("the podfleet-cache binary exists in image-cache's tests only"),
            },
        )
        .arg("--listen")
        .arg(address.to_string())
        .arg("--storage")
        .arg(storage)
        .arg("--upstream")
        .arg(format!("registry-a=http://{upstream}"))
        .args(["--tag-ttl", "0s"])
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
        // Listening is enough: the cache may serve TLS, which this probe does not speak.
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(address).await.is_ok() {
                return Self { address, child };
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "podfleet-cache exited: {}",
                std::fs::read_to_string(storage.with_extension("log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("podfleet-cache did not start listening on {address}");
    }

    pub fn sigkill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for CacheProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `[[upstream]]` TOML for a cache config.
pub fn upstream_config(prefix: &str, address: SocketAddr) -> String {
    format!("[[upstream]]\nprefix = \"{prefix}\"\nurl = \"http://{address}\"\n")
}

/// A registry holding `library/busybox:latest`, and that image as pulled directly
/// (skopeo `dir:` copy in `direct`) to compare against and to learn its digests.
pub struct Seeded {
    pub registry: Registry,
    pub work: tempfile::TempDir,
    pub direct: PathBuf,
    pub manifest: serde_json::Value,
}

impl Seeded {
    pub async fn busybox() -> Self {
        let registry = Registry::start().await;
        registry.seed("library/busybox:latest").await;
        let work = tempfile::tempdir().unwrap();
        let direct = work.path().join("direct");
        skopeo_copy(
            &format!("{}/library/busybox:latest", registry.address),
            &direct,
        )
        .await
        .unwrap();
        let manifest = dir_manifest(&direct);
        Self {
            registry,
            work,
            direct,
            manifest,
        }
    }

    /// The directly pulled bytes of a blob.
    pub fn blob(&self, digest: &str) -> Vec<u8> {
        std::fs::read(self.direct.join(digest.strip_prefix("sha256:").unwrap())).unwrap()
    }
}

impl Cache {
    /// How many entries a storage subdirectory (`manifests/sha256`, `tags`, `tmp`) holds.
    pub fn stored(&self, subdir: &str) -> usize {
        std::fs::read_dir(self.storage.join(subdir))
            .unwrap()
            .count()
    }
}
