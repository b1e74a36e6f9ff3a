//! Validation reports every problem of a file at once, each at its line and column.

use std::path::{Path, PathBuf};

use podfleet_config::{ConfigError, Loaded, Problem, load, parse};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn problems(result: Result<Loaded, ConfigError>) -> Vec<Problem> {
    match result {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Err(other) => panic!("expected an invalid config, got {other}"),
        Ok(loaded) => panic!(
            "expected an invalid config, it loaded: {:?}",
            loaded.warnings
        ),
    }
}

/// `(line, column, key_path)` of each problem, to compare in one assertion.
fn places(problems: &[Problem]) -> Vec<(usize, usize, &str)> {
    problems
        .iter()
        .map(|problem| (problem.line, problem.column, problem.key_path.as_str()))
        .collect()
}

/// A valid runner to build test configs from.
const RUNNER: &str = r#"
concurrent = 2

[[runners]]
  name = "r"
  url = "https://gitlab.example.com"
  token = "glrt-test-token-1234"
  executor = "docker-autoscaler"
  [runners.autoscaler]
    plugin = "aws"
"#;

#[test]
fn every_problem_is_reported_with_its_position() {
    let found = problems(load(&data("several-problems.toml")));
    assert_eq!(
        places(&found),
        [
            (2, 14, "concurrent"),
            (3, 18, "check_interval"),
            (5, 1, "runners[0].url"),
            (7, 3, "runners[0].ulr"),
            (8, 11, "runners[0].token"),
            (12, 18, "runners[0].docker.privileged"),
            (13, 20, "runners[0].docker.network_mode"),
            (14, 30, "runners[0].docker.pull_policy[1]"),
            (17, 5, "runners[0].autoscaler.max_use_cont"),
            (19, 18, "runners[0].autoscaler.connector_config.password"),
            (20, 17, "runners[0].autoscaler.connector_config.timeout"),
            (22, 19, "runners[0].autoscaler.policy[0].idle_time"),
            (23, 20, "runners[0].autoscaler.policy[0].idle_count"),
        ]
    );
    let message = |path: &str| {
        found
            .iter()
            .find(|problem| problem.key_path == path)
            .map(|problem| format!("{}: {}", problem.message, problem.fix))
            .unwrap_or_default()
    };
    assert!(message("concurrent").contains("at least 1"));
    assert!(message("runners[0].url").starts_with("is missing"));
    assert!(message("runners[0].ulr").contains("did you mean \"url\"?"));
    assert!(
        message("runners[0].autoscaler.max_use_cont").contains("did you mean \"max_use_count\"?")
    );
    assert!(message("runners[0].token").starts_with("must be a string, found an integer"));
    assert!(message("runners[0].autoscaler.connector_config.timeout").contains("\"30m0s\""));
    assert!(message("runners[0].autoscaler.policy[0].idle_time").contains("\"1800s\""));
    assert!(message("runners[0].docker.network_mode").contains("FF_NETWORK_PER_BUILD"));
}

#[test]
fn invalid_display_prefixes_every_problem_with_the_origin() {
    let error = load(&data("several-problems.toml")).expect_err("the file is invalid");
    let text = error.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 13);
    let origin = data("several-problems.toml").display().to_string();
    assert_eq!(
        lines[0],
        format!(
            "{origin}:2:14: concurrent: must be at least 1; with 0 no job would ever run \
             (fix: set concurrent to the number of jobs that may run at once across all runners, e.g. concurrent = 4)"
        )
    );
    assert!(
        lines
            .iter()
            .all(|line| line.starts_with(&format!("{origin}:")))
    );
}

#[test]
fn a_syntax_error_is_one_problem_with_its_position() {
    let found = problems(load(&data("syntax-error.toml")));
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].line, found[0].column), (5, 35));
    assert!(
        found[0].message.starts_with("invalid TOML: "),
        "{}",
        found[0].message
    );
}

#[test]
fn unknown_keys_alone_are_warnings() {
    let text = format!("{RUNNER}    max_instancs = 3\n  [runners.referees]\n    x = 1\n");
    let loaded = parse(&text, "config.toml").expect("unknown keys do not stop loading");
    assert_eq!(
        places(&loaded.warnings),
        [
            (11, 5, "runners[0].autoscaler.max_instancs"),
            (12, 12, "runners[0].referees")
        ]
    );
    assert_eq!(loaded.warnings[0].fix, "did you mean \"max_instances\"?");
    assert!(loaded.warnings[1].message.contains("does not use"));
    assert_eq!(
        loaded.config.runners[0]
            .autoscaler
            .as_ref()
            .map(|a| a.max_instances),
        Some(0)
    );
}

#[test]
fn missing_required_keys_point_at_their_table() {
    let found = problems(parse(
        "[[runners]]\n  name = \"x\"\n  [runners.autoscaler]\n",
        "c",
    ));
    let summary: Vec<(usize, usize, &str, &str)> = found
        .iter()
        .map(|p| (p.line, p.column, p.key_path.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (1, 1, "concurrent", "is missing"),
            (1, 1, "runners[0].url", "is missing"),
            (1, 1, "runners[0].token", "is missing"),
            (1, 1, "runners[0].executor", "is missing"),
            (3, 3, "runners[0].autoscaler.plugin", "is missing"),
        ]
    );
}

