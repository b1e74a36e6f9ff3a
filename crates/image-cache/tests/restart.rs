//! The cache as a separate process (`podfleet-cache`): SIGKILL in the middle of a blob
//! download leaves nothing that is served, and after a restart with the upstream down the
//! cached tag is still served.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use sha2::Digest as _;

fn partial_bytes(storage: &Path) -> u64 {
    std::fs::read_dir(storage.join("tmp"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.metadata().map(|m| m.len()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_download_serves_nothing_partial_and_restart_serves_the_cache_offline() {
    let Seeded {
        mut registry,
        work,
        direct,
        manifest,
    } = Seeded::busybox().await;
    let (layer, layer_size) = largest_layer(&manifest);
    let link = SlowLink::start(registry.address, layer_size / 3).await;
    let storage = work.path().join("storage");
    let blob_path = format!("/v2/registry-a/library/busybox/blobs/{layer}");

    // Kill the cache while it writes the layer.
    let cache = CacheProcess::start(&storage, link.address, &[]).await;
    let client = tokio::spawn({
        let url = format!("http://{}{blob_path}", cache.address);
        async move { reqwest::get(&url).await?.bytes().await }
    });
    wait_until("part of the layer on disk", Duration::from_secs(20), || {
        partial_bytes(&storage) > 0
    })
    .await;
    cache.sigkill();
    assert!(
        client.await.unwrap().is_err(),
        "the client saw the download break, not a complete blob"
    );
    let committed = storage
        .join("blobs/sha256")
        .join(layer.strip_prefix("sha256:").unwrap());
    assert!(!committed.exists(), "nothing committed");

    // Restart with the upstream down: the partial file is gone and never served.
    registry.stop();
    let cache = CacheProcess::start(&storage, link.address, &[]).await;
    assert_eq!(std::fs::read_dir(storage.join("tmp")).unwrap().count(), 0);
    let response = reqwest::get(format!("http://{}{blob_path}", cache.address))
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(error_code(&response.text().await.unwrap()), "UNAVAILABLE");

    // Upstream back: a full pull fills the cache.
    registry.restart().await;
    let image = format!("{}/registry-a/library/busybox:latest", cache.address);
    skopeo_copy(&image, &work.path().join("filled"))
        .await
        .unwrap();
    let body = reqwest::get(format!("http://{}{blob_path}", cache.address))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))),
        layer
    );
    cache.sigkill();

    // Restart while the upstream is down: the cached tag (TTL 0, so revalidation is tried
    // and fails) and its blobs are served; an uncached tag is a 5xx, not a 404.
    registry.stop();
    let cache = CacheProcess::start(&storage, link.address, &[]).await;
    let image = format!("{}/registry-a/library/busybox:latest", cache.address);
    skopeo_copy(&image, &work.path().join("offline"))
        .await
        .unwrap();
    for (digest, _) in blob_digests(&manifest) {
        let name = digest.strip_prefix("sha256:").unwrap();
        assert_eq!(
            std::fs::read(work.path().join("offline").join(name)).unwrap(),
            std::fs::read(direct.join(name)).unwrap()
        );
    }
    let metrics = reqwest::get(format!("http://{}/metrics", cache.address))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metric_value(&metrics, "podfleet_cache_stale_served_total") >= 1);
    let response = reqwest::get(format!(
        "http://{}/v2/registry-a/library/busybox/manifests/other",
        cache.address
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), 502);
}
