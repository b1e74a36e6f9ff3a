//! Per-runner answers: feature flag precedence and the short token.

use podfleet_config::{RunnerConfig, parse, short_token};

fn runner(extra: &str, feature_flags: &str) -> RunnerConfig {
    let text = format!(
        r#"
concurrent = 1
[[runners]]
  url = "https://gitlab.example.com"
  token = "glrt-t1_abcdefghijklmnopqrst"
  executor = "docker-autoscaler"
  {extra}
  [runners.feature_flags]
    {feature_flags}
  [runners.autoscaler]
    plugin = "aws"
"#
    );
    let mut loaded = parse(&text, "c").expect("the runner loads");
    loaded.config.runners.remove(0)
}

#[test]
fn feature_flags_table_wins_over_environment() {
    let runner = runner(
        r#"environment = ["FF_NETWORK_PER_BUILD=true", "FF_SCRIPT_SECTIONS=1"]"#,
        "FF_NETWORK_PER_BUILD = false",
    );
    assert!(!runner.feature_flag("FF_NETWORK_PER_BUILD"));
    assert!(runner.feature_flag("FF_SCRIPT_SECTIONS"));
}

#[test]
fn environment_wins_over_defaults_and_the_last_entry_counts() {
    let runner = runner(
        r#"environment = ["FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO=0", "FF_ENABLE_JOB_CLEANUP=false", "FF_ENABLE_JOB_CLEANUP=TRUE"]"#,
        "",
    );
    assert!(!runner.feature_flag("FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO"));
    assert!(runner.feature_flag("FF_ENABLE_JOB_CLEANUP"));
}

#[test]
fn defaults_apply_when_nothing_is_set() {
    let runner = runner("", "");
    assert!(runner.feature_flag("FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO"));
    assert!(runner.feature_flag("FF_USE_ADAPTIVE_REQUEST_CONCURRENCY"));
    assert!(runner.feature_flag("FF_MASK_ALL_DEFAULT_TOKENS"));
    assert!(!runner.feature_flag("FF_TIMESTAMPS"));
    assert!(!runner.feature_flag("FF_NETWORK_PER_BUILD"));
    assert!(!runner.feature_flag("FF_NOT_A_FLAG"));
}

#[test]
fn non_boolean_environment_flags_are_ignored_with_a_warning() {
    let text = r#"
concurrent = 1
[[runners]]
  url = "https://gitlab.example.com"
  token = "glrt-abc"
  executor = "docker-autoscaler"
  environment = ["FF_NETWORK_PER_BUILD=yes", "NOEQUALS"]
  [runners.autoscaler]
    plugin = "aws"
"#;
    let loaded = parse(text, "c").expect("warnings only");
    let paths: Vec<_> = loaded
        .warnings
        .iter()
        .map(|w| (w.line, w.column, w.key_path.as_str()))
        .collect();
    assert_eq!(
        paths,
        [
            (7, 18, "runners[0].environment[0]"),
            (7, 46, "runners[0].environment[1]")
        ]
    );
    assert!(!loaded.config.runners[0].feature_flag("FF_NETWORK_PER_BUILD"));
}

#[test]
fn short_token_strips_the_prefix_and_partition() {
    assert_eq!(runner("", "").short_token(), "abcdefghi");
    assert_eq!(short_token("glrt-abcdefghijklmnop"), "abcdefghi");
    assert_eq!(short_token("glrtr-abcdefghijklmnop"), "abcdefghi");
    assert_eq!(short_token("glcbt-abcdefghijklmnop"), "abcdefghi");
    assert_eq!(short_token("t3_abcdefghijklmnop"), "abcdefghi");
    assert_eq!(
        short_token("GR1348941abcdefghijklmnop"),
        "GR1348941abcdefgh"
    );
    assert_eq!(short_token("0123456789abcdef"), "01234567");
}

#[test]
fn podfleet_tags_are_read() {
    let listed = runner(
        "tag_list = [\"podman\", \"linux\"]\n  run_untagged = true",
        "",
    );
    assert_eq!(listed.tag_list, ["podman", "linux"]);
    assert!(listed.run_untagged);
    let comma_separated = runner("tag_list = \"pinp, privileged\"", "");
    assert_eq!(comma_separated.tag_list, ["pinp", "privileged"]);
    assert!(!comma_separated.run_untagged);
}
