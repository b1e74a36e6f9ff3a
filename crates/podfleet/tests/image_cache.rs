//! The local provider points its instances at podfleet's image cache: a pipeline job whose
//! image lives only upstream (Debian's docker-registry on 127.0.0.1, behind a registry name
//! that does not resolve) is pulled by the instance's rootless Podman through the cache.

#[path = "../../image-cache/tests/common/mod.rs"]
mod common;
mod support;

use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_pull_job_images_through_the_cache() {
    let upstream = common::Registry::start().await;
    upstream.seed("podfleet/cached-busybox:1").await;
    // `registry.podfleet.invalid` never resolves: the pull can only succeed via the mirror.
    let cache = common::Cache::start(&format!(
        "[[upstream]]\nprefix = \"registry.podfleet.invalid\"\nurl = \"http://{}\"\n",
        upstream.address
    ))
    .await;

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let plugin = format!(
        "image_cache = \"{}\"\nimage_cache_registries = [\"registry.podfleet.invalid\"]",
        cache.address
    );
    let config = support::LocalRunner {
        name: "cached",
        group: "pfcache",
        url: "http://127.0.0.1/",
        token: "glrt-cache-Tok3n-0c0c",
        password: "cache-Pa55word-x9",
        global: "",
        plugin: &plugin,
    }
    .write(dir.path());
    let pipeline = dir.path().join("pipeline.yml");
    std::fs::write(
        &pipeline,
        "through-cache:\n  image: registry.podfleet.invalid/podfleet/cached-busybox:1\n  script:\n    - echo pulled-through-the-cache\n",
    )
    .unwrap();
    let output = tokio::task::spawn_blocking({
        let (pipeline, config, socket) =
            (pipeline.clone(), config.clone(), dir.path().join("s.sock"));
        move || {
            Command::new(env!("CARGO_BIN_EXE_podfleet"))
                .args(["pipeline", "--file"])
                .arg(&pipeline)
                .arg("--config")
                .arg(&config)
                .arg("--status-socket")
                .arg(&socket)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{all}");
    assert!(all.contains("pulled-through-the-cache"), "{all}");
    assert!(
        cache.metric("podfleet_cache_misses_total{type=\"blob\"}") >= 1,
        "the layers did not come through the cache:\n{}",
        cache.app.metrics.render()
    );
    assert!(cache.metric("podfleet_cache_upstream_bytes_total") > 0);
}