#[test]
fn only_docker_autoscaler_is_accepted_and_needs_an_autoscaler() {
    let text = RUNNER
        .replace("docker-autoscaler", "shell")
        .replace("  [runners.autoscaler]\n    plugin = \"aws\"\n", "");
    let found = problems(parse(&text, "c"));
    assert_eq!(places(&found), [(8, 14, "runners[0].executor")]);
    assert!(found[0].fix.contains("executor = \"docker-autoscaler\""));

    let without_autoscaler = RUNNER.replace("  [runners.autoscaler]\n    plugin = \"aws\"\n", "");
    let found = problems(parse(&without_autoscaler, "c"));
    assert_eq!(places(&found), [(4, 1, "runners[0].autoscaler")]);
}

#[test]
fn enum_values_are_checked() {
    let text = format!(
        "log_format = \"xml\"\n{RUNNER}    [runners.autoscaler.connector_config]\n      protocol = \"winrm\"\n"
    );
    let text = text.replace("  name = \"r\"", "  name = \"r\"\n  shell = \"fish\"");
    let found = problems(parse(&text, "c"));
    assert_eq!(
        places(&found),
        [
            (1, 14, "log_format"),
            (7, 11, "runners[0].shell"),
            (14, 18, "runners[0].autoscaler.connector_config.protocol"),
        ]
    );
    assert!(found[0].fix.contains("runner, text, json"));
}

#[test]
fn two_runners_may_not_share_a_scale_set() {
    let second = RUNNER
        .replace("concurrent = 2", "")
        .replace("glrt-test-token-1234", "glrt-other-token-5678");
    let text = format!(
        "{RUNNER}    [runners.autoscaler.plugin_config]\n      name = \"vmss\"\n\
         {second}    [runners.autoscaler.plugin_config]\n      name = \"vmss\"\n"
    );
    let found = problems(parse(&text, "c"));
    assert_eq!(
        places(&found),
        [(23, 5, "runners[1].autoscaler.plugin_config")]
    );
    assert!(found[0].message.contains("runners[0]"));

    let distinct = text.replacen("name = \"vmss\"", "name = \"vmss-a\"", 1);
    parse(&distinct, "c").expect("distinct scale sets are fine");
}

#[test]
fn pull_policy_must_be_allowed() {
    let text = RUNNER.replace(
        "  [runners.autoscaler]",
        "  [runners.docker]\n    pull_policy = \"always\"\n    allowed_pull_policies = [\"never\"]\n  [runners.autoscaler]",
    );
    let found = problems(parse(&text, "c"));
    assert_eq!(
        places(&found),
        [(11, 29, "runners[0].docker.allowed_pull_policies")]
    );
}

#[test]
fn docker_values_with_formats_are_checked() {
    let text = RUNNER.replace(
        "  [runners.autoscaler]",
        "  [runners.docker]\n    memory = \"lots\"\n    cpus = \"1.5\"\n    ulimit = { nofile = \"1024:x\" }\n  [runners.autoscaler]",
    );
    let found = problems(parse(&text, "c"));
    assert_eq!(
        places(&found),
        [
            (10, 14, "runners[0].docker.memory"),
            (12, 25, "runners[0].docker.ulimit.nofile")
        ]
    );
}

#[test]
fn inline_tables_and_dotted_keys_are_the_same_config() {
    let text = r#"
concurrent = 1
runners = [{ url = "https://gitlab.example.com", token = "glrt-inline-0001", executor = "docker-autoscaler", autoscaler = { plugin = "aws", policy = [{ idle_count = 2, idle_time = "10m" }] }, docker.privileged = true }]
"#;
    let loaded = parse(text, "c").expect("inline tables load");
    let runner = &loaded.config.runners[0];
    assert!(runner.docker.privileged);
    let policy = &runner.autoscaler.as_ref().expect("autoscaler").policy[0];
    assert_eq!(policy.idle_count, 2);
    assert_eq!(policy.idle_time, std::time::Duration::from_secs(600));
}

#[test]
fn gitlab_runner_written_keys_load() {
    // What `gitlab-runner register` writes: date-times, id, TLS paths with dashes.
    let text = RUNNER.replace(
        "  executor",
        "  id = 42\n  token_obtained_at = 2025-01-02T03:04:05Z\n  token_expires_at = 0001-01-01T00:00:00Z\n  tls-ca-file = \"/etc/ca.pem\"\n  executor",
    );
    let loaded = parse(&text, "c").expect("loads");
    let runner = &loaded.config.runners[0];
    assert_eq!(runner.id, 42);
    assert_eq!(
        runner.token_obtained_at.as_deref(),
        Some("2025-01-02T03:04:05Z")
    );
    assert_eq!(
        runner.tls_ca_file.as_deref(),
        Some(Path::new("/etc/ca.pem"))
    );
}

