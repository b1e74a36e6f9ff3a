//! The report's Appendix A config loads unmodified, with the values the report sets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use podfleet_config::{Config, PullPolicy, load};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn seed() -> Config {
    let loaded = load(&data("seed-appendix-a.toml")).expect("the seed config loads");
    assert_eq!(
        loaded.warnings,
        Vec::new(),
        "the seed config has no warnings"
    );
    loaded.config
}

#[test]
fn global_section_gets_gitlab_runner_defaults() {
    let config = seed();
    assert_eq!(config.concurrent, 18);
    // `check_interval = 0` and `shutdown_timeout = 0` mean "use the default".
    assert_eq!(config.check_interval, Duration::from_secs(3));
    assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(config.listen_address, None);
    let session_server = config.session_server.expect("[session_server] is present");
    assert_eq!(session_server.session_timeout, Duration::from_secs(1800));
    assert_eq!(session_server.listen_address, None);
}

#[test]
fn both_runners_load_with_their_own_values() {
    let config = seed();
    assert_eq!(config.runners.len(), 2);
    let expectations = [
        (
            "Podman Runner (Managed)",
            "glrt-unprivileged-token-0001",
            false,
            2,
            "podman-executors",
        ),
        (
            "Podman-in-Podman Runner (Managed)",
            "glrt-privileged-token-0002",
            true,
            1,
            "pinp-executors",
        ),
    ];
    for (runner, (name, token, privileged, max_use_count, scale_set)) in
        config.runners.iter().zip(expectations)
    {
        assert_eq!(runner.name, name);
        assert_eq!(runner.url, "http://127.0.0.1:18181");
        assert_eq!(runner.token.expose(), token);
        assert_eq!(runner.limit, 9);
        assert_eq!(runner.executor, "docker-autoscaler");
        assert_eq!(runner.shell.as_deref(), Some("sh"));
        assert_eq!(runner.environment.len(), 5);
        assert_eq!(runner.request_concurrency, 1);
        assert_eq!(runner.output_limit, 4096);

        let docker = &runner.docker;
        assert_eq!(
            docker.host.as_deref(),
            Some("unix:///run/user/1001/podman/podman.sock")
        );
        assert!(!docker.tls_verify);
        assert_eq!(
            docker.image.as_deref(),
            Some("quay.io/containers/podman:latest")
        );
        assert_eq!(docker.privileged, privileged);
        assert!(!docker.disable_entrypoint_overwrite);
        assert!(!docker.oom_kill_disable);
        assert_eq!(
            docker.volumes,
            [
                "/certs/client",
                "/etc/containers/registries.conf:/etc/containers/registries.conf:ro"
            ]
        );
        assert_eq!(docker.shm_size, 0);
        assert_eq!(docker.wait_for_services_timeout, 30);
        assert_eq!(docker.effective_pull_policies(), [PullPolicy::Always]);

        let autoscaler = runner
            .autoscaler
            .as_ref()
            .expect("[runners.autoscaler] is present");
        assert_eq!(autoscaler.plugin, "fleeting-plugin-azure");
        assert_eq!(autoscaler.capacity_per_instance, 1);
        assert_eq!(autoscaler.max_use_count, max_use_count);
        assert_eq!(autoscaler.max_instances, 9);
        assert!(autoscaler.delete_instances_on_shutdown);
        assert_eq!(
            autoscaler.instance_acquire_timeout,
            Duration::from_secs(15 * 60)
        );
        assert_eq!(autoscaler.update_interval, Duration::from_secs(60));
        assert_eq!(
            autoscaler.update_interval_when_expecting,
            Duration::from_secs(2)
        );
        assert_eq!(autoscaler.shutdown_deletion_retries, 3);
        assert_eq!(autoscaler.failure_threshold, 3);
        assert_eq!(
            serde_json::Value::Object(autoscaler.plugin_config.clone()),
            serde_json::json!({
                "name": scale_set,
                "subscription_id": "00000000-0000-0000-0000-000000000000",
                "resource_group_name": "gitlab-runner-test",
            })
        );

        let connector = &autoscaler.connector_config;
        assert_eq!(
            connector.username.as_deref(),
            Some("gitlab-runner-executor")
        );
        assert_eq!(
            connector
                .password
                .as_ref()
                .map(|password| password.expose()),
            Some("example-password-123")
        );
        assert!(connector.use_static_credentials);
        assert_eq!(connector.timeout, Some(Duration::from_secs(600)));
        assert_eq!(connector.keepalive, Some(Duration::from_secs(60)));
        assert!(!connector.use_external_addr);
        assert_eq!(connector.protocol, None);

        assert_eq!(autoscaler.policy.len(), 1);
        let policy = &autoscaler.policy[0];
        assert_eq!(policy.idle_count, 0);
        assert_eq!(policy.idle_time, Duration::from_secs(30 * 60));
        assert_eq!(policy.periods, ["* * * * *"]);
        assert_eq!(policy.timezone, None);
        assert!(!policy.preemptive());
    }
}

