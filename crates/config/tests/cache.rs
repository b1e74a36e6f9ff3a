//! `[runners.cache]`: the shared S3 cache section, its cross-key checks and its secrets.

use podfleet_config::{Problem, parse};

const RUNNER: &str = r#"concurrent = 1
[[runners]]
  name = "r"
  url = "https://gitlab.example.com"
  token = "glrt-test-token-1234"
  executor = "docker-autoscaler"
  [runners.autoscaler]
    plugin = "aws"
"#;

fn errors(text: &str) -> Vec<Problem> {
    match parse(text, "config.toml") {
        Ok(loaded) => panic!(
            "expected errors, loaded {:?}",
            loaded.config.runners[0].cache
        ),
        Err(podfleet_config::ConfigError::Invalid { problems, .. }) => problems,
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[test]
fn a_full_s3_section_is_typed_and_its_keys_are_secrets() {
    let text = format!(
        "{RUNNER}  [runners.cache]\n    Type = \"s3\"\n    Path = \"ci\"\n    Shared = true\n    MaxUploadedArchiveSize = 1048576\n    [runners.cache.s3]\n      ServerAddress = \"minio.internal:9000\"\n      AccessKey = \"AKIA-VISIBLE-NOWHERE\"\n      SecretKey = \"very-secret-key\"\n      BucketName = \"runner-cache\"\n      BucketLocation = \"eu-west-1\"\n      Insecure = true\n"
    );
    let loaded = parse(&text, "config.toml").unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let cache = loaded.config.runners[0].cache.as_ref().unwrap();
    assert_eq!(cache.cache_type.as_deref(), Some("s3"));
    assert_eq!(cache.path.as_deref(), Some("ci"));
    assert!(cache.shared);
    assert_eq!(cache.max_uploaded_archive_size, 1_048_576);
    let s3 = cache.s3.as_ref().unwrap();
    assert_eq!(s3.server_address.as_deref(), Some("minio.internal:9000"));
    assert_eq!(s3.secret_key.as_ref().unwrap().expose(), "very-secret-key");
    assert_eq!(s3.bucket_location.as_deref(), Some("eu-west-1"));
    assert!(s3.insecure);
    let shown = format!("{:?}", loaded.config);
    assert!(
        !shown.contains("very-secret-key") && !shown.contains("AKIA-VISIBLE-NOWHERE"),
        "{shown}"
    );
}

#[test]
fn s3_without_its_section_or_keys_is_an_error_with_position() {
    let found = errors(&format!("{RUNNER}  [runners.cache]\n    Type = \"s3\"\n"));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].line, found[0].key_path.as_str()),
        (10, "runners[0].cache.Type"),
        "{found:?}"
    );
    assert!(
        found[0].fix.contains("[runners.cache.s3]"),
        "{}",
        found[0].fix
    );

    let found = errors(&format!(
        "{RUNNER}  [runners.cache]\n    Type = \"s3\"\n    [runners.cache.s3]\n      BucketName = \"b\"\n      SecretKey = \"x\"\n      ServerAddress = \"https://minio:9000\"\n"
    ));
    let paths: Vec<&str> = found.iter().map(|p| p.key_path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "runners[0].cache.s3.AccessKey",
            "runners[0].cache.s3.ServerAddress"
        ],
        "{found:?}"
    );
}

#[test]
fn unsupported_types_and_missing_bucket_are_errors() {
    let found = errors(&format!("{RUNNER}  [runners.cache]\n    Type = \"gcs\"\n"));
    assert!(
        found[0].message.contains("\"gcs\" is not one of s3"),
        "{found:?}"
    );

    let found = errors(&format!(
        "{RUNNER}  [runners.cache]\n    Type = \"s3\"\n    [runners.cache.s3]\n      AccessKey = \"a\"\n      SecretKey = \"b\"\n"
    ));
    assert!(
        found
            .iter()
            .any(|p| p.key_path == "runners[0].cache.s3.BucketName"),
        "{found:?}"
    );
}

#[test]
fn an_s3_section_without_type_is_a_warning() {
    let loaded = parse(
        &format!("{RUNNER}  [runners.cache]\n    [runners.cache.s3]\n      BucketName = \"b\"\n"),
        "config.toml",
    )
    .unwrap();
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert!(loaded.warnings[0].message.contains("no Type"));
}