#[test]
fn durations_in_the_config() {
    let cases = [
        ("30m0s", Some(1800)),
        ("1h30m", Some(5400)),
        ("60s", Some(60)),
        ("10m", Some(600)),
        ("500ms", Some(0)),
        ("thirty", None),
        ("30", None),
        ("-1m", None),
    ];
    for (text, seconds) in cases {
        let config = format!(
            "{RUNNER}    [runners.autoscaler.connector_config]\n      keepalive = \"{text}\"\n"
        );
        match seconds {
            Some(seconds) => {
                let loaded = parse(&config, "c").expect(text);
                let autoscaler = loaded.config.runners[0]
                    .autoscaler
                    .clone()
                    .expect("autoscaler");
                let keepalive = autoscaler
                    .connector_config
                    .keepalive
                    .expect("keepalive is set");
                assert_eq!(keepalive.as_secs(), seconds, "{text}");
            }
            None => {
                let found = problems(parse(&config, "c"));
                let path = "runners[0].autoscaler.connector_config.keepalive";
                assert_eq!(places(&found), [(12, 19, path)], "{text}");
            }
        }
    }
}

#[test]
fn io_errors_name_the_path() {
    let error = load(&data("does-not-exist.toml")).expect_err("missing file");
    assert!(matches!(error, ConfigError::Read { .. }));
    assert!(error.to_string().contains("does-not-exist.toml"), "{error}");
}

#[test]
fn bad_policy_periods_and_time_zones_are_errors_at_their_position() {
    let text = format!(
        "{RUNNER}    [[runners.autoscaler.policy]]\n      periods = [\"* 7-19 * * mon-fri\", \"* 25 * * *\", \"* * * *\"]\n      timezone = \"Europe/Berlim\"\n    [[runners.autoscaler.policy]]\n      periods = [\"*/5 * * * funday\"]\n      timezone = \"UTC\"\n"
    );
    let found = problems(parse(&text, "config.toml"));
    assert_eq!(
        places(&found),
        [
            (12, 40, "runners[0].autoscaler.policy[0].periods[1]"),
            (12, 54, "runners[0].autoscaler.policy[0].periods[2]"),
            (13, 18, "runners[0].autoscaler.policy[0].timezone"),
            (15, 18, "runners[0].autoscaler.policy[1].periods[0]"),
        ]
    );
    assert!(
        found[1].message.contains("4 fields"),
        "{}",
        found[1].message
    );
    assert!(found[2].message.contains("IANA"), "{}", found[2].message);
    assert!(found[2].fix.contains("Europe/Berlin"), "{}", found[2].fix);
}

#[test]
fn good_periods_load_and_evaluate_in_their_time_zone() {
    let text = format!(
        "{RUNNER}    [[runners.autoscaler.policy]]\n      periods = [\"* 7-19 * * mon-fri\"]\n      timezone = \"Europe/Berlin\"\n      idle_count = 2\n"
    );
    let loaded = parse(&text, "config.toml").expect("valid");
    let policy = &loaded.config.runners[0].autoscaler.as_ref().unwrap().policy[0];
    // Friday 2026-12-04 06:30 UTC is 07:30 in Berlin.
    let at = "2026-12-04T06:30:00Z".parse().unwrap();
    assert!(policy.periods[0].is_active(at, policy.timezone));
    assert!(!policy.periods[0].is_active(at, Some(podfleet_config::schedule::Tz::UTC)));
}

#[test]
fn the_ledger_path_follows_the_group_not_the_token() {
    let loaded = parse(RUNNER, "config.toml").expect("valid");
    let state_dir = loaded.config.state_dir();
    assert_eq!(state_dir, Path::new(podfleet_config::DEFAULT_STATE_DIR));
    let autoscaler = loaded.config.runners[0].autoscaler.clone().unwrap();
    let path = autoscaler.ledger_path(&state_dir);
    assert!(path.starts_with(&state_dir), "{}", path.display());
    let other_token = RUNNER.replace("glrt-test-token-1234", "glrt-rotated-token-99");
    let rotated = parse(&other_token, "config.toml").expect("valid");
    let rotated = rotated.config.runners[0].autoscaler.clone().unwrap();
    assert_eq!(rotated.ledger_path(&state_dir), path);
    let other_group = RUNNER.replace(
        "plugin = \"aws\"",
        "plugin = \"aws\"\n    plugin_config = { name = \"b\" }",
    );
    let other_group = parse(&other_group, "config.toml").expect("valid");
    let other_group = other_group.config.runners[0].autoscaler.clone().unwrap();
    assert_ne!(other_group.ledger_path(&state_dir), path);
    let explicit = format!("{RUNNER}    state_file = \"/srv/podfleet/r.redb\"\n");
    let explicit = parse(&explicit, "config.toml").expect("valid");
    let explicit = explicit.config.runners[0].autoscaler.clone().unwrap();
    assert_eq!(
        explicit.ledger_path(&state_dir),
        Path::new("/srv/podfleet/r.redb")
    );
}
