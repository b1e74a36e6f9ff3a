//! Pulls through the cache with real clients (skopeo, podman) from a real upstream
//! (distribution 2.8): cold and warm, routing to several upstreams, shared downloads.

mod common;

use std::time::Duration;

use common::*;
use podfleet_image_cache::{MirrorRoute, render_registries_conf_dropin};
use sha2::Digest as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_then_warm_pull_with_skopeo_and_podman() {
    let Seeded {
        registry,
        work,
        direct,
        manifest,
    } = Seeded::busybox().await;
    let cache = Cache::start(&upstream_config("registry-a", registry.address)).await;
    let blobs = blob_digests(&manifest);
    let blob_bytes: u64 = blobs.iter().map(|(_, size)| size).sum();

    let cold = work.path().join("cold");
    skopeo_copy(
        &format!("{}/registry-a/library/busybox:latest", cache.address),
        &cold,
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(cold.join("manifest.json")).unwrap(),
        std::fs::read(direct.join("manifest.json")).unwrap(),
        "manifest bytes preserved"
    );
    for (digest, _) in &blobs {
        let name = digest.strip_prefix("sha256:").unwrap();
        assert_eq!(
            std::fs::read(cold.join(name)).unwrap(),
            std::fs::read(direct.join(name)).unwrap()
        );
        assert!(cache.has_blob(digest), "{digest} cached");
    }
    assert_eq!(
        cache.metric("podfleet_cache_misses_total{type=\"blob\"}"),
        blobs.len() as u64
    );
    assert_eq!(
        cache.metric("podfleet_cache_misses_total{type=\"manifest\"}"),
        1
    );
    let upstream_bytes = cache.metric("podfleet_cache_upstream_bytes_total");
    assert!(
        upstream_bytes >= blob_bytes && upstream_bytes < blob_bytes + 16 * 1024,
        "each blob fetched once: {upstream_bytes} vs {blob_bytes}"
    );
    let upstream_requests = cache.metric("podfleet_cache_upstream_requests_total");

    let warm = work.path().join("warm");
    skopeo_copy(
        &format!("{}/registry-a/library/busybox:latest", cache.address),
        &warm,
    )
    .await
    .unwrap();
    assert_eq!(
        cache.metric("podfleet_cache_upstream_requests_total"),
        upstream_requests,
        "a warm pull within the tag TTL never reaches the upstream"
    );
    assert_eq!(
        cache.metric("podfleet_cache_hits_total{type=\"blob\"}"),
        blobs.len() as u64
    );

    // Podman through the registries.conf drop-in the local provider will install; the
    // origin does not resolve, so the image can only come from the cache.
    let dropin = render_registries_conf_dropin(
        &cache.address.to_string(),
        &[MirrorRoute {
            registry: "registry.invalid".into(),
            cache_prefix: "registry-a".into(),
        }],
        true,
    )
    .unwrap();
    let registries_conf = work.path().join("registries.conf");
    std::fs::write(&registries_conf, dropin).unwrap();
    let podman = |args: &[&str]| {
        let mut command = tokio::process::Command::new("podman");
        command
            .env("CONTAINERS_REGISTRIES_CONF", &registries_conf)
            .arg("--root")
            .arg(work.path().join("podman-root"))
            .arg("--runroot")
            .arg(work.path().join("podman-run"))
            .args(["--storage-driver", "vfs", "--events-backend", "none"])
            .args(args);
        command
    };
    run_async(&mut podman(&[
        "pull",
        "-q",
        "registry.invalid/library/busybox:latest",
    ]))
    .await
    .unwrap();
    let images = run_async(&mut podman(&[
        "images",
        "--format",
        "{{.Repository}}:{{.Tag}} {{.Digest}}",
    ]))
    .await
    .unwrap();
    let manifest_digest = format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(
            std::fs::read(direct.join("manifest.json")).unwrap()
        ))
    );
    assert!(
        images.contains("registry.invalid/library/busybox:latest")
            && images.contains(&manifest_digest),
        "{images}"
    );
    assert_eq!(
        cache.metric("podfleet_cache_upstream_requests_total"),
        upstream_requests,
        "podman's pull was warm too"
    );
    let _ = std::process::Command::new("podman")
        .arg("--root")
        .arg(work.path().join("podman-root"))
        .arg("--runroot")
        .arg(work.path().join("podman-run"))
        .args(["--storage-driver", "vfs", "rmi", "-a", "-f"])
        .output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_first_path_component_to_several_upstreams_and_docker_hub() {
    let registry_a = Registry::start().await;
    let registry_b = Registry::start().await;
    registry_a.seed("library/busybox:latest").await;
    registry_b.seed("team/tools:v1").await;
    let cache = Cache::start(&format!(
        "{}{}[docker_hub]\nurl = \"http://{}\"\n",
        upstream_config("registry-a", registry_a.address),
        upstream_config("registry-b.example", registry_b.address),
        registry_a.address
    ))
    .await;
    let work = tempfile::tempdir().unwrap();
    skopeo_copy(
        &format!("{}/registry-b.example/team/tools:v1", cache.address),
        &work.path().join("b"),
    )
    .await
    .unwrap();
    skopeo_copy(
        &format!("{}/registry-a/library/busybox:latest", cache.address),
        &work.path().join("a"),
    )
    .await
    .unwrap();
    // Docker's registry-mirrors form: un-prefixed, official images without `library/`.
    skopeo_copy(
        &format!("{}/busybox:latest", cache.address),
        &work.path().join("hub"),
    )
    .await
    .unwrap();
    skopeo_copy(
        &format!("{}/docker.io/library/busybox:latest", cache.address),
        &work.path().join("hub2"),
    )
    .await
    .unwrap();
    // The repository exists only on B: A must not be asked for it.
    let wrong = skopeo_copy(
        &format!("{}/registry-a/team/tools:v1", cache.address),
        &work.path().join("wrong"),
    )
    .await;
    assert!(wrong.is_err());
    // containerd's `?ns=` form.
    let response = get(&cache.url("/v2/team/tools/manifests/v1?ns=registry-b.example")).await;
    assert_eq!(response.status(), 200);
    // No open proxy: an unconfigured prefix is unknown, not forwarded anywhere.
    let cache_without_hub = Cache::start(&upstream_config("registry-a", registry_a.address)).await;
    let response = get(&cache_without_hub.url("/v2/evil.example/x/manifests/latest")).await;
    assert_eq!(response.status(), 404);
    assert_eq!(error_code(&response.text().await.unwrap()), "NAME_UNKNOWN");
    assert_eq!(
        cache_without_hub.metric("podfleet_cache_upstream_requests_total"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_clients_share_one_download_and_a_disconnect_does_not_stop_it() {
    let seeded = Seeded::busybox().await;
    let (layer, layer_size) = largest_layer(&seeded.manifest);
    let registry = &seeded.registry;
    // A slow link (about 1.5 s for the layer) so the clients really overlap.
    let link = SlowLink::start(registry.address, layer_size * 2 / 3).await;
    let cache = Cache::start(&upstream_config("registry-a", link.address)).await;
    let url = cache.url(&format!("/v2/registry-a/library/busybox/blobs/{layer}"));

    let clients: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let body = get(&url)
                    .await
                    .error_for_status()
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap();
                format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)))
            })
        })
        .collect();
    for client in clients {
        assert_eq!(client.await.unwrap(), layer);
    }
    assert_eq!(
        cache.metric("podfleet_cache_misses_total{type=\"blob\"}"),
        1
    );
    assert_eq!(cache.metric("podfleet_cache_coalesced_waits_total"), 3);
    let relayed = link.relayed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        relayed >= layer_size && relayed < layer_size + 4096,
        "one upstream download for four clients: {relayed} bytes for a {layer_size}-byte layer"
    );

    // A client that goes away mid-blob: the download continues into the cache.
    let cache = Cache::start(&upstream_config("registry-a", link.address)).await;
    let url = cache.url(&format!("/v2/registry-a/library/busybox/blobs/{layer}"));
    let mut response = get(&url).await;
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    assert!((first.len() as u64) < layer_size);
    drop(response);
    wait_until(
        "the abandoned blob to be committed",
        Duration::from_secs(30),
        || cache.has_blob(&layer),
    )
    .await;
    let body = get(&url).await.bytes().await.unwrap();
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))),
        layer
    );
    assert_eq!(cache.metric("podfleet_cache_hits_total{type=\"blob\"}"), 1);
    assert_eq!(
        cache.metric("podfleet_cache_misses_total{type=\"blob\"}"),
        1
    );
}
