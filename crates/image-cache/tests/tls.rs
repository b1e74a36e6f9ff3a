//! HTTPS: the cache started with `--tls-cert/--tls-key` serves skopeo, which verifies the
//! certificate against a CA directory; plain HTTP and unverified clients get nothing.

mod common;

use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_pulls_over_tls_with_a_verified_certificate() {
    let registry = Registry::start().await;
    registry.seed("library/busybox:latest").await;
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let (cert, key) = (work.path().join("cert.pem"), work.path().join("key.pem"));
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=podfleet-cache-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    std::fs::copy(&cert, certs.join("ca.crt")).unwrap();
    let storage = work.path().join("storage");
    let cache = CacheProcess::start(
        &storage,
        registry.address,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let image = format!(
        "docker://{}/registry-a/library/busybox:latest",
        cache.address
    );
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    run_async(tokio::process::Command::new("skopeo").args([
        "copy",
        "-q",
        "--src-cert-dir",
        certs.to_str().unwrap(),
        &image,
        &format!("dir:{}", out.display()),
    ]))
    .await
    .unwrap();
    assert!(dir_manifest(&out)["layers"].is_array());

    // Without the CA the certificate is refused; plain HTTP gets no registry answer.
    let untrusted = work.path().join("untrusted");
    std::fs::create_dir_all(&untrusted).unwrap();
    let refused = run_async(tokio::process::Command::new("skopeo").args([
        "copy",
        "-q",
        &image,
        &format!("dir:{}", untrusted.display()),
    ]))
    .await;
    assert!(
        refused.unwrap_err().contains("certificate"),
        "verification must fail without the CA"
    );
    let plain = reqwest::get(format!("http://{}/v2/", cache.address)).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
}

#[test]
fn bad_tls_files_are_reported_with_their_path() {
    let work = tempfile::tempdir().unwrap();
    let cert = work.path().join("cert.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_podfleet-cache"))
        .args([
            "--storage",
            work.path().to_str().unwrap(),
            "--upstream",
            "a=http://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&cert)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&cert.display().to_string()) && stderr.contains("tls cert"),
        "{stderr}"
    );
}