#[test]
fn feature_flags_come_from_environment() {
    let config = seed();
    let runner = &config.runners[0];
    assert!(runner.feature_flag("FF_NETWORK_PER_BUILD"));
    assert!(runner.feature_flag("FF_ENABLE_JOB_CLEANUP"));
    assert!(runner.feature_flag("FF_SCRIPT_SECTIONS"));
    assert!(runner.feature_flag("FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO"));
    assert!(!runner.feature_flag("FF_USE_FLEETING_ACQUIRE_HEARTBEATS"));
    assert_eq!(runner.short_token(), "unprivile");
    assert_eq!(config.runners[1].short_token(), "privilege");
}

#[test]
fn summary_has_one_line_per_runner() {
    let lines = seed().summary_lines();
    assert_eq!(
        lines,
        [
            "runner \"Podman Runner (Managed)\": executor docker-autoscaler, plugin fleeting-plugin-azure, \
             capacity_per_instance 1, max_instances 9, max_use_count 2, limit 9, tags none, run_untagged false",
            "runner \"Podman-in-Podman Runner (Managed)\": executor docker-autoscaler, plugin fleeting-plugin-azure, \
             capacity_per_instance 1, max_instances 9, max_use_count 1, limit 9, tags none, run_untagged false",
        ]
    );
}

#[test]
fn every_documented_key_is_modelled() {
    let loaded = load(&data("every-key.toml")).expect("every documented key loads");
    assert_eq!(loaded.warnings, Vec::new(), "no key is unknown");
    let config = loaded.config;
    assert_eq!(config.check_interval, Duration::from_secs(5));
    assert_eq!(config.connection_max_age, Duration::from_secs(600));
    assert_eq!(config.log_format.as_deref(), Some("json"));
    let runner = &config.runners[0];
    assert_eq!(
        runner.token_expires_at.as_deref(),
        Some("2026-01-02T03:04:05Z")
    );
    assert_eq!(runner.unhealthy_interval, Duration::from_secs(1800));
    assert!(!runner.feature_flag("FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO"));
    let docker = &runner.docker;
    assert_eq!(
        docker.pull_policy,
        [PullPolicy::IfNotPresent, PullPolicy::Always]
    );
    assert_eq!(docker.wait_for_services_timeout, -1);
    assert_eq!(docker.services_limit, Some(2));
    assert_eq!(docker.services[0].command, ["postgres", "-c", "fsync=off"]);
    assert_eq!(docker.services_devices["quay.io/podman/*"], ["/dev/fuse"]);
    assert_eq!(docker.ulimit["nofile"], "1024:2048");
    assert_eq!(docker.tmpfs["/tmp"], "rw,size=64m");
    let autoscaler = runner.autoscaler.as_ref().expect("autoscaler");
    assert_eq!(autoscaler.instance_is_running_time_buckets, [1.0, 2.0]);
    assert_eq!(autoscaler.scale_throttle.limit, -1);
    assert_eq!(autoscaler.reservation_throttling, Some(false));
    assert!(autoscaler.vm_isolation);
    assert_eq!(
        autoscaler.plugin_config["nested"],
        serde_json::json!({
            "count": 2, "ratio": 0.5, "enabled": true, "at": "2025-01-01T00:00:00Z", "list": [1, "two"]
        })
    );
    assert_eq!(autoscaler.connector_config.protocol_port, Some(2222));
    let policy = &autoscaler.policy[0];
    assert_eq!(policy.periods, ["* 7-19 * * mon-fri"]);
    assert_eq!(policy.scale_factor, 1.5);
    assert!(!policy.preemptive());
}
