//! Secrets from the config never reach Debug output, errors or summaries.

use std::path::{Path, PathBuf};

use podfleet_config::{ConfigError, load, parse};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// The secret values written in the seed config and in the test files.
const SECRETS: &[&str] = &[
    "glrt-unprivileged-token-0001",
    "unprivileged-token",
    "glrt-privileged-token-0002",
    "example-password-123",
    "glrt-syntax-secret-0003",
    "918273645",
    "5647382910",
];

fn assert_no_secret(text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{secret:?} leaked into: {text}");
    }
}

fn seed_text() -> String {
    std::fs::read_to_string(data("seed-appendix-a.toml")).expect("the seed file is readable")
}

#[test]
fn debug_of_the_loaded_config_masks_token_and_password() {
    let loaded = load(&data("seed-appendix-a.toml")).expect("the seed loads");
    let debug = format!("{loaded:?} {:#?}", loaded.config);
    assert_no_secret(&debug);
    assert!(debug.contains("[MASKED]"));
    // The values are still there for the code that needs them.
    assert_eq!(
        loaded.config.runners[0].token.expose(),
        "glrt-unprivileged-token-0001"
    );
}

#[test]
fn summary_lines_hold_no_secret() {
    let config = load(&data("seed-appendix-a.toml"))
        .expect("the seed loads")
        .config;
    let lines = config.summary_lines();
    assert_eq!(lines.len(), 2);
    assert_no_secret(&lines.join("\n"));
}

#[test]
fn validation_errors_of_a_config_with_secrets_hold_no_secret() {
    // The seed with problems on and around the secret-bearing lines.
    let text = seed_text()
        .replace("concurrent = 18", "concurrent = 0")
        .replace(
            "password = \"example-password-123\"",
            "pasword = \"example-password-123\"",
        )
        .replace(
            "token = \"glrt-privileged-token-0002\"",
            "tokn = \"glrt-privileged-token-0002\"",
        );
    let error = parse(&text, "seed.toml").expect_err("the edited seed is invalid");
    let ConfigError::Invalid { problems, .. } = &error else {
        panic!("expected invalid, got {error}");
    };
    assert!(
        problems
            .iter()
            .any(|problem| problem.key_path == "runners[1].tokn")
    );
    assert!(
        problems
            .iter()
            .any(|problem| problem.key_path == "runners[1].token")
    );
    assert_no_secret(&format!("{error} {error:?}"));
}

#[test]
fn wrong_typed_secrets_are_not_echoed() {
    let error = load(&data("several-problems.toml")).expect_err("invalid");
    assert_no_secret(&format!("{error} {error:?}"));
}

#[test]
fn syntax_errors_do_not_quote_the_broken_line() {
    let error = load(&data("syntax-error.toml")).expect_err("invalid");
    assert_no_secret(&format!("{error} {error:?}"));
}

#[test]
fn a_secret_in_an_unexpected_place_is_not_echoed() {
    // A token pasted as the URL must not be repeated back.
    let text = seed_text().replace(
        "url = \"http://127.0.0.1:18181\"",
        "url = \"glrt-unprivileged-token-0001\"",
    );
    let error = parse(&text, "seed.toml").expect_err("invalid");
    let rendered = format!("{error} {error:?}");
    assert!(rendered.contains("runners[0].url"), "{rendered}");
    assert!(
        !rendered.contains("glrt-unprivileged-token-0001"),
        "{rendered}"
    );
}
