//! The cache under upstream faults and hostile input: token and basic auth, upstream down /
//! hanging / slow, malformed manifests, digest mismatches, traversal names, uploads,
//! quota eviction and a full disk.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine as _;
use common::*;
use http::{StatusCode, header};

#[derive(Clone, Copy, PartialEq)]
enum AuthMode {
    Bearer,
    Basic,
}

#[derive(Clone)]
struct GatewayState {
    mode: AuthMode,
    address: SocketAddr,
    target: SocketAddr,
    token_requests: Arc<AtomicU64>,
    client: reqwest::Client,
}

const USER: &str = "robot";
const PASSWORD: &str = "s3cret-pass";
const TOKEN: &str = "issued-token-1";

/// A registry front that demands authentication the way Docker Hub (bearer: a token from a
/// realm, scoped per repository) or a basic-auth registry does, forwarding to distribution.
struct AuthGateway {
    address: SocketAddr,
    token_requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl AuthGateway {
    async fn start(target: SocketAddr, mode: AuthMode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let token_requests = Arc::new(AtomicU64::new(0));
        let state = GatewayState {
            mode,
            address,
            target,
            token_requests: token_requests.clone(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        };
        let router = axum::Router::new().fallback(gateway).with_state(state);
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Self {
            address,
            token_requests,
            task,
        }
    }
}

impl Drop for AuthGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn gateway(State(state): State<GatewayState>, request: Request) -> Response {
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    );
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let path = request.uri().path().to_owned();
    if path == "/token" {
        state.token_requests.fetch_add(1, Ordering::Relaxed);
        if authorization != basic {
            return Response::builder().status(401).body(Body::empty()).unwrap();
        }
        return Response::new(Body::from(format!(
            "{{\"token\":\"{TOKEN}\",\"expires_in\":300}}"
        )));
    }
    let allowed = match state.mode {
        AuthMode::Bearer => authorization == format!("Bearer {TOKEN}"),
        AuthMode::Basic => authorization == basic,
    };
    if !allowed {
        let challenge = match state.mode {
            AuthMode::Bearer => format!(
                "Bearer realm=\"http://{}/token\",service=\"test-registry\",scope=\"repository:x:pull\"",
                state.address
            ),
            AuthMode::Basic => "Basic realm=\"test-registry\"".to_owned(),
        };
        return Response::builder()
            .status(401)
            .header(header::WWW_AUTHENTICATE, challenge)
            .body(Body::from("{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"authentication required\"}]}"))
            .unwrap();
    }
    let url = format!(
        "http://{}{}",
        state.target,
        request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let mut forward = state.client.request(request.method().clone(), url);
    if let Some(accept) = request.headers().get(header::ACCEPT) {
        forward = forward.header(header::ACCEPT, accept);
    }
    let upstream = forward.send().await.unwrap();
    let mut response = Response::builder().status(upstream.status().as_u16());
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::LOCATION,
        header::HeaderName::from_static("docker-content-digest"),
    ] {
        if let Some(value) = upstream.headers().get(&name) {
            response = response.header(name, value.clone());
        }
    }
    response
        .body(Body::from_stream(upstream.bytes_stream()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_bearer_token_flow_and_basic_auth() {
    let registry = Registry::start().await;
    registry.seed("private/busybox:1").await;
    let work = tempfile::tempdir().unwrap();
    let credentials = work.path().join("credentials");
    std::fs::write(&credentials, format!("{USER}:{PASSWORD}\n")).unwrap();
    let wrong = work.path().join("wrong");
    std::fs::write(&wrong, format!("{USER}:not-the-password\n")).unwrap();

    let bearer = AuthGateway::start(registry.address, AuthMode::Bearer).await;
    let with_credentials = |address: SocketAddr, file: &std::path::Path| {
        format!(
            "{}credentials_file = \"{}\"\n",
            upstream_config("private-registry", address),
            file.display()
        )
    };
    let cache = Cache::start(&with_credentials(bearer.address, &credentials)).await;
    skopeo_copy(
        &format!("{}/private-registry/private/busybox:1", cache.address),
        &work.path().join("bearer"),
    )
    .await
    .unwrap();
    assert_eq!(
        bearer.token_requests.load(Ordering::Relaxed),
        1,
        "one token, cached for the repository scope"
    );

    let anonymous = Cache::start(&upstream_config("private-registry", bearer.address)).await;
    let response = get(&anonymous.url("/v2/private-registry/private/busybox/manifests/1")).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(&response.text().await.unwrap()), "DENIED");

    let denied = Cache::start(&with_credentials(bearer.address, &wrong)).await;
    let response = get(&denied.url("/v2/private-registry/private/busybox/manifests/1")).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body = response.text().await.unwrap();
    assert_eq!(error_code(&body), "DENIED");
    assert!(
        body.contains("credentials_file") && !body.contains("not-the-password"),
        "{body}"
    );

    let basic = AuthGateway::start(registry.address, AuthMode::Basic).await;
    let cache = Cache::start(&with_credentials(basic.address, &credentials)).await;
    skopeo_copy(
        &format!("{}/private-registry/private/busybox:1", cache.address),
        &work.path().join("basic"),
    )
    .await
    .unwrap();
    assert_eq!(basic.token_requests.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_hanging_or_slow_serves_the_cached_tag_or_fails_with_5xx() {
    let Seeded {
        mut registry,
        work,
        direct,
        manifest,
    } = Seeded::busybox().await;
    let cache = Cache::start(&format!(
        "tag_ttl = \"0s\"\nconnect_timeout = \"1s\"\nresponse_timeout = \"1s\"\n{}",
        upstream_config("registry-a", registry.address)
    ))
    .await;
    let image = format!("{}/registry-a/library/busybox:latest", cache.address);
    skopeo_copy(&image, &work.path().join("warm"))
        .await
        .unwrap();
    assert_eq!(cache.metric("podfleet_cache_stale_served_total"), 0);

    // Down: connection refused.
    registry.stop();
    skopeo_copy(&image, &work.path().join("refused"))
        .await
        .unwrap();
    let stale_after_refused = cache.metric("podfleet_cache_stale_served_total");
    assert!(stale_after_refused >= 1);
    let response = get(&cache.url("/v2/registry-a/library/never-cached/manifests/1")).await;
    assert_eq!(
        response.status(),
        StatusCode::BAD_GATEWAY,
        "an outage is not a 404"
    );
    assert_eq!(error_code(&response.text().await.unwrap()), "UNAVAILABLE");

    // Hanging: accepts TCP, never answers; the response deadline (1 s) bounds the wait.
    let blackhole = Blackhole::start(registry.address).await;
    skopeo_copy(&image, &work.path().join("hanging"))
        .await
        .unwrap();
    assert!(cache.metric("podfleet_cache_stale_served_total") > stale_after_refused);
    let response = get(&cache.url("/v2/registry-a/library/never-cached/manifests/1")).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    drop(blackhole);

    // Back up: revalidation reaches the upstream again and nothing is served stale.
    registry.restart().await;
    let stale = cache.metric("podfleet_cache_stale_served_total");
    let revalidations = cache.metric("podfleet_cache_revalidations_total");
    skopeo_copy(&image, &work.path().join("recovered"))
        .await
        .unwrap();
    assert_eq!(cache.metric("podfleet_cache_stale_served_total"), stale);
    assert!(cache.metric("podfleet_cache_revalidations_total") > revalidations);
    let response = get(&cache.url("/v2/registry-a/library/never-cached/manifests/1")).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        error_code(&response.text().await.unwrap()),
        "MANIFEST_UNKNOWN"
    );

    // Slow: a cold pull over a slow link completes with the right content.
    let (_, layer_size) = largest_layer(&manifest);
    let link = SlowLink::start(registry.address, layer_size).await;
    let slow_cache = Cache::start(&upstream_config("registry-a", link.address)).await;
    let slow = work.path().join("slow");
    skopeo_copy(
        &format!("{}/registry-a/library/busybox:latest", slow_cache.address),
        &slow,
    )
    .await
    .unwrap();
    for (digest, _) in blob_digests(&manifest) {
        let name = digest.strip_prefix("sha256:").unwrap();
        assert_eq!(
            std::fs::read(slow.join(name)).unwrap(),
            std::fs::read(direct.join(name)).unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_with_registry_errors_and_never_stored() {
    let seeded = Seeded::busybox().await;
    let registry = &seeded.registry;
    let cache = Cache::start(&upstream_config("registry-a", registry.address)).await;
    let request = |method: &str, path: &str, extra: &str| {
        format!("{method} {path} HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n{extra}\r\n")
    };

    for (path, code) in [
        ("/v2/registry-a/../../etc/manifests/latest", "NAME_INVALID"),
        (
            "/v2/registry-a/%2e%2e/%2e%2e/etc/manifests/latest",
            "NAME_INVALID",
        ),
        (
            "/v2/registry-a/library/Busybox/manifests/latest",
            "NAME_INVALID",
        ),
        (
            "/v2/registry-a/library/busybox/manifests/..%2f..%2fpasswd",
            "TAG_INVALID",
        ),
        (
            "/v2/registry-a/library/busybox/blobs/sha256:..%2f..%2fetc%2fpasswd",
            "DIGEST_INVALID",
        ),
        (
            "/v2/registry-a/library/busybox/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            "DIGEST_INVALID",
        ),
    ] {
        let (status, body) = raw_request(cache.address, &request("GET", path, "")).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(error_code(&body), code, "{path}");
    }
    // Uploads are refused before a byte of the (announced 10 GiB) body is read.
    for (method, path) in [
        ("POST", "/v2/registry-a/library/busybox/blobs/uploads/"),
        ("PUT", "/v2/registry-a/library/busybox/manifests/latest"),
    ] {
        let (status, body) = raw_request(
            cache.address,
            &request(method, path, "Content-Length: 10737418240\r\n"),
        )
        .await;
        assert_eq!(status, 405, "{method} {path}: {body}");
        assert_eq!(error_code(&body), "UNSUPPORTED");
    }
    assert_eq!(
        cache.metric("podfleet_cache_upstream_requests_total"),
        0,
        "nothing hostile reached the upstream"
    );

    // A malformed manifest served by the upstream (planted in its storage: distribution
    // validates pushes, not reads).
    let malformed = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:../../../etc/passwd","size":1},"layers":[]}"#;
    let malformed_digest = registry.plant_manifest("library/evil", "latest", malformed);
    let response = get(&cache.url("/v2/registry-a/library/evil/manifests/latest")).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        error_code(&response.text().await.unwrap()),
        "MANIFEST_INVALID"
    );
    let response = get(&cache.url(&format!(
        "/v2/registry-a/library/evil/manifests/{malformed_digest}"
    )))
    .await;
    assert_eq!(
        error_code(&response.text().await.unwrap()),
        "MANIFEST_INVALID"
    );
    assert_eq!(cache.stored("manifests/sha256"), 0, "nothing stored");
    assert_eq!(cache.stored("tags"), 0);

    // A manifest whose bytes do not match the digest the upstream announces.
    let good = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","size":1},"layers":[]}"#;
    let good_digest = registry.plant_manifest("library/swapped", "latest", good);
    let tampered = String::from_utf8(good.to_vec())
        .unwrap()
        .replace("\"size\":1", "\"size\":2");
    std::fs::write(registry.blob_file(&good_digest), tampered).unwrap();
    let response = get(&cache.url("/v2/registry-a/library/swapped/manifests/latest")).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        error_code(&response.text().await.unwrap()),
        "DIGEST_INVALID"
    );
    assert_eq!(cache.stored("manifests/sha256"), 0, "nothing stored");

    // A blob whose content does not match its digest: the client never gets a complete body.
    let (layer, _) = largest_layer(&seeded.manifest);
    let file = registry.blob_file(&layer);
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let response = get(&cache.url(&format!("/v2/registry-a/library/busybox/blobs/{layer}"))).await;
    assert!(
        response.bytes().await.is_err(),
        "a corrupt blob must not arrive complete"
    );
    let response = get(&cache.url(&format!("/v2/registry-a/library/busybox/blobs/{layer}"))).await;
    assert!(response.status() == StatusCode::BAD_GATEWAY || response.bytes().await.is_err());
    assert!(!cache.has_blob(&layer));
    assert_eq!(cache.stored("tmp"), 0, "the rejected download is gone");
    assert!(cache.metric("podfleet_cache_rejected_total") >= 4);
}

/// A tmpfs mounted for the test and unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        run(std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path()));
        Self { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_evicts_least_recently_used_and_no_room_degrades_to_pass_through() {
    let Seeded {
        registry,
        work,
        direct,
        manifest,
    } = Seeded::busybox().await;
    let blobs = blob_digests(&manifest);
    let (layer, layer_size) = largest_layer(&manifest);
    let config_size = blobs.iter().find(|(digest, _)| *digest != layer).unwrap().1;
    let image = |cache: &Cache| format!("{}/registry-a/library/busybox:latest", cache.address);

    // Room for the layer and the config, not for the manifest too: the manifest (least
    // recently used) is evicted when the layer arrives; the pull still succeeds.
    let max_size = layer_size + config_size + 16;
    let cache = Cache::start(&format!(
        "max_size = \"{max_size}\"\n{}",
        upstream_config("registry-a", registry.address)
    ))
    .await;
    skopeo_copy(&image(&cache), &work.path().join("quota"))
        .await
        .unwrap();
    assert!(cache.metric("podfleet_cache_evictions_total") >= 1);
    assert!(cache.metric("podfleet_cache_stored_bytes") <= max_size);
    assert!(cache.has_blob(&layer));
    assert_eq!(
        cache.stored("manifests/sha256"),
        0,
        "the manifest was evicted"
    );
    skopeo_copy(&image(&cache), &work.path().join("again"))
        .await
        .unwrap();
    assert_eq!(
        cache.metric("podfleet_cache_misses_total{type=\"manifest\"}"),
        2,
        "the evicted manifest was fetched again"
    );

    // A layer bigger than the quota is passed through, uncached.
    let tiny = Cache::start(&format!(
        "max_size = \"{}\"\n{}",
        layer_size / 2,
        upstream_config("registry-a", registry.address)
    ))
    .await;
    skopeo_copy(&image(&tiny), &work.path().join("tiny"))
        .await
        .unwrap();
    assert!(tiny.metric("podfleet_cache_passthrough_total") >= 1);
    assert!(!tiny.has_blob(&layer));
    let pulled = std::fs::read(
        work.path()
            .join("tiny")
            .join(layer.strip_prefix("sha256:").unwrap()),
    )
    .unwrap();
    assert_eq!(
        pulled,
        std::fs::read(direct.join(layer.strip_prefix("sha256:").unwrap())).unwrap()
    );

    // A file system with less free space than the layer: pass-through, not failure.
    let disk = SmallDisk::mount(&format!("{}", layer_size / 2));
    let full = Cache::start_in(
        disk.dir.path(),
        &upstream_config("registry-a", registry.address),
    )
    .await;
    skopeo_copy(&image(&full), &work.path().join("full"))
        .await
        .unwrap();
    assert!(full.metric("podfleet_cache_passthrough_total") >= 1);
    assert!(!full.has_blob(&layer));
    drop(full);
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authentication_when_a_users_file_is_configured() {
    use sha2::Digest as _;
    let registry = Registry::start().await;
    registry.seed("library/busybox:latest").await;
    let work = tempfile::tempdir().unwrap();
    let users = work.path().join("users");
    let hash = hex::encode(sha2::Sha256::digest(b"ci-pass"));
    std::fs::write(&users, format!("# executors\nci:sha256:{hash}\n")).unwrap();
    let cache = Cache::start(&format!(
        "[client_auth]\nusers_file = \"{}\"\n{}",
        users.display(),
        upstream_config("registry-a", registry.address)
    ))
    .await;
    let response = get(&cache.url("/v2/")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
    let response = get(&cache.url("/v2/registry-a/library/busybox/manifests/latest")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&response.text().await.unwrap()), "UNAUTHORIZED");
    assert_eq!(cache.metric("podfleet_cache_upstream_requests_total"), 0);

    let image = format!(
        "docker://{}/registry-a/library/busybox:latest",
        cache.address
    );
    let copy = |credentials: &'static str, dir: std::path::PathBuf| {
        let image = image.clone();
        async move {
            run_async(tokio::process::Command::new("skopeo").args([
                "copy",
                "-q",
                "--src-tls-verify=false",
                "--src-creds",
                credentials,
                &image,
                &format!("dir:{}", dir.display()),
            ]))
            .await
        }
    };
    std::fs::create_dir_all(work.path().join("wrong")).unwrap();
    assert!(
        copy("ci:wrong-pass", work.path().join("wrong"))
            .await
            .is_err()
    );
    std::fs::create_dir_all(work.path().join("right")).unwrap();
    copy("ci:ci-pass", work.path().join("right")).await.unwrap();
    assert!(dir_manifest(&work.path().join("right"))["layers"].is_array());
}
